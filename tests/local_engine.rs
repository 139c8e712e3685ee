//! The local ClickHouse (`scripts/local-clickhouse`) through the official `clickhouse` crate,
//! used exactly as the service uses it: default LZ4 compression and schema validation on.
//!
//! These tests are the evidence that the service cannot tell the local engine from a real
//! clickhouse-server. With `ADTRACK_TEST_CLICKHOUSE_URL` set they run against that server instead
//! (except the restart test, which needs a process of its own).
//!
//! Each test works in its own database named after it. Timings are printed (see them with
//! `cargo test --test local_engine -- --nocapture`).

#[path = "support/local_clickhouse.rs"]
mod local_clickhouse;

use std::time::Instant;

use chrono::{DateTime, Duration, TimeZone, Utc};
use clickhouse::{error::Error, Client, Row};
use local_clickhouse::{shared_url, LocalClickHouse};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A client for a fresh database `name` on the server at `url`.
async fn fresh_database(url: &str, name: &str) -> Client {
    let admin = Client::default().with_url(url);
    admin
        .query("DROP DATABASE IF EXISTS ?")
        .bind(clickhouse::sql::Identifier(name))
        .execute()
        .await
        .expect("drop database");
    admin
        .query("CREATE DATABASE ?")
        .bind(clickhouse::sql::Identifier(name))
        .execute()
        .await
        .expect("create database");
    Client::default().with_url(url).with_database(name)
}

const EVENTS_DDL: &str = "
    CREATE TABLE events (
        event_id   UUID,
        id         UInt64,
        ts         DateTime('UTC'),
        campaign   LowCardinality(String),
        cost       Float64,
        version    UInt32
    )
    ENGINE = ReplacingMergeTree(version)
    PARTITION BY toYYYYMMDD(ts)
    ORDER BY (campaign, id)
    TTL ts + INTERVAL 30 DAY";

#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
struct Event {
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
    id: u64,
    #[serde(with = "clickhouse::serde::chrono::datetime")]
    ts: DateTime<Utc>,
    campaign: String,
    cost: f64,
    version: u32,
}

/// Deterministic content for row `id`, so a read-back can check every field of every row.
fn event(id: u64, version: u32, base: DateTime<Utc>) -> Event {
    Event {
        event_id: Uuid::from_u64_pair(id.wrapping_mul(0x9E37_79B9_7F4A_7C15), id),
        id,
        ts: base + Duration::seconds((id % 86_400) as i64),
        campaign: format!("campaign-{}", id % 7),
        cost: id as f64 * 0.25,
        version,
    }
}

fn today() -> DateTime<Utc> {
    let now = Utc::now();
    Utc.from_utc_datetime(&now.date_naive().and_hms_opt(0, 0, 0).unwrap())
}

async fn insert_events(client: &Client, rows: impl IntoIterator<Item = Event>) {
    let mut insert = client.insert::<Event>("events").await.expect("insert");
    for row in rows {
        insert.write(&row).await.expect("write");
    }
    insert.end().await.expect("end insert");
}

async fn count(client: &Client, sql: &str) -> u64 {
    client.query(sql).fetch_one::<u64>().await.expect(sql)
}

fn assert_clickhouse_error(result: Result<impl std::fmt::Debug, Error>, code: &str) {
    match result {
        Err(Error::BadResponse(message)) => {
            assert!(
                message.starts_with(&format!("Code: {code}. DB::Exception:")),
                "expected ClickHouse error {code}, got: {message}"
            );
        }
        other => panic!("expected ClickHouse error {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn ddl_with_replacing_merge_tree_partitions_and_ttl_works() {
    let client = fresh_database(&shared_url(), "local_engine_ddl").await;
    client
        .query(EVENTS_DDL)
        .execute()
        .await
        .expect("create table");

    #[derive(Row, Deserialize)]
    struct TableInfo {
        engine: String,
        partition_key: String,
        sorting_key: String,
        create_table_query: String,
    }
    let info = client
        .query(
            "SELECT engine, partition_key, sorting_key, create_table_query \
             FROM system.tables WHERE database = currentDatabase() AND name = 'events'",
        )
        .fetch_one::<TableInfo>()
        .await
        .expect("system.tables");
    assert_eq!(info.engine, "ReplacingMergeTree");
    assert_eq!(info.partition_key, "toYYYYMMDD(ts)");
    assert_eq!(info.sorting_key, "campaign, id");
    assert!(
        info.create_table_query
            .contains("TTL ts + toIntervalDay(30)"),
        "{}",
        info.create_table_query
    );

    // The TTL is applied, not just parsed: a row older than 30 days goes at the next merge.
    let base = today();
    let old = Event {
        ts: base - Duration::days(40),
        ..event(1, 1, base)
    };
    insert_events(&client, [old, event(2, 1, base)]).await;
    client
        .query("OPTIMIZE TABLE events FINAL")
        .execute()
        .await
        .expect("optimize");
    let ids = client
        .query("SELECT id FROM events ORDER BY id")
        .fetch_all::<u64>()
        .await
        .expect("ids");
    assert_eq!(ids, vec![2]);
}

#[tokio::test]
async fn a_million_rows_round_trip_exactly() {
    const ROWS: u64 = 1_000_000;
    let client = fresh_database(&shared_url(), "local_engine_million").await;
    client
        .query(EVENTS_DDL)
        .execute()
        .await
        .expect("create table");
    let base = today();

    // Rows are built before the clock starts and checked after it stops, so the figures are
    // the crate + server, not this (unoptimised) test's own row building.
    let rows: Vec<Event> = (0..ROWS).map(|id| event(id, 1, base)).collect();
    let started = Instant::now();
    insert_events(&client, rows.iter().cloned()).await;
    let insert_secs = started.elapsed().as_secs_f64();

    // Server-side aggregates first: they do not depend on the read path.
    #[derive(Row, Deserialize)]
    struct Totals {
        rows: u64,
        ids: u64,
        distinct_events: u64,
    }
    let totals = client
        .query("SELECT count() AS rows, sum(id) AS ids, uniqExact(event_id) AS distinct_events FROM events")
        .fetch_one::<Totals>()
        .await
        .expect("totals");
    assert_eq!(totals.rows, ROWS);
    assert_eq!(totals.ids, ROWS * (ROWS - 1) / 2);
    assert_eq!(totals.distinct_events, ROWS);

    // Then every row back through the streamed read path (many chunks: pitfall 1 would show
    // up here as extra rows), field by field.
    let started = Instant::now();
    let read_back = client
        .query("SELECT ?fields FROM events ORDER BY id")
        .fetch_all::<Event>()
        .await
        .expect("fetch");
    let read_secs = started.elapsed().as_secs_f64();
    assert_eq!(read_back.len() as u64, ROWS, "rows read back");
    for (expected, actual) in rows.iter().zip(&read_back) {
        assert_eq!(actual, expected);
    }

    eprintln!(
        "1M rows: insert {:.2} s ({:.0} rows/s), read {:.2} s ({:.0} rows/s)",
        insert_secs,
        ROWS as f64 / insert_secs,
        read_secs,
        ROWS as f64 / read_secs
    );
}

#[tokio::test]
async fn final_collapses_duplicates_to_the_latest_version() {
    let client = fresh_database(&shared_url(), "local_engine_final").await;
    client
        .query(EVENTS_DDL)
        .execute()
        .await
        .expect("create table");
    let base = today();

    // Three inserts, three parts: ids 0..1000 at version 1, all again at version 2 (a retried
    // batch), and half of them once more at version 3.
    insert_events(&client, (0..1000).map(|id| event(id, 1, base))).await;
    insert_events(&client, (0..1000).map(|id| event(id, 2, base))).await;
    insert_events(&client, (0..500).map(|id| event(id, 3, base))).await;

    assert!(count(&client, "SELECT count() FROM events").await >= 1000);
    assert_eq!(
        count(&client, "SELECT count() FROM events FINAL").await,
        1000
    );
    assert_eq!(
        count(&client, "SELECT countIf(version = 3) FROM events FINAL").await,
        500
    );
    assert_eq!(
        count(&client, "SELECT countIf(version = 2) FROM events FINAL").await,
        500
    );
}

#[tokio::test]
async fn server_errors_reach_the_crate_with_their_clickhouse_code() {
    let client = fresh_database(&shared_url(), "local_engine_errors").await;
    client
        .query(EVENTS_DDL)
        .execute()
        .await
        .expect("create table");
    insert_events(&client, (0..10).map(|id| event(id, 1, today()))).await;

    // Syntax error.
    assert_clickhouse_error(client.query("SELEC 1").fetch_all::<u8>().await, "62");
    assert_clickhouse_error(client.query("CREATE TABLE (").execute().await, "62");
    // Unknown table, for a read and for an insert (the schema lookup fails).
    assert_clickhouse_error(
        client.query("SELECT id FROM nope").fetch_all::<u64>().await,
        "60",
    );
    assert_clickhouse_error(client.insert::<Event>("nope").await.map(|_| ()), "60");
    // Type mismatch: a string bound where the column is a UInt64.
    assert_clickhouse_error(
        client
            .query("SELECT id FROM events WHERE id = ?")
            .bind("abc")
            .fetch_all::<u64>()
            .await,
        "53",
    );
    // Unknown database.
    assert_clickhouse_error(
        Client::default()
            .with_url(shared_url())
            .with_database("local_engine_no_such_database")
            .query("SELECT 1")
            .fetch_one::<u8>()
            .await,
        "81",
    );

    // An insert that fails before its data is read: without validation there is no schema
    // lookup, so the server's error must come back as the answer to the insert itself
    // (pitfall 6), not as a dropped connection.
    let unvalidated = client.clone().with_validation(false);
    let mut insert = unvalidated.insert::<Event>("nope").await.expect("insert");
    let mut result = Ok(());
    for id in 0..50_000 {
        result = insert.write(&event(id, 1, today())).await;
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = insert.end().await;
    }
    assert_clickhouse_error(result, "60");

    // An error after the response started streaming (ClickHouse's exception block), and the
    // connection pool still works afterwards (pitfall 5).
    let mut cursor = client
        .query("SELECT throwIf(number = 300000) FROM numbers(1000000)")
        .fetch::<u8>()
        .expect("fetch");
    let outcome = loop {
        match cursor.next().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    assert_clickhouse_error(outcome, "395");
    for _ in 0..5 {
        assert_eq!(count(&client, "SELECT count() FROM events").await, 10);
    }

    // Schema validation (on by default) compares the row type with the server's
    // RowBinaryWithNamesAndTypes header: a wrong field type is caught client-side.
    #[derive(Debug, Row, Deserialize)]
    #[allow(dead_code)] // only its type matters
    struct WrongType {
        id: String,
    }
    let wrong = client
        .query("SELECT id FROM events LIMIT 1")
        .fetch_one::<WrongType>()
        .await;
    assert!(matches!(wrong, Err(Error::SchemaMismatch(_))), "{wrong:?}");
}

#[tokio::test]
async fn server_side_parameters_and_per_query_settings() {
    let client = fresh_database(&shared_url(), "local_engine_params").await;
    client
        .query(EVENTS_DDL)
        .execute()
        .await
        .expect("create table");
    insert_events(&client, (0..100).map(|id| event(id, 1, today()))).await;

    // `.param()` travels as a multipart body with `param_*` fields.
    let n = client
        .query("SELECT count() FROM events WHERE id < {limit:UInt64} AND campaign = {c:String}")
        .param("limit", 50)
        .param("c", "campaign-3")
        .fetch_one::<u64>()
        .await
        .expect("param query");
    assert_eq!(n, (0..50).filter(|id| id % 7 == 3).count() as u64);

    // URL settings apply to their query only, even `readonly`, which a connection cannot undo.
    let limited = client
        .query("SELECT id FROM events")
        .with_setting("max_result_rows", "10")
        .with_setting("result_overflow_mode", "throw")
        .fetch_all::<u64>()
        .await;
    assert_clickhouse_error(limited, "396");
    let readonly = client
        .query("INSERT INTO events (id) VALUES (1)")
        .with_setting("readonly", "1")
        .execute()
        .await;
    assert_clickhouse_error(readonly, "164");
    for _ in 0..20 {
        // Enough queries to go through every pooled connection.
        assert_eq!(
            client
                .query(
                    "SELECT toUInt64(getSetting('max_result_rows')), \
                     toUInt64(getSetting('readonly'))",
                )
                .fetch_one::<(u64, u64)>()
                .await
                .expect("settings"),
            (0, 0)
        );
    }
    client
        .query("INSERT INTO events (id, version) VALUES (1000, 1)")
        .execute()
        .await
        .expect("writes work again");
}

#[tokio::test]
async fn concurrent_writers_and_readers_stay_exact() {
    const WRITERS: u64 = 4;
    const BATCHES: u64 = 10;
    const BATCH: u64 = 5_000;
    let client = fresh_database(&shared_url(), "local_engine_concurrency").await;
    client
        .query(EVENTS_DDL)
        .execute()
        .await
        .expect("create table");
    let base = today();

    let writers = (0..WRITERS).map(|w| {
        let client = client.clone();
        tokio::spawn(async move {
            for b in 0..BATCHES {
                let first = (w * BATCHES + b) * BATCH;
                insert_events(&client, (first..first + BATCH).map(|id| event(id, 1, base))).await;
            }
        })
    });
    let writers: Vec<_> = writers.collect();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut last = 0;
                let mut reads = 0;
                loop {
                    let (rows, ids) = client
                        .query("SELECT count(), sum(id) FROM events FINAL")
                        .fetch_one::<(u64, u64)>()
                        .await
                        .expect("read");
                    // Inserts are atomic: a reader sees whole batches, never fewer rows later.
                    assert_eq!(rows % BATCH, 0, "partial batch visible: {rows}");
                    assert!(rows >= last, "count went back from {last} to {rows}");
                    last = rows;
                    reads += 1;
                    if rows == WRITERS * BATCHES * BATCH {
                        let total = rows * (rows - 1) / 2;
                        assert_eq!(ids, total);
                        return reads;
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    for reader in readers {
        assert!(reader.await.expect("reader") > 0);
    }
    assert_eq!(
        count(&client, "SELECT count() FROM events FINAL").await,
        WRITERS * BATCHES * BATCH
    );
}

#[tokio::test]
async fn data_survives_sigkill_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = LocalClickHouse::start(&dir.path().join("clickhouse"));
    let client = fresh_database(&server.url, "local_engine_restart").await;
    client
        .query(EVENTS_DDL)
        .execute()
        .await
        .expect("create table");
    let base = today();
    insert_events(&client, (0..10_000).map(|id| event(id, 1, base))).await;

    server.kill();
    assert!(
        client.query("SELECT 1").fetch_one::<u8>().await.is_err(),
        "the server is gone"
    );
    server.restart();
    // A new client after each restart: hyper's pool may still hold a keep-alive socket to the
    // old process, as it would with a real clickhouse-server restart.
    let client = Client::default()
        .with_url(&server.url)
        .with_database("local_engine_restart");
    assert_eq!(count(&client, "SELECT count() FROM events").await, 10_000);
    let row = client
        .query("SELECT ?fields FROM events WHERE id = 1234")
        .fetch_one::<Event>()
        .await
        .expect("row");
    assert_eq!(row, event(1234, 1, base));

    // And after a graceful stop (SIGTERM) too, with writes from the second life.
    insert_events(&client, (10_000..20_000).map(|id| event(id, 1, base))).await;
    server.restart();
    let client = Client::default()
        .with_url(&server.url)
        .with_database("local_engine_restart");
    assert_eq!(count(&client, "SELECT count() FROM events").await, 20_000);
    assert!(server.log().contains("listening on 127.0.0.1:"));
}
