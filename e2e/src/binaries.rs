//! Builds the control-plane binaries (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubectl, and the chart tools helm and kubeconform) from their Go modules, once, into a cache that later runs reuse.
//! [`ensure_node`] does the same for a real node's binaries: kubelet, kube-proxy, containerd
//! (with ctr and its runc shim), kube-router and the pause binary.
//!
//! Prebuilt binaries cannot be downloaded on the machines Tether is developed on, and Debian's
//! etcd is too old for a current kube-apiserver, so the Go modules under `e2e/controlplane/` pin
//! the releases and this module builds them (the node's modules live under `e2e/node/`). The
//! cache key is a hash of those modules' files, so changing a pin rebuilds and nothing else
//! does. A cold build takes several minutes; it prints each package as the Go compiler
//! finishes it, with a count, so the wait is visible.

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

fn node_modules_dir() -> PathBuf {
    repo_root().join("e2e").join("node")
}

/// A hash of every file of the Go modules, so the cache follows the pins.
fn source_key() -> Result<String, BuildError> {
    files_key(&modules_dir(), &[modules_dir()], "")
}

/// A hash of every file under `dirs` (named relative to `base`) and of `recipe`.
fn files_key(base: &Path, dirs: &[PathBuf], recipe: &str) -> Result<String, BuildError> {
    let mut files = Vec::new();
    for dir in dirs {
        collect_files(dir, &mut files)?;
    }
    files.sort();
    let mut hash = Sha256::new();
    for file in files {
        let rel = file.strip_prefix(base).unwrap_or(&file);
        hash.update(rel.to_string_lossy().as_bytes());
        hash.update(fs::read(&file).map_err(io(format!("reading {}", file.display())))?);
    }
    hash.update(recipe.as_bytes());
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
        let modules = modules_dir();
        build_module("etcd", &modules.join("etcd"), &dir, &[], &["./cmd/..."])?;
        // Named one by one: the same module also holds kubelet and kube-proxy, which only the
        // node build ([`ensure_node`]) builds.
        build_module(
            "kube",
            &modules.join("kube"),
            &dir,
            &["-ldflags", &kube_ldflags()],
            &[
                "./cmd/kube-apiserver",
                "./cmd/kube-controller-manager",
                "./cmd/kube-scheduler",
                "./cmd/kubectl",
            ],
        )?;
        // `tool` is every `tool` line of that go.mod: helm and kubeconform.
        build_module(
            "tools",
            &modules.join("tools"),
            &dir,
            &["-ldflags", "-s -w"],
            &["tool"],
        )?;
    }
    drop(lock);
    Ok(bins)
}

/// The binaries of a real Kubernetes node, all in one directory ([`NodeBinaries::dir`]).
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    /// kubelet of the same release as the control plane.
    pub kubelet: PathBuf,
    /// kube-proxy of the same release.
    pub kube_proxy: PathBuf,
    /// containerd 2.
    pub containerd: PathBuf,
    /// containerd's client, `ctr` (image import).
    pub ctr: PathBuf,
    /// The runc shim of the same containerd. containerd starts whichever
    /// `containerd-shim-runc-v2` comes first on its PATH, so put [`NodeBinaries::dir`] first.
    pub containerd_shim_runc_v2: PathBuf,
    /// kube-router, for NetworkPolicy.
    pub kube_router: PathBuf,
    /// The static pause binary of the sandbox image.
    pub pause: PathBuf,
}

impl NodeBinaries {
    fn in_dir(dir: &Path) -> Self {
        Self {
            kubelet: dir.join("kubelet"),
            kube_proxy: dir.join("kube-proxy"),
            containerd: dir.join("containerd"),
            ctr: dir.join("ctr"),
            containerd_shim_runc_v2: dir.join("containerd-shim-runc-v2"),
            kube_router: dir.join("kube-router"),
            pause: dir.join("pause"),
        }
    }

    /// The directory of all seven binaries. The cache's holds nothing else (but a `.lock` and,
    /// while building, `.build/`), so it is safe to put first on containerd's PATH so that
    /// containerd starts this shim.
    pub fn dir(&self) -> &Path {
        self.kubelet.parent().expect("binaries live in a directory")
    }

    fn all(&self) -> [&PathBuf; 7] {
        [
            &self.kubelet,
            &self.kube_proxy,
            &self.containerd,
            &self.ctr,
            &self.containerd_shim_runc_v2,
            &self.kube_router,
            &self.pause,
        ]
    }

    fn all_exist(&self) -> bool {
        self.all().iter().all(|p| p.is_file())
    }
}

/// containerd's build tags without cgo: no btrfs, devmapper or zfs snapshotters (they need C
/// headers), and `urfave_cli_no_docs`, which containerd's Makefile always sets.
const CONTAINERD_TAGS: &str = "no_btrfs no_devmapper no_zfs urfave_cli_no_docs";
/// The shim's: containerd's plus `no_grpc`, as containerd's Makefile builds it.
const SHIM_TAGS: &str = "no_btrfs no_devmapper no_zfs urfave_cli_no_docs no_grpc";
/// The pause release kubernetes v1.34.4's `build/pause/Makefile` tags its image with.
const PAUSE_VERSION: &str = "v3.10.1";
/// `gcc` flags of the pause binary (upstream: `-Os -Wall -Werror -static`).
const PAUSE_CFLAGS: &[&str] = &["-static", "-O2", "-s"];

/// Returns the cached node binaries, building the missing ones first. Like [`ensure`]:
/// `$TETHER_NODE_BIN` names a directory of prebuilt ones instead, and concurrent callers wait
/// on a lock file. The cache is `<cache_root>/node/<release>-<key>/`, the key a hash of
/// `e2e/node/`, `e2e/controlplane/kube/` and the build flags.
pub fn ensure_node() -> Result<NodeBinaries, BuildError> {
    if let Some(dir) = std::env::var_os("TETHER_NODE_BIN") {
        let bins = NodeBinaries::in_dir(Path::new(&dir));
        if bins.all_exist() {
            return Ok(bins);
        }
        return Err(BuildError::Go(format!(
            "TETHER_NODE_BIN={} does not hold kubelet, kube-proxy, containerd, ctr, containerd-shim-runc-v2, kube-router and pause",
            Path::new(&dir).display()
        )));
    }
    let e2e = repo_root().join("e2e");
    let kube = modules_dir().join("kube");
    let recipe = format!(
        "{}\n{CONTAINERD_TAGS}\n{SHIM_TAGS}\n{PAUSE_VERSION}\n{}",
        kube_ldflags(),
        PAUSE_CFLAGS.join(" ")
    );
    let key = files_key(&e2e, &[node_modules_dir(), kube.clone()], &recipe)?;
    let dir = cache_root()
        .join("node")
        .join(format!("{KUBERNETES_VERSION}-{key}"));
    let bins = NodeBinaries::in_dir(&dir);
    if bins.all_exist() {
        return Ok(bins);
    }
    fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let lock_path = dir.join(".lock");
    let lock =
        fs::File::create(&lock_path).map_err(io(format!("creating {}", lock_path.display())))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!(
                "tether: another process is building the node into {}; waiting for it",
                dir.display()
            );
            lock.lock().map_err(io("locking the node build"))?;
        }
        Err(fs::TryLockError::Error(e)) => return Err(io("locking the node build")(e)),
    }
    if !bins.all_exist() {
        let missing: Vec<String> = bins
            .all()
            .iter()
            .filter(|p| !p.is_file())
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        eprintln!(
            "tether: building the node ({}) from their Go modules into {}",
            missing.join(", "),
            dir.display()
        );
        if missing
            .iter()
            .any(|m| m != "pause" && m != "containerd-shim-runc-v2")
        {
            eprintln!(
                "tether: a cold build takes several minutes on two cores; later runs reuse it"
            );
        }
        let started = std::time::Instant::now();
        build_node(&bins, &dir, &kube)?;
        eprintln!(
            "tether: the node is built in {}s: {}",
            started.elapsed().as_secs(),
            dir.display()
        );
    }
    drop(lock);
    Ok(bins)
}

/// Builds each missing part into `dir/.build/`, then moves it into `dir`, so a binary in `dir`
/// is always a whole one even when a build is interrupted.
fn build_node(bins: &NodeBinaries, dir: &Path, kube: &Path) -> Result<(), BuildError> {
    let staging = dir.join(".build");
    fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
    let missing = |paths: &[&PathBuf]| paths.iter().any(|p| !p.is_file());
    let install = |paths: &[&PathBuf]| -> Result<(), BuildError> {
        for path in paths {
            let name = path.file_name().expect("a binary has a name");
            let built = staging.join(name);
            fs::rename(&built, path).map_err(io(format!(
                "moving {} to {}",
                built.display(),
                path.display()
            )))?;
        }
        Ok(())
    };

    if missing(&[&bins.kubelet, &bins.kube_proxy]) {
        build_module(
            "kubelet, kube-proxy",
            kube,
            &staging,
            &["-ldflags", &kube_ldflags()],
            &["./cmd/kubelet", "./cmd/kube-proxy"],
        )?;
        install(&[&bins.kubelet, &bins.kube_proxy])?;
    }

    let containerd = node_modules_dir().join("containerd");
    let containerd_pkg = "github.com/containerd/containerd/v2";
    let containerd_ldflags = format!(
        "-s -w -X {containerd_pkg}/version.Version={}",
        module_version(&containerd, containerd_pkg)?.0
    );
    if missing(&[&bins.containerd, &bins.ctr]) {
        build_module(
            "containerd, ctr",
            &containerd,
            &staging,
            &["-tags", CONTAINERD_TAGS, "-ldflags", &containerd_ldflags],
            &[
                &format!("{containerd_pkg}/cmd/containerd"),
                &format!("{containerd_pkg}/cmd/ctr"),
            ],
        )?;
        install(&[&bins.containerd, &bins.ctr])?;
    }
    if missing(&[&bins.containerd_shim_runc_v2]) {
        build_module(
            "containerd-shim-runc-v2",
            &containerd,
            &staging,
            &["-tags", SHIM_TAGS, "-ldflags", &containerd_ldflags],
            &[&format!("{containerd_pkg}/cmd/containerd-shim-runc-v2")],
        )?;
        install(&[&bins.containerd_shim_runc_v2])?;
    }

    if missing(&[&bins.kube_router]) {
        let kube_router = node_modules_dir().join("kube-router");
        let pkg = "github.com/cloudnativelabs/kube-router/v2";
        let (version, time) = module_version(&kube_router, pkg)?;
        let ldflags = format!(
            "-s -w -X {pkg}/pkg/version.Version={version} -X {pkg}/pkg/version.BuildDate={time}"
        );
        build_module(
            "kube-router",
            &kube_router,
            &staging,
            &["-ldflags", &ldflags],
            &["tool"],
        )?;
        install(&[&bins.kube_router])?;
    }

    if missing(&[&bins.pause]) {
        build_pause(kube, &staging.join("pause"))?;
        install(&[&bins.pause])?;
    }
    // Best effort: an empty staging directory left behind is harmless.
    let _ = fs::remove_dir(&staging);
    Ok(())
}

/// The version and release time of `path` as the Go module in `module` requires it, so the
/// version a binary reports follows the pin in that `go.mod`.
fn module_version(module: &Path, path: &str) -> Result<(String, String), BuildError> {
    let out = go()
        .args([
            "list",
            "-m",
            "-f",
            "{{.Version}} {{if .Time}}{{.Time.UTC.Format \"2006-01-02T15:04:05Z\"}}{{end}}",
            path,
        ])
        .current_dir(module)
        .output()
        .map_err(|e| BuildError::Go(format!("cannot run `go` ({e}); install Go 1.26 or newer")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    match (out.status.success(), words.next()) {
        (true, Some(version)) => Ok((
            version.to_owned(),
            words.next().unwrap_or_default().to_owned(),
        )),
        _ => Err(BuildError::Go(format!(
            "`go list -m {path}` failed in {}:\n{}",
            module.display(),
            String::from_utf8_lossy(&out.stderr)
        ))),
    }
}

/// Compiles kubernetes' own `build/pause/linux/pause.c`, from the module cache, into a static
/// `out`: no registry is reachable for `registry.k8s.io/pause`.
fn build_pause(kube: &Path, out: &Path) -> Result<(), BuildError> {
    let started = std::time::Instant::now();
    eprintln!("tether: [pause] compiling build/pause/linux/pause.c of k8s.io/kubernetes with gcc");
    let download = go()
        .args(["mod", "download", "-json", "k8s.io/kubernetes"])
        .current_dir(kube)
        .output()
        .map_err(|e| BuildError::Go(format!("cannot run `go` ({e}); install Go 1.26 or newer")))?;
    let info: serde_json::Value = serde_json::from_slice(&download.stdout).unwrap_or_default();
    let Some(source) = info["Dir"].as_str().map(|d| {
        Path::new(d)
            .join("build")
            .join("pause")
            .join("linux")
            .join("pause.c")
    }) else {
        return Err(BuildError::Go(format!(
            "`go mod download k8s.io/kubernetes` failed in {}:\n{}{}",
            kube.display(),
            String::from_utf8_lossy(&download.stdout),
            String::from_utf8_lossy(&download.stderr)
        )));
    };
    let gcc = Command::new("gcc")
        .args(PAUSE_CFLAGS)
        .arg(format!("-DVERSION={PAUSE_VERSION}"))
        .arg("-o")
        .arg(out)
        .arg(&source)
        .output()
        .map_err(|e| {
            BuildError::Go(format!(
                "cannot run `gcc` ({e}); install gcc and libc6-dev to build the pause binary"
            ))
        })?;
    if !gcc.status.success() {
        return Err(BuildError::Go(format!(
            "compiling {} failed ({}); a static build needs libc6-dev:\n{}",
            source.display(),
            gcc.status,
            String::from_utf8_lossy(&gcc.stderr)
        )));
    }
    eprintln!("tether: [pause] built in {}s", started.elapsed().as_secs());
    Ok(())
}

fn go() -> Command {
    let mut cmd = Command::new("go");
    cmd.env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=readonly");
    cmd
}

/// The linker flags of every Kubernetes binary, so `--version`, `/version` and the Node's
/// `kubeletVersion` report the release instead of `v0.0.0-master`.
fn kube_ldflags() -> String {
    format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION} \
         -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34 \
         -X k8s.io/component-base/version.gitTreeState=clean"
    )
}

/// `path` relative to the repository, for messages.
fn shown(path: &Path) -> String {
    let root = repo_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Builds the `packages` of the Go module in `module` into `out`, printing progress under
/// `label`. `flags` go to both `go list` and `go build` (tags change the package count).
fn build_module(
    label: &str,
    module: &Path,
    out: &Path,
    flags: &[&str],
    packages: &[&str],
) -> Result<(), BuildError> {
    let total = go()
        .args(["list", "-deps"])
        .args(flags)
        .args(packages)
        .current_dir(module)
        .output()
        .map_err(|e| BuildError::Go(format!("cannot run `go` ({e}); install Go 1.26 or newer")))?;
    if !total.status.success() {
        return Err(BuildError::Go(format!(
            "`go list` failed in {}:\n{}",
            module.display(),
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
        .args(flags)
        .args(packages)
        .current_dir(module)
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
                "tether: [{label}] compiled {done} of at most {total} packages ({}s): {line}",
                started.elapsed().as_secs()
            );
        }
    }
    let status = child.wait().map_err(io("waiting for go build"))?;
    if !status.success() {
        return Err(BuildError::Go(format!(
            "building {label} from {} failed ({status}):\n{}",
            shown(module),
            errors.join("\n")
        )));
    }
    eprintln!(
        "tether: [{label}] built in {}s",
        started.elapsed().as_secs()
    );
    Ok(())
}
