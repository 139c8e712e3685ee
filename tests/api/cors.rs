//! Browsers: a page on another origin (an ad tag, a pixel, a dashboard) asks with a preflight
//! first, then sends its request; it can read an answer, errors included, only when the
//! answer allows its origin.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

const SHOP: &str = "https://shop.example";

/// One event posted with the app's key by a page on `origin`.
async fn post_from(app: &TestApp, origin: &str, body: String) -> Response {
    let headers = [("content-type", "application/json"), ("origin", origin)];
    app.post_to("/v1/events", body, &headers).await
}

fn header<'a>(resp: &'a Response, name: &str) -> &'a str {
    resp.headers.get(name).map_or("", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_page_on_any_origin_can_send_events_and_read_every_answer() {
    let app = spawn_app("cors_any").await;

    let pre = preflight(&app.base, "/v1/events", SHOP, "POST").await;
    assert_eq!(pre.status, 204, "{}", pre.text);
    assert_eq!(header(&pre, "access-control-allow-origin"), "*");
    assert!(header(&pre, "access-control-allow-methods").contains("POST"));
    assert_eq!(
        header(&pre, "access-control-allow-headers"),
        "authorization,content-type,x-sdk-version"
    );
    assert_eq!(header(&pre, "access-control-max-age"), "7200");

    // The request itself: accepted, stored, and readable by the page (with its request id).
    let sent = post_from(&app, SHOP, event().to_string()).await;
    assert_eq!(sent.status, 202, "{}", sent.text);
    assert_eq!(header(&sent, "access-control-allow-origin"), "*");
    assert_eq!(header(&sent, "vary"), "Origin");
    assert!(header(&sent, "access-control-expose-headers").contains("X-Request-Id"));
    assert_eq!(app.wait_for_count(1).await, 1);

    // Errors too: without the header the page would see a network error, not the reason.
    let bad = post_from(&app, SHOP, json!({"event_id": "nope"}).to_string()).await;
    assert_eq!(bad.status, 422, "{}", bad.text);
    assert_eq!(header(&bad, "access-control-allow-origin"), "*");
    let no_key = reqwest::Client::new()
        .post(format!("{}/v1/events", app.base))
        .header("origin", SHOP)
        .header("content-type", "application/json")
        .body(event().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    assert_eq!(no_key.headers()["access-control-allow-origin"], "*");

    // Reads from a dashboard on another origin as well.
    let pre = preflight(&app.base, "/v1/stats/summary", SHOP, "GET").await;
    assert_eq!(pre.status, 204, "{}", pre.text);

    // Preflights are requests like any other: counted by route.
    let counted = app
        .metric(
            "adtrack_request_seconds_count{route=\"/v1/events\",method=\"OPTIONS\",status=\"204\"}",
        )
        .await;
    assert_eq!(counted, 1.0);
}

#[tokio::test]
async fn only_listed_origins_are_allowed_and_the_refusal_names_the_origin() {
    let app = spawn_app_with(
        "cors_list",
        &[(
            "ADTRACK_CORS_ORIGINS",
            "https://shop.example, http://localhost:3000",
        )],
    )
    .await;

    let pre = preflight(&app.base, "/v1/events", "http://localhost:3000", "POST").await;
    assert_eq!(pre.status, 204, "{}", pre.text);
    assert_eq!(
        header(&pre, "access-control-allow-origin"),
        "http://localhost:3000"
    );

    let refused = preflight(&app.base, "/v1/events", "https://evil.example", "POST").await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    assert_eq!(refused.json["error"], "origin_not_allowed");
    assert!(refused.json["message"]
        .as_str()
        .unwrap()
        .contains("https://evil.example"));
    assert_eq!(header(&refused, "access-control-allow-origin"), "");

    // A listed origin is echoed, and caches are told the answer depends on it.
    let sent = post_from(&app, SHOP, event().to_string()).await;
    assert_eq!(sent.status, 202);
    assert_eq!(header(&sent, "access-control-allow-origin"), SHOP);
    assert!(header(&sent, "vary").contains("Origin"));

    // A request from elsewhere that is not a browser's (it skipped the preflight) is served
    // on its key as always, without leave for a page to read the answer.
    let other = post_from(&app, "https://evil.example", event().to_string()).await;
    assert_eq!(other.status, 202);
    assert_eq!(header(&other, "access-control-allow-origin"), "");
    // That answer, and one to a request with no Origin at all, say they depend on it: a
    // cache must not hand them to a page of a listed origin.
    assert_eq!(header(&other, "vary"), "Origin");
    let plain = app.post(event().to_string(), "application/json").await;
    assert_eq!((plain.status, header(&plain, "vary")), (202, "Origin"));
    assert_eq!(app.wait_for_count(3).await, 3);

    // A preflight's answer has its own Vary, once.
    let pre = preflight(&app.base, "/v1/events", SHOP, "POST").await;
    let vary: Vec<_> = pre.headers.get_all("vary").iter().collect();
    assert_eq!(vary.len(), 1, "{vary:?}");
    assert!(pre.headers.get("access-control-expose-headers").is_none());
}

#[tokio::test]
async fn nothing_outside_the_api_is_opened_to_other_origins_and_none_turns_it_off() {
    let app = spawn_app("cors_scope").await;
    for path in ["/metrics", "/health/ready", "/openapi.json", "/docs"] {
        let pre = preflight(&app.base, path, SHOP, "GET").await;
        assert_ne!(pre.status, 204, "{path}: {}", pre.text);
        assert_eq!(header(&pre, "access-control-allow-origin"), "", "{path}");
    }
    // An OPTIONS request that is not a preflight is one without a key like any other.
    let options = reqwest::Client::new()
        .request(Method::OPTIONS, format!("{}/v1/events", app.base))
        .header("origin", SHOP)
        .send()
        .await
        .unwrap();
    assert_eq!(options.status(), 401);
    for path in ["/metrics", "/health/ready", "/openapi.json"] {
        let resp = reqwest::Client::new()
            .get(format!("{}{path}", app.base))
            .header("origin", SHOP)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert!(
            resp.headers().get("access-control-allow-origin").is_none(),
            "{path}"
        );
    }

    let off = spawn_app_with("cors_off", &[("ADTRACK_CORS_ORIGINS", "none")]).await;
    // With no cross-origin access, a preflight is a request without a key like any other.
    let pre = preflight(&off.base, "/v1/events", SHOP, "POST").await;
    assert_eq!(pre.status, 401, "{}", pre.text);
    assert_eq!(header(&pre, "access-control-allow-origin"), "");
    let sent = post_from(&off, SHOP, event().to_string()).await;
    assert_eq!(sent.status, 202);
    assert_eq!(header(&sent, "access-control-allow-origin"), "");
}
