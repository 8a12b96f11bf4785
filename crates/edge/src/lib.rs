//! Verge edge agent: the small process on every edge node.
//!
//! It enrols once with a join token ([`enroll`]), then keeps one outbound,
//! mutually authenticated connection to the hub ([`session`]), caches the desired
//! state on disk ([`files`]) and reconciles workloads towards it ([`agent`]) through a
//! [`verge_runtime::Runtime`]. The hub never dials the edge. When the hub is
//! unreachable, the agent keeps running its workloads from the cache; when it returns,
//! the agent resumes from the last revision it applied.
//!
//! The agent's logic runs through [`seams`] (runtime, state store, facts, transport),
//! so that the fleet simulator runs thousands of the same agents in one process.
//!
//! Start reading at [`run`].

pub mod agent;
pub mod artifacts;
pub mod files;
pub mod health;
pub mod links;
pub mod peers;
pub mod resources;
pub mod seams;
pub mod session;
pub mod state;
pub mod streams;
pub mod sysinfo;
pub mod telemetry;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use verge_api::channel::{ALPN_ENROLL, EdgeToHub, HubToEdge, PROTOCOL_VERSION};
use verge_runtime::Runtime;
use verge_tunnel::frame::{read_msg, write_msg};
use verge_tunnel::pki::{JoinToken, new_node_key_and_csr};

use crate::agent::Agent;
use crate::files::Identity;
pub use crate::seams::Seams;
use crate::session::{Crowd, SessionCtx, SessionEnd, run_session};
pub use crate::sysinfo::CapacityConfig;

/// The agent's version string.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Edge agent failures.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A file in the data dir could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The desired-state cache is unreadable.
    #[error(
        "desired-state cache {path} is corrupt ({detail}); move it aside to resync from the hub"
    )]
    Cache {
        /// The path.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Enrolment was refused by the hub or could not complete.
    #[error("enrolment failed: {0}")]
    Enroll(String),
    /// The hub could not be reached (worth retrying).
    #[error("hub unreachable: {0}")]
    Unreachable(String),
    /// The node is not enrolled and no join token was given.
    #[error("this node has no identity in {0}; pass --join-token to enrol it")]
    NotEnrolled(PathBuf),
    /// The hub refuses this node.
    #[error("the hub refused this node: {0}")]
    Refused(String),
    /// A setting cannot work (what, and how to fix it).
    #[error("{0}")]
    Config(String),
    /// PKI failures.
    #[error(transparent)]
    Pki(#[from] verge_tunnel::pki::PkiError),
    /// TLS failures.
    #[error(transparent)]
    Tls(#[from] verge_tunnel::tls::TlsError),
}

impl EdgeError {
    fn file(path: &Path, source: std::io::Error) -> Self {
        Self::File {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Hub endpoints (`https://HOST:PORT`), in order of preference: replicas or
    /// gateways in different data centres. The agent fails over between them.
    pub hubs: Vec<String>,
    /// Start at an endpoint picked by the node's name instead of the first: for
    /// endpoints that are replicas of one hub (on one etcd), so that a fleet given the
    /// same list spreads over them.
    pub spread_hubs: bool,
    /// Join token for first start.
    pub join_token: Option<String>,
    /// Node name.
    pub name: String,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Labels to enrol with.
    pub labels: BTreeMap<String, String>,
    /// Where to serve `/metrics` (None: off).
    pub metrics_listen: Option<SocketAddr>,
    /// Stop workloads when the agent exits (default: leave them running).
    pub stop_workloads_on_exit: bool,
    /// Capacity overrides.
    pub capacity: CapacityConfig,
    /// OCI registries (`HOST:PORT`) spoken to over plain HTTP.
    pub plain_http_registries: Vec<String>,
    /// When workloads' logs are rotated, and how many old ones are kept.
    pub log_limits: verge_runtime::process::LogLimits,
    /// Bytes the artifact cache (blobs, unpacked images) may hold beyond what the
    /// desired state needs.
    pub cache_budget: u64,
    /// Where to probe and answer the site's peers ([`peers`]; None: off).
    pub peer_listen: Option<SocketAddr>,
    /// The address peers are told to probe (default: `peer_listen`).
    pub peer_advertise: Option<String>,
    /// How metrics are sampled, buffered and shipped ([`telemetry`]).
    pub telemetry: telemetry::TelemetryConfig,
}

/// How often each site peer is probed.
const PEER_PROBE_EVERY: Duration = Duration::from_secs(1);

/// The agent's metrics.
///
/// Registered for a scrape only ([`Metrics::encode`]): a registry holds its names and
/// help texts, about 1 KiB that a fleet simulator would hold for every edge (whose
/// metrics nobody scrapes).
#[derive(Default)]
pub struct Metrics {
    connected: Gauge,
    reconnects: Counter,
    failovers: Counter,
    instances: Family<Vec<(String, String)>, Gauge>,
    revision: Gauge,
}

impl Metrics {
    /// The metrics in Prometheus' text format.
    fn encode(&self) -> String {
        let mut registry = Registry::with_prefix("verge_edge");
        registry.register(
            "connected",
            "1 while the channel to the hub is up",
            self.connected.clone(),
        );
        registry.register(
            "reconnects",
            "Sessions that ended (each is followed by a reconnect)",
            self.reconnects.clone(),
        );
        registry.register(
            "failovers",
            "Switches to another hub endpoint",
            self.failovers.clone(),
        );
        registry.register(
            "instances",
            "Instances on this node by phase",
            self.instances.clone(),
        );
        registry.register(
            "desired_revision",
            "Hub revision of the cached desired state",
            self.revision.clone(),
        );
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Enrol with the hub: verify it by the CA fingerprint in the token, send a CSR for a
/// key generated here, and receive the node certificate.
pub async fn enroll(
    addr: &str,
    token: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    source: Option<std::net::IpAddr>,
) -> Result<Identity, EdgeError> {
    let parsed = JoinToken::parse(token)?;
    let cfg = verge_tunnel::tls::pinned_client_config(&parsed.ca_fingerprint, &[ALPN_ENROLL])?;
    let mut stream = verge_tunnel::tls::dial_from(addr, cfg, source)
        .await
        .map_err(|e| match &e {
            // tokio-rustls reports a refused certificate as InvalidData: the hub is not the
            // one the token names, and retrying cannot fix that.
            verge_tunnel::tls::TlsError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::InvalidData =>
            {
                EdgeError::Enroll(format!("the hub at {addr} failed verification: {source}"))
            }
            _ => {
                let cause = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                EdgeError::Unreachable(format!("{e}: {cause}"))
            }
        })?;
    let (key_pem, csr_pem) = new_node_key_and_csr(name)?;
    let msg = EdgeToHub::Enroll {
        protocol_version: PROTOCOL_VERSION,
        token: token.trim().to_string(),
        node_name: name.to_string(),
        csr_pem,
        labels: labels.clone(),
    };
    write_msg(&mut stream, &msg)
        .await
        .map_err(|e| EdgeError::Enroll(e.to_string()))?;
    let reply = read_msg::<HubToEdge, _>(&mut stream)
        .await
        .map_err(|e| EdgeError::Enroll(e.to_string()))?;
    let _ = stream.shutdown().await;
    match reply {
        Some(HubToEdge::Enrolled { cert_pem, ca_pem }) => Ok(Identity {
            node: name.into(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            ca_pem: ca_pem.into(),
        }),
        // A hub that cannot enrol anyone now (a region hub cut off from its centre, a
        // busy one) is retried like one out of reach.
        Some(HubToEdge::Error { code, message, .. }) if code == "unavailable" || code == "busy" => {
            Err(EdgeError::Unreachable(message))
        }
        Some(HubToEdge::Error { message, .. }) => Err(EdgeError::Enroll(message)),
        other => Err(EdgeError::Enroll(format!("unexpected reply {other:?}"))),
    }
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    agent: Arc<Agent>,
) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                let agent = agent.clone();
                async move {
                    metrics.revision.set(agent.revision() as i64);
                    metrics.instances.clear();
                    for (phase, n) in agent.phase_counts() {
                        metrics
                            .instances
                            .get_or_create(&vec![("phase".into(), phase)])
                            .set(n);
                    }
                    metrics.encode()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "metrics server stopped");
    }
}

/// Which of `n` hub endpoints the node `name` tries first: spread by a stable hash of
/// its name (FNV-1a), the same on every start.
fn first_endpoint(name: &str, n: usize) -> usize {
    let h = verge_api::hash::fnv1a(name.as_bytes());
    (h % n.max(1) as u64) as usize
}

/// Run the agent with `runtime` on this host until `shutdown` resolves. `ready` gets
/// the metrics address once serving.
pub async fn run(
    config: EdgeConfig,
    runtime: Arc<dyn Runtime>,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(Option<SocketAddr>),
) -> Result<(), EdgeError> {
    let seams = Seams::host(&config, runtime)?;
    run_with(config, seams, shutdown, ready).await
}

/// Run the agent through `seams` until `shutdown` resolves: what [`run`] does on a
/// host, and what the fleet simulator does for each simulated edge.
pub async fn run_with(
    config: EdgeConfig,
    seams: Seams,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(Option<SocketAddr>),
) -> Result<(), EdgeError> {
    verge_tunnel::install_crypto_provider();
    let addrs = config
        .hubs
        .iter()
        .map(|h| verge_tunnel::tls::hub_addr(h))
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(EdgeError::Enroll(
            "no hub endpoint given; pass --hub https://HOST:PORT".into(),
        ));
    }
    let Seams {
        runtime,
        state,
        facts,
        quic,
        cgroups,
        tcp_source,
        node_metrics,
        metrics_dir,
    } = seams;
    let dir = config.data_dir.clone();
    let resources = {
        // The facts go at the end of this block: a local held across this future's
        // awaits takes room in it for good, and it lives as long as the agent.
        let initial = facts();
        resources::ResourceManager::new(
            initial.allocatable.cpu,
            initial.allocatable.memory,
            cgroups,
        )
    };
    let agent = Agent::new(
        dir.clone(),
        state.clone(),
        runtime,
        resources,
        config.plain_http_registries.clone(),
        config.log_limits,
    )?;
    let buffer = match &metrics_dir {
        Some(d) => telemetry::buffer::Buffer::open(d, config.telemetry.buffer_bytes)
            .map_err(EdgeError::Config)?,
        None => telemetry::buffer::Buffer::memory(config.telemetry.buffer_bytes),
    };
    let telemetry = telemetry::Telemetry::new(config.telemetry, buffer, node_metrics);
    // Autonomy first: run what the cache says before talking to anyone.
    let reconciler = tokio::spawn(agent.clone().reconciler());
    let _sampler = telemetry::AbortOnDrop(tokio::spawn(telemetry.clone().sampler(agent.clone())));
    let collector = tokio::spawn(agent.clone().collector(config.cache_budget));

    let metrics = Arc::new(Metrics::default());
    let mut metrics_addr = None;
    if let Some(listen) = config.metrics_listen {
        let l = Box::pin(tokio::net::TcpListener::bind(listen))
            .await
            .map_err(|e| EdgeError::file(Path::new(&listen.to_string()), e))?;
        metrics_addr = l.local_addr().ok();
        tokio::spawn(serve_metrics(l, metrics.clone(), agent.clone()));
    }
    // A damaged identity is an error now, before the agent says it is ready.
    if let Some(id) = state.load_identity(&config.name)? {
        state.check_identity(&id)?;
    }
    let peers = match config.peer_listen {
        Some(listen) => {
            let p = Box::pin(peers::PeerProbes::bind(
                &config.name,
                listen,
                config.peer_advertise.clone(),
                PEER_PROBE_EVERY,
            ))
            .await
            .map_err(|e| EdgeError::Config(format!("--peer-listen {listen}: {e}")))?;
            tokio::spawn(p.clone().run());
            Some(p)
        }
        None => None,
    };
    ready(metrics_addr);

    tokio::pin!(shutdown);
    let main = async {
        let mut identity = match state.load_identity(&config.name)? {
            Some(id) if !id.expired() => id,
            Some(_) if config.join_token.is_none() => {
                // Offline past expiry: keep running what the cache says (the reconciler is
                // already up), and say how to get back in. Verification stays on.
                loop {
                    tracing::error!(
                        node = %config.name,
                        "this node's certificate has expired, so the hub will not accept it; \
                         workloads keep running from the cache. To rejoin, mint a re-enrolment \
                         token bound to this node (`verge token create --node {}`) and restart \
                         the agent with --join-token",
                        config.name
                    );
                    metrics.connected.set(0);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
            _ => {
                let token = config
                    .join_token
                    .as_deref()
                    .ok_or_else(|| EdgeError::NotEnrolled(dir.clone()))?;
                let mut backoff = Duration::from_millis(500);
                let mut attempt = 0usize;
                let id = loop {
                    let addr = &addrs[attempt % addrs.len()];
                    attempt += 1;
                    // Boxed, as the session below: this future lives as long as the
                    // agent, and would be as large as its largest step for all of it
                    // (a simulator holds one per edge).
                    let enrolling = enroll(addr, token, &config.name, &config.labels, tcp_source);
                    match Box::pin(enrolling).await {
                        Ok(id) => break id,
                        Err(e @ EdgeError::Unreachable(_)) => {
                            tracing::warn!(error = %e, "hub endpoint unreachable for enrolment; trying the next");
                            if attempt.is_multiple_of(addrs.len()) {
                                tokio::time::sleep(jitter(backoff)).await;
                                backoff = (backoff * 2).min(Duration::from_secs(30));
                            }
                        }
                        // The hub answered and said no: retrying will not help.
                        Err(e) => return Err(e),
                    }
                };
                state.save_identity(&id)?;
                tracing::info!(node = %config.name, "enrolled");
                id
            }
        };
        // Fail over between endpoints: a lost session moves to the next endpoint at
        // once; only after every endpoint has failed in a row does the agent back off
        // (exponentially, with jitter, so a fleet does not stampede a restarted hub).
        let mut backoff = Duration::from_millis(250);
        // Edges of one fleet given the same endpoint list start at different hubs
        // (by their name), so that replicas share the load; on failure each moves on.
        let mut current = if config.spread_hubs {
            first_endpoint(&config.name, addrs.len())
        } else {
            0
        };
        let mut failures_in_a_row = 0usize;
        // QUIC first; after it fails on an endpoint, TLS over TCP there for a while.
        let hub_paths: Vec<std::sync::Mutex<verge_tunnel::dial::HubPath>> =
            addrs.iter().map(|_| Default::default()).collect();
        let reconnect_spread = std::sync::atomic::AtomicU64::new(0);
        // When this edge's part in its fleet's reconnection began (its hub restarted,
        // or first turned it away), while it lasts, and how often it was turned away
        // again since.
        let mut crowd_began: Option<tokio::time::Instant> = None;
        let mut turned_away_again = 0u32;
        loop {
            let addr = &addrs[current];
            // Pick up a renewed certificate saved by the previous session.
            if let Some(fresh) = state.load_identity(&config.name)? {
                identity = fresh;
            }
            let ctx = SessionCtx {
                agent: &agent,
                identity: &identity,
                addr,
                state: state.as_ref(),
                facts: facts.as_ref(),
                metrics: &metrics,
                quic: quic.as_ref(),
                hub_path: &hub_paths[current],
                tcp_source,
                peers: peers.as_deref(),
                telemetry: &telemetry,
                reconnect_spread: &reconnect_spread,
            };
            let began = tokio::time::Instant::now();
            let end = Box::pin(run_session(&ctx)).await?;
            if began.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(250);
                failures_in_a_row = 0;
                crowd_began = None;
            }
            metrics.reconnects.inc();
            match end {
                SessionEnd::Refused(msg) => return Err(EdgeError::Refused(msg)),
                SessionEnd::Deleted(msg) => {
                    // Decommissioned: forget the desired state (a restart must not
                    // bring the workloads back) and stop everything.
                    tracing::warn!(%msg, "this node was deleted at the hub; stopping its workloads");
                    agent.replace(0, Vec::new())?;
                    Box::pin(agent.stop_all()).await;
                    return Err(EdgeError::Refused(msg));
                }
                SessionEnd::Busy(retry_after) => {
                    tracing::info!(addr = %addr, retry_after_ms = retry_after.as_millis() as u64, "hub is busy admitting edges; waiting");
                    tokio::time::sleep(jitter(retry_after.max(backoff))).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                SessionEnd::Crowded(why, crowd) => {
                    // The hub takes its fleet back at a pace, and the whole fleet is
                    // coming: trying again after a short backoff, like every other
                    // edge, turns a restart into waves of refusals (each costs both
                    // sides a connection attempt, and the edge its session ticket).
                    // The time the whole fleet takes at that pace spreads the edges
                    // over it instead ([`crowded_wait`]).
                    let spread = Duration::from_millis(
                        reconnect_spread.load(std::sync::atomic::Ordering::Relaxed),
                    );
                    let now = tokio::time::Instant::now();
                    let into_crowd = match (crowd, crowd_began) {
                        (Crowd::Continues, Some(began)) => {
                            turned_away_again += 1;
                            Some((now - began, turned_away_again))
                        }
                        _ => {
                            crowd_began = Some(now);
                            turned_away_again = 0;
                            None
                        }
                    };
                    let wait = crowded_wait(spread, into_crowd, rand::random::<f64>())
                        .max(jitter(backoff));
                    if addrs.len() > 1 {
                        current = (current + 1) % addrs.len();
                        metrics.failovers.inc();
                    }
                    tracing::warn!(%why, from = %addr, wait_ms = wait.as_millis() as u64, "hub connection lost or turned away while its fleet reconnects; workloads keep running, trying again within the fleet's spread");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                SessionEnd::Lost(why) => {
                    failures_in_a_row += 1;
                    if addrs.len() > 1 {
                        current = (current + 1) % addrs.len();
                        metrics.failovers.inc();
                    }
                    tracing::warn!(%why, from = %addr, next = %addrs[current], "hub connection lost; workloads keep running");
                    if failures_in_a_row >= addrs.len() {
                        failures_in_a_row = 0;
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    };
    let result = tokio::select! {
        r = main => r,
        _ = &mut shutdown => Ok(()),
    };
    reconciler.abort();
    collector.abort();
    if config.stop_workloads_on_exit {
        Box::pin(agent.stop_all()).await;
    } else {
        // What a process exit does; in one process with other agents (the fleet
        // simulator), it must be done by hand.
        Box::pin(agent.abandon()).await;
    }
    // Groups of instances that are no longer running (and the node's own, if empty)
    // go with the agent.
    agent.resources.remove_empty_groups();
    result
}

/// How long an edge waits after its hub restarted or turned it away while its fleet
/// reconnects, given the fleet's reconnect `spread` (the time the whole fleet takes
/// at the hub's pace), how far into the crowd the edge is and how often it was turned
/// away again since (`None`: it begins now), and a random `draw` in [0, 1).
///
/// At first, a random part of the spread: the fleet comes back evenly over it. An
/// edge turned away after that came while the hub was full, and it stays full until
/// the fleet's first pass is over: the edge comes back after that pass, spread over a
/// sixteenth of the spread, twice that each time it is turned away again, at most a
/// quarter. Spread over the whole of it again (at first), the edges turned away came
/// back among the first pass's latecomers, were turned away again, and straggled:
/// after a restart at 100,000 simulated edges, 87,500 were back after 103 s and the
/// last 10,000 took 100 s more. Over a quarter, the last came 25 s after the first
/// pass (5,851 of 100,000 turned away). While the machine keeps the pace, those
/// turned away are a few in a hundred (1,140 to 8,665 of 100,000 in the runs since),
/// who fit in a sixteenth; where it ran out of CPU, about 20,000 were, and the
/// window widens while the hub stays full.
fn crowded_wait(spread: Duration, into_crowd: Option<(Duration, u32)>, draw: f64) -> Duration {
    match into_crowd {
        None => spread.mul_f64(draw),
        Some((into, again)) => {
            let window = (spread / 16)
                .saturating_mul(1 << again.clamp(1, 3).saturating_sub(1))
                .min(spread / 4);
            spread.saturating_sub(into) + window.mul_f64(draw)
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so that many edges do not retry in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn an_edge_turned_away_again_comes_back_after_its_fleets_first_pass() {
        let spread = Duration::from_secs(160);
        let wait = |into: Option<(u64, u32)>, draw| {
            super::crowded_wait(
                spread,
                into.map(|(s, again)| (Duration::from_secs(s), again)),
                draw,
            )
        };
        // First: anywhere in the spread.
        assert_eq!(wait(None, 0.0), Duration::ZERO);
        assert_eq!(wait(None, 0.5), Duration::from_secs(80));
        // Turned away again 30 s in: after the 130 s left of the first pass, within
        // a sixteenth of the spread (10 s).
        assert_eq!(wait(Some((30, 1)), 0.0), Duration::from_secs(130));
        assert_eq!(wait(Some((30, 1)), 0.5), Duration::from_secs(135));
        // After the first pass: within a sixteenth, then an eighth, then a quarter
        // each time it is turned away again, and never more.
        assert_eq!(wait(Some((170, 1)), 0.5), Duration::from_secs(5));
        assert_eq!(wait(Some((175, 2)), 0.5), Duration::from_secs(10));
        assert_eq!(wait(Some((185, 3)), 0.5), Duration::from_secs(20));
        assert_eq!(wait(Some((205, 9)), 0.5), Duration::from_secs(20));
        // A hub that told no spread: no wait here (the backoff applies).
        assert_eq!(
            super::crowded_wait(Duration::ZERO, Some((Duration::from_secs(5), 1)), 0.9),
            Duration::ZERO
        );
    }

    /// A simulator holds these futures once per simulated edge for as long as it
    /// runs, and an agent holds them for its life: a step awaited unboxed in one of
    /// them (enrolment, the handshake, opening a stream) would cost every edge its
    /// size for good. Before their one-time steps were boxed they were 5,952
    /// (`run_with` and the session inside it) and 1,952 bytes (the metrics shipper).
    #[test]
    fn the_futures_an_edge_holds_stay_small() {
        use std::future::Future;
        fn size<F, Fut>(_: F) -> usize
        where
            F: Fn(
                super::EdgeConfig,
                super::Seams,
                std::future::Ready<()>,
                fn(Option<std::net::SocketAddr>),
            ) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        fn size_of_session<F, Fut>(_: F) -> usize
        where
            F: Fn(&'static super::session::SessionCtx<'static>) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        fn size_of_shipper<F, Fut: Future>(_: F) -> usize
        where
            F: Fn(std::sync::Arc<super::telemetry::Telemetry>, super::streams::Opener) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let held = [
            ("run_with", size(super::run_with), 2816),
            (
                "run_session",
                size_of_session(|c| super::session::run_session(c)),
                2304,
            ),
            (
                "Telemetry::ship",
                size_of_shipper(super::telemetry::Telemetry::ship),
                1024,
            ),
        ];
        for (name, bytes, most) in held {
            assert!(
                bytes <= most,
                "{name}'s future is {bytes} bytes (at most {most}); box its one-time steps"
            );
        }
    }

    #[test]
    fn edges_spread_over_the_hub_endpoints() {
        let mut per_hub = [0usize; 3];
        for i in 0..300 {
            per_hub[super::first_endpoint(&format!("edge-{i}"), 3)] += 1;
        }
        assert!(per_hub.iter().all(|&n| n > 60), "{per_hub:?}");
        assert_eq!(super::first_endpoint("edge-1", 1), 0);
        assert_eq!(
            super::first_endpoint("edge-7", 3),
            super::first_endpoint("edge-7", 3)
        );
    }
}
