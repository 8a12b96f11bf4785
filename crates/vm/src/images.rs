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

/// The modules a guest of the test kernel loads to see virtio disks, in the order
/// they load (virtio-blk is a module of Debian's kernels, not built in).
pub const VIRTIO_BLK_MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];

/// The test kernel's [`VIRTIO_BLK_MODULES`] (which `scripts/test.sh` extracts beside
/// it), as (name, contents).
pub fn virtio_blk_modules() -> Result<Vec<(String, Vec<u8>)>, String> {
    let kernel = test_kernel()?;
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .ok_or_else(|| format!("{}: not named vmlinuz-VERSION", kernel.display()))?
        .to_string();
    let root = Path::new(KERNEL_CACHE)
        .with_file_name("lib/modules")
        .join(&version)
        .join("kernel/drivers");
    VIRTIO_BLK_MODULES
        .iter()
        .map(|m| {
            let sub = if *m == "virtio_blk" {
                "block"
            } else {
                "virtio"
            };
            let p = root.join(sub).join(format!("{m}.ko"));
            std::fs::read(&p)
                .map(|b| (format!("{m}.ko"), b))
                .map_err(|e| format!("{}: {e} (./scripts/test.sh extracts it)", p.display()))
        })
        .collect()
}

/// Write an initramfs to `path` holding a static busybox (`/bin/busybox`, from Debian's
/// busybox-static) and `init` as `/init`.
pub fn busybox_initrd(path: &Path, init: &str) -> Result<(), String> {
    busybox_initrd_with(path, init, &[])
}

/// [`busybox_initrd`] with `files` (name, contents) in `/files/`: kernel modules the
/// init loads, for one.
pub fn busybox_initrd_with(
    path: &Path,
    init: &str,
    files: &[(String, Vec<u8>)],
) -> Result<(), String> {
    let busybox = std::fs::read("/bin/busybox")
        .map_err(|e| format!("/bin/busybox: {e} (apt-get install busybox-static)"))?;
    let names: Vec<String> = files.iter().map(|(n, _)| format!("files/{n}")).collect();
    let mut entries = vec![
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
        Entry {
            path: "files",
            mode: 0o040755,
            data: b"",
        },
    ];
    entries.extend(files.iter().zip(&names).map(|((_, data), path)| Entry {
        path,
        mode: 0o100644,
        data,
    }));
    let archive = newc_archive(&entries);
    std::fs::write(path, archive).map_err(|e| format!("{}: {e}", path.display()))
}

/// An `/init` that prints `marker` on the console, then ticks once a second.
pub fn marker_init(marker: &str) -> String {
    format!(
        "#!/bin/busybox sh\n/bin/busybox echo {marker}\nwhile true; do /bin/busybox echo tick; /bin/busybox sleep 1; done\n"
    )
}

/// A raw disk image (1 MiB) whose boot sector prints `marker` on the first serial port
/// and halts: the smallest thing a BIOS boots from a disk, for testing disk boots.
pub fn boot_sector_disk(path: &Path, marker: &str) -> Result<(), String> {
    // 16-bit real mode at 0x7c00:
    //   cli; xor ax,ax; mov ds,ax; mov si,msg; mov dx,0x3f8
    //   next: lodsb; test al,al; jz done; out dx,al; jmp next
    //   done: hlt; jmp done
    //   msg: marker, "\r\n", 0
    const CODE: [u8; 22] = [
        0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0xbe, 0x16, 0x7c, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74,
        0x03, 0xee, 0xeb, 0xf8, 0xf4, 0xeb, 0xfd,
    ];
    let msg = format!("{marker}\r\n\0");
    if CODE.len() + msg.len() > 510 {
        return Err(format!("marker {marker:?} does not fit in a boot sector"));
    }
    let mut disk = vec![0u8; 1 << 20];
    disk[..CODE.len()].copy_from_slice(&CODE);
    disk[CODE.len()..CODE.len() + msg.len()].copy_from_slice(msg.as_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    std::fs::write(path, disk).map_err(|e| format!("{}: {e}", path.display()))
}
