//! JSON request bodies (`POST /v1/query`, the admin API) read with serde, so an error names the
//! field at fault by its JSON path (`filters[2].op`, `rate_limit.events_per_sec`), which
//! poem-openapi's `Json<T>` does not report. The OpenAPI document still shows `T`'s schema.

use poem::Request;
use poem_openapi::{
    registry::{MetaMediaType, MetaRequest, Registry},
    types::Type,
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
};
use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt;

use crate::analytics::InvalidInput;

/// Largest JSON request body accepted.
pub const MAX_JSON_BODY: usize = 64 * 1024;

/// The error code of a body not sent as `application/json` (answered with 415).
pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";

/// A JSON body, or why it is not acceptable: `unsupported_media_type` (the handler answers
/// 415) or `invalid_body` (400) with the JSON path of the fault in `field` (empty when the
/// body as a whole is at fault).
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
    let invalid = |msg: String| InvalidInput::new("invalid_body", "", msg);
    let json = request
        .content_type()
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|ct| ct.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        let sent = request.content_type().unwrap_or("none");
        return Err(InvalidInput::new(
            UNSUPPORTED_MEDIA_TYPE,
            "",
            format!("send the body as Content-Type: application/json (got {sent})"),
        ));
    }
    let mut raw = Vec::new();
    body.take()
        .map_err(|e| invalid(e.to_string()))?
        .into_async_read()
        .take(MAX_JSON_BODY as u64 + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| invalid(format!("the body could not be read: {e}")))?;
    if raw.len() > MAX_JSON_BODY {
        return Err(
            invalid(format!("the body is larger than {MAX_JSON_BODY} bytes"))
                .with_limit(MAX_JSON_BODY as u64),
        );
    }
    parse(&raw)
}

/// Parses a body, naming the JSON path of the first fault.
fn parse<T: DeserializeOwned>(raw: &[u8]) -> Result<T, InvalidInput> {
    let de = &mut serde_json::Deserializer::from_slice(raw);
    serde_path_to_error::deserialize(de).map_err(|e| {
        // serde_path_to_error says `.` for the body as a whole and `?` where it lost track.
        let path = e.path().to_string();
        let path = if path == "." || path.contains('?') {
            String::new()
        } else {
            path
        };
        let message = e.into_inner().to_string();
        // A missing field is reported at the object that lacks it; name the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let field = match missing {
            Some(name) if path.is_empty() => name.to_string(),
            Some(name) => format!("{path}.{name}"),
            None => path,
        };
        InvalidInput::new("invalid_body", &field, message)
    })
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
        assert_eq!(field(r#"{"name": "a", "inner": [{}]}"#), "inner[0].n");
        // Broken JSON concerns the body as a whole; the message gives line and column.
        let broken = parse::<Outer>(b"{").unwrap_err();
        assert_eq!(broken.field, "");
        assert!(
            broken.message.contains("line 1 column 1"),
            "{}",
            broken.message
        );
        assert!(parse::<Outer>(br#"{"name": "a"}"#).is_ok());
    }
}
