//! A real OpenID provider for tests and `cargo dev up`: Keycloak, the Quarkus distribution
//! from Maven Central, run as a child process with a `tether` realm of fixed test users.
//!
//! [`ensure`] installs it once into `<cache_root>/keycloak/<version>/` (or
//! `$TETHER_KEYCLOAK_HOME`): a 176 MB download checked against Maven's `.sha1`, `kc.sh build`
//! (about 40 s), and one start without a realm to make a template database holding the schema
//! and the `master` realm (about 30 s), which every later start copies instead of spending
//! half its time creating them. It runs on a JDK 21+ found as `/usr/lib/jvm/temurin-*` (or
//! `$TETHER_KEYCLOAK_JAVA_HOME`). [`Keycloak::start`] then takes about 20 s on two busy cores
//! and 400 MB of memory.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use tether_e2e::idp::{self, IdpOptions, Keycloak};
//! let mut opts = IdpOptions::new(idp::test_dir());
//! opts.redirect_uris = vec!["http://127.0.0.1:8080/oauth/callback".into()];
//! let kc = tokio::task::spawn_blocking(move || Keycloak::start(&opts)).await??;
//! let alice = &kc.users()[0];
//! let tokens = kc.password_grant(alice).await?;
//! # let _ = tokens;
//! # Ok(())
//! # }
//! ```
//!
//! Everything here is a development and test setup: fixed passwords and client secret, plain
//! HTTP, the password grant. Never point a real deployment at it.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use sha1::{Digest as _, Sha1};

use crate::binaries;

/// The Keycloak release.
pub const KEYCLOAK_VERSION: &str = "26.7.3";

/// Options of `kc.sh build`: H2 in a file (each instance copies the template database
/// [`ensure`] makes, see [`make_template`]) and the health endpoints.
const BUILD_OPTIONS: &[&str] = &["--db=dev-file", "--health-enabled=true"];

/// The heap cap of every Keycloak (kc.sh's default outside containers, set explicitly).
const JAVA_HEAP: &str = "-Xms64m -Xmx512m";
/// Added to kc.sh's JVM options: the C1 compiler only, which takes a third off a start on two
/// busy cores (measured: 38 s against 64 s) and is plenty for tests; and no
/// `/tmp/hsperfdata_<user>` file, which a killed JVM leaves behind.
const JAVA_OPTS_APPEND: &str = "-XX:TieredStopAtLevel=1 -XX:-UsePerfData";

/// The template database, relative to the Keycloak home.
const TEMPLATE_DB: &str = "template/keycloakdb.mv.db";

/// A built Keycloak distribution and the Java that runs it.
#[derive(Debug, Clone)]
pub struct Install {
    /// The Keycloak home: `bin/kc.sh`, `lib/`, `conf/`, `themes/`, `providers/`.
    pub home: PathBuf,
    /// A JDK of release 21 or newer.
    pub java_home: PathBuf,
    /// The Keycloak release.
    pub version: &'static str,
}

/// Runs `fut` to completion on a runtime of its own, on a thread of its own, so that blocking
/// callers work inside and outside a tokio runtime alike.
fn block_on<T: Send + 'static>(
    fut: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime")?
            .block_on(fut)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a helper thread of the Keycloak harness panicked"))?
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_000_000.0)
}

/// The major release of the JDK in `home`, from its `release` file.
fn java_major(home: &Path) -> Option<u32> {
    let release = fs::read_to_string(home.join("release")).ok()?;
    let line = release
        .lines()
        .find_map(|l| l.strip_prefix("JAVA_VERSION="))?;
    let version = line.trim().trim_matches('"');
    let major = version.split(['.', '+', '-']).next()?;
    major.parse().ok()
}

/// A JDK of release 21 or newer: `$TETHER_KEYCLOAK_JAVA_HOME`, else the newest
/// `/usr/lib/jvm/temurin-*`.
pub fn find_java() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TETHER_KEYCLOAK_JAVA_HOME") {
        let dir = PathBuf::from(dir);
        if !dir.join("bin/java").is_file() {
            bail!(
                "TETHER_KEYCLOAK_JAVA_HOME={} has no bin/java",
                dir.display()
            );
        }
        if java_major(&dir).is_some_and(|v| v < 21) {
            bail!(
                "TETHER_KEYCLOAK_JAVA_HOME={} is older than Java 21, which Keycloak {KEYCLOAK_VERSION} needs",
                dir.display()
            );
        }
        return Ok(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/jvm")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("temurin-"))
                && p.join("bin/java").is_file()
        })
        .filter_map(|p| java_major(&p).map(|v| (v, p)))
        .filter(|(v, _)| *v >= 21)
        .collect();
    found.sort();
    match found.pop() {
        Some((_, p)) => Ok(p),
        None => bail!(
            "Keycloak {KEYCLOAK_VERSION} needs Java 21 or newer: looked for /usr/lib/jvm/temurin-*/bin/java \
             with JAVA_VERSION >= 21 in its `release` file and found none; install Temurin 21 or 25 \
             (apt-get install temurin-25-jdk) or set TETHER_KEYCLOAK_JAVA_HOME to a JDK 21+"
        ),
    }
}

/// Where the distribution lives: `$TETHER_KEYCLOAK_HOME`, else
/// `<cache_root>/keycloak/<version>/`.
fn install_dir() -> PathBuf {
    match std::env::var_os("TETHER_KEYCLOAK_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => binaries::cache_root()
            .join("keycloak")
            .join(KEYCLOAK_VERSION),
    }
}

const MARKER: &str = ".tether-built";

fn marker_text() -> String {
    format!(
        "{KEYCLOAK_VERSION} {} {TEMPLATE_DB}\n",
        BUILD_OPTIONS.join(" ")
    )
}

/// Returns the built Keycloak distribution, downloading it from Maven Central, checking its
/// SHA-1, extracting it, running `kc.sh build` and making the template database
/// (see the module documentation) first when the cache does not hold it.
/// Everything happens in a temporary directory renamed into place at the end, so an
/// interrupted install is redone; concurrent callers wait on a lock file.
pub fn ensure() -> anyhow::Result<Install> {
    let java_home = find_java()?;
    let home = install_dir();
    let install = Install {
        home: home.clone(),
        java_home: java_home.clone(),
        version: KEYCLOAK_VERSION,
    };
    let built = || fs::read_to_string(home.join(MARKER)).is_ok_and(|m| m == marker_text());
    if built() {
        return Ok(install);
    }
    let parent = home
        .parent()
        .context("the Keycloak directory has a parent")?
        .to_path_buf();
    let name = home
        .file_name()
        .context("the Keycloak directory has a name")?
        .to_string_lossy()
        .into_owned();
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let lock_path = parent.join(format!(".{name}.lock"));
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!(
                "tether: another process is installing Keycloak into {}; waiting for it",
                home.display()
            );
            lock.lock().context("locking the Keycloak install")?;
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).context("locking the Keycloak install");
        }
    }
    if built() {
        return Ok(install);
    }
    if home.exists() {
        // A half-made or outdated install of ours (the marker says which), or an empty
        // directory; anything else is not ours to delete.
        let ours = home.join(MARKER).exists()
            || fs::read_dir(&home).is_ok_and(|mut d| d.next().is_none())
            || std::env::var_os("TETHER_KEYCLOAK_HOME").is_none();
        if !ours {
            bail!(
                "TETHER_KEYCLOAK_HOME={} is a directory Tether did not install Keycloak into; \
                 empty it or point TETHER_KEYCLOAK_HOME elsewhere",
                home.display()
            );
        }
    }
    let started = Instant::now();
    eprintln!(
        "tether: installing Keycloak {KEYCLOAK_VERSION} into {} (Java: {})",
        home.display(),
        java_home.display()
    );
    let tarball = parent.join(format!(".keycloak-{KEYCLOAK_VERSION}.tar.gz"));
    if !tarball.is_file() {
        download(&tarball)?;
    }
    let staging = parent.join(format!(".{name}.tmp"));
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let extract_started = Instant::now();
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&staging)
        .arg("--strip-components=1")
        .output()
        .context("running tar")?;
    if !out.status.success() {
        // A corrupt download: fetch it again next time.
        let _ = fs::remove_file(&tarball);
        bail!(
            "extracting {} failed ({}): {}",
            tarball.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "tether: [keycloak] extracted in {:.1}s",
        extract_started.elapsed().as_secs_f64()
    );
    build(&staging, &java_home)?;
    make_template(&staging, &java_home)?;
    fs::write(staging.join(MARKER), marker_text()).context("writing the install marker")?;
    if home.exists() {
        fs::remove_dir_all(&home).with_context(|| format!("removing {}", home.display()))?;
    }
    fs::rename(&staging, &home)
        .with_context(|| format!("moving {} to {}", staging.display(), home.display()))?;
    let _ = fs::remove_file(&tarball);
    eprintln!(
        "tether: Keycloak {KEYCLOAK_VERSION} installed in {:.0}s: {}",
        started.elapsed().as_secs_f64(),
        home.display()
    );
    drop(lock);
    Ok(install)
}

fn maven_url() -> String {
    format!(
        "https://repo1.maven.org/maven2/org/keycloak/keycloak-quarkus-dist/{KEYCLOAK_VERSION}/keycloak-quarkus-dist-{KEYCLOAK_VERSION}.tar.gz"
    )
}

/// Downloads the distribution into `dest`, printing progress every five seconds, and checks
/// it against Maven Central's `.sha1`.
fn download(dest: &Path) -> anyhow::Result<()> {
    let url = maven_url();
    let part = dest.with_extension("part");
    let part2 = part.clone();
    let started = Instant::now();
    let (size, digest, expected) = block_on(async move {
        let mut client = reqwest::Client::builder();
        // The system's roots too: machines behind a TLS-inspecting proxy trust its CA there.
        for cert in rustls_native_certs::load_native_certs().certs {
            if let Ok(cert) = reqwest::Certificate::from_der(&cert) {
                client = client.add_root_certificate(cert);
            }
        }
        let client = client
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .build()?;
        let expected = client
            .get(format!("{url}.sha1"))
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("fetching {url}.sha1"))?
            .text()
            .await?;
        let expected = expected
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_lowercase();
        let mut response = client
            .get(&url)
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("fetching {url}"))?;
        let total = response.content_length();
        eprintln!(
            "tether: [keycloak] downloading {url} ({})",
            total.map(mb).unwrap_or_else(|| "size unknown".into())
        );
        let mut file =
            fs::File::create(&part2).with_context(|| format!("creating {}", part2.display()))?;
        let mut hash = Sha1::new();
        let mut got = 0u64;
        let mut last = Instant::now();
        while let Some(chunk) = response
            .chunk()
            .await
            .with_context(|| format!("downloading {url}"))?
        {
            file.write_all(&chunk)?;
            hash.update(&chunk);
            got += chunk.len() as u64;
            if last.elapsed() >= Duration::from_secs(5) {
                last = Instant::now();
                eprintln!(
                    "tether: [keycloak] downloaded {} of {} ({}s)",
                    mb(got),
                    total.map(mb).unwrap_or_else(|| "?".into()),
                    started.elapsed().as_secs()
                );
            }
        }
        file.sync_all()?;
        Ok((got, hex::encode(hash.finalize()), expected))
    })?;
    if digest != expected {
        let _ = fs::remove_file(&part);
        bail!(
            "{} has SHA-1 {digest}, Maven Central says {expected}",
            maven_url()
        );
    }
    fs::rename(&part, dest).with_context(|| format!("moving {}", part.display()))?;
    eprintln!(
        "tether: [keycloak] downloaded {} in {:.0}s, SHA-1 {digest} checked",
        mb(size),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Environment of every `kc.sh` run: the JDK, and no `KC_*` or `JAVA_OPTS*` of the caller's.
fn kc_command(home: &Path, java_home: &Path) -> Command {
    let mut cmd = Command::new(home.join("bin").join("kc.sh"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        // kc.sh reads these too (`DEBUG=true` would open a debugger port).
        let read_by_kc_sh = [
            "JAVA",
            "JAVA_ADD_OPENS",
            "JAVA_LOCALE",
            "DEBUG",
            "DEBUG_PORT",
            "DEBUG_SUSPEND",
            "PRINT_ENV",
        ];
        if key.starts_with("KC_")
            || key.starts_with("KEYCLOAK_")
            || key.starts_with("JAVA_OPTS")
            || read_by_kc_sh.contains(&&*key)
        {
            cmd.env_remove(&*key);
        }
    }
    cmd.env("JAVA_HOME", java_home)
        .env("JAVA", java_home.join("bin").join("java"))
        .current_dir(home);
    cmd
}

/// Runs `kc.sh build` in `home`, printing a line every five seconds while it works.
fn build(home: &Path, java_home: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!(
        "tether: [keycloak] kc.sh build {} (about a minute)",
        BUILD_OPTIONS.join(" ")
    );
    let log_path = home.join("build.log");
    let log = fs::File::create(&log_path)?;
    let mut child = kc_command(home, java_home)
        .arg("build")
        .args(BUILD_OPTIONS)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("running kc.sh build")?;
    let mut last = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            eprintln!(
                "tether: [keycloak] building ({}s)",
                started.elapsed().as_secs()
            );
        }
    };
    if !status.success() {
        bail!(
            "kc.sh build failed ({status}):\n{}",
            log_tail(&log_path, 40)
        );
    }
    eprintln!(
        "tether: [keycloak] built in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes `path`, the `JAVA` of kc.sh: kc.sh runs java as its child (not with exec), so this
/// makes java die with kc.sh (`setpriv --pdeathsig KILL`) as kc.sh dies with this process.
fn write_java_wrapper(path: &Path, java_home: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(
        path,
        format!(
            "#!/bin/sh\nexec '{}' --pdeathsig KILL -- '{}' \"$@\"\n",
            setpriv()?.display(),
            java_home.join("bin/java").display()
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

/// `kc.sh start --optimized` of `home`, HTTP on `bind:port` with that as its hostname, the
/// management interface on `bind:management_port`, a local cache, its console into `log`, and
/// the parent-death signal set. `java` is the wrapper of [`write_java_wrapper`].
fn server_command(
    home: &Path,
    java_home: &Path,
    java: &Path,
    bind: std::net::Ipv4Addr,
    port: u16,
    management_port: u16,
    log: &Path,
) -> anyhow::Result<Command> {
    let log = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    // Temporary files (Vert.x's cache among them) in the instance's data, not in /tmp, where a
    // killed Keycloak would leave them.
    let tmp = home.join("data").join("tmp").join("java");
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut cmd = kc_command(home, java_home);
    cmd.arg(format!("-Djava.io.tmpdir={}", tmp.display()))
        .arg(format!(
            "-Dvertx.cacheDirBase={}",
            tmp.join("vertx-cache").display()
        ))
        .env("JAVA", java)
        .env("JAVA_OPTS_KC_HEAP", JAVA_HEAP)
        .env("JAVA_OPTS_APPEND", JAVA_OPTS_APPEND)
        .env("KC_BOOTSTRAP_ADMIN_USERNAME", ADMIN_USERNAME)
        .env("KC_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .arg("start")
        .arg("--optimized")
        .arg("--http-enabled=true")
        .arg(format!("--http-host={bind}"))
        .arg(format!("--http-port={port}"))
        .arg(format!("--hostname=http://{bind}:{port}"))
        .arg("--hostname-strict=true")
        .arg(format!("--http-management-host={bind}"))
        .arg(format!("--http-management-port={management_port}"))
        .arg("--cache=local")
        .arg("--log=console")
        .arg("--log-console-color=false")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    crate::process::die_with_parent(&mut cmd);
    Ok(cmd)
}

/// Polls `url` until it answers 200 with JSON, and returns that JSON; fails with the end of
/// `log` when `pid` exits or `timeout` (counted from `started`) passes. Prints a line every
/// five seconds.
fn wait_json(
    pid: u32,
    url: String,
    log: PathBuf,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    block_on(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let mut last = Instant::now();
        loop {
            if !alive(pid) {
                bail!(
                    "Keycloak exited while starting; the end of {}:\n{}",
                    log.display(),
                    log_tail(&log, 40)
                );
            }
            if let Ok(resp) = client.get(&url).send().await
                && resp.status().is_success()
            {
                return Ok(resp.json().await?);
            }
            if started.elapsed() > timeout {
                bail!(
                    "Keycloak did not answer {url} within {}s; the end of {}:\n{}",
                    timeout.as_secs(),
                    log.display(),
                    log_tail(&log, 40)
                );
            }
            if last.elapsed() >= Duration::from_secs(5) {
                last = Instant::now();
                eprintln!(
                    "tether: [keycloak] starting ({}s): {}",
                    started.elapsed().as_secs(),
                    last_line(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// Starts the freshly built distribution in `home` once, with no realm to import, so that
/// Keycloak creates its database schema and the `master` realm (with the bootstrap admin):
/// half of a first start. Stops it cleanly and keeps the H2 file as [`TEMPLATE_DB`], which
/// every [`Keycloak::start`] copies.
fn make_template(home: &Path, java_home: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("tether: [keycloak] starting it once to create its database schema and master realm");
    let java = home.join(".java");
    write_java_wrapper(&java, java_home)?;
    let bind = std::net::Ipv4Addr::LOCALHOST;
    let port = crate::free_port()?;
    let log = home.join("template.log");
    let cmd = server_command(
        home,
        java_home,
        &java,
        bind,
        port,
        crate::free_port()?,
        &log,
    )?;
    let mut child = crate::process::spawn_kept(cmd).context("starting kc.sh")?;
    let ready = wait_json(
        child.id(),
        format!("http://{bind}:{port}/realms/master/.well-known/openid-configuration"),
        log.clone(),
        started,
        Duration::from_secs(300),
    );
    // A clean shutdown leaves a consistent H2 file; kc.sh passes SIGTERM on to java.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let exited = loop {
        if child.try_wait()?.is_some() {
            break true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ready?;
    if !exited {
        bail!(
            "Keycloak did not stop within 60s of SIGTERM; the end of {}:\n{}",
            log.display(),
            log_tail(&log, 40)
        );
    }
    let db = home.join("data").join("h2").join("keycloakdb.mv.db");
    let template = home.join(TEMPLATE_DB);
    fs::create_dir_all(template.parent().expect("the template is in a directory"))?;
    fs::rename(&db, &template).with_context(|| {
        format!(
            "moving {} to {} (the end of {}:\n{})",
            db.display(),
            template.display(),
            log.display(),
            log_tail(&log, 20)
        )
    })?;
    fs::remove_dir_all(home.join("data")).context("removing the template's data")?;
    fs::remove_file(&java)?;
    eprintln!(
        "tether: [keycloak] template database made in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The realm every client and user lives in.
pub const REALM: &str = "tether";
/// The gateway's client: confidential, authorization code flow with PKCE (S256) only.
pub const GATEWAY_CLIENT_ID: &str = "tether-gateway";
/// The gateway client's secret: a fixed development value of this test realm, never a real one.
pub const GATEWAY_CLIENT_SECRET: &str = "tether-gateway-dev-secret";
/// The command line's client: public, authorization code flow with PKCE (S256) on any loopback
/// port, the device authorization grant (with PKCE too: Keycloak enforces it there), and (dev
/// and test realm only) the password grant.
pub const CLI_CLIENT_ID: &str = "kubectl-tether";
/// The bootstrap administrator of the `master` realm (development value).
pub const ADMIN_USERNAME: &str = "admin";
/// Its password (development value).
pub const ADMIN_PASSWORD: &str = "tether-admin-password";

/// A user of the test realm. Every one has a verified email, a first and a last name, a
/// password that is not temporary and no required action, so a login goes straight back to
/// the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestUser {
    /// The login name (also the `preferred_username` claim).
    pub username: &'static str,
    /// The password (a fixed development value).
    pub password: &'static str,
    /// `<username>@tether.test`.
    pub email: &'static str,
    /// The names of the groups the user is in (the `groups` claim).
    pub groups: &'static [&'static str],
}

/// alice and carol (`tether-developers`), bob (`tether-observers`).
static USERS: [TestUser; 3] = [
    TestUser {
        username: "alice",
        password: "alice-password",
        email: "alice@tether.test",
        groups: &["tether-developers"],
    },
    TestUser {
        username: "bob",
        password: "bob-password",
        email: "bob@tether.test",
        groups: &["tether-observers"],
    },
    TestUser {
        username: "carol",
        password: "carol-password",
        email: "carol@tether.test",
        groups: &["tether-developers"],
    },
];

/// Users whose claims try to pass for someone else, for the security tests: see
/// [`attack_attributes`].
static ATTACK_USERS: [TestUser; 5] = [
    TestUser {
        username: "mallory",
        password: "mallory-password",
        email: "mallory@tether.test",
        groups: &["system:masters"],
    },
    TestUser {
        username: "impostor-admin",
        password: "impostor-admin-password",
        email: "impostor-admin@tether.test",
        groups: &[],
    },
    TestUser {
        username: "impostor-sa",
        password: "impostor-sa-password",
        email: "impostor-sa@tether.test",
        groups: &[],
    },
    TestUser {
        username: "impostor-alice",
        password: "impostor-alice-password",
        email: "impostor-alice@tether.test",
        groups: &[],
    },
    TestUser {
        username: "stringy",
        password: "stringy-password",
        email: "stringy@tether.test",
        groups: &[],
    },
];

/// The user attributes of the attack users: `kube_name` of `impostor-admin`
/// (`system:admin`), `impostor-sa` (`system:serviceaccount:default:default`) and
/// `impostor-alice` (`alice`), and `kube_groups` of `stringy`, the single string
/// `system:masters`. They reach the tokens as the claims of the same names.
pub fn attack_attributes(username: &str) -> &'static [(&'static str, &'static str)] {
    match username {
        "impostor-admin" => &[("kube_name", "system:admin")],
        "impostor-sa" => &[("kube_name", "system:serviceaccount:default:default")],
        "impostor-alice" => &[("kube_name", "alice")],
        "stringy" => &[("kube_groups", "system:masters")],
        _ => &[],
    }
}

/// Any user of the realm by name.
pub fn user(username: &str) -> Option<&'static TestUser> {
    USERS
        .iter()
        .chain(ATTACK_USERS.iter())
        .find(|u| u.username == username)
}

fn names(username: &str) -> (String, String) {
    let (first, last) = username.split_once('-').unwrap_or((username, "Test"));
    let cap = |s: &str| {
        let mut c = s.chars();
        c.next()
            .map(|f| f.to_uppercase().chain(c).collect())
            .unwrap_or_default()
    };
    let last = match username {
        "alice" | "carol" => "Developer".to_string(),
        "bob" => "Observer".to_string(),
        _ => cap(last),
    };
    (cap(first), last)
}

/// Options of [`Keycloak::start`].
#[derive(Debug, Clone)]
pub struct IdpOptions {
    /// Its files: the data directory, the realm to import, the log. Emptied at start.
    pub dir: PathBuf,
    /// The address it listens on (HTTP and the management interface).
    pub bind: std::net::Ipv4Addr,
    /// The HTTP port; 0 picks a free one.
    pub port: u16,
    /// The redirect URIs of the gateway client.
    pub redirect_uris: Vec<String>,
    /// The lifespan of access and ID tokens (whole seconds, at least one).
    pub token_lifetime: Duration,
    /// Whether the gateway client gets refresh tokens.
    pub refresh_tokens: bool,
}

impl IdpOptions {
    /// Loopback, a free port, no gateway redirect URI, five-minute tokens, refresh tokens on.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            bind: std::net::Ipv4Addr::LOCALHOST,
            port: 0,
            redirect_uris: Vec::new(),
            token_lifetime: Duration::from_secs(300),
            refresh_tokens: true,
        }
    }
}

/// `target/tether-e2e/idp-<pid>`, after removing the directories of processes that have
/// exited: the directory of a test binary's Keycloak.
pub fn test_dir() -> PathBuf {
    let root = binaries::repo_root().join("target").join("tether-e2e");
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(pid) = name
                .strip_prefix("idp-")
                .and_then(|p| p.parse::<u32>().ok())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    root.join(format!("idp-{}", std::process::id()))
}

fn mapper(name: &str, kind: &str, config: serde_json::Value) -> serde_json::Value {
    let mut config = config;
    for key in [
        "id.token.claim",
        "access.token.claim",
        "userinfo.token.claim",
        "introspection.token.claim",
    ] {
        config[key] = "true".into();
    }
    serde_json::json!({
        "name": name,
        "protocol": "openid-connect",
        "protocolMapper": kind,
        "consentRequired": false,
        "config": config,
    })
}

/// The claims both clients add: `groups` (group names, not paths), and the user attributes
/// `kube_name` and `kube_groups` as plain strings.
fn mappers() -> serde_json::Value {
    let attribute = |name: &str| {
        mapper(
            name,
            "oidc-usermodel-attribute-mapper",
            serde_json::json!({
                "user.attribute": name,
                "claim.name": name,
                "jsonType.label": "String",
                "multivalued": "false",
                "aggregate.attrs": "false",
            }),
        )
    };
    serde_json::json!([
        mapper(
            "groups",
            "oidc-group-membership-mapper",
            serde_json::json!({ "claim.name": "groups", "full.path": "false" }),
        ),
        attribute("kube_name"),
        attribute("kube_groups"),
    ])
}

/// The declarative user profile: Keycloak's four default attributes, and `kube_name` and
/// `kube_groups` declared so that they are kept, but only administrators may see or change
/// them (a user cannot set their own through the account console).
fn user_profile() -> String {
    let everyone = serde_json::json!({ "view": ["admin", "user"], "edit": ["admin", "user"] });
    let admins = serde_json::json!({ "view": ["admin"], "edit": ["admin"] });
    serde_json::json!({
        "attributes": [
            {
                "name": "username",
                "displayName": "${username}",
                "validations": {
                    "length": { "min": 3, "max": 255 },
                    "username-prohibited-characters": {},
                    "up-username-not-idn-homograph": {}
                },
                "permissions": everyone,
                "multivalued": false
            },
            {
                "name": "email",
                "displayName": "${email}",
                "validations": { "email": {}, "length": { "max": 255 } },
                "required": { "roles": ["user"] },
                "permissions": everyone,
                "multivalued": false
            },
            {
                "name": "firstName",
                "displayName": "${firstName}",
                "validations": { "length": { "max": 255 }, "person-name-prohibited-characters": {} },
                "required": { "roles": ["user"] },
                "permissions": everyone,
                "multivalued": false
            },
            {
                "name": "lastName",
                "displayName": "${lastName}",
                "validations": { "length": { "max": 255 }, "person-name-prohibited-characters": {} },
                "required": { "roles": ["user"] },
                "permissions": everyone,
                "multivalued": false
            },
            { "name": "kube_name", "displayName": "kube_name", "permissions": admins, "multivalued": false },
            { "name": "kube_groups", "displayName": "kube_groups", "permissions": admins, "multivalued": false }
        ],
        "groups": [
            {
                "name": "user-metadata",
                "displayHeader": "User metadata",
                "displayDescription": "Attributes, which refer to user metadata"
            }
        ]
    })
    .to_string()
}

/// The gateway's client: confidential, code flow with PKCE S256 only, no consent, no
/// front-channel logout, refresh tokens per [`IdpOptions::refresh_tokens`].
fn gateway_client(opts: &IdpOptions) -> serde_json::Value {
    serde_json::json!({
        "clientId": GATEWAY_CLIENT_ID,
        "name": "Tether gateway",
        "enabled": true,
        "protocol": "openid-connect",
        "publicClient": false,
        "clientAuthenticatorType": "client-secret",
        "secret": GATEWAY_CLIENT_SECRET,
        "standardFlowEnabled": true,
        "implicitFlowEnabled": false,
        "directAccessGrantsEnabled": false,
        "serviceAccountsEnabled": false,
        "consentRequired": false,
        "frontchannelLogout": false,
        "fullScopeAllowed": true,
        "redirectUris": opts.redirect_uris,
        "webOrigins": [],
        "attributes": {
            "pkce.code.challenge.method": "S256",
            "post.logout.redirect.uris": "+",
            "use.refresh.tokens": if opts.refresh_tokens { "true" } else { "false" },
            "oauth2.device.authorization.grant.enabled": "false",
            "backchannel.logout.session.required": "true",
        },
        "protocolMappers": mappers(),
    })
}

/// The command line's client: public, code flow with PKCE S256 on any loopback port, the
/// device authorization grant, and the password grant (dev and test realm only). Keycloak
/// enforces the client's PKCE method on the device grant too: the device authorization
/// request needs `code_challenge` (S256) and the token request its `code_verifier`.
fn cli_client() -> serde_json::Value {
    serde_json::json!({
        "clientId": CLI_CLIENT_ID,
        "name": "kubectl tether",
        "enabled": true,
        "protocol": "openid-connect",
        "publicClient": true,
        "standardFlowEnabled": true,
        "implicitFlowEnabled": false,
        // Dev and test realm only: the password grant, so tests need no browser.
        "directAccessGrantsEnabled": true,
        "serviceAccountsEnabled": false,
        "consentRequired": false,
        "frontchannelLogout": false,
        "fullScopeAllowed": true,
        // Keycloak ignores the port of a loopback redirect URI (RFC 8252, 7.3).
        "redirectUris": ["http://127.0.0.1/*"],
        "webOrigins": [],
        "attributes": {
            "pkce.code.challenge.method": "S256",
            "post.logout.redirect.uris": "+",
            "oauth2.device.authorization.grant.enabled": "true",
            "use.refresh.tokens": "true",
        },
        "protocolMappers": mappers(),
    })
}

/// The `tether` realm Keycloak imports at start.
///
/// Dev and test settings, not a production realm: fixed passwords, a fixed client secret,
/// `sslRequired: none`, no brute-force protection, one-iteration password hashing, and the
/// password grant
/// (`directAccessGrantsEnabled`) on `kubectl-tether` so tests get real tokens without a
/// browser.
pub fn realm_json(opts: &IdpOptions) -> serde_json::Value {
    let lifetime = opts.token_lifetime.as_secs().max(1);
    let groups: Vec<serde_json::Value> =
        ["tether-developers", "tether-observers", "system:masters"]
            .iter()
            .map(|g| serde_json::json!({ "name": g, "path": format!("/{g}") }))
            .collect();
    let users: Vec<serde_json::Value> = USERS
        .iter()
        .chain(ATTACK_USERS.iter())
        .map(|u| {
            let (first, last) = names(u.username);
            let attributes: serde_json::Map<String, serde_json::Value> =
                attack_attributes(u.username)
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), serde_json::json!([v])))
                    .collect();
            serde_json::json!({
                "username": u.username,
                "enabled": true,
                "email": u.email,
                "emailVerified": true,
                "firstName": first,
                "lastName": last,
                "attributes": attributes,
                "credentials": [{ "type": "password", "value": u.password, "temporary": false }],
                "requiredActions": [],
                "groups": u.groups.iter().map(|g| format!("/{g}")).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "realm": REALM,
        "enabled": true,
        "displayName": "Tether (test realm)",
        "sslRequired": "none",
        "registrationAllowed": false,
        "resetPasswordAllowed": false,
        "rememberMe": false,
        "loginWithEmailAllowed": true,
        "duplicateEmailsAllowed": false,
        "editUsernameAllowed": false,
        "bruteForceProtected": false,
        // Fixed, published test passwords: cheap hashing makes the import and every login
        // fast (Keycloak's default, Argon2, costs a second a user on a busy machine).
        "passwordPolicy": "hashAlgorithm(pbkdf2-sha256) and hashIterations(1)",
        "accessTokenLifespan": lifetime,
        "accessTokenLifespanForImplicitFlow": lifetime,
        "ssoSessionIdleTimeout": 1800,
        "ssoSessionMaxLifespan": 36000,
        "clientSessionIdleTimeout": 0,
        "clientSessionMaxLifespan": 0,
        "accessCodeLifespan": 60,
        "accessCodeLifespanUserAction": 300,
        "accessCodeLifespanLogin": 1800,
        "oauth2DeviceCodeLifespan": 600,
        "oauth2DevicePollingInterval": 5,
        "defaultSignatureAlgorithm": "RS256",
        "groups": groups,
        "users": users,
        "clients": [gateway_client(opts), cli_client()],
        "components": {
            "org.keycloak.userprofile.UserProfileProvider": [
                {
                    "providerId": "declarative-user-profile",
                    "subComponents": {},
                    "config": { "kc.user.profile.config": [user_profile()] }
                }
            ]
        }
    })
}

/// A running Keycloak with the `tether` realm. Dropping it stops it and removes its
/// directory; so does the end of this process, however it ends (the parent-death signals
/// stop Keycloak, and a reaper process removes the directory).
#[derive(Debug)]
pub struct Keycloak {
    dir: PathBuf,
    issuer: String,
    health_url: String,
    log: PathBuf,
    child: Option<std::process::Child>,
    reaper: Option<std::process::Child>,
    keep_dir: bool,
}

/// A process that removes `dir` once its stdin, held open by this process, closes: when the
/// [`Keycloak`] is dropped or this process ends, even killed (a test binary's shared
/// instance is never dropped). In its own process group, so Ctrl-C does not stop it first.
fn spawn_reaper(dir: &Path) -> anyhow::Result<std::process::Child> {
    use std::os::unix::process::CommandExt as _;
    Command::new("sh")
        .arg("-c")
        // Java dies of its parent-death signal at the same time: give it a moment.
        .arg("cat >/dev/null; sleep 2; rm -rf -- \"$0\"")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the reaper of Keycloak's directory")
}

/// Tokens from the token endpoint.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Tokens {
    /// The ID token (a JWT).
    pub id_token: String,
    /// The access token (a JWT).
    pub access_token: String,
    /// The refresh token, when the client gets them.
    pub refresh_token: Option<String>,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

/// A PKCE verifier and its S256 challenge.
#[derive(Debug, Clone)]
pub struct Pkce {
    /// The `code_verifier` of the token request.
    pub verifier: String,
    /// The `code_challenge` of the authorization request.
    pub challenge: String,
}

fn random_b64(bytes: usize) -> String {
    use base64::Engine as _;
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// A fresh PKCE pair (32 random bytes of verifier).
pub fn pkce() -> Pkce {
    use base64::Engine as _;
    let verifier = random_b64(32);
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    Pkce {
        verifier,
        challenge,
    }
}

/// A random `state` or `nonce`.
pub fn random_state() -> String {
    random_b64(16)
}

/// `/usr/bin/setpriv` or the first `setpriv` on `PATH`.
fn setpriv() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/bin"))
        .chain(std::env::split_paths(&path))
        .map(|d| d.join("setpriv"))
        .find(|p| p.is_file())
        .context(
            "Keycloak's java is started through `setpriv --pdeathsig KILL` so that it dies with \
             kc.sh, and no setpriv was found in /usr/bin or on PATH: install util-linux",
        )
}

/// Whether `pid` is running (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn last_line(path: &Path) -> String {
    let tail = log_tail(path, 1);
    let tail = tail.trim();
    let mut end = tail.len().min(160);
    while !tail.is_char_boundary(end) {
        end -= 1;
    }
    tail[..end].to_string()
}

impl Keycloak {
    /// Installs Keycloak if needed ([`ensure`]), writes the realm, starts
    /// `kc.sh start --optimized --import-realm` and waits (up to 180 s) until the realm's
    /// discovery document answers with the expected issuer. The process dies with this one
    /// (parent-death signals on kc.sh and on its java), even when this process is killed.
    pub fn start(opts: &IdpOptions) -> anyhow::Result<Keycloak> {
        let install = ensure()?;
        let started = Instant::now();
        let dir = &opts.dir;
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
        }
        // A home of its own: Keycloak keeps its data (the import directory, transaction logs,
        // temporary files) in `<home>/data`, so every instance gets one, with the built
        // distribution's `lib`, `conf`, `themes` and `providers` linked in read-only.
        let home = dir.join("home");
        let import = home.join("data").join("import");
        fs::create_dir_all(home.join("bin"))
            .and_then(|()| fs::create_dir_all(&import))
            .with_context(|| format!("creating {}", home.display()))?;
        fs::copy(install.home.join("bin/kc.sh"), home.join("bin/kc.sh"))
            .context("copying kc.sh")?;
        for name in ["lib", "conf", "themes", "providers"] {
            std::os::unix::fs::symlink(install.home.join(name), home.join(name))
                .with_context(|| format!("linking {name} into {}", home.display()))?;
        }
        let realm = realm_json(opts);
        fs::write(
            import.join("tether-realm.json"),
            serde_json::to_vec_pretty(&realm)?,
        )
        .context("writing the realm")?;
        let java = dir.join("java");
        write_java_wrapper(&java, &install.java_home)?;
        let h2 = home.join("data").join("h2");
        fs::create_dir_all(&h2).with_context(|| format!("creating {}", h2.display()))?;
        fs::copy(install.home.join(TEMPLATE_DB), h2.join("keycloakdb.mv.db"))
            .context("copying the template database")?;

        let bind = opts.bind;
        let port = if opts.port == 0 {
            crate::free_port()?
        } else {
            opts.port
        };
        let management_port = crate::free_port()?;
        let issuer = format!("http://{bind}:{port}/realms/{REALM}");
        let log = dir.join("keycloak.log");
        let mut cmd = server_command(
            &home,
            &install.java_home,
            &java,
            bind,
            port,
            management_port,
            &log,
        )?;
        cmd.arg("--import-realm");
        let reaper = spawn_reaper(dir)?;
        let child = crate::process::spawn_kept(cmd).context("starting kc.sh")?;
        let mut kc = Keycloak {
            dir: dir.clone(),
            issuer,
            health_url: format!("http://{bind}:{management_port}/health/ready"),
            log,
            child: Some(child),
            reaper: Some(reaper),
            keep_dir: false,
        };
        eprintln!(
            "tether: [keycloak] starting Keycloak {KEYCLOAK_VERSION} at {} (log: {})",
            kc.issuer,
            kc.log.display()
        );
        if let Err(e) = kc.wait_ready(started) {
            // Keep the files of a failed start to look at.
            kc.keep_dir = true;
            return Err(e);
        }
        let rss = kc
            .rss_bytes()
            .map(|b| format!(", RSS {}", mb(b)))
            .unwrap_or_default();
        eprintln!(
            "tether: Keycloak {KEYCLOAK_VERSION} ready in {:.1}s{rss}: issuer {} (files in {})",
            started.elapsed().as_secs_f64(),
            kc.issuer,
            kc.dir.display()
        );
        for u in USERS.iter() {
            eprintln!(
                "tether:   user {} password {} groups {}",
                u.username,
                u.password,
                u.groups.join(",")
            );
        }
        eprintln!(
            "tether:   attack users (password <name>-password): {}; admin {ADMIN_USERNAME} / {ADMIN_PASSWORD}",
            ATTACK_USERS
                .iter()
                .map(|u| u.username)
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(kc)
    }

    fn wait_ready(&self, started: Instant) -> anyhow::Result<()> {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or_default();
        let doc = wait_json(
            pid,
            self.discovery_url(),
            self.log.clone(),
            started,
            Duration::from_secs(180),
        )?;
        if doc["issuer"] != self.issuer.as_str() {
            bail!(
                "Keycloak's issuer is {}, not {}: check the hostname options",
                doc["issuer"],
                self.issuer
            );
        }
        Ok(())
    }

    /// `http://{bind}:{port}/realms/tether`.
    pub fn issuer(&self) -> String {
        self.issuer.clone()
    }

    /// The realm's OpenID discovery document.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }

    /// The authorization endpoint.
    pub fn authorization_endpoint(&self) -> String {
        format!("{}/protocol/openid-connect/auth", self.issuer)
    }

    /// The token endpoint.
    pub fn token_endpoint(&self) -> String {
        format!("{}/protocol/openid-connect/token", self.issuer)
    }

    /// The readiness check on the management interface.
    pub fn health_url(&self) -> &str {
        &self.health_url
    }

    /// Keycloak's log (its console output).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its directory ([`IdpOptions::dir`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// alice and carol (`tether-developers`) and bob (`tether-observers`).
    pub fn users(&self) -> &'static [TestUser] {
        &USERS
    }

    /// mallory (in the group `system:masters`), impostor-admin, impostor-sa, impostor-alice
    /// (`kube_name` attributes) and stringy (`kube_groups` attribute); see
    /// [`attack_attributes`].
    pub fn attack_users(&self) -> &'static [TestUser] {
        &ATTACK_USERS
    }

    /// The pid of Keycloak's java process (a child of kc.sh).
    pub fn java_pid(&self) -> Option<u32> {
        let pid = self.child.as_ref()?.id();
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// The resident memory of the java process.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.java_pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// An authorization request URL of `client_id` (scope `openid email profile`, PKCE S256).
    pub fn authorization_url(
        &self,
        client_id: &str,
        redirect_uri: &str,
        state: &str,
        code_challenge: &str,
    ) -> String {
        reqwest::Url::parse_with_params(
            &self.authorization_endpoint(),
            [
                ("response_type", "code"),
                ("client_id", client_id),
                ("redirect_uri", redirect_uri),
                ("scope", "openid email profile"),
                ("state", state),
                ("nonce", &random_state()),
                ("code_challenge", code_challenge),
                ("code_challenge_method", "S256"),
            ],
        )
        .expect("the authorization endpoint is a URL")
        .to_string()
    }

    /// The password grant of `kubectl-tether` (scope `openid email profile`).
    pub async fn password_grant(&self, user: &TestUser) -> anyhow::Result<Tokens> {
        self.token_request(&[
            ("grant_type", "password"),
            ("client_id", CLI_CLIENT_ID),
            ("username", user.username),
            ("password", user.password),
            ("scope", "openid email profile"),
        ])
        .await
        .with_context(|| format!("the password grant of {}", user.username))
    }

    /// Exchanges an authorization code of the gateway client (with its secret) for tokens.
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        code_verifier: &str,
    ) -> anyhow::Result<Tokens> {
        self.token_request(&[
            ("grant_type", "authorization_code"),
            ("client_id", GATEWAY_CLIENT_ID),
            ("client_secret", GATEWAY_CLIENT_SECRET),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", code_verifier),
        ])
        .await
        .context("exchanging an authorization code of the gateway client")
    }

    async fn token_request(&self, form: &[(&str, &str)]) -> anyhow::Result<Tokens> {
        let resp = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .post(self.token_endpoint())
            .form(form)
            .send()
            .await?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            bail!("{} answered {status}: {body}", self.token_endpoint());
        }
        serde_json::from_str(&body).with_context(|| format!("parsing the token response {body}"))
    }
}

impl Drop for Keycloak {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::stop_all(vec![child]);
        }
        if !self.keep_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
        // Done here already (or the files are kept): the reaper has nothing to do.
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
    }
}

fn decode_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|e| *e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The `action` of Keycloak's login form (`<form id="kc-form-login" ... action="...">`).
fn login_form_action(page: &str) -> Option<String> {
    let id = page.find("id=\"kc-form-login\"")?;
    let start = page[..id].rfind("<form")?;
    let end = start + page[start..].find('>')?;
    let tag = &page[start..end];
    let action = tag.find("action=\"")? + "action=\"".len();
    let len = tag[action..].find('"')?;
    Some(decode_html(&tag[action..action + len]))
}

/// The error Keycloak's page shows, if any, for messages.
fn page_error(page: &str) -> String {
    for marker in [
        "id=\"input-error\"",
        "kc-feedback-text",
        "alert-error",
        "id=\"kc-error-message\"",
    ] {
        if let Some(i) = page.find(marker) {
            let after = &page[i..];
            let text: String = after
                .split('>')
                .skip(1)
                .map(|s| s.split('<').next().unwrap_or("").trim())
                .find(|s| !s.is_empty())
                .unwrap_or("")
                .to_string();
            if !text.is_empty() {
                return decode_html(&text);
            }
        }
    }
    page.find("<title>")
        .and_then(|i| page[i + 7..].split('<').next())
        .map(|t| format!("a page titled {:?}", decode_html(t.trim())))
        .unwrap_or_else(|| "no message".into())
}

/// Plays a browser through Keycloak's login page: GETs `auth_url` (an authorization request),
/// submits `username` and `password` in the `kc-form-login` form, and returns the `Location`
/// of Keycloak's redirect back to the client's `redirect_uri` (with `code` and `state`),
/// without following it. Fails when the login is refused or Keycloak shows another page.
pub async fn login_through_form(
    auth_url: &str,
    username: &str,
    password: &str,
) -> anyhow::Result<String> {
    let parsed = reqwest::Url::parse(auth_url).context("parsing the authorization URL")?;
    let redirect_uri = parsed
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .context("the authorization URL has no redirect_uri")?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?;
    let resp = client.get(parsed).send().await?;
    let status = resp.status();
    let page_url = resp.url().clone();
    if status.is_redirection() {
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("");
        bail!("the authorization request redirected to {location} instead of showing a login form");
    }
    let page = resp.text().await?;
    if !status.is_success() {
        bail!(
            "the authorization request answered {status}: {}",
            page_error(&page)
        );
    }
    let action = login_form_action(&page).with_context(|| {
        format!(
            "no <form id=\"kc-form-login\"> on Keycloak's page ({})",
            page_error(&page)
        )
    })?;
    let action = page_url
        .join(&action)
        .context("the login form's action is not a URL")?;
    let resp = client
        .post(action)
        .form(&[
            ("username", username),
            ("password", password),
            ("credentialId", ""),
        ])
        .send()
        .await?;
    let status = resp.status();
    if status.is_redirection() {
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("")
            .to_string();
        if !location.starts_with(&redirect_uri) {
            bail!(
                "after the login of {username} Keycloak redirected to {location}, not to the \
                 client's {redirect_uri} (a required action or consent page?)"
            );
        }
        return Ok(location);
    }
    let page = resp.text().await.unwrap_or_default();
    bail!(
        "Keycloak refused the login of {username} ({status}): {}",
        page_error(&page)
    )
}
