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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// When true, no new instances are placed here (existing ones keep running).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
}

/// CPU, memory and disk amounts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Kind for NodeSpec {
    type Status = NodeStatus;
    const KIND: &'static str = "Node";
    const PLURAL: &'static str = "nodes";
    fn validate(&self, _errors: &mut FieldErrors) {}
}
