//! Unpacking image layers safely. A layer is untrusted input: it must not write outside
//! the root it is unpacked into (no absolute paths, no `..`, no writing through a
//! symlink a layer planted earlier), must not create device nodes or FIFOs, and its
//! whiteouts (`.wh.NAME` deletes NAME from lower layers, `.wh..wh..opq` empties a
//! directory) are applied, not copied.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry would land outside the root.
    #[error("layer entry {0:?} escapes the image root")]
    Escape(String),
    /// Reading the archive or writing the file failed.
    #[error("unpacking {path:?}: {source}")]
    Io {
        /// The entry.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What unpacking skipped, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Device nodes and FIFOs (never created from an untrusted layer).
    pub special: Vec<String>,
}

/// The entry's path inside `root`, refusing anything that could leave it.
fn inside(root: &Path, raw: &Path) -> Result<PathBuf, UnpackError> {
    let mut out = root.to_path_buf();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return Err(UnpackError::Escape(raw.display().to_string())),
        }
    }
    // No existing ancestor may be a symlink: writing through one could leave the root.
    let mut at = root.to_path_buf();
    if let Ok(rel) = out.strip_prefix(root) {
        let parts: Vec<_> = rel.components().collect();
        for c in parts.iter().take(parts.len().saturating_sub(1)) {
            at.push(c);
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(UnpackError::Escape(raw.display().to_string()));
            }
        }
    }
    Ok(out)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Unpack one layer (a tar stream, already decompressed) over `root`.
pub fn unpack_layer(root: &Path, layer: impl Read) -> Result<Skipped, UnpackError> {
    let mut skipped = Skipped::default();
    let mut archive = tar::Archive::new(layer);
    let entries = archive.entries().map_err(io(root))?;
    for entry in entries {
        let mut entry = entry.map_err(io(root))?;
        let raw = entry.path().map_err(io(root))?.into_owned();
        let name = raw.file_name().map(|n| n.to_string_lossy().into_owned());
        let target = inside(root, &raw)?;
        // Whiteouts.
        if let Some(n) = &name {
            if n == ".wh..wh..opq" {
                if let Some(dir) = target.parent()
                    && let Ok(list) = std::fs::read_dir(dir)
                {
                    for e in list.flatten() {
                        remove_any(&e.path());
                    }
                }
                continue;
            }
            if let Some(hidden) = n.strip_prefix(".wh.") {
                remove_any(&target.with_file_name(hidden));
                continue;
            }
        }
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            skipped.special.push(raw.display().to_string());
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io(&raw))?;
        }
        if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(io(&raw))?
                .ok_or_else(|| UnpackError::Escape(raw.display().to_string()))?
                .into_owned();
            let source = inside(root, &link)?;
            remove_any(&target);
            std::fs::hard_link(&source, &target).map_err(io(&raw))?;
            continue;
        }
        // A later layer replaces what an earlier one had there (but keeps directories).
        if !kind.is_dir() {
            remove_any(&target);
        }
        // `unpack` writes this entry only (symlink targets are stored, never followed),
        // with its mode; ownership stays with the unpacking user.
        entry.set_preserve_permissions(true);
        entry.set_unpack_xattrs(false);
        entry.unpack(&target).map_err(io(&raw))?;
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().expect("tar")
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // set_path refuses `..`; write the raw name like a hostile layer would.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).expect("append");
    }

    fn special(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        link: Option<&str>,
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_entry_type(kind);
        h.set_path(path).expect("path");
        if let Some(l) = link {
            h.set_link_name(l).expect("link");
        }
        h.set_cksum();
        b.append(&h, &[][..]).expect("append");
    }

    #[test]
    fn layers_stack_with_whiteouts_and_hostile_entries_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(&root).expect("root");
        let base = layer(|b| {
            file(b, "etc/keep", b"keep");
            file(b, "etc/gone", b"gone");
            file(b, "var/cache/a", b"a");
            special(b, "dev/evil", tar::EntryType::Char, None);
        });
        let s = unpack_layer(&root, &base[..]).expect("base");
        assert_eq!(s.special, vec!["dev/evil".to_string()]);
        assert!(!root.join("dev/evil").exists(), "no device nodes");
        let top = layer(|b| {
            file(b, "etc/.wh.gone", b"");
            file(b, "var/cache/.wh..wh..opq", b"");
            file(b, "var/cache/b", b"b");
            file(b, "etc/keep", b"new");
        });
        unpack_layer(&root, &top[..]).expect("top");
        assert!(!root.join("etc/gone").exists(), "whiteout");
        assert!(!root.join("var/cache/a").exists(), "opaque dir emptied");
        assert_eq!(std::fs::read(root.join("var/cache/b")).expect("b"), b"b");
        assert_eq!(std::fs::read(root.join("etc/keep")).expect("keep"), b"new");

        let escape = layer(|b| file(b, "../outside", b"x"));
        assert!(matches!(
            unpack_layer(&root, &escape[..]),
            Err(UnpackError::Escape(_))
        ));
        assert!(!dir.path().join("outside").exists());
        // A symlink to outside, then a file "through" it.
        let through = layer(|b| {
            special(b, "link", tar::EntryType::Symlink, Some("/tmp"));
            file(b, "link/planted", b"x");
        });
        assert!(matches!(
            unpack_layer(&root, &through[..]),
            Err(UnpackError::Escape(_))
        ));
        assert!(!Path::new("/tmp/planted").exists());
        let hard = layer(|b| special(b, "h", tar::EntryType::Link, Some("../../etc/passwd")));
        assert!(matches!(
            unpack_layer(&root, &hard[..]),
            Err(UnpackError::Escape(_))
        ));
    }
}
