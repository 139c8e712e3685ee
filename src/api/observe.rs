//! Around every request: the request id (`X-Request-Id`, taken from the client or nginx when
//! present, generated otherwise, always returned), the guard (API key, scope, rate limit), the
//! latency histogram by route, and the request's row in the usage log.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body as _, Frame};
use http_body_util::combinators::BoxBody;
use poem::{
    error::{MethodNotAllowedError, NotFoundError},
    http::{header, Method, StatusCode},
    Body, Endpoint, IntoResponse, Request, Response, Result,
};

use super::{
    cors::{self, CorsOrigins},
    guard,
    types::ErrorBody,
};
use crate::{
    auth::{Auth, Principal},
    metrics::Metrics,
    usage::{RequestUsage, UsageLog, UsageRow},
};

pub const REQUEST_ID: &str = "x-request-id";

/// The id of the request being served, for handlers and logs.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What the layer around the routes needs.
#[derive(Clone)]
pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Auth>,
    pub usage: Arc<UsageLog>,
    pub cors: Arc<CorsOrigins>,
    /// Filled in by [`super::routes`] from the OpenAPI document.
    pub params: KnownParams,
}

/// The operations of the OpenAPI document (route template → method → query parameter names):
/// a `/v1` query parameter the operation does not take is refused before a handler runs,
/// instead of being ignored (a mistyped `wait` would silently drop the wait), and a 405 says
/// which methods the path takes.
#[derive(Clone, Default)]
pub struct KnownParams(Arc<HashMap<String, HashMap<Method, Vec<String>>>>);

impl KnownParams {
    pub fn from_document(spec: &serde_json::Value) -> Self {
        let mut known: HashMap<String, HashMap<Method, Vec<String>>> = HashMap::new();
        let paths = spec["paths"].as_object().into_iter().flatten();
        for (path, operations) in paths {
            for (method, operation) in operations.as_object().into_iter().flatten() {
                let Ok(method) = Method::from_bytes(method.to_uppercase().as_bytes()) else {
                    continue;
                };
                let names = operation["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "query")
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect();
                known.entry(path.clone()).or_default().insert(method, names);
            }
        }
        Self(Arc::new(known))
    }

    fn of(&self, method: &Method, route: &str) -> Option<&[String]> {
        self.0.get(route)?.get(method).map(Vec::as_slice)
    }

    /// The methods `route` takes, for an `Allow` header: `GET, POST`.
    fn methods(&self, route: &str) -> Option<String> {
        let mut methods: Vec<&str> = self.0.get(route)?.keys().map(Method::as_str).collect();
        methods.sort_unstable();
        Some(methods.join(", "))
    }
}

/// Routes with a fixed path, reported as themselves; others by their template.
const STATIC_ROUTES: &[&str] = &[
    "/v1/events",
    "/v1/admin/tenants",
    "/v1/admin/keys",
    "/v1/admin/usage",
    "/v1/admin/usage/hourly",
    "/v1/events/export",
    "/v1/query",
    "/v1/stats/summary",
    "/v1/stats/timeseries",
    "/v1/stats/breakdown",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/openapi.json",
];

/// The route template of a path: a bounded set of label values, whatever clients send.
pub fn route_of(path: &str) -> &'static str {
    if let Some(route) = STATIC_ROUTES.iter().find(|r| **r == path) {
        return route;
    }
    if path.starts_with("/v1/events/") && path.matches('/').count() == 3 {
        return "/v1/events/{event_id}";
    }
    if path.starts_with("/v1/admin/keys/") && path.matches('/').count() == 4 {
        return "/v1/admin/keys/{key_id}";
    }
    if path.starts_with("/v1/users/") && path.ends_with("/events") && path.matches('/').count() == 4
    {
        return "/v1/users/{user_id}/events";
    }
    if path == "/docs" || path.starts_with("/docs/") {
        return "/docs";
    }
    "other"
}

/// A client-supplied id is kept when it is short and plain; anything else is replaced.
fn usable(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// `E` with this layer around it.
pub struct Observed<E> {
    pub inner: E,
    pub observer: Observer,
}

impl<E: Endpoint> Endpoint for Observed<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Response> {
        observe(&self.inner, req, &self.observer).await
    }
}

/// The query parameters of `/v1` that may be given more than once.
const REPEATABLE: [&str; 2] = ["metrics", "filter"];

/// A `/v1` query parameter the operation does not take, or one given twice (other than the
/// [`REPEATABLE`] ones: the framework would take the first value and drop the rest unseen),
/// is a 400 naming it.
fn query_refusal(req: &Request, route: &str, known: &KnownParams) -> Option<Response> {
    req.uri().query().filter(|q| !q.is_empty())?;
    if !guard::is_api(req.uri().path()) {
        return None;
    }
    let known = known.of(req.method(), route)?;
    let pairs: Vec<(String, String)> = req.params().ok()?;
    let refusal = |code: &str, name: &str, message: String| {
        let mut body = ErrorBody::new(code, message);
        body.field = Some(name.to_owned());
        Some(body.with_status(StatusCode::BAD_REQUEST))
    };
    if let Some((name, _)) = pairs.iter().find(|(name, _)| !known.contains(name)) {
        let takes = match known.is_empty() {
            true => "no query parameters".to_owned(),
            false => known.join(", "),
        };
        return refusal(
            "unknown_parameter",
            name,
            format!("unknown query parameter {name:?}; this endpoint takes {takes}"),
        );
    }
    let mut seen = HashSet::new();
    let (name, _) = pairs
        .iter()
        .find(|(name, _)| !REPEATABLE.contains(&name.as_str()) && !seen.insert(name))?;
    refusal(
        "invalid_parameter",
        name,
        format!("`{name}` is given more than once; give it once"),
    )
}

async fn observe<E: Endpoint>(ep: &E, mut req: Request, observer: &Observer) -> Result<Response> {
    let arrived = chrono::Utc::now();
    let started = Instant::now();
    let seq = observer.usage.next_seq();
    let id = match req.header(REQUEST_ID) {
        Some(id) if usable(id) => id.to_string(),
        _ => observer.usage.request_id(seq),
    };
    let route = route_of(req.uri().path());
    let method = req.method().clone();
    let usage = Arc::new(RequestUsage::default());
    if let Some(len) = req.header("content-length").and_then(|v| v.parse().ok()) {
        usage.bytes_in.store(len, Ordering::Relaxed);
    }
    req.extensions_mut().insert(RequestId(id.clone()));
    req.extensions_mut().insert(usage.clone());

    let origin = req.headers().get(header::ORIGIN).cloned();
    // A cheap clone (shared bytes), for the message of a routing error and for the answer.
    let uri = req.uri().clone();

    // A browser's preflight carries no key: it is answered before the guard (and has the
    // headers it needs).
    let preflight = cors::preflight(&observer.cors, &req);
    let is_preflight = preflight.is_some();
    let checked = match preflight {
        Some(answer) => guard::Checked {
            principal: None,
            outcome: Err(answer),
        },
        None => {
            guard::check(
                &observer.auth,
                &req,
                guard::access(&method, route, uri.path()),
            )
            .await
        }
    };
    let principal = checked.principal;
    let (mut resp, quota) = match checked.outcome {
        Err(resp) => (resp, None),
        Ok(quota) => {
            if let Some(p) = &principal {
                req.extensions_mut().insert(p.clone());
            }
            let resp = match query_refusal(&req, route, &observer.params) {
                Some(refused) => refused,
                None => match ep.call(req).await {
                    Ok(resp) => resp.into_response(),
                    Err(err) => error_response(err, &method, uri.path(), route, &observer.params),
                },
            };
            (resp, quota)
        }
    };
    if let Some(quota) = &quota {
        if !resp.headers().contains_key("x-ratelimit-limit") {
            guard::set_quota_headers(&mut resp, quota);
        }
    }
    if let Ok(value) = id.parse() {
        resp.headers_mut().insert(REQUEST_ID, value);
    }
    if !is_preflight {
        cors::allow_reading(&observer.cors, origin.as_ref(), uri.path(), &mut resp);
    }
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    observer
        .metrics
        .observe_request(route, method.as_str(), status, elapsed);
    tracing::debug!(request_id = %id, %method, route, status, elapsed_us = elapsed.as_micros() as u64, "request");

    let row = PendingRow {
        log: observer.usage.clone(),
        time: arrived,
        started,
        request_id: id,
        seq,
        principal,
        method: method.as_str().to_string(),
        route,
        status,
        usage,
    };
    Ok(count_body(resp, row))
}

/// Errors that reach this layer as errors: poem's own routing answers (no such path, or not
/// with this method) get the JSON error body every other error has; the rest keep theirs.
fn error_response(
    err: poem::Error,
    method: &Method,
    path: &str,
    route: &str,
    known: &KnownParams,
) -> Response {
    if err.is::<NotFoundError>() {
        return ErrorBody::new("not_found", format!("no such path: {path}"))
            .with_status(err.status());
    }
    if !err.is::<MethodNotAllowedError>() {
        return err.into_response();
    }
    let allowed = known.methods(route);
    let takes = allowed
        .as_deref()
        .map_or(String::new(), |m| format!(" (it takes {m})"));
    let mut resp = ErrorBody::new(
        "method_not_allowed",
        format!(
            "{method} is not supported on {path}{takes}; the API is described at /openapi.json"
        ),
    )
    .with_status(err.status());
    if let Some(value) = allowed.and_then(|m| m.parse().ok()) {
        resp.headers_mut().insert(header::ALLOW, value);
    }
    resp
}

/// A request's usage row, written once the size of its response is known.
struct PendingRow {
    log: Arc<UsageLog>,
    time: chrono::DateTime<chrono::Utc>,
    started: Instant,
    request_id: String,
    seq: u64,
    principal: Option<Principal>,
    method: String,
    route: &'static str,
    status: u16,
    usage: Arc<RequestUsage>,
}

impl PendingRow {
    fn write(self, bytes_out: u64) {
        let (tenant, key_id) = match &self.principal {
            Some(p) => (p.tenant().unwrap_or(""), p.key_id()),
            None => ("", ""),
        };
        self.log.record(&UsageRow {
            time: self.time,
            request_id: &self.request_id,
            instance_id: &self.log.instance_id,
            seq: self.seq,
            tenant,
            key_id,
            method: &self.method,
            route: self.route,
            status: self.status,
            latency_us: self.started.elapsed().as_micros().min(u32::MAX as u128) as u32,
            bytes_in: self.usage.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            events_accepted: self.usage.events_accepted.load(Ordering::Relaxed),
            events_rejected: self.usage.events_rejected.load(Ordering::Relaxed),
        });
    }
}

/// Writes the usage row now when the body's size is known, else when a streamed body ends.
fn count_body(mut resp: Response, row: PendingRow) -> Response {
    let body: BoxBody<Bytes, std::io::Error> = resp.take_body().into();
    if let Some(size) = body.size_hint().exact() {
        row.write(size);
        resp.set_body(Body::from(body));
        return resp;
    }
    resp.set_body(Body::from(BoxBody::new(CountingBody {
        inner: body,
        sent: 0,
        row: Some(row),
    })));
    resp
}

/// A streamed response body that writes its request's usage row when it ends (or the client
/// goes away), with the bytes actually sent.
struct CountingBody {
    inner: BoxBody<Bytes, std::io::Error>,
    sent: u64,
    row: Option<PendingRow>,
}

impl http_body::Body for CountingBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, std::io::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.sent += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountingBody {
    fn drop(&mut self) {
        if let Some(row) = self.row.take() {
            row.write(self.sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_a_bounded_set_of_routes() {
        assert_eq!(route_of("/v1/events"), "/v1/events");
        assert_eq!(route_of("/v1/events/0b8a1d2e"), "/v1/events/{event_id}");
        assert_eq!(route_of("/v1/events/export"), "/v1/events/export");
        assert_eq!(route_of("/docs/index.css"), "/docs");
        assert_eq!(route_of("/wp-admin/../../etc"), "other");
        assert_eq!(
            route_of("/v1/admin/keys/adt_0123"),
            "/v1/admin/keys/{key_id}"
        );
        assert_eq!(
            route_of("/v1/users/u-42/events"),
            "/v1/users/{user_id}/events"
        );
        assert_eq!(route_of("/v1/users/a/b/events"), "other");
    }

    #[test]
    fn only_plain_request_ids_are_kept() {
        assert!(usable("3f2a-req.1:x_y"));
        assert!(!usable(""));
        assert!(!usable("has space"));
        assert!(!usable(&"x".repeat(129)));
    }
}
