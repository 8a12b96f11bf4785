//! Verge's artifacts: the files instances are made from (container image layers, Wasm
//! components, VM kernels, initrds and disk images), kept by their SHA-256 digest.
//!
//! - [`Cache`]: a content-addressed blob directory. Every blob is hashed while it is
//!   written and kept only if it matches the digest it was asked for; a blob is never
//!   changed once in place (files are read-only), so readers need no locks. The hub's
//!   artifact store and every node's cache are each one `Cache`.
//! - [`Registry`]: OCI registry pulls and pushes of single-file artifacts (one layer
//!   per manifest, as Wasm components are published), behind the `oci` feature.
//! - [`Source`] (from `verge_api`): what a manifest's artifact field names: a path on
//!   the node, a digest in the hub's store, or an OCI reference.

pub mod cache;
pub mod registry;

pub use cache::{BlobWriter, Cache, Collected, sha256_hex};
pub use registry::{Registry, registry_config};
pub use verge_api::artifact::{Source, digest_hex};

use std::path::PathBuf;

/// Artifact failures.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// What arrived does not hash to the digest it was asked for.
    #[error("{what} does not match its digest (expected {expected}, got {actual}); refusing it")]
    Digest {
        /// Which artifact.
        what: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// Not a digest of the form `sha256:<64 hex digits>`.
    #[error("{0:?} is not a digest; expected sha256: followed by 64 hex digits")]
    BadDigest(String),
    /// Larger than allowed.
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge {
        /// Which artifact.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// An OCI reference does not parse.
    #[error("reference {0:?} is not valid: {1}")]
    Reference(String, String),
    /// The registry failed or refused, or the artifact is not one file.
    #[error("pulling {0}: {1}")]
    Registry(String, String),
    /// This build has no registry client.
    #[error(
        "{0} names an OCI registry, but this verge was built without registry support; build it with `--features oci` (or container/function), or push the file to the hub with `verge artifact push` and use its sha256: digest"
    )]
    NoRegistry(String),
    /// Cache i/o.
    #[error("artifact cache {0}: {1}")]
    Io(PathBuf, std::io::Error),
}
