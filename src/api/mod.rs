//! The HTTP API: thin poem-openapi handlers, one file per resource, plus the OpenAPI
//! document (`/openapi.json`) and Swagger UI (`/docs`).

pub mod body;
pub mod events;
pub mod health;
pub mod observe;
pub mod raw_events;
pub mod shared_paths;
pub mod stats;
pub mod types;

use poem::{endpoint::BoxEndpoint, EndpointExt, Route};
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
}

/// Builds every route of the service.
pub fn routes(
    events: events::EventsApi,
    health: health::HealthApi,
    stats: stats::StatsApi,
    raw_events: raw_events::RawEventsApi,
    body_limit: usize,
) -> BoxEndpoint<'static> {
    let metrics = health.metrics.clone();
    let service = OpenApiService::new(
        // GET and POST /v1/events live in two APIs; SharedPaths documents them as one path.
        shared_paths::SharedPaths((events, raw_events, stats, health)),
        "adtrack",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Ad-event ingestion and analytics. `202 Accepted` means durable on disk; \
             re-sent events (same `event_id`) never count twice.",
    );
    let spec = service.spec_endpoint();
    let docs = service.swagger_ui();
    Route::new()
        .nest("/", service)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .data(body::BodyLimit(body_limit))
        // A bug must cost one request a 500, not the connection (and never other requests).
        .with(poem::middleware::CatchPanic::new())
        .around(move |ep, req| observe::observe(ep, req, metrics.clone()))
        .boxed()
}
