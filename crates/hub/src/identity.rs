//! Node identities: which enrolment a node certificate belongs to, and whether it
//! still counts.
//!
//! Every enrolment (the first, and each re-enrolment with a node-bound token) gets a
//! fresh random id, stored under [`ENROLMENT_PREFIX`] in the same transaction that
//! spends the token, and written into the certificate's subject. Renewals keep the
//! id. A certificate is accepted only while its node exists and its id is the node's
//! current one, checked on every REST request, channel session and data stream; so
//! `verge delete node` and a re-enrolment revoke every certificate issued before,
//! however long it is still valid. Certificates from before ids were recorded carry
//! none and are accepted until the node is enrolled again.

use serde::{Deserialize, Serialize};
use verge_api::{ApiError, ErrorCode, Kind, NodeSpec, object_key};
use verge_store::{Op, Store};

use crate::objects::store_err;

/// Where each node's current enrolment is kept.
pub const ENROLMENT_PREFIX: &str = "/verge/enrolments/";

/// Who a peer with a node certificate claims to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The node (the certificate's CN).
    pub node: String,
    /// The enrolment the certificate belongs to.
    pub enrolment: Option<String>,
}

impl PeerIdentity {
    /// The identity in a node certificate (DER), if it is one.
    pub fn from_cert(der: &[u8]) -> Option<Self> {
        verge_tunnel::pki::node_identity_from_cert(der)
            .map(|(node, enrolment)| Self { node, enrolment })
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnrolmentRecord {
    id: String,
    enrolled_at: String,
}

/// A fresh enrolment id.
pub fn new_enrolment_id() -> String {
    let b: [u8; 12] = rand::random();
    verge_tunnel::pki::hex(&b)
}

/// The store operation that makes `id` the node's current enrolment.
pub fn record(node: &str, id: &str) -> Op {
    Op::put(
        format!("{ENROLMENT_PREFIX}{node}"),
        serde_json::to_vec(&EnrolmentRecord {
            id: id.to_string(),
            enrolled_at: verge_api::clock::now_rfc3339(),
        })
        .unwrap_or_default(),
    )
}

/// The store operation that forgets the node's enrolment (with the node).
pub fn forget(node: &str) -> Op {
    Op::Delete {
        key: format!("{ENROLMENT_PREFIX}{node}"),
    }
}

/// Wire code: the node was deleted (its edge stops its workloads and exits).
pub const NODE_DELETED: &str = "nodeDeleted";
/// Wire code: the certificate belongs to an earlier enrolment.
pub const REVOKED: &str = "revoked";

/// A certificate that no longer counts.
#[derive(Debug)]
pub struct Refused {
    /// The wire code ([`NODE_DELETED`], [`REVOKED`], or `unavailable` when the store
    /// could not be read).
    pub code: &'static str,
    /// What happened and what to do.
    pub error: ApiError,
}

/// Check that `peer`'s certificate still counts.
pub async fn verify(store: &dyn Store, peer: &PeerIdentity) -> Result<(), Refused> {
    let node = &peer.node;
    let unavailable = |e| Refused {
        code: "unavailable",
        error: store_err(e),
    };
    // Both in one trip: this runs for every session and REST request of every edge.
    let node_key = object_key(NodeSpec::PLURAL, node);
    let enrolment_key = format!("{ENROLMENT_PREFIX}{node}");
    let mut found = store
        .get_each(&[&node_key, &enrolment_key])
        .await
        .map_err(unavailable)?
        .into_iter();
    if found.next().flatten().is_none() {
        return Err(Refused {
            code: NODE_DELETED,
            error: ApiError::new(
                ErrorCode::Unauthorized,
                format!(
                    "node '{node}' was deleted from the hub, and its certificate with it; remove the edge's identity and enrol again with a new join token"
                ),
            ),
        });
    }
    let current = found
        .next()
        .flatten()
        .and_then(|kv| serde_json::from_slice::<EnrolmentRecord>(&kv.value).ok())
        .map(|r| r.id);
    if current == peer.enrolment {
        return Ok(());
    }
    Err(Refused {
        code: REVOKED,
        error: ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "this certificate of node '{node}' was revoked: the node was enrolled again since it was issued; the edge holding the new identity keeps working, this one must enrol again"
            ),
        ),
    })
}

/// [`verify`], counted in `verge_hub_revoked_certificates` and logged when refused:
/// the one check every front door (REST, channel, data streams) makes.
pub async fn admit(
    st: &crate::state::HubState,
    peer: &PeerIdentity,
    door: &str,
) -> Result<(), Refused> {
    let mut r = verify(st.objects.store().as_ref(), peer).await;
    // A region hub learns its nodes and their enrolments from its centre: one it does
    // not know (yet), or knows an older enrolment of, may be news it has not had. The
    // edge is told to come again, not that it is gone: only its centre may say that.
    if let (Some(link), Err(refused)) = (&st.config.region, &r)
        && refused.code != "unavailable"
    {
        tracing::info!(node = %peer.node, door, error = %refused.error.message, "a node this region hub does not know (yet); the edge will retry");
        r = Err(Refused {
            code: "unavailable",
            error: ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "region hub '{}' does not know node '{}' as enrolled now ({}); it learns nodes from its centre, so retry shortly, or connect to the centre",
                    link.region, peer.node, refused.error.message
                ),
            ),
        });
        return r;
    }
    if let Err(refused) = &r {
        st.metrics
            .revoked_certificates
            .get_or_create(&vec![("reason".to_string(), refused.code.to_string())])
            .inc();
        tracing::warn!(node = %peer.node, door, error = %refused.error.message, "node certificate refused");
    }
    r
}
