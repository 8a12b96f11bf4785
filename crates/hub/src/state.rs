//! The hub's shared state: store access, CA, connected edges, metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use verge_api::channel::{HubToEdge, RequestBody, ResponseBody, STREAMS_SINCE, StreamPurpose};
use verge_api::{ApiError, ErrorCode};
use verge_tunnel::pki::CertAuthority;
use verge_tunnel::quic::Duplex;

use crate::config::HubConfig;
use crate::objects::Objects;

/// How long an edge has to open a data stream the hub asked for.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Label set for metrics families.
pub type Labels = Vec<(String, String)>;

/// The hub's metrics.
pub struct Metrics {
    /// Registry for `/metrics`.
    pub registry: Registry,
    /// Edges with a live channel.
    pub edges_connected: Gauge,
    /// API requests by status code.
    pub api_requests: Family<Labels, Counter>,
    /// Enrolment attempts by result.
    pub enrolments: Family<Labels, Counter>,
    /// Instances placed by the scheduler.
    pub placements: Counter,
    /// Instances by phase (as of the last scheduler pass).
    pub instances: Family<Labels, Gauge>,
    /// Nodes by phase (as of the last node-controller pass).
    pub nodes: Family<Labels, Gauge>,
    /// Current store revision.
    pub store_revision: Gauge,
    /// Frames received from edges that were refused (malformed or forbidden).
    pub channel_rejected: Counter,
    /// Data streams by purpose (`exec`, `portForward`, `logs`, `relay`) and result.
    pub streams: Family<Labels, Counter>,
    /// Connections turned away at a limit, by reason.
    pub connections_refused: Family<Labels, Counter>,
    /// Channel sessions closed because a newer one for the same node arrived.
    pub sessions_replaced: Counter,
    /// Channel sessions, data streams and REST requests refused because their node
    /// certificate was revoked, by reason (`nodeDeleted`, `revoked`).
    pub revoked_certificates: Family<Labels, Counter>,
    /// Watches ended because their reader fell too far behind.
    pub watches_dropped: Counter,
    /// Store call latency by operation ([`crate::timed_store`]).
    pub store_latency: crate::timed_store::StoreLatency,
    /// API request latency by route and method.
    pub api_latency: crate::timed_store::StoreLatency,
    /// How long scheduling passes take.
    pub schedule_pass: Histogram,
    /// Revisions the edges' shared watch is behind the store (sampled at scrape).
    pub sync_lag: Gauge,
    /// Events dropped: the queue was full or the store refused them.
    pub events_dropped: Counter,
    /// Metrics samples taken from edges.
    pub samples_ingested: Counter,
    /// Bytes of metrics rounds taken from edges (their encoded size on the stream).
    pub metrics_bytes: Counter,
    /// Metrics samples refused: the series bound was reached.
    pub samples_refused: Counter,
    /// 1 while this replica leads (runs the controllers), else 0.
    pub leader: Gauge,
    /// 1 while a region hub's uplink to its centre is up, else 0.
    pub uplink_connected: Gauge,
    /// Edge sessions by how their desired state was sent: `resume` (changes from the
    /// edge's revision) or `snapshot` (everything).
    pub syncs: Family<Labels, Counter>,
    /// How late heartbeats arrive: the gap between two on one session, less the
    /// interval the edges were given.
    pub heartbeat_lag: Histogram,
    /// Bytes the hub's QUIC socket holds unread (sampled at scrape).
    pub quic_socket_queued: Gauge,
    /// Datagrams the hub's QUIC socket dropped since it opened (sampled at scrape).
    pub quic_socket_drops: Gauge,
    /// 1 while the hub puts off new work because it is behind, else 0 (sampled at
    /// scrape).
    pub shedding: Gauge,
    /// TLS session tickets handed out since start (sampled at scrape).
    pub tls_tickets_issued: Gauge,
    /// Handshakes that resumed a session from a ticket since start (sampled at scrape).
    pub tls_resumptions: Gauge,
    /// QUIC connections waiting for their handshake to begin ([`crate::handshakes`]).
    pub quic_handshakes_waiting: Gauge,
    /// QUIC handshakes begun and not finished.
    pub quic_handshakes_in_flight: Gauge,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("verge_hub");
        let m = Self {
            edges_connected: Gauge::default(),
            api_requests: Family::default(),
            enrolments: Family::default(),
            placements: Counter::default(),
            instances: Family::default(),
            nodes: Family::default(),
            store_revision: Gauge::default(),
            channel_rejected: Counter::default(),
            streams: Family::default(),
            connections_refused: Family::default(),
            sessions_replaced: Counter::default(),
            revoked_certificates: Family::default(),
            watches_dropped: Counter::default(),
            samples_ingested: Counter::default(),
            metrics_bytes: Counter::default(),
            store_latency: crate::timed_store::store_latency(),
            api_latency: crate::timed_store::store_latency(),
            schedule_pass: Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            sync_lag: Gauge::default(),
            events_dropped: Counter::default(),
            samples_refused: Counter::default(),
            leader: Gauge::default(),
            uplink_connected: Gauge::default(),
            syncs: Family::default(),
            heartbeat_lag: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0]),
            quic_socket_queued: Gauge::default(),
            quic_socket_drops: Gauge::default(),
            shedding: Gauge::default(),
            tls_tickets_issued: Gauge::default(),
            tls_resumptions: Gauge::default(),
            quic_handshakes_waiting: Gauge::default(),
            quic_handshakes_in_flight: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "quic_handshakes_waiting",
            "QUIC connections waiting for the hub to begin their handshake (at --handshake-rate)",
            m.quic_handshakes_waiting.clone(),
        );
        registry.register(
            "quic_handshakes_in_flight",
            "QUIC handshakes the hub has begun that have not finished",
            m.quic_handshakes_in_flight.clone(),
        );
        registry.register(
            "tls_tickets_issued",
            "TLS session tickets handed out since the hub started",
            m.tls_tickets_issued.clone(),
        );
        registry.register(
            "tls_resumptions",
            "TLS handshakes since the hub started that resumed a session from a ticket (no certificate signed or verified)",
            m.tls_resumptions.clone(),
        );
        registry.register(
            "quic_socket_queued_bytes",
            "Bytes the hub's QUIC socket holds unread (the kernel's accounting)",
            m.quic_socket_queued.clone(),
        );
        registry.register(
            "quic_socket_drops",
            "Datagrams the hub's QUIC socket dropped since it opened (its buffer was full)",
            m.quic_socket_drops.clone(),
        );
        registry.register(
            "shedding",
            "1 while the hub puts off new work (connections, API writes, placements) because it is behind",
            m.shedding.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections turned away at a limit (all, unauthenticated, http; in all or per address) and edge sessions sent away as busy (admit_rate)",
            m.connections_refused.clone(),
        );
        registry.register(
            "heartbeat_lag_seconds",
            "How late edge heartbeats arrive (gap between two on a session, less the interval)",
            m.heartbeat_lag.clone(),
        );
        registry.register(
            "sessions_replaced",
            "Channel sessions closed because a newer session for the same node arrived",
            m.sessions_replaced.clone(),
        );
        registry.register(
            "revoked_certificates",
            "Requests, sessions and streams refused because their node certificate was revoked",
            m.revoked_certificates.clone(),
        );
        registry.register(
            "syncs",
            "Edge sessions by how their desired state was sent (resume from the edge's revision, or snapshot)",
            m.syncs.clone(),
        );
        registry.register(
            "uplink_connected",
            "1 while this region hub's uplink to its centre is up",
            m.uplink_connected.clone(),
        );
        registry.register(
            "leader",
            "1 while this hub replica leads and runs the controllers",
            m.leader.clone(),
        );
        registry.register(
            "store_seconds",
            "Latency of the hub's store calls by operation",
            m.store_latency.clone(),
        );
        registry.register(
            "api_request_seconds",
            "Latency of API requests by route and method (streams: until the response starts)",
            m.api_latency.clone(),
        );
        registry.register(
            "schedule_pass_seconds",
            "How long scheduling passes take",
            m.schedule_pass.clone(),
        );
        registry.register(
            "sync_lag_revisions",
            "Store revisions the edges' shared watch is behind",
            m.sync_lag.clone(),
        );
        registry.register(
            "events_dropped",
            "Events dropped because the queue was full, the rate too high, or the store refused them",
            m.events_dropped.clone(),
        );
        registry.register(
            "metrics_samples_ingested",
            "Metrics samples taken from edges",
            m.samples_ingested.clone(),
        );
        registry.register(
            "metrics_bytes_received",
            "Bytes of metrics rounds taken from edges, as encoded on their streams",
            m.metrics_bytes.clone(),
        );
        registry.register(
            "metrics_samples_refused",
            "Metrics samples refused because the hub holds as many series as it may",
            m.samples_refused.clone(),
        );
        registry.register(
            "watches_dropped",
            "Watches ended because their reader fell too far behind",
            m.watches_dropped.clone(),
        );
        registry.register(
            "edges_connected",
            "Edges with a live channel",
            m.edges_connected.clone(),
        );
        registry.register(
            "api_requests",
            "REST API requests by status code",
            m.api_requests.clone(),
        );
        registry.register(
            "enrolments",
            "Edge enrolment attempts by result",
            m.enrolments.clone(),
        );
        registry.register(
            "placements",
            "Instances placed by the scheduler",
            m.placements.clone(),
        );
        registry.register("instances", "Instances by phase", m.instances.clone());
        registry.register("nodes", "Nodes by phase", m.nodes.clone());
        registry.register(
            "store_revision",
            "Current store revision",
            m.store_revision.clone(),
        );
        registry.register(
            "channel_rejected_frames",
            "Frames from edges refused as malformed or forbidden",
            m.channel_rejected.clone(),
        );
        registry.register(
            "streams",
            "Data streams (exec, port-forward, logs, relay) by purpose and result",
            m.streams.clone(),
        );
        Self { registry, ..m }
    }
}

/// The queue of messages to one edge's channel.
///
/// They go boxed: tokio's channel allocates room for 32 messages when it is made, and
/// a hub holds one queue per connected edge (32 `HubToEdge` took 2.6 KiB of every
/// edge's memory; 32 boxes take 256 bytes). A box per message sent costs little
/// beside its encoding.
#[derive(Clone)]
pub struct ToEdge(mpsc::Sender<Box<HubToEdge>>);

/// What a [`ToEdge`] queue's reader takes.
pub type FromHub = mpsc::Receiver<Box<HubToEdge>>;

/// The edge's queue is gone (its session ended).
pub type QueueClosed = mpsc::error::SendError<Box<HubToEdge>>;

impl ToEdge {
    /// A queue of at most `capacity` messages.
    pub fn channel(capacity: usize) -> (Self, FromHub) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self(tx), rx)
    }

    /// Queue `msg`, waiting for room.
    pub async fn send(&self, msg: HubToEdge) -> Result<(), QueueClosed> {
        self.0.send(Box::new(msg)).await
    }

    /// Queue `msg` if there is room now.
    pub fn try_send(
        &self,
        msg: HubToEdge,
    ) -> Result<(), mpsc::error::TrySendError<Box<HubToEdge>>> {
        self.0.try_send(Box::new(msg))
    }

    /// Resolves once the reader is gone.
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

/// One live edge channel.
pub struct EdgeConn {
    /// Identifies this connection (a reconnect gets a new one).
    pub id: u64,
    /// Messages to the edge.
    pub tx: ToEdge,
    /// The channel protocol version the edge spoke in its hello.
    pub protocol_version: u32,
    /// The enrolment of the certificate the session authenticated with (renewals keep
    /// it).
    pub enrolment: Option<String>,
    /// Why the hub ended this session, as the wire code and message the edge gets.
    refusal: Mutex<Option<(&'static str, String)>>,
    pending: Mutex<HashMap<u64, Waiter>>,
    /// Data streams asked of the edge and not yet opened by it.
    streams: Mutex<HashMap<u64, oneshot::Sender<Box<dyn Duplex>>>>,
    next_request: AtomicU64,
    /// When the session began.
    connected: std::time::Instant,
    /// When the edge's last heartbeat arrived: the node's liveness, kept in memory.
    heard: Mutex<std::time::Instant>,
    /// What of the node's status this connection last wrote to the store: when, its
    /// phase, and a hash of the facts.
    persisted: Mutex<Option<Persisted>>,
    /// Set (with the reason) when this connection ends; data streams opened through it
    /// end with that reason.
    closed: watch::Sender<Option<String>>,
    /// The reconnect spread this session last told its edge, in ms.
    spread_told: AtomicU64,
}

/// [`HubState::reconnect_spread_ms`] for `fleet` edges at `handshakes_per_second`.
///
/// At the pace itself, not under it: the pace is what the hub lets in, and guards
/// its CPU. Tried after a restart at 100,000 simulated edges: told the spread of four
/// fifths of a pace a quarter higher (1,250 a second, the same 100 s), the fleet came
/// at about 1,100 a second, which that pace let in, until with about 72,000 back the two
/// processes had no CPU left, handshakes took over half a second and 7,358 edges
/// were turned away (134.4 s to all back, against 131.9 s at 1,000 a second).
pub fn reconnect_spread_ms(fleet: usize, handshakes_per_second: f64) -> u64 {
    const MOST: f64 = 600_000.0;
    if handshakes_per_second.is_nan() || handshakes_per_second <= 0.0 {
        return 0;
    }
    (fleet as f64 * 1000.0 / handshakes_per_second).min(MOST) as u64
}

/// Whether an edge told a reconnect spread of `told` ms should be told `now`: it
/// is an eighth longer, or a quarter shorter (a growing fleet tells each edge a few
/// times).
///
/// A spread told too short brings the edge back too soon: with news only at a
/// quarter, a fleet that had just grown knew spreads of 80 to 100% of its own, and
/// after a restart came at about a tenth over the pace it was told (at 100,000
/// edges). One told too long only brings it back later.
pub fn spread_news(told: u64, now: u64) -> bool {
    if now > told {
        (now - told) * 8 >= told.max(1)
    } else {
        (told - now) * 4 >= told.max(1)
    }
}

/// What a connection last wrote of its node's status.
#[derive(Debug, Clone, Copy)]
struct Persisted {
    at: std::time::Instant,
    phase: verge_api::NodePhase,
    facts: u64,
}

/// A data stream the edge opened at the hub's request.
pub struct EdgeStream {
    /// The stream (chunks after the edge's hello).
    pub io: Box<dyn Duplex>,
    /// Fires with a reason when the edge's channel connection ends.
    pub closed: watch::Receiver<Option<String>>,
}

/// Wait until a connection's `closed` fires, and say why.
pub async fn closed_reason(rx: &mut watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(r) = rx.borrow_and_update().clone() {
            return r;
        }
        if rx.changed().await.is_err() {
            return "the edge's channel ended".into();
        }
    }
}

/// Who waits for the answers to a request.
enum Waiter {
    /// One answer.
    Once(oneshot::Sender<ResponseBody>),
    /// A series of answers (followed logs).
    Stream(mpsc::Sender<ResponseBody>),
}

impl EdgeConn {
    /// The reconnect spread to tell this session's edge, if it is news to it
    /// ([`spread_news`]); recorded as told.
    pub fn spread_update(&self, now: u64) -> Option<u64> {
        if !spread_news(self.spread_told.load(Ordering::Relaxed), now) {
            return None;
        }
        self.spread_told.store(now, Ordering::Relaxed);
        Some(now)
    }

    /// A heartbeat arrived: remember when, and return how long after the previous
    /// one (on this connection).
    pub fn heartbeat(&self) -> Option<Duration> {
        let now = std::time::Instant::now();
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let gap = (*heard != self.connected).then(|| now.duration_since(*heard));
        *heard = now;
        gap
    }

    /// When the edge was last heard from (its hello, or its last heartbeat).
    pub fn last_heard(&self) -> std::time::Instant {
        *self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the node's status must be written: never written on this connection,
    /// its phase or facts (`facts`, a hash; `None`: unchanged) differ from what was
    /// written, or what was written is `age` old.
    pub fn status_due(
        &self,
        phase: verge_api::NodePhase,
        facts: Option<u64>,
        age: Duration,
    ) -> bool {
        let p = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
        p.is_none_or(|p| {
            p.phase != phase || facts.is_some_and(|f| f != p.facts) || p.at.elapsed() >= age
        })
    }

    /// Forget what was written of the node's status (someone else changed it): the
    /// next heartbeat writes it.
    pub fn status_unknown(&self) {
        *self.persisted.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Record that the node's status was just written with `phase` and `facts`
    /// (`None`: the facts written before).
    pub fn status_written(&self, phase: verge_api::NodePhase, facts: Option<u64>) {
        let mut p = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
        let facts = facts.or(p.map(|p| p.facts)).unwrap_or(0);
        *p = Some(Persisted {
            at: std::time::Instant::now(),
            phase,
            facts,
        });
    }

    /// Watch for this connection ending.
    pub fn closed_watch(&self) -> watch::Receiver<Option<String>> {
        self.closed.subscribe()
    }

    /// End this session: the edge gets `code` and `message`, then the connection
    /// closes, and with it its data streams.
    pub fn refuse(&self, code: &'static str, message: &str) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some((code, message.into()));
        self.close(message);
    }

    /// The code and message the session was ended with, if the hub ended it.
    pub fn refusal(&self) -> Option<(&'static str, String)> {
        self.refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// End this connection's data streams (and the session) with `reason`.
    pub fn close(&self, reason: &str) {
        self.closed.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            *r = Some(reason.to_string());
            true
        });
    }

    /// Hand a data stream the edge opened to whoever asked for it. False if nobody
    /// waits for `id` (it timed out, or the id is forged).
    pub fn accept_stream(&self, id: u64, io: Box<dyn Duplex>) -> bool {
        let waiter = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        waiter.is_some_and(|w| w.send(io).is_ok())
    }

    /// Deliver an answer to a pending request. A stream whose reader has gone is
    /// dropped and the edge told to stop.
    pub fn complete(&self, id: u64, body: ResponseBody) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.remove(&id) {
            Some(Waiter::Once(w)) => {
                let _ = w.send(body);
            }
            Some(Waiter::Stream(w)) => match w.try_send(body) {
                Ok(()) => {
                    pending.insert(id, Waiter::Stream(w));
                }
                // A reader that falls 256 chunks behind loses chunks rather than
                // stalling the whole channel; a reader that left ends the stream.
                Err(mpsc::error::TrySendError::Full(_)) => {
                    pending.insert(id, Waiter::Stream(w));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    let _ = self.tx.try_send(HubToEdge::Cancel { id });
                }
            },
            None => {}
        }
    }
}

/// Edges currently connected, by node name.
#[derive(Default)]
pub struct EdgeRegistry {
    conns: Mutex<HashMap<String, Arc<EdgeConn>>>,
    next_id: AtomicU64,
    /// Nodes whose desired state cannot be sent to them, and why: they must not look
    /// healthy while they cannot sync.
    unsyncable: Mutex<HashMap<String, String>>,
    /// Nodes whose session on this hub ended, and when they were last heard from:
    /// their grace period runs from then, not from the heartbeat last written.
    departed: Mutex<HashMap<String, std::time::Instant>>,
}

impl EdgeRegistry {
    /// Record that `node` cannot be synced (`Some(why)`), or that it can again.
    pub fn set_sync_failure(&self, node: &str, why: Option<String>) {
        let mut m = self.unsyncable.lock().unwrap_or_else(|e| e.into_inner());
        match why {
            Some(w) => m.insert(node.to_string(), w),
            None => m.remove(node),
        };
    }

    /// Why `node` cannot be synced, if it cannot.
    pub fn sync_failure(&self, node: &str) -> Option<String> {
        self.unsyncable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
    }

    /// Register a new connection for `node`. One session per node: the newer one
    /// wins, and the older is closed (logged, and counted in `sessions_replaced`), so
    /// that routing always points at a live session. A second session with the same
    /// identity is either the edge reconnecting before the hub noticed the old
    /// connection die, or a copy of its certificate; the log line says which node.
    pub fn register(
        &self,
        node: &str,
        enrolment: Option<String>,
        tx: ToEdge,
        protocol_version: u32,
        transport: &str,
        metrics: &Metrics,
    ) -> Arc<EdgeConn> {
        let now = std::time::Instant::now();
        self.departed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node);
        let conn = Arc::new(EdgeConn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            tx,
            protocol_version,
            enrolment,
            refusal: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            connected: now,
            heard: Mutex::new(now),
            persisted: Mutex::new(None),
            closed: watch::channel(None).0,
            spread_told: AtomicU64::new(0),
        });
        let old = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string(), conn.clone());
        if let Some(old) = old {
            metrics.sessions_replaced.inc();
            tracing::warn!(
                node,
                transport,
                "a newer session for this node replaced its older one (a reconnect, or a copy of its certificate in use)"
            );
            old.refuse(
                "replaced",
                &format!(
                    "node '{node}' reconnected to the hub (now over {transport}); streams of its old connection ended"
                ),
            );
        }
        conn
    }

    /// End `node`'s session, if it has one, with `code` and `message` (its node was
    /// deleted, or enrolled again).
    pub fn evict(&self, node: &str, code: &'static str, message: &str) {
        let conn = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node);
        if let Some(conn) = conn {
            tracing::info!(node, code, "ending the node's session: {message}");
            conn.refuse(code, message);
        }
    }

    /// Remove `node`'s connection if it is still connection `id`.
    pub fn unregister(&self, node: &str, id: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.get(node).is_some_and(|c| c.id == id)
            && let Some(c) = conns.remove(node)
        {
            self.departed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(node.to_string(), c.last_heard());
        }
    }

    /// When `node` was last heard from by this hub: by its live session, or by the
    /// one that ended (until the node is declared down: [`EdgeRegistry::forget_departed`]).
    pub fn last_heard(&self, node: &str) -> Option<std::time::Instant> {
        if let Some(c) = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
        {
            return Some(c.last_heard());
        }
        self.departed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied()
    }

    /// Forget when a departed node was last heard from (it was declared down).
    pub fn forget_departed(&self, node: &str) {
        self.departed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node);
    }

    /// Every connected node and its connection id.
    pub fn sessions(&self) -> Vec<(String, u64)> {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, c)| (n.clone(), c.id))
            .collect()
    }

    /// Number of connected edges.
    pub fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no edge is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live connection of `node`.
    pub fn conn(&self, node: &str) -> Result<Arc<EdgeConn>, ApiError> {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "node '{node}' is not connected to this hub; try again when it is Ready"
                    ),
                )
            })
    }

    /// Whether `node`'s edge opens data streams (protocol 2 and later).
    pub fn supports_streams(&self, node: &str) -> Result<bool, ApiError> {
        Ok(self.conn(node)?.protocol_version >= STREAMS_SINCE)
    }

    /// Ask `node`'s edge to open a data stream for `purpose`, and wait for it.
    pub async fn open_stream(
        &self,
        node: &str,
        purpose: StreamPurpose,
    ) -> Result<EdgeStream, ApiError> {
        let conn = self.conn(node)?;
        if conn.protocol_version < STREAMS_SINCE {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "node '{node}' runs an edge agent that speaks channel protocol {}; exec, port-forward and relay need protocol {STREAMS_SINCE}: upgrade the agent on that node",
                    conn.protocol_version
                ),
            ));
        }
        let id = conn.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let unavailable =
            |why: &str| ApiError::new(ErrorCode::Unavailable, format!("node '{node}' {why}"));
        let closed = conn.closed.subscribe();
        conn.tx
            .send(HubToEdge::OpenStream { id, purpose })
            .await
            .map_err(|_| unavailable("disconnected"))?;
        match tokio::time::timeout(STREAM_OPEN_TIMEOUT, rx).await {
            Ok(Ok(io)) => Ok(EdgeStream { io, closed }),
            Ok(Err(_)) => Err(unavailable("disconnected before opening the stream")),
            Err(_) => {
                conn.streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(unavailable(&format!(
                    "did not open the stream within {}s",
                    STREAM_OPEN_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// Ask `node` something that is answered by a series of responses (until the
    /// returned receiver is dropped).
    pub async fn request_stream(
        &self,
        node: &str,
        body: RequestBody,
    ) -> Result<mpsc::Receiver<ResponseBody>, ApiError> {
        let conn = self.conn(node)?;
        let id = conn.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(256);
        conn.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Waiter::Stream(tx));
        conn.tx
            .send(HubToEdge::Request { id, body })
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::Unavailable,
                    format!("node '{node}' disconnected"),
                )
            })?;
        Ok(rx)
    }

    /// Ask `node` something and wait for the answer.
    pub async fn request(
        &self,
        node: &str,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ResponseBody, ApiError> {
        let conn = self.conn(node)?;
        let id = conn.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Waiter::Once(tx));
        let gone = || {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("node '{node}' disconnected before answering"),
            )
        };
        conn.tx
            .send(HubToEdge::Request { id, body })
            .await
            .map_err(|_| gone())?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(_)) => Err(gone()),
            Err(_) => {
                conn.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("node '{node}' did not answer within {}s", timeout.as_secs()),
                ))
            }
        }
    }
}

/// Everything the hub's handlers, channel sessions and controllers share.
pub struct HubState {
    /// Typed object access.
    pub objects: Objects,
    /// The cluster CA.
    pub ca: CertAuthority,
    /// Configuration.
    pub config: HubConfig,
    /// Connected edges.
    pub edges: EdgeRegistry,
    /// The one watch of the instances that every edge session is fed from.
    pub fanout: Arc<crate::fanout::Fanout>,
    /// Which nodes share a site, for their peer probes ([`crate::sites`]).
    pub sites: Arc<crate::sites::Sites>,
    /// The region hubs' uplinks connected here ([`crate::region::centre`]).
    pub uplinks: crate::region::centre::Uplinks,
    /// Metrics.
    pub metrics: Metrics,
    /// Wakes the scheduler.
    pub schedule_kick: Notify,
    /// The offline scheduler's latest recommendations: when, for how many nodes, what.
    pub recommendations: Mutex<Option<(std::time::Instant, usize, verge_sched::Recommendations)>>,
    /// The artifact store: blobs (Wasm components, VM images, ...) by digest, under
    /// `DATA_DIR/artifacts`, which edges fetch over their channel.
    pub artifacts: verge_artifacts::Cache,
    /// Bounds on connections (in all, strangers, REST) and their source addresses.
    pub limits: crate::limits::Limits,
    /// Concurrent watches, in all and per principal.
    pub watches: crate::limits::Pool<String>,
    /// This hub as one replica of possibly several on one store ([`crate::replicas`]).
    pub replica: crate::replicas::Replica,
    /// The epoch of the store's history this hub began at start ([`crate::history`]).
    epoch: std::sync::OnceLock<String>,
    /// Edges' recent metrics ([`crate::telemetry`]).
    pub tsdb: crate::telemetry::tsdb::Tsdb,
    /// The labels metrics queries read from the objects.
    pub telemetry_labels: crate::telemetry::LabelCache,
    /// Events ([`crate::events`]).
    pub events: Arc<crate::events::EventLog>,
    /// The web console's index of nodes and instances ([`crate::console`]).
    pub console: crate::console::index::ConsoleIndex,
    /// Edge sessions admitted ([`HubConfig::admit_rate`]).
    admission: crate::limits::TokenBucket,
    /// QUIC handshakes begun ([`HubConfig::handshake_rate`]).
    pub handshakes: crate::limits::TokenBucket,
    /// The session tickets this hub hands out and accepts (keyed from the CA key, so
    /// a restarted hub or another replica accepts them).
    pub tickets: Arc<verge_tunnel::tickets::DerivedTickets>,
    /// How many nodes connect to this hub (counted by the node lifecycle, on the
    /// leader; 0 until then).
    fleet_size: std::sync::atomic::AtomicUsize,
}

impl HubState {
    /// Note how many nodes connect to this hub.
    pub fn set_fleet_size(&self, nodes: usize) {
        self.fleet_size.store(nodes, Ordering::Relaxed);
    }

    /// How long this hub's fleet takes to connect at the pace it takes handshakes
    /// and admits sessions (`--handshake-rate`, `--admit-rate`: the slower), in
    /// milliseconds: what an edge it turns away spreads its next attempt over
    /// ([`HubToEdge::Welcome`]). At most 10 minutes. `None` until the node
    /// lifecycle has counted the fleet: a hub that just started knows only the few
    /// edges back so far, and would tell them a spread far too short.
    pub fn reconnect_spread_ms(&self) -> Option<u64> {
        let fleet = self.fleet_size.load(Ordering::Relaxed);
        if fleet == 0 {
            return None;
        }
        let pace = self.config.handshake_rate.min(self.config.admit_rate);
        Some(reconnect_spread_ms(fleet.max(self.edges.len()), pace))
    }

    /// Assemble the state.
    pub fn new(objects: Objects, ca: CertAuthority, config: HubConfig) -> Arc<Self> {
        let admission = crate::limits::TokenBucket::new(config.admit_rate);
        let handshakes = crate::limits::TokenBucket::new(config.handshake_rate);
        let replica = crate::replicas::Replica::new(
            config.replica_id.clone(),
            config
                .advertise
                .clone()
                .unwrap_or_else(|| crate::url_for(config.listen)),
            config.lease_ttl,
        );
        let limits = crate::limits::Limits::from_descriptor_limit();
        limits.load.set_threshold(config.shed_lag);
        let tsdb =
            crate::telemetry::tsdb::Tsdb::new(config.metrics_retention, config.metrics_max_series);
        let metrics = Metrics::new();
        let objects = Objects::new(Arc::new(crate::timed_store::TimedStore::new(
            objects.store().clone(),
            metrics.store_latency.clone(),
        )));
        let events = Arc::new(crate::events::EventLog::new(metrics.events_dropped.clone()));
        let tickets = Arc::new(verge_tunnel::tickets::DerivedTickets::new(
            ca.key_pem().as_bytes(),
        ));
        Arc::new(Self {
            replica,
            objects,
            tickets,
            fleet_size: Default::default(),
            ca,
            artifacts: {
                let store = verge_artifacts::Cache::new(config.data_dir.join("artifacts"));
                // This hub is its directory's only writer, and it is only starting.
                store.clear_partial();
                store
            },
            config,
            edges: EdgeRegistry::default(),
            fanout: Arc::default(),
            sites: Arc::default(),
            uplinks: Default::default(),
            metrics,
            schedule_kick: Notify::new(),
            recommendations: Mutex::new(None),
            limits,
            watches: crate::limits::Pool::new(
                "watches",
                4096,
                crate::limits::WATCHES_PER_PRINCIPAL,
            ),
            epoch: std::sync::OnceLock::new(),
            tsdb,
            telemetry_labels: Default::default(),
            events,
            console: Default::default(),
            admission,
            handshakes,
        })
    }
}

impl HubState {
    /// Record the epoch this hub began (once, at start).
    pub fn set_epoch(&self, epoch: String) {
        let _ = self.epoch.set(epoch);
    }

    /// The epoch this hub began, if it began one (hubs made for tests may not).
    pub fn epoch(&self) -> Option<&str> {
        self.epoch.get().map(String::as_str)
    }

    /// Take one admission token for a new edge session, or say how long to wait.
    /// Bounds the rate at which a restarted hub takes reconnecting edges, so that
    /// thousands of edges coming back at once cannot swamp it.
    pub fn admit(&self) -> Result<(), Duration> {
        self.admission.take()
    }
}

#[cfg(test)]
mod spread_tests {
    use super::{reconnect_spread_ms, spread_news};

    #[test]
    fn the_reconnect_spread_is_the_fleet_at_the_handshake_pace_and_news_only_when_it_moves() {
        assert_eq!(reconnect_spread_ms(100_000, 1000.0), 100_000);
        assert_eq!(reconnect_spread_ms(300, 20.0), 15_000);
        assert_eq!(
            reconnect_spread_ms(10_000_000, 1.0),
            600_000,
            "at most 10 minutes"
        );
        assert_eq!(reconnect_spread_ms(500, 0.0), 0, "no pace, no spread");
        assert_eq!(reconnect_spread_ms(500, f64::NAN), 0);
        // An eighth longer or a quarter shorter is news; less is not.
        assert!(spread_news(1000, 1125));
        assert!(!spread_news(1000, 1124));
        assert!(spread_news(1000, 750));
        assert!(!spread_news(1000, 751));
        assert!(spread_news(0, 1), "never told");
    }
}
