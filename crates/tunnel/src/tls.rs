//! TLS configurations for the hub and the edges, and dialing.
//!
//! One TLS port on the hub serves both the REST API (ALPN `http/1.1`) and the edge
//! channel (ALPN `verge-channel/1`, `verge-enroll/1`). Client certificates are optional
//! at the TLS layer (operators use bearer tokens), and required by the channel.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::pki::{HUB_SERVER_NAME, Issued, der_fingerprint};

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key could not be read.
    #[error("could not read {what}: {detail}")]
    Pem {
        /// What.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(String),
    /// Connecting failed.
    #[error("could not connect to {addr}")]
    Connect {
        /// Address dialed.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An address or URL is malformed.
    #[error("bad hub address {0:?}; expected https://HOST:PORT")]
    BadAddress(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            detail: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "private key",
        detail: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    Ok(roots)
}

fn cfg_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// The hub's server config: presents `[server cert, CA]`, accepts optional client
/// certificates signed by the CA, and hands each client one session ticket from
/// `tickets` (keys that outlive a restart: [`crate::tickets`]).
pub fn server_config(
    ca_pem: &str,
    server: &Issued,
    alpn: &[&[u8]],
    tickets: Arc<crate::tickets::DerivedTickets>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .allow_unauthenticated()
            .build()
            .map_err(cfg_err)?;
    let mut chain = certs(&server.cert_pem, "server certificate")?;
    chain.extend(certs(ca_pem, "CA certificate")?);
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key(&server.key_pem)?)
        .map_err(cfg_err)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.ticketer = tickets;
    cfg.send_tls13_tickets = crate::tickets::TICKETS_PER_HANDSHAKE;
    Ok(Arc::new(cfg))
}

/// A client config trusting `ca_pem`, optionally presenting a client identity. It
/// does not resume sessions: the CLI and one-off connections build theirs each time,
/// and rustls' default ticket cache would cost each ~20 KiB.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    build_client_config(
        ca_pem,
        identity,
        alpn,
        rustls::client::Resumption::disabled(),
    )
}

/// [`client_config`] for a peer that keeps it across connections to its hub (an
/// edge, a region hub): it holds the last session ticket, so reconnecting resumes
/// the session (no certificate signed or verified again on either side) even with
/// a restarted hub. The hub still checks the client certificate of a resumed
/// session on every connection.
pub fn resuming_client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let store = Arc::new(crate::tickets::HubTickets::default());
    let resumption = rustls::client::Resumption::store(store)
        .tls12_resumption(rustls::client::Tls12Resumption::Disabled);
    build_client_config(ca_pem, identity, alpn, resumption)
}

fn build_client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    alpn: &[&[u8]],
    resumption: rustls::client::Resumption,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg_err)?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match identity {
        Some((cert_pem, key_pem)) => builder
            .with_client_auth_cert(certs(cert_pem, "node certificate")?, key(key_pem)?)
            .map_err(cfg_err)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = resumption;
    Ok(Arc::new(cfg))
}

/// First-contact config: trust the hub only if its chain contains a CA whose SHA-256
/// fingerprint is `ca_fingerprint` and its certificate verifies against that CA.
pub fn pinned_client_config(
    ca_fingerprint: &str,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| der_fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the hub's CA does not match the fingerprint in the join token".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `host:port` from `https://host:port[/...]` (or a bare `host:port`).
pub fn hub_addr(url: &str) -> Result<String, TlsError> {
    let rest = url
        .strip_prefix("https://")
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    if rest.is_empty() || !rest.contains(':') {
        return Err(TlsError::BadAddress(url.to_string()));
    }
    Ok(rest.to_string())
}

/// Dial the hub at `addr` and complete a TLS handshake, verifying it as [`HUB_SERVER_NAME`].
pub async fn dial(addr: &str, config: Arc<ClientConfig>) -> Result<TlsStream<TcpStream>, TlsError> {
    dial_from(addr, config, None).await
}

/// [`dial`] from the local address `source` (`None`: the system picks one).
pub async fn dial_from(
    addr: &str,
    config: Arc<ClientConfig>,
    source: Option<std::net::IpAddr>,
) -> Result<TlsStream<TcpStream>, TlsError> {
    let connect_err = |source| TlsError::Connect {
        addr: addr.to_string(),
        source,
    };
    let tcp = match source {
        None => TcpStream::connect(addr).await.map_err(connect_err)?,
        Some(ip) => {
            let to = tokio::net::lookup_host(addr)
                .await
                .map_err(connect_err)?
                .next()
                .ok_or_else(|| TlsError::BadAddress(addr.to_string()))?;
            let socket = if to.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .map_err(connect_err)?;
            socket
                .bind(std::net::SocketAddr::new(ip, 0))
                .map_err(connect_err)?;
            socket.connect(to).await.map_err(connect_err)?
        }
    };
    tcp.set_nodelay(true).map_err(connect_err)?;
    // Keep NAT mappings of quiet connections (an idle port-forward, a shell waiting
    // for input) alive: probes after 20 s of silence, well under common NAT timeouts.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(20))
        .with_interval(std::time::Duration::from_secs(10));
    socket2::SockRef::from(&tcp)
        .set_tcp_keepalive(&keepalive)
        .map_err(connect_err)?;
    let name = ServerName::try_from(HUB_SERVER_NAME).map_err(cfg_err)?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(connect_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertAuthority;

    #[tokio::test]
    async fn pinned_first_contact_accepts_right_ca_and_refuses_wrong_one() {
        crate::install_crypto_provider();
        let ca = CertAuthority::generate("hub").expect("ca");
        let tickets = Arc::new(crate::tickets::DerivedTickets::new(b"k"));
        let scfg = crate::testing::hub_tls(&ca, b"x", tickets);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(scfg);
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(s).await;
                });
            }
        });
        let good = pinned_client_config(&ca.fingerprint(), &[b"x"]).expect("cfg");
        dial(&addr, good).await.expect("right fingerprint connects");
        let other = CertAuthority::generate("other").expect("ca");
        let bad = pinned_client_config(&other.fingerprint(), &[b"x"]).expect("cfg");
        let err = dial(&addr, bad)
            .await
            .expect_err("wrong fingerprint refused");
        let chain = format!("{:?}", std::error::Error::source(&err));
        assert!(chain.contains("fingerprint"), "{chain}");
    }
}
