//! Builds the control-plane binaries (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubectl, and the chart tools helm and kubeconform) from their Go modules, once, into a cache that later runs reuse.
//!
//! Prebuilt binaries cannot be downloaded on the machines Tether is developed on, and Debian's
//! etcd is too old for a current kube-apiserver, so the Go modules under `e2e/controlplane/` pin
//! the releases and this module builds them. The cache key is a hash of those modules' files,
//! so changing a pin rebuilds and nothing else does. A cold build takes several minutes; it
//! prints each package as the Go compiler finishes it, with a count, so the wait is visible.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use sha2::{Digest, Sha256};

/// The Kubernetes release the control plane is built from (see `controlplane/kube/go.mod`).
pub const KUBERNETES_VERSION: &str = "v1.34.4";

/// Errors of building or finding the control-plane binaries.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `go` is missing or a Go command failed.
    #[error("{0}")]
    Go(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// The binaries the tests and `cargo dev up` run.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// etcd 3.6.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kube-controller-manager.
    pub kube_controller_manager: PathBuf,
    /// kube-scheduler.
    pub kube_scheduler: PathBuf,
    /// kubectl of the same release.
    pub kubectl: PathBuf,
    /// helm 3, for the chart tests and `cargo dev up`.
    pub helm: PathBuf,
    /// kubeconform, which checks rendered manifests against schemas.
    pub kubeconform: PathBuf,
}

impl Binaries {
    /// Puts helm's caches, config and plugins in a directory of Tether's own, so neither the
    /// tests nor `cargo dev up` read or write the user's helm setup. Other programs ignore it.
    pub fn isolate_helm(cmd: &mut Command) -> &mut Command {
        let home = std::env::temp_dir().join("tether-helm");
        cmd.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
    }

    fn in_dir(dir: &Path) -> Self {
        Self {
            etcd: dir.join("etcd"),
            kube_apiserver: dir.join("kube-apiserver"),
            kube_controller_manager: dir.join("kube-controller-manager"),
            kube_scheduler: dir.join("kube-scheduler"),
            kubectl: dir.join("kubectl"),
            helm: dir.join("helm"),
            kubeconform: dir.join("kubeconform"),
        }
    }

    fn all_exist(&self) -> bool {
        [
            &self.etcd,
            &self.kube_apiserver,
            &self.kube_controller_manager,
            &self.kube_scheduler,
            &self.kubectl,
            &self.helm,
            &self.kubeconform,
        ]
        .iter()
        .all(|p| p.is_file())
    }
}

/// Root of Tether's caches: `$TETHER_CACHE_DIR`, else `$XDG_CACHE_HOME/tether`, else
/// `~/.cache/tether`. Outside the repository so a fresh clone reuses it.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("TETHER_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("tether");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache").join("tether")
}

/// The repository root (this crate lives in `e2e/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

fn modules_dir() -> PathBuf {
    repo_root().join("e2e").join("controlplane")
}

/// A hash of every file of the Go modules, so the cache follows the pins.
fn source_key() -> Result<String, BuildError> {
    let mut files = Vec::new();
    collect_files(&modules_dir(), &mut files)?;
    files.sort();
    let mut hash = Sha256::new();
    for file in files {
        let rel = file.strip_prefix(modules_dir()).unwrap_or(&file);
        hash.update(rel.to_string_lossy().as_bytes());
        hash.update(fs::read(&file).map_err(io(format!("reading {}", file.display())))?);
    }
    Ok(hex::encode(&hash.finalize()[..8]))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), BuildError> {
    for entry in fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))? {
        let path = entry.map_err(io("reading a directory entry"))?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Returns the cached binaries, building them first when they are missing. Concurrent callers
/// (several test binaries at once) wait on a lock file instead of building twice.
pub fn ensure() -> Result<Binaries, BuildError> {
    if let Some(dir) = std::env::var_os("TETHER_CONTROLPLANE_BIN") {
        let bins = Binaries::in_dir(Path::new(&dir));
        if bins.all_exist() {
            return Ok(bins);
        }
        return Err(BuildError::Go(format!(
            "TETHER_CONTROLPLANE_BIN={} does not hold etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm and kubeconform",
            Path::new(&dir).display()
        )));
    }
    let key = source_key()?;
    let dir = cache_root()
        .join("controlplane")
        .join(format!("{KUBERNETES_VERSION}-{key}"));
    let bins = Binaries::in_dir(&dir);
    if bins.all_exist() {
        return Ok(bins);
    }
    fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let lock_path = dir.join(".lock");
    let lock =
        fs::File::create(&lock_path).map_err(io(format!("creating {}", lock_path.display())))?;
    lock.lock().map_err(io("locking the control-plane build"))?;
    if !bins.all_exist() {
        eprintln!(
            "tether: building the Kubernetes {KUBERNETES_VERSION} control plane and etcd from their Go modules into {}\n\
             tether: a cold build takes several minutes on two cores; later runs reuse it",
            dir.display()
        );
        build_module("etcd", &dir, &[], "./cmd/...")?;
        let ldflags = format!(
            "-s -w -X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION} \
             -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34 \
             -X k8s.io/component-base/version.gitTreeState=clean"
        );
        build_module("kube", &dir, &["-ldflags", &ldflags], "./cmd/...")?;
        // `tool` is every `tool` line of that go.mod: helm and kubeconform.
        build_module("tools", &dir, &["-ldflags", "-s -w"], "tool")?;
    }
    drop(lock);
    Ok(bins)
}

fn go() -> Command {
    let mut cmd = Command::new("go");
    cmd.env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=readonly");
    cmd
}

/// Builds the `packages` pattern of one module into `out`, printing progress.
fn build_module(
    module: &str,
    out: &Path,
    extra: &[&str],
    packages: &str,
) -> Result<(), BuildError> {
    let dir = modules_dir().join(module);
    let total = go()
        .args(["list", "-deps", packages])
        .current_dir(&dir)
        .output()
        .map_err(|e| BuildError::Go(format!("cannot run `go` ({e}); install Go 1.26 or newer")))?;
    if !total.status.success() {
        return Err(BuildError::Go(format!(
            "`go list` failed in {}:\n{}",
            dir.display(),
            String::from_utf8_lossy(&total.stderr)
        )));
    }
    let total = total
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    let started = std::time::Instant::now();
    let mut child = go()
        .args(["build", "-v", "-trimpath", "-o"])
        .arg(format!("{}/", out.display()))
        .args(extra)
        .arg(packages)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BuildError::Go(format!("cannot run `go build`: {e}")))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut done = 0usize;
    let mut errors = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.map_err(io("reading go build output"))?;
        // `go build -v` prints one import path per compiled package; anything else is an error.
        if line.contains(' ') || line.starts_with('#') {
            eprintln!("{line}");
            errors.push(line);
            continue;
        }
        done += 1;
        if done.is_multiple_of(25) {
            eprintln!(
                "tether: [{module}] compiled {done} of at most {total} packages ({}s): {line}",
                started.elapsed().as_secs()
            );
        }
    }
    let status = child.wait().map_err(io("waiting for go build"))?;
    if !status.success() {
        return Err(BuildError::Go(format!(
            "building e2e/controlplane/{module} failed ({status}):\n{}",
            errors.join("\n")
        )));
    }
    eprintln!(
        "tether: [{module}] built in {}s",
        started.elapsed().as_secs()
    );
    Ok(())
}
