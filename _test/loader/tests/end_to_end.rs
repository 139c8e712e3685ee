//! The loader binary against the real service: everything it sends is accepted, and ClickHouse
//! ends up with each distinct event exactly once (duplicates it re-sent count once).

#[path = "../../../tests/support/local_clickhouse.rs"]
mod local_clickhouse;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The service binary, built beside the loader's (by `cargo test --workspace`, or here).
fn adtrack_binary() -> PathBuf {
    let loader = Path::new(env!("CARGO_BIN_EXE_adtrack-loader"));
    let binary = loader.with_file_name("adtrack");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "adtrack", "--bin", "adtrack"]);
        if loader.parent().is_some_and(|dir| dir.ends_with("release")) {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the adtrack binary failed");
    }
    binary
}

struct Service {
    child: Child,
    base: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ADMIN_KEY: &str = "loader-test-bootstrap-admin-key-0123456789";

/// Creates a tenant and a key of it without rate limits, through the admin API.
async fn create_key(base: &str) -> String {
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .header("authorization", format!("Bearer {ADMIN_KEY}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let r = post(
        "/v1/admin/tenants",
        serde_json::json!({"tenant_id": "loader"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = post(
        "/v1/admin/keys",
        serde_json::json!({"tenant_id": "loader", "name": "loader", "scopes": ["ingest"],
                           "rate_limit": {"requests_per_sec": 0, "events_per_sec": 0}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    body["key"].as_str().unwrap().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_service(clickhouse: &str, database: &str, data: &Path) -> Service {
    let port = free_port();
    let log = |k: &str| std::env::var(k).unwrap_or_else(|_| "off".into());
    let child = Command::new(adtrack_binary())
        .env("ADTRACK_CLICKHOUSE_URL", clickhouse)
        .env("ADTRACK_CLICKHOUSE_DATABASE", database)
        .env("ADTRACK_LISTEN", format!("127.0.0.1:{port}"))
        .env("ADTRACK_WAL_DIR", data.join("wal"))
        .env("ADTRACK_DEAD_LETTER_DIR", data.join("dead-letter"))
        .env("ADTRACK_WAL_SEGMENT_BYTES", "4194304")
        .env("ADTRACK_FLUSH_INTERVAL_MS", "100")
        .env("ADTRACK_ADMIN_KEY", ADMIN_KEY)
        .env("LOG_LEVEL", log("TEST_LOG"))
        .stdout(Stdio::null())
        .spawn()
        .expect("the adtrack binary starts");
    let service = Service {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(format!("{}/health/ready", service.base)).await {
            if r.status() == 200 {
                return service;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the service did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn query(clickhouse: &str, database: &str, sql: &str) -> String {
    let r = reqwest::Client::new()
        .post(format!("{clickhouse}/?database={database}"))
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{sql}: {}", r.status());
    r.text().await.unwrap().trim().to_string()
}

/// Runs the loader to the end; returns its JSON summary.
fn run_loader(name: &str, args: &[&str], dir: &Path) -> Value {
    let summary = dir.join(format!("{name}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_adtrack-loader"))
        .args(args)
        .arg("--quiet")
        .arg("--summary-json")
        .arg(&summary)
        .output()
        .expect("the loader runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the loader failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("achieved rate"), "no summary: {stdout}");
    serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loader_drives_the_service_and_clickhouse_holds_each_event_once() {
    let tmp = tempfile::tempdir().unwrap();
    let clickhouse = local_clickhouse::shared_url();
    let database = format!("t_loader_{}", std::process::id());
    let service = start_service(&clickhouse, &database, tmp.path()).await;
    let key = create_key(&service.base).await;

    let json = run_loader(
        "json",
        &[
            "--url",
            &service.base,
            "--api-key",
            &key,
            "--events",
            "6000",
            "--rate",
            "4000",
            "--batch",
            "50",
            "--concurrency",
            "4",
            "--seed",
            "11",
            "--duplicate-rate",
            "0.05",
            "--late-rate",
            "0.05",
        ],
        tmp.path(),
    );
    let ndjson = run_loader(
        "ndjson",
        &[
            "--url",
            &service.base,
            "--api-key",
            &key,
            "--events",
            "500",
            "--rate",
            "0",
            "--seed",
            "12",
            "--format",
            "ndjson",
            "--gzip",
        ],
        tmp.path(),
    );

    let mut unique = 0;
    for s in [&json, &ndjson] {
        assert_eq!(s["accepted"], s["events_sent"], "{s}");
        assert_eq!(s["rejected"], 0, "{s}");
        assert_eq!(s["failed"], 0, "{s}");
        unique += s["unique_events_sent"].as_u64().unwrap();
    }
    assert_eq!(json["events_sent"], 6000);
    assert!(json["duplicates_sent"].as_u64().unwrap() > 100, "{json}");
    assert!(json["late_sent"].as_u64().unwrap() > 100, "{json}");
    assert!(json["rate_per_s"].as_f64().unwrap() > 1000.0, "{json}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: u64 = query(&clickhouse, &database, "SELECT count() FROM events FINAL")
            .await
            .parse()
            .unwrap();
        if n >= unique || Instant::now() > deadline {
            assert_eq!(n, unique, "distinct events in ClickHouse");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_type = query(
        &clickhouse,
        &database,
        "SELECT countIf(event_type = 'impression'), countIf(event_type = 'click'), \
         countIf(event_time < received_at - INTERVAL 2 MINUTE) FROM events FINAL FORMAT CSV",
    )
    .await;
    let n: Vec<u64> = by_type.split(',').map(|v| v.parse().unwrap()).collect();
    assert!(n[0] > 5000 && n[1] > 0 && n[1] < n[0] / 10, "{by_type}");
    assert!(n[2] > 100, "late events keep their time: {by_type}");
}
