//! Messages between a region hub and its centre: the region's uplink.
//!
//! A region hub dials its centre (mutual TLS, QUIC first, ALPN [`ALPN_REGION`]) and
//! keeps a copy of its *slice* of the centre's state: the Region object, the nodes
//! labelled with the region, their enrolments, and the instances placed in the region
//! or bound to its nodes. The centre sends that slice as changes from the revision
//! the region has (a snapshot only when it is older than the centre's history); the
//! region sends up what it is the authority for (the statuses of its slice) and the
//! writes its own operators made, each judged at the centre by generation (see
//! `docs/REGIONS.md` for the conflict rule).

use serde::{Deserialize, Serialize};

/// ALPN of a region hub's uplink to its centre.
pub const ALPN_REGION: &[u8] = b"verge-region/1";

/// The uplink protocol version this build speaks.
pub const UPLINK_VERSION: u32 = 1;

/// One key of the slice as the centre holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirrored {
    /// The store key.
    pub key: String,
    /// The stored value (JSON), as the centre holds it.
    pub value: serde_json::Value,
    /// The centre's modification revision of the key.
    pub revision: u64,
}

/// A write made at the region by its operators, for the centre to take or refuse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionWrite {
    /// Kind, plural (`instances`).
    pub kind: String,
    /// Object name.
    pub name: String,
    /// The uid the object has at the region (a create keeps it at the centre).
    pub uid: String,
    /// The generation the region changed (0: the region created the object). The
    /// centre takes the write only if its copy is still at that generation.
    pub base_generation: u64,
    /// The object as the region has it (None: the region deleted it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<serde_json::Value>,
}

/// Region -> centre.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum RegionToCentre {
    /// First message on an enrolment connection: a region hub joins its centre.
    #[serde(rename_all = "camelCase")]
    Enroll {
        /// Uplink protocol version.
        protocol_version: u32,
        /// A join token made for this region (`verge token create --region NAME`).
        token: String,
        /// The region.
        region: String,
    },
    /// First message on the uplink.
    #[serde(rename_all = "camelCase")]
    Hello {
        /// Uplink protocol version.
        protocol_version: u32,
        /// The centre revision of the slice the region has (0: none).
        since_revision: u64,
        /// The centre's history epoch that revision belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    /// Liveness.
    Heartbeat,
    /// Statuses the region is the authority for, up to a revision of its own store.
    #[serde(rename_all = "camelCase")]
    Statuses {
        /// The region's store revision these bring the centre to.
        through: u64,
        /// The statuses.
        items: Vec<StatusReport>,
    },
    /// First message on a new uplink connection that answers
    /// [`CentreToRegion::OpenStream`]: after it, the connection carries one HTTP/1.1
    /// connection from the centre to the region hub's REST API (logs, exec and
    /// port-forward for the region's edges, asked of the centre).
    #[serde(rename_all = "camelCase")]
    Stream {
        /// The id the centre gave.
        id: u64,
    },
    /// A write of the region's operators.
    #[serde(rename_all = "camelCase")]
    Write {
        /// Correlation id for [`CentreToRegion::WriteResult`].
        id: u64,
        /// The write.
        write: RegionWrite,
    },
}

/// The latest status of one object of the slice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// Kind, plural (`instances` or `nodes`).
    pub kind: String,
    /// Object name.
    pub name: String,
    /// Its uid.
    pub uid: String,
    /// The status.
    pub status: serde_json::Value,
}

/// Centre -> region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum CentreToRegion {
    /// Enrolment accepted: the CA the region shares with the centre, and its
    /// enrolment id (written into the client certificate it makes itself).
    #[serde(rename_all = "camelCase")]
    Enrolled {
        /// PEM CA certificate.
        ca_pem: String,
        /// PEM CA key.
        ca_key_pem: String,
        /// The enrolment.
        enrolment: String,
    },
    /// Uplink accepted.
    #[serde(rename_all = "camelCase")]
    Welcome {
        /// The centre's history epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// How often to send heartbeats.
        heartbeat_interval_ms: u64,
    },
    /// Part of the whole slice at `revision`; at the `last`, the region drops every
    /// mirrored key not sent.
    #[serde(rename_all = "camelCase")]
    SnapshotPart {
        /// The centre revision.
        revision: u64,
        /// Keys of the slice.
        objects: Vec<Mirrored>,
        /// Whether this is the last part.
        last: bool,
    },
    /// Changes to the slice, bringing the region to `revision`.
    #[serde(rename_all = "camelCase")]
    Changes {
        /// The centre revision.
        revision: u64,
        /// Keys put (or that joined the slice).
        puts: Vec<Mirrored>,
        /// Keys deleted (or that left the slice).
        deletes: Vec<String>,
    },
    /// Nothing in the slice changed up to `revision`.
    #[serde(rename_all = "camelCase")]
    Bookmark {
        /// The centre revision.
        revision: u64,
    },
    /// Answer to a heartbeat.
    HeartbeatAck,
    /// Statuses up to `through` (a region revision) are applied.
    #[serde(rename_all = "camelCase")]
    StatusesApplied {
        /// The region revision.
        through: u64,
    },
    /// What became of a [`RegionToCentre::Write`].
    #[serde(rename_all = "camelCase")]
    WriteResult {
        /// Its id.
        id: u64,
        /// Taken (or already taken).
        applied: bool,
        /// Why not, when it was refused (the centre's copy changed: its write wins).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
    },
    /// Open a new uplink connection for one forwarded HTTP connection, and send
    /// [`RegionToCentre::Stream`] with this id first.
    #[serde(rename_all = "camelCase")]
    OpenStream {
        /// Correlation id.
        id: u64,
    },
    /// A refusal; the centre closes the uplink after it.
    #[serde(rename_all = "camelCase")]
    Error {
        /// Machine-readable code.
        code: String,
        /// Human text.
        message: String,
    },
}
