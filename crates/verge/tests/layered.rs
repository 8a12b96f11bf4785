//! Layered control when links fail: nodes cut off from the hub, instances lost and
//! replaced, and the copy that stays when a node comes back. Real hub and edge
//! processes, the test kit's fault proxy on the links that fail, and a recorded
//! history of what was observed, checked after the heal.

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use verge_testkit::{FaultProxy, Faults};

const T: Duration = Duration::from_secs(30);

/// A sleeper with a disconnect policy.
fn with_policy(name: &str, marker: &str, policy: &str) -> String {
    format!("{}  disconnect: {policy}\n", sleeper(name, marker))
}

/// One observation: where the hub says each instance is, and which processes carry
/// each instance's marker.
#[derive(Debug, Clone)]
struct Seen {
    /// Since the history began.
    at: Duration,
    /// Instance → (node, phase).
    bound: BTreeMap<String, (String, String)>,
    /// Instance → pids of its workload on this machine (every node's).
    pids: BTreeMap<String, Vec<u32>>,
}

/// Everything observed during a test, in order (a Jepsen-style history: the checks
/// run over it after the heal).
struct History {
    start: Instant,
    markers: BTreeMap<String, String>,
    seen: Vec<Seen>,
}

impl History {
    fn new(markers: &[(&str, &str)]) -> Self {
        Self {
            start: Instant::now(),
            markers: markers
                .iter()
                .map(|(i, m)| (i.to_string(), m.to_string()))
                .collect(),
            seen: Vec::new(),
        }
    }

    fn observe(&mut self, hub: &Hub) -> &Seen {
        let mut bound = BTreeMap::new();
        for i in hub.list_json("instances") {
            let s = &i["status"];
            bound.insert(
                i["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                (
                    s["node"].as_str().unwrap_or_default().to_string(),
                    s["phase"].as_str().unwrap_or_default().to_string(),
                ),
            );
        }
        let pids = self
            .markers
            .iter()
            .map(|(i, m)| (i.clone(), pids_with(m)))
            .collect();
        self.seen.push(Seen {
            at: self.start.elapsed(),
            bound,
            pids,
        });
        self.seen.last().expect("just pushed")
    }

    /// Observe until `f` holds.
    fn until(&mut self, hub: &Hub, what: &str, timeout: Duration, f: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if f(self.observe(hub)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last seen: {:?}",
                self.seen.last()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Observe for `d`, checking `f` every time.
    fn hold(&mut self, hub: &Hub, what: &str, d: Duration, f: impl Fn(&Seen) -> bool) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let s = self.observe(hub).clone();
            assert!(f(&s), "{what} stopped holding after {:?}: {s:?}", s.at);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether `pid` ran from its first sighting to the end (a process stopped and
    /// started again has a new pid).
    fn ran_throughout(&self, instance: &str, pid: u32) -> bool {
        let first = self
            .seen
            .iter()
            .position(|s| s.pids.get(instance).is_some_and(|p| p.contains(&pid)));
        first.is_some_and(|f| {
            self.seen[f..]
                .iter()
                .all(|s| s.pids.get(instance).is_some_and(|p| p.contains(&pid)))
        })
    }

    /// Every pid ever seen for `instance`.
    fn all_pids(&self, instance: &str) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .seen
            .iter()
            .flat_map(|s| s.pids.get(instance).cloned().unwrap_or_default())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

fn on(s: &Seen, instance: &str, node: &str, phase: &str) -> bool {
    s.bound.get(instance) == Some(&(node.to_string(), phase.to_string()))
}

fn copies(s: &Seen, instance: &str) -> usize {
    s.pids.get(instance).map_or(0, Vec::len)
}

#[test]
fn a_node_cut_off_past_lost_after_is_replaced_and_one_copy_stays_when_it_returns() {
    let rt = runtime();
    let d = test_dir();
    let hub = Hub::start(d.path());
    let upstream = format!("127.0.0.1:{}", hub.port).parse().expect("addr");
    let p: FaultProxy = rt.block_on(FaultProxy::start(upstream)).expect("proxy");
    // `far` reaches the hub through the proxy; `near` directly.
    let _far = Edge::start_with(
        &p.url(),
        "far",
        Some(&hub.token(1)),
        &d.path().join("far"),
        &[],
    );
    hub.wait_phase("nodes", "far", "Ready", T);
    let (orig_m, repl_m, stay_m) = (unique("orig"), unique("repl"), unique("stay"));
    let instances = [
        ("keep-orig", orig_m.as_str()),
        ("keep-repl", repl_m.as_str()),
        ("stay", stay_m.as_str()),
    ];
    let policies = [
        "{lostAfterSeconds: 1, reconcile: keepOriginal}",
        "{lostAfterSeconds: 1, reconcile: keepReplacement}",
        "{lostAfterSeconds: 1, replace: false}",
    ];
    for ((name, marker), policy) in instances.iter().zip(policies) {
        assert!(
            hub.apply(&with_policy(name, marker, policy))
                .status
                .success()
        );
    }
    let mut h = History::new(&instances);
    h.until(&hub, "all three running on far", T, |s| {
        instances
            .iter()
            .all(|(i, _)| on(s, i, "far", "Running") && copies(s, i) == 1)
    });
    let first = h.seen.last().expect("seen").pids.clone();
    let _near = Edge::start(&hub, "near", Some(&hub.token(1)));
    hub.wait_phase("nodes", "near", "Ready", T);

    // Cut `far` off. Its workloads keep running; after the grace (3 s) and
    // lostAfterSeconds (1 s) two are replaced on `near`, one is only marked Lost.
    p.set(Faults {
        blackhole: true,
        ..Default::default()
    });
    h.until(&hub, "replacements running on near", T, |s| {
        on(s, "keep-orig", "near", "Running")
            && on(s, "keep-repl", "near", "Running")
            && on(s, "stay", "far", "Lost")
            && copies(s, "keep-orig") == 2
            && copies(s, "keep-repl") == 2
    });
    let during = h.seen.last().expect("seen").pids.clone();
    let replacement = |i: &str| {
        during[i]
            .iter()
            .copied()
            .find(|p| !first[i].contains(p))
            .expect("a new pid")
    };
    let (repl_of_orig, repl_of_repl) = (replacement("keep-orig"), replacement("keep-repl"));

    // Heal. `far` returns: keep-orig is bound back to it (its copy there was never
    // stopped, the one on `near` is), keep-repl stays on `near` (far's copy stops),
    // and `stay` carries on where it was.
    p.set(Faults::default());
    h.until(&hub, "one copy of each after the heal", T, |s| {
        on(s, "keep-orig", "far", "Running")
            && on(s, "keep-repl", "near", "Running")
            && on(s, "stay", "far", "Running")
            && instances.iter().all(|(i, _)| copies(s, i) == 1)
    });
    // And it stays so, across several heartbeats (500 ms) and node grace periods.
    h.hold(
        &hub,
        "one copy each, where it was kept",
        Duration::from_secs(8),
        |s| {
            on(s, "keep-orig", "far", "Running")
                && on(s, "keep-repl", "near", "Running")
                && on(s, "stay", "far", "Running")
                && instances.iter().all(|(i, _)| copies(s, i) == 1)
        },
    );

    // Over the whole history: the originals kept ran throughout (never restarted
    // because the link came back), the replacement kept ran from its start, and no
    // instance ever had more than the two copies a partition allows.
    let last = h.seen.last().expect("seen").pids.clone();
    assert_eq!(last["keep-orig"], first["keep-orig"]);
    assert!(h.ran_throughout("keep-orig", first["keep-orig"][0]));
    assert_eq!(last["stay"], first["stay"]);
    assert!(h.ran_throughout("stay", first["stay"][0]));
    assert_eq!(last["keep-repl"], vec![repl_of_repl]);
    assert!(h.ran_throughout("keep-repl", repl_of_repl));
    assert!(!last["keep-orig"].contains(&repl_of_orig));
    for (i, _) in &instances {
        assert!(
            h.seen.iter().all(|s| copies(s, i) <= 2),
            "{i}: {:?}",
            h.all_pids(i)
        );
    }
    assert_eq!(
        h.all_pids("stay").len(),
        1,
        "never replaced, never restarted"
    );
    assert_eq!(
        h.all_pids("keep-orig").len(),
        2,
        "the original and one replacement"
    );
    assert_eq!(
        h.all_pids("keep-repl").len(),
        2,
        "the original and one replacement"
    );
    let orig = hub.get_json("instances", "keep-orig").expect("instance");
    assert!(orig["status"]["original"].is_null(), "{orig}");
    hub.cleanup(
        &["keep-orig", "keep-repl", "stay"],
        &[&orig_m, &repl_m, &stay_m],
    );
}

#[test]
fn a_node_its_site_peers_still_reach_is_not_replaced_and_one_really_down_is() {
    let rt = runtime();
    let d = test_dir();
    let hub = Hub::start(d.path());
    let upstream = format!("127.0.0.1:{}", hub.port).parse().expect("addr");
    let p: FaultProxy = rt.block_on(FaultProxy::start(upstream)).expect("proxy");
    let site = ["--label", "site=depot-7", "--peer-listen", "127.0.0.1:0"];
    // `a` reaches the hub through the proxy; its peers `b` and `c` directly. The
    // peers probe each other directly, whatever the hub link does.
    let mut a = Edge::start_with(
        &p.url(),
        "a",
        Some(&hub.token(1)),
        &d.path().join("a"),
        &site,
    );
    hub.wait_phase("nodes", "a", "Ready", T);
    let m = unique("voted");
    let policy = "{lostAfterSeconds: 1}";
    assert!(hub.apply(&with_policy("w", &m, policy)).status.success());
    let pid = hub.running_pid("w");
    let _b = Edge::start_with(
        &hub.url,
        "b",
        Some(&hub.token(1)),
        &d.path().join("b"),
        &site,
    );
    let _c = Edge::start_with(
        &hub.url,
        "c",
        Some(&hub.token(1)),
        &d.path().join("c"),
        &site,
    );
    wait_for("b and c reach a", T, || {
        ["b", "c"]
            .iter()
            .all(|n| {
                hub.get_json("nodes", n).is_some_and(|v| {
                    v["status"]["phase"] == "Ready" && v["status"]["peers"]["a"] == "reachable"
                })
            })
            .then_some(())
    });
    let mut h = History::new(&[("w", m.as_str())]);

    // Cut off: the hub no longer hears `a`, its peers still do. The instance is
    // Unknown, never lost, across several grace periods (3 s) and lostAfter (1 s).
    p.set(Faults {
        blackhole: true,
        ..Default::default()
    });
    hub.wait_phase("nodes", "a", "NotReady", T);
    h.until(&hub, "w unknown on a", T, |s| on(s, "w", "a", "Unknown"));
    let w = hub.get_json("instances", "w").expect("w");
    assert!(
        w["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 of its 2 site peers reach it")),
        "{w}"
    );
    h.hold(
        &hub,
        "not replaced while the peers reach a",
        Duration::from_secs(10),
        |s| on(s, "w", "a", "Unknown") && s.pids["w"] == vec![pid as u32],
    );
    p.set(Faults::default());
    h.until(&hub, "w running on a again", T, |s| {
        on(s, "w", "a", "Running")
    });
    assert!(h.ran_throughout("w", pid as u32), "never restarted");

    // Really down: the agent and its workload die, and no one answers probes. The
    // peers say so, and the instance is replaced after lostAfter.
    a.proc.kill();
    kill_pid(pid as u32);
    h.until(&hub, "w replaced on a peer", Duration::from_secs(60), |s| {
        (on(s, "w", "b", "Running") || on(s, "w", "c", "Running")) && copies(s, "w") == 1
    });
    for n in ["b", "c"] {
        let v = hub.get_json("nodes", n).expect("node");
        assert_eq!(v["status"]["peers"]["a"], "unreachable", "{v}");
    }
    hub.cleanup(&["w"], &[&m]);
}
