//! Placeholder until this component lands.
#![forbid(unsafe_code)]

fn main() {}
