//! Link `verge` as a position-dependent executable on Linux. A PIE of this size carries
//! about 0.8 MB of relocations that the loader reads and 0.6 MB of pointers it
//! rewrites at every start, and those pages stay in every process's resident set: the
//! edge agent's included, whose idle memory target is 10 MiB (docs/BENCHMARKS.md).
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
