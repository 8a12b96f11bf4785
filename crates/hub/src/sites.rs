//! Which nodes share a site, and where each answers its peers' probes: what every
//! edge session tells its node ([`HubToEdge::Peers`]) so that the nodes of a site can
//! vote on each other ([`crate::disconnect`]).
//!
//! Kept on every replica (each serves sessions), fed by one watch of the nodes. A
//! node belongs to the site its `site` label names; a node without one probes no one.
//! It answers probes at the address it reports (`status.info.peerAddress`).
//!
//! [`HubToEdge::Peers`]: verge_api::channel::HubToEdge::Peers

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use verge_api::channel::SitePeer;
use verge_api::node::PEER_ADDRESS;
use verge_api::{Kind, Node, NodeSpec, kind_prefix};
use verge_store::{EventKind, Store, StoreError};

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

#[derive(Default)]
struct Inner {
    /// Node → its site.
    site: HashMap<String, String>,
    /// Site → node → probe address ("" while it reports none).
    members: HashMap<String, BTreeMap<String, String>>,
}

impl Inner {
    fn forget(&mut self, node: &str) {
        if let Some(site) = self.site.remove(node)
            && let Some(m) = self.members.get_mut(&site)
        {
            m.remove(node);
            if m.is_empty() {
                self.members.remove(&site);
            }
        }
    }

    fn note(&mut self, n: &Node) {
        self.forget(n.name());
        let Some(site) = site_of(n) else {
            return;
        };
        let addr = n.status.info.get(PEER_ADDRESS).cloned().unwrap_or_default();
        self.site.insert(n.name().to_string(), site.to_string());
        self.members
            .entry(site.to_string())
            .or_default()
            .insert(n.name().to_string(), addr);
    }
}

/// The sites index ([module docs](self)).
#[derive(Default)]
pub struct Sites {
    inner: Mutex<Inner>,
}

impl Sites {
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
        let prefix = kind_prefix(NodeSpec::PLURAL);
        let listed = store.range(&prefix).await?;
        {
            let mut inner = self.lock();
            *inner = Inner::default();
            for kv in &listed.kvs {
                if let Some(n) = decode_value::<NodeSpec>(&kv.value, kv.mod_revision) {
                    inner.note(&n);
                }
            }
        }
        let mut watch = store.watch(&prefix, listed.revision + 1).await?;
        while let Some(batch) = watch.recv().await {
            let batch = batch?;
            let mut inner = self.lock();
            for ev in batch.events {
                let name = ev.kv.key.trim_start_matches(&prefix);
                match ev.kind {
                    EventKind::Put => {
                        if let Some(n) = decode_value::<NodeSpec>(&ev.kv.value, ev.kv.mod_revision)
                        {
                            inner.note(&n);
                        }
                    }
                    EventKind::Delete => inner.forget(name),
                }
            }
        }
        Err(StoreError::Backend("the node watch ended".into()))
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

    #[test]
    fn each_site_has_its_own_key() {
        assert_ne!(site_key("ca", "paris"), site_key("ca", "lyon"));
        assert_ne!(site_key("ca", "paris"), site_key("other ca", "paris"));
        assert_eq!(site_key("ca", "paris").len(), 64);
    }
}
