//! Writing `newc` cpio archives, the format of a Linux initramfs, so that a tiny
//! bootable initrd (busybox and an `/init` script) can be built without any tool on
//! the node.

/// One file in the archive.
pub struct Entry<'a> {
    /// Path inside the archive, without a leading `/` (e.g. `bin/busybox`).
    pub path: &'a str,
    /// File mode including the type bits (`0o100755` for an executable file,
    /// `0o040755` for a directory).
    pub mode: u32,
    /// Contents (empty for directories).
    pub data: &'a [u8],
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, name: &str) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        size as u32,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// The archive of `entries` (parents must come before their children).
pub fn newc_archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        header(&mut out, i as u32 + 1, e.mode, e.data.len(), e.path);
        out.extend_from_slice(e.data);
        pad4(&mut out);
    }
    header(&mut out, 0, 0, 0, "TRAILER!!!");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_aligned_and_the_archive_ends_with_a_trailer() {
        let a = newc_archive(&[
            Entry {
                path: "bin",
                mode: 0o040755,
                data: b"",
            },
            Entry {
                path: "init",
                mode: 0o100755,
                data: b"#!/bin/sh\n",
            },
        ]);
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("init\0") && text.contains("TRAILER!!!\0"));
        // The second header starts right after the padded first entry.
        let second = 116; // 110-byte header + "bin\0", padded to 4
        assert_eq!(&a[second..second + 6], b"070701");
    }
}
