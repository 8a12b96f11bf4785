//! `verge bench ...`: measurements an operator can rerun on their own hardware. Each
//! reports a baseline measured in the same run, because shared machines are noisy and
//! only ratios carry over.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use verge_store::{SqliteStore, StoreExt};

use crate::dev::{spawn_self, stop_child, wait_for_hub};

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Store write throughput (one writer and many), against raw SQLite inserts; with
    /// --etcd-members, also on a local etcd cluster it starts, against SQLite in the
    /// same run.
    Store {
        /// Writes per measurement.
        #[arg(long, default_value_t = 2000)]
        writes: usize,
        /// Concurrent writers for the group-commit measurement.
        #[arg(long, default_value_t = 64)]
        writers: usize,
        /// Also measure etcd: start a cluster of this many members on loopback
        /// (Debian's etcd-server; a build with --features etcd).
        #[arg(long)]
        etcd_members: Option<usize>,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// Hub replicas: three hubs on a local three-member etcd, the leader SIGKILLed:
    /// time to a new leader, to its first placement, and API latency meanwhile.
    Failover {
        /// Simulated edges spread over the replicas.
        #[arg(long, default_value_t = 50)]
        edges: usize,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// Scheduler: placements per second on one core at N nodes, and fragmentation after
    /// a churn trace, against first-fit and best-fit baselines.
    Sched {
        /// Nodes in the synthetic fleet.
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        /// Placements to time.
        #[arg(long, default_value_t = 5_000)]
        placements: usize,
        /// Nodes in the fragmentation trace.
        #[arg(long, default_value_t = 300)]
        trace_nodes: usize,
        /// Events in the fragmentation trace.
        #[arg(long, default_value_t = 6_000)]
        trace_steps: usize,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// Channel: idle bytes of an edge, and a fleet of simulated edges reconnecting
    /// after a hub restart (time, and bytes per edge against a full re-list).
    Channel {
        /// Simulated edges (in this process, fake runtime).
        #[arg(long, default_value_t = 200)]
        edges: usize,
        /// Instances per edge.
        #[arg(long, default_value_t = 2)]
        per_edge: usize,
        /// How long to measure the idle edge.
        #[arg(long, default_value_t = 60)]
        idle_seconds: u64,
        /// MiB sent through a port-forward (and directly) for throughput.
        #[arg(long, default_value_t = 64)]
        forward_mib: usize,
        /// Request/response round trips through a port-forward (and directly).
        #[arg(long, default_value_t = 2000)]
        forward_requests: usize,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// Port-forward against a direct connection, between real hosts: through the hub
    /// of `--config` to INSTANCE's node, where `verge bench serve` listens on DIRECT.
    Forward {
        /// An instance on the node that runs `verge bench serve`.
        instance: String,
        /// `HOST:PORT` of `verge bench serve`, as this host reaches it directly; the
        /// edge reaches the same port on its loopback.
        #[arg(long)]
        direct: std::net::SocketAddr,
        /// MiB for throughput.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Round trips for latency.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// The server side of `verge bench forward` (sink and echo on one port).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7480")]
        listen: std::net::SocketAddr,
    },
    /// Runtimes on this node, with the real drivers: container start to running
    /// (against runc alone), VM start to its serial marker, function instantiation and
    /// requests (against a native HTTP answer).
    Runtime {
        /// Starts per measurement.
        #[arg(long, default_value_t = 20)]
        starts: usize,
        /// The Wasm component for the function measurements.
        #[arg(long, default_value = GUEST_COMPONENT)]
        component: std::path::PathBuf,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// Load the hub's front door as strangers would: silent TCP connections, slow
    /// TLS request heads, and enrolment frames announcing 16 MiB over TLS and QUIC.
    /// Reports the hub's memory and descriptors per connection and whether the API
    /// answered meanwhile.
    Frontdoor {
        /// Silent TCP connections.
        #[arg(long, default_value_t = 2000)]
        silent: usize,
        /// Slow TLS request heads.
        #[arg(long, default_value_t = 500)]
        slow: usize,
        /// Oversized enrolment frames, on TLS and on QUIC each.
        #[arg(long, default_value_t = 200)]
        oversized: usize,
        /// Loopback source addresses to spread the connections over.
        #[arg(long, default_value_t = 32)]
        sources: u8,
        /// `text` or `json`.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// The web console in Chromium (over WebDriver): time to first render of the
    /// overview, node and instance lists, and of a filter, with a large fleet in the
    /// hub's store, against a small one in the same run.
    Console {
        /// Nodes in the hub's store.
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        /// Instances in the hub's store.
        #[arg(long, default_value_t = 100_000)]
        instances: usize,
        /// Page loads (and filters) per view; the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// An edge node rebooted while no hub is reachable: the time until its N workloads
    /// run again after the agent starts, against starting them directly.
    Reboot {
        /// Instances on the node.
        #[arg(long, default_value_t = 100)]
        instances: usize,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// The platform services' cost to a site: `verge lb` (memory, CPU per thousand
    /// connections, a connection through it against direct) and a local disk (make
    /// and mount, writes into it against a plain directory; needs root).
    Platform {
        /// Connections per round (two rounds each way).
        #[arg(long, default_value_t = 2000)]
        connections: usize,
        /// MiB written per round.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
    /// Idle memory (RSS) of a hub and an edge agent, against a `sleep` process.
    Idle {
        /// How long to let them idle before sampling.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Then deploy this many HTTP functions to the edge (through the hub, the
        /// component from the hub's artifact store), idle again and sample again: the
        /// agent's memory per idle deployed function. Needs a build with `function`.
        #[arg(long, default_value_t = 0)]
        functions: usize,
        /// The component to deploy.
        #[arg(long, default_value = GUEST_COMPONENT)]
        component: std::path::PathBuf,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
}

/// The component `guests/hello-fn` builds (what the function benchmarks deploy).
const GUEST_COMPONENT: &str = "guests/hello-fn/target/wasm32-wasip2/release/hello_fn.wasm";

/// Refuse a missing component, saying how to build one.
pub fn component_exists(component: &Path) -> Result<()> {
    if !component.exists() {
        bail!(
            "no component at {} (cargo build --release --target wasm32-wasip2 --manifest-path guests/hello-fn/Cargo.toml, or pass --component)",
            component.display()
        );
    }
    Ok(())
}

/// Run a benchmark. `config` is the CLI config (for benchmarks against a running hub).
pub fn run(cmd: BenchCommand, config: Option<std::path::PathBuf>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        BenchCommand::Store {
            writes,
            writers,
            etcd_members,
            output,
        } => rt.block_on(store(writes, writers, etcd_members, &output)),
        BenchCommand::Failover { edges, output } => {
            rt.block_on(crate::bench_ha::failover(edges, &output))
        }
        BenchCommand::Frontdoor {
            silent,
            slow,
            oversized,
            sources,
            output,
        } => rt.block_on(frontdoor(
            verge_testkit::frontdoor::Attack {
                silent_tcp: silent,
                slow_tls: slow,
                oversized_tls: oversized,
                oversized_quic: oversized,
                sources,
            },
            &output,
        )),
        BenchCommand::Console {
            nodes,
            instances,
            runs,
            output,
        } => rt.block_on(crate::bench_console::run(nodes, instances, runs, &output)),
        BenchCommand::Platform {
            connections,
            mib,
            output,
        } => rt.block_on(crate::bench_platform::run(connections, mib, &output)),
        BenchCommand::Reboot { instances, output } => {
            rt.block_on(crate::bench_reboot::run(instances, &output))
        }
        BenchCommand::Idle {
            seconds,
            functions,
            component,
            output,
        } => rt.block_on(idle(seconds, functions, &component, &output)),
        BenchCommand::Runtime {
            starts,
            component,
            output,
        } => {
            verge_tunnel::install_crypto_provider();
            rt.block_on(crate::bench_runtime::run(starts, &component, &output))
        }
        BenchCommand::Forward {
            instance,
            direct,
            mib,
            requests,
            output,
        } => rt.block_on(async {
            let client = Arc::new(crate::client::Client::from_flag(config)?);
            let report = forward_bench(client, &instance, direct, mib, requests).await?;
            print_report(&report, &output)
        }),
        BenchCommand::Serve { listen } => rt.block_on(async {
            let l = bench_server(listen).await?;
            println!("bench server listening on {}", l.local_addr()?);
            serve_bench(l).await;
            Ok(())
        }),
        BenchCommand::Channel {
            edges,
            per_edge,
            idle_seconds,
            forward_mib,
            forward_requests,
            output,
        } => rt.block_on(channel(
            ChannelBench {
                edges,
                idle_seconds,
                per_edge,
                forward_mib,
                forward_requests,
            },
            &output,
        )),
        BenchCommand::Sched {
            nodes,
            placements,
            trace_nodes,
            trace_steps,
            output,
        } => sched(nodes, placements, trace_nodes, trace_steps, &output),
    }
}

fn per_sec(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn raw_sqlite_baseline(path: &Path, n: usize) -> Result<Duration> {
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch("CREATE TABLE kv(key TEXT PRIMARY KEY, value BLOB)")?;
    let value = vec![7u8; 256];
    let t = Instant::now();
    for i in 0..n {
        conn.execute(
            "INSERT OR REPLACE INTO kv VALUES (?1, ?2)",
            rusqlite::params![format!("/bench/{i}"), value],
        )?;
    }
    Ok(t.elapsed())
}

/// Sequential CAS writes (each waits for its commit, as one API client would), then
/// `writers` concurrent writers: the two durations.
async fn time_writes(
    s: Arc<dyn verge_store::Store>,
    writes: usize,
    writers: usize,
) -> Result<(Duration, Duration)> {
    let value = vec![7u8; 256];
    let t = Instant::now();
    for i in 0..writes {
        s.put(&format!("/bench/seq/{i}"), value.clone(), Some(0))
            .await?;
    }
    let sequential = t.elapsed();
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let s = s.clone();
        let value = value.clone();
        let per = writes / writers;
        tasks.spawn(async move {
            for i in 0..per {
                s.put(&format!("/bench/par/{w}/{i}"), value.clone(), Some(0))
                    .await?;
            }
            Ok::<_, verge_store::StoreError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok((sequential, t.elapsed()))
}

async fn store(
    writes: usize,
    writers: usize,
    etcd_members: Option<usize>,
    output: &str,
) -> Result<()> {
    let dir = tempdir()?;
    let baseline = raw_sqlite_baseline(&dir.join("raw.db"), writes)?;
    let s: Arc<dyn verge_store::Store> = Arc::new(SqliteStore::open(dir.join("store.db"))?);
    let (sequential, concurrent) = time_writes(s.clone(), writes, writers).await?;
    let conc_writes = (writes / writers) * writers;
    let rev = s.revision().await?;
    let mut report = serde_json::json!({
        "bench": "store",
        "writes": writes,
        "writers": writers,
        "valueBytes": 256,
        "synchronous": "FULL",
        "baselineRawSqliteWritesPerSec": per_sec(writes, baseline),
        "sequentialCasWritesPerSec": per_sec(writes, sequential),
        "concurrentCasWritesPerSec": per_sec(conc_writes, concurrent),
        "sequentialVsBaseline": baseline.as_secs_f64() / sequential.as_secs_f64(),
        "concurrentVsBaseline": per_sec(conc_writes, concurrent) / per_sec(writes, baseline),
        "finalRevision": rev,
    });
    if let Some(members) = etcd_members {
        let cluster = verge_testkit::etcd::EtcdCluster::start(members);
        let etcd = open_etcd(&cluster.url()).await?;
        let (e_seq, e_conc) = time_writes(etcd, writes, writers).await?;
        report["etcdMembers"] = members.into();
        report["etcdSequentialCasWritesPerSec"] = per_sec(writes, e_seq).into();
        report["etcdConcurrentCasWritesPerSec"] = per_sec(conc_writes, e_conc).into();
        report["etcdSequentialVsSqlite"] = (sequential.as_secs_f64() / e_seq.as_secs_f64()).into();
        report["etcdConcurrentVsSqlite"] = (concurrent.as_secs_f64() / e_conc.as_secs_f64()).into();
    }
    let _ = std::fs::remove_dir_all(&dir);
    print_report(&report, output)
}

#[cfg(feature = "etcd")]
async fn open_etcd(url: &str) -> Result<Arc<dyn verge_store::Store>> {
    let config = verge_store_etcd::EtcdConfig::from_url(url)?;
    Ok(Arc::new(
        verge_store_etcd::EtcdStore::connect(&config).await?,
    ))
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(_url: &str) -> Result<Arc<dyn verge_store::Store>> {
    anyhow::bail!("this verge was built without etcd support; build it with --features etcd")
}

pub(crate) fn print_report(report: &serde_json::Value, output: &str) -> Result<()> {
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else if let Some(obj) = report.as_object() {
        for (k, v) in obj {
            match v.as_f64() {
                Some(f) if v.is_f64() => println!("{k:<32} {f:.2}"),
                _ => println!("{k:<32} {v}"),
            }
        }
    }
    Ok(())
}

pub(crate) fn tempdir() -> Result<std::path::PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!("verge-bench-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Resident set size of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn idle(seconds: u64, functions: usize, component: &Path, output: &str) -> Result<()> {
    if functions > 0 && !cfg!(feature = "function") {
        bail!("--functions needs a build with the function driver (--features function)");
    }
    if functions > 0 {
        component_exists(component)?;
    }
    let dir = tempdir()?;
    let (mut hub, client, url, token) = hub_with_token(&dir).await?;
    let mut edge_args: Vec<String> = vec![
        "edge".into(),
        "--hub".into(),
        url,
        "--name".into(),
        "bench-edge".into(),
        "--data-dir".into(),
        dir.join("edge").display().to_string(),
        "--join-token".into(),
        token,
    ];
    if functions > 0 {
        // Room in the node's account for every function's request.
        edge_args.extend(
            [
                "--function-listen",
                "127.0.0.1:0",
                "--cpu",
                "64",
                "--memory",
                "64Gi",
            ]
            .map(String::from),
        );
    }
    let mut edge = spawn_self(&edge_args, &dir.join("edge.log"))?;
    let mut baseline = tokio::process::Command::new("sleep")
        .arg("3600")
        .kill_on_drop(true)
        .spawn()
        .context("starting the `sleep` baseline")?;
    // Wait for the edge to be Ready, then idle.
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(v) = client
            .get::<serde_json::Value>("/v1/nodes/bench-edge")
            .await
            && v["status"]["phase"] == "Ready"
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        stop_child(&mut edge).await;
        stop_child(&mut hub).await;
        bail!("edge did not become Ready; see {}", dir.display());
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let pid = |c: &tokio::process::Child| c.id().unwrap_or(0);
    let hub_rss = rss_kib(pid(&hub)).unwrap_or(0);
    let edge_rss = rss_kib(pid(&edge)).unwrap_or(0);
    let base_rss = rss_kib(pid(&baseline)).unwrap_or(0);
    let with_functions = if functions > 0 {
        match deploy_functions(&client, component, functions).await {
            Ok(()) => {
                tokio::time::sleep(Duration::from_secs(seconds)).await;
                Some(rss_kib(pid(&edge)).unwrap_or(0))
            }
            Err(e) => {
                stop_child(&mut edge).await;
                stop_child(&mut hub).await;
                return Err(e.context(format!("see {}", dir.display())));
            }
        }
    } else {
        None
    };
    let binary = std::fs::metadata(std::env::current_exe()?)?.len();
    stop_child(&mut edge).await;
    stop_child(&mut hub).await;
    let _ = baseline.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    let report = serde_json::json!({
        "bench": "idle",
        "idleSeconds": seconds,
        "hubRssKiB": hub_rss,
        "edgeRssKiB": edge_rss,
        "baselineSleepRssKiB": base_rss,
        "edgeRssMiB": edge_rss as f64 / 1024.0,
        "hubRssMiB": hub_rss as f64 / 1024.0,
        "edgeTargetMiB": 10,
        "binaryBytes": binary,
    });
    let mut report = report;
    if let Some(after) = with_functions {
        report["deployedFunctions"] = functions.into();
        report["edgeRssKiBWithFunctions"] = after.into();
        report["edgeKiBPerIdleFunction"] =
            (after.saturating_sub(edge_rss) as f64 / functions as f64).into();
    }
    print_report(&report, output)
}

/// Upload `component` to the hub's artifact store, deploy `n` functions of it, and
/// wait until every one is Running.
async fn deploy_functions(
    client: &crate::client::Client,
    component: &Path,
    n: usize,
) -> Result<()> {
    let file = tokio::fs::File::open(component).await?;
    let info: verge_hub::artifacts::ArtifactInfo = client.put_file("/v1/artifacts", file).await?;
    for i in 0..n {
        let name = format!("fn-{i:04}");
        let body = serde_json::json!({
            "kind": "Instance",
            "metadata": {"name": name},
            "spec": {
                "form": "function",
                "function": {"component": info.digest},
                "resources": {"cpu": "10m", "memory": "16Mi"},
            },
        });
        client.put(&format!("/v1/instances/{name}"), &body).await?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let list: serde_json::Value = client.get("/v1/instances").await?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let running = items
            .iter()
            .filter(|i| i["status"]["phase"] == "Running")
            .count();
        if running >= n {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let failed = items.iter().find(|i| i["status"]["phase"] == "Failed");
            bail!(
                "only {running} of {n} functions Running after 10 minutes{}",
                failed.map_or(String::new(), |f| format!(
                    "; e.g. {}",
                    f["status"]["message"]
                ))
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Time `placements` placements (each reserved) of the requests `make` draws, with
/// `f`, on a fresh synthetic fleet.
fn time_placements(
    nodes: usize,
    placements: usize,
    mut make: impl FnMut(
        &mut verge_sched::Cluster,
        &mut verge_sched::trace::Rng,
    ) -> verge_sched::Request,
    f: impl Fn(&verge_sched::Cluster, &verge_sched::Request) -> Option<u32>,
) -> (f64, usize) {
    use verge_sched::trace::{Rng, synthetic_cluster};
    let mut c = synthetic_cluster(nodes, 1);
    let mut rng = Rng::new(2);
    let reqs: Vec<_> = (0..placements).map(|_| make(&mut c, &mut rng)).collect();
    let t = Instant::now();
    let mut placed = 0;
    for r in &reqs {
        if let Some(n) = f(&c, r) {
            c.reserve(n, &r.res, r.group);
            placed += 1;
        }
    }
    (per_sec(placements, t.elapsed()), placed)
}

fn sched(
    nodes: usize,
    placements: usize,
    trace_nodes: usize,
    trace_steps: usize,
    output: &str,
) -> Result<()> {
    use verge_sched::trace::{Strategy, best_fit, random_request, run_trace};
    let scanning = |c: &verge_sched::Cluster, r: &verge_sched::Request| {
        verge_sched::place_scanning(c, r, None).ok().map(|p| p.node)
    };
    let online = |c: &verge_sched::Cluster, r: &verge_sched::Request| {
        verge_sched::place(c, r, None).ok().map(|p| p.node)
    };
    let mixed = |regional| move |c: &mut _, rng: &mut _| random_request(c, rng, regional);
    // A burst of one shape with no group rules (an application's replicas, a
    // simulated fleet's instances): what the memo of the last scan serves.
    let one_shape = |_: &mut _, _: &mut _| verge_sched::Request {
        res: verge_sched::Res::cpu_mem(250, 256 << 20),
        ..Default::default()
    };
    // Everything on this thread: the numbers are for one core.
    let (global, placed_global) = time_placements(nodes, placements, mixed(false), scanning);
    let (regional, _) = time_placements(nodes, placements, mixed(true), scanning);
    let (baseline, _) =
        time_placements(nodes, placements, mixed(false), |c, r| best_fit(c, &r.res));
    let (burst_scanning, _) = time_placements(nodes, placements, one_shape, scanning);
    let (burst, placed_burst) = time_placements(nodes, placements, one_shape, online);
    let (mixed_online, _) = time_placements(nodes, placements, mixed(false), online);
    let traces: Vec<_> = [
        Strategy::FirstFit,
        Strategy::BestFit,
        Strategy::Online,
        Strategy::OnlineOffline,
    ]
    .into_iter()
    .map(|s| run_trace(s, trace_nodes, trace_steps, 7))
    .collect();
    let frag = |s: Strategy| {
        traces
            .iter()
            .find(|t| t.strategy == s)
            .map_or(0.0, |t| t.fragmentation)
    };
    let report = serde_json::json!({
        "bench": "sched",
        "nodes": nodes,
        "placements": placements,
        "placedGlobal": placed_global,
        "globalPlacementsPerSec": global,
        "globalNote": "no region named: every node evaluated for every placement",
        "regionalPlacementsPerSec": regional,
        "regionalNote": "a region named (with overflow): the region's nodes evaluated",
        "baselineBestFitPlacementsPerSec": baseline,
        "globalVsBestFit": global / baseline,
        "globalWithMemoPlacementsPerSec": mixed_online,
        "globalWithMemoNote": "the same requests through place(): a request like the last global one is answered from that scan's best nodes (rarely here: shapes and groups vary)",
        "burstPlacementsPerSec": burst,
        "placedBurst": placed_burst,
        "burstScanningPlacementsPerSec": burst_scanning,
        "burstNote": "one shape, no group rules, placed one after another: from the memo of the last scan vs every node evaluated each time (same answers)",
        "burstVsScanning": burst / burst_scanning,
        "traceNodes": trace_nodes,
        "traceSteps": trace_steps,
        "fragFirstFit": frag(Strategy::FirstFit),
        "fragBestFit": frag(Strategy::BestFit),
        "fragOnline": frag(Strategy::Online),
        "fragOnlineOffline": frag(Strategy::OnlineOffline),
        "offlineCutVsOnline": 1.0 - frag(Strategy::OnlineOffline) / frag(Strategy::Online).max(f64::MIN_POSITIVE),
        "migrations": traces.iter().map(|t| t.migrations).sum::<usize>(),
    });
    print_report(&report, output)
}

/// Start a hub child process on `port` in `dir`; returns it and a client.
pub(crate) async fn start_hub(
    dir: &Path,
    port: u16,
    extra: &[&str],
) -> Result<(tokio::process::Child, crate::client::Client)> {
    let log = dir.join("hub.log");
    let mut args: Vec<String> = vec![
        "hub".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        dir.join("hub").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut hub = spawn_self(&args, &log)?;
    // A stale admin.conf from a previous start must not be mistaken for readiness.
    let client = wait_for_hub(&dir.join("hub").join("admin.conf"), &mut hub, &log).await?;
    Ok((hub, client))
}

/// [`start_hub`] on any free port, with its URL and a one-use join token.
pub(crate) async fn hub_with_token(
    dir: &Path,
) -> Result<(tokio::process::Child, crate::client::Client, String, String)> {
    let (hub, client) = start_hub(dir, 0, &[]).await?;
    let url = verge_hub::ClientConfig::load(&dir.join("hub").join("admin.conf"))?.server;
    let token: serde_json::Value = client
        .post("/v1/tokens", &serde_json::json!({"uses": 1}))
        .await?;
    let token = token["token"].as_str().unwrap_or_default().to_string();
    Ok((hub, client, url, token))
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Run `n` edge agents in this process (fake runtime: they stand in for edges at
/// scale), all dialing `url`. Returns a sender that stops them.
pub(crate) fn spawn_edges(
    prefix: &str,
    n: usize,
    hubs: &[String],
    token: &str,
    dir: &Path,
) -> tokio::sync::watch::Sender<bool> {
    let (stop, _) = tokio::sync::watch::channel(false);
    for i in 0..n {
        let config = verge_edge::EdgeConfig {
            hubs: hubs.to_vec(),
            // Several endpoints are replicas of one hub: spread over them.
            spread_hubs: hubs.len() > 1,
            join_token: Some(token.to_string()),
            name: format!("{prefix}-{i:05}"),
            data_dir: dir.join(format!("{prefix}-{i:05}")),
            labels: [("region".to_string(), format!("region-{}", i % 10))]
                .into_iter()
                .collect(),
            metrics_listen: None,
            stop_workloads_on_exit: false,
            capacity: verge_edge::CapacityConfig {
                cpu: Some(verge_api::Cpu(4000)),
                memory: Some(verge_api::Bytes(8 << 30)),
                ..Default::default()
            },
            plain_http_registries: Vec::new(),
            log_limits: Default::default(),
            cache_budget: u64::MAX,
            peer_listen: None,
            peer_advertise: None,
            telemetry: Default::default(),
        };
        let mut rx = stop.subscribe();
        tokio::spawn(async move {
            let runtime = std::sync::Arc::new(verge_runtime::fake::FakeRuntime::default());
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = verge_edge::run(config, runtime, shutdown, |_| {}).await {
                tracing::warn!(error = %e, "simulated edge stopped");
            }
        });
    }
    stop
}

async fn connected_edges(client: &crate::client::Client) -> u64 {
    client
        .get_text("/metrics")
        .await
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("verge_hub_edges_connected "))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn wait_connected(
    client: &crate::client::Client,
    n: u64,
    limit: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    while connected_edges(client).await < n {
        if t.elapsed() > limit {
            bail!(
                "only {} of {n} edges connected after {}s",
                connected_edges(client).await,
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(t.elapsed())
}

/// Parameters of `verge bench channel`.
pub struct ChannelBench {
    /// Simulated edges in the fleet.
    pub edges: usize,
    /// Seconds to measure the idle edge.
    pub idle_seconds: u64,
    /// Instances per edge.
    pub per_edge: usize,
    /// MiB for the throughput measurement.
    pub forward_mib: usize,
    /// Round trips for the latency measurement.
    pub forward_requests: usize,
}

/// The bench server's listener.
async fn bench_server(listen: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))
}

/// The bench server: the client's first byte picks the mode. `S`: a sink that answers
/// the byte count once the client half-closes; `E`: an echo.
async fn serve_bench(l: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut s, _)) = l.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            let sink = mode[0] == b'S';
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if sink => total += n as u64,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if sink {
                let _ = s.write_all(&total.to_be_bytes()).await;
            }
        });
    }
}

/// Send `mib` MiB to a sink at `addr`; the time until it confirms them all.
async fn throughput(addr: std::net::SocketAddr, mib: usize) -> Result<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"S").await?;
    let chunk = vec![0x5au8; 64 << 10];
    let t = Instant::now();
    for _ in 0..mib * 16 {
        s.write_all(&chunk).await?;
    }
    s.shutdown().await?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.context("sink confirmation")?;
    let got = u64::from_be_bytes(n);
    if got != (mib as u64) << 20 {
        bail!("sink received {got} bytes of {}", (mib as u64) << 20);
    }
    Ok(t.elapsed())
}

/// `n` round trips of 64 bytes on one connection to an echo at `addr`, sorted.
async fn round_trips(addr: std::net::SocketAddr, n: usize) -> Result<Vec<Duration>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"E").await?;
    let (req, mut resp) = ([7u8; 64], [0u8; 64]);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Port-forward against direct loopback TCP, in the same run: throughput and
/// request latency. The forwarded path is the operator's: a local listener (as
/// `verge port-forward`), the hub, the edge's channel, the edge, the server.
///
/// `direct` is a bench server (`verge bench serve`) on the instance's node, which the
/// edge reaches at `127.0.0.1:<its port>`.
async fn forward_bench(
    client: Arc<crate::client::Client>,
    instance: &str,
    direct: std::net::SocketAddr,
    mib: usize,
    requests: usize,
) -> Result<serde_json::Value> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let inst = instance.to_string();
    tokio::spawn(async move {
        let r = crate::remote::port_forward(client, &inst, "127.0.0.1", (0, direct.port()), |a| {
            let _ = tx.send(a);
        })
        .await;
        if let Err(e) = r {
            eprintln!("bench channel: port-forward failed: {e:#}");
        }
    });
    let forwarded = rx.await.context("port-forward listener")?;
    // Warm up both paths (TLS sessions, QUIC streams, page cache), then measure.
    round_trips(direct, 50).await?;
    round_trips(forwarded, 50).await?;
    let direct_t = throughput(direct, mib).await?;
    let forward_t = throughput(forwarded, mib).await?;
    let direct_rt = round_trips(direct, requests).await?;
    let forward_rt = round_trips(forwarded, requests).await?;
    let mut connects = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        round_trips(forwarded, 1).await?;
        connects.push(t.elapsed());
    }
    connects.sort();
    let mibps = |d: Duration| mib as f64 / d.as_secs_f64();
    Ok(serde_json::json!({
        "forwardMiB": mib,
        "directThroughputMiBps": mibps(direct_t),
        "forwardThroughputMiBps": mibps(forward_t),
        "forwardThroughputRatio": mibps(forward_t) / mibps(direct_t),
        "requests": requests,
        "directLatencyP50Us": percentile(&direct_rt, 0.5),
        "directLatencyP99Us": percentile(&direct_rt, 0.99),
        "forwardLatencyP50Us": percentile(&forward_rt, 0.5),
        "forwardLatencyP99Us": percentile(&forward_rt, 0.99),
        "forwardNewConnectionP50Us": percentile(&connects, 0.5),
    }))
}

/// `verge bench channel`: idle traffic of one edge, port-forward against direct TCP,
/// and a fleet reconnecting after a hub restart, measured through the test kit's
/// counting proxy.
pub async fn channel(b: ChannelBench, output: &str) -> Result<()> {
    use verge_testkit::FaultProxy;
    let ChannelBench {
        edges,
        idle_seconds,
        per_edge,
        forward_mib,
        forward_requests,
    } = b;
    let dir = tempdir()?;
    let port = free_port()?;
    let (mut hub, client) = start_hub(&dir, port, &["--admit-rate", "500"]).await?;
    let proxy = FaultProxy::start(format!("127.0.0.1:{port}").parse()?).await?;
    let token: serde_json::Value = client
        .post("/v1/tokens", &serde_json::json!({"uses": 0}))
        .await?;
    let token = token["token"].as_str().unwrap_or_default().to_string();

    eprintln!("bench channel: hub up on port {port}; measuring one idle edge for {idle_seconds}s");
    // 1. One idle edge: bytes per minute in each direction.
    let one = spawn_edges("idle", 1, &[proxy.url()], &token, &dir.join("idle"));
    wait_connected(&client, 1, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (u0, d0) = proxy.bytes();
    tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
    let (u1, d1) = proxy.bytes();
    let per_min = |b: u64| b as f64 * 60.0 / idle_seconds as f64;
    let idle_up = per_min(u1 - u0);
    let idle_down = per_min(d1 - d0);

    eprintln!(
        "bench channel: port-forward ({forward_mib} MiB, {forward_requests} round trips) against direct TCP"
    );
    let target = "kind: Instance\nmetadata: {name: forward-target}\nspec: {form: process, process: {command: [sleep, '1']}, resources: {cpu: 100m, memory: 16Mi}}\n";
    for mm in verge_api::parse_manifests(target).map_err(|e| anyhow::anyhow!("{e}"))? {
        crate::cli::apply_one(&client, &mm).await?;
    }
    let t = Instant::now();
    loop {
        let v: serde_json::Value = client.get("/v1/instances/forward-target").await?;
        if v["status"]["phase"] == "Running" {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the port-forward target did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = Arc::new(client);
    let server = bench_server(([127, 0, 0, 1], 0).into()).await?;
    let direct = server.local_addr()?;
    tokio::spawn(serve_bench(server));
    let mut forward = forward_bench(
        client.clone(),
        "forward-target",
        direct,
        forward_mib,
        forward_requests,
    )
    .await?;
    let node: serde_json::Value = client.get("/v1/nodes/idle-00000").await?;
    forward["transport"] = node["status"]["transport"].clone();
    client.delete("/v1/instances/forward-target").await?;
    let _ = one.send(true);
    // Take the idle edge out so the fleet's work does not land on a stopped agent.
    client.delete("/v1/nodes/idle-00000").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    eprintln!("bench channel: connecting {edges} simulated edges");
    // 2. A fleet: connect, give each edge work, restart the hub, time the resync.
    let hub_pid = hub.id().unwrap_or(0);
    let (rss_before, fds_before) = (
        verge_testkit::frontdoor::rss_kib(hub_pid),
        verge_testkit::frontdoor::open_fds(hub_pid),
    );
    let fleet = spawn_edges("sim", edges, &[proxy.url()], &token, &dir.join("fleet"));
    let first_connect = wait_connected(&client, edges as u64, Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_connected_edge = (
        verge_testkit::frontdoor::rss_kib(hub_pid).saturating_sub(rss_before) as f64
            / edges.max(1) as f64,
        verge_testkit::frontdoor::open_fds(hub_pid).saturating_sub(fds_before) as f64
            / edges.max(1) as f64,
    );
    let total = edges * per_edge;
    for k in 0..total {
        let m = format!(
            "kind: Instance\nmetadata: {{name: w-{k:06}}}\nspec: {{form: process, process: {{command: [sleep, '1']}}, resources: {{cpu: 100m, memory: 16Mi}}}}\n"
        );
        for mm in verge_api::parse_manifests(&m).map_err(|e| anyhow::anyhow!("{e}"))? {
            crate::cli::apply_one(&client, &mm).await?;
        }
    }
    // Wait until every instance is running on its (simulated) node.
    let t = Instant::now();
    loop {
        let v: serde_json::Value = client.get("/v1/instances").await?;
        let running = v["items"].as_array().map_or(0, |a| {
            a.iter()
                .filter(|i| i["status"]["phase"] == "Running")
                .count()
        });
        if running >= total {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("only {running} of {total} instances running");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let full_relist: usize = {
        let v: serde_json::Value = client.get("/v1/instances").await?;
        serde_json::to_vec(&v["items"])?.len()
    };
    eprintln!("bench channel: {total} instances running; restarting the hub");
    // Restart the hub (a crash: SIGKILL), same port and state.
    hub.kill().await?;
    let _ = hub.wait().await;
    let (b_up, b_down) = proxy.bytes();
    let restart = Instant::now();
    let (mut hub, client) = start_hub(&dir, port, &["--admit-rate", "500"]).await?;
    let resync = wait_connected(&client, edges as u64, Duration::from_secs(600)).await?;
    let all_back = restart.elapsed();
    // Let sessions settle (status resends, acks), then count what crossed the link.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a_up, a_down) = proxy.bytes();
    let per_edge_bytes = ((a_up - b_up) + (a_down - b_down)) as f64 / edges as f64;
    let relist_per_edge = full_relist as f64 / edges as f64;
    let _ = fleet.send(true);
    hub.kill().await?;
    let _ = std::fs::remove_dir_all(&dir);
    let report = serde_json::json!({
        "bench": "channel",
        "idleSeconds": idle_seconds,
        "idleEdgeBytesPerMinuteUp": idle_up,
        "idleEdgeBytesPerMinuteDown": idle_down,
        "idleEdgeKbitPerSecond": (idle_up + idle_down) * 8.0 / 60.0 / 1000.0,
        "kubeEdgeIdleKbitPerSecond": 0.25,
        "edges": edges,
        "instancesPerEdge": per_edge,
        "firstConnectSeconds": first_connect.as_secs_f64(),
        "hubKiBPerConnectedEdge": per_connected_edge.0,
        "hubFdsPerConnectedEdge": per_connected_edge.1,
        "hubRestartToAllConnectedSeconds": all_back.as_secs_f64(),
        "resyncAfterHubReadySeconds": resync.as_secs_f64(),
        "reconnectBytesPerEdge": per_edge_bytes,
        "fullRelistBytesPerEdge": relist_per_edge,
        "admitRatePerSecond": 500,
        "portForward": forward,
    });
    print_report(&report, output)
}

/// `verge bench frontdoor`: a hub under a stranger's load (the test kit's front-door
/// attack), measured from `/proc`, with the operator's API probed meanwhile.
async fn frontdoor(attack: verge_testkit::frontdoor::Attack, output: &str) -> Result<()> {
    verge_tunnel::install_crypto_provider();
    let dir = tempdir()?;
    let port = free_port()?;
    let (mut hub, client) = start_hub(&dir, port, &[]).await?;
    let pid = hub.id().unwrap_or(0);
    let ca = std::fs::read_to_string(dir.join("hub").join("ca.crt"))?;
    let target = verge_testkit::frontdoor::Target {
        addr: format!("127.0.0.1:{port}").parse()?,
        ca_fingerprint: verge_tunnel::pki::pem_fingerprint(&ca)?,
        pid,
        probe: || async { client.get::<serde_json::Value>("/v1/nodes").await.is_ok() },
    };
    eprintln!("bench frontdoor: hub up on port {port}, pid {pid}; {attack:?}");
    let phases = verge_testkit::frontdoor::run(&target, &attack).await;
    let descriptor_limit = verge_testkit::frontdoor::open_file_limit(pid);
    stop_child(&mut hub).await;
    let report = serde_json::json!({
        "hubDescriptorLimit": descriptor_limit,
        "phases": phases.iter().map(|p| {
            let mut v = serde_json::to_value(p).unwrap_or_default();
            v["kibPerConnection"] = serde_json::json!(p.kib_per_connection());
            v
        }).collect::<Vec<_>>(),
    });
    print_report(&report, output)
}
