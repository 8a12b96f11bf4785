//! The region tier: a centre, a region hub whose uplink to it goes through the test
//! kit's fault proxy, and edges on the region. Real processes throughout.

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use verge_testkit::{FaultProxy, Faults};

const T: Duration = Duration::from_secs(60);

/// A sleeper placed in region `eu-west`, with `extra` spec lines.
fn placed(name: &str, marker: &str, extra: &str) -> String {
    format!(
        "{}  placement: {{region: eu-west}}\n{extra}",
        sleeper(name, marker)
    )
}

fn field(hub: &Hub, kind: &str, name: &str, path: &[&str]) -> Option<String> {
    let v = hub.get_json(kind, name)?;
    let mut at = &v;
    for p in path {
        at = &at[*p];
    }
    at.as_str().map(str::to_string)
}

fn command_of(hub: &Hub, name: &str) -> String {
    hub.get_json("instances", name)
        .map(|v| v["spec"]["process"]["command"].to_string())
        .unwrap_or_default()
}

#[test]
fn a_region_keeps_working_while_cut_off_from_its_centre_and_converges_after() {
    let rt = runtime();
    let d = test_dir();
    let centre = Hub::start(&d.path().join("centre"));
    assert!(
        centre
            .apply(
                "kind: Region\nmetadata: {name: eu-west}\nspec: {latitude: 48.8, longitude: 2.3}\n"
            )
            .status
            .success()
    );
    // Edges enrol at the centre (labelled region=eu-west by the test kit).
    let token = centre.token(2);
    for n in ["r1", "r2"] {
        let mut e = Edge::start_with(&centre.url, n, Some(&token), &d.path().join(n), &[]);
        centre.wait_phase("nodes", n, "Ready", T);
        e.proc.kill();
    }
    // The region hub enrols with a region token, through the proxy that will cut it off.
    let upstream = format!("127.0.0.1:{}", centre.port).parse().expect("addr");
    let p: FaultProxy = rt
        .block_on(FaultProxy::start_with_udp(upstream))
        .expect("proxy");
    let region_token = centre
        .ok(&["token", "create", "--region", "eu-west"])
        .trim()
        .to_string();
    let refused = centre.cli(&["token", "create", "--region", "eu-west", "--node", "x"]);
    assert!(!refused.status.success());
    let region_port = free_port();
    let region_args = [
        "--region",
        "eu-west",
        "--upstream",
        &p.url(),
        "--join-token",
        &region_token,
    ];
    let region = Hub::start_with(&d.path().join("region"), region_port, &region_args);
    // The same edges move to the region without enrolling again.
    let _r1 = Edge::start_in(&region.url, "r1", None, &d.path().join("r1"));
    let _r2 = Edge::start_in(&region.url, "r2", None, &d.path().join("r2"));
    region.wait_phase("nodes", "r1", "Ready", T);
    region.wait_phase("nodes", "r2", "Ready", T);
    let eu = centre.get_json("regions", "eu-west").expect("region");
    assert_eq!(eu["status"]["hub"]["connected"], true, "{eu}");
    // A new edge enrols through the region hub, which carries the request to the
    // centre, where tokens and enrolments are kept.
    let _r3 = Edge::start_with(
        &region.url,
        "r3",
        Some(&centre.token(1)),
        &d.path().join("r3"),
        &[],
    );
    region.wait_phase("nodes", "r3", "Ready", T);
    centre.wait_phase("nodes", "r3", "Ready", T);

    // Written at the centre, placed by the region, running on a region node, and the
    // status is back at the centre.
    let web = unique("web");
    assert!(centre.apply(&placed("web", &web, "")).status.success());
    region.running_pid("web");
    let on = centre.wait_phase("instances", "web", "Running", T)["status"]["node"]
        .as_str()
        .expect("node")
        .to_string();
    assert!(on == "r1" || on == "r2", "{on}");
    assert_eq!(pids_with(&web).len(), 1);
    // Logs and exec of an instance on a region's edge, asked of the centre, travel
    // through the region hub's uplink.
    // (The sessions the edges left at the centre when they moved go quiet first.)
    let logs = wait_for("logs through the region", T, || {
        let out = centre.cli(&["logs", "web"]);
        let l = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success() && l.contains(&format!("started {web}"))).then_some(l)
    });
    assert!(logs.contains(&web), "{logs}");
    let out = centre.ok(&["exec", "web", "--", "echo", "through the region"]);
    assert!(out.contains("through the region"), "{out}");
    // One more, to be deleted at the region while it is cut off.
    let old = unique("old");
    assert!(centre.apply(&placed("old-1", &old, "")).status.success());
    centre.wait_phase("instances", "old-1", "Running", T);
    // A region refuses what is not placed in it.
    let elsewhere = region.apply(&sleeper("stray", &unique("stray")));
    assert!(!elsewhere.status.success());
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains("serves region 'eu-west'"),
        "{}",
        String::from_utf8_lossy(&elsewhere.stderr)
    );

    // Cut the region off from its centre.
    p.set(Faults {
        blackhole: true,
        ..Default::default()
    });
    wait_for("the region notices", T, || {
        (region.metric("verge_hub_uplink_connected") == 0).then_some(())
    });
    // Reads, restarts and region-scoped writes go on at the region.
    let pid = pids_with(&web)[0];
    kill_pid(pid);
    wait_for("web restarted by its node", T, || {
        let v = region.get_json("instances", "web")?;
        (v["status"]["restarts"].as_u64() >= Some(1) && v["status"]["phase"] == "Running")
            .then_some(())
    });
    let local = unique("local");
    assert!(
        region
            .apply(&placed("local-1", &local, ""))
            .status
            .success()
    );
    region.running_pid("local-1");
    region.ok(&["delete", "instance", "old-1"]);
    wait_for("old-1 stopped", T, || {
        pids_with(&old).is_empty().then_some(())
    });
    // Both tiers change `web` meanwhile: the centre's write will win.
    let (by_region, by_centre) = (unique("webr"), unique("webc"));
    assert!(
        region
            .apply(&placed("web", &by_region, ""))
            .status
            .success()
    );
    wait_for("the region runs its change", T, || {
        (pids_with(&by_region).len() == 1).then_some(())
    });
    assert!(
        centre
            .apply(&placed("web", &by_centre, ""))
            .status
            .success()
    );
    assert!(centre.get_json("instances", "local-1").is_none());

    // Heal: the region's new instance goes up, the centre's change comes down over
    // the region's, and the loser is on record at both tiers.
    p.set(Faults::default());
    wait_for("local-1 at the centre, running", T, || {
        let v = centre.get_json("instances", "local-1")?;
        (v["status"]["phase"] == "Running").then_some(())
    });
    let uid_here = field(&region, "instances", "local-1", &["metadata", "uid"]);
    assert_eq!(
        field(&centre, "instances", "local-1", &["metadata", "uid"]),
        uid_here,
        "the same object, not a copy"
    );
    wait_for("the centre's web runs at the region", T, || {
        (pids_with(&by_centre).len() == 1 && pids_with(&by_region).is_empty()).then_some(())
    });
    assert!(command_of(&region, "web").contains(&by_centre));
    assert!(command_of(&centre, "web").contains(&by_centre));
    // The delete made at the region reached the centre, and nothing brought it back.
    wait_for("old-1 deleted at the centre", T, || {
        centre
            .get_json("instances", "old-1")
            .is_none()
            .then_some(())
    });
    assert!(pids_with(&old).is_empty());
    for hub in [&centre, &region] {
        let c = hub.ok(&["get", "conflicts"]);
        assert!(c.contains("instances/web") && c.contains("centre"), "{c}");
    }
    // One copy of each, and it stays so across heartbeats.
    for _ in 0..10 {
        assert_eq!(pids_with(&local).len(), 1);
        assert_eq!(pids_with(&by_centre).len(), 1);
        std::thread::sleep(Duration::from_millis(300));
    }
    // The region resumed from its revision after the heal: one whole slice, at its
    // first connection only.
    let log = region.proc.log_text();
    assert_eq!(
        log.matches("the whole slice from the centre").count(),
        1,
        "{log}"
    );

    // A region outage: the region hub dies. Its edges run on by themselves; when it
    // is back they resume with it, and nothing restarts. The uplink resumes too.
    let (pid_local, pid_web) = (pids_with(&local), pids_with(&by_centre));
    let mut region = region;
    region.proc.kill();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(pids_with(&local), pid_local);
    assert_eq!(pids_with(&by_centre), pid_web);
    let region = Hub::start_with(&d.path().join("region"), region_port, &region_args);
    for n in ["r1", "r2", "r3"] {
        region.wait_phase("nodes", n, "Ready", T);
    }
    wait_for("the uplink back", T, || {
        (region.metric("verge_hub_uplink_connected") == 1).then_some(())
    });
    region.wait_phase("instances", "local-1", "Running", T);
    for _ in 0..10 {
        assert_eq!(pids_with(&local), pid_local, "not restarted");
        assert_eq!(pids_with(&by_centre), pid_web, "not restarted");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        !region
            .proc
            .log_text()
            .contains("the whole slice from the centre"),
        "the restarted region hub resumed from its revision"
    );
    region.cleanup(&["local-1"], &[&local]);
    centre.cleanup(&["web"], &[&by_centre, &web, &by_region]);
}
