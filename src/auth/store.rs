//! Tenants and API keys in ClickHouse (so every instance sees the same set), cached in memory.
//!
//! Both tables are ReplacingMergeTree keyed by id and versioned by `updated_at`: revoking a
//! key inserts a new version of its row, and reads use `FINAL`. Every instance reloads the
//! whole key table every `refresh` (2 s by default): that bounds how long a key revoked on
//! another instance keeps working. A key the cache does not know (created on another instance
//! a moment ago) is looked up directly, at most once a second per id.
//!
//! Keys are never deleted, only revoked, so a reload only adds and updates cached keys.
//!
//! The cache is also written to a snapshot file (hashes only, never a key), so an instance
//! restarted while ClickHouse is down still recognises its clients and keeps accepting events
//! into its log.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{
    keys::{self, KeyHash},
    rate_limit::{KeyLimiter, RateLimits},
    Scopes,
};

/// Per-key overrides of the deployment's rate limits (`None`: the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitOverrides {
    pub requests_per_sec: Option<u32>,
    pub requests_burst: Option<u32>,
    pub events_per_sec: Option<u32>,
    pub events_burst: Option<u32>,
}

impl LimitOverrides {
    pub fn apply(&self, defaults: RateLimits) -> RateLimits {
        RateLimits {
            requests_per_sec: self.requests_per_sec.unwrap_or(defaults.requests_per_sec),
            requests_burst: self.requests_burst.unwrap_or(defaults.requests_burst),
            events_per_sec: self.events_per_sec.unwrap_or(defaults.events_per_sec),
            events_burst: self.events_burst.unwrap_or(defaults.events_burst),
        }
    }
}

/// One API key as stored (never the key itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    #[serde(with = "hash_hex")]
    pub hash: KeyHash,
    pub tenant: String,
    pub name: String,
    pub scopes: Scopes,
    pub limits: LimitOverrides,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A cached key with its rate-limit buckets (kept across reloads while its limits stay).
pub struct CachedKey {
    pub key: ApiKey,
    pub limiter: Arc<KeyLimiter>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ClickHouse is unavailable: {0}")]
    Unavailable(#[source] anyhow::Error),
}

pub struct KeyStore {
    client: clickhouse::Client,
    defaults: RateLimits,
    cache: RwLock<HashMap<String, Arc<CachedKey>>>,
    misses: tokio::sync::Mutex<HashMap<String, Instant>>,
    snapshot: Option<PathBuf>,
}

const MISS_TTL: Duration = Duration::from_secs(1);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

impl KeyStore {
    pub fn new(
        client: clickhouse::Client,
        defaults: RateLimits,
        snapshot: Option<PathBuf>,
    ) -> Self {
        let store = KeyStore {
            client,
            defaults,
            cache: RwLock::default(),
            misses: tokio::sync::Mutex::default(),
            snapshot,
        };
        store.remove_unfinished_snapshots();
        if let Some(keys) = store.read_snapshot() {
            tracing::info!(keys = keys.len(), "API keys loaded from the local snapshot");
            store.replace(keys);
        }
        store
    }

    /// The key with this id: from the cache, or (for a key created elsewhere a moment ago)
    /// from ClickHouse. `Ok(None)`: no such key.
    pub async fn lookup(&self, id: &str) -> Result<Option<Arc<CachedKey>>, StoreError> {
        if let Some(hit) = self.read_cache().get(id) {
            return Ok(Some(hit.clone()));
        }
        // Boxed: the ClickHouse query's future is several KB, and every request's future
        // (which holds this one) is moved into the heap by the framework.
        Box::pin(self.look_up_missing(id)).await
    }

    async fn look_up_missing(&self, id: &str) -> Result<Option<Arc<CachedKey>>, StoreError> {
        // One lookup at a time: requests arriving together with a new key wait for the first
        // one's answer instead of racing it (and a key answered "unknown" within the last
        // second is not asked for again).
        let mut misses = tokio::time::timeout(LOOKUP_TIMEOUT, self.misses.lock())
            .await
            .map_err(|_| StoreError::Unavailable(anyhow::anyhow!("key lookups are backed up")))?;
        if let Some(hit) = self.read_cache().get(id) {
            return Ok(Some(hit.clone()));
        }
        if misses.get(id).is_some_and(|t| t.elapsed() < MISS_TTL) {
            return Ok(None);
        }
        let rows = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            self.client
                .query(&format!("{SELECT_KEYS} WHERE key_id = ?"))
                .bind(id)
                .fetch_all::<KeyRow>(),
        )
        .await
        .map_err(|_| StoreError::Unavailable(anyhow::anyhow!("key lookup timed out")))?
        .map_err(|e| StoreError::Unavailable(e.into()))?;
        let Some(key) = rows.into_iter().next().and_then(|r| r.into_key().ok()) else {
            if misses.len() > 10_000 {
                misses.retain(|_, t| t.elapsed() < MISS_TTL);
            }
            misses.insert(id.to_string(), Instant::now());
            return Ok(None);
        };
        Ok(Some(self.put(key)))
    }

    /// Reloads every key from ClickHouse.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let rows = self
            .client
            .query(SELECT_KEYS)
            .fetch_all::<KeyRow>()
            .await
            .context("reading API keys")?;
        let keys: Vec<ApiKey> = rows.into_iter().filter_map(|r| r.into_key().ok()).collect();
        if self.replace(keys) {
            self.persist();
        }
        Ok(())
    }

    /// Runs `refresh` every `every` until the task is dropped.
    pub async fn refresh_forever(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(err) = self.refresh().await {
                tracing::debug!(error = %format!("{err:#}"), "API keys not reloaded; keeping the cached set");
            }
        }
    }

    pub async fn create_key(
        &self,
        tenant: &str,
        name: &str,
        scopes: Scopes,
        limits: LimitOverrides,
    ) -> anyhow::Result<(String, ApiKey)> {
        let new = keys::generate();
        let key = ApiKey {
            id: new.id,
            hash: new.hash,
            tenant: tenant.to_string(),
            name: name.to_string(),
            scopes,
            limits,
            // As stored (microseconds), so the reloaded key compares equal.
            created_at: now_micros(),
            revoked_at: None,
        };
        self.write_key(&key, key.created_at).await?;
        self.put(key.clone());
        self.persist();
        Ok((new.secret, key))
    }

    /// Revokes a key of `tenant` (any tenant for `None`). `Ok(None)`: no such key.
    pub async fn revoke(&self, id: &str, tenant: Option<&str>) -> anyhow::Result<Option<ApiKey>> {
        let found = self
            .client
            .query(&format!("{SELECT_KEYS} WHERE key_id = ?"))
            .bind(id)
            .fetch_all::<KeyRow>()
            .await
            .context("reading the key")?;
        let Some(mut key) = found.into_iter().next().and_then(|r| r.into_key().ok()) else {
            return Ok(None);
        };
        if tenant.is_some_and(|t| t != key.tenant) {
            return Ok(None);
        }
        if key.revoked_at.is_none() {
            let now = now_micros();
            key.revoked_at = Some(now);
            // The new version must sort after the old one even within one microsecond.
            let version = now.max(key.created_at + chrono::Duration::microseconds(1));
            self.write_key(&key, version).await?;
        }
        self.put(key.clone());
        self.persist();
        Ok(Some(key))
    }

    pub async fn list_keys(&self, tenant: Option<&str>) -> anyhow::Result<Vec<ApiKey>> {
        let rows = match tenant {
            Some(t) => {
                self.client
                    .query(&format!(
                        "{SELECT_KEYS} WHERE tenant_id = ? ORDER BY created_at, key_id"
                    ))
                    .bind(t)
                    .fetch_all::<KeyRow>()
                    .await
            }
            None => {
                self.client
                    .query(&format!(
                        "{SELECT_KEYS} ORDER BY tenant_id, created_at, key_id"
                    ))
                    .fetch_all::<KeyRow>()
                    .await
            }
        }
        .context("listing API keys")?;
        Ok(rows.into_iter().filter_map(|r| r.into_key().ok()).collect())
    }

    /// Creates a tenant; `Ok(None)` when it exists already.
    pub async fn create_tenant(&self, id: &str, name: &str) -> anyhow::Result<Option<Tenant>> {
        if self.tenant(id).await?.is_some() {
            return Ok(None);
        }
        // As stored (microseconds), so the answer matches what a later read shows.
        let now = now_micros();
        let stamp = format_time(now);
        let row = serde_json::json!({"tenant_id": id, "name": name, "created_at": stamp, "updated_at": stamp});
        insert_json(&self.client, "tenants", &[row]).await?;
        Ok(Some(Tenant {
            id: id.to_string(),
            name: name.to_string(),
            created_at: now,
        }))
    }

    pub async fn tenant(&self, id: &str) -> anyhow::Result<Option<Tenant>> {
        let rows = self
            .client
            .query(&format!("{SELECT_TENANTS} WHERE tenant_id = ?"))
            .bind(id)
            .fetch_all::<TenantRow>()
            .await
            .context("reading the tenant")?;
        Ok(rows.into_iter().next().map(TenantRow::into_tenant))
    }

    pub async fn list_tenants(&self) -> anyhow::Result<Vec<Tenant>> {
        let rows = self
            .client
            .query(&format!("{SELECT_TENANTS} ORDER BY tenant_id"))
            .fetch_all::<TenantRow>()
            .await
            .context("listing tenants")?;
        Ok(rows.into_iter().map(TenantRow::into_tenant).collect())
    }

    async fn write_key(&self, key: &ApiKey, version: DateTime<Utc>) -> anyhow::Result<()> {
        let row = serde_json::json!({
            "key_id": key.id,
            "key_hash": keys::hex(&key.hash),
            "tenant_id": key.tenant,
            "name": key.name,
            "scopes": key.scopes.names(),
            "requests_per_sec": key.limits.requests_per_sec,
            "requests_burst": key.limits.requests_burst,
            "events_per_sec": key.limits.events_per_sec,
            "events_burst": key.limits.events_burst,
            "created_at": format_time(key.created_at),
            "revoked_at": key.revoked_at.map(format_time),
            "updated_at": format_time(version),
        });
        insert_json(&self.client, "api_keys", &[row]).await
    }

    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<CachedKey>>> {
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self, key: ApiKey, previous: Option<&Arc<CachedKey>>) -> Arc<CachedKey> {
        let limits = key.limits.apply(self.defaults);
        let limiter = match previous {
            Some(p) if p.key == key => return p.clone(),
            // Revocation is final: an older answer (a reload that started before the
            // revocation) must not bring the key back.
            Some(p) if p.key.revoked_at.is_some() && key.revoked_at.is_none() => return p.clone(),
            // Same limits: keep the buckets (a reload must not refill them).
            Some(p) if p.limiter.limits == limits => p.limiter.clone(),
            _ => Arc::new(KeyLimiter::new(limits)),
        };
        Arc::new(CachedKey { key, limiter })
    }

    fn put(&self, key: ApiKey) -> Arc<CachedKey> {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let previous = cache.get(&key.id).cloned();
        let entry = self.cached(key, previous.as_ref());
        cache.insert(entry.key.id.clone(), entry.clone());
        entry
    }

    /// Puts `keys` into the cache; true if anything changed. A cached key missing from
    /// `keys` stays: keys are never deleted, only revoked, and an answer without them (an
    /// engine still loading its tables after a restart) must not lock clients out.
    fn replace(&self, keys: Vec<ApiKey>) -> bool {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for key in keys {
            let previous = cache.get(&key.id);
            if previous.is_some_and(|p| {
                p.key == key || p.key.revoked_at.is_some() && key.revoked_at.is_none()
            }) {
                continue;
            }
            changed = true;
            let entry = self.cached(key, previous);
            cache.insert(entry.key.id.clone(), entry);
        }
        changed
    }

    /// Temporary files a crash left behind while writing the snapshot.
    fn remove_unfinished_snapshots(&self) {
        let Some(path) = &self.snapshot else { return };
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let prefix = format!("{}.tmp-", Path::new(name).with_extension("").display());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn read_snapshot(&self) -> Option<Vec<ApiKey>> {
        let text = std::fs::read_to_string(self.snapshot.as_ref()?).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the cached keys to the snapshot file.
    fn persist(&self) {
        let Some(path) = &self.snapshot else { return };
        let keys: Vec<ApiKey> = self.read_cache().values().map(|c| c.key.clone()).collect();
        // A name of its own: two writers at once must not share the temporary file.
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        let written = serde_json::to_vec(&keys)
            .map_err(std::io::Error::from)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(err) = written {
            tracing::warn!(error = %err, file = %path.display(), "could not write the API key snapshot");
        }
    }
}

const SELECT_KEYS: &str = "SELECT key_id, key_hash, tenant_id, name, scopes, requests_per_sec, \
     requests_burst, events_per_sec, events_burst, created_at, revoked_at FROM api_keys FINAL";

const SELECT_TENANTS: &str = "SELECT tenant_id, name, created_at FROM tenants FINAL";

#[derive(Row, Deserialize)]
struct KeyRow {
    key_id: String,
    key_hash: String,
    tenant_id: String,
    name: String,
    scopes: Vec<String>,
    requests_per_sec: Option<u32>,
    requests_burst: Option<u32>,
    events_per_sec: Option<u32>,
    events_burst: Option<u32>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    created_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros::option")]
    revoked_at: Option<DateTime<Utc>>,
}

impl KeyRow {
    fn into_key(self) -> anyhow::Result<ApiKey> {
        Ok(ApiKey {
            hash: keys::from_hex(&self.key_hash)
                .context("a stored key hash is not 64 hex digits")?,
            id: self.key_id,
            tenant: self.tenant_id,
            name: self.name,
            scopes: Scopes::parse(&self.scopes)
                .map_err(|s| anyhow::anyhow!("unknown scope {s:?}"))?,
            limits: LimitOverrides {
                requests_per_sec: self.requests_per_sec,
                requests_burst: self.requests_burst,
                events_per_sec: self.events_per_sec,
                events_burst: self.events_burst,
            },
            created_at: self.created_at,
            revoked_at: self.revoked_at,
        })
    }
}

#[derive(Row, Deserialize)]
struct TenantRow {
    tenant_id: String,
    name: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    created_at: DateTime<Utc>,
}

impl TenantRow {
    fn into_tenant(self) -> Tenant {
        Tenant {
            id: self.tenant_id,
            name: self.name,
            created_at: self.created_at,
        }
    }
}

/// Now, at the precision the tables store (microseconds), so what is cached or answered
/// compares equal to what a later read returns.
fn now_micros() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap_or_default()
}

/// `DateTime64(6)` as ClickHouse parses it from JSON.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// Inserts rows as `JSONEachRow`.
pub async fn insert_json(
    client: &clickhouse::Client,
    table: &str,
    rows: &[serde_json::Value],
) -> anyhow::Result<()> {
    let mut body = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut body, row)?;
        body.push(b'\n');
    }
    let mut insert =
        client.insert_formatted_with(format!("INSERT INTO {table} FORMAT JSONEachRow"));
    insert.send(body.into()).await?;
    insert
        .end()
        .await
        .with_context(|| format!("inserting into {table}"))
}

mod hash_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(hash: &super::KeyHash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::keys::hex(hash))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::KeyHash, D::Error> {
        let text = String::deserialize(d)?;
        super::keys::from_hex(&text).ok_or_else(|| serde::de::Error::custom("not a key hash"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(revoked: bool) -> ApiKey {
        ApiKey {
            id: "adt_0123456789ab".into(),
            hash: [7; 32],
            tenant: "acme".into(),
            name: "k".into(),
            scopes: Scopes::of(&[super::super::Scope::Ingest]),
            limits: LimitOverrides::default(),
            created_at: DateTime::from_timestamp_micros(1).unwrap(),
            revoked_at: revoked.then(|| DateTime::from_timestamp_micros(2).unwrap()),
        }
    }

    #[test]
    fn the_snapshot_survives_a_restart_and_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.json");
        let leftover = dir.path().join("api-keys.tmp-0123");
        std::fs::write(&leftover, b"{").unwrap();
        let defaults = RateLimits {
            requests_per_sec: 1,
            requests_burst: 1,
            events_per_sec: 1,
            events_burst: 1,
        };
        let store = KeyStore::new(clickhouse::Client::default(), defaults, Some(path.clone()));
        assert!(!leftover.exists(), "a crash's temporary file is removed");
        store.put(key(false));
        store.persist();
        let again = KeyStore::new(clickhouse::Client::default(), defaults, Some(path));
        assert_eq!(
            again.read_cache().get("adt_0123456789ab").unwrap().key,
            key(false)
        );
    }

    #[test]
    fn an_older_answer_never_brings_a_revoked_key_back() {
        let store = KeyStore::new(
            clickhouse::Client::default(),
            RateLimits {
                requests_per_sec: 1,
                requests_burst: 1,
                events_per_sec: 1,
                events_burst: 1,
            },
            None,
        );
        store.put(key(false));
        store.put(key(true));
        // A reload that read the table before the revocation answers late.
        assert!(!store.replace(vec![key(false)]));
        store.put(key(false));
        let cached = store.read_cache().get("adt_0123456789ab").cloned().unwrap();
        assert!(cached.key.revoked_at.is_some());
    }
}
