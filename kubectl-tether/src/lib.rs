//! `kubectl tether`: Tether terminal sessions from the command line.
//!
//! - [`attach`]: a session in your own terminal through the gateway, resumed across lost
//!   connections;
//! - [`login`]: signing in with the gateway's OIDC provider from a terminal (loopback redirect
//!   with PKCE, or the device authorization grant) and refreshing that sign-in;
//! - [`loopback`]: the one-shot `http://127.0.0.1:<port>/callback` listener of the redirect;
//! - [`cache`]: the sign-ins under the kubeconfig cache directory, mode 0600 in a 0700 folder;
//! - [`signin`]: which token a command uses;
//! - [`http`]: TLS trust, the HTTP client, the gateway's `/api/auth`;
//! - [`kubeconfig`]: the current context's namespace.
//!
//! The plugin links neither the gateway nor a Kubernetes client: it only speaks HTTP and the
//! `tether.v2` protocol to the gateway, and OIDC to the provider.
#![forbid(unsafe_code)]

pub mod attach;
pub mod cache;
pub mod http;
pub mod kubeconfig;
pub mod login;
pub mod loopback;
pub mod signin;
