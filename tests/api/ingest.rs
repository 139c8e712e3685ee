//! `POST /v1/events`: every input variant, every error status, partial batches, limits.

use serde_json::{json, Value};

use crate::helpers::*;

fn ndjson(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until ClickHouse holds as many events as `valid`, and checks they are those.
async fn assert_only_these_stored(app: &TestApp, valid: &[Value]) {
    let count = valid.len() as u64;
    assert_eq!(app.wait_for_count(count).await, count);
    let stored: Vec<String> = app
        .db
        .query("SELECT toString(event_id) AS id FROM events FINAL ORDER BY id")
        .fetch_all()
        .await
        .unwrap();
    let mut expected = ids_of(valid);
    expected.sort();
    assert_eq!(stored, expected, "only the valid events went in");
}

#[tokio::test]
async fn a_single_event_is_accepted_and_reaches_clickhouse() {
    let app = spawn_app("single").await;
    let r = app.post(event().to_string(), JSON).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json, json!({"accepted": 1, "rejected": []}));
    assert_eq!(app.wait_for_count(1).await, 1);
}

#[tokio::test]
async fn an_array_ndjson_and_gzip_bodies_are_all_accepted() {
    let app = spawn_app("variants").await;
    let batch = events(50);
    let r = app.post(Value::from(batch.clone()).to_string(), JSON).await;
    assert_eq!((r.status, r.json["accepted"].as_u64()), (202, Some(50)));

    let lines = events(30);
    let r = app.post(ndjson(&lines) + "\n", NDJSON).await;
    assert_eq!((r.status, r.json["accepted"].as_u64()), (202, Some(30)));

    let zipped = gzip(Value::from(events(20)).to_string().as_bytes());
    let r = app
        .post_to(
            "/v1/events",
            zipped,
            &[("content-type", JSON), ("content-encoding", "gzip")],
        )
        .await;
    assert_eq!(
        (r.status, r.json["accepted"].as_u64()),
        (202, Some(20)),
        "{}",
        r.text
    );

    let zipped = gzip(ndjson(&events(10)).as_bytes());
    let r = app
        .post_to(
            "/v1/events",
            zipped,
            &[("content-type", NDJSON), ("content-encoding", "gzip")],
        )
        .await;
    assert_eq!((r.status, r.json["accepted"].as_u64()), (202, Some(10)));

    // A UTF-8 byte-order mark first (as .NET and PowerShell write): read as if it were not there.
    const BOM: &str = "\u{feff}";
    let r = app.post(format!("{BOM}{}", event()), JSON).await;
    assert_eq!(
        (r.status, r.json["accepted"].as_u64()),
        (202, Some(1)),
        "{}",
        r.text
    );
    let r = app
        .post(format!("{BOM}{}", ndjson(&events(2))), NDJSON)
        .await;
    assert_eq!(
        (r.status, r.json["accepted"].as_u64()),
        (202, Some(2)),
        "{}",
        r.text
    );
    // Only first: anywhere else it is what it is, malformed JSON.
    let r = app
        .post(format!("[{},{BOM}{}]", event(), event()), JSON)
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json["error"], "malformed_json");

    assert_eq!(app.wait_for_count(113).await, 113);
}

#[tokio::test]
async fn stored_rows_carry_every_field_and_the_corrected_time() {
    let app = spawn_app("fields").await;
    let now = chrono::Utc::now();
    // The client's clock is 2 hours behind ours.
    let client_now = now - chrono::Duration::hours(2);
    let event = json!({
        "event_id": "6f1c1f0e-8a53-4c1e-9d2a-5b7e8f9a0b1c",
        "event_type": "conversion",
        "timestamp": (client_now - chrono::Duration::seconds(10)).to_rfc3339(),
        "sent_at": client_now.to_rfc3339(),
        "campaign_id": "spring.sale:2026", "ad_id": "ad_7", "publisher_id": "news-site",
        "advertiser_id": "acme", "user_id": "user-42", "country": "DE", "device": "tablet",
        "os": "iOS", "browser": "Safari", "cost_micros": 0, "revenue_micros": 25000000,
        "attributes": {"placement": "sidebar", "variant": "b"}
    });
    let r = app.post_and_wait(event.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text);

    #[derive(clickhouse::Row, serde::Deserialize, Debug)]
    struct Stored {
        tenant: String,
        event_type: String,
        campaign_id: String,
        advertiser_id: String,
        user_id: String,
        country: String,
        device: String,
        os: String,
        browser: String,
        revenue_micros: u64,
        placement: String,
        skew_ms: i64,
        delay_ms: i64,
    }
    let row: Stored = app
        .db
        .query(
            "SELECT tenant, toString(event_type) AS event_type, campaign_id, advertiser_id, user_id,
                    country, device, os, browser, revenue_micros, attributes['placement'] AS placement,
                    toUnixTimestamp64Milli(event_time) - toUnixTimestamp64Milli(timestamp) AS skew_ms,
                    toUnixTimestamp64Milli(received_at) - toUnixTimestamp64Milli(event_time) AS delay_ms
             FROM events FINAL WHERE event_id = '6f1c1f0e-8a53-4c1e-9d2a-5b7e8f9a0b1c'",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(row.tenant, TENANT);
    assert_eq!(row.event_type, "conversion");
    assert_eq!(row.campaign_id, "spring.sale:2026");
    assert_eq!(
        (
            row.advertiser_id.as_str(),
            row.user_id.as_str(),
            row.country.as_str()
        ),
        ("acme", "user-42", "DE")
    );
    assert_eq!(
        (row.device.as_str(), row.os.as_str(), row.browser.as_str()),
        ("tablet", "iOS", "Safari")
    );
    assert_eq!(row.revenue_micros, 25_000_000);
    assert_eq!(row.placement, "sidebar");
    // Corrected by the 2-hour offset (give or take the request's own latency).
    assert!(
        (row.skew_ms - 7_200_000).abs() < 5_000,
        "skew {}",
        row.skew_ms
    );
    assert!(
        (row.delay_ms - 10_000).abs() < 5_000,
        "delay {}",
        row.delay_ms
    );
}

#[tokio::test]
async fn a_partial_batch_accepts_the_valid_events_and_explains_the_others() {
    let app = spawn_app("partial").await;
    let good = events(3);
    let mut missing = event();
    missing.as_object_mut().unwrap().remove("campaign_id");
    let mut bad_type = event();
    bad_type["event_type"] = json!("view");
    let mut future = event();
    future["timestamp"] = json!((chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339());
    let mut old = event();
    old["timestamp"] = json!((chrono::Utc::now() - chrono::Duration::days(31)).to_rfc3339());
    let body = json!([good[0], missing, good[1], bad_type, future, old, 42, good[2]]);

    let r = app.post(body.to_string(), JSON).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["accepted"], 3);
    let rejected = r.json["rejected"].as_array().unwrap();
    let summary: Vec<(u64, &str)> = rejected
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["errors"][0]["field"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "campaign_id"),
            (3, "event_type"),
            (4, "timestamp"),
            (5, "timestamp"),
            (6, "")
        ]
    );
    assert_eq!(rejected[0]["event_id"], missing["event_id"]);
    assert_eq!(rejected[0]["errors"][0]["message"], "is required");
    assert!(rejected[2]["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("future"));
    assert!(rejected[3]["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("retention"));

    assert_only_these_stored(&app, &good).await;
}

#[tokio::test]
async fn a_request_with_no_valid_event_is_422_with_the_same_body() {
    let app = spawn_app("all_invalid").await;
    let mut a = event();
    a["country"] = json!("Germany");
    let mut b = event();
    b["cost_micros"] = json!(-1);
    let r = app.post(json!([a, b]).to_string(), JSON).await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.json["accepted"], 0);
    assert_eq!(r.json["rejected"][0]["errors"][0]["field"], "country");
    assert_eq!(r.json["rejected"][1]["errors"][0]["field"], "cost_micros");
}

#[tokio::test]
async fn every_wrong_field_is_named_and_only_objects_are_events() {
    let app = spawn_app("every_field").await;
    let good = events(2);
    // Fields a typed parse would stop at one by one, all in one event.
    let mut wrong = event();
    wrong["event_type"] = Value::Null;
    wrong["device"] = json!(1);
    wrong["os"] = json!(5);
    for field in ["ad_id", "publisher_id"] {
        wrong.as_object_mut().unwrap().remove(field);
    }
    // Sums of amounts this large would wrap around.
    let mut rich = event();
    rich["cost_micros"] = json!(u64::MAX);
    // The fields in order as an array: serde reads that as an event unless told not to.
    let e = event();
    let mut fields = vec![
        e["event_id"].clone(),
        e["event_type"].clone(),
        e["timestamp"].clone(),
    ];
    fields.push(Value::Null);
    fields.extend(["campaign_id", "ad_id", "publisher_id"].map(|f| e[f].clone()));
    fields.extend(std::iter::repeat_n(Value::Null, 9));
    // A repeated key (inexpressible as a `Value`): written by hand.
    let repeated =
        event()
            .to_string()
            .replacen('{', r#"{"attributes":{"slot":"top","slot":"side"},"#, 1);
    let mut numeric = event();
    numeric["attributes"] = json!({"slot": "top", "position": 3});
    let body = format!(
        "[{},{wrong},{rich},{},{repeated},{numeric},{}]",
        good[0],
        Value::Array(fields),
        good[1]
    );

    let r = app.post(body, JSON).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["accepted"], 2, "{}", r.text);
    let errors = |i: usize| -> Vec<(String, String)> {
        r.json["rejected"][i]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["field"].as_str().unwrap().into(),
                    e["message"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let mut named: Vec<String> = errors(0).into_iter().map(|(field, _)| field).collect();
    named.sort();
    assert_eq!(
        named,
        ["ad_id", "device", "event_type", "os", "publisher_id"]
    );
    assert!(errors(0).contains(&(
        "event_type".into(),
        "must be one of impression, click, conversion".into()
    )));
    assert_eq!(errors(1)[0].0, "cost_micros");
    assert!(errors(1)[0].1.contains("1000000000000"), "{:?}", errors(1));
    assert_eq!(errors(2), [("".into(), "must be a JSON object".into())]);
    assert_eq!(
        errors(3),
        [(
            "attributes".into(),
            r#"has the key "slot" more than once"#.into()
        )]
    );
    assert_eq!(
        errors(4),
        [(
            "attributes".into(),
            r#"value of "position" must be a string, not a number (attributes map string keys to string values)"#.into()
        )]
    );
    let indexes: Vec<u64> = (0..5)
        .map(|i| r.json["rejected"][i]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [1, 2, 3, 4, 5]);

    assert_only_these_stored(&app, &good).await;
}

#[tokio::test]
async fn malformed_json_is_400_with_line_and_column() {
    let app = spawn_app("malformed").await;
    let r = app.post("[\n  {\"event_id\": }\n]", JSON).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json["error"], "malformed_json");
    assert_eq!(
        (r.json["line"].as_u64(), r.json["column"].as_u64()),
        (Some(2), Some(16))
    );

    for (body, code) in [
        ("", "empty"),
        ("[]", "empty"),
        ("\"hello\"", "not_an_event_or_array"),
    ] {
        let r = app.post(body, JSON).await;
        assert_eq!(
            (r.status, r.json["error"].as_str()),
            (400, Some(code)),
            "{body}"
        );
    }
    let r = app
        .post_to(
            "/v1/events",
            b"not gzip at all".to_vec(),
            &[("content-type", JSON), ("content-encoding", "gzip")],
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (400, Some("bad_gzip"))
    );
    let r = app.post(vec![b'[', 0xff, 0xfe, b']'], JSON).await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (400, Some("not_utf8"))
    );
}

#[tokio::test]
async fn a_wrong_content_type_or_encoding_is_415() {
    let app = spawn_app("media").await;
    let body = event().to_string();
    let r = app.post(body.clone(), "text/plain").await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let r = app.post_to("/v1/events", body.clone(), &[]).await;
    assert_eq!(r.status, 415);
    let r = app
        .post_to(
            "/v1/events",
            body,
            &[("content-type", JSON), ("content-encoding", "br")],
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (415, Some("unsupported_content_encoding"))
    );
}

#[tokio::test]
async fn limits_give_413_per_request_and_a_rejection_per_event() {
    let app = spawn_app_with(
        "limits",
        &[
            ("ADTRACK_MAX_EVENTS_PER_REQUEST", "5"),
            ("ADTRACK_MAX_BODY_BYTES", "20000"),
            ("ADTRACK_MAX_EVENT_BYTES", "2000"),
        ],
    )
    .await;
    let r = app.post(Value::from(events(6)).to_string(), JSON).await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (413, Some("too_many_events"))
    );
    assert_eq!(r.json["limit"], 5);

    let mut padded = Value::from(events(1)).to_string();
    padded.push_str(&" ".repeat(20_000));
    let r = app.post(padded.clone(), JSON).await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (413, Some("payload_too_large"))
    );

    // A gzip bomb: small on the wire, over the limit once decompressed.
    let bomb = gzip(padded.as_bytes());
    assert!(bomb.len() < 2000);
    let r = app
        .post_to(
            "/v1/events",
            bomb,
            &[("content-type", JSON), ("content-encoding", "gzip")],
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (413, Some("payload_too_large"))
    );

    let mut big = event();
    big["attributes"] = json!((0..10)
        .map(|i| (format!("k{i}"), Value::from("v".repeat(250))))
        .collect::<serde_json::Map<String, Value>>());
    let r = app.post(json!([event(), big]).to_string(), JSON).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["accepted"], 1);
    assert_eq!(r.json["rejected"][0]["index"], 1);
    assert!(r.json["rejected"][0]["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("at most 2000"));
    assert_eq!(app.wait_for_count(1).await, 1);
}

#[tokio::test]
async fn wait_true_answers_200_only_once_the_rows_are_in_clickhouse() {
    let app = spawn_app_with("wait", &[("ADTRACK_FLUSH_INTERVAL_MS", "300")]).await;
    let batch = events(25);
    let r = app.post_and_wait(Value::from(batch).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // No polling: the rows must already be there.
    assert_eq!(app.count_final().await, 25);
}

#[tokio::test]
async fn the_openapi_document_lists_every_status_and_swagger_ui_is_served() {
    let app = spawn_app("openapi").await;
    let spec = app.get("/openapi.json").await;
    assert_eq!(spec.status, 200);
    let op = &spec.json["paths"]["/v1/events"]["post"];
    for status in ["200", "202", "400", "413", "415", "422", "503"] {
        assert!(
            op["responses"][status].is_object(),
            "status {status} missing"
        );
    }
    let content = &op["requestBody"]["content"];
    assert!(content["application/json"].is_object());
    assert!(content["application/x-ndjson"].is_object());
    assert!(spec.json["components"]["schemas"]["Event"]["properties"]["event_id"].is_object());
    let headers = op["responses"]["503"]["headers"].as_object().unwrap();
    assert!(
        headers
            .keys()
            .any(|h| h.eq_ignore_ascii_case("retry-after")),
        "{headers:?}"
    );

    let docs = app.get("/docs").await;
    assert_eq!(docs.status, 200);
    assert!(
        docs.text.contains("swagger"),
        "{}",
        &docs.text[..200.min(docs.text.len())]
    );
    assert_eq!(app.get("/health/live").await.status, 200);
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text);
}

#[tokio::test]
async fn metrics_count_accepted_and_rejected_events() {
    let app = spawn_app("metrics").await;
    let mut bad = event();
    bad["device"] = json!("toaster");
    app.post(json!([event(), event(), bad]).to_string(), JSON)
        .await;
    assert_eq!(app.metric("adtrack_events_accepted_total").await, 2.0);
    assert_eq!(
        app.metric("adtrack_events_rejected_total{reason=\"invalid\"}")
            .await,
        1.0
    );
    app.wait_for_count(2).await;
    // The rows are visible in ClickHouse a moment before the shipper has the answer to its
    // INSERT and counts them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut text = app.get("/metrics").await.text;
    while metric_value(&text, "adtrack_flushed_rows_total") < 2.0
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        text = app.get("/metrics").await.text;
    }
    assert!(metric_value(&text, "adtrack_flushed_rows_total") >= 2.0);
    assert!(metric_value(&text, "adtrack_wal_fsync_seconds_count") >= 1.0);
}

#[tokio::test]
async fn over_the_disk_budget_is_503_with_retry_after_and_nothing_is_accepted() {
    let app = spawn_app_with("budget", &[("ADTRACK_WAL_MAX_PENDING_BYTES", "100")]).await;
    let r = app.post(Value::from(events(3)).to_string(), JSON).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json["error"], "backlog_full");
    assert_eq!(r.headers["retry-after"], "5");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.count_final().await, 0);
    assert_eq!(app.metric("adtrack_requests_over_budget_total").await, 1.0);
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_latency_is_measured_by_route() {
    let app = spawn_app("request_id").await;
    let given = app
        .post_to(
            "/v1/events",
            event().to_string(),
            &[("content-type", JSON), ("x-request-id", "nginx-abc.123")],
        )
        .await;
    assert_eq!(given.headers["x-request-id"], "nginx-abc.123");
    let generated = app.post("not json", JSON).await;
    let id = generated.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "{id}");
    let unusable = app
        .post_to(
            "/v1/events",
            "{}",
            &[("content-type", JSON), ("x-request-id", "a b")],
        )
        .await;
    assert_ne!(unusable.headers["x-request-id"], "a b");

    let text = app.get("/metrics").await.text;
    let line = r#"adtrack_request_seconds_count{route="/v1/events",method="POST",status="202"}"#;
    assert_eq!(metric_value(&text, line), 1.0, "{text}");
    let line = r#"adtrack_request_seconds_count{route="/v1/events",method="POST",status="400"}"#;
    assert_eq!(metric_value(&text, line), 1.0);
}

/// The usual `POST /v1/events` (no query, or only `wait`) is served by a direct route in front
/// of the OpenAPI service; any other query string goes through the documented operation (an
/// unknown parameter is ignored there). Both must answer alike and log alike.
#[tokio::test]
async fn the_direct_route_answers_and_logs_as_the_documented_operation() {
    let app = spawn_app_with("direct_route", &[("ADTRACK_MAX_BODY_BYTES", "20000")]).await;
    let mut mixed = events(2);
    mixed.push(json!({"event_id": "not-a-uuid", "event_type": "view"}));
    type Headers = Vec<(&'static str, &'static str)>;
    let cases: Vec<(&str, Vec<u8>, Headers)> = vec![
        ("one event", event().to_string().into(), vec![]),
        ("mixed batch", Value::from(mixed).to_string().into(), vec![]),
        (
            "nothing valid",
            json!([{"event_id": "x"}]).to_string().into(),
            vec![],
        ),
        ("malformed", b"[{\"event_id\": ".to_vec(), vec![]),
        ("not an event", b"42".to_vec(), vec![]),
        ("empty", Vec::new(), vec![]),
        (
            "ndjson",
            ndjson(&events(3)).into(),
            vec![("content-type", NDJSON)],
        ),
        (
            "gzip",
            gzip(Value::from(events(4)).to_string().as_bytes()),
            vec![("content-encoding", "gzip")],
        ),
        (
            "broken gzip",
            b"not gzip".to_vec(),
            vec![("content-encoding", "gzip")],
        ),
        ("csv", b"a,b".to_vec(), vec![("content-type", "text/csv")]),
        ("too large", vec![b' '; 20_001], vec![]),
    ];
    let mut compared = 0;
    for (name, body, headers) in &cases {
        for wait in ["", "?wait=false", "?wait=true"] {
            // The same parameter, spelled so that only the documented route takes it.
            let documented = match wait {
                "?wait=true" => "?wai%74=true",
                _ => "?wai%74=false",
            }
            .to_string();
            let mut answers = Vec::new();
            for (path, id) in [
                (wait.to_string(), format!("direct-{compared}")),
                (documented, format!("documented-{compared}")),
            ] {
                let mut all = vec![("content-type", JSON), ("x-request-id", id.as_str())];
                all.retain(|(k, _)| !headers.iter().any(|(h, _)| h == k));
                all.extend(headers.iter().copied());
                let r = app
                    .post_to(&format!("/v1/events{path}"), body.clone(), &all)
                    .await;
                let kept = ["content-type", "retry-after", "x-ratelimit-limit"]
                    .map(|h| r.headers.get(h).map(|v| v.to_str().unwrap().to_string()));
                answers.push((r.status, r.text, kept));
            }
            assert_eq!(answers[0], answers[1], "{name}, {wait:?}");
            compared += 1;
        }
    }
    // A query the direct route does not take is answered by the documented operation, with
    // the same JSON error body as every other 400; given twice, `wait` is not silently taken
    // from either.
    for (query, said) in [
        ("wait=yes", "true"),
        ("wait=true&wait=false", "more than once"),
    ] {
        let r = app
            .post_to(
                &format!("/v1/events?{query}"),
                event().to_string(),
                &[("content-type", JSON)],
            )
            .await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(
            (r.json["error"].as_str(), r.json["field"].as_str()),
            (Some("invalid_parameter"), Some("wait")),
            "{}",
            r.text
        );
        assert!(
            r.json["message"].as_str().unwrap().contains(said),
            "{}",
            r.text
        );
    }

    // The usage log saw the same for each pair.
    let rows: Vec<(String, u16, u64, u64, u32, u32)> = wait_for_rows(
        &app.db,
        "SELECT request_id, status, bytes_in, bytes_out, events_accepted, events_rejected \
         FROM usage_log FINAL WHERE route = '/v1/events' \
         AND (request_id LIKE 'direct-%' OR request_id LIKE 'documented-%') \
         ORDER BY request_id",
        2 * compared,
        std::time::Duration::from_secs(30),
    )
    .await;
    assert_eq!(rows.len(), 2 * compared);
    let by_id: std::collections::HashMap<_, _> = rows
        .iter()
        .map(|(id, s, bi, bo, a, r)| (id.as_str(), (*s, *bi, *bo, *a, *r)))
        .collect();
    for i in 0..compared {
        let direct = by_id[format!("direct-{i}").as_str()];
        assert_eq!(
            direct,
            by_id[format!("documented-{i}").as_str()],
            "pair {i}"
        );
    }
    assert!(by_id.values().any(|row| row.3 == 2 && row.4 == 1));
}

#[tokio::test]
async fn a_varied_batch_is_stored_exactly_as_sent() {
    // The shipper sends batches to ClickHouse as Native blocks (columns; a dictionary per
    // LowCardinality column): every kind of column, with and without optional values, and a
    // dictionary over 256 entries (two-byte indexes), must come back exactly as sent.
    let app = spawn_app("varied_batch").await;
    let now = chrono::Utc::now();
    let types = ["impression", "click", "conversion"];
    let devices = ["desktop", "mobile", "tablet", "ctv", "other"];
    let sent: Vec<Value> = (0..600u64)
        .map(|i| {
            let mut e = json!({
                "event_id": uuid::Uuid::new_v4().to_string(),
                "event_type": types[i as usize % 3],
                "timestamp": (now - chrono::Duration::milliseconds(i as i64 * 1_001)).to_rfc3339(),
                "campaign_id": format!("camp-{}", i % 300),
                "ad_id": format!("ad-{i}"),
                "publisher_id": format!("pub-{}", i % 7),
                "cost_micros": i * 1_000,
                "revenue_micros": i * 7,
            });
            if i % 2 == 0 {
                e["sent_at"] = json!(now.to_rfc3339());
            }
            // Absent optional values are empty strings: first in some dictionaries, later
            // in others.
            if i % 3 != 0 {
                e["advertiser_id"] = json!(format!("adv-{}", i % 5));
                e["user_id"] = json!(format!("usér-{i} ✓"));
            }
            if i % 3 != 1 {
                e["country"] = json!(["DE", "US", "JP"][i as usize % 3]);
                e["device"] = json!(devices[i as usize % 5]);
                e["os"] = json!("Android");
                e["browser"] = json!(format!("Chrome {}", i % 4));
            }
            e["attributes"] = match i % 4 {
                0 => json!({}),
                1 => json!({"placement": "top"}),
                _ => json!({"a": format!("{i}"), "ключ": "значение", "empty": ""}),
            };
            e
        })
        .collect();
    let r = app
        .post_and_wait(Value::from(sent.clone()).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["accepted"], 600);

    #[derive(clickhouse::Row, serde::Deserialize, Debug)]
    struct Stored {
        tenant: String,
        event_id: String,
        event_type: String,
        timestamp_ms: i64,
        sent_at_ms: Option<i64>,
        campaign_id: String,
        ad_id: String,
        publisher_id: String,
        advertiser_id: String,
        user_id: String,
        country: String,
        device: String,
        os: String,
        browser: String,
        cost_micros: u64,
        revenue_micros: u64,
        keys: Vec<String>,
        values: Vec<String>,
    }
    let stored: Vec<Stored> = app
        .db
        .query(
            "SELECT tenant, toString(event_id) AS event_id, toString(event_type) AS event_type,
                    toUnixTimestamp64Milli(timestamp) AS timestamp_ms,
                    toUnixTimestamp64Milli(sent_at) AS sent_at_ms, campaign_id, ad_id,
                    publisher_id, advertiser_id, user_id, country, device, os, browser,
                    cost_micros, revenue_micros, mapKeys(attributes) AS keys,
                    mapValues(attributes) AS values
             FROM events FINAL",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(stored.len(), 600);
    let by_id: std::collections::HashMap<&str, &Stored> =
        stored.iter().map(|s| (s.event_id.as_str(), s)).collect();
    let text = |e: &Value, field: &str| e[field].as_str().unwrap_or("").to_string();
    let ms = |e: &Value, field: &str| {
        e[field].as_str().map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .unwrap()
                .timestamp_millis()
        })
    };
    for e in &sent {
        let s = by_id[e["event_id"].as_str().unwrap()];
        assert_eq!(s.tenant, TENANT);
        assert_eq!(s.event_type, text(e, "event_type"));
        assert_eq!(Some(s.timestamp_ms), ms(e, "timestamp"));
        assert_eq!(s.sent_at_ms, ms(e, "sent_at"));
        for (field, value) in [
            ("campaign_id", &s.campaign_id),
            ("ad_id", &s.ad_id),
            ("publisher_id", &s.publisher_id),
            ("advertiser_id", &s.advertiser_id),
            ("user_id", &s.user_id),
            ("country", &s.country),
            ("device", &s.device),
            ("os", &s.os),
            ("browser", &s.browser),
        ] {
            assert_eq!(*value, text(e, field), "{field} of {e}");
        }
        assert_eq!(Some(s.cost_micros), e["cost_micros"].as_u64());
        assert_eq!(Some(s.revenue_micros), e["revenue_micros"].as_u64());
        let mut attributes: Vec<(String, String)> = s
            .keys
            .iter()
            .cloned()
            .zip(s.values.iter().cloned())
            .collect();
        attributes.sort();
        let mut expected: Vec<(String, String)> = e["attributes"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        expected.sort();
        assert_eq!(attributes, expected, "attributes of {e}");
    }
    // It went in as a Native block, not as RowBinary after a refused one.
    assert_eq!(app.metric("adtrack_native_fallbacks_total").await, 0.0);
    assert!(app.metric("adtrack_flushes_total").await >= 1.0);
}

#[tokio::test]
async fn a_query_parameter_no_endpoint_takes_is_refused_not_ignored() {
    let app = spawn_app("unknown_params").await;
    // A mistyped `wait` would otherwise answer 202 without waiting for the commit.
    let r = app
        .post_to(
            "/v1/events?wiat=true",
            event().to_string(),
            &[("content-type", JSON)],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json["error"], "unknown_parameter");
    assert_eq!(r.json["field"], "wiat");
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .ends_with("this endpoint takes wait"),
        "{}",
        r.text
    );
    let r = app
        .post_to(
            "/v1/query?debug=1",
            "{}".to_string(),
            &[("content-type", JSON)],
        )
        .await;
    assert_eq!((r.status, r.json["field"].as_str()), (400, Some("debug")));
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .ends_with("takes no query parameters"),
        "{}",
        r.text
    );
    let id = uuid::Uuid::new_v4();
    for (method, path) in [
        ("GET", format!("/v1/events/{id}?foo=1")),
        ("GET", "/v1/admin/usage?stauts=5xx".to_string()),
        ("GET", "/v1/admin/keys?tenantid=x".to_string()),
        ("DELETE", "/v1/users/someone/events?foo=1".to_string()),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = app
            .http
            .request(method.clone(), format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        let r = Response::from(resp).await;
        assert_eq!(r.status, 400, "{method} {path}: {}", r.text);
        assert_eq!(r.json["error"], "unknown_parameter", "{path}");
    }

    // What the endpoints take still works, and nothing was stored above.
    let r = app.post_and_wait(event().to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(app.count_final().await, 1);
}
