//! Dialing a hub's channel: QUIC first, TLS over TCP when QUIC meets silence or a
//! failure that TCP may not share, remembering per endpoint what was learnt (a path
//! that filters UDP stays on TCP for a while). Edges dial their hub with it, and a
//! region hub its centre.

use std::time::Duration;

use crate::quic::Duplex;
use crate::tls::TlsError;

/// A connection made: the duplex stream of the channel, the QUIC connection it rides
/// on (None over TCP: data streams then need TLS connections of their own), and the
/// transport's name (`quic` or `tls`).
pub type Connected = (Box<dyn Duplex>, Option<quinn::Connection>, &'static str);

/// What to dial, and with what.
pub struct Target<'a> {
    /// `HOST:PORT`.
    pub addr: &'a str,
    /// The CA the hub's certificate must chain to.
    pub ca_pem: &'a str,
    /// Our certificate and key (PEM), if we present one.
    pub identity: Option<(&'a str, &'a str)>,
    /// The ALPN protocol of the session.
    pub alpn: &'a [u8],
    /// The QUIC client endpoint (None: TLS over TCP only).
    pub quic: Option<&'a quinn::Endpoint>,
    /// What was learnt of QUIC to this endpoint.
    pub path: &'a std::sync::Mutex<QuicPath>,
    /// The local address TCP connections leave from.
    pub tcp_source: Option<std::net::IpAddr>,
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

/// How long a hub may stay silent to a first QUIC attempt before the dialer tries TCP.
/// UDP that is filtered is silent, so this is a timeout, not an error; a hub busy with
/// a joining fleet can be silent for a second or two as well (1.5 s sent half of a
/// 10,000-edge fleet joining at 500 a second to TCP), so a filtered site pays a few
/// seconds at its first connect rather than a busy hub a descriptor per edge.
const QUIC_ATTEMPT: Duration = Duration::from_secs(5);

/// How long a QUIC handshake may take once the hub has answered.
const QUIC_HANDSHAKE: Duration = Duration::from_secs(10);

/// How long a hub that spoke QUIC to this agent before may stay silent: such a hub is
/// more likely down or busy with a reconnecting fleet (its socket's queue deep) than
/// behind a new filter, and TCP would cost it a descriptor per edge.
const QUIC_PATIENT_ANSWER: Duration = Duration::from_secs(5);

/// Silent QUIC attempts in a row after which even a hub that spoke QUIC before is
/// tried over TCP (the path may have changed): about 16 s with the backoffs between.
const QUIC_PATIENCE: u32 = 2;

/// After QUIC fails on an endpoint where TCP works, how long to use TLS over TCP
/// there before trying QUIC again.
const QUIC_RETRY: Duration = Duration::from_secs(300);

/// What a dialer has learnt of QUIC to one hub endpoint.
#[derive(Debug, Default)]
pub struct QuicPath {
    /// A QUIC handshake with this endpoint completed since the agent started.
    worked: bool,
    /// QUIC attempts in a row that met silence.
    silent_in_a_row: u32,
    /// TLS over TCP until then: QUIC failed where TCP worked (UDP filtered).
    tcp_until: Option<tokio::time::Instant>,
}

fn lock_path(p: &std::sync::Mutex<QuicPath>) -> std::sync::MutexGuard<'_, QuicPath> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connect: QUIC first (unless it was found filtered here), TLS over TCP when QUIC
/// meets silence or a failure that TCP may not share.
pub async fn channel(t: &Target<'_>) -> Result<Result<Connected, String>, TlsError> {
    let (try_quic, patient) = {
        let p = lock_path(t.path);
        (
            p.tcp_until.is_none_or(|t| tokio::time::Instant::now() >= t),
            p.worked && p.silent_in_a_row < QUIC_PATIENCE,
        )
    };
    let mut quic_failed = false;
    if let (Some(endpoint), true) = (t.quic, try_quic) {
        let cfg = crate::tls::client_config(t.ca_pem, t.identity, &[t.alpn])?;
        let answer_within = if patient {
            QUIC_PATIENT_ANSWER
        } else {
            QUIC_ATTEMPT
        };
        match tokio::time::timeout(
            answer_within + QUIC_HANDSHAKE,
            crate::quic::dial(endpoint, t.addr, cfg, answer_within),
        )
        .await
        {
            Ok(Ok((conn, stream))) => {
                let mut p = lock_path(t.path);
                p.worked = true;
                p.silent_in_a_row = 0;
                return Ok(Ok((stream, Some(conn), "quic")));
            }
            // The hub answered over UDP but is too busy to finish: UDP works, so TCP
            // would only add load; back off.
            Err(_) => return Ok(Err("QUIC handshake with a busy hub timed out".into())),
            Ok(Err(TlsError::Connect { source, .. }))
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                return Ok(Err(format!(
                    "the hub turned the connection away ({source})"
                )));
            }
            Ok(Err(TlsError::Connect { source, .. }))
                if source.kind() == std::io::ErrorKind::TimedOut =>
            {
                lock_path(t.path).silent_in_a_row += 1;
                if patient {
                    return Ok(Err(format!(
                        "no QUIC answer from a hub that spoke QUIC before ({source}): down or busy"
                    )));
                }
                tracing::info!(
                    addr = t.addr,
                    "no QUIC answer (UDP blocked?); using TLS over TCP"
                )
            }
            Ok(Err(e)) => {
                tracing::info!(addr = t.addr, error = %source_text(&e), "QUIC failed; using TLS over TCP")
            }
        }
        quic_failed = true;
    }
    let cfg = crate::tls::client_config(t.ca_pem, t.identity, &[t.alpn])?;
    Ok(
        match tokio::time::timeout(
            Duration::from_secs(10),
            crate::tls::dial_from(t.addr, cfg, t.tcp_source),
        )
        .await
        {
            Ok(Ok(s)) => {
                // QUIC failed where TCP works: UDP is filtered on this path, so stay
                // on TCP here for a while. (When both fail, the hub is down, not UDP:
                // a fleet must not fall back to TCP because its hub restarted.)
                if quic_failed {
                    lock_path(t.path).tcp_until = Some(tokio::time::Instant::now() + QUIC_RETRY);
                }
                Ok((Box::new(s) as Box<dyn Duplex>, None, "tls"))
            }
            Ok(Err(e)) => Err(format!("{e}: {}", source_text(&e))),
            Err(_) => Err("connect timed out".into()),
        },
    )
}
