//! Around every request: the request id (`X-Request-Id`, taken from the client or nginx when
//! present, generated otherwise, always returned) and the latency histogram by route.

use std::{sync::Arc, time::Instant};

use poem::{Endpoint, IntoResponse, Request, Response, Result};

use crate::metrics::Metrics;

pub const REQUEST_ID: &str = "x-request-id";

/// The id of the request being served, for handlers and logs.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Routes with a fixed path, reported as themselves; others by their template.
const STATIC_ROUTES: &[&str] = &[
    "/v1/events",
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

pub async fn observe<E: Endpoint>(
    ep: E,
    mut req: Request,
    metrics: Arc<Metrics>,
) -> Result<Response> {
    let started = Instant::now();
    let id = match req.header(REQUEST_ID) {
        Some(id) if usable(id) => id.to_string(),
        _ => uuid::Uuid::new_v4().simple().to_string(),
    };
    req.extensions_mut().insert(RequestId(id.clone()));
    let route = route_of(req.uri().path());
    let method = req.method().clone();

    let mut resp = match ep.call(req).await {
        Ok(resp) => resp.into_response(),
        Err(err) => err.into_response(),
    };
    if let Ok(value) = id.parse() {
        resp.headers_mut().insert(REQUEST_ID, value);
    }
    let status = resp.status().as_u16();
    metrics.observe_request(route, method.as_str(), status, started.elapsed());
    tracing::debug!(request_id = %id, %method, route, status, elapsed_us = started.elapsed().as_micros() as u64, "request");
    Ok(resp)
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
    }

    #[test]
    fn only_plain_request_ids_are_kept() {
        assert!(usable("3f2a-req.1:x_y"));
        assert!(!usable(""));
        assert!(!usable("has space"));
        assert!(!usable(&"x".repeat(129)));
    }
}
