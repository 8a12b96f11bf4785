//! Hub configuration and the files a hub keeps in its data directory:
//! `ca.crt`/`ca.key` (the cluster CA, created on first start), `store.db` (the
//! embedded store), `admin.conf` (hub URL, CA and admin token, for the CLI) and
//! `join-token` (a join token for edges).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use verge_tunnel::pki::{CertAuthority, Issued, PkiError};

/// How a hub runs.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Where the hub keeps its CA, store and configs.
    pub data_dir: PathBuf,
    /// Extra DNS names / IPs for the hub's certificate (what operators dial).
    pub extra_sans: Vec<String>,
    /// A node whose last heartbeat is older than this becomes NotReady.
    pub node_grace: Duration,
    /// How often edges are asked to send heartbeats.
    pub heartbeat_interval: Duration,
    /// Keep at least this many revisions of history for watches to resume from.
    pub history_revisions: u64,
    /// `(index, count)`: this hub's scheduler places only the pending instances whose
    /// name hashes to `index` modulo `count` (several schedulers sharing one store).
    pub scheduler_shard: Option<(u32, u32)>,
    /// New edge sessions admitted per second (with a burst of as many).
    pub admit_rate: f64,
    /// New QUIC handshakes begun per second (with a burst of as many, and a
    /// sixteenth of a second's worth in flight); beyond it a connection waits its
    /// turn, at most 2 s, and is then refused before its handshake, which costs the
    /// hub nothing ([`crate::handshakes`]).
    pub handshake_rate: f64,
    /// Put off new work (QUIC connections, API writes, placements) while the hub's
    /// runtime lags more than this or its QUIC socket is behind
    /// ([`crate::limits::LoadGauge`]; zero: never).
    pub shed_lag: Duration,
    /// How long edges' metrics are kept ([`crate::telemetry`]).
    pub metrics_retention: Duration,
    /// Most time series kept (nodes' and instances' together).
    pub metrics_max_series: usize,
    /// How long events are kept ([`crate::events`]).
    pub event_retention: Duration,
    /// Lifetime of node certificates; edges renew at two thirds of it.
    pub node_cert_ttl: Duration,
    /// This replica's id among the hubs sharing a store (see [`crate::replicas`]).
    pub replica_id: String,
    /// The URL other replicas reach this one at (default: from the listen address).
    pub advertise: Option<String>,
    /// How long this replica's lease (its membership, its sessions, its leadership)
    /// lives unrenewed: a dead leader is replaced about this long after it died.
    pub lease_ttl: Duration,
    /// The store is shared with other replicas (etcd): join its current history
    /// epoch instead of beginning one ([`crate::history`]).
    pub shared_store: bool,
    /// Begin a new history epoch even on a shared store (after restoring it from a
    /// backup: edges then take a snapshot instead of resuming).
    pub new_epoch: bool,
    /// This hub serves one region for a centre ([`crate::region`]).
    pub region: Option<crate::region::RegionLink>,
}

impl HubConfig {
    /// Defaults for a hub on `listen` keeping its state in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            extra_sans: Vec::new(),
            node_grace: Duration::from_secs(40),
            heartbeat_interval: Duration::from_secs(4),
            history_revisions: 10_000,
            scheduler_shard: None,
            admit_rate: 200.0,
            handshake_rate: 400.0,
            shed_lag: crate::limits::SHED_LAG,
            metrics_retention: Duration::from_secs(2 * 3600),
            metrics_max_series: 2_000_000,
            event_retention: Duration::from_secs(3600),
            node_cert_ttl: Duration::from_secs(365 * 86_400),
            replica_id: String::new(),
            advertise: None,
            lease_ttl: Duration::from_secs(2),
            shared_store: false,
            new_epoch: false,
            region: None,
        }
    }
}

/// The CLI's view of a hub (`admin.conf`, `~/.verge/config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConfig {
    /// Hub URL, `https://HOST:PORT`.
    pub server: String,
    /// PEM CA certificate that signed the hub's certificate.
    pub ca_cert: String,
    /// Bearer token.
    pub token: String,
}

impl ClientConfig {
    /// Read a config file (YAML or JSON).
    pub fn load(path: &Path) -> Result<Self, SetupError> {
        let text = std::fs::read_to_string(path).map_err(|e| SetupError::io(path, e))?;
        serde_saphyr::from_str(&text).map_err(|e| SetupError::Config {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }

    /// Write it (mode 0600: it holds a credential).
    pub fn save(&self, path: &Path) -> Result<(), SetupError> {
        let text = serde_saphyr::to_string(self).map_err(|e| SetupError::Config {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        write_private(path, text.as_bytes())
    }
}

/// Failures preparing the data directory.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A config file is malformed.
    #[error("{path}: not a valid verge config: {detail}")]
    Config {
        /// File.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Certificate trouble.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// This data directory's CA is not the one the shared store holds.
    #[error(
        "{dir}: this hub's CA (ca.crt, ca.key) is not the CA of the store it joins (another hub created that one); move ca.crt and ca.key away to join with the store's CA, or point --store at this hub's own store"
    )]
    ForeignCa {
        /// The data directory.
        dir: PathBuf,
    },
    /// The store failed while reading or recording the CA.
    #[error("store: {0}")]
    Store(#[from] verge_store::StoreError),
}

impl SetupError {
    /// Wrap an I/O error with its path.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Make the hub's data directory private to the service: the directory 0700, what is
/// in it (the store and its WAL, the CA key, credentials, artifacts) 0600, and files
/// the hub makes from now on no more than 0600 (umask 077). Env values in instances
/// and the CA key must not be readable by other local users.
pub fn prepare_private_dir(dir: &Path) -> Result<(), SetupError> {
    use std::os::unix::fs::PermissionsExt;
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    std::fs::create_dir_all(dir).map_err(|e| SetupError::io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| SetupError::io(dir, e))?;
    for e in std::fs::read_dir(dir)
        .map_err(|e| SetupError::io(dir, e))?
        .flatten()
    {
        let p = e.path();
        if p.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| SetupError::io(&p, e))?;
        }
    }
    Ok(())
}

/// Write a file readable only by its owner, atomically (temp file + fsync + rename).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), SetupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| SetupError::io(&tmp, e))?;
    f.write_all(data).map_err(|e| SetupError::io(&tmp, e))?;
    f.sync_all().map_err(|e| SetupError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SetupError::io(path, e))
}

/// Load the CA from the data dir, creating it on first start.
pub fn load_or_create_ca(dir: &Path) -> Result<CertAuthority, SetupError> {
    let cert = dir.join("ca.crt");
    let key = dir.join("ca.key");
    if cert.exists() {
        let c = std::fs::read_to_string(&cert).map_err(|e| SetupError::io(&cert, e))?;
        let k = std::fs::read_to_string(&key).map_err(|e| SetupError::io(&key, e))?;
        return Ok(CertAuthority::from_pem(&c, &k)?);
    }
    let ca = CertAuthority::generate("verge-ca")?;
    write_private(&key, ca.key_pem().as_bytes())?;
    write_private(&cert, ca.cert_pem().as_bytes())?;
    Ok(ca)
}

/// Store key of the cluster CA, which every hub replica on the store shares.
pub const CA_KEY: &str = "/verge/system/ca";

#[derive(Serialize, Deserialize)]
struct StoredCa {
    cert: String,
    key: String,
}

/// The cluster CA: the one the store holds (replicas of one store share it, so that
/// an edge trusts every replica and every replica accepts every node), written to
/// this data directory too; or this directory's own (made if need be), recorded in
/// the store if the store had none. The key is as secret as the store is: give etcd
/// client-certificate authentication (docs/SECURITY.md).
pub async fn shared_ca(
    store: &dyn verge_store::Store,
    dir: &Path,
) -> Result<CertAuthority, SetupError> {
    use verge_store::StoreExt;
    let from_store = |kv: verge_store::KeyValue| -> Result<StoredCa, SetupError> {
        serde_json::from_slice(&kv.value).map_err(|e| SetupError::Config {
            path: PathBuf::from(CA_KEY),
            detail: format!("the CA record in the store is damaged: {e}"),
        })
    };
    let stored = match store.get(CA_KEY).await? {
        Some(kv) => from_store(kv)?,
        None => {
            let ca = load_or_create_ca(dir)?;
            let mine = StoredCa {
                cert: ca.cert_pem().to_string(),
                key: ca.key_pem().to_string(),
            };
            let value = serde_json::to_vec(&mine).unwrap_or_default();
            if store.put(CA_KEY, value, Some(0)).await?.succeeded {
                return Ok(ca);
            }
            // Another replica recorded one first: theirs it is.
            match store.get(CA_KEY).await? {
                Some(kv) => from_store(kv)?,
                None => return Ok(ca),
            }
        }
    };
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if cert.exists() {
        let local = std::fs::read_to_string(&cert).map_err(|e| SetupError::io(&cert, e))?;
        if local.trim() != stored.cert.trim() {
            return Err(SetupError::ForeignCa {
                dir: dir.to_path_buf(),
            });
        }
    } else {
        write_private(&key, stored.key.as_bytes())?;
        write_private(&cert, stored.cert.as_bytes())?;
    }
    Ok(CertAuthority::from_pem(&stored.cert, &stored.key)?)
}

/// Issue this start's server certificate (cheap; avoids stale SANs).
pub fn server_cert(ca: &CertAuthority, config: &HubConfig) -> Result<Issued, SetupError> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !config.listen.ip().is_unspecified() {
        sans.push(config.listen.ip().to_string());
    }
    if let Ok(h) = nix_hostname() {
        sans.push(h);
    }
    sans.extend(config.extra_sans.iter().cloned());
    Ok(ca.issue_server(&sans)?)
}

fn nix_hostname() -> std::io::Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let h = h.trim().to_string();
    if verge_api::validate::is_dns_label(&h) {
        Ok(h)
    } else {
        Err(std::io::Error::other("hostname is not a DNS label"))
    }
}
