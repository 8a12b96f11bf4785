//! Hub replicas on one store: membership, leader election, where each edge's session
//! lives, and requests forwarded to the replica that holds an edge.
//!
//! Any number of `verge hub` processes may share one store (etcd). Each is a
//! *replica*: it serves the REST API and edge connections. Everything a replica
//! announces hangs off one store lease of its own, kept alive every quarter TTL, so
//! that when a replica dies its announcements vanish with the lease:
//!
//! - `/verge/hubs/ID`: that it is alive, and the URL other replicas reach it at;
//! - `/verge/sessions/NODE`: that it holds NODE's channel session (one session per
//!   node across all replicas: a replica that sees another claim one of its nodes
//!   closes its own, older session);
//! - `/verge/leader`: that it is the leader, taken with a create-if-absent
//!   transaction. Controllers (node lifecycle, scheduling, compaction) run on the
//!   leader only ([`lead_controllers`]); the others wait on a watch of the key and
//!   campaign the moment it is deleted, so a leader that dies is replaced within its
//!   lease TTL plus etcd's expiry check.
//!
//! A leader that cannot renew its lease for three quarters of the TTL steps down
//! before anyone could have taken over, so two leaders never run at once for longer
//! than a store round trip; controllers write with compare-and-swap besides, so even
//! then no decision is applied twice.
//!
//! Logs, exec and port-forward for an edge held by another replica are forwarded to
//! it ([`forward`]): the operator may talk to any replica.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use verge_api::{ApiError, ErrorCode, InstanceSpec};
use verge_store::{Compare, EventKind, LeaseId, Op, StoreError, StoreExt, Txn};

use crate::state::HubState;

/// Where live replicas announce themselves.
pub const HUBS_PREFIX: &str = "/verge/hubs/";
/// Which replica holds each node's session.
pub const SESSIONS_PREFIX: &str = "/verge/sessions/";
/// The leader's key.
pub const LEADER_KEY: &str = "/verge/leader";

/// What a replica announces about itself (the value of its hub and leader keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRecord {
    /// The replica's id.
    pub id: String,
    /// Where other replicas reach its API.
    pub url: String,
}

/// A node's session record: which replica holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionRecord {
    /// The replica.
    pub hub: String,
    /// Its URL.
    pub url: String,
    /// Its connection id (a reconnect to the same replica is a new one).
    pub conn: u64,
}

/// This replica: who it is, its lease, whether it leads.
pub struct Replica {
    /// Its id (kept in `DATA_DIR/replica-id`, so a restart is the same replica).
    pub id: String,
    /// Where the others reach it.
    pub url: String,
    /// How long its lease lives unrenewed.
    pub ttl: Duration,
    lease: watch::Sender<Option<LeaseId>>,
    leader: watch::Sender<bool>,
}

impl Replica {
    /// A replica that has no lease yet and does not lead.
    pub fn new(id: String, url: String, ttl: Duration) -> Self {
        Self {
            id,
            url,
            ttl,
            lease: watch::channel(None).0,
            leader: watch::channel(false).0,
        }
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Follow leadership changes.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// The live lease, if any.
    pub fn lease(&self) -> Option<LeaseId> {
        *self.lease.borrow()
    }

    fn record(&self) -> Vec<u8> {
        serde_json::to_vec(&ReplicaRecord {
            id: self.id.clone(),
            url: self.url.clone(),
        })
        .unwrap_or_default()
    }
}

/// Read this data directory's replica id, or make one.
pub fn replica_id(dir: &std::path::Path) -> Result<String, crate::SetupError> {
    let path = dir.join("replica-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if verge_api::validate::is_dns_label(id) {
            return Ok(id.to_string());
        }
    }
    let b: [u8; 6] = rand::random();
    let id = format!("hub-{}", verge_tunnel::pki::hex(&b));
    crate::config::write_private(&path, id.as_bytes())?;
    Ok(id)
}

fn leased_put(key: &str, value: Vec<u8>, lease: LeaseId) -> Op {
    Op::Put {
        key: key.to_string(),
        value,
        lease: Some(lease),
    }
}

/// Keep this replica's lease alive; grant a new one (and announce everything again)
/// when it is lost. Runs for the hub's life.
pub async fn keep_lease(st: Arc<HubState>) {
    let r = &st.replica;
    let store = st.objects.store().clone();
    loop {
        let lease = match store.lease_grant(r.ttl).await {
            Ok(l) => l.id,
            Err(e) => {
                tracing::warn!(error = %e, "cannot grant this replica's lease; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Err(e) = announce(&st, lease).await {
            tracing::warn!(error = %e, "cannot announce this replica; retrying");
            let _ = store.lease_revoke(lease).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        r.lease.send_replace(Some(lease));
        tracing::info!(replica = %r.id, lease = format!("{lease:x}"), "replica lease granted");
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(r.ttl / 4).await;
            match store.lease_keep_alive(lease).await {
                Ok(()) => renewed = Instant::now(),
                Err(StoreError::LeaseNotFound { .. }) => {
                    tracing::warn!(replica = %r.id, "replica lease expired; announcing again");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the replica lease");
                    // Past three quarters of the TTL another replica may take over
                    // soon: stop leading before it can.
                    if renewed.elapsed() >= r.ttl * 3 / 4 {
                        break;
                    }
                }
            }
        }
        r.lease.send_replace(None);
    }
}

/// Put this replica's hub key and a session key for every edge it holds.
async fn announce(st: &HubState, lease: LeaseId) -> Result<(), StoreError> {
    let r = &st.replica;
    let mut ops = vec![leased_put(
        &format!("{HUBS_PREFIX}{}", r.id),
        r.record(),
        lease,
    )];
    for (node, conn) in st
        .edges
        .sessions()
        .into_iter()
        .filter(|_| st.config.shared_store)
    {
        ops.push(leased_put(
            &format!("{SESSIONS_PREFIX}{node}"),
            session_value(st, conn),
            lease,
        ));
    }
    st.objects
        .store()
        .txn(Txn {
            compares: Vec::new(),
            ops,
        })
        .await
        .map(drop)
}

fn session_value(st: &HubState, conn: u64) -> Vec<u8> {
    serde_json::to_vec(&SessionRecord {
        hub: st.replica.id.clone(),
        url: st.replica.url.clone(),
        conn,
    })
    .unwrap_or_default()
}

/// Record that this replica holds `node`'s session `conn` (other replicas holding an
/// older one close it when they see this).
///
/// Only on a store that replicas share: a hub with the store to itself knows its
/// sessions from its registry, and a write per connect (and per disconnect) would
/// cost a fleet reconnecting to it as many writes again.
pub async fn claim_session(st: &HubState, node: &str, conn: u64) {
    if !st.config.shared_store {
        return;
    }
    let Some(lease) = st.replica.lease() else {
        // Announced with everything else once the lease is back.
        return;
    };
    let key = format!("{SESSIONS_PREFIX}{node}");
    let op = leased_put(&key, session_value(st, conn), lease);
    if let Err(e) = st
        .objects
        .store()
        .txn(Txn {
            compares: Vec::new(),
            ops: vec![op],
        })
        .await
    {
        tracing::warn!(node, error = %e, "cannot record the node's session");
    }
}

/// Nodes whose sessions other replicas hold (none when this hub has the store to
/// itself): they are alive as long as those replicas are. `None` if the store cannot
/// say.
pub async fn sessions_elsewhere(st: &HubState) -> Option<std::collections::HashSet<String>> {
    if !st.config.shared_store {
        return Some(Default::default());
    }
    let r = st.objects.store().range(SESSIONS_PREFIX).await.ok()?;
    let held = r
        .kvs
        .iter()
        .filter(|kv| {
            serde_json::from_slice::<SessionRecord>(&kv.value).is_ok_and(|s| s.hub != st.replica.id)
        })
        .map(|kv| kv.key.trim_start_matches(SESSIONS_PREFIX).to_string())
        .collect();
    Some(held)
}

/// Forget `node`'s session record if it is still this replica's connection `conn`.
pub async fn release_session(st: &HubState, node: &str, conn: u64) {
    if !st.config.shared_store {
        return;
    }
    let store = st.objects.store();
    let key = format!("{SESSIONS_PREFIX}{node}");
    let Ok(Some(kv)) = store.get(&key).await else {
        return;
    };
    let ours = serde_json::from_slice::<SessionRecord>(&kv.value)
        .is_ok_and(|s| s.hub == st.replica.id && s.conn == conn);
    if ours {
        let _ = store.delete(&key, Some(kv.mod_revision)).await;
    }
}

/// The replica holding `node`'s session, if another one does.
pub async fn session_elsewhere(st: &HubState, node: &str) -> Option<SessionRecord> {
    if !st.config.shared_store {
        return None;
    }
    let kv = st
        .objects
        .store()
        .get(&format!("{SESSIONS_PREFIX}{node}"))
        .await
        .ok()??;
    serde_json::from_slice::<SessionRecord>(&kv.value)
        .ok()
        .filter(|s| s.hub != st.replica.id)
}

/// Close local sessions of nodes that another replica now holds (the edge moved and
/// this side has not noticed its old connection die yet).
pub async fn follow_sessions(st: Arc<HubState>) {
    loop {
        let mut w = match st.objects.store().watch(SESSIONS_PREFIX, 0).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch sessions; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(Ok(batch)) = w.recv().await {
            for ev in batch.events {
                if ev.kind != EventKind::Put {
                    continue;
                }
                let Ok(s) = serde_json::from_slice::<SessionRecord>(&ev.kv.value) else {
                    continue;
                };
                if s.hub == st.replica.id {
                    continue;
                }
                let node = ev.kv.key.trim_start_matches(SESSIONS_PREFIX);
                st.edges.evict(
                    node,
                    "replaced",
                    &format!(
                        "node '{node}' connected to hub replica {}; its session here ended",
                        s.hub
                    ),
                );
            }
        }
    }
}

/// Campaign for leadership whenever this replica has a lease and nobody leads; lead
/// until the lease or the key is lost.
pub async fn campaign(st: Arc<HubState>) {
    let r = &st.replica;
    let store = st.objects.store().clone();
    let mut leases = r.lease.subscribe();
    loop {
        let Some(lease) = *leases.borrow_and_update() else {
            r.leader.send_replace(false);
            if leases.changed().await.is_err() {
                return;
            }
            continue;
        };
        // A leader key left by this same replica before a restart is ours to drop.
        if let Ok(Some(kv)) = store.get(LEADER_KEY).await
            && serde_json::from_slice::<ReplicaRecord>(&kv.value).is_ok_and(|l| l.id == r.id)
        {
            let _ = store.delete(LEADER_KEY, Some(kv.mod_revision)).await;
        }
        let won = store
            .txn(Txn {
                compares: vec![Compare {
                    key: LEADER_KEY.into(),
                    mod_revision: 0,
                }],
                ops: vec![leased_put(LEADER_KEY, r.record(), lease)],
            })
            .await;
        let revision = match won {
            Ok(t) if t.succeeded => {
                tracing::info!(replica = %r.id, "this replica leads");
                r.leader.send_replace(true);
                t.revision
            }
            Ok(t) => t.revision,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Wait for the key to go (or, leading, to stop being ours), or the lease.
        let mut w = match store.watch(LEADER_KEY, revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the leader key; retrying");
                r.leader.send_replace(false);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                b = w.recv() => match b {
                    Some(Ok(b)) => {
                        let gone = b.events.iter().any(|e| e.kv.key == LEADER_KEY && (e.kind == EventKind::Delete
                            || serde_json::from_slice::<ReplicaRecord>(&e.kv.value).is_ok_and(|l| l.id != r.id)));
                        if gone { break; }
                    }
                    _ => break,
                },
                changed = leases.changed() => {
                    if changed.is_err() || *leases.borrow() != Some(lease) { break; }
                }
            }
        }
        if r.leader.send_replace(false) {
            tracing::warn!(replica = %r.id, "this replica no longer leads");
        }
    }
}

/// Run `controllers` while this replica leads; stop them the moment it does not.
pub async fn lead_controllers<F, Fut>(st: Arc<HubState>, controllers: F)
where
    F: Fn(Arc<HubState>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut leading = st.replica.leadership();
    loop {
        while !*leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                return;
            }
        }
        st.metrics.leader.set(1);
        let task = tokio::spawn(controllers(st.clone()));
        while *leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                break;
            }
        }
        task.abort();
        st.metrics.leader.set(0);
    }
}

/// The bearer token replicas use with each other: derived from the CA key they share,
/// so no replica has to hand it to another.
pub fn peer_token(st: &HubState) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::new()
        .chain_update(b"verge hub peer token\0")
        .chain_update(st.ca.key_pem().as_bytes())
        .finalize();
    format!("peer_{}", verge_tunnel::pki::hex(&d))
}

/// Middleware for the routes that need an edge's session (logs, exec, port-forward):
/// when another replica holds it, the request goes there, upgrades and all.
pub async fn to_session_holder(
    State(st): State<Arc<HubState>>,
    req: Request,
    next: Next,
) -> Response {
    let name = req
        .uri()
        .path()
        .trim_start_matches("/v1/instances/")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let node = match st.objects.get::<InstanceSpec>(&name).await {
        Ok(i) => i.status.node.clone(),
        Err(_) => None,
    };
    // A node of a region that has a hub is served there, through its uplink, unless it
    // talks to this hub now (an edge that failed over here; a session it left here
    // when it moved to its region goes quiet).
    let live_here = |node: &str| {
        st.edges.conn(node).is_ok_and(|c| {
            c.last_heard().elapsed() < st.config.heartbeat_interval * 2 + Duration::from_secs(1)
        })
    };
    if let Some(node) = &node
        && !live_here(node)
        && let Ok(n) = st.objects.get::<verge_api::NodeSpec>(node).await
        && let Some(region) = n.metadata.labels.get(verge_api::region::REGION_LABEL)
        && st.uplinks.connected(region)
    {
        return match crate::region::centre::forward(&st, region, req).await {
            Ok(r) => r,
            Err(e) => crate::http::HttpError(e).into_response(),
        };
    }
    if let Some(node) = node
        && st.edges.conn(&node).is_err()
        && let Some(holder) = session_elsewhere(&st, &node).await
    {
        if !req.headers().contains_key(header::AUTHORIZATION) {
            return crate::http::HttpError(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "node '{node}' is connected to hub replica {} ({}); ask it there",
                    holder.hub, holder.url
                ),
            ))
            .into_response();
        }
        return match forward(&st, &holder.url, req).await {
            Ok(r) => r,
            Err(e) => crate::http::HttpError(e).into_response(),
        };
    }
    next.run(req).await
}

/// Middleware for operations that belong to the controllers (carrying out a
/// defragmentation plan): a replica that does not lead forwards them to the one that
/// does, so that the leader alone moves instances.
pub async fn to_leader(State(st): State<Arc<HubState>>, req: Request, next: Next) -> Response {
    if st.replica.is_leader() || !req.headers().contains_key(header::AUTHORIZATION) {
        return next.run(req).await;
    }
    let leader = match st.objects.store().get(LEADER_KEY).await {
        Ok(Some(kv)) => serde_json::from_slice::<ReplicaRecord>(&kv.value).ok(),
        _ => None,
    };
    // Nobody leads (a hub just started, or an election is under way): carry it out
    // here; its writes are compare-and-swap like every controller's.
    let Some(leader) = leader.filter(|l| l.id != st.replica.id) else {
        return next.run(req).await;
    };
    match forward(&st, &leader.url, req).await {
        Ok(r) => r,
        Err(e) => crate::http::HttpError(e).into_response(),
    }
}

/// An HTTP/1.1 connection (upgrades allowed) to the replica at `url`, verified
/// against the cluster CA.
async fn connect(
    st: &HubState,
    url: &str,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, ApiError> {
    let unavailable = |why: String| ApiError::new(ErrorCode::Unavailable, why);
    let addr = verge_tunnel::tls::hub_addr(url).map_err(|e| unavailable(e.to_string()))?;
    let tls = verge_tunnel::tls::client_config(st.ca.cert_pem(), None, &[b"http/1.1"])
        .map_err(|e| unavailable(e.to_string()))?;
    let io = tokio::time::timeout(Duration::from_secs(10), verge_tunnel::tls::dial(&addr, tls))
        .await
        .map_err(|_| unavailable(format!("hub replica {url} did not answer within 10s")))?
        .map_err(|e| unavailable(format!("hub replica {url}: {e}")))?;
    handshake(io, &format!("hub replica {url}")).await
}

/// An HTTP/1.1 client connection (upgrades allowed) over `io`.
async fn handshake(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    to: &str,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, ApiError> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("{to}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// Send `req` to the replica at `url` and relay its answer (a body streamed back, or
/// an upgraded connection spliced both ways).
pub async fn forward(st: &HubState, url: &str, req: Request) -> Result<Response, ApiError> {
    let sender = connect(st, url).await?;
    forward_with(st, sender, &format!("hub replica {url}"), req).await
}

/// Send `req` over `io` (a connection to another hub: a region hub through its
/// uplink) and relay its answer, upgrades spliced.
pub async fn forward_over(
    st: &HubState,
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    to: &str,
    req: Request,
) -> Result<Response, ApiError> {
    let sender = handshake(io, to).await?;
    forward_with(st, sender, to, req).await
}

async fn forward_with(
    st: &HubState,
    mut sender: hyper::client::conn::http1::SendRequest<Body>,
    to: &str,
    mut req: Request,
) -> Result<Response, ApiError> {
    let unavailable = |why: String| ApiError::new(ErrorCode::Unavailable, why);
    let url = to;
    let client_upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_default();
    parts.headers.insert(
        FORWARDED_BY,
        st.replica
            .id
            .parse()
            .unwrap_or(header::HeaderValue::from_static("hub")),
    );
    let mut resp = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| unavailable(format!("{url}: {e}")))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade
    {
        let remote = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(client), Ok(remote)) = (client.await, remote.await) else {
                return;
            };
            // Each direction runs to its own end and then closes its writer:
            // `copy_bidirectional` would return at the first error of either one and
            // drop both sides, losing what the other had written but not flushed (the
            // `exit` chunk of an exec relayed through a region).
            use tokio::io::AsyncWriteExt;
            let (mut cr, mut cw) = tokio::io::split(TokioIo::new(client));
            let (mut rr, mut rw) = tokio::io::split(TokioIo::new(remote));
            let up = async {
                let _ = tokio::io::copy(&mut cr, &mut rw).await;
                let _ = rw.shutdown().await;
            };
            let down = async {
                let _ = tokio::io::copy(&mut rr, &mut cw).await;
                let _ = cw.shutdown().await;
            };
            tokio::join!(up, down);
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Open a port-forward to `instance`'s `port` through the replica at `url` (which
/// holds the instance's edge): the upgraded connection, carrying chunks as a data
/// stream does. Relays between edges on different replicas go through it.
pub async fn port_forward_at(
    st: &HubState,
    url: &str,
    instance: &str,
    port: u16,
) -> Result<Box<dyn verge_tunnel::quic::Duplex>, ApiError> {
    let stream = String::from_utf8_lossy(verge_api::channel::ALPN_STREAM).into_owned();
    let req = Request::get(format!("/v1/instances/{instance}/portforward?port={port}"))
        .header(header::AUTHORIZATION, format!("Bearer {}", peer_token(st)))
        .header(header::HOST, "verge-hub")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, stream)
        .body(Body::empty())
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let unavailable = |why: String| ApiError::new(ErrorCode::Unavailable, why);
    let mut sender = connect(st, url).await?;
    let mut resp = sender
        .send_request(req)
        .await
        .map_err(|e| unavailable(format!("hub replica {url}: {e}")))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(unavailable(format!(
            "hub replica {url} refused the port-forward to {instance}:{port} ({})",
            resp.status()
        )));
    }
    let up = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| unavailable(format!("hub replica {url}: {e}")))?;
    Ok(Box::new(TokioIo::new(up)))
}

/// The header a replica marks the requests it forwards with.
pub const FORWARDED_BY: &str = "x-verge-forwarded-by";

/// Ask every other live replica the same `GET path_and_query`, as a peer (marked
/// forwarded, so each answers for itself alone), at once: their JSON answers, and
/// the replicas that gave none (what a replica holds in memory, such as its edges'
/// metrics, is gathered this way).
pub async fn gather(st: &HubState, path_and_query: &str) -> (Vec<serde_json::Value>, Vec<String>) {
    let others: Vec<ReplicaRecord> = live_replicas(st)
        .await
        .into_iter()
        .filter(|r| r.id != st.replica.id)
        .collect();
    let token = peer_token(st);
    let asks = others.iter().map(|r| {
        let token = token.clone();
        async move {
            let req = Request::builder()
                .method("GET")
                .uri(path_and_query)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(Duration::from_secs(10), forward(st, &r.url, req))
                .await
                .map_err(|_| "no answer within 10s".to_string())?
                .map_err(|e| e.message)?;
            if !resp.status().is_success() {
                return Err(format!("answered {}", resp.status()));
            }
            let body = axum::body::to_bytes(resp.into_body(), 64 << 20)
                .await
                .map_err(|e| e.to_string())?;
            serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| e.to_string())
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut got = Vec::new();
    let mut missing = Vec::new();
    for (r, a) in others.iter().zip(answers) {
        match a {
            Ok(v) => got.push(v),
            Err(e) => {
                tracing::warn!(replica = %r.id, error = %e, "a replica did not answer a gathered query");
                missing.push(r.id.clone());
            }
        }
    }
    (got, missing)
}

/// Live replicas (their records), this one included.
pub async fn live_replicas(st: &HubState) -> Vec<ReplicaRecord> {
    st.objects
        .store()
        .range(HUBS_PREFIX)
        .await
        .map(|r| {
            r.kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /v1/replicas`: the live replicas, which one leads, and which holds each
/// node's session (admins only).
pub async fn list_handler(
    State(st): State<Arc<HubState>>,
    p: crate::http::Principal,
) -> Result<axum::Json<serde_json::Value>, crate::http::HttpError> {
    crate::http::admin_only(&p, "hub replicas")?;
    let store = st.objects.store();
    let err = |e: StoreError| crate::http::HttpError(crate::objects::store_err(e));
    let leader = store
        .get(LEADER_KEY)
        .await
        .map_err(err)?
        .and_then(|kv| serde_json::from_slice::<ReplicaRecord>(&kv.value).ok())
        .map(|r| r.id);
    // A hub with the store to itself records no sessions there: its registry has them.
    let sessions: serde_json::Map<String, serde_json::Value> = if st.config.shared_store {
        store
            .range(SESSIONS_PREFIX)
            .await
            .map_err(err)?
            .kvs
            .iter()
            .filter_map(|kv| {
                let s: SessionRecord = serde_json::from_slice(&kv.value).ok()?;
                Some((
                    kv.key.trim_start_matches(SESSIONS_PREFIX).to_string(),
                    s.hub.into(),
                ))
            })
            .collect()
    } else {
        st.edges
            .sessions()
            .into_iter()
            .map(|(node, _)| (node, st.replica.id.clone().into()))
            .collect()
    };
    Ok(axum::Json(serde_json::json!({
        "self": st.replica.id,
        "leader": leader,
        "replicas": live_replicas(&st).await,
        "sessions": sessions,
    })))
}
