//! Verge's cloud-edge channel: how the hub and an edge talk.
//!
//! - [`frame`]: the wire framing (length-prefixed JSON), pure and fuzzable.
//! - [`chunk`]: the binary framing of data streams (logs, exec, port-forward, relay).
//! - [`pki`]: the hub's certificate authority, node identities (CSR signed by the CA),
//!   and join tokens that carry the CA fingerprint so an edge can trust the hub on first
//!   contact.
//! - [`tls`]: rustls configurations (mutual TLS, the pinned first-contact verifier) and
//!   dialing over TCP.
//! - [`tickets`]: TLS session tickets whose keys outlive a hub restart, so that a
//!   reconnecting fleet resumes instead of paying full handshakes.
//! - [`quic`]: the same channel over a QUIC stream (quinn), the edge's first choice.
//! - [`backlog`]: how far behind the reading of the hub's UDP socket is (what the
//!   kernel holds unread for it, what it dropped).
//!
//! The message types live in `verge_api::channel`; this crate moves bytes and
//! identities, it does not interpret messages.

pub mod backlog;
pub mod chunk;
pub mod dial;
pub mod frame;
pub mod pki;
pub mod probe;
pub mod quic;
#[cfg(test)]
mod testing;
pub mod tickets;
pub mod tls;

/// Install the one rustls crypto provider (ring) for this process. Idempotent.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
