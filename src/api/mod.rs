//! The HTTP API: thin poem-openapi handlers, one file per resource, plus the OpenAPI
//! document (`/openapi.json`) and Swagger UI (`/docs`).

pub mod admin;
pub mod body;
pub mod events;
pub mod guard;
pub mod health;
pub mod json_body;
pub mod observe;
pub mod raw_events;
pub mod shared_paths;
pub mod stats;
pub mod types;

use std::sync::Arc;

use observe::Observed;
use poem::{
    endpoint::BoxEndpoint,
    http::Method,
    middleware::{AddDataEndpoint, CatchPanic, CatchPanicEndpoint},
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
pub fn routes(apis: Apis, observer: observe::Observer, body_limit: usize) -> Routes {
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
         re-sent events (same `event_id`) never count twice.\n\n\
         Every `/v1` request needs `Authorization: Bearer <key>`. A key belongs to one tenant \
         and has scopes: `ingest` (POST /v1/events), `read` (stats and raw events), `admin` \
         (its tenant's keys, usage, and user-data deletion). Missing or invalid key: 401; \
         wrong scope or tenant: 403; over the key's rate limit: 429 with `Retry-After` and \
         `X-RateLimit-Limit/-Remaining/-Reset` (limits are per instance).",
    );
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
type Layered<E> = Observed<CatchPanicEndpoint<AddDataEndpoint<E, body::BodyLimit>, ()>>;

fn layered<E: Endpoint>(ep: E, observer: observe::Observer, body_limit: usize) -> Layered<E> {
    Observed {
        inner: CatchPanic::new().transform(ep.data(body::BodyLimit(body_limit))),
        observer,
    }
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
