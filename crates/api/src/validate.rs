//! Field-level validation errors that name the field, the bad value and the fix.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One bad field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.resources.memory`.
    pub field: String,
    /// The value that was refused (as text; empty when missing).
    pub value: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.field, self.message)
        } else {
            write!(f, "{}: '{}': {}", self.field, self.value, self.message)
        }
    }
}

/// A list of bad fields (empty means valid).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    /// Record one bad field.
    pub fn push(
        &mut self,
        field: impl Into<String>,
        value: impl fmt::Display,
        message: impl Into<String>,
    ) {
        self.0.push(FieldError {
            field: field.into(),
            value: value.to_string(),
            message: message.into(),
        });
    }

    /// `Ok(())` if nothing was recorded.
    pub fn into_result(self) -> Result<(), Self> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// Whether `s` is a DNS label: 1–63 of `a-z0-9-`, starting and ending alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Check an object name.
pub fn name(errs: &mut FieldErrors, field: &str, value: &str) {
    if !is_dns_label(value) {
        errs.push(
            field,
            value,
            "must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit (e.g. web-1)",
        );
    }
}

/// Check an environment variable's name (letters, digits, '_', not starting with a
/// digit), as POSIX shells take them.
pub fn env_name(errs: &mut FieldErrors, field: &str, value: &str) {
    let ok = !value.is_empty()
        && !value.starts_with(|c: char| c.is_ascii_digit())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        errs.push(
            field,
            value,
            "an environment variable name: letters, digits and '_', not starting with a digit (e.g. CACHE_SIZE)",
        );
    }
}

fn is_label_part(s: &str, max: usize, slash: bool) -> bool {
    s.len() <= max
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') || (slash && b == b'/')
        })
}

/// Largest total size of an object's annotations (keys and values), as Kubernetes.
pub const MAX_ANNOTATION_BYTES: usize = 256 << 10;

/// Largest object, encoded: every object must fit in one message to its edge with
/// room to spare, and large data belongs in an artifact, not in a manifest.
pub const MAX_OBJECT_BYTES: usize = 1 << 20;

/// Check one label (key and value) of `metadata.labels`.
pub fn label(errs: &mut FieldErrors, key: &str, value: &str) {
    label_at(errs, "metadata.labels", key, value);
}

/// Check one label (key and value) of the label map at `field` (a selector too).
pub fn label_at(errs: &mut FieldErrors, field: &str, key: &str, value: &str) {
    if key.is_empty() || !is_label_part(key, 253, true) {
        errs.push(
            format!("{field}[{key}]"),
            key,
            "label keys are 1-253 of letters, digits, '-', '_', '.', '/'",
        );
    }
    if !is_label_part(value, 63, false) {
        errs.push(
            format!("{field}[{key}]"),
            value,
            "label values are up to 63 of letters, digits, '-', '_', '.'",
        );
    }
    if key == crate::node::LABEL_TIER && !crate::node::TIERS.contains(&value) {
        errs.push(
            format!("{field}[{key}]"),
            value,
            format!("tier must be one of {}", crate::node::TIERS.join(", ")),
        );
    }
}
