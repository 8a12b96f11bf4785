//! Clusters: each one's status (its nodes, how many are Ready, what they offer, what
//! is asked of them, what is left) kept from the nodes and instances the controllers'
//! cache holds. [`status_of`] is pure; [`run`] writes a cluster's status when it
//! changes, on the leader, every [`EVERY`]. Membership is only the labels: a node
//! that joins with the cluster's labels counts from its first heartbeat.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use verge_api::cluster::{Amounts, ClusterPhase, ClusterSpec, ClusterStatus, Endpoint};
use verge_api::{Bytes, Cpu, Instance, Node, NodePhase};

use crate::cache::ControllerCache;
use crate::state::HubState;

/// How often clusters' statuses are brought up to date.
pub const EVERY: Duration = Duration::from_secs(2);

/// What `cluster` (named `name`) is, given every node and every instance.
pub fn status_of(
    name: &str,
    cluster: &ClusterSpec,
    nodes: &[Arc<Node>],
    instances: &[Arc<Instance>],
) -> ClusterStatus {
    Fleet::new(nodes, instances).status_of(name, cluster)
}

/// The nodes and instances of one pass, grouped once (nodes by label, instances by
/// node and template services by cluster), so that each cluster's status costs what
/// its own nodes and instances do, not the whole fleet: a pass over a thousand
/// clusters of a thousand nodes read every node and instance for each before.
pub struct Fleet<'a> {
    nodes: &'a [Arc<Node>],
    /// (label, value) -> the nodes (indices) that carry it.
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
    /// Node -> the instances bound to it.
    on_node: HashMap<&'a str, Vec<&'a Instance>>,
    /// Cluster -> the platform services its template placed there.
    services: HashMap<&'a str, Vec<&'a Instance>>,
}

impl<'a> Fleet<'a> {
    /// Group `nodes` and `instances`.
    pub fn new(nodes: &'a [Arc<Node>], instances: &'a [Arc<Instance>]) -> Self {
        use crate::orchestrator::{CLUSTER_LABEL, TEMPLATE_LABEL};
        let mut by_label: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for (k, n) in nodes.iter().enumerate() {
            for (l, v) in &n.metadata.labels {
                by_label
                    .entry((l.as_str(), v.as_str()))
                    .or_default()
                    .push(k);
            }
        }
        let (mut on_node, mut services): (HashMap<_, Vec<_>>, HashMap<_, Vec<_>>) =
            Default::default();
        for i in instances.iter().map(|i| &**i) {
            if let Some(n) = i.status.node.as_deref() {
                on_node.entry(n).or_default().push(i);
            }
            if i.metadata.labels.contains_key(TEMPLATE_LABEL)
                && let Some(c) = i.metadata.labels.get(CLUSTER_LABEL)
            {
                services.entry(c.as_str()).or_default().push(i);
            }
        }
        Self {
            nodes,
            by_label,
            on_node,
            services,
        }
    }

    /// The nodes `cluster` selects: those of its rarest selector label, checked
    /// against the rest.
    fn members(&self, cluster: &ClusterSpec) -> Vec<&'a Node> {
        let fewest = cluster
            .selector
            .iter()
            .map(|(k, v)| {
                self.by_label
                    .get(&(k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|c| c.len())
            .unwrap_or_default();
        let mut members: Vec<&Node> = fewest
            .iter()
            .map(|k| &*self.nodes[*k])
            .filter(|n| cluster.selects(&n.metadata.labels))
            .collect();
        members.sort_by(|a, b| a.name().cmp(b.name()));
        members
    }

    /// What `cluster` (named `name`) is.
    pub fn status_of(&self, name: &str, cluster: &ClusterSpec) -> ClusterStatus {
        let members = self.members(cluster);
        let ready: Vec<&&Node> = members
            .iter()
            .filter(|n| n.status.phase == NodePhase::Ready)
            .collect();
        let regions: BTreeSet<&str> = members
            .iter()
            .filter_map(|n| n.metadata.labels.get(verge_api::region::REGION_LABEL))
            .map(String::as_str)
            .collect();
        let capacity = Amounts {
            cpu: Cpu(ready.iter().map(|n| n.status.allocatable.cpu.0).sum()),
            memory: Bytes(ready.iter().map(|n| n.status.allocatable.memory.0).sum()),
        };
        let bound: Vec<&Instance> = members
            .iter()
            .flat_map(|n| self.on_node.get(n.name()).into_iter().flatten().copied())
            .collect();
        let requested = Amounts {
            cpu: Cpu(bound.iter().map(|i| i.spec.resources.cpu.0).sum()),
            memory: Bytes(bound.iter().map(|i| i.spec.resources.memory.0).sum()),
        };
        let free = Amounts {
            cpu: Cpu(capacity.cpu.0.saturating_sub(requested.cpu.0)),
            memory: Bytes(capacity.memory.0.saturating_sub(requested.memory.0)),
        };
        let phase = match (members.len(), ready.len()) {
            (0, _) => ClusterPhase::Empty,
            (n, r) if r == n => ClusterPhase::Healthy,
            (_, 0) => ClusterPhase::Down,
            _ => ClusterPhase::Degraded,
        };
        ClusterStatus {
            phase,
            nodes: members.len() as u32,
            ready: ready.len() as u32,
            region: regions.into_iter().collect::<Vec<_>>().join(","),
            capacity,
            requested,
            free,
            instances: bound.len() as u32,
            services: services_of(self.services.get(name).map_or(&[][..], Vec::as_slice)),
            endpoints: endpoints_of(&members, &bound),
        }
    }
}

/// The instances of `bound` (on `members`) that serve ports (Running, and healthy if
/// they are checked), sorted, each
/// with the host its site reaches its node at.
fn endpoints_of(members: &[&Node], bound: &[&Instance]) -> Vec<Endpoint> {
    use crate::orchestrator::{APP_LABEL, COMPONENT_LABEL, TEMPLATE_LABEL};
    let host = |node: &str| {
        members
            .iter()
            .find(|n| n.name() == node)
            .and_then(|n| n.status.info.get(verge_api::node::PEER_ADDRESS))
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip().to_string())
            .unwrap_or_default()
    };
    let label = |i: &Instance, k: &str| i.metadata.labels.get(k).cloned().unwrap_or_default();
    let mut out: Vec<Endpoint> = bound
        .iter()
        .filter(|i| i.status.serves() && !i.spec.ports.is_empty())
        .filter_map(|i| {
            let node = i.status.node.clone()?;
            let application = match label(i, APP_LABEL) {
                a if a.is_empty() => label(i, TEMPLATE_LABEL),
                a => a,
            };
            Some(Endpoint {
                instance: i.name().to_string(),
                application,
                component: label(i, COMPONENT_LABEL),
                host: host(&node),
                node,
                ports: i.spec.ports.clone(),
            })
        })
        .collect();
    out.sort();
    out
}

/// The cluster's platform services (`placed`: the instances its template placed
/// there) and how each is: its phase, or `N/M Running` when it has several replicas.
fn services_of(placed: &[&Instance]) -> std::collections::BTreeMap<String, String> {
    use crate::orchestrator::COMPONENT_LABEL;
    let mut by: std::collections::BTreeMap<String, Vec<&Instance>> = Default::default();
    for i in placed {
        if let Some(service) = i.metadata.labels.get(COMPONENT_LABEL) {
            by.entry(service.clone()).or_default().push(i);
        }
    }
    by.into_iter()
        .map(|(service, is)| {
            let running = is
                .iter()
                .filter(|i| i.status.phase == verge_api::InstancePhase::Running)
                .count();
            let how = match is.as_slice() {
                [one] => one.status.phase.to_string(),
                _ => format!("{running}/{} Running", is.len()),
            };
            (service, how)
        })
        .collect()
}

/// Keep every cluster's status, for as long as this replica leads.
pub async fn run(st: Arc<HubState>, cache: Arc<ControllerCache>) {
    cache
        .clone()
        .every(EVERY, || {
            let (st, cache) = (st.clone(), cache.clone());
            async move { update(&st, &cache).await }
        })
        .await
}

/// Write the status of every cluster whose status changed.
async fn update(st: &HubState, cache: &ControllerCache) {
    let Ok((clusters, _)) = st.objects.list::<ClusterSpec>().await else {
        return;
    };
    if clusters.is_empty() {
        return;
    }
    let (nodes, instances) = (cache.nodes(), cache.instances());
    let fleet = Fleet::new(&nodes, &instances);
    for c in clusters {
        let want = fleet.status_of(c.name(), &c.spec);
        if want == c.status {
            continue;
        }
        let r = st
            .objects
            .update_status::<ClusterSpec>(c.name(), |_, s: &mut ClusterStatus| {
                *s = want.clone();
                Ok(true)
            })
            .await;
        if let Err(e) = r {
            tracing::debug!(cluster = c.name(), error = %e.message, "cluster status not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::{InstanceSpec, NodeSpec};

    fn node(name: &str, site: &str, ready: bool) -> Arc<Node> {
        let mut n = Node::new(name, NodeSpec::default());
        n.metadata.labels.insert("site".into(), site.into());
        n.metadata.labels.insert("region".into(), "eu".into());
        n.status.phase = if ready {
            NodePhase::Ready
        } else {
            NodePhase::NotReady
        };
        n.status.allocatable.cpu = Cpu(2000);
        n.status.allocatable.memory = Bytes(4 << 30);
        Arc::new(n)
    }

    fn inst(name: &str, on: Option<&str>) -> Arc<Instance> {
        let mut i = Instance::new(name, InstanceSpec::default());
        i.spec.resources.cpu = Cpu(500);
        i.spec.resources.memory = Bytes(1 << 30);
        i.status.node = on.map(str::to_string);
        Arc::new(i)
    }

    #[test]
    fn a_cluster_is_its_nodes_and_what_runs_on_them() {
        let paris = ClusterSpec {
            selector: [("site".to_string(), "paris".to_string())].into(),
            ..Default::default()
        };
        let nodes = vec![
            node("p1", "paris", true),
            node("p2", "paris", true),
            node("l1", "lyon", true),
        ];
        let instances = vec![
            inst("a", Some("p1")),
            inst("b", Some("l1")),
            inst("c", None),
        ];
        let s = status_of("paris", &paris, &nodes, &instances);
        assert_eq!(
            (s.phase, s.nodes, s.ready, s.instances),
            (ClusterPhase::Healthy, 2, 2, 1)
        );
        assert_eq!(s.capacity.cpu, Cpu(4000));
        assert_eq!(s.requested.cpu, Cpu(500));
        assert_eq!(s.free.cpu, Cpu(3500));
        assert_eq!(s.free.memory, Bytes(7 << 30));
        assert_eq!(s.region, "eu");
        // A node down: Degraded, and it offers nothing.
        let nodes = vec![node("p1", "paris", true), node("p2", "paris", false)];
        let s = status_of("paris", &paris, &nodes, &instances);
        assert_eq!(
            (s.phase, s.ready, s.capacity.cpu),
            (ClusterPhase::Degraded, 1, Cpu(2000))
        );
        let s = status_of("paris", &paris, &[node("p2", "paris", false)], &[]);
        assert_eq!(s.phase, ClusterPhase::Down);
        assert_eq!(
            status_of("paris", &paris, &[], &[]).phase,
            ClusterPhase::Empty
        );
    }

    #[test]
    fn endpoints_are_the_running_instances_with_ports_on_its_nodes() {
        let paris = ClusterSpec {
            selector: [("site".to_string(), "paris".to_string())].into(),
            ..Default::default()
        };
        let mut p1 = (*node("p1", "paris", true)).clone();
        p1.status
            .info
            .insert(verge_api::node::PEER_ADDRESS.into(), "10.0.0.1:7947".into());
        let nodes = vec![
            Arc::new(p1),
            node("p2", "paris", true),
            node("l1", "lyon", true),
        ];
        use verge_api::InstancePhase;
        let serving = |name: &str, on: &str, phase: InstancePhase| {
            let mut i = (*inst(name, Some(on))).clone();
            i.spec.ports = vec![verge_api::instance::PortSpec {
                name: "http".into(),
                port: 8080,
            }];
            i.status.phase = phase;
            i.metadata
                .labels
                .insert(crate::orchestrator::APP_LABEL.into(), "web".into());
            i.metadata
                .labels
                .insert(crate::orchestrator::COMPONENT_LABEL.into(), "front".into());
            Arc::new(i)
        };
        let instances = vec![
            serving("w-1", "p1", InstancePhase::Running),
            serving("w-2", "p2", InstancePhase::Running),
            serving("w-3", "p2", InstancePhase::Pending),
            serving("w-4", "l1", InstancePhase::Running),
            inst("quiet", Some("p1")),
        ];
        let s = status_of("paris", &paris, &nodes, &instances);
        let got: Vec<(&str, &str, &str)> = s
            .endpoints
            .iter()
            .map(|e| (e.instance.as_str(), e.node.as_str(), e.host.as_str()))
            .collect();
        // Not one that is not Running, not one elsewhere, not one without ports; a
        // node that reports no address has no host.
        assert_eq!(got, [("w-1", "p1", "10.0.0.1"), ("w-2", "p2", "")]);
        assert_eq!(
            (
                s.endpoints[0].application.as_str(),
                s.endpoints[0].component.as_str()
            ),
            ("web", "front")
        );
    }
}
