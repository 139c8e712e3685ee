//! The HTTP API: thin poem-openapi handlers, one file per resource, plus the OpenAPI
//! document (`/openapi.json`) and Swagger UI (`/docs`).

pub mod body;
pub mod events;
pub mod health;
pub mod observe;
pub mod types;

use poem::{endpoint::BoxEndpoint, EndpointExt, Route};
use poem_openapi::{OpenApiService, Tags};

#[derive(Tags)]
pub enum ApiTags {
    /// Sending events
    Ingest,
    /// Health checks and metrics
    Health,
}

/// Builds every route of the service.
pub fn routes(
    events: events::EventsApi,
    health: health::HealthApi,
    body_limit: usize,
    server_url: &str,
) -> BoxEndpoint<'static> {
    let metrics = health.metrics.clone();
    let service = OpenApiService::new((events, health), "adtrack", env!("CARGO_PKG_VERSION"))
        .description(
            "Ad-event ingestion and analytics. `202 Accepted` means durable on disk; \
             re-sent events (same `event_id`) never count twice.",
        )
        .server(server_url);
    let spec = service.spec_endpoint();
    let docs = service.swagger_ui();
    Route::new()
        .nest("/", service)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .data(body::BodyLimit(body_limit))
        .around(move |ep, req| observe::observe(ep, req, metrics.clone()))
        .boxed()
}
