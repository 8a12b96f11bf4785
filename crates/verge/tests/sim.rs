//! The fleet simulator at CI size: 2,000 simulated edges (the real agent on the fake
//! runtime, in the simulator's process) against a hub process, for six heartbeat
//! periods, under each scenario that changes what the fleet goes through. Checks the
//! invariants, never timings: every node Ready, every instance Running on a node that
//! exists, none lost, no node falsely NotReady, the operator's API answering.

mod common;

use std::process::Command;

/// `verge sim` with `nodes` edges and as many instances, heartbeats every `heartbeat`,
/// `scenario` for `duration`; its JSON report.
fn sim(scenario: &str, nodes: u32, heartbeat: &str, duration: &str) -> serde_json::Value {
    sim_with(scenario, nodes, heartbeat, duration, &[])
}

/// [`sim`] with more arguments.
fn sim_with(
    scenario: &str,
    nodes: u32,
    heartbeat: &str,
    duration: &str,
    extra: &[&str],
) -> serde_json::Value {
    sim_of(scenario, nodes, nodes, heartbeat, duration, extra)
}

/// [`sim_with`] with `instances` instances (not one per node).
fn sim_of(
    scenario: &str,
    nodes: u32,
    instances: u32,
    heartbeat: &str,
    duration: &str,
    extra: &[&str],
) -> serde_json::Value {
    // One fleet at a time, also under `cargo test` (which runs a binary's tests in
    // parallel threads; nextest runs each alone, `.config/nextest.toml`).
    static FLEET: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FLEET.lock().unwrap_or_else(|e| e.into_inner());
    let (nodes, instances) = (nodes.to_string(), instances.to_string());
    let args = [
        "--nodes",
        &nodes,
        "--instances",
        &instances,
        "--heartbeat",
        heartbeat,
        "--duration",
        duration,
        "--scenario",
        scenario,
    ];
    let out = Command::new(common::BIN)
        .arg("sim")
        .args(args)
        .args(extra)
        .args(["--check", "-o", "json"])
        .output()
        .expect("running verge sim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "verge sim {args:?} failed: {stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verge sim printed no report ({e}): {stderr}"))
}

fn assert_fleet_held(r: &serde_json::Value, nodes: u64, instances: u64) {
    let inv = &r["invariants"];
    assert_eq!(r["invariantsHold"], true, "{r:#}");
    assert_eq!(inv["nodesReady"], nodes, "{r:#}");
    assert_eq!(inv["instancesRunning"], instances, "{r:#}");
    assert_eq!(inv["instancesLost"], 0, "{r:#}");
    // While the hub is killed its API cannot answer: only there may a probe fail.
    if r["scenario"] != "hubrestart" {
        assert_eq!(r["apiErrors"], 0, "{r:#}");
    }
    assert!(r["apiRequests"].as_u64().unwrap_or(0) > 0, "{r:#}");
}

#[test]
fn two_thousand_edges_hold_steady_for_six_heartbeats() {
    let r = sim("steady", 2000, "10s", "60s");
    assert_fleet_held(&r, 2000, 2000);
    // Nothing went NotReady while every edge was up and heartbeating.
    assert_eq!(r["nodesWentNotReady"], 0, "{r:#}");
    // The heartbeats arrived: the hub measured their lag.
    assert!(r["heartbeatLagP99Seconds"].is_number(), "{r:#}");
}

/// Three hub replicas on a three-member etcd (started by the simulator): the fleet
/// spreads over them and holds, with the leader placing every instance.
#[cfg(feature = "etcd")]
#[test]
fn a_fleet_spread_over_three_replicas_on_etcd_holds_steady() {
    let r = sim_with("steady", 600, "5s", "30s", &["--replicas", "3", "--direct"]);
    assert_fleet_held(&r, 600, 600);
    assert_eq!(r["nodesWentNotReady"], 0, "{r:#}");
    assert_eq!(r["hubReplicas"], 3, "{r:#}");
    let each = r["edgesPerReplica"].as_array().expect("edges per replica");
    assert_eq!(each.len(), 3, "{r:#}");
    assert!(
        each.iter().all(|n| n.as_u64().unwrap_or(0) > 60),
        "the edges spread over every replica: {r:#}"
    );
}

/// A restarted hub that takes its fleet back slower than the node grace (here it
/// admits 2 edges a second: 120 take a minute, the grace is 40 s) marks none of the
/// edges still waiting their turn NotReady.
#[test]
fn a_fleet_slower_to_come_back_than_the_grace_is_not_marked_notready() {
    let r = sim_with("hub-restart", 120, "5s", "60s", &["--admit-rate", "2"]);
    assert_fleet_held(&r, 120, 120);
    assert!(
        r["hubRestartToAllConnectedSeconds"].as_f64().unwrap_or(0.0) > 40.0,
        "the fleet took longer than the grace to come back: {r:#}"
    );
    assert_eq!(r["nodesWentNotReady"], 0, "{r:#}");
}

#[test]
fn a_fleet_resyncs_after_a_hub_kill_with_deltas_only() {
    let r = sim("hub-restart", 1000, "5s", "30s");
    assert_fleet_held(&r, 1000, 1000);
    // Every edge resumed from its revision: no snapshot, and so no full re-list.
    assert_eq!(r["syncsSnapshot"], 0, "{r:#}");
    assert!(r["syncsResume"].as_f64().unwrap_or(0.0) >= 1000.0, "{r:#}");
    // And its TLS session, with the ticket the hub before gave it: no certificate
    // signed or verified again.
    assert!(r["tlsResumptions"].as_u64().unwrap_or(0) >= 1000, "{r:#}");
}

/// A restarted hub that takes handshakes at a pace (20 a second here: 300 edges take
/// 15 s): its edges, told of the restart by its stateless resets, come back spread
/// over the time the fleet takes at that pace instead of all at once and then in
/// waves of refusals, and each resumes its TLS session.
#[test]
fn a_restarted_hubs_fleet_comes_back_spread_over_its_pace_and_resumed() {
    let r = sim_with(
        "hub-restart",
        300,
        "5s",
        "40s",
        &["--handshake-rate", "20", "--join-rate", "20"],
    );
    assert_fleet_held(&r, 300, 300);
    // Coming back on its short backoff instead, the same fleet was turned away 635
    // times, and a third of it paid full handshakes (an attempt turned away spends
    // the ticket it offered). Spread out: none turned away, all resumed.
    assert!(r["tlsResumptions"].as_u64().unwrap_or(0) >= 300, "{r:#}");
    let refused = r["connectionsRefused"]["handshake_rate"]
        .as_u64()
        .unwrap_or(0);
    assert!(refused < 100, "turned away {refused} times: {r:#}");
}

#[test]
fn a_cut_off_tenth_of_the_fleet_comes_back_and_nothing_is_lost_or_doubled() {
    let r = sim("partition", 1000, "5s", "20s");
    // Cut off past the grace period, the tenth went NotReady (and only it), and
    // came back; its instances run once each, wherever they are now.
    assert_fleet_held(&r, 1000, 1000);
    let cut = r["partitionedEdges"].as_u64().expect("partitioned edges");
    assert_eq!(cut, 100, "{r:#}");
    let went = r["nodesWentNotReady"].as_u64().expect("count");
    assert!(went >= 1 && went <= cut, "{r:#}");
}

#[test]
fn agents_restarting_all_the_time_lose_nothing() {
    let r = sim("churn", 1000, "5s", "30s");
    assert_fleet_held(&r, 1000, 1000);
    assert!(r["agentRestarts"].as_u64().unwrap_or(0) >= 100, "{r:#}");
    assert_eq!(r["nodesWentNotReady"], 0, "{r:#}");
}

#[test]
fn a_template_change_reaches_every_one_of_two_hundred_clusters_in_its_waves() {
    // No instances of the fleet's own: the scheduler packs them, and a full node
    // rightly leaves its cluster's service Pending.
    let r = sim_of("template", 200, 0, "5s", "10s", &[]);
    assert_fleet_held(&r, 200, 0);
    assert_eq!(r["clusters"], 200, "{r:#}");
    let waves = r["templateRollout"]["waves"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let desired: Vec<u64> = waves.iter().filter_map(|w| w["desired"].as_u64()).collect();
    // The canary cluster, then up to a tenth of them, then the rest: each once.
    assert_eq!(desired, [1, 19, 180], "{r:#}");
    assert_eq!(r["nodesWentNotReady"], 0, "{r:#}");
}
