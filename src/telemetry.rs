//! Logging: `LOG_LEVEL` (a level or a full `tracing` filter), text or JSON lines.

use tracing_subscriber::{fmt, EnvFilter};

pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_target(false);
    // A second init (tests start several apps in one process) is not an error.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
