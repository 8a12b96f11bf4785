//! The object envelope every kind shares: `apiVersion`, `kind`, `metadata`, `spec`, `status`.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::validate::FieldErrors;

/// The API group and version of every object this hub serves.
pub const API_VERSION: &str = "verge.dev/v1";

/// Metadata common to all objects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Unique name within the kind (DNS label: lowercase letters, digits, `-`).
    pub name: String,
    /// Free-form key/value labels used by selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form key/value annotations (not used for selection).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Set by the hub at creation; never changes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// The store revision of the last write to this object (set by the hub on read).
    /// Sending it back on update makes the update conditional on it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    /// Incremented by the hub each time `spec` changes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// RFC 3339 time of creation (set by the hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    /// RFC 3339 time of the last update (set by the hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A resource kind: ties a spec type to its kind name, plural and status type.
pub trait Kind:
    Serialize + DeserializeOwned + Clone + Default + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// The kind's status type.
    type Status: Serialize
        + DeserializeOwned
        + Clone
        + Default
        + PartialEq
        + std::fmt::Debug
        + Send
        + Sync
        + 'static;
    /// `kind:` as written in manifests, e.g. `Instance`.
    const KIND: &'static str;
    /// Lower-case plural used in URLs and store keys, e.g. `instances`.
    const PLURAL: &'static str;
    /// Check the spec; push one error per bad field (paths start at `spec`).
    fn validate(&self, errors: &mut FieldErrors);
}

/// One object of kind `S`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(bound(deserialize = "S: Kind"))]
#[serde(bound(serialize = "S: Kind"))]
pub struct Object<S: Kind> {
    /// Always [`API_VERSION`].
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// The kind name; must equal `S::KIND`.
    pub kind: String,
    /// Name, labels and hub-maintained bookkeeping.
    pub metadata: ObjectMeta,
    /// What the user wants.
    #[serde(default)]
    pub spec: S,
    /// What is (written by the hub and the edges, never by `apply`).
    #[serde(default)]
    pub status: S::Status,
}

fn default_api_version() -> String {
    API_VERSION.to_string()
}

impl<S: Kind> Object<S> {
    /// A new object with the given name and spec.
    pub fn new(name: impl Into<String>, spec: S) -> Self {
        Self {
            api_version: API_VERSION.to_string(),
            kind: S::KIND.to_string(),
            metadata: ObjectMeta {
                name: name.into(),
                ..Default::default()
            },
            spec,
            status: Default::default(),
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Validate envelope and spec; `Err` lists every bad field.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        if self.api_version != API_VERSION {
            errs.push(
                "apiVersion",
                &self.api_version,
                format!("use {API_VERSION}"),
            );
        }
        if self.kind != S::KIND {
            errs.push("kind", &self.kind, format!("expected {}", S::KIND));
        }
        crate::validate::name(&mut errs, "metadata.name", &self.metadata.name);
        for (k, v) in &self.metadata.labels {
            crate::validate::label(&mut errs, k, v);
        }
        let annotations: usize = self
            .metadata
            .annotations
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if annotations > crate::validate::MAX_ANNOTATION_BYTES {
            errs.push(
                "metadata.annotations",
                format!("{annotations} bytes"),
                format!(
                    "annotations may hold at most {} KiB in all; keep large data in an artifact (verge artifact push) and refer to it",
                    crate::validate::MAX_ANNOTATION_BYTES >> 10
                ),
            );
        }
        self.spec.validate(&mut errs);
        let size = serde_json::to_vec(self).map_or(0, |v| v.len());
        if size > crate::validate::MAX_OBJECT_BYTES {
            errs.push(
                "object",
                format!("{size} bytes"),
                format!(
                    "an object may be at most {} MiB encoded; keep large data in an artifact and refer to it",
                    crate::validate::MAX_OBJECT_BYTES >> 20
                ),
            );
        }
        errs.into_result()
    }
}
