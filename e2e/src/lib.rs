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

/// The major and minor version in `tmux -V`'s answer (`tmux 3.8`, `tmux 3.3a`, `tmux next-3.9`).
pub fn tmux_version(answer: &str) -> Option<(u32, u32)> {
    let v = answer.trim().rsplit([' ', '-']).next()?;
    let (major, rest) = v.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tmux_versions_are_read_with_their_letters_and_prefixes() {
        use super::tmux_version as v;
        assert_eq!(v("tmux 3.8\n"), Some((3, 8)));
        assert_eq!(v("tmux 3.3a"), Some((3, 3)));
        assert_eq!(v("tmux next-3.10"), Some((3, 10)));
        assert_eq!(v("tmux master"), None);
    }
}
