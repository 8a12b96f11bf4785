//! The region tier: a hub that serves the edges of one region and keeps working when
//! its centre is out of reach (`verge hub --region NAME --upstream URL`).
//!
//! A region hub is a whole hub on its own store: edges connect to it, it schedules
//! the region's instances on the region's nodes, watches its nodes and replaces what
//! they lose, answers the CLI and takes writes from operators holding its own admin
//! credentials. It enrols with its centre once, with a token made for the region
//! (`verge token create --region NAME`), and receives the CA the centre signs with,
//! so every edge verifies it and it accepts every edge: an edge moves between the
//! centre and a region by being pointed at the other, without enrolling again.
//!
//! Its uplink ([`uplink`]) dials the centre (mutual TLS as `O=verge:regions`, QUIC
//! first, TCP when UDP is blocked, each upstream endpoint in turn) and keeps the
//! region's *slice* ([`Slice`]) of the centre's state in its store, resuming from the
//! centre revision it has. What goes where:
//!
//! - **Specs come down.** The centre is the authority for what should run: every
//!   Instance placed in the region (`placement.region`) or bound to one of its
//!   nodes, the region's Nodes (label `region`), their enrolments, the Region.
//! - **Statuses go up.** The region is the authority for what runs: it sends the
//!   statuses of its slice (bindings included), and the centre stores them as they
//!   are; the centre runs no controller over a region that has a hub.
//! - **Writes made at the region go up and are judged at the centre** by generation:
//!   a write based on generation G is taken if the centre's copy is still at G;
//!   otherwise the centre's write wins, the region's copy is replaced by the centre's,
//!   and the loser is recorded as a conflict at both tiers (`verge get conflicts`).
//!
//! The centre side of the uplink is [`centre`].

pub mod centre;
pub mod uplink;

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use verge_api::region::REGION_LABEL;
use verge_api::{Instance, InstanceSpec, Kind, Node, NodeSpec, Region, RegionSpec, kind_prefix};

use crate::identity::ENROLMENT_PREFIX;
use crate::objects::decode_value;

/// A region hub's link to its centre, as kept in its data directory (`region.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionLink {
    /// The region this hub serves.
    pub region: String,
    /// The centre's endpoints (`https://HOST:PORT`), tried in turn.
    pub upstreams: Vec<String>,
    /// This region hub's enrolment at the centre.
    pub enrolment: String,
}

/// The file a region hub keeps its link in.
pub const LINK_FILE: &str = "region.json";

impl RegionLink {
    /// The link kept in `dir`, if this hub has enrolled.
    pub fn load(dir: &Path) -> Result<Option<Self>, crate::SetupError> {
        let path = dir.join(LINK_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| crate::SetupError::Config {
                    path,
                    detail: format!(
                        "unreadable ({e}); move it aside and enrol again with a new region token"
                    ),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(crate::SetupError::io(&path, e)),
        }
    }

    /// Keep the link in `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), crate::SetupError> {
        crate::config::write_private(
            &dir.join(LINK_FILE),
            &serde_json::to_vec_pretty(self).unwrap_or_default(),
        )
    }
}

/// Make `dir` the data directory of a hub for `region` under the centre at
/// `upstreams`: on first start, enrol with `token` (the CA the centre signs with is
/// written here, so that this hub uses it); later, keep the enrolment and take the
/// endpoints given now.
pub async fn prepare(
    dir: &Path,
    region: &str,
    upstreams: &[String],
    token: Option<&str>,
) -> Result<RegionLink, crate::SetupError> {
    let setup = |detail: String| crate::SetupError::Config {
        path: dir.join(LINK_FILE),
        detail,
    };
    if upstreams.is_empty() {
        return Err(setup(
            "a region hub needs --upstream URL (its centre)".into(),
        ));
    }
    crate::config::prepare_private_dir(dir)?;
    if let Some(mut link) = RegionLink::load(dir)? {
        if link.region != region {
            return Err(setup(format!(
                "this data directory belongs to a hub of region '{}', not '{region}'",
                link.region
            )));
        }
        link.upstreams = upstreams.to_vec();
        link.save(dir)?;
        return Ok(link);
    }
    let token = token.ok_or_else(|| {
        setup(format!(
            "not enrolled yet: give --join-token (made at the centre with `verge token create --region {region}`)"
        ))
    })?;
    let mut last = String::new();
    for url in upstreams {
        let addr = url.trim_start_matches("https://").trim_end_matches('/');
        match enrol_at(addr, token, region).await {
            Ok((ca_pem, ca_key_pem, enrolment)) => {
                crate::config::write_private(&dir.join("ca.key"), ca_key_pem.as_bytes())?;
                crate::config::write_private(&dir.join("ca.crt"), ca_pem.as_bytes())?;
                let link = RegionLink {
                    region: region.to_string(),
                    upstreams: upstreams.to_vec(),
                    enrolment,
                };
                link.save(dir)?;
                tracing::info!(region, centre = addr, "enrolled with the centre");
                return Ok(link);
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(setup(format!("enrolment with the centre failed: {last}")))
}

async fn enrol_at(
    addr: &str,
    token: &str,
    region: &str,
) -> Result<(String, String, String), String> {
    use tokio::io::AsyncWriteExt;
    use verge_api::uplink::{CentreToRegion, RegionToCentre, UPLINK_VERSION};
    let parsed = verge_tunnel::pki::JoinToken::parse(token).map_err(|e| e.to_string())?;
    let cfg = verge_tunnel::tls::pinned_client_config(
        &parsed.ca_fingerprint,
        &[verge_api::channel::ALPN_ENROLL],
    )
    .map_err(|e| e.to_string())?;
    let mut s = verge_tunnel::tls::dial(addr, cfg).await.map_err(|e| {
        format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default()
        )
    })?;
    verge_tunnel::frame::write_msg(
        &mut s,
        &RegionToCentre::Enroll {
            protocol_version: UPLINK_VERSION,
            token: token.trim().to_string(),
            region: region.to_string(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let reply = verge_tunnel::frame::read_msg::<CentreToRegion, _>(&mut s)
        .await
        .map_err(|e| e.to_string())?;
    let _ = s.shutdown().await;
    match reply {
        Some(CentreToRegion::Enrolled {
            ca_pem,
            ca_key_pem,
            enrolment,
        }) => Ok((ca_pem, ca_key_pem, enrolment)),
        Some(CentreToRegion::Error { code, message }) => {
            Err(format!("refused ({code}): {message}"))
        }
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

/// Carry an edge's enrolment request to the centre (nodes are enrolled there, where
/// tokens are kept) and bring back its answer. A centre out of reach is an answer the
/// edge retries.
pub async fn relay_enrolment(
    st: &crate::state::HubState,
    request: &verge_api::channel::EdgeToHub,
) -> verge_api::channel::HubToEdge {
    use tokio::io::AsyncWriteExt;
    use verge_api::channel::{ALPN_ENROLL, HubToEdge};
    let Some(link) = &st.config.region else {
        return HubToEdge::error("internal", "not a region hub");
    };
    let mut last = String::new();
    for url in &link.upstreams {
        let addr = url.trim_start_matches("https://").trim_end_matches('/');
        let attempt = async {
            let cfg = verge_tunnel::tls::client_config(st.ca.cert_pem(), None, &[ALPN_ENROLL])
                .map_err(|e| e.to_string())?;
            let mut s = verge_tunnel::tls::dial(addr, cfg)
                .await
                .map_err(|e| e.to_string())?;
            verge_tunnel::frame::write_msg(&mut s, request)
                .await
                .map_err(|e| e.to_string())?;
            let reply = verge_tunnel::frame::read_msg::<HubToEdge, _>(&mut s)
                .await
                .map_err(|e| e.to_string())?;
            let _ = s.shutdown().await;
            reply.ok_or_else(|| "the centre closed the connection".to_string())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(15), attempt).await {
            Ok(Ok(reply)) => return reply,
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: no answer within 15s"),
        }
    }
    tracing::warn!(error = %last, "could not carry an enrolment to the centre");
    HubToEdge::error(
        "unavailable",
        format!(
            "region hub '{}' enrols nodes at its centre, which is out of reach now ({last}); the edge retries",
            link.region
        ),
    )
}

/// Whether the node belongs to `region`.
pub fn node_in(n: &Node, region: &str) -> bool {
    n.metadata.labels.get(REGION_LABEL).map(String::as_str) == Some(region)
}

/// The region an instance is placed in, if it names exactly one.
pub fn instance_region(i: &Instance) -> Option<&str> {
    let p = &i.spec.placement;
    match (&p.region, p.regions.as_slice()) {
        (Some(r), _) => Some(r),
        (None, [r]) => Some(r),
        _ => None,
    }
}

/// The regions that have a hub of their own: the centre leaves their nodes and
/// instances to them.
pub fn with_hubs<'a>(regions: impl IntoIterator<Item = &'a Region>) -> BTreeSet<String> {
    regions
        .into_iter()
        .filter(|r| verge_api::region::has_hub(r))
        .map(|r| r.name().to_string())
        .collect()
}

/// The regions whose own hubs run their controllers, as this hub sees them: none on a
/// region hub (it runs its region's), those with hubs on a centre.
pub fn managed_elsewhere<'a>(
    st: &crate::state::HubState,
    regions: impl IntoIterator<Item = &'a Region>,
) -> BTreeSet<String> {
    if st.config.region.is_some() {
        return BTreeSet::new();
    }
    with_hubs(regions)
}

/// Whether a region hub, not this hub, runs the controllers for `n`.
pub fn node_managed(n: &Node, managed: &BTreeSet<String>) -> bool {
    n.metadata
        .labels
        .get(REGION_LABEL)
        .is_some_and(|r| managed.contains(r))
}

/// A region's slice of the centre's store: which keys belong to it.
#[derive(Debug, Clone, Default)]
pub struct Slice {
    /// The region.
    pub region: String,
    /// Its nodes, as last seen.
    pub nodes: BTreeSet<String>,
}

/// Which part of the store a key is in.
enum Part<'a> {
    Region(&'a str),
    Node(&'a str),
    Enrolment(&'a str),
    Instance,
    Other,
}

fn part(key: &str) -> Part<'_> {
    if let Some(n) = key.strip_prefix(&kind_prefix(RegionSpec::PLURAL)) {
        Part::Region(n)
    } else if let Some(n) = key.strip_prefix(&kind_prefix(NodeSpec::PLURAL)) {
        Part::Node(n)
    } else if let Some(n) = key.strip_prefix(ENROLMENT_PREFIX) {
        Part::Enrolment(n)
    } else if key.starts_with(&kind_prefix(InstanceSpec::PLURAL)) {
        Part::Instance
    } else {
        Part::Other
    }
}

impl Slice {
    /// An empty slice of `region`.
    pub fn new(region: &str) -> Self {
        Self {
            region: region.to_string(),
            nodes: BTreeSet::new(),
        }
    }

    /// Note a node key's value (None: deleted), keeping the node set current.
    pub fn note_node(&mut self, key: &str, value: Option<&[u8]>) {
        if let Part::Node(name) = part(key) {
            let inside = value
                .and_then(|v| decode_value::<NodeSpec>(v, 0))
                .is_some_and(|n| node_in(&n, &self.region));
            if inside {
                self.nodes.insert(name.to_string());
            } else {
                self.nodes.remove(name);
            }
        }
    }

    /// Whether `key` with `value` belongs to the slice, given the nodes noted so far.
    pub fn contains(&self, key: &str, value: &[u8]) -> bool {
        match part(key) {
            Part::Region(name) => name == self.region,
            Part::Node(_) => {
                decode_value::<NodeSpec>(value, 0).is_some_and(|n| node_in(&n, &self.region))
            }
            Part::Enrolment(name) => self.nodes.contains(name),
            Part::Instance => decode_value::<InstanceSpec>(value, 0).is_some_and(|i| {
                instance_region(&i) == Some(self.region.as_str())
                    || i.status
                        .node
                        .as_deref()
                        .is_some_and(|n| self.nodes.contains(n))
            }),
            Part::Other => false,
        }
    }

    /// The prefixes the slice's keys live under.
    pub fn prefixes() -> [String; 4] {
        [
            kind_prefix(RegionSpec::PLURAL),
            kind_prefix(NodeSpec::PLURAL),
            ENROLMENT_PREFIX.to_string(),
            kind_prefix(InstanceSpec::PLURAL),
        ]
    }
}

/// Where the centre records a region hub's enrolment.
pub fn enrolment_key(region: &str) -> String {
    format!("/verge/regions/enrolments/{region}")
}

/// A write that lost: kept at both tiers, listed by `verge get conflicts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conflict {
    /// RFC 3339 time it was decided.
    pub at: String,
    /// The region whose write lost.
    pub region: String,
    /// Kind, plural.
    pub kind: String,
    /// Object name.
    pub name: String,
    /// What the region wrote (apply or delete) and on which generation.
    pub write: String,
    /// Why it lost, and what stands instead.
    pub message: String,
}

/// Where conflicts are kept.
pub const CONFLICT_PREFIX: &str = "/verge/conflicts/";

impl Conflict {
    /// The store operation that records it.
    pub fn op(&self) -> verge_store::Op {
        let id: [u8; 6] = rand::random();
        verge_store::Op::put(
            format!(
                "{CONFLICT_PREFIX}{}-{}",
                self.at,
                verge_tunnel::pki::hex(&id)
            ),
            serde_json::to_vec(self).unwrap_or_default(),
        )
    }
}

/// Every conflict recorded in `store`, oldest first.
pub async fn conflicts(
    store: &dyn verge_store::Store,
) -> Result<Vec<Conflict>, verge_api::ApiError> {
    let r = store
        .range(CONFLICT_PREFIX)
        .await
        .map_err(crate::objects::store_err)?;
    Ok(r.kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::Object;

    fn node(name: &str, region: &str) -> Vec<u8> {
        let mut n = Node::new(name, Default::default());
        n.metadata.labels.insert(REGION_LABEL.into(), region.into());
        crate::objects::Objects::encode(&n)
    }

    fn instance(name: &str, region: Option<&str>, node: Option<&str>) -> Vec<u8> {
        let mut i: Object<InstanceSpec> = Instance::new(name, Default::default());
        i.spec.placement.region = region.map(str::to_string);
        i.status.node = node.map(str::to_string);
        crate::objects::Objects::encode(&i)
    }

    #[test]
    fn the_slice_is_the_region_its_nodes_their_enrolments_and_its_instances() {
        let mut s = Slice::new("eu");
        let nk = |n: &str| format!("{}{n}", kind_prefix(NodeSpec::PLURAL));
        let ik = |n: &str| format!("{}{n}", kind_prefix(InstanceSpec::PLURAL));
        s.note_node(&nk("a"), Some(&node("a", "eu")));
        s.note_node(&nk("b"), Some(&node("b", "us")));
        assert!(s.contains(&nk("a"), &node("a", "eu")));
        assert!(!s.contains(&nk("b"), &node("b", "us")));
        assert!(s.contains(&format!("{ENROLMENT_PREFIX}a"), b"{}"));
        assert!(!s.contains(&format!("{ENROLMENT_PREFIX}b"), b"{}"));
        assert!(s.contains(&ik("placed"), &instance("placed", Some("eu"), None)));
        assert!(s.contains(&ik("bound"), &instance("bound", None, Some("a"))));
        assert!(!s.contains(&ik("other"), &instance("other", Some("us"), Some("b"))));
        assert!(!s.contains(&ik("free"), &instance("free", None, None)));
        assert!(s.contains(&format!("{}eu", kind_prefix(RegionSpec::PLURAL)), b"{}"));
        assert!(!s.contains(&format!("{}us", kind_prefix(RegionSpec::PLURAL)), b"{}"));
        assert!(!s.contains("/verge/system/ca", b"{}"));
        // A node that moves away takes its enrolment with it.
        s.note_node(&nk("a"), Some(&node("a", "us")));
        assert!(!s.contains(&format!("{ENROLMENT_PREFIX}a"), b"{}"));
        s.note_node(&nk("b"), None);
        assert!(s.nodes.is_empty());
    }
}
