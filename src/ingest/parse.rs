//! Turns a request body into events: JSON (one object or an array) or NDJSON.
//!
//! Each event is parsed on its own, so one bad event is rejected alone and the rest of the
//! batch still goes in: a JSON body is read event by event straight into the typed form
//! (`sort_json_in_one_pass`); NDJSON, and JSON bodies that are not well-formed, are first
//! split into raw per-event JSON (`RawValue` only finds the boundaries).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{
    clickhouse::rowbinary,
    config::Limits,
    domain::{explain_parse_error, json_error_text, FieldError, TimeRules, WireEvent},
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

/// The body, sorted: the valid events as `tenant`'s rows (RowBinary, in body order, encoded as
/// each is found valid, so no event is kept in between) and the rejections (each knows its
/// position in the body).
#[derive(Debug, Default)]
pub struct Sorted {
    pub accepted: usize,
    pub rows: Vec<u8>,
    pub rejected: Vec<Rejection>,
}

pub fn sort_events(
    body: &str,
    format: BodyFormat,
    limits: &Limits,
    rules: &TimeRules,
    tenant: &str,
) -> Result<Sorted, BodyError> {
    if format == BodyFormat::Json {
        if let Some(sorted) = sort_json_in_one_pass(body, limits, rules, tenant) {
            return Ok(sorted);
        }
    }
    sort_split(body, format, limits, rules, tenant)
}

/// Splits the body into raw per-event JSON first, then parses each event.
fn sort_split(
    body: &str,
    format: BodyFormat,
    limits: &Limits,
    rules: &TimeRules,
    tenant: &str,
) -> Result<Sorted, BodyError> {
    let raw = split(body, format, limits)?;
    let mut sorted = Sorted::for_body(body.len());
    for (index, item) in raw.into_iter().enumerate() {
        match item {
            Ok(raw) => sorted.check(index, raw, None, limits, rules, tenant),
            Err(error) => sorted.rejected.push(Rejection {
                index,
                event_id: None,
                errors: vec![error],
                reason: RejectReason::Invalid,
            }),
        }
    }
    Ok(sorted)
}

/// The fast way through a JSON body whose events are all well-formed JSON: each event is
/// parsed into its typed form straight from the body (no separate pass to find where events
/// start and end; the parser reports how far it read). An event that does not parse as an
/// event is found again as raw JSON, to explain it and go on after it. `None` when the body
/// is not an object or an array of objects ending cleanly, or has too many events: `split`
/// then reports it exactly as before (with the line and column of malformed JSON).
fn sort_json_in_one_pass(
    body: &str,
    limits: &Limits,
    rules: &TimeRules,
    tenant: &str,
) -> Option<Sorted> {
    let start = skip_whitespace(body, 0);
    let (mut at, array) = match body.as_bytes().get(start)? {
        b'[' => (start + 1, true),
        b'{' => (start, false),
        _ => return None,
    };
    let mut sorted = Sorted::for_body(body.len());
    loop {
        at = skip_whitespace(body, at);
        if array && sorted.len() == 0 && body.as_bytes().get(at) == Some(&b']') {
            return None; // `[]`: `split` says it is empty.
        }
        if sorted.len() == limits.max_events {
            return None; // `split` counts them all for the error.
        }
        let index = sorted.len();
        let rest = &body[at..];
        let mut typed = serde_json::Deserializer::from_str(rest).into_iter::<WireEvent>();
        match typed.next()? {
            Ok(event) => {
                let end = typed.byte_offset();
                sorted.check(index, &rest[..end], Some(event), limits, rules, tenant);
                at += end;
            }
            Err(_) => {
                let mut raw = serde_json::Deserializer::from_str(rest).into_iter::<&RawValue>();
                let event = raw.next()?.ok()?;
                sorted.check(index, event.get(), None, limits, rules, tenant);
                at += raw.byte_offset();
            }
        }
        at = skip_whitespace(body, at);
        match (array, body.as_bytes().get(at)) {
            (true, Some(b',')) => at += 1,
            (true, Some(b']')) => at += 1,
            (false, None) => return Some(sorted),
            _ => return None,
        }
        if body.as_bytes()[at - 1] == b']' {
            return (skip_whitespace(body, at) == body.len()).then_some(sorted);
        }
    }
}

/// Where the JSON whitespace (only space, tab, CR, LF) at `at` ends.
fn skip_whitespace(body: &str, at: usize) -> usize {
    let rest = &body[at..];
    at + rest.len() - rest.trim_start_matches([' ', '\t', '\n', '\r']).len()
}

impl Sorted {
    /// Room for the rows of a body of `len` bytes (RowBinary is about half the JSON's size).
    fn for_body(len: usize) -> Self {
        Sorted {
            rows: Vec::with_capacity(len / 2 + 64),
            ..Sorted::default()
        }
    }

    fn len(&self) -> usize {
        self.accepted + self.rejected.len()
    }

    /// Sorts event `index`, whose JSON is `raw` (already parsed as `parsed`, when it was).
    fn check<'a>(
        &mut self,
        index: usize,
        raw: &'a str,
        parsed: Option<WireEvent<'a>>,
        limits: &Limits,
        rules: &TimeRules,
        tenant: &str,
    ) {
        if raw.len() > limits.max_event_bytes {
            self.rejected.push(Rejection {
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
            return;
        }
        if !raw.starts_with('{') {
            // serde would read an array as the event's fields in order.
            self.rejected.push(Rejection {
                index,
                event_id: None,
                errors: vec![FieldError::new("", "must be a JSON object")],
                reason: RejectReason::Invalid,
            });
            return;
        }
        let parsed = match parsed {
            Some(event) => Ok(event),
            None => serde_json::from_str::<WireEvent<'a>>(raw),
        };
        let checked = match parsed {
            Ok(event) => {
                let id = event.event_id;
                event
                    .into_valid(rules)
                    .map_err(|errors| (Some(id.to_string()), errors))
            }
            Err(_) => Err((event_id_of(raw), explain_parse_error(raw))),
        };
        match checked {
            Ok(valid) => {
                rowbinary::encode(&valid, tenant, rules.received_at_ms, &mut self.rows);
                self.accepted += 1;
            }
            Err((event_id, errors)) => self.rejected.push(Rejection {
                index,
                event_id,
                errors,
                reason: RejectReason::Invalid,
            }),
        }
    }
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
            // Blank lines are skipped; only JSON's whitespace is blank (not, say, a form feed).
            .filter(|(_, line)| !line.trim_matches([' ', '\t', '\r']).is_empty())
            .map(
                |(line_no, line)| match serde_json::from_str::<&RawValue>(line) {
                    Ok(raw) => Ok(raw.get()),
                    Err(err) => Err(FieldError::new(
                        "",
                        format!(
                            "line {} is not valid JSON: {} (column {})",
                            line_no + 1,
                            json_error_text(&err),
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
        message: json_error_text(&err),
        line: err.line(),
        column: err.column(),
    }
}

/// Characters of an unreadable `event_id` repeated in its rejection: a UUID takes 36 (45 as
/// a URN), and a megabyte of junk need not come back whole.
const ECHOED_ID_CHARS: usize = 64;

/// The `event_id` of an event that failed, when it has a readable one (cut after
/// [`ECHOED_ID_CHARS`] characters, marked with `…`).
fn event_id_of(raw: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow, default)]
        event_id: Option<Cow<'a, str>>,
    }
    let id = serde_json::from_str::<IdOnly>(raw).ok()?.event_id?;
    Some(match id.char_indices().nth(ECHOED_ID_CHARS) {
        Some((cut, _)) => format!("{}…", &id[..cut]),
        None => id.into_owned(),
    })
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
        let one = sort_events(&body, BodyFormat::Json, &LIMITS, &r, "t").unwrap();
        assert_eq!(one.accepted, 1);
        let array = format!("[{},{}]", event(1), event(2));
        assert_eq!(
            sort_events(&array, BodyFormat::Json, &LIMITS, &r, "t")
                .unwrap()
                .accepted,
            2
        );
        let ndjson = format!("{}\n\n{}\n", event(1), event(2));
        assert_eq!(
            sort_events(&ndjson, BodyFormat::Ndjson, &LIMITS, &r, "t")
                .unwrap()
                .accepted,
            2
        );
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let err =
            sort_events("[\n{\"a\": }]", BodyFormat::Json, &LIMITS, &rules(), "t").unwrap_err();
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
        let err = sort_events("42", BodyFormat::Json, &LIMITS, &rules(), "t").unwrap_err();
        assert_eq!(err, BodyError::NotAnEventOrArray);
        let err = sort_events("  ", BodyFormat::Json, &LIMITS, &rules(), "t").unwrap_err();
        assert_eq!(err, BodyError::Empty);
    }

    /// What a client sees of a sorted body, and the rows it makes.
    fn seen(sorted: &Sorted) -> (usize, Vec<String>, &[u8]) {
        let rejected = sorted
            .rejected
            .iter()
            .map(|r| format!("{} {:?} {:?} {:?}", r.index, r.event_id, r.errors, r.reason))
            .collect();
        (sorted.accepted, rejected, &sorted.rows)
    }

    #[test]
    fn reading_json_in_one_pass_sorts_events_exactly_as_splitting_first() {
        let r = rules();
        let big = event(9).replace(r#""p"}"#, &format!(r#""p","os":"{}"}}"#, "o".repeat(300)));
        let bad_id = event(3).replace("00000000-0000-4000-8000-000000000003", "nope");
        let unknown = event(4).replace(r#""c","#, r#""c","colour":"red","#);
        let missing = event(5).replace(r#","ad_id":"a""#, "");
        let late = event(6).replace(&chrono::Utc::now().format("%Y").to_string(), "2001");
        let limits = Limits {
            max_events: 10,
            ..LIMITS
        };
        let bodies = [
            event(1),
            format!("  {}\n ", event(1)),
            format!("[{}]", event(1)),
            format!("[ {} ,\n\t{} ]\n", event(1), event(2)),
            format!("[{},{big},{bad_id},{unknown}]", event(1)),
            format!("[{missing},{late},42,\"x\",[1],null,{}]", event(2)),
            format!("[{bad_id}]"),
            bad_id.clone(),
            big.clone(),
        ];
        for body in &bodies {
            let fast = sort_json_in_one_pass(body, &limits, &r, "t")
                .unwrap_or_else(|| panic!("not read in one pass: {body}"));
            let split = sort_split(body, BodyFormat::Json, &limits, &r, "t").unwrap();
            assert_eq!(seen(&fast), seen(&split), "{body}");
        }
        // Bodies the one pass leaves to `split`, for its errors.
        for body in [
            "[]".to_string(),
            " [ ] ".to_string(),
            format!("[{},]", event(1)),
            format!("[{}", event(1)),
            format!("[{}] x", event(1)),
            format!("{} {}", event(1), event(2)),
            format!("[{},{{\"a\": }}]", event(1)),
            format!("[{},\u{a0}{}]", event(1), event(2)),
            format!("{}\u{2028}", event(1)),
            "42".to_string(),
            (0..11).map(event).collect::<Vec<_>>().join(","),
            format!("[{}]", (0..11).map(event).collect::<Vec<_>>().join(",")),
        ] {
            assert!(
                sort_json_in_one_pass(&body, &limits, &r, "t").is_none(),
                "{body}"
            );
            assert!(
                sort_events(&body, BodyFormat::Json, &limits, &r, "t").is_err(),
                "{body}"
            );
        }
    }

    #[test]
    fn a_bad_ndjson_line_rejects_only_itself() {
        let body = format!("{}\nnot json\n{}", event(1), event(2));
        let sorted = sort_events(&body, BodyFormat::Ndjson, &LIMITS, &rules(), "t").unwrap();
        assert_eq!(sorted.accepted, 2);
        assert_eq!(sorted.rejected.len(), 1);
        assert_eq!(sorted.rejected[0].index, 1);
        assert!(sorted.rejected[0].errors[0].message.contains("line 2"));
    }

    #[test]
    fn an_event_written_as_an_array_is_rejected_alone() {
        // serde reads an array as a struct's fields in order; the API takes objects only.
        let positional = format!(
            r#"["00000000-0000-4000-8000-000000000007","click","{}",null,"c","a","p",null,null,null,null,null,null,null,null,null]"#,
            chrono::Utc::now().to_rfc3339()
        );
        let json = format!("[{},{positional}]", event(1));
        let ndjson = format!("{}\n{positional}\n", event(1));
        for (body, format) in [(json, BodyFormat::Json), (ndjson, BodyFormat::Ndjson)] {
            let sorted = sort_events(&body, format, &LIMITS, &rules(), "t").unwrap();
            assert_eq!(sorted.accepted, 1, "{format:?}");
            assert_eq!(sorted.rejected[0].index, 1);
            assert_eq!(
                sorted.rejected[0].errors,
                [FieldError::new("", "must be a JSON object")]
            );
        }
    }

    #[test]
    fn a_long_unreadable_id_is_echoed_cut_short() {
        let long = "é".repeat(100_000);
        let body = event(1).replace("00000000-0000-4000-8000-000000000001", &long);
        let sorted = sort_events(&body, BodyFormat::Json, &LIMITS, &rules(), "t").unwrap();
        let echoed = sorted.rejected[0].event_id.as_deref().unwrap();
        assert_eq!(echoed, format!("{}…", "é".repeat(ECHOED_ID_CHARS)));
        let body = event(1).replace("00000000-0000-4000-8000-000000000001", "not-a-uuid");
        let sorted = sort_events(&body, BodyFormat::Json, &LIMITS, &rules(), "t").unwrap();
        assert_eq!(sorted.rejected[0].event_id.as_deref(), Some("not-a-uuid"));
    }

    #[test]
    fn only_json_whitespace_makes_an_ndjson_line_blank() {
        let body = format!("{}\n \t\r\n\u{c}\n\u{a0}\n{}", event(1), event(2));
        let limits = Limits {
            max_events: 10,
            ..LIMITS
        };
        let sorted = sort_events(&body, BodyFormat::Ndjson, &limits, &rules(), "t").unwrap();
        assert_eq!(sorted.accepted, 2);
        let lines: Vec<usize> = sorted.rejected.iter().map(|r| r.index).collect();
        assert_eq!(
            lines,
            [1, 2],
            "a form feed and a no-break space are not blank"
        );
    }

    #[test]
    fn limits_apply_per_request_and_per_event() {
        let four = format!("[{},{},{},{}]", event(1), event(2), event(3), event(4));
        let err = sort_events(&four, BodyFormat::Json, &LIMITS, &rules(), "t").unwrap_err();
        assert_eq!(err, BodyError::TooManyEvents { count: 4, limit: 3 });

        let big = event(9).replace(
            r#""p"}"#,
            &format!(r#""p","user_id":"{}"}}"#, "u".repeat(128)),
        );
        let body = format!("[{},{big}]", event(1));
        let sorted = sort_events(&body, BodyFormat::Json, &LIMITS, &rules(), "t").unwrap();
        assert_eq!(sorted.accepted, 1);
        assert_eq!(sorted.rejected[0].index, 1);
        assert_eq!(
            sorted.rejected[0].event_id.as_deref(),
            Some("00000000-0000-4000-8000-000000000009")
        );
    }

    /// A full event: every optional field, attributes, the time inside the allowed window.
    fn rich_event(id: u32, now: &str) -> String {
        format!(
            r#"{{"event_id":"00000000-0000-4000-8000-{id:012}","event_type":"click","timestamp":"{now}","sent_at":"{now}","campaign_id":"camp-{id}","ad_id":"ad.{id}","publisher_id":"pub:{id}","advertiser_id":"adv","user_id":"u-{id}","country":"DE","device":"mobile","os":"iOS","browser":"Safari","cost_micros":{},"revenue_micros":0,"attributes":{{"slot":"top","é":"ü \"q\""}}}}"#,
            1000 + id
        )
    }

    /// One damaged event in a batch (a byte replaced, removed, inserted or repeated; the
    /// event cut short), thousands of times over: the batch is never a panic, every other
    /// event is accepted with exactly the row it has alone, and the damaged one is accepted or
    /// rejected with a reason. A JSON array may instead be refused whole (its JSON broke: a
    /// 400 with line and column); NDJSON never is.
    #[test]
    fn damage_to_one_event_never_costs_the_others() {
        let limits = Limits {
            max_body_bytes: 1 << 20,
            max_events: 20,
            max_event_bytes: 16 * 1024,
        };
        // A fixed clock (2026-01-01T00:00:00.123Z): the same bodies, and damages, every run.
        let r = TimeRules {
            received_at_ms: 1_767_225_600_123,
            ..rules()
        };
        let now = chrono::DateTime::from_timestamp_millis(r.received_at_ms - 60_000)
            .unwrap()
            .to_rfc3339();
        let events: Vec<String> = (0..6).map(|id| rich_event(id, &now)).collect();
        let row_alone = |e: &str| {
            let sorted = sort_events(e, BodyFormat::Json, &limits, &r, "t").unwrap();
            assert_eq!(sorted.accepted, 1, "{e}");
            sorted.rows
        };
        let rows: Vec<Vec<u8>> = events.iter().map(|e| row_alone(e)).collect();
        const BYTES: &[u8] = b"{}[]:,\"\\ 0aZ-.\t\n\xc3\xa9\x00";
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut refused_whole, mut damaged_accepted, mut damaged_rejected) = (0, 0, 0);
        for case in 0..4000 {
            let k = next(events.len());
            let mut bytes = events[k].clone().into_bytes();
            let at = next(bytes.len());
            match next(5) {
                0 => bytes[at] = BYTES[next(BYTES.len())],
                1 => drop(bytes.remove(at)),
                2 => bytes.insert(at, BYTES[next(BYTES.len())]),
                3 => {
                    let piece = bytes[at..(at + 1 + next(12)).min(bytes.len())].to_vec();
                    bytes.splice(at..at, piece);
                }
                _ => bytes.truncate(at),
            }
            // Only whole characters: the body reached the parser as UTF-8.
            let damaged = String::from_utf8_lossy(&bytes).into_owned();
            let ndjson = !damaged.contains(['\n', '\r']) && case % 2 == 0;
            let mut all = events.clone();
            all[k] = damaged.clone();
            let (body, format) = match ndjson {
                true => (all.join("\n"), BodyFormat::Ndjson),
                false => (format!("[{}]", all.join(",")), BodyFormat::Json),
            };
            let sorted = match sort_events(&body, format, &limits, &r, "t") {
                Ok(sorted) => sorted,
                Err(BodyError::Malformed { message, .. }) if !ndjson => {
                    assert!(!message.is_empty());
                    refused_whole += 1;
                    continue;
                }
                Err(err) => panic!("case {case}: {err:?} for {body}"),
            };
            let rejected: Vec<usize> = sorted.rejected.iter().map(|r| r.index).collect();
            let items = match ndjson {
                true => body
                    .lines()
                    .filter(|l| !l.trim_matches([' ', '\t']).is_empty())
                    .count(),
                false => serde_json::from_str::<Vec<&RawValue>>(&body).unwrap().len(),
            };
            assert_eq!(
                sorted.accepted + rejected.len(),
                items,
                "case {case}: {body}"
            );
            if items != events.len() {
                // The damage made one event two (`},{`), or nothing (a blank line).
                continue;
            }
            for rejection in &sorted.rejected {
                assert_eq!(rejection.index, k, "case {case}: {body}");
                assert!(
                    !rejection.errors.is_empty()
                        && rejection.errors.iter().all(|e| !e.message.is_empty()),
                    "case {case}: {:?}",
                    rejection.errors
                );
            }
            let before: Vec<u8> = rows[..k].concat();
            let after: Vec<u8> = rows[k + 1..].concat();
            assert!(
                sorted.rows.starts_with(&before) && sorted.rows.ends_with(&after),
                "case {case}: the other events' rows changed: {body}"
            );
            if rejected.is_empty() {
                damaged_accepted += 1;
                let middle = &sorted.rows[before.len()..sorted.rows.len() - after.len()];
                assert_eq!(middle, row_alone(&damaged), "case {case}: {damaged}");
            } else {
                damaged_rejected += 1;
                assert_eq!(sorted.rows.len(), before.len() + after.len());
            }
        }
        // Each way out was taken often enough to mean something.
        assert!(
            refused_whole > 200 && damaged_accepted > 200 && damaged_rejected > 1000,
            "{refused_whole} {damaged_accepted} {damaged_rejected}"
        );
    }
}
