//! JSON request bodies (`POST /v1/query`, the admin API) read with serde, so an error names the
//! field at fault by its JSON path (`filters[2].op`, `rate_limit.events_per_sec`), which
//! poem-openapi's `Json<T>` does not report. The OpenAPI document still shows `T`'s schema.

use poem::Request;
use poem_openapi::{
    registry::{MetaMediaType, MetaRequest, Registry},
    types::Type,
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
};
use serde::{de::DeserializeOwned, Deserialize};
use tokio::io::AsyncReadExt;

use super::types::{DATE_TIME_EXPECTED, U32_EXPECTED};
use crate::analytics::InvalidInput;

/// Largest JSON request body accepted.
pub const MAX_JSON_BODY: usize = 64 * 1024;

/// The error code of a body not sent as `application/json` (answered with 415).
const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
/// The error code of a body over [`MAX_JSON_BODY`] (answered with 413, as on ingest).
const PAYLOAD_TOO_LARGE: &str = "payload_too_large";

/// How the answer to a faulty body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 415: not sent as JSON.
    UnsupportedMediaType,
    /// 413: over [`MAX_JSON_BODY`].
    TooLarge,
    /// 400: anything else.
    Invalid,
}

impl Fault {
    pub fn of(err: &InvalidInput) -> Self {
        match err.code {
            UNSUPPORTED_MEDIA_TYPE => Fault::UnsupportedMediaType,
            PAYLOAD_TOO_LARGE => Fault::TooLarge,
            _ => Fault::Invalid,
        }
    }
}

/// A JSON body, or why it is not acceptable: `unsupported_media_type` (the handler answers
/// 415), `payload_too_large` (413, with `limit`) or `invalid_body` (400) with the JSON path
/// of the fault in `field` (empty when the body as a whole is at fault); see [`Fault`].
pub struct JsonBody<T>(pub Result<T, InvalidInput>);

impl<'a, T: DeserializeOwned + Type> ApiExtractor<'a> for JsonBody<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: "application/json",
                schema: T::schema_ref(),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut poem::RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        Ok(JsonBody(read(request, body).await))
    }
}

async fn read<T: DeserializeOwned>(
    request: &Request,
    body: &mut poem::RequestBody,
) -> Result<T, InvalidInput> {
    if !request.content_type().is_some_and(is_json) {
        let sent = request.content_type().unwrap_or("none");
        return Err(InvalidInput::new(
            UNSUPPORTED_MEDIA_TYPE,
            "",
            format!("send the body as Content-Type: application/json (got {sent:?})"),
        ));
    }
    // Only the ingest endpoint takes compressed bodies (they are small here).
    if let Some(coding) = request
        .header("content-encoding")
        .filter(|c| !c.trim().eq_ignore_ascii_case("identity"))
    {
        return Err(InvalidInput::new(
            UNSUPPORTED_MEDIA_TYPE,
            "",
            format!("send the body uncompressed: this endpoint takes no Content-Encoding (got {coding:?})"),
        ));
    }
    let mut raw = Vec::new();
    body.take()
        .map_err(|e| whole_body(e.to_string()))?
        .into_async_read()
        .take(MAX_JSON_BODY as u64 + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| whole_body(format!("the body could not be read: {e}")))?;
    if raw.len() > MAX_JSON_BODY {
        return Err(InvalidInput::new(
            PAYLOAD_TOO_LARGE,
            "",
            format!("the body is larger than {MAX_JSON_BODY} bytes"),
        )
        .with_limit(MAX_JSON_BODY as u64));
    }
    parse(&raw)
}

/// Parses a body, naming the JSON path of the first fault.
fn parse<T: DeserializeOwned>(raw: &[u8]) -> Result<T, InvalidInput> {
    // serde would read an array as the object's fields in order; every body here is an object.
    if raw.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(whole_body(
            "the body must be a JSON object, not an array".into(),
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(raw);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(fault)?;
    // Anything after the value (`{…} junk`, a second object) makes the body broken JSON too.
    de.end().map_err(|e| whole_body(e.to_string()))?;
    Ok(value)
}

fn fault(e: serde_path_to_error::Error<serde_json::Error>) -> InvalidInput {
    let inner = e.inner();
    if inner.is_syntax() || inner.is_eof() || inner.is_io() {
        // Broken JSON concerns the body as a whole; the message has the line and column.
        return whole_body(e.into_inner().to_string());
    }
    let path = e.path().to_string();
    let message = plain(e.into_inner().to_string());
    // A missing field is reported at the object that lacks it; name the field itself.
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    let field = match (path.as_str(), missing) {
        // serde_path_to_error lost track of where it was.
        (path, _) if path.contains('?') => String::new(),
        (".", Some(name)) => name.to_string(),
        (".", None) => String::new(),
        (path, Some(name)) => format!("{path}.{name}"),
        (path, None) => path.to_string(),
    };
    InvalidInput::new("invalid_body", &field, message)
}

/// serde's and chrono's wording of a bad value, with what the value must be said plainly
/// where their words are a Rust type (`expected u32`) or say nothing about the format (a time
/// that chrono stopped reading: `premature end of input`). Written for the bodies' field types:
/// times are `DateTime`s with a zone (a date-only field would need its own wording), whole
/// numbers `u32` (limits, rate limits).
fn plain(message: String) -> String {
    const TIME_FAULTS: [&str; 5] = [
        "premature end of input",
        "input contains invalid characters",
        "trailing input",
        "input is out of range",
        "no possible date and time matching input",
    ];
    if TIME_FAULTS.iter().any(|fault| message.starts_with(fault)) {
        return format!("{DATE_TIME_EXPECTED}: {message}");
    }
    const RUST: &str = ", expected u32 at ";
    match message.find(RUST) {
        Some(at) => format!(
            "{}, expected {U32_EXPECTED} at {}",
            &message[..at],
            &message[at + RUST.len()..]
        ),
        None => message,
    }
}

/// A fault of the body as a whole (no field to name).
fn whole_body(message: String) -> InvalidInput {
    InvalidInput::new("invalid_body", "", message)
}

/// For a field with a default: `null` means the default too (as an absent field does).
pub fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

/// `application/json`, or a JSON-based type such as `application/merge-patch+json`.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Vec<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[test]
    fn errors_name_the_json_path() {
        let field = |s: &str| parse::<Outer>(s.as_bytes()).unwrap_err().field;
        assert_eq!(
            field(r#"{"name": "a", "inner": [{"n": 1}, {"n": -1}]}"#),
            "inner[1].n"
        );
        assert_eq!(field(r#"{"name": 5}"#), "name");
        assert_eq!(field(r#"{"name": "a", "nmae": 1}"#), "nmae");
        assert_eq!(field("{}"), "name");
        let array = parse::<Outer>(br#" ["a", []]"#).unwrap_err();
        assert_eq!((array.field.as_str(), array.code), ("", "invalid_body"));
        assert!(array.message.contains("not an array"), "{}", array.message);
        assert_eq!(field(r#"{"name": "a", "inner": [{}]}"#), "inner[0].n");
        assert!(parse::<Outer>(br#"{"name": "a"}"#).is_ok());
    }

    #[test]
    fn bad_values_say_what_they_must_be() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Timed {
            from: chrono::DateTime<chrono::Utc>,
            #[serde(default)]
            limit: u32,
        }
        let message = |s: &str| parse::<Timed>(s.as_bytes()).unwrap_err().message;
        assert_eq!(
            message(r#"{"from": "2026-12-01"}"#),
            "must be an RFC 3339 date-time with a zone, e.g. 2026-01-31T00:00:00Z: \
             premature end of input at line 1 column 21"
        );
        assert_eq!(
            message(r#"{"from": "2026-12-01T00:00:00Z", "limit": -1}"#),
            "invalid value: integer `-1`, expected a whole number from 0 to 4294967295 \
             at line 1 column 44"
        );
    }

    #[test]
    fn broken_json_concerns_the_whole_body() {
        for broken in [
            "{",
            r#"{"name": "#,
            r#"{"name": "a", "inner": [{"n": 1},"#,
            r#"{"name": "a"} junk"#,
            r#"{"name": "a"}{"name": "b"}"#,
        ] {
            let err = parse::<Outer>(broken.as_bytes()).unwrap_err();
            assert_eq!(
                (err.code, err.field.as_str()),
                ("invalid_body", ""),
                "{broken}"
            );
            assert!(
                err.message.contains("line 1 column"),
                "{broken}: {}",
                err.message
            );
        }
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for not in [
            "text/plain",
            "application/x-ndjson",
            "application/+json",
            "json",
            "",
        ] {
            assert!(!is_json(not), "{not}");
        }
    }

    #[test]
    fn null_takes_the_default() {
        #[derive(serde::Deserialize)]
        struct D {
            #[serde(default, deserialize_with = "null_as_default")]
            name: String,
        }
        let name = |s: &str| parse::<D>(s.as_bytes()).unwrap().name;
        assert_eq!(name(r#"{"name": null}"#), "");
        assert_eq!(name("{}"), "");
        assert_eq!(name(r#"{"name": "x"}"#), "x");
    }
}
