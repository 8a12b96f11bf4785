//! The web console in a real browser: Debian's Chromium, driven over WebDriver by
//! `chromedriver`, against a running hub with edges. What the pages show is checked
//! against the API, and screenshots of each page are saved under
//! `target/tmp/artifacts/console/` (or `$VERGE_TEST_ARTIFACTS/console/`).

// These tests are synchronous (they drive processes), so blocking sleeps are right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::Value;
use verge_testkit::webdriver::{ChromeDriver, Session};

const T: Duration = Duration::from_secs(40);

fn artifacts() -> PathBuf {
    std::env::var_os("VERGE_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts"))
        .join("console")
}

/// Wait until the current view has drawn, then return `script`'s value.
async fn when_ready(s: &Session, what: &str, script: &str) -> Value {
    s.wait_for(
        what,
        &format!(
            "if (document.querySelector('#main').dataset.ready !== '1') return null; {script}"
        ),
        T,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Save a screenshot of the page, and check that it shows no error.
async fn shot(s: &Session, path: PathBuf) {
    s.screenshot(&path).await.expect("screenshot");
    let err = s
        .eval(
            "const e = document.querySelector('.err'); return e && e.innerText;",
            Vec::new(),
        )
        .await
        .expect("eval");
    assert!(
        err.is_null(),
        "{}: the page shows an error: {err}",
        path.display()
    );
}

/// The rows of the list on screen: name -> the text of column `col`.
const ROWS: &str = "return [...document.querySelectorAll('#rows tr')].map(tr => [tr.dataset.name, tr.children[1].innerText.trim()]);";

fn pairs(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p[0].as_str().unwrap_or_default().to_string(),
                p[1].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_console_shows_the_fleet_and_follows_it_live_in_a_real_browser() {
    let rt = runtime();
    let d = test_dir();
    let hub = Hub::start(d.path());
    let _a = Edge::start_with(
        &hub.url,
        "con-a",
        Some(&hub.token(1)),
        &d.path().join("con-a"),
        &["--label", "site=paris", "--metrics-interval", "1s"],
    );
    let mut b = Edge::start_with(
        &hub.url,
        "con-b",
        Some(&hub.token(1)),
        &d.path().join("con-b"),
        &["--label", "site=lyon"],
    );
    hub.wait_phase("nodes", "con-a", "Ready", T);
    hub.wait_phase("nodes", "con-b", "Ready", T);
    let marker = unique("console");
    let manifest = format!(
        "kind: Instance\nmetadata: {{name: con-log, labels: {{app: shop}}}}\nspec:\n  form: process\n  process:\n    command: [/bin/sh, -c, 'i=0; while :; do i=$((i+1)); echo \"tick $i {marker}\"; sleep 0.3; done']\n  resources: {{cpu: 100m, memory: 16Mi}}\n  terminationGracePeriodSeconds: 1\n  placement: {{nodeSelector: {{site: paris}}}}\n"
    );
    assert!(hub.apply(&manifest).status.success());
    hub.wait_phase("instances", "con-log", "Running", T);
    let token = verge_hub::ClientConfig::load(&hub.admin_conf())
        .expect("admin.conf")
        .token;
    let shots = artifacts();
    let console = format!("{}/console", hub.url);

    rt.block_on(async {
        let driver = ChromeDriver::start(&d.path().join("chromedriver.log"))
            .await
            .expect("chromedriver");
        let s = driver.session(1400, 1000).await.expect("browser");

        // A wrong token is refused, saying so; the right one signs in.
        s.goto(&console).await.expect("open");
        let field = s.find("#token").await.expect("token field");
        s.type_into(&field, "not-a-token").await.expect("type");
        s.click(&s.find("#go").await.expect("button")).await.expect("click");
        s.wait_for(
            "the refusal",
            "const e = document.querySelector('.err'); return e && e.innerText;",
            T,
        )
        .await
        .expect("refused");
        let field = s.find("#token").await.expect("token field");
        s.type_into(&field, &token).await.expect("type");
        s.click(&s.find("#go").await.expect("button")).await.expect("click");

        // Overview: both nodes ready, both sites listed with their nodes.
        let tiles = when_ready(&s, "the overview", "return document.querySelector('#tiles').innerText;").await;
        assert!(tiles.as_str().unwrap_or("").contains("2 / 2"), "{tiles}");
        let sites = when_ready(&s, "the sites", "return document.querySelector('#sites').innerText;").await;
        let sites = sites.as_str().unwrap_or("");
        assert!(sites.contains("paris") && sites.contains("lyon"), "{sites}");
        shot(&s, shots.join("overview.png")).await;

        // Nodes: what the page lists is what the API lists.
        s.goto(&format!("{console}#/nodes")).await.expect("nodes");
        let shown = pairs(&when_ready(&s, "the nodes", ROWS).await);
        let api: Vec<(String, String)> = hub
            .list_json("nodes")
            .iter()
            .map(|n| {
                (
                    n["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                    n["status"]["phase"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        assert_eq!(shown, api);
        shot(&s, shots.join("nodes.png")).await;

        // A node going down shows up on the open page, without a reload.
        b.proc.kill();
        s.wait_for(
            "con-b NotReady on the page",
            "const tr = document.querySelector('tr[data-name=\"con-b\"]'); return tr && tr.children[1].innerText.trim() === 'NotReady';",
            T,
        )
        .await
        .expect("live update");
        assert_eq!(
            hub.get_json("nodes", "con-b").expect("con-b")["status"]["phase"],
            "NotReady"
        );
        shot(&s, shots.join("nodes-one-down.png")).await;

        // The filter runs on the hub: one site's nodes.
        s.type_into(&s.find("#filter").await.expect("filter"), "lyon").await.expect("type");
        s.wait_for(
            "the filtered list",
            "const r = [...document.querySelectorAll('#rows tr')].map(tr => tr.dataset.name); return r.length === 1 && r[0] === 'con-b';",
            T,
        )
        .await
        .expect("filter");

        // An instance: its status, and its log followed live (a line written after
        // the page opened appears on it).
        s.goto(&format!("{console}#/instances/con-log")).await.expect("instance");
        let phase = when_ready(&s, "the instance", "return document.querySelector('#phase').innerText.trim();").await;
        assert_eq!(phase, "Running");
        let first = s
            .wait_for(
                "the log",
                &format!("const t = document.querySelector('#log').textContent; const m = [...t.matchAll(/tick (\\d+) {marker}/g)]; return m.length ? Number(m[m.length - 1][1]) : null;"),
                T,
            )
            .await
            .expect("log lines");
        let later = first.as_u64().unwrap_or(0) + 3;
        s.wait_for(
            "a later log line",
            &format!("return document.querySelector('#log').textContent.includes('tick {later} {marker}');"),
            T,
        )
        .await
        .expect("followed");
        shot(&s, shots.join("instance.png")).await;

        // Applications: replicas running by cluster, as the API says.
        let app = "kind: Cluster\nmetadata: {name: paris}\nspec: {selector: {site: paris}}\n---\nkind: Application\nmetadata: {name: con-app}\nspec:\n  placement: {clusters: [paris]}\n  components:\n    - name: web\n      replicas: 2\n      template: {form: process, process: {command: [sleep, infinity]}, resources: {cpu: 10m, memory: 8Mi}}\n";
        assert!(hub.apply(app).status.success());
        s.goto(&format!("{console}#/applications")).await.expect("applications");
        s.wait_for(
            "con-app 2/2 on the page",
            "const tr = document.querySelector('tr[data-name=\"con-app\"]'); return tr && tr.innerText.includes('2 / 2') && tr.innerText.includes('paris 2/2');",
            T,
        )
        .await
        .expect("applications view");
        let listed = hub.get_json("applications", "con-app").expect("con-app");
        assert_eq!(listed["status"]["running"], 2);
        shot(&s, shots.join("applications.png")).await;

        // The event stream has the node that went down.
        s.goto(&format!("{console}#/events")).await.expect("events");
        s.wait_for(
            "the NodeNotReady event",
            "const t = document.querySelector('#events').innerText; return t.includes('NodeNotReady') && t.includes('nodes/con-b');",
            T,
        )
        .await
        .expect("events");
        shot(&s, shots.join("events.png")).await;
        s.close().await.expect("close");
    });
    hub.ok(&["delete", "application", "con-app"]);
    hub.cleanup(&["con-log"], &[&marker]);
}
