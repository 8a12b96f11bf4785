//! Metrics an edge samples and ships to its hub: the catalogue of what is measured,
//! and the compact binary batch that carries one sampling round over the channel's
//! metrics stream (and sits in the edge's on-disk buffer while it is cut off).
//!
//! A batch is one round: a sequence number, a time, and the values of that round for
//! the node and for each instance. Metrics travel as catalogue ids, not names (a
//! node's round is about a hundred bytes), integral values as varints. Decoding is
//! lenient the way the wire must be: an id this build does not know is skipped (a
//! newer agent may measure more), but every count and length is bounded before
//! anything is allocated, so a hostile peer cannot make the hub buffer more than the
//! frame it sent.

/// What a metric counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Goes up and down.
    Gauge,
    /// Only goes up (resets when its source restarts).
    Counter,
}

/// What a metric is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The node.
    Node,
    /// One instance on the node.
    Instance,
}

/// One metric of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// Its id on the wire (never reused for another meaning).
    pub id: u16,
    /// Its Prometheus name.
    pub name: &'static str,
    /// Gauge or counter.
    pub kind: MetricKind,
    /// Node or instance.
    pub scope: Scope,
    /// Its help text.
    pub help: &'static str,
}

const fn def(
    id: u16,
    name: &'static str,
    kind: MetricKind,
    scope: Scope,
    help: &'static str,
) -> MetricDef {
    MetricDef {
        id,
        name,
        kind,
        scope,
        help,
    }
}

use MetricKind::{Counter, Gauge};
use Scope::{Instance, Node};

/// Node: CPU time spent not idle, all CPUs (seconds).
pub const NODE_CPU_SECONDS: u16 = 1;
/// Node: memory in use (total less available).
pub const NODE_MEMORY_USED: u16 = 2;
/// Node: memory installed.
pub const NODE_MEMORY_TOTAL: u16 = 3;
/// Node: bytes used on the filesystem of the agent's data directory.
pub const NODE_DISK_USED: u16 = 4;
/// Node: size of that filesystem.
pub const NODE_DISK_TOTAL: u16 = 5;
/// Node: bytes received on every interface but loopback.
pub const NODE_NET_RX: u16 = 6;
/// Node: bytes sent on every interface but loopback.
pub const NODE_NET_TX: u16 = 7;
/// Node: one-minute load average.
pub const NODE_LOAD1: u16 = 8;
/// Node: instances running.
pub const NODE_INSTANCES: u16 = 9;
/// Node: samples the agent's buffer had to drop (it was full while cut off).
pub const NODE_METRICS_DROPPED: u16 = 10;
/// Instance: CPU time (seconds).
pub const INSTANCE_CPU_SECONDS: u16 = 20;
/// Instance: memory in use.
pub const INSTANCE_MEMORY: u16 = 21;
/// Instance: times the kernel killed it for memory.
pub const INSTANCE_OOM_KILLS: u16 = 22;
/// Instance: times the agent restarted it.
pub const INSTANCE_RESTARTS: u16 = 23;
/// Instance: 1 while running.
pub const INSTANCE_UP: u16 = 24;
/// Instance (function): requests served.
pub const INSTANCE_REQUESTS: u16 = 25;

/// Every metric this build knows.
pub const CATALOGUE: &[MetricDef] = &[
    def(
        NODE_CPU_SECONDS,
        "verge_node_cpu_seconds_total",
        Counter,
        Node,
        "CPU time the node spent not idle, all CPUs together, in seconds.",
    ),
    def(
        NODE_MEMORY_USED,
        "verge_node_memory_used_bytes",
        Gauge,
        Node,
        "Memory in use on the node (total less available).",
    ),
    def(
        NODE_MEMORY_TOTAL,
        "verge_node_memory_total_bytes",
        Gauge,
        Node,
        "Memory installed on the node.",
    ),
    def(
        NODE_DISK_USED,
        "verge_node_disk_used_bytes",
        Gauge,
        Node,
        "Bytes used on the filesystem of the agent's data directory.",
    ),
    def(
        NODE_DISK_TOTAL,
        "verge_node_disk_total_bytes",
        Gauge,
        Node,
        "Size of the filesystem of the agent's data directory.",
    ),
    def(
        NODE_NET_RX,
        "verge_node_network_receive_bytes_total",
        Counter,
        Node,
        "Bytes received on every interface but loopback.",
    ),
    def(
        NODE_NET_TX,
        "verge_node_network_transmit_bytes_total",
        Counter,
        Node,
        "Bytes sent on every interface but loopback.",
    ),
    def(
        NODE_LOAD1,
        "verge_node_load1",
        Gauge,
        Node,
        "One-minute load average of the node.",
    ),
    def(
        NODE_INSTANCES,
        "verge_node_instances_running",
        Gauge,
        Node,
        "Instances running on the node.",
    ),
    def(
        NODE_METRICS_DROPPED,
        "verge_node_metrics_dropped_samples_total",
        Counter,
        Node,
        "Samples the agent dropped because its buffer was full while it was cut off.",
    ),
    def(
        INSTANCE_CPU_SECONDS,
        "verge_instance_cpu_seconds_total",
        Counter,
        Instance,
        "CPU time the instance used, in seconds.",
    ),
    def(
        INSTANCE_MEMORY,
        "verge_instance_memory_bytes",
        Gauge,
        Instance,
        "Memory the instance uses.",
    ),
    def(
        INSTANCE_OOM_KILLS,
        "verge_instance_oom_kills_total",
        Counter,
        Instance,
        "Times the kernel killed the instance's processes for memory.",
    ),
    def(
        INSTANCE_RESTARTS,
        "verge_instance_restarts_total",
        Counter,
        Instance,
        "Times the agent restarted the instance.",
    ),
    def(
        INSTANCE_UP,
        "verge_instance_up",
        Gauge,
        Instance,
        "1 while the instance runs.",
    ),
    def(
        INSTANCE_REQUESTS,
        "verge_instance_requests_total",
        Counter,
        Instance,
        "Requests a function instance served (answered or failed).",
    ),
];

/// The catalogue entry of `id`.
pub fn metric(id: u16) -> Option<&'static MetricDef> {
    CATALOGUE.iter().find(|m| m.id == id)
}

/// The catalogue entry named `name`.
pub fn metric_named(name: &str) -> Option<&'static MetricDef> {
    CATALOGUE.iter().find(|m| m.name == name)
}

/// The values of one sampling round for the node (`instance` empty) or one instance.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Group {
    /// The instance, or empty for the node.
    pub instance: String,
    /// `(metric id, value)` pairs.
    pub values: Vec<(u16, f64)>,
}

/// One sampling round of a node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Sequence number: one more than the round before, across agent restarts.
    pub seq: u64,
    /// When the round was sampled, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The node's groups, then its instances'.
    pub groups: Vec<Group>,
}

impl Batch {
    /// How many samples the batch holds.
    pub fn samples(&self) -> usize {
        self.groups.iter().map(|g| g.values.len()).sum()
    }
}

/// Most groups one batch may hold (a node with this many instances is far past any
/// node's pod limit).
pub const MAX_GROUPS: usize = 4096;
/// Most values one group may hold.
pub const MAX_VALUES: usize = 256;
/// Longest instance name (a DNS subdomain).
pub const MAX_NAME: usize = 253;
/// Format version byte at the start of every batch.
const FORMAT: u8 = 1;

/// A batch that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics batch: {0}")]
pub struct DecodeError(pub String);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn bad(&self, what: &str) -> DecodeError {
        DecodeError(format!("{what} at byte {}", self.at))
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.at)
                .ok_or_else(|| self.bad("truncated number"))?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.bad("number longer than 10 bytes"))
    }

    fn count(&mut self, max: usize, what: &str) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > max as u64 {
            return Err(self.bad(&format!("{what} count {n} is over the limit of {max}")));
        }
        Ok(n as usize)
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| self.bad("truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
}

/// Encode a batch.
pub fn encode(batch: &Batch) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + batch.samples() * 6);
    out.push(FORMAT);
    put_varint(&mut out, batch.seq);
    put_varint(&mut out, batch.time_ms);
    put_varint(&mut out, batch.groups.len() as u64);
    for g in &batch.groups {
        put_varint(&mut out, g.instance.len() as u64);
        out.extend_from_slice(g.instance.as_bytes());
        put_varint(&mut out, g.values.len() as u64);
        for &(id, v) in &g.values {
            // The low bit says how the value travels: a non-negative integer below
            // 2^53 (bytes, counts) as a varint, anything else as an f64.
            if v >= 0.0 && v.fract() == 0.0 && v < 9_007_199_254_740_992.0 {
                put_varint(&mut out, u64::from(id) << 1);
                put_varint(&mut out, v as u64);
            } else {
                put_varint(&mut out, (u64::from(id) << 1) | 1);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

/// Decode a batch. Values of metrics this build does not know are skipped; names,
/// counts and lengths past the limits, and non-finite values, are errors.
pub fn decode(buf: &[u8]) -> Result<Batch, DecodeError> {
    let mut r = Reader { buf, at: 0 };
    let format = *r.bytes(1)?.first().unwrap_or(&0);
    if format != FORMAT {
        return Err(DecodeError(format!(
            "format {format} is not one this hub reads ({FORMAT}); upgrade the hub"
        )));
    }
    let seq = r.varint()?;
    let time_ms = r.varint()?;
    let n = r.count(MAX_GROUPS, "group")?;
    let mut groups = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let len = r.count(MAX_NAME, "name length")?;
        let at = r.at;
        let instance = std::str::from_utf8(r.bytes(len)?)
            .map_err(|_| DecodeError(format!("instance name is not UTF-8 at byte {at}")))?
            .to_string();
        let nv = r.count(MAX_VALUES, "value")?;
        let mut values = Vec::with_capacity(nv.min(32));
        for _ in 0..nv {
            let tag = r.varint()?;
            let id = tag >> 1;
            let v = if tag & 1 == 0 {
                r.varint()? as f64
            } else {
                let b = r.bytes(8)?;
                f64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
            };
            if !v.is_finite() {
                return Err(r.bad("value is not a finite number"));
            }
            if let Ok(id) = u16::try_from(id)
                && metric(id).is_some()
            {
                values.push((id, v));
            }
        }
        groups.push(Group { instance, values });
    }
    if r.at != buf.len() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(Batch {
        seq,
        time_ms,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Batch {
        Batch {
            seq: 7,
            time_ms: 1_733_000_000_123,
            groups: vec![
                Group {
                    instance: String::new(),
                    values: vec![
                        (NODE_CPU_SECONDS, 1234.56),
                        (NODE_MEMORY_USED, 8_000_000_000.0),
                        (NODE_LOAD1, 0.25),
                    ],
                },
                Group {
                    instance: "web-1".into(),
                    values: vec![(INSTANCE_MEMORY, 52_428_800.0), (INSTANCE_UP, 1.0)],
                },
            ],
        }
    }

    #[test]
    fn a_batch_round_trips_and_is_small() {
        let b = sample();
        let bytes = encode(&b);
        assert_eq!(decode(&bytes).unwrap(), b);
        // 5 samples, two of them floats: well under 10 bytes a sample.
        assert!(bytes.len() < 50, "{} bytes", bytes.len());
    }

    #[test]
    fn ids_are_unique_and_names_follow_prometheus_conventions() {
        for (i, m) in CATALOGUE.iter().enumerate() {
            assert!(
                CATALOGUE[i + 1..]
                    .iter()
                    .all(|o| o.id != m.id && o.name != m.name)
            );
            assert!(m.name.starts_with("verge_"));
            assert_eq!(m.kind == Counter, m.name.ends_with("_total"), "{}", m.name);
        }
    }

    #[test]
    fn unknown_metrics_are_skipped_and_limits_hold() {
        let mut b = sample();
        b.groups[1].values.push((999, 3.0));
        let got = decode(&encode(&b)).unwrap();
        assert_eq!(got.groups[1].values.len(), 2);
        // A count past the limit is refused before anything is allocated for it.
        let mut evil = vec![FORMAT, 1, 1];
        put_varint(&mut evil, u64::MAX >> 1);
        let e = decode(&evil).unwrap_err();
        assert!(e.0.contains("group count"), "{e}");
        let mut nan = sample();
        nan.groups[0].values[2].1 = f64::NAN;
        assert!(decode(&encode(&nan)).is_err());
        assert!(decode(&[9]).unwrap_err().0.contains("format 9"));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn values_round_trip(v in proptest::num::f64::NORMAL | proptest::num::f64::ZERO, seq in any::<u64>()) {
            let b = Batch { seq, time_ms: 1, groups: vec![Group { instance: String::new(), values: vec![(NODE_LOAD1, v)] }] };
            prop_assert_eq!(decode(&encode(&b)).unwrap(), b);
        }
    }
}
