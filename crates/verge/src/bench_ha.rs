//! `verge bench failover`: hub replicas on a local three-member etcd cluster, with
//! simulated edges (in this process, fake runtime) spread over them. The leader is
//! SIGKILLed; measured: how long until another replica leads, how long until the new
//! leader places an instance created right after the kill (against the same with a
//! healthy leader, in the same run), and API latency on a surviving replica before
//! and during the failover.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::{free_port, print_report, spawn_edges, start_hub, tempdir};
use crate::client::Client;

/// Create a fake-runtime instance named `name` through `client`, and wait until it is
/// placed; how long that took.
async fn place(client: &Client, name: &str, limit: Duration) -> Result<Duration> {
    let body = serde_json::json!({
        "kind": "Instance",
        "metadata": {"name": name},
        "spec": {
            "form": "process",
            "process": {"command": ["/bin/sleep", "3600"]},
            "resources": {"cpu": "10m", "memory": "16Mi"},
        },
    });
    let t = Instant::now();
    // A replica may be busy answering its first request after the kill: retry.
    loop {
        match client.put(&format!("/v1/instances/{name}"), &body).await {
            Ok((c, _)) if c < 300 => break,
            _ if t.elapsed() < limit => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok((c, v)) => bail!("creating {name}: {c} {v}"),
            Err(e) => return Err(e),
        }
    }
    while t.elapsed() < limit {
        if let Ok(v) = client
            .get::<serde_json::Value>(&format!("/v1/instances/{name}"))
            .await
            && v["status"]["node"].is_string()
        {
            return Ok(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("{name} was not placed within {}s", limit.as_secs())
}

async fn leader(client: &Client) -> Option<String> {
    let v: serde_json::Value = client.get("/v1/replicas").await.ok()?;
    v["leader"].as_str().map(str::to_string)
}

fn percentile_ms(mut v: Vec<Duration>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

/// Run the failover benchmark with `edges` simulated edges.
pub async fn failover(edges: usize, output: &str) -> Result<()> {
    let cluster = verge_testkit::etcd::EtcdCluster::start(3);
    let dir = tempdir()?;
    let mut hubs = Vec::new();
    for i in 0..3 {
        let port = free_port()?;
        let advertise = format!("https://127.0.0.1:{port}");
        let url = cluster.url();
        let extra = [
            "--store",
            url.as_str(),
            "--advertise",
            advertise.as_str(),
            "--heartbeat",
            "1s",
            "--node-grace",
            "20s",
        ];
        let hub_dir = dir.join(format!("h{i}"));
        std::fs::create_dir_all(&hub_dir)?;
        let (child, client) = start_hub(&hub_dir, port, &extra).await?;
        let id: serde_json::Value = client.get("/v1/replicas").await?;
        hubs.push((
            child,
            client,
            advertise,
            id["self"].as_str().unwrap_or("").to_string(),
        ));
    }
    let token: serde_json::Value = hubs[0]
        .1
        .post("/v1/tokens", &serde_json::json!({"uses": 0}))
        .await?;
    let token = token["token"].as_str().unwrap_or_default().to_string();
    let urls: Vec<String> = hubs.iter().map(|h| h.2.clone()).collect();
    let fleet = spawn_edges("ha", edges, &urls, &token, &dir.join("fleet"));
    let t = Instant::now();
    loop {
        let v: serde_json::Value = hubs[0].1.get("/v1/nodes").await?;
        let ready = v["items"].as_array().map_or(0, |a| {
            a.iter().filter(|n| n["status"]["phase"] == "Ready").count()
        });
        if ready >= edges {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("only {ready} of {edges} edges Ready after 120s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = leader(&hubs[0].1).await.context("no leader")?;
    let li = hubs
        .iter()
        .position(|h| h.3 == old)
        .context("leader not among the hubs")?;
    let si = (li + 1) % 3;
    let survivor = hubs[si].1.clone();

    // With a healthy leader: placement through a replica that does not lead.
    let mut healthy = Vec::new();
    for i in 0..5 {
        healthy.push(place(&survivor, &format!("healthy-{i}"), Duration::from_secs(30)).await?);
    }
    // API latency on the survivor, sampled all along.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sampler = {
        let c = survivor.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !*stopped.borrow() {
                let t = Instant::now();
                let ok = c
                    .get::<serde_json::Value>("/v1/nodes/ha-00000")
                    .await
                    .is_ok();
                samples.push((t, t.elapsed(), ok));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = Instant::now();
    hubs[li].0.start_kill()?;
    // Who leads, watched beside the placement.
    let takeover = {
        let c = survivor.clone();
        tokio::spawn(async move {
            loop {
                match leader(&c).await {
                    Some(l) if l != old => return Ok(killed.elapsed()),
                    _ if killed.elapsed() > Duration::from_secs(60) => {
                        bail!("no new leader in 60s")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })
    };
    let after = place(&survivor, "after-failover", Duration::from_secs(60)).await?;
    let takeover = takeover.await??;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed())).await;
    let _ = stop.send(true);
    let samples = sampler.await?;
    let before: Vec<Duration> = samples
        .iter()
        .filter(|s| s.0 < killed)
        .map(|s| s.1)
        .collect();
    let during: Vec<_> = samples.iter().filter(|s| s.0 >= killed).collect();
    let errors = during.iter().filter(|s| !s.2).count();
    let during: Vec<Duration> = during.iter().map(|s| s.1).collect();
    let baseline_ms = percentile_ms(healthy, 0.5);
    let report = serde_json::json!({
        "bench": "failover",
        "replicas": 3,
        "etcdMembers": 3,
        "edges": edges,
        "leaseTtlSeconds": 2,
        "takeoverMs": takeover.as_secs_f64() * 1000.0,
        "placementAfterKillMs": after.as_secs_f64() * 1000.0,
        "baselinePlacementMedianMs": baseline_ms,
        "placementAfterKillVsBaseline": after.as_secs_f64() * 1000.0 / baseline_ms.max(1e-6),
        "apiGetP50BeforeMs": percentile_ms(before.clone(), 0.5),
        "apiGetP99BeforeMs": percentile_ms(before.clone(), 0.99),
        "apiGetP50DuringMs": percentile_ms(during.clone(), 0.5),
        "apiGetP99DuringMs": percentile_ms(during.clone(), 0.99),
        "apiGetP99DuringVsBefore": percentile_ms(during.clone(), 0.99) / percentile_ms(before, 0.99).max(1e-6),
        "apiErrorsDuring": errors,
        "apiSamplesDuring": during.len(),
    });
    let _ = fleet.send(true);
    for h in &mut hubs {
        let _ = h.0.start_kill();
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    print_report(&report, output)
}
