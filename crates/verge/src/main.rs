//! `verge`: one binary for the hub, the edge agent and the operator CLI.
//!
//! This file only parses arguments and dispatches; the hub lives in `verge-hub`, the
//! agent in `verge-edge`, and the CLI commands in [`cli`].

mod artifact;
mod bench;
mod bench_console;
mod bench_ha;
mod bench_platform;
mod bench_reboot;
mod bench_runtime;
mod cli;
mod client;
mod dev;
mod lb;
mod observe;
mod remote;
mod rollout;
mod sim;
mod store_arg;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use verge_api::{Bytes, Cpu};

#[derive(Parser)]
#[command(
    name = "verge",
    version,
    about = "Verge: run thousands of edge sites as one cloud"
)]
struct Args {
    /// CLI config (hub URL, CA, token). Default: $VERGE_CONFIG, then ~/.verge/config.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start and matched at once: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the control plane.
    Hub {
        /// Address to listen on (REST API and edge channel share it).
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Where the hub keeps its CA, store and configs.
        #[arg(long, default_value = "/var/lib/verge/hub")]
        data_dir: PathBuf,
        /// Extra DNS name or IP for the hub certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Mark a node NotReady after this long without a heartbeat.
        #[arg(long, default_value = "40s", value_parser = parse_duration)]
        node_grace: Duration,
        /// How often edges send heartbeats (an edge gives up on a hub endpoint after two
        /// silent intervals plus a second, and fails over).
        #[arg(long, default_value = "4s", value_parser = parse_duration)]
        heartbeat: Duration,
        /// Edge sessions admitted per second, so reconnect storms stay bounded.
        #[arg(long, default_value_t = 200.0)]
        admit_rate: f64,
        /// New QUIC handshakes begun per second; beyond it edges wait their turn (at
        /// most 2 s), then are turned away before the handshake (they come again
        /// spread over the time their fleet takes at this pace).
        #[arg(long, default_value_t = 400.0)]
        handshake_rate: f64,
        /// While the hub lags more than this behind its own work (a moving average of
        /// its runtime's lateness), or its QUIC socket is behind (a quarter of its
        /// buffer unread, or datagrams dropped), new QUIC connections are refused
        /// before their handshake, API writes with 503 and Retry-After, and new
        /// placements wait, which keeps the sessions it has up (0s: never refuse).
        #[arg(long, default_value = "200ms", value_parser = parse_duration)]
        shed_lag: Duration,
        /// How long edges' metrics are kept in the hub's memory (Prometheus, scraping
        /// /v1/metrics/federate, keeps the long history).
        #[arg(long, default_value = "2h", value_parser = parse_duration)]
        metrics_retention: Duration,
        /// How long events are kept.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        event_retention: Duration,
        /// Lifetime of node certificates (edges renew after two thirds of it).
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        node_cert_ttl: Duration,
        #[command(flatten)]
        store: store_arg::StoreArgs,
        /// The URL other hub replicas reach this one at (default: from --listen).
        #[arg(long)]
        advertise: Option<String>,
        /// How long a replica's lease lives unrenewed: a dead leader is replaced about
        /// this long after it died.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        lease_ttl: Duration,
        /// Begin a new history epoch on a shared store (after restoring etcd from a
        /// backup, so that edges take a snapshot instead of resuming).
        #[arg(long)]
        new_epoch: bool,
        /// Serve one region for a centre: this hub keeps the region's slice on its own
        /// store, schedules and watches the region's nodes, and keeps working while
        /// the centre is out of reach (needs --upstream).
        #[arg(long, requires = "upstreams")]
        region: Option<String>,
        /// The centre's URL (repeatable: endpoints tried in turn).
        #[arg(long = "upstream", requires = "region")]
        upstreams: Vec<String>,
        /// A region join token from the centre (`verge token create --region NAME`),
        /// for the first start.
        #[arg(
            long,
            env = "VERGE_JOIN_TOKEN",
            hide_env_values = true,
            requires = "region"
        )]
        join_token: Option<String>,
    },
    /// Run the edge agent.
    Edge {
        /// Hub endpoint URL; repeat for failover across data centres (tried in order).
        #[arg(long = "hub", required = true)]
        hubs: Vec<String>,
        /// The --hub endpoints are replicas of one hub (on one etcd): start at one
        /// picked by this node's name, so that a fleet given the same list spreads
        /// over them (without it, the first is preferred and the others are standbys).
        #[arg(long)]
        spread_hubs: bool,
        /// Join token (first start only; printed by `verge token create`). Prefer
        /// --join-token-file or $VERGE_JOIN_TOKEN: a flag is visible to every local
        /// user in `ps`.
        #[arg(long, env = "VERGE_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
        /// Read the join token from this file (e.g. one only root may read).
        #[arg(long, conflicts_with = "join_token")]
        join_token_file: Option<PathBuf>,
        /// Node name.
        #[arg(long)]
        name: String,
        /// Where the agent keeps its identity, cache and instance files.
        #[arg(long, default_value = "/var/lib/verge/edge")]
        data_dir: PathBuf,
        /// Node label KEY=VALUE, e.g. region=eu-west, tier=near (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Serve /metrics here (e.g. 127.0.0.1:9100).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Stop workloads when the agent exits (default: leave them running).
        #[arg(long)]
        stop_workloads_on_exit: bool,
        /// Report this much CPU instead of the machine's (e.g. 2 or 1500m).
        #[arg(long, value_parser = |s: &str| Cpu::parse(s))]
        cpu: Option<Cpu>,
        /// Report this much memory instead of the machine's (e.g. 4Gi).
        #[arg(long, value_parser = |s: &str| Bytes::parse(s))]
        memory: Option<Bytes>,
        /// Rotate a workload's log while it runs once it is larger than this.
        #[arg(long, default_value = "10Mi", value_parser = |s: &str| Bytes::parse(s))]
        log_max_size: Bytes,
        /// How many rotated logs to keep per workload.
        #[arg(long, default_value_t = 3)]
        log_keep: usize,
        /// Disk the artifact cache (components, VM images, container images) may use;
        /// what the node's instances need is kept beyond it.
        #[arg(long, default_value = "10Gi", value_parser = |s: &str| Bytes::parse(s))]
        cache_budget: Bytes,
        /// Probe this node's site peers (nodes with the same `site` label) and answer
        /// their probes on this UDP address, so that the hub can tell this node down
        /// from only cut off (e.g. 10.0.0.5:7947). Off by default.
        #[arg(long)]
        peer_listen: Option<SocketAddr>,
        /// The address peers probe, when --peer-listen is every address (0.0.0.0:PORT).
        #[arg(long, requires = "peer_listen")]
        peer_advertise: Option<String>,
        /// Sample the node's and its instances' metrics this often and ship them to
        /// the hub (0s: off).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        metrics_interval: Duration,
        /// Disk the metrics buffer may use while the hub is out of reach; past it the
        /// oldest samples go (and are counted).
        #[arg(long, default_value = "64Mi", value_parser = |s: &str| Bytes::parse(s))]
        metrics_buffer: Bytes,
        /// Most bytes a second of buffered metrics sent when the hub is back.
        #[arg(long, default_value = "64Ki", value_parser = |s: &str| Bytes::parse(s))]
        metrics_rate: Bytes,
        /// GPUs on this node, MODEL=COUNT (repeatable), e.g. nvidia-t4=2.
        #[arg(long = "gpu", value_parser = parse_count)]
        gpus: Vec<(String, u32)>,
        /// Accelerators (ASICs) on this node, NAME=COUNT (repeatable).
        #[arg(long = "asic", value_parser = parse_count)]
        asics: Vec<(String, u32)>,
        /// Uplink bandwidth this node sells, in Mbit/s.
        #[arg(long, default_value_t = 0)]
        bandwidth_mbps: u64,
        /// Public addresses this node can hand out.
        #[arg(long, default_value_t = 0)]
        addresses: u64,
        /// An OCI registry (HOST:PORT) to pull images from over plain HTTP instead of
        /// HTTPS, e.g. one on loopback or on the site's own network (repeatable).
        #[arg(long = "plain-http-registry")]
        plain_http_registries: Vec<String>,
        /// Serve `form: function` instances over HTTP here (e.g. 127.0.0.1:8088; port 0
        /// picks one): `http://ADDR/<instance>/<path>`. Without it the node runs no
        /// functions.
        #[arg(long)]
        function_listen: Option<SocketAddr>,
    },
    /// All in one: a hub and three edges on this machine, with the samples applied.
    Dev(dev::DevArgs),
    /// List objects.
    Get {
        /// nodes | instances | regions | events | inventory | audit | replicas | conflicts
        kind: String,
        /// One object.
        name: Option<String>,
        /// With `events`: only those about KIND/NAME (e.g. instances/web-1).
        #[arg(long = "for")]
        for_: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::Output,
        /// After listing, print changes as they happen.
        #[arg(short, long)]
        watch: bool,
    },
    /// The latest metrics of nodes or instances: CPU, memory, disk, load.
    Top {
        /// nodes | instances
        kind: String,
        #[command(flatten)]
        narrow: observe::Narrow,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::Output,
    },
    /// The recent series of one metric (e.g. verge_node_memory_used_bytes).
    Metrics {
        /// The metric's name.
        metric: String,
        /// Only this instance's series.
        #[arg(long)]
        instance: Option<String>,
        /// How far back (90s, 15m, 2h).
        #[arg(long, default_value = "1h")]
        since: String,
        #[command(flatten)]
        narrow: observe::Narrow,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::Output,
    },
    /// Show one object in full.
    Describe {
        /// node | instance
        kind: String,
        /// Name.
        name: String,
    },
    /// Create or update objects from a manifest file, a directory, or - for stdin.
    Apply {
        /// File, directory or -.
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Change nothing: check the manifests, and show what an application's
        /// change would do, wave by wave.
        #[arg(long)]
        dry_run: bool,
    },
    /// An application's rollout: status (with --watch, until it ends), pause, resume,
    /// undo (back to the revision before).
    Rollout {
        /// status | pause | resume | undo
        action: String,
        /// The application (NAME or application/NAME), or a cluster template
        /// (clustertemplate/NAME).
        name: String,
        /// With status: follow it until it completes (exit 0) or fails (exit 1).
        #[arg(short, long)]
        watch: bool,
    },
    /// Delete an object.
    Delete {
        /// node | instance
        kind: String,
        /// Name.
        name: String,
    },
    /// Print an instance's output (stdout and stderr).
    Logs {
        /// Instance name.
        instance: String,
        /// Only the last N bytes.
        #[arg(long)]
        tail: Option<u64>,
        /// Keep printing what the instance writes (Ctrl-C to stop).
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in an instance, through the edge's channel.
    ///
    /// `verge exec -it web-1 -- sh` gives an interactive shell with a terminal (window
    /// size changes follow); `verge exec web-1 -- cat /etc/hostname` runs one command.
    /// Exits with the command's exit code.
    Exec {
        /// Send standard input to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Give the command a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        /// Instance name.
        instance: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Forward a local port to a port of an instance, through the edge's channel.
    ///
    /// `verge port-forward web-1 8080:80` listens on 127.0.0.1:8080; each connection
    /// reaches port 80 of the instance on its node. Runs until interrupted.
    PortForward {
        /// Instance name.
        instance: String,
        /// `LOCAL:REMOTE` ports (or one port for both; LOCAL 0 picks a free one).
        ports: String,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        address: String,
    },
    /// The scheduling centre's offline side: fragmentation and defragmentation.
    Sched {
        #[command(subcommand)]
        command: SchedCommand,
    },
    /// Manage join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Put files (Wasm components, VM kernels, initrds, disk images) where nodes fetch
    /// them: the hub's artifact store (named by digest) or an OCI registry.
    Artifact {
        #[command(subcommand)]
        command: ArtifactCommand,
    },
    /// Measure Verge on this machine.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Run a fleet of simulated edges (the real agent on a fake runtime, in this
    /// process) against a hub it starts, and report what the hub holds.
    Sim(sim::SimArgs),
    /// The site-local TCP load balancer (a platform service a cluster template runs:
    /// command `[verge, lb]`), in front of an application's instances at its site.
    Lb(lb::LbArgs),
}

#[derive(Subcommand)]
enum SchedCommand {
    /// Fragmentation now and after a defragmentation plan, and capacity by region.
    Report {
        /// Migrations the plan may use.
        #[arg(long, default_value_t = 10)]
        max_moves: usize,
        /// Migrations per application (disruption budget).
        #[arg(long, default_value_t = 2)]
        max_moves_per_group: usize,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::Output,
    },
    /// Plan a defragmentation and carry it out (migrations are restarts on other nodes).
    Defrag {
        /// Migrations the plan may use.
        #[arg(long, default_value_t = 10)]
        max_moves: usize,
        /// Migrations per application (disruption budget).
        #[arg(long, default_value_t = 2)]
        max_moves_per_group: usize,
        /// Without this, only show the plan.
        #[arg(long)]
        apply: bool,
    },
}

#[derive(Subcommand)]
enum ArtifactCommand {
    /// Upload a file to the hub's artifact store and print its digest (sha256:...), which
    /// manifests then name; or, with --to, publish it to an OCI registry.
    Push {
        /// The file.
        file: PathBuf,
        /// Publish to this OCI reference instead (e.g. registry.example:5000/fns/hello:1).
        #[arg(long)]
        to: Option<String>,
        /// Speak plain HTTP to the registry of --to (a registry on loopback or a trusted
        /// network).
        #[arg(long)]
        plain_http: bool,
    },
    /// List the hub's artifacts.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::Output,
    },
    /// Delete an artifact from the hub's store (nodes keep their copies).
    Rm {
        /// Its digest.
        digest: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a join token for edges.
    Create {
        /// How many edges may enrol with it (0 = unlimited until it expires).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Lifetime, e.g. 24h (0 = never expires).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Bind the token to one node name; it may then re-enrol that node if it exists
        /// (the way back for a node whose certificate expired while it was offline).
        #[arg(long, conflicts_with = "region")]
        node: Option<String>,
        /// Make it a token for a region hub of this region (`verge hub --region NAME
        /// --upstream URL --join-token ...`); the Region object must exist.
        #[arg(long)]
        region: Option<String>,
    },
}

/// Parse `100ms`, `40s`, `5m`, `24h`, `7d` (or bare seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration; use e.g. 500ms, 40s, 5m, 24h"))?;
    let scale = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "'{s}': unknown unit '{unit}'; use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("'{s}' is too long a duration"))
}

fn parse_count(s: &str) -> Result<(String, u32), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not NAME=COUNT (e.g. nvidia-t4=2)"))?;
    let n = v
        .parse()
        .map_err(|_| format!("'{s}': count '{v}' is not a whole number"))?;
    Ok((k.to_string(), n))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE (e.g. region=eu-west)"))?;
    Ok((k.to_string(), v.to_string()))
}

/// Restart this process (the same pid, by `exec`) with the allocator a process that
/// holds a fleet wants ([`verge_alloc`]): mimalloc, which commits its memory as it is
/// used (`MIMALLOC_ARENA_EAGER_COMMIT=0`, `MIMALLOC_EAGER_COMMIT=0`: held per thread
/// otherwise) and gives free pages back at once (`MIMALLOC_PURGE_DELAY=0`: otherwise
/// a burst's memory, such as 32 stalled watches' buffers, stayed resident after it
/// was freed, 260 MiB of it). Allocators read their settings when a process starts,
/// hence the restart. `MALLOC_ARENA_MAX=2` goes along for glibc's allocator, which
/// the operator may choose instead (`VERGE_ALLOCATOR=system`): by default it grows up
/// to eight arenas per core, and a hub keeps each arena's fragments (two held 56 KiB
/// per connected edge instead of 70: BENCHMARKS, fleet simulator). Nothing happens
/// when the operator set `VERGE_ALLOCATOR` already, and if the restart fails this goes
/// on as it is.
fn restart_with_fleet_allocator() {
    if !cfg!(all(target_os = "linux", target_env = "gnu"))
        || std::env::var_os(verge_alloc::ENV).is_some()
    {
        return;
    }
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(verge_alloc::ENV, "mimalloc");
    for (name, value) in [
        ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
        ("MIMALLOC_EAGER_COMMIT", "0"),
        ("MIMALLOC_PURGE_DELAY", "0"),
        ("MALLOC_ARENA_MAX", "2"),
    ] {
        if std::env::var_os(name).is_none() {
            command.env(name, value);
        }
    }
    let err = command.exec();
    eprintln!("note: could not restart with the fleet's allocator ({err}); going on");
}

fn init_tracing(default: &str) {
    // `RUST_LOG` as `level` or `target=level,...` (no regexes: they would cost the edge
    // agent memory for a feature it does not need).
    use std::str::FromStr;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::filter::Targets::from_str(&v).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::from_str(default)
                .unwrap_or_else(|_| tracing_subscriber::filter::Targets::new())
        });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[global_allocator]
static ALLOCATOR: verge_alloc::Chosen = verge_alloc::Chosen;

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, one line, no backtrace: errors here are for operators.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    // The container shim stays small: it starts before the command line parser (whose
    // code it would otherwise page in) and runs no async runtime.
    #[cfg(feature = "container")]
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "container-shim")
    {
        std::process::exit(verge_container::shim::main(
            std::env::args().skip(2).collect(),
        ));
    }
    let args = Args::parse();
    if matches!(args.command, Command::Hub { .. } | Command::Sim(_)) {
        restart_with_fleet_allocator();
    }
    match args.command {
        Command::Hub {
            listen,
            data_dir,
            sans,
            node_grace,
            heartbeat,
            admit_rate,
            handshake_rate,
            shed_lag,
            metrics_retention,
            event_retention,
            node_cert_ttl,
            store,
            advertise,
            lease_ttl,
            new_epoch,
            region,
            upstreams,
            join_token,
        } => {
            init_tracing("info");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let link = match &region {
                    Some(r) => Some(
                        verge_hub::region::prepare(&data_dir, r, &upstreams, join_token.as_deref())
                            .await?,
                    ),
                    None => None,
                };
                let mut config = verge_hub::HubConfig::new(listen, data_dir);
                config.region = link;
                config.extra_sans = sans;
                config.node_grace = node_grace;
                config.heartbeat_interval = heartbeat;
                config.admit_rate = admit_rate;
                config.handshake_rate = handshake_rate;
                config.shed_lag = shed_lag;
                config.metrics_retention = metrics_retention;
                config.event_retention = event_retention;
                config.node_cert_ttl = node_cert_ttl;
                config.advertise = advertise;
                config.lease_ttl = lease_ttl;
                config.new_epoch = new_epoch;
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}; is another hub running? pick another --listen"))?;
                // One machine-readable line for scripts and tests.
                let ready = |info: &verge_hub::HubInfo| {
                    println!("hub ready url={} admin_conf={} join_token_file={}", info.url, info.admin_conf.display(), info.join_token_file.display());
                };
                match store.open().await? {
                    None => verge_hub::run(config, listener, shutdown_signal(), ready).await?,
                    Some(shared) => {
                        config.shared_store = true;
                        verge_hub::run_with_store(config, shared, listener, shutdown_signal(), ready).await?
                    }
                }
                Ok(())
            })
        }
        Command::Edge {
            hubs,
            spread_hubs,
            join_token,
            name,
            data_dir,
            labels,
            metrics_listen,
            stop_workloads_on_exit,
            cpu,
            memory,
            gpus,
            asics,
            bandwidth_mbps,
            addresses,
            plain_http_registries,
            function_listen,
            join_token_file,
            log_max_size,
            log_keep,
            cache_budget,
            peer_listen,
            peer_advertise,
            metrics_interval,
            metrics_buffer,
            metrics_rate,
        } => {
            init_tracing("info");
            let join_token = match join_token_file {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("--join-token-file {}", p.display()))?
                        .trim()
                        .to_string(),
                ),
                None => join_token,
            };
            if !verge_api::validate::is_dns_label(&name) {
                bail!(
                    "--name '{name}': node names are 1-63 lowercase letters, digits or '-' (e.g. edge-paris-1)"
                );
            }
            // One thread: the agent is mostly idle, and every thread costs memory.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Before the drivers: the image client needs the crypto provider.
            verge_tunnel::install_crypto_provider();
            let runtime = Arc::new(node_drivers(
                &data_dir,
                plain_http_registries.clone(),
                function_listen,
            )?);
            rt.block_on(async {
                let config = verge_edge::EdgeConfig {
                    hubs,
                    spread_hubs,
                    join_token,
                    name,
                    data_dir,
                    labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                    metrics_listen,
                    stop_workloads_on_exit,
                    capacity: verge_edge::CapacityConfig {
                        cpu,
                        memory,
                        gpus: gpus.into_iter().collect(),
                        asics: asics.into_iter().collect(),
                        bandwidth_mbps,
                        addresses,
                    },
                    plain_http_registries,
                    log_limits: verge_runtime::process::LogLimits {
                        max_bytes: log_max_size.0,
                        keep: log_keep,
                    },
                    cache_budget: cache_budget.0,
                    peer_listen,
                    peer_advertise,
                    telemetry: verge_edge::telemetry::TelemetryConfig {
                        interval: metrics_interval,
                        buffer_bytes: metrics_buffer.0,
                        rate: metrics_rate.0,
                    },
                };
                verge_edge::run(config, runtime, shutdown_signal(), |m| {
                    println!(
                        "edge ready metrics={}",
                        m.map_or("off".into(), |a| a.to_string())
                    );
                })
                .await?;
                Ok(())
            })
        }
        Command::Dev(d) => {
            init_tracing("warn");
            cli_runtime()?.block_on(dev::run(d))
        }
        Command::Bench { command } => {
            init_tracing("warn");
            bench::run(command, args.config)
        }
        Command::Sim(a) => {
            init_tracing("error");
            // One thread, as `verge edge` runs: the fleet's agents wake each other
            // within it instead of across threads (a worker parking and waking for
            // every packet cost a fifth of the simulator), and the hub beside it
            // keeps the other core.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(sim::run(a))
        }
        Command::Lb(a) => {
            init_tracing("warn");
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(lb::run(a))
        }
        Command::Artifact {
            command:
                ArtifactCommand::Push {
                    file,
                    to: Some(reference),
                    plain_http,
                },
        } => {
            init_tracing("warn");
            // The registry's HOST:PORT is what precedes the first '/'.
            let registry = reference.split('/').next().unwrap_or_default().to_string();
            let plain = if plain_http {
                vec![registry]
            } else {
                Vec::new()
            };
            cli_runtime()?.block_on(artifact::push_to_registry(&file, &reference, plain))
        }
        other => {
            init_tracing("warn");
            cli_runtime()?.block_on(run_cli(args.config, other))
        }
    }
}

/// The drivers this build runs instances with, one per form.
#[allow(unused_variables)]
fn node_drivers(
    data_dir: &std::path::Path,
    plain_http: Vec<String>,
    function_listen: Option<SocketAddr>,
) -> Result<verge_runtime::Drivers> {
    let drivers = verge_runtime::Drivers::default().with(
        verge_api::Form::Process,
        Arc::new(verge_runtime::process::ProcessRuntime),
    );
    #[cfg(feature = "vm")]
    let drivers = drivers.with(verge_api::Form::Vm, Arc::new(verge_vm::VmRuntime::detect()));
    #[cfg(feature = "container")]
    let drivers = drivers.with(
        verge_api::Form::Container,
        Arc::new(verge_container::ContainerRuntime::new(
            data_dir,
            plain_http,
            std::env::current_exe().context("finding the verge executable (the container shim)")?,
        )),
    );
    #[cfg(feature = "function")]
    let drivers = match function_listen {
        Some(addr) => drivers.with(verge_api::Form::Function, function_gateway(addr)?),
        None => drivers,
    };
    Ok(drivers)
}

/// The function driver and its HTTP gateway, on threads of their own: a busy function
/// must never delay the agent's heartbeats.
#[cfg(feature = "function")]
fn function_gateway(addr: SocketAddr) -> Result<Arc<dyn verge_runtime::Runtime>> {
    let functions = verge_function::FunctionRuntime::new(1000)?;
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("--function-listen {addr}"))?;
    listener.set_nonblocking(true)?;
    tracing::info!("function gateway listening on {}", listener.local_addr()?);
    let gateway = functions.clone();
    std::thread::Builder::new()
        .name("verge-functions".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("verge-fn")
                .enable_all()
                .build();
            match rt {
                Ok(rt) => rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => gateway.serve(l).await,
                        Err(e) => tracing::error!(error = %e, "function gateway"),
                    }
                }),
                Err(e) => tracing::error!(error = %e, "function gateway runtime"),
            }
        })?;
    Ok(functions)
}

fn cli_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn run_cli(config: Option<PathBuf>, command: Command) -> Result<()> {
    let client = client::Client::from_flag(config)?;
    match command {
        Command::Get {
            kind,
            name,
            output,
            watch,
            for_,
        } => {
            if matches!(kind.as_str(), "events" | "event" | "ev") {
                return observe::events(&client, for_.as_deref(), watch, output).await;
            }
            if for_.is_some() {
                bail!("--for goes with `verge get events` only");
            }
            cli::get(&client, &kind, name.as_deref(), output).await?;
            if watch {
                cli::watch(&client, &kind, output).await?;
            }
            Ok(())
        }
        Command::Top {
            kind,
            narrow,
            output,
        } => observe::top(&client, &kind, &narrow, output).await,
        Command::Metrics {
            metric,
            instance,
            since,
            narrow,
            output,
        } => {
            observe::metrics(
                &client,
                &metric,
                instance.as_deref(),
                &since,
                &narrow,
                output,
            )
            .await
        }
        Command::Describe { kind, name } => cli::describe(&client, &kind, &name).await,
        Command::Apply { file, dry_run } => cli::apply(&client, &file, dry_run).await,
        Command::Rollout {
            action,
            name,
            watch,
        } => match action.as_str() {
            "status" => rollout::status(&client, &name, watch).await,
            other => rollout::act(&client, &name, other).await,
        },
        Command::Delete { kind, name } => cli::delete(&client, &kind, &name).await,
        Command::Logs {
            instance,
            tail,
            follow,
        } => cli::logs(&client, &instance, tail, follow).await,
        Command::Exec {
            stdin,
            tty,
            instance,
            command,
        } => {
            // Exit here, with the command's code: returning would drop the runtime,
            // which waits for the blocking read of standard input forever.
            let code = match remote::exec(&client, &instance, &command, stdin, tty).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    255
                }
            };
            std::process::exit(code)
        }
        Command::PortForward {
            instance,
            ports,
            address,
        } => {
            let (local, remote_port) = remote::parse_local_remote(&ports)?;
            remote::port_forward(
                Arc::new(client),
                &instance,
                &address,
                (local, remote_port),
                |a| println!("forwarding {a} -> {instance}:{remote_port}"),
            )
            .await
        }
        Command::Artifact { command } => match command {
            ArtifactCommand::Push { file, .. } => {
                artifact::push_to_hub(&client, &file).await.map(drop)
            }
            ArtifactCommand::List { output } => artifact::list(&client, output).await,
            ArtifactCommand::Rm { digest } => {
                client.delete(&format!("/v1/artifacts/{digest}")).await?;
                println!("artifact {digest} deleted");
                Ok(())
            }
        },
        Command::Token {
            command:
                TokenCommand::Create {
                    uses,
                    ttl,
                    description,
                    node,
                    region,
                },
        } => {
            cli::token_create(
                &client,
                uses,
                Some(ttl.as_secs()),
                &description,
                node.as_deref(),
                region.as_deref(),
            )
            .await
        }
        Command::Sched {
            command:
                SchedCommand::Report {
                    max_moves,
                    max_moves_per_group,
                    output,
                },
        } => cli::sched_plan(&client, max_moves, max_moves_per_group, false, output).await,
        Command::Sched {
            command:
                SchedCommand::Defrag {
                    max_moves,
                    max_moves_per_group,
                    apply,
                },
        } => {
            cli::sched_plan(
                &client,
                max_moves,
                max_moves_per_group,
                apply,
                cli::Output::Table,
            )
            .await
        }
        Command::Hub { .. }
        | Command::Edge { .. }
        | Command::Dev(_)
        | Command::Bench { .. }
        | Command::Sim(_)
        | Command::Lb(_) => {
            unreachable!("dispatched in main")
        }
    }
}
