//! Verge's API: the resource kinds (`Node`, `Instance`, `Region`), their envelope, quantities,
//! manifest parsing with field-level validation, the REST error shape, and the
//! messages of the hub<->edge channel.
//!
//! This crate is serde only: no I/O, no async, no database. Everything else depends on
//! it; it depends on nothing of ours. Start at [`meta::Object`] and [`instance`].

pub mod application;
pub mod artifact;
pub mod channel;
pub mod clock;
pub mod cluster;
pub mod error;
pub mod event;
pub mod hash;
pub mod instance;
pub mod manifest;
pub mod meta;
pub mod metrics;
pub mod node;
pub mod quantity;
pub mod region;
pub mod rollout;
pub mod template;
pub mod uplink;
pub mod validate;

pub use application::{Application, ApplicationSpec};
pub use cluster::{Cluster, ClusterPhase, ClusterSpec, ClusterStatus};
pub use error::{ApiError, ErrorCode};
pub use instance::{
    ContainerSpec, DEFAULT_PROCESS_USER, DisconnectPolicy, Form, FunctionSpec, Instance,
    InstancePhase, InstanceSpec, InstanceStatus, Link, OriginalCopy, PortSpec, ProcessSpec,
    Reconcile, ResourceUsage, VmSpec,
};
pub use manifest::{Manifest, parse_manifests};
pub use meta::{API_VERSION, Kind, Object, ObjectMeta};
pub use node::{Node, NodePhase, NodeSpec, NodeStatus, PeerVerdict, ResourceList};
pub use quantity::{Bytes, Cpu};
pub use region::{Region, RegionSpec};
pub use template::{ClusterTemplate, ClusterTemplateSpec};
pub use validate::{FieldError, FieldErrors};

/// The store key of an object: `/registry/<plural>/<name>`.
pub fn object_key(plural: &str, name: &str) -> String {
    format!("/registry/{plural}/{name}")
}

/// The store key prefix of a kind: `/registry/<plural>/`.
pub fn kind_prefix(plural: &str) -> String {
    format!("/registry/{plural}/")
}
