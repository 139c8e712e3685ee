//! Keys, tenants, scopes, rate limits, the usage log, and deleting an end user's events.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// Sends a request with `key` (or none).
async fn send(
    app: &TestApp,
    key: Option<&str>,
    method: Method,
    path: impl AsRef<str>,
    body: Option<Value>,
) -> Response {
    let http = reqwest::Client::new();
    let mut req = http.request(method, format!("{}{}", app.base, path.as_ref()));
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    if let Some(body) = body {
        req = req.header("content-type", JSON).body(body.to_string());
    }
    Response::from(req.send().await.unwrap()).await
}

async fn create_tenant(app: &TestApp, tenant: &str) {
    let r = send(
        app,
        Some(ADMIN_KEY),
        Method::POST,
        "/v1/admin/tenants",
        Some(json!({"tenant_id": tenant})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

const UNLIMITED: fn() -> Value = || json!({"requests_per_sec": 0, "events_per_sec": 0});

fn range() -> String {
    let now = chrono::Utc::now();
    format!(
        "from={}&to={}",
        (now - chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ"),
        (now + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ")
    )
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Needs {
    Ingest,
    Read,
    Admin,
    /// The bootstrap admin key only.
    Operator,
}

/// Method, path to call, route template, body, what it needs, status when allowed.
type Endpoint = (Method, String, &'static str, Option<Value>, Needs, u16);

#[tokio::test]
async fn every_endpoint_checks_the_scope_and_the_tenant_of_its_key() {
    let app = spawn_app("auth_matrix").await;
    let ingest = create_key(&app.base, TENANT, &["ingest"], UNLIMITED()).await;
    let read = create_key(&app.base, TENANT, &["read"], UNLIMITED()).await;
    let admin = create_key(&app.base, TENANT, &["admin"], UNLIMITED()).await;
    create_tenant(&app, "globex").await;
    let other = create_key(
        &app.base,
        "globex",
        &["ingest", "read", "admin"],
        UNLIMITED(),
    )
    .await;

    // An acme event, to read back.
    let event = event();
    let id = event["event_id"].as_str().unwrap().to_string();
    let r = send(
        &app,
        Some(&ingest),
        Method::POST,
        "/v1/events?wait=true",
        Some(event.clone()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let range = range();
    let endpoints: Vec<Endpoint> = vec![
        (
            Method::POST,
            "/v1/events".into(),
            "/v1/events",
            Some(event.clone()),
            Needs::Ingest,
            202,
        ),
        (
            Method::GET,
            "/v1/events".into(),
            "/v1/events",
            None,
            Needs::Read,
            200,
        ),
        (
            Method::GET,
            format!("/v1/events/{id}"),
            "/v1/events/{event_id}",
            None,
            Needs::Read,
            200,
        ),
        (
            Method::GET,
            "/v1/events/export?limit=10".into(),
            "/v1/events/export",
            None,
            Needs::Read,
            200,
        ),
        (
            Method::GET,
            format!("/v1/stats/summary?{range}"),
            "/v1/stats/summary",
            None,
            Needs::Read,
            200,
        ),
        (
            Method::GET,
            format!("/v1/stats/timeseries?{range}&bucket=hour"),
            "/v1/stats/timeseries",
            None,
            Needs::Read,
            200,
        ),
        (
            Method::GET,
            format!("/v1/stats/breakdown?{range}&group_by=country"),
            "/v1/stats/breakdown",
            None,
            Needs::Read,
            200,
        ),
        (
            Method::POST,
            "/v1/query".into(),
            "/v1/query",
            Some(
                json!({"from": (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339(), "to": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339(), "metrics": ["events"]}),
            ),
            Needs::Read,
            200,
        ),
        (
            Method::GET,
            "/v1/admin/keys".into(),
            "/v1/admin/keys",
            None,
            Needs::Admin,
            200,
        ),
        (
            Method::POST,
            "/v1/admin/keys".into(),
            "/v1/admin/keys",
            Some(json!({"name": "made-in-matrix", "scopes": ["read"]})),
            Needs::Admin,
            201,
        ),
        (
            Method::DELETE,
            "/v1/admin/keys/adt_000000000000".into(),
            "/v1/admin/keys/{key_id}",
            None,
            Needs::Admin,
            404,
        ),
        (
            Method::GET,
            format!("/v1/admin/usage?{range}"),
            "/v1/admin/usage",
            None,
            Needs::Admin,
            200,
        ),
        (
            Method::GET,
            format!("/v1/admin/usage/hourly?{range}"),
            "/v1/admin/usage/hourly",
            None,
            Needs::Admin,
            200,
        ),
        (
            Method::GET,
            "/v1/admin/tenants".into(),
            "/v1/admin/tenants",
            None,
            Needs::Admin,
            200,
        ),
        (
            Method::DELETE,
            "/v1/users/nobody/events".into(),
            "/v1/users/{user_id}/events",
            None,
            Needs::Admin,
            200,
        ),
        (
            Method::POST,
            "/v1/admin/tenants".into(),
            "/v1/admin/tenants",
            Some(json!({"tenant_id": "initech"})),
            Needs::Operator,
            201,
        ),
    ];

    // Every `/v1` operation in the OpenAPI document is in the matrix.
    let doc = app.get("/openapi.json").await.json;
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(path, _)| path.starts_with("/v1"))
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect();
    let tested: BTreeSet<String> = endpoints
        .iter()
        .map(|(m, _, template, ..)| format!("{m} {template}"))
        .collect();
    assert_eq!(documented, tested, "every /v1 operation is in the matrix");
    // Swagger UI's "Authorize" uses the declared scheme; every /v1 operation requires it and
    // documents the guard's answers.
    let scheme = &doc["components"]["securitySchemes"]["apiKey"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            assert_eq!(secured, path.starts_with("/v1"), "{method} {path} security");
            if secured {
                for status in ["401", "403", "429"] {
                    assert!(
                        op["responses"][status].is_object(),
                        "{method} {path} documents {status}"
                    );
                }
            }
        }
    }

    let callers: [(&str, Option<&str>); 7] = [
        ("no key", None),
        ("not a key", Some("hello")),
        (
            "unknown key",
            Some(
                "adt_0123456789ab_0000000000000000000000000000000000000000000000000000000000000000",
            ),
        ),
        ("ingest", Some(&ingest)),
        ("read", Some(&read)),
        ("admin", Some(&admin)),
        ("operator", Some(ADMIN_KEY)),
    ];
    for (method, path, _, body, needs, ok) in &endpoints {
        for (who, key) in callers {
            let allowed = match who {
                "ingest" => *needs == Needs::Ingest,
                "read" => *needs == Needs::Read,
                "admin" => *needs == Needs::Admin,
                "operator" => matches!(needs, Needs::Admin | Needs::Operator),
                _ => false,
            };
            // The operator names the tenant where a tenant is needed.
            let path = if who == "operator" && path.starts_with("/v1/users/") {
                format!("{path}?tenant_id={TENANT}")
            } else {
                path.clone()
            };
            let body = match (who, body) {
                ("operator", Some(b)) if path == "/v1/admin/keys" => {
                    let mut b = b.clone();
                    b["tenant_id"] = TENANT.into();
                    Some(b)
                }
                (_, b) => b.clone(),
            };
            let expected = match (who, allowed) {
                ("no key" | "not a key" | "unknown key", _) => 401,
                (_, false) => 403,
                ("operator", true) if *needs == Needs::Operator => *ok,
                (_, true) => *ok,
            };
            // A tenant is created once; the operator's second try is a conflict.
            let r = send(&app, key, method.clone(), &path, body).await;
            assert_eq!(r.status, expected, "{who} {method} {path}: {}", r.text);
            if expected >= 400 {
                let code = r.json["error"].as_str().unwrap_or_default();
                assert!(!code.is_empty(), "{who} {method} {path}: {}", r.text);
                assert!(!r.text.contains("adt_0123456789ab_"), "the key is echoed");
            }
            if expected == 401 {
                assert_eq!(r.headers["www-authenticate"], "Bearer");
            }
        }
    }

    // No key sees another tenant's data.
    let r = send(
        &app,
        Some(&other),
        Method::GET,
        &format!("/v1/events/{id}"),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = send(&app, Some(&other), Method::GET, "/v1/events", None).await;
    assert_eq!(r.json["events"].as_array().unwrap().len(), 0, "{}", r.text);
    let r = send(
        &app,
        Some(&other),
        Method::GET,
        &format!("/v1/stats/summary?{range}"),
        None,
    )
    .await;
    assert_eq!(r.json["metrics"]["impressions"], 0, "{}", r.text);
    let r = send(
        &app,
        Some(&read),
        Method::GET,
        &format!("/v1/stats/summary?{range}"),
        None,
    )
    .await;
    assert!(
        r.json["metrics"]["impressions"].as_u64().unwrap() >= 1,
        "{}",
        r.text
    );
    // A tenant's admin key acts on its own tenant only.
    for path in [
        format!("/v1/admin/keys?tenant_id={TENANT}"),
        format!("/v1/admin/usage?{range}&tenant_id={TENANT}"),
        format!("/v1/users/u1/events?tenant_id={TENANT}"),
    ] {
        let method = if path.starts_with("/v1/users") {
            Method::DELETE
        } else {
            Method::GET
        };
        let r = send(&app, Some(&other), method, &path, None).await;
        assert_eq!(r.status, 403, "{path}: {}", r.text);
        assert_eq!(r.json["error"], "forbidden_tenant");
    }
    // A parameter given twice is refused, not read as its first value.
    let users = "/v1/users/u1/events?tenant_id=globex&tenant_id=acme";
    for (method, path, field) in [
        (
            Method::GET,
            format!("/v1/admin/usage?{range}&key_id=a&key_id=b"),
            "key_id",
        ),
        (
            Method::GET,
            format!("/v1/admin/usage/hourly?key_id=a&{range}&key_id=a"),
            "key_id",
        ),
        (
            Method::GET,
            "/v1/admin/keys?tenant_id=globex&tenant_id=acme".into(),
            "tenant_id",
        ),
        (Method::DELETE, users.into(), "tenant_id"),
    ] {
        let r = send(&app, Some(&other), method, &path, None).await;
        assert_eq!(
            (r.status, r.json["error"].as_str(), r.json["field"].as_str()),
            (400, Some("invalid_parameter"), Some(field)),
            "{path}: {}",
            r.text
        );
    }
    let r = send(&app, Some(&other), Method::GET, "/v1/admin/keys", None).await;
    let tenants: BTreeSet<&str> = r
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["tenant_id"].as_str().unwrap())
        .collect();
    assert_eq!(tenants, BTreeSet::from(["globex"]));
    let r = send(
        &app,
        Some(&other),
        Method::DELETE,
        &format!("/v1/admin/keys/{}", &ingest[..16]),
        None,
    )
    .await;
    assert_eq!(
        r.status, 404,
        "another tenant's key cannot be revoked: {}",
        r.text
    );
    // Unknown /v1 paths: 401 without a key, 404 with one; public paths need none.
    assert_eq!(
        send(&app, None, Method::GET, "/v1/nothing", None)
            .await
            .status,
        401
    );
    // With a key: 404, and 405 for a method a path does not have (with `Allow`, as HTTP
    // asks), as JSON like every error.
    for (method, path, status, error, allow) in [
        (Method::GET, "/v1/nothing", 404, "not_found", None),
        (
            Method::DELETE,
            "/v1/stats/summary",
            405,
            "method_not_allowed",
            Some("GET"),
        ),
        // Only POST /v1/events takes the ingest path's shortcut; other methods are routed.
        (
            Method::DELETE,
            "/v1/events",
            405,
            "method_not_allowed",
            Some("GET, POST"),
        ),
    ] {
        let r = send(&app, Some(&read), method, path, None).await;
        assert_eq!(
            (r.status, r.json["error"].as_str()),
            (status, Some(error)),
            "{}",
            r.text
        );
        let allowed = r.headers.get("allow").map(|v| v.to_str().unwrap());
        assert_eq!(allowed, allow, "{path}");
        if let Some(allow) = allow {
            assert!(r.text.contains(&format!("it takes {allow}")), "{}", r.text);
        }
    }
    for path in ["/health/live", "/metrics", "/openapi.json"] {
        assert_eq!(
            send(&app, None, Method::GET, path, None).await.status,
            200,
            "{path}"
        );
    }
    // Keys are listed without the key itself, only its id.
    let r = send(&app, Some(&admin), Method::GET, "/v1/admin/keys", None).await;
    for key in [&ingest, &read, &admin] {
        assert!(!r.text.contains(key.as_str()), "a key is listed in full");
        assert!(r.text.contains(&key[..16]), "the key id is listed");
    }
    // And the table holds hashes only.
    let stored: Vec<String> = app
        .db
        .query("SELECT concat(key_id, ' ', key_hash) FROM api_keys")
        .fetch_all()
        .await
        .unwrap();
    assert!(stored.len() >= 5);
    assert!(stored.iter().all(|row| !row.contains(&ingest[17..])));
}

#[tokio::test]
async fn a_key_is_shown_once_and_the_admin_api_explains_bad_input() {
    let app = spawn_app("auth_admin").await;
    let r = send(
        &app,
        Some(ADMIN_KEY),
        Method::POST,
        "/v1/admin/keys",
        Some(json!({"tenant_id": TENANT, "name": "ios-sdk", "scopes": ["ingest"], "rate_limit": {"requests_per_sec": 50}})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let key = r.json["key"].as_str().unwrap();
    assert!(key.starts_with(r.json["key_id"].as_str().unwrap()));
    assert_eq!(r.json["scopes"], json!(["ingest"]));
    assert_eq!(r.json["rate_limit"]["requests_per_sec"], 50);
    assert!(key.len() >= 4 + 12 + 1 + 32, "at least 128 random bits");

    // Each bad body is answered with the field at fault.
    let cases = [
        (
            "/v1/admin/keys",
            json!({"tenant_id": TENANT, "name": "x", "scopes": []}),
            400,
            "invalid_scopes",
            "scopes",
        ),
        (
            "/v1/admin/keys",
            json!({"tenant_id": TENANT, "name": "x", "scopes": ["read", "write"]}),
            400,
            "invalid_body",
            "scopes[1]",
        ),
        (
            "/v1/admin/keys",
            json!({"tenant_id": TENANT, "name": "", "scopes": ["read"]}),
            400,
            "invalid_name",
            "name",
        ),
        (
            "/v1/admin/keys",
            json!({"tenant_id": "nope", "name": "x", "scopes": ["read"]}),
            404,
            "tenant_not_found",
            "tenant_id",
        ),
        (
            "/v1/admin/keys",
            json!({"name": "x", "scopes": ["read"]}),
            400,
            "missing_parameter",
            "tenant_id",
        ),
        (
            "/v1/admin/keys",
            json!({"tenant_id": TENANT, "name": "x"}),
            400,
            "invalid_body",
            "scopes",
        ),
        (
            "/v1/admin/keys",
            json!({"tenant_id": TENANT, "name": "x", "scopes": ["read"], "rate_limit": {"requests_per_sec": -1}}),
            400,
            "invalid_body",
            "rate_limit.requests_per_sec",
        ),
        (
            "/v1/admin/keys",
            json!({"tenant_id": TENANT, "name": "x", "scope": ["read"]}),
            400,
            "invalid_body",
            "scope",
        ),
        (
            "/v1/admin/tenants",
            json!({"name": "x"}),
            400,
            "invalid_body",
            "tenant_id",
        ),
        (
            "/v1/admin/tenants",
            json!({"tenant_id": "x", "display": "x"}),
            400,
            "invalid_body",
            "display",
        ),
    ];
    for (path, body, status, code, field) in cases {
        let r = send(
            &app,
            Some(ADMIN_KEY),
            Method::POST,
            path,
            Some(body.clone()),
        )
        .await;
        assert_eq!(
            (r.status, r.json["error"].as_str(), r.json["field"].as_str()),
            (status, Some(code), Some(field)),
            "{path} {body}: {}",
            r.text
        );
    }
    // A body that is not JSON, or not sent as JSON, is refused as such.
    let auth = format!("Bearer {ADMIN_KEY}");
    for (path, body, ct, status, code) in [
        (
            "/v1/admin/keys",
            "{",
            "application/json",
            400,
            "invalid_body",
        ),
        (
            "/v1/admin/keys",
            "{}",
            "text/plain",
            415,
            "unsupported_media_type",
        ),
        (
            "/v1/admin/tenants",
            "{}",
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
        (
            "/v1/admin/tenants",
            r#"{"tenant_id": "#,
            "application/json",
            400,
            "invalid_body",
        ),
        (
            "/v1/admin/tenants",
            r#"{"tenant_id": "late"} {"tenant_id": "later"}"#,
            "application/json",
            400,
            "invalid_body",
        ),
    ] {
        let headers = [("authorization", auth.as_str()), ("content-type", ct)];
        let r = app.post_to(path, body, &headers).await;
        assert_eq!(
            (r.status, r.json["error"].as_str(), r.json.get("field")),
            (status, Some(code), None),
            "{path} {ct}: {}",
            r.text
        );
    }
    // Over 64 KB: 413, as an oversized ingest body.
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let r = app
        .post_to(
            "/v1/admin/tenants",
            json!({"tenant_id": "big", "name": "n".repeat(70_000)}).to_string(),
            &headers,
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str(), r.json["limit"].as_u64()),
        (413, Some("payload_too_large"), Some(65_536)),
        "{}",
        r.text
    );
    // A defaulted field may be null; parameters of the content type are fine.
    let r = app
        .post_to(
            "/v1/admin/keys",
            json!({"tenant_id": TENANT, "name": "x", "scopes": ["read"], "rate_limit": null})
                .to_string(),
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json; charset=utf-8"),
            ],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = send(
        &app,
        Some(ADMIN_KEY),
        Method::POST,
        "/v1/admin/tenants",
        Some(json!({"tenant_id": TENANT})),
    )
    .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (409, Some("tenant_exists"))
    );
    // A tenant's admin key may lower the deployment's limits, not lift them.
    let admin = create_key(&app.base, TENANT, &["admin"], UNLIMITED()).await;
    for (limit, status) in [
        (json!({"requests_per_sec": 10}), 201),
        (json!({"requests_per_sec": 0}), 403),
        (json!({"events_per_sec": 1_000_000}), 403),
    ] {
        let r = send(
            &app,
            Some(&admin),
            Method::POST,
            "/v1/admin/keys",
            Some(json!({"name": "sdk", "scopes": ["ingest"], "rate_limit": limit})),
        )
        .await;
        assert_eq!(r.status, status, "{limit}: {}", r.text);
        if status == 403 {
            assert_eq!(r.json["error"], "forbidden_rate_limit");
        }
    }
    let r = send(
        &app,
        Some(ADMIN_KEY),
        Method::POST,
        "/v1/admin/tenants",
        Some(json!({"tenant_id": "a b"})),
    )
    .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (400, Some("invalid_tenant_id"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_on_every_instance_within_seconds() {
    let first = spawn_app("revoke_a").await;
    let second = spawn_app_with(
        "revoke_b",
        &[("ADTRACK_CLICKHOUSE_DATABASE", first.database.as_str())],
    )
    .await;
    // Created on the first instance, used at once on the second.
    let key = create_key(&first.base, TENANT, &["ingest"], UNLIMITED()).await;
    let post = |app: &TestApp| {
        let app_base = app.base.clone();
        let key = key.clone();
        async move {
            client_with_key(&key)
                .post(format!("{app_base}/v1/events"))
                .header("content-type", JSON)
                .body(event().to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Many requests at once with the key the second instance has not seen yet: none is
    // refused while the first of them looks it up.
    let together = futures_util::future::join_all((0..16).map(|_| post(&second))).await;
    assert!(together.iter().all(|s| *s == 202), "{together:?}");
    assert_eq!(post(&first).await, 202);

    let revoke = || {
        send(
            &first,
            Some(ADMIN_KEY),
            Method::DELETE,
            format!("/v1/admin/keys/{}", &key[..16]),
            None,
        )
    };
    let r = revoke().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json["revoked_at"].is_string());
    let revoked = Instant::now();
    assert_eq!(post(&first).await, 401, "at once where it was revoked");
    loop {
        let status = post(&second).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 202);
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "still accepted after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Listed as revoked; revoking again changes nothing.
    assert_eq!(revoke().await.status, 200);
    let list = send(
        &second,
        Some(ADMIN_KEY),
        Method::GET,
        "/v1/admin/keys",
        None,
    )
    .await;
    let entry = list
        .json
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == key[..16])
        .unwrap()
        .clone();
    assert!(entry["revoked_at"].is_string(), "{entry}");
}

fn retry_after(r: &Response) -> u64 {
    r.headers["retry-after"].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_per_key_headers() {
    let app = spawn_app("rate_limit").await;
    let slow = create_key(
        &app.base,
        TENANT,
        &["read", "ingest"],
        json!({"requests_per_sec": 1, "requests_burst": 3, "events_per_sec": 0}),
    )
    .await;
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..4 {
        let r = send(&app, Some(&slow), Method::GET, "/v1/events?limit=1", None).await;
        statuses.push(r.status);
        last = Some(r);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    let r = last.unwrap();
    assert_eq!(r.json["error"], "rate_limited");
    assert!(retry_after(&r) >= 1);
    assert_eq!(r.headers["x-ratelimit-limit"], "1");
    assert_eq!(r.headers["x-ratelimit-remaining"], "0");
    assert!(r.headers.contains_key("x-ratelimit-reset"));
    // Successful responses carry the headers too.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = send(&app, Some(&slow), Method::GET, "/v1/events?limit=1", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-ratelimit-limit"], "1");
    // Other keys have buckets of their own.
    assert_eq!(
        send(
            &app,
            Some(&app.key),
            Method::GET,
            "/v1/events?limit=1",
            None
        )
        .await
        .status,
        200
    );

    // Events per second: each valid event takes a token; a request that does not fit
    // is refused whole, and nothing from it is stored.
    let events_key = create_key(
        &app.base,
        TENANT,
        &["ingest"],
        json!({"requests_per_sec": 0, "events_per_sec": 5, "events_burst": 10}),
    )
    .await;
    let r = send(
        &app,
        Some(&events_key),
        Method::POST,
        "/v1/events",
        Some(Value::from(events(10))),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let refused = events(4);
    let r = send(
        &app,
        Some(&events_key),
        Method::POST,
        "/v1/events",
        Some(Value::from(refused.clone())),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.json["error"], "rate_limited");
    assert!(r.json["message"].as_str().unwrap().contains("events"));
    assert_eq!(r.headers["x-ratelimit-limit"], "5");
    assert!(retry_after(&r) >= 1);
    assert_eq!(app.wait_for_count(10).await, 10);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.count_final().await,
        10,
        "nothing from the refused request is stored"
    );
}

/// The usage rows of `key_id`, once `n` are there.
async fn usage_rows(app: &TestApp, as_key: &str, query: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = send(
            app,
            Some(as_key),
            Method::GET,
            &format!("/v1/admin/usage?{}&{query}", range()),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let rows = r.json["requests"].as_array().unwrap().clone();
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_usage_log_records_every_request_in_order_failures_included() {
    let app = spawn_app("usage_log").await;
    let key = create_key(
        &app.base,
        TENANT,
        &["ingest"],
        json!({"requests_per_sec": 1, "requests_burst": 5, "events_per_sec": 0}),
    )
    .await;
    let key_id = &key[..16];
    let mut batch = events(3);
    batch.push(json!({"event_id": "not-a-uuid"}));
    let mut sent = Vec::new();
    let requests: Vec<(Method, &str, Option<String>, &str)> = vec![
        (
            Method::POST,
            "/v1/events",
            Some(Value::from(batch).to_string()),
            JSON,
        ),
        (Method::POST, "/v1/events", Some("{\"oops\": ".into()), JSON),
        (Method::POST, "/v1/events", Some("a,b".into()), "text/csv"),
        (Method::GET, "/v1/events", None, JSON),
        (Method::GET, "/v1/stats/summary", None, JSON),
        (Method::GET, "/v1/events", None, JSON),
    ];
    for (i, (method, path, body, ct)) in requests.into_iter().enumerate() {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", app.base))
            .header("authorization", format!("Bearer {key}"))
            .header("x-request-id", format!("usage-test-{i}"));
        if let Some(body) = body {
            req = req.header("content-type", ct).body(body);
        }
        let r = req.send().await.unwrap();
        assert_eq!(
            r.headers()["x-request-id"],
            format!("usage-test-{i}").as_str()
        );
        sent.push(r.status().as_u16());
    }
    // 202 (3 of 4 events), 400, 415, 403 (no read scope), 403, 429 (burst of 5 used up).
    assert_eq!(sent, [202, 400, 415, 403, 403, 429]);
    // And one with a key that is not valid: no tenant, so only the operator sees it.
    let r = send(
        &app,
        Some("adt_ffffffffffff_nope"),
        Method::GET,
        "/v1/events",
        None,
    )
    .await;
    assert_eq!(r.status, 401);

    let rows = usage_rows(&app, &app.key, &format!("key_id={key_id}"), 6).await;
    let got: Vec<(u64, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().unwrap(),
                r["route"].as_str().unwrap(),
                r["request_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (202, "/v1/events", "usage-test-0"),
            (400, "/v1/events", "usage-test-1"),
            (415, "/v1/events", "usage-test-2"),
            (403, "/v1/events", "usage-test-3"),
            (403, "/v1/stats/summary", "usage-test-4"),
            (429, "/v1/events", "usage-test-5"),
        ]
    );
    let seqs: Vec<u64> = rows.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(rows
        .iter()
        .all(|r| r["instance_id"] == rows[0]["instance_id"] && r["tenant_id"] == TENANT));
    assert_eq!(
        (
            rows[0]["events_accepted"].as_u64(),
            rows[0]["events_rejected"].as_u64()
        ),
        (Some(3), Some(1))
    );
    assert_eq!(rows[0]["method"], "POST");
    assert!(rows[0]["bytes_in"].as_u64().unwrap() > 100);
    assert!(rows.iter().all(|r| r["bytes_out"].as_u64().unwrap() > 0));
    assert!(rows.iter().all(|r| r["latency_us"].as_u64().unwrap() > 0));
    // Status class filter.
    let client_errors = usage_rows(&app, &app.key, &format!("key_id={key_id}&status=4xx"), 5).await;
    assert_eq!(client_errors.len(), 5);
    // The failed authentication is in the operator's view, without a tenant or key.
    let all = usage_rows(&app, ADMIN_KEY, "status=4xx&limit=10000", 6).await;
    assert!(
        all.iter().any(|r| r["status"] == 401
            && r["tenant_id"] == ""
            && r["key_id"] == ""
            && r["route"] == "/v1/events"),
        "{all:?}"
    );
    // Never a key or a body in the log.
    let raw: Vec<String> = app
        .db
        .query("SELECT concat(request_id, key_id, route, tenant) FROM usage_log")
        .fetch_all()
        .await
        .unwrap();
    assert!(raw
        .iter()
        .all(|r| !r.contains(&key[16..]) && !r.contains("oops") && !r.contains("nope")));

    // Requests per key per hour.
    let hourly = send(
        &app,
        Some(&app.key),
        Method::GET,
        &format!("/v1/admin/usage/hourly?{}&key_id={key_id}", range()),
        None,
    )
    .await;
    assert_eq!(hourly.status, 200, "{}", hourly.text);
    let hours = hourly.json["hours"].as_array().unwrap();
    let total: u64 = hours.iter().map(|h| h["requests"].as_u64().unwrap()).sum();
    let limited: u64 = hours
        .iter()
        .map(|h| h["rate_limited"].as_u64().unwrap())
        .sum();
    let accepted: u64 = hours
        .iter()
        .map(|h| h["events_accepted"].as_u64().unwrap())
        .sum();
    assert_eq!((total, limited, accepted), (6, 1, 3));
    // The usage rows went in as Native blocks, not as RowBinary after a refused one.
    assert_eq!(app.metric("adtrack_native_fallbacks_total").await, 0.0);
}

#[tokio::test]
async fn usage_rows_of_the_last_moments_are_written_on_a_graceful_stop() {
    // A long flush interval: only the stop can write the rows in time.
    let mut app = spawn_app_with("usage_stop", &[("ADTRACK_USAGE_FLUSH_MS", "600000")]).await;
    for _ in 0..5 {
        assert_eq!(app.get("/v1/events?limit=1").await.status, 200);
    }
    app.stop().await;
    let n: u64 = app
        .db
        .query("SELECT count() FROM usage_log FINAL WHERE route = '/v1/events' AND status = 200")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(n, 5);
}

#[tokio::test]
async fn deleting_a_users_events_removes_them_for_the_tenant_only() {
    // Flushes every second, so its second pass comes 2 s after the first.
    let app = spawn_app_with("delete_user", &[("ADTRACK_FLUSH_INTERVAL_MS", "1000")]).await;
    // Another instance of the same tenant, whose events reach ClickHouse after the first pass
    // (up to ~1 s after they were sent) and well before the second (~2.5 s), even when the
    // parallel tests keep the local engine busy (with 0.4 s between the passes and a flush
    // after 0.3 s, a slow insert once missed the second pass; with 1 s and 0.7 s, once under
    // twice the usual load).
    let second = spawn_app_with(
        "delete_user_second",
        &[
            ("ADTRACK_CLICKHOUSE_DATABASE", app.database.as_str()),
            ("ADTRACK_FLUSH_INTERVAL_MS", "700"),
        ],
    )
    .await;
    let other = spawn_app_for(
        "delete_user_other",
        "globex",
        &[("ADTRACK_CLICKHOUSE_DATABASE", app.database.as_str())],
    )
    .await;
    let of_user = |user: &str, n: usize| -> Vec<Value> {
        (0..n)
            .map(|_| {
                let mut e = event();
                e["user_id"] = user.into();
                e
            })
            .collect()
    };
    assert_eq!(
        other
            .post_and_wait(Value::from(of_user("u-1", 2)).to_string())
            .await
            .status,
        200
    );
    // Not waited for: the deletion must still cover them.
    assert_eq!(
        app.post(Value::from(of_user("u-1", 3)).to_string(), JSON)
            .await
            .status,
        202
    );
    assert_eq!(
        app.post(Value::from(of_user("u-2", 4)).to_string(), JSON)
            .await
            .status,
        202
    );
    assert_eq!(
        second
            .post(Value::from(of_user("u-1", 2)).to_string(), JSON)
            .await
            .status,
        202
    );

    let r = send(
        &app,
        Some(&app.key),
        Method::DELETE,
        "/v1/users/u-1/events",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json["deleted_events"], 5,
        "this instance's 3 and the other's 2"
    );
    let count = |tenant: &str, user: &str| {
        let db = app.db.clone();
        let (tenant, user) = (tenant.to_string(), user.to_string());
        async move {
            db.query("SELECT count() FROM events FINAL WHERE tenant = ? AND user_id = ?")
                .bind(tenant)
                .bind(user)
                .fetch_one::<u64>()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count(TENANT, "u-1").await,
        0,
        "applied when the answer comes"
    );
    assert_eq!(count(TENANT, "u-2").await, 4);
    assert_eq!(
        count("globex", "u-1").await,
        2,
        "another tenant's user is untouched"
    );
    // The usage log has the route, never the user id.
    // The key's two posts and the deletion.
    let rows = usage_rows(
        &app,
        &app.key,
        &format!("status=2xx&key_id={}", &app.key[..16]),
        3,
    )
    .await;
    assert!(rows
        .iter()
        .any(|r| r["route"] == "/v1/users/{user_id}/events"));
    assert!(!serde_json::to_string(&rows).unwrap().contains("u-1"));
}

#[tokio::test]
async fn the_ttl_follows_the_retention_setting() {
    let mut app = spawn_app_with(
        "ttl",
        &[
            ("ADTRACK_RETENTION_DAYS", "7"),
            ("ADTRACK_USAGE_RETENTION_DAYS", "40"),
        ],
    )
    .await;
    let ttl = |db: clickhouse::Client, table: &'static str| async move {
        db.query(
            "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = ?",
        )
        .bind(table)
        .fetch_one::<String>()
        .await
        .unwrap()
    };
    assert!(ttl(app.db.clone(), "events")
        .await
        .contains("toIntervalDay(7)"));
    assert!(ttl(app.db.clone(), "usage_log")
        .await
        .contains("toIntervalDay(40)"));
    app.env.insert("ADTRACK_RETENTION_DAYS".into(), "12".into());
    let app = app.restart().await;
    let events_ttl = ttl(app.db.clone(), "events").await;
    assert!(events_ttl.contains("toIntervalDay(12)"), "{events_ttl}");
    assert!(!events_ttl.contains("toIntervalDay(7)"), "{events_ttl}");
}

#[tokio::test]
async fn no_spelling_of_a_path_gets_past_the_scope_check() {
    let app = spawn_app("auth_paths").await;
    let read = create_key(&app.base, TENANT, &["read"], UNLIMITED()).await;
    let ingest = create_key(&app.base, TENANT, &["ingest"], UNLIMITED()).await;
    let spellings = [
        "/v1/events/",
        "//v1/events",
        "/v1//events",
        "/v1/./events",
        "/v1/x/../events",
        "/v1/%65vents",
        "/v1/events%2F",
        "/V1/events",
    ];
    for path in spellings {
        // A read key must not write events under any spelling of the ingest path...
        let r = send(&app, Some(&read), Method::POST, path, Some(event())).await;
        assert!(
            !(200..300).contains(&r.status),
            "read key POST {path}: {}",
            r.status
        );
        // ...nor an ingest key read, nor anyone without a key do either.
        let r = send(&app, Some(&ingest), Method::GET, path, None).await;
        assert!(
            !(200..300).contains(&r.status),
            "ingest key GET {path}: {}",
            r.status
        );
        let r = send(&app, None, Method::POST, path, Some(event())).await;
        assert!(
            !(200..300).contains(&r.status),
            "no key POST {path}: {}",
            r.status
        );
    }
    assert_eq!(app.count_final().await, 0);
}

#[tokio::test]
async fn readiness_needs_the_key_and_usage_tables() {
    let app = spawn_app("ready_tables").await;
    assert_eq!(app.get("/health/ready").await.status, 200);
    app.db
        .query("DROP TABLE usage_log")
        .execute()
        .await
        .unwrap();
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.json["reason"].as_str().unwrap().contains("usage_log"),
        "{}",
        ready.text
    );
}

#[tokio::test]
async fn bad_usage_parameters_are_400_naming_the_parameter() {
    let app = spawn_app("usage_range").await;
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
    for path in ["/v1/admin/usage", "/v1/admin/usage/hourly"] {
        for (query, error, field) in [
            (format!("from={now}&to={now}"), "invalid_time_range", "to"),
            (
                format!("from=yesterday&to={now}"),
                "invalid_parameter",
                "from",
            ),
        ] {
            let url = format!("{path}?{query}");
            let r = send(&app, Some(ADMIN_KEY), Method::GET, &url, None).await;
            assert_eq!(r.status, 400, "{url}: {}", r.text);
            assert_eq!(r.json["error"], error, "{url}");
            assert_eq!(r.json["field"], field, "{url}");
        }
    }
}

#[tokio::test]
async fn a_key_header_that_is_not_ascii_is_invalid_not_missing() {
    let app = spawn_app("auth_not_ascii").await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/events", app.base);
    let latin1 = reqwest::header::HeaderValue::from_bytes(b"Bearer adt_\xe9t\xe9").unwrap();
    let r = http.get(&url).header("authorization", latin1).send().await;
    let r = Response::from(r.unwrap()).await;
    assert_eq!(
        (r.status, &r.json["error"]),
        (401, &json!("invalid_api_key"))
    );
    let r = Response::from(http.get(&url).send().await.unwrap()).await;
    assert_eq!(
        (r.status, &r.json["error"]),
        (401, &json!("missing_api_key"))
    );
}
