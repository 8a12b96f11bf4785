//! Which nodes share a site, and where each answers its peers' probes: what every
//! edge session tells its node ([`HubToEdge::Peers`]) so that the nodes of a site can
//! vote on each other ([`crate::disconnect`]).
//!
//! Kept on every replica (each serves sessions), fed by one watch of the nodes. A
//! node belongs to the site its `site` label names; a node without one probes no one.
//! It answers probes at the address it reports (`status.info.peerAddress`).
//!
//! It also knows which clusters each node belongs to (their selectors against its
//! labels) and each cluster's endpoints (`Cluster.status.endpoints`, which the leader
//! writes): what every session tells its node ([`HubToEdge::Endpoints`]) for the
//! site-local load balancers it may run. A second watch, of the clusters, feeds that.
//!
//! [`HubToEdge::Peers`]: verge_api::channel::HubToEdge::Peers
//! [`HubToEdge::Endpoints`]: verge_api::channel::HubToEdge::Endpoints

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use verge_api::channel::SitePeer;
use verge_api::cluster::{Endpoint, selector_picks};
use verge_api::node::PEER_ADDRESS;
use verge_api::{Cluster, ClusterSpec, Kind, Node, NodeSpec, kind_prefix};
use verge_store::{EventKind, Store, StoreError, WatchBatch};

use crate::objects::decode_value;

/// The label naming a node's site.
pub const SITE_LABEL: &str = "site";

/// A node's site, if it has one.
pub fn site_of(n: &Node) -> Option<&str> {
    n.metadata
        .labels
        .get(SITE_LABEL)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// A cluster's selector: the labels its nodes carry.
type Selector = BTreeMap<String, String>;

#[derive(Default)]
struct Inner {
    /// Node → its site.
    site: HashMap<String, String>,
    /// Site → node → probe address ("" while it reports none).
    members: HashMap<String, BTreeMap<String, String>>,
    /// Cluster → its selector and endpoints.
    clusters: BTreeMap<String, (Selector, Arc<Vec<Endpoint>>)>,
    /// Node → the clusters it belongs to (only nodes in one or more).
    in_clusters: HashMap<String, Vec<String>>,
}

impl Inner {
    /// Forget `node`; whether it was in a site or a cluster.
    fn forget(&mut self, node: &str) -> bool {
        let mut was = self.in_clusters.remove(node).is_some();
        if let Some(site) = self.site.remove(node) {
            was = true;
            if let Some(m) = self.members.get_mut(&site) {
                m.remove(node);
                if m.is_empty() {
                    self.members.remove(&site);
                }
            }
        }
        was
    }

    /// Take in `n`; whether what any node is told changed (its site, its probe
    /// address, its clusters).
    fn note(&mut self, n: &Node) -> bool {
        let name = n.name();
        let clusters: Vec<String> = self
            .clusters
            .iter()
            .filter(|(_, (sel, _))| selector_picks(sel, &n.metadata.labels))
            .map(|(c, _)| c.clone())
            .collect();
        let site = site_of(n);
        let addr = n.status.info.get(PEER_ADDRESS).cloned().unwrap_or_default();
        let same_clusters = self
            .in_clusters
            .get(name)
            .map_or(clusters.is_empty(), |c| *c == clusters);
        let same_site = match (self.site.get(name), site) {
            (None, None) => true,
            (Some(was), Some(site)) => {
                was == site && self.members.get(site).and_then(|m| m.get(name)) == Some(&addr)
            }
            _ => false,
        };
        if same_clusters && same_site {
            return false;
        }
        self.forget(name);
        if !clusters.is_empty() {
            self.in_clusters.insert(name.to_string(), clusters);
        }
        if let Some(site) = site {
            self.site.insert(name.to_string(), site.to_string());
            self.members
                .entry(site.to_string())
                .or_default()
                .insert(name.to_string(), addr);
        }
        true
    }
}

/// The sites index ([module docs](self)).
pub struct Sites {
    inner: Mutex<Inner>,
    /// Bumped whenever what some node is told may have changed: sessions wait on it
    /// instead of each looking every few seconds.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Sites {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Sites {
    /// Told of every change that may concern some node ([`Sites::peers_of`],
    /// [`Sites::endpoints_of`]).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `node`'s site and the other nodes there that answer probes.
    pub fn peers_of(&self, node: &str) -> Option<(String, Vec<SitePeer>)> {
        let inner = self.lock();
        let site = inner.site.get(node)?;
        let peers = inner
            .members
            .get(site)?
            .iter()
            .filter(|(name, addr)| name.as_str() != node && !addr.is_empty())
            .map(|(name, addr)| SitePeer {
                name: name.clone(),
                address: addr.clone(),
            })
            .collect();
        Some((site.clone(), peers))
    }

    /// The endpoints of each cluster `node` belongs to (shared, not copied: a session
    /// compares them with what it told its node by pointer).
    pub fn endpoints_of(&self, node: &str) -> Vec<Arc<Vec<Endpoint>>> {
        let inner = self.lock();
        inner.in_clusters.get(node).map_or_else(Vec::new, |cs| {
            cs.iter()
                .filter_map(|c| inner.clusters.get(c).map(|(_, e)| e.clone()))
                .collect()
        })
    }

    /// Take in a cluster: `Err(())` when its selector is new or changed, which the
    /// nodes' memberships must be worked out again for.
    fn note_cluster(inner: &mut Inner, c: &Cluster) -> Result<(), ()> {
        let endpoints = Arc::new(c.status.endpoints.clone());
        match inner.clusters.get_mut(c.name()) {
            Some((sel, e)) if *sel == c.spec.selector => {
                if **e != *endpoints {
                    *e = endpoints;
                }
                Ok(())
            }
            _ => Err(()),
        }
    }

    /// Keep the index for the hub's lifetime.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            if let Err(e) = self.load_and_follow(store.as_ref()).await {
                tracing::warn!(error = %e, "the sites' node watch failed; loading it again");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn load_and_follow(&self, store: &dyn Store) -> Result<(), StoreError> {
        let nodes_prefix = kind_prefix(NodeSpec::PLURAL);
        let clusters_prefix = kind_prefix(ClusterSpec::PLURAL);
        let listed_clusters = store.range(&clusters_prefix).await?;
        let listed = store.range(&nodes_prefix).await?;
        {
            let mut inner = self.lock();
            *inner = Inner::default();
            for kv in &listed_clusters.kvs {
                if let Some(c) = decode_value::<ClusterSpec>(&kv.value, kv.mod_revision) {
                    let endpoints = Arc::new(c.status.endpoints);
                    inner
                        .clusters
                        .insert(c.metadata.name, (c.spec.selector, endpoints));
                }
            }
            for kv in &listed.kvs {
                if let Some(n) = decode_value::<NodeSpec>(&kv.value, kv.mod_revision) {
                    inner.note(&n);
                }
            }
        }
        self.bump();
        let mut nodes = store.watch(&nodes_prefix, listed.revision + 1).await?;
        let mut clusters = store
            .watch(&clusters_prefix, listed_clusters.revision + 1)
            .await?;
        loop {
            tokio::select! {
                batch = nodes.recv() => {
                    let Some(batch) = batch else { break };
                    self.nodes_changed(&nodes_prefix, batch?);
                }
                batch = clusters.recv() => {
                    let Some(batch) = batch else { break };
                    if self.clusters_changed(&clusters_prefix, batch?).is_err() {
                        // A new or changed selector: every node's memberships again.
                        return Ok(());
                    }
                }
            }
        }
        Err(StoreError::Backend(
            "the node or cluster watch ended".into(),
        ))
    }

    fn nodes_changed(&self, prefix: &str, batch: WatchBatch) {
        let mut changed = false;
        {
            let mut inner = self.lock();
            for ev in batch.events {
                changed |= match ev.kind {
                    EventKind::Put => decode_value::<NodeSpec>(&ev.kv.value, ev.kv.mod_revision)
                        .is_some_and(|n| inner.note(&n)),
                    EventKind::Delete => inner.forget(ev.kv.key.trim_start_matches(prefix)),
                };
            }
        }
        if changed {
            self.bump();
        }
    }

    fn clusters_changed(&self, prefix: &str, batch: WatchBatch) -> Result<(), ()> {
        let result = self.take_clusters(prefix, batch);
        self.bump();
        result
    }

    fn take_clusters(&self, prefix: &str, batch: WatchBatch) -> Result<(), ()> {
        let mut inner = self.lock();
        for ev in batch.events {
            match ev.kind {
                EventKind::Put => {
                    if let Some(c) = decode_value::<ClusterSpec>(&ev.kv.value, ev.kv.mod_revision) {
                        Self::note_cluster(&mut inner, &c)?;
                    }
                }
                EventKind::Delete => {
                    let name = ev.kv.key.trim_start_matches(prefix);
                    inner.clusters.remove(name);
                    for cs in inner.in_clusters.values_mut() {
                        cs.retain(|c| c != name);
                    }
                    inner.in_clusters.retain(|_, cs| !cs.is_empty());
                }
            }
        }
        Ok(())
    }
}

/// The key that signs a site's probes: derived from the CA key the replicas share, so
/// every replica hands out the same one and no one without the CA key can make it.
pub fn site_key(ca_key_pem: &str, site: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::new()
        .chain_update(b"verge site probe key\0")
        .chain_update(ca_key_pem.as_bytes())
        .chain_update(b"\0")
        .chain_update(site.as_bytes())
        .finalize();
    verge_tunnel::pki::hex(&d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, site: Option<&str>, addr: Option<&str>) -> Node {
        let mut n = Node::new(name, Default::default());
        if let Some(s) = site {
            n.metadata.labels.insert(SITE_LABEL.into(), s.into());
        }
        if let Some(a) = addr {
            n.status.info.insert(PEER_ADDRESS.into(), a.into());
        }
        n
    }

    #[test]
    fn peers_are_the_other_probing_nodes_of_the_same_site() {
        let s = Sites::default();
        {
            let mut i = s.lock();
            i.note(&node("a", Some("paris"), Some("10.0.0.1:7947")));
            i.note(&node("b", Some("paris"), Some("10.0.0.2:7947")));
            i.note(&node("c", Some("paris"), None));
            i.note(&node("d", Some("lyon"), Some("10.1.0.1:7947")));
            i.note(&node("e", None, Some("10.2.0.1:7947")));
        }
        let (site, peers) = s.peers_of("a").expect("a has a site");
        assert_eq!(site, "paris");
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["b"],
            "not itself, not one that does not probe, not another site"
        );
        assert!(s.peers_of("e").is_none());
        // A node that moves site leaves the old one.
        s.lock()
            .note(&node("b", Some("lyon"), Some("10.0.0.2:7947")));
        assert!(s.peers_of("a").expect("site").1.is_empty());
        s.lock().forget("d");
        assert!(s.peers_of("b").expect("site").1.is_empty());
    }

    /// Sessions sleep until the index changes: a node's write that changes nothing
    /// any node is told (a status refresh, a node in no site or cluster) wakes none.
    #[test]
    fn only_changes_that_some_node_is_told_wake_the_sessions() {
        let s = Sites::default();
        let mut changes = s.changes();
        let batch = |nodes: &[Node]| WatchBatch {
            events: nodes
                .iter()
                .map(|n| verge_store::Event {
                    kind: EventKind::Put,
                    kv: verge_store::KeyValue {
                        key: format!("/nodes/{}", n.name()),
                        value: serde_json::to_vec(n).expect("encode"),
                        mod_revision: 2,
                        create_revision: 1,
                        version: 1,
                    },
                    prev_kv: None,
                })
                .collect(),
            revision: 2,
        };
        s.nodes_changed(
            "/nodes/",
            batch(&[node("lone", None, Some("10.0.0.9:7947"))]),
        );
        assert!(!changes.has_changed().expect("open"), "a node in no site");
        s.nodes_changed(
            "/nodes/",
            batch(&[node("a", Some("paris"), Some("10.0.0.1:7947"))]),
        );
        assert!(changes.has_changed().expect("open"), "a site member");
        changes.borrow_and_update();
        s.nodes_changed(
            "/nodes/",
            batch(&[node("a", Some("paris"), Some("10.0.0.1:7947"))]),
        );
        assert!(!changes.has_changed().expect("open"), "the same again");
        s.nodes_changed(
            "/nodes/",
            batch(&[node("a", Some("paris"), Some("10.0.0.2:7947"))]),
        );
        assert!(changes.has_changed().expect("open"), "a new probe address");
    }

    #[test]
    fn a_node_is_told_the_endpoints_of_every_cluster_it_belongs_to() {
        let s = Sites::default();
        let cluster = |name: &str, sel: &[(&str, &str)], instances: &[&str]| {
            let mut c = Cluster::new(
                name,
                ClusterSpec {
                    selector: sel
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                },
            );
            c.status.endpoints = instances
                .iter()
                .map(|i| Endpoint {
                    instance: i.to_string(),
                    ..Default::default()
                })
                .collect();
            c
        };
        let mut gpu = node("a", Some("paris"), None);
        gpu.metadata.labels.insert("gpu".into(), "yes".into());
        {
            let mut i = s.lock();
            for c in [
                cluster("paris", &[("site", "paris")], &["p-1"]),
                cluster("gpus", &[("gpu", "yes")], &["g-1"]),
            ] {
                // New clusters want every membership worked out (a reload).
                assert!(Sites::note_cluster(&mut i, &c).is_err());
                i.clusters.insert(
                    c.name().to_string(),
                    (c.spec.selector.clone(), Arc::new(c.status.endpoints)),
                );
            }
            i.note(&gpu);
            i.note(&node("b", Some("paris"), None));
            i.note(&node("c", Some("lyon"), None));
        }
        let names = |n: &str| -> Vec<String> {
            s.endpoints_of(n)
                .iter()
                .flat_map(|e| e.iter().map(|e| e.instance.clone()))
                .collect()
        };
        assert_eq!(names("a"), ["g-1", "p-1"]);
        assert_eq!(names("b"), ["p-1"]);
        assert!(names("c").is_empty());
        // New endpoints of a known cluster replace the shared list; nothing else.
        let before = s.endpoints_of("b");
        Sites::note_cluster(
            &mut s.lock(),
            &cluster("paris", &[("site", "paris")], &["p-1", "p-2"]),
        )
        .expect("same selector");
        assert_eq!(names("b"), ["p-1", "p-2"]);
        assert!(!Arc::ptr_eq(&before[0], &s.endpoints_of("b")[0]));
        let same = s.endpoints_of("b");
        Sites::note_cluster(
            &mut s.lock(),
            &cluster("paris", &[("site", "paris")], &["p-1", "p-2"]),
        )
        .expect("same selector");
        assert!(
            Arc::ptr_eq(&same[0], &s.endpoints_of("b")[0]),
            "unchanged: the same list"
        );
    }

    #[test]
    fn each_site_has_its_own_key() {
        assert_ne!(site_key("ca", "paris"), site_key("ca", "lyon"));
        assert_ne!(site_key("ca", "paris"), site_key("other ca", "paris"));
        assert_eq!(site_key("ca", "paris").len(), 64);
    }
}
