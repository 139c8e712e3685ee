//! Re-sent events never count twice: in one batch, across batches, across restarts, before
//! and after ClickHouse merges.

use serde_json::Value;

use crate::helpers::*;

/// Figures as analytics read them (FINAL), and the table after a forced merge.
async fn assert_exactly_once(app: &TestApp, expected: u64) {
    assert_eq!(app.wait_for_count(expected).await, expected, "FINAL count");
    let doubled: Vec<String> = app
        .db
        .query("SELECT toString(event_id) FROM events FINAL GROUP BY event_id HAVING count() > 1")
        .fetch_all()
        .await
        .unwrap();
    assert!(doubled.is_empty(), "doubled: {doubled:?}");
    app.db
        .query("OPTIMIZE TABLE events FINAL")
        .execute()
        .await
        .unwrap();
    let raw: u64 = app
        .db
        .query("SELECT count() FROM events")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(raw, expected, "rows after merge");
}

#[tokio::test]
async fn duplicates_in_one_batch_and_across_batches_count_once() {
    let app = spawn_app("dup_batches").await;
    let batch = events(40);
    let mut with_repeats = batch.clone();
    with_repeats.extend(batch[..10].iter().cloned());
    let r = app.post(Value::from(with_repeats).to_string(), JSON).await;
    assert_eq!(r.status, 202);

    // The same events again, in other batch shapes, some after the first flush.
    app.wait_for_count(40).await;
    assert_eq!(app.metric("adtrack_duplicate_events_total").await, 10.0);
    app.post(Value::from(batch[20..].to_vec()).to_string(), JSON)
        .await;
    for e in &batch[..5] {
        app.post(e.to_string(), JSON).await;
    }
    let r = app
        .post_and_wait(Value::from(batch.clone()).to_string())
        .await;
    assert_eq!(r.status, 200);
    assert_exactly_once(&app, 40).await;
}

#[tokio::test]
async fn a_retry_with_a_new_sent_at_still_counts_once() {
    // A retry is rarely byte-identical: SDKs stamp `sent_at` per attempt.
    let app = spawn_app("dup_sent_at").await;
    let mut first = event();
    let now = chrono::Utc::now();
    first["sent_at"] = Value::from((now - chrono::Duration::hours(3)).to_rfc3339());
    let mut retry = first.clone();
    retry["sent_at"] = Value::from((now - chrono::Duration::minutes(1)).to_rfc3339());
    app.post(first.to_string(), JSON).await;
    app.wait_for_count(1).await;
    let r = app.post(retry.to_string(), JSON).await;
    assert_eq!(r.status, 202);
    // Give the retry time to be flushed, then check it replaced rather than added.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_exactly_once(&app, 1).await;
}

#[tokio::test]
async fn duplicates_across_a_restart_count_once() {
    let app = spawn_app("dup_restart").await;
    let batch = events(30);
    app.post(Value::from(batch.clone()).to_string(), JSON).await;
    let app = app.restart().await;
    let r = app.post_and_wait(Value::from(batch).to_string()).await;
    assert_eq!(r.status, 200);
    assert_exactly_once(&app, 30).await;
}
