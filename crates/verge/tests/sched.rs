//! The scheduling centre end to end: real hub and edges, placement rules, the
//! inventory ledger and its audit trail, and defragmentation that really moves work.

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

const REGIONS: &str = "kind: Region
metadata: {name: eu-west}
spec: {latitude: 48.8, longitude: 2.3, description: Paris}
---
kind: Region
metadata: {name: eu-central}
spec: {latitude: 50.1, longitude: 8.7}
---
kind: Region
metadata: {name: ap-south}
spec: {latitude: 19.0, longitude: 72.8}
";

fn instance(name: &str, marker: &str, extra: &str) -> String {
    format!(
        "kind: Instance\nmetadata:\n  name: {name}\n  labels: {{app: {name}}}\nspec:\n  form: process\n  process:\n    command: [\"/bin/sh\", \"-c\", \"echo {marker}; while :; do sleep 1; done\"]\n  terminationGracePeriodSeconds: 1\n{extra}"
    )
}

/// Three sites: a small one in Paris, a GPU node in Frankfurt, one in Mumbai.
fn fleet(hub: &Hub) -> Vec<Edge> {
    assert!(hub.apply(REGIONS).status.success());
    let mk = |name: &str, extra: &[&str]| {
        Edge::start_with(
            &hub.url,
            name,
            Some(&hub.token(1)),
            &hub.dir.join(name),
            extra,
        )
    };
    let edges = vec![
        mk(
            "paris-1",
            &[
                "--cpu",
                "1",
                "--label",
                "region=eu-west",
                "--label",
                "city=paris",
                "--label",
                "isp=orange",
            ],
        ),
        mk(
            "frankfurt-1",
            &[
                "--label",
                "region=eu-central",
                "--label",
                "city=frankfurt",
                "--gpu",
                "nvidia-t4=1",
            ],
        ),
        mk(
            "mumbai-1",
            &[
                "--label",
                "region=ap-south",
                "--label",
                "city=mumbai",
                "--label",
                "tier=cloud",
            ],
        ),
    ];
    for e in &edges {
        hub.wait_phase("nodes", &e.name, "Ready", T);
    }
    edges
}

#[test]
fn placement_rules_overflow_devices_and_gangs() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let _edges = fleet(&hub);
    let m = unique("sched");

    // Needs a GPU: only Frankfurt has one.
    assert!(
        hub.apply(&instance(
            "infer",
            &m,
            "  resources: {cpu: 500m, memory: 64Mi, gpus: {nvidia-t4: 1}}\n"
        ))
        .status
        .success()
    );
    assert_eq!(
        hub.wait_phase("instances", "infer", "Running", T)["status"]["node"],
        "frankfurt-1"
    );
    // A second GPU instance has no GPU left, and says so.
    assert!(
        hub.apply(&instance(
            "infer-2",
            &m,
            "  resources: {cpu: 500m, memory: 64Mi, gpus: {nvidia-t4: 1}}\n"
        ))
        .status
        .success()
    );
    let why = wait_for("reason", T, || {
        hub.get_json("instances", "infer-2").and_then(|v| {
            v["status"]["message"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
    });
    assert_eq!(why, "0/3 nodes fit: 3 missing device");

    // Paris is too small for 1.2 CPU: with overflow it goes to the nearest region (Frankfurt, not Mumbai).
    let spill = "  resources: {cpu: 1200m, memory: 64Mi}\n  placement: {regions: [eu-west], overflow: true}\n";
    assert!(hub.apply(&instance("spill", &m, spill)).status.success());
    let v = hub.wait_phase("instances", "spill", "Running", T);
    assert_eq!(v["status"]["node"], "frankfurt-1");
    assert!(
        v["status"]["placement"]
            .as_str()
            .unwrap_or("")
            .contains("overflow: preferred region eu-west is full"),
        "{v}"
    );
    // Without overflow it stays pending and says why.
    let stay = "  resources: {cpu: 1500m, memory: 64Mi}\n  placement: {regions: [eu-west]}\n";
    assert!(hub.apply(&instance("stay", &m, stay)).status.success());
    let why = wait_for("reason", T, || {
        hub.get_json("instances", "stay").and_then(|v| {
            v["status"]["message"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
    });
    assert_eq!(
        why,
        "0/3 nodes fit: 2 in another region, 1 insufficient cpu"
    );

    // Architecture and taints.
    let arm = "  placement: {architecture: aarch64}\n";
    assert!(hub.apply(&instance("arm", &m, arm)).status.success());
    let why = wait_for("reason", T, || {
        hub.get_json("instances", "arm").and_then(|v| {
            v["status"]["message"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
    });
    assert_eq!(why, "0/3 nodes fit: 3 wrong architecture");

    // A gang of three waits until all three exist, then lands together.
    let member = |n: &str| {
        instance(
            n,
            &m,
            "  resources: {cpu: 200m, memory: 32Mi}\n  placement: {gang: {name: trio, size: 3}, antiAffinity: [node], group: trio}\n",
        )
    };
    assert!(hub.apply(&member("trio-a")).status.success());
    assert!(hub.apply(&member("trio-b")).status.success());
    let why = wait_for("gang wait", T, || {
        hub.get_json("instances", "trio-a").and_then(|v| {
            v["status"]["message"]
                .as_str()
                .filter(|s| s.contains("gang") && !s.contains("1/3"))
                .map(str::to_string)
        })
    });
    assert!(why.contains("waiting for gang 'trio': 2/3"), "{why}");
    assert!(hub.get_json("instances", "trio-b").expect("b")["status"]["node"].is_null());
    assert!(hub.apply(&member("trio-c")).status.success());
    let nodes: std::collections::BTreeSet<String> = ["trio-a", "trio-b", "trio-c"]
        .iter()
        .map(|n| {
            hub.wait_phase("instances", n, "Running", T)["status"]["node"]
                .as_str()
                .expect("node")
                .to_string()
        })
        .collect();
    assert_eq!(nodes.len(), 3, "anti-affinity: one member per node");

    // The inventory accounts for all of it, by region and by site.
    let inv: serde_json::Value =
        serde_json::from_str(&hub.ok(&["get", "inventory", "-o", "json"])).expect("json");
    let inv = &inv[0];
    let fr = &inv["report"]["byRegion"]["eu-central"];
    assert_eq!(fr["capacity"]["devices"]["nvidia-t4"], 1);
    assert_eq!(fr["allocated"]["devices"]["nvidia-t4"], 1);
    assert!(fr["allocations"].as_u64().unwrap_or(0) >= 3, "{fr}");
    assert!(inv["report"]["bySite"]["mumbai"]["nodes"] == 1);
    let table = hub.ok(&["get", "inventory"]);
    assert!(
        table.contains("REGION")
            && table.contains("eu-central")
            && table.contains("SITE")
            && table.contains("frankfurt"),
        "{table}"
    );
    // Every change was audited, through the documented states.
    let audit = hub.ok(&["get", "audit"]);
    for want in ["reserve", "allocate", "capacity", "scheduler", "inventory"] {
        assert!(audit.contains(want), "audit lacks {want}:\n{audit}");
    }
    hub.ok(&["delete", "instance", "infer"]);
    wait_for("release audited", T, || {
        hub.ok(&["get", "audit"])
            .contains("instance deleted")
            .then_some(())
    });
    hub.cleanup(
        &[
            "infer-2", "spill", "stay", "arm", "trio-a", "trio-b", "trio-c",
        ],
        &[&m],
    );
}

#[test]
fn defragmentation_plan_moves_work_and_frees_a_node() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let url = hub.url.clone();
    let a = Edge::start_with(
        &url,
        "edge-a",
        Some(&hub.token(1)),
        &d.path().join("edge-a"),
        &[],
    );
    let b = Edge::start_with(
        &url,
        "edge-b",
        Some(&hub.token(1)),
        &d.path().join("edge-b"),
        &[],
    );
    for e in [&a, &b] {
        hub.wait_phase("nodes", &e.name, "Ready", T);
    }
    // Spread puts one small instance on each node: two half-empty nodes.
    let (m1, m2) = (unique("frag1"), unique("frag2"));
    for (n, m) in [("small-1", &m1), ("small-2", &m2)] {
        assert!(
            hub.apply(&instance(
                n,
                m,
                "  resources: {cpu: 200m, memory: 64Mi}\n  placement: {policy: Spread}\n"
            ))
            .status
            .success()
        );
    }
    let n1 = hub.wait_phase("instances", "small-1", "Running", T)["status"]["node"]
        .as_str()
        .expect("node")
        .to_string();
    let n2 = hub.wait_phase("instances", "small-2", "Running", T)["status"]["node"]
        .as_str()
        .expect("node")
        .to_string();
    assert_ne!(n1, n2, "spread used both nodes");

    let report: serde_json::Value =
        serde_json::from_str(&hub.ok(&["sched", "report", "-o", "json"])).expect("json");
    let report = &report[0];
    assert_eq!(
        report["migrations"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(report["nodesFreed"].as_array().map(Vec::len), Some(1));
    assert!(report["after"]["emptyNodes"].as_u64() > report["before"]["emptyNodes"].as_u64());
    assert!(report["capacityByRegion"]["eu-west"]["nodes"] == 2);
    assert_eq!(
        report["before"]["byNode"].as_object().map(|m| m.len()),
        Some(2),
        "fragmentation per node"
    );
    assert!(
        report["before"]["bySite"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
    );
    let text = hub.ok(&["sched", "report"]);
    assert!(
        text.contains("fragmentation") && text.contains("plan: 1 migration"),
        "{text}"
    );

    let moved = report["migrations"][0]["instance"]
        .as_str()
        .expect("instance")
        .to_string();
    let (from, to) = (
        report["migrations"][0]["from"]
            .as_str()
            .expect("from")
            .to_string(),
        report["migrations"][0]["to"]
            .as_str()
            .expect("to")
            .to_string(),
    );
    let marker = if moved == "small-1" { &m1 } else { &m2 };
    let old_pid = pids_with(marker);
    assert_eq!(old_pid.len(), 1);
    let out = hub.ok(&["sched", "defrag", "--apply"]);
    assert!(out.contains("applied 1 migration"), "{out}");
    // The instance now runs on the other node, as a new process; the old one is gone.
    let v = wait_for("moved instance running on the target", T, || {
        hub.get_json("instances", &moved)
            .filter(|v| v["status"]["node"] == to.as_str() && v["status"]["phase"] == "Running")
    });
    assert!(
        v["status"]["placement"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("moved by defragmentation from {from}")),
        "{v}"
    );
    wait_for("exactly one new process", T, || {
        let p = pids_with(marker);
        (p.len() == 1 && p != old_pid).then_some(())
    });
    // The ledger followed: the freed node holds nothing.
    let inv: serde_json::Value =
        serde_json::from_str(&hub.ok(&["get", "inventory", "-o", "json"])).expect("json");
    let ledgers = inv[0]["ledgers"].as_array().cloned().unwrap_or_default();
    let freed = ledgers
        .iter()
        .find(|l| l["node"] == from.as_str())
        .expect("ledger");
    assert_eq!(
        freed["allocations"].as_object().map(|m| m.len()),
        Some(0),
        "{freed}"
    );
    hub.cleanup(&["small-1", "small-2"], &[&m1, &m2]);
}
