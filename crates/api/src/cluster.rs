//! `Cluster`: the nodes of one edge site, picked by their labels. A node that joins
//! with matching labels is part of it from its first heartbeat. The hub keeps each
//! cluster's status: how many nodes, how many Ready, what they offer, what instances
//! ask of them, what is left (docs/API.md). The orchestration centre places
//! applications and platform services per cluster.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::{Kind, Object};
use crate::quantity::{Bytes, Cpu};
use crate::validate::FieldErrors;

/// A Cluster object.
pub type Cluster = Object<ClusterSpec>;

/// Which nodes make the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Labels a node must carry, all of them (e.g. `{site: paris-dc1}`).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The cluster template naming its platform services, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Values of the template's parameters for this cluster (the rest keep the
    /// template's defaults).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
}

impl ClusterSpec {
    /// Whether a node with `labels` belongs to the cluster.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        selector_picks(&self.selector, labels)
    }
}

/// Whether a cluster `selector` picks a node with `labels`: it names at least one
/// label, and the node has every one it names with that value.
pub fn selector_picks(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// How a cluster is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterPhase {
    /// No node matches the selector (yet).
    #[default]
    Empty,
    /// Every node is Ready.
    Healthy,
    /// Some nodes are not Ready.
    Degraded,
    /// No node is Ready.
    Down,
}

impl std::fmt::Display for ClusterPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Empty => "Empty",
            Self::Healthy => "Healthy",
            Self::Degraded => "Degraded",
            Self::Down => "Down",
        })
    }
}

/// CPU and memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    /// CPU.
    #[serde(default)]
    pub cpu: Cpu,
    /// Memory.
    #[serde(default)]
    pub memory: Bytes,
}

/// What the hub knows of a cluster (written by the hub).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// Empty, Healthy, Degraded or Down.
    #[serde(default)]
    pub phase: ClusterPhase,
    /// Nodes that match.
    #[serde(default)]
    pub nodes: u32,
    /// Of those, Ready.
    #[serde(default)]
    pub ready: u32,
    /// The nodes' region (their `region` label; several, comma-separated).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// What its Ready nodes offer instances.
    #[serde(default)]
    pub capacity: Amounts,
    /// What the instances bound to its nodes ask for.
    #[serde(default)]
    pub requested: Amounts,
    /// Capacity less requested (never below zero).
    #[serde(default)]
    pub free: Amounts,
    /// Instances bound to its nodes.
    #[serde(default)]
    pub instances: u32,
    /// Its platform services by name, and how each is doing (from its cluster
    /// template; none until it has one).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, String>,
    /// The Running instances on its nodes that serve ports, and where: what a
    /// site-local load balancer (`verge lb`) sends traffic to. Its nodes are told
    /// them over the channel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
}

/// A Running instance that serves ports, and where its site reaches it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// The instance.
    pub instance: String,
    /// Its application (or cluster template), if one made it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub application: String,
    /// Its component (or service) of that application.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub component: String,
    /// The node it runs on.
    pub node: String,
    /// The host its site reaches that node at (the host of the address it answers
    /// its peers' probes at); empty when the node reports none, in which case only
    /// the node itself reaches it (at 127.0.0.1).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// The ports it serves.
    pub ports: Vec<crate::instance::PortSpec>,
}

impl Kind for ClusterSpec {
    type Status = ClusterStatus;
    const KIND: &'static str = "Cluster";
    const PLURAL: &'static str = "clusters";

    fn validate(&self, errs: &mut FieldErrors) {
        if self.selector.is_empty() {
            errs.push(
                "spec.selector",
                "{}",
                "must name at least one node label, e.g. {site: paris-dc1}",
            );
        }
        for (k, v) in &self.selector {
            crate::validate::label_at(errs, "spec.selector", k, v);
        }
        if let Some(t) = &self.template {
            crate::validate::name(errs, "spec.template", t);
        }
        for k in self.parameters.keys() {
            crate::validate::env_name(errs, &format!("spec.parameters[{k}]"), k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_selects_nodes_carrying_all_its_labels() {
        let spec = ClusterSpec {
            selector: [("site".to_string(), "paris".to_string())].into(),
            ..Default::default()
        };
        let mut labels = BTreeMap::from([("site".to_string(), "paris".to_string())]);
        assert!(spec.selects(&labels));
        labels.insert("site".into(), "lyon".into());
        assert!(!spec.selects(&labels));
        assert!(
            !ClusterSpec::default().selects(&labels),
            "an empty selector picks nothing"
        );
        let mut errs = FieldErrors::default();
        ClusterSpec::default().validate(&mut errs);
        assert!(errs.to_string().contains("spec.selector"), "{errs}");
        let mut errs = FieldErrors::default();
        ClusterSpec {
            selector: [("site".to_string(), "a b".to_string())].into(),
            ..Default::default()
        }
        .validate(&mut errs);
        assert!(errs.to_string().contains("spec.selector[site]"), "{errs}");
    }
}
