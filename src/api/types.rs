//! Request and response shapes as they appear in the OpenAPI document.
//!
//! `EventDoc` documents the wire event; parsing uses `domain::WireEvent` (faster, borrows from
//! the body). A unit test keeps the two field lists identical.

use std::collections::HashMap;

use poem::{http::StatusCode, IntoResponse, Response};
use poem_openapi::{
    payload::Json,
    registry::{MetaSchema, MetaSchemaRef, Registry},
    types::Type,
    Enum, Object,
};

/// Seconds a client should wait before retrying when the service or ClickHouse cannot answer
/// now (every 503's `Retry-After`).
pub const RETRY_AFTER_SECS: u32 = 5;

/// What a time the API reads must be, for messages about one that does not parse.
pub const DATE_TIME_EXPECTED: &str =
    "must be an RFC 3339 date-time with a zone, e.g. 2026-01-31T00:00:00Z";
/// What a `u32` the API reads must be (limits, rate limits).
pub const U32_EXPECTED: &str = "a whole number from 0 to 4294967295";

#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "lowercase")]
pub enum EventTypeDoc {
    Impression,
    Click,
    Conversion,
}

#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "lowercase")]
pub enum DeviceDoc {
    Desktop,
    Mobile,
    Tablet,
    Ctv,
    Other,
}

/// An ad event: a JSON object of at most 16 KB as sent (`ADTRACK_MAX_EVENT_BYTES`; whitespace
/// and escapes count). Unknown fields are rejected (put custom data in `attributes`); a field
/// given twice, or an attribute key given twice, is an error.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Event", deny_unknown_fields)]
pub struct EventDoc {
    /// Unique id of the event, chosen by the client: the idempotency key, together with
    /// `event_type`, `campaign_id` and the hour of `timestamp`. Re-sending an event (a copy
    /// that agrees on these) never counts it twice; the copy received last is kept.
    pub event_id: uuid::Uuid,
    pub event_type: EventTypeDoc,
    /// When the event happened, by the client's clock (RFC 3339 with a zone). At most 5
    /// minutes in the future and not older than the retention (30 days by default), after
    /// clock-skew correction.
    pub timestamp: chrono::DateTime<chrono::Utc>,
    /// When the client sent the request, by its own clock. If given, the event time is
    /// corrected by the client's clock offset (server receive time − `sent_at`).
    pub sent_at: Option<chrono::DateTime<chrono::Utc>>,
    /// 1–64 characters of `A-Z a-z 0-9 _ . : -`.
    #[oai(validator(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub campaign_id: String,
    /// 1–64 characters of `A-Z a-z 0-9 _ . : -`.
    #[oai(validator(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub ad_id: String,
    /// 1–64 characters of `A-Z a-z 0-9 _ . : -`.
    #[oai(validator(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub publisher_id: String,
    /// 1–64 characters of `A-Z a-z 0-9 _ . : -`.
    #[oai(validator(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub advertiser_id: Option<String>,
    /// The end user, as the client identifies them (1–128 characters).
    #[oai(validator(min_length = 1, max_length = 128))]
    pub user_id: Option<String>,
    /// ISO 3166-1 alpha-2 country code, upper case.
    #[oai(validator(pattern = "^[A-Z]{2}$"))]
    pub country: Option<String>,
    pub device: Option<DeviceDoc>,
    #[oai(validator(max_length = 32))]
    pub os: Option<String>,
    #[oai(validator(max_length = 32))]
    pub browser: Option<String>,
    /// Cost in micro-units of currency (1 USD = 1,000,000); at most one million units of
    /// currency per event, so that sums stay exact.
    #[oai(validator(maximum(value = "1000000000000")))]
    pub cost_micros: Option<u64>,
    /// Revenue in micro-units of currency; the same limit.
    #[oai(validator(maximum(value = "1000000000000")))]
    pub revenue_micros: Option<u64>,
    /// Free-form string pairs: at most 32 keys, keys 1–64 characters, values at most 256.
    #[oai(validator(max_properties = 32))]
    pub attributes: Option<HashMap<String, String>>,
}

/// The JSON body of `POST /v1/events`: one event, or an array of events. Written out by hand:
/// a derived union would be typed `object`, which no array matches.
pub struct EventOrBatchDoc;

impl EventOrBatchDoc {
    const NAME: &'static str = "EventOrBatch";

    pub fn register(registry: &mut Registry) {
        EventDoc::register(registry);
        registry.create_schema::<Self, _>(Self::NAME.into(), |_| MetaSchema {
            description: Some("One event, or an array of events."),
            any_of: vec![
                EventDoc::schema_ref(),
                MetaSchemaRef::Inline(Box::new(MetaSchema {
                    items: Some(Box::new(EventDoc::schema_ref())),
                    ..MetaSchema::new("array")
                })),
            ],
            ..MetaSchema::ANY
        });
    }

    pub fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Reference(Self::NAME.into())
    }
}

/// What is wrong with one field.
#[derive(Debug, Clone, Object)]
pub struct FieldErrorBody {
    /// The field's wire name (`attributes` for attribute problems); empty for the event as a
    /// whole (not JSON, not an object, too large).
    pub field: String,
    pub message: String,
}

/// An event of the request that was not accepted.
#[derive(Debug, Clone, Object)]
pub struct RejectedEvent {
    /// Position of the event in the request (0-based; for NDJSON, among non-blank lines).
    pub index: u32,
    /// The event's id, when it had a readable one.
    #[oai(skip_serializing_if_is_none)]
    pub event_id: Option<String>,
    pub errors: Vec<FieldErrorBody>,
}

/// The result of an ingest request: how many events were accepted, and why the others were not.
#[derive(Debug, Clone, Object)]
pub struct IngestResult {
    /// Events accepted. With 202 they are durable on the service's disk and reach ClickHouse
    /// within about a second; with 200 (`wait=true`) they are committed in ClickHouse.
    pub accepted: u32,
    pub rejected: Vec<RejectedEvent>,
}

/// An accepted event ClickHouse refused.
#[derive(Debug, Clone, Object)]
pub struct RefusedEvent {
    /// Position of the event in the request (0-based; for NDJSON, among non-blank lines).
    pub index: u32,
    pub event_id: String,
}

/// The answer when ClickHouse refused some accepted events (`wait=true` only).
#[derive(Debug, Clone, Object)]
pub struct RefusedResult {
    /// `refused_by_clickhouse`.
    pub error: String,
    pub message: String,
    /// Events accepted: the refused ones included, the others committed.
    pub accepted: u32,
    /// Events not accepted, as in a 202.
    pub rejected: Vec<RejectedEvent>,
    /// The accepted events ClickHouse refused, in the request's order.
    pub refused: Vec<RefusedEvent>,
}

/// An error about the request as a whole.
#[derive(Debug, Clone, Object)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `malformed_json`, `payload_too_large`.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
    /// For `malformed_json`: 1-based line of the problem.
    #[oai(skip_serializing_if_is_none)]
    pub line: Option<u32>,
    /// For `malformed_json`: 1-based column of the problem.
    #[oai(skip_serializing_if_is_none)]
    pub column: Option<u32>,
    /// For limits: the limit that was exceeded.
    #[oai(skip_serializing_if_is_none)]
    pub limit: Option<u64>,
    /// For `invalid_parameter`: the query parameter at fault.
    #[oai(skip_serializing_if_is_none)]
    pub field: Option<String>,
}

impl ErrorBody {
    pub fn new(error: &str, message: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            message: message.into(),
            line: None,
            column: None,
            limit: None,
            field: None,
        }
    }

    /// This body as a JSON response with `status` (for answers outside a typed operation).
    pub fn with_status(self, status: StatusCode) -> Response {
        let mut resp = Json(self).into_response();
        resp.set_status(status);
        resp
    }

    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit as u64);
        self
    }
}

#[derive(Debug, Clone, Object)]
pub struct HealthBody {
    /// `ok`, or `unavailable`.
    pub status: String,
    /// What is not ready, when something is not.
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use poem_openapi::types::Type;

    #[test]
    fn the_documented_event_has_the_parsed_fields() {
        let mut registry = poem_openapi::registry::Registry::new();
        EventDoc::register(&mut registry);
        let schema = &registry.schemas["Event"];
        let mut documented: Vec<&str> = schema.properties.iter().map(|(name, _)| *name).collect();
        documented.sort_unstable();
        let mut encoded: Vec<&str> = crate::clickhouse::rowbinary::COLUMNS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !["tenant", "event_time", "received_at"].contains(name))
            .collect();
        encoded.sort_unstable();
        assert_eq!(documented, encoded);
    }
}
