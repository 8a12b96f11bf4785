//! The hub's store, timed: every call's latency goes into
//! `verge_hub_store_seconds{op}` (get, range, txn, watch, lease...), so an operator
//! sees a slow disk or a slow etcd before the API does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use verge_store::{
    KeyValue, Lease, LeaseId, RangePage, Store, StoreError, Txn, TxnResult, WatchOptions,
    WatchStream,
};

/// Latency histograms by operation.
pub type StoreLatency = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// Buckets from 100 µs to 5 s.
pub fn store_latency() -> StoreLatency {
    Family::new_with_constructor(|| {
        Histogram::new([
            0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
        ])
    })
}

/// A store that times its calls.
pub struct TimedStore {
    inner: Arc<dyn Store>,
    latency: StoreLatency,
}

impl TimedStore {
    /// Time `inner`'s calls into `latency`.
    pub fn new(inner: Arc<dyn Store>, latency: StoreLatency) -> Self {
        Self { inner, latency }
    }

    fn observe(&self, op: &str, began: Instant) {
        self.latency
            .get_or_create(&vec![("op".to_string(), op.to_string())])
            .observe(began.elapsed().as_secs_f64());
    }
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let began = Instant::now();
        let r = $call.await;
        $self.observe($op, began);
        r
    }};
}

#[async_trait]
impl Store for TimedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        timed!(self, "get", self.inner.get(key))
    }
    async fn get_each(&self, keys: &[&str]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        timed!(self, "get_each", self.inner.get_each(keys))
    }
    async fn range_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage, StoreError> {
        timed!(self, "range", self.inner.range_page(prefix, after, limit))
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        timed!(self, "txn", self.inner.txn(txn))
    }
    async fn watch_with(
        &self,
        prefix: &str,
        from_revision: u64,
        options: WatchOptions,
    ) -> Result<WatchStream, StoreError> {
        timed!(
            self,
            "watch",
            self.inner.watch_with(prefix, from_revision, options)
        )
    }
    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        timed!(self, "lease", self.inner.lease_grant(ttl))
    }
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        timed!(self, "lease", self.inner.lease_keep_alive(id))
    }
    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        timed!(self, "lease", self.inner.lease_revoke(id))
    }
    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        timed!(self, "compact", self.inner.compact(revision))
    }
    async fn revision(&self) -> Result<u64, StoreError> {
        self.inner.revision().await
    }
    async fn compact_revision(&self) -> Result<u64, StoreError> {
        self.inner.compact_revision().await
    }
}
