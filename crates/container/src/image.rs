//! The node's image cache: OCI images pulled from a registry, every blob verified
//! against its digest, kept content-addressed, and unpacked once per image.
//!
//! ```text
//! ROOT/blobs/sha256/HEX          layers, by digest (a verge_artifacts::Cache, shared
//!                                with the node's other artifacts)
//! ROOT/images/HEX/rootfs/        an image's unpacked layers (HEX: manifest digest)
//! ROOT/images/HEX/config.json    its image config
//! ROOT/refs/images/NAME          reference -> manifest digest
//! ```
//!
//! A reference found in `refs/` is used from the cache without asking the registry, so
//! a node cut off from everything can still restart every container it ran before.

use std::path::{Path, PathBuf};

use oci_client::secrets::RegistryAuth;
use verge_artifacts::{ArtifactError, Cache, Registry, digest_hex, sha256_hex};

use crate::unpack::{UnpackError, unpack_layer};

/// Image failures.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Fetching or verifying a blob failed (bad reference, registry error, digest
    /// mismatch).
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// A layer could not be unpacked safely.
    #[error("unpacking {0}: {1}")]
    Unpack(String, UnpackError),
    /// Cache i/o.
    #[error("image cache {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// What a container needs from its image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Image {
    /// The manifest digest.
    pub digest: String,
    /// The unpacked root filesystem (read-only: containers get an overlay on it).
    pub rootfs: PathBuf,
    /// `Entrypoint` of the image config.
    pub entrypoint: Vec<String>,
    /// `Cmd` of the image config.
    pub cmd: Vec<String>,
    /// `Env` of the image config (`K=V`).
    pub env: Vec<String>,
    /// `WorkingDir` of the image config.
    pub working_dir: String,
}

/// A gzipped tar layer holding `files` (path, mode, contents) and `symlinks`
/// (path, target): how tests and examples build small images without a container
/// engine.
pub fn layer_tar_gz(files: &[(&str, u32, &[u8])], symlinks: &[(&str, &str)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut dirs = std::collections::BTreeSet::new();
    let all = files
        .iter()
        .map(|f| f.0)
        .chain(symlinks.iter().map(|s| s.0));
    for p in all {
        let mut acc = PathBuf::new();
        if let Some(parent) = Path::new(p).parent() {
            for c in parent.components() {
                acc.push(c);
                dirs.insert(acc.clone());
            }
        }
    }
    let append = |b: &mut tar::Builder<_>, h: &mut tar::Header, path: &Path, data: &[u8]| {
        h.set_cksum();
        let _ = b.append_data(h, path, data);
    };
    for d in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        append(&mut b, &mut h, d, &[]);
    }
    for (path, mode, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        append(&mut b, &mut h, Path::new(path), data);
    }
    for (path, target) in symlinks {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        let _ = h.set_link_name(target);
        append(&mut b, &mut h, Path::new(path), &[]);
    }
    b.into_inner()
        .and_then(|gz| gz.finish())
        .unwrap_or_default()
}

/// The image cache of a node.
pub struct ImageStore {
    root: PathBuf,
    blobs: Cache,
    registry: Registry,
}

impl ImageStore {
    /// A cache under `root`; registries in `plain_http` are spoken to without TLS
    /// (a registry on loopback or a trusted site network). The process's rustls crypto
    /// provider must be installed first.
    pub fn new(root: PathBuf, plain_http: Vec<String>) -> Self {
        Self {
            blobs: Cache::new(&root),
            root,
            registry: Registry::new(plain_http),
        }
    }

    /// Push a one-layer image (`layer`: a gzipped tar; `config`: the image config's
    /// `config` object, e.g. `{"Cmd": [...]}`) to `reference`; returns the manifest URL.
    pub async fn push(
        &self,
        reference: &str,
        layer: Vec<u8>,
        config: serde_json::Value,
    ) -> Result<String, ImageError> {
        let r = Registry::parse(reference)?;
        let layer = oci_client::client::ImageLayer::new(
            layer,
            oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE.to_string(),
            None,
        );
        let diff_id = {
            let mut raw = Vec::new();
            let _ = std::io::Read::read_to_end(
                &mut flate2::read::GzDecoder::new(&layer.data[..]),
                &mut raw,
            );
            format!("sha256:{}", sha256_hex(&raw))
        };
        let full = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        });
        let config = oci_client::client::Config::new(
            serde_json::to_vec(&full).unwrap_or_default(),
            oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE.to_string(),
            None,
        );
        self.registry
            .client()
            .push(&r, &[layer], config, &RegistryAuth::Anonymous, None)
            .await
            .map(|p| p.manifest_url)
            .map_err(|e| ArtifactError::Registry(reference.into(), format!("push: {e}")).into())
    }

    fn io(&self, p: &Path) -> impl Fn(std::io::Error) -> ImageError + '_ {
        let p = p.to_path_buf();
        move |e| ImageError::Io(p.clone(), e)
    }

    fn load(&self, digest: &str) -> Option<Image> {
        let dir = self.root.join("images").join(digest_hex(digest)?);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
        let c = &config["config"];
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let rootfs = dir.join("rootfs");
        rootfs.is_dir().then(|| Image {
            digest: digest.to_string(),
            rootfs,
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or("").to_string(),
        })
    }

    /// The image for `reference`: from the cache when it was pulled before, else pulled,
    /// verified and unpacked.
    pub async fn ensure(&self, reference: &str) -> Result<Image, ImageError> {
        if let Some(img) = self
            .blobs
            .reference("images", reference)
            .and_then(|d| self.load(&d))
        {
            return Ok(img);
        }
        let r = Registry::parse(reference)?;
        let pull =
            |e: &dyn std::fmt::Display| ArtifactError::Registry(reference.into(), e.to_string());
        let (manifest, digest, config) = self
            .registry
            .client()
            .pull_manifest_and_config(&r, &RegistryAuth::Anonymous)
            .await
            .map_err(|e| pull(&e))?;
        let hex = digest_hex(&digest)
            .ok_or_else(|| pull(&format!("unexpected manifest digest {digest:?}")))?
            .to_string();
        let config_digest = format!("sha256:{}", sha256_hex(config.as_bytes()));
        if config_digest != manifest.config.digest {
            return Err(ArtifactError::Digest {
                what: format!("the config of {reference}"),
                expected: manifest.config.digest.clone(),
                actual: config_digest,
            }
            .into());
        }
        let mut layer_files = Vec::new();
        for (i, layer) in manifest.layers.iter().enumerate() {
            let what = format!("layer {i} of {reference}");
            let path = self
                .registry
                .pull_blob(&self.blobs, &r, layer, &what)
                .await?;
            layer_files.push((path, layer.media_type.clone()));
        }
        let images = self.root.join("images");
        let dir = images.join(&hex);
        if !dir.join("rootfs").is_dir() {
            let tmp = images.join(format!("{hex}.partial-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let rootfs = tmp.join("rootfs");
            std::fs::create_dir_all(&rootfs).map_err(self.io(&rootfs))?;
            for (path, media_type) in &layer_files {
                let f = std::fs::File::open(path).map_err(self.io(path))?;
                let skipped = if media_type.ends_with("gzip") {
                    unpack_layer(&rootfs, flate2::read::GzDecoder::new(f))
                } else {
                    unpack_layer(&rootfs, f)
                }
                .map_err(|e| ImageError::Unpack(reference.into(), e))?;
                if !skipped.special.is_empty() {
                    tracing::warn!(image = reference, entries = ?skipped.special, "device nodes and FIFOs in a layer were not created");
                }
            }
            std::fs::write(tmp.join("config.json"), config.as_bytes()).map_err(self.io(&tmp))?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).map_err(self.io(&dir))?;
        }
        self.blobs.set_reference("images", reference, &digest)?;
        tracing::info!(image = reference, %digest, "image pulled and unpacked");
        self.load(&digest)
            .ok_or_else(|| pull(&"the unpacked image is incomplete").into())
    }
}
