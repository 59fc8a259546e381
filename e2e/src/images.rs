//! Builds Tether's three images from the repository's `Dockerfile` with buildah, on a Debian
//! host with no Docker daemon and no reachable registry: the final stages `operator`, `gateway`
//! and `session` are the ones `docker build` runs, fed with binaries built on the host.
//!
//! 1. **Base images.** The Dockerfile's bases (`gcr.io/distroless/cc-debian12:nonroot`,
//!    `debian:bookworm-slim`) cannot be pulled, so local stand-ins are built from Debian bookworm
//!    packages with mmdebstrap (see [`BASES`]) and passed as the `RUNTIME_BASE` and
//!    `SESSION_BASE` build arguments. Their root file systems are built once and cached as
//!    tarballs in `cache_root()/images/bases/`, named by a hash of everything that went into them
//!    (suite, mirrors, variant, packages, hooks), then imported into buildah's storage.
//! 2. **The session's system** (the `session-system` stage: apt-get of tmux and the shells, the
//!    `tether` user) is built once per base and Dockerfile stage text, and passed to the
//!    `session` stage as `SESSION_SYSTEM`, so changing the agent does not run apt again.
//! 3. **The images.** `buildah build --target operator|gateway|session` with
//!    `BINARIES=prebuilt` and the build context `tether-binaries` set to
//!    [`ImageOptions::binaries`], then `buildah push` to an `oci-archive` file per image. An
//!    image whose Dockerfile, binary and bases are unchanged is not rebuilt.
//!
//! buildah's storage, configuration and temporary files are Tether's own, under
//! `cache_root()/images/buildah/`: the vfs driver (no fuse-overlayfs, works on any file system),
//! its own `storage.conf`, `registries.conf` (no search registries), `policy.json` and an empty
//! `containers.conf`, so the user's containers setup is neither read nor changed. `RUN` steps
//! use chroot isolation: no runc or crun, no user namespaces, the host's network (the session's
//! `apt-get` reaches Debian's mirror).
//!
//! Needs root (mmdebstrap's root mode, buildah's chroot isolation) and the Debian packages in
//! [`DEBIAN_PACKAGES`]: `buildah` (which brings `uidmap` and `golang-github-containers-common`)
//! and `mmdebstrap`. Their recommends are not needed (`fuse-overlayfs`, `crun`/`runc`,
//! `fakechroot`, `arch-test`). `tar`, used to read archives, is essential on Debian.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::binaries::{cache_root, repo_root};

/// The Debian packages [`build`] runs (`apt-get install --no-install-recommends` is enough).
pub const DEBIAN_PACKAGES: &[&str] = &["buildah", "mmdebstrap"];

/// The registry part of every image name built here, the chart's `image.registry`.
pub const REGISTRY: &str = "localhost/tether";

/// Where and what to build.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Directory holding `tether-operator`, `tether-gateway` and `tether-session-agent`, built on
    /// this (Debian bookworm) host, for example `target/debug`.
    pub binaries: PathBuf,
    /// Where the `oci-archive` files are written (one per image).
    pub out_dir: PathBuf,
    /// The images' tag, the chart's `image.tag`.
    pub tag: String,
}

/// An image built by [`build`].
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Full name, for example `localhost/tether/tether-operator:dev`; the archive carries it.
    pub name: String,
    /// The image as an `oci-archive` (`ctr images import` keeps the name).
    pub archive: PathBuf,
}

/// One image of the Dockerfile.
struct Target {
    /// Image name under [`REGISTRY`].
    image: &'static str,
    /// The Dockerfile stage.
    stage: &'static str,
    /// The binary of [`ImageOptions::binaries`] it carries.
    binary: &'static str,
}

const TARGETS: [Target; 3] = [
    Target {
        image: "tether-operator",
        stage: "operator",
        binary: "tether-operator",
    },
    Target {
        image: "tether-gateway",
        stage: "gateway",
        binary: "tether-gateway",
    },
    Target {
        image: "tether",
        stage: "session",
        binary: "tether-session-agent",
    },
];

/// The stage built once per base and fed to `session` as `SESSION_SYSTEM`.
const SESSION_SYSTEM_STAGE: &str = "session-system";

/// A base image built with mmdebstrap. Everything in it goes into its cache key.
#[derive(Debug)]
pub struct Base {
    /// Image name under [`REGISTRY`]; the tag is the cache key.
    pub image: &'static str,
    /// The Dockerfile build argument it is passed as.
    pub build_arg: &'static str,
    /// The upstream image it stands in for (the build argument's default).
    pub upstream: &'static str,
    /// `mmdebstrap --variant`.
    pub variant: &'static str,
    /// `mmdebstrap --include` (and their dependencies).
    pub include: &'static [&'static str],
    /// Further mmdebstrap options: hooks, dpkg options.
    pub options: &'static [&'static str],
    /// `buildah config` options of the imported image.
    pub config: &'static [&'static str],
}

/// Debian release of the bases; the host's binaries link against its glibc.
const SUITE: &str = "bookworm";
/// The mirrors of the bases, also their `sources.list` (so the session's `apt-get` uses them).
const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
/// Bump to rebuild every base without changing its recipe.
const BASE_RECIPE_VERSION: &str = "1";

/// The stand-in for `gcr.io/distroless/cc-debian12:nonroot`: the packages are only extracted
/// (no shell, no dpkg database of installed packages), the CA bundle is assembled from
/// ca-certificates' files (its postinst does not run), and the users are distroless' own
/// (`nonroot` 65532, home `/home/nonroot`). Documentation is dropped.
const RUNTIME_HOOK: &str = r#"set -e
r="$1"
cat "$r"/usr/share/ca-certificates/mozilla/*.crt > "$r"/etc/ssl/certs/ca-certificates.crt
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' > "$r"/etc/passwd
printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' > "$r"/etc/group
printf '%s\n' 'passwd: files' 'group: files' 'shadow: files' 'hosts: files dns' 'networks: files' > "$r"/etc/nsswitch.conf
install -d -m 0700 -o 65532 -g 65532 "$r"/home/nonroot
rm -rf "$r"/usr/share/man "$r"/usr/share/info "$r"/usr/share/lintian
find "$r"/usr/share/doc -type f ! -name copyright -delete"#;

/// What `debian:bookworm-slim` adds to a minbase system, in the image only (not during
/// mmdebstrap's own apt runs): services never start, apt keeps no .deb files, caches or
/// translations, and indexes stay compressed.
const SESSION_HOOK: &str = r#"set -e
r="$1"
printf '#!/bin/sh\nexit 101\n' > "$r"/usr/sbin/policy-rc.d
chmod 0755 "$r"/usr/sbin/policy-rc.d
cat > "$r"/etc/apt/apt.conf.d/docker-clean <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' > "$r"/etc/apt/apt.conf.d/docker-no-languages
echo 'Acquire::GzipIndexes "true";' > "$r"/etc/apt/apt.conf.d/docker-gzip-indexes
echo 'Apt::AutoRemove::SuggestsImportant "false";' > "$r"/etc/apt/apt.conf.d/docker-autoremove-suggests
# mmdebstrap's cleanup runs apt-get clean, which no longer sees these caches.
rm -f "$r"/var/cache/apt/*.bin"#;

/// The two bases: `RUNTIME_BASE` (operator, gateway) and `SESSION_BASE` (session).
pub const BASES: [Base; 2] = [
    Base {
        image: "base-runtime",
        build_arg: "RUNTIME_BASE",
        upstream: "gcr.io/distroless/cc-debian12:nonroot",
        variant: "extract",
        include: &[
            "base-files",
            "netbase",
            "tzdata",
            "libc6",
            "libgcc-s1",
            "libgomp1",
            "libstdc++6",
            "libssl3",
            "ca-certificates",
        ],
        options: &[],
        config: &[
            "--user=65532",
            "--workingdir=/home/nonroot",
            "--env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        ],
    },
    Base {
        image: "base-session",
        build_arg: "SESSION_BASE",
        upstream: "debian:bookworm-slim",
        // debootstrap's minbase: the required packages and apt, as Debian's images.
        variant: "minbase",
        include: &[],
        options: &[
            // merged /usr by directory symlinks as debootstrap does, not the usrmerge package
            // (which pulls in perl).
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            // slim's excludes; they stay in /etc/dpkg/dpkg.cfg.d for later installs.
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/groff/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            "--dpkgopt=path-exclude=/usr/share/lintian/*",
            "--dpkgopt=path-exclude=/usr/share/linda/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            "--dpkgopt=force-unsafe-io",
        ],
        config: &[
            "--env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--cmd=[\"bash\"]",
        ],
    },
];

impl Base {
    fn hook(&self) -> (&'static str, &'static str) {
        if self.variant == "extract" {
            // Customize hooks do not run in extract mode.
            ("--extract-hook", RUNTIME_HOOK)
        } else {
            ("--customize-hook", SESSION_HOOK)
        }
    }

    /// A hash of everything the base is made of.
    fn key(&self) -> String {
        let (hook_kind, hook) = self.hook();
        key(&[
            b"base",
            BASE_RECIPE_VERSION.as_bytes(),
            SUITE.as_bytes(),
            MIRRORS.join("\n").as_bytes(),
            format!("{self:?}").as_bytes(),
            hook_kind.as_bytes(),
            hook.as_bytes(),
        ])
    }

    fn name(&self) -> String {
        format!("{REGISTRY}/{}:{}", self.image, self.key())
    }
}

/// Builds the `operator`, `gateway` and `session` images (in that order) from the Dockerfile
/// with the binaries of `opts.binaries`, and writes each as an `oci-archive` into `opts.out_dir`.
/// Builds and imports the base images first when they are missing. Progress and buildah's own
/// output go to stderr. Concurrent callers wait for each other.
pub fn build(opts: &ImageOptions) -> anyhow::Result<Vec<BuiltImage>> {
    let started = Instant::now();
    let binaries = fs::canonicalize(&opts.binaries)
        .with_context(|| format!("finding the binaries in {}", opts.binaries.display()))?;
    let missing: Vec<&str> = TARGETS
        .iter()
        .map(|t| t.binary)
        .filter(|b| !binaries.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} does not hold {} (build them with cargo build -p tether-operator -p tether-gateway -p tether-session-agent)",
            binaries.display(),
            missing.join(", ")
        );
    }
    let dockerfile_path = repo_root().join("Dockerfile");
    let dockerfile = fs::read(&dockerfile_path)
        .with_context(|| format!("reading {}", dockerfile_path.display()))?;
    fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;

    let buildah = Buildah::open()?;
    let _lock = buildah.lock()?;

    // Bases, then the session's system.
    let mut build_args = vec![("BINARIES".to_string(), "prebuilt".to_string())];
    let mut runtime_id = String::new();
    for base in &BASES {
        let (name, id) = ensure_base(&buildah, base)?;
        build_args.push((base.build_arg.to_string(), name));
        if base.build_arg == "RUNTIME_BASE" {
            runtime_id = id;
        }
    }
    // Debian's mirror here serves frozen snapshots: sid's Release file is past its Valid-Until
    // (this host's own apt configuration turns the check off for the same reason).
    build_args.push(("APT_CHECK_VALID_UNTIL".to_string(), "false".to_string()));
    let (system, system_id) = ensure_session_system(&buildah, &dockerfile, &build_args)?;
    build_args.push(("SESSION_SYSTEM".to_string(), system));

    let mut built = Vec::new();
    for target in &TARGETS {
        let name = format!("{REGISTRY}/{}:{}", target.image, opts.tag);
        let archive = opts.out_dir.join(format!("{}.oci.tar", target.image));
        let stamp = opts.out_dir.join(format!("{}.oci.tar.key", target.image));
        let binary = binaries.join(target.binary);
        let binary_hash = file_hash(&binary)?;
        // What the image starts from: the runtime base, or the session's system.
        let from = if target.stage == "session" {
            &system_id
        } else {
            &runtime_id
        };
        let image_key = key(&[
            b"image",
            name.as_bytes(),
            target.stage.as_bytes(),
            &dockerfile,
            binary_hash.as_bytes(),
            from.as_bytes(),
        ]);
        if archive.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(&image_key) {
            eprintln!(
                "==> image {name} is up to date ({}; binary, Dockerfile and bases unchanged)",
                archive.display()
            );
            built.push(BuiltImage { name, archive });
            continue;
        }
        let image_started = Instant::now();
        eprintln!(
            "==> building image {} (Dockerfile target {}) as {name}",
            target.image, target.stage
        );
        let mut cmd = buildah.build_command(&dockerfile_path, target.stage, &name, &build_args);
        cmd.arg(format!(
            "--build-context=tether-binaries={}",
            binaries.display()
        ))
        .arg(repo_root());
        run_streamed(cmd, &format!("buildah build --target {}", target.stage))?;
        buildah.tidy();
        buildah.push(&name, &archive)?;
        fs::write(&stamp, &image_key).with_context(|| format!("writing {}", stamp.display()))?;
        eprintln!(
            "==> built {name} in {:.0}s: {} ({})",
            image_started.elapsed().as_secs_f64(),
            archive.display(),
            megabytes(&archive)
        );
        built.push(BuiltImage { name, archive });
    }
    eprintln!(
        "==> images ready in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(built)
}

/// The sandbox ("pause") image for containerd, [`crate::realnode::PAUSE_IMAGE`], as upstream
/// builds it (`FROM scratch`, the static binary as `/pause`, user 65535), written as an
/// `oci-archive` into `out_dir`. Not rebuilt while the binary is unchanged.
pub fn pause_image(pause: &Path, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let name = crate::realnode::PAUSE_IMAGE;
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let archive = out_dir.join("pause.oci.tar");
    let stamp = out_dir.join("pause.oci.tar.key");
    let image_key = key(&[b"pause", name.as_bytes(), file_hash(pause)?.as_bytes()]);
    if archive.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(&image_key) {
        return Ok(archive);
    }
    let buildah = Buildah::open()?;
    let _lock = buildah.lock()?;
    eprintln!("==> building image {name} from {}", pause.display());
    let ctr = buildah.output(&["from", &buildah.policy(), "scratch"])?;
    let result = (|| {
        buildah.output(&["copy", &ctr, &path_str(pause)?, "/pause"])?;
        buildah.output(&[
            "config",
            "--entrypoint=[\"/pause\"]",
            "--user=65535:65535",
            &ctr,
        ])?;
        buildah.output(&["commit", &buildah.policy(), "--rm", "--quiet", &ctr, name])
    })();
    if result.is_err() {
        let _ = buildah.output(&["rm", &ctr]);
    }
    result?;
    buildah.tidy();
    buildah.push(name, &archive)?;
    fs::write(&stamp, &image_key).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(archive)
}

/// A `buildah` command on Tether's own storage and configuration (see the module docs), for
/// looking at the images: `buildah images`, `buildah inspect`, `buildah from` + `buildah mount`.
pub fn buildah() -> anyhow::Result<Command> {
    Ok(Buildah::open()?.command())
}

/// The image configuration (the OCI config blob: `config.User`, `config.Entrypoint`, …) of the
/// single image in an `oci-archive`, read with `tar`.
pub fn archive_config(archive: &Path) -> anyhow::Result<serde_json::Value> {
    let read = |member: &str| -> anyhow::Result<serde_json::Value> {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg(member)
            .output()
            .context("running tar")?;
        if !out.status.success() {
            bail!(
                "reading {member} of {}: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing {member} of {}", archive.display()))
    };
    let blob = |descriptor: &serde_json::Value| -> anyhow::Result<String> {
        let digest = descriptor["digest"]
            .as_str()
            .context("a descriptor without a digest")?;
        Ok(format!("blobs/{}", digest.replacen(':', "/", 1)))
    };
    let index = read("index.json")?;
    let manifest = read(&blob(&index["manifests"][0])?)?;
    read(&blob(&manifest["config"])?)
}

/// Builds (once) and imports (when missing from the storage) a base; returns its name and ID.
fn ensure_base(buildah: &Buildah, base: &Base) -> anyhow::Result<(String, String)> {
    let name = base.name();
    if let Some(id) = buildah.image_id(&name)? {
        return Ok((name, id));
    }
    let dir = cache_root().join("images").join("bases");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = base.key();
    let tarball = dir.join(format!("{}-{key}.tar", base.image));
    if !tarball.is_file() {
        let started = Instant::now();
        eprintln!(
            "==> building base image {name} with mmdebstrap --variant={} {SUITE} (stands in for {}; \
             built once, cached in {})",
            base.variant,
            base.upstream,
            tarball.display()
        );
        require_root()?;
        let partial = dir.join(format!("{}-{key}.partial.tar", base.image));
        let (hook_kind, hook) = base.hook();
        let mut cmd = Command::new("mmdebstrap");
        cmd.args(["--mode=root", "--format=tar", "--skip=output/dev"])
            .arg(format!("--variant={}", base.variant));
        if !base.include.is_empty() {
            cmd.arg(format!("--include={}", base.include.join(",")));
        }
        cmd.args(base.options)
            .arg(format!("{hook_kind}={hook}"))
            .arg(SUITE)
            .arg(&partial)
            .args(MIRRORS);
        let result = run_streamed(cmd, &format!("mmdebstrap ({})", base.image));
        if let Err(e) = result {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
        fs::rename(&partial, &tarball)
            .with_context(|| format!("renaming {} to {}", partial.display(), tarball.display()))?;
        // Older recipes of the same base.
        if let Ok(entries) = fs::read_dir(&dir) {
            for path in entries.flatten().map(|e| e.path()) {
                let file = path
                    .file_name()
                    .and_then(|f| f.to_str())
                    .unwrap_or_default();
                if file.starts_with(&format!("{}-", base.image)) && path != tarball {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        eprintln!(
            "==> base rootfs {} ({}) built in {:.0}s",
            tarball.display(),
            megabytes(&tarball),
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "==> importing {} into buildah storage as {name}",
        tarball.display()
    );
    let ctr = buildah.output(&["from", &buildah.policy(), "scratch"])?;
    let result = (|| {
        buildah.output(&["add", "--quiet", &ctr, &path_str(&tarball)?, "/"])?;
        let mut config = vec!["config"];
        config.extend(base.config);
        config.push(&ctr);
        buildah.output(&config)?;
        buildah.output(&["commit", &buildah.policy(), "--rm", "--quiet", &ctr, &name])
    })();
    if result.is_err() {
        let _ = buildah.output(&["rm", &ctr]);
    }
    let id = result?;
    buildah.remove_other_tags(base.image, &name);
    Ok((name, id))
}

/// Builds the `session-system` stage into an image of its own when its text or base changed.
fn ensure_session_system(
    buildah: &Buildah,
    dockerfile: &[u8],
    build_args: &[(String, String)],
) -> anyhow::Result<(String, String)> {
    let text = String::from_utf8_lossy(dockerfile);
    let stage = stage_text(&text, SESSION_SYSTEM_STAGE).with_context(|| {
        format!("the Dockerfile has no stage `{SESSION_SYSTEM_STAGE}` (FROM … AS {SESSION_SYSTEM_STAGE})")
    })?;
    // The build arguments it uses: its base (whose name carries the base's key) and apt's
    // Valid-Until check.
    let arg = |name: &str| {
        build_args
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    let name = format!(
        "{REGISTRY}/{SESSION_SYSTEM_STAGE}:{}",
        key(&[
            b"session-system",
            stage.as_bytes(),
            arg("SESSION_BASE").as_bytes(),
            arg("APT_CHECK_VALID_UNTIL").as_bytes(),
        ])
    );
    if let Some(id) = buildah.image_id(&name)? {
        return Ok((name, id));
    }
    let started = Instant::now();
    eprintln!(
        "==> building {name} (Dockerfile target {SESSION_SYSTEM_STAGE}: apt-get of tmux and the \
         shells; once per base and stage text)"
    );
    let mut cmd = buildah.build_command(
        &repo_root().join("Dockerfile"),
        SESSION_SYSTEM_STAGE,
        &name,
        build_args,
    );
    cmd.arg(repo_root());
    run_streamed(
        cmd,
        &format!("buildah build --target {SESSION_SYSTEM_STAGE}"),
    )?;
    buildah.tidy();
    buildah.remove_other_tags(SESSION_SYSTEM_STAGE, &name);
    eprintln!(
        "==> built {name} in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    let id = buildah
        .image_id(&name)?
        .with_context(|| format!("{name} is missing right after its build"))?;
    Ok((name, id))
}

/// The lines of the stage named `stage`: from its `FROM … AS stage` to the next `FROM`.
fn stage_text(dockerfile: &str, stage: &str) -> Option<String> {
    let mut lines = dockerfile.lines().skip_while(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        !(words.len() >= 4
            && words[0].eq_ignore_ascii_case("FROM")
            && words[2].eq_ignore_ascii_case("AS")
            && words[3] == stage)
    });
    let first = lines.next()?;
    let mut text = vec![first];
    text.extend(lines.take_while(|line| {
        !line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("FROM"))
    }));
    Some(text.join("\n"))
}

/// buildah on Tether's own storage, configuration and temporary directory.
struct Buildah {
    dir: PathBuf,
}

impl Buildah {
    fn open() -> anyhow::Result<Self> {
        let dir = cache_root().join("images").join("buildah");
        for sub in ["storage", "runroot", "tmp"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let toml = |p: &Path| format!("\"{}\"", p.display().to_string().replace(['\\', '"'], ""));
        let files = [
            (
                "storage.conf",
                format!(
                    "# Tether's own image storage (e2e/src/images.rs).\n[storage]\ndriver = \"vfs\"\n\
                     graphroot = {}\nrunroot = {}\n",
                    toml(&dir.join("storage")),
                    toml(&dir.join("runroot"))
                ),
            ),
            (
                "registries.conf",
                "# No registry is searched: every image name here is fully qualified.\n\
                 unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n"
                    .to_string(),
            ),
            (
                "policy.json",
                "{\"default\":[{\"type\":\"insecureAcceptAnything\"}]}\n".to_string(),
            ),
            ("containers.conf", String::new()),
        ];
        for (file, content) in files {
            let path = dir.join(file);
            if fs::read_to_string(&path).ok().as_deref() != Some(content.as_str()) {
                fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Ok(Self { dir })
    }

    /// Serialises builds: one storage, one builder at a time (across processes).
    fn lock(&self) -> anyhow::Result<fs::File> {
        let path = self.dir.join("lock");
        let file =
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        if file.try_lock().is_err() {
            eprintln!(
                "==> waiting for another image build to finish (lock {})",
                path.display()
            );
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Ok(file)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.join("registries.conf"),
            )
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("TMPDIR", self.dir.join("tmp"))
            .env("BUILDAH_ISOLATION", "chroot")
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "vfs"]);
        cmd
    }

    fn policy(&self) -> String {
        format!(
            "--signature-policy={}",
            self.dir.join("policy.json").display()
        )
    }

    /// `buildah build --target stage -t name` of the Dockerfile, without the context argument.
    fn build_command(
        &self,
        dockerfile: &Path,
        stage: &str,
        name: &str,
        build_args: &[(String, String)],
    ) -> Command {
        let mut cmd = self.command();
        cmd.arg("build")
            .arg(self.policy())
            .args([
                "--isolation=chroot",
                "--pull=never",
                "--layers=false",
                "--format=oci",
            ])
            .arg(format!("--target={stage}"))
            .arg("--file")
            .arg(dockerfile)
            .arg(format!("--tag={name}"));
        for (k, v) in build_args {
            cmd.arg(format!("--build-arg={k}={v}"));
        }
        cmd
    }

    /// Runs a short buildah command; returns its trimmed stdout.
    fn output(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.command();
        cmd.args(args).stdin(Stdio::null());
        let out = cmd.output().map_err(|e| spawn_error("buildah", e))?;
        if !out.status.success() {
            bail!(
                "buildah {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn image_id(&self, name: &str) -> anyhow::Result<Option<String>> {
        let mut cmd = self.command();
        let out = cmd
            .args(["inspect", "--type=image", "--format={{.FromImageID}}", name])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| spawn_error("buildah", e))?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((out.status.success() && !id.is_empty()).then_some(id))
    }

    /// Removes the tags of `REGISTRY/image` other than `keep` (older keys), best effort.
    fn remove_other_tags(&self, image: &str, keep: &str) {
        let Ok(json) = self.output(&["images", "--json"]) else {
            return;
        };
        let Ok(images) = serde_json::from_str::<Vec<serde_json::Value>>(&json) else {
            return;
        };
        let prefix = format!("{REGISTRY}/{image}:");
        for name in images
            .iter()
            .filter_map(|i| i["names"].as_array())
            .flatten()
            .filter_map(|n| n.as_str())
            .filter(|n| n.starts_with(&prefix) && *n != keep)
        {
            let _ = self.output(&["rmi", name]);
        }
    }

    /// Removes what builds leave behind (buildah 1.28 keeps the working container of a stage
    /// with only a FROM, the `binaries` stage) and untagged images. Best effort; only this
    /// storage, under [`Buildah::lock`].
    fn tidy(&self) {
        let _ = self.output(&["rm", "--all"]);
        let _ = self.output(&["rmi", "--prune"]);
    }

    /// Writes `name` to `archive` as an `oci-archive` carrying the name.
    fn push(&self, name: &str, archive: &Path) -> anyhow::Result<()> {
        let partial = archive.with_extension("tar.partial");
        let _ = fs::remove_file(&partial);
        let target = format!("oci-archive:{}:{name}", path_str(&partial)?);
        self.output(&["push", &self.policy(), "--quiet", name, &target])?;
        fs::rename(&partial, archive)
            .with_context(|| format!("renaming {} to {}", partial.display(), archive.display()))
    }
}

/// What a streamed command showed last: buildah's current stage and step, the last lines.
#[derive(Default)]
struct Progress {
    stage: Option<String>,
    step: Option<String>,
    tail: VecDeque<String>,
}

impl Progress {
    const TAIL: usize = 20;

    fn observe(&mut self, line: &str) {
        if let Some(instruction) = step_instruction(line) {
            self.step = Some(line.trim().to_string());
            let words: Vec<&str> = instruction.split_whitespace().collect();
            if words
                .first()
                .is_some_and(|w| w.eq_ignore_ascii_case("FROM"))
            {
                self.stage = match words.as_slice() {
                    [_, _, as_, name, ..] if as_.eq_ignore_ascii_case("AS") => {
                        Some((*name).to_string())
                    }
                    _ => None,
                };
            }
        }
        if self.tail.len() == Self::TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
    }
}

/// The instruction of a buildah step line, `[2/5] STEP 3/4: COPY …` or `STEP 3/4: COPY …`.
fn step_instruction(line: &str) -> Option<&str> {
    let line = line.trim();
    let rest = match line.strip_prefix('[') {
        Some(r) => {
            let (counts, rest) = r.split_once("] ")?;
            counts.split_once('/')?;
            rest
        }
        None => line,
    };
    let (counts, instruction) = rest.strip_prefix("STEP ")?.split_once(": ")?;
    let (n, m) = counts.split_once('/')?;
    (n.parse::<u32>().is_ok() && m.parse::<u32>().is_ok()).then_some(instruction)
}

/// Runs `cmd`, printing its stdout and stderr lines to stderr as they come; on failure the
/// error names the last buildah stage and step and shows the last lines.
fn run_streamed(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = cmd.get_program().to_string_lossy().to_string();
    let mut child = cmd.spawn().map_err(|e| spawn_error(&program, e))?;
    let progress = Arc::new(Mutex::new(Progress::default()));
    let follow = |stream: Option<Box<dyn Read + Send>>| {
        let progress = Arc::clone(&progress);
        std::thread::spawn(move || {
            let Some(stream) = stream else { return };
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end();
                eprintln!("    {line}");
                progress.lock().unwrap().observe(line);
            }
        })
    };
    let out = follow(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = follow(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let status = child
        .wait()
        .with_context(|| format!("waiting for {what}"))?;
    let _ = out.join();
    let _ = err.join();
    if status.success() {
        return Ok(());
    }
    let p = progress.lock().unwrap();
    let mut at = String::new();
    if let Some(stage) = &p.stage {
        at.push_str(&format!(" in Dockerfile stage `{stage}`"));
    }
    if let Some(step) = &p.step {
        at.push_str(&format!(" at `{step}`"));
    }
    bail!(
        "{what} failed ({status}){at}; its last lines:\n{}",
        p.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    )
}

fn spawn_error(program: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "`{program}` is not installed; on Debian: apt-get install --no-install-recommends {}",
            DEBIAN_PACKAGES.join(" ")
        )
    } else {
        anyhow::Error::new(e).context(format!("running {program}"))
    }
}

fn require_root() -> anyhow::Result<()> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        bail!(
            "building the base images needs root (mmdebstrap's root mode, buildah's chroot isolation)"
        );
    }
    Ok(())
}

/// A short hex hash of `parts`, each length-prefixed.
fn key(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hex::encode(&hash.finalize()[..8])
}

fn file_hash(path: &Path) -> anyhow::Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hex::encode(hash.finalize()))
}

fn path_str(path: &Path) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_string)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

fn megabytes(path: &Path) -> String {
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    format!("{:.1} MB", len as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lines_name_stage_and_step() {
        let mut p = Progress::default();
        for line in [
            "[3/8] STEP 1/2: FROM scratch AS prebuilt",
            "[8/8] STEP 1/6: FROM localhost/tether/session-system:abc AS session",
            "[8/8] STEP 2/6: COPY --from=binaries /out/tether-session-agent /usr/local/bin/",
            "Get:1 http://deb.debian.org/debian bookworm InRelease [151 kB]",
            "Error: no such file",
        ] {
            p.observe(line);
        }
        assert_eq!(p.stage.as_deref(), Some("session"));
        assert_eq!(
            p.step.as_deref(),
            Some("[8/8] STEP 2/6: COPY --from=binaries /out/tether-session-agent /usr/local/bin/")
        );
        assert_eq!(step_instruction("STEP 2/3: RUN true"), Some("RUN true"));
        assert_eq!(step_instruction("a STEP 2/3: RUN true"), None);
        assert_eq!(
            p.tail.back().map(String::as_str),
            Some("Error: no such file")
        );
    }

    #[test]
    fn a_failed_build_names_its_stage_and_step() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo '[2/3] STEP 1/2: FROM localhost/tether/base AS web'; \
             echo '[2/3] STEP 2/2: RUN false'; \
             echo 'Error: building at STEP \"RUN false\": exit status 1' >&2; exit 1",
        ]);
        let e = run_streamed(cmd, "buildah build --target web")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("buildah build --target web failed"), "{e}");
        assert!(e.contains("in Dockerfile stage `web`"), "{e}");
        assert!(e.contains("at `[2/3] STEP 2/2: RUN false`"), "{e}");
        assert!(e.contains("exit status 1"), "{e}");
    }

    #[test]
    fn the_dockerfile_has_the_stages_built_here() {
        let dockerfile = fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
        let system = stage_text(&dockerfile, SESSION_SYSTEM_STAGE).unwrap();
        assert!(system.contains("apt-get install"), "{system}");
        assert!(!system.contains("tether-session-agent"), "{system}");
        for stage in ["prebuilt", "binaries", "operator", "gateway", "session"] {
            assert!(stage_text(&dockerfile, stage).is_some(), "no stage {stage}");
        }
        for base in &BASES {
            assert!(
                dockerfile.contains(&format!("ARG {}={}", base.build_arg, base.upstream)),
                "the Dockerfile's {} defaults to {}",
                base.build_arg,
                base.upstream
            );
        }
    }
}
