//! Leases for the embedded backends (SQLite, in-memory): which leases live until when,
//! and which keys each one holds. etcd keeps its own; this is the same bookkeeping for
//! the backends that have to do it themselves.
//!
//! The book is the in-memory truth for deadlines (a lease's deadline is not durable:
//! after a restart every lease gets a full TTL again, as etcd does after a leader
//! change). Attachments are checked and changed with the transaction that writes the
//! key, so a key never outlives its lease.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::{LeaseId, Op, StoreError, Txn};

/// How often the backends look for expired leases.
pub(crate) const EXPIRY_CHECK: Duration = Duration::from_millis(100);

struct Entry {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// Every live lease, its deadline and its keys.
#[derive(Default)]
pub(crate) struct LeaseBook {
    leases: HashMap<LeaseId, Entry>,
    /// Which lease each leased key belongs to.
    owner: HashMap<String, LeaseId>,
}

/// The lease changes a transaction makes, applied to the book once it commits.
#[derive(Debug, Default)]
pub(crate) struct Attachments(Vec<(String, Option<LeaseId>)>);

impl LeaseBook {
    /// A new lease with a fresh random id.
    pub(crate) fn grant(&mut self, ttl: Duration) -> LeaseId {
        let id = loop {
            // Positive 63-bit, like etcd's ids (they travel as int64).
            let id = rand_id();
            if !self.leases.contains_key(&id) {
                break id;
            }
        };
        self.insert(id, ttl);
        id
    }

    /// Record a lease (a new grant, or one read back from disk: full TTL from now).
    pub(crate) fn insert(&mut self, id: LeaseId, ttl: Duration) {
        self.leases.insert(
            id,
            Entry {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
    }

    /// Renew `id` for a full TTL.
    pub(crate) fn keep_alive(&mut self, id: LeaseId) -> Result<(), StoreError> {
        let e = self
            .leases
            .get_mut(&id)
            .filter(|e| e.deadline > Instant::now())
            .ok_or(StoreError::LeaseNotFound { lease: id })?;
        e.deadline = Instant::now() + e.ttl;
        Ok(())
    }

    /// Leases past their deadline.
    pub(crate) fn expired(&self) -> Vec<LeaseId> {
        let now = Instant::now();
        self.leases
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Forget `id`; the transaction that deletes its keys (empty when it had none or
    /// did not exist).
    pub(crate) fn remove(&mut self, id: LeaseId) -> Txn {
        let keys = self.leases.remove(&id).map(|e| e.keys).unwrap_or_default();
        Txn {
            compares: Vec::new(),
            ops: keys.into_iter().map(Op::delete).collect(),
        }
    }

    /// Check that every lease `txn` attaches a key to is alive, and say how the
    /// attachments change if it commits.
    pub(crate) fn check(&self, txn: &Txn) -> Result<Attachments, StoreError> {
        let now = Instant::now();
        let mut changes = Vec::new();
        for op in &txn.ops {
            match op {
                Op::Put {
                    key,
                    lease: Some(l),
                    ..
                } => {
                    if self.leases.get(l).is_none_or(|e| e.deadline <= now) {
                        return Err(StoreError::LeaseNotFound { lease: *l });
                    }
                    changes.push((key.clone(), Some(*l)));
                }
                Op::Put { key, .. } | Op::Delete { key } => {
                    if self.owner.contains_key(key) {
                        changes.push((key.clone(), None));
                    }
                }
            }
        }
        Ok(Attachments(changes))
    }

    /// Apply what a committed transaction changed.
    pub(crate) fn apply(&mut self, changes: Attachments) {
        for (key, lease) in changes.0 {
            if let Some(old) = self.owner.remove(&key)
                && let Some(e) = self.leases.get_mut(&old)
            {
                e.keys.remove(&key);
            }
            if let Some(l) = lease
                && let Some(e) = self.leases.get_mut(&l)
            {
                e.keys.insert(key.clone());
                self.owner.insert(key, l);
            }
        }
    }
}

impl Attachments {
    /// Each (key, lease) the transaction leaves attached, and keys it detaches (`None`).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(String, Option<LeaseId>)> {
        self.0.iter()
    }
}

fn rand_id() -> LeaseId {
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState is seeded from the OS; hashing a counter gives fresh ids
    // without another dependency.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    (h.finish() >> 1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_moves_between_leases_and_goes_with_the_last() {
        let mut book = LeaseBook::default();
        let a = book.grant(Duration::from_secs(60));
        let b = book.grant(Duration::from_secs(60));
        let put = |l| Txn {
            compares: vec![],
            ops: vec![Op::Put {
                key: "/k".into(),
                value: vec![],
                lease: l,
            }],
        };
        let c = book.check(&put(Some(a))).expect("a lives");
        book.apply(c);
        let c = book.check(&put(Some(b))).expect("b lives");
        book.apply(c);
        assert!(book.remove(a).ops.is_empty(), "the key moved to b");
        assert_eq!(book.remove(b).ops, vec![Op::delete("/k")]);
        assert!(matches!(
            book.check(&put(Some(b))),
            Err(StoreError::LeaseNotFound { .. })
        ));
    }
}
