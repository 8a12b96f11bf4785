//! TLS session tickets that a restarted hub still accepts.
//!
//! A full TLS 1.3 handshake with client certificates costs each side an ECDHE and
//! three ECDSA operations (sign, and verify a chain and a signature); a resumed one
//! only the ECDHE (`psk_dhe_ke`: traffic stays forward secret). A fleet reconnecting
//! to a hub that crashed pays that for every edge at once, so the hub hands each
//! edge a ticket, and the ticket key must outlive the process: it is derived from a
//! secret the hub keeps across restarts (its CA key, as for the QUIC reset keys),
//! so every replica sharing that CA accepts the tickets of the others too.
//!
//! Keys roll by period: a ticket names the period it was made in, and is accepted in
//! that period and the next, never later ("lifetime by key rolling and erasure", as
//! rustls asks). A resumed session carries the client certificate of the handshake
//! that made the ticket; the hub checks that it is still valid on every connection,
//! resumed or not (`pki::node_identity_from_cert`), so a ticket never extends a
//! certificate.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::NamedGroup;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

/// How long one ticket key makes tickets: a ticket is accepted for one to two of
/// these, and clients keep it one (TLS 1.3 allows at most 7 days). An edge whose
/// connection is older than this pays a full handshake when it has to reconnect.
pub const TICKET_PERIOD: u64 = 3 * 24 * 3600;

/// Tickets the hub hands out per handshake, and a client keeps. An attempt the hub
/// turns away before its handshake (while a fleet reconnects) has already spent the
/// ticket it offered: with a second one, the next attempt still resumes.
pub const TICKETS_PER_HANDSHAKE: usize = 2;

/// Bytes before the sealed part: the period (4) and the nonce.
const HEADER: usize = 4 + NONCE_LEN;

/// A ticketer whose keys derive from a secret that outlives the process.
pub struct DerivedTickets {
    secret: [u8; 32],
    period: u64,
    issued: AtomicU64,
    accepted: AtomicU64,
}

impl std::fmt::Debug for DerivedTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerivedTickets")
            .field("period", &self.period)
            .finish_non_exhaustive()
    }
}

impl DerivedTickets {
    /// Tickets keyed from `secret` (the hub's CA key: only a holder of it can make or
    /// read them), rolling every [`TICKET_PERIOD`].
    pub fn new(secret: &[u8]) -> Self {
        Self::with_period(secret, TICKET_PERIOD)
    }

    fn with_period(secret: &[u8], period: u64) -> Self {
        let secret = Sha256::new()
            .chain_update(b"verge tls session tickets\0")
            .chain_update(secret)
            .finalize()
            .into();
        Self {
            secret,
            period: period.max(1),
            issued: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        }
    }

    /// Tickets handed out since start.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Tickets accepted since start: each is a handshake that resumed (or was about
    /// to: the client's proof of the ticket's secret is checked after).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    fn period_now(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        now / self.period
    }

    fn key(&self, period: u32) -> Option<LessSafeKey> {
        let k = Sha256::new()
            .chain_update(self.secret)
            .chain_update(period.to_be_bytes())
            .finalize();
        Some(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).ok()?))
    }

    fn seal(&self, period: u32, plain: &[u8]) -> Option<Vec<u8>> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut out = Vec::with_capacity(HEADER + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&period.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key(period)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(period.to_be_bytes()),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open(&self, now: u64, cipher: &[u8]) -> Option<Vec<u8>> {
        let period = u32::from_be_bytes(cipher.get(..4)?.try_into().ok()?);
        // This period's key or the last one's; anything else has been erased.
        if !(u64::from(period) == now || u64::from(period) + 1 == now) {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(cipher.get(4..HEADER)?).ok()?;
        let mut body = cipher.get(HEADER..)?.to_vec();
        let plain = self
            .key(period)?
            .open_in_place(nonce, Aad::from(period.to_be_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// A client's tickets for the one hub it dials: the newest
/// [`TICKETS_PER_HANDSHAKE`], each offered once (rustls' own cache keeps up to 8 per
/// server and a map of servers, more than an edge needs).
#[derive(Debug, Default)]
pub struct HubTickets {
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    kx_hint: Option<NamedGroup>,
    tickets: VecDeque<Tls13ClientSessionValue>,
}

impl HubTickets {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tickets held now.
    pub fn len(&self) -> usize {
        self.lock().tickets.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ClientSessionStore for HubTickets {
    fn set_kx_hint(&self, _: ServerName<'static>, group: NamedGroup) {
        self.lock().kx_hint = Some(group);
    }

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock().kx_hint
    }

    // TLS 1.2 sessions are not resumed (`Tls12Resumption::Disabled`).
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, _: ServerName<'static>, value: Tls13ClientSessionValue) {
        let mut held = self.lock();
        if held.tickets.len() >= TICKETS_PER_HANDSHAKE {
            held.tickets.pop_front();
        }
        held.tickets.push_back(value);
    }

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        // The newest first: it has the most life left.
        self.lock().tickets.pop_back()
    }
}

impl rustls::server::ProducesTickets for DerivedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.period).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let period = u32::try_from(self.period_now()).ok()?;
        let t = self.seal(period, plain)?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        Some(t)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.open(self.period_now(), cipher)?;
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn a_ticket_opens_with_the_same_secret_in_its_period_and_the_next_only() {
        let a = DerivedTickets::with_period(b"ca key", 100);
        let t = a.seal(7, b"session state").expect("sealed");
        // A new process from the same secret (a restarted hub) reads it.
        let restarted = DerivedTickets::with_period(b"ca key", 100);
        assert_eq!(
            restarted.open(7, &t).as_deref(),
            Some(&b"session state"[..])
        );
        assert_eq!(
            restarted.open(8, &t).as_deref(),
            Some(&b"session state"[..])
        );
        assert_eq!(restarted.open(9, &t), None, "two periods on: erased");
        assert_eq!(restarted.open(6, &t), None, "from the future");
        let other = DerivedTickets::with_period(b"another ca key", 100);
        assert_eq!(other.open(7, &t), None, "another CA's hub");
        // The period is bound to the ticket: naming another one breaks it.
        let mut moved = t.clone();
        moved[..4].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(restarted.open(8, &moved), None);
    }

    #[test]
    fn the_counters_say_what_was_issued_and_accepted() {
        let a = DerivedTickets::new(b"k");
        let t = a.encrypt(b"x").expect("ticket");
        assert_eq!(a.decrypt(&t).as_deref(), Some(&b"x"[..]));
        assert_eq!(a.decrypt(b"not a ticket"), None);
        assert_eq!((a.issued(), a.accepted()), (1, 1));
    }

    proptest! {
        /// What a peer sends as a ticket is attacker-controlled: garbage and
        /// altered tickets are refused, never a panic.
        #[test]
        fn altered_or_garbage_tickets_are_refused(
            garbage in proptest::collection::vec(any::<u8>(), 0..200),
            flip in 0usize..64,
        ) {
            let a = DerivedTickets::with_period(b"ca key", 100);
            prop_assert_eq!(a.open(7, &garbage), None);
            let mut t = a.seal(7, b"session state").expect("sealed");
            let i = flip % t.len();
            t[i] ^= 1;
            prop_assert_eq!(a.open(7, &t), None);
        }
    }
}
