//! Hub replicas in HA: three real `verge hub` processes on a real three-member etcd
//! cluster (Debian's etcd-server, started here on loopback), with real edges whose
//! `--hub` lists name every replica. The leader is SIGKILLed during a burst of
//! writes, an etcd member is killed, a replica holding edges is killed; logs, exec and
//! artifacts are used across replicas.

#![cfg(feature = "etcd")]
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use verge_testkit::etcd::EtcdCluster;

const T: Duration = Duration::from_secs(60);

/// Three replicas on `etcd` and three edges given all of them.
struct Fleet {
    hubs: Vec<Option<Hub>>,
    _edges: Vec<Edge>,
}

fn start_hub(d: &std::path::Path, i: usize, etcd: &EtcdCluster) -> Hub {
    let port = free_port();
    let advertise = format!("https://127.0.0.1:{port}");
    Hub::start_with(
        &d.join(format!("h{i}")),
        port,
        &["--store", &etcd.url(), "--advertise", &advertise],
    )
}

fn fleet(d: &std::path::Path, etcd: &EtcdCluster) -> Fleet {
    // One at a time: the first records the CA the others take.
    let hubs: Vec<Hub> = (0..3).map(|i| start_hub(d, i, etcd)).collect();
    let token = hubs[0].token(3);
    let urls: Vec<String> = hubs.iter().map(|h| h.url.clone()).collect();
    let edges = (0..3)
        .map(|i| {
            let name = format!("ha-{i}");
            Edge::start_with(
                &urls[0],
                &name,
                Some(&token),
                &d.join(&name),
                &[
                    "--hub",
                    &urls[1],
                    "--hub",
                    &urls[2],
                    "--spread-hubs",
                    "--label",
                    &format!("site={name}"),
                ],
            )
        })
        .collect();
    for i in 0..3 {
        hubs[0].wait_phase("nodes", &format!("ha-{i}"), "Ready", T);
    }
    Fleet {
        hubs: hubs.into_iter().map(Some).collect(),
        _edges: edges,
    }
}

impl Fleet {
    fn hub(&self, i: usize) -> &Hub {
        self.hubs[i].as_ref().expect("that replica runs")
    }

    /// Some live replica.
    fn any(&self) -> &Hub {
        self.hubs.iter().flatten().next().expect("a replica runs")
    }

    /// Index of the replica with id `id`.
    fn index_of(&self, id: &str) -> usize {
        (0..3)
            .find(|&i| self.hubs[i].is_some() && replicas(self.hub(i))["self"] == id)
            .expect("a live replica has that id")
    }
}

/// `GET /v1/replicas` of `hub`.
fn replicas(hub: &Hub) -> serde_json::Value {
    let conf = verge_hub::ClientConfig::load(&hub.admin_conf()).expect("admin.conf");
    runtime().block_on(async {
        api_client(hub, None)
            .get(format!("{}/v1/replicas", hub.url))
            .bearer_auth(conf.token)
            .send()
            .await
            .expect("send")
            .json::<serde_json::Value>()
            .await
            .expect("json")
    })
}

/// `verge_hub_syncs_total{kind=KIND}` of `hub`.
fn syncs(hub: &Hub, kind: &str) -> u64 {
    hub.metric(&format!("verge_hub_syncs_total{{kind=\"{kind}\"}}"))
}

fn leader(hub: &Hub) -> Option<String> {
    replicas(hub)["leader"].as_str().map(str::to_string)
}

/// The leader dies mid-burst: another leads within 5 s, every acknowledged write is
/// there once, new work is placed, an etcd member dies too, and nothing restarts.
#[test]
fn the_leader_dies_during_a_burst_of_writes_and_nothing_is_lost_doubled_or_restarted() {
    let d = test_dir();
    let mut etcd = EtcdCluster::start(3);
    let mut f = fleet(d.path(), &etcd);
    let markers: Vec<String> = (0..3).map(|i| unique(&format!("ha-w{i}"))).collect();
    for (i, m) in markers.iter().enumerate() {
        assert!(
            f.hub(i)
                .apply(&sleeper(&format!("w{i}"), m))
                .status
                .success()
        );
    }
    let pids: Vec<u64> = (0..3)
        .map(|i| f.any().running_pid(&format!("w{i}")))
        .collect();
    let leader_id = leader(f.hub(0)).expect("a leader");
    let li = f.index_of(&leader_id);
    // Operators see the replicas, the leader, and the edges each holds.
    let table = f.hub(0).ok(&["get", "replicas"]);
    assert_eq!(table.matches("leader").count(), 1, "{table}");
    assert_eq!(table.matches("follower").count(), 2, "{table}");
    // A write through a replica that does not lead reaches the leader's scheduler
    // through the store watch at once, not at its 5 s fallback timer.
    let follower = f.hub((li + 1) % 3);
    let quick = unique("ha-quick");
    let applied = Instant::now();
    assert!(follower.apply(&sleeper("quick", &quick)).status.success());
    wait_for("quick placed", Duration::from_secs(3), || {
        follower.get_json("instances", "quick")?["status"]["node"]
            .as_str()
            .map(drop)
    });
    eprintln!(
        "placed {:?} after a write through a follower",
        applied.elapsed()
    );

    // A burst of creates through every replica; the leader is killed in the middle.
    // A create that got an answer is acknowledged; one cut off is not.
    let mut acked = Vec::new();
    let mut killed_at = None;
    for n in 0..60 {
        if n == 20 {
            f.hubs[li].as_mut().expect("leader").proc.kill();
            f.hubs[li] = None;
            killed_at = Some(Instant::now());
        }
        let live: Vec<usize> = (0..3).filter(|&i| f.hubs[i].is_some()).collect();
        let hub = f.hub(live[n % live.len()]);
        let name = format!("burst-{n}");
        let region = format!(
            "kind: Region\nmetadata:\n  name: {name}\nspec: {{latitude: 1.0, longitude: 2.0}}\n"
        );
        if hub.apply(&region).status.success() {
            acked.push(name);
        }
    }
    let killed_at = killed_at.expect("killed");
    // Another replica leads within 5 s of the kill.
    let new_leader = wait_for("a new leader", Duration::from_secs(5), || {
        leader(f.any()).filter(|l| *l != leader_id)
    });
    let takeover = killed_at.elapsed();
    eprintln!("new leader {new_leader} {takeover:?} after the old one was killed");
    assert!(takeover < Duration::from_secs(5), "{takeover:?}");
    // Every acknowledged write is there once, at its first version.
    let regions = f.any().list_json("regions");
    for name in &acked {
        let copies: Vec<_> = regions
            .iter()
            .filter(|r| r["metadata"]["name"] == name.as_str())
            .collect();
        assert_eq!(copies.len(), 1, "{name}");
        assert_eq!(
            copies[0]["metadata"]["generation"], 1,
            "{name} applied once"
        );
    }
    assert!(
        acked.len() >= 50,
        "only {} of 60 writes acknowledged",
        acked.len()
    );

    // The new leader places new work.
    let fresh = unique("ha-after");
    assert!(f.any().apply(&sleeper("after", &fresh)).status.success());
    f.any().running_pid("after");

    // An etcd member dies: the replicas keep serving reads, writes and placements.
    etcd.kill(2);
    let later = unique("ha-later");
    let out = f.any().apply(&sleeper("later", &later));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.any().running_pid("later");

    // Through all of it no workload restarted: watched across many heartbeats.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        for (i, m) in markers.iter().enumerate() {
            assert_eq!(
                pids_with(m),
                vec![pids[i] as u32],
                "w{i} kept running, once"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for i in 0..3 {
        f.any().wait_phase("nodes", &format!("ha-{i}"), "Ready", T);
    }
    let names: Vec<&str> = ["w0", "w1", "w2", "after", "later", "quick"].to_vec();
    let all: Vec<&str> = markers
        .iter()
        .map(String::as_str)
        .chain([fresh.as_str(), later.as_str(), quick.as_str()])
        .collect();
    for n in &names {
        let _ = f.any().cli(&["delete", "instance", n]);
    }
    wait_for("every workload stopped", T, || {
        let left: Vec<&&str> = all.iter().filter(|m| !pids_with(m).is_empty()).collect();
        if !left.is_empty() {
            eprintln!(
                "still running: {left:?}; sessions {}",
                replicas(f.any())["sessions"]
            );
        }
        left.is_empty().then_some(())
    });
}

/// A replica holding edges dies: they move to the others with their workloads
/// untouched. Before that, logs and exec reach an edge through a replica it is not
/// connected to, and an artifact pushed through one replica is served by another.
#[test]
fn a_replica_dies_and_its_edges_move_while_streams_and_artifacts_work_across_replicas() {
    let d = test_dir();
    let etcd = EtcdCluster::start(3);
    let mut f = fleet(d.path(), &etcd);
    let marker = unique("ha-s");
    assert!(f.hub(0).apply(&sleeper("s", &marker)).status.success());
    let pid = f.hub(0).running_pid("s");
    let inst = f.hub(0).get_json("instances", "s").expect("s");
    let node = inst["status"]["node"].as_str().expect("bound").to_string();
    let sessions = replicas(f.hub(0))["sessions"].clone();
    let holder = f.index_of(sessions[&node].as_str().expect("a session"));
    let other = (holder + 1) % 3;

    // Logs and exec through a replica the edge is not connected to.
    let logs = f.hub(other).ok(&["logs", "s"]);
    assert!(logs.contains(&format!("started {marker}")), "{logs}");
    let out = f.hub(other).ok(&["exec", "s", "--", "echo", "from-afar"]);
    assert!(out.contains("from-afar"), "{out}");

    // Each replica holds the metrics of the edges it serves; any replica answers for
    // all of them.
    for i in 0..3 {
        wait_for("every edge's metrics through one replica", T, || {
            let v: serde_json::Value =
                serde_json::from_str(&f.hub(i).ok(&["top", "nodes", "-o", "json"])).ok()?;
            let nodes: Vec<&str> = v
                .as_array()?
                .iter()
                .filter_map(|r| r["node"].as_str())
                .collect();
            (nodes == ["ha-0", "ha-1", "ha-2"]).then_some(())
        });
    }

    // An instance reaches another one's port on an edge held by another replica:
    // the relay goes through both replicas.
    let sessions_now = replicas(f.hub(0))["sessions"].clone();
    let by_hub = |n: usize| {
        sessions_now[format!("ha-{n}").as_str()]
            .as_str()
            .map(str::to_string)
    };
    // (Edges spread by a hash of their names: ha-0 and ha-1 land on different ones.)
    let (a, b) = (0..3)
        .flat_map(|a| (0..3).map(move |b| (a, b)))
        .find(|&(a, b)| by_hub(a).is_some() && by_hub(b).is_some() && by_hub(a) != by_hub(b))
        .expect("edges on two replicas");
    let relayed = unique("ha-r");
    {
        let port = echo_server();
        let local = free_port();
        let pinned = |name: &str, site: usize, extra: String| {
            format!(
                "kind: Instance\nmetadata:\n  name: {name}\n  labels: {{app: shop}}\nspec:\n  form: process\n  process:\n    command: [\"/bin/sh\", \"-c\", \"echo started {relayed}; while :; do sleep 1; done\"]\n  resources: {{cpu: 100m, memory: 16Mi}}\n  terminationGracePeriodSeconds: 2\n  placement: {{nodeSelector: {{site: ha-{site}}}}}\n{extra}"
            )
        };
        let svc = pinned(
            "svc",
            b,
            format!("  ports: [{{name: echo, port: {port}}}]\n"),
        );
        let client = pinned(
            "client",
            a,
            format!("  links: [{{instance: svc, port: {port}, localPort: {local}}}]\n"),
        );
        for m in [&svc, &client] {
            assert!(f.hub(0).apply(m).status.success());
        }
        f.hub(0).running_pid("svc");
        f.hub(0).running_pid("client");
        let addr = format!("127.0.0.1:{local}");
        wait_for("the relay across replicas", T, || {
            std::net::TcpStream::connect(&addr).ok()?;
            (round_trip(&addr, b"across replicas") == b"across replicas").then_some(())
        });
        f.hub(0).cleanup(&["svc", "client"], &[&relayed]);
    }

    // Plans of the scheduling centre are answered through any replica (made by the
    // leader).
    let report = f.hub(other).ok(&["sched", "report"]);
    assert!(!report.trim().is_empty());

    // An artifact pushed through one replica is served by the others.
    let file = d.path().join("blob.bin");
    std::fs::write(&file, b"verge artifact across replicas").expect("write");
    let digest = f
        .hub(holder)
        .ok(&["artifact", "push", file.to_str().expect("utf8")])
        .trim()
        .to_string();
    wait_for("the artifact on another replica", T, || {
        f.hub(other)
            .ok(&["artifact", "list"])
            .contains(&digest)
            .then_some(())
    });

    // The replica holding the edge dies; its edges move, resuming from their
    // revision (no snapshot), and nothing restarts.
    let live: Vec<usize> = (0..3).filter(|&i| i != holder).collect();
    let snapshots: u64 = live.iter().map(|&i| syncs(f.hub(i), "snapshot")).sum();
    let resumes: u64 = live.iter().map(|&i| syncs(f.hub(i), "resume")).sum();
    f.hubs[holder].as_mut().expect("holder").proc.kill();
    f.hubs[holder] = None;
    let dead_id = sessions[&node].as_str().expect("id").to_string();
    wait_for("the edge on another replica", T, || {
        let s = replicas(f.any())["sessions"][&node]
            .as_str()
            .map(str::to_string);
        s.filter(|h| *h != dead_id)
    });
    f.any().wait_phase("nodes", &node, "Ready", T);
    let snapshots_after: u64 = live.iter().map(|&i| syncs(f.hub(i), "snapshot")).sum();
    let resumes_after: u64 = live.iter().map(|&i| syncs(f.hub(i), "resume")).sum();
    assert_eq!(
        snapshots_after, snapshots,
        "moved edges resume, they are not re-sent everything"
    );
    assert!(resumes_after > resumes, "{resumes} -> {resumes_after}");
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(pids_with(&marker), vec![pid as u32], "s kept running, once");
        std::thread::sleep(Duration::from_millis(250));
    }
    let logs = f.any().ok(&["logs", "s"]);
    assert!(logs.contains(&format!("started {marker}")), "{logs}");
    f.any().cleanup(&["s"], &[&marker]);
}
