//! The node's Resource Manager end to end: cgroup limits hold (a memory hog is killed
//! and says why), the node refuses to over-commit even when told to run something,
//! and usage is measured and reported.

#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(45);

fn process(name: &str, memory: &str, script: &str, extra: &str) -> String {
    format!(
        "kind: Instance\nmetadata: {{name: {name}}}\nspec:\n  form: process\n  process:\n    command: [perl, -e, '{script}']\n  resources: {{cpu: 500m, memory: {memory}}}\n  terminationGracePeriodSeconds: 1\n{extra}"
    )
}

#[test]
fn a_memory_hog_is_stopped_by_its_limit_and_says_so() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let _edge = Edge::start(&hub, "rm-1", Some(&hub.token(1)));
    // 32 MiB allowed; it tries to hold 256 MiB.
    let hog = process(
        "hog",
        "32Mi",
        "$x = \"a\" x (256 * 1024 * 1024); sleep 60",
        "  restartPolicy: Never\n",
    );
    assert!(hub.apply(&hog).status.success());
    let failed = hub.wait_phase("instances", "hog", "Failed", T);
    let msg = failed["status"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("killed by signal 9") && msg.contains("out of memory") && msg.contains("32Mi"),
        "{failed}"
    );
}

#[test]
fn the_node_refuses_to_over_commit_and_reports_usage() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let _edge = Edge::start(&hub, "rm-2", Some(&hub.token(1)));
    hub.wait_phase("nodes", "rm-2", "Ready", T);
    // Holds 48 MiB and burns CPU in bursts: its usage shows.
    let busy = process(
        "busy",
        "3Gi",
        "$x = \"a\" x (48 * 1024 * 1024); while (1) { for (1..2000000) {} select(undef, undef, undef, 0.05) }",
        "",
    );
    assert!(hub.apply(&busy).status.success());
    hub.wait_phase("instances", "busy", "Running", T);
    let used = wait_for("usage to be reported", T, || {
        hub.get_json("instances", "busy")
            .filter(|i| i["status"]["usage"]["memory"].is_string())
    });
    let usage = &used["status"]["usage"];
    let mem = usage["memory"]
        .as_str()
        .unwrap_or_default()
        .trim_end_matches("Mi");
    assert!(
        mem.parse::<u64>().is_ok_and(|m| (45..200).contains(&m)),
        "{usage}"
    );
    assert!(usage["cpu"].as_str().is_some_and(|c| c != "0"), "{usage}");

    // Another 3Gi does not fit the 4Gi node: the scheduler leaves it Pending...
    let second = process("second", "3Gi", "sleep 60", "");
    assert!(hub.apply(&second).status.success());
    hub.wait_phase("instances", "second", "Pending", T);
    // ...and when it is bound to the node anyway, the node refuses it and says why.
    assert_eq!(
        put_instance_status(
            &hub,
            "second",
            serde_json::json!({"phase": "Scheduled", "node": "rm-2"})
        ),
        200
    );
    let refused = wait_for("the node to refuse", T, || {
        hub.get_json("instances", "second").filter(|i| {
            i["status"]["phase"] == "Failed"
                && i["status"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("refuses to over-commit memory"))
        })
    });
    assert!(refused["status"]["pid"].is_null(), "{refused}");
    hub.ok(&["delete", "instance", "busy"]);
    hub.ok(&["delete", "instance", "second"]);
}
