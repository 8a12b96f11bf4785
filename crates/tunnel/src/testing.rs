//! What the tunnel's tests set up again and again: a hub's TLS configuration and an
//! enrolled node's key and certificate, both from one CA.

use std::sync::Arc;

use crate::pki::CertAuthority;
use crate::tickets::DerivedTickets;

/// The TLS configuration of a hub of `ca` speaking `alpn`, its session tickets sealed
/// with `tickets`.
pub(crate) fn hub_tls(
    ca: &CertAuthority,
    alpn: &[u8],
    tickets: Arc<DerivedTickets>,
) -> Arc<rustls::ServerConfig> {
    crate::install_crypto_provider();
    let server = ca.issue_server(&[]).expect("server certificate");
    crate::tls::server_config(ca.cert_pem(), &server, &[alpn], tickets).expect("server config")
}

/// The key and certificate (PEM) of node `name`, enrolled with `ca` for a day.
pub(crate) fn node_identity(ca: &CertAuthority, name: &str) -> (String, String) {
    let (key, csr) = crate::pki::new_node_key_and_csr(name).expect("csr");
    let cert = ca
        .sign_node_csr(&csr, name, None, time::Duration::days(1))
        .expect("node certificate");
    (key, cert)
}
