//! Turns a request body into events: JSON (one object or an array) or NDJSON.
//!
//! The body is split into raw per-event JSON first (cheap: `RawValue` only finds the
//! boundaries), so one bad event is rejected on its own and the rest of the batch still goes in.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{
    config::Limits,
    domain::{explain_parse_error, FieldError, TimeRules, ValidEvent, WireEvent},
    metrics::RejectReason,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one event object, or an array of them.
    Json,
    /// `application/x-ndjson`: one event object per line.
    Ndjson,
}

/// Why the body as a whole cannot be read (as opposed to one event in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    Malformed {
        message: String,
        line: usize,
        column: usize,
    },
    NotAnEventOrArray,
    Empty,
    TooManyEvents {
        count: usize,
        limit: usize,
    },
}

/// One event of the body that was not accepted.
#[derive(Debug)]
pub struct Rejection {
    pub index: usize,
    pub event_id: Option<String>,
    pub errors: Vec<FieldError>,
    pub reason: RejectReason,
}

/// The body, sorted into valid events and rejections (each knows its position in the body).
#[derive(Debug, Default)]
pub struct Sorted<'a> {
    pub valid: Vec<ValidEvent<'a>>,
    pub rejected: Vec<Rejection>,
}

pub fn sort_events<'a>(
    body: &'a str,
    format: BodyFormat,
    limits: &Limits,
    rules: &TimeRules,
) -> Result<Sorted<'a>, BodyError> {
    let raw = split(body, format, limits)?;
    let mut sorted = Sorted {
        valid: Vec::with_capacity(raw.len()),
        rejected: Vec::new(),
    };
    for (index, item) in raw.into_iter().enumerate() {
        let raw = match item {
            Ok(raw) => raw,
            Err(error) => {
                sorted.rejected.push(Rejection {
                    index,
                    event_id: None,
                    errors: vec![error],
                    reason: RejectReason::Invalid,
                });
                continue;
            }
        };
        if raw.len() > limits.max_event_bytes {
            sorted.rejected.push(Rejection {
                index,
                event_id: event_id_of(raw),
                errors: vec![FieldError::new(
                    "",
                    format!(
                        "event is {} bytes; at most {} allowed",
                        raw.len(),
                        limits.max_event_bytes
                    ),
                )],
                reason: RejectReason::TooLarge,
            });
            continue;
        }
        let checked = match serde_json::from_str::<WireEvent<'a>>(raw) {
            Ok(event) => {
                let id = event.event_id;
                event
                    .into_valid(rules)
                    .map_err(|errors| (Some(id.to_string()), errors))
            }
            Err(_) => Err((event_id_of(raw), vec![explain_parse_error(raw)])),
        };
        match checked {
            Ok(valid) => sorted.valid.push(valid),
            Err((event_id, errors)) => sorted.rejected.push(Rejection {
                index,
                event_id,
                errors,
                reason: RejectReason::Invalid,
            }),
        }
    }
    Ok(sorted)
}

/// Raw JSON per event; an NDJSON line that is not JSON at all is an error of that event only.
fn split<'a>(
    body: &'a str,
    format: BodyFormat,
    limits: &Limits,
) -> Result<Vec<Result<&'a str, FieldError>>, BodyError> {
    let items: Vec<Result<&str, FieldError>> = match format {
        BodyFormat::Json => match body.trim_start().as_bytes().first() {
            None => return Err(BodyError::Empty),
            Some(b'[') => {
                let events: Vec<&RawValue> = serde_json::from_str(body).map_err(malformed)?;
                events.into_iter().map(|raw| Ok(raw.get())).collect()
            }
            Some(b'{') => {
                let event: &RawValue = serde_json::from_str(body).map_err(malformed)?;
                vec![Ok(event.get())]
            }
            Some(_) => {
                // Tell "not JSON" apart from "JSON, but not an object or array".
                serde_json::from_str::<serde::de::IgnoredAny>(body).map_err(malformed)?;
                return Err(BodyError::NotAnEventOrArray);
            }
        },
        BodyFormat::Ndjson => body
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(
                |(line_no, line)| match serde_json::from_str::<&RawValue>(line) {
                    Ok(raw) => Ok(raw.get()),
                    Err(err) => Err(FieldError::new(
                        "",
                        format!(
                            "line {} is not valid JSON: {} (column {})",
                            line_no + 1,
                            error_text(&err),
                            err.column()
                        ),
                    )),
                },
            )
            .collect(),
    };
    if items.is_empty() {
        return Err(BodyError::Empty);
    }
    if items.len() > limits.max_events {
        return Err(BodyError::TooManyEvents {
            count: items.len(),
            limit: limits.max_events,
        });
    }
    Ok(items)
}

fn malformed(err: serde_json::Error) -> BodyError {
    BodyError::Malformed {
        message: error_text(&err),
        line: err.line(),
        column: err.column(),
    }
}

/// serde_json's message without its " at line L column C" suffix (reported separately).
fn error_text(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// The `event_id` of an event that failed, when it has a readable one.
fn event_id_of(raw: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow, default)]
        event_id: Option<Cow<'a, str>>,
    }
    serde_json::from_str::<IdOnly>(raw)
        .ok()?
        .event_id
        .map(Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_body_bytes: 1 << 20,
        max_events: 3,
        max_event_bytes: 300,
    };

    fn rules() -> TimeRules {
        TimeRules {
            received_at_ms: chrono::Utc::now().timestamp_millis(),
            max_future_ms: 300_000,
            retention_ms: 30 * 86_400_000,
        }
    }

    fn event(id: u32) -> String {
        format!(
            r#"{{"event_id":"00000000-0000-4000-8000-{id:012}","event_type":"impression","timestamp":"{}","campaign_id":"c","ad_id":"a","publisher_id":"p"}}"#,
            chrono::Utc::now().to_rfc3339()
        )
    }

    #[test]
    fn one_object_an_array_and_ndjson_all_parse() {
        let r = rules();
        let body = event(1);
        let one = sort_events(&body, BodyFormat::Json, &LIMITS, &r).unwrap();
        assert_eq!(one.valid.len(), 1);
        let array = format!("[{},{}]", event(1), event(2));
        assert_eq!(
            sort_events(&array, BodyFormat::Json, &LIMITS, &r)
                .unwrap()
                .valid
                .len(),
            2
        );
        let ndjson = format!("{}\n\n{}\n", event(1), event(2));
        assert_eq!(
            sort_events(&ndjson, BodyFormat::Ndjson, &LIMITS, &r)
                .unwrap()
                .valid
                .len(),
            2
        );
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let err = sort_events("[\n{\"a\": }]", BodyFormat::Json, &LIMITS, &rules()).unwrap_err();
        assert!(
            matches!(
                err,
                BodyError::Malformed {
                    line: 2,
                    column: 7,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = sort_events("42", BodyFormat::Json, &LIMITS, &rules()).unwrap_err();
        assert_eq!(err, BodyError::NotAnEventOrArray);
        let err = sort_events("  ", BodyFormat::Json, &LIMITS, &rules()).unwrap_err();
        assert_eq!(err, BodyError::Empty);
    }

    #[test]
    fn a_bad_ndjson_line_rejects_only_itself() {
        let body = format!("{}\nnot json\n{}", event(1), event(2));
        let sorted = sort_events(&body, BodyFormat::Ndjson, &LIMITS, &rules()).unwrap();
        assert_eq!(sorted.valid.len(), 2);
        assert_eq!(sorted.rejected.len(), 1);
        assert_eq!(sorted.rejected[0].index, 1);
        assert!(sorted.rejected[0].errors[0].message.contains("line 2"));
    }

    #[test]
    fn limits_apply_per_request_and_per_event() {
        let four = format!("[{},{},{},{}]", event(1), event(2), event(3), event(4));
        let err = sort_events(&four, BodyFormat::Json, &LIMITS, &rules()).unwrap_err();
        assert_eq!(err, BodyError::TooManyEvents { count: 4, limit: 3 });

        let big = event(9).replace(
            r#""p"}"#,
            &format!(r#""p","user_id":"{}"}}"#, "u".repeat(128)),
        );
        let body = format!("[{},{big}]", event(1));
        let sorted = sort_events(&body, BodyFormat::Json, &LIMITS, &rules()).unwrap();
        assert_eq!(sorted.valid.len(), 1);
        assert_eq!(sorted.rejected[0].index, 1);
        assert_eq!(
            sorted.rejected[0].event_id.as_deref(),
            Some("00000000-0000-4000-8000-000000000009")
        );
    }
}
