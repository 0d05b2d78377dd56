//! `keygate --version` shows the git commit it was built from, like the
//! filter's start-up log line; `make` passes it as KEYGATE_GIT_HASH.
fn main() {
    println!("cargo:rerun-if-env-changed=KEYGATE_GIT_HASH");
    let commit = std::env::var("KEYGATE_GIT_HASH").unwrap_or_else(|_| "unknown".to_owned());
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rustc-env=KEYGATE_LONG_VERSION={version} ({commit})");
}
