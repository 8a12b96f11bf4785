//! Observing the fleet from the command line: `verge top` (the latest metrics of
//! nodes or instances), `verge metrics` (a metric's recent series) and
//! `verge get events`.

use anyhow::{Result, bail};

use crate::cli::{Output, table};
use crate::client::Client;

/// What to narrow a metrics request to.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Narrow {
    /// Only this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Only the nodes of this cluster (their `site` label).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Only the nodes of this region.
    #[arg(long)]
    pub region: Option<String>,
    /// Only instances labelled `app=` this.
    #[arg(long)]
    pub app: Option<String>,
}

/// Percent-encode a query value.
pub fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A query string from `(key, value)` pairs, skipping absent values.
pub fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn human_bytes(v: f64) -> String {
    let units = ["B", "Ki", "Mi", "Gi", "Ti"];
    let mut v = v;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0}{}", units[i])
    } else {
        format!("{v:.1}{}", units[i])
    }
}

fn num(row: &serde_json::Value, key: &str) -> Option<f64> {
    row.get(key).and_then(serde_json::Value::as_f64)
}

fn pct(used: Option<f64>, total: Option<f64>) -> String {
    match (used, total) {
        (Some(u), Some(t)) if t > 0.0 => format!("{:.0}%", u * 100.0 / t),
        _ => "-".into(),
    }
}

/// `verge top nodes|instances`.
pub async fn top(client: &Client, kind: &str, narrow: &Narrow, output: Output) -> Result<()> {
    let q = query(&[
        ("kind", Some(kind)),
        ("node", narrow.node.as_deref()),
        ("cluster", narrow.cluster.as_deref()),
        ("region", narrow.region.as_deref()),
        ("app", narrow.app.as_deref()),
    ]);
    let v: serde_json::Value = client.get(&format!("/v1/metrics/top{q}")).await?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    if matches!(output, Output::Json | Output::Yaml) {
        return crate::cli::print_values(&items, output);
    }
    if items.is_empty() {
        eprintln!("No metrics yet (edges send them every --metrics-interval, 10s by default).");
        return Ok(());
    }
    let s = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap_or("-").to_string();
    let cpu = |r: &serde_json::Value| {
        num(r, "cpuCores").map_or("-".into(), |c| format!("{:.0}m", c * 1000.0))
    };
    let mem = |r: &serde_json::Value| num(r, "memoryBytes").map_or("-".into(), human_bytes);
    let (header, rows): (Vec<&str>, Vec<Vec<String>>) = if kind.starts_with("node") {
        (
            vec![
                "NODE",
                "CLUSTER",
                "REGION",
                "CPU",
                "MEMORY",
                "MEMORY%",
                "DISK%",
                "LOAD",
                "INSTANCES",
            ],
            items
                .iter()
                .map(|r| {
                    vec![
                        s(r, "node"),
                        s(r, "cluster"),
                        s(r, "region"),
                        cpu(r),
                        mem(r),
                        pct(num(r, "memoryBytes"), num(r, "memoryTotalBytes")),
                        pct(num(r, "diskBytes"), num(r, "diskTotalBytes")),
                        num(r, "load1").map_or("-".into(), |l| format!("{l:.2}")),
                        num(r, "instances").map_or("-".into(), |n| format!("{n:.0}")),
                    ]
                })
                .collect(),
        )
    } else {
        (
            vec![
                "INSTANCE", "NODE", "APP", "CPU", "MEMORY", "RESTARTS", "OOM", "UP",
            ],
            items
                .iter()
                .map(|r| {
                    vec![
                        s(r, "instance"),
                        s(r, "node"),
                        s(r, "app"),
                        cpu(r),
                        mem(r),
                        num(r, "restarts").map_or("-".into(), |n| format!("{n:.0}")),
                        num(r, "oomKills").map_or("-".into(), |n| format!("{n:.0}")),
                        num(r, "up")
                            .map_or("-".into(), |n| if n >= 1.0 { "yes" } else { "no" }.into()),
                    ]
                })
                .collect(),
        )
    };
    print!("{}", table(&header, &rows));
    Ok(())
}

/// `verge metrics METRIC`: the recent series of one metric.
pub async fn metrics(
    client: &Client,
    metric: &str,
    instance: Option<&str>,
    since: &str,
    narrow: &Narrow,
    output: Output,
) -> Result<()> {
    let q = query(&[
        ("metric", Some(metric)),
        ("since", Some(since)),
        ("instance", instance),
        ("node", narrow.node.as_deref()),
        ("cluster", narrow.cluster.as_deref()),
        ("region", narrow.region.as_deref()),
        ("app", narrow.app.as_deref()),
    ]);
    let v: serde_json::Value = client.get(&format!("/v1/metrics{q}")).await?;
    let series = v["series"].as_array().cloned().unwrap_or_default();
    match output {
        Output::Json | Output::Yaml => crate::cli::print_values(&series, output),
        Output::Table | Output::Wide => {
            if series.is_empty() {
                bail!("no series of {metric} in the last {since}");
            }
            let rows: Vec<Vec<String>> = series
                .iter()
                .map(|s| {
                    let points = s["points"].as_array().cloned().unwrap_or_default();
                    let last = points.last().and_then(|p| p[1].as_f64());
                    vec![
                        s["node"].as_str().unwrap_or("-").to_string(),
                        s["instance"].as_str().unwrap_or("-").to_string(),
                        points.len().to_string(),
                        last.map_or("-".into(), |v| v.to_string()),
                    ]
                })
                .collect();
            print!("{}", table(&["NODE", "INSTANCE", "SAMPLES", "LAST"], &rows));
            Ok(())
        }
    }
}

fn event_row(e: &serde_json::Value) -> Vec<String> {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    vec![
        crate::cli::age(e["time"].as_str()),
        s(&e["type"]),
        s(&e["reason"]),
        format!(
            "{}/{}",
            s(&e["regarding"]["kind"]),
            s(&e["regarding"]["name"])
        ),
        s(&e["node"]),
        s(&e["message"]),
    ]
}

const EVENT_HEADER: [&str; 6] = ["AGE", "TYPE", "REASON", "OBJECT", "NODE", "MESSAGE"];

/// `verge get events [--for KIND/NAME] [-w]`.
pub async fn events(
    client: &Client,
    for_: Option<&str>,
    watch: bool,
    output: Output,
) -> Result<()> {
    let q = query(&[("for", for_)]);
    let v: serde_json::Value = client.get(&format!("/v1/events{q}")).await?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    match output {
        Output::Json | Output::Yaml if !watch => return crate::cli::print_values(&items, output),
        Output::Json | Output::Yaml => {
            for e in &items {
                println!("{}", serde_json::to_string(e)?);
            }
        }
        Output::Table | Output::Wide => {
            if items.is_empty() && !watch {
                eprintln!("No events.");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = items.iter().map(event_row).collect();
            print!("{}", table(&EVENT_HEADER, &rows));
        }
    }
    if !watch {
        return Ok(());
    }
    let revision = v["revision"].as_u64().unwrap_or(0);
    let q = query(&[
        ("for", for_),
        ("watch", Some("true")),
        ("revision", Some(&revision.to_string())),
    ]);
    crate::cli::each_line(client, &format!("/v1/events{q}"), |line| {
        let e = &line["object"];
        if matches!(output, Output::Json | Output::Yaml) {
            println!("{}", serde_json::to_string(e)?);
        } else {
            println!("{}", event_row(e).join("  "));
        }
        Ok(())
    })
    .await
}
