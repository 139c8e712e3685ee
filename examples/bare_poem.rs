//! The ceiling for the ingest benchmark: a bare poem server that reads the body and answers
//! 202 with a fixed JSON body, served the way adtrack serves (the same request threads,
//! allocator and runtime).
//!
//! `cargo run --release --example bare_poem -- 127.0.0.1:9000`

use poem::{handler, http::StatusCode, post, Body, Response, Route};

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
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let routes = Route::new().at("/v1/events", post(accept));
    adtrack::serve::serve(listener, routes, threads, std::future::pending()).await
}
