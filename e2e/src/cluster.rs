//! The whole of Tether on a real single-node cluster, the way a platform team runs it: the
//! control plane listening on the node's bridge, a real node (containerd, runc, kubelet,
//! kube-proxy, kube-router), the images built from the repository's Dockerfile and imported into
//! containerd, and the chart installed with `helm install`, so the operator and the gateway run
//! as the chart's Deployments under the chart's service accounts.
//!
//! The gateway is reached through its Service as a NodePort on the node's bridge address
//! ([`realnode::NODE_IP`]): it survives gateway pods being replaced (a `helm upgrade`, a
//! rollout), balances across the replicas like a cloud load balancer would, and listens
//! nowhere beyond this machine. A port-forward would pin one pod and die with it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};

use crate::{
    ControlPlane, Options, binaries,
    idp::{self, IdpOptions, Keycloak},
    images,
    realnode::{self, NODE_IP, NodeNetwork, RealNode, RealNodeOptions},
    stack::{self, DevUser, SYSTEM_NAMESPACE},
};

/// Options of [`Cluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Directory for everything: control plane, node, images, logs. Emptied parts are rebuilt.
    pub dir: PathBuf,
    /// Port of the API server on the node's address; 0 picks a free one.
    pub api_port: u16,
    /// The gateway Service's node port (30000–32767).
    pub gateway_node_port: u16,
    /// Extra flags of the operator (chart value `operator.extraArgs`).
    pub operator_args: Vec<String>,
}

/// Everything running. Dropping it stops the node (and every pod), then the control plane, and
/// removes the bridge.
#[derive(Debug)]
pub struct Cluster {
    node: tokio::sync::Mutex<RealNode>,
    /// The control plane.
    pub cp: ControlPlane,
    /// The chart's release and the ways in to it.
    pub stack: ChartStack,
    /// The identity provider people sign in with (Keycloak), on the node's address.
    pub idp: Keycloak,
    _network: NodeNetwork,
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

impl Cluster {
    /// The cluster shared by the tests of one test binary, started on first use. Its files live
    /// in `target/tether-e2e/cluster`; the node's reaper (see [`NodeNetwork`]) removes its
    /// containers, mounts and network when the test binary exits, however it exits.
    pub async fn shared() -> &'static Cluster {
        let shared = SHARED.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("tether-e2e-cluster".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("a tokio runtime");
                    let dir = binaries::repo_root().join("target/tether-e2e/cluster");
                    let started = rt.block_on(Cluster::start(ClusterOptions {
                        dir,
                        api_port: 0,
                        gateway_node_port: 30443,
                        operator_args: vec![
                            "--lease-duration-seconds=6".into(),
                            "--lease-grace-seconds=2".into(),
                        ],
                    }));
                    let failed = started.is_err();
                    tx.send(started.map_err(|e| format!("{e:#}")))
                        .expect("the test thread waits for the cluster");
                    if !failed {
                        // Children die with the thread that spawned them; the runtime keeps
                        // serving the clients made on it.
                        rt.block_on(std::future::pending::<()>());
                    }
                })
                .expect("spawning the cluster thread");
            rx.recv()
                .unwrap_or_else(|_| Err("the cluster thread panicked".to_string()))
        });
        match shared {
            Ok(c) => c,
            Err(e) => panic!("the test cluster did not start: {e}"),
        }
    }

    /// Builds what is missing (binaries, images), creates the node's network, starts the control
    /// plane on it and the node, and installs the chart.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        realnode::preflight()?;
        let started = Instant::now();
        std::fs::create_dir_all(&opts.dir)
            .with_context(|| format!("creating {}", opts.dir.display()))?;
        step("building the node (kubelet, kube-proxy, containerd, kube-router; cached)");
        binaries::ensure_node()?;
        step("building Tether");
        let bin_dir = stack::build_binaries()?;
        step("building the images from the Dockerfile (buildah; cached base images)");
        let built = images::build(&images::ImageOptions {
            binaries: bin_dir,
            out_dir: opts.dir.join("images"),
            tag: IMAGE_TAG.into(),
        })?;
        step("creating the node's network and starting the control plane on it");
        let network = NodeNetwork::create(&stack::dev_binary(&std::env::current_exe()?)?)?;
        // The provider starts beside the control plane and the node (it takes a while): on the
        // node's address, so browsers on this machine and the gateway's pods reach the same
        // issuer URL.
        idp::ensure().context("installing Keycloak")?;
        let idp_opts = IdpOptions {
            bind: NODE_IP,
            port: crate::free_port()?,
            redirect_uris: vec![format!(
                "http://{NODE_IP}:{}/auth/callback",
                opts.gateway_node_port
            )],
            ..IdpOptions::new(opts.dir.join("idp"))
        };
        let idp_thread = std::thread::Builder::new()
            .name("tether-e2e-idp".into())
            .spawn(move || Keycloak::start(&idp_opts))?;
        let cp = ControlPlane::start(Options {
            dir: opts.dir.join("controlplane"),
            api_port: opts.api_port,
            bind: Some(NODE_IP),
        })
        .await
        .context("starting the control plane")?;
        step("starting the node (containerd, kubelet, kube-proxy, kube-router)");
        let node = RealNode::start(
            &cp,
            RealNodeOptions {
                dir: opts.dir.join("node"),
                images: built.iter().map(|i| i.archive.clone()).collect(),
            },
        )
        .await?;
        step("waiting for the identity provider (Keycloak)");
        let idp = idp_thread
            .join()
            .map_err(|_| anyhow::anyhow!("the Keycloak thread panicked"))?
            .context("starting Keycloak")?;
        step("helm install tether charts/tether (operator and gateway from the images)");
        let stack = ChartStack::install(&cp, &opts, &idp).await?;
        eprintln!(
            "tether-e2e: cluster up in {:.0}s",
            started.elapsed().as_secs_f64()
        );
        Ok(Cluster {
            node: tokio::sync::Mutex::new(node),
            cp,
            stack,
            idp,
            _network: network,
        })
    }

    /// The node, for restarting its kubelet or reading its logs.
    pub async fn node(&self) -> tokio::sync::MutexGuard<'_, RealNode> {
        self.node.lock().await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.node.get_mut().stop();
        self.cp.stop();
    }
}

/// Tag of the images built for the local cluster.
pub const IMAGE_TAG: &str = "dev";
/// The chart's release name.
pub const RELEASE: &str = "tether";

/// The chart's release on the cluster.
#[derive(Debug)]
pub struct ChartStack {
    dir: PathBuf,
    admin_kubeconfig: PathBuf,
    node_port: u16,
    operator_args: Vec<String>,
    /// The identity provider's issuer URL.
    issuer: String,
    /// Development users: `alice` and `carol` (group tether-devs), `bob` (group pair-watchers).
    pub users: Vec<DevUser>,
}

/// Secret holding the gateway's OIDC client secret (key `client-secret`).
pub const OIDC_CLIENT_SECRET: &str = "tether-oidc";

impl ChartStack {
    async fn install(
        cp: &ControlPlane,
        opts: &ClusterOptions,
        idp: &Keycloak,
    ) -> anyhow::Result<ChartStack> {
        let dir = opts.dir.join("stack");
        std::fs::create_dir_all(&dir)?;
        let client = cp.admin_client().await;
        let pp = PatchParams::apply(crate::controlplane::FIELD_MANAGER).force();
        Api::<Namespace>::all(client.clone())
            .patch(
                SYSTEM_NAMESPACE,
                &pp,
                &Patch::Apply(serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": SYSTEM_NAMESPACE},
                })),
            )
            .await
            .context("creating the chart's namespace")?;
        let (signing, public) = tether_protocol::ticket::generate_keypair();
        let users = stack::dev_users();
        let tokens: String = users
            .iter()
            .map(|u| format!("{},{},{}\n", u.token, u.user, u.group))
            .collect();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
        let secret = |name: &str, data: BTreeMap<String, ByteString>| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE},
                "data": data,
            })
        };
        let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
        secrets
            .patch(
                "tether-ticket-keys",
                &pp,
                &Patch::Apply(secret(
                    "tether-ticket-keys",
                    BTreeMap::from([
                        ("signing.pem".into(), bytes(&signing)),
                        ("public.pem".into(), bytes(&public)),
                    ]),
                )),
            )
            .await
            .context("creating the ticket key Secret")?;
        secrets
            .patch(
                "tether-dev-tokens",
                &pp,
                &Patch::Apply(secret(
                    "tether-dev-tokens",
                    BTreeMap::from([("tokens".into(), bytes(&tokens))]),
                )),
            )
            .await
            .context("creating the development token Secret")?;
        secrets
            .patch(
                OIDC_CLIENT_SECRET,
                &pp,
                &Patch::Apply(secret(
                    OIDC_CLIENT_SECRET,
                    BTreeMap::from([("client-secret".into(), bytes(idp::GATEWAY_CLIENT_SECRET))]),
                )),
            )
            .await
            .context("creating the OIDC client Secret")?;
        let stack = ChartStack {
            issuer: idp.issuer(),
            dir,
            admin_kubeconfig: cp.admin_kubeconfig().to_path_buf(),
            node_port: opts.gateway_node_port,
            operator_args: opts.operator_args.clone(),
            users,
        };
        stack.helm("install", &[])?;
        Ok(stack)
    }

    /// The values `cargo dev` and the tests install the chart with: the local images, a
    /// NodePort on the bridge, development tokens over plain http.
    fn values(&self) -> Vec<String> {
        let mut set = vec![
            "image.registry=localhost/tether".to_string(),
            format!("image.tag={IMAGE_TAG}"),
            "image.pullPolicy=Never".to_string(),
            "gateway.service.type=NodePort".to_string(),
            format!("gateway.service.nodePort={}", self.node_port),
            format!("gateway.allowedOrigins={{{}}}", self.origin()),
            "gateway.development.tokensSecret=tether-dev-tokens".to_string(),
            "gateway.development.insecureCookies=true".to_string(),
            "operator.logFormat=text".to_string(),
            // Browser sign-in with the local Keycloak, identities mapped as a kube-apiserver
            // with --oidc-username-claim=email --oidc-groups-prefix=oidc: would.
            format!("gateway.oidc.issuer={}", self.issuer),
            format!(
                "gateway.oidc.audiences={{{},{}}}",
                idp::GATEWAY_CLIENT_ID,
                idp::CLI_CLIENT_ID
            ),
            format!("gateway.oidc.cliClientID={}", idp::CLI_CLIENT_ID),
            format!(
                "gateway.oidc.externalURL={}",
                self.url().trim_end_matches('/')
            ),
            format!("gateway.oidc.clientSecretSecret={OIDC_CLIENT_SECRET}"),
            "gateway.oidc.usernameClaim=email".to_string(),
            "gateway.oidc.groupsPrefix=oidc:".to_string(),
        ];
        for (i, arg) in self.operator_args.iter().enumerate() {
            set.push(format!("operator.extraArgs[{i}]={arg}"));
        }
        set
    }

    /// Runs `helm install` or `helm upgrade` of the release with [`Self::values`] and `extra`
    /// `--set` values, waiting until its Deployments are rolled out.
    fn helm(&self, verb: &str, extra: &[&str]) -> anyhow::Result<()> {
        let bins = binaries::ensure()?;
        let mut cmd = Command::new(&bins.helm);
        binaries::Binaries::isolate_helm(&mut cmd);
        cmd.args([verb, RELEASE])
            .arg(binaries::repo_root().join("charts/tether"))
            .args([
                "--namespace",
                SYSTEM_NAMESPACE,
                "--wait",
                "--timeout",
                "180s",
            ])
            .env("KUBECONFIG", &self.admin_kubeconfig);
        for value in self.values() {
            cmd.args(["--set", &value]);
        }
        for value in extra {
            cmd.args(["--set", value]);
        }
        let out = cmd
            .output()
            .with_context(|| format!("running helm {verb}"))?;
        if !out.status.success() {
            bail!(
                "helm {verb} {RELEASE} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `helm upgrade` with extra `--set` values (for example `gateway.replicas=3`), waiting for
    /// the rollout.
    pub fn upgrade(&self, set: &[&str]) -> anyhow::Result<()> {
        self.helm("upgrade", set)
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("{}/", self.origin())
    }

    /// The gateway's origin (scheme, node address, node port).
    pub fn origin(&self) -> String {
        format!("http://{NODE_IP}:{}", self.node_port)
    }

    /// The gateway's address, for clients that dial it directly.
    pub fn gateway_addr(&self) -> std::net::SocketAddr {
        (NODE_IP, self.node_port).into()
    }

    /// The admin kubeconfig.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The directory of the stack's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes the operator's pods (as a node drain or a crash would) and waits until their
    /// Deployment has replaced them with Ready ones.
    pub async fn delete_operator_pods(&self) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(
            crate::client_from_kubeconfig(&self.admin_kubeconfig).await,
            SYSTEM_NAMESPACE,
        );
        let lp = ListParams::default().labels("app.kubernetes.io/name=tether-operator");
        let old: Vec<String> = pods
            .list(&lp)
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        for name in &old {
            pods.delete(name, &DeleteParams::default()).await?;
        }
        self.rollout_status("tether-operator")?;
        Ok(())
    }

    /// `kubectl rollout restart` of the gateway, waiting until every replica is new and Ready.
    pub fn restart_gateway(&self) -> anyhow::Result<()> {
        self.kubectl(&["rollout", "restart", "deployment/tether-gateway"])?;
        self.rollout_status("tether-gateway")
    }

    fn rollout_status(&self, deployment: &str) -> anyhow::Result<()> {
        self.kubectl(&[
            "rollout",
            "status",
            &format!("deployment/{deployment}"),
            "--timeout=120s",
        ])
        .map(drop)
    }

    /// Runs kubectl in the chart's namespace with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let bins = binaries::ensure()?;
        let out = Command::new(&bins.kubectl)
            .args(["--namespace", SYSTEM_NAMESPACE])
            .args(args)
            .env("KUBECONFIG", &self.admin_kubeconfig)
            .output()
            .context("running kubectl")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("kubectl {} failed: {text}", args.join(" "));
        }
        Ok(text)
    }

    /// Waits until the gateway answers `/readyz` through its node port.
    pub async fn wait_gateway_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if crate::node::probe_http(NODE_IP.into(), self.node_port, "/readyz").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "the gateway did not answer /readyz at {} in 60s",
            self.url()
        )
    }
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}
