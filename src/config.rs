//! Settings, read once at start-up from `ADTRACK_*` environment variables (and `LOG_LEVEL`).
//!
//! Every variable has a default that runs the service on a developer's machine; each one is
//! listed in the README. A value that does not parse stops the service with a message that
//! names the variable, rather than silently falling back to the default.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use anyhow::{bail, Context};

/// Where the service finds ClickHouse.
#[derive(Debug, Clone)]
pub enum ClickHouseTarget {
    /// A server at this URL (a real `clickhouse-server`, or a local engine started elsewhere).
    Url(String),
    /// Start the project's local engine (`scripts/local-clickhouse`) as a child process.
    Embedded {
        command: PathBuf,
        data_dir: PathBuf,
        port: u16,
    },
}

#[derive(Debug, Clone)]
pub struct ClickHouseSettings {
    pub target: ClickHouseTarget,
    pub database: String,
    pub user: String,
    pub password: String,
    /// Apply the SQL in `clickhouse-init/` at start (idempotent `IF NOT EXISTS`).
    pub apply_schema: bool,
}

/// Request limits of `POST /v1/events`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_events: usize,
    pub max_event_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct WalSettings {
    pub dir: PathBuf,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Disk budget for events not yet committed to ClickHouse; past it ingestion answers 503.
    pub max_pending_bytes: u64,
    /// `fdatasync` before acknowledging. Only benchmarks of the bare pipeline turn this off.
    pub fsync: bool,
    /// The log starts a write + fsync at most this often; requests arriving meanwhile share it.
    pub min_group_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct FlushSettings {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub interval: Duration,
    /// Longest pause between retries of a failed insert.
    pub max_backoff: Duration,
    pub dead_letter_dir: PathBuf,
}

/// Guards and defaults of the analytics and raw-event reads.
#[derive(Debug, Clone, Copy)]
pub struct AnalyticsSettings {
    /// Longest time range (`to - from`) a stats query may span.
    pub max_range_days: u32,
    /// Most groups one response may hold (the largest `limit`).
    pub max_groups: u32,
    /// Most data points (buckets × series) one response may hold.
    pub max_points: u32,
    /// ClickHouse `max_execution_time` of every analytics query.
    pub max_execution_ms: u64,
    /// ClickHouse `max_memory_usage` of every analytics and raw-event query.
    pub max_memory_bytes: u64,
    /// ClickHouse `max_execution_time` of one export response (it streams many rows).
    pub export_max_execution_ms: u64,
    /// The export only serves events received at least this long ago, so that events still on
    /// their way to ClickHouse (write-ahead log, batching) are not skipped by a cursor.
    pub export_settle_ms: u64,
    /// How often changed day partitions are summarized into hourly figures; zero turns the
    /// summaries off (every query reads raw events).
    pub rollup_refresh: Duration,
    /// How much of the summaries (and of the partial hours at the ends of ranges) queries
    /// may hold in memory, in bytes.
    pub rollup_cache_bytes: usize,
}

/// A value that must not appear in logs: `{:?}` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The usage log: one row per request, through its own write-ahead log into ClickHouse.
#[derive(Debug, Clone, Copy)]
pub struct UsageSettings {
    pub retention_days: u32,
    /// Rows are gathered in memory and appended to the log this often.
    pub flush_interval: Duration,
    /// Disk budget of the usage log's write-ahead log; past it rows are dropped and counted.
    pub max_pending_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Request threads, each serving its share of the connections (default: one per CPU).
    pub http_threads: usize,
    pub clickhouse: ClickHouseSettings,
    pub limits: Limits,
    pub wal: WalSettings,
    pub flush: FlushSettings,
    /// Events whose time is older than this are rejected; also the table's TTL.
    pub retention_days: u32,
    /// Events more than this far in the future (after clock-skew correction) are rejected.
    pub max_future_skew: Duration,
    /// How long `?wait=true` waits for the ClickHouse commit before answering 202 instead.
    pub wait_timeout: Duration,
    /// How long a graceful shutdown may spend draining the log into ClickHouse.
    pub shutdown_timeout: Duration,
    /// How long start-up waits for ClickHouse before starting without it.
    pub clickhouse_startup_wait: Duration,
    /// The bootstrap admin key (`ADTRACK_ADMIN_KEY`): creates tenants and their keys. Unset:
    /// no operator key (keys with the `admin` scope still manage their own tenant).
    pub admin_key: Option<Secret>,
    /// How often every instance reloads the API keys (bounds how long a revoked key works).
    pub key_refresh: Duration,
    /// Default per-key rate limits (a key may override them); a rate of 0 is unlimited.
    pub rate_limits: crate::auth::RateLimits,
    /// Names this process in the usage log; unique per run.
    pub instance_id: String,
    /// Origins whose pages may call the `/v1` API from a browser.
    pub cors_origins: crate::api::cors::CorsOrigins,
    pub usage: UsageSettings,
    pub analytics: AnalyticsSettings,
    pub log_level: String,
    pub log_json: bool,
}

impl Settings {
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds settings from any variable source; tests pass a map instead of the environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let parse = |name: &str, default: &str| -> anyhow::Result<String> {
            Ok(var(name).unwrap_or_else(|| default.to_string()))
        };
        fn num<T: FromStr>(name: &str, raw: String) -> anyhow::Result<T>
        where
            T::Err: std::fmt::Display,
        {
            raw.trim()
                .parse::<T>()
                .map_err(|e| anyhow::anyhow!("{name}={raw:?} is not valid: {e}"))
        }
        let flag = |name: &str, default: bool| -> anyhow::Result<bool> {
            match var(name).map(|v| v.trim().to_ascii_lowercase()) {
                None => Ok(default),
                Some(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => Ok(true),
                Some(v) if ["0", "false", "no", "off"].contains(&v.as_str()) => Ok(false),
                Some(v) => bail!("{name}={v:?} is not a boolean (true/false)"),
            }
        };

        let target = match var("ADTRACK_CLICKHOUSE_URL") {
            Some(url) => ClickHouseTarget::Url(url),
            None => ClickHouseTarget::Embedded {
                command: parse("ADTRACK_LOCAL_CLICKHOUSE_CMD", "scripts/local-clickhouse")?.into(),
                data_dir: parse("ADTRACK_LOCAL_CLICKHOUSE_DIR", "data/clickhouse")?.into(),
                port: num(
                    "ADTRACK_LOCAL_CLICKHOUSE_PORT",
                    parse("ADTRACK_LOCAL_CLICKHOUSE_PORT", "8123")?,
                )?,
            },
        };
        let database = parse("ADTRACK_CLICKHOUSE_DATABASE", "adtrack")?;
        if !is_identifier(&database) {
            bail!("ADTRACK_CLICKHOUSE_DATABASE={database:?} must match [A-Za-z_][A-Za-z0-9_]*");
        }

        let settings = Settings {
            listen: num("ADTRACK_LISTEN", parse("ADTRACK_LISTEN", "127.0.0.1:8080")?)?,
            http_threads: match var("ADTRACK_HTTP_THREADS") {
                None => std::thread::available_parallelism().map_or(2, usize::from),
                Some(raw) => match num::<usize>("ADTRACK_HTTP_THREADS", raw)? {
                    n @ 1..=1024 => n,
                    n => bail!("ADTRACK_HTTP_THREADS={n} must be between 1 and 1024"),
                },
            },
            clickhouse: ClickHouseSettings {
                target,
                database,
                user: parse("ADTRACK_CLICKHOUSE_USER", "default")?,
                password: parse("ADTRACK_CLICKHOUSE_PASSWORD", "")?,
                apply_schema: flag("ADTRACK_APPLY_SCHEMA", true)?,
            },
            limits: Limits {
                max_body_bytes: num(
                    "ADTRACK_MAX_BODY_BYTES",
                    parse("ADTRACK_MAX_BODY_BYTES", "10485760")?,
                )?,
                max_events: num(
                    "ADTRACK_MAX_EVENTS_PER_REQUEST",
                    parse("ADTRACK_MAX_EVENTS_PER_REQUEST", "10000")?,
                )?,
                max_event_bytes: num(
                    "ADTRACK_MAX_EVENT_BYTES",
                    parse("ADTRACK_MAX_EVENT_BYTES", "16384")?,
                )?,
            },
            wal: WalSettings {
                dir: parse("ADTRACK_WAL_DIR", "data/wal")?.into(),
                segment_bytes: num(
                    "ADTRACK_WAL_SEGMENT_BYTES",
                    parse("ADTRACK_WAL_SEGMENT_BYTES", "67108864")?,
                )?,
                max_pending_bytes: num(
                    "ADTRACK_WAL_MAX_PENDING_BYTES",
                    parse("ADTRACK_WAL_MAX_PENDING_BYTES", "1073741824")?,
                )?,
                fsync: flag("ADTRACK_WAL_FSYNC", true)?,
                min_group_interval: Duration::from_micros(num(
                    "ADTRACK_WAL_GROUP_INTERVAL_US",
                    parse("ADTRACK_WAL_GROUP_INTERVAL_US", "500")?,
                )?),
            },
            flush: FlushSettings {
                max_rows: num(
                    "ADTRACK_FLUSH_MAX_ROWS",
                    parse("ADTRACK_FLUSH_MAX_ROWS", "100000")?,
                )?,
                max_bytes: num(
                    "ADTRACK_FLUSH_MAX_BYTES",
                    parse("ADTRACK_FLUSH_MAX_BYTES", "33554432")?,
                )?,
                interval: Duration::from_millis(num(
                    "ADTRACK_FLUSH_INTERVAL_MS",
                    parse("ADTRACK_FLUSH_INTERVAL_MS", "1000")?,
                )?),
                max_backoff: Duration::from_millis(num(
                    "ADTRACK_RETRY_MAX_BACKOFF_MS",
                    parse("ADTRACK_RETRY_MAX_BACKOFF_MS", "10000")?,
                )?),
                dead_letter_dir: parse("ADTRACK_DEAD_LETTER_DIR", "data/dead-letter")?.into(),
            },
            retention_days: num(
                "ADTRACK_RETENTION_DAYS",
                parse("ADTRACK_RETENTION_DAYS", "30")?,
            )?,
            max_future_skew: Duration::from_secs(num(
                "ADTRACK_MAX_FUTURE_SKEW_SECS",
                parse("ADTRACK_MAX_FUTURE_SKEW_SECS", "300")?,
            )?),
            wait_timeout: Duration::from_millis(num(
                "ADTRACK_WAIT_TIMEOUT_MS",
                parse("ADTRACK_WAIT_TIMEOUT_MS", "30000")?,
            )?),
            shutdown_timeout: Duration::from_secs(num(
                "ADTRACK_SHUTDOWN_TIMEOUT_SECS",
                parse("ADTRACK_SHUTDOWN_TIMEOUT_SECS", "30")?,
            )?),
            clickhouse_startup_wait: Duration::from_secs(num(
                "ADTRACK_CLICKHOUSE_STARTUP_WAIT_SECS",
                parse("ADTRACK_CLICKHOUSE_STARTUP_WAIT_SECS", "10")?,
            )?),
            admin_key: var("ADTRACK_ADMIN_KEY").map(|k| Secret(k.trim().to_string())),
            key_refresh: Duration::from_millis(num(
                "ADTRACK_KEY_REFRESH_MS",
                parse("ADTRACK_KEY_REFRESH_MS", "2000")?,
            )?),
            rate_limits: crate::auth::RateLimits {
                requests_per_sec: num(
                    "ADTRACK_RATE_LIMIT_REQUESTS_PER_SEC",
                    parse("ADTRACK_RATE_LIMIT_REQUESTS_PER_SEC", "1000")?,
                )?,
                requests_burst: num(
                    "ADTRACK_RATE_LIMIT_REQUESTS_BURST",
                    parse("ADTRACK_RATE_LIMIT_REQUESTS_BURST", "2000")?,
                )?,
                events_per_sec: num(
                    "ADTRACK_RATE_LIMIT_EVENTS_PER_SEC",
                    parse("ADTRACK_RATE_LIMIT_EVENTS_PER_SEC", "100000")?,
                )?,
                events_burst: num(
                    "ADTRACK_RATE_LIMIT_EVENTS_BURST",
                    parse("ADTRACK_RATE_LIMIT_EVENTS_BURST", "200000")?,
                )?,
            },
            cors_origins: {
                let raw = parse("ADTRACK_CORS_ORIGINS", "*")?;
                crate::api::cors::CorsOrigins::parse(&raw)
                    .map_err(|e| anyhow::anyhow!("ADTRACK_CORS_ORIGINS={raw:?}: {e}"))?
            },
            instance_id: match var("ADTRACK_INSTANCE_ID") {
                Some(id) => id,
                None => default_instance_id(),
            },
            usage: UsageSettings {
                retention_days: num(
                    "ADTRACK_USAGE_RETENTION_DAYS",
                    parse("ADTRACK_USAGE_RETENTION_DAYS", "90")?,
                )?,
                flush_interval: Duration::from_millis(num(
                    "ADTRACK_USAGE_FLUSH_MS",
                    parse("ADTRACK_USAGE_FLUSH_MS", "200")?,
                )?),
                max_pending_bytes: num(
                    "ADTRACK_USAGE_MAX_PENDING_BYTES",
                    parse("ADTRACK_USAGE_MAX_PENDING_BYTES", "268435456")?,
                )?,
            },
            analytics: AnalyticsSettings {
                max_range_days: num(
                    "ADTRACK_ANALYTICS_MAX_RANGE_DAYS",
                    parse("ADTRACK_ANALYTICS_MAX_RANGE_DAYS", "92")?,
                )?,
                max_groups: num(
                    "ADTRACK_ANALYTICS_MAX_GROUPS",
                    parse("ADTRACK_ANALYTICS_MAX_GROUPS", "1000")?,
                )?,
                max_points: num(
                    "ADTRACK_ANALYTICS_MAX_POINTS",
                    parse("ADTRACK_ANALYTICS_MAX_POINTS", "100000")?,
                )?,
                max_execution_ms: num(
                    "ADTRACK_ANALYTICS_MAX_EXECUTION_MS",
                    parse("ADTRACK_ANALYTICS_MAX_EXECUTION_MS", "10000")?,
                )?,
                max_memory_bytes: num(
                    "ADTRACK_ANALYTICS_MAX_MEMORY_BYTES",
                    parse("ADTRACK_ANALYTICS_MAX_MEMORY_BYTES", "2147483648")?,
                )?,
                export_max_execution_ms: num(
                    "ADTRACK_EXPORT_MAX_EXECUTION_MS",
                    parse("ADTRACK_EXPORT_MAX_EXECUTION_MS", "600000")?,
                )?,
                export_settle_ms: num(
                    "ADTRACK_EXPORT_SETTLE_MS",
                    parse("ADTRACK_EXPORT_SETTLE_MS", "10000")?,
                )?,
                rollup_refresh: Duration::from_millis(num(
                    "ADTRACK_ROLLUP_REFRESH_MS",
                    parse("ADTRACK_ROLLUP_REFRESH_MS", "2000")?,
                )?),
                rollup_cache_bytes: num::<u32>(
                    "ADTRACK_ROLLUP_CACHE_MB",
                    parse("ADTRACK_ROLLUP_CACHE_MB", "64")?,
                )? as usize
                    * (1 << 20),
            },
            log_level: log_filter(parse("LOG_LEVEL", "info")?)?,
            log_json: match parse("ADTRACK_LOG_FORMAT", "text")?.as_str() {
                "text" => false,
                "json" => true,
                other => bail!("ADTRACK_LOG_FORMAT={other:?} must be `text` or `json`"),
            },
        };
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> anyhow::Result<()> {
        let l = &self.limits;
        if l.max_body_bytes == 0 || l.max_events == 0 || l.max_event_bytes == 0 {
            bail!("request limits must be greater than zero");
        }
        if self.retention_days == 0 {
            bail!("ADTRACK_RETENTION_DAYS must be at least 1");
        }
        if self.flush.max_rows == 0 || self.flush.max_bytes == 0 {
            bail!("ADTRACK_FLUSH_MAX_ROWS and ADTRACK_FLUSH_MAX_BYTES must be greater than zero");
        }
        if self.wal.segment_bytes < 4096 {
            bail!("ADTRACK_WAL_SEGMENT_BYTES must be at least 4096");
        }
        if self.admin_key.as_ref().is_some_and(|k| k.0.len() < 32) {
            bail!("ADTRACK_ADMIN_KEY must be at least 32 characters (e.g. `openssl rand -hex 32`)");
        }
        if self.instance_id.is_empty() || self.instance_id.len() > 128 {
            bail!("ADTRACK_INSTANCE_ID must be 1-128 characters");
        }
        if self.usage.retention_days == 0 {
            bail!("ADTRACK_USAGE_RETENTION_DAYS must be at least 1");
        }
        if self.key_refresh.is_zero() || self.usage.flush_interval.is_zero() {
            bail!("ADTRACK_KEY_REFRESH_MS and ADTRACK_USAGE_FLUSH_MS must be greater than zero");
        }
        let a = &self.analytics;
        if a.max_range_days == 0 || a.max_groups == 0 || a.max_points == 0 {
            bail!(
                "ADTRACK_ANALYTICS_MAX_RANGE_DAYS, _MAX_GROUPS and _MAX_POINTS must be at least 1"
            );
        }
        if a.max_execution_ms == 0 || a.export_max_execution_ms == 0 || a.max_memory_bytes == 0 {
            bail!("ADTRACK_ANALYTICS_MAX_EXECUTION_MS, ADTRACK_ANALYTICS_MAX_MEMORY_BYTES and ADTRACK_EXPORT_MAX_EXECUTION_MS must be greater than zero (0 would mean no limit in ClickHouse)");
        }
        Ok(())
    }

    /// The ClickHouse URL once an embedded engine (if any) is known to listen.
    pub fn clickhouse_url(&self) -> String {
        match &self.clickhouse.target {
            ClickHouseTarget::Url(url) => url.clone(),
            ClickHouseTarget::Embedded { port, .. } => format!("http://127.0.0.1:{port}"),
        }
    }
}

/// The host name and a random suffix: distinct for every run, so that (instance, sequence
/// number) identifies a request in the usage log even across restarts.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "adtrack".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// `LOG_LEVEL`: a level, or a `tracing` filter whose directives each name a level
/// (`adtrack=debug,info`). A bare word that is not a level (`verbose`, `warning`) would be
/// taken for a target name and silence every log line, so it is refused.
fn log_filter(value: String) -> anyhow::Result<String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let not_level =
        |d: &&str| !d.contains(['=', '[']) && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d));
    if let Some(word) = value.split(',').map(str::trim).find(not_level) {
        bail!("LOG_LEVEL={value:?}: {word:?} is not a level (off, error, warn, info, debug, trace) nor a directive like `adtrack=debug`");
    }
    tracing_subscriber::EnvFilter::try_new(&value)
        .with_context(|| format!("LOG_LEVEL={value:?} is not a valid filter"))?;
    Ok(value)
}

/// A plain ClickHouse identifier, safe to splice into DDL.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 128
}

/// Context helper so start-up errors name what failed.
pub fn ensure_dir(path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn every_setting_is_in_the_readme() {
        let readme = include_str!("../README.md");
        let source = include_str!("config.rs");
        let names: std::collections::BTreeSet<&str> = source
            .split('"')
            .filter(|s| {
                s.len() > "ADTRACK_".len()
                    && s.starts_with("ADTRACK_")
                    && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
            })
            .collect();
        assert!(names.len() > 30, "{names:?}");
        for name in names {
            assert!(
                readme.contains(&format!("`{name}`")),
                "{name} is not in the README"
            );
        }
    }

    fn settings(vars: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_run_against_the_embedded_engine() {
        let s = settings(&[]).unwrap();
        assert!(matches!(
            s.clickhouse.target,
            ClickHouseTarget::Embedded { port: 8123, .. }
        ));
        assert_eq!(s.limits.max_events, 10_000);
        assert_eq!(s.limits.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(s.limits.max_event_bytes, 16 * 1024);
        assert_eq!(s.retention_days, 30);
        assert!(s.wal.fsync);
        assert_eq!(s.wal.min_group_interval, Duration::from_micros(500));
        assert!(s.admin_key.is_none());
        assert_eq!(s.usage.retention_days, 90);
        assert_eq!(s.rate_limits.requests_per_sec, 1000);
        assert_ne!(s.instance_id, settings(&[]).unwrap().instance_id);
    }

    #[test]
    fn a_bad_number_names_the_variable() {
        let err = settings(&[("ADTRACK_FLUSH_MAX_ROWS", "lots")]).unwrap_err();
        assert!(err.to_string().contains("ADTRACK_FLUSH_MAX_ROWS"), "{err}");
    }

    #[test]
    fn analytics_guards_have_defaults_and_parse() {
        let a = settings(&[]).unwrap().analytics;
        assert_eq!(
            (a.max_range_days, a.max_groups, a.max_points),
            (92, 1000, 100_000)
        );
        assert_eq!((a.max_execution_ms, a.max_memory_bytes), (10_000, 2 << 30));
        assert_eq!(
            (a.export_max_execution_ms, a.export_settle_ms),
            (600_000, 10_000)
        );
        assert_eq!(a.rollup_refresh, Duration::from_secs(2));
        assert_eq!(a.rollup_cache_bytes, 64 << 20);
        let a = settings(&[
            ("ADTRACK_ANALYTICS_MAX_RANGE_DAYS", "31"),
            ("ADTRACK_ANALYTICS_MAX_GROUPS", "50"),
            ("ADTRACK_ANALYTICS_MAX_POINTS", "5000"),
            ("ADTRACK_ANALYTICS_MAX_EXECUTION_MS", "2500"),
            ("ADTRACK_ANALYTICS_MAX_MEMORY_BYTES", "1000000"),
            ("ADTRACK_EXPORT_MAX_EXECUTION_MS", "60000"),
            ("ADTRACK_EXPORT_SETTLE_MS", "0"),
            ("ADTRACK_ROLLUP_REFRESH_MS", "0"),
            ("ADTRACK_ROLLUP_CACHE_MB", "8"),
        ])
        .unwrap()
        .analytics;
        assert!(a.rollup_refresh.is_zero(), "0 turns the summaries off");
        assert_eq!(a.rollup_cache_bytes, 8 << 20);
        assert_eq!(
            (a.max_range_days, a.max_groups, a.max_points),
            (31, 50, 5000)
        );
        assert_eq!((a.max_execution_ms, a.max_memory_bytes), (2500, 1_000_000));
        assert_eq!((a.export_max_execution_ms, a.export_settle_ms), (60_000, 0));
        let err = settings(&[("ADTRACK_ANALYTICS_MAX_GROUPS", "many")]).unwrap_err();
        assert!(
            err.to_string().contains("ADTRACK_ANALYTICS_MAX_GROUPS"),
            "{err}"
        );
        assert!(settings(&[("ADTRACK_ANALYTICS_MAX_EXECUTION_MS", "0")]).is_err());
    }

    #[test]
    fn a_short_admin_key_is_refused() {
        let err = settings(&[("ADTRACK_ADMIN_KEY", "secret")]).unwrap_err();
        assert!(err.to_string().contains("ADTRACK_ADMIN_KEY"), "{err}");
        let key = "k".repeat(32);
        let debug = format!("{:?}", settings(&[("ADTRACK_ADMIN_KEY", &key)]).unwrap());
        assert!(!debug.contains(&key), "the admin key is printed: {debug}");
        assert_eq!(
            settings(&[("ADTRACK_ADMIN_KEY", &key)])
                .unwrap()
                .admin_key
                .map(|k| k.0),
            Some(key)
        );
    }

    #[test]
    fn request_threads_default_to_one_per_cpu() {
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        assert_eq!(settings(&[]).unwrap().http_threads, cpus);
        let s = settings(&[("ADTRACK_HTTP_THREADS", "3")]).unwrap();
        assert_eq!(s.http_threads, 3);
        for bad in ["0", "-1", "two", "5000"] {
            let err = settings(&[("ADTRACK_HTTP_THREADS", bad)]).unwrap_err();
            assert!(err.to_string().contains("ADTRACK_HTTP_THREADS"), "{err}");
        }
    }

    #[test]
    fn a_log_level_must_name_a_level() {
        for good in ["info", "WARN", "adtrack=debug,info", "off"] {
            assert_eq!(settings(&[("LOG_LEVEL", good)]).unwrap().log_level, good);
        }
        for bad in ["verbose", "warning", "info,loud", "adtrack=loud"] {
            let err = settings(&[("LOG_LEVEL", bad)]).unwrap_err();
            assert!(err.to_string().contains("LOG_LEVEL"), "{bad}: {err}");
        }
    }

    #[test]
    fn cross_origin_access_defaults_to_any_origin_and_a_bad_origin_names_the_variable() {
        use crate::api::cors::CorsOrigins;
        assert_eq!(settings(&[]).unwrap().cors_origins, CorsOrigins::Any);
        let off = settings(&[("ADTRACK_CORS_ORIGINS", "none")]).unwrap();
        assert_eq!(off.cors_origins, CorsOrigins::Off);
        let err = settings(&[("ADTRACK_CORS_ORIGINS", "shop.example")]).unwrap_err();
        assert!(err.to_string().contains("ADTRACK_CORS_ORIGINS"), "{err}");
    }

    #[test]
    fn a_database_name_must_be_an_identifier() {
        let err = settings(&[("ADTRACK_CLICKHOUSE_DATABASE", "x; DROP")]).unwrap_err();
        assert!(err.to_string().contains("ADTRACK_CLICKHOUSE_DATABASE"));
    }
}
