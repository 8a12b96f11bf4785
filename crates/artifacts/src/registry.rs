//! OCI registries: single-file artifacts (a manifest with exactly one layer, the way
//! Wasm components are published) pulled into a [`Cache`] and pushed from files, and
//! the shared client the container driver pulls images with.
//!
//! A reference pulled once is remembered in the cache (`refs/files/NAME`) and used
//! from there without asking the registry again, so a node cut off from everything can
//! still restart what it ran before (the `IfNotPresent` policy; pin by digest,
//! `...@sha256:...`, to be exact).

use std::path::{Path, PathBuf};

use crate::{ArtifactError, Cache};

/// The media type of a Wasm component layer (the CNCF Wasm OCI artifact layout).
pub const WASM_LAYER: &str = "application/wasm";
/// The config media type of a Wasm artifact.
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// The media type of any other single file Verge publishes.
pub const FILE_LAYER: &str = "application/vnd.verge.file.v1";
/// The empty config of a generic OCI artifact.
pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

/// Largest single-file artifact pulled (VM disk images included).
pub const MAX_FILE: u64 = 64 << 30;

/// A configuration for Debian's `docker-registry` serving from `storage` on `addr`
/// (what tests and `verge bench runtime` start on loopback).
pub fn registry_config(storage: &Path, addr: &str) -> String {
    format!(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
        storage.display()
    )
}

/// An OCI registry client (made at first use: an idle agent should not carry an HTTP
/// client, its TLS roots and connection pool).
pub struct Registry {
    #[cfg_attr(not(feature = "oci"), allow(dead_code))]
    plain_http: Vec<String>,
    #[cfg(feature = "oci")]
    client: std::sync::OnceLock<oci_client::Client>,
}

impl Registry {
    /// Registries in `plain_http` (`HOST:PORT`) are spoken to without TLS (one on
    /// loopback or a trusted site network). The process's rustls crypto provider must be
    /// installed before the first pull.
    pub fn new(plain_http: Vec<String>) -> Self {
        Self {
            plain_http,
            #[cfg(feature = "oci")]
            client: std::sync::OnceLock::new(),
        }
    }

    /// Whether this build can reach registries at all.
    pub fn supported() -> bool {
        cfg!(feature = "oci")
    }
}

#[cfg(not(feature = "oci"))]
impl Registry {
    /// Without the `oci` feature: refused with what to do instead.
    pub async fn pull_file(
        &self,
        _cache: &Cache,
        reference: &str,
    ) -> Result<PathBuf, ArtifactError> {
        Err(ArtifactError::NoRegistry(reference.to_string()))
    }

    /// Without the `oci` feature: refused with what to do instead.
    pub async fn push_file(
        &self,
        reference: &str,
        _data: Vec<u8>,
    ) -> Result<String, ArtifactError> {
        Err(ArtifactError::NoRegistry(reference.to_string()))
    }
}

#[cfg(feature = "oci")]
impl Registry {
    /// The client.
    pub fn client(&self) -> &oci_client::Client {
        use oci_client::client::{ClientConfig, ClientProtocol};
        self.client.get_or_init(|| {
            let protocol = if self.plain_http.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(self.plain_http.clone())
            };
            oci_client::Client::new(ClientConfig {
                protocol,
                ..Default::default()
            })
        })
    }

    /// Parse a reference, saying what is wrong with it.
    pub fn parse(reference: &str) -> Result<oci_client::Reference, ArtifactError> {
        reference.parse().map_err(|e: oci_client::ParseError| {
            ArtifactError::Reference(reference.into(), e.to_string())
        })
    }

    /// Download blob `layer` of `r` into `cache` (streamed, verified against its
    /// digest); its path. A blob the cache has is not downloaded again.
    pub async fn pull_blob(
        &self,
        cache: &Cache,
        r: &oci_client::Reference,
        layer: &oci_client::manifest::OciDescriptor,
        what: &str,
    ) -> Result<PathBuf, ArtifactError> {
        use futures_util::StreamExt;
        if let Some(p) = cache.get(&layer.digest) {
            return Ok(p);
        }
        cache.path(&layer.digest)?;
        let failed =
            |e: &dyn std::fmt::Display| ArtifactError::Registry(r.whole(), format!("{what}: {e}"));
        let mut stream = self
            .client()
            .pull_blob_stream(r, layer)
            .await
            .map_err(|e| failed(&e))?;
        let mut w = cache.writer(what, MAX_FILE)?;
        while let Some(bytes) = stream.next().await {
            w.write(&bytes.map_err(|e| failed(&e))?)?;
        }
        let digest = w.finish(Some(&layer.digest))?;
        cache.path(&digest)
    }

    /// The file of the single-file artifact `reference`, from the cache when it was
    /// pulled before, else pulled and verified.
    pub async fn pull_file(
        &self,
        cache: &Cache,
        reference: &str,
    ) -> Result<PathBuf, ArtifactError> {
        if let Some(p) = cache
            .reference("files", reference)
            .and_then(|d| cache.get(&d))
        {
            return Ok(p);
        }
        let r = Self::parse(reference)?;
        let (manifest, _) = self
            .client()
            .pull_image_manifest(&r, &oci_client::secrets::RegistryAuth::Anonymous)
            .await
            .map_err(|e| ArtifactError::Registry(reference.into(), e.to_string()))?;
        let [layer] = manifest.layers.as_slice() else {
            return Err(ArtifactError::Registry(
                reference.into(),
                format!(
                    "it has {} layers, but a file artifact (Wasm component, kernel, initrd, disk image) has exactly one; publish the file with `verge artifact push FILE --to {reference}`",
                    manifest.layers.len()
                ),
            ));
        };
        let path = self.pull_blob(cache, &r, layer, reference).await?;
        cache.set_reference("files", reference, &layer.digest)?;
        tracing::info!(artifact = reference, digest = %layer.digest, "artifact pulled");
        Ok(path)
    }

    /// Publish `data` as a single-file artifact at `reference` (`application/wasm`
    /// for a Wasm component, a generic file otherwise); returns the manifest URL.
    pub async fn push_file(&self, reference: &str, data: Vec<u8>) -> Result<String, ArtifactError> {
        use oci_client::client::{Config, ImageLayer};
        let r = Self::parse(reference)?;
        // A Wasm binary starts with "\0asm".
        let wasm = data.starts_with(b"\0asm");
        let layer = ImageLayer::new(
            data,
            if wasm { WASM_LAYER } else { FILE_LAYER }.to_string(),
            None,
        );
        let config = if wasm {
            Config::new(
                br#"{"architecture":"wasm","os":"wasip2"}"#.to_vec(),
                WASM_CONFIG.to_string(),
                None,
            )
        } else {
            Config::new(b"{}".to_vec(), EMPTY_CONFIG.to_string(), None)
        };
        self.client()
            .push(
                &r,
                &[layer],
                config,
                &oci_client::secrets::RegistryAuth::Anonymous,
                None,
            )
            .await
            .map(|p| p.manifest_url)
            .map_err(|e| ArtifactError::Registry(reference.into(), format!("push: {e}")))
    }
}
