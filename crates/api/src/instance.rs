//! `Instance`: the unit of compute. `spec.form` says which kind of compute it is and
//! names the one form-specific section that must be present (`process` today;
//! `function`, `container` and `vm` are added beside it without changing the rest).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::{Kind, Object};
use crate::quantity::{Bytes, Cpu};
use crate::validate::{FieldErrors, is_dns_label};

/// An Instance object.
pub type Instance = Object<InstanceSpec>;

/// Which form of compute an instance is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// A plain process on the node.
    #[default]
    Process,
    /// A virtual machine (QEMU), outside the agent's lifetime.
    Vm,
    /// An OCI container (runc), from an image in a registry.
    Container,
    /// A WebAssembly component answering HTTP requests (WASI 0.2), run by the agent.
    Function,
}

impl std::fmt::Display for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Form::Process => "process",
            Form::Vm => "vm",
            Form::Container => "container",
            Form::Function => "function",
        })
    }
}

/// What to do when the instance's workload exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Restart whatever the exit code.
    #[default]
    Always,
    /// Restart only after a non-zero exit.
    OnFailure,
    /// Never restart.
    Never,
}

/// The desired state of an instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// The form of compute; the section of the same name must be set.
    #[serde(default)]
    pub form: Form,
    /// For `form: process`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSpec>,
    /// For `form: vm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmSpec>,
    /// For `form: container`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    /// For `form: function`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionSpec>,
    /// What the instance reserves on its node.
    #[serde(default)]
    pub resources: Resources,
    /// Where it may run.
    #[serde(default)]
    pub placement: Placement,
    /// What to do when it exits.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Seconds between SIGTERM and SIGKILL when stopping (default 10).
    #[serde(default = "default_grace", skip_serializing_if = "is_default_grace")]
    pub termination_grace_period_seconds: u32,
    /// Ports the instance serves on its node; other instances reach them only through
    /// a declared link, and only where the relay policy allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// Ports of other instances (possibly on other edges) this instance reaches: the
    /// agent listens on `127.0.0.1:localPort` and relays each connection through the
    /// channel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<Link>,
    /// What happens when its node is cut off from the hub: how long until the instance
    /// counts as lost, whether it is replaced elsewhere, and which copy stays when the
    /// node comes back.
    #[serde(default, skip_serializing_if = "DisconnectPolicy::is_default")]
    pub disconnect: DisconnectPolicy,
    /// Local disks (`local-disk`): each a filesystem of its own on the node's disk, of
    /// exactly its size (a write past it fails with "no space"), kept across restarts
    /// of the instance and of the agent, and removed with the instance. Their sizes
    /// count in `resources.disk`, which must cover them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// How its node checks that it serves (a TCP connect or an HTTP GET on the node's
    /// loopback): until it passes, and while it fails, the instance is Running but not
    /// healthy: load balancers send it nothing and rollouts wait for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// A health check (`tcp` or `http`, one of them) and how it counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// A TCP connect to this port passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<u16>,
    /// A GET answered with a 2xx or 3xx status passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// Seconds between checks.
    #[serde(default = "HealthCheck::default_period")]
    pub period_seconds: u32,
    /// Seconds a check may take.
    #[serde(default = "HealthCheck::default_timeout")]
    pub timeout_seconds: u32,
    /// Failed checks in a row that make it unhealthy.
    #[serde(default = "HealthCheck::default_failures")]
    pub failure_threshold: u32,
    /// Passed checks in a row that make it healthy again.
    #[serde(default = "HealthCheck::default_successes")]
    pub success_threshold: u32,
}

/// An HTTP health check: `GET path` on `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheck {
    /// The port.
    pub port: u16,
    /// The path, e.g. `/healthz`.
    #[serde(default = "HttpCheck::default_path")]
    pub path: String,
}

impl HttpCheck {
    fn default_path() -> String {
        "/".into()
    }
}

impl HealthCheck {
    fn default_period() -> u32 {
        2
    }
    fn default_timeout() -> u32 {
        1
    }
    fn default_failures() -> u32 {
        3
    }
    fn default_successes() -> u32 {
        1
    }

    fn validate(&self, errs: &mut FieldErrors) {
        let f = "spec.healthCheck";
        match (self.tcp, &self.http) {
            (Some(_), Some(_)) | (None, None) => errs.push(
                f,
                "",
                "give one of tcp: PORT or http: {port: PORT, path: /healthz}",
            ),
            (Some(0), _) => errs.push(format!("{f}.tcp"), 0, "must be 1..65535"),
            (_, Some(h)) if h.port == 0 => {
                errs.push(format!("{f}.http.port"), 0, "must be 1..65535")
            }
            (_, Some(h))
                if !h.path.starts_with('/')
                    || h.path.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                errs.push(
                    format!("{f}.http.path"),
                    &h.path,
                    "must be a path like /healthz",
                )
            }
            _ => {}
        }
        for (field, v, max) in [
            ("periodSeconds", self.period_seconds, 3600),
            ("timeoutSeconds", self.timeout_seconds, 60),
            ("failureThreshold", self.failure_threshold, 100),
            ("successThreshold", self.success_threshold, 100),
        ] {
            if !(1..=max).contains(&v) {
                errs.push(format!("{f}.{field}"), v, format!("must be 1..{max}"));
            }
        }
    }
}

/// A local disk of an instance: mounted at `path` in a container, in a process's
/// environment as `VERGE_VOLUME_<NAME>` (its directory on the node), a virtio disk
/// of a VM (after its own disk, in order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// Its name, e.g. `data`.
    pub name: String,
    /// Its size, e.g. `64Mi` (at least 8Mi; it may grow, never shrink).
    pub size: Bytes,
    /// Where a container sees it (an absolute path); processes and VMs ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The smallest local disk (an ext4 filesystem much smaller is mostly metadata).
pub const MIN_VOLUME: u64 = 8 << 20;
/// The largest local disk.
pub const MAX_VOLUME: u64 = 16 << 40;

impl VolumeSpec {
    /// The environment variable a process finds it by: `VERGE_VOLUME_` and its name in
    /// capitals, `-` as `_`.
    pub fn env_name(&self) -> String {
        format!(
            "VERGE_VOLUME_{}",
            self.name.to_ascii_uppercase().replace('-', "_")
        )
    }
}

/// When a node goes quiet, its workloads may still be running (the link is down, not
/// the node). This says how long the hub waits before it counts the instance lost,
/// whether it then starts a replacement elsewhere, and which copy is kept when the
/// node returns, so that there are never two for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DisconnectPolicy {
    /// Seconds after the node is marked NotReady before the instance is lost (default
    /// 300). While the node's site peers still see it, it is cut off, not down, and
    /// the instance is not lost at all.
    #[serde(default = "default_lost_after")]
    pub lost_after_seconds: u64,
    /// Whether a lost instance is placed on another node (default true). If not, it
    /// stays `Lost` on its node until the node returns.
    #[serde(default = "default_true")]
    pub replace: bool,
    /// Which copy stays when the node of a replaced instance returns.
    #[serde(default)]
    pub reconcile: Reconcile,
}

impl Default for DisconnectPolicy {
    fn default() -> Self {
        Self {
            lost_after_seconds: default_lost_after(),
            replace: true,
            reconcile: Reconcile::default(),
        }
    }
}

impl DisconnectPolicy {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_lost_after() -> u64 {
    300
}
fn default_true() -> bool {
    true
}

/// Which copy of a replaced instance stays when its original node returns; the other
/// is stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reconcile {
    /// The copy on the node that returned.
    KeepOriginal,
    /// The replacement.
    KeepReplacement,
    /// The copy on the node the scheduler scores higher for it now (the original on
    /// a tie: it keeps running).
    #[default]
    BestScore,
    /// The copy that has run longer without a restart.
    LongestRunning,
}

impl std::fmt::Display for Reconcile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reconcile::KeepOriginal => "keepOriginal",
            Reconcile::KeepReplacement => "keepReplacement",
            Reconcile::BestScore => "bestScore",
            Reconcile::LongestRunning => "longestRunning",
        })
    }
}

/// A virtual machine to boot. Its vCPUs and memory come from `resources` (vCPUs: the
/// CPU request rounded up to whole CPUs); its serial console is its log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    /// Kernel image to boot directly: an absolute path on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initial ramdisk for the kernel: an absolute path on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line (default `console=ttyS0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Disk image (raw or qcow2) attached as a virtio disk; boots from it when no
    /// kernel is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// A container to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    /// Image reference, e.g. `registry.example:5000/tools/busybox:1.36` or pinned by
    /// digest (`...@sha256:...`).
    pub image: String,
    /// Replaces the image's entrypoint and command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Extra environment variables (over the image's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// An HTTP function: a WASI 0.2 component exporting `wasi:http/incoming-handler`,
/// served by the node's function gateway at `/<instance name>/...`. Each request gets
/// a fresh instance (no state survives a request), limited to the instance's memory,
/// and interrupted after `timeoutMs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionSpec {
    /// The component: an absolute path on the node.
    pub component: String,
    /// Longest a request may run, in milliseconds (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A port an instance serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    /// A name for it, e.g. `http`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The TCP port it listens on (on the node's loopback for processes).
    pub port: u16,
}

/// A connection from this instance to a declared port of another instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Link {
    /// The instance to reach.
    pub instance: String,
    /// Its declared port.
    pub port: u16,
    /// Where this instance connects on its own node (`127.0.0.1:localPort`).
    pub local_port: u16,
}

fn default_grace() -> u32 {
    10
}
fn is_default_grace(v: &u32) -> bool {
    *v == 10
}

/// A process to run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSpec {
    /// Program and arguments; the program is looked up on `PATH` if not absolute.
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the instance's own work directory on the node,
    /// `instances/NAME/work` in the agent's data directory, writable by its user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Who the process runs as: `root`, a user name on the node, or `UID[:GID]`.
    /// Default: `nobody` (65534:65534), so a workload cannot reach the agent's
    /// identity or state; ask for `root` only where the workload needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The user a process runs as when its spec names none.
pub const DEFAULT_PROCESS_USER: &str = "nobody";

/// Whether `s` names a user the way `spec.process.user` may: `UID`, `UID:GID`, or a
/// user name (`[a-z_][a-z0-9_-]*`, up to 32).
pub fn is_user_spec(s: &str) -> bool {
    let ids = s.split_once(':').map_or((s, None), |(u, g)| (u, Some(g)));
    let numeric =
        |v: &str| !v.is_empty() && v.len() <= 10 && v.parse::<u32>().is_ok_and(|n| n < u32::MAX);
    if numeric(ids.0) {
        return ids.1.is_none_or(numeric);
    }
    ids.1.is_none()
        && !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Reserved resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// CPU, e.g. `500m` or `2`.
    #[serde(default = "default_cpu")]
    pub cpu: Cpu,
    /// Memory, e.g. `64Mi` or `1Gi`.
    #[serde(default = "default_memory")]
    pub memory: Bytes,
    /// Local disk.
    #[serde(default, skip_serializing_if = "is_zero_bytes")]
    pub disk: Bytes,
    /// GPUs by model, e.g. `nvidia-t4: 1`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpus: BTreeMap<String, u32>,
    /// Accelerators (ASICs) by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub asics: BTreeMap<String, u32>,
    /// Network bandwidth in Mbit/s.
    #[serde(default, skip_serializing_if = "is_zero64")]
    pub bandwidth_mbps: u64,
    /// Public addresses.
    #[serde(default, skip_serializing_if = "is_zero64")]
    pub addresses: u64,
}

fn is_zero_bytes(b: &Bytes) -> bool {
    b.0 == 0
}

fn default_cpu() -> Cpu {
    Cpu(100)
}
fn default_memory() -> Bytes {
    Bytes(64 << 20)
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpu: default_cpu(),
            memory: default_memory(),
            disk: Bytes(0),
            gpus: BTreeMap::new(),
            asics: BTreeMap::new(),
            bandwidth_mbps: 0,
            addresses: 0,
        }
    }
}

/// Placement constraints and preferences.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Node labels that must all match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Only this region (shorthand for `regions: [X]` without overflow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Acceptable regions, most preferred first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// When the listed regions (or the one nearest `near`) are full, spill over to the
    /// next nearest region.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overflow: bool,
    /// Where the users are: prefer nearby regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near: Option<GeoLocation>,
    /// Required CPU architecture (`x86_64`, `aarch64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Taints this instance tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Preferred tier (`onsite`, `near`, `cloud`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_tier: Option<String>,
    /// Preferred ISP (match the users' ISP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_isp: Option<String>,
    /// Bin-pack (default) or spread.
    #[serde(default)]
    pub policy: PlacementPolicy,
    /// The group constraints apply to (default: the `app` label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// No two instances of the group in one node / site / region / isp.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<TopologyScope>,
    /// Spread the group evenly over domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spread: Vec<SpreadConstraint>,
    /// At most this many instances of the group per node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_node: Option<u32>,
    /// Place together with the other members of this gang, or not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<Gang>,
    /// Whether defragmentation may move it (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub movable: bool,
}

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

/// A point on Earth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeoLocation {
    /// Latitude in degrees.
    pub latitude: f64,
    /// Longitude in degrees.
    pub longitude: f64,
}

/// A tolerated taint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Toleration {
    /// Taint key.
    pub key: String,
    /// Taint value (absent: any value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Bin-pack or spread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementPolicy {
    /// Prefer fuller nodes.
    #[default]
    BinPack,
    /// Prefer emptier nodes.
    Spread,
}

/// Topology scopes for constraints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologyScope {
    /// One node.
    Node,
    /// One edge site (`site` label, else `city`).
    Site,
    /// One region.
    Region,
    /// One ISP.
    Isp,
}

/// Spread over a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpreadConstraint {
    /// Over what.
    pub scope: TopologyScope,
    /// Most instances one domain may have beyond the least loaded one (default 1).
    #[serde(default = "one")]
    pub max_skew: u32,
}

fn one() -> u32 {
    1
}

/// Gang membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gang {
    /// Gang name (shared by its members).
    pub name: String,
    /// How many members must be placed together.
    pub size: u32,
}

/// Lifecycle phase of an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstancePhase {
    /// Not yet placed on a node.
    #[default]
    Pending,
    /// Bound to a node; the node has not started it yet.
    Scheduled,
    /// The node is starting it.
    Starting,
    /// Running.
    Running,
    /// Exited successfully and will not be restarted.
    Succeeded,
    /// Exited with failure (or could not start) and will not be restarted.
    Failed,
    /// Being stopped for deletion.
    Terminating,
    /// Its node has been cut off longer than `disconnect.lostAfterSeconds`, and it is
    /// not replaced (`disconnect.replace: false`): it comes back with its node.
    Lost,
    /// Its node is cut off from the hub: it may well be running, nobody here knows.
    /// (Also what a phase this agent does not know reads as.)
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for InstancePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The observed state of an instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: InstancePhase,
    /// The node it is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why it is in this phase, when it is not simply running.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Exit code of the last run, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// How many times the node restarted it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Process id on the node while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// RFC 3339 time the current run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// The spec generation the node last acted on.
    #[serde(default, skip_serializing_if = "is_zero64")]
    pub observed_generation: u64,
    /// How the scheduler placed it (e.g. overflow to another region); set by the hub.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub placement: String,
    /// What it uses on its node, as the node measures it (cgroups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ResourceUsage>,
    /// Whether it passes its health check (none without one): false from its start
    /// until the check first passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// The copy left behind on a node that was cut off when this instance was
    /// replaced; set by the hub, cleared when that node returns and one copy is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<OriginalCopy>,
}

impl InstanceStatus {
    /// Whether it serves: Running, and healthy if it has a health check.
    pub fn serves(&self) -> bool {
        self.phase == InstancePhase::Running && self.healthy != Some(false)
    }
}

/// A copy of an instance on a node that was lost and may come back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OriginalCopy {
    /// The node it was on.
    pub node: String,
    /// RFC 3339 time it was counted lost.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lost_at: String,
    /// RFC 3339 time its run started, as last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
}

/// Resources an instance uses, measured on its node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceUsage {
    /// Average CPU over the last sampling interval.
    pub cpu: Cpu,
    /// Memory in use.
    pub memory: Bytes,
}

pub(crate) fn is_zero(v: &u32) -> bool {
    *v == 0
}
fn is_zero64(v: &u64) -> bool {
    *v == 0
}

impl Kind for InstanceSpec {
    type Status = InstanceStatus;
    const KIND: &'static str = "Instance";
    const PLURAL: &'static str = "instances";

    fn validate(&self, errs: &mut FieldErrors) {
        if self.form != Form::Vm && self.vm.is_some() {
            errs.push(
                "spec.vm",
                "",
                format!(
                    "is only for form 'vm' (this instance is form '{}')",
                    self.form
                ),
            );
        }
        if self.form != Form::Function && self.function.is_some() {
            errs.push(
                "spec.function",
                "",
                format!(
                    "is only for form 'function' (this instance is form '{}')",
                    self.form
                ),
            );
        }
        if self.form != Form::Container && self.container.is_some() {
            errs.push(
                "spec.container",
                "",
                format!(
                    "is only for form 'container' (this instance is form '{}')",
                    self.form
                ),
            );
        }
        if self.form != Form::Process && self.process.is_some() {
            errs.push(
                "spec.process",
                "",
                format!(
                    "is only for form 'process' (this instance is form '{}')",
                    self.form
                ),
            );
        }
        match self.form {
            Form::Function => match &self.function {
                None => errs.push(
                    "spec.function",
                    "",
                    "required when spec.form is 'function'; set spec.function.component to the component (a registry reference, a sha256: digest in the hub's artifact store, or a path on the node)",
                ),
                Some(f) => {
                    check_artifact(errs, "spec.function.component", &f.component);
                    if f.timeout_ms.is_some_and(|t| t == 0 || t > 600_000) {
                        errs.push(
                            "spec.function.timeoutMs",
                            f.timeout_ms.unwrap_or(0),
                            "must be 1..600000 (ten minutes)",
                        );
                    }
                }
            },
            Form::Container => match &self.container {
                None => errs.push(
                    "spec.container",
                    "",
                    "required when spec.form is 'container'; set spec.container.image, e.g. registry.example:5000/busybox:1.36",
                ),
                Some(c) => {
                    if c.image.trim().is_empty() || c.image.contains(char::is_whitespace) {
                        errs.push(
                            "spec.container.image",
                            &c.image,
                            "must be an image reference like registry.example:5000/busybox:1.36",
                        );
                    }
                    for k in c.env.keys() {
                        if k.is_empty() || k.contains('=') || k.contains('\0') {
                            errs.push(
                                format!("spec.container.env[{k}]"),
                                k,
                                "environment variable names must be non-empty and contain no '=' or NUL",
                            );
                        }
                    }
                }
            },
            Form::Vm => match &self.vm {
                None => errs.push(
                    "spec.vm",
                    "",
                    "required when spec.form is 'vm'; set spec.vm.kernel (and initrd) or spec.vm.disk",
                ),
                Some(vm) => {
                    if vm.kernel.is_none() && vm.disk.is_none() {
                        errs.push(
                            "spec.vm",
                            "",
                            "needs a kernel to boot (spec.vm.kernel) or a disk image (spec.vm.disk)",
                        );
                    }
                    if vm.initrd.is_some() && vm.kernel.is_none() {
                        errs.push(
                            "spec.vm.initrd",
                            vm.initrd.as_deref().unwrap_or(""),
                            "an initrd needs spec.vm.kernel",
                        );
                    }
                    for (field, value) in [
                        ("spec.vm.kernel", &vm.kernel),
                        ("spec.vm.initrd", &vm.initrd),
                        ("spec.vm.disk", &vm.disk),
                    ] {
                        if let Some(v) = value {
                            check_artifact(errs, field, v);
                        }
                    }
                }
            },
            Form::Process => match &self.process {
                None => errs.push(
                    "spec.process",
                    "",
                    "required when spec.form is 'process'; set spec.process.command, e.g. [\"/bin/sleep\", \"3600\"]",
                ),
                Some(p) => {
                    if p.command.is_empty() || p.command[0].trim().is_empty() {
                        errs.push(
                            "spec.process.command",
                            format!("{:?}", p.command),
                            "must name a program, e.g. [\"/bin/sleep\", \"3600\"]",
                        );
                    }
                    // A NUL cannot be passed to a program: refused here, not by the
                    // edge after the instance was placed.
                    for (i, a) in p.command.iter().enumerate() {
                        if a.contains('\0') {
                            errs.push(
                                format!("spec.process.command[{i}]"),
                                a.escape_debug(),
                                "arguments may not contain a NUL character",
                            );
                        }
                    }
                    for (k, v) in &p.env {
                        if k.is_empty() || k.contains('=') || k.contains('\0') {
                            errs.push(
                                format!("spec.process.env[{k}]"),
                                k.escape_debug(),
                                "environment variable names must be non-empty and contain no '=' or NUL",
                            );
                        }
                        if v.contains('\0') {
                            errs.push(
                                format!("spec.process.env[{k}]"),
                                v.escape_debug(),
                                "environment values may not contain a NUL character",
                            );
                        }
                    }
                    if let Some(w) = &p.working_dir
                        && (w.contains('\0') || !w.starts_with('/'))
                    {
                        errs.push(
                            "spec.process.workingDir",
                            w.escape_debug(),
                            "must be an absolute path, e.g. /srv/app",
                        );
                    }
                    if let Some(u) = &p.user
                        && !is_user_spec(u)
                    {
                        errs.push(
                            "spec.process.user",
                            u.escape_debug(),
                            "must be root, a user name on the node, or UID[:GID], e.g. 1000:1000",
                        );
                    }
                }
            },
        }
        if self.resources.cpu.0 == 0 {
            errs.push(
                "spec.resources.cpu",
                self.resources.cpu,
                "must be more than 0, e.g. 100m",
            );
        }
        if self.resources.memory.0 < (1 << 20) {
            errs.push(
                "spec.resources.memory",
                self.resources.memory,
                "must be at least 1Mi, e.g. 64Mi",
            );
        }
        let p = &self.placement;
        for (k, r) in p.region.iter().chain(p.regions.iter()).enumerate() {
            if !is_dns_label(r) {
                let field = if p.region.is_some() && k == 0 {
                    "spec.placement.region".to_string()
                } else {
                    format!(
                        "spec.placement.regions[{}]",
                        k - usize::from(p.region.is_some())
                    )
                };
                errs.push(
                    field,
                    r,
                    "must be a region name like eu-west (lowercase letters, digits, '-')",
                );
            }
        }
        if p.region.is_some() && !p.regions.is_empty() {
            errs.push(
                "spec.placement.region",
                p.region.as_deref().unwrap_or(""),
                "set either region or regions, not both",
            );
        }
        if let Some(n) = &p.near
            && (!(-90.0..=90.0).contains(&n.latitude) || !(-180.0..=180.0).contains(&n.longitude))
        {
            errs.push(
                "spec.placement.near",
                format!("{},{}", n.latitude, n.longitude),
                "latitude must be within -90..90 and longitude within -180..180",
            );
        }
        if let Some(a) = &p.architecture
            && !["x86_64", "aarch64"].contains(&a.as_str())
        {
            errs.push(
                "spec.placement.architecture",
                a,
                "must be x86_64 or aarch64",
            );
        }
        if let Some(t) = &p.preferred_tier
            && !crate::node::TIERS.contains(&t.as_str())
        {
            errs.push(
                "spec.placement.preferredTier",
                t,
                format!("must be one of {}", crate::node::TIERS.join(", ")),
            );
        }
        if p.max_per_node == Some(0) {
            errs.push(
                "spec.placement.maxPerNode",
                0,
                "must be at least 1 (or absent)",
            );
        }
        if let Some(g) = &p.gang {
            if g.size == 0 || g.size > 1000 {
                errs.push(
                    "spec.placement.gang.size",
                    g.size,
                    "must be between 1 and 1000",
                );
            }
            if !is_dns_label(&g.name) {
                errs.push(
                    "spec.placement.gang.name",
                    &g.name,
                    "must be a name like training-run-1",
                );
            }
        }
        validate_volumes(self, errs);
        if let Some(h) = &self.health_check {
            h.validate(errs);
        }
        let mut seen_ports = std::collections::BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                errs.push(format!("spec.ports[{i}].port"), 0, "must be 1..65535");
            } else if !seen_ports.insert(p.port) {
                errs.push(format!("spec.ports[{i}].port"), p.port, "is declared twice");
            }
        }
        let mut seen_local = std::collections::BTreeSet::new();
        for (i, l) in self.links.iter().enumerate() {
            if !crate::validate::is_dns_label(&l.instance) {
                errs.push(
                    format!("spec.links[{i}].instance"),
                    &l.instance,
                    "must name an instance, e.g. web-1",
                );
            }
            if l.port == 0 {
                errs.push(format!("spec.links[{i}].port"), 0, "must be 1..65535");
            }
            if l.local_port == 0 {
                errs.push(
                    format!("spec.links[{i}].localPort"),
                    0,
                    "must be 1..65535: the port this instance connects to on 127.0.0.1",
                );
            } else if !seen_local.insert(l.local_port) {
                errs.push(
                    format!("spec.links[{i}].localPort"),
                    l.local_port,
                    "is used by two links; give each its own local port",
                );
            }
        }
        if self.disconnect.lost_after_seconds > 30 * 86_400 {
            errs.push(
                "spec.disconnect.lostAfterSeconds",
                self.disconnect.lost_after_seconds,
                "must be at most 2592000 (30 days); use `replace: false` for an instance that is never replaced",
            );
        }
        if self.termination_grace_period_seconds > 3600 {
            errs.push(
                "spec.terminationGracePeriodSeconds",
                self.termination_grace_period_seconds,
                "must be at most 3600",
            );
        }
    }
}

/// Check an artifact field ([`crate::artifact::check`]).
/// Check `spec.volumes`: names, sizes, container paths, and that `resources.disk`
/// covers them.
fn validate_volumes(spec: &InstanceSpec, errs: &mut FieldErrors) {
    let mut names = std::collections::BTreeSet::new();
    let mut paths = std::collections::BTreeSet::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let at = |f: &str| format!("spec.volumes[{i}].{f}");
        if !is_dns_label(&v.name) {
            errs.push(at("name"), &v.name, "must be a name like data");
        } else if !names.insert(v.name.as_str()) {
            errs.push(at("name"), &v.name, "is declared twice");
        }
        if !(MIN_VOLUME..=MAX_VOLUME).contains(&v.size.0) {
            errs.push(at("size"), v.size, "must be between 8Mi and 16Ti");
        }
        match &v.path {
            Some(p) if !p.starts_with('/') || p == "/" || p.split('/').any(|c| c == "..") => {
                errs.push(
                    at("path"),
                    p,
                    "must be an absolute path other than /, e.g. /data",
                );
            }
            Some(p) if !paths.insert(p.as_str()) => {
                errs.push(at("path"), p, "is used by another volume");
            }
            None if spec.form == Form::Container => errs.push(
                at("path"),
                "",
                "a container's volume needs the path it is mounted at, e.g. /data",
            ),
            _ => {}
        }
    }
    let total: u64 = spec.volumes.iter().map(|v| v.size.0).sum();
    if total > spec.resources.disk.0 {
        errs.push(
            "spec.resources.disk",
            spec.resources.disk,
            format!(
                "must cover the volumes' {}: set it to at least that, so that the node reserves their space",
                Bytes(total)
            ),
        );
    }
}

fn check_artifact(errs: &mut FieldErrors, field: &str, value: &str) {
    if let Err(why) = crate::artifact::check(value) {
        errs.push(field, value, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(spec: &InstanceSpec) -> String {
        let mut e = FieldErrors::default();
        validate_volumes(spec, &mut e);
        e.to_string()
    }

    #[test]
    fn bad_volumes_are_refused_naming_the_field() {
        let vol = |name: &str, size: u64, path: Option<&str>| VolumeSpec {
            name: name.into(),
            size: Bytes(size),
            path: path.map(str::to_string),
        };
        let mut spec = InstanceSpec {
            form: Form::Container,
            volumes: vec![
                vol("data", 16 << 20, Some("/data")),
                vol("data", 1 << 20, None),
                vol("Bad_Name", 16 << 20, Some("/data")),
                vol("up", 16 << 20, Some("/a/../etc")),
            ],
            ..Default::default()
        };
        spec.resources.disk = Bytes(32 << 20);
        let e = errors(&spec);
        assert!(e.contains("spec.volumes[1].name: 'data'"), "{e}");
        assert!(e.contains("spec.volumes[1].size"), "{e}");
        assert!(
            e.contains("spec.volumes[1].path"),
            "a container's volume needs a path: {e}"
        );
        assert!(e.contains("spec.volumes[2].name: 'Bad_Name'"), "{e}");
        assert!(
            e.contains("spec.volumes[2].path: '/data'"),
            "the same path twice: {e}"
        );
        assert!(e.contains("spec.volumes[3].path: '/a/../etc'"), "{e}");
        assert!(e.contains("spec.resources.disk: '32Mi'"), "{e}");
        // A process's volume needs no path; covered, it is fine.
        let ok = InstanceSpec {
            form: Form::Process,
            volumes: vec![vol("data", 16 << 20, None)],
            resources: Resources {
                disk: Bytes(16 << 20),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(errors(&ok), "");
        assert_eq!(ok.volumes[0].env_name(), "VERGE_VOLUME_DATA");
    }
}
