//! Small boot images for tests and benchmarks: a busybox initramfs with an `/init`
//! script of your choice, and the kernel that `scripts/test.sh` fetches (Debian's cloud
//! kernel, extracted without installing it).

use std::path::{Path, PathBuf};

use crate::cpio::{Entry, newc_archive};

/// Where `scripts/test.sh` puts the test kernel.
pub const KERNEL_CACHE: &str = "/var/cache/verge-test/boot";

/// The test kernel: `$VERGE_TEST_KERNEL`, else a `vmlinuz*` in [`KERNEL_CACHE`].
pub fn test_kernel() -> Result<PathBuf, String> {
    if let Some(k) = std::env::var_os("VERGE_TEST_KERNEL") {
        return Ok(PathBuf::from(k));
    }
    std::fs::read_dir(KERNEL_CACHE)
        .ok()
        .and_then(|d| {
            d.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
            })
        })
        .ok_or_else(|| {
            format!(
                "no kernel to boot: run ./scripts/test.sh (it fetches one into {KERNEL_CACHE}) or set VERGE_TEST_KERNEL"
            )
        })
}

/// Write an initramfs to `path` holding a static busybox (`/bin/busybox`, from Debian's
/// busybox-static) and `init` as `/init`.
pub fn busybox_initrd(path: &Path, init: &str) -> Result<(), String> {
    let busybox = std::fs::read("/bin/busybox")
        .map_err(|e| format!("/bin/busybox: {e} (apt-get install busybox-static)"))?;
    let archive = newc_archive(&[
        Entry {
            path: "bin",
            mode: 0o040755,
            data: b"",
        },
        Entry {
            path: "bin/busybox",
            mode: 0o100755,
            data: &busybox,
        },
        Entry {
            path: "init",
            mode: 0o100755,
            data: init.as_bytes(),
        },
    ]);
    std::fs::write(path, archive).map_err(|e| format!("{}: {e}", path.display()))
}

/// An `/init` that prints `marker` on the console, then ticks once a second.
pub fn marker_init(marker: &str) -> String {
    format!(
        "#!/bin/busybox sh\n/bin/busybox echo {marker}\nwhile true; do /bin/busybox echo tick; /bin/busybox sleep 1; done\n"
    )
}
