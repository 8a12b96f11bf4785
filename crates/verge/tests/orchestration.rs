//! The orchestration centre: clusters (the nodes of one edge site, by their labels).

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn clusters(hub: &Hub) -> Vec<serde_json::Value> {
    hub.list_json("clusters")
}

fn cluster(hub: &Hub, name: &str) -> serde_json::Value {
    clusters(hub)
        .into_iter()
        .find(|c| c["metadata"]["name"] == name)
        .unwrap_or_default()
}

fn millicores(v: &serde_json::Value) -> u64 {
    let s = v.as_str().unwrap_or("0");
    match s.strip_suffix('m') {
        Some(m) => m.parse().unwrap_or(0),
        None => (s.parse::<f64>().unwrap_or(0.0) * 1000.0) as u64,
    }
}

/// Apply these files of `examples/`, requiring success.
fn apply_examples(hub: &Hub, files: &[&str]) {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/");
    for f in files {
        let text = std::fs::read_to_string(format!("{examples}{f}")).expect("example");
        let out = hub.apply(&text);
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An edge named `name` at `city` (its `city` label), enrolled with `hub`.
fn city_edge(hub: &Hub, dir: &std::path::Path, name: &str, city: &str) -> Edge {
    Edge::start_with(
        &hub.url,
        name,
        Some(&hub.token(1)),
        &dir.join(name),
        &["--label", &format!("city={city}")],
    )
}

#[test]
fn clusters_gather_their_sites_nodes_and_say_how_they_are() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let edge = |name: &str, city: &str| city_edge(&hub, d.path(), name, city);
    let _p1 = edge("p1", "paris");
    let mut p2 = edge("p2", "paris");
    let _l1 = edge("l1", "lyon");
    for n in ["p1", "p2", "l1"] {
        hub.wait_phase("nodes", n, "Ready", T);
    }
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/clusters.yaml"
    ))
    .expect("example");
    assert!(hub.apply(&example).status.success());
    let marker = unique("cl");
    let pinned = format!(
        "{}  placement: {{nodeSelector: {{city: paris}}}}\n",
        sleeper("cl-web", &marker).replace("cpu: 100m", "cpu: 500m")
    );
    assert!(hub.apply(&pinned).status.success());
    hub.wait_phase("instances", "cl-web", "Running", T);

    // Each cluster: its nodes, their health, what they offer, what is asked, what is left.
    let offered: u64 = hub
        .list_json("nodes")
        .iter()
        .filter(|n| n["metadata"]["labels"]["city"] == "paris")
        .map(|n| millicores(&n["status"]["allocatable"]["cpu"]))
        .sum();
    let paris = wait_for("paris Healthy with its instance", T, || {
        let c = cluster(&hub, "paris");
        (c["status"]["phase"] == "Healthy" && c["status"]["instances"] == 1).then_some(c)
    });
    let s = &paris["status"];
    assert_eq!(
        (s["nodes"].as_u64(), s["ready"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(millicores(&s["capacity"]["cpu"]), offered);
    assert_eq!(millicores(&s["requested"]["cpu"]), 500);
    assert_eq!(millicores(&s["free"]["cpu"]), offered - 500);
    assert_eq!(s["region"], "eu-west");
    let lyon = cluster(&hub, "lyon");
    assert_eq!(
        (
            lyon["status"]["phase"].as_str(),
            lyon["status"]["nodes"].as_u64()
        ),
        (Some("Healthy"), Some(1))
    );
    wait_for("mumbai Empty", T, || {
        (cluster(&hub, "mumbai")["status"]["phase"] == "Empty").then_some(())
    });
    let table = hub.ok(&["get", "clusters"]);
    assert!(
        table.contains("paris") && table.contains("Healthy") && table.contains("city=paris"),
        "{table}"
    );

    // A node down: its cluster is Degraded and offers less.
    p2.proc.kill();
    let degraded = wait_for("paris Degraded", T, || {
        let c = cluster(&hub, "paris");
        (c["status"]["phase"] == "Degraded").then_some(c)
    });
    assert_eq!(degraded["status"]["ready"], 1);
    assert!(millicores(&degraded["status"]["capacity"]["cpu"]) < offered);

    // A node that joins with a cluster's labels is part of it.
    let _m1 = edge("m1", "mumbai");
    wait_for("mumbai Healthy with its new node", T, || {
        let c = cluster(&hub, "mumbai");
        (c["status"]["phase"] == "Healthy" && c["status"]["nodes"] == 1).then_some(())
    });

    // A cluster that would select nothing is refused, naming the field.
    let out = hub.apply("kind: Cluster\nmetadata: {name: nowhere}\nspec: {selector: {}}\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.selector"), "{err}");
    hub.cleanup(&["cl-web"], &[&marker]);
}

/// The instances of `app` the hub holds: name -> (phase, node).
fn app_instances(hub: &Hub, app: &str) -> std::collections::BTreeMap<String, (String, String)> {
    hub.list_json("instances")
        .into_iter()
        .filter(|i| i["metadata"]["labels"]["verge.io/application"] == app)
        .map(|i| {
            (
                i["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                (
                    i["status"]["phase"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    i["status"]["node"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

#[test]
fn an_application_spans_clusters_in_two_regions_with_overrides_and_follows_new_clusters() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let edge = |name: &str, city: &str, region: &str| {
        Edge::start_with(
            &hub.url,
            name,
            Some(&hub.token(1)),
            &d.path().join(name),
            &[
                "--label",
                &format!("city={city}"),
                "--label",
                &format!("region={region}"),
            ],
        )
    };
    let _p = edge("app-p", "paris", "eu-west");
    let _m = edge("app-m", "mumbai", "ap-south");
    for n in ["app-p", "app-m"] {
        hub.wait_phase("nodes", n, "Ready", T);
    }
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/");
    apply_examples(&hub, &["clusters.yaml", "application.yaml"]);

    // Paris: the db, then two web replicas; Mumbai: the db, then three (its override).
    // Lyon has no node yet: nothing runs there.
    let want = |p: usize, m: usize| {
        move |got: &std::collections::BTreeMap<String, (String, String)>| {
            let running = |site: &str, comp: &str| {
                got.iter()
                    .filter(|(n, (phase, _))| {
                        n.starts_with(&format!("shop-{comp}-{site}-")) && phase == "Running"
                    })
                    .count()
            };
            running("paris", "db") == 1
                && running("paris", "web") == p
                && running("mumbai", "db") == 1
                && running("mumbai", "web") == m
        }
    };
    let got = wait_for("shop running in paris and mumbai", T, || {
        let got = app_instances(&hub, "shop");
        want(2, 3)(&got).then_some(got)
    });
    assert_eq!(got.len(), 1 + 2 + 1 + 3, "{got:?}");
    // Each replica runs on its cluster's node, with its cluster's configuration.
    for (name, (_, node)) in &got {
        let site = if name.contains("-paris-") {
            "app-p"
        } else {
            "app-m"
        };
        assert_eq!(node, site, "{name}");
    }
    wait_for("mumbai's greeting", T, || {
        hub.ok(&["logs", "shop-web-mumbai-2"])
            .contains("namaste from web")
            .then_some(())
    });
    assert!(
        hub.ok(&["logs", "shop-web-paris-0"])
            .contains("hello from web")
    );
    // Its status catches up on the orchestrator's next pass.
    wait_for("the application's status", T, || {
        let status = hub.ok(&["get", "applications"]);
        (status.contains("7/7") && status.contains("paris:3/3") && status.contains("mumbai:4/4"))
            .then_some(())
    });

    // Steady: across several orchestrator passes (every 2 s) nothing is rewritten or
    // restarted.
    let generations = |hub: &Hub| -> Vec<(String, u64, u64)> {
        hub.list_json("instances")
            .into_iter()
            .filter(|i| i["metadata"]["labels"]["verge.io/application"] == "shop")
            .map(|i| {
                (
                    i["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    i["metadata"]["generation"].as_u64().unwrap_or(0),
                    i["status"]["restarts"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let before = generations(&hub);
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(generations(&hub), before);
    assert!(
        before.iter().all(|(_, g, r)| *g == 1 && *r == 0),
        "{before:?}"
    );

    // A node joins Lyon: that cluster gets the application on its own.
    let _l = edge("app-l", "lyon", "eu-west");
    wait_for("shop in lyon too", T, || {
        let got = app_instances(&hub, "shop");
        let lyon = got
            .iter()
            .filter(|(n, (phase, node))| {
                n.contains("-lyon-") && phase == "Running" && node == "app-l"
            })
            .count();
        (lyon == 3).then_some(())
    });

    // Scaled down: the extra replicas go, everywhere the base count applies.
    let scaled = std::fs::read_to_string(format!("{examples}application.yaml"))
        .expect("example")
        .replace("replicas: 2", "replicas: 1");
    assert!(hub.apply(&scaled).status.success());
    wait_for(
        "one web replica in paris and lyon, three in mumbai",
        T,
        || {
            let got = app_instances(&hub, "shop");
            let count = |site: &str| {
                got.keys()
                    .filter(|n| n.starts_with(&format!("shop-web-{site}-")))
                    .count()
            };
            (count("paris") == 1 && count("lyon") == 1 && count("mumbai") == 3).then_some(())
        },
    );

    rolls_out_in_waves(&hub, d.path(), examples);

    // A bad application is refused, naming the field.
    let out = hub.apply(
        "kind: Application\nmetadata: {name: bad}\nspec:\n  placement: {clusters: [paris]}\n  components:\n    - {name: web, after: [web], template: {form: process, process: {command: [sleep, '1']}}}\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.components[0].after"), "{err}");

    // Deleted: its instances go with it.
    hub.ok(&["delete", "application", "shop"]);
    wait_for("shop's instances gone", T, || {
        app_instances(&hub, "shop").is_empty().then_some(())
    });
}

/// The spec generation of each of `app`'s instances.
fn generations(hub: &Hub, app: &str) -> std::collections::BTreeMap<String, u64> {
    hub.list_json("instances")
        .into_iter()
        .filter(|i| i["metadata"]["labels"]["verge.io/application"] == app)
        .map(|i| {
            (
                i["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                i["metadata"]["generation"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn rollout_state(hub: &Hub, app: &str) -> String {
    hub.get_json("applications", app).unwrap_or_default()["status"]["rollout"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A change to `shop` (one web replica in paris and lyon, three in mumbai) goes to
/// paris first and to lyon only after paris has stayed up on it; a pause holds it; a
/// change that never comes up fails its gate and goes back; undo works.
fn rolls_out_in_waves(hub: &Hub, dir: &std::path::Path, examples: &str) {
    let v2 = std::fs::read_to_string(format!("{examples}rollout/shop-v2.yaml"))
        .expect("example")
        .replace("replicas: 2", "replicas: 1");
    let v2_file = dir.join("shop-v2.yaml");
    std::fs::write(&v2_file, &v2).expect("write");
    let v2_path = v2_file.to_str().expect("utf8");
    // The plan first: paris's web replica, then lyon's; mumbai keeps its greeting.
    let dry = hub.ok(&["apply", "-f", v2_path, "--dry-run"]);
    assert!(
        dry.contains("wave 1 canary: 1 cluster(s), 0 to create, 1 to change, 0 to delete")
            && dry.contains("paris: change shop-web-paris-0")
            && dry.contains("wave 2 rest: 2 cluster(s), 0 to create, 1 to change, 0 to delete")
            && dry.contains("lyon: change shop-web-lyon-0"),
        "{dry}"
    );
    let before = generations(hub, "shop");
    assert_eq!(
        generations(hub, "shop"),
        before,
        "a dry run changes nothing"
    );

    // Applied, then paused at once: lyon is not touched while it is paused.
    hub.ok(&["apply", "-f", v2_path]);
    hub.ok(&["rollout", "pause", "shop"]);
    wait_for("the rollout paused", T, || {
        (rollout_state(hub, "shop") == "Paused").then_some(())
    });
    std::thread::sleep(Duration::from_secs(7));
    let paused = generations(hub, "shop");
    assert_eq!(
        paused["shop-web-lyon-0"], before["shop-web-lyon-0"],
        "lyon changed while paused"
    );
    let status = hub.ok(&["rollout", "status", "shop"]);
    assert!(
        status.contains("Paused") && status.contains("canary"),
        "{status}"
    );
    hub.ok(&["rollout", "resume", "shop"]);

    // Paris changes first; lyon only once paris has run on it for the gate's 5 s.
    let started = std::time::Instant::now();
    let (mut paris_at, mut lyon_at) = (None, None);
    while lyon_at.is_none() && started.elapsed() < Duration::from_secs(90) {
        let g = generations(hub, "shop");
        let t = started.elapsed();
        if paris_at.is_none() && g["shop-web-paris-0"] > before["shop-web-paris-0"] {
            paris_at = Some(t);
        }
        if g["shop-web-lyon-0"] > before["shop-web-lyon-0"] {
            lyon_at = Some(t);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let (paris_at, lyon_at) = (
        paris_at.or(Some(Duration::ZERO)).expect("paris"),
        lyon_at.expect("lyon never changed"),
    );
    assert!(
        lyon_at >= paris_at + Duration::from_secs(4),
        "lyon changed {lyon_at:?}, paris {paris_at:?}: before paris passed its gate"
    );
    // `rollout status --watch` ends, successfully, once it is everywhere.
    let watched = hub.ok(&["rollout", "status", "shop", "--watch"]);
    assert!(watched.contains("Complete"), "{watched}");
    wait_for("lyon's new greeting", T, || {
        hub.ok(&["logs", "shop-web-lyon-0"])
            .contains("bonjour from web")
            .then_some(())
    });
    let after = generations(hub, "shop");
    for m in after.keys().filter(|n| n.contains("-mumbai-")) {
        assert_eq!(
            after[m], before[m],
            "{m}: mumbai's own greeting did not change"
        );
    }

    // A change that runs but never serves: its health check (a port nothing listens
    // on) keeps it unhealthy, so the canary fails its gate (20 s) and goes back;
    // lyon is never touched. `status --watch` ends with an error saying so.
    let broken = v2
        .replace(
            "        terminationGracePeriodSeconds: 2\n  overrides:",
            &format!(
                "        terminationGracePeriodSeconds: 2\n        healthCheck: {{tcp: {}, periodSeconds: 1}}\n  overrides:",
                free_port()
            ),
        )
        .replace("timeoutSeconds: 60", "timeoutSeconds: 20");
    assert_ne!(broken, v2);
    assert!(hub.apply(&broken).status.success());
    let out = hub.cli(&["rollout", "status", "shop", "--watch"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains("RolledBack") && err.contains("wave canary did not pass its gate"),
        "{err}"
    );
    let paris = hub
        .get_json("instances", "shop-web-paris-0")
        .expect("paris web");
    wait_for("paris back on the last good revision, running", T, || {
        let i = hub.get_json("instances", "shop-web-paris-0")?;
        (i["spec"]["healthCheck"].is_null() && i["status"]["phase"] == "Running").then_some(())
    });
    assert!(paris["metadata"]["generation"].as_u64() > after.get("shop-web-paris-0").copied());
    assert_eq!(
        generations(hub, "shop")["shop-web-lyon-0"],
        after["shop-web-lyon-0"],
        "lyon was touched by a rollout that failed in the canary"
    );
    let events = hub.ok(&["get", "events", "--for", "application/shop"]);
    assert!(events.contains("RolledBack"), "{events}");

    // Undo: the spec goes back to the last good revision, and that rolls out.
    hub.ok(&["rollout", "undo", "shop"]);
    let watched = hub.ok(&["rollout", "status", "shop", "--watch"]);
    assert!(watched.contains("Complete"), "{watched}");
    let app = hub.get_json("applications", "shop").expect("shop");
    assert!(
        app["spec"]["components"][1]["template"]["healthCheck"].is_null(),
        "{app}"
    );
}

/// The instances of cluster template `t`: name -> (phase, node, generation).
fn service_instances(
    hub: &Hub,
    t: &str,
) -> std::collections::BTreeMap<String, (String, String, u64)> {
    hub.list_json("instances")
        .into_iter()
        .filter(|i| i["metadata"]["labels"]["verge.io/cluster-template"] == t)
        .map(|i| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&i["metadata"]["name"]),
                (
                    s(&i["status"]["phase"]),
                    s(&i["status"]["node"]),
                    i["metadata"]["generation"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

#[test]
fn a_cluster_template_runs_exactly_its_services_on_each_cluster_and_rolls_out_changes() {
    let d = test_dir();
    let hub = Hub::start(d.path());
    let edge = |name: &str, city: &str| city_edge(&hub, d.path(), name, city);
    let _e = [
        edge("t-p", "paris"),
        edge("t-l", "lyon"),
        edge("t-m", "mumbai"),
    ];
    for n in ["t-p", "t-l", "t-m"] {
        hub.wait_phase("nodes", n, "Ready", T);
    }
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/");
    let template =
        std::fs::read_to_string(format!("{examples}cluster-template.yaml")).expect("example");
    apply_examples(&hub, &["clusters.yaml", "cluster-template.yaml"]);
    // Two services on each of the three clusters, on that cluster's node, and nothing
    // else there.
    let site = |c: &str| match c {
        "paris" => "t-p",
        "lyon" => "t-l",
        _ => "t-m",
    };
    let got = wait_for("cache and relay running in every cluster", T, || {
        let got = service_instances(&hub, "edge-basic");
        (got.len() == 6 && got.values().all(|(phase, _, _)| phase == "Running")).then_some(got)
    });
    for c in ["paris", "lyon", "mumbai"] {
        for svc in ["cache", "relay"] {
            let name = format!("edge-basic-{svc}-{c}-0");
            assert_eq!(
                got.get(&name).map(|v| v.1.as_str()),
                Some(site(c)),
                "{name}: {got:?}"
            );
        }
    }
    let all = hub.list_json("instances");
    assert_eq!(all.len(), 6, "only the template's services run: {all:?}");
    // Each cluster's parameters: Paris sets its own cache size, the others the default.
    wait_for("the caches' sizes", T, || {
        (hub.ok(&["logs", "edge-basic-cache-paris-0"])
            .contains("cache up with 128 MB")
            && hub
                .ok(&["logs", "edge-basic-cache-lyon-0"])
                .contains("cache up with 64 MB"))
        .then_some(())
    });
    // Their resources are reserved on the cluster's nodes, and the clusters say how
    // their services are.
    let table = wait_for("services in the clusters' status", T, || {
        let t = hub.ok(&["get", "clusters"]);
        (t.matches("cache:Running,relay:Running").count() == 3).then_some(t)
    });
    let paris = hub.get_json("clusters", "paris").expect("paris");
    assert_eq!(paris["status"]["requested"]["cpu"], "70m", "{table}");

    // A change that never comes up: Paris (the canary) fails its gate and goes back;
    // Lyon and Mumbai are never touched.
    let before = service_instances(&hub, "edge-basic");
    let broken = template
        .replace(
            r#"'echo "relay up"; while :; do sleep 5; done'"#,
            "'exit 4'",
        )
        .replace("timeoutSeconds: 60", "timeoutSeconds: 15");
    assert_ne!(broken, template);
    assert!(hub.apply(&broken).status.success());
    let t = wait_for(
        "the template's rollout rolled back",
        Duration::from_secs(60),
        || {
            let t = hub.get_json("clustertemplates", "edge-basic")?;
            (t["status"]["rollout"]["state"] == "RolledBack").then_some(t)
        },
    );
    let msg = t["status"]["rollout"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("wave canary"), "{msg}");
    wait_for("paris's relay back and running", T, || {
        let i = hub.get_json("instances", "edge-basic-relay-paris-0")?;
        (i["spec"]["process"]["command"]
            .to_string()
            .contains("relay up")
            && i["status"]["phase"] == "Running")
            .then_some(())
    });
    let after = service_instances(&hub, "edge-basic");
    for c in ["lyon", "mumbai"] {
        let n = format!("edge-basic-relay-{c}-0");
        assert_eq!(
            after[&n].2, before[&n].2,
            "{n} was changed by a rollout that failed in the canary"
        );
    }
    assert!(after["edge-basic-relay-paris-0"].2 > before["edge-basic-relay-paris-0"].2);
    let listed = hub.ok(&["get", "clustertemplates"]);
    assert!(
        listed.contains("edge-basic") && listed.contains("RolledBack"),
        "{listed}"
    );
    // The rollout commands take a template too: its status, and undo (back to the
    // last good services, written as they were: the parameter stays a parameter).
    let status = hub.ok(&["rollout", "status", "clustertemplate/edge-basic"]);
    assert!(
        status.contains("clustertemplate edge-basic") && status.contains("RolledBack"),
        "{status}"
    );
    hub.ok(&["rollout", "pause", "ct/edge-basic"]);
    let paused = hub
        .get_json("clustertemplates", "edge-basic")
        .expect("template");
    assert_eq!(paused["spec"]["rollout"]["paused"], true, "{paused}");
    hub.ok(&["rollout", "resume", "ct/edge-basic"]);
    hub.ok(&["rollout", "undo", "clustertemplate/edge-basic"]);
    let watched = hub.ok(&["rollout", "status", "ct/edge-basic", "--watch"]);
    assert!(watched.contains("Complete"), "{watched}");
    let back = hub
        .get_json("clustertemplates", "edge-basic")
        .expect("template");
    let relay = back["spec"]["services"][1]["template"]["process"].clone();
    assert!(relay["command"].to_string().contains("relay up"), "{back}");
    assert!(relay["env"]["CACHE_MB"].is_null(), "{back}");
    assert_ne!(back["spec"]["rollout"]["paused"], true, "{back}");
    let bad = hub.cli(&["rollout", "status", "node/x"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("has no rollouts"));

    // A bad template is refused, naming the field.
    let out = hub.apply("kind: ClusterTemplate\nmetadata: {name: bad}\nspec:\n  services: []\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.services"));

    // Deleted: its services go with it.
    hub.ok(&["delete", "clustertemplate", "edge-basic"]);
    wait_for("the services gone", T, || {
        service_instances(&hub, "edge-basic")
            .is_empty()
            .then_some(())
    });
}
