//! `verge hub --store`: which store the hub keeps its state in. The embedded SQLite
//! store in the data directory by default; `etcd://HOST:PORT,...` for hub replicas
//! sharing an etcd cluster (a build with `--features etcd`).

use std::path::PathBuf;
use std::sync::Arc;

#[cfg(feature = "etcd")]
use anyhow::Context;
use anyhow::bail;
use verge_store::Store;

/// Store options of `verge hub`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// Where state lives: `sqlite` (the default: DATA_DIR/store.db) or
    /// `etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]` (`etcds://` for TLS) for hub
    /// replicas on one etcd cluster.
    #[arg(long, default_value = "sqlite")]
    pub store: String,
    /// PEM CA that signed the etcd members' certificates.
    #[arg(long, requires = "store")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key).
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM key of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (with --etcd-password-file).
    #[arg(long, requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl StoreArgs {
    /// Whether this is the embedded store.
    pub fn is_embedded(&self) -> bool {
        self.store == "sqlite"
    }

    /// Open the store, or `None` for the embedded one (the hub opens it in its data
    /// directory).
    pub async fn open(&self) -> anyhow::Result<Option<Arc<dyn Store>>> {
        if self.is_embedded() {
            return Ok(None);
        }
        if !(self.store.starts_with("etcd://") || self.store.starts_with("etcds://")) {
            bail!(
                "--store {:?}: not a store this hub knows; use sqlite (the default) or etcd://HOST:PORT[,HOST:PORT...]",
                self.store
            );
        }
        self.open_etcd().await
    }

    #[cfg(feature = "etcd")]
    async fn open_etcd(&self) -> anyhow::Result<Option<Arc<dyn Store>>> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read_to_string(p).with_context(|| format!("{what} {}", p.display()))
        };
        let mut config = verge_store_etcd::EtcdConfig::from_url(&self.store)?;
        if let Some(ca) = &self.etcd_ca {
            config.ca_pem = Some(read(ca, "--etcd-ca")?);
        }
        if let (Some(c), Some(k)) = (&self.etcd_cert, &self.etcd_key) {
            config.client_cert_pem = Some((read(c, "--etcd-cert")?, read(k, "--etcd-key")?));
        }
        if let (Some(u), Some(p)) = (&self.etcd_user, &self.etcd_password_file) {
            config.user = Some((
                u.clone(),
                read(p, "--etcd-password-file")?.trim().to_string(),
            ));
        }
        let store = verge_store_etcd::EtcdStore::connect(&config)
            .await
            .with_context(|| format!("cannot reach etcd at {}", config.endpoints.join(", ")))?;
        // Fail now, with the address, rather than at the first request.
        store
            .revision()
            .await
            .with_context(|| format!("etcd at {} does not answer", config.endpoints.join(", ")))?;
        Ok(Some(Arc::new(store)))
    }

    #[cfg(not(feature = "etcd"))]
    async fn open_etcd(&self) -> anyhow::Result<Option<Arc<dyn Store>>> {
        bail!(
            "--store {}: this verge was built without etcd support; build it with `cargo build --release -p verge --features etcd` (needs protoc: apt-get install protobuf-compiler)",
            self.store
        )
    }
}
