//! `/v1/admin/*` (tenants, API keys, the usage log) and `DELETE /v1/users/{user_id}/events`.
//!
//! The bootstrap admin key acts on any tenant (and alone creates tenants); a key with the
//! `admin` scope acts on its own tenant only.

use std::time::Duration;

use chrono::{DateTime, Utc};
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    types::ToJSON,
    ApiResponse, Enum, Object, OpenApi,
};
use serde::Deserialize;
use tokio::sync::watch;

use super::{
    documented::{unanswered, Documented},
    guard::ApiKey,
    json_body::{null_as_default, Fault, JsonBody},
    stats::{parse_error_body, QueryErrorBody},
    types::RETRY_AFTER_SECS,
    ApiTags,
};
use crate::{
    analytics::{answer_limit, InvalidInput},
    auth::{
        keys, store::format_time, ApiKey as StoredKey, KeyStore, LimitOverrides, Principal,
        RateLimits, Scopes, Tenant,
    },
    ingest::wal::WalPos,
};

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum AdminResponse<T: ToJSON + Send + Sync> {
    #[oai(status = 200)]
    Ok(Json<T>),
    /// Created. For a key, the response is the only time the key itself is shown.
    #[oai(status = 201)]
    Created(Json<T>),
    /// The request is not valid; `field` names the parameter or body field.
    #[oai(status = 400)]
    BadRequest(Json<QueryErrorBody>),
    /// The key lacks the `admin` scope (`insufficient_scope`), may not act on this tenant
    /// (`forbidden_tenant`), only the bootstrap admin key may do this (`operator_only`), or a
    /// tenant's admin key asked for rate limits above the deployment's defaults
    /// (`forbidden_rate_limit`).
    #[oai(status = 403)]
    Forbidden(Json<QueryErrorBody>),
    /// No such tenant or key (for this tenant).
    #[oai(status = 404)]
    NotFound(Json<QueryErrorBody>),
    /// The tenant exists already.
    #[oai(status = 409)]
    Conflict(Json<QueryErrorBody>),
    /// The JSON body is larger than 64 KB (`payload_too_large`, with `limit`).
    #[oai(status = 413)]
    PayloadTooLarge(Json<QueryErrorBody>),
    /// The body was not sent as `application/json` (`unsupported_media_type`).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<QueryErrorBody>),
    /// A read of the usage log took longer than the analytics time limit (`query_timeout`,
    /// with `limit` in milliseconds): narrow the range, or give `key_id`.
    #[oai(status = 422)]
    TooExpensive(Json<QueryErrorBody>),
    /// ClickHouse is unavailable, or (deletion) events accepted earlier are still on their
    /// way to it; retry.
    #[oai(status = 503)]
    Unavailable(Json<QueryErrorBody>, #[oai(header = "Retry-After")] u32),
}

/// An operation's answer, documented with the statuses it can give (see [`Documented`]).
/// Handlers build the `AdminResponse` in an `async` block, early returns included, and
/// convert it once at the end.
type Answer<T, S> = Documented<AdminResponse<T>, S>;

unanswered!(
    /// `POST /v1/admin/tenants`: answers 201, not 200; looks nothing up (404); reads no
    /// usage (422).
    CreatesTenant: 200, 404, 422
);
unanswered!(
    /// `POST /v1/admin/keys`: answers 201, not 200; no tenant conflict (409); reads no usage
    /// (422).
    CreatesKey: 200, 409, 422
);
unanswered!(
    /// `DELETE /v1/admin/keys/{key_id}`: creates nothing (201, 409), no body (413, 415).
    RevokesKey: 201, 409, 413, 415, 422
);
unanswered!(
    /// Operations driven by their parameters (lists, deleting an end user's events): create
    /// nothing (201, 409), no body (413, 415), nothing looked up that could be missing (404;
    /// deleting a user without events deletes 0), no usage read (422).
    ByParams: 201, 404, 409, 413, 415, 422
);
unanswered!(
    /// The usage reads: as [`ByParams`], but a read can take too long (422).
    ReadsUsage: 201, 404, 409, 413, 415
);

/// A time range must end after it starts.
fn check_range<T: ToJSON + Send + Sync>(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(), AdminResponse<T>> {
    if to <= from {
        return Err(AdminResponse::BadRequest(error(
            "invalid_time_range",
            "`to` must be after `from`",
            Some("to"),
        )));
    }
    Ok(())
}

fn bad_request<T: ToJSON + Send + Sync>(err: poem::Error) -> AdminResponse<T> {
    AdminResponse::BadRequest(Json(parse_error_body(&err)))
}

/// The answer to a body that could not be read: 415, 413 or 400 (naming the field at fault).
fn bad_body<T: ToJSON + Send + Sync>(err: InvalidInput) -> AdminResponse<T> {
    match Fault::of(&err) {
        Fault::UnsupportedMediaType => AdminResponse::UnsupportedMediaType(Json(err.into())),
        Fault::TooLarge => AdminResponse::PayloadTooLarge(Json(err.into())),
        Fault::Invalid => AdminResponse::BadRequest(Json(err.into())),
    }
}

fn error(code: &str, message: impl Into<String>, field: Option<&str>) -> Json<QueryErrorBody> {
    Json(QueryErrorBody {
        error: code.to_string(),
        message: message.into(),
        field: field.map(str::to_string),
        limit: None,
    })
}

/// `read`, given up when ClickHouse has not answered within `limit` (a server that takes
/// connections but never answers would hold the request until the client gave up).
async fn within<T>(
    limit: Duration,
    read: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "ClickHouse did not answer within {} ms",
            limit.as_millis()
        ))
    })
}

/// A usage read's error: ClickHouse stopping it at its time limit is the request's fault (a
/// range too wide), anything else is ClickHouse's.
fn usage_read_failed<T: ToJSON + Send + Sync>(
    err: anyhow::Error,
    limit_ms: u64,
) -> AdminResponse<T> {
    let timed_out = err
        .downcast_ref::<clickhouse::error::Error>()
        .and_then(crate::clickhouse::error_code)
        == Some(159);
    match timed_out {
        true => AdminResponse::TooExpensive(Json(QueryErrorBody {
            limit: Some(limit_ms),
            ..error(
                "query_timeout",
                format!("reading the usage log took longer than the {limit_ms} ms allowed; narrow from/to or give key_id"),
                Some("from"),
            )
            .0
        })),
        false => unavailable(err),
    }
}

fn unavailable<T: ToJSON + Send + Sync>(err: anyhow::Error) -> AdminResponse<T> {
    tracing::warn!(error = %format!("{err:#}"), "admin request failed");
    AdminResponse::Unavailable(
        error(
            "clickhouse_unavailable",
            "ClickHouse did not answer; retry",
            None,
        ),
        RETRY_AFTER_SECS,
    )
}

/// The tenant a request acts on: the key's own (a `tenant_id` naming another is refused), or
/// for the bootstrap key the one named (required when `required`).
fn acting_tenant<T: ToJSON + Send + Sync>(
    caller: &Principal,
    named: Option<&str>,
    required: bool,
) -> Result<Option<String>, AdminResponse<T>> {
    match (caller.tenant(), named) {
        (Some(own), Some(named)) if own != named => Err(AdminResponse::Forbidden(error(
            "forbidden_tenant",
            "this key may act on its own tenant only",
            Some("tenant_id"),
        ))),
        (Some(own), _) => Ok(Some(own.to_string())),
        (None, Some(named)) => Ok(Some(named.to_string())),
        (None, None) if required => Err(AdminResponse::BadRequest(error(
            "missing_parameter",
            "the bootstrap admin key must name the tenant (`tenant_id`)",
            Some("tenant_id"),
        ))),
        (None, None) => Ok(None),
    }
}

fn valid_tenant_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A new tenant. Unknown fields are refused.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// 1–64 characters of `A-Z a-z 0-9 _ - .`; fixed for life.
    pub tenant_id: String,
    /// A display name (optional).
    #[oai(default)]
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
}

#[derive(Debug, Object)]
#[oai(rename = "Tenant")]
pub struct TenantBody {
    pub tenant_id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

impl From<Tenant> for TenantBody {
    fn from(t: Tenant) -> Self {
        TenantBody {
            tenant_id: t.id,
            name: t.name,
            created_at: t.created_at,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ScopeName {
    Ingest,
    Read,
    Admin,
}

/// Per-key rate limits; an omitted (or `null`) field takes the deployment default, and a
/// listed key shows it as `null`; 0 means unlimited. Unknown fields are refused.
#[derive(Debug, Clone, Copy, Default, Object, Deserialize)]
#[serde(deny_unknown_fields)]
#[oai(nullable_all)]
pub struct RateLimitBody {
    pub requests_per_sec: Option<u32>,
    pub requests_burst: Option<u32>,
    pub events_per_sec: Option<u32>,
    pub events_burst: Option<u32>,
}

/// A new key. Unknown fields are refused.
#[derive(Debug, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// The key's tenant. Required with the bootstrap admin key; a tenant's admin key creates
    /// keys of its own tenant only.
    pub tenant_id: Option<String>,
    /// What the key is for, e.g. `ios-sdk` (1–128 characters).
    pub name: String,
    /// At least one of `ingest`, `read`, `admin`.
    pub scopes: Vec<ScopeName>,
    #[oai(default)]
    #[serde(default, deserialize_with = "null_as_default")]
    pub rate_limit: RateLimitBody,
}

/// A key as listed: never the key itself, which is shown once, at creation.
#[derive(Debug, Object)]
#[oai(rename = "ApiKey")]
pub struct KeyBody {
    /// The public id of the key (its first 16 characters), as in the usage log.
    pub key_id: String,
    pub tenant_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub rate_limit: RateLimitBody,
    pub created_at: DateTime<Utc>,
    #[oai(skip_serializing_if_is_none)]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<StoredKey> for KeyBody {
    fn from(k: StoredKey) -> Self {
        KeyBody {
            key_id: k.id,
            tenant_id: k.tenant,
            name: k.name,
            scopes: k.scopes.names().into_iter().map(str::to_string).collect(),
            rate_limit: RateLimitBody {
                requests_per_sec: k.limits.requests_per_sec,
                requests_burst: k.limits.requests_burst,
                events_per_sec: k.limits.events_per_sec,
                events_burst: k.limits.events_burst,
            },
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

#[derive(Debug, Object)]
pub struct CreatedKey {
    /// The key. It is not stored and cannot be shown again: keep it now.
    pub key: String,
    #[oai(flatten)]
    pub info: KeyBody,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
pub enum StatusClass {
    #[oai(rename = "2xx")]
    Success,
    #[oai(rename = "3xx")]
    Redirect,
    #[oai(rename = "4xx")]
    ClientError,
    #[oai(rename = "5xx")]
    ServerError,
}

impl StatusClass {
    fn hundreds(self) -> u16 {
        match self {
            StatusClass::Success => 2,
            StatusClass::Redirect => 3,
            StatusClass::ClientError => 4,
            StatusClass::ServerError => 5,
        }
    }
}

/// One request, as the usage log recorded it.
#[derive(Debug, Object, clickhouse::Row, Deserialize)]
pub struct UsageEntry {
    /// When the request arrived (microseconds).
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub time: DateTime<Utc>,
    pub request_id: String,
    pub instance_id: String,
    /// Per-instance sequence number: orders one instance's requests exactly.
    pub seq: u64,
    pub tenant_id: String,
    pub key_id: String,
    pub method: String,
    pub route: String,
    pub status: u16,
    pub latency_us: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub events_accepted: u32,
    pub events_rejected: u32,
}

#[derive(Debug, Object)]
pub struct UsagePage {
    pub requests: Vec<UsageEntry>,
}

/// Requests of one key in one hour.
#[derive(Debug, Object, clickhouse::Row, Deserialize)]
pub struct UsageHour {
    #[serde(with = "clickhouse::serde::chrono::datetime")]
    pub hour: DateTime<Utc>,
    pub tenant_id: String,
    pub key_id: String,
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub rate_limited: u64,
    pub events_accepted: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub avg_latency_us: f64,
}

#[derive(Debug, Object)]
pub struct UsageHours {
    pub hours: Vec<UsageHour>,
}

#[derive(Debug, Object)]
pub struct UserDeletion {
    pub tenant_id: String,
    pub user_id: String,
    /// Events of the user removed (each distinct event counted once).
    pub deleted_events: u64,
}

pub struct AdminApi {
    pub store: std::sync::Arc<KeyStore>,
    pub client: clickhouse::Client,
    /// Where the write-ahead log of events is durable up to, and what ClickHouse has.
    pub durable: watch::Receiver<WalPos>,
    pub committed: watch::Receiver<u64>,
    pub wait_timeout: Duration,
    /// The time limit of a read (ClickHouse's `max_execution_time` of usage reads); a read
    /// (tenants, keys, usage) that ClickHouse has not answered within [`answer_limit`] of it
    /// is a 503.
    pub read_limit_ms: u64,
    /// Limits a key gets without overrides; a tenant's admin key may only lower them.
    pub default_limits: RateLimits,
    /// Events other instances acknowledged reach ClickHouse within about this long (their
    /// flush interval); a deletion looks again after it.
    pub settle: Duration,
    /// One deletion at a time per instance: each is a mutation of the whole table.
    pub deletions: tokio::sync::Mutex<()>,
}

const MAX_USAGE_ROWS: u32 = 10_000;

#[OpenApi(prefix_path = "/v1")]
impl AdminApi {
    /// Create a tenant
    ///
    /// Bootstrap admin key only.
    #[oai(path = "/admin/tenants", method = "post", tag = "ApiTags::Admin")]
    async fn create_tenant(
        &self,
        auth: ApiKey,
        body: JsonBody<NewTenant>,
    ) -> Answer<TenantBody, CreatesTenant> {
        async {
            if !matches!(auth.0, Principal::Operator) {
                return AdminResponse::Forbidden(error(
                    "operator_only",
                    "only the bootstrap admin key creates tenants",
                    None,
                ));
            }
            let NewTenant { tenant_id, name } = match body.0 {
                Ok(body) => body,
                Err(e) => return bad_body(e),
            };
            if !valid_tenant_id(&tenant_id) {
                return AdminResponse::BadRequest(error(
                    "invalid_tenant_id",
                    "tenant_id must be 1-64 characters of A-Z a-z 0-9 _ - .",
                    Some("tenant_id"),
                ));
            }
            match self.store.create_tenant(&tenant_id, &name).await {
                Ok(Some(t)) => AdminResponse::Created(Json(t.into())),
                Ok(None) => AdminResponse::Conflict(error(
                    "tenant_exists",
                    format!("tenant {tenant_id:?} exists already"),
                    Some("tenant_id"),
                )),
                Err(e) => unavailable(e),
            }
        }
        .await
        .into()
    }

    /// List tenants
    ///
    /// All tenants for the bootstrap admin key; its own for a tenant's admin key.
    #[oai(path = "/admin/tenants", method = "get", tag = "ApiTags::Admin")]
    async fn list_tenants(&self, auth: ApiKey) -> Answer<Vec<TenantBody>, ByParams> {
        async {
            let tenants = within(answer_limit(self.read_limit_ms), async {
                match auth.0.tenant() {
                    Some(own) => Ok(self.store.tenant(own).await?.into_iter().collect()),
                    None => self.store.list_tenants().await,
                }
            });
            match tenants.await {
                Ok(t) => AdminResponse::Ok(Json(t.into_iter().map(Into::into).collect())),
                Err(e) => unavailable(e),
            }
        }
        .await
        .into()
    }

    /// Create an API key
    ///
    /// The response holds the key; it is stored only as a hash and never shown again.
    #[oai(path = "/admin/keys", method = "post", tag = "ApiTags::Admin")]
    async fn create_key(
        &self,
        auth: ApiKey,
        body: JsonBody<NewKey>,
    ) -> Answer<CreatedKey, CreatesKey> {
        async {
            let body = match body.0 {
                Ok(body) => body,
                Err(e) => return bad_body(e),
            };
            let tenant = match acting_tenant(&auth.0, body.tenant_id.as_deref(), true) {
                Ok(t) => t.unwrap_or_default(),
                Err(resp) => return resp,
            };
            if !(1..=128).contains(&body.name.chars().count()) {
                return AdminResponse::BadRequest(error(
                    "invalid_name",
                    "name must be 1-128 characters",
                    Some("name"),
                ));
            }
            let names: Vec<&str> = body
                .scopes
                .iter()
                .map(|s| match s {
                    ScopeName::Ingest => "ingest",
                    ScopeName::Read => "read",
                    ScopeName::Admin => "admin",
                })
                .collect();
            let scopes = Scopes::parse(&names).unwrap_or_default();
            if scopes.is_empty() {
                return AdminResponse::BadRequest(error(
                    "invalid_scopes",
                    "give at least one scope: ingest, read, admin",
                    Some("scopes"),
                ));
            }
            match self.store.tenant(&tenant).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return AdminResponse::NotFound(error(
                        "tenant_not_found",
                        format!("no tenant {tenant:?}; create it first (POST /v1/admin/tenants)"),
                        Some("tenant_id"),
                    ))
                }
                Err(e) => return unavailable(e),
            }
            let r = body.rate_limit;
            if let Some(field) = over_the_defaults(&auth.0, &r, self.default_limits) {
                return AdminResponse::Forbidden(error(
                    "forbidden_rate_limit",
                    "only the bootstrap admin key may give a key limits above the deployment's \
                     defaults (or 0, unlimited)",
                    Some(&format!("rate_limit.{field}")),
                ));
            }
            let limits = LimitOverrides {
                requests_per_sec: r.requests_per_sec,
                requests_burst: r.requests_burst,
                events_per_sec: r.events_per_sec,
                events_burst: r.events_burst,
            };
            match self
                .store
                .create_key(&tenant, &body.name, scopes, limits)
                .await
            {
                Ok((secret, key)) => {
                    tracing::info!(
                        key_id = %key.id,
                        tenant = %key.tenant,
                        by = auth.0.key_id(),
                        "API key created"
                    );
                    AdminResponse::Created(Json(CreatedKey {
                        key: secret,
                        info: key.into(),
                    }))
                }
                Err(e) => unavailable(e),
            }
        }
        .await
        .into()
    }

    /// List API keys
    ///
    /// Revoked keys included (with `revoked_at`). Never shows the keys themselves.
    #[oai(path = "/admin/keys", method = "get", tag = "ApiTags::Admin")]
    async fn list_keys(
        &self,
        auth: ApiKey,
        /// Only this tenant's keys (the bootstrap admin key sees every tenant without it).
        tenant_id: Query<Option<String>>,
    ) -> Answer<Vec<KeyBody>, ByParams> {
        async {
            let tenant = match acting_tenant(&auth.0, tenant_id.0.as_deref(), false) {
                Ok(t) => t,
                Err(resp) => return resp,
            };
            match within(
                answer_limit(self.read_limit_ms),
                self.store.list_keys(tenant.as_deref()),
            )
            .await
            {
                Ok(keys) => AdminResponse::Ok(Json(keys.into_iter().map(Into::into).collect())),
                Err(e) => unavailable(e),
            }
        }
        .await
        .into()
    }

    /// Revoke an API key
    ///
    /// Takes effect at once on this instance and within `ADTRACK_KEY_REFRESH_MS` (2 s by
    /// default) on every other. Revoking a revoked key changes nothing.
    #[oai(
        path = "/admin/keys/:key_id",
        method = "delete",
        tag = "ApiTags::Admin"
    )]
    async fn revoke_key(&self, auth: ApiKey, key_id: Path<String>) -> Answer<KeyBody, RevokesKey> {
        async {
            let not_found = || {
                AdminResponse::NotFound(error(
                    "key_not_found",
                    format!("no key {:?}", key_id.0),
                    Some("key_id"),
                ))
            };
            if !keys::is_key_id(&key_id.0) {
                return not_found();
            }
            match self.store.revoke(&key_id.0, auth.0.tenant()).await {
                Ok(Some(key)) => {
                    tracing::info!(key_id = %key.id, by = auth.0.key_id(), "API key revoked");
                    AdminResponse::Ok(Json(key.into()))
                }
                Ok(None) => not_found(),
                Err(e) => unavailable(e),
            }
        }
        .await
        .into()
    }

    /// Usage log
    ///
    /// Requests as the usage log recorded them (every request, failures included), oldest
    /// first: by arrival time, then instance and per-instance sequence number. Rows reach the
    /// log within about a second. A read longer than the analytics time limit is a 422
    /// `query_timeout` (narrow the range).
    #[oai(path = "/admin/usage", method = "get", tag = "ApiTags::Admin")]
    #[allow(clippy::too_many_arguments)]
    async fn usage(
        &self,
        auth: ApiKey,
        /// Start of the range on arrival time, inclusive (RFC 3339).
        from: Query<DateTime<Utc>>,
        /// End of the range, exclusive (RFC 3339).
        to: Query<DateTime<Utc>>,
        /// Only this key's requests (its `key_id`).
        key_id: Query<Option<String>>,
        /// Only responses of this class.
        status: Query<Option<StatusClass>>,
        /// The tenant (bootstrap admin key only; without it every tenant, and requests without
        /// a valid key).
        tenant_id: Query<Option<String>>,
        /// Most rows (default 1000, at most 10000).
        limit: Query<Option<u32>>,
    ) -> Answer<UsagePage, ReadsUsage> {
        async {
            let tenant = match acting_tenant(&auth.0, tenant_id.0.as_deref(), false) {
                Ok(t) => t,
                Err(resp) => return resp,
            };
            let limit = limit.0.unwrap_or(1000);
            if limit == 0 || limit > MAX_USAGE_ROWS {
                return AdminResponse::BadRequest(error(
                    "invalid_limit",
                    format!("limit must be 1-{MAX_USAGE_ROWS}"),
                    Some("limit"),
                ));
            }
            if let Err(resp) = check_range(from.0, to.0) {
                return resp;
            }
            let query = self.usage_query(
                "SELECT time, request_id, instance_id, seq, tenant AS tenant_id, key_id, method, \
                 route, status, latency_us, bytes_in, bytes_out, events_accepted, events_rejected",
                &format!("ORDER BY time, instance_id, seq LIMIT {limit}"),
                UsageFilter {
                    from: from.0,
                    to: to.0,
                    tenant: tenant.as_deref(),
                    key_id: key_id.0.as_deref(),
                    status: status.0,
                },
            );
            let read = async { Ok(query.fetch_all::<UsageEntry>().await?) };
            match within(answer_limit(self.read_limit_ms), read).await {
                Ok(requests) => AdminResponse::Ok(Json(UsagePage { requests })),
                Err(e) => usage_read_failed(e, self.read_limit_ms),
            }
        }
        .await
        .into()
    }

    /// Usage per key per hour
    ///
    /// Requests, errors, rate-limited requests, accepted events and bytes of every key, by
    /// hour (UTC). A read longer than the analytics time limit is a 422 `query_timeout`.
    #[oai(path = "/admin/usage/hourly", method = "get", tag = "ApiTags::Admin")]
    async fn usage_hourly(
        &self,
        auth: ApiKey,
        /// Start of the range, inclusive (RFC 3339).
        from: Query<DateTime<Utc>>,
        /// End of the range, exclusive (RFC 3339).
        to: Query<DateTime<Utc>>,
        /// Only this key.
        key_id: Query<Option<String>>,
        /// The tenant (bootstrap admin key only).
        tenant_id: Query<Option<String>>,
    ) -> Answer<UsageHours, ReadsUsage> {
        async {
            let tenant = match acting_tenant(&auth.0, tenant_id.0.as_deref(), false) {
                Ok(t) => t,
                Err(resp) => return resp,
            };
            if let Err(resp) = check_range(from.0, to.0) {
                return resp;
            }
            let query = self.usage_query(
                "SELECT toStartOfHour(time) AS hour, tenant AS tenant_id, key_id, \
                 count() AS requests, countIf(status BETWEEN 400 AND 499) AS client_errors, \
                 countIf(status >= 500) AS server_errors, countIf(status = 429) AS rate_limited, \
                 sum(events_accepted) AS events_accepted, sum(bytes_in) AS bytes_in, \
                 sum(bytes_out) AS bytes_out, avg(latency_us) AS avg_latency_us",
                "GROUP BY hour, tenant_id, key_id ORDER BY hour, tenant_id, key_id LIMIT 100000",
                UsageFilter {
                    from: from.0,
                    to: to.0,
                    tenant: tenant.as_deref(),
                    key_id: key_id.0.as_deref(),
                    status: None,
                },
            );
            let read = async { Ok(query.fetch_all::<UsageHour>().await?) };
            match within(answer_limit(self.read_limit_ms), read).await {
                Ok(hours) => AdminResponse::Ok(Json(UsageHours { hours })),
                Err(e) => usage_read_failed(e, self.read_limit_ms),
            }
        }
        .await
        .into()
    }

    /// Delete an end user's events
    ///
    /// Removes every event of `user_id` for the tenant (privacy requests) and answers once the
    /// deletion is applied. Events this instance acknowledged before the request are waited
    /// for first; a second pass after the flush interval removes those other instances had
    /// acknowledged but not yet sent (unless their ClickHouse connection is down for longer:
    /// repeat the request then). One deletion runs at a time per instance. The usage log
    /// records the route, never the user id.
    #[oai(
        path = "/users/:user_id/events",
        method = "delete",
        tag = "ApiTags::Admin"
    )]
    async fn delete_user_events(
        &self,
        auth: ApiKey,
        user_id: Path<String>,
        /// The tenant (bootstrap admin key only, and then required).
        tenant_id: Query<Option<String>>,
    ) -> Answer<UserDeletion, ByParams> {
        async {
            let tenant = match acting_tenant(&auth.0, tenant_id.0.as_deref(), true) {
                Ok(t) => t.unwrap_or_default(),
                Err(resp) => return resp,
            };
            let user = user_id.0;
            if user.is_empty() || user.chars().count() > 128 {
                return AdminResponse::BadRequest(error(
                    "invalid_user_id",
                    "user_id must be 1-128 characters",
                    Some("user_id"),
                ));
            }
            // Everything acknowledged so far must be in ClickHouse first, or it would land after
            // the deletion.
            let target = self.durable.borrow().lsn;
            let mut committed = self.committed.clone();
            let caught_up =
                tokio::time::timeout(self.wait_timeout, committed.wait_for(|&c| c >= target))
                    .await
                    .is_ok_and(|r| r.is_ok());
            if !caught_up {
                return AdminResponse::Unavailable(
                    error(
                        "events_in_flight",
                        "events accepted earlier are not in ClickHouse yet; nothing was deleted, retry",
                        None,
                    ),
                    RETRY_AFTER_SECS,
                );
            }
            let _one_at_a_time = self.deletions.lock().await;
            // Twice: the second pass, after other instances' flush interval, removes events they
            // acknowledged before this request and had not sent to ClickHouse yet.
            let mut deleted = 0;
            for pass in 0..2 {
                if pass == 1 {
                    tokio::time::sleep(self.settle).await;
                }
                match self.delete_user(&tenant, &user).await {
                    Ok(n) => deleted += n,
                    Err(e) => return unavailable(e),
                }
            }
            tracing::info!(
                tenant = %tenant,
                deleted,
                by = auth.0.key_id(),
                "end-user events deleted"
            );
            AdminResponse::Ok(Json(UserDeletion {
                tenant_id: tenant,
                user_id: user,
                deleted_events: deleted,
            }))
        }
        .await
        .into()
    }
}

impl AdminApi {
    /// `select … FROM usage_log FINAL WHERE <filter> tail`, every value bound.
    fn usage_query(
        &self,
        select: &str,
        tail: &str,
        filter: UsageFilter<'_>,
    ) -> clickhouse::query::Query {
        let mut clause = String::new();
        if filter.tenant.is_some() {
            clause.push_str(" AND tenant = ?");
        }
        if filter.key_id.is_some() {
            clause.push_str(" AND key_id = ?");
        }
        if let Some(s) = filter.status {
            let h = s.hundreds();
            clause.push_str(&format!(" AND status BETWEEN {h}00 AND {h}99"));
        }
        let sql = format!(
            "{select} FROM usage_log FINAL \
             WHERE time >= toDateTime64(?, 6, 'UTC') AND time < toDateTime64(?, 6, 'UTC'){clause} {tail}"
        );
        let mut query =
            crate::clickhouse::bounded_read(self.client.query(&sql), self.read_limit_ms)
                .bind(format_time(filter.from))
                .bind(format_time(filter.to));
        for value in [filter.tenant, filter.key_id].into_iter().flatten() {
            query = query.bind(value);
        }
        query
    }

    /// Deletes the events of `user` of `tenant` and returns how many there were.
    async fn delete_user(&self, tenant: &str, user: &str) -> anyhow::Result<u64> {
        let found = self
            .client
            .query("SELECT count() FROM events FINAL WHERE tenant = ? AND user_id = ?")
            .bind(tenant)
            .bind(user)
            .fetch_one::<u64>()
            .await?;
        if found > 0 {
            self.client
                .query("ALTER TABLE events DELETE WHERE tenant = ? AND user_id = ?")
                .bind(tenant)
                .bind(user)
                .with_setting("mutations_sync", "2")
                .execute()
                .await?;
        }
        Ok(found)
    }
}

/// The first override a tenant's admin key may not set: above the default, or 0 (unlimited)
/// where the default is a limit. The bootstrap key may set any.
fn over_the_defaults(
    caller: &Principal,
    r: &RateLimitBody,
    defaults: RateLimits,
) -> Option<&'static str> {
    if matches!(caller, Principal::Operator) {
        return None;
    }
    let fields = [
        (
            "requests_per_sec",
            r.requests_per_sec,
            defaults.requests_per_sec,
        ),
        ("requests_burst", r.requests_burst, defaults.requests_burst),
        ("events_per_sec", r.events_per_sec, defaults.events_per_sec),
        ("events_burst", r.events_burst, defaults.events_burst),
    ];
    fields.into_iter().find_map(|(name, asked, default)| {
        let allowed = match asked {
            None => true,
            Some(_) if default == 0 => true,
            Some(v) => v != 0 && v <= default,
        };
        (!allowed).then_some(name)
    })
}

/// Which rows of the usage log a request reads.
struct UsageFilter<'a> {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    tenant: Option<&'a str>,
    key_id: Option<&'a str>,
    status: Option<StatusClass>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error;

    #[test]
    fn a_usage_read_clickhouse_stopped_is_a_range_too_wide_and_other_failures_unavailable() {
        let stopped = Error::BadResponse(
            "Code: 159. DB::Exception: Timeout exceeded: elapsed 1.2 seconds, maximum: 1. (TIMEOUT_EXCEEDED)".into(),
        );
        let AdminResponse::TooExpensive(body) =
            usage_read_failed::<UsagePage>(stopped.into(), 1000)
        else {
            panic!("ClickHouse's own time limit is not a 422");
        };
        assert_eq!(
            (body.0.error.as_str(), body.0.field.as_deref(), body.0.limit),
            ("query_timeout", Some("from"), Some(1000))
        );
        assert!(body.0.message.contains("1000 ms"), "{}", body.0.message);
        for other in [
            anyhow::Error::from(Error::BadResponse("Connection refused".into())),
            anyhow::anyhow!("ClickHouse did not answer within 15000 ms"),
        ] {
            assert!(matches!(
                usage_read_failed::<UsagePage>(other, 1000),
                AdminResponse::Unavailable(..)
            ));
        }
    }
}
