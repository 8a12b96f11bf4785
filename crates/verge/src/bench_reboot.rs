//! `verge bench reboot`: an edge node rebooted while no hub is reachable. A hub and an
//! agent (real processes, the process driver) run N instances; then the hub is killed,
//! and the agent and every workload are killed as a power cut would; the agent is
//! started again with its hub still gone, and the time until all N workloads run again
//! is measured. Baseline in the same run: this process starting the same N workloads
//! itself.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::dev::{spawn_self, stop_child};

/// Processes whose command line carries `marker`.
fn carrying(marker: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

fn kill_all(marker: &str) {
    for pid in carrying(marker) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Wait until `n` processes carry `marker`; how long it took from `since`.
async fn until_running(
    marker: &str,
    n: usize,
    since: Instant,
    limit: Duration,
) -> Result<Duration> {
    loop {
        if carrying(marker).len() >= n {
            return Ok(since.elapsed());
        }
        if since.elapsed() > limit {
            bail!(
                "only {} of {n} workloads ran after {limit:?}",
                carrying(marker).len()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn workload(marker: &str, i: usize) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "while :; do sleep 1; done".into(),
        format!("{marker}-{i}"),
    ]
}

/// Run the benchmark.
pub async fn run(instances: usize, output: &str) -> Result<()> {
    let dir = crate::bench::tempdir()?;
    let marker = format!("vgreboot{}", std::process::id());
    let r = measure(&dir, &marker, instances).await;
    kill_all(&marker);
    let (recovery, baseline) = r?;
    let ratio = recovery.as_secs_f64() / baseline.as_secs_f64().max(1e-6);
    if output == "json" {
        println!(
            "{}",
            serde_json::json!({
                "instances": instances,
                "recoveryMs": recovery.as_millis() as u64,
                "baselineMs": baseline.as_millis() as u64,
                "ratio": ratio,
            })
        );
    } else {
        println!(
            "offline reboot: {instances} instances back in {recovery:.2?} after the agent started (no hub reachable)"
        );
        println!(
            "baseline:       {instances} of the same processes started by this process in {baseline:.2?}"
        );
        println!("ratio:          {ratio:.1}x");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn measure(dir: &Path, marker: &str, n: usize) -> Result<(Duration, Duration)> {
    let (mut hub, client, url, token) = crate::bench::hub_with_token(dir).await?;
    let edge_args: Vec<String> = [
        "edge",
        "--hub",
        &url,
        "--name",
        "reboot-edge",
        "--data-dir",
        &dir.join("edge").display().to_string(),
        "--cpu",
        "64",
        "--memory",
        "64Gi",
    ]
    .map(String::from)
    .to_vec();
    let mut first = edge_args.clone();
    first.extend(["--join-token".into(), token]);
    let edge_log = dir.join("edge.log");
    let mut edge = spawn_self(&first, &edge_log)?;
    for i in 0..n {
        let body = serde_json::json!({
            "kind": "Instance",
            "metadata": {"name": format!("w{i}")},
            "spec": {
                "form": "process",
                "process": {"command": workload(marker, i)},
                "resources": {"cpu": "10m", "memory": "8Mi"},
                "terminationGracePeriodSeconds": 1,
            },
        });
        let (code, v) = client.put(&format!("/v1/instances/w{i}"), &body).await?;
        if code >= 300 {
            bail!("applying w{i}: {v}");
        }
    }
    until_running(marker, n, Instant::now(), Duration::from_secs(120))
        .await
        .with_context(|| format!("before the reboot; see {}", edge_log.display()))?;
    // Everything in the node goes down at once, and the hub is gone too.
    let _ = hub.kill().await;
    let _ = edge.kill().await;
    kill_all(marker);
    while !carrying(marker).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
        kill_all(marker);
    }
    let started = Instant::now();
    let mut edge = spawn_self(&edge_args, &edge_log)?;
    let recovery = until_running(marker, n, started, Duration::from_secs(120))
        .await
        .with_context(|| format!("after the reboot; see {}", edge_log.display()));
    stop_child(&mut edge).await;
    let recovery = recovery?;
    kill_all(marker);
    while !carrying(marker).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Baseline: the same processes started straight from here.
    let base_marker = format!("{marker}base");
    let started = Instant::now();
    let mut children = Vec::with_capacity(n);
    for i in 0..n {
        let argv = workload(&base_marker, i);
        children.push(
            tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .kill_on_drop(true)
                .spawn()
                .context("starting a baseline process")?,
        );
    }
    let baseline = until_running(&base_marker, n, started, Duration::from_secs(60)).await?;
    drop(children);
    kill_all(&base_marker);
    Ok((recovery, baseline))
}
