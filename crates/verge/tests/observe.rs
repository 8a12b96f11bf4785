//! Observability end to end: edges' metrics reach the hub through an outage and an
//! agent restart without a gap, a full buffer drops and counts, and a real
//! Prometheus (Debian's, started here) scrapes what the nodes reported.

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use verge_testkit::{FaultProxy, Faults};

const T: Duration = Duration::from_secs(40);

fn json(hub: &Hub, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&hub.ok(args)).expect("json")
}

/// The node's row of `verge top nodes`.
fn top_node(hub: &Hub, node: &str) -> Option<serde_json::Value> {
    json(hub, &["top", "nodes", "--node", node, "-o", "json"])
        .as_array()?
        .first()
        .cloned()
}

/// Samples the hub holds of one of `node`'s own series.
fn samples(hub: &Hub, node: &str, metric: &str) -> Vec<(i64, f64)> {
    let v = json(
        hub,
        &[
            "metrics", metric, "--node", node, "--since", "1h", "-o", "json",
        ],
    );
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|s| s.get("instance").is_none())
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .map(|p| (p[0].as_i64().unwrap_or(0), p[1].as_f64().unwrap_or(0.0)))
        .collect()
}

fn blackhole(p: &FaultProxy, on: bool) {
    p.set(Faults {
        blackhole: on,
        ..Default::default()
    });
}

#[test]
fn metrics_cross_an_outage_and_an_agent_restart_in_order_and_a_full_buffer_counts_its_losses() {
    let rt = runtime();
    let d = test_dir();
    let hub = Hub::start(d.path());
    let upstream = format!("127.0.0.1:{}", hub.port).parse().expect("addr");
    let p: FaultProxy = rt.block_on(FaultProxy::start(upstream)).expect("proxy");
    let a_args = ["--metrics-interval", "300ms", "--label", "site=obs-a"];
    let a_dir = d.path().join("a");
    let a = Edge::start_with(&p.url(), "a", Some(&hub.token(1)), &a_dir, &a_args);
    let b_args = ["--metrics-interval", "200ms", "--metrics-buffer", "2Ki"];
    let _b = Edge::start_with(
        &p.url(),
        "b",
        Some(&hub.token(1)),
        &d.path().join("b"),
        &b_args,
    );
    hub.wait_phase("nodes", "a", "Ready", T);
    hub.wait_phase("nodes", "b", "Ready", T);
    let marker = unique("obs");
    let manifest = format!(
        "{}  placement: {{nodeSelector: {{site: obs-a}}}}\n",
        sleeper("obs-web", &marker).replace(
            "  name: obs-web\n",
            "  name: obs-web\n  labels: {app: shop}\n"
        )
    );
    assert!(hub.apply(&manifest).status.success());
    hub.wait_phase("instances", "obs-web", "Running", T);

    // The instance's own metrics arrive, from its cgroup, labelled with its app.
    let row = wait_for("instance metrics", T, || {
        let v = json(&hub, &["top", "instances", "--app", "shop", "-o", "json"]);
        let r = v.as_array()?.first()?.clone();
        (r["up"] == 1.0 && r["memoryBytes"].as_f64()? > 0.0).then_some(r)
    });
    assert_eq!(row["instance"], "obs-web");
    assert_eq!(row["node"], "a");
    let node_row = wait_for("node metrics", T, || top_node(&hub, "a"));
    assert_eq!(node_row["cluster"], "obs-a");
    assert!(node_row["memoryTotalBytes"].as_f64().unwrap_or(0.0) > 0.0);

    // Cut both edges off; during the outage `a`'s agent is killed and started again.
    blackhole(&p, true);
    let before = samples(&hub, "a", "verge_node_memory_total_bytes").len();
    std::thread::sleep(Duration::from_secs(3));
    drop(a);
    let _a = Edge::start_with(&p.url(), "a", None, &a_dir, &a_args);
    std::thread::sleep(Duration::from_secs(6));
    blackhole(&p, false);

    // Every round `a` sampled reaches the hub, in order: its rounds are numbered from
    // 1 without a gap across the restart, so the hub holds as many samples of a
    // series every round carries as the last round's number.
    let (last, n) = wait_for("a's backlog drained", T, || {
        let last = top_node(&hub, "a")?["lastRound"].as_u64()?;
        let n = samples(&hub, "a", "verge_node_memory_total_bytes").len() as u64;
        (n == last && n as usize > before + 20).then_some((last, n))
    });
    let points = samples(&hub, "a", "verge_node_memory_total_bytes");
    assert!(points.windows(2).all(|w| w[0].0 < w[1].0), "in time order");
    assert_eq!((last, n), (points.len() as u64, points.len() as u64));
    let dropped = top_node(&hub, "a").expect("row")["droppedSamples"].as_f64();
    assert_eq!(dropped, Some(0.0), "a's buffer was large enough");

    // `b`'s 2 KiB buffer could not hold 9 s of rounds: the oldest went, and are
    // counted. `b` runs no instance, so each of its rounds carries the same ten node
    // samples: what it says it dropped is ten for each round the hub never got, and
    // for each round the hub got but whose acknowledgement the outage swallowed (the
    // edge cannot tell those apart: at most the 32 it may have in flight at the cut).
    let (lost, dropped) = wait_for("b's losses reported", T, || {
        let row = top_node(&hub, "b")?;
        let dropped = row["droppedSamples"].as_f64()? as u64;
        let last = row["lastRound"].as_u64()?;
        let kept = samples(&hub, "b", "verge_node_memory_total_bytes").len() as u64;
        let lost = last - kept;
        (lost > 0 && dropped >= lost * 10).then_some((lost, dropped))
    });
    assert!(lost > 5, "{lost} rounds lost, {dropped} samples");
    assert_eq!(dropped % 10, 0, "whole rounds");
    assert!(
        dropped <= (lost + 32) * 10,
        "{lost} rounds lost, {dropped} samples counted"
    );
    hub.cleanup(&["obs-web"], &[&marker]);
}

/// Debian's Prometheus, scraping the hub's federation endpoint.
struct Prometheus {
    _proc: Proc,
    port: u16,
}

impl Prometheus {
    fn start(hub: &Hub, dir: &std::path::Path) -> Prometheus {
        let token = verge_hub::ClientConfig::load(&hub.admin_conf())
            .expect("admin.conf")
            .token;
        let port = free_port();
        std::fs::create_dir_all(dir).expect("dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n- job_name: verge\n  scheme: https\n  metrics_path: /v1/metrics/federate\n  honor_labels: true\n  honor_timestamps: true\n  tls_config:\n    ca_file: {ca}\n  authorization:\n    credentials: {token}\n  static_configs:\n  - targets: ['127.0.0.1:{hub}']\n",
                ca = hub.dir.join("hub").join("ca.crt").display(),
                hub = hub.port,
            ),
        )
        .expect("config");
        let listen = format!("127.0.0.1:{port}");
        let data = dir.join("data");
        let args = [
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", data.display()),
            format!("--web.listen-address={listen}"),
        ];
        let log = dir.join("prometheus.log");
        let child = std::process::Command::new("prometheus")
            .args(&args)
            .stdout(std::fs::File::create(dir.join("prometheus.out")).expect("log"))
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("prometheus (apt-get install prometheus)");
        let proc = Proc { child, log };
        wait_for("prometheus ready", T, || {
            proc.log_text()
                .contains("Server is ready to receive web requests")
                .then_some(())
        });
        Prometheus { _proc: proc, port }
    }

    /// An instant query's first result value.
    fn query(&self, q: &str) -> Option<f64> {
        let (code, body) = http_get(
            &format!("127.0.0.1:{}", self.port),
            &format!("/api/v1/query?query={}", enc(q)),
        );
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

fn enc(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_what_the_nodes_reported() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let _e = Edge::start_with(
        &hub.url,
        "prom-a",
        Some(&hub.token(1)),
        &d.path().join("prom-a"),
        &["--metrics-interval", "500ms", "--label", "site=prom-site"],
    );
    hub.wait_phase("nodes", "prom-a", "Ready", T);
    wait_for("node metrics", T, || top_node(&hub, "prom-a"));
    let prom = Prometheus::start(&hub, &d.path().join("prometheus"));
    // A value that does not change: memory installed. Prometheus must hold exactly
    // what the node reported, labelled with its node and cluster.
    let want = samples(&hub, "prom-a", "verge_node_memory_total_bytes")
        .last()
        .expect("sample")
        .1;
    let got = wait_for("prometheus scraped the hub", T, || {
        prom.query("verge_node_memory_total_bytes{node=\"prom-a\",cluster=\"prom-site\"}")
    });
    assert_eq!(got, want);
    // A counter that moves: Prometheus's latest is one the hub holds.
    let cpu = wait_for("cpu counter scraped", T, || {
        prom.query("verge_node_cpu_seconds_total{node=\"prom-a\"}")
    });
    let held = samples(&hub, "prom-a", "verge_node_cpu_seconds_total");
    assert!(
        held.iter().any(|(_, v)| *v == cpu),
        "{cpu} not among {held:?}"
    );
    // The hub's own metrics: latency by route (the template, not the path), store
    // latency by operation, scheduling passes, metrics taken in.
    let own = hub.metrics_text();
    for want in [
        "verge_hub_api_request_seconds_count{route=\"/v1/metrics/top\",method=\"GET\"}",
        "verge_hub_api_request_seconds_count{route=\"/v1/nodes/{name}\",method=\"GET\"}",
        "verge_hub_store_seconds_count{op=\"txn\"}",
        "verge_hub_schedule_pass_seconds_count",
        "verge_hub_sync_lag_revisions",
        "verge_hub_metrics_samples_ingested_total",
    ] {
        assert!(own.contains(want), "{want} not in:\n{own}");
    }
}

/// `verge get events -w -o json` in the background: the events it prints, as they come.
struct EventWatch {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl EventWatch {
    fn start(hub: &Hub, extra: &[&str]) -> EventWatch {
        use std::io::BufRead;
        let mut child = std::process::Command::new(BIN)
            .args(["--config", hub.admin_conf().to_str().expect("utf8")])
            .args(["get", "events", "-w", "-o", "json"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("verge get events -w");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        EventWatch {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait for an event with `reason` about `object` (`kind/name`).
    fn expect(&mut self, reason: &str, object: &str) -> serde_json::Value {
        let matches = |e: &serde_json::Value| {
            e["reason"] == reason
                && format!(
                    "{}/{}",
                    e["regarding"]["kind"].as_str().unwrap_or(""),
                    e["regarding"]["name"].as_str().unwrap_or("")
                ) == object
        };
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Some(e) = self.seen.iter().find(|e| matches(e)) {
                return e.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(e) => self.seen.push(e),
                Err(_) => panic!(
                    "no {reason} event for {object}; the watch saw: {:#?}",
                    self.seen
                ),
            }
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn events_say_what_happened_and_a_watch_sees_them_live() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let mut all = EventWatch::start(&hub, &[]);
    let mut edge = Edge::start(&hub, "ev-1", Some(&hub.token(1)));
    all.expect("NodeReady", "nodes/ev-1");

    // An instance that crashes and is restarted; one that runs out of memory; one
    // that fits nowhere.
    let crash = "kind: Instance\nmetadata: {name: ev-crash}\nspec:\n  form: process\n  process:\n    command: [/bin/sh, -c, 'sleep 0.3; exit 3']\n  resources: {cpu: 100m, memory: 16Mi}\n";
    let hog = "kind: Instance\nmetadata: {name: ev-hog}\nspec:\n  form: process\n  process:\n    command: [perl, -e, '$x = \"a\" x (256 * 1024 * 1024); sleep 60']\n  resources: {cpu: 100m, memory: 32Mi}\n  restartPolicy: Never\n";
    let huge = "kind: Instance\nmetadata: {name: ev-huge}\nspec:\n  form: process\n  process:\n    command: [sleep, '60']\n  resources: {cpu: '64', memory: 16Mi}\n";
    let mut mine = EventWatch::start(&hub, &["--for", "instances/ev-crash"]);
    for m in [crash, hog, huge] {
        assert!(hub.apply(m).status.success());
    }
    let created = all.expect("Created", "instances/ev-crash");
    assert_eq!(created["actor"], "admin");
    all.expect("Scheduled", "instances/ev-crash");
    all.expect("Started", "instances/ev-crash");
    let restarted = all.expect("Restarted", "instances/ev-crash");
    assert_eq!(restarted["type"], "Warning");
    assert!(
        restarted["message"].as_str().unwrap_or("").contains("exit"),
        "{restarted}"
    );
    assert_eq!(restarted["node"], "ev-1");
    let oom = all.expect("OOMKilled", "instances/ev-hog");
    assert!(
        oom["message"].as_str().unwrap_or("").contains("32Mi"),
        "{oom}"
    );
    let unplaced = all.expect("FailedScheduling", "instances/ev-huge");
    assert!(
        unplaced["message"].as_str().unwrap_or("").contains("cpu"),
        "{unplaced}"
    );
    // The filtered watch saw its instance's events and no other's.
    mine.expect("Restarted", "instances/ev-crash");
    assert!(
        mine.seen
            .iter()
            .all(|e| e["regarding"]["name"] == "ev-crash"),
        "{:#?}",
        mine.seen
    );

    // The edge goes away: the node is NotReady, live.
    edge.proc.kill();
    let down = all.expect("NodeNotReady", "nodes/ev-1");
    assert_eq!(down["type"], "Warning");

    // Listing gives the same history, oldest first, and --for narrows it.
    let listed = json(
        &hub,
        &["get", "events", "--for", "instances/ev-crash", "-o", "json"],
    );
    let reasons: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    let pos = |r: &str| reasons.iter().position(|x| *x == r);
    assert!(
        pos("Created") < pos("Scheduled")
            && pos("Scheduled") < pos("Started")
            && pos("Started") < pos("Restarted"),
        "{reasons:?}"
    );
    // A bad filter says what is wrong.
    let out = hub.cli(&["get", "events", "--for", "web"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KIND/NAME"));
    hub.ok(&["delete", "instance", "ev-hog"]);
    all.expect("Deleted", "instances/ev-hog");
}
