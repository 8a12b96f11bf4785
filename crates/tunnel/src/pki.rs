//! The hub's certificate authority, node identities and join tokens.
//!
//! Trust on first contact works like kubeadm and K3s join tokens: the token an
//! operator hands to an edge carries the SHA-256 fingerprint of the hub's CA
//! certificate. The edge accepts the hub only if the hub presents a chain containing a
//! CA with that fingerprint and its server certificate verifies against that CA. The
//! edge then sends a certificate signing request for a key it generated itself; the
//! private key never leaves the node.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// The name every edge verifies the hub's certificate against, whatever address it
/// dials (hubs sit behind NAT, load balancers and changing IPs). Only the hub's own CA
/// can issue it, and that CA issues node certificates for client auth only.
pub const HUB_SERVER_NAME: &str = "hub.verge.internal";
/// Organisation written into node certificates.
pub const NODE_ORG: &str = "verge:nodes";
/// Organisation written into region hubs' client certificates.
pub const REGION_ORG: &str = "verge:regions";

/// PKI failures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or signing failed.
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A PEM or DER blob could not be read.
    #[error("could not read {what}: {detail}")]
    Parse {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        detail: String,
    },
    /// A join token is malformed.
    #[error(
        "join token is malformed ({0}); expected v1.<ca-sha256>.<id>.<secret> as printed by `verge token create`"
    )]
    BadToken(&'static str),
}

fn parse_err(what: &'static str, e: impl fmt::Display) -> PkiError {
    PkiError::Parse {
        what,
        detail: e.to_string(),
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key (PKCS#8).
    pub key_pem: String,
}

/// The hub's certificate authority.
#[derive(Clone)]
pub struct CertAuthority {
    cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Create a new CA (ECDSA P-256, valid 10 years).
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, "verge");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Load a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        // Check both parse now so that later signing cannot fail on them.
        let ca = Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        };
        ca.issuer()?;
        Ok(ca)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| parse_err("CA key", e))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(|e| parse_err("CA certificate", e))
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// SHA-256 of the CA certificate's DER, lowercase hex.
    pub fn fingerprint(&self) -> String {
        pem_fingerprint(&self.cert_pem).unwrap_or_default()
    }

    /// Issue the hub's server certificate for [`HUB_SERVER_NAME`] plus `extra_sans`
    /// (DNS names or IP addresses the CLI uses to reach the hub).
    pub fn issue_server(&self, extra_sans: &[String]) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut sans = vec![HUB_SERVER_NAME.to_string()];
        sans.extend(extra_sans.iter().cloned());
        sans.sort();
        sans.dedup();
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        params.distinguished_name = dn("verge-hub", "verge");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Sign a node's CSR. The subject is set by the hub (CN = `node_name`), not taken
    /// from the request, and the certificate is good for client authentication only.
    /// `enrolment` names the enrolment the certificate belongs to (kept in the
    /// subject's OU): the hub accepts a node certificate only while that enrolment is
    /// the node's current one, so deleting or re-enrolling a node revokes the
    /// certificates it had before.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node_name: &str,
        enrolment: Option<&str>,
        valid_for: Duration,
    ) -> Result<String, PkiError> {
        self.sign_client_csr(csr_pem, NODE_ORG, node_name, enrolment, valid_for)
    }

    /// A key and a client certificate for a region hub (`O=verge:regions`, CN = the
    /// region), which it presents to its centre. Made by the region itself: it holds
    /// the CA it shares with the centre.
    pub fn issue_region_client(
        &self,
        region: &str,
        enrolment: &str,
        valid_for: Duration,
    ) -> Result<Issued, PkiError> {
        let (key_pem, csr_pem) = new_node_key_and_csr(region)?;
        let cert_pem =
            self.sign_client_csr(&csr_pem, REGION_ORG, region, Some(enrolment), valid_for)?;
        Ok(Issued { cert_pem, key_pem })
    }

    fn sign_client_csr(
        &self,
        csr_pem: &str,
        org: &str,
        name: &str,
        enrolment: Option<&str>,
        valid_for: Duration,
    ) -> Result<String, PkiError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| parse_err("certificate signing request", e))?;
        let mut csr = CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| parse_err("certificate signing request", e))?;
        csr.params.distinguished_name = dn(name, org);
        if let Some(e) = enrolment {
            csr.params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, format!("{ENROLMENT_OU}{e}"));
        }
        csr.params.subject_alt_names = Vec::new();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        // Backdated a little for clocks that run behind; never by a large part of a
        // short lifetime, or renewal (at two thirds of it) would come at once.
        csr.params.not_before = now - Duration::minutes(5).min(valid_for / 10);
        csr.params.not_after = now + valid_for;
        Ok(csr.signed_by(&self.issuer()?)?.pem())
    }
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, org);
    dn
}

/// Generate a node key and a CSR for it. Returns `(key_pem, csr_pem)`.
pub fn new_node_key_and_csr(node_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(node_name, NODE_ORG);
    let csr = params.serialize_request(&key)?;
    let csr_pem = csr.pem()?;
    Ok((key.serialize_pem(), csr_pem))
}

/// SHA-256 of the DER of the first certificate in `pem`, lowercase hex.
pub fn pem_fingerprint(pem: &str) -> Result<String, PkiError> {
    let der =
        CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| parse_err("certificate", e))?;
    Ok(der_fingerprint(&der))
}

/// SHA-256 of a DER blob, lowercase hex.
pub fn der_fingerprint(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from lowercase or uppercase hex (None: not hex).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// How the enrolment a node certificate belongs to starts its OU.
const ENROLMENT_OU: &str = "enrolment:";

/// The node name in a node certificate (its CN, if the certificate is a node's).
pub fn node_name_from_cert(der: &[u8]) -> Option<String> {
    node_identity_from_cert(der).map(|(n, _)| n)
}

/// The node name and enrolment of a node certificate. Certificates issued before
/// enrolments were recorded have none. A certificate outside its validity names no
/// one: the hub reads identities with this on every connection, and a resumed TLS
/// session ([`crate::tickets`]) skips the handshake's own check of the dates.
pub fn node_identity_from_cert(der: &[u8]) -> Option<(String, Option<String>)> {
    identity_from_cert(der, NODE_ORG)
}

/// The region and enrolment of a region hub's client certificate (valid now, as
/// for [`node_identity_from_cert`]).
pub fn region_identity_from_cert(der: &[u8]) -> Option<(String, Option<String>)> {
    identity_from_cert(der, REGION_ORG)
}

fn identity_from_cert(der: &[u8], want_org: &str) -> Option<(String, Option<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if !cert.validity().is_valid() {
        return None;
    }
    let subject = cert.subject();
    let org = subject.iter_organization().next()?.as_str().ok()?;
    if org != want_org {
        return None;
    }
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let enrolment = subject
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .find_map(|ou| ou.strip_prefix(ENROLMENT_OU))
        .map(str::to_string);
    Some((name, enrolment))
}

/// When a certificate (PEM) expires.
pub fn cert_not_after(pem: &str) -> Result<OffsetDateTime, PkiError> {
    let der =
        CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| parse_err("certificate", e))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| parse_err("certificate", e))?;
    Ok(cert.validity().not_after.to_datetime())
}

/// A certificate's validity as Unix seconds: `(not_before, not_after)`.
pub fn cert_validity(pem: &str) -> Result<(i64, i64), PkiError> {
    let der =
        CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| parse_err("certificate", e))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| parse_err("certificate", e))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// A join token: `v1.<ca-sha256>.<id>.<secret>`. The id names the token on the hub
/// (which stores only a hash of the secret); the fingerprint lets the edge verify the
/// hub before it sends the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the hub CA certificate, hex.
    pub ca_fingerprint: String,
    /// Public token id (8 hex chars).
    pub id: String,
    /// Secret (32 hex chars).
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// Mint a fresh token for the CA with this fingerprint.
    pub fn generate(ca_fingerprint: &str) -> Self {
        let id: [u8; 4] = rand::random();
        let secret: [u8; 16] = rand::random();
        Self {
            ca_fingerprint: ca_fingerprint.to_string(),
            id: hex(&id),
            secret: hex(&secret),
        }
    }

    /// Parse the text form.
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [v, fp, id, secret] = parts.as_slice() else {
            return Err(PkiError::BadToken("wrong number of parts"));
        };
        if *v != "v1" {
            return Err(PkiError::BadToken("unknown version"));
        }
        let is_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex(fp, 64) {
            return Err(PkiError::BadToken("CA fingerprint is not 64 hex digits"));
        }
        if !is_hex(id, 8) || !is_hex(secret, 32) {
            return Err(PkiError::BadToken("id or secret has the wrong length"));
        }
        Ok(Self {
            ca_fingerprint: fp.to_ascii_lowercase(),
            id: id.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }

    /// SHA-256 of the secret, hex: what the hub stores.
    pub fn secret_hash(&self) -> String {
        der_fingerprint(self.secret.as_bytes())
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1.{}.{}.{}", self.ca_fingerprint, self.id, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_csr_is_signed_with_hub_chosen_subject() {
        crate::install_crypto_provider();
        let ca = CertAuthority::generate("test-ca").expect("ca");
        let (_key, csr) = new_node_key_and_csr("evil-name").expect("csr");
        let cert = ca
            .sign_node_csr(&csr, "edge-1", Some("e1f2"), Duration::days(1))
            .expect("sign");
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem");
        assert_eq!(node_name_from_cert(&der).as_deref(), Some("edge-1"));
        assert_eq!(
            node_identity_from_cert(&der),
            Some(("edge-1".to_string(), Some("e1f2".to_string())))
        );
        assert!(cert_not_after(&cert).expect("date") > OffsetDateTime::now_utc());
        // The hub's own certificate is not a node identity.
        let server = ca.issue_server(&["127.0.0.1".into()]).expect("server");
        let der = CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).expect("pem");
        assert_eq!(node_name_from_cert(&der), None);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a plain test: nothing else runs on its thread
    fn an_expired_certificate_names_no_one() {
        crate::install_crypto_provider();
        let ca = CertAuthority::generate("test-ca").expect("ca");
        let (_key, csr) = new_node_key_and_csr("edge-1").expect("csr");
        let cert = ca
            .sign_node_csr(&csr, "edge-1", None, Duration::seconds(1))
            .expect("sign");
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem");
        assert_eq!(node_name_from_cert(&der).as_deref(), Some("edge-1"));
        // Certificates count whole seconds: well past its last one.
        std::thread::sleep(std::time::Duration::from_millis(2_200));
        assert_eq!(node_name_from_cert(&der), None);
    }

    #[test]
    fn join_tokens_round_trip_and_reject_garbage() {
        let t = JoinToken::generate(&"ab".repeat(32));
        assert_eq!(JoinToken::parse(&t.to_string()).expect("parse"), t);
        assert!(JoinToken::parse("v1.abc.def").is_err());
        assert!(JoinToken::parse(&t.to_string().replace("v1.", "v9.")).is_err());
        assert!(!format!("{t:?}").contains(&t.secret));
    }
}
