//! `verge bench console`: the web console's time to first render and to filter, in
//! Debian's Chromium driven over WebDriver, against a hub holding a large fleet (its
//! store filled before it starts: nodes Ready, instances placed and Running), and
//! against a small fleet measured the same way in the same run (the baseline).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use verge_api::{Instance, InstancePhase, InstanceSpec, Kind, Node, NodePhase, NodeSpec};
use verge_store::{Op, SqliteStore, Store, Txn};
use verge_testkit::webdriver::{ChromeDriver, Session};

use crate::bench::{free_port, start_hub, tempdir};

/// Nodes per site, and sites per region, in the filled fleet.
const NODES_PER_SITE: usize = 10;
const SITES_PER_REGION: usize = 100;

/// Write `nodes` Ready nodes and `instances` Running instances spread over them.
async fn fill(store: &dyn Store, nodes: usize, instances: usize) -> Result<()> {
    let now = verge_api::clock::now_rfc3339();
    let mut ops = Vec::new();
    let flush = |ops: &mut Vec<Op>| {
        let batch = std::mem::take(ops);
        async move {
            store
                .txn(Txn {
                    compares: Vec::new(),
                    ops: batch,
                })
                .await
        }
    };
    for i in 0..nodes {
        let site = i / NODES_PER_SITE;
        let mut n = Node::new(format!("edge-{i:06}"), NodeSpec::default());
        n.metadata.uid = format!("n{i}");
        n.metadata.generation = 1;
        n.metadata.creation_time = Some(now.clone());
        n.metadata.labels.extend([
            ("site".to_string(), format!("site-{site:05}")),
            (
                "region".to_string(),
                format!("region-{:02}", site / SITES_PER_REGION),
            ),
        ]);
        n.status.phase = NodePhase::Ready;
        n.status.last_heartbeat = Some(now.clone());
        n.status.allocatable.cpu = verge_api::Cpu(4000);
        n.status.allocatable.memory = verge_api::Bytes(8 << 30);
        n.status.capacity = n.status.allocatable.clone();
        n.status.agent_version = env!("CARGO_PKG_VERSION").into();
        ops.push(Op::put(
            verge_api::object_key(NodeSpec::PLURAL, n.name()),
            serde_json::to_vec(&n)?,
        ));
        if ops.len() == 500 {
            flush(&mut ops).await?;
        }
    }
    for i in 0..instances {
        let mut spec = InstanceSpec {
            process: Some(verge_api::ProcessSpec {
                command: vec!["sleep".into(), "infinity".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        spec.resources.cpu = verge_api::Cpu(100);
        spec.resources.memory = verge_api::Bytes(64 << 20);
        let mut inst = Instance::new(format!("web-{i:07}"), spec);
        inst.metadata.uid = format!("i{i}");
        inst.metadata.generation = 1;
        inst.metadata.creation_time = Some(now.clone());
        inst.metadata
            .labels
            .insert("app".into(), format!("app-{:04}", i % 1000));
        inst.status.node = Some(format!("edge-{:06}", i % nodes.max(1)));
        inst.status.phase = InstancePhase::Running;
        inst.status.observed_generation = 1;
        inst.status.started_at = Some(now.clone());
        ops.push(Op::put(
            verge_api::object_key(InstanceSpec::PLURAL, inst.name()),
            serde_json::to_vec(&inst)?,
        ));
        if ops.len() == 500 {
            flush(&mut ops).await?;
        }
    }
    if !ops.is_empty() {
        flush(&mut ops).await?;
    }
    Ok(())
}

/// Load `view` afresh and wait for its first render: milliseconds since navigation.
async fn first_render(s: &Session, url: &str, view: &str, k: usize) -> Result<f64> {
    // A new query string makes a new page load (a hash alone would not).
    s.goto(&format!("{url}/console?load={k}#{view}")).await?;
    let v = s
        .wait_for(
            "the first render",
            "return window.vergeFirstRender || null;",
            Duration::from_secs(60),
        )
        .await?;
    v.as_f64().context("render time")
}

/// Filter the instances page for `text`: milliseconds from the request (after the
/// typing pause) to the rows drawn, and the number of matches.
async fn filter(s: &Session, text: &str) -> Result<(f64, u64)> {
    s.eval(
        "const f = document.querySelector('#filter'); document.querySelector('#main').dataset.ready = ''; f.value = arguments[0]; f.dispatchEvent(new Event('input'));",
        vec![json!(text)],
    )
    .await?;
    let v = s
        .wait_for(
            "the filtered rows",
            "const m = document.querySelector('#main'); return m.dataset.ready === '1' ? [Number(m.dataset.filterMs), document.querySelector('#count').innerText] : null;",
            Duration::from_secs(60),
        )
        .await?;
    let count = v[1]
        .as_str()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok((v[0].as_f64().unwrap_or(f64::NAN), count))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measure one fleet: start a hub on a store holding it, then load each view `runs`
/// times and filter `runs` times.
async fn measure(dir: &Path, nodes: usize, instances: usize, runs: usize) -> Result<Value> {
    std::fs::create_dir_all(dir.join("hub"))?;
    let t = Instant::now();
    {
        let store = SqliteStore::open(dir.join("hub").join("store.db"))?;
        fill(&store, nodes, instances).await?;
    }
    let filled = t.elapsed();
    let port = free_port()?;
    // Nodes are written Ready without agents behind them: a long grace keeps them so.
    let (mut hub, client) = start_hub(dir, port, &["--node-grace", "1h"]).await?;
    let token = verge_hub::ClientConfig::load(&dir.join("hub").join("admin.conf"))?.token;
    // The console's index loads on first use: warm it, as an operator's first look.
    let t = Instant::now();
    let summary: Value = client.get("/v1/console/summary").await?;
    let index_load = t.elapsed();
    if summary["instances"]["total"].as_u64() != Some(instances as u64) {
        bail!(
            "the hub holds {} instances, not {instances}",
            summary["instances"]["total"]
        );
    }
    let url = format!("https://127.0.0.1:{port}");
    let driver = ChromeDriver::start(&dir.join("chromedriver.log")).await?;
    let s = driver.session(1400, 1000).await?;
    s.goto(&format!("{url}/console")).await?;
    s.eval(
        "sessionStorage.setItem('verge-token', arguments[0]);",
        vec![json!(token)],
    )
    .await?;
    let mut out = json!({
        "nodes": nodes,
        "instances": instances,
        "fillSeconds": filled.as_secs_f64(),
        "indexLoadMs": index_load.as_secs_f64() * 1000.0,
    });
    let mut k = 0;
    for (field, view) in [
        ("overviewFirstRenderMs", "/"),
        ("nodesFirstRenderMs", "/nodes"),
        ("instancesFirstRenderMs", "/instances"),
    ] {
        let mut times = Vec::new();
        for _ in 0..runs {
            k += 1;
            times.push(first_render(&s, &url, view, k).await?);
        }
        out[field] = median(times).into();
    }
    // On the instances page: filters that match a thousandth, a tenth, and nothing.
    let mut times = Vec::new();
    for i in 0..runs {
        for text in [
            format!("app-{:04}", 7 + i),
            "web-00".to_string(),
            "no-such".into(),
        ] {
            let (ms, _) = filter(&s, &text).await?;
            times.push(ms);
        }
    }
    out["filterMs"] = median(times.clone()).into();
    out["filterMaxMs"] = times.iter().copied().fold(0.0, f64::max).into();
    let (_, matches) = filter(&s, "app-0042").await?;
    out["filterMatchesOneApp"] = matches.into();
    s.close().await?;
    drop(driver);
    let _ = hub.kill().await;
    Ok(out)
}

/// `verge bench console`.
pub async fn run(nodes: usize, instances: usize, runs: usize, output: &str) -> Result<()> {
    let dir = tempdir()?;
    eprintln!("bench console: baseline (10 nodes, 100 instances)");
    let baseline = measure(&dir.join("baseline"), 10, 100, runs).await?;
    eprintln!("bench console: {nodes} nodes, {instances} instances");
    let fleet = measure(&dir.join("fleet"), nodes, instances, runs).await?;
    let report = json!({ "baseline": baseline, "fleet": fleet, "runs": runs });
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (name, v) in [("baseline", &baseline), ("fleet", &fleet)] {
            println!(
                "{name:9} {:>6} nodes {:>7} instances: first render overview {:.0} ms, nodes {:.0} ms, instances {:.0} ms; filter {:.0} ms (max {:.0}); index load {:.0} ms",
                v["nodes"],
                v["instances"],
                v["overviewFirstRenderMs"].as_f64().unwrap_or(0.0),
                v["nodesFirstRenderMs"].as_f64().unwrap_or(0.0),
                v["instancesFirstRenderMs"].as_f64().unwrap_or(0.0),
                v["filterMs"].as_f64().unwrap_or(0.0),
                v["filterMaxMs"].as_f64().unwrap_or(0.0),
                v["indexLoadMs"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
