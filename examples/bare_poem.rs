//! The ceiling for the ingest benchmark: a bare poem server that reads the body and answers
//! 202 with a fixed JSON body, on the same runtime and allocator as adtrack.
//!
//! `cargo run --release --example bare_poem -- 127.0.0.1:9000`

use poem::{handler, http::StatusCode, listener::TcpListener, post, Body, Response, Route, Server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[handler]
async fn accept(body: Body) -> Response {
    let bytes = body.into_bytes().await.unwrap_or_default();
    Response::builder()
        .status(StatusCode::ACCEPTED)
        .content_type("application/json; charset=utf-8")
        .body(format!(
            "{{\"accepted\":{},\"rejected\":[]}}",
            bytes.len().min(1)
        ))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    Server::new(TcpListener::bind(addr))
        .run(Route::new().at("/v1/events", post(accept)))
        .await
}
