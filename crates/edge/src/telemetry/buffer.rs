//! The agent's metrics buffer: every sampling round goes here first and leaves only
//! once the hub has taken it, so rounds sampled while the node is cut off (and across
//! agent restarts) reach the hub in order when it is back.
//!
//! On a host it is a directory of segment files, each named by the sequence number of
//! its first round and holding records `[u32 length][u32 crc32][batch]`; a file
//! `state` keeps the last round the hub took and the count of samples dropped. A
//! record torn by a crash fails its length or checksum and ends its segment (what
//! follows it is cut off). The buffer is bounded: past `max_bytes` the oldest segment
//! goes, and its samples the hub never took are counted as dropped (reported as
//! `verge_node_metrics_dropped_samples_total`). A round the hub took but whose
//! acknowledgement was lost with the link counts as dropped too: the edge cannot tell
//! it apart (a few rounds at most, those in flight when the link went). A simulated edge keeps the same
//! segments in memory.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use verge_api::metrics::{Batch, decode, encode};

/// Where segments live.
enum Place {
    /// Files in this directory.
    Dir(PathBuf),
    /// Memory (a simulated edge).
    Memory,
}

struct Segment {
    first: u64,
    last: u64,
    bytes: u64,
    /// The records, when kept in memory.
    mem: Vec<u8>,
}

#[derive(Default)]
struct Inner {
    segments: VecDeque<Segment>,
    /// The last round the hub took.
    acked: u64,
    /// The sequence number the next round gets.
    next: u64,
    /// Samples dropped because the buffer was full.
    dropped: u64,
    /// The open file of the last segment (host only).
    file: Option<std::fs::File>,
    total: u64,
}

/// The buffer ([module docs](self)).
pub struct Buffer {
    place: Place,
    max_bytes: u64,
    segment_bytes: u64,
    inner: Mutex<Inner>,
}

const HEADER: usize = 8;
const STATE: &str = "state";

/// Parse the records of one segment's bytes: `(seq, record bytes)` of each whole,
/// intact record, and where the intact part ends.
fn records(data: &[u8]) -> (Vec<(u64, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while data.len() - at >= HEADER {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap_or_default());
        let Some(body) = data.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        let Ok(batch) = decode(body) else { break };
        out.push((batch.seq, body));
        at += HEADER + len;
    }
    (out, at)
}

fn io_err(path: &Path, e: std::io::Error) -> String {
    format!("metrics buffer {}: {e}", path.display())
}

impl Buffer {
    /// A buffer kept in memory, holding at most `max_bytes`.
    pub fn memory(max_bytes: u64) -> Self {
        Self::with(Place::Memory, max_bytes, Inner::default())
    }

    fn with(place: Place, max_bytes: u64, mut inner: Inner) -> Self {
        inner.next = inner.next.max(inner.acked + 1);
        Self {
            place,
            max_bytes,
            // A few segments to the bound, so that dropping one loses a fraction.
            segment_bytes: (max_bytes / 8).clamp(512, 1 << 20),
            inner: Mutex::new(inner),
        }
    }

    /// Open (or make) the buffer in `dir`, holding at most `max_bytes`: what an
    /// earlier agent left there is kept, up to its first torn record.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut inner = Inner::default();
        if let Ok(text) = std::fs::read_to_string(dir.join(STATE)) {
            let mut it = text
                .split_whitespace()
                .map(|w| w.parse::<u64>().unwrap_or(0));
            inner.acked = it.next().unwrap_or(0);
            inner.dropped = it.next().unwrap_or(0);
        }
        let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                let first = p.file_stem()?.to_str()?.parse::<u64>().ok()?;
                (p.extension()? == "seg").then_some((first, p))
            })
            .collect();
        names.sort();
        for (_, path) in names {
            let data = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
            let (recs, good) = records(&data);
            let seqs: Vec<u64> = recs.iter().map(|r| r.0).collect();
            let keep = seqs.last().is_some_and(|l| *l > inner.acked);
            if !keep {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if good < data.len() {
                tracing::warn!(path = %path.display(), kept = good, size = data.len(), "metrics buffer segment torn; its tail is cut off");
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?;
                f.set_len(good as u64).map_err(|e| io_err(&path, e))?;
            }
            inner.next = inner.next.max(seqs.last().copied().unwrap_or(0) + 1);
            inner.total += good as u64;
            inner.segments.push_back(Segment {
                first: seqs[0],
                last: seqs[seqs.len() - 1],
                bytes: good as u64,
                mem: Vec::new(),
            });
        }
        Ok(Self::with(Place::Dir(dir.to_path_buf()), max_bytes, inner))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn seg_path(dir: &Path, first: u64) -> PathBuf {
        dir.join(format!("{first:020}.seg"))
    }

    fn read(&self, s: &Segment) -> Vec<u8> {
        match &self.place {
            Place::Memory => s.mem.clone(),
            Place::Dir(d) => std::fs::read(Self::seg_path(d, s.first)).unwrap_or_default(),
        }
    }

    /// Samples the buffer has dropped since the node began.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// The sequence number the next round will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next
    }

    /// The last round the hub took.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.lock().total
    }

    fn save_state(&self, inner: &Inner) {
        if let Place::Dir(d) = &self.place {
            let tmp = d.join("state.tmp");
            let text = format!("{} {}\n", inner.acked, inner.dropped);
            if let Err(e) =
                std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, d.join(STATE)))
            {
                tracing::warn!(error = %e, "cannot save the metrics buffer's state");
            }
        }
    }

    /// Add a round: it gets the next sequence number (returned). When the buffer is
    /// over its bound, its oldest segment goes.
    pub fn push(&self, mut batch: Batch) -> u64 {
        let mut inner = self.lock();
        batch.seq = inner.next;
        inner.next += 1;
        let body = encode(&batch);
        let mut rec = Vec::with_capacity(HEADER + body.len());
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        rec.extend_from_slice(&body);
        let rec_len = rec.len() as u64;
        let new_segment = inner
            .segments
            .back()
            .is_none_or(|s| s.bytes + rec_len > self.segment_bytes);
        if new_segment {
            inner.file = None;
            inner.segments.push_back(Segment {
                first: batch.seq,
                last: batch.seq,
                bytes: 0,
                mem: Vec::new(),
            });
        }
        if let Place::Dir(d) = &self.place {
            let path = Self::seg_path(d, inner.segments.back().map_or(0, |s| s.first));
            if inner.file.is_none() {
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                {
                    Ok(f) => inner.file = Some(f),
                    Err(e) => tracing::warn!(error = %io_err(&path, e), "metrics round not kept"),
                }
            }
            if let Some(f) = inner.file.as_mut()
                && let Err(e) = f.write_all(&rec)
            {
                tracing::warn!(error = %io_err(&path, e), "metrics round not kept");
            }
        }
        if let Some(s) = inner.segments.back_mut() {
            s.last = batch.seq;
            s.bytes += rec_len;
            if matches!(self.place, Place::Memory) {
                s.mem.extend_from_slice(&rec);
            }
        }
        inner.total += rec_len;
        let mut dropped_any = false;
        while inner.total > self.max_bytes && inner.segments.len() > 1 {
            let Some(s) = inner.segments.pop_front() else {
                break;
            };
            let data = self.read(&s);
            let lost: u64 = records(&data)
                .0
                .iter()
                .filter(|(seq, _)| *seq > inner.acked)
                .filter_map(|(_, b)| decode(b).ok())
                .map(|b| b.samples() as u64)
                .sum();
            inner.dropped += lost;
            inner.total -= s.bytes;
            inner.acked = inner.acked.max(s.last);
            if let Place::Dir(d) = &self.place {
                let _ = std::fs::remove_file(Self::seg_path(d, s.first));
            }
            tracing::warn!(lost, "metrics buffer full: dropped its oldest rounds");
            dropped_any = true;
        }
        if dropped_any {
            self.save_state(&inner);
        }
        batch.seq
    }

    /// Up to `max_bytes` of rounds after `after`, in order: `(seq, encoded batch)`
    /// (at least one when there is one).
    pub fn pending(&self, after: u64, max_bytes: usize) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut size = 0;
        let mut from = after;
        loop {
            // One segment at a time, read outside the lock.
            let data = {
                let inner = self.lock();
                match inner.segments.iter().find(|s| s.last > from) {
                    Some(s) => self.read(s),
                    None => return out,
                }
            };
            let mut any = false;
            for (seq, body) in records(&data).0 {
                if seq <= from {
                    continue;
                }
                if size > 0 && size + body.len() > max_bytes {
                    return out;
                }
                size += body.len();
                any = true;
                from = seq;
                out.push((seq, body.to_vec()));
            }
            if !any {
                return out;
            }
        }
    }

    /// The hub took every round up to `seq`: they are forgotten.
    pub fn ack(&self, seq: u64) {
        let mut inner = self.lock();
        if seq <= inner.acked {
            return;
        }
        inner.acked = seq;
        while inner.segments.front().is_some_and(|s| s.last <= seq) {
            let Some(s) = inner.segments.pop_front() else {
                break;
            };
            inner.total -= s.bytes;
            if inner.segments.is_empty() {
                inner.file = None;
            }
            if let Place::Dir(d) = &self.place {
                let _ = std::fs::remove_file(Self::seg_path(d, s.first));
            }
        }
        self.save_state(&inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::metrics::{Group, NODE_LOAD1};

    fn round(v: f64) -> Batch {
        Batch {
            seq: 0,
            time_ms: 1_000 + v as u64,
            groups: vec![Group {
                instance: String::new(),
                values: vec![(NODE_LOAD1, v + 0.5)],
            }],
        }
    }

    fn seqs(b: &Buffer, after: u64) -> Vec<u64> {
        b.pending(after, usize::MAX).iter().map(|p| p.0).collect()
    }

    /// Rounds survive the buffer being opened again (an agent restart), acked ones
    /// do not come back, and numbering goes on where it stopped.
    #[test]
    fn rounds_survive_a_restart_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10u32 {
            assert_eq!(b.push(round(f64::from(i))), u64::from(i) + 1);
        }
        b.ack(4);
        drop(b);
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(b.acked(), 4);
        assert_eq!(seqs(&b, b.acked()), (5..=10).collect::<Vec<_>>());
        assert_eq!(b.push(round(10.0)), 11);
        let got = decode(&b.pending(10, usize::MAX)[0].1).unwrap();
        assert_eq!(got.groups[0].values[0].1, 10.5);
        b.ack(11);
        assert_eq!(b.bytes(), 0);
        assert!(seqs(&b, 0).is_empty());
    }

    /// A record torn by a crash ends its segment; what came before is kept.
    #[test]
    fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        for i in 0..3 {
            b.push(round(f64::from(i)));
        }
        drop(b);
        let seg = Buffer::seg_path(dir.path(), 1);
        let mut data = std::fs::read(&seg).unwrap();
        let n = data.len();
        data[n - 2] ^= 0xff;
        std::fs::write(&seg, &data).unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(seqs(&b, 0), vec![1, 2]);
        assert_eq!(b.push(round(9.0)), 3);
    }

    /// Past its bound the buffer drops its oldest rounds and counts their samples.
    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        for b in [
            Buffer::memory(4096),
            Buffer::open(dir.path(), 4096).unwrap(),
        ] {
            for i in 0..1000 {
                b.push(round(f64::from(i)));
            }
            assert!(b.bytes() <= 4096 + 512, "{}", b.bytes());
            let kept = seqs(&b, b.acked());
            assert_eq!(*kept.last().unwrap(), 1000);
            // Every round is either kept or counted (one sample each).
            assert_eq!(kept.len() as u64 + b.dropped(), 1000);
            assert!(kept.windows(2).all(|w| w[1] == w[0] + 1));
        }
    }

    #[test]
    fn pending_is_paged_by_size() {
        let b = Buffer::memory(1 << 20);
        for i in 0..100 {
            b.push(round(f64::from(i)));
        }
        let page = b.pending(0, 100);
        assert!(!page.is_empty() && page.len() < 100);
        assert_eq!(page[0].0, 1);
        assert_eq!(b.pending(0, 1).len(), 1);
    }
}
