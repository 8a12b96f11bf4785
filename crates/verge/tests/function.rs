//! `form: function` end to end: the example manifest, a real hub and edge, the edge's
//! function gateway, and the component the test suite builds (`guests/hello-fn`),
//! published to Debian's `docker-registry` on loopback and served from the node's cache
//! once the registry is gone.

#![cfg(feature = "function")]
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn an_http_function_is_deployed_served_and_removed() {
    let component = std::env::var("VERGE_TEST_FUNCTION").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../guests/hello-fn/target/wasm32-wasip2/release/hello_fn.wasm"
        )
        .to_string()
    });
    assert!(
        std::path::Path::new(&component).exists(),
        "{component} is missing: run ./scripts/test.sh (it builds guests/hello-fn)"
    );
    let d = test_dir();
    let mut registry = Registry::start(d.path());
    let reference = format!("{}/verge/hello-fn:1", registry.addr);
    let hub = Hub::start(d.path());
    // Published the way users do it: a single-layer OCI artifact (application/wasm).
    hub.ok(&[
        "artifact",
        "push",
        &component,
        "--to",
        &reference,
        "--plain-http",
    ]);
    let edge_dir = d.path().join("fn-node");
    let edge_args = [
        "--function-listen",
        "127.0.0.1:0",
        "--plain-http-registry",
        registry.addr.as_str(),
        "--metrics-interval",
        "1s",
    ];
    let mut edge = Edge::start_with(
        &hub.url,
        "fn-node",
        Some(&hub.token(1)),
        &edge_dir,
        &edge_args,
    );
    let gateway = |edge: &Edge| {
        wait_for("the gateway address", T, || {
            edge.proc.log_text().lines().find_map(|l| {
                l.split("function gateway listening on ")
                    .nth(1)
                    .map(|a| a.trim().to_string())
            })
        })
    };
    let addr = gateway(&edge);
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/runtimes/function-hello.yaml"
    ))
    .expect("example")
    .replace("127.0.0.1:5000", &registry.addr);
    let out = hub.apply(&example);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    hub.wait_phase("instances", "hello-fn", "Running", T);
    assert_eq!(
        http_get(&addr, "/hello-fn/edge"),
        (200, "hello from /edge".into())
    );
    // What the function prints is its log, through the channel like any instance's.
    wait_for("the function's log", T, || {
        hub.ok(&["logs", "hello-fn"])
            .contains("request for /edge")
            .then_some(())
    });
    let (status, body) = http_get(&addr, "/hello-fn/spin");
    assert_eq!(status, 504, "{body}");
    // Its metrics come from its Wasm stores (it has no cgroup): the requests served,
    // the one that timed out included.
    let requests = wait_for("the function's metrics", T, || {
        let v: serde_json::Value =
            serde_json::from_str(&hub.ok(&["top", "instances", "-o", "json"])).ok()?;
        let row = v
            .as_array()?
            .iter()
            .find(|r| r["instance"] == "hello-fn")?
            .clone();
        row["requests"].as_f64().filter(|n| *n >= 2.0)
    });
    assert!(requests >= 2.0);

    // Cut off from the registry, a restarted agent serves the function from its cache.
    registry.proc.kill();
    edge.proc.kill();
    edge = Edge::start_with(&hub.url, "fn-node", None, &edge_dir, &edge_args);
    let addr = gateway(&edge);
    wait_for("the function back from the cache", T, || {
        (http_get(&addr, "/hello-fn/edge") == (200, "hello from /edge".into())).then_some(())
    });

    hub.ok(&["delete", "instance", "hello-fn"]);
    wait_for("the function to be gone", T, || {
        (http_get(&addr, "/hello-fn/edge").0 == 404).then_some(())
    });
}
