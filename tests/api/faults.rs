//! Fault tests: kill -9 under load, ClickHouse down under load, rows ClickHouse refuses,
//! graceful shutdown, a ClickHouse that stops answering (at all, or midway through an
//! export). The promise checked each time: every acknowledged event is in ClickHouse exactly
//! once, and clients saw only answers that were true.

use std::{collections::HashSet, time::Duration};

use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_and_doubles_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let url = local_clickhouse::shared_url();
    let database = unique_database("kill9");
    let mut env = base_env(&url, &database, tmp.path());
    // Small log segments, so the crashes also land in segments reused after their commit
    // (with their old records still in them).
    env.insert("ADTRACK_WAL_SEGMENT_BYTES".into(), "32768".into());
    let db = clickhouse::Client::default()
        .with_url(&url)
        .with_database(&database);

    let mut all_acked = HashSet::new();
    let mut service = ServiceProcess::start(&env).await;
    let key = provision_key(&service.base, TENANT).await;
    // Two crashes, at different points of the flush cycle.
    for pause_ms in [1200, 1750] {
        let load = Load::start(&service.base, &key, 4, Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        service.kill9();
        let (acked, _) = load.finish().await;
        assert!(
            acked.len() > 1000,
            "the load was too light: {}",
            acked.len()
        );
        all_acked.extend(acked);
        service = ServiceProcess::start(&env).await;
    }
    assert_all_stored_once(&db, &all_acked).await;
    service.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_under_load_loses_nothing_and_clients_see_202_or_503() {
    let ch_dir = tempfile::tempdir().unwrap();
    let mut clickhouse = local_clickhouse::LocalClickHouse::start(ch_dir.path());
    let app = {
        let tmp = tempfile::tempdir().unwrap();
        let database = unique_database("ch_down");
        let mut env = base_env(&clickhouse.url, &database, tmp.path());
        // A small disk budget so the test also sees the 503 when it is used up.
        env.insert("ADTRACK_WAL_MAX_PENDING_BYTES".into(), "300000".into());
        (ServiceProcess::start(&env).await, tmp, database)
    };
    let (service, _tmp, database) = app;
    let db = clickhouse::Client::default()
        .with_url(&clickhouse.url)
        .with_database(&database);

    let key = provision_key(&service.base, TENANT).await;
    let load = Load::start(&service.base, &key, 3, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(500)).await;
    clickhouse.kill();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ready = reqwest::get(format!("{}/health/ready", service.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready while ClickHouse is down");
    clickhouse.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (acked, statuses) = load.finish().await;

    let unexpected: Vec<&u16> = statuses
        .keys()
        .filter(|s| ![202, 503].contains(*s))
        .collect();
    assert!(unexpected.is_empty(), "clients saw {statuses:?}");
    assert!(
        statuses.contains_key(&503),
        "the budget never filled: {statuses:?}"
    );
    assert_all_stored_once(&db, &acked).await;
}

/// The dead-letter file of `app` once it has a line (within 10 s).
async fn dead_letter_text(app: &TestApp) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_dir(app.data.join("dead-letter"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|f| std::fs::read_to_string(f.unwrap().path()).ok());
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "no dead-letter file");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rows_clickhouse_refuses_go_to_the_dead_letter_file_and_the_rest_go_in() {
    let app = spawn_app("dead_letter").await;
    // Make ClickHouse refuse one kind of row, as a schema change by an operator might.
    app.db
        .query("ALTER TABLE events ADD CONSTRAINT no_poison CHECK campaign_id != 'poison'")
        .execute()
        .await
        .unwrap();
    let mut batch = events(9);
    let mut poison = event();
    poison["campaign_id"] = json!("poison");
    batch.insert(4, poison.clone());
    let r = app.post(Value::from(batch).to_string(), JSON).await;
    assert_eq!(r.status, 202);
    assert_eq!(app.wait_for_count(9).await, 9);

    let text = dead_letter_text(&app).await;
    let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["events"][0]["event_id"], poison["event_id"]);
    assert_eq!(line["code"], 469, "{line}");
    assert_eq!(app.metric("adtrack_dead_lettered_events_total").await, 1.0);
    // The refused Native blocks were refused as RowBinary rows too: not a fallback.
    assert_eq!(app.metric("adtrack_native_fallbacks_total").await, 0.0);

    // A client that waits for the commit is told when some of its events did not make it,
    // and a wait for clean events in the same batches still answers 200.
    let refused = || {
        let mut e = event();
        e["campaign_id"] = json!("poison");
        e
    };
    // It names them by their place in the request, counted past the ones not accepted.
    let sent = vec![
        json!({"event_id": "not-an-event"}),
        event(),
        refused(),
        event(),
        refused(),
    ];
    let r = app
        .post_and_wait(Value::from(sent.clone()).to_string())
        .await;
    assert_eq!(r.status, 500, "{:?}", r.text);
    assert_eq!(r.json["error"], "refused_by_clickhouse");
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .contains("refused 2 of the 4"),
        "{:?}",
        r.text
    );
    assert_eq!(r.json["accepted"], 4, "{}", r.text);
    assert_eq!(r.json["rejected"][0]["index"], 0, "{}", r.text);
    let named: Vec<(u64, &str)> = r.json["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["event_id"].as_str().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(u64, &str)> = [2, 4]
        .map(|i| (i as u64, sent[i]["event_id"].as_str().unwrap()))
        .to_vec();
    assert_eq!(named, expected, "{}", r.text);
    let (clean, waited) = tokio::join!(
        app.post_and_wait(Value::from(events(5)).to_string()),
        app.post_and_wait(Value::from(vec![poison]).to_string()),
    );
    assert_eq!(clean.status, 200, "{:?}", clean.text);
    assert_eq!(waited.status, 500, "{:?}", waited.text);
    assert_eq!(app.wait_for_count(16).await, 16);
    assert_eq!(app.metric("adtrack_dead_lettered_events_total").await, 4.0);

    // The usage log counts what the 500s accepted (2 of them: 4 events, then 1).
    let accepted: Vec<u32> = wait_for_rows(
        &app.db,
        "SELECT events_accepted FROM usage_log FINAL WHERE status = 500 ORDER BY seq",
        2,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(accepted, vec![4, 1]);
}

#[tokio::test]
async fn refused_rows_stay_in_the_log_while_the_dead_letter_file_cannot_be_written() {
    let app = spawn_app_with(
        "dead_letter_blocked",
        &[("ADTRACK_WAIT_TIMEOUT_MS", "1500")],
    )
    .await;
    app.db
        .query("ALTER TABLE events ADD CONSTRAINT no_poison CHECK campaign_id != 'poison'")
        .execute()
        .await
        .unwrap();
    // Something else stands where the dead-letter directory goes: it cannot be made.
    let dead_letter = app.data.join("dead-letter");
    let _ = std::fs::remove_dir_all(&dead_letter);
    std::fs::write(&dead_letter, b"in the way").unwrap();

    let mut batch = events(4);
    let mut poison = event();
    poison["campaign_id"] = json!("poison");
    batch.insert(2, poison.clone());
    let r = app.post_and_wait(Value::from(batch).to_string()).await;
    // Neither committed nor known refused yet: durable, and still being worked on.
    assert_eq!(r.status, 202, "{:?}", r.text);
    assert_eq!(app.metric("adtrack_dead_lettered_events_total").await, 0.0);

    // Once the file can be written, the refused row is kept there and the rest go in.
    std::fs::remove_file(&dead_letter).unwrap();
    assert_eq!(app.wait_for_count(4).await, 4);
    let text = dead_letter_text(&app).await;
    assert_eq!(text.lines().count(), 1, "{text}");
    let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["events"][0]["event_id"], poison["event_id"]);
    assert_eq!(app.metric("adtrack_dead_lettered_events_total").await, 1.0);
}

#[tokio::test]
async fn a_commit_is_announced_only_once_its_checkpoint_is_written() {
    let app = spawn_app_with("checkpoint_blocked", &[("ADTRACK_WAIT_TIMEOUT_MS", "1500")]).await;
    // The log's checkpoint cannot be written (directories in place of its two slots).
    let slots = ["checkpoint.0", "checkpoint.1"].map(|slot| app.data.join("wal").join(slot));
    for slot in &slots {
        std::fs::remove_file(slot).unwrap();
        std::fs::create_dir(slot).unwrap();
    }
    // The rows reach ClickHouse, but a crash now would send them again after a deletion of
    // the user's data (which waits for the commit): not committed yet.
    let r = app.post_and_wait(Value::from(events(3)).to_string()).await;
    assert_eq!(r.status, 202, "{:?}", r.text);
    assert_eq!(app.wait_for_count(3).await, 3);

    for slot in &slots {
        std::fs::remove_dir(slot).unwrap();
    }
    let r = app.post_and_wait(Value::from(events(2)).to_string()).await;
    assert_eq!(r.status, 200, "{:?}", r.text);
    assert_eq!(app.count_final().await, 5);
}

#[tokio::test]
async fn graceful_shutdown_drains_the_log_into_clickhouse() {
    let mut app = spawn_app_with("drain", &[("ADTRACK_FLUSH_INTERVAL_MS", "60000")]).await;
    let r = app.post(Value::from(events(100)).to_string(), JSON).await;
    assert_eq!(r.status, 202);
    assert_eq!(
        app.count_final().await,
        0,
        "nothing flushed before the stop"
    );
    assert!(app.metric("adtrack_wal_pending_bytes").await > 0.0);
    app.stop().await;
    assert_eq!(app.count_final().await, 100);
}

#[tokio::test]
async fn log_segments_are_deleted_once_clickhouse_has_their_rows() {
    // Nothing is inserted until all 1,000 events are in the log (then the row limit triggers).
    let app = spawn_app_with(
        "segments",
        &[
            ("ADTRACK_WAL_SEGMENT_BYTES", "16384"),
            ("ADTRACK_FLUSH_MAX_ROWS", "1000"),
            ("ADTRACK_FLUSH_INTERVAL_MS", "60000"),
        ],
    )
    .await;
    let files = |extension: &str| {
        std::fs::read_dir(app.data.join("wal"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == extension)
            })
            .count()
    };
    let segments = || files("wal");
    for _ in 0..10 {
        let r = app.post(Value::from(events(100)).to_string(), JSON).await;
        assert_eq!(r.status, 202);
    }
    assert!(segments() > 3, "the log rotated: {} segments", segments());
    assert_eq!(app.wait_for_count(1000).await, 1000);
    // The shipper checkpoints after each commit and deletes what is committed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while segments() > 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(segments() <= 2, "{} segments left", segments());
    // At most two committed segments are kept, to be reused instead of zero-filling new ones.
    assert!(files("spare") <= 2, "{} spare segments", files("spare"));
}

/// The service in this process, started from `env` (it may start without ClickHouse).
async fn build(
    env: &std::collections::HashMap<String, String>,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let settings = adtrack::config::Settings::from_lookup(|k| env.get(k).cloned()).unwrap();
    let app = adtrack::startup::Application::build(settings)
        .await
        .unwrap();
    let base = format!("http://{}", app.addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    (base, stop, server)
}

/// A key made while ClickHouse on `port` was up (the instance keeps a snapshot of the keys,
/// so a later start knows it without ClickHouse); ClickHouse is gone again on return.
async fn key_made_while_clickhouse_was_up(
    env: &std::collections::HashMap<String, String>,
    port: u16,
) -> (String, local_clickhouse::LocalClickHouse, tempfile::TempDir) {
    let ch_dir = tempfile::tempdir().unwrap();
    let mut clickhouse = local_clickhouse::LocalClickHouse::start_on(ch_dir.path(), port);
    let (base, stop, server) = build(env).await;
    let key = provision_key(&base, TENANT).await;
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    clickhouse.kill();
    (key, clickhouse, ch_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_starts_and_accepts_while_clickhouse_is_down() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let tmp = tempfile::tempdir().unwrap();
    let database = unique_database("starts_down");
    let mut env = base_env(&url, &database, tmp.path());
    env.insert("ADTRACK_CLICKHOUSE_STARTUP_WAIT_SECS".into(), "1".into());
    let (key, mut clickhouse, _ch_dir) = key_made_while_clickhouse_was_up(&env, port).await;

    // Restarted while ClickHouse is down: it still knows the key, and accepts into its log.
    let (base, stop, server) = build(&env).await;
    let http = client_with_key(&key);

    let batch = events(50);
    let r = http
        .post(format!("{base}/v1/events"))
        .header("content-type", JSON)
        .body(Value::from(batch.clone()).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        202,
        "accepted into the log while ClickHouse is down"
    );
    let ready = http
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    // ClickHouse comes back; the shipper checks the schema and sends the log.
    clickhouse.restart();
    let db = clickhouse::Client::default()
        .with_url(&url)
        .with_database(&database);
    assert_eq!(wait_for_count(&db, 50, Duration::from_secs(30)).await, 50);
    let ready = http
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_that_never_answers_holds_up_no_start_readiness_read_or_stop() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let tmp = tempfile::tempdir().unwrap();
    let mut env = base_env(&url, &unique_database("stalled"), tmp.path());
    env.insert("ADTRACK_CLICKHOUSE_STARTUP_WAIT_SECS".into(), "1".into());
    env.insert("ADTRACK_SHUTDOWN_TIMEOUT_SECS".into(), "2".into());
    // Reads (analytics, raw events, admin) wait for this and 5 s more, then answer 503.
    env.insert("ADTRACK_ANALYTICS_MAX_EXECUTION_MS".into(), "500".into());
    env.insert("ADTRACK_EXPORT_MAX_EXECUTION_MS".into(), "500".into());
    let (key, _clickhouse, _ch_dir) = key_made_while_clickhouse_was_up(&env, port).await;

    // Now the port takes connections and never answers: a stopped or wedged server.
    let _stalled = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let within = |secs| Duration::from_secs(secs);
    let (base, stop, server) = tokio::time::timeout(within(5), build(&env))
        .await
        .expect("the start waits 1 s for ClickHouse, not forever");

    let ready = reqwest::get(format!("{base}/health/ready"));
    let ready = tokio::time::timeout(within(10), ready)
        .await
        .expect("readiness answers whether ClickHouse does or not")
        .unwrap();
    assert_eq!(ready.status(), 503);

    let http = client_with_key(&key);
    let reads = [
        "/v1/stats/summary?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z",
        "/v1/events",
        "/v1/events/export",
        "/v1/events/00000000-0000-4000-8000-000000000000",
        "/v1/admin/tenants",
        "/v1/admin/keys",
        "/v1/admin/usage?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z",
        "/v1/admin/usage/hourly?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z",
    ]
    .map(|path| {
        let read = http.get(format!("{base}{path}")).send();
        async move {
            let r = tokio::time::timeout(within(15), read)
                .await
                .unwrap_or_else(|_| panic!("{path} waited for ClickHouse without limit"))
                .unwrap();
            let retry_after = r.headers().get("retry-after").cloned();
            (path, r.status(), retry_after, r.text().await.unwrap())
        }
    });
    for (path, status, retry_after, body) in futures_util::future::join_all(reads).await {
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(retry_after.unwrap(), "5", "{path}: when to retry");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "clickhouse_unavailable", "{path}");
    }

    let r = http
        .post(format!("{base}/v1/events"))
        .header("content-type", JSON)
        .body(Value::from(events(20)).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "accepted into the log");
    // Let the shipper start its attempt, which hangs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(()).unwrap();
    tokio::time::timeout(within(15), server)
        .await
        .expect("the stop gives up draining after its 2 s")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_whose_clickhouse_stalls_midway_is_cut_off_at_its_deadline() {
    let (app, sent) = app_whose_export_stalls("export_stall").await;
    let started = std::time::Instant::now();
    let (received, end) = export_as_far_as_it_comes(&app.http, &app.base).await;
    assert!(end.is_err(), "a broken transfer, not a clean end");
    // The limit (1 s) and 5 s, counted from the query.
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(6), "broke off after {took:?}");

    let text = String::from_utf8(received).unwrap();
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    let ids: HashSet<String> = ids_of(&sent).into_iter().collect();
    assert!(
        (1..sent.len()).contains(&lines.len()),
        "{} lines of the part that came",
        lines.len()
    );
    for line in &lines[..lines.len() - 1] {
        let line: Value = serde_json::from_str(line).unwrap();
        assert!(ids.contains(line["event_id"].as_str().unwrap()));
    }
}
