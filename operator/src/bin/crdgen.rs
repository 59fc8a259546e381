//! Prints the CRDs of Tether as YAML: `cargo run --bin crdgen > crds/terminalsessions.yaml`.
#![forbid(unsafe_code)]

fn main() {
    print!("{}", tether_operator::crd_yaml());
}
