//! The sign-in cache: `$KUBECACHEDIR/tether/` (else `$HOME/.kube/cache/tether/`), a directory
//! of mode 0700 holding one file of mode 0600 per (issuer, client id), named by a hash of the
//! two, plus `gateways.json`, which remembers which provider each gateway signed in with.
//!
//! Files are written whole or not at all: a temporary file created with mode 0600 in the same
//! directory, flushed to disk, then renamed over the old one. At no instant is a token readable
//! by anyone but the owner.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An ID token that expires within this many seconds is refreshed before use.
pub const REFRESH_MARGIN_SECS: i64 = 60;

const GATEWAYS: &str = "gateways.json";

/// Which provider and client a sign-in is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Provider {
    pub issuer: String,
    pub client_id: String,
}

impl Provider {
    pub fn new(issuer: impl Into<String>, client_id: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            client_id: client_id.into(),
        }
    }

    /// The file name of this provider's sign-in: a hash, so that neither the issuer's URL nor
    /// the client id needs escaping and the name says nothing.
    pub fn file_name(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.issuer.trim_end_matches('/').as_bytes());
        h.update([0]);
        h.update(self.client_id.as_bytes());
        let digest = h.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{hex}.json")
    }
}

/// One cached sign-in. `Debug` leaves the tokens out.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub issuer: String,
    pub client_id: String,
    pub id_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// The ID token's `exp`, in seconds since the Unix epoch.
    pub expiry: i64,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("id_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expiry", &self.expiry)
            .finish()
    }
}

/// What to do with a cached sign-in at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The ID token is good for more than [`REFRESH_MARGIN_SECS`].
    Fresh,
    /// It expires within the margin (or has) and there is a refresh token to get a new one.
    Refresh,
    /// It expires within the margin and cannot be refreshed: sign in again.
    Stale,
}

impl Entry {
    pub fn provider(&self) -> Provider {
        Provider::new(&self.issuer, &self.client_id)
    }

    pub fn freshness(&self, now: i64) -> Freshness {
        if self.expiry > now + REFRESH_MARGIN_SECS {
            Freshness::Fresh
        } else if self.refresh_token.is_some() {
            Freshness::Refresh
        } else {
            Freshness::Stale
        }
    }

    /// Still accepted for `secs` more seconds (used when a refresh fails).
    pub fn valid_for(&self, now: i64, secs: i64) -> bool {
        self.expiry > now + secs
    }

    /// The `email` (else `preferred_username`, else `sub`) claim of the ID token, for messages.
    /// Read without verification: only ever shown, never trusted.
    pub fn who(&self) -> Option<String> {
        let payload = id_token_payload(&self.id_token)?;
        ["email", "preferred_username", "sub"]
            .iter()
            .find_map(|c| payload.get(*c)?.as_str().map(str::to_owned))
    }
}

/// The payload of a JWT, decoded but not verified.
pub fn id_token_payload(jwt: &str) -> Option<serde_json::Value> {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A gateway URL as the mapping keys it: no trailing slash.
pub fn gateway_key(gateway: &str) -> String {
    gateway.trim().trim_end_matches('/').to_owned()
}

/// The cache directory and its files.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// `$KUBECACHEDIR/tether`, else `$HOME/.kube/cache/tether`.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_vars(std::env::var_os("KUBECACHEDIR"), std::env::var_os("HOME"))
    }

    fn from_vars(
        kubecachedir: Option<std::ffi::OsString>,
        home: Option<std::ffi::OsString>,
    ) -> anyhow::Result<Self> {
        let base = match kubecachedir.filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                let home = home
                    .filter(|v| !v.is_empty())
                    .context("neither KUBECACHEDIR nor HOME is set: nowhere to keep the sign-in")?;
                PathBuf::from(home).join(".kube").join("cache")
            }
        };
        Ok(Self::at(base.join("tether")))
    }

    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, provider: &Provider) -> PathBuf {
        self.dir.join(provider.file_name())
    }

    /// Creates the directory (and its parents) with mode 0700; narrows an existing one that is
    /// wider (which fails, and so refuses, when it belongs to somebody else).
    fn ensure_dir(&self) -> anyhow::Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let meta = fs::symlink_metadata(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory", self.dir.display());
        }
        if meta.permissions().mode() & 0o777 != 0o700 {
            fs::set_permissions(&self.dir, Permissions::from_mode(0o700))
                .with_context(|| format!("narrowing {} to mode 0700", self.dir.display()))?;
        }
        Ok(())
    }

    /// Writes `bytes` to `name` in the cache directory atomically, mode 0600.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        self.ensure_dir()?;
        let target = self.dir.join(name);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = self.dir.join(format!(
            ".{name}.{}.{}.{nanos}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            // Created with 0600 (the umask can only narrow it) and never existing before.
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.set_permissions(Permissions::from_mode(0o600))?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &target)
                .with_context(|| format!("renaming into {}", target.display()))?;
            // The rename itself is durable once the directory is synced.
            if let Ok(d) = fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
            Ok(target.clone())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The sign-in for `provider`, if there is a readable one.
    pub fn load(&self, provider: &Provider) -> anyhow::Result<Option<Entry>> {
        let path = self.path_of(provider);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let entry: Entry = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a Tether sign-in", path.display()))?;
        if entry.provider() != *provider {
            // A hash collision, or a file copied by hand: not ours to use.
            return Ok(None);
        }
        Ok(Some(entry))
    }

    pub fn store(&self, entry: &Entry) -> anyhow::Result<PathBuf> {
        let json = serde_json::to_vec_pretty(entry)?;
        self.write_file(&entry.provider().file_name(), &json)
    }

    /// Deletes the sign-in for `provider` and every gateway pointing at it; its path if there
    /// was one.
    pub fn remove(&self, provider: &Provider) -> anyhow::Result<Option<PathBuf>> {
        let path = self.path_of(provider);
        let existed = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        };
        let mut gateways = self.gateways()?;
        let before = gateways.len();
        gateways.retain(|_, p| p != provider);
        if gateways.len() != before {
            self.write_gateways(&gateways)?;
        }
        Ok(existed.then_some(path))
    }

    fn gateways(&self) -> anyhow::Result<BTreeMap<String, Provider>> {
        let path = self.dir.join(GATEWAYS);
        match fs::read(&path) {
            Ok(b) => Ok(serde_json::from_slice(&b).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn write_gateways(&self, map: &BTreeMap<String, Provider>) -> anyhow::Result<()> {
        self.write_file(GATEWAYS, &serde_json::to_vec_pretty(map)?)?;
        Ok(())
    }

    /// Remembers that `gateway` signs in with `provider`.
    pub fn remember_gateway(&self, gateway: &str, provider: &Provider) -> anyhow::Result<()> {
        let mut map = self.gateways()?;
        if map.get(&gateway_key(gateway)) == Some(provider) {
            return Ok(());
        }
        map.insert(gateway_key(gateway), provider.clone());
        self.write_gateways(&map)
    }

    /// The provider `gateway` signed in with last time.
    pub fn gateway_provider(&self, gateway: &str) -> anyhow::Result<Option<Provider>> {
        Ok(self.gateways()?.remove(&gateway_key(gateway)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn entry(expiry: i64, refresh: bool) -> Entry {
        Entry {
            issuer: "https://idp.example/realms/t".into(),
            client_id: "kubectl-tether".into(),
            id_token: "header.eyJzdWIiOiJzLTEiLCJlbWFpbCI6ImFAZXhhbXBsZSJ9.sig".into(),
            refresh_token: refresh.then(|| "refresh-secret".into()),
            expiry,
        }
    }

    #[test]
    fn the_directory_comes_from_kubecachedir_else_home() {
        let c = Cache::from_vars(Some("/k".into()), Some("/h".into())).unwrap();
        assert_eq!(c.dir(), Path::new("/k/tether"));
        let c = Cache::from_vars(Some("".into()), Some("/h".into())).unwrap();
        assert_eq!(c.dir(), Path::new("/h/.kube/cache/tether"));
        assert!(Cache::from_vars(None, None).is_err());
    }

    #[test]
    fn a_sign_in_is_a_0600_file_in_a_0700_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("a/b/tether"));
        let e = entry(now() + 600, true);
        let path = cache.store(&e).unwrap();
        assert_eq!(path.parent().unwrap(), cache.dir());
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(cache.dir()), 0o700);
        // The parents it had to create are private too.
        assert_eq!(mode(&tmp.path().join("a/b")), 0o700);
        assert_eq!(cache.load(&e.provider()).unwrap().unwrap(), e);
        // The file is named by a hash, and holds what the brief says.
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.ends_with(".json") && !name.contains("idp"), "{name}");
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        for k in ["issuer", "client_id", "id_token", "refresh_token", "expiry"] {
            assert!(json.get(k).is_some(), "{k} in {json}");
        }
        // Another provider or client is another file.
        let other = Provider::new(&e.issuer, "another-client");
        assert_ne!(other.file_name(), e.provider().file_name());
        assert!(cache.load(&other).unwrap().is_none());
    }

    #[test]
    fn a_wider_directory_is_narrowed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tether");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        let cache = Cache::at(&dir);
        cache.store(&entry(now() + 600, false)).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn writes_replace_whole_files_and_leave_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("tether"));
        let first = entry(now() + 600, true);
        let path = cache.store(&first).unwrap();
        // An old file that was wider than it should be is replaced by a 0600 one.
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        let second = entry(now() + 1200, false);
        cache.store(&second).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(cache.load(&second.provider()).unwrap().unwrap(), second);
        let names: Vec<_> = fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");

        // A write that cannot finish (the target is a directory) removes its temporary file
        // and leaves the old state alone.
        let blocked = cache.dir().join("blocked.json");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), "x").unwrap();
        assert!(cache.write_file("blocked.json", b"{}").is_err());
        let names: Vec<_> = fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
        assert_eq!(cache.load(&second.provider()).unwrap().unwrap(), second);
    }

    #[test]
    fn no_file_is_ever_readable_by_others_and_readers_see_whole_files() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("tether"));
        let e = entry(now() + 600, true);
        let path = cache.store(&e).unwrap();
        let dir = cache.dir().to_owned();
        let writer = std::thread::spawn(move || {
            for i in 0..300 {
                let mut e = e.clone();
                e.expiry += i;
                e.id_token = "x".repeat(1000 + i as usize);
                cache.store(&e).unwrap();
            }
        });
        while !writer.is_finished() {
            for f in fs::read_dir(&dir).unwrap().flatten() {
                // Temporary files come and go; any that is seen is private.
                if let Ok(m) = f.metadata() {
                    assert_eq!(m.permissions().mode() & 0o077, 0, "{:?}", f.path());
                }
            }
            let bytes = fs::read(&path).unwrap();
            serde_json::from_slice::<Entry>(&bytes).expect("a whole file");
        }
        writer.join().unwrap();
    }

    #[test]
    fn an_id_token_is_refreshed_within_a_minute_of_its_expiry() {
        let t = 1_000_000;
        assert_eq!(entry(t + 61, true).freshness(t), Freshness::Fresh);
        assert_eq!(entry(t + 61, false).freshness(t), Freshness::Fresh);
        assert_eq!(entry(t + 60, true).freshness(t), Freshness::Refresh);
        assert_eq!(entry(t - 3600, true).freshness(t), Freshness::Refresh);
        assert_eq!(entry(t + 60, false).freshness(t), Freshness::Stale);
        assert_eq!(entry(t - 1, false).freshness(t), Freshness::Stale);
        assert!(entry(t + 30, true).valid_for(t, 5));
        assert!(!entry(t + 5, true).valid_for(t, 5));
    }

    #[test]
    fn tokens_stay_out_of_debug_output_and_who_reads_the_claims() {
        let e = entry(1, true);
        let dbg = format!("{e:?}");
        assert!(
            !dbg.contains("refresh-secret") && !dbg.contains("eyJ"),
            "{dbg}"
        );
        assert_eq!(e.who().as_deref(), Some("a@example"));
    }

    #[test]
    fn gateways_remember_their_provider_until_logout() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("tether"));
        let e = entry(now() + 600, true);
        cache.store(&e).unwrap();
        cache
            .remember_gateway("https://gw.example/", &e.provider())
            .unwrap();
        assert_eq!(
            cache.gateway_provider("https://gw.example").unwrap(),
            Some(e.provider())
        );
        assert_eq!(mode(&cache.dir().join(GATEWAYS)), 0o600);
        let removed = cache.remove(&e.provider()).unwrap().unwrap();
        assert!(!removed.exists());
        assert_eq!(cache.gateway_provider("https://gw.example").unwrap(), None);
        assert_eq!(cache.remove(&e.provider()).unwrap(), None);
    }
}
