//! Messages on the hub<->edge channel. See `docs/CHANNEL.md` for framing and flow.
//!
//! Versioning: [`PROTOCOL_VERSION`] goes up when a message changes meaning. New
//! optional fields and new message types may be added within a version: decoders
//! ignore unknown fields, and a peer answers an unknown message type with
//! [`HubToEdge::Error`]/[`EdgeToHub::Error`] instead of dropping the connection.
//! The hub accepts edges from [`MIN_PROTOCOL_VERSION`] up to its own version.

use serde::{Deserialize, Serialize};

use crate::instance::{Instance, InstanceStatus};
use crate::node::NodeStatus;

/// The protocol version this build speaks.
///
/// 1: control sync, heartbeats, statuses, logs, renewal on one stream.
/// 2: adds data streams ([`HubToEdge::OpenStream`], [`StreamHello`]) for logs, exec,
/// port-forward and edge-to-edge relay.
/// 3: snapshots arrive in parts ([`HubToEdge::SnapshotPart`]) that each fit in a
/// frame, however large the node's desired state.
/// 4: the hub tells each edge its site's peers to probe ([`HubToEdge::Peers`]).
/// 5: edges ship metrics on a stream of their own ([`StreamHello::Metrics`]).
/// 6: the hub tells each edge the endpoints of its clusters ([`HubToEdge::Endpoints`]).
/// 7: over QUIC the hub no longer answers heartbeats ([`HubToEdge::HeartbeatAck`]):
/// the edge hears the hub in QUIC's own acknowledgements of them, one datagram per
/// heartbeat instead of three.
/// 8: the hub tells each edge how to spread its reconnection after being turned
/// away ([`HubToEdge::Fleet`], and in the welcome).
pub const PROTOCOL_VERSION: u32 = 8;
/// The first protocol version whose edges take [`HubToEdge::Fleet`].
pub const FLEET_SINCE: u32 = 8;
/// The first protocol version whose edges, over QUIC, take no heartbeat answers.
pub const QUIET_HEARTBEATS_SINCE: u32 = 7;
/// The first protocol version whose edges take their clusters' endpoints.
pub const ENDPOINTS_SINCE: u32 = 6;
/// The first protocol version whose hubs take metrics streams.
pub const METRICS_SINCE: u32 = 5;
/// The first protocol version whose edges probe their site's peers.
pub const PEERS_SINCE: u32 = 4;
/// The first protocol version whose edges take snapshots in parts.
pub const SNAPSHOT_PARTS_SINCE: u32 = 3;
/// How large one part of a snapshot (or of a batch of changes) may be, encoded:
/// well inside a frame, so any object that passed validation fits.
pub const PART_BYTES: usize = 4 << 20;
/// The oldest edge protocol version this hub still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The first protocol version whose edges open data streams.
pub const STREAMS_SINCE: u32 = 2;
/// ALPN protocol id of the channel (distinguishes it from the REST API on one port).
pub const ALPN_CHANNEL: &[u8] = b"verge-channel/1";
/// ALPN protocol id of a data stream an edge opens over TLS/TCP (over QUIC a data
/// stream is another bidirectional stream of the channel's connection).
pub const ALPN_STREAM: &[u8] = b"verge-stream/1";
/// ALPN protocol id used by an edge that enrols (has no identity yet).
pub const ALPN_ENROLL: &[u8] = b"verge-enroll/1";

/// Edge -> hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum EdgeToHub {
    /// First message on an enrolment connection.
    #[serde(rename_all = "camelCase")]
    Enroll {
        /// Protocol version of the edge.
        protocol_version: u32,
        /// The join token (secret part included).
        token: String,
        /// Requested node name.
        node_name: String,
        /// PEM certificate signing request for the key the node generated.
        csr_pem: String,
        /// Labels the node starts with (region, city, isp, tier...).
        #[serde(default)]
        labels: std::collections::BTreeMap<String, String>,
    },
    /// First message on an identified channel connection.
    #[serde(rename_all = "camelCase")]
    Hello {
        /// Protocol version of the edge.
        protocol_version: u32,
        /// Agent version string.
        agent_version: String,
        /// The last revision the edge has fully applied (0: never synced).
        since_revision: u64,
        /// The epoch of the hub's store history in which that revision was last
        /// confirmed (from a welcome). A revision of another history gets a snapshot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    /// Periodic liveness. Carries the node's facts on the first heartbeat of a
    /// session, when they change, and once a minute; otherwise it is a few bytes.
    #[serde(rename_all = "camelCase")]
    Heartbeat {
        /// Node facts (capacity, arch...), when sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<Box<NodeStatus>>,
    },
    /// An instance's status changed on the node.
    #[serde(rename_all = "camelCase")]
    InstanceStatus {
        /// Instance name.
        name: String,
        /// The instance's uid, so a status for a deleted-and-recreated instance is not misapplied.
        uid: String,
        /// The new status (the hub keeps `node`).
        status: InstanceStatus,
    },
    /// An instance the edge has stopped after it was deleted or moved away.
    #[serde(rename_all = "camelCase")]
    InstanceRemoved {
        /// Instance name.
        name: String,
        /// Its uid.
        uid: String,
    },
    /// Ask for a fresh certificate for a new key (sent when the current certificate
    /// has used two thirds of its lifetime).
    #[serde(rename_all = "camelCase")]
    Renew {
        /// PEM certificate signing request for the new key.
        csr_pem: String,
    },
    /// Answer to a [`HubToEdge::Request`].
    #[serde(rename_all = "camelCase")]
    Response {
        /// The request's id.
        id: u64,
        /// The answer.
        body: ResponseBody,
    },
    /// Something the edge could not handle.
    #[serde(rename_all = "camelCase")]
    Error {
        /// Machine-readable code.
        code: String,
        /// Human text.
        message: String,
    },
}

/// Hub -> edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum HubToEdge {
    /// Enrolment accepted: the node's certificate and the hub CA.
    #[serde(rename_all = "camelCase")]
    Enrolled {
        /// PEM certificate for the node's key.
        cert_pem: String,
        /// PEM CA certificate.
        ca_pem: String,
    },
    /// Connection accepted.
    #[serde(rename_all = "camelCase")]
    Welcome {
        /// Protocol version the hub will speak on this connection.
        protocol_version: u32,
        /// The node name the hub identified from the certificate.
        node: String,
        /// How often the edge should send heartbeats.
        heartbeat_interval_ms: u64,
        /// The hub's epoch of its store history: revisions are only comparable
        /// within one history (see `verge_hub::history`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// How long the hub's whole fleet takes to reconnect at the pace the hub
        /// takes handshakes: an edge it turns away waits a random part of this
        /// before trying again ([`HubToEdge::Fleet`] keeps it current).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect_spread_ms: Option<u64>,
    },
    /// Full desired state for this node: replace everything cached.
    /// Sent on first sync or when the edge's revision was compacted away.
    #[serde(rename_all = "camelCase")]
    Snapshot {
        /// The revision the snapshot reflects.
        revision: u64,
        /// Every instance bound to this node.
        instances: Vec<Instance>,
    },
    /// One part of a full desired state (protocol 3): the edge collects the parts
    /// and, at the `last`, replaces everything cached, as for [`HubToEdge::Snapshot`].
    /// A session that ends before the last part leaves the cache as it was.
    #[serde(rename_all = "camelCase")]
    SnapshotPart {
        /// The revision the snapshot reflects.
        revision: u64,
        /// Some of the instances bound to this node.
        instances: Vec<Instance>,
        /// Whether this is the last part.
        last: bool,
    },
    /// Incremental changes since the edge's revision.
    #[serde(rename_all = "camelCase")]
    Changes {
        /// The revision these changes bring the edge to.
        revision: u64,
        /// Changes in order.
        changes: Vec<InstanceChange>,
    },
    /// Nothing for this node changed up to `revision` (lets the edge resume from there).
    #[serde(rename_all = "camelCase")]
    Bookmark {
        /// The revision.
        revision: u64,
    },
    /// Answer to a heartbeat: lets the edge notice a dead connection quickly. Sent over
    /// TLS, and over QUIC to edges before [`QUIET_HEARTBEATS_SINCE`].
    HeartbeatAck,
    /// The fleet grew or shrank by a quarter or more since the edge was last told
    /// (protocol [`FLEET_SINCE`]): its reconnect spread, as in the welcome.
    #[serde(rename_all = "camelCase")]
    Fleet {
        /// See `Welcome::reconnect_spread_ms`.
        reconnect_spread_ms: u64,
    },
    /// Stop answering request `id` (a followed log whose reader went away).
    #[serde(rename_all = "camelCase")]
    Cancel {
        /// The request.
        id: u64,
    },
    /// The renewed node certificate (answer to [`EdgeToHub::Renew`]).
    #[serde(rename_all = "camelCase")]
    Renewed {
        /// PEM certificate for the new key.
        cert_pem: String,
    },
    /// Open a data stream for `purpose` (protocol 2): the edge opens a new stream
    /// (QUIC) or connection (TLS/TCP), sends [`StreamHello::Accept`] with this id, and
    /// then speaks chunks (`verge_tunnel::chunk`) on it.
    #[serde(rename_all = "camelCase")]
    OpenStream {
        /// Correlation id for [`StreamHello::Accept`].
        id: u64,
        /// What the stream is for.
        purpose: StreamPurpose,
    },
    /// A request the edge must answer with [`EdgeToHub::Response`].
    #[serde(rename_all = "camelCase")]
    Request {
        /// Correlation id.
        id: u64,
        /// What is asked.
        body: RequestBody,
    },
    /// The other nodes of this node's site that probe and answer probes, and the
    /// site's key that signs them (protocol 4). Sent again when the list changes; an
    /// empty list stops probing.
    #[serde(rename_all = "camelCase")]
    Peers {
        /// The site key, hex (HMAC-SHA256 key of [`verge_tunnel::probe`]'s datagrams).
        key: String,
        /// Where each peer answers.
        peers: Vec<SitePeer>,
    },
    /// The Running instances that serve ports in the clusters this node belongs to
    /// (protocol 6), for site-local load balancers: sent when they change, kept by
    /// the edge in a file its workloads read (`VERGE_ENDPOINTS`).
    #[serde(rename_all = "camelCase")]
    Endpoints {
        /// Every such instance, sorted.
        endpoints: Vec<crate::cluster::Endpoint>,
    },
    /// The hub refused something; for fatal codes it closes the connection after this.
    #[serde(rename_all = "camelCase")]
    Error {
        /// Machine-readable code (`unauthorized`, `protocol`, `forbidden`...).
        code: String,
        /// Human text.
        message: String,
        /// When to try again, for codes that say to (`busy`): read this, not the text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl HubToEdge {
    /// An error with `code` and `message` and no retry hint.
    pub fn error(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.into(),
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// An error message carrying an API error's code name, message and retry hint.
    pub fn from_api(code: &str, e: crate::ApiError) -> Self {
        Self::Error {
            code: code.into(),
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }
    }
}

/// A node of the same site, and where it answers probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SitePeer {
    /// Its node name.
    pub name: String,
    /// `HOST:PORT` of its probe socket.
    pub address: String,
}

/// One change to the instances bound to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum InstanceChange {
    /// Run (or update) this instance.
    Upsert {
        /// The instance.
        instance: Box<Instance>,
    },
    /// Stop and forget this instance.
    #[serde(rename_all = "camelCase")]
    Remove {
        /// Its name.
        name: String,
    },
}

/// Requests the hub makes of an edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum RequestBody {
    /// The tail of an instance's log.
    #[serde(rename_all = "camelCase")]
    Logs {
        /// Instance name.
        instance: String,
        /// At most this many bytes from the end.
        tail_bytes: u64,
    },
    /// The tail of an instance's log, then everything appended to it, as a series of
    /// `logs` responses with the same id until the hub sends `cancel`.
    #[serde(rename_all = "camelCase")]
    LogsFollow {
        /// Instance name.
        instance: String,
        /// Start this many bytes before the end.
        tail_bytes: u64,
    },
}

/// Answers to [`RequestBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ResponseBody {
    /// Log bytes (lossy UTF-8).
    #[serde(rename_all = "camelCase")]
    Logs {
        /// The text.
        data: String,
    },
    /// The request failed.
    #[serde(rename_all = "camelCase")]
    Error {
        /// Why.
        message: String,
    },
}

/// What a data stream carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum StreamPurpose {
    /// An instance's log: the tail, then (with `follow`) what it writes next.
    #[serde(rename_all = "camelCase")]
    Logs {
        /// Instance name.
        instance: String,
        /// Start this many bytes before the end.
        tail_bytes: u64,
        /// Keep streaming appended output.
        follow: bool,
    },
    /// Run a command in an instance's environment.
    #[serde(rename_all = "camelCase")]
    Exec {
        /// Instance name.
        instance: String,
        /// Program and arguments.
        command: Vec<String>,
        /// Give the command a terminal (output is then one stream).
        tty: bool,
        /// Initial terminal width.
        #[serde(default)]
        cols: u16,
        /// Initial terminal height.
        #[serde(default)]
        rows: u16,
    },
    /// A TCP connection to a port of an instance.
    #[serde(rename_all = "camelCase")]
    PortForward {
        /// Instance name.
        instance: String,
        /// The port on the instance.
        port: u16,
    },
}

/// The first frame an edge sends on a data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum StreamHello {
    /// This stream answers [`HubToEdge::OpenStream`] `id`.
    #[serde(rename_all = "camelCase")]
    Accept {
        /// The id from the hub.
        id: u64,
    },
    /// Relay this stream to a declared port of another instance (edge to edge). The
    /// hub checks policy, then opens a port-forward stream on the target's edge.
    #[serde(rename_all = "camelCase")]
    Relay {
        /// The instance (on this edge) that connects.
        from: String,
        /// The instance it reaches.
        to: String,
        /// The declared port of `to`.
        port: u16,
    },
    /// Send the artifact `digest` from the hub's artifact store (data chunks, then
    /// eof; or an error chunk). The edge verifies the digest.
    #[serde(rename_all = "camelCase")]
    Artifact {
        /// `sha256:...`.
        digest: String,
    },
    /// Ship metrics (protocol 5): the edge sends each sampling round as a data chunk
    /// holding a [`crate::metrics::Batch`], in order; the hub answers with a data
    /// chunk of the 8-byte big-endian sequence number it has taken so far, and the
    /// edge forgets a round only once it is taken.
    #[serde(rename_all = "camelCase")]
    Metrics {
        /// Answer only every this many rounds (0 or 1: every round, as hubs did
        /// before it was asked). An answer costs a datagram down and the edge's QUIC
        /// acknowledgement of it up: for an idle fleet shipping a round every 10 s, a
        /// third of its datagrams. The hub caps it at [`METRICS_ACK_EVERY_MAX`].
        #[serde(default, skip_serializing_if = "crate::instance::is_zero")]
        ack_every: u32,
    },
}

/// The most rounds a hub lets an edge's metrics go unanswered
/// ([`StreamHello::Metrics`]).
pub const METRICS_ACK_EVERY_MAX: u32 = 16;
