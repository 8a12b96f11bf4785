//! The web console: a single page served at `/console` from assets built into the
//! binary (no build step, nothing fetched from elsewhere), and the API it reads.
//!
//! The page signs in with an operator's token and reads:
//! - `GET /v1/console/summary`: regions, their sites (clusters) and node counts,
//!   health and capacity, and instances by phase;
//! - `GET /v1/console/nodes` and `/v1/console/instances`: one page of rows, filtered
//!   on the server (`q`, `site`, `region`, `node`, `phase`, `offset`, `limit`);
//! - `GET /v1/console/watch`: one multiplexed stream per view (rows of nodes and
//!   instances as they change, which applications changed, and events), so a view
//!   makes one request to stay live, never one per row;
//! - and the rest of the API for an object's events, logs and metrics.
//!
//! Those come from the [`index::ConsoleIndex`]: small rows of every node and
//! instance kept in memory from a watch of the store, loaded the first time the
//! console asks, so that a page or a filter over 100,000 instances is answered from
//! memory in milliseconds.

pub mod index;

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;

use crate::http::{ApiResult, HttpError, Principal, admin_only};
use crate::state::HubState;

/// The page (HTML, CSS and script in one file).
const PAGE: &str = include_str!("console.html");

/// `GET /console`: the page.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page talks to this hub only, and runs no script from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// Query of the row lists.
#[derive(Debug, Default, Deserialize)]
pub struct RowQuery {
    /// Text to look for in names, nodes, apps, sites, regions and phases.
    #[serde(default)]
    pub q: Option<String>,
    /// Only this site.
    #[serde(default)]
    pub site: Option<String>,
    /// Only this region.
    #[serde(default)]
    pub region: Option<String>,
    /// Only instances on this node.
    #[serde(default)]
    pub node: Option<String>,
    /// Only this phase.
    #[serde(default)]
    pub phase: Option<String>,
    /// Skip this many.
    #[serde(default)]
    pub offset: Option<usize>,
    /// At most this many (default 100, at most 1,000).
    #[serde(default)]
    pub limit: Option<usize>,
}

fn limit_of(q: &RowQuery) -> Result<usize, HttpError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(verge_api::ApiError::new(
            verge_api::ErrorCode::Invalid,
            format!("limit: {limit} is not between 1 and 1000"),
        )
        .into());
    }
    Ok(limit)
}

/// `GET /v1/console/summary`.
pub async fn summary(State(st): State<Arc<HubState>>, p: Principal) -> ApiResult<Response> {
    admin_only(&p, "the console")?;
    let idx = st.console.ready(&st).await?;
    Ok(Json(idx.summary()).into_response())
}

/// One page of rows that `pick` chooses.
async fn rows(
    st: Arc<HubState>,
    p: Principal,
    q: RowQuery,
    pick: fn(&index::Loaded, &RowQuery, usize) -> serde_json::Value,
) -> ApiResult<Response> {
    admin_only(&p, "the console")?;
    let limit = limit_of(&q)?;
    let idx = st.console.ready(&st).await?;
    Ok(Json(pick(&idx, &q, limit)).into_response())
}

/// `GET /v1/console/nodes`.
pub async fn nodes(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Query(q): Query<RowQuery>,
) -> ApiResult<Response> {
    rows(st, p, q, index::Loaded::nodes).await
}

/// `GET /v1/console/instances`.
pub async fn instances(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Query(q): Query<RowQuery>,
) -> ApiResult<Response> {
    rows(st, p, q, index::Loaded::instances).await
}

/// Query of the watch.
#[derive(Debug, Default, Deserialize)]
pub struct WatchQuery {
    /// Also stream events.
    #[serde(default)]
    pub events: bool,
}

/// `GET /v1/console/watch`: changed rows (and events, if asked), one JSON per line;
/// `{"type":"resync"}` when the reader fell behind and should read its page again.
pub async fn watch(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Response> {
    admin_only(&p, "the console")?;
    let permit = st.watches.acquire(p.key()).map_err(|r| {
        verge_api::ApiError::new(
            verge_api::ErrorCode::Unavailable,
            format!("{r}: close a console tab or watch before opening another"),
        )
        .retry_after(std::time::Duration::from_secs(1))
    })?;
    let idx = st.console.ready(&st).await?;
    let mut rows = idx.subscribe();
    let mut events = if q.events {
        Some(
            st.objects
                .store()
                .watch(crate::events::EVENT_PREFIX, 0)
                .await
                .map_err(crate::objects::store_err)?,
        )
    } else {
        None
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let _permit = permit;
        // A ping every 15 s tells the page the stream is alive (and a dead reader
        // ends this task when the send fails).
        let mut ping = tokio::time::interval(std::time::Duration::from_secs(15));
        loop {
            let line = tokio::select! {
                r = rows.recv() => match r {
                    Ok(change) => change.to_string(),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        serde_json::json!({"type": "resync"}).to_string()
                    }
                    Err(_) => return,
                },
                Some(batch) = async { match events.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                    let Ok(batch) = batch else { return };
                    let mut out = String::new();
                    for ev in batch.events.iter().filter(|e| e.kind == verge_store::EventKind::Put) {
                        if let Ok(e) = serde_json::from_slice::<serde_json::Value>(&ev.kv.value) {
                            out.push_str(&serde_json::json!({"type": "event", "event": e}).to_string());
                            out.push('\n');
                        }
                    }
                    if out.is_empty() { continue; }
                    out.pop();
                    out
                },
                _ = ping.tick() => serde_json::json!({"type": "ping"}).to_string(),
            };
            let sent = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                tx.send(Bytes::from(format!("{line}\n"))),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_default())
}
