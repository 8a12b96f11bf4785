//! `verge dev`, the main job: starts a hub and three edges, applies the samples, and
//! comes back up on the same state.

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Command;

use common::*;

fn dev(dir: &std::path::Path, home: &std::path::Path, port: u16) -> String {
    let out = Command::new(BIN)
        .args([
            "dev",
            "--exit-after-start",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir)
        .env("HOME", home)
        .output()
        .expect("run verge dev");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "verge dev failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn dev_starts_everything_and_restarts_on_the_same_state() {
    let d = test_dir();
    let home = d.path().join("home");
    let state = d.path().join("state");
    let port = free_port();
    let first = dev(&state, &home, port);
    for want in [
        "edge-1",
        "edge-2",
        "edge-3",
        "hello",
        "ticker-eu",
        "report-once",
        "web-1",
        "web-2",
        "pair-a",
        "application/shop",
        "Ctrl-C",
    ] {
        assert!(first.contains(want), "missing {want} in:\n{first}");
    }
    assert!(first.contains("Running"), "{first}");
    // The CLI config was installed where the CLI looks by default.
    assert!(home.join(".verge/config").exists());
    // Nothing is left running after it stops.
    assert!(
        pids_with(state.to_str().expect("utf8")).is_empty(),
        "dev left processes behind"
    );
    let second = dev(&state, &home, port);
    assert!(second.contains("instance/hello configured"), "{second}");
    // Same identities: the nodes were not enrolled again.
    assert_eq!(second.matches("Ready").count(), 3, "{second}");
}
