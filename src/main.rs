use adtrack::{config::Settings, startup, telemetry};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    telemetry::init(&settings.log_level, settings.log_json);
    let app = startup::Application::build(settings).await?;
    app.run_until_stopped(startup::shutdown_signal()).await
}
