//! End to end: real hub and edge processes on loopback, driven by the real CLI.

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

fn tmp() -> TestDir {
    test_dir()
}

#[test]
fn enrolment_then_spent_wrong_and_foreign_tokens_are_refused() {
    let d = tmp();
    let hub = Hub::start(d.path());
    let token = hub.token(1);
    let _edge = Edge::start(&hub, "edge-a", Some(&token));
    let node = hub.wait_phase("nodes", "edge-a", "Ready", T);
    assert_eq!(node["metadata"]["labels"]["region"], "eu-west");
    assert_eq!(node["status"]["allocatable"]["cpu"], "1900m");
    assert_eq!(node["status"]["architecture"], std::env::consts::ARCH);
    // Straight to the hub, UDP works: the channel runs over QUIC.
    assert_eq!(node["status"]["transport"], "quic");
    // The identity is on the node; the key never left it.
    assert!(d.path().join("edge-a/identity/node.key").exists());

    // The same single-use token again: spent.
    let (status, log) = Edge::start_failing(&hub.url, "edge-b", &token, &d.path().join("edge-b"));
    assert!(!status.success());
    assert!(log.contains("join token refused"), "{log}");
    // Right hub, made-up secret.
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!("v1.{}.{}.{}", parts[1], parts[2], "0".repeat(32));
    let (status, log) = Edge::start_failing(&hub.url, "edge-c", &forged, &d.path().join("edge-c"));
    assert!(!status.success());
    assert!(log.contains("join token refused"), "{log}");
    // A token for another hub's CA: the edge refuses to talk to this hub at all.
    let foreign = format!("v1.{}.{}.{}", "ab".repeat(32), parts[2], parts[3]);
    let (status, log) = Edge::start_failing(&hub.url, "edge-d", &foreign, &d.path().join("edge-d"));
    assert!(!status.success());
    assert!(log.contains("fingerprint"), "{log}");
    // None of the refused edges became nodes.
    assert_eq!(hub.list_json("nodes").len(), 1);
    // A name that is taken cannot be enrolled again.
    let t2 = hub.token(1);
    let (status, log) = Edge::start_failing(&hub.url, "edge-a", &t2, &d.path().join("edge-a2"));
    assert!(!status.success());
    assert!(log.contains("already enrolled"), "{log}");
}

#[test]
fn instance_runs_shows_logs_and_delete_stops_it() {
    let d = tmp();
    let hub = Hub::start(d.path());
    let _edge = Edge::start(&hub, "edge-1", Some(&hub.token(1)));
    hub.wait_phase("nodes", "edge-1", "Ready", T);
    let marker = unique("run");
    let out = hub.apply(&sleeper("web", &marker));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("instance/web created"));
    let inst = hub.wait_phase("instances", "web", "Running", T);
    assert_eq!(inst["kind"], "Instance");
    assert_eq!(inst["status"]["node"], "edge-1");
    let pid = inst["status"]["pid"].as_u64().expect("pid") as u32;
    assert_eq!(pids_with(&marker), vec![pid]);
    let logs = wait_for("logs", T, || {
        let out = hub.ok(&["logs", "web"]);
        out.contains(&format!("started {marker}")).then_some(out)
    });
    assert!(logs.contains("started"));
    // The table reads like kubectl.
    let table = hub.ok(&["get", "instances"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("web") && table.contains("Running") && table.contains("edge-1"),
        "{table}"
    );
    // Re-applying the same manifest changes nothing and does not restart it.
    assert!(hub.apply(&sleeper("web", &marker)).status.success());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pids_with(&marker), vec![pid]);

    hub.ok(&["delete", "instance", "web"]);
    wait_for("process to stop", T, || {
        pids_with(&marker).is_empty().then_some(())
    });
    assert!(hub.get_json("instances", "web").is_none());
}

#[test]
fn instance_that_fits_nowhere_stays_pending_and_says_why() {
    let d = tmp();
    let hub = Hub::start(d.path());
    let _edge = Edge::start(&hub, "edge-1", Some(&hub.token(1)));
    hub.wait_phase("nodes", "edge-1", "Ready", T);
    let big = "kind: Instance\nmetadata: {name: huge}\nspec:\n  form: process\n  process: {command: [sleep, '100']}\n  resources: {cpu: 1, memory: 64Gi}\n";
    assert!(hub.apply(big).status.success());
    let inst = wait_for("a reason", T, || {
        hub.get_json("instances", "huge")
            .filter(|v| !v["status"]["message"].as_str().unwrap_or("").is_empty())
    });
    assert_eq!(inst["status"]["phase"], "Pending");
    assert_eq!(
        inst["status"]["message"],
        "0/1 nodes fit: 1 insufficient memory"
    );
    let wrong_region = "kind: Instance\nmetadata: {name: far}\nspec:\n  form: process\n  process: {command: [sleep, '100']}\n  placement: {region: ap-south}\n";
    assert!(hub.apply(wrong_region).status.success());
    let inst = wait_for("a reason", T, || {
        hub.get_json("instances", "far")
            .filter(|v| !v["status"]["message"].as_str().unwrap_or("").is_empty())
    });
    assert_eq!(
        inst["status"]["message"],
        "0/1 nodes fit: 1 in another region"
    );
}

#[test]
fn killing_an_edge_makes_its_node_not_ready() {
    let d = tmp();
    let hub = Hub::start(d.path());
    let mut edge = Edge::start(&hub, "edge-1", Some(&hub.token(1)));
    hub.wait_phase("nodes", "edge-1", "Ready", T);
    edge.proc.kill();
    let node = hub.wait_phase("nodes", "edge-1", "NotReady", T);
    assert!(
        node["status"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("no heartbeat"),
        "{node}"
    );
    // Back again: Ready again, with the same identity (no token needed).
    let _edge = Edge::start(&hub, "edge-1", None);
    hub.wait_phase("nodes", "edge-1", "Ready", T);
}

#[test]
fn hub_restart_keeps_every_resource_and_revision() {
    let d = tmp();
    let mut hub = Hub::start(d.path());
    for i in 0..5 {
        let m = format!(
            "kind: Instance\nmetadata: {{name: keep-{i}, labels: {{n: '{i}'}}}}\nspec:\n  form: process\n  process: {{command: [sleep, '100']}}\n  resources: {{memory: 100Ti}}\n"
        );
        assert!(hub.apply(&m).status.success());
    }
    // Wait for the scheduler to write its verdicts, so nothing changes during the restart.
    for i in 0..5 {
        wait_for("pending reason", T, || {
            hub.get_json("instances", &format!("keep-{i}"))
                .filter(|v| !v["status"]["message"].as_str().unwrap_or("").is_empty())
        });
    }
    let before = hub.list_json("instances");
    let port = hub.port;
    // A crash, not a clean stop.
    hub.proc.kill();
    let hub = Hub::start_on(d.path(), port);
    let after = hub.list_json("instances");
    assert_eq!(
        before, after,
        "objects, uids and revisions survive a hub crash"
    );
    // The revision counter continues; it never goes back.
    let m = "kind: Instance\nmetadata: {name: later}\nspec: {form: process, process: {command: [sleep, '1']}, resources: {memory: 100Ti}}\n";
    assert!(hub.apply(m).status.success());
    let later = hub.get_json("instances", "later").expect("later");
    let max_before = before
        .iter()
        .map(|v| v["metadata"]["revision"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0);
    assert!(later["metadata"]["revision"].as_u64().unwrap_or(0) > max_before);
}

#[test]
fn edge_restart_while_hub_is_down_keeps_workloads_and_reconciles_on_return() {
    let d = tmp();
    let mut hub = Hub::start(d.path());
    let port = hub.port;
    let mut edge = Edge::start(&hub, "edge-1", Some(&hub.token(1)));
    hub.wait_phase("nodes", "edge-1", "Ready", T);
    let (m1, m2) = (unique("auto1"), unique("auto2"));
    assert!(hub.apply(&sleeper("one", &m1)).status.success());
    assert!(hub.apply(&sleeper("two", &m2)).status.success());
    let pid1 = hub.wait_phase("instances", "one", "Running", T)["status"]["pid"]
        .as_u64()
        .expect("pid") as u32;
    hub.wait_phase("instances", "two", "Running", T);

    // The hub goes away, then the agent restarts while it is away.
    hub.proc.kill();
    edge.proc.kill();
    let _edge = Edge::start_in(&hub.url, "edge-1", None, &edge.dir);
    // The running workload was adopted, not started twice.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        pids_with(&m1),
        vec![pid1],
        "workload one kept running, exactly once"
    );
    // A workload that dies while the hub is down is restarted from the cache.
    let old2 = pids_with(&m2);
    assert_eq!(old2.len(), 1);
    kill_pid(old2[0]);
    let new2 = wait_for("restart from cache", T, || {
        let p = pids_with(&m2);
        (p.len() == 1 && p != old2).then_some(p)
    });
    assert_ne!(new2, old2);

    // The hub returns; a delete issued now reaches the edge, statuses converge.
    let hub = Hub::start_on(d.path(), port);
    hub.wait_phase("nodes", "edge-1", "Ready", T);
    hub.ok(&["delete", "instance", "one"]);
    wait_for("deleted workload to stop", T, || {
        pids_with(&m1).is_empty().then_some(())
    });
    let two = wait_for("status of the restarted workload", T, || {
        hub.get_json("instances", "two")
            .filter(|v| v["status"]["pid"].as_u64() == Some(new2[0] as u64))
    });
    assert_eq!(two["status"]["phase"], "Running");
    assert!(two["status"]["restarts"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(pids_with(&m2), new2, "no duplicate after reconnect");
    hub.ok(&["delete", "instance", "two"]);
    wait_for("cleanup", T, || pids_with(&m2).is_empty().then_some(()));
}

#[test]
fn edge_reboot_while_offline_restarts_workloads_from_cache() {
    let d = tmp();
    let mut hub = Hub::start(d.path());
    let mut edge = Edge::start(&hub, "edge-1", Some(&hub.token(1)));
    hub.wait_phase("nodes", "edge-1", "Ready", T);
    let m = unique("reboot");
    assert!(hub.apply(&sleeper("svc", &m)).status.success());
    hub.wait_phase("instances", "svc", "Running", T);
    // "Reboot": hub unreachable, agent and its workloads all gone.
    hub.proc.kill();
    edge.proc.kill();
    for p in pids_with(&m) {
        kill_pid(p);
    }
    wait_for("workload gone", T, || {
        pids_with(&m).is_empty().then_some(())
    });
    let _edge = Edge::start_in(&hub.url, "edge-1", None, &edge.dir);
    wait_for("workload restarted from the cache", T, || {
        (pids_with(&m).len() == 1).then_some(())
    });
    drop(_edge);
    for p in pids_with(&m) {
        kill_pid(p);
    }
}

#[test]
fn malformed_manifests_are_refused_with_the_field_named_and_nothing_stored() {
    let d = tmp();
    let hub = Hub::start(d.path());
    let bad = "kind: Instance\nmetadata: {name: bad}\nspec:\n  form: process\n  process: {command: [sleep]}\n  resources: {memory: 64Q}\n";
    let out = hub.apply(bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.resources.memory") && err.contains("64Q") && err.contains("64Mi"),
        "{err}"
    );
    let typo = "kind: Instance\nmetadata: {name: typo}\nspec:\n  form: process\n  proces: {command: [sleep]}\n";
    let err = String::from_utf8_lossy(&hub.apply(typo).stderr).into_owned();
    assert!(err.contains("proces"), "{err}");
    let bad_name = "kind: Instance\nmetadata: {name: Bad_Name}\nspec: {form: process, process: {command: [sleep]}}\n";
    let err = String::from_utf8_lossy(&hub.apply(bad_name).stderr).into_owned();
    assert!(
        err.contains("metadata.name") && err.contains("Bad_Name"),
        "{err}"
    );
    assert!(hub.list_json("instances").is_empty());
    // The hub validates too, for clients other than the CLI.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let c = api_client(&hub, None);
        let token = admin_token(&hub);
        let r = c
            .put(format!("{}/v1/instances/x", hub.url))
            .bearer_auth(&token)
            .json(&serde_json::json!({"kind": "Instance", "metadata": {"name": "x"}, "spec": {"form": "process", "process": {"command": ["a"]}, "resources": {"cpu": "lots"}}}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 400);
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["code"], "invalid");
        assert_eq!(body["fields"][0]["field"], "spec.resources.cpu");
    });
    assert!(hub.list_json("instances").is_empty());
}

fn admin_token(hub: &Hub) -> String {
    let text = std::fs::read_to_string(hub.admin_conf()).expect("admin.conf");
    text.lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("token line")
        .trim()
        .trim_matches('"')
        .to_string()
}

#[test]
fn requests_without_valid_credentials_or_for_other_nodes_are_refused() {
    let d = tmp();
    let hub = Hub::start(d.path());
    let a = Edge::start(&hub, "edge-a", Some(&hub.token(1)));
    let _b = Edge::start(&hub, "edge-b", Some(&hub.token(1)));
    hub.wait_phase("nodes", "edge-a", "Ready", T);
    hub.wait_phase("nodes", "edge-b", "Ready", T);
    // Pin an instance to edge-b.
    let m = unique("authz");
    let manifest = sleeper("on-b", &m).replace(
        "  terminationGracePeriodSeconds",
        "  placement: {nodeSelector: {nodename: b}}\n  terminationGracePeriodSeconds",
    );
    let node_b = hub.get_json("nodes", "edge-b").expect("node b");
    let mut labelled = node_b.clone();
    labelled["metadata"]["labels"]["nodename"] = "b".into();
    labelled.as_object_mut().expect("obj").remove("status");
    let out = cli_with(
        &hub.admin_conf(),
        &["apply", "-f", "-"],
        Some(&labelled.to_string()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(hub.apply(&manifest).status.success());
    let inst = hub.wait_phase("instances", "on-b", "Running", T);
    assert_eq!(inst["status"]["node"], "edge-b");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let anon = api_client(&hub, None);
        let r = anon
            .get(format!("{}/v1/instances", hub.url))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 401);
        let body: serde_json::Value = r.json().await.expect("json");
        assert!(
            body["message"].as_str().unwrap_or("").contains("Bearer"),
            "{body}"
        );
        assert_eq!(
            status(
                anon.get(format!("{}/v1/instances", hub.url))
                    .bearer_auth("adm_wrong")
            )
            .await,
            401
        );

        // edge-a's certificate: its own node yes, edge-b's objects no.
        let as_a = api_client(&hub, Some(&a.dir));
        assert_eq!(
            status(as_a.get(format!("{}/v1/nodes/edge-a", hub.url))).await,
            200
        );
        assert_eq!(
            status(as_a.get(format!("{}/v1/nodes/edge-b", hub.url))).await,
            403
        );
        assert_eq!(
            status(as_a.get(format!("{}/v1/instances/on-b", hub.url))).await,
            403
        );
        assert_eq!(
            status(
                as_a.put(format!("{}/v1/instances/on-b/status", hub.url))
                    .json(&serde_json::json!({"status": {"phase": "Failed", "node": "edge-b"}}))
            )
            .await,
            403
        );
        assert_eq!(
            status(as_a.delete(format!("{}/v1/instances/on-b", hub.url))).await,
            403
        );
        let list: serde_json::Value = as_a
            .get(format!("{}/v1/instances", hub.url))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(
            list["items"].as_array().map(Vec::len),
            Some(0),
            "edge-a sees none of edge-b's instances"
        );

        // Through the channel: edge-a reports on edge-b's instance and is refused.
        channel_forgery(&hub, &a.dir, &inst).await;
    });
    let after = hub.get_json("instances", "on-b").expect("on-b");
    assert_eq!(
        after["status"]["phase"], "Running",
        "forged statuses changed nothing"
    );
    assert_eq!(after["status"]["node"], "edge-b");
    hub.ok(&["delete", "instance", "on-b"]);
    wait_for("cleanup", T, || pids_with(&m).is_empty().then_some(()));
}

async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.expect("send").status().as_u16()
}

async fn channel_forgery(hub: &Hub, edge_dir: &std::path::Path, victim: &serde_json::Value) {
    use verge_api::channel::{ALPN_CHANNEL, EdgeToHub, HubToEdge, PROTOCOL_VERSION};
    use verge_tunnel::frame::{read_msg, write_msg};
    let read =
        |f: &str| std::fs::read_to_string(edge_dir.join("identity").join(f)).expect("identity");
    let cfg = verge_tunnel::tls::client_config(
        &read("ca.crt"),
        Some((&read("node.crt"), &read("node.key"))),
        &[ALPN_CHANNEL],
    )
    .expect("cfg");
    let mut s = verge_tunnel::tls::dial(&format!("127.0.0.1:{}", hub.port), cfg)
        .await
        .expect("dial");
    write_msg(&mut s, &hello(PROTOCOL_VERSION, "test"))
        .await
        .expect("hello");
    let forged = EdgeToHub::InstanceStatus {
        name: "on-b".into(),
        uid: victim["metadata"]["uid"].as_str().expect("uid").into(),
        status: verge_api::InstanceStatus {
            phase: verge_api::InstancePhase::Failed,
            ..Default::default()
        },
    };
    write_msg(&mut s, &forged).await.expect("send");
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match read_msg::<HubToEdge, _>(&mut s).await {
                Ok(Some(HubToEdge::Error { code, message, .. })) => break (code, message),
                Ok(Some(_)) => continue,
                other => panic!("connection ended without a refusal: {other:?}"),
            }
        }
    })
    .await
    .expect("refusal");
    assert_eq!(refused.0, "forbidden", "{refused:?}");
    assert!(
        refused.1.contains("not bound to node 'edge-a'"),
        "{refused:?}"
    );
}

#[test]
fn hub_and_edge_serve_prometheus_metrics() {
    let d = tmp();
    let hub = Hub::start(d.path());
    let edge = Edge::start(&hub, "edge-1", Some(&hub.token(1)));
    hub.wait_phase("nodes", "edge-1", "Ready", T);
    let text = hub.metrics_text();
    assert!(text.contains("verge_hub_edges_connected 1"), "{text}");
    assert!(text.contains("verge_hub_store_revision"), "{text}");
    let text = wait_for("edge metrics", T, || {
        let mut s = std::net::TcpStream::connect(&edge.metrics).ok()?;
        use std::io::{Read, Write};
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.contains("verge_edge_connected 1").then_some(out)
    });
    assert!(text.contains("verge_edge_desired_revision"), "{text}");
}

#[test]
fn every_example_applies_and_runs() {
    let d = tmp();
    let hub = Hub::start(d.path());
    let _edge = Edge::start(&hub, "edge-1", Some(&hub.token(1)));
    hub.wait_phase("nodes", "edge-1", "Ready", T);
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let out = hub.ok(&["apply", "-f", examples]);
    assert!(out.contains("instance/hello created"), "{out}");
    hub.wait_phase("instances", "hello", "Running", T);
    hub.wait_phase("instances", "ticker-eu", "Running", T);
    let till = hub.wait_phase("instances", "till", "Running", T);
    assert_eq!(till["spec"]["disconnect"]["reconcile"], "longestRunning");
    let done = hub.wait_phase("instances", "report-once", "Succeeded", T);
    assert_eq!(done["status"]["exitCode"], 0);
    // The linked pair talks through the hub's relay.
    wait_for("storefront to reach catalog", T, || {
        hub.ok(&["logs", "storefront"])
            .contains("storefront got: catalog: 3 items in stock")
            .then_some(())
    });
    // Every file under examples/ is a manifest this hub accepts.
    // (examples/runtimes/ need a registry or a kernel; tests/container.rs and
    // tests/vm.rs apply them.)
    for e in std::fs::read_dir(examples).expect("examples") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            continue;
        }
        let text = std::fs::read_to_string(&p).expect("read");
        verge_api::parse_manifests(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let yaml = hub.ok(&["get", "instances", "hello", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: Instance") && yaml.contains("phase: Running"),
        "{yaml}"
    );
    // One node: one replica of each anti-affine pair fits, the other explains why not.
    hub.wait_phase("instances", "web-1", "Running", T);
    let reason = |name: &str| {
        wait_for(&format!("{name} reason"), T, || {
            hub.get_json("instances", name).and_then(|v| {
                v["status"]["message"]
                    .as_str()
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
            })
        })
    };
    assert_eq!(reason("web-2"), "0/1 nodes fit: 1 anti-affinity");
    let gang = reason("pair-a");
    assert!(
        gang.contains("gang 'pair' cannot be placed together"),
        "{gang}"
    );
    assert_eq!(reason("inference"), "0/1 nodes fit: 1 missing device");
    let described = hub.ok(&["describe", "node", "edge-1"]);
    assert!(
        described.contains("instances on this node: 7"),
        "{described}"
    );
    let regions = hub.ok(&["get", "regions"]);
    assert!(
        regions.contains("ap-south") && regions.contains("Mumbai"),
        "{regions}"
    );
    for name in [
        "hello",
        "ticker-eu",
        "report-once",
        "web-1",
        "web-2",
        "pair-a",
        "pair-b",
        "inference",
        "till",
    ] {
        hub.ok(&["delete", "instance", name]);
    }
}

#[test]
fn cli_explains_a_missing_config_and_an_unknown_kind() {
    let d = tmp();
    let out = cli_with(&d.path().join("nope.conf"), &["get", "nodes"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("verge dev") && err.contains("nope.conf"),
        "{err}"
    );
    let hub = Hub::start(d.path());
    let err = String::from_utf8_lossy(&hub.cli(&["get", "pods"]).stderr).into_owned();
    assert!(err.contains("unknown kind 'pods'"), "{err}");
    let err = String::from_utf8_lossy(&hub.cli(&["logs", "ghost"]).stderr).into_owned();
    assert!(err.contains("instance 'ghost' not found"), "{err}");
}

#[test]
fn logs_follow_streams_new_output_through_the_channel() {
    use std::io::{BufRead, BufReader};
    let d = tmp();
    let hub = Hub::start(d.path());
    let _edge = Edge::start(&hub, "edge-1", Some(&hub.token(1)));
    hub.wait_phase("nodes", "edge-1", "Ready", T);
    let m = unique("tick");
    let manifest = format!(
        "kind: Instance\nmetadata: {{name: ticker}}\nspec:\n  form: process\n  process:\n    command: [\"/bin/sh\", \"-c\", \"i=0; while :; do i=$((i+1)); echo {m} $i; sleep 0.2; done\"]\n  terminationGracePeriodSeconds: 1\n"
    );
    assert!(hub.apply(&manifest).status.success());
    hub.wait_phase("instances", "ticker", "Running", T);
    let mut follower = std::process::Command::new(BIN)
        .args([
            "--config",
            hub.admin_conf().to_str().expect("utf8"),
            "logs",
            "-f",
            "ticker",
            "--tail",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("verge logs -f");
    let mut lines = BufReader::new(follower.stdout.take().expect("stdout")).lines();
    let first: u64 = wait_for("first line", T, || {
        lines.next()?.ok()?.rsplit(' ').next()?.parse().ok()
    });
    // Lines written after the follower started keep arriving, in order.
    let mut last = first;
    while last < first + 5 {
        let line = lines.next().expect("stream open").expect("line");
        let n: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("counter");
        assert_eq!(n, last + 1, "no line lost or repeated");
        last = n;
    }
    let _ = follower.kill();
    let _ = follower.wait();
    hub.ok(&["delete", "instance", "ticker"]);
    wait_for("cleanup", T, || pids_with(&m).is_empty().then_some(()));
}

#[test]
fn lists_come_in_pages_with_a_continuation() {
    let dir = tmp();
    let hub = Hub::start(dir.path());
    let manifests: String = (0..12)
        .map(|i| {
            format!(
                "---\nkind: Instance\nmetadata: {{name: page-{i:02}}}\nspec: {{form: process, process: {{command: [sleep, '1']}}, resources: {{memory: 100Ti}}}}\n"
            )
        })
        .collect();
    assert!(hub.apply(&manifests).status.success());
    let token = verge_hub::ClientConfig::load(&hub.admin_conf())
        .expect("admin.conf")
        .token;
    let client = api_client(&hub, None);
    let get = |query: String| -> (u16, serde_json::Value) {
        runtime().block_on(async {
            let r = client
                .get(format!("{}/v1/instances?{query}", hub.url))
                .bearer_auth(&token)
                .send()
                .await
                .expect("send");
            (r.status().as_u16(), r.json().await.unwrap_or_default())
        })
    };
    let mut names = Vec::new();
    let mut query = "limit=5".to_string();
    let mut pages = 0;
    loop {
        let (status, page) = get(query.clone());
        assert_eq!(status, 200, "{page}");
        pages += 1;
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 5);
        names.extend(items.iter().map(|i| {
            i["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }));
        match page["continue"].as_str() {
            Some(next) => query = format!("limit=5&continue={next}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..12).map(|i| format!("page-{i:02}")).collect();
    assert_eq!(names, want);
    // Bad pages are refused, naming the parameter.
    let (status, err) = get("limit=0".into());
    assert_eq!(status, 400);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("limit:"),
        "{err}"
    );
    let (status, err) = get("limit=5&continue=Not_A_Token".into());
    assert_eq!(status, 400);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("continue:"),
        "{err}"
    );
}
