//! The hub's artifact store: files (Wasm components, VM kernels, initrds and disk
//! images) kept by SHA-256 digest in `DATA_DIR/artifacts` ([`verge_artifacts::Cache`]).
//!
//! Operators upload with `PUT /v1/artifacts` (the digest is computed as the body
//! streams in; `?digest=` makes the hub refuse anything else), list, download and
//! delete. Manifests name a blob by its digest (`spec.vm.kernel: sha256:...`); edges
//! fetch it over their channel (a data stream with hello `artifact`), verify it and keep
//! it in their own cache, so a node cut off from the hub can still restart it.
//!
//! The store is this hub's directory: hubs sharing one etcd do not share artifacts
//! (push to each, or use an OCI registry).

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use verge_api::{ApiError, ErrorCode};
use verge_artifacts::ArtifactError;
use verge_tunnel::chunk::{Chunk, DATA_CHUNK, write_chunk};

use crate::state::HubState;

/// Largest artifact the hub takes.
pub const MAX_ARTIFACT: u64 = 32 << 30;

/// One stored artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// `sha256:...`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

/// Query of an upload.
#[derive(Debug, Default, Deserialize)]
pub struct UploadQuery {
    /// Refuse the upload unless it hashes to this.
    pub digest: Option<String>,
}

fn api_error(e: ArtifactError) -> ApiError {
    let code = match &e {
        ArtifactError::Digest { .. } | ArtifactError::BadDigest(_) => ErrorCode::Invalid,
        ArtifactError::TooLarge { .. } => ErrorCode::Invalid,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, e.to_string())
}

fn missing(digest: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "the hub has no artifact {digest}; upload it with `verge artifact push FILE` (`verge artifact list` shows what it has)"
        ),
    )
}

/// `PUT /v1/artifacts[?digest=sha256:...]`: store the body.
pub async fn upload(
    st: &HubState,
    q: UploadQuery,
    body: Body,
) -> Result<(StatusCode, Json<ArtifactInfo>), ApiError> {
    if let Some(d) = &q.digest {
        st.artifacts.path(d).map_err(api_error)?;
    }
    let mut w = st
        .artifacts
        .writer("the uploaded artifact", MAX_ARTIFACT)
        .map_err(api_error)?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(ErrorCode::Invalid, format!("reading the upload: {e}")))?;
        w.write(&chunk).map_err(api_error)?;
    }
    let size = w.size();
    let digest = w.finish(q.digest.as_deref()).map_err(api_error)?;
    tracing::info!(%digest, size, "artifact stored");
    Ok((StatusCode::CREATED, Json(ArtifactInfo { digest, size })))
}

/// `GET /v1/artifacts`.
pub fn list(st: &HubState) -> serde_json::Value {
    let items: Vec<ArtifactInfo> = st
        .artifacts
        .list()
        .into_iter()
        .map(|(digest, size)| ArtifactInfo { digest, size })
        .collect();
    serde_json::json!({ "items": items })
}

/// `GET /v1/artifacts/{digest}`: the content, streamed.
pub async fn download(st: &HubState, digest: &str) -> Result<Response, ApiError> {
    st.artifacts.path(digest).map_err(api_error)?;
    let path = st.artifacts.get(digest).ok_or_else(|| missing(digest))?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("{}: {e}", path.display())))?;
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 256 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `DELETE /v1/artifacts/{digest}`.
pub fn delete(st: &HubState, digest: &str) -> Result<StatusCode, ApiError> {
    if st.artifacts.remove(digest).map_err(api_error)? {
        tracing::info!(%digest, "artifact deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(missing(digest))
    }
}

/// Axum handlers (admins upload and delete; edges may read).
pub mod handlers {
    use super::*;
    use crate::http::{HttpError, Principal, admin_only};

    /// `PUT /v1/artifacts`.
    pub async fn put(
        State(st): State<Arc<HubState>>,
        p: Principal,
        Query(q): Query<UploadQuery>,
        body: Body,
    ) -> Result<Response, HttpError> {
        admin_only(&p, "uploading artifacts")?;
        Ok(upload(&st, q, body).await?.into_response())
    }

    /// `GET /v1/artifacts`.
    pub async fn get_list(
        State(st): State<Arc<HubState>>,
        _p: Principal,
    ) -> Json<serde_json::Value> {
        Json(list(&st))
    }

    /// `GET /v1/artifacts/{digest}`.
    pub async fn get_one(
        State(st): State<Arc<HubState>>,
        _p: Principal,
        Path(digest): Path<String>,
    ) -> Result<Response, HttpError> {
        Ok(download(&st, &digest).await?)
    }

    /// `DELETE /v1/artifacts/{digest}`.
    pub async fn delete_one(
        State(st): State<Arc<HubState>>,
        p: Principal,
        Path(digest): Path<String>,
    ) -> Result<StatusCode, HttpError> {
        admin_only(&p, "deleting artifacts")?;
        Ok(delete(&st, &digest)?)
    }
}

/// Send artifact `digest` down a data stream an edge opened: data chunks, then eof;
/// or one error chunk saying why not. Whether it was all sent.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    st: &HubState,
    node: &str,
    mut stream: S,
    digest: &str,
) -> bool {
    let path = match st.artifacts.path(digest) {
        Err(e) => Err(e.to_string()),
        Ok(_) => st
            .artifacts
            .get(digest)
            .ok_or_else(|| missing(digest).message),
    };
    let sent = async {
        let path = path?;
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            write_chunk(&mut stream, &Chunk::Data(buf[..n].to_vec()))
                .await
                .map_err(|e| format!("sending: {e}"))?;
        }
        Ok::<_, String>(())
    }
    .await;
    match sent {
        Ok(()) => {
            let _ = write_chunk(&mut stream, &Chunk::Eof).await;
            tracing::info!(node, digest, "artifact sent to edge");
            true
        }
        Err(why) => {
            tracing::warn!(node, digest, error = %why, "artifact not sent");
            let _ = write_chunk(&mut stream, &Chunk::Error(why)).await;
            false
        }
    }
}
