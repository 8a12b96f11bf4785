//! Enrolment: a join token and a CSR in, a node certificate out. One transaction
//! spends the token, records the enrolment (which revokes every certificate the node
//! had before) and creates the Node; the channel's enrolment door
//! ([`crate::channel::serve_enroll`]) only carries the request and the answer.

use verge_api::{ApiError, ErrorCode, Kind, NodeSpec, Object, object_key};
use verge_store::{Compare, Op, Txn};

use crate::objects::{Objects, store_err};
use crate::state::HubState;
use crate::tokens::check_join_token;

/// How a lost race on a join token's revision starts its message.
const CONCURRENT_USE: &str = "join token was used concurrently";

/// What an edge asks to enrol with.
#[derive(Debug, Clone)]
pub struct Request {
    /// The channel protocol it speaks.
    pub protocol_version: u32,
    /// Its join token.
    pub token: String,
    /// The node name it asks for.
    pub node_name: String,
    /// Its CSR (the key never leaves the node).
    pub csr_pem: String,
    /// Labels for its Node.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// What an enrolled edge gets.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// Its certificate.
    pub cert_pem: String,
    /// The cluster CA.
    pub ca_pem: String,
}

/// Enrol a node. Two edges enrolling at once with one multi-use token race on the
/// token's revision; the loser tries again (a spent token then says so).
pub async fn enrol(st: &HubState, request: &Request) -> Result<Enrolled, ApiError> {
    let mut attempt = 0;
    loop {
        match enrol_once(st, request).await {
            Err(e) if e.message.starts_with(CONCURRENT_USE) && attempt < 8 => attempt += 1,
            r => return r,
        }
    }
}

async fn enrol_once(st: &HubState, request: &Request) -> Result<Enrolled, ApiError> {
    let Request {
        protocol_version,
        token,
        node_name,
        csr_pem,
        labels,
    } = request;
    let (node_name, csr_pem) = (node_name.as_str(), csr_pem.as_str());
    crate::channel::check_version(*protocol_version)?;
    let token = crate::tokens::parse_for(st, token)?;
    let mut node = Object::<NodeSpec>::new(node_name, NodeSpec::default());
    node.metadata.labels = labels.clone();
    let node = st.objects.prepare_create(node).map_err(|mut e| {
        e.message = format!("cannot enrol: {}", e.message);
        e
    })?;
    let (token_compare, token_op, record) =
        check_join_token(st.objects.store().as_ref(), &token).await?;
    if let Some(r) = &record.region {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "join token refused: it enrols a hub for region '{r}', not a node; ask for a node token (`verge token create`)"
            ),
        ));
    }
    let bound = record.node;
    if let Some(b) = &bound
        && b != node_name
    {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!("join token refused: it is bound to node '{b}', not '{node_name}'"),
        ));
    }
    // Sign first: a bad CSR must not spend the token. The certificate belongs to this
    // enrolment only: recording it revokes every certificate the node had before.
    let enrolment = crate::identity::new_enrolment_id();
    let cert_pem = sign(st, csr_pem, node_name, Some(&enrolment))?;
    let node_key = object_key(NodeSpec::PLURAL, node_name);
    let mut ops: Vec<Op> = token_op.into_iter().collect();
    ops.push(crate::identity::record(node_name, &enrolment));
    // A token bound to this node re-enrols it: new identity, same Node object.
    let existing = st.objects.store().get(&node_key).await.map_err(store_err)?;
    let node_compare = match (&bound, &existing) {
        (Some(_), Some(kv)) => {
            tracing::info!(
                node = node_name,
                "re-enrolling an existing node with a node-bound token"
            );
            kv.mod_revision
        }
        _ => {
            ops.push(Op::Put {
                key: node_key.clone(),
                value: Objects::encode(&node),
                lease: None,
            });
            0
        }
    };
    let r = st
        .objects
        .store()
        .txn(Txn {
            compares: vec![
                token_compare,
                Compare {
                    key: node_key.clone(),
                    mod_revision: node_compare,
                },
            ],
            ops,
        })
        .await
        .map_err(store_err)?;
    if !r.succeeded {
        if st
            .objects
            .store()
            .get(&node_key)
            .await
            .map_err(store_err)?
            .is_some()
        {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "node name '{node_name}' is already enrolled; choose another --name, delete the old node first (`verge delete node {node_name}`), or re-enrol it with a token bound to it (`verge token create --node {node_name}`)"
                ),
            ));
        }
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!("{CONCURRENT_USE} and is spent; ask for a new one"),
        ));
    }
    // Sessions of the node's earlier identity end now, not when they next reconnect.
    st.edges.evict(
        node_name,
        crate::identity::REVOKED,
        &format!(
            "node '{node_name}' was enrolled again; this connection's certificate was revoked"
        ),
    );
    Ok(Enrolled {
        cert_pem,
        ca_pem: st.ca.cert_pem().to_string(),
    })
}

/// Sign a node CSR for `node` (and its `enrolment`) with the configured lifetime:
/// at enrolment, and when a connected node renews (the subject comes from the
/// connection's identity, never from the request).
pub fn sign(
    st: &HubState,
    csr_pem: &str,
    node: &str,
    enrolment: Option<&str>,
) -> Result<String, ApiError> {
    let ttl =
        time::Duration::seconds(st.config.node_cert_ttl.as_secs().min(i64::MAX as u64) as i64);
    st.ca
        .sign_node_csr(csr_pem, node, enrolment, ttl)
        .map_err(|e| ApiError::new(ErrorCode::Invalid, format!("csrPem: {e}")))
}
