//! Credentials the hub checks: the operators' admin token and the edges' join tokens.
//! Only SHA-256 hashes are stored; comparisons are constant-time.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use verge_api::clock::now_secs;
use verge_api::{ApiError, ErrorCode};
use verge_store::{Compare, KeyValue, Op, Store, StoreExt};
use verge_tunnel::pki::{JoinToken, hex};

use crate::objects::store_err;

/// Store key of the admin token hash.
pub const ADMIN_TOKEN_KEY: &str = "/verge/operators/admin";
/// Store prefix of join tokens.
pub const JOIN_TOKEN_PREFIX: &str = "/verge/jointokens/";

/// SHA-256 hex of a secret.
pub fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Constant-time equality for hex digests.
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A stored join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinTokenRecord {
    /// SHA-256 of the secret.
    pub secret_sha256: String,
    /// Enrolments left; `None` = unlimited until expiry.
    pub uses_left: Option<u32>,
    /// Unix seconds after which it is refused; `None` = never.
    pub expires_at: Option<u64>,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// When set, the token may only enrol this node name, and may re-enrol it if it
    /// already exists (the path back for a node whose certificate expired offline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When set, the token enrols only a region hub for this region (and no node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// What `POST /v1/tokens` accepts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    /// How many enrolments (default 1; 0 = unlimited).
    #[serde(default)]
    pub uses: Option<u32>,
    /// Lifetime in seconds (default 24 h; 0 = never expires).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Bind the token to one node name (re-enrolment of an existing node).
    #[serde(default)]
    pub node: Option<String>,
    /// Make it a token for a region hub of this region (`verge hub --region`).
    #[serde(default)]
    pub region: Option<String>,
}

/// What `POST /v1/tokens` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    /// The token to give to `verge edge --join-token`.
    pub token: String,
    /// Its id (public).
    pub id: String,
    /// Uses allowed (None = unlimited).
    pub uses: Option<u32>,
    /// Unix seconds of expiry.
    pub expires_at: Option<u64>,
}

/// The longest lifetime a join token may be given (10 years): larger values once
/// wrapped around and minted tokens that had already expired.
pub const MAX_TOKEN_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// Mint and store a join token.
pub async fn create_join_token(
    store: &dyn Store,
    ca_fingerprint: &str,
    req: &TokenRequest,
) -> Result<TokenResponse, ApiError> {
    if req.node.is_some() && req.region.is_some() {
        return Err(ApiError::new(
            ErrorCode::Invalid,
            "node and region: a token enrols either one node or a region hub; give one of them",
        ));
    }
    let token = JoinToken::generate(ca_fingerprint);
    let uses = match req.uses {
        Some(0) => None,
        Some(n) => Some(n),
        None => Some(1),
    };
    let expires_at = match req.ttl_seconds {
        Some(0) => None,
        Some(s) if s > MAX_TOKEN_TTL_SECONDS => {
            return Err(ApiError::new(
                ErrorCode::Invalid,
                format!(
                    "ttlSeconds: {s} is more than the {MAX_TOKEN_TTL_SECONDS} (10 years) a token may live; give a shorter lifetime, or 0 for one that never expires"
                ),
            ));
        }
        Some(s) => Some(now_secs() + s),
        None => Some(now_secs() + 24 * 3600),
    };
    let rec = JoinTokenRecord {
        secret_sha256: token.secret_hash(),
        uses_left: uses,
        expires_at,
        description: req.description.clone(),
        node: req.node.clone(),
        region: req.region.clone(),
    };
    let value = serde_json::to_vec(&rec).unwrap_or_default();
    store
        .put(&format!("{JOIN_TOKEN_PREFIX}{}", token.id), value, Some(0))
        .await
        .map_err(store_err)?;
    Ok(TokenResponse {
        token: token.to_string(),
        id: token.id.clone(),
        uses,
        expires_at,
    })
}

fn refused(why: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Unauthorized,
        format!("join token refused: {why}; ask the operator for a new one (`verge token create`)"),
    )
}

/// Check a join token. On success returns the compare and op that consume one use,
/// to be committed in the same transaction as the enrolment, and the node name the
/// token is bound to, if any.
pub async fn check_join_token(
    store: &dyn Store,
    token: &JoinToken,
) -> Result<(Compare, Option<Op>, JoinTokenRecord), ApiError> {
    let key = format!("{JOIN_TOKEN_PREFIX}{}", token.id);
    let kv: KeyValue = store
        .get(&key)
        .await
        .map_err(store_err)?
        .ok_or_else(|| refused("unknown, spent or revoked"))?;
    let mut rec: JoinTokenRecord = serde_json::from_slice(&kv.value)
        .map_err(|_| ApiError::new(ErrorCode::Internal, "stored join token is unreadable"))?;
    if !ct_eq(&rec.secret_sha256, &token.secret_hash()) {
        return Err(refused("wrong secret"));
    }
    if rec.expires_at.is_some_and(|t| now_secs() > t) {
        return Err(refused("expired"));
    }
    let compare = Compare {
        key: key.clone(),
        mod_revision: kv.mod_revision,
    };
    let bound = rec.clone();
    let op = match rec.uses_left {
        None => None,
        Some(n) if n <= 1 => Some(Op::Delete { key }),
        Some(n) => {
            rec.uses_left = Some(n - 1);
            Some(Op::put(key, serde_json::to_vec(&rec).unwrap_or_default()))
        }
    };
    Ok((compare, op, bound))
}

/// Parse a join token presented to this hub, refusing one made for another hub.
pub fn parse_for(st: &crate::state::HubState, token: &str) -> Result<JoinToken, ApiError> {
    let token = JoinToken::parse(token)
        .map_err(|e| ApiError::new(ErrorCode::Unauthorized, e.to_string()))?;
    if token.ca_fingerprint != st.ca.fingerprint() {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "join token was made for a different hub (CA fingerprint differs)",
        ));
    }
    Ok(token)
}

/// Register an admin token (its hash): each hub replica registers the one in its
/// admin.conf, and every registered token is good at every replica.
pub async fn set_admin_token(store: &dyn Store, token: &str) -> Result<(), ApiError> {
    let h = hash(token);
    store
        .put(
            &format!("{ADMIN_TOKEN_KEY}/{}", &h[..16]),
            h.into_bytes(),
            None,
        )
        .await
        .map_err(store_err)?;
    Ok(())
}

/// Whether `token` is a registered admin token (the key of a single hub from before
/// replicas counts too).
pub async fn is_admin_token(store: &dyn Store, token: &str) -> Result<bool, ApiError> {
    let h = hash(token);
    let registered = store.range(ADMIN_TOKEN_KEY).await.map_err(store_err)?;
    Ok(registered.kvs.iter().any(|kv| {
        (kv.key == ADMIN_TOKEN_KEY || kv.key.starts_with(&format!("{ADMIN_TOKEN_KEY}/")))
            && ct_eq(&h, &String::from_utf8_lossy(&kv.value))
    }))
}
