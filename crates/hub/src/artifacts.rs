//! The hub's artifact store: files (Wasm components, VM kernels, initrds and disk
//! images) kept by SHA-256 digest in `DATA_DIR/artifacts` ([`verge_artifacts::Cache`]).
//!
//! Operators upload with `PUT /v1/artifacts` (the digest is computed as the body
//! streams in; `?digest=` makes the hub refuse anything else), list, download and
//! delete. Manifests name a blob by its digest (`spec.vm.kernel: sha256:...`); edges
//! fetch it over their channel (a data stream with hello `artifact`), verify it and keep
//! it in their own cache, so a node cut off from the hub can still restart it.
//!
//! Each hub keeps the files in its own directory; the store keeps the catalogue
//! (`/verge/artifacts/DIGEST`). Hub replicas sharing a store copy from each other
//! ([`replicate`]): every replica pulls each catalogued artifact it lacks from a
//! replica that has it (verifying the digest), at once in the background and on
//! demand when asked for one it has not copied yet; a delete through any replica
//! removes it everywhere.

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
use verge_store::StoreExt;
use verge_tunnel::chunk::{Chunk, DATA_CHUNK, write_chunk};

use crate::state::HubState;

/// Where the catalogue of artifacts lives in the store.
pub const CATALOGUE_PREFIX: &str = "/verge/artifacts/";

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
    let entry = serde_json::to_vec(&ArtifactInfo {
        digest: digest.clone(),
        size,
    })
    .unwrap_or_default();
    st.objects
        .store()
        .put(&format!("{CATALOGUE_PREFIX}{digest}"), entry, None)
        .await
        .map_err(crate::objects::store_err)?;
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

/// `GET /v1/artifacts/{digest}`: the content, streamed. Unless `local_only` (what
/// replicas ask each other), one catalogued but not yet copied here is copied first.
pub async fn download(st: &HubState, digest: &str, local_only: bool) -> Result<Response, ApiError> {
    st.artifacts.path(digest).map_err(api_error)?;
    if !local_only {
        copy_from_peers(st, digest).await;
    }
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

/// `DELETE /v1/artifacts/{digest}`: here, from the catalogue, and so from every
/// replica.
pub async fn delete(st: &HubState, digest: &str) -> Result<StatusCode, ApiError> {
    st.artifacts.path(digest).map_err(api_error)?;
    let catalogued = st
        .objects
        .store()
        .delete(&format!("{CATALOGUE_PREFIX}{digest}"), None)
        .await
        .map_err(crate::objects::store_err)?
        .prev
        .first()
        .is_some_and(Option::is_some);
    if st.artifacts.remove(digest).map_err(api_error)? || catalogued {
        tracing::info!(%digest, "artifact deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(missing(digest))
    }
}

/// Copy `digest` from a replica that has it, if it is catalogued and missing here.
/// Whether it is here afterwards.
pub async fn copy_from_peers(st: &HubState, digest: &str) -> bool {
    if st.artifacts.get(digest).is_some() {
        return true;
    }
    let catalogued = st
        .objects
        .store()
        .get(&format!("{CATALOGUE_PREFIX}{digest}"))
        .await
        .ok()
        .flatten()
        .is_some();
    if !catalogued {
        return false;
    }
    for peer in crate::replicas::live_replicas(st).await {
        if peer.id == st.replica.id {
            continue;
        }
        match copy_from(st, &peer.url, digest).await {
            Ok(size) => {
                tracing::info!(digest, size, from = %peer.id, "artifact copied from a replica");
                return true;
            }
            Err(e) => {
                tracing::debug!(digest, from = %peer.id, error = %e.message, "replica could not give the artifact")
            }
        }
    }
    false
}

async fn copy_from(st: &HubState, url: &str, digest: &str) -> Result<u64, ApiError> {
    let req = axum::http::Request::get(format!("/v1/artifacts/{digest}?local=true"))
        .header(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {}", crate::replicas::peer_token(st)),
        )
        .header(axum::http::header::HOST, "verge-hub")
        .body(Body::empty())
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let resp = crate::replicas::forward(st, url, req).await?;
    if !resp.status().is_success() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("{url} answered {}", resp.status()),
        ));
    }
    let mut w = st
        .artifacts
        .writer("an artifact from a replica", MAX_ARTIFACT)
        .map_err(api_error)?;
    let mut stream = resp.into_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
        w.write(&chunk).map_err(api_error)?;
    }
    let size = w.size();
    w.finish(Some(digest)).map_err(api_error)?;
    Ok(size)
}

/// Keep this hub's copies in step with the catalogue: copy what it lacks, remove what
/// was deleted. Runs on every replica.
pub async fn replicate(st: Arc<HubState>) {
    loop {
        let store = st.objects.store().clone();
        let Ok(listed) = store.range(CATALOGUE_PREFIX).await else {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        };
        for kv in &listed.kvs {
            copy_from_peers(&st, kv.key.trim_start_matches(CATALOGUE_PREFIX)).await;
        }
        let Ok(mut w) = store.watch(CATALOGUE_PREFIX, listed.revision + 1).await else {
            continue;
        };
        while let Some(Ok(batch)) = w.recv().await {
            for ev in batch.events {
                let digest = ev.kv.key.trim_start_matches(CATALOGUE_PREFIX).to_string();
                match ev.kind {
                    verge_store::EventKind::Put => {
                        // The uploader may still be answering: try again shortly if no
                        // replica has it yet.
                        if !copy_from_peers(&st, &digest).await {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            copy_from_peers(&st, &digest).await;
                        }
                    }
                    verge_store::EventKind::Delete => {
                        if st.artifacts.remove(&digest).unwrap_or(false) {
                            tracing::info!(%digest, "artifact deleted through another replica");
                        }
                    }
                }
            }
        }
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

    /// Query of a download.
    #[derive(Debug, Default, Deserialize)]
    pub struct DownloadQuery {
        /// Only what this hub has (replicas asking each other).
        #[serde(default)]
        pub local: bool,
    }

    /// `GET /v1/artifacts/{digest}`.
    pub async fn get_one(
        State(st): State<Arc<HubState>>,
        _p: Principal,
        Path(digest): Path<String>,
        Query(q): Query<DownloadQuery>,
    ) -> Result<Response, HttpError> {
        Ok(download(&st, &digest, q.local).await?)
    }

    /// `DELETE /v1/artifacts/{digest}`.
    pub async fn delete_one(
        State(st): State<Arc<HubState>>,
        p: Principal,
        Path(digest): Path<String>,
    ) -> Result<StatusCode, HttpError> {
        admin_only(&p, "deleting artifacts")?;
        Ok(delete(&st, &digest).await?)
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
    copy_from_peers(st, digest).await;
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
