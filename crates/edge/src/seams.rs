//! What the agent's logic runs against, passed in: the workload runtime, the state
//! store, the node's facts, the transport and the cgroups that enforce resources.
//!
//! `verge edge` runs on the host's ([`Seams::host`]): its data directory, facts read
//! from the kernel, a QUIC socket of its own and the node's cgroups. The fleet
//! simulator runs many agents in one process on [`Seams::simulated`]: the fake
//! runtime, in-memory state, fixed facts, and one QUIC socket shared by every
//! simulated edge. Both run the same session protocol, reconciler, restart policy,
//! status outbox, certificate renewal and failover; only these seams differ.
//!
//! The clock is tokio's: every timer of the agent (heartbeats, silence checks,
//! backoffs, restart delays) is a `tokio::time` timer, which a test can pause and
//! advance; certificate lifetimes are wall-clock (`verge_api::clock`).

use std::sync::Arc;

use verge_api::NodeStatus;
use verge_runtime::Runtime;
use verge_runtime::cgroup::Cgroups;

use crate::state::{MemoryState, StateStore};
use crate::{AGENT_VERSION, EdgeConfig, EdgeError};

/// The node's facts as heartbeats report them (capacity, OS, versions).
pub type Facts = dyn Fn() -> NodeStatus + Send + Sync;

/// Everything the agent's logic touches outside itself.
pub struct Seams {
    /// Runs the workloads.
    pub runtime: Arc<dyn Runtime>,
    /// Keeps identity, desired state and run records.
    pub state: Arc<dyn StateStore>,
    /// The node's facts.
    pub facts: Arc<Facts>,
    /// The QUIC endpoint the agent dials from (one UDP socket can carry the
    /// connections of many agents); `None`: TLS over TCP only.
    pub quic: Option<quinn::Endpoint>,
    /// The node's cgroups (`None`: resources are accounted, not enforced).
    pub cgroups: Option<Cgroups>,
    /// The local address TLS-over-TCP connections leave from (`None`: the system
    /// picks; a simulated site uses its QUIC socket's address for both).
    pub tcp_source: Option<std::net::IpAddr>,
    /// The node's own metrics for each sampling round.
    pub node_metrics: Arc<crate::telemetry::NodeSampler>,
    /// Where the metrics buffer keeps its segments (`None`: in memory).
    pub metrics_dir: Option<std::path::PathBuf>,
}

impl Seams {
    /// The host's seams for `config`: its data directory (made if new), facts from the
    /// kernel, its own QUIC socket and its cgroups.
    pub fn host(config: &EdgeConfig, runtime: Arc<dyn Runtime>) -> Result<Self, EdgeError> {
        let state = crate::files::DiskState::open(&config.data_dir)?;
        let (dir, capacity) = (config.data_dir.clone(), config.capacity.clone());
        let metrics_dir = dir.join("metrics");
        let sampled = dir.clone();
        let quic = match verge_tunnel::quic::client() {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(error = %e, "no UDP socket for QUIC; using TLS over TCP");
                None
            }
        };
        Ok(Self {
            runtime,
            state: Arc::new(state),
            facts: Arc::new(move || crate::sysinfo::node_status(&dir, &capacity, AGENT_VERSION)),
            quic,
            cgroups: Cgroups::detect(&format!("verge-{}", config.name)),
            tcp_source: None,
            node_metrics: Arc::new(move || crate::sysinfo::node_metrics(&sampled)),
            metrics_dir: Some(metrics_dir),
        })
    }

    /// Seams of a simulated edge: `runtime` (the fake one, for a fleet), `state` (in
    /// memory: [`MemoryState`]; the same one again for an agent that restarts),
    /// `facts` as given, the shared `quic` endpoint (whose address TCP connections
    /// leave from too), node metrics made up from the facts (memory a quarter used,
    /// CPU time going up at a tenth of capacity), and a metrics buffer in memory.
    pub fn simulated(
        runtime: Arc<dyn Runtime>,
        state: Arc<MemoryState>,
        facts: NodeStatus,
        quic: Option<quinn::Endpoint>,
    ) -> Self {
        let tcp_source = quic
            .as_ref()
            .and_then(|q| q.local_addr().ok())
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        let (cpus, memory) = (
            facts.capacity.cpu.0 as f64 / 1000.0,
            facts.capacity.memory.0 as f64,
        );
        let began = std::time::Instant::now();
        let node_metrics: Arc<crate::telemetry::NodeSampler> = Arc::new(move || {
            use verge_api::metrics as m;
            let up = began.elapsed().as_secs_f64();
            vec![
                (
                    m::NODE_CPU_SECONDS,
                    (up * cpus / 10.0 * 100.0).round() / 100.0,
                ),
                (m::NODE_MEMORY_TOTAL, memory),
                (m::NODE_MEMORY_USED, (memory / 4.0).round()),
                (m::NODE_LOAD1, 0.25),
            ]
        });
        Self {
            runtime,
            state,
            node_metrics,
            metrics_dir: None,
            facts: Arc::new(move || facts.clone()),
            quic,
            cgroups: None,
            tcp_source,
        }
    }
}
