//! A content-addressed blob directory.
//!
//! ```text
//! ROOT/blobs/sha256/HEX      a blob, read-only, named by the SHA-256 of its content
//! ROOT/blobs/tmp/            blobs being written (renamed into place once verified;
//!                            cleared when the cache's writer starts)
//! ROOT/refs/KIND/NAME        a reference (an image or artifact name) -> a digest
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{ArtifactError, digest_hex};

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reference name as a file name (registry references hold `/` and `:`).
fn ref_file_name(reference: &str) -> String {
    reference
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A content-addressed blob directory (see the module docs for its layout).
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// The cache under `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(p: &Path) -> impl Fn(std::io::Error) -> ArtifactError + '_ {
        move |e| ArtifactError::Io(p.to_path_buf(), e)
    }

    fn blobs(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &str) -> Result<PathBuf, ArtifactError> {
        let hex = digest_hex(digest).ok_or_else(|| ArtifactError::BadDigest(digest.into()))?;
        Ok(self.blobs().join(hex))
    }

    /// The blob `digest`, if the cache has it.
    pub fn get(&self, digest: &str) -> Option<PathBuf> {
        self.path(digest).ok().filter(|p| p.is_file())
    }

    /// Remove blobs left half-written by a process that died while writing. Call it
    /// when nothing writes yet (the cache's only writer starting up).
    pub fn clear_partial(&self) {
        let tmp = self.root.join("blobs").join("tmp");
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }

    /// Start writing a blob (of unknown digest until [`BlobWriter::finish`]).
    pub fn writer(&self, what: &str, limit: u64) -> Result<BlobWriter, ArtifactError> {
        let tmp_dir = self.root.join("blobs").join("tmp");
        std::fs::create_dir_all(&tmp_dir).map_err(Self::io(&tmp_dir))?;
        std::fs::create_dir_all(self.blobs()).map_err(Self::io(&self.blobs()))?;
        let tmp = tmp_dir.join(format!(
            "{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&tmp).map_err(Self::io(&tmp))?;
        Ok(BlobWriter {
            cache: self.clone(),
            what: what.to_string(),
            file: std::io::BufWriter::with_capacity(256 << 10, file),
            tmp,
            hash: Sha256::new(),
            size: 0,
            limit,
            done: false,
        })
    }

    /// Store `data`; with `expected`, only if it hashes to it. Returns its digest.
    pub fn put(
        &self,
        what: &str,
        data: &[u8],
        expected: Option<&str>,
    ) -> Result<String, ArtifactError> {
        let mut w = self.writer(what, u64::MAX)?;
        w.write(data)?;
        w.finish(expected)
    }

    /// Every blob: digest and size, sorted by digest.
    pub fn list(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = std::fs::read_dir(self.blobs())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let digest = format!("sha256:{}", e.file_name().to_string_lossy());
                digest_hex(&digest)?;
                Some((digest, e.metadata().ok()?.len()))
            })
            .collect();
        out.sort();
        out
    }

    /// Remove a blob; whether it was there.
    pub fn remove(&self, digest: &str) -> Result<bool, ArtifactError> {
        let p = self.path(digest)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ArtifactError::Io(p, e)),
        }
    }

    fn ref_path(&self, kind: &str, name: &str) -> PathBuf {
        self.root.join("refs").join(kind).join(ref_file_name(name))
    }

    /// What reference `name` of `kind` (e.g. `images`, `files`) resolved to when it was
    /// last pulled.
    pub fn reference(&self, kind: &str, name: &str) -> Option<String> {
        std::fs::read_to_string(self.ref_path(kind, name))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|d| digest_hex(d).is_some())
    }

    /// Remember that reference `name` of `kind` resolves to `digest`.
    pub fn set_reference(&self, kind: &str, name: &str, digest: &str) -> Result<(), ArtifactError> {
        let p = self.ref_path(kind, name);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
        }
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, digest).map_err(Self::io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(Self::io(&p))
    }
}

/// What a collection found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Bytes the cache held before.
    pub used_before: u64,
    /// Bytes it holds now.
    pub used: u64,
    /// Blobs and unpacked images removed.
    pub removed: Vec<String>,
}

/// Bytes under `p` (files and links, not following links).
fn tree_size(p: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !m.is_dir() {
        return m.len();
    }
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| tree_size(&e.path()))
        .sum()
}

fn modified(p: &Path) -> std::time::SystemTime {
    std::fs::symlink_metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH)
}

impl Cache {
    /// Bring the cache under `budget` bytes by removing what nothing needs: blobs not
    /// in `keep_blobs` and unpacked images (`ROOT/images/HEX`, the container driver's)
    /// not in `keep_images` (digests), oldest first. What is kept is never removed,
    /// even over budget: it is what the node needs to restart its workloads offline.
    /// References to what was removed are dropped. Blobs being written are not seen.
    pub fn collect(
        &self,
        keep_blobs: &std::collections::HashSet<String>,
        keep_images: &std::collections::HashSet<String>,
        budget: u64,
    ) -> Collected {
        let images = self.root.join("images");
        let mut entries: Vec<(std::time::SystemTime, String, PathBuf, u64, bool)> = Vec::new();
        for (digest, size) in self.list() {
            let path = self.blobs().join(digest_hex(&digest).unwrap_or_default());
            entries.push((
                modified(&path),
                digest.clone(),
                path,
                size,
                keep_blobs.contains(&digest),
            ));
        }
        for e in std::fs::read_dir(&images).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            if digest_hex(&digest).is_none() {
                continue; // partial unpacks and the like belong to their writer
            }
            let path = e.path();
            let keep = keep_images.contains(&digest);
            entries.push((
                modified(&path),
                digest,
                path.clone(),
                tree_size(&path),
                keep,
            ));
        }
        let used_before: u64 = entries.iter().map(|e| e.3).sum();
        let mut used = used_before;
        let mut removed = Vec::new();
        entries.sort_by_key(|e| e.0);
        for (_, digest, path, size, keep) in entries {
            if used <= budget {
                break;
            }
            if keep {
                continue;
            }
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if gone.is_ok() {
                used = used.saturating_sub(size);
                removed.push(digest);
            }
        }
        if !removed.is_empty() {
            self.drop_references_to(&removed);
        }
        Collected {
            used_before,
            used,
            removed,
        }
    }

    fn drop_references_to(&self, removed: &[String]) {
        let refs = self.root.join("refs");
        for kind in std::fs::read_dir(&refs).into_iter().flatten().flatten() {
            for r in std::fs::read_dir(kind.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let target = std::fs::read_to_string(r.path()).unwrap_or_default();
                if removed.iter().any(|d| d == target.trim()) {
                    let _ = std::fs::remove_file(r.path());
                }
            }
        }
    }
}

static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A blob being written: hashed as it goes, put in place by [`finish`](Self::finish)
/// only when complete and (if a digest was expected) matching. Dropped unfinished, it
/// leaves nothing behind.
pub struct BlobWriter {
    cache: Cache,
    what: String,
    file: std::io::BufWriter<std::fs::File>,
    tmp: PathBuf,
    hash: Sha256,
    size: u64,
    limit: u64,
    done: bool,
}

impl BlobWriter {
    /// Append bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ArtifactError> {
        self.size += data.len() as u64;
        if self.size > self.limit {
            return Err(ArtifactError::TooLarge {
                what: self.what.clone(),
                limit: self.limit,
            });
        }
        self.hash.update(data);
        self.file
            .write_all(data)
            .map_err(|e| ArtifactError::Io(self.tmp.clone(), e))
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Verify against `expected` (if given) and put the blob in place; its digest.
    pub fn finish(mut self, expected: Option<&str>) -> Result<String, ArtifactError> {
        let actual = format!("sha256:{}", hex(&std::mem::take(&mut self.hash).finalize()));
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(ArtifactError::Digest {
                what: self.what.clone(),
                expected: expected.to_string(),
                actual,
            });
        }
        let io = |e| ArtifactError::Io(self.tmp.clone(), e);
        self.file.flush().map_err(io)?;
        self.file.get_ref().sync_all().map_err(io)?;
        let mut perms = self.file.get_ref().metadata().map_err(io)?.permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&self.tmp, perms).map_err(io)?;
        let dest = self.cache.path(&actual)?;
        std::fs::rename(&self.tmp, &dest).map_err(|e| ArtifactError::Io(dest.clone(), e))?;
        self.done = true;
        Ok(actual)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_stays_under_budget_and_never_removes_what_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::new(dir.path());
        let wanted = c.put("wanted", &[1u8; 4000], None).unwrap();
        let old = c.put("old", &[2u8; 4000], None).unwrap();
        let newer = c.put("newer", &[3u8; 4000], None).unwrap();
        c.set_reference("files", "registry/old:1", &old).unwrap();
        // An unpacked image nobody wants, and one that is wanted.
        let img = |hex: &str| {
            let d = dir.path().join("images").join(hex).join("rootfs");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("bin"), [0u8; 3000]).unwrap();
            format!("sha256:{hex}")
        };
        let stale_image = img(&"a".repeat(64));
        let live_image = img(&"b".repeat(64));
        let keep_blobs = [wanted.clone()].into_iter().collect();
        let keep_images = [live_image.clone()].into_iter().collect();
        // Under budget: nothing goes.
        let r = c.collect(&keep_blobs, &keep_images, 1 << 20);
        assert!(r.removed.is_empty());
        assert_eq!(r.used, 18_000);
        // Over budget: unwanted things go until it fits; wanted ones stay even at 0.
        let r = c.collect(&keep_blobs, &keep_images, 0);
        assert_eq!(r.used, 7000, "{r:?}");
        for gone in [&old, &newer, &stale_image] {
            assert!(r.removed.contains(gone), "{r:?}");
        }
        assert!(c.get(&wanted).is_some());
        assert!(dir.path().join("images").join("b".repeat(64)).is_dir());
        assert_eq!(
            c.reference("files", "registry/old:1"),
            None,
            "its reference went with it"
        );
    }

    #[test]
    fn blobs_are_kept_by_digest_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::new(dir.path());
        let d = c.put("greeting", b"hello", None).unwrap();
        assert_eq!(d, format!("sha256:{}", sha256_hex(b"hello")));
        assert_eq!(std::fs::read(c.get(&d).unwrap()).unwrap(), b"hello");
        assert!(
            c.get(&d)
                .unwrap()
                .metadata()
                .unwrap()
                .permissions()
                .readonly()
        );
        // Same content again: same blob.
        assert_eq!(c.put("again", b"hello", Some(&d)).unwrap(), d);
        // Wrong content for a digest: refused, nothing left behind.
        let err = c.put("forged", b"hellO", Some(&d)).unwrap_err();
        assert!(
            err.to_string().contains("does not match its digest"),
            "{err}"
        );
        assert_eq!(c.list(), vec![(d.clone(), 5)]);
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert!(c.remove(&d).unwrap());
        assert!(c.get(&d).is_none());
    }

    #[test]
    fn limits_and_bad_digests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::new(dir.path());
        let mut w = c.writer("big", 4).unwrap();
        assert!(matches!(
            w.write(b"12345"),
            Err(ArtifactError::TooLarge { .. })
        ));
        drop(w);
        let partial = || {
            std::fs::read_dir(dir.path().join("blobs/tmp"))
                .unwrap()
                .count()
        };
        assert_eq!(partial(), 0);
        // A writer that never finished because its process died.
        std::mem::forget(c.writer("crashed", 100).unwrap());
        assert_eq!(partial(), 1);
        c.clear_partial();
        assert_eq!(partial(), 0);
        for bad in [
            "sha256:abc",
            "md5:00",
            "sha256:../../../etc/passwd",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(
                matches!(c.path(bad), Err(ArtifactError::BadDigest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn references_map_names_to_digests() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::new(dir.path());
        let d = format!("sha256:{}", sha256_hex(b"x"));
        assert_eq!(c.reference("files", "reg:5000/a/b:1"), None);
        c.set_reference("files", "reg:5000/a/b:1", &d).unwrap();
        assert_eq!(c.reference("files", "reg:5000/a/b:1"), Some(d.clone()));
        assert_eq!(c.reference("images", "reg:5000/a/b:1"), None);
    }
}
