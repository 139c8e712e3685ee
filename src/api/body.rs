//! Reading the `POST /v1/events` body: content type, gzip, and the size limit.
//!
//! This is an extractor of its own rather than poem-openapi's `Json<T>` for two reasons: the
//! typed `Json` parses through `serde_json::Value` (about 40% slower on batches), and its
//! errors are plain text. Here every failure becomes a typed, documented response. The
//! OpenAPI document still shows the event schema for both media types.

use std::io::Read;

use poem::{Request, RequestBody};
use poem_openapi::{
    registry::{MetaMediaType, MetaRequest, MetaSchemaRef, Registry},
    types::Type,
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
};
use tokio::io::AsyncReadExt;

use super::types::{EventDoc, EventOrBatchDoc};
use crate::{ingest::BodyFormat, usage::RequestUsage};

pub const JSON: &str = "application/json";
pub const NDJSON: &str = "application/x-ndjson";

/// Why the body could not be read.
#[derive(Debug)]
pub enum ReadError {
    UnsupportedMediaType(String),
    UnsupportedEncoding(String),
    TooLarge { limit: usize },
    BadGzip(String),
    NotUtf8 { offset: usize },
    Io(String),
}

/// The decoded body, or why there is none. The handler turns the error into a response.
pub struct EventsBody(pub Result<(String, BodyFormat), ReadError>);

/// The body limit in force, put into request data by the route.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

impl<'a> ApiExtractor<'a> for EventsBody {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        EventOrBatchDoc::register(registry);
        EventDoc::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: Some(
                "One event object or a JSON array of events (`application/json`), or one event \
                 object per line (`application/x-ndjson`). `Content-Encoding: gzip` is accepted; \
                 the size limit applies to the decompressed body.",
            ),
            content: vec![
                MetaMediaType {
                    content_type: JSON,
                    schema: EventOrBatchDoc::schema_ref(),
                },
                MetaMediaType {
                    content_type: NDJSON,
                    schema: MetaSchemaRef::Reference(EventDoc::name().into_owned()),
                },
            ],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        Ok(events_body(request, body).await)
    }
}

/// Reads the events body of `request` within the route's [`BodyLimit`].
pub async fn events_body(request: &Request, body: &mut RequestBody) -> EventsBody {
    let limit = request.data::<BodyLimit>().map_or(10 << 20, |l| l.0);
    EventsBody(read(request, body, limit).await)
}

async fn read(
    request: &Request,
    body: &mut RequestBody,
    limit: usize,
) -> Result<(String, BodyFormat), ReadError> {
    let format = match request.content_type() {
        Some(ct) => media_format(ct).ok_or_else(|| ReadError::UnsupportedMediaType(ct.into()))?,
        None => return Err(ReadError::UnsupportedMediaType(String::new())),
    };
    let gzip = match request.header("content-encoding").map(str::trim) {
        None | Some("") | Some("identity") => false,
        Some(enc) if enc.eq_ignore_ascii_case("gzip") || enc.eq_ignore_ascii_case("x-gzip") => true,
        Some(other) => return Err(ReadError::UnsupportedEncoding(other.into())),
    };
    let declared = request
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ReadError::TooLarge { limit });
    }

    let body = body.take().map_err(|e| ReadError::Io(e.to_string()))?;
    // Sized up front: growing a batch body by doubling copies it several times.
    let mut raw = Vec::with_capacity(declared.unwrap_or(0));
    body.into_async_read()
        .take(limit as u64 + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| ReadError::Io(e.to_string()))?;
    if let Some(usage) = request.extensions().get::<std::sync::Arc<RequestUsage>>() {
        // What came over the wire (compressed, if it was), also without a Content-Length.
        usage
            .bytes_in
            .store(raw.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    if raw.len() > limit {
        return Err(ReadError::TooLarge { limit });
    }
    if gzip {
        // The work follows the decompressed size, unknown yet: JSON shrinks 5-10 times.
        let expected = raw.len().saturating_mul(8);
        raw = crate::serve::cpu_bound(expected, move || gunzip(&raw, limit)).await?;
    }
    // A UTF-8 byte-order mark, which some encoders write first (.NET, PowerShell): not JSON,
    // but there is no doubt what was meant, and RFC 8259 lets a parser ignore it.
    let mut bom = 0;
    if raw.starts_with(b"\xEF\xBB\xBF") {
        raw.drain(..3);
        bom = 3;
    }
    let text = String::from_utf8(raw).map_err(|e| ReadError::NotUtf8 {
        offset: bom + e.utf8_error().valid_up_to(),
    })?;
    Ok((text, format))
}

/// Decompresses at most `limit` bytes: a gzip bomb stops at the limit instead of filling memory.
fn gunzip(compressed: &[u8], limit: usize) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(compressed)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ReadError::BadGzip(e.to_string()))?;
    if out.len() > limit {
        return Err(ReadError::TooLarge { limit });
    }
    Ok(out)
}

fn media_format(content_type: &str) -> Option<BodyFormat> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Some(BodyFormat::Json),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines" => Some(BodyFormat::Ndjson),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_ignore_parameters_and_case() {
        assert_eq!(
            media_format("Application/JSON; charset=utf-8"),
            Some(BodyFormat::Json)
        );
        assert_eq!(
            media_format("application/x-ndjson"),
            Some(BodyFormat::Ndjson)
        );
        assert_eq!(media_format("text/plain"), None);
    }

    #[test]
    fn gunzip_stops_at_the_limit() {
        use flate2::{write::GzEncoder, Compression};
        use std::io::Write;
        let mut enc = GzEncoder::new(Vec::new(), Compression::best());
        enc.write_all(&vec![b' '; 1 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 10_000);
        assert!(matches!(
            gunzip(&bomb, 1000),
            Err(ReadError::TooLarge { limit: 1000 })
        ));
        assert_eq!(gunzip(&bomb, 1 << 20).unwrap().len(), 1 << 20);
        assert!(matches!(
            gunzip(b"not gzip", 100),
            Err(ReadError::BadGzip(_))
        ));
    }
}
