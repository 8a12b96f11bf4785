//! `verge dev`: a hub and three edges on this machine, on the embedded store, with the
//! samples from `examples/` applied. Each runs as its own process of this binary (the
//! same code paths as production), with its own data dir under `--data-dir`. Ctrl-C
//! stops everything; running it again picks up the same state.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
use verge_api::manifest::Manifest;
use verge_api::{Node, NodePhase, parse_manifests};
use verge_hub::ClientConfig;

use crate::cli;
use crate::client::Client;

/// Print a line; a closed stdout (`verge dev | head`) must not crash `verge dev`, which
/// would leave its hub and edges behind, so write errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The samples applied by `verge dev` (the same files as `examples/`).
pub const SAMPLES: &[(&str, &str)] = &[
    (
        "regions.yaml",
        include_str!("../../../examples/regions.yaml"),
    ),
    (
        "spread-web.yaml",
        include_str!("../../../examples/spread-web.yaml"),
    ),
    (
        "gang-pair.yaml",
        include_str!("../../../examples/gang-pair.yaml"),
    ),
    (
        "hello-process.yaml",
        include_str!("../../../examples/hello-process.yaml"),
    ),
    (
        "near-edge-ticker.yaml",
        include_str!("../../../examples/near-edge-ticker.yaml"),
    ),
    (
        "one-shot-job.yaml",
        include_str!("../../../examples/one-shot-job.yaml"),
    ),
    (
        "clusters.yaml",
        include_str!("../../../examples/clusters.yaml"),
    ),
    (
        "cluster-template.yaml",
        include_str!("../../../examples/cluster-template.yaml"),
    ),
    (
        "application.yaml",
        include_str!("../../../examples/application.yaml"),
    ),
];

/// The simulated sites of the dev edges: name and labels.
const EDGES: &[(&str, &[(&str, &str)])] = &[
    (
        "edge-1",
        &[
            ("region", "eu-west"),
            ("city", "paris"),
            ("isp", "orange"),
            ("tier", "near"),
        ],
    ),
    (
        "edge-2",
        &[
            ("region", "eu-west"),
            ("city", "lyon"),
            ("isp", "free"),
            ("tier", "onsite"),
        ],
    ),
    (
        "edge-3",
        &[
            ("region", "ap-south"),
            ("city", "mumbai"),
            ("isp", "jio"),
            ("tier", "cloud"),
        ],
    ),
];

/// Arguments of `verge dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the hub and edges keep their state (default /var/lib/verge/dev as root,
    /// where workloads running as `nobody` can reach their work directories; else
    /// ~/.verge/dev).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Hub address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: String,
    /// Do not apply the samples.
    #[arg(long)]
    pub no_samples: bool,
    /// Start, print the summary, then stop (for scripts and tests).
    #[arg(long)]
    pub exit_after_start: bool,
}

/// A command the hubs this binary starts run under (`VERGE_BENCH_HUB_UNDER`, words
/// split at spaces: `heaptrack -o /tmp/hub` or `perf record -g -o /tmp/hub.perf --`),
/// to profile the hub of `verge sim`, `verge bench` or `verge dev`. A report's hub CPU
/// and memory are then the tool's process, not the hub's.
const HUB_UNDER: &str = "VERGE_BENCH_HUB_UNDER";

/// Spawn this binary with `args`, output appended to `log` (a hub under the command
/// in `VERGE_BENCH_HUB_UNDER`, if set).
pub fn spawn_self(args: &[String], log: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("finding the verge binary")?;
    let under: Vec<String> = match std::env::var(HUB_UNDER) {
        Ok(c) if args.first().is_some_and(|a| a == "hub") => {
            c.split_whitespace().map(String::from).collect()
        }
        _ => Vec::new(),
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut command = match under.split_first() {
        Some((tool, tool_args)) => {
            let mut c = Command::new(tool);
            // The hub would otherwise restart itself to choose its allocator, leaving
            // the tool watching a process that is gone; and a heap profiler sees
            // only the system's allocator.
            c.args(tool_args)
                .arg(exe)
                .env(verge_alloc::ENV, "system")
                .env("MALLOC_ARENA_MAX", "2");
            c
        }
        None => Command::new(exe),
    };
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Ctrl-C in the terminal reaches only `verge dev`, which stops children in order.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("starting a verge process")?;
    Ok(child)
}

/// SIGKILL a child [`spawn_self`] started, with everything in its process group (a
/// hub run under `VERGE_BENCH_HUB_UNDER` is the tool's child), and wait for it.
pub async fn kill_group(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill().await;
}

/// Send SIGTERM and wait (up to 15 s, then SIGKILL).
pub async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Wait until the hub whose admin config is at `conf` answers.
pub async fn wait_for_hub(conf: &Path, child: &mut Child, log: &Path) -> Result<Client> {
    for _ in 0..300 {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the hub exited ({status}); see {}:\n{}",
                log.display(),
                tail_file(log)
            );
        }
        if let Ok(cfg) = ClientConfig::load(conf)
            && let Ok(client) = Client::new(&cfg)
            && client.get_text("/healthz").await.is_ok()
        {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the hub did not come up within 30s; see {}", log.display())
}

fn tail_file(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from)
}

/// Install `conf` as the CLI's default config unless the user has one for another hub.
fn install_cli_config(conf: &Path) -> Result<Option<PathBuf>> {
    let target = home().join(".verge").join("config");
    let new = ClientConfig::load(conf)?;
    if let Ok(existing) = ClientConfig::load(&target)
        && existing.ca_cert != new.ca_cert
    {
        return Ok(None);
    }
    std::fs::create_dir_all(target.parent().unwrap_or(Path::new(".")))?;
    new.save(&target)?;
    Ok(Some(target))
}

/// Run the all-in-one.
pub async fn run(args: DevArgs) -> Result<()> {
    let dir = args.data_dir.clone().unwrap_or_else(|| {
        if nix::unistd::geteuid().is_root() {
            PathBuf::from("/var/lib/verge/dev")
        } else {
            home().join(".verge").join("dev")
        }
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let hub_dir = dir.join("hub");
    let hub_log = dir.join("hub.log");
    say!("verge dev: state in {}", dir.display());
    let mut hub = spawn_self(
        &[
            "hub".into(),
            "--listen".into(),
            args.listen.clone(),
            "--data-dir".into(),
            hub_dir.display().to_string(),
        ],
        &hub_log,
    )?;
    let conf = hub_dir.join("admin.conf");
    let client = match wait_for_hub(&conf, &mut hub, &hub_log).await {
        Ok(c) => c,
        Err(e) => {
            stop_child(&mut hub).await;
            return Err(e);
        }
    };
    let url = ClientConfig::load(&conf)?.server;
    let mut edges = Vec::new();
    let result = start_edges(&args, &dir, &url, &client, &mut edges).await;
    if let Err(e) = result {
        for e in edges.iter_mut() {
            stop_child(e).await;
        }
        stop_child(&mut hub).await;
        return Err(e);
    }
    let installed = install_cli_config(&conf)?;
    if !args.no_samples {
        for (file, text) in SAMPLES {
            for m in parse_manifests(text).map_err(|e| anyhow::anyhow!("{file}: {e}"))? {
                let what = cli::apply_one(&client, &m).await?;
                let (Manifest::Instance(_) | Manifest::Application(_)) = &m else {
                    continue;
                };
                say!(
                    "  applied examples/{file}: {}/{} {what}",
                    m.kind().to_lowercase(),
                    m.name()
                );
            }
        }
        // Give the samples a moment to start so the summary shows them running.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    say!("\n{}", cli::table_of(&client, "nodes").await?);
    say!("{}", cli::table_of(&client, "instances").await?);
    let cfg_hint = match &installed {
        Some(p) => format!("(CLI config written to {})", p.display()),
        None => format!("export VERGE_CONFIG={}", conf.display()),
    };
    say!(
        "\nVerge is running: hub at {url}, 3 edges. {cfg_hint}\n\
         Console: {url}/console (sign in with the token in {}; the hub's certificate is \
         signed by its own CA, {})\n\
         Try:\n  verge get nodes -o wide\n  verge get instances\n  verge logs hello\n  \
         verge top nodes\n  verge get events -w\n  \
         verge apply -f examples/\n  verge describe node edge-1\n  \
         verge get applications\n  \
         verge apply -f examples/rollout/shop-v2.yaml && verge rollout status shop -w\n  \
         verge get inventory\n  verge sched report\n\
         Logs of the processes: {}/*.log. Press Ctrl-C to stop everything.",
        conf.display(),
        conf.with_file_name("ca.crt").display(),
        dir.display()
    );
    if !args.exit_after_start {
        tokio::select! {
            _ = crate::shutdown_signal() => say!("\nstopping..."),
            s = hub.wait() => say!("\nthe hub exited ({s:?}); stopping the edges; see {}", hub_log.display()),
        }
    }
    for e in edges.iter_mut() {
        stop_child(e).await;
    }
    stop_child(&mut hub).await;
    say!("stopped. Run `verge dev` again to pick up where you left off.");
    Ok(())
}

async fn start_edges(
    args: &DevArgs,
    dir: &Path,
    url: &str,
    client: &Client,
    edges: &mut Vec<Child>,
) -> Result<()> {
    let _ = args;
    for (name, labels) in EDGES {
        let edge_dir = dir.join(name);
        let mut argv: Vec<String> = vec![
            "edge".into(),
            "--hub".into(),
            url.into(),
            "--name".into(),
            name.to_string(),
            "--data-dir".into(),
            edge_dir.display().to_string(),
            "--stop-workloads-on-exit".into(),
        ];
        for (k, v) in *labels {
            argv.push("--label".into());
            argv.push(format!("{k}={v}"));
        }
        if !edge_dir.join("identity").join("node.crt").exists() {
            let t: serde_json::Value = client
                .post(
                    "/v1/tokens",
                    &serde_json::json!({"uses": 1, "description": format!("verge dev {name}")}),
                )
                .await?;
            argv.push("--join-token".into());
            argv.push(t["token"].as_str().unwrap_or_default().to_string());
        }
        edges.push(spawn_self(&argv, &dir.join(format!("{name}.log")))?);
    }
    // Wait until every dev node reports Ready.
    for _ in 0..300 {
        for (i, e) in edges.iter_mut().enumerate() {
            if let Ok(Some(status)) = e.try_wait() {
                let log = dir.join(format!("{}.log", EDGES[i].0));
                bail!(
                    "edge {} exited ({status}); see {}:\n{}",
                    EDGES[i].0,
                    log.display(),
                    tail_file(&log)
                );
            }
        }
        #[derive(serde::Deserialize)]
        struct L {
            items: Vec<Node>,
        }
        if let Ok(l) = client.get::<L>("/v1/nodes").await {
            let ready = l
                .items
                .iter()
                .filter(|n| {
                    n.status.phase == NodePhase::Ready && EDGES.iter().any(|(e, _)| *e == n.name())
                })
                .count();
            if ready == EDGES.len() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the dev edges did not become Ready within 30s; see {}/edge-*.log",
        dir.display()
    )
}
