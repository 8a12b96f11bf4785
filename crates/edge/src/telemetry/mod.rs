//! Metrics at the edge: the agent samples the node and its instances every
//! `interval`, keeps each round in its [`buffer::Buffer`] (on disk on a host), and
//! ships the rounds to the hub in order on a stream of their own
//! ([`StreamHello::Metrics`]), at most `rate` bytes a second, so that a fleet coming
//! back from an outage drains its backlog without flooding the hub. A round leaves
//! the buffer only once the hub says it has taken it: one that was sent but not
//! acknowledged when the link or the agent went down is sent again (the hub keeps
//! each series' samples in time order and ignores one it has). The hub says so about
//! once a minute, not for every round ([`StreamHello::Metrics`]`::ack_every`).

pub mod buffer;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use verge_api::channel::{METRICS_ACK_EVERY_MAX, StreamHello};
use verge_api::metrics::{Batch, Group, NODE_INSTANCES, NODE_METRICS_DROPPED};
use verge_tunnel::chunk::{Chunk, read_chunk, write_chunk};

use crate::agent::Agent;
use crate::streams::Opener;

/// A node's own metrics for one round (the kernel's on a host, made up for a
/// simulated edge).
pub type NodeSampler = dyn Fn() -> Vec<(u16, f64)> + Send + Sync;

/// How the agent samples and ships metrics.
#[derive(Debug, Clone, Copy)]
pub struct TelemetryConfig {
    /// How often to sample (zero: never).
    pub interval: Duration,
    /// How much the buffer holds while the hub is out of reach.
    pub buffer_bytes: u64,
    /// Most bytes a second sent to the hub while draining a backlog.
    pub rate: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            buffer_bytes: 64 << 20,
            rate: 64 << 10,
        }
    }
}

/// Rounds in flight before the shipper waits for the hub to take some.
const WINDOW: u64 = 32;
/// Bytes read from the buffer at a time.
const PAGE: usize = 64 << 10;
/// How long the hub may take to acknowledge, beyond the rounds it was asked to let go
/// unanswered, before the stream is given up.
const ACK_DEADLINE: Duration = Duration::from_secs(30);
/// About how often the hub is asked to acknowledge rounds: every answer costs a
/// datagram down and the edge's acknowledgement of it up.
const ACK_SPAN: Duration = Duration::from_secs(60);
/// How long after a failed metrics stream another is opened.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// An idle stream pings this often (NAT mappings; noticing a dead hub).
const PING_EVERY: Duration = Duration::from_secs(30);

/// The agent's metrics: sampler, buffer and shipper.
pub struct Telemetry {
    config: TelemetryConfig,
    buffer: buffer::Buffer,
    node: Arc<NodeSampler>,
    /// Rounds waiting to be sent.
    fresh: Notify,
    /// The session just sent a heartbeat ([`Telemetry::beat`]).
    beat: Notify,
}

impl Telemetry {
    /// Sample with `node` into `buffer`.
    pub fn new(
        config: TelemetryConfig,
        buffer: buffer::Buffer,
        node: Arc<NodeSampler>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            buffer,
            node,
            fresh: Notify::new(),
            beat: Notify::new(),
        })
    }

    /// The buffer.
    pub fn buffer(&self) -> &buffer::Buffer {
        &self.buffer
    }

    /// Take one round now: the node, then every instance.
    pub fn sample(&self, agent: &Agent) -> u64 {
        let instances = agent.instance_metrics();
        let mut node = (self.node)();
        let running = instances
            .iter()
            .filter(|g| g.values.contains(&(verge_api::metrics::INSTANCE_UP, 1.0)))
            .count();
        node.push((NODE_INSTANCES, running as f64));
        node.push((NODE_METRICS_DROPPED, self.buffer.dropped() as f64));
        let mut groups = Vec::with_capacity(1 + instances.len());
        groups.push(Group {
            instance: String::new(),
            values: node,
        });
        groups.extend(instances);
        let seq = self.buffer.push(Batch {
            seq: 0,
            time_ms: verge_api::clock::now_ms(),
            groups,
        });
        self.fresh.notify_one();
        seq
    }

    /// Sample every interval, for as long as the agent runs (cut off or not).
    pub async fn sampler(self: Arc<Self>, agent: Arc<Agent>) {
        if self.config.interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample(&agent);
        }
    }

    /// The session has just written a heartbeat: a round waiting goes now, so that
    /// both leave in one datagram (an idle fleet's traffic is mostly these two; sent
    /// apart, each costs a datagram and its acknowledgement both ways).
    pub fn beat(&self) {
        self.beat.notify_one();
    }

    /// Ship the buffer over one session for as long as it lasts (the session aborts
    /// this task when it ends); a stream that fails is opened again after a pause.
    pub async fn ship(self: Arc<Self>, opener: Opener) {
        if self.config.interval.is_zero() {
            return;
        }
        loop {
            let Err(e) = self.ship_once(&opener).await;
            tracing::info!(error = %e, "metrics stream ended; the buffer keeps what was not taken");
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }

    /// How many rounds the hub may take before it says so: about one answer per
    /// [`ACK_SPAN`], well inside the window so that sending never waits for one.
    fn ack_every(&self) -> u32 {
        let n = ACK_SPAN.as_millis() / self.config.interval.as_millis().max(1);
        (n as u32).clamp(1, (WINDOW as u32 / 2).min(METRICS_ACK_EVERY_MAX))
    }

    async fn ship_once(&self, opener: &Opener) -> Result<std::convert::Infallible, String> {
        let ack_every = self.ack_every();
        // Boxed: the opening is over once open, and this future lasts the session.
        let io = Box::pin(opener.open(&StreamHello::Metrics { ack_every })).await?;
        // Rounds may go unanswered for `ack_every` intervals before the deadline runs.
        let ack_deadline = ACK_DEADLINE + self.config.interval * ack_every;
        let (mut rd, mut wr) = tokio::io::split(io);
        // Acknowledgements come in on their own task: a read cut short by select!
        // would lose bytes of a chunk.
        let (ack_tx, mut acks) = tokio::sync::mpsc::channel::<Result<u64, String>>(WINDOW as usize);
        let reader = tokio::spawn(async move {
            loop {
                let r = match read_chunk(&mut rd).await {
                    Ok(Some(Chunk::Data(d))) => match <[u8; 8]>::try_from(d.as_slice()) {
                        Ok(b) => Ok(u64::from_be_bytes(b)),
                        Err(_) => Err(format!("the hub sent a {}-byte acknowledgement", d.len())),
                    },
                    Ok(Some(Chunk::Error(m))) => Err(format!("the hub refused metrics: {m}")),
                    Ok(Some(_)) => continue,
                    Ok(None) => Err("the hub closed the metrics stream".into()),
                    Err(e) => Err(e.to_string()),
                };
                let end = r.is_err();
                if ack_tx.send(r).await.is_err() || end {
                    return;
                }
            }
        });
        let _reader = AbortOnDrop(reader);
        let mut acked = self.buffer.acked();
        let mut sent = acked;
        let mut limiter = Limiter::new(self.config.rate);
        // A new stream sends what is there at once (a backlog from an outage).
        let mut beat = true;
        // The last answer from the hub, or when rounds began to wait for one.
        let mut heard = tokio::time::Instant::now();
        let mut wrote = heard;
        loop {
            if sent < acked {
                sent = acked;
            }
            // One round waits for the next heartbeat ([`Telemetry::beat`]); more are a
            // backlog, which goes at once.
            let queued = self.buffer.next_seq().saturating_sub(sent + 1);
            let send_now = std::mem::take(&mut beat) || queued > 1;
            // Send what the window allows.
            if sent == acked {
                heard = tokio::time::Instant::now();
            }
            while send_now && sent - acked < WINDOW {
                let page = self.buffer.pending(sent, PAGE);
                if page.is_empty() {
                    break;
                }
                for (seq, body) in page {
                    if sent - acked >= WINDOW {
                        break;
                    }
                    limiter.take(body.len()).await;
                    write_chunk(&mut wr, &Chunk::Data(body))
                        .await
                        .map_err(|e| format!("sending metrics: {e}"))?;
                    sent = seq;
                    wrote = tokio::time::Instant::now();
                }
            }
            let waiting = sent > acked;
            tokio::select! {
                a = acks.recv() => {
                    let seq = a.ok_or("the metrics stream's reader ended")??;
                    if seq > acked {
                        acked = seq;
                        heard = tokio::time::Instant::now();
                        self.buffer.ack(seq);
                    }
                }
                _ = self.fresh.notified(), if !waiting => {}
                _ = self.beat.notified() => beat = true,
                _ = tokio::time::sleep_until(heard + ack_deadline), if waiting => {
                    return Err(format!("the hub took nothing for {}s", ack_deadline.as_secs()));
                }
                _ = tokio::time::sleep_until(wrote + PING_EVERY) => {
                    write_chunk(&mut wr, &Chunk::Ping).await.map_err(|e| format!("sending metrics: {e}"))?;
                    wrote = tokio::time::Instant::now();
                }
            }
        }
    }
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Paces sending to `rate` bytes a second (a one-second burst allowed).
struct Limiter {
    rate: u64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Limiter {
    fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            tokens: rate.max(1) as f64,
            at: tokio::time::Instant::now(),
        }
    }

    async fn take(&mut self, n: usize) {
        let now = tokio::time::Instant::now();
        let rate = self.rate as f64;
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(rate);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / rate)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An edge sampling every 10 s asks for an answer every 6 rounds (once a
    /// minute); one sampling rarely, every round; one sampling often, at most every
    /// 16 (half the window, so that sending never waits for an answer).
    #[test]
    fn the_hub_is_asked_to_answer_about_once_a_minute() {
        for (interval, every) in [(10, 6), (60, 1), (300, 1), (1, 16)] {
            let config = TelemetryConfig {
                interval: Duration::from_secs(interval),
                ..TelemetryConfig::default()
            };
            let t = Telemetry::new(config, buffer::Buffer::memory(1 << 20), Arc::new(Vec::new));
            assert_eq!(t.ack_every(), every, "interval {interval}s");
        }
    }

    /// Pacing can only make sending slower, so this checks the lower bound alone.
    #[tokio::test]
    async fn the_limiter_holds_the_rate() {
        let mut l = Limiter::new(100_000);
        let start = tokio::time::Instant::now();
        for _ in 0..30 {
            l.take(10_000).await;
        }
        // 300 kB at 100 kB/s with a 100 kB burst: at least two seconds.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1950), "{took:?}");
    }
}
