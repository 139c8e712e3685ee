//! Authentication, scopes and request rate limits for every `/v1/*` request, in one place,
//! before any handler runs. Handlers receive the caller through the `ApiKey` security scheme
//! (which also declares `Authorization: Bearer` in the OpenAPI document).
//!
//! Which scope a route needs is decided here, from its method and route template:
//!
//! | routes                                                  | scope    |
//! |---------------------------------------------------------|----------|
//! | `POST /v1/events`                                       | `ingest` |
//! | `GET /v1/events…`, `/v1/stats/*`, `POST /v1/query`      | `read`   |
//! | `/v1/admin/*`, `DELETE /v1/users/{user_id}/events`      | `admin`  |
//! | `/health/*`, `/metrics`, `/docs`, `/openapi.json`       | none     |

use poem::{
    http::{header, HeaderValue, Method, StatusCode},
    Request, Response,
};
use poem_openapi::{auth::Bearer, SecurityScheme};

use crate::auth::{
    rate_limit::{Exceeded, Quota},
    Auth, AuthError, Principal, Scope,
};

/// What a route requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    /// Any valid key (unknown `/v1` paths: a 404 only for callers with a key).
    Authenticated,
    Scope(Scope),
}

pub fn access(method: &Method, route: &str, path: &str) -> Access {
    match route {
        "/v1/events" if method == Method::POST => Access::Scope(Scope::Ingest),
        "/v1/events" | "/v1/events/export" | "/v1/events/{event_id}" | "/v1/query" => {
            Access::Scope(Scope::Read)
        }
        r if r.starts_with("/v1/stats/") => Access::Scope(Scope::Read),
        r if r.starts_with("/v1/admin/") || r == "/v1/users/{user_id}/events" => {
            Access::Scope(Scope::Admin)
        }
        _ if is_api(path) => Access::Authenticated,
        _ => Access::Public,
    }
}

/// Whether `path` is in the `/v1` API.
pub fn is_api(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

// The guard has checked the key already; handlers take the caller from here. The doc comment
// is the scheme's description in the OpenAPI document.
/// An API key, sent as `Authorization: Bearer adt_<id>_<secret>`. A key belongs to one tenant
/// and has scopes: `ingest`, `read`, `admin`.
#[derive(SecurityScheme)]
#[oai(
    rename = "apiKey",
    ty = "bearer",
    bearer_format = "adt_<id>_<secret>",
    checker = "authenticated"
)]
pub struct ApiKey(pub Principal);

impl ApiKey {
    /// The caller's tenant; every query is filtered by it. (Empty for the operator, who the
    /// guard keeps away from event data: an empty tenant matches nothing.)
    pub fn tenant(&self) -> &str {
        self.0.tenant().unwrap_or("")
    }
}

async fn authenticated(req: &Request, _: Bearer) -> Option<Principal> {
    req.extensions().get::<Principal>().cloned()
}

/// What the guard decided about a request.
pub struct Checked {
    /// The authenticated caller, also when refused for scope or rate (for the usage log).
    pub principal: Option<Principal>,
    /// Go on (with the rate-limit state for the headers), or this answer.
    pub outcome: Result<Option<Quota>, Response>,
}

pub async fn check(auth: &Auth, req: &Request, access: Access) -> Checked {
    if access == Access::Public {
        return Checked {
            principal: None,
            outcome: Ok(None),
        };
    }
    // A header that is not visible ASCII holds no key of ours: invalid, not missing.
    let authenticated = match req.headers().get(header::AUTHORIZATION).map(|v| v.to_str()) {
        Some(Err(_)) => Err(AuthError::Invalid),
        presented => auth.authenticate(presented.and_then(Result::ok)).await,
    };
    let principal = match authenticated {
        Ok(p) => p,
        Err(err) => {
            return Checked {
                principal: None,
                outcome: Err(auth_error(&err)),
            }
        }
    };
    // Every request of a key counts against its limit, refused ones included.
    let quota = match &principal {
        Principal::Operator => None,
        Principal::Key(key) => match key.limiter.requests.take(1) {
            Ok(q) => Some(q),
            Err(over) => {
                return Checked {
                    principal: Some(principal),
                    outcome: Err(rate_limited(&over, "requests")),
                }
            }
        },
    };
    let outcome = match access {
        Access::Scope(scope) if !principal.has(scope) => Err(forbidden(&principal, scope)),
        _ => Ok(quota),
    };
    Checked {
        principal: Some(principal),
        outcome,
    }
}

fn auth_error(err: &AuthError) -> Response {
    let (status, code) = match err {
        AuthError::Missing => (StatusCode::UNAUTHORIZED, "missing_api_key"),
        AuthError::Invalid => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
        AuthError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable"),
    };
    let mut resp = error_response(status, code, &err.to_string());
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    } else {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    }
    resp
}

fn forbidden(principal: &Principal, scope: Scope) -> Response {
    let message = match principal {
        Principal::Operator => format!(
            "the bootstrap admin key manages tenants and keys only; use a key of the tenant with the `{}` scope",
            scope.name()
        ),
        Principal::Key(_) => format!("this API key lacks the `{}` scope", scope.name()),
    };
    error_response(StatusCode::FORBIDDEN, "insufficient_scope", &message)
}

/// 429 with `Retry-After` and the `X-RateLimit-*` headers.
pub fn rate_limited(over: &Exceeded, what: &str) -> Response {
    let mut resp = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        &format!(
            "this API key is over its {what} rate limit ({}/s); retry after {} s",
            over.quota.limit, over.retry_after_secs
        ),
    );
    set_quota_headers(&mut resp, &over.quota);
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(over.retry_after_secs),
    );
    resp
}

pub fn set_quota_headers(resp: &mut Response, quota: &Quota) {
    if quota.limit == 0 {
        return;
    }
    let headers = resp.headers_mut();
    headers.insert("x-ratelimit-limit", HeaderValue::from(quota.limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(quota.remaining));
    headers.insert("x-ratelimit-reset", HeaderValue::from(quota.reset_secs));
}

pub fn error_response(status: StatusCode, error: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": error, "message": message });
    Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_the_scope_it_needs() {
        let cases = [
            (Method::POST, "/v1/events", Access::Scope(Scope::Ingest)),
            (Method::GET, "/v1/events", Access::Scope(Scope::Read)),
            (
                Method::GET,
                "/v1/events/{event_id}",
                Access::Scope(Scope::Read),
            ),
            (Method::GET, "/v1/events/export", Access::Scope(Scope::Read)),
            (Method::POST, "/v1/query", Access::Scope(Scope::Read)),
            (Method::GET, "/v1/stats/summary", Access::Scope(Scope::Read)),
            (Method::POST, "/v1/admin/keys", Access::Scope(Scope::Admin)),
            (Method::GET, "/v1/admin/usage", Access::Scope(Scope::Admin)),
            (
                Method::DELETE,
                "/v1/users/{user_id}/events",
                Access::Scope(Scope::Admin),
            ),
            (Method::GET, "/health/ready", Access::Public),
            (Method::GET, "/metrics", Access::Public),
            (Method::GET, "/docs", Access::Public),
        ];
        for (method, route, expected) in cases {
            assert_eq!(access(&method, route, route), expected, "{method} {route}");
        }
        assert_eq!(
            access(&Method::GET, "other", "/v1/nothing"),
            Access::Authenticated
        );
        assert_eq!(
            access(&Method::GET, "other", "/favicon.ico"),
            Access::Public
        );
    }
}
