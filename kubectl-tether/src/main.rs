//! The `kubectl-tether` binary: `kubectl tether attach|login|logout|status`.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kubectl_tether::attach::{self, AttachOptions};
use kubectl_tether::cache::{Cache, Provider};
use kubectl_tether::login::LoginOptions;
use kubectl_tether::signin::{Credentials, NoOidc, SignIn, Source, not_signed_in, provider_for};
use kubectl_tether::{http, kubeconfig, login};

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-tether",
    version,
    about = "Tether terminal sessions from the command line"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach to a TerminalSession (Ctrl-] then q detaches).
    Attach {
        /// The session's name.
        name: String,
        /// Its namespace (default: the kubeconfig context's, else `default`).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Read-only: watch without typing (needs the `observe` verb).
        #[arg(long)]
        observe: bool,
        /// Base URL of the gateway, e.g. https://tether.example.com.
        #[arg(long, env = "TETHER_GATEWAY")]
        gateway: String,
        /// A file holding your token (OIDC ID token or Kubernetes token). Without a token, the
        /// sign-in of `kubectl tether login` is used.
        #[arg(long, env = "TETHER_TOKEN_FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// The token itself.
        #[arg(long = "token", env = "TETHER_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        tls: Tls,
    },
    /// Sign in with the gateway's OIDC provider (a browser on this machine, or --device).
    Login {
        #[command(flatten)]
        provider: ProviderArgs,
        /// The device authorization grant: a code to enter on any device's browser, for
        /// machines without one (SSH sessions).
        #[arg(long, conflicts_with = "listen_port")]
        device: bool,
        /// Only print the URL; do not try to open a browser.
        #[arg(long)]
        no_browser: bool,
        /// Port of the loopback redirect http://127.0.0.1:PORT/callback (default: any free
        /// one). The provider must allow that redirect URI.
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        listen_port: u16,
        /// Scopes to ask for besides `openid` (repeatable).
        #[arg(long = "scope", default_values_t = ["email".to_owned(), "profile".to_owned()])]
        scopes: Vec<String>,
        #[command(flatten)]
        tls: Tls,
    },
    /// Forget the cached sign-in.
    Logout {
        #[command(flatten)]
        provider: ProviderArgs,
        #[command(flatten)]
        tls: Tls,
    },
    /// Whether you are signed in, as whom and until when (refreshing the sign-in if it is due);
    /// never prints a token.
    Status {
        #[command(flatten)]
        provider: ProviderArgs,
        #[command(flatten)]
        tls: Tls,
    },
}

#[derive(Debug, Args)]
struct ProviderArgs {
    /// Base URL of the gateway, which says where to sign in (GET /api/auth).
    #[arg(long, env = "TETHER_GATEWAY")]
    gateway: Option<String>,
    /// The OIDC issuer, instead of the gateway's.
    #[arg(long)]
    issuer: Option<String>,
    /// The OIDC client id of the CLI, instead of the one the gateway names (with only
    /// --issuer: kubectl-tether).
    #[arg(long)]
    client_id: Option<String>,
}

#[derive(Debug, Args)]
struct Tls {
    /// PEM file of the CA certificates to trust for https:// (the gateway and the provider),
    /// instead of the public web roots (like kubectl's --certificate-authority).
    #[arg(long, env = "TETHER_CERTIFICATE_AUTHORITY")]
    certificate_authority: Option<PathBuf>,
}

impl Tls {
    fn config(&self) -> anyhow::Result<Option<rustls::ClientConfig>> {
        self.certificate_authority
            .as_deref()
            .map(http::trust_only)
            .transpose()
    }
}

/// `2025-01-31 12:00:00 UTC`.
fn when(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| unix.to_string())
}

async fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Attach {
            name,
            namespace,
            observe,
            gateway,
            token_file,
            token,
            tls,
        } => {
            let tls = tls.config()?;
            let credentials = match (token_file, token) {
                (Some(f), _) => Credentials::Fixed(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("reading {}", f.display()))?
                        .trim()
                        .to_owned(),
                ),
                (None, Some(t)) => Credentials::Fixed(t),
                (None, None) => {
                    let http = http::client(tls.as_ref())?;
                    let cache = Cache::from_env()?;
                    let provider =
                        match provider_for(&http, &cache, Some(&gateway), None, None).await {
                            Ok(p) => p,
                            Err(e) if e.is::<NoOidc>() => return Err(e),
                            Err(e) => anyhow::bail!("{}\n({e:#})", not_signed_in(&gateway)),
                        };
                    // A cached sign-in goes only to a gateway it was made for: any gateway
                    // could name the company's provider and collect its users' tokens.
                    match cache.gateway_provider(&gateway)? {
                        Some(p) if p.issuer == provider.issuer => {}
                        _ => anyhow::bail!(
                            "{} (no sign-in was made for this gateway)",
                            not_signed_in(&gateway)
                        ),
                    }
                    Credentials::SignIn(SignIn {
                        http,
                        cache,
                        provider,
                        gateway: Some(gateway.clone()),
                    })
                }
            };
            attach::run(AttachOptions {
                namespace: namespace.unwrap_or_else(kubeconfig::default_namespace),
                gateway,
                name,
                observe,
                credentials,
                tls,
            })
            .await
        }
        Command::Login {
            provider,
            device,
            no_browser,
            listen_port,
            scopes,
            tls,
        } => {
            let http = http::client(tls.config()?.as_ref())?;
            let cache = Cache::from_env()?;
            let p = resolve(&http, &cache, &provider).await?;
            let entry = login::login(
                &http,
                &p,
                &LoginOptions {
                    device,
                    open_browser: !no_browser,
                    listen_port,
                    scopes,
                },
            )
            .await?;
            let path = cache.store(&entry)?;
            if let Some(g) = &provider.gateway {
                cache.remember_gateway(g, &p)?;
            }
            eprintln!(
                "Signed in to {} as {}; the ID token is valid until {}{}. Kept in {}.",
                p.issuer,
                entry.who().unwrap_or_else(|| "?".into()),
                when(entry.expiry),
                if entry.refresh_token.is_some() {
                    " and is refreshed when it runs out"
                } else {
                    ""
                },
                path.display()
            );
            Ok(0)
        }
        Command::Logout { provider, tls } => {
            let http = http::client(tls.config()?.as_ref())?;
            let cache = Cache::from_env()?;
            let p = resolve(&http, &cache, &provider).await?;
            match cache.remove(&p)? {
                Some(path) => eprintln!("Signed out of {} ({} removed).", p.issuer, path.display()),
                None => eprintln!("Not signed in to {} as {}.", p.issuer, p.client_id),
            }
            Ok(0)
        }
        Command::Status { provider, tls } => {
            let http = http::client(tls.config()?.as_ref())?;
            let cache = Cache::from_env()?;
            let p = resolve(&http, &cache, &provider).await?;
            let signin = SignIn {
                http,
                cache,
                provider: p.clone(),
                gateway: provider.gateway.clone(),
            };
            let (entry, source) = signin.entry().await?;
            println!(
                "signed in to {} as {}; valid until {}{}",
                p.issuer,
                entry.who().unwrap_or_else(|| "?".into()),
                when(entry.expiry),
                match source {
                    Source::Refreshed => " (refreshed just now)",
                    Source::Cached => "",
                }
            );
            Ok(0)
        }
    }
}

async fn resolve(
    http: &openidconnect::reqwest::Client,
    cache: &Cache,
    args: &ProviderArgs,
) -> anyhow::Result<Provider> {
    provider_for(
        http,
        cache,
        args.gateway.as_deref(),
        args.issuer.as_deref(),
        args.client_id.as_deref(),
    )
    .await
}

fn main() -> std::process::ExitCode {
    // Restore the terminal even when something panics.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = crossterm::terminal::disable_raw_mode();
        default_hook(info);
    }));
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubectl-tether: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli.command));
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
    match result {
        Ok(code) => {
            let _ = std::io::stdout().flush();
            std::process::ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("\r\nkubectl-tether: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
