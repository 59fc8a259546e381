//! The images built from the Dockerfile with buildah (`tether_e2e::images`): the three archives
//! carry the chart's names and the Dockerfile's users and entrypoints, the session image holds
//! tmux and the shells, and the binaries run against the images' own libc.
//!
//! Ignored by default: it needs root, the Debian packages buildah and mmdebstrap, Debian's
//! mirror (the first run builds the base images and runs the session stage's apt-get) and the
//! binaries, built first:
//!
//! ```text
//! cargo build -p tether-operator --bin tether-operator -p tether-gateway --bin tether-gateway \
//!   -p tether-session-agent --bin tether-session-agent
//! cargo test -p tether-e2e --test images -- --ignored --nocapture
//! ```
//!
//! `TETHER_IMAGE_BINARIES` names another directory of binaries (default: `target/debug`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use tether_e2e::{
    binaries::repo_root,
    images::{self, ImageOptions},
};

fn binaries_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TETHER_IMAGE_BINARIES") {
        return dir.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("debug")
}

/// Runs a buildah command on Tether's storage; returns its stdout.
fn buildah(args: &[&str]) -> String {
    let out = images::buildah()
        .unwrap()
        .args(args)
        .output()
        .expect("running buildah");
    assert!(
        out.status.success(),
        "buildah {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A working container of an image, mounted; removed on drop.
struct Mounted {
    container: String,
    root: PathBuf,
}

impl Mounted {
    fn new(image: &str) -> Mounted {
        let container = buildah(&["from", "--pull=never", image]);
        let root = PathBuf::from(buildah(&["mount", &container]));
        Mounted { container, root }
    }

    /// Runs `program` inside the image's root with chroot, as root, with the image's libc.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new("/usr/sbin/chroot")
            .arg(&self.root)
            .arg(program)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .output()
            .expect("running chroot");
        assert!(
            out.status.success(),
            "{program} {args:?} in {}: {}{}",
            self.container,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = images::buildah().map(|mut c| c.args(["umount", &self.container]).output());
        let _ = images::buildah().map(|mut c| c.args(["rm", &self.container]).output());
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[test]
#[ignore = "needs root, buildah, mmdebstrap, Debian's mirror and the built binaries (see the file's docs)"]
fn the_dockerfile_builds_the_three_images_with_buildah() {
    let out_dir = repo_root().join("target").join("tether-e2e-images");
    let built = images::build(&ImageOptions {
        binaries: binaries_dir(),
        out_dir: out_dir.clone(),
        tag: "dev".into(),
    })
    .unwrap_or_else(|e| panic!("{e:#}"));

    let names: Vec<&str> = built.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "localhost/tether/tether-operator:dev",
            "localhost/tether/tether-gateway:dev",
            "localhost/tether/tether:dev",
        ]
    );
    let expected = [
        ("65532:65532", "/usr/local/bin/tether-operator", "8080/tcp"),
        ("65532:65532", "/usr/local/bin/tether-gateway", "8443/tcp"),
        (
            "1000:1000",
            "/usr/local/bin/tether-session-agent",
            "7681/tcp",
        ),
    ];
    for (image, (user, entrypoint, port)) in built.iter().zip(expected) {
        assert!(image.archive.is_file(), "{}", image.archive.display());
        let config = images::archive_config(&image.archive).unwrap();
        let c = &config["config"];
        assert_eq!(c["User"], user, "{}: {c}", image.name);
        assert_eq!(
            c["Entrypoint"],
            serde_json::json!([entrypoint]),
            "{}",
            image.name
        );
        assert!(c["ExposedPorts"].get(port).is_some(), "{}: {c}", image.name);
        assert_eq!(config["os"], "linux");
        // The archive carries the name, so `ctr images import` keeps it.
        let index = Command::new("tar")
            .arg("-xOf")
            .arg(&image.archive)
            .arg("index.json")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&index.stdout).contains(&format!("\"{}\"", image.name)),
            "{}",
            image.archive.display()
        );
        eprintln!(
            "{}: {} bytes ({})",
            image.name,
            std::fs::metadata(&image.archive).unwrap().len(),
            image.archive.display()
        );
    }
    let session = &images::archive_config(&built[2].archive).unwrap()["config"];
    assert_eq!(session["WorkingDir"], "/home/tether");
    let env = session["Env"].to_string();
    assert!(env.contains("LANG=en_US.UTF-8"), "{env}");
    assert!(env.contains("TERM=xterm-256color"), "{env}");
    let runtime = &images::archive_config(&built[0].archive).unwrap()["config"];
    assert!(
        runtime["Env"]
            .to_string()
            .contains("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"),
        "{runtime}"
    );

    // The session image: the agent, tmux and the shells, the tether user.
    let s = Mounted::new(&built[2].name);
    for program in [
        "usr/bin/tmux",
        "usr/bin/bash",
        "usr/bin/zsh",
        "usr/bin/fish",
        "usr/bin/sh",
        "usr/local/bin/tether-session-agent",
    ] {
        let path = s.root.join(program);
        // /usr/bin/sh is a symlink to dash; resolve it inside the image.
        let path = match std::fs::read_link(&path) {
            Ok(target) if target.is_relative() => path.parent().unwrap().join(target),
            Ok(target) => s.root.join(target.strip_prefix("/").unwrap()),
            Err(_) => path,
        };
        assert!(is_executable(&path), "{program} in the session image");
    }
    let help = s.run("/usr/local/bin/tether-session-agent", &["--help"]);
    assert!(help.to_lowercase().contains("usage"), "{help}");
    // tmux 3.7 or later (control mode batches output from 3.7 on), from sid's packages with its
    // own glibc under /opt/tmux: it runs in the image.
    let version = s.run("/usr/bin/tmux", &["-V"]);
    let (major, minor) = tether_e2e::tmux_version(&version)
        .unwrap_or_else(|| panic!("no tmux version in {version:?}"));
    assert!((major, minor) >= (3, 7), "the session image's {version}");
    s.run("/usr/bin/fish", &["--version"]);
    s.run("/usr/bin/zsh", &["--version"]);
    let passwd = std::fs::read_to_string(s.root.join("etc/passwd")).unwrap();
    assert!(
        passwd.contains("tether:x:1000:1000::/home/tether:/bin/bash"),
        "{passwd}"
    );
    let locales = s.run("/usr/bin/locale", &["-a"]);
    assert!(locales.contains("en_US.utf8"), "{locales}");
    drop(s);

    // The control-plane images: no shell, the binary runs against the stand-in's glibc.
    for (image, binary) in [
        (&built[0], "/usr/local/bin/tether-operator"),
        (&built[1], "/usr/local/bin/tether-gateway"),
    ] {
        let m = Mounted::new(&image.name);
        for shell in [
            "bin/sh",
            "bin/bash",
            "usr/bin/sh",
            "usr/bin/bash",
            "bin/dash",
        ] {
            assert!(!m.root.join(shell).exists(), "{shell} in {}", image.name);
        }
        assert!(m.root.join("etc/ssl/certs/ca-certificates.crt").is_file());
        let passwd = std::fs::read_to_string(m.root.join("etc/passwd")).unwrap();
        assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
        let help = m.run(binary, &["--help"]);
        assert!(
            help.to_lowercase().contains("usage"),
            "{}: {help}",
            image.name
        );
    }
}

/// `TETHER_PAUSE_BINARY=<static pause binary> cargo test -p tether-e2e --test images -- --ignored
/// the_pause_image`: the binary built by `binaries::ensure_node` (or any static one).
#[test]
#[ignore = "needs root, buildah and a static pause binary in TETHER_PAUSE_BINARY"]
fn the_pause_image_is_built_as_upstream_builds_it() {
    let pause = PathBuf::from(
        std::env::var_os("TETHER_PAUSE_BINARY").expect("TETHER_PAUSE_BINARY names the binary"),
    );
    let out_dir = repo_root().join("target").join("tether-e2e-images");
    let archive = images::pause_image(&pause, &out_dir).unwrap_or_else(|e| panic!("{e:#}"));
    let config = images::archive_config(&archive).unwrap();
    assert_eq!(config["config"]["User"], "65535:65535");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/pause"])
    );
    let index = Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg("index.json")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&index.stdout)
            .contains(&format!("\"{}\"", tether_e2e::realnode::PAUSE_IMAGE)),
        "{}",
        archive.display()
    );
}
