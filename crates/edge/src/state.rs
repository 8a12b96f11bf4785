//! Where the agent keeps what must outlive it: its identity, the desired-state cache
//! and the run records of the workloads it started.
//!
//! The agent's logic only speaks to a [`StateStore`]. A real node keeps it in its data
//! directory ([`crate::files::DiskState`]: atomic writes, so a power cut leaves the old
//! or the new version); the fleet simulator keeps each simulated edge's in memory
//! ([`MemoryState`]), so that a hundred thousand edges in one process cost neither
//! files nor disk writes.

use std::collections::BTreeMap;
use std::sync::Mutex;

use verge_runtime::RunRecord;

use crate::EdgeError;
use crate::files::{Desired, Identity};

/// What the agent persists.
pub trait StateStore: Send + Sync + 'static {
    /// The node's identity, if it has enrolled.
    fn load_identity(&self, node: &str) -> Result<Option<Identity>, EdgeError>;
    /// Keep the node's identity (after enrolment or renewal).
    fn save_identity(&self, identity: &Identity) -> Result<(), EdgeError>;
    /// Check that a loaded identity can be used; the error names where it lives.
    fn check_identity(&self, identity: &Identity) -> Result<(), EdgeError>;
    /// The desired-state cache (empty if there is none yet). A corrupt cache is an
    /// error: the agent refuses to guess rather than stop workloads it cannot see.
    fn load_desired(&self) -> Result<Desired, EdgeError>;
    /// Persist the desired-state cache.
    fn save_desired(&self, desired: &Desired) -> Result<(), EdgeError>;
    /// Every instance the agent keeps anything for, with its run record if it has
    /// one: what the agent started, whatever the desired-state cache says.
    fn run_records(&self) -> Vec<(String, Option<RunRecord>)>;
    /// An instance's run record.
    fn load_record(&self, instance: &str) -> Option<RunRecord>;
    /// Keep an instance's run record.
    fn save_record(&self, instance: &str, record: &RunRecord) -> Result<(), EdgeError>;
    /// Forget an instance's run record (the workload is no longer running).
    fn clear_record(&self, instance: &str);
    /// Forget everything kept for an instance (it is gone from the node).
    fn forget_instance(&self, instance: &str);
    /// Keep the endpoints of the node's clusters where its workloads read them (a
    /// simulated edge runs no workload that would: by default they are not kept).
    fn save_endpoints(
        &self,
        _node: &str,
        _endpoints: &[verge_api::cluster::Endpoint],
    ) -> Result<(), EdgeError> {
        Ok(())
    }
}

/// A node's state in memory: for simulated edges, and for tests. Nothing survives the
/// process, exactly as a node whose disk is wiped.
#[derive(Default)]
pub struct MemoryState {
    identity: Mutex<Option<Identity>>,
    desired: Mutex<Option<Desired>>,
    records: Mutex<BTreeMap<String, Option<RunRecord>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StateStore for MemoryState {
    fn load_identity(&self, _node: &str) -> Result<Option<Identity>, EdgeError> {
        Ok(lock(&self.identity).clone())
    }
    fn save_identity(&self, identity: &Identity) -> Result<(), EdgeError> {
        *lock(&self.identity) = Some(identity.clone());
        Ok(())
    }
    fn check_identity(&self, identity: &Identity) -> Result<(), EdgeError> {
        identity.check("the in-memory identity")
    }
    fn load_desired(&self) -> Result<Desired, EdgeError> {
        Ok(lock(&self.desired).clone().unwrap_or_default())
    }
    fn save_desired(&self, desired: &Desired) -> Result<(), EdgeError> {
        *lock(&self.desired) = Some(desired.clone());
        Ok(())
    }
    fn run_records(&self) -> Vec<(String, Option<RunRecord>)> {
        lock(&self.records)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    fn load_record(&self, instance: &str) -> Option<RunRecord> {
        lock(&self.records).get(instance).cloned().flatten()
    }
    fn save_record(&self, instance: &str, record: &RunRecord) -> Result<(), EdgeError> {
        lock(&self.records).insert(instance.to_string(), Some(record.clone()));
        Ok(())
    }
    fn clear_record(&self, instance: &str) {
        if let Some(r) = lock(&self.records).get_mut(instance) {
            *r = None;
        }
    }
    fn forget_instance(&self, instance: &str) {
        lock(&self.records).remove(instance);
    }
}
