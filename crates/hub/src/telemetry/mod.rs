//! Metrics at the hub: edges' rounds come in on their metrics streams
//! ([`serve_stream`]), go into the [`tsdb::Tsdb`], and leave by the HTTP API:
//! `GET /v1/metrics` (series by metric, node, instance, cluster, region, app),
//! `GET /v1/metrics/top` (what `verge top` shows), and `GET /v1/metrics/federate`,
//! which Prometheus scrapes (the latest sample of every series, with the edge's
//! timestamps, in the text format).
//!
//! A series is labelled with its node, its instance, the node's `site` (the
//! cluster) and `region`, and the instance's `app`; those labels come from the
//! console's index of the objects ([`crate::console::index`]), at most
//! [`LABELS_EVERY`] old.

pub mod gorilla;
pub mod tsdb;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use verge_api::channel::METRICS_ACK_EVERY_MAX;
use verge_api::metrics::{MetricKind, Scope, decode, metric};
use verge_api::{ApiError, ErrorCode};
use verge_tunnel::chunk::{Chunk, read_chunk, write_chunk};

use crate::state::HubState;

/// A metrics stream with nothing on it for this long is closed (edges ping every 30 s).
const STREAM_IDLE: Duration = Duration::from_secs(120);
/// How stale the labels of series may be.
pub const LABELS_EVERY: Duration = Duration::from_secs(15);
/// How often samples past the retention are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Serve an edge's metrics stream: take each round, and say so every `ack_every`
/// rounds (as the edge asked, at most [`METRICS_ACK_EVERY_MAX`]), until the edge stops.
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    tsdb: &tsdb::Tsdb,
    metrics: &crate::state::Metrics,
    node: &str,
    mut stream: S,
    ack_every: u32,
) {
    let ack_every = ack_every.clamp(1, METRICS_ACK_EVERY_MAX);
    let mut unanswered = 0;
    loop {
        let chunk = match tokio::time::timeout(STREAM_IDLE, read_chunk(&mut stream)).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::info!(node, error = %e, "metrics stream broken");
                return;
            }
            Err(_) => {
                tracing::info!(node, "metrics stream idle; closed");
                return;
            }
        };
        let body = match chunk {
            Chunk::Data(b) => b,
            Chunk::Ping => continue,
            Chunk::Eof => return,
            _ => continue,
        };
        let batch = match decode(&body) {
            Ok(b) => b,
            Err(e) => {
                metrics.channel_rejected.inc();
                tracing::warn!(node, error = %e, "metrics round refused");
                let _ = write_chunk(&mut stream, &Chunk::Error(e.to_string())).await;
                return;
            }
        };
        let got = tsdb.ingest(node, &batch, verge_api::clock::now_ms() as i64);
        metrics.samples_ingested.inc_by(got.samples as u64);
        metrics.metrics_bytes.inc_by(body.len() as u64);
        if got.refused > 0 {
            metrics.samples_refused.inc_by(got.refused as u64);
        }
        unanswered += 1;
        if unanswered < ack_every {
            continue;
        }
        unanswered = 0;
        if write_chunk(&mut stream, &Chunk::Data(batch.seq.to_be_bytes().to_vec()))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Sweep samples past the retention, for as long as the hub runs.
pub async fn sweeper(st: Arc<HubState>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        st.tsdb.sweep(verge_api::clock::now_ms() as i64);
    }
}

/// The labels a series gets from the objects.
#[derive(Default)]
struct Labels {
    /// Node -> (site, region).
    nodes: HashMap<String, (String, String)>,
    /// Instance -> app.
    apps: HashMap<String, String>,
}

/// The labels, taken from the console's index (loaded on first use, then kept by a
/// watch) at most every [`LABELS_EVERY`].
#[derive(Default)]
pub struct LabelCache(Mutex<Option<(Instant, Arc<Labels>)>>);

impl LabelCache {
    async fn get(&self, st: &HubState) -> Result<Arc<Labels>, ApiError> {
        if let Some((at, l)) = &*self.0.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < LABELS_EVERY
        {
            return Ok(l.clone());
        }
        let (nodes, apps) = st.console.ready(st).await?.labels();
        let labels = Arc::new(Labels { nodes, apps });
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), labels.clone()));
        Ok(labels)
    }
}

/// Which series a request picks.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Selector {
    /// A metric name (`verge_node_memory_used_bytes`...).
    #[serde(default)]
    pub metric: Option<String>,
    /// A node.
    #[serde(default)]
    pub node: Option<String>,
    /// An instance.
    #[serde(default)]
    pub instance: Option<String>,
    /// Nodes of this site.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Nodes of this region.
    #[serde(default)]
    pub region: Option<String>,
    /// Instances labelled `app=` this.
    #[serde(default)]
    pub app: Option<String>,
    /// How far back (`15m`, `1h`, or seconds); default 1h.
    #[serde(default)]
    pub since: Option<String>,
}

fn invalid(msg: String) -> ApiError {
    ApiError::new(ErrorCode::Invalid, msg)
}

/// Seconds from `15m`, `2h`, `90s`, `1d` or a bare number.
fn parse_since(s: &str) -> Result<u64, ApiError> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => 0,
    };
    match num.parse::<u64>() {
        Ok(n) if mult > 0 => Ok(n * mult),
        _ => Err(invalid(format!(
            "since: '{s}' is not a duration; write for example 90s, 15m or 2h"
        ))),
    }
}

/// A series' labels as the API shows them.
fn series_labels(labels: &Labels, node: &str, instance: &str) -> serde_json::Value {
    let (site, region) = labels.nodes.get(node).cloned().unwrap_or_default();
    let mut m = serde_json::json!({"node": node});
    for (k, v) in [
        ("instance", instance),
        ("cluster", site.as_str()),
        ("region", region.as_str()),
        ("app", labels.apps.get(instance).map_or("", String::as_str)),
    ] {
        if !v.is_empty() {
            m[k] = v.into();
        }
    }
    m
}

impl Selector {
    fn matcher(
        &self,
        labels: &Arc<Labels>,
    ) -> Result<impl Fn(&str, &str, u16) -> bool + use<>, ApiError> {
        let metric = match &self.metric {
            None => None,
            Some(m) => Some(
                verge_api::metrics::metric_named(m)
                    .ok_or_else(|| {
                        invalid(format!(
                            "metric: '{m}' is not a metric Verge collects; one of: {}",
                            verge_api::metrics::CATALOGUE
                                .iter()
                                .map(|d| d.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?
                    .id,
            ),
        };
        let (sel, labels) = (self.clone(), labels.clone());
        Ok(move |node: &str, instance: &str, id: u16| {
            let (site, region) = labels
                .nodes
                .get(node)
                .map_or(("", ""), |(s, r)| (s.as_str(), r.as_str()));
            metric.is_none_or(|m| m == id)
                && sel.node.as_deref().is_none_or(|n| n == node)
                && sel.instance.as_deref().is_none_or(|i| i == instance)
                && sel.cluster.as_deref().is_none_or(|c| c == site)
                && sel.region.as_deref().is_none_or(|r| r == region)
                && sel
                    .app
                    .as_deref()
                    .is_none_or(|a| labels.apps.get(instance).is_some_and(|x| x == a))
        })
    }
}

/// Most series one query may return.
pub const MAX_QUERY_SERIES: usize = 5000;

/// `GET /v1/metrics`: the samples of the series the selector picks.
pub async fn query(st: &HubState, sel: &Selector) -> Result<serde_json::Value, ApiError> {
    let since = sel.since.as_deref().map_or(Ok(3600), parse_since)?;
    let labels = st.telemetry_labels.get(st).await?;
    let want = sel.matcher(&labels)?;
    let now = verge_api::clock::now_ms() as i64;
    let series = st
        .tsdb
        .select(want, now - since as i64 * 1000, i64::MAX, MAX_QUERY_SERIES)
        .map_err(|n| {
            invalid(format!(
                "the query matches {n} series, over the limit of {MAX_QUERY_SERIES}; narrow it with metric, node, instance, cluster, region or app"
            ))
        })?;
    let items: Vec<serde_json::Value> = series
        .into_iter()
        .map(|s| {
            let mut v = series_labels(&labels, &s.node, &s.instance);
            v["metric"] = metric(s.metric).map_or("", |m| m.name).into();
            v["points"] = s
                .points
                .iter()
                .map(|(t, x)| serde_json::json!([t, x]))
                .collect();
            v
        })
        .collect();
    Ok(serde_json::json!({ "series": items }))
}

/// `GET /v1/metrics/top?kind=nodes|instances`: one row per node or instance with its
/// latest values (CPU as a rate of its counter), as `verge top` prints.
pub async fn top(st: &HubState, kind: &str, sel: &Selector) -> Result<serde_json::Value, ApiError> {
    use verge_api::metrics as m;
    let scope = match kind {
        "nodes" | "node" => Scope::Node,
        "instances" | "instance" => Scope::Instance,
        other => {
            return Err(invalid(format!(
                "kind: '{other}' is not one of nodes, instances"
            )));
        }
    };
    let labels = st.telemetry_labels.get(st).await?;
    let want = sel.matcher(&labels)?;
    let latest = st.tsdb.latest(move |n, i, id| {
        metric(id).is_some_and(|d| d.scope == scope)
            && (scope == Scope::Node) == i.is_empty()
            && want(n, i, id)
    });
    let mut rows: Vec<(String, String, serde_json::Value)> = Vec::new();
    for l in latest {
        if rows
            .last()
            .is_none_or(|r| (&r.0, &r.1) != (&l.node, &l.instance))
        {
            let mut row = series_labels(&labels, &l.node, &l.instance);
            row["time"] = l.last.0.into();
            if scope == Scope::Node {
                // The node's rounds are numbered from 1 without a gap: a node whose
                // series hold fewer samples than this lost some.
                row["lastRound"] = st.tsdb.last_seq(&l.node).into();
            }
            rows.push((l.node.clone(), l.instance.clone(), row));
        }
        let Some(row) = rows.last_mut().map(|r| &mut r.2) else {
            continue;
        };
        let key = match l.metric {
            m::NODE_CPU_SECONDS | m::INSTANCE_CPU_SECONDS => {
                row["cpuCores"] = l.rate().unwrap_or(0.0).into();
                continue;
            }
            m::NODE_NET_RX => {
                row["rxBytesPerSecond"] = l.rate().unwrap_or(0.0).into();
                continue;
            }
            m::NODE_NET_TX => {
                row["txBytesPerSecond"] = l.rate().unwrap_or(0.0).into();
                continue;
            }
            m::NODE_MEMORY_USED | m::INSTANCE_MEMORY => "memoryBytes",
            m::NODE_MEMORY_TOTAL => "memoryTotalBytes",
            m::NODE_DISK_USED => "diskBytes",
            m::NODE_DISK_TOTAL => "diskTotalBytes",
            m::NODE_LOAD1 => "load1",
            m::NODE_INSTANCES => "instances",
            m::NODE_METRICS_DROPPED => "droppedSamples",
            m::INSTANCE_RESTARTS => "restarts",
            m::INSTANCE_OOM_KILLS => "oomKills",
            m::INSTANCE_UP => "up",
            m::INSTANCE_REQUESTS => "requests",
            _ => continue,
        };
        row[key] = l.last.1.into();
    }
    Ok(serde_json::json!({ "items": rows.into_iter().map(|r| r.2).collect::<Vec<_>>() }))
}

/// `local`'s list under `key`, joined with the same query's answers from every other
/// replica (each holds the metrics of the edges whose sessions it holds), sorted by
/// node and instance; `"partial": [replica ids]` names replicas that did not answer.
/// A query another replica forwarded is answered for this replica alone.
pub async fn with_other_replicas(
    st: &HubState,
    uri: &axum::http::Uri,
    headers: &axum::http::HeaderMap,
    mut local: serde_json::Value,
    key: &str,
) -> serde_json::Value {
    if headers.contains_key(crate::replicas::FORWARDED_BY) || !st.config.shared_store {
        return local;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let (answers, missing) = crate::replicas::gather(st, path).await;
    if let Some(list) = local[key].as_array_mut() {
        for mut a in answers {
            if let Some(more) = a[key].as_array_mut() {
                list.append(more);
            }
        }
        let at = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
        list.sort_by_key(|v| (at(v, "node"), at(v, "instance"), at(v, "metric")));
    }
    if !missing.is_empty() {
        local["partial"] = missing.into();
    }
    local
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `GET /v1/metrics/federate`: the latest sample of every series in Prometheus's
/// text format, with the edges' timestamps (scrape with `honor_timestamps`).
pub async fn federate(st: &HubState) -> Result<String, ApiError> {
    let labels = st.telemetry_labels.get(st).await?;
    let latest = st.tsdb.latest(|_, _, _| true);
    let mut by_metric: std::collections::BTreeMap<u16, Vec<&tsdb::Latest>> = Default::default();
    for l in &latest {
        by_metric.entry(l.metric).or_default().push(l);
    }
    let mut out = String::with_capacity(latest.len() * 96);
    for (id, series) in by_metric {
        let Some(d) = metric(id) else { continue };
        let kind = match d.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {}", d.name, d.help);
        let _ = writeln!(out, "# TYPE {} {kind}", d.name);
        for l in series {
            let mut ls = format!("node=\"{}\"", escape(&l.node));
            let (site, region) = labels.nodes.get(&l.node).cloned().unwrap_or_default();
            for (k, v) in [
                ("instance_name", l.instance.as_str()),
                ("cluster", &site),
                ("region", &region),
                (
                    "app",
                    labels.apps.get(&l.instance).map_or("", String::as_str),
                ),
            ] {
                if !v.is_empty() {
                    let _ = write!(ls, ",{k}=\"{}\"", escape(v));
                }
            }
            let _ = writeln!(out, "{}{{{ls}}} {} {}", d.name, l.last.1, l.last.0);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hub answers every `ackEvery` rounds, with the last round it took (which
    /// answers for those before), and an edge from before `ackEvery` every round.
    #[tokio::test]
    async fn rounds_are_answered_as_often_as_the_edge_asked() {
        use verge_api::metrics::{Batch, Group, encode};
        for (ack_every, answered) in [(3, vec![3, 6]), (0, (1..=7).collect()), (1000, vec![])] {
            let tsdb = tsdb::Tsdb::new(Duration::from_secs(3600), 1000);
            let metrics = crate::state::Metrics::new();
            let (mut edge, hub) = tokio::io::duplex(1 << 16);
            let served = tokio::spawn(async move {
                serve_stream(&tsdb, &metrics, "n1", hub, ack_every).await;
            });
            for seq in 1..=7u64 {
                let batch = Batch {
                    seq,
                    time_ms: 1_000 * seq,
                    groups: vec![Group {
                        instance: String::new(),
                        values: vec![(1, seq as f64)],
                    }],
                };
                write_chunk(&mut edge, &Chunk::Data(encode(&batch)))
                    .await
                    .unwrap();
            }
            write_chunk(&mut edge, &Chunk::Eof).await.unwrap();
            served.await.unwrap();
            let mut got = Vec::new();
            while let Some(Chunk::Data(d)) = read_chunk(&mut edge).await.unwrap() {
                got.push(u64::from_be_bytes(d.try_into().unwrap()));
            }
            // 1000 is capped at METRICS_ACK_EVERY_MAX (16): nothing answered in 7.
            assert_eq!(got, answered, "ackEvery {ack_every}");
        }
    }

    #[test]
    fn durations_parse_and_bad_ones_say_how() {
        assert_eq!(parse_since("90").unwrap(), 90);
        assert_eq!(parse_since("15m").unwrap(), 900);
        assert_eq!(parse_since("2h").unwrap(), 7200);
        let e = parse_since("soon").unwrap_err();
        assert!(e.message.contains("since: 'soon'"), "{}", e.message);
    }
}
