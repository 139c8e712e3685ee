//! Test harness: the real app on port 0, its own ClickHouse database and write-ahead log per
//! test, against the local engine (started once per test binary) or `ADTRACK_TEST_CLICKHOUSE_URL`.

// Also included by other test binaries (`tests/postman.rs`, `tests/nginx.rs`), each using a
// part of it.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use adtrack::{config::Settings, startup::Application};
use serde_json::{json, Value};
use tokio::{sync::oneshot, task::JoinHandle};
use uuid::Uuid;

#[path = "../support/local_clickhouse.rs"]
pub mod local_clickhouse;

pub const JSON: &str = "application/json";
/// The bootstrap admin key of every test app.
pub const ADMIN_KEY: &str = "test-bootstrap-admin-key-0123456789abcdef";
/// The tenant whose key `TestApp::http` sends, unless a test names another.
pub const TENANT: &str = "acme";
pub const NDJSON: &str = "application/x-ndjson";

/// A fresh database name per test (tests run in parallel in one process).
pub fn unique_database(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t_{}_{}_{}",
        test.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Environment for one app: the given ClickHouse and database, a private WAL directory, fast
/// flushes so tests do not wait a second per batch.
pub fn base_env(clickhouse_url: &str, database: &str, data: &Path) -> HashMap<String, String> {
    let mut env = HashMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set("ADTRACK_CLICKHOUSE_URL", clickhouse_url.to_string());
    set("ADTRACK_CLICKHOUSE_DATABASE", database.to_string());
    set("ADTRACK_LISTEN", "127.0.0.1:0".to_string());
    set("ADTRACK_WAL_DIR", data.join("wal").display().to_string());
    set(
        "ADTRACK_DEAD_LETTER_DIR",
        data.join("dead-letter").display().to_string(),
    );
    set("ADTRACK_FLUSH_INTERVAL_MS", "100".to_string());
    // Segments are zero-filled up front; small ones keep many short-lived apps cheap.
    set("ADTRACK_WAL_SEGMENT_BYTES", "4194304".to_string());
    set("ADTRACK_RETRY_MAX_BACKOFF_MS", "500".to_string());
    set("ADTRACK_SHUTDOWN_TIMEOUT_SECS", "10".to_string());
    set("ADTRACK_ADMIN_KEY", ADMIN_KEY.to_string());
    set("ADTRACK_KEY_REFRESH_MS", "500".to_string());
    set("ADTRACK_USAGE_FLUSH_MS", "50".to_string());
    // The seeded data sets' queries take seconds when the machine is busy (a CI run beside a
    // build once hit the 10 s default); the guard tests set their own tight limits.
    set("ADTRACK_ANALYTICS_MAX_EXECUTION_MS", "60000".to_string());
    set(
        "LOG_LEVEL",
        std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into()),
    );
    env
}

pub struct TestApp {
    pub base: String,
    /// Sends `key` with every request.
    pub http: reqwest::Client,
    /// A key of `tenant` with every scope and no rate limit.
    pub key: String,
    pub tenant: String,
    pub db: clickhouse::Client,
    pub database: String,
    pub env: HashMap<String, String>,
    pub data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app(test: &str) -> TestApp {
    spawn_app_with(test, &[]).await
}

/// Starts the app with extra environment overrides.
pub async fn spawn_app_with(test: &str, overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_for(test, TENANT, overrides).await
}

/// Starts the app, with `http` sending a key of `tenant`.
pub async fn spawn_app_for(test: &str, tenant: &str, overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_on(&local_clickhouse::shared_url(), test, tenant, overrides).await
}

/// Starts the app against the ClickHouse at `url`.
pub async fn spawn_app_on(
    url: &str,
    test: &str,
    tenant: &str,
    overrides: &[(&str, &str)],
) -> TestApp {
    let tmp = tempfile::tempdir().unwrap();
    let database = unique_database(test);
    let mut env = base_env(url, &database, tmp.path());
    for (k, v) in overrides {
        env.insert(k.to_string(), v.to_string());
    }
    let data = tmp.path().to_path_buf();
    start(env, database, data, Some(tmp), tenant, None).await
}

async fn start(
    env: HashMap<String, String>,
    database: String,
    data: PathBuf,
    tmp: Option<tempfile::TempDir>,
    tenant: &str,
    key: Option<String>,
) -> TestApp {
    let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("valid test settings");
    adtrack::telemetry::init(&settings.log_level, false);
    let url = env["ADTRACK_CLICKHOUSE_URL"].clone();
    let app = Application::build(settings).await.expect("app starts");
    let base = format!("http://{}", app.addr());
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let key = match key {
        Some(key) => key,
        None => provision_key(&base, tenant).await,
    };
    TestApp {
        http: client_with_key(&key),
        key,
        tenant: tenant.to_string(),
        base,
        db: clickhouse::Client::default()
            .with_url(url)
            .with_database(&database),
        database,
        env,
        data,
        _tmp: tmp,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    /// Graceful stop: drains the log into ClickHouse, as on SIGTERM.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Stops this app and starts a new one on the same database and write-ahead log.
    pub async fn restart(mut self) -> TestApp {
        self.stop().await;
        let tmp = self._tmp.take();
        start(
            self.env.clone(),
            self.database.clone(),
            self.data.clone(),
            tmp,
            &self.tenant.clone(),
            Some(self.key.clone()),
        )
        .await
    }

    pub async fn post(&self, body: impl Into<reqwest::Body>, content_type: &str) -> Response {
        self.post_to("/v1/events", body, &[("content-type", content_type)])
            .await
    }

    /// Posts a JSON body with `?wait=true` (answered once ClickHouse has the events).
    pub async fn post_and_wait(&self, body: impl Into<reqwest::Body>) -> Response {
        self.post_to("/v1/events?wait=true", body, &[("content-type", JSON)])
            .await
    }

    pub async fn post_to(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Response::from(req.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str) -> Response {
        Response::from(
            self.http
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Distinct events as every analytics query sees them (FINAL).
    pub async fn count_final(&self) -> u64 {
        self.db
            .query("SELECT count() FROM events FINAL")
            .fetch_one::<u64>()
            .await
            .unwrap()
    }

    /// Waits until `count_final() == expected` (the shipper flushes every 100 ms in tests).
    pub async fn wait_for_count(&self, expected: u64) -> u64 {
        wait_for_count(&self.db, expected, Duration::from_secs(30)).await
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.text;
        metric_value(&text, name)
    }
}

/// A client that sends `key` as `Authorization: Bearer`.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Creates `tenant` (if new) through the admin API of the service at `base`, and a key of it
/// with every scope and no rate limit.
pub async fn provision_key(base: &str, tenant: &str) -> String {
    let admin = client_with_key(ADMIN_KEY);
    let created = admin
        .post(format!("{base}/v1/admin/tenants"))
        .json(&json!({"tenant_id": tenant, "name": tenant}))
        .send()
        .await
        .expect("admin API answers");
    assert!(
        [201, 409].contains(&created.status().as_u16()),
        "creating tenant {tenant}: {} {}",
        created.status(),
        created.text().await.unwrap_or_default()
    );
    create_key(
        base,
        tenant,
        &["ingest", "read", "admin"],
        json!({"requests_per_sec": 0, "events_per_sec": 0}),
    )
    .await
}

/// Creates a key of `tenant` with `scopes` and `rate_limit` (as the admin API takes it).
pub async fn create_key(base: &str, tenant: &str, scopes: &[&str], rate_limit: Value) -> String {
    let resp = client_with_key(ADMIN_KEY)
        .post(format!("{base}/v1/admin/keys"))
        .json(&json!({"tenant_id": tenant, "name": "test", "scopes": scopes, "rate_limit": rate_limit}))
        .send()
        .await
        .expect("admin API answers");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "creating a key: {body}");
    body["key"].as_str().unwrap().to_string()
}

pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found"))
}

/// Runs `sql` until it returns at least `n` rows or `limit` has passed; the last rows read.
pub async fn wait_for_rows<T>(
    db: &clickhouse::Client,
    sql: &str,
    n: usize,
    limit: Duration,
) -> Vec<T>
where
    T: clickhouse::RowOwned + clickhouse::RowRead,
{
    let deadline = Instant::now() + limit;
    loop {
        let rows = db.query(sql).fetch_all::<T>().await.unwrap();
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_for_count(db: &clickhouse::Client, expected: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let n = db
            .query("SELECT count() FROM events FINAL")
            .fetch_one::<u64>()
            .await
            .unwrap_or(0);
        if n >= expected || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A response read to the end, with the body as text and (if it is JSON) as a value.
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Response {
    pub async fn from(resp: reqwest::Response) -> Self {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            text,
            json,
        }
    }
}

/// A browser's preflight for `method` on `path` of the service at `base`, as it sends it: no
/// key, and a header of its own besides the API's.
pub async fn preflight(base: &str, path: &str, origin: &str, method: &str) -> Response {
    let req = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{base}{path}"))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-sdk-version",
        );
    Response::from(req.send().await.unwrap()).await
}

/// A valid event, happening now, with a fresh id.
pub fn event() -> Value {
    event_with_id(Uuid::new_v4())
}

pub fn event_with_id(id: Uuid) -> Value {
    json!({
        "event_id": id.to_string(),
        "event_type": "impression",
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "campaign_id": "camp-1",
        "ad_id": "ad-1",
        "publisher_id": "pub-1",
        "country": "US",
        "device": "mobile",
        "cost_micros": 1500,
    })
}

pub fn events(n: usize) -> Vec<Value> {
    (0..n).map(|_| event()).collect()
}

pub fn ids_of(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// The service as a separate OS process (for kill -9), on a port picked for it.
pub struct ServiceProcess {
    pub child: Child,
    pub base: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ServiceProcess {
    /// Starts the `adtrack` binary with `env` and waits until `/health/ready` is 200.
    pub async fn start(env: &HashMap<String, String>) -> ServiceProcess {
        Self::start_on(env, free_port()).await
    }

    /// Same, on a given port (e.g. where a killed instance was, behind a load balancer).
    pub async fn start_on(env: &HashMap<String, String>, port: u16) -> ServiceProcess {
        let mut env = env.clone();
        env.insert("ADTRACK_LISTEN".into(), format!("127.0.0.1:{port}"));
        let child = Command::new(env!("CARGO_BIN_EXE_adtrack"))
            .envs(&env)
            .stdout(Stdio::null())
            .stderr(if std::env::var("TEST_LOG").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("the adtrack binary starts");
        let base = format!("http://127.0.0.1:{port}");
        let process = ServiceProcess { child, base };
        process.wait_ready().await;
        process
    }

    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/health/ready", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "service did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait for the graceful drain to finish.
    pub fn terminate(&mut self) {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clients posting 20-event batches until stopped, recording which ids got a 2xx and every
/// status they saw (0 = no answer). `pause` spaces each client's requests.
pub struct Load {
    acked: Arc<Mutex<HashSet<String>>>,
    statuses: Arc<Mutex<BTreeMap<u16, usize>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(base: &str, key: &str, clients: usize, pause: Duration) -> Load {
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let statuses = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (acked, statuses, stop) = (acked.clone(), statuses.clone(), stop.clone());
                let url = format!("{base}/v1/events");
                let auth = format!("Bearer {key}");
                tokio::spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(20))
                        .build()
                        .unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        let batch = events(20);
                        let sent = http
                            .post(&url)
                            .header("authorization", &auth)
                            .header("content-type", JSON)
                            .body(Value::from(batch.clone()).to_string())
                            .send()
                            .await;
                        let status = sent.map_or(0, |r| r.status().as_u16());
                        if (200..300).contains(&status) {
                            acked.lock().unwrap().extend(ids_of(&batch));
                        }
                        *statuses.lock().unwrap().entry(status).or_default() += 1;
                        let wait = if status == 0 {
                            Duration::from_millis(20)
                        } else {
                            pause
                        };
                        tokio::time::sleep(wait).await;
                    }
                })
            })
            .collect();
        Load {
            acked,
            statuses,
            stop,
            tasks,
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub async fn finish(self) -> (HashSet<String>, BTreeMap<u16, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        let statuses = self.statuses.lock().unwrap().clone();
        (acked, statuses)
    }
}

/// Every acknowledged id is stored, none twice (with FINAL, and after a forced merge).
/// Returns how many distinct events are stored.
pub async fn assert_all_stored_once(db: &clickhouse::Client, acked: &HashSet<String>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored: Vec<String> = loop {
        let stored: Vec<String> = db
            .query("SELECT toString(event_id) FROM events FINAL")
            .fetch_all()
            .await
            .unwrap();
        let have: HashSet<&String> = stored.iter().collect();
        if acked.iter().all(|id| have.contains(id)) || Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let distinct: HashSet<&String> = stored.iter().collect();
    assert_eq!(distinct.len(), stored.len(), "an event is counted twice");
    let missing = acked.iter().filter(|id| !distinct.contains(id)).count();
    assert_eq!(
        missing,
        0,
        "acknowledged events missing (of {})",
        acked.len()
    );
    db.query("OPTIMIZE TABLE events FINAL")
        .execute()
        .await
        .unwrap();
    let raw: u64 = db
        .query("SELECT count() FROM events")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(raw as usize, stored.len(), "rows after merge");
    stored.len()
}

/// A TCP proxy to the ClickHouse at `upstream` (its URL) that passes everything through but
/// the answer to the first request containing `marker`: of that one it passes the HTTP head
/// and the first `pass` bytes of the body, then holds the rest back with the connection open.
/// A ClickHouse that stalls in the middle of a long answer. Returns the proxy's URL.
pub async fn stalling_proxy(upstream: &str, marker: &'static str, pass: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let armed = Arc::new(AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, armed) = (upstream.clone(), armed.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let stall = Arc::new(AtomicBool::new(false));
                let stall_this = stall.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 << 10];
                    // The end of the bytes before, so that a marker split between reads counts.
                    let mut seen = Vec::new();
                    while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        if String::from_utf8_lossy(&seen).contains(marker)
                            && armed.swap(false, Ordering::SeqCst)
                        {
                            stall_this.store(true, Ordering::SeqCst);
                        }
                        seen.drain(..seen.len().saturating_sub(marker.len()));
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut buf = vec![0; 64 << 10];
                let mut held = Vec::new();
                while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                    if !stall.load(Ordering::SeqCst) {
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    held.extend_from_slice(&buf[..n]);
                    let cut = body_start(&held).map(|at| at + pass);
                    if let Some(end) = cut.filter(|&end| held.len() >= end) {
                        let _ = to_client.write_all(&held[..end]).await;
                        // The rest never comes; the connection stays open.
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    url
}

/// Where the body of an HTTP answer starts, once `response` holds its head.
fn body_start(response: &[u8]) -> Option<usize> {
    let head = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(head + 4)
}

/// An app with 10,000 events stored (about 1 MB of rows), whose ClickHouse sends the first
/// 256 KB of the answer to an export (over 2,000 rows) and then nothing more; the export's
/// limit is 1 s. The answer is not compressed: the service does not ask for that.
pub async fn app_whose_export_stalls(test: &str) -> (TestApp, Vec<Value>) {
    // The export is the only read that sets `max_bytes_before_external_sort`.
    let marker = "max_bytes_before_external_sort";
    let clickhouse = stalling_proxy(&local_clickhouse::shared_url(), marker, 256 << 10).await;
    let limits = [
        ("ADTRACK_EXPORT_MAX_EXECUTION_MS", "1000"),
        ("ADTRACK_EXPORT_SETTLE_MS", "0"),
    ];
    let app = spawn_app_on(&clickhouse, test, TENANT, &limits).await;
    let sent = events(10_000);
    let stored = app
        .post_and_wait(Value::Array(sent.clone()).to_string())
        .await;
    assert_eq!(stored.status, 200, "{}", stored.text);
    (app, sent)
}

/// `GET /v1/events/export` at `base` (the app, or a proxy in front of it) with `http`: after
/// checking the answer is a 200, its body as far as it came and how it ended (`Err` for a
/// broken transfer). Fails the test if the body has not ended within 30 s.
pub async fn export_as_far_as_it_comes(
    http: &reqwest::Client,
    base: &str,
) -> (Vec<u8>, reqwest::Result<()>) {
    let url = format!("{base}/v1/events/export");
    let mut response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "the first row came");
    let mut received = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => received.extend_from_slice(&chunk),
                Ok(None) => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    })
    .await
    .expect("the body ends; it does not wait for ClickHouse forever");
    (received, end)
}
