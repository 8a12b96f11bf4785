//! The one API error shape, shared by the REST API and the CLI.

use serde::{Deserialize, Serialize};

use crate::validate::FieldErrors;

/// What went wrong, transport-agnostic; the hub maps it to an HTTP status at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorCode {
    /// The request or manifest is malformed or invalid.
    Invalid,
    /// No valid credentials.
    Unauthorized,
    /// Credentials valid, but not for this object.
    Forbidden,
    /// No such object.
    NotFound,
    /// Already exists, or changed since it was read.
    Conflict,
    /// History needed for the request is gone.
    Gone,
    /// A node needed for the request is not connected.
    Unavailable,
    /// A bug or a backend failure.
    Internal,
}

/// An API error body: `{"code": ..., "message": ..., "fields": [...], "retryAfterMs": N}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Kind of failure.
    pub code: ErrorCode,
    /// Human text saying what and how to fix it.
    pub message: String,
    /// Bad fields, for `invalid`.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub fields: FieldErrors,
    /// For a refusal that will pass later (a limit, admission under load): how long
    /// to wait before trying again, in milliseconds. Machines read this, never the
    /// message; over HTTP it is also the `Retry-After` header (in whole seconds).
    #[serde(
        default,
        rename = "retryAfterMs",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after_ms: Option<u64>,
}

fn is_empty(f: &FieldErrors) -> bool {
    f.0.is_empty()
}

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            fields: FieldErrors::default(),
            retry_after_ms: None,
        }
    }

    /// This error, with a hint to retry after `after`.
    pub fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after_ms = Some(after.as_millis().min(u128::from(u64::MAX)) as u64);
        self
    }

    /// A validation failure listing bad fields.
    pub fn invalid(fields: FieldErrors) -> Self {
        Self {
            code: ErrorCode::Invalid,
            message: fields.to_string(),
            fields,
            retry_after_ms: None,
        }
    }
}
