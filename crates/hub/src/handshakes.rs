//! The queue of QUIC connections waiting for their handshake.
//!
//! The hub begins handshakes at a pace (`--handshake-rate`): each costs a key
//! exchange (and, without a session ticket, a signature and a certificate check), and
//! a storm of them starves the socket the sessions already up depend on. It also
//! begins only so many at once ([`in_flight_for`]): a handshake begun is finished by
//! the edge too, and when the edges' side is slow (a simulator's thread, a site's
//! saturated link) beginning more only adds handshakes that time out and come again.
//!
//! A connection that comes while the pace is spent waits here instead of being turned
//! away (unless the hub is behind on its work: then it is turned away at once, as
//! its edge learns soonest so to come back later): quinn keeps its first datagrams, and the edge's retransmissions of them,
//! until the hub begins or refuses it, so waiting costs neither side a thing. A
//! refusal costs the edge a new key exchange at its next attempt and a random wait
//! over its fleet's reconnect spread. After a restart at 100,000 simulated edges the
//! hub turned away 288,000 attempts in 80 s and each came again: refusals were most
//! of both sides' work. Only what an edge would not wait for is turned away: a
//! connection that finds the queue full (as long as [`MAX_WAIT`] at the pace), or
//! that waited longer than that (the hub fell behind and paused).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use crate::limits::TokenBucket;

/// The longest a connection waits for its handshake to begin. An edge waits 5 s for
/// a first answer before it counts the hub as silent (`verge_tunnel::dial`): this
/// leaves it the rest for the handshake.
pub const MAX_WAIT: Duration = Duration::from_secs(2);

/// Handshakes begun and not finished that the hub allows at `per_second`: a
/// sixteenth of a second's worth (at least 16). On loopback a handshake takes a few
/// milliseconds; when they take longer the two sides are busy, and more at once only
/// make each slower: with half a second's worth allowed (1,000 at 2,000 a second), a
/// joining fleet of 100,000 simulated edges had all 1,000 in flight, half of them
/// failed after seconds, and the sessions already up began to drop.
pub fn in_flight_for(per_second: f64) -> usize {
    ((per_second / 16.0) as usize).max(16)
}

/// The longest a handshake counts as in flight. One not finished by then is slow or
/// abandoned (an edge that gave up leaves the hub's side waiting for its deadline):
/// with a sixteen-handshake bound, a few abandoned ones blocked a 300-edge fleet's
/// queue for seconds and it was turned away 250 times.
pub const IN_FLIGHT_AT_MOST: Duration = Duration::from_millis(500);

/// Connections that may wait at `per_second`: [`MAX_WAIT`]'s worth (at least 16).
pub fn capacity_for(per_second: f64) -> usize {
    ((per_second * MAX_WAIT.as_secs_f64()) as usize).max(16)
}

/// Where connections join the queue.
pub struct HandshakeQueue<T> {
    tx: mpsc::Sender<(T, Instant)>,
    waiting: Gauge,
}

/// Where the queue is drained, at the pace and within the bound on handshakes in
/// flight.
pub struct Drain<T> {
    rx: mpsc::Receiver<(T, Instant)>,
    in_flight: Arc<Semaphore>,
    waiting: Gauge,
    in_flight_gauge: Gauge,
    max_wait: Duration,
}

/// What to do with the next connection.
pub enum Next<T, R> {
    /// Begin its handshake; the permit counts it in flight until it is dropped.
    Begin(T, InFlight),
    /// Turn it away: it waited longer than an edge waits.
    TooLate(T),
    /// Turn it away: the hub is behind, for this reason.
    Behind(T, R),
}

/// A handshake in flight: dropping it lets the next one begin.
pub struct InFlight {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A queue of `capacity` connections, of which at most `in_flight` have their
/// handshakes begun and not finished at once; each waits at most `max_wait`. The
/// gauges count the connections waiting and in flight.
pub fn queue<T>(
    capacity: usize,
    in_flight: usize,
    max_wait: Duration,
    waiting: Gauge,
    in_flight_gauge: Gauge,
) -> (HandshakeQueue<T>, Drain<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        HandshakeQueue {
            tx,
            waiting: waiting.clone(),
        },
        Drain {
            rx,
            in_flight: Arc::new(Semaphore::new(in_flight.max(1))),
            waiting,
            in_flight_gauge,
            max_wait,
        },
    )
}

impl<T> HandshakeQueue<T> {
    /// Queue a connection; `Err` gives it back when the queue is full.
    pub fn offer(&self, item: T) -> Result<(), T> {
        match self.tx.try_send((item, Instant::now())) {
            Ok(()) => {
                self.waiting.inc();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full((item, _)))
            | Err(mpsc::error::TrySendError::Closed((item, _))) => Err(item),
        }
    }
}

impl<T> Drain<T> {
    /// The next connection, in the order they came: begun when a handshake may be in
    /// flight and `pace` has a token; turned away once it has waited too long, or
    /// when `behind` (the hub putting off new work) says so: a hub behind that let
    /// connections wait would begin them all at once when it caught up. `None` once
    /// every [`HandshakeQueue`] is gone.
    pub async fn next<R>(
        &mut self,
        pace: &TokenBucket,
        behind: impl Fn() -> Option<R>,
    ) -> Option<Next<T, R>> {
        let (item, since) = self.rx.recv().await?;
        self.waiting.dec();
        let deadline = since + self.max_wait;
        let permit = tokio::select! {
            p = self.in_flight.clone().acquire_owned() => p.ok(),
            _ = tokio::time::sleep_until(deadline) => None,
        };
        let Some(permit) = permit else {
            return Some(Next::TooLate(item));
        };
        loop {
            if let Some(why) = behind() {
                return Some(Next::Behind(item, why));
            }
            let wait = match pace.take() {
                Ok(()) => break,
                Err(wait) => wait,
            };
            if Instant::now() + wait >= deadline {
                return Some(Next::TooLate(item));
            }
            tokio::time::sleep(wait).await;
        }
        self.in_flight_gauge.inc();
        Some(Next::Begin(
            item,
            InFlight {
                _permit: permit,
                gauge: self.in_flight_gauge.clone(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(
        capacity: usize,
        in_flight: usize,
    ) -> (HandshakeQueue<u32>, Drain<u32>, Gauge, Gauge) {
        let (waiting, flying) = (Gauge::default(), Gauge::default());
        let (q, d) = queue(
            capacity,
            in_flight,
            MAX_WAIT,
            waiting.clone(),
            flying.clone(),
        );
        (q, d, waiting, flying)
    }

    #[tokio::test(start_paused = true)]
    async fn connections_wait_for_the_pace_instead_of_being_turned_away() {
        let pace = TokenBucket::new(10.0);
        let (q, mut d, waiting, flying) = drained(64, 64);
        // The bucket starts full (its burst): 10 at once, then one per 100 ms.
        for i in 0..15 {
            q.offer(i).unwrap_or_else(|_| panic!("room for {i}"));
        }
        assert_eq!(waiting.get(), 15);
        let start = Instant::now();
        let mut begun = Vec::new();
        for _ in 0..15 {
            match d.next(&pace, || None::<()>).await {
                Some(Next::Begin(i, f)) => begun.push((i, f)),
                _ => panic!("every one begins within its wait"),
            }
        }
        assert_eq!(
            begun.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (0..15).collect::<Vec<_>>(),
            "in the order they came"
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took <= Duration::from_millis(700),
            "5 past the burst at 10 a second: {took:?}"
        );
        assert_eq!((waiting.get(), flying.get()), (0, 15));
        begun.clear();
        assert_eq!(flying.get(), 0, "a finished handshake leaves the flight");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_and_a_long_wait_turn_connections_away() {
        let pace = TokenBucket::new(1.0);
        let (q, mut d, _, _) = drained(3, 64);
        for i in 0..3 {
            assert!(q.offer(i).is_ok());
        }
        assert_eq!(q.offer(3).err(), Some(3), "the fourth finds the queue full");
        // One token: the first begins, the second waits a second (within MAX_WAIT),
        // the third would wait past it.
        assert!(matches!(
            d.next(&pace, || None::<()>).await,
            Some(Next::Begin(0, _))
        ));
        assert!(matches!(
            d.next(&pace, || None::<()>).await,
            Some(Next::Begin(1, _))
        ));
        assert!(matches!(
            d.next(&pace, || None::<()>).await,
            Some(Next::TooLate(2))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_handshakes_in_flight_than_the_bound() {
        let pace = TokenBucket::new(1000.0);
        let (q, mut d, _, flying) = drained(64, 2);
        for i in 0..3 {
            assert!(q.offer(i).is_ok());
        }
        let a = d.next(&pace, || None::<()>).await;
        let b = d.next(&pace, || None::<()>).await;
        assert_eq!(flying.get(), 2);
        // Neither finishes: the third is turned away when its wait is up.
        let start = Instant::now();
        assert!(matches!(
            d.next(&pace, || None::<()>).await,
            Some(Next::TooLate(2))
        ));
        assert_eq!(start.elapsed(), MAX_WAIT);
        // One finishes: the next begins at once.
        drop(a);
        assert!(q.offer(3).is_ok());
        assert!(matches!(
            d.next(&pace, || None::<()>).await,
            Some(Next::Begin(3, _))
        ));
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hub_behind_turns_waiting_connections_away_at_once() {
        let pace = TokenBucket::new(1000.0);
        let (q, mut d, _, flying) = drained(64, 64);
        assert!(q.offer(0).is_ok());
        let start = Instant::now();
        assert!(matches!(
            d.next(&pace, || Some("behind")).await,
            Some(Next::Behind(0, "behind"))
        ));
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(flying.get(), 0);
    }
}
