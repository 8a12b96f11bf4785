//! The console's index: a small row for every node and instance, kept in memory from
//! one watch of the store, and the summary, pages and filters the console reads.
//! Loaded the first time the console asks (a hub nobody looks at pays nothing), then
//! kept; a watch that fails (compacted past) loads it again and tells every open view
//! to read its page again.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use verge_api::{
    ApiError, ApplicationSpec, ErrorCode, Instance, InstanceSpec, Kind, Node, NodeSpec, kind_prefix,
};
use verge_store::{EventKind, Store, StoreError};

use super::RowQuery;
use crate::objects::decode_value;
use crate::state::HubState;

/// A node as the console lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    /// Name.
    pub name: String,
    /// Ready or NotReady.
    pub phase: String,
    /// Why it is in its phase.
    pub message: String,
    /// Its region label.
    pub region: String,
    /// Its site label (the cluster).
    pub site: String,
    /// CPU offered to instances, millicores.
    pub cpu: u64,
    /// Memory offered to instances, bytes.
    pub memory: u64,
    /// Last heartbeat written (RFC 3339).
    pub heartbeat: String,
    /// Agent version.
    pub agent: String,
}

/// An instance as the console lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRow {
    /// Name.
    pub name: String,
    /// Phase.
    pub phase: String,
    /// The node it is bound to.
    pub node: String,
    /// Its `app` label.
    pub app: String,
    /// process, container, vm or function.
    pub form: String,
    /// CPU asked for, millicores.
    pub cpu: u64,
    /// Memory asked for, bytes.
    pub memory: u64,
    /// Restarts on its node.
    pub restarts: u32,
    /// Why it is in its phase.
    pub message: String,
}

fn node_row(n: &Node) -> NodeRow {
    let l = |k: &str| n.metadata.labels.get(k).cloned().unwrap_or_default();
    NodeRow {
        name: n.metadata.name.clone(),
        phase: n.status.phase.to_string(),
        message: n.status.message.clone(),
        region: l(verge_api::region::REGION_LABEL),
        site: l(crate::sites::SITE_LABEL),
        cpu: n.status.allocatable.cpu.0,
        memory: n.status.allocatable.memory.0,
        heartbeat: n.status.last_heartbeat.clone().unwrap_or_default(),
        agent: n.status.agent_version.clone(),
    }
}

fn instance_row(i: &Instance) -> InstanceRow {
    InstanceRow {
        name: i.metadata.name.clone(),
        phase: i.status.phase.to_string(),
        node: i.status.node.clone().unwrap_or_default(),
        app: i.metadata.labels.get("app").cloned().unwrap_or_default(),
        form: i.spec.form.to_string(),
        cpu: i.spec.resources.cpu.0,
        memory: i.spec.resources.memory.0,
        restarts: i.status.restarts,
        message: i.status.message.clone(),
    }
}

#[derive(Default)]
struct Rows {
    nodes: BTreeMap<String, NodeRow>,
    instances: BTreeMap<String, InstanceRow>,
}

/// The loaded index.
pub struct Loaded {
    rows: RwLock<Rows>,
    changes: broadcast::Sender<Arc<str>>,
}

/// Changes queued for one console view before it is told to read its page again.
const VIEW_QUEUE: usize = 4096;

fn has(hay: &str, needle: &str) -> bool {
    needle.is_empty() || hay.to_ascii_lowercase().contains(needle)
}

fn page<T: Clone + Serialize>(rows: Vec<&T>, q: &RowQuery, limit: usize) -> serde_json::Value {
    let total = rows.len();
    let offset = q.offset.unwrap_or(0).min(total);
    let items: Vec<T> = rows.into_iter().skip(offset).take(limit).cloned().collect();
    serde_json::json!({ "total": total, "offset": offset, "items": items })
}

impl Loaded {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Rows> {
        self.rows.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Changed rows, as the console's watch sends them.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.changes.subscribe()
    }

    /// Each node's site and region, and each instance's app (the labels metrics
    /// series get).
    pub fn labels(
        &self,
    ) -> (
        std::collections::HashMap<String, (String, String)>,
        std::collections::HashMap<String, String>,
    ) {
        let rows = self.read();
        let nodes = rows
            .nodes
            .values()
            .map(|n| (n.name.clone(), (n.site.clone(), n.region.clone())))
            .collect();
        let apps = rows
            .instances
            .values()
            .filter(|i| !i.app.is_empty())
            .map(|i| (i.name.clone(), i.app.clone()))
            .collect();
        (nodes, apps)
    }

    /// One page of nodes.
    pub fn nodes(&self, q: &RowQuery, limit: usize) -> serde_json::Value {
        let needle = q.q.as_deref().unwrap_or("").to_ascii_lowercase();
        let rows = self.read();
        let picked: Vec<&NodeRow> = rows
            .nodes
            .values()
            .filter(|n| q.site.as_deref().is_none_or(|s| n.site == s))
            .filter(|n| q.region.as_deref().is_none_or(|r| n.region == r))
            .filter(|n| q.phase.as_deref().is_none_or(|p| n.phase == p))
            .filter(|n| {
                has(&n.name, &needle)
                    || has(&n.site, &needle)
                    || has(&n.region, &needle)
                    || has(&n.phase, &needle)
            })
            .collect();
        page(picked, q, limit)
    }

    /// One page of instances.
    pub fn instances(&self, q: &RowQuery, limit: usize) -> serde_json::Value {
        let needle = q.q.as_deref().unwrap_or("").to_ascii_lowercase();
        let rows = self.read();
        let site_of = |node: &str| rows.nodes.get(node).map_or("", |n| n.site.as_str());
        let picked: Vec<&InstanceRow> = rows
            .instances
            .values()
            .filter(|i| q.node.as_deref().is_none_or(|n| i.node == n))
            .filter(|i| q.phase.as_deref().is_none_or(|p| i.phase == p))
            .filter(|i| q.site.as_deref().is_none_or(|s| site_of(&i.node) == s))
            .filter(|i| {
                has(&i.name, &needle)
                    || has(&i.node, &needle)
                    || has(&i.app, &needle)
                    || has(&i.phase, &needle)
            })
            .collect();
        page(picked, q, limit)
    }

    /// Regions, their sites with node health and capacity, instances by phase.
    pub fn summary(&self) -> serde_json::Value {
        #[derive(Default, Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Site {
            nodes: usize,
            ready: usize,
            cpu: u64,
            memory: u64,
            cpu_requested: u64,
            memory_requested: u64,
            instances: usize,
        }
        let rows = self.read();
        let mut regions: BTreeMap<&str, BTreeMap<&str, Site>> = BTreeMap::new();
        for n in rows.nodes.values() {
            let s = regions
                .entry(n.region.as_str())
                .or_default()
                .entry(n.site.as_str())
                .or_default();
            s.nodes += 1;
            s.ready += usize::from(n.phase == "Ready");
            s.cpu += n.cpu;
            s.memory += n.memory;
        }
        let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
        for i in rows.instances.values() {
            *phases.entry(i.phase.as_str()).or_default() += 1;
            let Some(n) = rows.nodes.get(&i.node) else {
                continue;
            };
            if let Some(s) = regions
                .get_mut(n.region.as_str())
                .and_then(|r| r.get_mut(n.site.as_str()))
            {
                s.instances += 1;
                s.cpu_requested += i.cpu;
                s.memory_requested += i.memory;
            }
        }
        let ready = rows.nodes.values().filter(|n| n.phase == "Ready").count();
        serde_json::json!({
            "nodes": {"total": rows.nodes.len(), "ready": ready},
            "instances": {"total": rows.instances.len(), "byPhase": phases},
            "regions": regions.into_iter().map(|(region, sites)| serde_json::json!({
                "name": region,
                "sites": sites.into_iter().map(|(name, s)| {
                    let mut v = serde_json::to_value(s).unwrap_or_default();
                    v["name"] = name.into();
                    v
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    /// Apply one change of the store; the line the watch sends for it, if any.
    fn apply(&self, key: &str, value: Option<&[u8]>, revision: u64) -> Option<String> {
        let mut rows = self.rows.write().unwrap_or_else(|e| e.into_inner());
        let (nodes, instances) = (
            kind_prefix(NodeSpec::PLURAL),
            kind_prefix(InstanceSpec::PLURAL),
        );
        if let Some(name) = key.strip_prefix(nodes.as_str()) {
            let Some(v) = value else {
                rows.nodes.remove(name)?;
                return Some(
                    serde_json::json!({"type": "node", "op": "delete", "name": name}).to_string(),
                );
            };
            let row = node_row(&decode_value::<NodeSpec>(v, revision)?);
            // A heartbeat alone changes nothing a view shows but its time: those
            // go out at most as the row's next real change.
            let old = rows.nodes.insert(name.to_string(), row.clone());
            if old.is_some_and(|o| {
                NodeRow {
                    heartbeat: row.heartbeat.clone(),
                    ..o
                } == row
            }) {
                return None;
            }
            Some(serde_json::json!({"type": "node", "op": "put", "row": row}).to_string())
        } else if let Some(name) = key.strip_prefix(instances.as_str()) {
            let Some(v) = value else {
                rows.instances.remove(name)?;
                return Some(
                    serde_json::json!({"type": "instance", "op": "delete", "name": name})
                        .to_string(),
                );
            };
            let row = instance_row(&decode_value::<InstanceSpec>(v, revision)?);
            if rows
                .instances
                .insert(name.to_string(), row.clone())
                .as_ref()
                == Some(&row)
            {
                return None;
            }
            Some(serde_json::json!({"type": "instance", "op": "put", "row": row}).to_string())
        } else if let Some(name) = key.strip_prefix(&kind_prefix(ApplicationSpec::PLURAL)) {
            // Few and small: a view reads them whole; the watch says which changed.
            let op = if value.is_some() { "put" } else { "delete" };
            Some(serde_json::json!({"type": "application", "op": op, "name": name}).to_string())
        } else {
            None
        }
    }
}

/// The index, loaded on first use ([module docs](self)).
#[derive(Default)]
pub struct ConsoleIndex {
    loaded: std::sync::OnceLock<(Arc<Loaded>, watch::Receiver<bool>)>,
}

impl ConsoleIndex {
    /// The index, loading it first if nobody has asked before.
    pub async fn ready(&self, st: &HubState) -> Result<Arc<Loaded>, ApiError> {
        let (idx, rx) = self.loaded.get_or_init(|| {
            let (tx, rx) = watch::channel(false);
            let idx = Arc::new(Loaded {
                rows: RwLock::default(),
                changes: broadcast::channel(VIEW_QUEUE).0,
            });
            tokio::spawn(follow(idx.clone(), st.objects.store().clone(), tx));
            (idx, rx)
        });
        let mut rx = rx.clone();
        let loaded = tokio::time::timeout(std::time::Duration::from_secs(30), rx.wait_for(|l| *l))
            .await
            .is_ok_and(|r| r.is_ok());
        if !loaded {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "the console's index is still loading; try again in a moment",
            )
            .retry_after(std::time::Duration::from_secs(1)));
        }
        Ok(idx.clone())
    }
}

/// Load the index and follow the store, for as long as the hub runs.
async fn follow(idx: Arc<Loaded>, store: Arc<dyn Store>, loaded: watch::Sender<bool>) {
    loop {
        if let Err(e) = load_and_follow(&idx, store.as_ref(), &loaded).await {
            tracing::warn!(error = %e, "the console's watch failed; loading it again");
        }
        let _ = idx.changes.send(Arc::from(r#"{"type":"resync"}"#));
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn load_and_follow(
    idx: &Loaded,
    store: &dyn Store,
    loaded: &watch::Sender<bool>,
) -> Result<(), StoreError> {
    let nodes = store.range(&kind_prefix(NodeSpec::PLURAL)).await?;
    let instances = store.range(&kind_prefix(InstanceSpec::PLURAL)).await?;
    let from = nodes.revision.min(instances.revision);
    {
        let mut rows = Rows::default();
        for kv in &nodes.kvs {
            if let Some(n) = decode_value::<NodeSpec>(&kv.value, kv.mod_revision) {
                rows.nodes.insert(n.metadata.name.clone(), node_row(&n));
            }
        }
        for kv in &instances.kvs {
            if let Some(i) = decode_value::<InstanceSpec>(&kv.value, kv.mod_revision) {
                rows.instances
                    .insert(i.metadata.name.clone(), instance_row(&i));
            }
        }
        *idx.rows.write().unwrap_or_else(|e| e.into_inner()) = rows;
    }
    loaded.send_replace(true);
    let mut w = store.watch("/registry/", from + 1).await?;
    while let Some(batch) = w.recv().await {
        for ev in batch?.events {
            let value = (ev.kind == EventKind::Put).then_some(ev.kv.value.as_slice());
            if let Some(line) = idx.apply(&ev.kv.key, value, ev.kv.mod_revision) {
                let _ = idx.changes.send(Arc::from(line));
            }
        }
    }
    Err(StoreError::Backend("the console's watch ended".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded() -> Loaded {
        Loaded {
            rows: RwLock::default(),
            changes: broadcast::channel(16).0,
        }
    }

    fn node(name: &str, site: &str, phase: verge_api::NodePhase) -> Vec<u8> {
        let mut n = Node::new(name, NodeSpec::default());
        n.metadata.labels.insert("site".into(), site.into());
        n.metadata.labels.insert("region".into(), "eu".into());
        n.status.phase = phase;
        n.status.allocatable.cpu = verge_api::Cpu(2000);
        serde_json::to_vec(&n).unwrap()
    }

    fn inst(name: &str, node: &str, app: &str) -> Vec<u8> {
        let mut i = Instance::new(name, InstanceSpec::default());
        i.metadata.labels.insert("app".into(), app.into());
        i.status.node = Some(node.into());
        i.spec.resources.cpu = verge_api::Cpu(100);
        serde_json::to_vec(&i).unwrap()
    }

    #[test]
    fn pages_filters_and_the_summary_come_from_the_rows() {
        use verge_api::NodePhase::{NotReady, Ready};
        let idx = loaded();
        let np = kind_prefix(NodeSpec::PLURAL);
        let ip = kind_prefix(InstanceSpec::PLURAL);
        for i in 0..30 {
            let site = if i < 20 { "paris" } else { "lyon" };
            let phase = if i == 3 { NotReady } else { Ready };
            idx.apply(
                &format!("{np}n{i:02}"),
                Some(&node(&format!("n{i:02}"), site, phase)),
                1,
            );
        }
        for i in 0..250 {
            let app = if i % 2 == 0 { "shop" } else { "blog" };
            idx.apply(
                &format!("{ip}web-{i:03}"),
                Some(&inst(
                    &format!("web-{i:03}"),
                    &format!("n{:02}", i % 30),
                    app,
                )),
                2,
            );
        }
        let q = RowQuery {
            q: Some("SHOP".into()),
            limit: None,
            ..Default::default()
        };
        let page = idx.instances(&q, 100);
        assert_eq!(page["total"], 125);
        assert_eq!(page["items"].as_array().unwrap().len(), 100);
        let q = RowQuery {
            site: Some("lyon".into()),
            ..Default::default()
        };
        assert_eq!(idx.nodes(&q, 100)["total"], 10);
        let q = RowQuery {
            phase: Some("NotReady".into()),
            ..Default::default()
        };
        assert_eq!(idx.nodes(&q, 100)["items"][0]["name"], "n03");
        let s = idx.summary();
        assert_eq!(s["nodes"], serde_json::json!({"total": 30, "ready": 29}));
        let paris = &s["regions"][0]["sites"][1];
        assert_eq!(paris["name"], "paris");
        assert_eq!(paris["nodes"], 20);
        assert_eq!(paris["cpu"], 40_000);
        // A heartbeat alone sends no line; a phase change does; a delete does.
        let mut n = decode_value::<NodeSpec>(&node("n00", "paris", Ready), 3).unwrap();
        n.status.last_heartbeat = Some("2026-12-05T00:00:00Z".into());
        assert!(
            idx.apply(
                &format!("{np}n00"),
                Some(&serde_json::to_vec(&n).unwrap()),
                3
            )
            .is_none()
        );
        n.status.phase = NotReady;
        let line = idx
            .apply(
                &format!("{np}n00"),
                Some(&serde_json::to_vec(&n).unwrap()),
                4,
            )
            .unwrap();
        assert!(line.contains("\"NotReady\""), "{line}");
        assert!(
            idx.apply(&format!("{ip}web-000"), None, 5)
                .unwrap()
                .contains("delete")
        );
        assert_eq!(idx.summary()["instances"]["total"], 249);
    }
}
