//! `verge sim`: a fleet of simulated edges against a real hub, to measure what one
//! hub holds and to check that nothing is lost at fleet size.
//!
//! The hub is a separate `verge hub` process that the simulator starts (SQLite, its
//! own data directory). Each simulated edge is the real agent ([`verge_edge::run_with`]:
//! enrolment, session protocol, reconciler, restart policy, status outbox, renewal,
//! failover) on [`verge_edge::Seams::simulated`]: the fake runtime (named as such: it
//! stands in for workloads at scale), state in memory, fixed facts, and QUIC sockets
//! shared by many edges. The connections are real QUIC connections with mutual TLS,
//! through the test kit's fault proxy, which counts the bytes and can slow, drop or
//! cut the link.
//!
//! Scenarios: `steady` (the fleet and its instances held for the duration), `burst`
//! (every instance applied at once), `hub-restart` (the hub SIGKILLed and started
//! again), `partition` (a tenth of the fleet cut off past the node grace period, then
//! back), `churn` (agents restarting all the time). Every run ends with the
//! invariants: every node Ready, every instance Running on a node, none lost.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use verge_edge::state::StateStore as _;

use anyhow::{Context, Result, bail};
use tracing::Instrument;
use verge_edge::state::MemoryState;
use verge_testkit::{FaultProxy, Faults};

use crate::bench::{free_port, print_report, start_hub, tempdir};
use crate::client::Client;

/// What happens during the measured part of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The fleet and its instances, held.
    Steady,
    /// Every instance applied at once, on a connected fleet.
    Burst,
    /// The hub killed (SIGKILL) and started again.
    HubRestart,
    /// A tenth of the fleet cut off for longer than the node grace period.
    Partition,
    /// Agents restarting all the time (each resumes from its state).
    Churn,
    /// Every edge its own cluster, all naming one cluster template: the orchestrator's
    /// cost per cluster against the fleet alone, and a template change rolled out
    /// (canary, a tenth, the rest) to every cluster.
    Template,
}

/// `verge sim` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Simulated edges.
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    /// Instances across the fleet (run by the fake runtime).
    #[arg(long, default_value_t = 1000)]
    pub instances: usize,
    /// Heartbeat interval the hub gives the edges.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub heartbeat: Duration,
    /// What to do during the measured part.
    #[arg(long, value_enum, default_value = "steady")]
    pub scenario: Scenario,
    /// How long the measured part lasts.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Added one-way latency on the link between the fleet and the hub.
    #[arg(long, default_value = "0s", value_parser = crate::parse_duration)]
    pub latency: Duration,
    /// Share of datagrams lost on that link (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Simulated edges behind one address, as behind a site's NAT: each group shares
    /// a QUIC socket bound to a loopback address of its own (127.2.0.1, 127.2.0.2,
    /// ...), so the hub's per-address limits meet the fleet as they would meet sites.
    #[arg(long, default_value_t = 50)]
    pub edges_per_address: usize,
    /// Edges started per second (each enrols first). The default is what a 2-core
    /// machine holds with hub and simulator on it: at 500 a second the hub's UDP queue
    /// grows past the edges' 1.5 s first-contact wait and half of a new fleet starts
    /// on TCP.
    #[arg(long, default_value_t = 250)]
    pub join_rate: usize,
    /// Edge sessions the hub admits per second (`verge hub --admit-rate`).
    #[arg(long, default_value_t = 2000.0)]
    pub admit_rate: f64,
    /// New QUIC handshakes the hub begins per second (`verge hub --handshake-rate`).
    /// Each joining edge needs two (enrolment, then its session): the default leaves
    /// room for reconnections at the default join rate. (At 400 a second, a fleet
    /// joining at 250 kept a backlog of refused edges retrying, which cost the
    /// simulator more than the hub.) It is also the pace of a fleet reconnecting after
    /// a restart: at 1,250 a second, a 2-core machine with both processes on it ran
    /// out of CPU with about 72,000 of 100,000 edges back.
    #[arg(long, default_value_t = 1000.0)]
    pub handshake_rate: f64,
    /// Hub replicas: 1 is one hub on SQLite; more start a local three-member etcd
    /// cluster (Debian's `etcd`) and that many `verge hub` processes on it, with the
    /// edges spread over them (needs a build with the `etcd` feature, and `--direct`).
    /// Figures for the hub are then summed over the replicas.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Dial the hub directly instead of through the fault proxy (which counts the bytes
    /// and injects faults, at the price of relaying every datagram in user space): for
    /// the largest fleets. Byte counts and faults are then unavailable.
    #[arg(long, conflicts_with_all = ["latency", "loss"])]
    pub direct: bool,
    /// With `--scenario partition`: change this many instances of the cut-off edges
    /// (a new spec each) while they are cut off, and report how long the edges take
    /// to apply them all after the heal and the bytes it took, against what a full
    /// re-list would send (a minute of an operator's changes, or an hour's).
    #[arg(long, default_value_t = 0)]
    pub partition_changes: usize,
    /// The fleet's hub is a region hub (`verge hub --region`) under a centre the
    /// simulator starts too; the fleet enrols through the region, its instances are
    /// placed in the region, and the centre is killed when the measured part begins:
    /// a region serving its fleet while its centre is down (steady scenario only).
    #[arg(long, conflicts_with = "replicas")]
    pub region_hub: bool,
    /// How often each simulated edge samples and ships its metrics (0s: never).
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub metrics_interval: Duration,
    /// Fail (exit non-zero) when an invariant does not hold at the end.
    #[arg(long)]
    pub check: bool,
    /// Output: text or json.
    #[arg(short, long, default_value = "text")]
    pub output: String,
}

/// Node grace period of the simulator's hub.
const NODE_GRACE: Duration = Duration::from_secs(40);

/// One simulated edge: its state (kept across agent restarts), and the running
/// agent's stop switch and task.
struct SimEdge {
    name: String,
    state: Arc<MemoryState>,
    agent: Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::task::JoinHandle<()>,
        )>,
    >,
}

/// The fleet: edges, the sockets they share, the proxies they dial through.
struct Fleet {
    edges: Vec<SimEdge>,
    sockets: Vec<quinn::Endpoint>,
    runtime: Arc<verge_runtime::fake::FakeRuntime>,
    /// The main link, and the one the partitioned tenth uses.
    links: [FaultProxy; 2],
    /// Where the edges dial when they bypass the links: every hub replica.
    direct: Option<Vec<String>>,
    token: String,
    dir: PathBuf,
    edges_per_address: usize,
    /// How often each edge samples its metrics.
    metrics_interval: Duration,
}

impl Fleet {
    fn link_of(i: usize) -> usize {
        usize::from(i.is_multiple_of(10))
    }

    /// Start (or restart) edge `i`'s agent.
    fn start(&self, i: usize) {
        let e = &self.edges[i];
        let facts = verge_api::NodeStatus {
            architecture: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            hostname: e.name.clone(),
            capacity: sim_capacity(),
            allocatable: sim_capacity(),
            agent_version: verge_edge::AGENT_VERSION.into(),
            ..Default::default()
        };
        let seams = verge_edge::Seams::simulated(
            self.runtime.clone(),
            e.state.clone(),
            facts,
            Some(self.sockets[i / self.edges_per_address].clone()),
        );
        let hubs = self
            .direct
            .clone()
            .unwrap_or_else(|| vec![self.links[Self::link_of(i)].url()]);
        let config = verge_edge::EdgeConfig {
            // Several endpoints are replicas of one hub: spread over them.
            spread_hubs: hubs.len() > 1,
            hubs,
            join_token: Some(self.token.clone()),
            name: e.name.clone(),
            // Never made: the fake runtime writes nothing, the state is in memory.
            data_dir: self.dir.join("edges").join(&e.name),
            labels: [
                (
                    "region".to_string(),
                    REGION
                        .get()
                        .cloned()
                        .unwrap_or_else(|| format!("region-{}", i % 10)),
                ),
                // What the template scenario's clusters select (one edge each).
                (SIM_CLUSTER_LABEL.to_string(), e.name.clone()),
            ]
            .into_iter()
            .collect(),
            metrics_listen: None,
            stop_workloads_on_exit: false,
            capacity: Default::default(),
            plain_http_registries: Vec::new(),
            log_limits: Default::default(),
            cache_budget: u64::MAX,
            peer_listen: None,
            peer_advertise: None,
            telemetry: verge_edge::telemetry::TelemetryConfig {
                interval: self.metrics_interval,
                ..Default::default()
            },
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Each edge's log lines carry its name.
        let span = tracing::info_span!("edge", name = %e.name);
        let task = tokio::spawn(
            async move {
                let shutdown = async move {
                    let _ = stopped.await;
                };
                if let Err(e) = verge_edge::run_with(config, seams, shutdown, |_| {}).await {
                    tracing::warn!(error = %e, "simulated edge stopped");
                }
            }
            .instrument(span),
        );
        *e.agent.lock().unwrap_or_else(|e| e.into_inner()) = Some((stop, task));
    }

    /// Stop edge `i`'s agent (its workloads run on) and wait until it has exited.
    async fn stop(&self, i: usize) {
        let agent = self.edges[i]
            .agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, task)) = agent {
            let _ = stop.send(());
            let _ = task.await;
        }
    }
}

/// The loopback address of simulated site `k`: 127.2.0.1 upwards, skipping the
/// addresses that end in 0 or 255 (Linux answers all of 127.0.0.0/8 locally).
fn site_address(k: usize) -> Result<std::net::Ipv4Addr> {
    let per_b = 254 * 256;
    let b = 2 + k / per_b;
    if b > 254 {
        bail!("--edges-per-address: too few for this fleet ({k} sites); give more");
    }
    let rest = k % per_b;
    Ok(std::net::Ipv4Addr::new(
        127,
        b as u8,
        (rest / 254) as u8,
        (rest % 254 + 1) as u8,
    ))
}

fn sim_capacity() -> verge_api::ResourceList {
    verge_api::ResourceList {
        cpu: verge_api::Cpu(4000),
        memory: verge_api::Bytes(8 << 30),
        disk: verge_api::Bytes(100 << 30),
        ..Default::default()
    }
}

/// Resident memory of this process, KiB.
fn own_rss_kib() -> u64 {
    verge_testkit::frontdoor::rss_kib(std::process::id())
}

/// A process's CPU time (user and system), in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// The hub's counts of connections turned away at a limit, by reason (summed over
/// the replicas whose metrics `metrics` holds).
fn refusals(metrics: &str) -> serde_json::Value {
    let prefix = "verge_hub_connections_refused_total{reason=\"";
    let mut by_reason = std::collections::BTreeMap::<String, u64>::new();
    for l in metrics.lines() {
        let Some((reason, n)) = l.strip_prefix(prefix).and_then(|r| r.split_once("\"} ")) else {
            continue;
        };
        if let Ok(n) = n.trim().parse::<f64>() {
            *by_reason.entry(reason.to_string()).or_default() += n as u64;
        }
    }
    serde_json::to_value(by_reason).unwrap_or_default()
}

/// A value of the hub's metrics (summed over label sets, and replicas, that match
/// `prefix`).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// The cumulative buckets of a histogram: `(le, count)`, in order (summed over the
/// replicas whose metrics `text` holds).
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (le, count) in text.lines().filter_map(|l| {
        let rest = l.strip_prefix(&prefix)?;
        let (le, count) = rest.split_once("\"} ")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        Some((le, count.trim().parse::<f64>().ok()?))
    }) {
        match out.iter_mut().find(|(l, _)| *l == le) {
            Some((_, n)) => *n += count,
            None => out.push((le, count)),
        }
    }
    out
}

/// The `q` quantile of the observations between two readings of a histogram: the
/// upper bound of the bucket it falls in.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let deltas: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, n - was)
        })
        .collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    deltas
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

fn percentile_ms(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i].as_secs_f64() * 1000.0
}

/// What the watch of the hub's objects saw.
#[derive(Default)]
struct Seen {
    /// When each instance was first seen Running (this run's clock).
    running_at: HashMap<String, Instant>,
    /// Nodes seen going NotReady, by name.
    not_ready: HashMap<String, u32>,
}

/// Follow `/v1/PLURAL` from now, feeding `seen`. Reconnects if the watch ends.
async fn observe(client: Client, plural: &'static str, seen: Arc<Mutex<Seen>>) {
    use futures_util::StreamExt;
    // `listed`: read from a list, where a node NotReady now may have been counted
    // by the watch already.
    let note = |o: &serde_json::Value, listed: bool| {
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        let phase = o["status"]["phase"].as_str().unwrap_or_default();
        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
        match (plural, phase) {
            ("instances", "Running") => {
                s.running_at
                    .entry(name.to_string())
                    .or_insert_with(Instant::now);
            }
            ("nodes", "NotReady") => {
                let n = s.not_ready.entry(name.to_string()).or_default();
                if !listed || *n == 0 {
                    *n += 1;
                }
            }
            _ => {}
        }
    };
    // The revision the observer has seen everything up to (0: start from now).
    let mut seen_up_to = 0u64;
    loop {
        if seen_up_to == 0 {
            let Ok(list) = client
                .get::<serde_json::Value>(&format!("/v1/{plural}?limit=1"))
                .await
            else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            seen_up_to = list["revision"].as_u64().unwrap_or(0);
        }
        // A watch that ends (the hub ends one whose reader falls behind, as a
        // fleet's simulator can) resumes after the last revision seen; one the hub
        // ended with an error starts again from a full list.
        let Ok(resp) = client
            .stream(&format!("/v1/{plural}?watch=true&revision={seen_up_to}"))
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        let mut ended_with_error = false;
        while let Some(Ok(chunk)) = body.next().await {
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let Ok(ev) = serde_json::from_slice::<serde_json::Value>(&line) else {
                    continue;
                };
                if ev["type"] == "ERROR" {
                    ended_with_error = true;
                    continue;
                }
                note(&ev["object"], false);
                if let Some(r) = ev["revision"].as_u64() {
                    seen_up_to = seen_up_to.max(r);
                }
            }
        }
        if ended_with_error {
            // What happened meanwhile is in the list; the watch goes on from the
            // revision read before it (what it repeats is noted once).
            let Ok(list) = client
                .get::<serde_json::Value>(&format!("/v1/{plural}?limit=1"))
                .await
            else {
                seen_up_to = 0;
                continue;
            };
            if let Ok(items) = list_all(&client, plural).await {
                items.iter().for_each(|o| note(o, true));
                seen_up_to = list["revision"].as_u64().unwrap_or(0);
            } else {
                seen_up_to = 0;
            }
        }
    }
}

/// Latencies of the operator's API while the fleet runs: get, list, apply.
#[derive(Default)]
struct Probes {
    get: Vec<Duration>,
    list: Vec<Duration>,
    apply: Vec<Duration>,
    errors: u64,
}

async fn probe(
    client: Client,
    probes: Arc<Mutex<Probes>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut k = 0u64;
    while !*stop.borrow() {
        k += 1;
        let t = Instant::now();
        let get = client
            .get::<serde_json::Value>("/v1/nodes/sim-000000")
            .await;
        let get_t = t.elapsed();
        let t = Instant::now();
        let list = client
            .get::<serde_json::Value>("/v1/instances?limit=100")
            .await;
        let list_t = t.elapsed();
        let t = Instant::now();
        let body = in_region(serde_json::json!({
            "kind": "Instance",
            "metadata": {"name": "sim-probe", "labels": {"probe": k.to_string()}},
            "spec": {"form": "process", "process": {"command": ["sleep", "1"]},
                     "resources": {"cpu": "10m", "memory": "1Mi"}},
        }));
        let apply = client.put("/v1/instances/sim-probe", &body).await;
        let apply_t = t.elapsed();
        {
            let mut p = probes.lock().unwrap_or_else(|e| e.into_inner());
            let p = &mut *p;
            for (ok, d, v) in [
                (get.is_ok(), get_t, &mut p.get),
                (list.is_ok(), list_t, &mut p.list),
                (apply.is_ok(), apply_t, &mut p.apply),
            ] {
                if ok {
                    v.push(d);
                } else {
                    p.errors += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The region the fleet's instances are placed in, when its hub is a region hub.
static REGION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The region a run with `--region-hub` uses.
const SIM_REGION: &str = "sim-region";

/// `body` placed in the region of a `--region-hub` run (a region hub takes only
/// instances placed in its region).
fn in_region(mut body: serde_json::Value) -> serde_json::Value {
    if let Some(r) = REGION.get() {
        body["spec"]["placement"] = serde_json::json!({"region": r});
    }
    body
}

fn instance_body(name: &str) -> serde_json::Value {
    in_region(serde_json::json!({
        "kind": "Instance",
        "metadata": {"name": name},
        "spec": {"form": "process", "process": {"command": ["sleep", "1"]},
                 "resources": {"cpu": "100m", "memory": "16Mi"}},
    }))
}

/// Apply `names` with `concurrency` requests in flight; returns when each was applied.
async fn apply_all(
    client: &Client,
    names: &[String],
    concurrency: usize,
) -> Result<HashMap<String, Instant>> {
    use futures_util::StreamExt;
    let results: Vec<Result<(String, Instant)>> = futures_util::stream::iter(names.iter().cloned())
        .map(|name| {
            let client = client.clone();
            async move {
                client
                    .put(&format!("/v1/instances/{name}"), &instance_body(&name))
                    .await
                    .with_context(|| format!("applying {name}"))?;
                Ok((name, Instant::now()))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The hubs of a run: one on SQLite, or replicas on a local etcd cluster. What is
/// read from them (metrics, memory, CPU) is summed over the replicas: each counts
/// the edges connected to it, only the leader places.
struct Hubs {
    /// Each replica's process, its API client, and its port.
    procs: Vec<(tokio::process::Child, Client, u16)>,
    /// The replicas' store, when there are several.
    _etcd: Option<verge_testkit::etcd::EtcdCluster>,
    args: Vec<String>,
    dir: PathBuf,
}

impl Hubs {
    async fn start(dir: &std::path::Path, replicas: usize, args: Vec<String>) -> Result<Self> {
        let etcd = if replicas > 1 {
            Some(
                tokio::task::spawn_blocking(|| verge_testkit::etcd::EtcdCluster::start(3))
                    .await
                    .context("starting a three-member etcd cluster for the replicas")?,
            )
        } else {
            None
        };
        let mut hubs = Self {
            procs: Vec::new(),
            _etcd: None,
            args,
            dir: dir.to_path_buf(),
        };
        for i in 0..replicas {
            let port = free_port()?;
            let mut args = hubs.args.clone();
            if let Some(etcd) = &etcd {
                args.extend([
                    "--store".into(),
                    etcd.url(),
                    "--advertise".into(),
                    format!("https://127.0.0.1:{port}"),
                ]);
            }
            // One at a time: the first records the CA the others take.
            let (child, client) = hubs.start_one(i, port, &args).await?;
            hubs.procs.push((child, client, port));
        }
        hubs._etcd = etcd;
        Ok(hubs)
    }

    fn dir_of(&self, i: usize) -> PathBuf {
        if i == 0 {
            self.dir.clone()
        } else {
            self.dir.join(format!("replica-{i}"))
        }
    }

    async fn start_one(
        &self,
        i: usize,
        port: u16,
        args: &[String],
    ) -> Result<(tokio::process::Child, Client)> {
        let dir = self.dir_of(i);
        std::fs::create_dir_all(&dir)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        start_hub(&dir, port, &args).await
    }

    /// The first replica's API (any replica serves all of it).
    fn client(&self) -> &Client {
        &self.procs[0].1
    }

    /// Where edges dial each replica directly.
    fn urls(&self) -> Vec<String> {
        self.procs
            .iter()
            .map(|(_, _, port)| format!("https://127.0.0.1:{port}"))
            .collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.procs
            .iter()
            .map(|(c, _, _)| c.id().unwrap_or(0))
            .collect()
    }

    fn rss_kib(&self) -> u64 {
        self.pids()
            .into_iter()
            .map(verge_testkit::frontdoor::rss_kib)
            .sum()
    }

    fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    /// Every replica's metrics, one after another (the readers below sum them).
    async fn metrics(&self) -> String {
        let mut text = String::new();
        for (_, client, _) in &self.procs {
            text.push_str(&client.get_text("/metrics").await.unwrap_or_default());
            text.push('\n');
        }
        text
    }

    /// The edges connected to each replica.
    async fn connected_each(&self) -> Vec<u64> {
        let mut each = Vec::new();
        for (_, client, _) in &self.procs {
            let text = client.get_text("/metrics").await.unwrap_or_default();
            each.push(metric(&text, "verge_hub_edges_connected ") as u64);
        }
        each
    }

    /// SIGKILL the only hub and start it again on the same data directory.
    async fn kill_and_restart(&mut self) -> Result<()> {
        let (mut child, _, port) = self.procs.remove(0);
        crate::dev::kill_group(&mut child).await;
        let args = self.args.clone();
        let (child, client) = self.start_one(0, port, &args).await?;
        self.procs.insert(0, (child, client, port));
        Ok(())
    }

    async fn kill_all(&mut self) {
        for (child, _, _) in &mut self.procs {
            crate::dev::kill_group(child).await;
        }
    }
}

/// Wait until the hub counts `n` connected edges, printing progress.
async fn wait_connected(hubs: &Hubs, n: usize, what: &str, limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let text = hubs.metrics().await;
        let c = metric(&text, "verge_hub_edges_connected ") as usize;
        if c >= n {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!(
                "{what}: only {c} of {n} edges connected after {}s",
                limit.as_secs()
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            // An overloaded hub may not answer in time: that is not zero edges.
            let seen = if text.trim().is_empty() {
                "the hub did not answer /metrics".to_string()
            } else {
                format!("{c}/{n} edges connected")
            };
            eprintln!("sim: {what}: {seen} ({:.0}s)", t.elapsed().as_secs_f64());
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every object of `plural`, page by page.
async fn list_all(client: &Client, plural: &str) -> Result<Vec<serde_json::Value>> {
    let mut items = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let path = match &next {
            Some(c) => format!("/v1/{plural}?limit=10000&continue={c}"),
            None => format!("/v1/{plural}?limit=10000"),
        };
        let page: serde_json::Value = client.get(&path).await?;
        if let Some(a) = page["items"].as_array() {
            items.extend(a.iter().cloned());
        }
        match page["continue"].as_str() {
            Some(c) if !c.is_empty() => next = Some(c.to_string()),
            _ => return Ok(items),
        }
    }
}

/// The end-of-run invariants.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Invariants {
    nodes: usize,
    nodes_ready: usize,
    instances: usize,
    instances_running: usize,
    instances_lost: usize,
    instances_on_unknown_nodes: usize,
    /// Instances the fleet's (fake) runtime runs more than once, or not at all.
    workloads_doubled: usize,
    workloads_missing: usize,
}

impl Invariants {
    fn hold(&self, nodes: usize, instances: usize) -> bool {
        self.nodes == nodes
            && self.nodes_ready == nodes
            && self.instances == instances
            && self.instances_running == instances
            && self.instances_lost == 0
            && self.instances_on_unknown_nodes == 0
            && self.workloads_doubled == 0
            && self.workloads_missing == 0
    }
}

async fn invariants(
    client: &Client,
    names: &[String],
    runtime: &verge_runtime::fake::FakeRuntime,
) -> Result<Invariants> {
    let mut runs: HashMap<String, usize> = HashMap::new();
    for w in runtime.running() {
        *runs.entry(w).or_default() += 1;
    }
    let nodes = list_all(client, "nodes").await?;
    let ready: std::collections::HashSet<&str> = nodes
        .iter()
        .filter(|n| n["status"]["phase"] == "Ready")
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect();
    let known: std::collections::HashSet<&str> = nodes
        .iter()
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect();
    let instances = list_all(client, "instances").await?;
    let by_name: HashMap<&str, &serde_json::Value> = instances
        .iter()
        .filter_map(|i| Some((i["metadata"]["name"].as_str()?, i)))
        .collect();
    let ours: Vec<&serde_json::Value> = names
        .iter()
        .filter_map(|n| by_name.get(n.as_str()).copied())
        .collect();
    Ok(Invariants {
        nodes: nodes.len(),
        nodes_ready: ready.len(),
        instances: ours.len(),
        instances_running: ours
            .iter()
            .filter(|i| i["status"]["phase"] == "Running")
            .count(),
        instances_lost: names.len() - ours.len(),
        instances_on_unknown_nodes: ours
            .iter()
            .filter(|i| {
                i["status"]["node"]
                    .as_str()
                    .is_some_and(|n| !known.contains(n))
            })
            .count(),
        workloads_doubled: names
            .iter()
            .filter(|n| runs.get(*n).is_some_and(|c| *c > 1))
            .count(),
        workloads_missing: names.iter().filter(|n| !runs.contains_key(*n)).count(),
    })
}

/// Wait until every one of `names` has been seen Running.
async fn wait_running(
    seen: &Arc<Mutex<Seen>>,
    names: &[String],
    hubs: &Hubs,
    limit: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let running = {
            let s = seen.lock().unwrap_or_else(|e| e.into_inner());
            names
                .iter()
                .filter(|n| s.running_at.contains_key(*n))
                .count()
        };
        if running >= names.len() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!(
                "only {running} of {} instances Running after {}s",
                names.len(),
                limit.as_secs()
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            let m = hubs.metrics().await;
            eprintln!(
                "sim: {running}/{} instances Running ({:.0}s; hub: {} edges connected, {}shedding, {} datagrams dropped at its socket)",
                names.len(),
                t.elapsed().as_secs_f64(),
                metric(&m, "verge_hub_edges_connected "),
                if metric(&m, "verge_hub_shedding ") > 0.0 {
                    ""
                } else {
                    "not "
                },
                metric(&m, "verge_hub_quic_socket_drops "),
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run `verge sim`.
pub async fn run(a: SimArgs) -> Result<()> {
    verge_tunnel::install_crypto_provider();
    if a.nodes == 0 {
        bail!("--nodes: give at least 1 simulated edge");
    }
    if a.direct && a.scenario == Scenario::Partition {
        bail!("--direct: a partition needs the fault proxy; leave --direct out");
    }
    if a.replicas == 0 {
        bail!("--replicas: give at least 1 hub");
    }
    if a.replicas > 1 && !a.direct {
        bail!(
            "--replicas {}: replicas are dialled directly; add --direct",
            a.replicas
        );
    }
    if a.replicas > 1 && a.scenario == Scenario::HubRestart {
        bail!(
            "--replicas {}: the hub-restart scenario kills the only hub; for a replica's death use `verge bench failover`",
            a.replicas
        );
    }
    if a.region_hub && a.scenario != Scenario::Steady {
        bail!("--region-hub: only the steady scenario (the centre is killed when it begins)");
    }
    if !(0.0..=1.0).contains(&a.loss) {
        bail!("--loss: {} is not between 0 and 1", a.loss);
    }
    let dir = tempdir()?;
    match run_in(a, &dir).await {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
        // A failed run keeps the hub's log, and shows where it ends.
        Err(e) => {
            let log = dir.join("hub.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(anyhow::anyhow!(
                "{e:#}\n(the hub's log is kept at {}; it ends with:)\n{}",
                log.display(),
                tail.join("\n")
            ))
        }
    }
}

async fn run_in(a: SimArgs, dir: &std::path::Path) -> Result<()> {
    let dir = dir.to_path_buf();
    let hub_args: Vec<String> = vec![
        "--heartbeat".into(),
        format!("{}ms", a.heartbeat.as_millis()),
        "--node-grace".into(),
        format!("{}s", NODE_GRACE.as_secs()),
        "--admit-rate".into(),
        a.admit_rate.to_string(),
        "--handshake-rate".into(),
        a.handshake_rate.to_string(),
    ];
    // With --region-hub: a centre first, then the fleet's hub as its region's.
    let mut centre = None;
    let mut hub_args = hub_args;
    if a.region_hub {
        let cdir = dir.join("centre");
        std::fs::create_dir_all(&cdir)?;
        let args: Vec<&str> = hub_args.iter().map(String::as_str).collect();
        let (child, c) = start_hub(&cdir, crate::bench::free_port()?, &args).await?;
        c.put(
            &format!("/v1/regions/{SIM_REGION}"),
            &serde_json::json!({"kind": "Region", "metadata": {"name": SIM_REGION},
                                "spec": {"latitude": 48.8, "longitude": 2.3}}),
        )
        .await?;
        let t: serde_json::Value = c
            .post(
                "/v1/tokens",
                &serde_json::json!({"uses": 1, "region": SIM_REGION}),
            )
            .await?;
        let url = verge_hub::ClientConfig::load(&cdir.join("hub").join("admin.conf"))?.server;
        hub_args.extend([
            "--region".into(),
            SIM_REGION.into(),
            "--upstream".into(),
            url,
            "--join-token".into(),
            t["token"].as_str().unwrap_or_default().into(),
        ]);
        let _ = REGION.set(SIM_REGION.into());
        centre = Some((child, c));
    }
    let mut hubs = Hubs::start(&dir, a.replicas, hub_args).await?;
    let client = hubs.client().clone();
    let port = hubs.procs[0].2;
    let hub_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let links = [
        FaultProxy::start_with_udp(hub_addr).await?,
        FaultProxy::start_with_udp(hub_addr).await?,
    ];
    let faults = Faults {
        latency: a.latency,
        loss: a.loss,
        ..Default::default()
    };
    for l in &links {
        l.set(faults.clone());
    }
    // Tokens are kept at the centre, where a region hub carries enrolments.
    let token: serde_json::Value = centre
        .as_ref()
        .map_or(&client, |(_, c)| c)
        .post("/v1/tokens", &serde_json::json!({"uses": 0}))
        .await?;
    let token = token["token"].as_str().unwrap_or_default().to_string();
    let hub_idle_kib = hubs.rss_kib();
    let sim_before_kib = own_rss_kib();

    let per_address = a.edges_per_address.max(1);
    let sockets = (0..a.nodes.div_ceil(per_address))
        .map(|k| {
            let ip = site_address(k)?;
            verge_tunnel::quic::client_on(ip.into(), Some(1 << 20))
                .with_context(|| format!("opening a QUIC socket for the fleet on {ip}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let fleet = Fleet {
        edges: (0..a.nodes)
            .map(|i| SimEdge {
                name: format!("sim-{i:06}"),
                state: Arc::default(),
                agent: Mutex::new(None),
            })
            .collect(),
        sockets,
        runtime: Arc::default(),
        links,
        direct: a.direct.then(|| hubs.urls()),
        metrics_interval: a.metrics_interval,
        token,
        dir: dir.clone(),
        edges_per_address: per_address,
    };
    eprintln!(
        "sim: hub on port {port}; starting {} edges at {}/s from {} addresses (a QUIC socket each)",
        a.nodes,
        a.join_rate,
        fleet.sockets.len()
    );
    let join = Instant::now();
    let batch = (a.join_rate / 10).max(1);
    for i in 0..a.nodes {
        fleet.start(i);
        if (i + 1) % batch == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let join_limit = Duration::from_secs(120 + (a.nodes / a.join_rate.max(1)) as u64 * 3);
    wait_connected(&hubs, a.nodes, "join", join_limit).await?;
    let join_secs = join.elapsed().as_secs_f64();
    // Let sessions settle (first statuses, first writes of node status).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hub_fleet_kib = hubs.rss_kib();
    let sim_fleet_kib = own_rss_kib();
    let refused_at_join = refusals(&hubs.metrics().await);
    let edges_per_replica = hubs.connected_each().await;
    eprintln!(
        "sim: {} edges connected in {join_secs:.1}s (connections refused on the way: {refused_at_join})",
        a.nodes
    );

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let observers = [
        tokio::spawn(observe(client.clone(), "instances", seen.clone())),
        tokio::spawn(observe(client.clone(), "nodes", seen.clone())),
    ];
    let names: Vec<String> = (0..a.instances).map(|k| format!("sim-w-{k:06}")).collect();
    let mut report = serde_json::json!({
        "bench": "sim",
        "scenario": format!("{:?}", a.scenario).to_lowercase(),
        "nodes": a.nodes,
        "instances": a.instances,
        "heartbeatSeconds": a.heartbeat.as_secs_f64(),
        "durationSeconds": a.duration.as_secs_f64(),
        "hubReplicas": a.replicas,
        "edgesPerReplica": edges_per_replica,
        "quicSockets": fleet.sockets.len(),
        "edgesPerAddress": per_address,
        "latencyMs": a.latency.as_secs_f64() * 1000.0,
        "loss": a.loss,
        "joinSeconds": join_secs,
        "connectionsRefusedAtJoin": refused_at_join,
        "hubIdleMiB": hub_idle_kib as f64 / 1024.0,
        "hubWithFleetMiB": hub_fleet_kib as f64 / 1024.0,
        "hubKiBPerEdge": hub_fleet_kib.saturating_sub(hub_idle_kib) as f64 / a.nodes as f64,
        "simKiBPerEdge": sim_fleet_kib.saturating_sub(sim_before_kib) as f64 / a.nodes as f64,
    });

    // Instances: all at once (burst, measured) or before the measured part.
    let before = hubs.metrics().await;
    let placements_before = metric(&before, "verge_hub_placements_total");
    let applied_from = Instant::now();
    // A burst has many applies in flight (48: new connections from one address
    // beyond the hub's 64 strangers per address would be turned away while their
    // TLS handshakes run); otherwise a few, as operators' tools do.
    let in_flight = if a.scenario == Scenario::Burst { 48 } else { 8 };
    let applied = apply_all(&client, &names, in_flight).await?;
    let apply_secs = applied_from.elapsed().as_secs_f64();
    let running_after = wait_running(&seen, &names, &hubs, Duration::from_secs(600)).await?;
    let after = hubs.metrics().await;
    let placements = metric(&after, "verge_hub_placements_total") - placements_before;
    // What the hub put off to keep up, and what its socket lost anyway.
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    report["instancesWritesRefused"] = delta("verge_hub_api_requests_total{code=\"503\"}").into();
    report["instancesSocketDrops"] = delta("verge_hub_quic_socket_drops ").into();
    {
        let s = seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut to_running: Vec<Duration> = names
            .iter()
            .filter_map(|n| {
                Some(
                    s.running_at
                        .get(n)?
                        .saturating_duration_since(*applied.get(n)?),
                )
            })
            .collect();
        let all = apply_secs + running_after.as_secs_f64();
        report["instancesAppliedSeconds"] = apply_secs.into();
        report["instancesAllRunningSeconds"] = (running_after.as_secs_f64()).into();
        report["placementsPerSecond"] = (placements / all.max(0.001)).into();
        report["applyToRunningP50Ms"] = percentile_ms(&mut to_running, 0.5).into();
        report["applyToRunningP99Ms"] = percentile_ms(&mut to_running, 0.99).into();
    }
    if a.instances > 0 {
        eprintln!("sim: {} instances Running", a.instances);
    }
    let hub_with_instances_kib = hubs.rss_kib();
    report["hubWithInstancesMiB"] = (hub_with_instances_kib as f64 / 1024.0).into();

    // The measured part.
    let probes: Arc<Mutex<Probes>> = Arc::default();
    let (stop_probes, probe_rx) = tokio::sync::watch::channel(false);
    let prober = tokio::spawn(probe(client.clone(), probes.clone(), probe_rx));
    let metrics_before = hubs.metrics().await;
    let (up0, down0) = bytes(&fleet.links);
    let cpu0 = hubs.cpu_seconds();
    let sim_cpu0 = cpu_seconds(std::process::id());
    let not_ready_before: u32 = seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .not_ready
        .values()
        .sum();
    if let Some((mut child, _)) = centre.take() {
        let _ = child.kill().await;
        eprintln!("sim: the centre is down; the region hub serves the fleet alone");
        report["centreDown"] = true.into();
    }
    let t0 = Instant::now();
    eprintln!("sim: {:?} for {}s", a.scenario, a.duration.as_secs());
    let mut client = client;
    match a.scenario {
        Scenario::Steady | Scenario::Burst => tick_for(a.duration, &hubs).await,
        Scenario::Template => {
            template_rollout(&client, &hubs, &fleet, a.duration, &mut report).await?;
        }
        Scenario::Churn => {
            // A hundredth of the fleet restarts its agent every few seconds.
            let mut k = 0usize;
            let per_round = (a.nodes / 100).max(1);
            while t0.elapsed() < a.duration {
                for _ in 0..per_round {
                    let i = k % a.nodes;
                    fleet.stop(i).await;
                    fleet.start(i);
                    k += 1;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            report["agentRestarts"] = k.into();
        }
        Scenario::Partition => {
            // The tenth of the fleet on the second link is cut off past the grace
            // period, then the link comes back.
            let cut = a.duration.max(NODE_GRACE + Duration::from_secs(10));
            fleet.links[1].blackhole(true);
            let cut_at = Instant::now();
            // Changes made while the tenth is away: the revision each of its edges
            // must reach, by node.
            let owed = change_while_cut(&client, &fleet, a.partition_changes).await?;
            tokio::time::sleep(cut.saturating_sub(cut_at.elapsed())).await;
            let (up_before, down_before) = fleet.links[1].bytes();
            fleet.links[1].blackhole(false);
            let back = Instant::now();
            if a.partition_changes > 0 {
                let behind_at_heal = fleet
                    .edges
                    .iter()
                    .filter(|e| {
                        owed.get(&e.name).is_some_and(|want| {
                            e.state.load_desired().map_or(true, |d| d.revision < *want)
                        })
                    })
                    .count();
                eprintln!(
                    "sim: at the heal, {behind_at_heal} of the {} changed edges lack their changes",
                    owed.len()
                );
                let caught_up = converged(&fleet, &owed, Duration::from_secs(600)).await?;
                let (up, down) = fleet.links[1].bytes();
                // The link carries every cut-off edge, changed or not.
                let cut_off: Vec<&SimEdge> = fleet
                    .edges
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| Fleet::link_of(*i) == 1)
                    .map(|(_, e)| e)
                    .collect();
                let edges = cut_off.len().max(1) as u64;
                report["partitionChanges"] = a.partition_changes.into();
                report["partitionChangedEdges"] = owed.len().into();
                report["convergeAfterPartitionSeconds"] = caught_up.as_secs_f64().into();
                // Down: what the hub sent them (the resumed changes, TLS included); up:
                // what they sent (their statuses, resent whole on every reconnect).
                report["downBytesPerEdgeAfterPartition"] = ((down - down_before) / edges).into();
                report["upBytesPerEdgeAfterPartition"] = ((up - up_before) / edges).into();
                report["fullRelistBytesPerEdge"] = (relist_bytes(&cut_off) / edges).into();
            }
            wait_connected(
                &hubs,
                a.nodes,
                "after the partition",
                Duration::from_secs(300),
            )
            .await?;
            report["partitionedEdges"] = (0..a.nodes)
                .filter(|i| Fleet::link_of(*i) == 1)
                .count()
                .into();
            report["partitionSeconds"] = cut.as_secs_f64().into();
            report["reconnectAfterPartitionSeconds"] = back.elapsed().as_secs_f64().into();
        }
        Scenario::HubRestart => {
            tokio::time::sleep(a.duration / 4).await;
            let (u, d) = bytes(&fleet.links);
            let restart = Instant::now();
            hubs.kill_and_restart().await?;
            client = hubs.client().clone();
            let started = restart.elapsed();
            let back = wait_connected(
                &hubs,
                a.nodes,
                "after the hub restart",
                Duration::from_secs(600),
            )
            .await?;
            let all_back = restart.elapsed();
            tokio::time::sleep(Duration::from_secs(3)).await;
            let (u2, d2) = bytes(&fleet.links);
            let after = hubs.metrics().await;
            report["hubStartSeconds"] = started.as_secs_f64().into();
            report["hubRestartToAllConnectedSeconds"] = all_back.as_secs_f64().into();
            report["resyncAfterHubReadySeconds"] = back.as_secs_f64().into();
            report["reconnectBytesPerEdge"] = if a.direct {
                serde_json::Value::Null
            } else {
                (((u2 - u) + (d2 - d)) as f64 / a.nodes as f64).into()
            };
            // A fresh process counts from zero: these are the restart's syncs.
            for (field, kind) in [("syncsResume", "resume"), ("syncsSnapshot", "snapshot")] {
                let series = format!("verge_hub_syncs_total{{kind=\"{kind}\"}}");
                report[field] = (metric(&after, &series) as u64).into();
            }
            // And its handshakes: how many of them resumed a TLS session from a
            // ticket the hub before handed out.
            report["tlsResumptions"] = (metric(&after, "verge_hub_tls_resumptions ") as u64).into();
            report["tlsTicketsIssued"] =
                (metric(&after, "verge_hub_tls_tickets_issued ") as u64).into();
            tick_for(a.duration.saturating_sub(t0.elapsed()), &hubs).await;
        }
    }
    let window = t0.elapsed();
    let _ = stop_probes.send(true);
    let _ = prober.await;
    let metrics_after = hubs.metrics().await;
    let (up1, down1) = bytes(&fleet.links);
    let cpu1 = hubs.cpu_seconds();
    let sim_cpu1 = cpu_seconds(std::process::id());
    let lag = "verge_hub_heartbeat_lag_seconds";
    let (lag0, lag1) = if a.scenario == Scenario::HubRestart {
        (Vec::new(), buckets(&metrics_after, lag))
    } else {
        (buckets(&metrics_before, lag), buckets(&metrics_after, lag))
    };
    {
        let mut p = probes.lock().unwrap_or_else(|e| e.into_inner());
        report["apiGetP50Ms"] = percentile_ms(&mut p.get, 0.5).into();
        report["apiGetP99Ms"] = percentile_ms(&mut p.get, 0.99).into();
        report["apiListP50Ms"] = percentile_ms(&mut p.list, 0.5).into();
        report["apiListP99Ms"] = percentile_ms(&mut p.list, 0.99).into();
        report["apiApplyP50Ms"] = percentile_ms(&mut p.apply, 0.5).into();
        report["apiApplyP99Ms"] = percentile_ms(&mut p.apply, 0.99).into();
        report["apiRequests"] = (p.get.len() + p.list.len() + p.apply.len()).into();
        report["apiErrors"] = p.errors.into();
    }
    // After a hub restart a fresh process counts from zero: the reconnection's.
    report["connectionsRefused"] = refusals(&metrics_after);
    report["heartbeatLagP50Seconds"] = histogram_quantile(&lag0, &lag1, 0.5).into();
    report["heartbeatLagP99Seconds"] = histogram_quantile(&lag0, &lag1, 0.99).into();
    let not_ready_after: u32 = seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .not_ready
        .values()
        .sum();
    report["nodesWentNotReady"] = (not_ready_after - not_ready_before).into();
    report["hubCpuPercent"] = if a.scenario == Scenario::HubRestart {
        serde_json::Value::Null
    } else {
        ((cpu1 - cpu0) * 100.0 / window.as_secs_f64()).into()
    };
    // The simulator shares the machine: what its fleet (and the prober) cost it.
    report["simCpuPercent"] = ((sim_cpu1 - sim_cpu0) * 100.0 / window.as_secs_f64()).into();
    // Metrics the fleet shipped during the window: what the hub took in, on the wire
    // and at rest.
    let taken = |name: &str| metric(&metrics_after, name) - metric(&metrics_before, name);
    let samples = taken("verge_hub_metrics_samples_ingested_total ");
    report["metricsSamplesPerSecond"] = (samples / window.as_secs_f64()).into();
    report["metricsBytesPerEdgePerMinute"] = (taken("verge_hub_metrics_bytes_received_total ")
        * 60.0
        / window.as_secs_f64()
        / a.nodes as f64)
        .into();
    if let Ok(stats) = client.get::<serde_json::Value>("/v1/metrics/stats").await {
        let (bytes, held) = (stats["bytes"].as_f64(), stats["samples"].as_f64());
        if let (Some(b), Some(n)) = (bytes, held)
            && n > 0.0
        {
            report["metricsBytesPerSampleAtRest"] = (b / n).into();
            report["metricsSeriesHeld"] = stats["series"].clone();
        }
    }
    report["hubMiBAtEnd"] = (hubs.rss_kib() as f64 / 1024.0).into();
    report["simMiBAtEnd"] = (own_rss_kib() as f64 / 1024.0).into();
    report["bytesPerEdgePerMinute"] = if a.direct {
        serde_json::Value::Null
    } else {
        (((up1 - up0) + (down1 - down0)) as f64 * 60.0 / window.as_secs_f64() / a.nodes as f64)
            .into()
    };

    // After a partition the cut-off nodes come back Ready and their edges report
    // their instances again: give them a heartbeat, then up to a minute more to
    // converge (a loaded machine is slower), checking every second.
    tokio::time::sleep(a.heartbeat + Duration::from_secs(1)).await;
    let converge_by = Instant::now() + Duration::from_secs(60);
    let mut inv = invariants(&client, &names, &fleet.runtime).await?;
    while !inv.hold(a.nodes, a.instances) && Instant::now() < converge_by {
        tokio::time::sleep(Duration::from_secs(1)).await;
        inv = invariants(&client, &names, &fleet.runtime).await?;
    }
    let held = inv.hold(a.nodes, a.instances);
    report["invariants"] = serde_json::to_value(&inv)?;
    report["invariantsHold"] = held.into();
    for o in observers {
        o.abort();
    }
    for i in 0..a.nodes {
        fleet.stop(i).await;
    }
    hubs.kill_all().await;
    print_report(&report, &a.output)?;
    if a.check && !held {
        bail!("the invariants do not hold at the end of the run: {inv:?}");
    }
    Ok(())
}

/// Give `n` instances of the edges on the partitioned link a new spec, round robin;
/// the revision each changed edge must reach, by node.
async fn change_while_cut(
    client: &Client,
    fleet: &Fleet,
    n: usize,
) -> Result<HashMap<String, u64>> {
    let mut owed: HashMap<String, u64> = HashMap::new();
    if n == 0 {
        return Ok(owed);
    }
    let cut: std::collections::HashSet<&str> = fleet
        .edges
        .iter()
        .enumerate()
        .filter(|(i, _)| Fleet::link_of(*i) == 1)
        .map(|(_, e)| e.name.as_str())
        .collect();
    let list: serde_json::Value = client.get("/v1/instances").await?;
    let targets: Vec<(String, String)> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let node = i["status"]["node"].as_str()?;
            cut.contains(node).then(|| {
                (
                    i["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    node.to_string(),
                )
            })
        })
        .collect();
    if targets.is_empty() {
        bail!("--partition-changes: no instance runs on the partitioned edges (give --instances)");
    }
    for k in 0..n {
        let (name, node) = &targets[k % targets.len()];
        let mut body = instance_body(name);
        body["spec"]["process"]["command"] = serde_json::json!(["sleep", format!("{}", k + 2)]);
        let (code, v) = client.put(&format!("/v1/instances/{name}"), &body).await?;
        if code >= 300 {
            bail!("changing {name}: {v}");
        }
        let rev = v["metadata"]["revision"].as_u64().unwrap_or(0);
        let e = owed.entry(node.clone()).or_default();
        *e = (*e).max(rev);
    }
    Ok(owed)
}

/// Wait until every edge in `owed` has applied its revision; how long it took.
async fn converged(
    fleet: &Fleet,
    owed: &HashMap<String, u64>,
    limit: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let behind = fleet
            .edges
            .iter()
            .filter(|e| {
                owed.get(&e.name)
                    .is_some_and(|want| e.state.load_desired().map_or(true, |d| d.revision < *want))
            })
            .count();
        if behind == 0 {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!("{behind} edges had not applied the partition's changes after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a full re-list of `edges`' desired states would send (their instances,
/// encoded).
fn relist_bytes(edges: &[&SimEdge]) -> u64 {
    edges
        .iter()
        .filter_map(|e| e.state.load_desired().ok())
        .flat_map(|d| d.instances.into_values())
        .map(|i| serde_json::to_vec(&i).map_or(0, |b| b.len() as u64))
        .sum()
}

fn bytes(links: &[FaultProxy; 2]) -> (u64, u64) {
    let (a, b) = (links[0].bytes(), links[1].bytes());
    (a.0 + b.0, a.1 + b.1)
}

/// Wait `d`, printing the hub's memory and CPU every ten seconds.
/// The label each simulated edge carries with its own name: a cluster of one.
const SIM_CLUSTER_LABEL: &str = "sim-cluster";
/// The template scenario's template.
const SIM_TEMPLATE: &str = "sim-basic";

/// The template scenario's template, its service's greeting `greeting`: a canary
/// cluster, then a tenth, then the rest, each wave's gate passed as soon as its
/// instances run.
fn sim_template(greeting: &str, canary: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "ClusterTemplate",
        "metadata": {"name": SIM_TEMPLATE},
        "spec": {
            "services": [{"name": "svc", "template": {
                "form": "process",
                "process": {"command": ["/bin/true"], "env": {"GREETING": greeting}},
                "resources": {"cpu": "10m", "memory": "8Mi"}
            }}],
            "rollout": {
                "waves": [
                    {"name": "canary", "clusters": [canary]},
                    {"name": "tenth", "percent": 10},
                    {"name": "rest"}
                ],
                "maxUnavailable": 1000000,
                "healthyForSeconds": 0,
                "timeoutSeconds": 900
            }
        }
    })
}

/// How many of the template's service instances run `greeting`.
async fn template_running(client: &Client, greeting: &str) -> Result<usize> {
    let instances = list_all(client, "instances").await?;
    Ok(instances
        .iter()
        .filter(|i| i["metadata"]["labels"]["verge.io/cluster-template"] == SIM_TEMPLATE)
        .filter(|i| i["status"]["phase"] == "Running")
        .filter(|i| i["spec"]["process"]["env"]["GREETING"] == greeting)
        .count())
}

/// Wait until all `n` of the template's instances run `greeting`, saying how it goes.
async fn wait_template(client: &Client, greeting: &str, n: usize) -> Result<Duration> {
    let t = Instant::now();
    let mut said = Instant::now();
    loop {
        let running = template_running(client, greeting).await?;
        if running >= n {
            return Ok(t.elapsed());
        }
        if said.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "sim: {:.0}s: {running}/{n} clusters run {greeting}",
                t.elapsed().as_secs_f64()
            );
            said = Instant::now();
        }
        if t.elapsed() > Duration::from_secs(900) {
            bail!("{running} of {n} clusters ran {greeting} after 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Hub CPU (percent of a core) over `window`.
async fn hub_cpu_over(hubs: &Hubs, window: Duration) -> f64 {
    let (c0, t) = (hubs.cpu_seconds(), Instant::now());
    tick_for(window, hubs).await;
    (hubs.cpu_seconds() - c0) * 100.0 / t.elapsed().as_secs_f64().max(0.001)
}

/// The template scenario ([`Scenario::Template`]): the hub's CPU with the fleet
/// alone (the baseline, measured in this run), then every edge made a cluster
/// naming one template, its CPU and memory with them, and a change of the template
/// timed until every cluster runs it.
async fn template_rollout(
    client: &Client,
    hubs: &Hubs,
    fleet: &Fleet,
    window: Duration,
    report: &mut serde_json::Value,
) -> Result<()> {
    use futures_util::StreamExt;
    let n = fleet.edges.len();
    eprintln!(
        "sim: the baseline, the fleet alone, for {}s",
        window.as_secs()
    );
    let base = hub_cpu_over(hubs, window).await;
    let rss0 = hubs.rss_kib();
    let canary = format!("sim-c-{}", fleet.edges[0].name);
    client
        .put(
            &format!("/v1/clustertemplates/{SIM_TEMPLATE}"),
            &sim_template("v1", &canary),
        )
        .await?;
    let t = Instant::now();
    let made: Vec<Result<()>> = futures_util::stream::iter(fleet.edges.iter())
        .map(|e| async move {
            let name = format!("sim-c-{}", e.name);
            let body = serde_json::json!({
                "kind": "Cluster",
                "metadata": {"name": name},
                "spec": {"selector": {SIM_CLUSTER_LABEL: e.name}, "template": SIM_TEMPLATE}
            });
            client
                .put(&format!("/v1/clusters/{name}"), &body)
                .await
                .map(|_| ())
                .with_context(|| format!("making cluster {name}"))
        })
        .buffer_unordered(8)
        .collect()
        .await;
    made.into_iter().collect::<Result<Vec<()>>>()?;
    let created = t.elapsed();
    eprintln!("sim: {n} clusters made in {:.1}s", created.as_secs_f64());
    let first = wait_template(client, "v1", n).await?;
    eprintln!("sim: the template's service runs in every cluster");
    report["clusters"] = n.into();
    report["clustersCreatedSeconds"] = created.as_secs_f64().into();
    report["templateFirstDeploySeconds"] = (created + first).as_secs_f64().into();
    eprintln!("sim: with the clusters, for {}s", window.as_secs());
    let with = hub_cpu_over(hubs, window).await;
    report["hubCpuPercentFleetOnly"] = base.into();
    report["hubCpuPercentWithClusters"] = with.into();
    // A percent of a core is 10 ms of CPU each second.
    report["orchestratorCpuMsPerSecondPerCluster"] = ((with - base) * 10.0 / n as f64).into();
    report["hubKiBPerCluster"] = (hubs.rss_kib().saturating_sub(rss0) as f64 / n as f64).into();
    let t = Instant::now();
    client
        .put(
            &format!("/v1/clustertemplates/{SIM_TEMPLATE}"),
            &sim_template("v2", &canary),
        )
        .await?;
    let changed = wait_template(client, "v2", n).await?;
    let done = t.elapsed();
    let status: serde_json::Value = client
        .get(&format!("/v1/clustertemplates/{SIM_TEMPLATE}"))
        .await?;
    eprintln!(
        "sim: the template change reached all {n} clusters in {:.1}s",
        done.as_secs_f64()
    );
    report["templateChangeToAllClustersSeconds"] = changed.as_secs_f64().into();
    report["templateRollout"] = status["status"]["rollout"].clone();
    Ok(())
}

async fn tick_for(d: Duration, hubs: &Hubs) {
    let t = Instant::now();
    let mut cpu = hubs.cpu_seconds();
    while t.elapsed() < d {
        let step = Duration::from_secs(10).min(d.saturating_sub(t.elapsed()));
        tokio::time::sleep(step).await;
        let now = hubs.cpu_seconds();
        let connected = metric(&hubs.metrics().await, "verge_hub_edges_connected ");
        eprintln!(
            "sim: {:.0}s: hub {:.0} MiB, {:.0}% CPU, {connected} edges connected",
            t.elapsed().as_secs_f64(),
            hubs.rss_kib() as f64 / 1024.0,
            (now - cpu) * 100.0 / step.as_secs_f64().max(0.001),
        );
        cpu = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_difference_of_two_readings() {
        let before = vec![(0.1, 10.0), (1.0, 10.0), (f64::INFINITY, 10.0)];
        let after = vec![(0.1, 60.0), (1.0, 109.0), (f64::INFINITY, 110.0)];
        // 100 new observations: 50 under 0.1, 49 more under 1, one beyond.
        assert_eq!(histogram_quantile(&before, &after, 0.5), Some(0.1));
        assert_eq!(histogram_quantile(&before, &after, 0.99), Some(1.0));
        assert_eq!(
            histogram_quantile(&before, &after, 1.0),
            Some(f64::INFINITY)
        );
        assert_eq!(histogram_quantile(&after, &after, 0.5), None);
    }

    #[test]
    fn histogram_buckets_are_read_from_the_text_format() {
        let text = "# HELP x\nverge_hub_heartbeat_lag_seconds_bucket{le=\"0.5\"} 3\nverge_hub_heartbeat_lag_seconds_bucket{le=\"+Inf\"} 4\nverge_hub_heartbeat_lag_seconds_count 4\n";
        assert_eq!(
            buckets(text, "verge_hub_heartbeat_lag_seconds"),
            vec![(0.5, 3.0), (f64::INFINITY, 4.0)]
        );
        // Two replicas' metrics, one after the other: their counts add up.
        let two = format!("{text}{text}");
        assert_eq!(
            buckets(&two, "verge_hub_heartbeat_lag_seconds"),
            vec![(0.5, 6.0), (f64::INFINITY, 8.0)]
        );
        let refused = "verge_hub_connections_refused_total{reason=\"overloaded\"} 2\n";
        assert_eq!(
            refusals(&format!("{refused}{refused}")),
            serde_json::json!({"overloaded": 4})
        );
    }

    #[test]
    fn a_tenth_of_the_fleet_is_on_the_link_that_partitions() {
        let cut = (0..1000).filter(|i| Fleet::link_of(*i) == 1).count();
        assert_eq!(cut, 100);
    }
}
