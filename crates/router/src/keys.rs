//! API key checks on the request path: the key's SHA-256 digest looked up in
//! the store, the answer (found or not) trusted for `api_key_cache_ttl_ms`.

use crate::error::RouterError;
use crate::limits::{KeyLimiter, Limits};
use crate::usage::{Counters, Usage};
use gpufleet_control::secrets::{digest_bytes, digest_hex};
use gpufleet_domain::ProjectId;
use gpufleet_store::{ApiKeyId, Store};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Entries kept at most; past this the cache starts over (bounds memory
/// under a flood of made-up keys).
const MAX_ENTRIES: usize = 100_000;

/// A valid, unrevoked key.
#[derive(Debug)]
pub struct AuthedKey {
    pub id: ApiKeyId,
    pub name: String,
    /// `None`: every model.
    pub models: Option<HashSet<String>>,
    pub usage: Arc<Counters>,
    /// The project whose instances it reaches (and no other's).
    pub project: ProjectId,
    /// Its rpm, tpm and budget ([`KeyLimiter::limits`]), enforced for all
    /// of the key's requests (kept across cache refreshes); `None` for a key
    /// without limits.
    pub limiter: Option<Arc<KeyLimiter>>,
}

impl AuthedKey {
    pub fn allows(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }
}

struct Entry {
    key: Option<Arc<AuthedKey>>,
    fetched: Instant,
}

pub struct KeyCache {
    store: Store,
    ttl: Duration,
    usage: Arc<Usage>,
    limits: Arc<Limits>,
    /// By the key's SHA-256 digest.
    entries: RwLock<HashMap<[u8; 32], Entry>>,
}

impl KeyCache {
    pub fn new(store: Store, ttl: Duration, usage: Arc<Usage>, limits: Arc<Limits>) -> Self {
        Self {
            store,
            ttl,
            usage,
            limits,
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// Forget what is cached of a key that changed (a revocation, new
    /// limits): its next request reads it again.
    pub fn forget(&self, change: &gpufleet_control::KeyChange) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        match change {
            gpufleet_control::KeyChange::All => entries.clear(),
            gpufleet_control::KeyChange::Key(hex_digest) => {
                let mut hash = [0u8; 32];
                if hex::decode_to_slice(hex_digest, &mut hash).is_ok() {
                    entries.remove(&hash);
                }
            }
        }
    }

    /// The key whose secret is `secret`; `InvalidKey` if none or revoked.
    pub async fn verify(&self, secret: &str) -> Result<Arc<AuthedKey>, RouterError> {
        let hash = digest_bytes(secret);
        let now = Instant::now();
        if let Some(e) = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
        {
            if now.duration_since(e.fetched) < self.ttl {
                return e.key.clone().ok_or(RouterError::InvalidKey);
            }
        }
        let rec = self.store.api_key_by_hash(&digest_hex(&hash)).await?;
        let key = rec.filter(|r| r.revoked_at.is_none()).map(|r| {
            Arc::new(AuthedKey {
                usage: self.usage.key(r.id, &r.name),
                limiter: self.limits.limiter(r.id, r.limits),
                id: r.id,
                name: r.name,
                models: r.models.map(|m| m.into_iter().collect()),
                project: r.project_id,
            })
        });
        {
            let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(
                hash,
                Entry {
                    key: key.clone(),
                    fetched: now,
                },
            );
        }
        key.ok_or(RouterError::InvalidKey)
    }
}
