//! Records the target triple grenache-host is built for: a build without the
//! compiler names it in the `compile --target` command its errors suggest.
fn main() {
    let target = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
    println!("cargo:rustc-env=GRENACHE_HOST_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
