//! The REST API under `/v1`. Handlers are thin: authenticate, parse, call
//! [`crate::objects::Objects`], map errors to HTTP statuses.
//!
//! Operators authenticate with a bearer token. Edges may also call the API with their
//! node certificate, and then see and change only their own objects.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use verge_api::channel::{PROTOCOL_VERSION, RequestBody, ResponseBody, StreamPurpose};
use verge_api::{ApiError, ErrorCode, InstanceSpec, NodeSpec, Object, RegionSpec, kind_prefix};
use verge_store::EventKind;

use crate::objects::{decode_value, parse_body, store_err};
use crate::state::HubState;
use crate::tokens::{TokenRequest, create_join_token, ct_eq};

/// The node identity from a TLS client certificate, if the caller presented one.
#[derive(Debug, Clone, Default)]
pub struct PeerNode(pub Option<crate::identity::PeerIdentity>);

/// How long a watcher may leave an event untaken before the watch is ended: a slow
/// or stalled reader must not make the hub hold an ever-growing backlog for it. It
/// gets an `ERROR` line saying to list and watch again (when the line fits).
const WATCH_SEND_DEADLINE: Duration = Duration::from_secs(10);

/// An API error as an HTTP response.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

/// The HTTP status for an API error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Invalid => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::Gone => StatusCode::GONE,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let retry = self.0.retry_after_ms;
        let mut r = (status_of(self.0.code), Json(self.0)).into_response();
        if let Some(ms) = retry
            && let Ok(v) = header::HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// A handler's result.
pub type ApiResult<T> = Result<T, HttpError>;

impl FromRequestParts<Arc<HubState>> for Principal {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HubState>,
    ) -> Result<Self, Self::Rejection> {
        if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .unwrap_or_default();
            // Another replica forwarding an operator's request, or asking for an
            // artifact, acts as an admin.
            if ct_eq(token, &crate::replicas::peer_token(state))
                || crate::tokens::is_admin_token(state.objects.store().as_ref(), token).await?
            {
                return Ok(Principal::Admin);
            }
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "the bearer token is not valid for this hub; use the token from the hub's admin.conf",
            )
            .into());
        }
        if let Some(PeerNode(Some(peer))) = parts.extensions.get::<PeerNode>().cloned() {
            // A certificate counts only while its enrolment is the node's current one.
            if let Err(r) = crate::identity::admit(state, &peer, "rest").await {
                return Err(r.error.into());
            }
            return Ok(Principal::Node(peer.node));
        }
        Err(ApiError::new(
            ErrorCode::Unauthorized,
            "no credentials: send 'Authorization: Bearer TOKEN' (the verge CLI reads it from --config, $VERGE_CONFIG or ~/.verge/config)",
        )
        .into())
    }
}

use crate::app::may_access;
pub use crate::app::{NodeScoped, Principal, admin_only};

/// Query parameters of list/watch.
#[derive(Debug, Deserialize, Default)]
pub struct ListQuery {
    /// Stream changes instead of listing.
    #[serde(default)]
    pub watch: bool,
    /// With `watch`: deliver changes after this revision (default: from now).
    #[serde(default)]
    pub revision: Option<u64>,
    /// List at most this many (1 to 10,000); the answer says where to continue.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Continue a paged list where the previous page ended (its `continue`).
    #[serde(default, rename = "continue")]
    pub continue_after: Option<String>,
}

/// Largest page a list may ask for.
const MAX_PAGE: usize = 10_000;

async fn list<S: NodeScoped>(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    if q.watch {
        return watch::<S>(st, p, q.revision.unwrap_or(0)).await;
    }
    let (items, revision, next) = match (q.limit, &q.continue_after) {
        (None, None) => {
            let (items, revision) = st.objects.list::<S>().await?;
            (items, revision, None)
        }
        (limit, after) => {
            let limit = limit.unwrap_or(500);
            if !(1..=MAX_PAGE).contains(&limit) {
                return Err(ApiError::new(
                    ErrorCode::Invalid,
                    format!("limit: {limit} is not between 1 and {MAX_PAGE}"),
                )
                .into());
            }
            if let Some(a) = after
                && !verge_api::validate::is_dns_label(a)
            {
                return Err(ApiError::new(
                    ErrorCode::Invalid,
                    format!(
                        "continue: '{a}' is not a token from a previous page; list again without it"
                    ),
                )
                .into());
            }
            st.objects.list_page::<S>(after.as_deref(), limit).await?
        }
    };
    let items: Vec<_> = items
        .into_iter()
        .filter(|o| may_access(&p, o).is_ok())
        .collect();
    let mut body = serde_json::json!({ "revision": revision, "items": items });
    if let Some(next) = next {
        body["continue"] = next.into();
    }
    Ok(Json(body).into_response())
}

/// Send one line of a watch, or give up on a reader that does not take it in time.
async fn send_watch_line(
    st: &HubState,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    line: Bytes,
) -> bool {
    match tokio::time::timeout(WATCH_SEND_DEADLINE, tx.send(line)).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            st.metrics.watches_dropped.inc();
            tracing::info!(
                "watch ended: its reader took nothing for {}s",
                WATCH_SEND_DEADLINE.as_secs()
            );
            let msg = serde_json::json!({"type": "ERROR", "message": format!(
                "the watch was ended because its reader fell behind (nothing taken for {}s); list again and watch from the revision the list returns",
                WATCH_SEND_DEADLINE.as_secs())});
            let _ = tx.try_send(Bytes::from(format!("{msg}\n")));
            false
        }
    }
}

async fn watch<S: NodeScoped>(st: Arc<HubState>, p: Principal, after: u64) -> ApiResult<Response> {
    watch_lines(st, p.clone(), &kind_prefix(S::PLURAL), after, move |ev| {
        let (kind, raw, rev) = match ev.kind {
            EventKind::Put => ("PUT", ev.kv.value.clone(), ev.kv.mod_revision),
            EventKind::Delete => (
                "DELETE",
                ev.prev_kv
                    .as_ref()
                    .map(|p| p.value.clone())
                    .unwrap_or_default(),
                ev.prev_kv.as_ref().map_or(0, |p| p.mod_revision),
            ),
        };
        let obj = decode_value::<S>(&raw, rev)?;
        may_access(&p, &obj).ok()?;
        Some((kind, serde_json::to_value(obj).ok()?))
    })
    .await
}

/// A watch of `prefix` after revision `after` as lines of JSON: each change that
/// `line` turns into `(type, object)`, with the batch's revision. Holds one of the
/// caller's watch permits for as long as it runs.
async fn watch_lines(
    st: Arc<HubState>,
    p: Principal,
    prefix: &str,
    after: u64,
    line: impl Fn(&verge_store::Event) -> Option<(&'static str, serde_json::Value)> + Send + 'static,
) -> ApiResult<Response> {
    let permit = st.watches.acquire(p.key()).map_err(|r| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("{r}: close a watch you hold before opening another"),
        )
        .retry_after(Duration::from_secs(1))
    })?;
    let from = if after == 0 { 0 } else { after + 1 };
    let mut rx = st
        .objects
        .store()
        .watch(prefix, from)
        .await
        .map_err(store_err)?;
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
        let _permit = permit;
        while let Some(batch) = rx.recv().await {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx
                        .send(Bytes::from(format!(
                            "{}\n",
                            serde_json::json!({"type": "ERROR", "message": e.to_string()})
                        )))
                        .await;
                    return;
                }
            };
            for ev in &batch.events {
                let Some((kind, obj)) = line(ev) else {
                    continue;
                };
                let line =
                    serde_json::json!({"type": kind, "revision": batch.revision, "object": obj});
                if !send_watch_line(&st, &tx, Bytes::from(format!("{line}\n"))).await {
                    return;
                }
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(stream)
        .unwrap_or_default())
}

/// Query parameters of `/v1/events`.
#[derive(Debug, Deserialize, Default)]
struct EventsQuery {
    /// Only events about `KIND/NAME`.
    #[serde(default, rename = "for")]
    for_: Option<String>,
    /// The last this many (default 500).
    #[serde(default)]
    limit: Option<usize>,
    /// Stream events as they come instead of listing.
    #[serde(default)]
    watch: bool,
    /// With `watch`: events after this revision (default: from now).
    #[serde(default)]
    revision: Option<u64>,
}

async fn events(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    admin_only(&p, "events")?;
    if let Some(f) = &q.for_ {
        let known = f
            .split_once('/')
            .is_some_and(|(k, n)| verge_api::manifest::resolve_kind(k).is_some() && !n.is_empty());
        if !known {
            return Err(ApiError::new(
                ErrorCode::Invalid,
                format!(
                    "for: '{f}' is not KIND/NAME (for example instances/web-1 or nodes/edge-1)"
                ),
            )
            .into());
        }
    }
    if q.watch {
        let for_ = q.for_.clone();
        return watch_lines(
            st,
            p,
            crate::events::EVENT_PREFIX,
            q.revision.unwrap_or(0),
            move |ev| {
                if ev.kind != EventKind::Put {
                    return None; // expiry
                }
                let e: verge_api::event::Event = serde_json::from_slice(&ev.kv.value).ok()?;
                if for_
                    .as_deref()
                    .is_some_and(|f| !crate::events::about(&e, f))
                {
                    return None;
                }
                Some(("ADDED", serde_json::to_value(e).ok()?))
            },
        )
        .await;
    }
    let limit = q.limit.unwrap_or(500);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::Invalid,
            format!("limit: {limit} is not between 1 and {MAX_PAGE}"),
        )
        .into());
    }
    let (items, revision) =
        crate::events::list(st.objects.store().as_ref(), q.for_.as_deref(), limit)
            .await
            .map_err(store_err)?;
    Ok(Json(serde_json::json!({ "revision": revision, "items": items })).into_response())
}

/// A streaming body fed by a task writing into a channel.
fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // Small: a reader that stops reading holds the hub to a few chunks.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(f(tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Body::from_stream(stream)
}

async fn get_one<S: NodeScoped>(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<Object<S>>> {
    Ok(Json(crate::app::get::<S>(&st, &p, &name).await?))
}

async fn create<S: NodeScoped>(
    State(st): State<Arc<HubState>>,
    p: Principal,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Object<S>>)> {
    let obj = parse_body::<S>(&body)?;
    let obj = crate::app::create(&st, &p, obj).await?;
    Ok((StatusCode::CREATED, Json(obj)))
}

async fn apply<S: NodeScoped>(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Object<S>>)> {
    let obj = parse_body::<S>(&body)?;
    let (obj, created) = crate::app::apply(&st, &p, &name, obj).await?;
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(obj),
    ))
}

async fn put_status<S: NodeScoped>(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Object<S>>> {
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::Invalid,
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    let status_value = value.get("status").cloned().unwrap_or(value);
    let new_status: S::Status = verge_api::manifest::from_value(status_value).map_err(|f| {
        let mut e = ApiError::invalid(f);
        e.message = format!("invalid status: {}", e.message);
        e
    })?;
    Ok(Json(
        crate::app::update_status::<S>(&st, &p, &name, None, new_status).await?,
    ))
}

/// `POST /v1/{applications,clustertemplates}/{name}/rollout/{action}`: pause, resume
/// or undo.
async fn rollout_action<S: crate::app::rollouts::Rolled>(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult<Json<verge_api::Object<S>>> {
    let action: crate::app::rollouts::Action = action.parse()?;
    Ok(Json(
        crate::app::rollouts::act::<S>(&st, &p, &name, action).await?,
    ))
}

/// `POST /v1/applications/{name}/preview` with an application: what applying it would
/// do, wave by wave (`verge apply --dry-run`).
async fn application_preview(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Vec<verge_api::application::WavePreview>>> {
    let app = parse_body::<verge_api::ApplicationSpec>(&body)?;
    if app.name() != name {
        return Err(ApiError::new(
            ErrorCode::Invalid,
            format!(
                "metadata.name: '{}' does not match the name in the URL ('{name}')",
                app.name()
            ),
        )
        .into());
    }
    Ok(Json(crate::app::rollouts::preview(&st, &p, app).await?))
}

async fn delete_one<S: NodeScoped>(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<Object<S>>> {
    Ok(Json(crate::app::delete::<S>(&st, &p, &name).await?))
}

/// Query of the logs endpoint.
#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    /// Bytes from the end (default 1 MiB; with `follow`, 4 KiB).
    pub tail: Option<u64>,
    /// Keep the response open and stream what the instance writes next.
    #[serde(default)]
    pub follow: bool,
}

async fn logs(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    let inst = st.objects.get::<InstanceSpec>(&name).await?;
    may_access(&p, &inst)?;
    let node = node_of(&inst, "logs")?;
    if st.edges.supports_streams(&node)? {
        return logs_over_stream(&st, &node, name, &q).await;
    }
    // Protocol 1 edges: logs travel on the control stream.
    if q.follow {
        let mut rx = st
            .edges
            .request_stream(
                &node,
                RequestBody::LogsFollow {
                    instance: name,
                    tail_bytes: q.tail.unwrap_or(4 << 10).min(16 << 20),
                },
            )
            .await?;
        // Dropping the body (the client went away) drops `rx`; the next chunk then
        // finds the stream closed and tells the edge to stop.
        let body = async_stream(move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
            while let Some(chunk) = rx.recv().await {
                let (data, last) = match chunk {
                    ResponseBody::Logs { data } => (data, false),
                    ResponseBody::Error { message } => (format!("\n[verge: {message}]\n"), true),
                };
                if tx.send(Bytes::from(data)).await.is_err() || last {
                    return;
                }
            }
        });
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body)
            .unwrap_or_default());
    }
    let body = st
        .edges
        .request(
            &node,
            RequestBody::Logs {
                instance: name,
                tail_bytes: q.tail.unwrap_or(1 << 20).min(16 << 20),
            },
            Duration::from_secs(15),
        )
        .await?;
    match body {
        ResponseBody::Logs { data } => {
            Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], data).into_response())
        }
        ResponseBody::Error { message } => {
            Err(ApiError::new(ErrorCode::Unavailable, format!("node '{node}': {message}")).into())
        }
    }
}

/// The node an instance is bound to, or why there is none.
fn node_of(inst: &verge_api::Instance, what: &str) -> ApiResult<String> {
    inst.status.node.clone().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Conflict,
            format!(
                "instance '{}' is not scheduled to a node yet, so it has no {what} ({})",
                inst.name(),
                inst.status.message
            ),
        )
        .into()
    })
}

/// Logs through a data stream of their own, so a large log never delays the node's
/// heartbeats. An error in the first chunk (no such instance on the node) is an HTTP
/// error; later ones end the body with a note.
async fn logs_over_stream(
    st: &HubState,
    node: &str,
    instance: String,
    q: &LogsQuery,
) -> ApiResult<Response> {
    use verge_tunnel::chunk::{Chunk, read_chunk};
    let tail_bytes = q
        .tail
        .unwrap_or(if q.follow { 4 << 10 } else { 1 << 20 })
        .min(16 << 20);
    let purpose = StreamPurpose::Logs {
        instance,
        tail_bytes,
        follow: q.follow,
    };
    let mut edge = crate::streams::open(st, node, purpose).await?;
    let first = match read_chunk(&mut edge.io).await {
        Ok(Some(Chunk::Data(b))) => Bytes::from(b),
        Ok(Some(Chunk::Eof) | None) => Bytes::new(),
        Ok(Some(Chunk::Error(m))) => {
            return Err(
                ApiError::new(ErrorCode::Unavailable, format!("node '{node}': {m}")).into(),
            );
        }
        Ok(Some(other)) => {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("node '{node}' sent {other:?} on a log stream"),
            )
            .into());
        }
        Err(e) => {
            return Err(
                ApiError::new(ErrorCode::Unavailable, format!("node '{node}': {e}")).into(),
            );
        }
    };
    let body = async_stream(move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
        if tx.send(first).await.is_err() {
            return;
        }
        loop {
            let chunk = tokio::select! {
                c = read_chunk(&mut edge.io) => c,
                why = crate::state::closed_reason(&mut edge.closed) => Ok(Some(Chunk::Error(why))),
            };
            let data = match chunk {
                Ok(Some(Chunk::Data(b))) => Bytes::from(b),
                Ok(Some(Chunk::Error(m))) => Bytes::from(format!("\n[verge: {m}]\n")),
                Ok(Some(Chunk::Ping)) => continue,
                Err(e) => Bytes::from(format!("\n[verge: log stream broke: {e}]\n")),
                Ok(_) => return,
            };
            if tx.send(data).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body)
        .unwrap_or_default())
}

/// Query of the exec endpoint.
#[derive(Debug, Deserialize)]
pub struct ExecQuery {
    /// Program and arguments as a JSON array of strings, e.g. `["sh","-c","ls"]`.
    pub command: String,
    /// Allocate a terminal.
    #[serde(default)]
    pub tty: bool,
    /// Terminal columns.
    #[serde(default)]
    pub cols: u16,
    /// Terminal rows.
    #[serde(default)]
    pub rows: u16,
}

/// Query of the port-forward endpoint.
#[derive(Debug, Deserialize)]
pub struct PortForwardQuery {
    /// The instance's port.
    pub port: u16,
}

/// The upgrade half of a request for a data stream, or the error that says how to ask.
fn take_upgrade(req: &mut Request, what: &str) -> ApiResult<hyper::upgrade::OnUpgrade> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes() == verge_api::channel::ALPN_STREAM);
    match (
        wants,
        req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>(),
    ) {
        (true, Some(u)) => Ok(u),
        _ => Err(crate::streams::needs_upgrade(what).into()),
    }
}

/// Open a data stream for `purpose` on the edge of its instance, then answer `101
/// Switching Protocols` and splice the client's upgraded connection to it. Errors
/// before the switch (not an upgrade, no such instance, edge not connected) are
/// ordinary HTTP errors.
async fn upgrade_to_stream(
    st: &HubState,
    req: &mut Request,
    what: &str,
    purpose: StreamPurpose,
) -> ApiResult<Response> {
    let upgrade = take_upgrade(req, what)?;
    let instance = match &purpose {
        StreamPurpose::Exec { instance, .. }
        | StreamPurpose::PortForward { instance, .. }
        | StreamPurpose::Logs { instance, .. } => instance.clone(),
    };
    let inst = st.objects.get::<InstanceSpec>(&instance).await?;
    let node = node_of(&inst, &format!("node to {what} on"))?;
    let edge = crate::streams::open(st, &node, purpose).await?;
    Ok(switch_to_stream(upgrade, edge, node))
}

/// Answer `101 Switching Protocols` and splice the upgraded connection to `edge`.
fn switch_to_stream(
    upgrade: hyper::upgrade::OnUpgrade,
    edge: crate::state::EdgeStream,
    node: String,
) -> Response {
    tokio::spawn(async move {
        match upgrade.await {
            Ok(up) => {
                crate::streams::serve_client(hyper_util::rt::TokioIo::new(up), edge, &node).await
            }
            Err(e) => tracing::debug!(error = %e, "client upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(
            header::UPGRADE,
            String::from_utf8_lossy(verge_api::channel::ALPN_STREAM).as_ref(),
        )
        .body(Body::empty())
        .unwrap_or_default()
}

async fn exec(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Path(name): Path<String>,
    Query(q): Query<ExecQuery>,
    mut req: Request,
) -> ApiResult<Response> {
    admin_only(&p, "exec")?;
    let command: Vec<String> = serde_json::from_str(&q.command).map_err(|e| {
        ApiError::new(
            ErrorCode::Invalid,
            format!(
                "command: '{}' is not a JSON array of strings ({e}); send e.g. [\"sh\",\"-c\",\"ls\"]",
                q.command
            ),
        )
    })?;
    if command.is_empty() || command[0].is_empty() || command.len() > 1024 {
        return Err(ApiError::new(
            ErrorCode::Invalid,
            "command: must name a program (1 to 1024 arguments), e.g. [\"sh\"]",
        )
        .into());
    }
    let purpose = StreamPurpose::Exec {
        instance: name,
        command,
        tty: q.tty,
        cols: q.cols,
        rows: q.rows,
    };
    upgrade_to_stream(&st, &mut req, "exec", purpose).await
}

async fn port_forward(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Path(name): Path<String>,
    Query(q): Query<PortForwardQuery>,
    mut req: Request,
) -> ApiResult<Response> {
    admin_only(&p, "port-forward")?;
    if q.port == 0 {
        return Err(ApiError::new(ErrorCode::Invalid, "port: must be 1..65535").into());
    }
    let purpose = StreamPurpose::PortForward {
        instance: name,
        port: q.port,
    };
    upgrade_to_stream(&st, &mut req, "port-forward", purpose).await
}

async fn tokens(State(st): State<Arc<HubState>>, p: Principal, body: Bytes) -> ApiResult<Response> {
    admin_only(&p, "creating join tokens")?;
    let req: TokenRequest = if body.is_empty() {
        TokenRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(ErrorCode::Invalid, format!("token request: {e}")))?
    };
    let t = create_join_token(st.objects.store().as_ref(), &st.ca.fingerprint(), &req).await?;
    Ok((StatusCode::CREATED, Json(t)).into_response())
}

async fn inventory_report(State(st): State<Arc<HubState>>, p: Principal) -> ApiResult<Response> {
    admin_only(&p, "the inventory")?;
    let (nodes, _) = st.objects.list::<NodeSpec>().await?;
    let ledgers = crate::inventory::ledgers(st.objects.store().as_ref()).await?;
    let report = crate::inventory::report(&nodes, &ledgers);
    let ledgers: Vec<_> = ledgers.into_values().map(|l| l.value).collect();
    Ok(Json(serde_json::json!({"report": report, "ledgers": ledgers})).into_response())
}

/// Query of the audit endpoint.
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    /// How many of the newest events (default 100).
    pub limit: Option<usize>,
}

async fn audit(
    State(st): State<Arc<HubState>>,
    p: Principal,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Response> {
    admin_only(&p, "the inventory audit log")?;
    let events =
        crate::inventory::audit(st.objects.store().as_ref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(serde_json::json!({"items": events})).into_response())
}

/// Writes made at region hubs that lost to the centre's ([`crate::region`]).
async fn conflicts(State(st): State<Arc<HubState>>, p: Principal) -> ApiResult<Response> {
    admin_only(&p, "the conflicts between tiers")?;
    let items = crate::region::conflicts(st.objects.store().as_ref()).await?;
    Ok(Json(serde_json::json!({"items": items})).into_response())
}

async fn sched_plan(
    State(st): State<Arc<HubState>>,
    p: Principal,
    body: Bytes,
) -> ApiResult<Response> {
    admin_only(&p, "scheduling plans")?;
    let req: crate::offline::PlanRequest = if body.is_empty() {
        Default::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(ErrorCode::Invalid, format!("plan request: {e}")))?
    };
    let report = crate::offline::plan(&st, &req).await?;
    Ok(Json(report).into_response())
}

#[derive(Debug, Deserialize)]
struct TopQuery {
    #[serde(default)]
    kind: Option<String>,
    #[serde(flatten)]
    sel: crate::telemetry::Selector,
}

async fn metrics_query(
    State(st): State<Arc<HubState>>,
    p: Principal,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    Query(sel): Query<crate::telemetry::Selector>,
) -> ApiResult<Response> {
    admin_only(&p, "metrics")?;
    let local = crate::telemetry::query(&st, &sel).await?;
    Ok(
        Json(crate::telemetry::with_other_replicas(&st, &uri, &headers, local, "series").await)
            .into_response(),
    )
}

async fn metrics_top(
    State(st): State<Arc<HubState>>,
    p: Principal,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    Query(q): Query<TopQuery>,
) -> ApiResult<Response> {
    admin_only(&p, "metrics")?;
    let kind = q.kind.as_deref().unwrap_or("nodes");
    let local = crate::telemetry::top(&st, kind, &q.sel).await?;
    Ok(
        Json(crate::telemetry::with_other_replicas(&st, &uri, &headers, local, "items").await)
            .into_response(),
    )
}

async fn metrics_federate(State(st): State<Arc<HubState>>, p: Principal) -> ApiResult<Response> {
    admin_only(&p, "metrics")?;
    let text = crate::telemetry::federate(&st).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn metrics_stats(State(st): State<Arc<HubState>>, p: Principal) -> ApiResult<Response> {
    admin_only(&p, "metrics")?;
    Ok(Json(st.tsdb.stats()).into_response())
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocolVersion": PROTOCOL_VERSION,
    }))
}

async fn metrics(State(st): State<Arc<HubState>>) -> Response {
    if let Ok(rev) = st.objects.store().revision().await {
        st.metrics.store_revision.set(rev as i64);
    }
    st.metrics.edges_connected.set(st.edges.len() as i64);
    let packets = st.limits.load.packets();
    st.metrics.quic_socket_queued.set(packets.queued as i64);
    st.metrics.quic_socket_drops.set(packets.drops as i64);
    st.metrics
        .tls_tickets_issued
        .set(st.tickets.issued() as i64);
    st.metrics.tls_resumptions.set(st.tickets.accepted() as i64);
    st.metrics
        .shedding
        .set(i64::from(st.limits.load.shedding().is_some()));
    if let Ok(rev) = st.objects.store().revision().await {
        st.metrics
            .sync_lag
            .set(rev.saturating_sub(st.fanout.revision()) as i64);
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &st.metrics.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// While the hub is behind on its work (its [`crate::limits::LoadGauge`] over the
/// lag at which it also holds back new edge connections), writes through the API
/// wait for it to catch up, [`WRITE_HOLD`] at most, and are then refused with 503
/// and `Retry-After: 1`; reads are served. A client applying faster than the hub's
/// runtime keeps up with is slowed to its pace, and the sessions already up keep the
/// CPU that keeps them alive. The CLI and the simulator wait and try again. The gauge
/// also watches the QUIC socket: a burst of 100,000 instances starved the hub's
/// socket reader while the runtime's timers stayed on time, and nothing was refused
/// until it did (docs/BENCHMARKS.md).
async fn shed_writes(State(st): State<Arc<HubState>>, req: Request, next: Next) -> Response {
    match write_held(req.method(), &st.limits.load).await {
        Some(refused) => refused.into_response(),
        None => next.run(req).await,
    }
}

/// Hold a request with `method` while the hub is behind ([`shed_writes`]): `None`
/// once it may go on, the refusal if the hub is still behind after [`WRITE_HOLD`].
/// Held, a write costs a timer; refused at once, its client waits a whole second
/// whenever the hub is behind for a moment (a burst of 100,000 applies was refused
/// 2,483 times so, each costing one of its 48 writers a second).
async fn write_held(
    method: &axum::http::Method,
    load: &crate::limits::LoadGauge,
) -> Option<HttpError> {
    let until = tokio::time::Instant::now() + WRITE_HOLD;
    loop {
        let refused = write_refused(method, load)?;
        if tokio::time::Instant::now() >= until {
            return Some(refused);
        }
        tokio::time::sleep(WRITE_HOLD_LOOK).await;
    }
}

/// How long a write waits for a hub that is behind before it is refused.
const WRITE_HOLD: Duration = Duration::from_secs(2);
/// How often a held write looks again.
const WRITE_HOLD_LOOK: Duration = Duration::from_millis(50);

/// Why a request with `method` is refused now ([`shed_writes`]), if it is.
fn write_refused(
    method: &axum::http::Method,
    load: &crate::limits::LoadGauge,
) -> Option<HttpError> {
    use axum::http::Method;
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let refusal = load.shedding()?;
    Some(HttpError(
        ApiError::new(
            ErrorCode::Unavailable,
            format!("{refusal}: writes wait until it catches up; try again in a second"),
        )
        .retry_after(Duration::from_secs(1)),
    ))
}

async fn count_requests(State(st): State<Arc<HubState>>, req: Request, next: Next) -> Response {
    // By route template (`/v1/instances/{name}`), never by the path itself: one
    // series per route, however many objects there are.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let method = req.method().as_str().to_string();
    let began = std::time::Instant::now();
    let resp = next.run(req).await;
    st.metrics
        .api_latency
        .get_or_create(&vec![
            ("route".to_string(), route),
            ("method".to_string(), method),
        ])
        .observe(began.elapsed().as_secs_f64());
    st.metrics
        .api_requests
        .get_or_create(&vec![(
            "code".to_string(),
            resp.status().as_u16().to_string(),
        )])
        .inc();
    resp
}

async fn not_found() -> HttpError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; the API lives under /v1/{nodes,instances,regions,clusters,applications,clustertemplates,tokens,inventory,sched,artifacts,metrics,events}",
    )
    .into()
}

fn kind_routes<S: NodeScoped>() -> Router<Arc<HubState>> {
    let base = format!("/v1/{}", S::PLURAL);
    Router::new()
        .route(&base, get(list::<S>).post(create::<S>))
        .route(
            &format!("{base}/{{name}}"),
            get(get_one::<S>).put(apply::<S>).delete(delete_one::<S>),
        )
        .route(&format!("{base}/{{name}}/status"), put(put_status::<S>))
}

/// The API router.
pub fn router(state: Arc<HubState>) -> Router {
    Router::new()
        .merge(kind_routes::<NodeSpec>())
        .merge(kind_routes::<InstanceSpec>())
        .merge(kind_routes::<RegionSpec>())
        .merge(kind_routes::<verge_api::ClusterSpec>())
        .merge(kind_routes::<verge_api::ApplicationSpec>())
        .merge(kind_routes::<verge_api::ClusterTemplateSpec>())
        .route(
            "/v1/applications/{name}/rollout/{action}",
            post(rollout_action::<verge_api::ApplicationSpec>),
        )
        .route(
            "/v1/clustertemplates/{name}/rollout/{action}",
            post(rollout_action::<verge_api::ClusterTemplateSpec>),
        )
        .route("/v1/applications/{name}/preview", post(application_preview))
        .route("/v1/inventory", get(inventory_report))
        .route("/v1/inventory/audit", get(audit))
        .route("/v1/conflicts", get(conflicts))
        .route(
            "/v1/sched/plan",
            post(sched_plan).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                crate::replicas::to_leader,
            )),
        )
        .merge(
            // Routes that need the edge's session go to the replica that holds it.
            Router::new()
                .route("/v1/instances/{name}/logs", get(logs))
                .route("/v1/instances/{name}/exec", get(exec))
                .route("/v1/instances/{name}/portforward", get(port_forward))
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    crate::replicas::to_session_holder,
                )),
        )
        .route("/v1/tokens", post(tokens))
        .route("/v1/replicas", get(crate::replicas::list_handler))
        .route(
            "/v1/artifacts",
            get(crate::artifacts::handlers::get_list).put(crate::artifacts::handlers::put),
        )
        .route(
            "/v1/artifacts/{digest}",
            get(crate::artifacts::handlers::get_one).delete(crate::artifacts::handlers::delete_one),
        )
        .route("/v1/events", get(events))
        .route("/console", get(crate::console::page))
        .route("/v1/console/summary", get(crate::console::summary))
        .route("/v1/console/nodes", get(crate::console::nodes))
        .route("/v1/console/instances", get(crate::console::instances))
        .route("/v1/console/watch", get(crate::console::watch))
        .route("/v1/metrics", get(metrics_query))
        .route("/v1/metrics/top", get(metrics_top))
        .route("/v1/metrics/federate", get(metrics_federate))
        .route("/v1/metrics/stats", get(metrics_stats))
        .route("/v1/version", get(version))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            shed_writes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub behind on its work refuses writes, saying why and when to try again,
    /// and still serves reads; one that keeps up refuses nothing.
    #[test]
    fn writes_wait_while_the_hub_lags_and_reads_do_not() {
        use axum::http::Method;
        let load = crate::limits::LoadGauge::default();
        for m in [Method::GET, Method::PUT, Method::POST, Method::DELETE] {
            assert!(write_refused(&m, &load).is_none(), "{m} while keeping up");
        }
        load.set(crate::limits::SHED_LAG * 3);
        for m in [Method::GET, Method::HEAD] {
            assert!(write_refused(&m, &load).is_none(), "{m} while lagging");
        }
        for m in [Method::PUT, Method::POST, Method::PATCH, Method::DELETE] {
            let refused = write_refused(&m, &load).expect("a write while lagging");
            assert!(
                refused.0.message.contains("600 ms behind on its work"),
                "{}",
                refused.0.message
            );
            let r = refused.into_response();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        }
    }

    /// A write that comes while the hub is behind waits for it to catch up, and is
    /// refused only if it does not within the hold.
    #[tokio::test(start_paused = true)]
    async fn a_write_waits_for_a_hub_behind_for_a_moment() {
        use axum::http::Method;
        let load = crate::limits::LoadGauge::default();
        load.set(crate::limits::SHED_LAG * 3);
        let start = tokio::time::Instant::now();
        let caught_up = {
            let load = load.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                load.set(Duration::ZERO);
            }
        };
        let (held, ()) = tokio::join!(write_held(&Method::PUT, &load), caught_up);
        assert!(held.is_none(), "it goes on once the hub caught up");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(700) && waited < Duration::from_millis(800),
            "{waited:?}"
        );
        load.set(crate::limits::SHED_LAG * 3);
        let start = tokio::time::Instant::now();
        let refused = write_held(&Method::DELETE, &load).await.expect("refused");
        assert_eq!(start.elapsed(), WRITE_HOLD);
        assert_eq!(
            refused.into_response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(
            write_held(&Method::GET, &load).await.is_none(),
            "reads go on"
        );
    }
}
