//! The edge's files in its data directory:
//!
//! ```text
//! identity/node.key, node.crt, ca.crt   the node's identity (from enrolment)
//! state/desired.json                    desired state: instances + the revision it reflects
//! instances/NAME/output.log             the instance's stdout and stderr
//! instances/NAME/run.json               how to find the running workload again
//! site/endpoints.json                   the node's clusters' endpoints, for its workloads
//! ```
//!
//! Every write is atomic (temp file, fsync, rename), so a crash or power cut leaves
//! either the old or the new version, never a torn file.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use verge_api::Instance;
use verge_api::cluster::Endpoint;
use verge_runtime::RunRecord;

use crate::EdgeError;

/// Make the data directory and set who may enter what: the identity and the state
/// only the agent (0700); the instances tree may be passed through (0711) so that a
/// workload running as its own user reaches its work directory, and nothing else.
pub fn prepare_data_dir(dir: &Path) -> Result<(), EdgeError> {
    use std::os::unix::fs::PermissionsExt;
    for (d, mode) in [
        (dir.to_path_buf(), 0o711),
        (identity_dir(dir), 0o700),
        (dir.join("state"), 0o700),
        (dir.join("instances"), 0o711),
    ] {
        std::fs::create_dir_all(&d).map_err(|e| EdgeError::file(&d, e))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
            .map_err(|e| EdgeError::file(&d, e))?;
    }
    Ok(())
}

/// Write `data` to `path` atomically with `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), EdgeError> {
    let io = |e| EdgeError::file(path, e);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The node's identity.
///
/// Its texts are shared, not copied, between the state store's copy and the agent's
/// (a simulator holds both for every edge: 1.6 KiB each when they were copies).
#[derive(Clone)]
pub struct Identity {
    /// Node name (from the certificate).
    pub node: Arc<str>,
    /// PEM certificate.
    pub cert_pem: Arc<str>,
    /// PEM private key.
    pub key_pem: Arc<str>,
    /// PEM hub CA.
    pub ca_pem: Arc<str>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn identity_dir(dir: &Path) -> PathBuf {
    dir.join("identity")
}

impl Identity {
    /// Load the identity if this node has enrolled.
    pub fn load(dir: &Path, node: &str) -> Result<Option<Self>, EdgeError> {
        let d = identity_dir(dir);
        let cert = d.join("node.crt");
        if !cert.exists() {
            return Ok(None);
        }
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p)
                .map(Arc::from)
                .map_err(|e| EdgeError::file(&p, e))
        };
        Ok(Some(Self {
            node: node.into(),
            cert_pem: read(cert)?,
            key_pem: read(d.join("node.key"))?,
            ca_pem: read(d.join("ca.crt"))?,
        }))
    }

    /// `(not_before, not_after, renew_at)` of the certificate, as Unix seconds. Renewal
    /// is due after two thirds of the lifetime.
    pub fn validity(&self) -> Option<(i64, i64, i64)> {
        let (nb, na) = verge_tunnel::pki::cert_validity(&self.cert_pem).ok()?;
        Some((nb, na, nb + (na - nb) * 2 / 3))
    }

    /// Whether the certificate has expired.
    pub fn expired(&self) -> bool {
        self.validity()
            .is_some_and(|(_, na, _)| verge_api::clock::now_secs() as i64 >= na)
    }

    /// Check that certificate, key and CA can be used: a damaged identity is an error
    /// that names `location`, not a connection that fails forever.
    pub fn check(&self, location: &str) -> Result<(), EdgeError> {
        verge_tunnel::tls::client_config(
            &self.ca_pem,
            Some((&self.cert_pem, &self.key_pem)),
            &[verge_api::channel::ALPN_CHANNEL],
        )?;
        if self.validity().is_none() {
            return Err(EdgeError::Refused(format!(
                "{location}: the node certificate cannot be read; restore it, or remove the identity and enrol again with --join-token"
            )));
        }
        Ok(())
    }

    /// Save it (key readable by the owner only).
    pub fn save(&self, dir: &Path) -> Result<(), EdgeError> {
        let d = identity_dir(dir);
        write_atomic(&d.join("node.key"), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&d.join("ca.crt"), self.ca_pem.as_bytes(), 0o644)?;
        // Certificate last: its presence marks a complete identity.
        write_atomic(&d.join("node.crt"), self.cert_pem.as_bytes(), 0o644)
    }
}

/// The desired state cached on the node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Desired {
    /// The hub revision this state reflects (0: never synced).
    pub revision: u64,
    /// Instances bound to this node, by name.
    pub instances: BTreeMap<String, Instance>,
    /// The epoch of the hub's store history in which `revision` was last confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

fn desired_path(dir: &Path) -> PathBuf {
    dir.join("state").join("desired.json")
}

impl Desired {
    /// Load the cache (empty if there is none yet). A corrupt cache is an error: the
    /// agent refuses to guess rather than stop workloads it cannot see.
    pub fn load(dir: &Path) -> Result<Self, EdgeError> {
        let p = desired_path(dir);
        match std::fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| EdgeError::Cache {
                path: p.clone(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(EdgeError::file(&p, e)),
        }
    }

    /// Persist the cache.
    pub fn save(&self, dir: &Path) -> Result<(), EdgeError> {
        let data = serde_json::to_vec(self).unwrap_or_default();
        write_atomic(&desired_path(dir), &data, 0o600)
    }
}

/// A node's state in its data directory (the layout at the top of this module).
pub struct DiskState {
    dir: PathBuf,
}

impl DiskState {
    /// The state under `dir`, which is made (with its permissions) if it is new.
    pub fn open(dir: &Path) -> Result<Self, EdgeError> {
        prepare_data_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

impl crate::state::StateStore for DiskState {
    fn load_identity(&self, node: &str) -> Result<Option<Identity>, EdgeError> {
        Identity::load(&self.dir, node)
    }
    fn save_identity(&self, identity: &Identity) -> Result<(), EdgeError> {
        identity.save(&self.dir)
    }
    fn check_identity(&self, identity: &Identity) -> Result<(), EdgeError> {
        identity.check(
            &identity_dir(&self.dir)
                .join("node.crt")
                .display()
                .to_string(),
        )
    }
    fn load_desired(&self) -> Result<Desired, EdgeError> {
        Desired::load(&self.dir)
    }
    fn save_desired(&self, desired: &Desired) -> Result<(), EdgeError> {
        desired.save(&self.dir)
    }
    fn run_records(&self) -> Vec<(String, Option<RunRecord>)> {
        run_records(&self.dir)
    }
    fn load_record(&self, instance: &str) -> Option<RunRecord> {
        load_record(&instance_dir(&self.dir, instance))
    }
    fn save_record(&self, instance: &str, record: &RunRecord) -> Result<(), EdgeError> {
        save_record(&instance_dir(&self.dir, instance), record)
    }
    fn clear_record(&self, instance: &str) {
        clear_record(&instance_dir(&self.dir, instance))
    }
    fn forget_instance(&self, instance: &str) {
        // The record lives in the instance's directory, which the agent removes.
        clear_record(&instance_dir(&self.dir, instance))
    }
    fn save_endpoints(&self, node: &str, endpoints: &[Endpoint]) -> Result<(), EdgeError> {
        let path = verge_runtime::endpoints_file(&self.dir);
        let data = serde_json::to_vec_pretty(&reachable_endpoints(node, endpoints))
            .map_err(|e| EdgeError::Config(format!("encoding endpoints: {e}")))?;
        // Workloads run as their own users read it: the directory and the file are
        // open to read (they hold addresses of the site, nothing secret).
        if let Some(parent) = path.parent() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(parent).map_err(|e| EdgeError::file(parent, e))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| EdgeError::file(parent, e))?;
        }
        write_atomic(&path, &data, 0o644)
    }
}

/// The endpoints this node's workloads can reach: those on other nodes at the host
/// their site reaches them at, those on this node at 127.0.0.1 when their node
/// reports no host; others (no host, another node) are left out.
pub fn reachable_endpoints(node: &str, endpoints: &[Endpoint]) -> Vec<Endpoint> {
    endpoints
        .iter()
        .filter_map(|e| match e.host.as_str() {
            "" if e.node == node => Some(Endpoint {
                host: "127.0.0.1".into(),
                ..e.clone()
            }),
            "" => None,
            _ => Some(e.clone()),
        })
        .collect()
}

/// The directory of one instance.
pub fn instance_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join("instances").join(name)
}

/// Every instance directory on the node, with its run record if it has one: what the
/// agent has started, whatever the desired-state cache says.
fn run_records(dir: &Path) -> Vec<(String, Option<RunRecord>)> {
    std::fs::read_dir(dir.join("instances"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            Some((name, load_record(&e.path())))
        })
        .collect()
}

/// Load an instance's run record.
fn load_record(inst_dir: &Path) -> Option<RunRecord> {
    let bytes = std::fs::read(inst_dir.join("run.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Save an instance's run record.
fn save_record(inst_dir: &Path, rec: &RunRecord) -> Result<(), EdgeError> {
    write_atomic(
        &inst_dir.join("run.json"),
        &serde_json::to_vec(rec).unwrap_or_default(),
        0o600,
    )
}

/// Forget an instance's run record.
fn clear_record(inst_dir: &Path) {
    let _ = std::fs::remove_file(inst_dir.join("run.json"));
}

/// The last `max` bytes of a file, as text.
pub fn tail(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_reaches_its_own_endpoints_on_loopback_and_others_at_their_host() {
        let e = |instance: &str, node: &str, host: &str| Endpoint {
            instance: instance.into(),
            node: node.into(),
            host: host.into(),
            ..Default::default()
        };
        let got = reachable_endpoints(
            "me",
            &[
                e("mine", "me", ""),
                e("theirs", "other", "10.0.0.2"),
                e("lost", "other", ""),
            ],
        );
        let got: Vec<(&str, &str)> = got
            .iter()
            .map(|e| (e.instance.as_str(), e.host.as_str()))
            .collect();
        assert_eq!(got, [("mine", "127.0.0.1"), ("theirs", "10.0.0.2")]);
    }
}
