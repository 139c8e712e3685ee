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

use super::{guard::is_api, types::ErrorBody};

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
                let listed =
                    |allowed: &String| allowed.as_bytes().eq_ignore_ascii_case(origin.as_bytes());
                list.iter().any(listed).then(|| origin.clone())
            }
            Self::Off => None,
        }
    }
}

/// One configured origin as browsers write it: `scheme://host[:port]`, lowercase, no default
/// port (a browser on `https://shop.example:443` sends `Origin: https://shop.example`, so the
/// port written out would never match) and no trailing `/`.
fn origin(entry: &str) -> Result<String, String> {
    let bad = |why: &str| {
        format!(
            "{entry:?} is not an origin ({why}): give `scheme://host[:port]`, http or https, \
             e.g. `https://shop.example`"
        )
    };
    let lower = entry.to_ascii_lowercase();
    let trimmed = match lower.strip_suffix('/') {
        Some(trimmed) if trimmed.contains("://") => trimmed,
        _ => &lower,
    };
    let (scheme, authority) = trimmed
        .split_once("://")
        .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
        .ok_or_else(|| bad("no http:// or https://"))?;
    // `[v6 address]:port` or `host:port`; the port is optional.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (address, rest) = v6.split_once(']').ok_or_else(|| bad("no `]`"))?;
            let valid = !address.is_empty()
                && address
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
            if !valid {
                return Err(bad("not an IPv6 address in brackets"));
            }
            let port = match rest {
                "" => None,
                rest => Some(
                    rest.strip_prefix(':')
                        .ok_or_else(|| bad("a path or text after the host"))?,
                ),
            };
            (&authority[..address.len() + 2], port)
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let plain_host = |host: &str| {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
    };
    if !host.starts_with('[') && !plain_host(host) {
        return Err(bad(
            "a host has only letters, digits, `.` and `-`, and no path",
        ));
    }
    let port = match port {
        None => None,
        Some(port) => match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("the port must be a number from 1 to 65535")),
            Ok(443) if scheme == "https" => None,
            Ok(80) if scheme == "http" => None,
            Ok(port) => Some(port),
        },
    };
    Ok(match port {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

/// The answer to a browser's preflight, when `req` is one: `204` with what the page may send
/// if its origin is allowed, `403` with an error body naming it otherwise (the browser then
/// does not send the request). `None` for any other request, or with cross-origin access off.
pub fn preflight(origins: &CorsOrigins, req: &Request) -> Option<Response> {
    if req.method() != Method::OPTIONS
        || *origins == CorsOrigins::Off
        || !is_api(req.uri().path())
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
/// origin is allowed. Every `/v1` answer says it depends on `Origin`, so that a cache never
/// hands one made for another origin (or for none) to a page.
pub fn allow_reading(
    origins: &CorsOrigins,
    origin: Option<&HeaderValue>,
    path: &str,
    resp: &mut Response,
) {
    if *origins == CorsOrigins::Off || !is_api(path) {
        return;
    }
    let headers = resp.headers_mut();
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    let Some(allowed) = origin.and_then(|origin| origins.allow(origin)) else {
        return;
    };
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
    fn origins_parse_as_browsers_write_them_and_bad_ones_are_explained() {
        assert_eq!(CorsOrigins::parse("*"), Ok(CorsOrigins::Any));
        assert_eq!(CorsOrigins::parse(" none "), Ok(CorsOrigins::Off));
        assert_eq!(
            CorsOrigins::parse(
                "https://Shop.example/, http://localhost:3000, https://a.example:443, \
                 http://b.example:80, https://c.example:80, http://[::1]:8080"
            ),
            Ok(CorsOrigins::List(vec![
                "https://shop.example".into(),
                "http://localhost:3000".into(),
                "https://a.example".into(),
                "http://b.example".into(),
                "https://c.example:80".into(),
                "http://[::1]:8080".into(),
            ]))
        );
        for (bad, why) in [
            ("shop.example", "no http:// or https://"),
            ("ftp://x", "no http:// or https://"),
            ("https://shop.example/path", "no path"),
            ("https://", "a host has only"),
            ("https://a:b:c", "the port must be a number"),
            ("https://x:", "the port must be a number"),
            ("https://x:0", "the port must be a number"),
            ("http://[::1", "no `]`"),
            ("http://[::1]/x", "a path or text after the host"),
        ] {
            let err = CorsOrigins::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let err = CorsOrigins::parse(" , ").unwrap_err();
        assert!(err.starts_with("give `*`, `none`, or origins"), "{err}");
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
