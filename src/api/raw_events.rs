//! Raw events: `GET /v1/events` (newest first, keyset pages), `GET /v1/events/{event_id}`,
//! and `GET /v1/events/export` (NDJSON in order of receipt, streamed, resumable).
//!
//! `GET /v1/events` shares its path with `POST /v1/events` (`EventsApi`); routing allows two
//! `#[OpenApi]` impls on one path, and `SharedPaths` merges them in the OpenAPI document.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, FixedOffset, Utc};
use poem::{Body, IntoResponse, Request};
use poem_openapi::{
    param::{Path, Query},
    payload::{Json, Payload},
    registry::{MetaSchemaRef, Registry},
    types::Type,
    ApiResponse, Object, OpenApi,
};
use serde::Serialize;
use uuid::Uuid;

use super::{
    guard::ApiKey,
    stats::{
        error_body, parse_error_body, parse_filters, respond, Answer, ById, ByParams, ErrorKind,
        QueryErrorBody,
    },
    types::RETRY_AFTER_SECS,
    ApiTags,
};
use crate::analytics::{
    answer_limit,
    raw::{self, Bounds, Cursor, EventRow},
    Analytics, AnalyticsError, InvalidInput,
};

/// A stored event: the fields it was sent with, and what the service added.
#[derive(Debug, Clone, Object, Serialize)]
#[oai(rename = "StoredEvent")]
pub struct StoredEvent {
    pub event_id: Uuid,
    /// `impression`, `click` or `conversion`.
    pub event_type: String,
    /// The client's event time.
    #[serde(serialize_with = "rfc3339")]
    pub timestamp: DateTime<Utc>,
    /// `timestamp` corrected by the client's clock offset; analytics use this time.
    #[serde(serialize_with = "rfc3339")]
    pub event_time: DateTime<Utc>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub sent_at: Option<DateTime<Utc>>,
    /// When the service accepted the event (the last copy, for a re-sent event).
    #[serde(serialize_with = "rfc3339")]
    pub received_at: DateTime<Utc>,
    pub campaign_id: String,
    pub ad_id: String,
    pub publisher_id: String,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertiser_id: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub browser: Option<String>,
    pub cost_micros: u64,
    pub revenue_micros: u64,
    pub attributes: BTreeMap<String, String>,
    /// Pass as `cursor` to continue after this event (in the listing's order).
    pub cursor: String,
}

// The same text poem-openapi writes for `DateTime<Utc>`, so list and export lines agree.
fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339())
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

impl From<EventRow> for StoredEvent {
    fn from(r: EventRow) -> Self {
        let given = |s: String| (!s.is_empty()).then_some(s);
        StoredEvent {
            cursor: Cursor::of(&r).encode(),
            event_id: r.event_id,
            event_type: r.kind,
            timestamp: r.timestamp,
            event_time: r.event_time,
            sent_at: r.sent_at,
            received_at: r.received_at,
            campaign_id: r.campaign_id,
            ad_id: r.ad_id,
            publisher_id: r.publisher_id,
            advertiser_id: given(r.advertiser_id),
            user_id: given(r.user_id),
            country: given(r.country),
            device: given(r.device),
            os: given(r.os),
            browser: given(r.browser),
            cost_micros: r.cost_micros,
            revenue_micros: r.revenue_micros,
            attributes: r.attributes.into_iter().collect(),
        }
    }
}

#[derive(Debug, Clone, Object)]
pub struct EventPage {
    /// Newest received first.
    pub events: Vec<StoredEvent>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

/// NDJSON: one `StoredEvent` per line.
pub struct Ndjson(pub Body);

impl Payload for Ndjson {
    const CONTENT_TYPE: &'static str = "application/x-ndjson";

    fn schema_ref() -> MetaSchemaRef {
        StoredEvent::schema_ref()
    }

    fn register(registry: &mut Registry) {
        StoredEvent::register(registry);
    }
}

impl IntoResponse for Ndjson {
    fn into_response(self) -> poem::Response {
        poem::Response::builder()
            .content_type(Self::CONTENT_TYPE)
            .body(self.0)
    }
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "export_bad_request")]
pub enum ExportResponse {
    /// One `StoredEvent` per line, oldest received first, each with the `cursor` to resume
    /// after it. The stream covers events received up to `X-Export-Until` (events received
    /// later may still be on their way into ClickHouse); fewer lines than `limit` in a stream
    /// that ended properly means everything up to that instant was served. A stream the
    /// service cannot finish (ClickHouse failed or stalled midway, or it is still streaming
    /// 5 s after its time limit) is cut off without the chunked body's end, so the client sees
    /// a broken transfer; then, or if the connection breaks otherwise, resume with the last
    /// complete line's cursor: nothing is skipped or repeated.
    #[oai(status = 200)]
    Ok(
        Ndjson,
        /// Receive time (RFC 3339) up to which this response is complete.
        #[oai(header = "X-Export-Until")]
        String,
    ),
    /// The request is not valid; `field` names the parameter.
    #[oai(status = 400)]
    BadRequest(Json<QueryErrorBody>),
    /// A guard stopped the query (`query_memory_limit`, `query_timeout`).
    #[oai(status = 422)]
    TooExpensive(Json<QueryErrorBody>),
    /// ClickHouse is unreachable or overloaded, or did not answer within the time limit and
    /// 5 s (`clickhouse_unavailable`); retry later.
    #[oai(status = 503)]
    Unavailable(Json<QueryErrorBody>, #[oai(header = "Retry-After")] u32),
    /// An unexpected failure; the service log has the cause.
    #[oai(status = 500)]
    Internal(Json<QueryErrorBody>),
}

fn export_bad_request(err: poem::Error) -> ExportResponse {
    ExportResponse::BadRequest(Json(parse_error_body(&err)))
}

impl From<AnalyticsError> for ExportResponse {
    fn from(err: AnalyticsError) -> Self {
        let (kind, body) = error_body(err);
        let body = Json(body);
        match kind {
            // The export takes no body, so never a 413 or 415.
            ErrorKind::BadRequest
            | ErrorKind::NotFound
            | ErrorKind::PayloadTooLarge
            | ErrorKind::UnsupportedMediaType => ExportResponse::BadRequest(body),
            ErrorKind::TooExpensive => ExportResponse::TooExpensive(body),
            ErrorKind::Unavailable => ExportResponse::Unavailable(body, RETRY_AFTER_SECS),
            ErrorKind::Internal => ExportResponse::Internal(body),
        }
    }
}

/// Page sizes of `GET /v1/events`.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
/// Lines per export response.
const DEFAULT_EXPORT: u64 = 100_000;
const MAX_EXPORT: u64 = 1_000_000;
/// Export lines are sent in chunks of about this many bytes.
const CHUNK_BYTES: usize = 64 * 1024;

pub struct RawEventsApi {
    pub analytics: Analytics,
}

#[OpenApi]
impl RawEventsApi {
    /// List events
    ///
    /// Events newest received first, with the stats filters, one page at a time. Pages are
    /// keyset-paginated on the receive time and the event's identity (id, type, campaign,
    /// hour): events arriving while you page appear above the first page and never shift or
    /// repeat later pages.
    #[oai(path = "/v1/events", method = "get", tag = "ApiTags::Events")]
    #[tracing::instrument(skip_all, name = "events.list")]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: ApiKey,
        /// Only events whose corrected event time is at or after this (RFC 3339).
        from: Query<Option<DateTime<FixedOffset>>>,
        /// Only events whose corrected event time is before this (RFC 3339).
        to: Query<Option<DateTime<FixedOffset>>>,
        /// Repeatable filter, as in `GET /v1/stats/summary`.
        filter: Query<Option<Vec<String>>>,
        /// Events per page (default 100, at most 1000).
        limit: Query<Option<u32>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Answer<EventPage, ByParams> {
        let run = async {
            let filters = parse_filters(&filter.0.unwrap_or_default())?;
            let limit = page_size(limit.0)?;
            let after = cursor
                .0
                .as_deref()
                .map(|c| Cursor::decode(c, "cursor"))
                .transpose()?;
            let sql = raw::page(
                auth.tenant(),
                bounds(from.0, to.0)?,
                &filters,
                after,
                u64::from(limit) + 1,
            );
            let analytics = &self.analytics;
            let read = analytics.statement(&sql).fetch_all::<EventRow>();
            let mut rows = analytics
                .answer(analytics.settings().max_execution_ms, read)
                .await?;
            let more = rows.len() > limit as usize;
            rows.truncate(limit as usize);
            let events: Vec<StoredEvent> = rows.into_iter().map(StoredEvent::from).collect();
            Ok::<_, AnalyticsError>(EventPage {
                next_cursor: more
                    .then(|| events.last().map(|e| e.cursor.clone()))
                    .flatten(),
                events,
            })
        };
        respond(run.await)
    }

    /// Export events
    ///
    /// Streams events as NDJSON, oldest received first, for a consumer that must read
    /// everything exactly once in order of receipt. Each line carries the `cursor` to resume
    /// after it; repeat with the last cursor until a response has fewer lines than `limit`.
    /// A re-sent event (same `event_id`) that arrives after its first copy was exported is
    /// served again at its new receive time, so consumers should keep `event_id` idempotent.
    #[oai(path = "/v1/events/export", method = "get", tag = "ApiTags::Events")]
    #[tracing::instrument(skip_all, name = "events.export")]
    #[allow(clippy::too_many_arguments)]
    async fn export(
        &self,
        req: &Request,
        auth: ApiKey,
        /// Only events whose corrected event time is at or after this (RFC 3339).
        from: Query<Option<DateTime<FixedOffset>>>,
        /// Only events whose corrected event time is before this (RFC 3339).
        to: Query<Option<DateTime<FixedOffset>>>,
        /// Repeatable filter, as in `GET /v1/stats/summary`.
        filter: Query<Option<Vec<String>>>,
        /// The `cursor` of the last line read; omit to start at the beginning.
        cursor: Query<Option<String>>,
        /// Most lines in this response (default 100000, at most 1000000).
        limit: Query<Option<u64>>,
    ) -> ExportResponse {
        let run = async {
            let filters = parse_filters(&filter.0.unwrap_or_default())?;
            let limit = limit.0.unwrap_or(DEFAULT_EXPORT);
            if !(1..=MAX_EXPORT).contains(&limit) {
                return Err(InvalidInput::new(
                    "invalid_limit",
                    "limit",
                    format!("limit must be 1-{MAX_EXPORT}"),
                )
                .with_limit(MAX_EXPORT)
                .into());
            }
            let after = cursor
                .0
                .as_deref()
                .map(|c| Cursor::decode(c, "cursor"))
                .transpose()?;
            let settings = self.analytics.settings();
            let until_ms = Utc::now().timestamp_millis() - settings.export_settle_ms as i64;
            let sql = raw::export(
                auth.tenant(),
                bounds(from.0, to.0)?,
                &filters,
                after,
                until_ms,
                limit,
            );
            let mut rows = self
                .analytics
                .read(&sql, settings.export_max_execution_ms)
                .with_setting(
                    "max_bytes_before_external_sort",
                    (settings.max_memory_bytes / 2).to_string(),
                )
                .fetch::<EventRow>()
                .map_err(|e| self.analytics.error(e))?;
            // The first row is read before answering, so that a query ClickHouse refuses
            // gets a proper status instead of a broken stream.
            let deadline =
                tokio::time::Instant::now() + answer_limit(settings.export_max_execution_ms);
            let first = self
                .analytics
                .answer(settings.export_max_execution_ms, rows.next())
                .await?;
            let until = DateTime::from_timestamp_millis(until_ms).unwrap_or_default();
            let body = stream(req, rows, first, deadline);
            Ok::<_, AnalyticsError>((body, until.to_rfc3339()))
        };
        match run.await {
            Ok((body, until)) => ExportResponse::Ok(Ndjson(body), until),
            Err(e) => e.into(),
        }
    }

    /// Get an event
    ///
    /// One event by its `event_id`.
    #[oai(path = "/v1/events/:event_id", method = "get", tag = "ApiTags::Events")]
    #[tracing::instrument(skip_all, name = "events.get")]
    async fn get(&self, auth: ApiKey, event_id: Path<String>) -> Answer<StoredEvent, ById> {
        let run = async {
            let id = Uuid::try_parse(&event_id.0).map_err(|_| {
                InvalidInput::new("invalid_event_id", "event_id", "event_id must be a UUID")
            })?;
            let analytics = &self.analytics;
            let read = analytics
                .statement(&raw::get(auth.tenant(), &id))
                .fetch_optional::<EventRow>();
            let row = analytics
                .answer(analytics.settings().max_execution_ms, read)
                .await?;
            row.map(StoredEvent::from).ok_or(AnalyticsError::NotFound)
        };
        respond(run.await)
    }
}

fn page_size(limit: Option<u32>) -> Result<u32, InvalidInput> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(InvalidInput::new(
            "invalid_limit",
            "limit",
            format!("limit must be 1-{MAX_PAGE}"),
        )
        .with_limit(u64::from(MAX_PAGE)))
    }
}

fn bounds(
    from: Option<DateTime<FixedOffset>>,
    to: Option<DateTime<FixedOffset>>,
) -> Result<Bounds, InvalidInput> {
    if let (Some(f), Some(t)) = (from, to) {
        if t <= f {
            return Err(InvalidInput::new(
                "invalid_time_range",
                "to",
                "`to` must be later than `from`",
            ));
        }
    }
    Ok(Bounds {
        from: from.map(|t| t.to_utc()),
        to: to.map(|t| t.to_utc()),
    })
}

/// `first`, then the rest of the rows, as NDJSON chunks read from ClickHouse as the client
/// of `req` reads: at most one chunk is held in memory. An error mid-stream, or rows still
/// coming at `deadline`, cut the connection off (the client sees a broken transfer, not a
/// clean end, and resumes from its last complete line's cursor).
fn stream(
    req: &Request,
    rows: clickhouse::query::RowCursor<EventRow>,
    first: Option<EventRow>,
    deadline: tokio::time::Instant,
) -> Body {
    struct State {
        rows: clickhouse::query::RowCursor<EventRow>,
        pending: Option<EventRow>,
        done: bool,
    }
    let state = State {
        done: first.is_none(),
        rows,
        pending: first,
    };
    let chunks = futures_util::stream::try_unfold(state, move |mut st| async move {
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 1024);
        if let Some(row) = st.pending.take() {
            line(&mut buf, row)?;
        }
        while !st.done && buf.len() < CHUNK_BYTES {
            let next = tokio::time::timeout_at(deadline, st.rows.next()).await;
            match next.unwrap_or(Err(clickhouse::error::Error::TimedOut)) {
                Ok(Some(row)) => line(&mut buf, row)?,
                Ok(None) => st.done = true,
                Err(e) => {
                    tracing::warn!(error = %e, "export stream failed");
                    return Err(std::io::Error::other(e));
                }
            }
        }
        if buf.is_empty() {
            return Ok(None);
        }
        Ok(Some((Bytes::from(buf), st)))
    });
    crate::serve::streamed_body(req, chunks)
}

fn line(buf: &mut Vec<u8>, row: EventRow) -> std::io::Result<()> {
    serde_json::to_writer(&mut *buf, &StoredEvent::from(row))?;
    buf.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_lines_have_the_documented_fields() {
        let mut registry = Registry::new();
        StoredEvent::register(&mut registry);
        let mut documented: Vec<&str> = registry.schemas["StoredEvent"]
            .properties
            .iter()
            .map(|(name, _)| *name)
            .collect();
        documented.sort_unstable();
        let event = StoredEvent {
            event_id: Uuid::nil(),
            event_type: "click".into(),
            timestamp: Utc::now(),
            event_time: Utc::now(),
            sent_at: Some(Utc::now()),
            received_at: Utc::now(),
            campaign_id: "c".into(),
            ad_id: "a".into(),
            publisher_id: "p".into(),
            advertiser_id: Some("x".into()),
            user_id: Some("u".into()),
            country: Some("US".into()),
            device: Some("mobile".into()),
            os: Some("iOS".into()),
            browser: Some("Safari".into()),
            cost_micros: 1,
            revenue_micros: 2,
            attributes: BTreeMap::new(),
            cursor: "1_0".into(),
        };
        let serde_json::Value::Object(line) = serde_json::to_value(&event).unwrap() else {
            panic!("an object");
        };
        let mut written: Vec<&str> = line.keys().map(String::as_str).collect();
        written.sort_unstable();
        assert_eq!(documented, written);
        // Both writers agree on the text of times.
        let poem = poem_openapi::types::ToJSON::to_json(&event).unwrap();
        assert_eq!(poem["timestamp"], line["timestamp"]);
        assert_eq!(poem["event_id"], line["event_id"]);
    }
}
