//! `verge bench ...`: measurements an operator can rerun on their own hardware. Each
//! reports a baseline measured in the same run, because shared machines are noisy and
//! only ratios carry over.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use verge_store::{SqliteStore, Store, StoreExt};

use crate::dev::{spawn_self, stop_child, wait_for_hub};

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Store write throughput (one writer and many), against raw SQLite inserts.
    Store {
        /// Writes per measurement.
        #[arg(long, default_value_t = 2000)]
        writes: usize,
        /// Concurrent writers for the group-commit measurement.
        #[arg(long, default_value_t = 64)]
        writers: usize,
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
    /// Idle memory (RSS) of a hub and an edge agent, against a `sleep` process.
    Idle {
        /// How long to let them idle before sampling.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// `json` for machines.
        #[arg(short, long, default_value = "text")]
        output: String,
    },
}

/// Run a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        BenchCommand::Store {
            writes,
            writers,
            output,
        } => rt.block_on(store(writes, writers, &output)),
        BenchCommand::Idle { seconds, output } => rt.block_on(idle(seconds, &output)),
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

async fn store(writes: usize, writers: usize, output: &str) -> Result<()> {
    let dir = tempdir()?;
    let baseline = raw_sqlite_baseline(&dir.join("raw.db"), writes)?;
    let s = SqliteStore::open(dir.join("store.db"))?;
    let value = vec![7u8; 256];
    // One writer, each write waits for its commit (as a single API client would).
    let t = Instant::now();
    for i in 0..writes {
        s.put(&format!("/bench/seq/{i}"), value.clone(), Some(0))
            .await?;
    }
    let sequential = t.elapsed();
    // Many writers: the writer thread commits them in groups.
    let s = Arc::new(s);
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
    let concurrent = t.elapsed();
    let conc_writes = (writes / writers) * writers;
    let rev = s.revision().await?;
    let _ = std::fs::remove_dir_all(&dir);
    let report = serde_json::json!({
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
    print_report(&report, output)
}

fn print_report(report: &serde_json::Value, output: &str) -> Result<()> {
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

fn tempdir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("verge-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Resident set size of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn idle(seconds: u64, output: &str) -> Result<()> {
    let dir = tempdir()?;
    let hub_log = dir.join("hub.log");
    let mut hub = spawn_self(
        &[
            "hub".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.join("hub").display().to_string(),
        ],
        &hub_log,
    )?;
    let conf = dir.join("hub").join("admin.conf");
    let client = wait_for_hub(&conf, &mut hub, &hub_log).await?;
    let url = verge_hub::ClientConfig::load(&conf)?.server;
    let token: serde_json::Value = client
        .post("/v1/tokens", &serde_json::json!({"uses": 1}))
        .await?;
    let mut edge = spawn_self(
        &[
            "edge".into(),
            "--hub".into(),
            url,
            "--name".into(),
            "bench-edge".into(),
            "--data-dir".into(),
            dir.join("edge").display().to_string(),
            "--join-token".into(),
            token["token"].as_str().unwrap_or_default().into(),
        ],
        &dir.join("edge.log"),
    )?;
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
    print_report(&report, output)
}

/// Time `placements` placements (each reserved) with `f` on a fresh synthetic fleet.
fn time_placements(
    nodes: usize,
    placements: usize,
    regional: bool,
    f: impl Fn(&verge_sched::Cluster, &verge_sched::Request) -> Option<u32>,
) -> (f64, usize) {
    use verge_sched::trace::{Rng, random_request, synthetic_cluster};
    let mut c = synthetic_cluster(nodes, 1);
    let mut rng = Rng::new(2);
    let reqs: Vec<_> = (0..placements)
        .map(|_| random_request(&mut c, &mut rng, regional))
        .collect();
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
    use verge_sched::trace::{Strategy, best_fit, run_trace};
    let online = |c: &verge_sched::Cluster, r: &verge_sched::Request| {
        verge_sched::place(c, r, None).ok().map(|p| p.node)
    };
    // Everything on this thread: the numbers are for one core.
    let (global, placed_global) = time_placements(nodes, placements, false, online);
    let (regional, _) = time_placements(nodes, placements, true, online);
    let (baseline, _) = time_placements(nodes, placements, false, |c, r| best_fit(c, &r.res));
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
