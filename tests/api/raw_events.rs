//! Raw events: newest-first keyset pages, one event by id, and the resumable NDJSON export,
//! each under concurrent inserts.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::{
    helpers::*,
    stats::{get_query, load, rfc3339, spawn_tenant, Ev, Rng, NOTE_KEY},
};

fn recent(rng: &mut Rng, n: usize) -> Vec<Ev> {
    let now = chrono::Utc::now().timestamp_millis();
    (0..n)
        .map(|_| Ev::generate(rng, 0, now - 3_600_000, 3_500_000))
        .collect()
}

async fn post_batch(app: &TestApp, evs: &[Ev]) {
    load(app, &evs.iter().map(Ev::json).collect::<Vec<_>>()).await;
}

fn ids(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(|e| e.id.to_string()).collect()
}

fn ms_of(v: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

#[tokio::test]
async fn pages_list_every_event_once_newest_first_while_events_arrive() {
    let app = spawn_app("raw_pages").await;
    let mut rng = Rng::new(21);
    let mut original = vec![];
    for n in [100, 100, 50] {
        let evs = recent(&mut rng, n);
        post_batch(&app, &evs).await;
        original.extend(evs);
    }
    let mut seen: Vec<Value> = vec![];
    let mut arrived: Vec<String> = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let mut params = vec![("limit", "40".to_string())];
        if let Some(c) = &cursor {
            params.push(("cursor", c.clone()));
        }
        let (status, page) = get_query(&app, "/v1/events", &params).await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 40);
        seen.extend(events.iter().cloned());
        // New events arrive between pages.
        let new = recent(&mut rng, 20);
        post_batch(&app, &new).await;
        arrived.extend(ids(&new));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let seen_ids: Vec<String> = seen
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<&String> = seen_ids.iter().collect();
    assert_eq!(unique.len(), seen_ids.len(), "an event was listed twice");
    assert_eq!(
        seen_ids.len(),
        original.len(),
        "events were skipped or added"
    );
    for id in ids(&original) {
        assert!(unique.contains(&id), "{id} never listed");
    }
    assert!(arrived.iter().all(|id| !unique.contains(id)));
    let received: Vec<i64> = seen.iter().map(|e| ms_of(&e["received_at"])).collect();
    assert!(
        received.windows(2).all(|w| w[0] >= w[1]),
        "not newest first"
    );

    // The events that arrived meanwhile are on top of a fresh listing.
    let (_, page) = get_query(&app, "/v1/events", &[("limit", "20".into())]).await;
    let top: HashSet<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert!(top.iter().all(|id| arrived.iter().any(|a| a == id)));
}

#[tokio::test]
async fn listings_take_the_stats_filters_and_time_bounds() {
    let app = spawn_app("raw_filters").await;
    let mut rng = Rng::new(22);
    let evs = recent(&mut rng, 400);
    post_batch(&app, &evs).await;
    let from = evs.iter().map(|e| e.ts_ms).min().unwrap() + 600_000;
    let to = from + 1_800_000;
    let params = [
        ("from", rfc3339(from)),
        ("to", rfc3339(to)),
        ("filter", "country==DE|US".to_string()),
        ("filter", "event_type!=impression".to_string()),
        ("limit", "1000".to_string()),
    ];
    let (status, page) = get_query(&app, "/v1/events", &params).await;
    assert_eq!(status, 200, "{page}");
    let got: HashSet<String> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = evs
        .iter()
        .filter(|e| e.ts_ms >= from && e.ts_ms < to)
        .filter(|e| matches!(e.country, Some("DE" | "US")) && e.kind != "impression")
        .map(|e| e.id.to_string())
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(got, expected);

    for (params, field) in [
        (vec![("limit", "0".to_string())], "limit"),
        (vec![("limit", "1001".to_string())], "limit"),
        (vec![("cursor", "nope".to_string())], "cursor"),
        (vec![("filter", "os=iOS".to_string())], "filter"),
        (vec![("page", "2".to_string())], "page"),
    ] {
        let (status, body) = get_query(&app, "/v1/events", &params).await;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some(field)),
            "{body}"
        );
    }
}

#[tokio::test]
async fn one_event_by_id_within_its_tenant() {
    let app = spawn_app("raw_get").await;
    let other = spawn_tenant(&app, "raw_get_t2", "t2", &[]).await;
    let mut rng = Rng::new(23);
    let mut evs = recent(&mut rng, 3);
    evs[0].attrs.insert(NOTE_KEY.into(), "x".into());
    evs[0].user = Some("user-1".into());
    evs[1].country = None;
    post_batch(&app, &evs[..2]).await;
    post_batch(&other, &evs[2..]).await;

    let r = app.get(&format!("/v1/events/{}", evs[0].id)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let e = &r.json;
    let sent = evs[0].json();
    for field in [
        "event_id",
        "event_type",
        "campaign_id",
        "ad_id",
        "publisher_id",
        "user_id",
    ] {
        assert_eq!(e[field], sent[field], "{field}");
    }
    assert_eq!(e["attributes"], sent["attributes"]);
    assert_eq!(e["cost_micros"], sent["cost_micros"]);
    assert_eq!(ms_of(&e["timestamp"]), evs[0].ts_ms);
    assert_eq!(ms_of(&e["event_time"]), evs[0].ts_ms);
    assert!(e["cursor"].is_string());

    let r = app.get(&format!("/v1/events/{}", evs[1].id)).await;
    assert!(r.json.get("country").is_none(), "{}", r.text);

    // Another tenant's event does not exist here.
    let r = app.get(&format!("/v1/events/{}", evs[2].id)).await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (404, Some("not_found"))
    );
    let r = other.get(&format!("/v1/events/{}", evs[2].id)).await;
    assert_eq!(r.status, 200);
    let r = app.get("/v1/events/not-a-uuid").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json["field"], json!("event_id"));
}

struct Export {
    lines: Vec<Value>,
    until: String,
}

async fn export(app: &TestApp, params: &[(&str, String)]) -> Export {
    let resp = app
        .http
        .get(format!("{}/v1/events/export", app.base))
        .query(params)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    assert!(
        resp.headers().get("content-length").is_none(),
        "not streamed"
    );
    let until = resp.headers()["x-export-until"]
        .to_str()
        .unwrap()
        .to_string();
    let text = resp.text().await.unwrap();
    assert!(text.is_empty() || text.ends_with('\n'));
    Export {
        lines: text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        until,
    }
}

#[tokio::test]
async fn the_export_serves_everything_once_in_order_of_receipt_and_resumes() {
    let app = spawn_app_with("raw_export", &[("ADTRACK_EXPORT_SETTLE_MS", "0")]).await;
    let mut rng = Rng::new(24);
    let mut posted: Vec<String> = vec![];
    for _ in 0..4 {
        let evs = recent(&mut rng, 300);
        post_batch(&app, &evs).await;
        posted.extend(ids(&evs));
    }
    let mut lines: Vec<Value> = vec![];
    let mut cursor: Option<String> = None;
    let mut responses = 0;
    loop {
        let mut params = vec![("limit", "500".to_string())];
        if let Some(c) = &cursor {
            params.push(("cursor", c.clone()));
        }
        let page = export(&app, &params).await;
        responses += 1;
        let full = page.lines.len() == 500;
        if let Some(last) = page.lines.last() {
            cursor = Some(last["cursor"].as_str().unwrap().to_string());
        }
        lines.extend(page.lines);
        // Events keep arriving for a while; the export picks them up after its cursor.
        if responses <= 3 {
            let evs = recent(&mut rng, 150);
            post_batch(&app, &evs).await;
            posted.extend(ids(&evs));
        }
        if !full && responses > 3 {
            break;
        }
        assert!(responses < 50);
    }
    let got: Vec<String> = lines
        .iter()
        .map(|l| l["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got.iter().collect::<HashSet<_>>().len(),
        got.len(),
        "an event was exported twice"
    );
    assert_eq!(
        got.iter().collect::<HashSet<_>>(),
        posted.iter().collect::<HashSet<_>>()
    );
    let received: Vec<i64> = lines.iter().map(|l| ms_of(&l["received_at"])).collect();
    assert!(
        received.windows(2).all(|w| w[0] <= w[1]),
        "not in order of receipt"
    );
}

#[tokio::test]
async fn the_export_holds_back_events_that_may_still_be_in_flight() {
    let app = spawn_app("raw_settle").await; // default settle delay: 10 s
    let mut rng = Rng::new(25);
    let evs = recent(&mut rng, 10);
    post_batch(&app, &evs).await;
    let page = export(&app, &[]).await;
    assert!(page.lines.is_empty());
    let until = chrono::DateTime::parse_from_rfc3339(&page.until).unwrap();
    let lag = chrono::Utc::now().signed_duration_since(until);
    assert!(lag.num_milliseconds() >= 9_000, "{lag}");
    // Filters and bad input as elsewhere.
    let (status, body) = get_query(&app, "/v1/events/export", &[("limit", "0".into())]).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("limit")));
}

#[tokio::test]
async fn an_id_sent_again_as_another_event_reads_as_the_last_one_received() {
    let app = spawn_app("by_id_last").await;
    let first = event();
    let mut second = first.clone();
    second["campaign_id"] = json!("camp-2");
    for sent in [&first, &second] {
        let r = app.post_and_wait(sent.to_string()).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = app
        .get(&format!(
            "/v1/events/{}",
            first["event_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["campaign_id"], "camp-2", "{}", r.text);
}

#[tokio::test]
async fn events_sharing_an_id_and_a_receive_time_are_each_listed_and_exported_once() {
    let app = spawn_app_with("raw_shared_id", &[("ADTRACK_EXPORT_SETTLE_MS", "0")]).await;
    // One id for an impression and its click, in two campaigns and two hours: eight events
    // received at the same moment (one request).
    let base = event();
    let hour_ago = (chrono::Utc::now() - chrono::Duration::minutes(61)).to_rfc3339();
    let mut sent = vec![];
    for kind in ["impression", "click"] {
        for campaign in ["camp_a", "camp_b"] {
            for timestamp in [base["timestamp"].clone(), json!(hour_ago)] {
                let mut e = base.clone();
                e["event_type"] = json!(kind);
                e["campaign_id"] = json!(campaign);
                e["timestamp"] = timestamp;
                sent.push(e);
            }
        }
    }
    let r = app
        .post_and_wait(Value::from(sent.clone()).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let identity = |e: &Value| {
        (
            e["event_type"].as_str().unwrap().to_string(),
            e["campaign_id"].as_str().unwrap().to_string(),
            ms_of(&e["timestamp"]) / 3_600_000,
        )
    };
    let expected: HashSet<_> = sent.iter().map(identity).collect();
    assert_eq!(expected.len(), 8);

    // One per page.
    let mut listed = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let mut params = vec![("limit", "1".to_string())];
        params.extend(cursor.take().map(|c| ("cursor", c)));
        let (status, page) = get_query(&app, "/v1/events", &params).await;
        assert_eq!(status, 200, "{page}");
        listed.extend(page["events"].as_array().unwrap().iter().map(identity));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(listed.len() <= 8, "listed again: {listed:?}");
    }
    assert_eq!(listed.len(), 8, "{listed:?}");
    assert_eq!(listed.iter().cloned().collect::<HashSet<_>>(), expected);

    // A two-part cursor of an earlier version resumes with every event of its receive time
    // and id: the first one listed comes again, rather than the rest being skipped.
    let (_, first) = get_query(&app, "/v1/events", &[("limit", "1".into())]).await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let old: Vec<&str> = cursor.splitn(3, '_').take(2).collect();
    let params = [("limit", "1".into()), ("cursor", old.join("_"))];
    let (status, again) = get_query(&app, "/v1/events", &params).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(identity(&again["events"][0]), identity(&first["events"][0]));

    // One per export request, each resuming after the line before.
    let mut exported = vec![];
    let mut params = vec![("limit", "1".to_string())];
    loop {
        let part = export(&app, &params).await;
        let Some(line) = part.lines.first() else {
            break;
        };
        exported.push(identity(line));
        params = vec![
            ("limit", "1".to_string()),
            ("cursor", line["cursor"].as_str().unwrap().to_string()),
        ];
        assert!(exported.len() <= 8, "exported again: {exported:?}");
    }
    assert_eq!(exported.len(), 8, "{exported:?}");
    assert_eq!(exported.into_iter().collect::<HashSet<_>>(), expected);
}
