//! Object storage logic shared by the REST API, the channel and the controllers:
//! validation, hub-owned metadata (uid, generation, times), create-or-update with
//! compare-and-swap, and status updates that never touch the spec.

use std::sync::Arc;

use verge_api::clock::now_rfc3339;
use verge_api::validate::FieldErrors;
use verge_api::{ApiError, ErrorCode, Kind, Object, kind_prefix, object_key};
use verge_store::{KeyValue, Store, StoreError, StoreExt};

/// How many times a read-modify-write retries on a concurrent change before giving up.
const CAS_RETRIES: usize = 16;

/// Typed access to objects in the store.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn Store>,
}

/// Map store failures to API errors.
pub fn store_err(e: StoreError) -> ApiError {
    match e {
        StoreError::Compacted { .. } => ApiError::new(ErrorCode::Gone, e.to_string()),
        // The backend failing (a lock held past its timeout, etcd out of reach) or
        // closing is this hub's trouble, for now, not the request's: callers may try
        // again (an enrolling edge does; it gives up on anything else).
        StoreError::Backend(_) | StoreError::Closed => {
            tracing::error!(error = ?e, "store failure");
            ApiError::new(
                ErrorCode::Unavailable,
                format!("the hub's store failed ({e}); try again shortly"),
            )
        }
        other => {
            tracing::error!(error = ?other, "store failure");
            ApiError::new(ErrorCode::Internal, format!("store failure: {other}"))
        }
    }
}

fn decode<S: Kind>(kv: &KeyValue) -> Result<Object<S>, ApiError> {
    let mut obj: Object<S> = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("stored {} at {} is unreadable: {e}", S::KIND, kv.key),
        )
    })?;
    obj.metadata.revision = kv.mod_revision;
    Ok(obj)
}

/// Decode a stored object from raw bytes (used by watchers).
pub fn decode_value<S: Kind>(value: &[u8], revision: u64) -> Option<Object<S>> {
    let mut obj: Object<S> = serde_json::from_slice(value).ok()?;
    obj.metadata.revision = revision;
    Some(obj)
}

fn encode<S: Kind>(obj: &Object<S>) -> Vec<u8> {
    let mut obj = obj.clone();
    // The revision is the key's mod revision, not part of the stored value.
    obj.metadata.revision = 0;
    // Serializing our own types cannot fail: no maps with non-string keys.
    serde_json::to_vec(&obj).unwrap_or_default()
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    verge_tunnel::pki::hex(&b)
}

impl Objects {
    /// Wrap a store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// One object.
    pub async fn get<S: Kind>(&self, name: &str) -> Result<Object<S>, ApiError> {
        let kv = self
            .store
            .get(&object_key(S::PLURAL, name))
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("{} '{name}' not found", S::KIND.to_lowercase()),
                )
            })?;
        decode(&kv)
    }

    /// Every object of a kind, and the revision of the read.
    pub async fn list<S: Kind>(&self) -> Result<(Vec<Object<S>>, u64), ApiError> {
        let r = self
            .store
            .range(&kind_prefix(S::PLURAL))
            .await
            .map_err(store_err)?;
        let objs = r.kvs.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        Ok((objs, r.revision))
    }

    /// At most `limit` objects of kind `S` whose names sort after `after`, the store
    /// revision, and the name to continue after if more follow.
    pub async fn list_page<S: Kind>(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Object<S>>, u64, Option<String>), ApiError> {
        let after = after.map(|name| object_key(S::PLURAL, name));
        let page = self
            .store
            .range_page(&kind_prefix(S::PLURAL), after.as_deref(), limit)
            .await
            .map_err(store_err)?;
        let objs = page.kvs.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        let next = page
            .more
            .then(|| objs.last().map(|o: &Object<S>| o.name().to_string()))
            .flatten();
        Ok((objs, page.revision, next))
    }

    /// The store operations that would create `obj` (validated, bookkeeping filled in).
    pub fn prepare_create<S: Kind>(&self, mut obj: Object<S>) -> Result<Object<S>, ApiError> {
        obj.validate().map_err(ApiError::invalid)?;
        let now = now_rfc3339();
        obj.metadata.uid = new_uid();
        obj.metadata.generation = 1;
        obj.metadata.revision = 0;
        obj.metadata.creation_time = Some(now.clone());
        obj.metadata.update_time = Some(now);
        Ok(obj)
    }

    /// Encode an object for a raw store write.
    pub fn encode<S: Kind>(obj: &Object<S>) -> Vec<u8> {
        encode(obj)
    }

    /// Create; fails with `Conflict` if it exists.
    pub async fn create<S: Kind>(&self, obj: Object<S>) -> Result<Object<S>, ApiError> {
        let mut obj = self.prepare_create(obj)?;
        let key = object_key(S::PLURAL, obj.name());
        let r = self
            .store
            .put(&key, encode(&obj), Some(0))
            .await
            .map_err(store_err)?;
        if !r.succeeded {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "{} '{}' already exists; use `verge apply` to update it",
                    S::KIND.to_lowercase(),
                    obj.name()
                ),
            ));
        }
        obj.metadata.revision = r.revision;
        Ok(obj)
    }

    /// Create or update the user-owned parts (labels, annotations, spec). Status and
    /// hub-owned metadata are kept. If `obj.metadata.revision` is set, the update only
    /// applies if the object is still at that revision.
    pub async fn apply<S: Kind>(&self, obj: Object<S>) -> Result<(Object<S>, bool), ApiError> {
        obj.validate().map_err(ApiError::invalid)?;
        let key = object_key(S::PLURAL, obj.name());
        for _ in 0..CAS_RETRIES {
            let Some(kv) = self.store.get(&key).await.map_err(store_err)? else {
                if obj.metadata.revision != 0 {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!(
                            "{} '{}' no longer exists",
                            S::KIND.to_lowercase(),
                            obj.name()
                        ),
                    ));
                }
                match self.create(obj.clone()).await {
                    Err(e) if e.code == ErrorCode::Conflict => continue,
                    other => return other.map(|o| (o, true)),
                }
            };
            let current: Object<S> = decode(&kv)?;
            if obj.metadata.revision != 0 && obj.metadata.revision != current.metadata.revision {
                return Err(conflict::<S>(
                    obj.name(),
                    obj.metadata.revision,
                    current.metadata.revision,
                ));
            }
            let mut next = current.clone();
            next.metadata.labels = obj.metadata.labels.clone();
            next.metadata.annotations = obj.metadata.annotations.clone();
            if next.spec != obj.spec {
                next.spec = obj.spec.clone();
                next.metadata.generation += 1;
            }
            if next == current {
                return Ok((current, false));
            }
            next.metadata.update_time = Some(now_rfc3339());
            let r = self
                .store
                .put(&key, encode(&next), Some(kv.mod_revision))
                .await
                .map_err(store_err)?;
            if r.succeeded {
                next.metadata.revision = r.revision;
                return Ok((next, false));
            }
            if obj.metadata.revision != 0 {
                return Err(conflict::<S>(obj.name(), obj.metadata.revision, 0));
            }
        }
        Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "{} '{}' is changing too fast; try again",
                S::KIND.to_lowercase(),
                obj.name()
            ),
        ))
    }

    /// Read-modify-write an object's status with compare-and-swap. `mutate` returns
    /// `false` to leave it as it is (no write). Returns the object after the call.
    pub async fn update_status<S: Kind>(
        &self,
        name: &str,
        mut mutate: impl FnMut(&Object<S>, &mut S::Status) -> Result<bool, ApiError>,
    ) -> Result<Object<S>, ApiError> {
        let key = object_key(S::PLURAL, name);
        for _ in 0..CAS_RETRIES {
            let mut obj: Object<S> = self.get(name).await?;
            let mut status = obj.status.clone();
            if !mutate(&obj, &mut status)? || status == obj.status {
                return Ok(obj);
            }
            obj.status = status;
            let r = self
                .store
                .put(&key, encode(&obj), Some(obj.metadata.revision))
                .await
                .map_err(store_err)?;
            if r.succeeded {
                obj.metadata.revision = r.revision;
                return Ok(obj);
            }
        }
        Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "{} '{name}' is changing too fast; try again",
                S::KIND.to_lowercase()
            ),
        ))
    }

    /// Delete; `NotFound` if absent.
    pub async fn delete<S: Kind>(&self, name: &str) -> Result<Object<S>, ApiError> {
        self.delete_with::<S>(name, Vec::new()).await
    }

    /// Delete an object and, in the same transaction, run `also` (what goes with it).
    pub async fn delete_with<S: Kind>(
        &self,
        name: &str,
        also: Vec<verge_store::Op>,
    ) -> Result<Object<S>, ApiError> {
        let key = object_key(S::PLURAL, name);
        let mut ops = vec![verge_store::Op::Delete { key }];
        ops.extend(also);
        let r = self
            .store
            .txn(verge_store::Txn {
                compares: Vec::new(),
                ops,
            })
            .await
            .map_err(store_err)?;
        match r.prev.into_iter().next().flatten() {
            Some(kv) => decode(&kv),
            None => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("{} '{name}' not found", S::KIND.to_lowercase()),
            )),
        }
    }
}

fn conflict<S: Kind>(name: &str, want: u64, have: u64) -> ApiError {
    let now = if have == 0 {
        String::new()
    } else {
        format!(" (now at {have})")
    };
    ApiError::new(
        ErrorCode::Conflict,
        format!(
            "{} '{name}' changed since revision {want}{now}; read it again and reapply, or drop metadata.revision to overwrite",
            S::KIND.to_lowercase()
        ),
    )
}

/// Parse a JSON request body as an object of kind `S`, naming the bad field on failure.
pub fn parse_body<S: Kind>(body: &[u8]) -> Result<Object<S>, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::Invalid,
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    verge_api::manifest::from_value::<Object<S>>(value).map_err(|errs: FieldErrors| {
        let mut e = ApiError::invalid(errs);
        e.message = format!("invalid {}: {}", S::KIND, e.message);
        e
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that fails for a while is the hub's trouble: callers get
    /// `unavailable` (an enrolling edge tries again on it and gives up on anything
    /// else), not `internal`.
    #[test]
    fn a_failing_store_is_unavailable_and_history_gone_is_gone() {
        let locked = StoreError::Backend("database is locked".into());
        let e = store_err(locked);
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(e.message.contains("database is locked"), "{}", e.message);
        assert_eq!(store_err(StoreError::Closed).code, ErrorCode::Unavailable);
        let gone = StoreError::Compacted {
            requested: 1,
            compact_revision: 5,
        };
        assert_eq!(store_err(gone).code, ErrorCode::Gone);
        let bad = StoreError::InvalidKey { key: String::new() };
        assert_eq!(store_err(bad).code, ErrorCode::Internal);
    }
}
