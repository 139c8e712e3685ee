//! The HTTP API: thin poem-openapi handlers, one file per resource, plus the OpenAPI
//! document (`/openapi.json`) and Swagger UI (`/docs`).

pub mod admin;
pub mod body;
pub mod cors;
pub mod documented;
pub mod events;
pub mod guard;
pub mod health;
pub mod json_body;
pub mod observe;
pub mod raw_events;
pub mod shared_paths;
pub mod stats;
pub mod types;

use std::{any::Any, sync::Arc};

use observe::Observed;
use poem::{
    endpoint::BoxEndpoint,
    http::{Method, StatusCode},
    middleware::{AddDataEndpoint, CatchPanic, CatchPanicEndpoint, PanicHandler},
    Endpoint, EndpointExt, IntoEndpoint, Middleware, Request, Response, Route,
};
use poem_openapi::{OpenApiService, Tags};

#[derive(Tags)]
pub enum ApiTags {
    /// Sending events
    Ingest,
    /// Health checks and metrics
    Health,
    /// Figures for dashboards: summary, time series, breakdown, and the full query model
    Analytics,
    /// Reading raw events: list, one by id, export
    Events,
    /// Tenants, API keys, the usage log, and deleting an end user's data
    Admin,
}

/// The APIs of the service.
pub struct Apis {
    pub events: events::EventsApi,
    pub health: health::HealthApi,
    pub stats: stats::StatsApi,
    pub raw_events: raw_events::RawEventsApi,
    pub admin: admin::AdminApi,
}

/// Builds every route of the service.
pub fn routes(apis: Apis, mut observer: observe::Observer, body_limit: usize) -> Routes {
    let Apis {
        events,
        health,
        stats,
        raw_events,
        admin,
    } = apis;
    let ingest = events.ingest.clone();
    let service = OpenApiService::new(
        // GET and POST /v1/events live in two APIs; SharedPaths documents them as one path.
        shared_paths::SharedPaths((events, raw_events, stats, admin, health)),
        "adtrack",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Ad-event ingestion and analytics. `202 Accepted` means durable on disk; \
         a re-sent event (same `event_id`, type, campaign and hour) never counts twice.\n\n\
         Every `/v1` request needs `Authorization: Bearer <key>`. A key belongs to one tenant \
         and has scopes: `ingest` (POST /v1/events), `read` (stats and raw events), `admin` \
         (its tenant's keys, usage, and user-data deletion). Missing or invalid key: 401; \
         wrong scope or tenant: 403; over the key's rate limit: 429 with `Retry-After` and \
         `X-RateLimit-Limit/-Remaining/-Reset` (limits are per instance).\n\n\
         Browsers: `/v1` answers preflights (`OPTIONS`, no key needed) and lets pages of the \
         origins in `ADTRACK_CORS_ORIGINS` (default: any) read every answer, errors included.",
    );
    let document = serde_json::from_str(&service.spec()).expect("the OpenAPI document is JSON");
    observer.params = observe::KnownParams::from_document(&document);
    let spec = service.spec_endpoint();
    let docs = service.swagger_ui();
    let documented = Arc::new(service.into_endpoint().boxed());
    let rest = Route::new()
        .nest("/", documented.clone())
        .nest("/docs", docs)
        .at("/openapi.json", spec);
    Routes {
        // The hot path skips the router and the OpenAPI layers; anything unusual on it still
        // goes through them (see `DirectIngest`).
        ingest: layered(
            events::DirectIngest::new(ingest, documented),
            observer.clone(),
            body_limit,
        ),
        rest: layered(rest, observer, body_limit).boxed(),
    }
}

/// Every request passes the same layers: the request layer (usage row, key, metrics), a
/// panic costing one request a 500 rather than the connection, the body limit.
type Layered<E> = Observed<CatchPanicEndpoint<AddDataEndpoint<E, body::BodyLimit>, PanicAnswer>>;

fn layered<E: Endpoint>(ep: E, observer: observe::Observer, body_limit: usize) -> Layered<E> {
    Observed {
        inner: panic_guard().transform(ep.data(body::BodyLimit(body_limit))),
        observer,
    }
}

/// A handler's panic becomes a 500 with the JSON error body every error has (the panic
/// itself is printed by the panic hook).
#[derive(Clone)]
struct PanicAnswer;

impl PanicHandler for PanicAnswer {
    type Response = Response;

    fn get_response(&self, _: Box<dyn Any + Send + 'static>) -> Response {
        types::ErrorBody::new(
            "internal",
            "the request failed unexpectedly; the service log has the cause",
        )
        .with_status(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

fn panic_guard() -> CatchPanic<PanicAnswer> {
    CatchPanic::new().with_handler(PanicAnswer)
}

/// Every route: `POST /v1/events` to `ingest`, everything else to `rest`.
pub struct Routes {
    ingest: Layered<events::DirectIngest>,
    rest: BoxEndpoint<'static>,
}

impl Endpoint for Routes {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if req.method() == Method::POST && req.uri().path() == "/v1/events" {
            self.ingest.call(req).await
        } else {
            self.rest.call(req).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_a_json_500() {
        let panics = poem::endpoint::make_sync(|_| -> &'static str { panic!("a bug") });
        let resp = panic_guard()
            .transform(panics)
            .call(Request::default())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            resp.headers()["content-type"],
            "application/json; charset=utf-8"
        );
        let body: serde_json::Value =
            serde_json::from_str(&resp.into_body().into_string().await.unwrap()).unwrap();
        assert_eq!(body["error"], "internal");
    }
}
