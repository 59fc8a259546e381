//! Rebuild when the page's built assets change. rust-embed cannot track a folder that did not
//! exist at the previous build, so while `web/dist` is missing we watch `web/` (its mtime changes
//! when `dist/` appears) and never fail: clippy runs on fresh clones without npm.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if Path::new("web/dist").exists() {
        println!("cargo:rerun-if-changed=web/dist");
    } else if Path::new("web").exists() {
        println!("cargo:rerun-if-changed=web");
    }
}
