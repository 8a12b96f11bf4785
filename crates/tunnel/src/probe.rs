//! Peer probes: the datagrams the nodes of one site send each other to tell a node
//! that is down from one that is only cut off from the hub.
//!
//! A probe carries who sends it, to whom, and a fresh nonce; the answer echoes them.
//! Both are signed with the site's key (HMAC-SHA256), which the hub hands each node
//! of the site over its channel, so that nobody else on the network can make a dead
//! node look alive. A probe is at most [`MAX_PROBE`] bytes and anything else on the
//! socket is dropped unread.

use ring::hmac;
use serde::{Deserialize, Serialize};

/// The largest datagram read or sent.
pub const MAX_PROBE: usize = 512;

/// Probe or answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// "Do you hear me?"
    Probe,
    /// "I do": the answer to a probe, with its nonce.
    Ack,
}

/// One datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Probe or answer.
    pub kind: ProbeKind,
    /// The sender's node name.
    pub from: String,
    /// The receiver's node name.
    pub to: String,
    /// Chosen by the prober; echoed by the answer.
    pub nonce: u64,
    /// HMAC-SHA256 of the fields above under the site key, hex.
    #[serde(default)]
    pub mac: String,
}

/// Why a datagram was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    /// Larger than [`MAX_PROBE`].
    #[error("datagram of {0} bytes exceeds {MAX_PROBE}")]
    TooLarge(usize),
    /// Not a probe.
    #[error("malformed probe: {0}")]
    Malformed(String),
    /// Not signed with the site key.
    #[error("probe from '{0}' is not signed with this site's key")]
    BadSignature(String),
}

fn signed_bytes(p: &Probe) -> Vec<u8> {
    let kind = match p.kind {
        ProbeKind::Probe => "probe",
        ProbeKind::Ack => "ack",
    };
    format!("verge-probe\0{kind}\0{}\0{}\0{}", p.from, p.to, p.nonce).into_bytes()
}

impl Probe {
    /// A signed datagram.
    pub fn signed(kind: ProbeKind, from: &str, to: &str, nonce: u64, key: &[u8]) -> Vec<u8> {
        let mut p = Probe {
            kind,
            from: from.into(),
            to: to.into(),
            nonce,
            mac: String::new(),
        };
        let k = hmac::Key::new(hmac::HMAC_SHA256, key);
        p.mac = crate::pki::hex(hmac::sign(&k, &signed_bytes(&p)).as_ref());
        serde_json::to_vec(&p).unwrap_or_default()
    }

    /// Read and check a datagram.
    pub fn open(datagram: &[u8], key: &[u8]) -> Result<Probe, ProbeError> {
        if datagram.len() > MAX_PROBE {
            return Err(ProbeError::TooLarge(datagram.len()));
        }
        let p: Probe =
            serde_json::from_slice(datagram).map_err(|e| ProbeError::Malformed(e.to_string()))?;
        let mac =
            crate::pki::unhex(&p.mac).ok_or_else(|| ProbeError::BadSignature(p.from.clone()))?;
        let k = hmac::Key::new(hmac::HMAC_SHA256, key);
        hmac::verify(&k, &signed_bytes(&p), &mac)
            .map_err(|_| ProbeError::BadSignature(p.from.clone()))?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_probe_opens_with_the_key_and_not_without() {
        let d = Probe::signed(ProbeKind::Probe, "a", "b", 42, b"site key");
        let p = Probe::open(&d, b"site key").expect("opens");
        assert_eq!(
            (p.kind, p.from.as_str(), p.to.as_str(), p.nonce),
            (ProbeKind::Probe, "a", "b", 42)
        );
        assert_eq!(
            Probe::open(&d, b"other key"),
            Err(ProbeError::BadSignature("a".into()))
        );
        // Any field changed breaks the signature: an answer cannot be made from a
        // probe, nor a nonce replaced.
        let mut forged: Probe = serde_json::from_slice(&d).expect("json");
        forged.kind = ProbeKind::Ack;
        let forged = serde_json::to_vec(&forged).expect("json");
        assert!(Probe::open(&forged, b"site key").is_err());
        let mut renonced: Probe = serde_json::from_slice(&d).expect("json");
        renonced.nonce = 43;
        assert!(Probe::open(&serde_json::to_vec(&renonced).expect("json"), b"site key").is_err());
    }

    #[test]
    fn garbage_and_oversized_datagrams_are_dropped() {
        assert!(matches!(
            Probe::open(b"\xff\x00junk", b"k"),
            Err(ProbeError::Malformed(_))
        ));
        assert_eq!(
            Probe::open(&[b' '; MAX_PROBE + 1], b"k"),
            Err(ProbeError::TooLarge(MAX_PROBE + 1))
        );
        let no_mac = br#"{"kind":"ack","from":"a","to":"b","nonce":1,"mac":"zz"}"#;
        assert!(matches!(
            Probe::open(no_mac, b"k"),
            Err(ProbeError::BadSignature(_))
        ));
    }
}
