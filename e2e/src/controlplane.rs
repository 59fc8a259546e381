//! A real Kubernetes control plane on loopback: etcd, kube-apiserver with RBAC and Pod Security
//! admission, kube-controller-manager and kube-scheduler, each a child process.
//!
//! Every child is started with a parent-death signal, so nothing outlives the process that
//! started it: not a panicking test, not a test binary killed by CI's timeout, not `cargo dev up`
//! stopped with Ctrl-C. The shared instance of a test binary is started from a thread that lives
//! as long as the process, because the kernel sends that signal when the spawning *thread* ends.

use std::{
    fs,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::{
    binaries::{self, Binaries},
    namespace::TestNamespace,
    pki::{self, Authority},
};

/// Field manager of everything the harness applies.
pub const FIELD_MANAGER: &str = "tether-e2e";

/// Errors of starting the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binaries could not be built or found.
    #[error(transparent)]
    Build(#[from] binaries::BuildError),
    /// A file of the control plane could not be written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A component did not become ready; the message carries the end of its log.
    #[error("{0}")]
    NotReady(String),
    /// The API server refused a request the harness needs.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: kube::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}

/// Options of [`ControlPlane::start`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory for etcd's data, certificates, kubeconfigs and logs. It is emptied first.
    pub dir: PathBuf,
    /// Port of the API server; 0 picks a free one.
    pub api_port: u16,
    /// Address the API server listens on and advertises: 127.0.0.1 when `None`. A real node's
    /// pods reach the API server through the `kubernetes` Service, so under one it is the node
    /// bridge's address (see [`crate::realnode`]), and the Service's endpoints are kept by the
    /// API server's lease reconciler.
    pub bind: Option<Ipv4Addr>,
}

/// The first address of the Service range, which the `kubernetes` Service gets.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The Service address range.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// A running control plane. Dropping it stops every process.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    server: String,
    bind: Ipv4Addr,
    ca: Authority,
    admin_kubeconfig: PathBuf,
    children: Mutex<Vec<(String, Child)>>,
}

/// The shared instance, or why it failed: a failure is kept so that the other tests of the
/// binary report it at once instead of each retrying a minute-long start.
static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use and
    /// stopped when the process exits. Its files live in `target/tether-e2e/cp-<pid>`.
    pub async fn shared() -> &'static ControlPlane {
        let shared = SHARED.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("tether-e2e-control-plane".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a tokio runtime");
                    let dir = shared_dir();
                    let started = rt.block_on(ControlPlane::start(Options {
                        dir,
                        api_port: 0,
                        bind: None,
                    }));
                    let failed = started.is_err();
                    tx.send(started)
                        .expect("the test thread waits for the control plane");
                    if !failed {
                        // Children die with the thread that spawned them: keep it alive.
                        loop {
                            std::thread::park();
                        }
                    }
                })
                .expect("spawning the control-plane thread");
            match rx.recv() {
                Ok(started) => started.map_err(|e| e.to_string()),
                Err(_) => Err("the control-plane thread panicked".to_string()),
            }
        });
        match shared {
            Ok(cp) => cp,
            Err(e) => panic!("the test control plane did not start: {e}"),
        }
    }

    /// Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler, and waits until
    /// the API server is ready and the default service account exists.
    pub async fn start(opts: Options) -> Result<ControlPlane, Error> {
        let bins = binaries::ensure()?;
        let started = Instant::now();
        let dir = opts.dir;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io(format!("emptying {}", dir.display())))?;
        }
        fs::create_dir_all(dir.join("logs")).map_err(io(format!("creating {}", dir.display())))?;

        let bind = opts.bind.unwrap_or(Ipv4Addr::LOCALHOST);
        let ca = Authority::new();
        // The names in-cluster clients use: the `kubernetes` Service's address and DNS names.
        let serving = ca.serving_for(
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[bind.into(), KUBERNETES_SERVICE_IP.into()],
        );
        let admin = ca.client("tether-admin", Some("system:masters"));
        // What the API server presents to kubelets for logs, exec and port-forward.
        let kubelet_client = ca.client("kube-apiserver-kubelet-client", Some("system:masters"));
        write(&dir.join("ca.crt"), &ca.cert_pem())?;
        write(&dir.join("apiserver.crt"), &serving.cert_pem)?;
        write(&dir.join("apiserver.key"), &serving.key_pem)?;
        write(&dir.join("kubelet-client.crt"), &kubelet_client.cert_pem)?;
        write(&dir.join("kubelet-client.key"), &kubelet_client.key_pem)?;
        let (sa_key, sa_pub) = pki::service_account_key();
        write(&dir.join("sa.key"), &sa_key)?;
        write(&dir.join("sa.pub"), &sa_pub)?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let api_port = if opts.api_port == 0 {
            free_port()?
        } else {
            opts.api_port
        };
        let server = format!("https://{bind}:{api_port}");
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write(
            &admin_kubeconfig,
            &kubeconfig_yaml(
                &server,
                &ca.cert_pem(),
                "tether-admin",
                Credential::Cert(&admin),
            ),
        )?;

        let cp = ControlPlane {
            dir: dir.clone(),
            server,
            bind,
            ca,
            admin_kubeconfig,
            children: Mutex::new(Vec::new()),
        };
        cp.spawn_etcd(&bins, etcd_port, etcd_peer_port)?;
        cp.spawn_apiserver(&bins, etcd_port, api_port)?;
        cp.wait_apiserver_ready().await?;
        cp.spawn_controller_manager(&bins)?;
        cp.spawn_scheduler(&bins)?;
        cp.wait_default_service_account().await?;
        eprintln!(
            "tether-e2e: control plane ready at {} in {:.1}s (files in {})",
            cp.server,
            started.elapsed().as_secs_f64(),
            cp.dir.display()
        );
        Ok(cp)
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The address the API server listens on.
    pub fn bind_address(&self) -> Ipv4Addr {
        self.bind
    }

    /// The control plane's certificate authority, which also signs the node's certificates.
    pub fn authority(&self) -> &Authority {
        &self.ca
    }

    /// The directory of this control plane's files (logs in `logs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig (group `system:masters`, which RBAC does not govern).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A client for the admin.
    pub async fn admin_client(&self) -> Client {
        client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// A kubeconfig for an ordinary user, authenticated by a client certificate with `user` as
    /// its common name and `groups` (at most one) as its organization. RBAC governs it.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> PathBuf {
        assert!(
            groups.len() <= 1,
            "a client certificate here carries at most one group"
        );
        let pair = self.ca.client(user, groups.first().copied());
        let path = self.dir.join(format!("user-{}.kubeconfig", sanitize(user)));
        write(
            &path,
            &kubeconfig_yaml(
                &self.server,
                &self.ca.cert_pem(),
                user,
                Credential::Cert(&pair),
            ),
        )
        .expect("writing a user kubeconfig");
        path
    }

    /// A client for an ordinary user (see [`ControlPlane::user_kubeconfig`]).
    pub async fn user_client(&self, user: &str, groups: &[&str]) -> Client {
        client_from_kubeconfig(&self.user_kubeconfig(user, groups)).await
    }

    /// A client built from any kubeconfig file.
    pub async fn client_from_kubeconfig(&self, path: &Path) -> Client {
        client_from_kubeconfig(path).await
    }

    /// A token for the existing service account `namespace/name`, as `kubectl create token
    /// --audience A` makes it; no audiences means the API server's own.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audiences: &[&str],
        ttl: Duration,
    ) -> String {
        let sas = Api::<ServiceAccount>::namespaced(self.admin_client().await, namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                expiration_seconds: Some(ttl.as_secs() as i64),
                ..Default::default()
            },
            ..Default::default()
        };
        sas.create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("requesting a token for {namespace}/{name}: {e}"))
            .status
            .expect("a TokenRequest answer has a status")
            .token
    }

    /// Creates the namespace (if missing) and the service account `name` in it, and returns a
    /// kubeconfig holding a token for it: a real service-account identity, the one a component
    /// has when the chart installs it.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let client = self.admin_client().await;
        let ns = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}
        });
        Api::<Namespace>::all(client.clone())
            .patch(
                namespace,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(ns),
            )
            .await
            .unwrap_or_else(|e| panic!("creating namespace {namespace}: {e}"));
        let sa = serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace}
        });
        let sas = Api::<ServiceAccount>::namespaced(client, namespace);
        sas.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(sa))
            .await
            .unwrap_or_else(|e| panic!("creating service account {namespace}/{name}: {e}"));
        drop(sas);
        let token = self
            .service_account_token(namespace, name, &[], Duration::from_secs(24 * 3600))
            .await;
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let path = self.dir.join(format!("sa-{namespace}-{name}.kubeconfig"));
        write(
            &path,
            &kubeconfig_yaml(
                &self.server,
                &self.ca.cert_pem(),
                &user,
                Credential::Token(&token),
            ),
        )
        .expect("writing a service-account kubeconfig");
        path
    }

    /// Applies every CRD in `crds/` and waits until each is Established.
    pub async fn install_crds(&self) {
        install_crds(&self.admin_client().await)
            .await
            .unwrap_or_else(|e| panic!("installing crds/: {e}"));
    }

    /// A new namespace for one test, named `<prefix>-<random>`, labelled `tether.dev/e2e=true`
    /// and enforcing Pod Security `restricted`. It is deleted when dropped; if the test is
    /// panicking, its pods, events and sessions are printed first.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        TestNamespace::create(self.admin_kubeconfig.clone(), prefix).await
    }

    /// The last lines of a component's log, for failure messages.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        log_tail(
            &self.dir.join("logs").join(format!("{component}.log")),
            lines,
        )
    }

    /// The last error and warning lines of a component's log (klog `E`/`W`/`F` lines, or any
    /// line when the log has no such prefix), for failure messages.
    pub fn log_errors(&self, component: &str, lines: usize) -> String {
        let text = fs::read_to_string(self.dir.join("logs").join(format!("{component}.log")))
            .unwrap_or_default();
        let picked: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(['E', 'F']) || !l.starts_with(['I', 'W']))
            .collect();
        picked[picked.len().saturating_sub(lines)..].join("\n")
    }

    fn spawn(&self, name: &str, program: &Path, args: &[String]) -> Result<(), Error> {
        let log_path = self.dir.join("logs").join(format!("{name}.log"));
        let log =
            fs::File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("duplicating a log handle"))?)
            .stderr(log);
        crate::process::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
        self.children
            .lock()
            .expect("children lock")
            .push((name.to_string(), child));
        Ok(())
    }

    fn spawn_etcd(&self, bins: &Binaries, port: u16, peer_port: u16) -> Result<(), Error> {
        let client = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let args = vec![
            "--name=tether-e2e".to_string(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=tether-e2e={peer}"),
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
        ];
        self.spawn("etcd", &bins.etcd, &args)
    }

    fn spawn_apiserver(&self, bins: &Binaries, etcd_port: u16, port: u16) -> Result<(), Error> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        let loopback = self.bind.is_loopback();
        let args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            format!("--secure-port={port}"),
            format!("--bind-address={}", self.bind),
            format!("--advertise-address={}", self.bind),
            format!("--tls-cert-file={}", d("apiserver.crt")),
            format!("--tls-private-key-file={}", d("apiserver.key")),
            format!("--client-ca-file={}", d("ca.crt")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // Logs, exec and port-forward go to the kubelet at its InternalIP (the node has no
            // DNS name), with a client certificate, checking the kubelet's serving certificate.
            format!("--kubelet-client-certificate={}", d("kubelet-client.crt")),
            format!("--kubelet-client-key={}", d("kubelet-client.key")),
            format!("--kubelet-certificate-authority={}", d("ca.crt")),
            "--kubelet-preferred-address-types=InternalIP".to_string(),
            "--authorization-mode=Node,RBAC".to_string(),
            "--enable-admission-plugins=NodeRestriction".to_string(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            // Privileged pods are allowed cluster-wide so that Pod Security admission, enforced
            // per namespace by label, is what refuses them.
            "--allow-privileged=true".to_string(),
            // On loopback no pod could use the `kubernetes` Service's endpoints; under a real node
            // they must point at this server.
            format!(
                "--endpoint-reconciler-type={}",
                if loopback { "none" } else { "lease" }
            ),
            // API Priority and Fairness on, as on every cluster since 1.20: the chart ships
            // FlowSchemas, and the tests read the levels the server assigns.
            "--enable-priority-and-fairness=true".to_string(),
            "--profiling=false".to_string(),
            "--v=1".to_string(),
        ];
        self.spawn("kube-apiserver", &bins.kube_apiserver, &args)
    }

    fn spawn_controller_manager(&self, bins: &Binaries) -> Result<(), Error> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        let args = vec![
            format!("--kubeconfig={}", self.admin_kubeconfig.display()),
            "--leader-elect=false".to_string(),
            "--secure-port=0".to_string(),
            // Only what the tests and `cargo dev up` rely on: owner-reference garbage
            // collection, namespace deletion, service accounts and their tokens, quota usage,
            // aggregated cluster roles, node lifecycle (it lifts the not-ready taint new
            // nodes are created with, once the node reports Ready), and what the chart's
            // Deployments, Services and PodDisruptionBudgets need on a real node.
            "--controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,clusterrole-aggregation-controller,resourcequota-controller,node-lifecycle-controller,deployment-controller,replicaset-controller,endpoints-controller,endpointslice-controller,disruption-controller,pod-garbage-collector-controller".to_string(),
            "--node-monitor-period=2s".to_string(),
            format!("--service-account-private-key-file={}", d("sa.key")),
            format!("--root-ca-file={}", d("ca.crt")),
            "--concurrent-gc-syncs=5".to_string(),
            "--v=1".to_string(),
        ];
        self.spawn(
            "kube-controller-manager",
            &bins.kube_controller_manager,
            &args,
        )
    }

    fn spawn_scheduler(&self, bins: &Binaries) -> Result<(), Error> {
        let args = vec![
            format!("--kubeconfig={}", self.admin_kubeconfig.display()),
            "--leader-elect=false".to_string(),
            "--secure-port=0".to_string(),
            "--v=1".to_string(),
        ];
        self.spawn("kube-scheduler", &bins.kube_scheduler, &args)
    }

    fn check_children(&self) -> Result<(), Error> {
        let mut children = self.children.lock().expect("children lock");
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::NotReady(format!(
                    "{name} exited ({status}); its errors:\n{}",
                    self.log_errors(name, 10)
                )));
            }
        }
        Ok(())
    }

    async fn wait_apiserver_ready(&self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = String::new();
        while Instant::now() < deadline {
            self.check_children()?;
            // A fresh client per attempt: the first ones race the server's listener.
            let client = self.admin_client().await;
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a valid request");
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(Error::NotReady(format!(
            "kube-apiserver was not ready after 120s (last answer: {last}); end of its log:\n{}",
            self.log_tail("kube-apiserver", 30)
        )))
    }

    async fn wait_default_service_account(&self) -> Result<(), Error> {
        let sas = Api::<ServiceAccount>::namespaced(self.admin_client().await, "default");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            self.check_children()?;
            if sas.get_opt("default").await.ok().flatten().is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(Error::NotReady(format!(
            "kube-controller-manager created no default service account in 60s; end of its log:\n{}",
            self.log_tail("kube-controller-manager", 30)
        )))
    }

    /// Stops every process: SIGTERM, then SIGKILL after a grace period.
    pub fn stop(&self) {
        let mut children = self.children.lock().expect("children lock");
        crate::process::stop_all(children.drain(..).rev().map(|(_, c)| c).collect());
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Applies every CRD in `crds/` with `client` and waits until each is Established.
pub async fn install_crds(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = binaries::repo_root().join("crds");
    let mut names = Vec::new();
    let mut files: Vec<_> = fs::read_dir(&dir)
        .map_err(io(format!("listing {}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = fs::read_to_string(&file).map_err(io(format!("reading {}", file.display())))?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value =
                serde_json::to_value(serde_yaml_ng::Value::deserialize(doc).map_err(|e| {
                    Error::NotReady(format!("{} is not valid YAML: {e}", file.display()))
                })?)
                .map_err(|e| Error::NotReady(format!("{}: {e}", file.display())))?;
            if value.is_null() {
                continue;
            }
            let crd: CustomResourceDefinition = serde_json::from_value(value)
                .map_err(|e| Error::NotReady(format!("{} holds no CRD: {e}", file.display())))?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            crds.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(kube_err(format!("applying CRD {name}")))?;
            names.push(name);
        }
    }
    for name in names {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let crd = crds
                .get(&name)
                .await
                .map_err(kube_err(format!("reading CRD {name}")))?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady(format!(
                    "CRD {name} not Established after 30s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

use serde::Deserialize as _;

/// A client built from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("reading kubeconfig {}: {e}", path.display()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading kubeconfig {}: {e}", path.display()));
    Client::try_from(config).expect("building a kube client")
}

enum Credential<'a> {
    Cert(&'a pki::CertPair),
    Token(&'a str),
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &str, cred: Credential<'_>) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user_entry = match cred {
        Credential::Cert(pair) => serde_json::json!({
            "client-certificate-data": b64(&pair.cert_pem),
            "client-key-data": b64(&pair.key_pem),
        }),
        Credential::Token(token) => serde_json::json!({ "token": token }),
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tether", "cluster": {
            "server": server,
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": "tether", "context": {"cluster": "tether", "user": user}}],
        "current-context": "tether",
    });
    serde_yaml_ng::to_string(&config).expect("a kubeconfig serializes")
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Keys and tokens live in these files: owner-only.
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("writing {}", path.display())))?;
    std::io::Write::write_all(&mut file, contents.as_bytes())
        .map_err(io(format!("writing {}", path.display())))
}

/// A free TCP port on loopback (bound, read and released).
pub fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `target/tether-e2e/cp-<pid>`, after removing the directories of processes that have exited.
fn shared_dir() -> PathBuf {
    let root = binaries::repo_root().join("target").join("tether-e2e");
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("cp-").and_then(|p| p.parse::<u32>().ok())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    root.join(format!("cp-{}", std::process::id()))
}
