//! Builds the application (ClickHouse, schema, write-ahead log, shipper, routes) and runs it
//! until a shutdown signal, then drains.
//!
//! Shutdown order matters for "nothing lost": stop taking requests → let in-flight requests
//! finish → append the last usage rows → close both logs (their threads fsync and exit) → the
//! shippers send everything durable to ClickHouse (bounded by `shutdown_timeout`; whatever is
//! left stays in the log for the next start) → stop the local engine, if we started it.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::sync::watch;

use crate::{
    analytics::{rollup::Rollup, Analytics},
    api::{
        self, admin::AdminApi, events::EventsApi, health::HealthApi, observe::Observer,
        raw_events::RawEventsApi, stats::StatsApi,
    },
    auth::{Auth, KeyStore},
    clickhouse::schema::{self, Retention},
    config::{ClickHouseTarget, Settings},
    ingest::{
        shipper::{EventRows, Shipper, UsageRows},
        wal, Ingest, Refusals,
    },
    local_engine::LocalEngine,
    metrics::Metrics,
    usage::{self, UsageLog},
};

pub struct Application {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    http_threads: usize,
    routes: api::Routes,
    wal_thread: std::thread::JoinHandle<()>,
    usage_wal_thread: std::thread::JoinHandle<()>,
    usage_flusher: tokio::task::JoinHandle<()>,
    usage_stop: watch::Sender<bool>,
    key_refresh: tokio::task::JoinHandle<()>,
    rollup_refresh: Option<tokio::task::JoinHandle<()>>,
    shipper: std::thread::JoinHandle<()>,
    stopping: watch::Sender<bool>,
    engine: Option<LocalEngine>,
}

impl Application {
    /// Binds the port first (so tests can use port 0 and read it back), then connects
    /// everything. A wrong schema stops the start with a clear message (better than accepting
    /// events that cannot be written). An unreachable ClickHouse does not: the service starts,
    /// accepts into its log (not ready, so balancers prefer other instances), and the shipper
    /// applies and checks the schema once ClickHouse answers.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(settings.listen)
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;

        let engine = match &settings.clickhouse.target {
            ClickHouseTarget::Embedded {
                command,
                data_dir,
                port,
            } => Some(LocalEngine::start(command, data_dir, *port).await?),
            ClickHouseTarget::Url(_) => None,
        };
        let url = settings.clickhouse_url();
        let client = crate::clickhouse::client(&url, &settings.clickhouse);
        let schema = SchemaSetup {
            apply: settings.clickhouse.apply_schema,
            database: settings.clickhouse.database.clone(),
            retention: Retention {
                events_days: settings.retention_days,
                usage_days: settings.usage.retention_days,
            },
        };
        let schema_ready = if answers_within(&client, settings.clickhouse_startup_wait).await {
            schema.prepare(&client).await?;
            true
        } else {
            tracing::warn!(%url, "ClickHouse does not answer; accepting events into the log until it does");
            false
        };

        let metrics = Arc::new(Metrics::default());
        let durability = wal::Durability {
            fsync: settings.wal.fsync,
            min_group_interval: settings.wal.min_group_interval,
        };
        let wal = wal::open(
            &settings.wal.dir,
            settings.wal.segment_bytes,
            settings.wal.max_pending_bytes,
            durability,
            metrics.clone(),
        )?;
        let usage_metrics = Arc::new(Metrics::default());
        // `usage-rows` since the rows are RowBinary; `usage` held JSON lines (older builds).
        warn_of_old_usage_log(&settings.wal.dir.join("usage"));
        let usage_wal = wal::open(
            &settings.wal.dir.join("usage-rows"),
            settings.wal.segment_bytes.min(8 << 20),
            settings.usage.max_pending_bytes,
            durability,
            usage_metrics.clone(),
        )?;
        let (committed_tx, committed) = watch::channel(wal.start.lsn);
        let (usage_committed_tx, _) = watch::channel(usage_wal.start.lsn);
        let refusals = Refusals::default();
        let (stopping, stopping_rx) = watch::channel(false);
        // The shippers get a thread and runtime of their own: they read the logs with blocking
        // file I/O and compress large batches, and neither may stall request handling.
        let events_shipper = Shipper {
            format: EventRows::default(),
            client: crate::clickhouse::client(&url, &settings.clickhouse),
            schema: (!schema_ready).then_some(schema.clone()),
            settings: settings.flush.clone(),
            wal_dir: wal.dir.clone(),
            start: wal.start,
            durable: wal.durable.clone(),
            committed: committed_tx,
            refusals: Some(refusals.clone()),
            shared: wal.shared.clone(),
            metrics: metrics.clone(),
            stopping: stopping_rx.clone(),
            drain_timeout: settings.shutdown_timeout,
        };
        let usage_shipper = Shipper {
            format: UsageRows,
            client: crate::clickhouse::client(&url, &settings.clickhouse),
            schema: (!schema_ready).then_some(schema),
            settings: settings.flush.clone(),
            wal_dir: usage_wal.dir.clone(),
            start: usage_wal.start,
            durable: usage_wal.durable.clone(),
            committed: usage_committed_tx,
            refusals: None,
            shared: usage_wal.shared.clone(),
            metrics: usage_metrics.clone(),
            stopping: stopping_rx,
            drain_timeout: settings.shutdown_timeout,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the shipper runtime")?;
        let shipper = std::thread::Builder::new()
            .name("shipper".into())
            .spawn(move || {
                runtime.block_on(async {
                    tokio::join!(events_shipper.run(), usage_shipper.run());
                })
            })
            .context("starting the shipper thread")?;

        let usage_log = Arc::new(UsageLog::new(settings.instance_id.clone()));
        let (usage_stop, usage_stop_rx) = watch::channel(false);
        let usage_flusher = tokio::spawn(usage::run_flusher(
            usage_log.clone(),
            usage_wal.handle,
            settings.usage.flush_interval,
            usage_stop_rx,
        ));

        let store = Arc::new(KeyStore::new(
            client.clone(),
            settings.rate_limits,
            Some(settings.wal.dir.join("api-keys.json")),
        ));
        let key_refresh = tokio::spawn(store.clone().refresh_forever(settings.key_refresh));
        let rollup_refresh = (!settings.analytics.rollup_refresh.is_zero()).then(|| {
            tokio::spawn(
                Rollup::new(client.clone(), 0, 0)
                    .refresh_forever(settings.analytics.rollup_refresh, metrics.clone()),
            )
        });
        if settings.admin_key.is_none() {
            tracing::warn!(
                "ADTRACK_ADMIN_KEY is not set: no bootstrap admin key, so no tenant can be created"
            );
        }
        let auth = Arc::new(Auth::new(
            store.clone(),
            settings.admin_key.as_ref().map(|k| k.0.as_str()),
        ));

        let ingest = Ingest {
            wal: wal.handle.clone(),
            committed: committed.clone(),
            refusals,
            metrics: metrics.clone(),
            limits: settings.limits,
            retention: Duration::from_secs(u64::from(settings.retention_days) * 86_400),
            max_future_skew: settings.max_future_skew,
            wait_timeout: settings.wait_timeout,
        };
        let routes = api::routes(
            api::Apis {
                events: EventsApi { ingest },
                health: HealthApi {
                    clickhouse: client.clone(),
                    wal: wal.handle,
                    metrics: metrics.clone(),
                    usage: crate::api::health::UsageStatus {
                        metrics: usage_metrics,
                        log: usage_log.clone(),
                        shared: usage_wal.shared.clone(),
                    },
                },
                stats: StatsApi {
                    analytics: Analytics::new(client.clone(), settings.analytics, metrics.clone()),
                },
                raw_events: RawEventsApi {
                    analytics: Analytics::new(client.clone(), settings.analytics, metrics.clone()),
                },
                admin: AdminApi {
                    store,
                    client,
                    durable: wal.durable.clone(),
                    committed,
                    wait_timeout: settings.wait_timeout,
                    read_limit_ms: settings.analytics.max_execution_ms,
                    default_limits: settings.rate_limits,
                    settle: settings.flush.interval * 2,
                    deletions: tokio::sync::Mutex::new(()),
                },
            },
            Observer {
                metrics,
                auth,
                usage: usage_log,
                cors: Arc::new(settings.cors_origins.clone()),
                params: Default::default(),
            },
            settings.limits.max_body_bytes,
        );

        Ok(Self {
            listener,
            addr,
            http_threads: settings.http_threads,
            routes,
            wal_thread: wal.thread,
            usage_wal_thread: usage_wal.thread,
            usage_flusher,
            usage_stop,
            key_refresh,
            rollup_refresh,
            shipper,
            stopping,
            engine,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serves until `shutdown` completes, then drains (see the module comment).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.addr, threads = self.http_threads, "listening");
        // Should the server fail, what the logs hold is still drained before the error returns.
        let served = crate::serve::serve(self.listener, self.routes, self.http_threads, shutdown)
            .await
            .inspect_err(|err| {
                tracing::error!(
                    error = format!("{err:#}"),
                    "the HTTP server failed; draining the logs"
                )
            });
        self.key_refresh.abort();
        if let Some(task) = &self.rollup_refresh {
            task.abort();
        }
        // The last usage rows go into the usage log; then its handle is dropped.
        self.usage_stop.send_replace(true);
        let _ = self.usage_flusher.await;
        // The routes (and with them every log handle) are dropped: the log threads end.
        let (wal_thread, usage_wal_thread) = (self.wal_thread, self.usage_wal_thread);
        tokio::task::spawn_blocking(move || {
            let events = wal_thread.join();
            let usage = usage_wal_thread.join();
            events.and(usage)
        })
        .await?
        .map_err(|_| anyhow::anyhow!("a write-ahead log thread panicked"))?;
        tracing::info!("draining the write-ahead logs into ClickHouse");
        self.stopping.send_replace(true);
        tokio::task::spawn_blocking(move || self.shipper.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the shipper thread panicked"))?;
        if let Some(engine) = self.engine {
            engine.stop().await;
        }
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// How the schema is made ready: applied (if configured) and then checked.
#[derive(Debug, Clone)]
pub struct SchemaSetup {
    pub apply: bool,
    pub database: String,
    pub retention: Retention,
}

impl SchemaSetup {
    pub async fn prepare(&self, client: &clickhouse::Client) -> anyhow::Result<()> {
        if self.apply {
            schema::apply(client, &self.database, self.retention).await?;
        }
        schema::verify(client)
            .await
            .context("the ClickHouse schema is not usable")
    }
}

/// Warns when an older build's usage log directory (JSON lines) is still there: it is no
/// longer read, so rows it may still hold are not sent.
fn warn_of_old_usage_log(dir: &std::path::Path) {
    if dir.is_dir() {
        tracing::warn!(dir = %dir.display(), "this usage log directory of an older version is no longer read (the format changed; rows it still holds are not sent): delete it");
    }
}

/// True once ClickHouse answers `SELECT 1`, false if it has not within `wait`.
async fn answers_within(client: &clickhouse::Client, wait: Duration) -> bool {
    let probe = client.clone().with_database("default");
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // A server that accepts connections but never answers (stopped, overloaded) must not
        // hold the start past the deadline either.
        let asked = probe.query("SELECT 1").fetch_one::<u8>();
        match tokio::time::timeout_at(deadline, asked).await {
            Ok(Ok(_)) => return true,
            Ok(Err(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "ClickHouse did not answer");
                return false;
            }
            Err(_) => {
                tracing::debug!("ClickHouse did not answer in time");
                return false;
            }
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what Docker and systemd send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
