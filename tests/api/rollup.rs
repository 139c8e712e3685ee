//! Hourly summaries: every figure they help answer is exact — with re-sent copies not yet
//! merged, after new events in a summarized day (what queries hold in memory must not answer
//! for it), with late events and re-sends landing in summarized days, and after a deletion —
//! and they really are used (the `/metrics` counter of the queries they answered).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::stats::{
    check_metrics, check_timeseries, get_query, load, rank_groups, rfc3339, Ev, Exp, Rng,
    ALL_METRICS,
};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const SUMMARIES: &str = "adtrack_analytics_queries_total{source=\"summaries\"}";
const RAW: &str = "adtrack_analytics_queries_total{source=\"raw\"}";

/// Partitions of `events` whose current parts no published summary reflects.
async fn unsummarized_partitions(app: &TestApp) -> u64 {
    app.db
        .query(
            "SELECT count() FROM (SELECT partition_id, groupBitXor(cityHash64(name)) AS fp FROM system.parts
               WHERE database = currentDatabase() AND table = 'events' AND active GROUP BY partition_id) AS p
             LEFT ANTI JOIN (SELECT toString(day) AS partition_id, argMax(fingerprint, generation) AS fp
               FROM events_hourly_state GROUP BY day) AS s USING (partition_id, fp)",
        )
        .fetch_one()
        .await
        .unwrap()
}

async fn wait_until_summarized(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while unsummarized_partitions(app).await > 0 {
        assert!(
            Instant::now() < deadline,
            "partitions still unsummarized after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the dashboard queries summaries can answer (and one they cannot) and checks every
/// figure against `evs`. Returns how many went through summaries, and how many raw.
async fn check_every_figure(
    app: &TestApp,
    evs: &[Ev],
    from: i64,
    to: i64,
    ctx: &str,
) -> (f64, f64) {
    let (summaries, raw) = (app.metric(SUMMARIES).await, app.metric(RAW).await);
    let within = |a: i64, b: i64| evs.iter().filter(move |e| e.ts_ms >= a && e.ts_ms < b);
    // The metrics a summary answers with no `metrics=` given (the first nine).
    let default_metrics = &ALL_METRICS[..9];

    // Summary over millisecond bounds (partial hours at both ends).
    let (a, b) = (from + 123, to - 77);
    let (status, body) = get_query(
        app,
        "/v1/stats/summary",
        &[("from", rfc3339(a)), ("to", rfc3339(b))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    check_metrics(
        &format!("{ctx}: summary"),
        &body["metrics"],
        &Exp::of(within(a, b)),
        default_metrics,
    );

    // Filters on both summarized dimensions, whole hours.
    let (a, b) = (
        from - from.rem_euclid(HOUR) + 5 * HOUR,
        to - to.rem_euclid(HOUR) - 3 * HOUR,
    );
    let campaigns = ["t0.spring:c0", "t0.spring:c2"];
    let (status, body) = get_query(
        app,
        "/v1/stats/summary",
        &[
            ("from", rfc3339(a)),
            ("to", rfc3339(b)),
            (
                "filter",
                format!("campaign_id=={}|{}", campaigns[0], campaigns[1]),
            ),
            ("filter", "event_type!=impression".into()),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    check_metrics(
        &format!("{ctx}: filtered summary"),
        &body["metrics"],
        &Exp::of(
            within(a, b)
                .filter(|e| campaigns.contains(&e.campaign.as_str()) && e.kind != "impression"),
        ),
        default_metrics,
    );

    // Time series: hours in Berlin over the last three days, days in New York over all.
    for (bucket, zone, a, metrics) in [
        (
            "hour",
            "Europe/Berlin",
            to - 3 * DAY + 61_000,
            "events,clicks,spend,ctr",
        ),
        (
            "day",
            "America/New_York",
            from,
            "events,impressions,revenue,roas",
        ),
        // Half-hour offset: local hours do not start on UTC hours, so this one reads raw.
        ("hour", "Asia/Kolkata", to - DAY, "events,conversions"),
    ] {
        check_timeseries(app, evs, bucket, zone, (a, to), metrics, ctx).await;
    }

    // Breakdowns: top 3 campaigns by spend with the other row; every event type.
    for (dim, order_by, limit) in [
        ("campaign_id", "spend", Some(3)),
        ("event_type", "events", None),
    ] {
        let metrics = "events,impressions,clicks,spend,roas";
        let mut params = vec![
            ("from", rfc3339(from)),
            ("to", rfc3339(to)),
            ("group_by", dim.to_string()),
            ("order_by", order_by.to_string()),
            ("metrics", metrics.to_string()),
        ];
        if let Some(limit) = limit {
            params.push(("limit", limit.to_string()));
            params.push(("other", "true".to_string()));
        }
        let (status, body) = get_query(app, "/v1/stats/breakdown", &params).await;
        assert_eq!(status, 200, "{body}");
        let ranked = rank_groups(within(from, to), dim, order_by);
        let shown = limit.unwrap_or(ranked.len());
        let rows = body["rows"].as_array().unwrap();
        let metrics: Vec<&str> = metrics.split(',').collect();
        assert_eq!(rows.len(), shown, "{ctx}: {dim}: {body}");
        for (row, (value, exp)) in rows.iter().zip(&ranked) {
            assert_eq!(row["value"], json!(value), "{ctx}: {dim} ranking");
            check_metrics(
                &format!("{ctx}: {dim}={value}"),
                &row["metrics"],
                exp,
                &metrics,
            );
        }
        if limit.is_some() {
            let top: HashSet<&String> = ranked.iter().take(shown).map(|(k, _)| k).collect();
            let rest = Exp::of(within(from, to).filter(|e| !top.contains(&e.dim(dim))));
            check_metrics(
                &format!("{ctx}: {dim} other"),
                &body["other"],
                &rest,
                &metrics,
            );
        }
    }
    (
        app.metric(SUMMARIES).await - summaries,
        app.metric(RAW).await - raw,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn summaries_give_exact_figures_while_partitions_change() {
    let app = spawn_app_with("rollup", &[("ADTRACK_ROLLUP_REFRESH_MS", "100")]).await;
    let now = Utc::now().timestamp_millis();
    // 40 minutes of the first hour in the range, whatever the time of day.
    let from = now - now.rem_euclid(HOUR) - 6 * DAY + 20 * 60_000 + 345;
    let to = now + HOUR;
    let mut rng = Rng::new(0x0011_2233);
    let mut evs: Vec<Ev> = (0..20_000)
        .map(|_| Ev::generate(&mut rng, 0, from, now - 120_000 - from))
        .collect();
    let json: Vec<Value> = evs.iter().map(Ev::json).collect();
    load(&app, &json).await;
    // Every tenth event again, in batches of its own: copies sit in other parts until a merge.
    let copies: Vec<Value> = json.iter().step_by(10).cloned().collect();
    load(&app, &copies).await;
    // Some events of the first partial hour of the ranges below re-sent by a client whose
    // clock is two hours behind: the copy received last is corrected two hours later, so the
    // event counts there and no longer in the partial hour (copies that disagree on the time
    // are looked up by identity). Kept clear of hour boundaries by a second.
    let first_whole_hour = from - from.rem_euclid(HOUR) + HOUR;
    let moved: Vec<usize> = (0..evs.len())
        .filter(|&i| {
            let t = evs[i].ts_ms;
            t >= from + 1_000
                && t < first_whole_hour - 1_000
                && (t + 2 * HOUR) % HOUR < HOUR - 1_000
        })
        .take(15)
        .collect();
    assert!(
        moved.len() >= 5,
        "{} events in the first partial hour",
        moved.len()
    );
    let sent_at = rfc3339(Utc::now().timestamp_millis() - 2 * HOUR);
    let resent: Vec<Value> = moved
        .iter()
        .map(|&i| {
            let mut copy = evs[i].json();
            copy["sent_at"] = json!(sent_at);
            copy
        })
        .collect();
    load(&app, &resent).await;
    for &i in &moved {
        evs[i].ts_ms += 2 * HOUR;
    }

    // 1. Every partition summarized: all the eligible queries go through summaries.
    wait_until_summarized(&app).await;
    let (summarized, raw) = check_every_figure(&app, &evs, from, to, "summarized").await;
    assert_eq!(
        (summarized, raw),
        (6.0, 1.0),
        "which queries used summaries"
    );

    assert!(
        app.metric("adtrack_rollup_held_bytes").await > 0.0,
        "summaries held in memory"
    );
    // New events in the first partial hour, summarized again: what the queries above read
    // from the summaries and the partial hour (held in memory) no longer answers for that
    // partition.
    let edge: Vec<Ev> = (0..40)
        .map(|_| {
            Ev::generate(
                &mut rng,
                0,
                from + 1_000,
                (first_whole_hour - from - 2_000).max(1),
            )
        })
        .collect();
    load(&app, &edge.iter().map(Ev::json).collect::<Vec<_>>()).await;
    evs.extend(edge);
    wait_until_summarized(&app).await;
    // Queries take what was published from a cache of up to a second.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (summarized, raw) = check_every_figure(&app, &evs, from, to, "summarized again").await;
    assert_eq!(
        (summarized, raw),
        (6.0, 1.0),
        "which queries used summaries"
    );

    // Merge everything now, so that no background merge changes a partition later on.
    app.db
        .query("OPTIMIZE TABLE events FINAL")
        .execute()
        .await
        .unwrap();
    wait_until_summarized(&app).await;

    // 2. A service that no longer refreshes (the next refresh in an hour), so the partitions
    //    changed now stay unsummarized: late events and re-sent copies land in summarized days.
    let mut app = app;
    app.env
        .insert("ADTRACK_ROLLUP_REFRESH_MS".into(), "3600000".into());
    let app = app.restart().await;
    wait_until_summarized(&app).await;
    let (late_from, late_to) = (now - 2 * DAY, now - DAY);
    let late: Vec<Ev> = (0..700)
        .map(|_| Ev::generate(&mut rng, 0, late_from, late_to - late_from))
        .collect();
    let mut batch: Vec<Value> = late.iter().map(Ev::json).collect();
    batch.extend(
        evs.iter()
            .filter(|e| e.ts_ms >= late_from && e.ts_ms < late_to)
            .step_by(5)
            .map(Ev::json),
    );
    load(&app, &batch).await;
    evs.extend(late);
    let changed = unsummarized_partitions(&app).await;
    assert!((2..=3).contains(&changed), "{changed} partitions changed");
    let (summarized, _) = check_every_figure(&app, &evs, from, to, "partly summarized").await;
    assert_eq!(
        summarized, 6.0,
        "summaries of the unchanged days are still used"
    );

    // 3. A deletion changes every partition: figures drop at once.
    let user = evs
        .iter()
        .find_map(|e| e.user.clone())
        .expect("events with users");
    let r = app
        .http
        .delete(format!("{}/v1/users/{user}/events", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    evs.retain(|e| e.user.as_deref() != Some(user.as_str()));
    check_every_figure(&app, &evs, from, to, "after a deletion").await;
}

/// With no memory for what queries read from the summaries (`ADTRACK_ROLLUP_CACHE_MB=0`),
/// every query reads raw events instead: the same figures, nothing refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_memory_for_summaries_queries_read_raw_events() {
    let app = spawn_app_with(
        "rollup_no_memory",
        &[
            ("ADTRACK_ROLLUP_REFRESH_MS", "100"),
            ("ADTRACK_ROLLUP_CACHE_MB", "0"),
        ],
    )
    .await;
    let now = Utc::now().timestamp_millis();
    let (from, to) = (now - 2 * DAY, now + HOUR);
    let mut rng = Rng::new(0x0044_5566);
    let evs: Vec<Ev> = (0..2_000)
        .map(|_| Ev::generate(&mut rng, 0, from, 2 * DAY - 120_000))
        .collect();
    load(&app, &evs.iter().map(Ev::json).collect::<Vec<_>>()).await;
    wait_until_summarized(&app).await;
    let used = check_every_figure(&app, &evs, from, to, "no memory").await;
    assert_eq!(used, (0.0, 7.0), "which queries used summaries");
}
