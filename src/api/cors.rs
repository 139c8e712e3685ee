//! Cross-origin requests from browsers to the `/v1` API: ad tags and pixels on publishers'
//! pages sending events, dashboards on another origin reading figures.
//!
//! Every `/v1` request carries `Authorization: Bearer <key>`, so a browser first asks with a
//! preflight (`OPTIONS`, no key). That is answered here, before the guard would refuse it for
//! having no key; and every answer to a cross-origin request, errors included, says the origin
//! may read it, or the page's code would see a network error instead of the JSON error body.
//!
//! Allowing any origin (the default) gives a page nothing it could not do already: the API
//! trusts only the key a request carries, never cookies, and a page has only the keys it was
//! given. `/health`, `/metrics` and the documentation are not opened to other origins.

use poem::{
    http::{header, HeaderValue, Method, StatusCode},
    Request, Response,
};

use super::types::ErrorBody;

/// Response headers a page may read besides the safelisted ones.
const EXPOSED: &str = "Retry-After, X-Request-Id, X-RateLimit-Limit, X-RateLimit-Remaining, \
                       X-RateLimit-Reset, X-Export-Until";
/// Every method the `/v1` API has.
const METHODS: &str = "GET, POST, DELETE";
/// Browsers cache a preflight at most this long (Chromium caps it at 2 hours).
const MAX_AGE_SECS: &str = "7200";

/// Which origins may call the `/v1` API from a browser (`ADTRACK_CORS_ORIGINS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `*`: any origin.
    Any,
    /// These origins (`scheme://host[:port]`, lowercase).
    List(Vec<String>),
    /// `none`: no cross-origin access; preflights are answered like any request without a key.
    Off,
}

impl CorsOrigins {
    /// `*`, `none`, or a comma-separated list of origins such as `https://shop.example`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw.trim() {
            "*" => return Ok(Self::Any),
            "none" => return Ok(Self::Off),
            _ => {}
        }
        let mut origins = Vec::new();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            origins.push(origin(entry)?);
        }
        match origins.is_empty() {
            true => Err("give `*`, `none`, or origins such as `https://shop.example`".into()),
            false => Ok(Self::List(origins)),
        }
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        match self {
            Self::Any => Some(HeaderValue::from_static("*")),
            Self::List(list) => {
                let origin = origin.to_str().ok()?;
                list.iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(origin))
                    .then(|| HeaderValue::from_str(origin).ok())
                    .flatten()
            }
            Self::Off => None,
        }
    }
}

/// One configured origin, checked and lowercased (a trailing `/` is dropped).
fn origin(entry: &str) -> Result<String, String> {
    let lower = entry.to_ascii_lowercase();
    let trimmed = lower.strip_suffix('/').unwrap_or(&lower);
    let host = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"));
    let plain = |host: &str| {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    };
    match host {
        Some(host) if plain(host) => Ok(trimmed.to_string()),
        _ => Err(format!(
            "{entry:?} is not an origin: give `scheme://host[:port]` (http or https, no path), \
             e.g. `https://shop.example`"
        )),
    }
}

/// Whether cross-origin access applies to `path`.
fn applies(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// The answer to a browser's preflight, when `req` is one: `204` with what the page may send
/// if its origin is allowed, `403` with an error body naming it otherwise (the browser then
/// does not send the request). `None` for any other request, or with cross-origin access off.
pub fn preflight(origins: &CorsOrigins, req: &Request) -> Option<Response> {
    if req.method() != Method::OPTIONS
        || *origins == CorsOrigins::Off
        || !applies(req.uri().path())
        || !req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return None;
    }
    let origin = req.headers().get(header::ORIGIN)?;
    let Some(allowed) = origins.allow(origin) else {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        let message = format!(
            "requests from {origin} are not allowed; ADTRACK_CORS_ORIGINS lists the origins that are"
        );
        return Some(
            ErrorBody::new("origin_not_allowed", message).with_status(StatusCode::FORBIDDEN),
        );
    };
    let mut resp = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed)
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, METHODS)
        .header(header::ACCESS_CONTROL_MAX_AGE, MAX_AGE_SECS)
        .header(
            header::VARY,
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        )
        .finish();
    // Whatever headers the page asks for (its own, say a SDK version): the API reads only
    // the ones it knows, and refusing others would only break the page.
    if let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        resp.headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    Some(resp)
}

/// Lets the page that sent a cross-origin request read `resp` (whatever its status) when its
/// origin is allowed.
pub fn allow_reading(
    origins: &CorsOrigins,
    origin: Option<&HeaderValue>,
    path: &str,
    resp: &mut Response,
) {
    let Some(origin) = origin else { return };
    if !applies(path) {
        return;
    }
    let Some(allowed) = origins.allow(origin) else {
        return;
    };
    let headers = resp.headers_mut();
    if matches!(origins, CorsOrigins::List(_)) {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSED),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_and_bad_ones_are_explained() {
        assert_eq!(CorsOrigins::parse("*"), Ok(CorsOrigins::Any));
        assert_eq!(CorsOrigins::parse(" none "), Ok(CorsOrigins::Off));
        assert_eq!(
            CorsOrigins::parse("https://Shop.example/, http://localhost:3000"),
            Ok(CorsOrigins::List(vec![
                "https://shop.example".into(),
                "http://localhost:3000".into()
            ]))
        );
        for bad in [
            "shop.example",
            "https://shop.example/path",
            "ftp://x",
            "https://",
            ",",
        ] {
            let err = CorsOrigins::parse(bad).unwrap_err();
            assert!(err.contains("origin"), "{bad}: {err}");
        }
    }

    #[test]
    fn only_listed_origins_are_allowed_and_are_echoed() {
        let list = CorsOrigins::parse("https://shop.example").unwrap();
        let shop = HeaderValue::from_static("https://shop.example");
        assert_eq!(list.allow(&shop), Some(shop.clone()));
        assert_eq!(
            list.allow(&HeaderValue::from_static("https://evil.example")),
            None
        );
        assert_eq!(
            list.allow(&HeaderValue::from_static("https://shop.example.evil")),
            None
        );
        assert_eq!(
            CorsOrigins::Any.allow(&shop),
            Some(HeaderValue::from_static("*"))
        );
        assert_eq!(CorsOrigins::Off.allow(&shop), None);
    }
}
