//! Operator commands: get, describe, apply, delete, logs, token.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use verge_api::clock::{now_secs, parse_rfc3339};
use verge_api::manifest::{Manifest, resolve_kind};
use verge_api::{Instance, Node, parse_manifests};

use crate::client::Client;

/// Output formats of `get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Columns, like kubectl.
    Table,
    /// More columns.
    Wide,
    /// A JSON array of objects.
    Json,
    /// A YAML list of objects.
    Yaml,
}

fn kind_or_bail(word: &str) -> Result<&'static str> {
    resolve_kind(word).with_context(|| {
        format!(
            "unknown kind '{word}'; use nodes, instances, regions, clusters, applications, clustertemplates, events, inventory, audit, replicas or conflicts"
        )
    })
}

/// Human age of an RFC 3339 timestamp.
pub fn age(ts: Option<&str>) -> String {
    let Some(t) = ts.and_then(parse_rfc3339) else {
        return "-".into();
    };
    let s = now_secs().saturating_sub(t);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Render rows as aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len() - 1;
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn node_rows(nodes: &[Node], wide: bool) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let label =
        |n: &Node, k: &str| dash(n.metadata.labels.get(k).map(String::as_str).unwrap_or(""));
    let mut header = vec![
        "NAME", "STATUS", "REGION", "TIER", "CPU", "MEMORY", "AGE", "VERSION",
    ];
    if wide {
        header.extend(["CITY", "ISP", "ARCH", "KERNEL", "TRANSPORT", "MESSAGE"]);
    }
    let rows = nodes
        .iter()
        .map(|n| {
            let s = &n.status;
            let mut r = vec![
                n.name().to_string(),
                if n.spec.unschedulable {
                    format!("{},SchedulingDisabled", s.phase)
                } else {
                    s.phase.to_string()
                },
                label(n, "region"),
                label(n, "tier"),
                s.allocatable.cpu.to_string(),
                s.allocatable.memory.human(),
                age(n.metadata.creation_time.as_deref()),
                dash(&s.agent_version),
            ];
            if wide {
                r.extend([
                    label(n, "city"),
                    label(n, "isp"),
                    dash(&s.architecture),
                    dash(&s.kernel_version),
                    dash(&s.transport),
                    dash(&s.message),
                ]);
            }
            r
        })
        .collect();
    (header, rows)
}

fn instance_rows(items: &[Instance], wide: bool) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let mut header = vec!["NAME", "FORM", "PHASE", "NODE", "RESTARTS", "AGE"];
    if wide {
        header.extend(["CPU", "MEMORY", "PID", "MESSAGE"]);
    } else {
        header.push("MESSAGE");
    }
    let rows = items
        .iter()
        .map(|i| {
            let s = &i.status;
            let mut r = vec![
                i.name().to_string(),
                i.spec.form.to_string(),
                s.phase.to_string(),
                dash(s.node.as_deref().unwrap_or("")),
                s.restarts.to_string(),
                age(i.metadata.creation_time.as_deref()),
            ];
            let mut msg = s.message.clone();
            if wide {
                r.extend([
                    i.spec.resources.cpu.to_string(),
                    i.spec.resources.memory.to_string(),
                    s.pid.map_or("-".into(), |p| p.to_string()),
                ]);
            } else if msg.chars().count() > 60 {
                msg = msg.chars().take(57).collect::<String>() + "...";
            }
            r.push(dash(&msg));
            r
        })
        .collect();
    (header, rows)
}

#[derive(serde::Deserialize)]
struct List<T> {
    items: Vec<T>,
    #[serde(default)]
    revision: u64,
}

/// `verge get KIND --watch`: print changes as they happen, one line each.
pub async fn watch(client: &Client, kind: &str, output: Output) -> Result<()> {
    let plural = kind_or_bail(kind)?;
    let list: List<serde_json::Value> = client.get(&format!("/v1/{plural}")).await?;
    let path = format!("/v1/{plural}?watch=true&revision={}", list.revision);
    each_line(client, &path, |ev| {
        if output == Output::Json {
            println!("{}", serde_json::to_string(&ev)?);
            return Ok(());
        }
        let o = &ev["object"];
        let phase = o["status"]["phase"].as_str().unwrap_or("-");
        let node = o["status"]["node"].as_str().unwrap_or("-");
        println!(
            "{:<7} {:<8} {}/{} {phase} {}",
            ev["type"].as_str().unwrap_or("?"),
            ev["revision"],
            &plural[..plural.len() - 1],
            o["metadata"]["name"].as_str().unwrap_or("?"),
            if plural == "instances" { node } else { "" },
        );
        Ok(())
    })
    .await
}

/// Follow a watch at `path`: `f` gets each line, as JSON, until the stream ends.
pub async fn each_line(
    client: &Client,
    path: &str,
    mut f: impl FnMut(serde_json::Value) -> Result<()>,
) -> Result<()> {
    use futures_util::StreamExt;
    let mut resp = client.stream(path).await?.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = resp.next().await {
        buf.extend_from_slice(&chunk.context("watch stream broke")?);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let ev: serde_json::Value = serde_json::from_slice(&line)?;
            if ev["type"] == "ERROR" {
                bail!("{}", ev["message"].as_str().unwrap_or("the watch failed"));
            }
            f(ev)?;
        }
    }
    Ok(())
}

pub fn print_values(values: &[serde_json::Value], output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(values)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&values)?),
        _ => unreachable!("tables are printed by the caller"),
    }
    Ok(())
}

fn cpu(m: u64) -> String {
    verge_api::Cpu(m).to_string()
}

fn mem(b: u64) -> String {
    verge_api::Bytes(b).human()
}

fn totals_row(name: &str, t: &serde_json::Value) -> Vec<String> {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let (cap, alloc) = (&t["capacity"], &t["allocated"]);
    let devices: Vec<String> = cap["devices"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    format!(
                        "{k} {}/{}",
                        n(v).saturating_sub(n(&alloc["devices"][k])),
                        n(v)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    vec![
        name.to_string(),
        n(&t["nodes"]).to_string(),
        format!("{}/{}", cpu(n(&alloc["cpu"])), cpu(n(&cap["cpu"]))),
        format!("{}/{}", mem(n(&alloc["memory"])), mem(n(&cap["memory"]))),
        cpu(n(&cap["cpu"]).saturating_sub(n(&alloc["cpu"]))),
        mem(n(&cap["memory"]).saturating_sub(n(&alloc["memory"]))),
        n(&t["allocations"]).to_string(),
        dash(&devices.join(", ")),
    ]
}

const TOTALS_HEADER: [&str; 8] = [
    "NODES",
    "CPU ALLOC/CAP",
    "MEMORY ALLOC/CAP",
    "FREE CPU",
    "FREE MEMORY",
    "INSTANCES",
    "DEVICES FREE/CAP",
    "",
];

fn totals_table(first: &'static str, map: &serde_json::Value) -> String {
    let mut header = vec![first];
    header.extend(&TOTALS_HEADER[..7]);
    let rows: Vec<Vec<String>> = map
        .as_object()
        .map(|m| m.iter().map(|(k, t)| totals_row(k, t)).collect())
        .unwrap_or_default();
    table(&header, &rows)
}

async fn get_inventory(client: &Client, output: Output) -> Result<()> {
    let v: serde_json::Value = client.get("/v1/inventory").await?;
    if matches!(output, Output::Json | Output::Yaml) {
        return print_values(&[v], output);
    }
    let r = &v["report"];
    print!("{}", totals_table("REGION", &r["byRegion"]));
    println!();
    print!("{}", totals_table("SITE", &r["bySite"]));
    println!();
    print!(
        "{}",
        table(
            &[
                "TOTAL",
                "NODES",
                "CPU ALLOC/CAP",
                "MEMORY ALLOC/CAP",
                "FREE CPU",
                "FREE MEMORY",
                "INSTANCES",
                "DEVICES FREE/CAP"
            ],
            &[totals_row("all", &r["total"])]
        )
    );
    Ok(())
}

async fn get_audit(client: &Client, output: Output) -> Result<()> {
    let v: serde_json::Value = client.get("/v1/inventory/audit?limit=50").await?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    if matches!(output, Output::Json | Output::Yaml) {
        return print_values(&items, output);
    }
    let s = |x: &serde_json::Value| dash(x.as_str().unwrap_or(""));
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            vec![
                s(&e["time"]),
                s(&e["who"]),
                s(&e["what"]),
                s(&e["node"]),
                s(&e["instance"]),
                s(&e["why"]),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["TIME", "WHO", "WHAT", "NODE", "INSTANCE", "WHY"], &rows)
    );
    Ok(())
}

/// `verge get conflicts`: writes made at a region hub that lost to the centre's.
async fn get_conflicts(client: &Client, output: Output) -> Result<()> {
    let v: serde_json::Value = client.get("/v1/conflicts").await?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    if matches!(output, Output::Json | Output::Yaml) {
        return print_values(&items, output);
    }
    if items.is_empty() {
        eprintln!("No conflicts.");
        return Ok(());
    }
    let s = |x: &serde_json::Value| dash(x.as_str().unwrap_or(""));
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|c| {
            vec![
                s(&c["at"]),
                s(&c["region"]),
                format!("{}/{}", s(&c["kind"]), s(&c["name"])),
                s(&c["write"]),
                s(&c["message"]),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["TIME", "REGION", "OBJECT", "WRITE", "WHY"], &rows)
    );
    Ok(())
}

/// `verge get replicas`: the hub replicas on the store, which one leads, and how many
/// edges each holds.
async fn get_replicas(client: &Client, output: Output) -> Result<()> {
    let v: serde_json::Value = client.get("/v1/replicas").await?;
    if matches!(output, Output::Json | Output::Yaml) {
        return print_values(&[v], output);
    }
    let sessions = v["sessions"].as_object().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = v["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let id = r["id"].as_str().unwrap_or("");
            let edges = sessions.values().filter(|h| h.as_str() == Some(id)).count();
            let role = if v["leader"].as_str() == Some(id) {
                "leader"
            } else {
                "follower"
            };
            let this = if v["self"].as_str() == Some(id) {
                " (this one)"
            } else {
                ""
            };
            vec![
                format!("{id}{this}"),
                role.to_string(),
                edges.to_string(),
                dash(r["url"].as_str().unwrap_or("")),
            ]
        })
        .collect();
    print!("{}", table(&["REPLICA", "ROLE", "EDGES", "URL"], &rows));
    Ok(())
}

/// `verge sched report` / `verge sched defrag`.
pub async fn sched_plan(
    client: &Client,
    max_moves: usize,
    per_group: usize,
    apply: bool,
    output: Output,
) -> Result<()> {
    let body =
        serde_json::json!({"maxMoves": max_moves, "maxMovesPerGroup": per_group, "apply": apply});
    let r: serde_json::Value = client.post("/v1/sched/plan", &body).await?;
    if matches!(output, Output::Json | Output::Yaml) {
        return print_values(&[r], output);
    }
    let pct = |v: &serde_json::Value| format!("{:.1}%", v.as_f64().unwrap_or(0.0) * 100.0);
    println!(
        "fragmentation (stranded / free CPU): now {}, after plan {}; empty nodes: {} -> {}",
        pct(&r["before"]["ratio"]),
        pct(&r["after"]["ratio"]),
        r["before"]["emptyNodes"],
        r["after"]["emptyNodes"]
    );
    let regions: Vec<Vec<String>> = r["before"]["byRegion"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| vec![k.clone(), pct(v), pct(&r["after"]["byRegion"][k])])
                .collect()
        })
        .unwrap_or_default();
    if !regions.is_empty() {
        println!();
        print!(
            "{}",
            table(&["REGION", "FRAGMENTATION NOW", "AFTER PLAN"], &regions)
        );
    }
    let mut nodes: Vec<(String, f64)> = r["before"]["byNode"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
                .collect()
        })
        .unwrap_or_default();
    nodes.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top: Vec<Vec<String>> = nodes
        .iter()
        .take(5)
        .filter(|(_, f)| *f > 0.0)
        .map(|(n, f)| vec![n.clone(), format!("{:.1}%", f * 100.0)])
        .collect();
    if !top.is_empty() {
        println!();
        print!(
            "{}",
            table(&["MOST FRAGMENTED NODE", "FRAGMENTATION NOW"], &top)
        );
    }
    println!("\ncapacity by region:");
    print!("{}", totals_table("REGION", &r["capacityByRegion"]));
    let moves = r["migrations"].as_array().cloned().unwrap_or_default();
    println!(
        "\nplan: {} migration(s), frees {}",
        moves.len(),
        r["nodesFreed"]
    );
    if !moves.is_empty() {
        let rows: Vec<Vec<String>> = moves
            .iter()
            .map(|m| {
                vec![
                    dash(m["instance"].as_str().unwrap_or("")),
                    dash(m["from"].as_str().unwrap_or("")),
                    dash(m["to"].as_str().unwrap_or("")),
                ]
            })
            .collect();
        print!("{}", table(&["INSTANCE", "FROM", "TO"], &rows));
    }
    if apply {
        println!("applied {} migration(s)", r["applied"]);
    } else if !moves.is_empty() {
        println!("(not applied; run `verge sched defrag --apply` to carry it out)");
    }
    Ok(())
}

fn region_rows(items: &[serde_json::Value]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let rows = items
        .iter()
        .map(|r| {
            vec![
                dash(r["metadata"]["name"].as_str().unwrap_or("")),
                r["spec"]["latitude"].to_string(),
                r["spec"]["longitude"].to_string(),
                dash(r["spec"]["description"].as_str().unwrap_or("")),
            ]
        })
        .collect();
    (vec!["NAME", "LATITUDE", "LONGITUDE", "DESCRIPTION"], rows)
}

fn cluster_rows(items: &[serde_json::Value]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let rows = items
        .iter()
        .map(|c| {
            let st = &c["status"];
            let of =
                |what: &str| format!("{} / {}", s(&st["free"][what]), s(&st["capacity"][what]));
            let selector: Vec<String> = c["spec"]["selector"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            let services: Vec<String> = st["services"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}:{}", v.as_str().unwrap_or("")))
                .collect();
            vec![
                dash(&s(&c["metadata"]["name"])),
                dash(&s(&st["phase"])),
                format!(
                    "{}/{}",
                    st["ready"].as_u64().unwrap_or(0),
                    st["nodes"].as_u64().unwrap_or(0)
                ),
                dash(&s(&st["region"])),
                of("cpu"),
                of("memory"),
                st["instances"].as_u64().unwrap_or(0).to_string(),
                dash(&services.join(",")),
                selector.join(","),
            ]
        })
        .collect();
    (
        vec![
            "NAME",
            "PHASE",
            "READY",
            "REGION",
            "CPU FREE/CAP",
            "MEMORY FREE/CAP",
            "INSTANCES",
            "SERVICES",
            "SELECTOR",
        ],
        rows,
    )
}

/// Applications (parts: `components`) and cluster templates (parts: `services`).
fn application_rows(
    items: &[serde_json::Value],
    parts: &str,
    header: &'static str,
) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let rows = items
        .iter()
        .map(|a| {
            let st = &a["status"];
            let clusters: Vec<String> = st["clusters"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    let waiting = v["waiting"].as_array().map_or(0, Vec::len);
                    format!(
                        "{k}:{}/{}{}",
                        v["running"].as_u64().unwrap_or(0),
                        v["desired"].as_u64().unwrap_or(0),
                        if waiting > 0 { " (waiting)" } else { "" }
                    )
                })
                .collect();
            vec![
                dash(a["metadata"]["name"].as_str().unwrap_or("")),
                a["spec"][parts].as_array().map_or(0, Vec::len).to_string(),
                format!(
                    "{}/{}",
                    st["running"].as_u64().unwrap_or(0),
                    st["desired"].as_u64().unwrap_or(0)
                ),
                dash(&clusters.join(" ")),
                dash(st["rollout"]["state"].as_str().unwrap_or("")),
                dash(st["message"].as_str().unwrap_or("")),
            ]
        })
        .collect();
    (
        vec!["NAME", header, "RUNNING", "CLUSTERS", "ROLLOUT", "MESSAGE"],
        rows,
    )
}

/// `verge get KIND [NAME]`.
pub async fn get(client: &Client, kind: &str, name: Option<&str>, output: Output) -> Result<()> {
    match kind {
        "inventory" | "inv" => return get_inventory(client, output).await,
        "audit" => return get_audit(client, output).await,
        "conflicts" | "conflict" => return get_conflicts(client, output).await,
        "replicas" | "hubs" => return get_replicas(client, output).await,
        _ => {}
    }
    let plural = kind_or_bail(kind)?;
    let values: Vec<serde_json::Value> = match name {
        Some(n) => vec![client.get(&format!("/v1/{plural}/{n}")).await?],
        None => {
            client
                .get::<List<serde_json::Value>>(&format!("/v1/{plural}"))
                .await?
                .items
        }
    };
    if matches!(output, Output::Json | Output::Yaml) {
        return print_values(&values, output);
    }
    let wide = output == Output::Wide;
    let (header, rows) = if plural == "regions" {
        region_rows(&values)
    } else if plural == "clusters" {
        cluster_rows(&values)
    } else if plural == "applications" {
        application_rows(&values, "components", "COMPONENTS")
    } else if plural == "clustertemplates" {
        application_rows(&values, "services", "SERVICES")
    } else if plural == "nodes" {
        let nodes: Vec<Node> = serde_json::from_value(serde_json::Value::Array(values))?;
        node_rows(&nodes, wide)
    } else {
        let items: Vec<Instance> = serde_json::from_value(serde_json::Value::Array(values))?;
        instance_rows(&items, wide)
    };
    if rows.is_empty() {
        eprintln!("No {plural} found.");
        return Ok(());
    }
    print!("{}", table(&header, &rows));
    Ok(())
}

/// The default table of every node or instance, as text (for `verge dev`'s summary).
pub async fn table_of(client: &Client, plural: &str) -> Result<String> {
    let values = client
        .get::<List<serde_json::Value>>(&format!("/v1/{plural}"))
        .await?
        .items;
    let (header, rows) = if plural == "nodes" {
        node_rows(
            &serde_json::from_value::<Vec<Node>>(serde_json::Value::Array(values))?,
            false,
        )
    } else {
        instance_rows(
            &serde_json::from_value::<Vec<Instance>>(serde_json::Value::Array(values))?,
            false,
        )
    };
    Ok(if rows.is_empty() {
        format!("No {plural} found.\n")
    } else {
        table(&header, &rows)
    })
}

/// `verge describe KIND NAME`.
pub async fn describe(client: &Client, kind: &str, name: &str) -> Result<()> {
    let plural = kind_or_bail(kind)?;
    let v: serde_json::Value = client.get(&format!("/v1/{plural}/{name}")).await?;
    print!("{}", serde_saphyr::to_string(&v)?);
    if plural == "nodes" {
        let list: List<Instance> = client.get("/v1/instances").await?;
        let mine: Vec<Instance> = list
            .items
            .into_iter()
            .filter(|i| i.status.node.as_deref() == Some(name))
            .collect();
        println!("\ninstances on this node: {}", mine.len());
        if !mine.is_empty() {
            let (header, rows) = instance_rows(&mine, false);
            print!("{}", table(&header, &rows));
        }
    }
    Ok(())
}

/// Read manifests from a file, a directory of `.yaml`/`.yml`/`.json` files, or `-`.
pub fn read_manifests(source: &str) -> Result<Vec<(String, Manifest)>> {
    let mut texts = Vec::new();
    if source == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        texts.push(("<stdin>".to_string(), s));
    } else {
        let path = Path::new(source);
        let mut files = Vec::new();
        if path.is_dir() {
            for e in std::fs::read_dir(path).with_context(|| format!("reading {source}"))? {
                let p = e?.path();
                if matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                ) {
                    files.push(p);
                }
            }
            files.sort();
        } else {
            files.push(path.to_path_buf());
        }
        for f in files {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            texts.push((f.display().to_string(), text));
        }
    }
    let mut out = Vec::new();
    for (name, text) in texts {
        let ms = parse_manifests(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        out.extend(ms.into_iter().map(|m| (name.clone(), m)));
    }
    Ok(out)
}

/// Create or update one manifest on the hub; returns what happened.
pub async fn apply_one(client: &Client, m: &Manifest) -> Result<&'static str> {
    let (plural, mut body) = match m {
        Manifest::Node(o) => ("nodes", serde_json::to_value(o)?),
        Manifest::Instance(o) => ("instances", serde_json::to_value(o)?),
        Manifest::Region(o) => ("regions", serde_json::to_value(o)?),
        Manifest::Cluster(o) => ("clusters", serde_json::to_value(o)?),
        Manifest::Application(o) => ("applications", serde_json::to_value(o)?),
        Manifest::ClusterTemplate(o) => ("clustertemplates", serde_json::to_value(o)?),
    };
    // apply sets what the user owns; status belongs to the hub and the edges.
    if let Some(obj) = body.as_object_mut() {
        obj.remove("status");
    }
    let (code, _) = client
        .put(&format!("/v1/{plural}/{}", m.name()), &body)
        .await?;
    Ok(if code == 201 { "created" } else { "configured" })
}

/// `verge apply -f SOURCE [--dry-run]`.
pub async fn apply(client: &Client, source: &str, dry_run: bool) -> Result<()> {
    let manifests = read_manifests(source)?;
    if manifests.is_empty() {
        bail!("{source}: no manifests found");
    }
    if dry_run {
        // Read and checked (read_manifests validates); an application also shows
        // what it would change, wave by wave, as the hub would roll it out.
        for (_, m) in &manifests {
            match m {
                Manifest::Application(o) => {
                    let body = serde_json::to_value(o)?;
                    print!(
                        "{}",
                        crate::rollout::preview(client, &body, m.name()).await?
                    );
                }
                _ => println!(
                    "{}/{} valid (dry run: not applied)",
                    m.kind().to_lowercase(),
                    m.name()
                ),
            }
        }
        return Ok(());
    }
    for (_, m) in &manifests {
        let what = apply_one(client, m).await?;
        println!("{}/{} {what}", m.kind().to_lowercase(), m.name());
    }
    Ok(())
}

/// `verge delete KIND NAME`.
pub async fn delete(client: &Client, kind: &str, name: &str) -> Result<()> {
    let plural = kind_or_bail(kind)?;
    client.delete(&format!("/v1/{plural}/{name}")).await?;
    println!("{}/{name} deleted", &plural[..plural.len() - 1]);
    Ok(())
}

/// `verge logs [-f] INSTANCE`.
pub async fn logs(client: &Client, name: &str, tail: Option<u64>, follow: bool) -> Result<()> {
    use futures_util::StreamExt;
    use std::io::Write;
    let mut q: Vec<String> = tail.map(|t| format!("tail={t}")).into_iter().collect();
    if follow {
        q.push("follow=true".into());
    }
    let q = if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    };
    let path = format!("/v1/instances/{name}/logs{q}");
    if !follow {
        print!("{}", client.get_text(&path).await?);
        return Ok(());
    }
    let mut body = client.stream(&path).await?.bytes_stream();
    let mut out = std::io::stdout();
    while let Some(chunk) = body.next().await {
        out.write_all(&chunk.context("log stream broke")?)?;
        out.flush()?;
    }
    Ok(())
}

/// `verge token create`.
pub async fn token_create(
    client: &Client,
    uses: u32,
    ttl: Option<u64>,
    description: &str,
    node: Option<&str>,
    region: Option<&str>,
) -> Result<()> {
    let body = serde_json::json!({"uses": uses, "ttlSeconds": ttl, "description": description, "node": node, "region": region});
    let v: serde_json::Value = client.post("/v1/tokens", &body).await?;
    println!("{}", v["token"].as_str().unwrap_or_default());
    Ok(())
}
