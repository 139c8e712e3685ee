//! `POST /v1/events`: thin handler over `ingest::Ingest`.

use std::{
    collections::HashSet,
    sync::{atomic::Ordering, Arc},
};

use poem::{endpoint::BoxEndpoint, http::Method, web::Data, Endpoint, IntoResponse, Request};
use poem_openapi::{param::Query, payload::Json, ApiResponse, OpenApi};

use super::{
    body::{self, EventsBody, ReadError, JSON, NDJSON},
    guard::ApiKey,
    types::{
        ErrorBody, FieldErrorBody, IngestResult, RefusedEvent, RefusedResult, RejectedEvent,
        RETRY_AFTER_SECS,
    },
    ApiTags,
};
use crate::{
    auth::{rate_limit::Exceeded, Principal},
    ingest::{AppendError, BodyError, Ingest, IngestError, Outcome, RefusedRows},
    usage::RequestUsage,
};

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_parameter")]
pub enum IngestResponse {
    /// Every accepted event is committed in ClickHouse (only with `wait=true`).
    #[oai(status = 200)]
    Committed(Json<IngestResult>),
    /// Accepted events are durable on the service's disk (write-ahead log, fsynced) and reach
    /// ClickHouse within about a second (should ClickHouse refuse a row, it goes to the
    /// service's dead-letter file and `adtrack_dead_lettered_events_total`). `rejected` lists
    /// the events that were not accepted; the others went in. With `wait=true`, 202 means the
    /// events could not be confirmed in ClickHouse within the wait: they are safe all the same.
    #[oai(status = 202)]
    Accepted(Json<IngestResult>),
    /// The body cannot be read as events: malformed JSON (`line`/`column` say where), not an
    /// object or array, empty, not UTF-8, or broken gzip; or a query parameter is not valid
    /// (`invalid_parameter`, `field` names it; e.g. `wait` must be `true` or `false`, given
    /// once) or not one this endpoint takes (`unknown_parameter`). Nothing was accepted.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// Body (after decompression) or event count over the limit (`limit`).
    #[oai(status = 413)]
    TooLarge(Json<ErrorBody>),
    /// `Content-Type` is not `application/json` or `application/x-ndjson`, or the
    /// `Content-Encoding` is not `gzip`/`identity`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// No event of the request was valid; `rejected` says why for each one.
    #[oai(status = 422)]
    Invalid(Json<IngestResult>),
    /// The key is over a rate limit (`rate_limited`): its requests per second on this
    /// instance, or its events per second (each valid event takes one token); the
    /// `X-RateLimit-*` headers describe the limit that refused. Nothing from this request was
    /// accepted; retry after `Retry-After` seconds.
    #[oai(status = 429)]
    EventsRateLimited(
        Json<ErrorBody>,
        #[oai(header = "Retry-After")] u64,
        #[oai(header = "X-RateLimit-Limit")] u32,
        #[oai(header = "X-RateLimit-Remaining")] u64,
        #[oai(header = "X-RateLimit-Reset")] u64,
    ),
    /// The service cannot make events durable now (write-ahead log over its disk budget while
    /// ClickHouse is unreachable, or a disk error). Nothing from this request was accepted;
    /// retry after `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
    /// Only with `wait=true`: ClickHouse refused some of the accepted events (`refused_by_clickhouse`;
    /// for example a constraint an operator added to the table). `refused` lists them (index in
    /// the request, event id): they are in the service's dead-letter file for an operator, not
    /// in the table; the other accepted events are committed. Re-sending the request is safe
    /// (committed events are not counted twice), but the refused events would be refused again.
    #[oai(status = 500)]
    Refused(Json<RefusedResult>),
}

pub struct EventsApi {
    pub ingest: Ingest,
}

#[OpenApi]
impl EventsApi {
    /// Ingest events
    ///
    /// Accepts one event, a JSON array of events, or NDJSON. Valid events are accepted even
    /// when others in the same request are not (partial success). Re-sending an event with
    /// the same `event_id` is safe: it is never counted twice.
    #[oai(path = "/v1/events", method = "post", tag = "ApiTags::Ingest")]
    async fn post_events(
        &self,
        auth: ApiKey,
        body: EventsBody,
        /// Answer only after the events are committed in ClickHouse (200), instead of once
        /// they are durable on the service's disk (202).
        wait: Query<Option<bool>>,
        usage: Data<&Arc<RequestUsage>>,
    ) -> IngestResponse {
        self.handle(&auth.0, body, wait.0.unwrap_or(false), &usage)
            .await
    }
}

/// `POST /v1/events`, served in front of the router and the OpenAPI service.
///
/// The router and the OpenAPI service take every request through several boxed layers (each
/// a heap copy of the request's future) and parse its query string into a map before a
/// handler runs; for single-event requests that was a quarter or more of the service's CPU (two
/// A/B steps in BENCHMARKS.md). Requests of the common shape — a `POST` with no query or just
/// `wait=true|false`, from a caller the guard let through — call the same
/// [`EventsApi::handle`] directly. Every other `POST` to this path (other query strings, no
/// caller) goes to `documented`, the OpenAPI service, so it is answered exactly as the
/// document says (an unparsable `wait`).
pub struct DirectIngest {
    api: EventsApi,
    documented: Arc<BoxEndpoint<'static>>,
}

impl DirectIngest {
    pub fn new(ingest: Ingest, documented: Arc<BoxEndpoint<'static>>) -> Self {
        Self {
            api: EventsApi { ingest },
            documented,
        }
    }
}

impl Endpoint for DirectIngest {
    type Output = poem::Response;

    async fn call(&self, req: Request) -> poem::Result<poem::Response> {
        let wait = match req.uri().query() {
            None | Some("") | Some("wait=false") => Some(false),
            Some("wait=true") => Some(true),
            Some(_) => None,
        };
        let principal = req.extensions().get::<Principal>().cloned();
        let (Some(wait), Some(caller), &Method::POST) = (wait, principal, req.method()) else {
            return self.documented.call(req).await;
        };
        let usage = req
            .extensions()
            .get::<Arc<RequestUsage>>()
            .cloned()
            .unwrap_or_default();
        let (req, mut body) = req.split();
        let body = body::events_body(&req, &mut body).await;
        Ok(self
            .api
            .handle(&caller, body, wait, &usage)
            .await
            .into_response())
    }
}

impl EventsApi {
    async fn handle(
        &self,
        caller: &Principal,
        body: EventsBody,
        wait: bool,
        usage: &RequestUsage,
    ) -> IngestResponse {
        let Principal::Key(key) = caller else {
            unreachable!("the guard lets only tenant keys with the ingest scope through");
        };
        let (text, format) = match body.0 {
            Ok(body) => body,
            Err(err) => return read_error(err),
        };
        let ingested = self
            .ingest
            .ingest(
                &key.key.tenant,
                text,
                format,
                wait,
                Some(&key.limiter.events),
            )
            .await;
        match ingested {
            Ok(outcome) => {
                usage
                    .events_accepted
                    .store(outcome.accepted as u32, Ordering::Relaxed);
                usage
                    .events_rejected
                    .store(outcome.rejected.len() as u32, Ordering::Relaxed);
                outcome_response(outcome, wait)
            }
            Err(IngestError::Body(err)) => body_error(err),
            Err(IngestError::Log(err)) => log_error(&self.ingest, err),
            Err(IngestError::RateLimited(over)) => events_rate_limited(over),
        }
    }
}

/// A query parameter poem-openapi could not parse: the same JSON error body as every other 400.
fn bad_parameter(err: poem::Error) -> IngestResponse {
    let parsed = super::stats::parse_error_body(&err);
    let mut body = ErrorBody::new(&parsed.error, parsed.message);
    body.field = parsed.field;
    IngestResponse::BadRequest(Json(body))
}

fn events_rate_limited(over: Exceeded) -> IngestResponse {
    IngestResponse::EventsRateLimited(
        Json(ErrorBody::new(
            "rate_limited",
            format!(
                "this API key is over its events rate limit ({}/s); nothing from this request was accepted, retry after {} s",
                over.quota.limit, over.retry_after_secs
            ),
        )),
        over.retry_after_secs,
        over.quota.limit,
        over.quota.remaining,
        over.quota.reset_secs,
    )
}

fn outcome_response(outcome: Outcome, wait: bool) -> IngestResponse {
    let result = IngestResult {
        accepted: outcome.accepted as u32,
        rejected: outcome
            .rejected
            .into_iter()
            .map(|r| RejectedEvent {
                index: r.index as u32,
                event_id: r.event_id,
                errors: r
                    .errors
                    .into_iter()
                    .map(|e| FieldErrorBody {
                        field: e.field,
                        message: e.message,
                    })
                    .collect(),
            })
            .collect(),
    };
    if outcome.accepted == 0 {
        IngestResponse::Invalid(Json(result))
    } else if !outcome.refused.is_empty() {
        IngestResponse::Refused(Json(refused_result(result, &outcome.refused)))
    } else if wait && outcome.committed {
        IngestResponse::Committed(Json(result))
    } else {
        IngestResponse::Accepted(Json(result))
    }
}

/// The answer naming the accepted events ClickHouse refused: their rows are numbered among the
/// accepted events, which are the request's events less the rejected ones, in order.
fn refused_result(result: IngestResult, refused: &[RefusedRows]) -> RefusedResult {
    let count: u32 = refused.iter().map(|r| r.count).sum();
    let rejected: HashSet<u32> = result.rejected.iter().map(|r| r.index).collect();
    let mut accepted_indexes = (0..).filter(|i| !rejected.contains(i));
    let mut rows: Vec<(u32, &str)> = refused
        .iter()
        .filter_map(|r| r.row.as_ref().map(|(row, id)| (*row, id.as_str())))
        .collect();
    rows.sort_unstable();
    let mut next = 0;
    let events = rows
        .into_iter()
        .filter_map(|(row, id)| {
            let index = accepted_indexes.nth(row.checked_sub(next)? as usize)?;
            next = row + 1;
            Some(RefusedEvent {
                index,
                event_id: id.to_owned(),
            })
        })
        .collect();
    RefusedResult {
        error: "refused_by_clickhouse".into(),
        message: format!(
            "ClickHouse refused {count} of the {} accepted events (listed in `refused`); they are kept in the service's dead-letter file, not in the table, and the others are committed",
            result.accepted
        ),
        accepted: result.accepted,
        rejected: result.rejected,
        refused: events,
    }
}

fn read_error(err: ReadError) -> IngestResponse {
    match err {
        ReadError::UnsupportedMediaType(ct) => {
            let found = if ct.is_empty() {
                "no Content-Type".to_string()
            } else {
                format!("Content-Type {ct:?}")
            };
            IngestResponse::UnsupportedMediaType(Json(ErrorBody::new(
                "unsupported_media_type",
                format!("{found}; send {JSON} (an event or an array of events) or {NDJSON}"),
            )))
        }
        ReadError::UnsupportedEncoding(enc) => {
            IngestResponse::UnsupportedMediaType(Json(ErrorBody::new(
                "unsupported_content_encoding",
                format!("Content-Encoding {enc:?} is not supported; use gzip or none"),
            )))
        }
        ReadError::TooLarge { limit } => IngestResponse::TooLarge(Json(
            ErrorBody::new(
                "payload_too_large",
                format!("the body is larger than {limit} bytes (after decompression)"),
            )
            .with_limit(limit),
        )),
        ReadError::BadGzip(e) => IngestResponse::BadRequest(Json(ErrorBody::new(
            "bad_gzip",
            format!("the body is not valid gzip: {e}"),
        ))),
        ReadError::NotUtf8 { offset } => IngestResponse::BadRequest(Json(ErrorBody::new(
            "not_utf8",
            format!("the body is not UTF-8 (invalid byte at offset {offset})"),
        ))),
        ReadError::Io(e) => IngestResponse::BadRequest(Json(ErrorBody::new(
            "body_read_failed",
            format!("the body could not be read: {e}"),
        ))),
    }
}

fn body_error(err: BodyError) -> IngestResponse {
    match err {
        BodyError::Malformed {
            message,
            line,
            column,
        } => {
            let mut body = ErrorBody::new(
                "malformed_json",
                format!("malformed JSON at line {line}, column {column}: {message}"),
            );
            body.line = Some(line as u32);
            body.column = Some(column as u32);
            IngestResponse::BadRequest(Json(body))
        }
        BodyError::NotAnEventOrArray => IngestResponse::BadRequest(Json(ErrorBody::new(
            "not_an_event_or_array",
            "the body must be an event object or an array of event objects",
        ))),
        BodyError::Empty => {
            IngestResponse::BadRequest(Json(ErrorBody::new("empty", "the body contains no events")))
        }
        BodyError::TooManyEvents { count, limit } => IngestResponse::TooLarge(Json(
            ErrorBody::new(
                "too_many_events",
                format!("the request has {count} events; at most {limit} allowed"),
            )
            .with_limit(limit),
        )),
    }
}

fn log_error(ingest: &Ingest, err: AppendError) -> IngestResponse {
    let body = match err {
        AppendError::Full => {
            ingest
                .metrics
                .requests_rejected_budget
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ErrorBody::new(
                "backlog_full",
                "ClickHouse is not keeping up and the local backlog is full; nothing from this request was accepted, retry later",
            )
        }
        AppendError::Closed => ErrorBody::new(
            "shutting_down",
            "the service is shutting down; nothing from this request was accepted, retry",
        ),
        AppendError::Io(e) => {
            tracing::error!(error = %e, "request refused: write-ahead log error");
            ErrorBody::new(
                "storage_unavailable",
                "events could not be stored durably; nothing from this request was accepted, retry",
            )
        }
    };
    IngestResponse::Unavailable(Json(body), RETRY_AFTER_SECS)
}
