//! The hub's store of recent time series: for each node, its own series and its
//! instances', each a run of [`gorilla`] chunks of 120 samples (20 minutes at the
//! default 10 s interval). Samples older than the retention are dropped a chunk at a
//! time; a series with nothing left in the retention goes. It lives in memory: a
//! restarted hub starts empty (Prometheus, federating from it, keeps the long
//! history), and the number of series is bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use verge_api::metrics::Batch;

use super::gorilla::Chunk;

/// Samples per chunk before it is closed.
const CHUNK_SAMPLES: u32 = 120;
/// Series one node may have (its own and its instances'): a node cannot take the
/// whole store's bound from the others.
pub const MAX_SERIES_PER_NODE: usize = 20_000;
/// How far ahead of the hub's clock a sample's time may be (skewed clocks); later
/// ones are ignored, so that a node cannot freeze its own series in the future.
const MAX_AHEAD_MS: i64 = 5 * 60 * 1000;

#[derive(Default)]
struct Series {
    closed: VecDeque<Chunk>,
    head: Chunk,
    /// The last two samples (rates and `verge top` read these).
    last: Option<(i64, f64)>,
    prev: Option<(i64, f64)>,
}

impl Series {
    fn samples(&self) -> usize {
        self.closed
            .iter()
            .map(|c| c.count() as usize)
            .sum::<usize>()
            + self.head.count() as usize
    }

    fn bytes(&self) -> usize {
        self.closed.iter().map(Chunk::bytes).sum::<usize>() + self.head.bytes()
    }
}

#[derive(Default)]
struct NodeSeries {
    series: HashMap<(String, u16), Series>,
    /// The last round taken from this node.
    last_seq: u64,
}

/// One series as a query returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesData {
    /// The node.
    pub node: String,
    /// The instance (empty: the node's own).
    pub instance: String,
    /// The metric's catalogue id.
    pub metric: u16,
    /// `(time ms, value)` in order.
    pub points: Vec<(i64, f64)>,
}

/// The last two samples of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    /// The node.
    pub node: String,
    /// The instance (empty: the node's own).
    pub instance: String,
    /// The metric's catalogue id.
    pub metric: u16,
    /// The last sample.
    pub last: (i64, f64),
    /// The one before it.
    pub prev: Option<(i64, f64)>,
}

impl Latest {
    /// The per-second rate of a counter over its last two samples (a reset counts
    /// from zero).
    pub fn rate(&self) -> Option<f64> {
        let (t0, v0) = self.prev?;
        let (t1, v1) = self.last;
        let dt = (t1 - t0) as f64 / 1000.0;
        (dt > 0.0).then(|| if v1 >= v0 { v1 - v0 } else { v1 } / dt)
    }
}

/// How much the store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Nodes with series.
    pub nodes: usize,
    /// Series.
    pub series: usize,
    /// Samples.
    pub samples: usize,
    /// Bytes the samples take, compressed.
    pub bytes: usize,
}

/// What one round did to the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Samples stored.
    pub samples: usize,
    /// Samples ignored: not after the series' last (a round sent again), older than
    /// the retention, or too far in the future.
    pub stale: usize,
    /// Samples refused because the store, or the node, holds as many series as it may.
    pub refused: usize,
}

/// The store ([module docs](self)).
pub struct Tsdb {
    nodes: Mutex<HashMap<String, NodeSeries>>,
    retention_ms: i64,
    max_series: usize,
    series: std::sync::atomic::AtomicUsize,
}

impl Tsdb {
    /// A store keeping `retention` of samples in at most `max_series` series.
    pub fn new(retention: std::time::Duration, max_series: usize) -> Self {
        Self {
            nodes: Mutex::default(),
            retention_ms: retention.as_millis() as i64,
            max_series,
            series: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeSeries>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take a node's round (`now_ms`: the hub's clock, for the retention).
    pub fn ingest(&self, node: &str, batch: &Batch, now_ms: i64) -> Ingested {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = Ingested::default();
        let t = batch.time_ms as i64;
        let mut nodes = self.lock();
        let ns = nodes.entry(node.to_string()).or_default();
        ns.last_seq = ns.last_seq.max(batch.seq);
        let out_of_range = t < now_ms - self.retention_ms || t > now_ms + MAX_AHEAD_MS;
        for g in &batch.groups {
            for &(metric, v) in &g.values {
                if out_of_range {
                    out.stale += 1;
                    continue;
                }
                let key = (g.instance.clone(), metric);
                let s = match ns.series.get_mut(&key) {
                    Some(s) => s,
                    None => {
                        if self.series.load(Relaxed) >= self.max_series
                            || ns.series.len() >= MAX_SERIES_PER_NODE
                        {
                            out.refused += 1;
                            continue;
                        }
                        self.series.fetch_add(1, Relaxed);
                        ns.series.entry(key).or_default()
                    }
                };
                if s.last.is_some_and(|(lt, _)| t <= lt) {
                    out.stale += 1;
                    continue;
                }
                if s.head.count() >= CHUNK_SAMPLES {
                    let mut full = std::mem::take(&mut s.head);
                    full.shrink();
                    s.closed.push_back(full);
                }
                s.head.push(t, v);
                s.prev = s.last.replace((t, v));
                out.samples += 1;
            }
        }
        out
    }

    /// The last round taken from `node`.
    pub fn last_seq(&self, node: &str) -> u64 {
        self.lock().get(node).map_or(0, |n| n.last_seq)
    }

    /// Samples from `from_ms` to `to_ms` of the series `want` picks
    /// (`(node, instance, metric)`), at most `max_series` of them (else `Err` with
    /// how many matched).
    pub fn select(
        &self,
        want: impl Fn(&str, &str, u16) -> bool,
        from_ms: i64,
        to_ms: i64,
        max_series: usize,
    ) -> Result<Vec<SeriesData>, usize> {
        // Copy the chunks under the lock, decode outside it.
        let mut picked: Vec<(String, String, u16, Vec<Chunk>)> = Vec::new();
        {
            let nodes = self.lock();
            let mut matched = 0;
            for (node, ns) in nodes.iter() {
                for ((instance, metric), s) in &ns.series {
                    if !want(node, instance, *metric) || s.last.is_none_or(|l| l.0 < from_ms) {
                        continue;
                    }
                    matched += 1;
                    if matched > max_series {
                        continue;
                    }
                    let chunks = s
                        .closed
                        .iter()
                        .chain(std::iter::once(&s.head))
                        .filter(|c| c.count() > 0 && c.last_t() >= from_ms && c.first_t() <= to_ms)
                        .cloned()
                        .collect();
                    picked.push((node.clone(), instance.clone(), *metric, chunks));
                }
            }
            if matched > max_series {
                return Err(matched);
            }
        }
        let mut out: Vec<SeriesData> = picked
            .into_iter()
            .map(|(node, instance, metric, chunks)| SeriesData {
                node,
                instance,
                metric,
                points: chunks
                    .iter()
                    .flat_map(Chunk::samples)
                    .filter(|(t, _)| (from_ms..=to_ms).contains(t))
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| (&a.node, &a.instance, a.metric).cmp(&(&b.node, &b.instance, b.metric)));
        Ok(out)
    }

    /// The last two samples of every series `want` picks, sorted.
    pub fn latest(&self, want: impl Fn(&str, &str, u16) -> bool) -> Vec<Latest> {
        let nodes = self.lock();
        let mut out: Vec<Latest> = nodes
            .iter()
            .flat_map(|(node, ns)| {
                ns.series.iter().filter_map(|((instance, metric), s)| {
                    let last = s.last?;
                    want(node, instance, *metric).then(|| Latest {
                        node: node.clone(),
                        instance: instance.clone(),
                        metric: *metric,
                        last,
                        prev: s.prev,
                    })
                })
            })
            .collect();
        drop(nodes);
        out.sort_by(|a, b| (&a.node, &a.instance, a.metric).cmp(&(&b.node, &b.instance, b.metric)));
        out
    }

    /// Drop chunks wholly older than the retention, and series with nothing left.
    pub fn sweep(&self, now_ms: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let horizon = now_ms - self.retention_ms;
        let mut nodes = self.lock();
        let mut gone = 0;
        nodes.retain(|_, ns| {
            ns.series.retain(|_, s| {
                while s.closed.front().is_some_and(|c| c.last_t() < horizon) {
                    s.closed.pop_front();
                }
                let keep = s.last.is_some_and(|(t, _)| t >= horizon);
                gone += usize::from(!keep);
                keep
            });
            !ns.series.is_empty()
        });
        self.series.fetch_sub(gone, Relaxed);
    }

    /// How much the store holds.
    pub fn stats(&self) -> Stats {
        let nodes = self.lock();
        let mut st = Stats {
            nodes: nodes.len(),
            ..Default::default()
        };
        for s in nodes.values().flat_map(|n| n.series.values()) {
            st.series += 1;
            st.samples += s.samples();
            st.bytes += s.bytes();
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::metrics::{Group, INSTANCE_MEMORY, NODE_CPU_SECONDS, NODE_LOAD1};

    fn round(seq: u64, t: u64, v: f64) -> Batch {
        Batch {
            seq,
            time_ms: t,
            groups: vec![
                Group {
                    instance: String::new(),
                    values: vec![(NODE_CPU_SECONDS, v), (NODE_LOAD1, 0.5)],
                },
                Group {
                    instance: "web".into(),
                    values: vec![(INSTANCE_MEMORY, 1024.0 * v)],
                },
            ],
        }
    }

    #[test]
    fn rounds_are_stored_once_in_order_and_queried_back() {
        let db = Tsdb::new(std::time::Duration::from_secs(3600), 1000);
        let t0 = 1_000_000_000u64;
        // The hub's clock as each round arrives.
        let now = |i: u64| (t0 + i * 10_000) as i64;
        for i in 0..300u64 {
            let got = db.ingest("n1", &round(i + 1, t0 + i * 10_000, i as f64), now(i));
            assert_eq!(got.samples, 3);
        }
        // A round sent again (the edge never saw the ack) changes nothing.
        let again = db.ingest("n1", &round(300, t0 + 299 * 10_000, 299.0), now(300));
        assert_eq!((again.samples, again.stale), (0, 3));
        let all = db.select(|_, _, _| true, 0, i64::MAX, 10).unwrap();
        assert_eq!(all.len(), 3);
        let cpu = all.iter().find(|s| s.metric == NODE_CPU_SECONDS).unwrap();
        assert_eq!(cpu.points.len(), 300);
        assert_eq!(cpu.points[299], ((t0 + 2_990_000) as i64, 299.0));
        let mem = db
            .select(
                |_, i, _| i == "web",
                (t0 + 100_000) as i64,
                (t0 + 190_000) as i64,
                10,
            )
            .unwrap();
        assert_eq!(mem[0].points.len(), 10);
        assert_eq!(db.select(|_, _, _| true, 0, i64::MAX, 2), Err(3));
        let l = db.latest(|_, _, m| m == NODE_CPU_SECONDS);
        assert_eq!(l[0].rate(), Some(0.1));
        assert_eq!(db.last_seq("n1"), 300);
        let st = db.stats();
        assert_eq!((st.series, st.samples), (3, 900));
        assert!(st.bytes < 900 * 4, "{st:?}");
    }

    /// One node cannot take the store's room from the others.
    #[test]
    fn a_node_has_a_series_bound_of_its_own() {
        let db = Tsdb::new(std::time::Duration::from_secs(600), 1_000_000);
        let groups = (0..4096)
            .map(|i| Group {
                instance: format!("i{i}"),
                values: (20..25).map(|m| (m, 1.0)).collect(),
            })
            .collect();
        let r = db.ingest(
            "greedy",
            &Batch {
                seq: 1,
                time_ms: 1000,
                groups,
            },
            1000,
        );
        assert_eq!(r.samples, MAX_SERIES_PER_NODE);
        assert_eq!(r.refused, 4096 * 5 - MAX_SERIES_PER_NODE);
        assert_eq!(db.ingest("n2", &round(1, 1000, 1.0), 1000).samples, 3);
    }

    #[test]
    fn retention_and_the_series_bound_hold() {
        let db = Tsdb::new(std::time::Duration::from_secs(600), 4);
        let now = 10_000_000i64;
        // Older than the retention, or far in the future: not stored.
        assert_eq!(db.ingest("n1", &round(1, 1000, 1.0), now).stale, 3);
        let future = (now + 3_600_000) as u64;
        assert_eq!(db.ingest("n1", &round(1, future, 1.0), now).stale, 3);
        assert_eq!(db.ingest("n1", &round(2, now as u64, 1.0), now).samples, 3);
        // A second node fits one more series, then the bound refuses.
        let r = db.ingest("n2", &round(1, now as u64, 1.0), now);
        assert_eq!((r.samples, r.refused), (1, 2));
        // Later, everything is past the retention: swept, and room again.
        db.sweep(now + 601_000);
        assert_eq!(db.stats().series, 0);
        assert_eq!(
            db.ingest("n2", &round(2, (now + 601_000) as u64, 1.0), now + 601_000)
                .samples,
            3
        );
    }
}
