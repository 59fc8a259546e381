//! The ground Tether's tests stand on: a real Kubernetes control plane built from its Go
//! modules and run on loopback, temporary namespaces, and the `cargo dev` commands.
//!
//! ```no_run
//! # async fn example() {
//! let cp = tether_e2e::ControlPlane::shared().await;
//! cp.install_crds().await;
//! let ns = cp.namespace("demo").await;
//! let admin = cp.admin_client().await;
//! # let _ = (ns, admin);
//! # }
//! ```

pub mod binaries;
pub mod cluster;
pub mod controlplane;
pub mod idp;
pub mod images;
pub mod namespace;
pub mod node;
pub mod pki;
pub mod process;
pub mod realnode;
pub mod stack;
pub mod terminal;
pub mod wait;

pub use controlplane::{ControlPlane, Options, client_from_kubeconfig, free_port, install_crds};
pub use namespace::TestNamespace;
