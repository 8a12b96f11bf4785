//! `Node`: one edge machine, enrolled with the hub.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::{Kind, Object};
use crate::quantity::{Bytes, Cpu};
use crate::validate::FieldErrors;

/// Label naming the node's region (e.g. `eu-west`).
pub const LABEL_REGION: &str = "region";
/// Label naming the node's city.
pub const LABEL_CITY: &str = "city";
/// Label naming the node's ISP.
pub const LABEL_ISP: &str = "isp";
/// Label naming the node's edge tier; one of [`TIERS`].
pub const LABEL_TIER: &str = "tier";
/// Edge tiers: on-site (1-5 ms), near (5-20 ms), cloud edge (20-40 ms).
pub const TIERS: &[&str] = &["onsite", "near", "cloud"];

/// A Node object.
pub type Node = Object<NodeSpec>;

/// What the operator sets on a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// When true, no new instances are placed here (existing ones keep running).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    /// Taints: instances that do not tolerate them stay away.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// Capacity held back for platform services on this node (on top of what the agent
    /// keeps for the system); only the rest is sold.
    #[serde(default, skip_serializing_if = "ResourceList::is_empty")]
    pub reserved: ResourceList,
}

/// A node taint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// What it does to intolerant instances.
    #[serde(default)]
    pub effect: TaintEffect,
}

/// What a taint does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaintEffect {
    /// Never place intolerant instances here.
    #[default]
    NoSchedule,
    /// Avoid placing intolerant instances here.
    PreferNoSchedule,
}

/// Amounts of every resource a node sells.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceList {
    /// CPU.
    #[serde(default)]
    pub cpu: Cpu,
    /// Memory.
    #[serde(default)]
    pub memory: Bytes,
    /// Local disk.
    #[serde(default)]
    pub disk: Bytes,
    /// GPUs by model, e.g. `nvidia-t4: 2`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpus: BTreeMap<String, u32>,
    /// Other accelerators (ASICs) by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub asics: BTreeMap<String, u32>,
    /// Network bandwidth in Mbit/s.
    #[serde(default, skip_serializing_if = "is_zero64")]
    pub bandwidth_mbps: u64,
    /// Public addresses.
    #[serde(default, skip_serializing_if = "is_zero64")]
    pub addresses: u64,
}

fn is_zero64(v: &u64) -> bool {
    *v == 0
}

impl ResourceList {
    /// Whether every amount is zero.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Whether the node is usable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodePhase {
    /// Heartbeats arrive.
    Ready,
    /// Never seen, or heartbeats stopped.
    #[default]
    NotReady,
}

impl std::fmt::Display for NodePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodePhase::Ready => "Ready",
            NodePhase::NotReady => "NotReady",
        })
    }
}

/// What the edge agent reports (and the hub's node controller maintains).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Ready or NotReady.
    #[serde(default)]
    pub phase: NodePhase,
    /// CPU architecture as Rust names it (`x86_64`, `aarch64`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    /// Kernel release.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel_version: String,
    /// Host name of the machine.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// Everything the machine has.
    #[serde(default)]
    pub capacity: ResourceList,
    /// What instances may use (capacity minus what the agent reserves for the system).
    #[serde(default)]
    pub allocatable: ResourceList,
    /// RFC 3339 time of the last heartbeat the hub received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    /// Agent version string.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    /// Channel protocol version the agent speaks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub protocol_version: u32,
    /// Transport the agent is connected over (`tls`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transport: String,
    /// Why the node is in its phase.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Extra facts (addresses etc).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub info: BTreeMap<String, String>,
    /// RFC 3339 time the phase last changed (set by the hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<String>,
    /// What this node's agent sees of the other nodes of its site (by name), from
    /// probing them directly: the hub weighs it before it counts a silent node's
    /// instances lost.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peers: BTreeMap<String, PeerVerdict>,
}

/// The fact (`status.info`) naming where a node answers its site peers' probes.
pub const PEER_ADDRESS: &str = "peerAddress";

/// Whether a node answers its site peers' probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PeerVerdict {
    /// It answered lately.
    Reachable,
    /// It stopped answering.
    Unreachable,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Kind for NodeSpec {
    type Status = NodeStatus;
    const KIND: &'static str = "Node";
    const PLURAL: &'static str = "nodes";
    fn validate(&self, errors: &mut FieldErrors) {
        for (k, t) in self.taints.iter().enumerate() {
            if t.key.is_empty() {
                errors.push(
                    format!("spec.taints[{k}].key"),
                    "",
                    "a taint needs a key, e.g. dedicated",
                );
            }
        }
    }
}
