//! The ad event as clients send it, and the rules that make it valid.
//!
//! Parsing is two-speed: the common case deserializes straight into [`WireEvent`] (borrowing
//! strings from the request body), and only an event that fails is parsed a second time to
//! say precisely which field is wrong and why. Field rules are `garde` attributes; time rules
//! need the server clock and live in [`WireEvent::into_valid`].

use std::{borrow::Cow, collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use garde::Validate;
use serde::{
    de::{MapAccess, Visitor},
    Deserialize, Deserializer, Serialize,
};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::country::is_country_code;

/// One problem with one field of one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Wire name of the field (`attributes.<key>` for an attribute; empty for the event as a whole).
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Impression = 1,
    Click = 2,
    Conversion = 3,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Impression => "impression",
            EventType::Click => "click",
            EventType::Conversion => "conversion",
        }
    }

    pub const ALL: [EventType; 3] = [Self::Impression, Self::Click, Self::Conversion];

    /// The type named `name` (as `as_str` writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The type whose value in the table's `Enum8` is `code`.
    pub fn from_code(code: i8) -> Option<Self> {
        match code {
            1 => Some(Self::Impression),
            2 => Some(Self::Click),
            3 => Some(Self::Conversion),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Desktop,
    Mobile,
    Tablet,
    Ctv,
    Other,
}

impl Device {
    pub const ALL: [Device; 5] = [
        Device::Desktop,
        Device::Mobile,
        Device::Tablet,
        Device::Ctv,
        Device::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Device::Desktop => "desktop",
            Device::Mobile => "mobile",
            Device::Tablet => "tablet",
            Device::Ctv => "ctv",
            Device::Other => "other",
        }
    }
}

/// The most `cost_micros` or `revenue_micros` one event may carry: one million units of
/// currency. Figures sum them in 64 bits, which this keeps exact up to 18 million events at
/// the limit (and far beyond with real amounts).
pub const MAX_MICROS: u64 = 1_000_000_000_000;

pub const MAX_ATTRIBUTES: usize = 32;
pub const MAX_ATTRIBUTE_KEY: usize = 64;
pub const MAX_ATTRIBUTE_VALUE: usize = 256;

/// An event exactly as a client sends it. Unknown fields are an error: a misspelt optional
/// field would otherwise be dropped without anyone noticing.
#[derive(Debug, Deserialize, Validate)]
#[serde(deny_unknown_fields)]
pub struct WireEvent<'a> {
    #[garde(skip)]
    pub event_id: Uuid,
    #[garde(skip)]
    pub event_type: EventType,
    #[garde(skip)]
    #[serde(deserialize_with = "time::required")]
    pub timestamp: DateTime<Utc>,
    #[garde(skip)]
    #[serde(default, deserialize_with = "time::optional")]
    pub sent_at: Option<DateTime<Utc>>,
    #[garde(custom(id_chars))]
    #[serde(borrow)]
    pub campaign_id: Cow<'a, str>,
    #[garde(custom(id_chars))]
    #[serde(borrow)]
    pub ad_id: Cow<'a, str>,
    #[garde(custom(id_chars))]
    #[serde(borrow)]
    pub publisher_id: Cow<'a, str>,
    #[garde(inner(custom(id_chars)))]
    #[serde(borrow, default, deserialize_with = "borrowed::optional")]
    pub advertiser_id: Option<Cow<'a, str>>,
    #[garde(inner(custom(chars_within(1, 128))))]
    #[serde(borrow, default, deserialize_with = "borrowed::optional")]
    pub user_id: Option<Cow<'a, str>>,
    #[garde(inner(custom(country_code)))]
    #[serde(borrow, default, deserialize_with = "borrowed::optional")]
    pub country: Option<Cow<'a, str>>,
    #[garde(skip)]
    #[serde(default)]
    pub device: Option<Device>,
    #[garde(inner(custom(chars_within(0, 32))))]
    #[serde(borrow, default, deserialize_with = "borrowed::optional")]
    pub os: Option<Cow<'a, str>>,
    #[garde(inner(custom(chars_within(0, 32))))]
    #[serde(borrow, default, deserialize_with = "borrowed::optional")]
    pub browser: Option<Cow<'a, str>>,
    #[garde(inner(custom(amount_fits)))]
    #[serde(default)]
    pub cost_micros: Option<u64>,
    #[garde(inner(custom(amount_fits)))]
    #[serde(default)]
    pub revenue_micros: Option<u64>,
    #[garde(inner(custom(attributes_fit)))]
    #[serde(borrow, default, deserialize_with = "borrowed::map")]
    pub attributes: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
}

/// An id as events carry them (campaign, ad, publisher, advertiser): 1–64 characters of
/// `A-Z a-z 0-9 _ . : -`.
pub fn is_plain_id(value: &str) -> bool {
    (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

#[allow(clippy::ptr_arg)] // garde hands custom rules the field's own type
fn id_chars(value: &Cow<'_, str>, _ctx: &()) -> garde::Result {
    if is_plain_id(value) {
        Ok(())
    } else {
        Err(garde::Error::new(
            "must be 1-64 characters of A-Z a-z 0-9 _ . : -",
        ))
    }
}

/// Text of `min` to `max` characters, worded like the other rules (garde's own says "length
/// is lower than 1").
fn chars_within(min: usize, max: usize) -> impl FnOnce(&Cow<'_, str>, &()) -> garde::Result {
    move |value, _ctx| {
        let chars = value.chars().count();
        if (min..=max).contains(&chars) {
            return Ok(());
        }
        let allowed = match min {
            0 => format!("at most {max} characters"),
            _ => format!("{min}-{max} characters"),
        };
        Err(garde::Error::new(format!(
            "has {chars} characters; must be {allowed}"
        )))
    }
}

#[allow(clippy::ptr_arg)] // garde hands custom rules the field's own type
fn country_code(value: &Cow<'_, str>, _ctx: &()) -> garde::Result {
    if is_country_code(value) {
        Ok(())
    } else {
        Err(garde::Error::new(
            "must be an ISO 3166-1 alpha-2 code in upper case, e.g. US",
        ))
    }
}

fn amount_fits(micros: &u64, _ctx: &()) -> garde::Result {
    if *micros <= MAX_MICROS {
        Ok(())
    } else {
        Err(garde::Error::new(format!(
            "is {micros}; at most {MAX_MICROS} (one million units of currency) allowed"
        )))
    }
}

fn attributes_fit(map: &BTreeMap<Cow<'_, str>, Cow<'_, str>>, _ctx: &()) -> garde::Result {
    if map.len() > MAX_ATTRIBUTES {
        return Err(garde::Error::new(format!(
            "has {} keys; at most {MAX_ATTRIBUTES} allowed",
            map.len()
        )));
    }
    for (key, value) in map {
        if key.is_empty() || key.chars().count() > MAX_ATTRIBUTE_KEY {
            return Err(garde::Error::new(format!(
                "key {key:?} must be 1-{MAX_ATTRIBUTE_KEY} characters"
            )));
        }
        if value.chars().count() > MAX_ATTRIBUTE_VALUE {
            return Err(garde::Error::new(format!(
                "value of {key:?} is longer than {MAX_ATTRIBUTE_VALUE} characters"
            )));
        }
    }
    Ok(())
}

/// The server-side facts every event of one request shares.
#[derive(Debug, Clone, Copy)]
pub struct TimeRules {
    /// Server time the request was received, in milliseconds since the epoch.
    pub received_at_ms: i64,
    pub max_future_ms: i64,
    pub retention_ms: i64,
}

/// A validated event, with the times the table stores (milliseconds since the epoch).
#[derive(Debug)]
pub struct ValidEvent<'a> {
    pub wire: WireEvent<'a>,
    pub timestamp_ms: i64,
    pub event_time_ms: i64,
    pub sent_at_ms: Option<i64>,
}

impl<'a> WireEvent<'a> {
    /// Checks field rules and time rules; every problem is reported, not just the first.
    pub fn into_valid(self, rules: &TimeRules) -> Result<ValidEvent<'a>, Vec<FieldError>> {
        let mut errors: Vec<FieldError> = match self.validate() {
            Ok(()) => Vec::new(),
            Err(report) => report
                .iter()
                .map(|(path, error)| FieldError::new(path.to_string(), error.message()))
                .collect(),
        };

        let timestamp_ms = self.timestamp.timestamp_millis();
        let sent_at_ms = self.sent_at.map(|t| t.timestamp_millis());
        // The client's clock is off by (its send time - our receive time); undo that offset.
        let offset_ms = sent_at_ms.map_or(0, |sent| rules.received_at_ms - sent);
        let event_time_ms = timestamp_ms.saturating_add(offset_ms);

        let newest = rules.received_at_ms + rules.max_future_ms;
        let oldest = rules.received_at_ms - rules.retention_ms;
        let retention_days = rules.retention_ms / 86_400_000;
        if event_time_ms > newest {
            let corrected = if sent_at_ms.is_some() {
                " after clock-skew correction"
            } else {
                ""
            };
            errors.push(FieldError::new(
                "timestamp",
                format!(
                    "is {} s in the future{corrected}; at most {} s allowed",
                    (event_time_ms - rules.received_at_ms) / 1000,
                    rules.max_future_ms / 1000
                ),
            ));
        } else if event_time_ms < oldest || timestamp_ms < oldest {
            // The raw timestamp matters too: the table's TTL runs on it, so an older one would
            // be acknowledged and then dropped by ClickHouse.
            errors.push(FieldError::new(
                "timestamp",
                format!("is older than the {retention_days}-day retention"),
            ));
        } else if timestamp_ms > rules.received_at_ms + rules.retention_ms {
            errors.push(FieldError::new(
                "timestamp",
                format!("is more than {retention_days} days ahead of the server clock"),
            ));
        }
        if let Some(sent) = sent_at_ms {
            if (sent - rules.received_at_ms).abs() > rules.retention_ms {
                errors.push(FieldError::new(
                    "sent_at",
                    format!("is more than {retention_days} days away from the server clock"),
                ));
            }
        }

        if errors.is_empty() {
            Ok(ValidEvent {
                wire: self,
                timestamp_ms,
                event_time_ms,
                sent_at_ms,
            })
        } else {
            Err(errors)
        }
    }
}

/// Optional strings and the attributes map, borrowed from the request body unless they hold
/// escapes. serde borrows a `Cow<str>` field marked `borrow`, but inside an `Option` or a map
/// it uses `Cow`'s own impl, which always copies: an allocation (and a free) per optional
/// field and per attribute key and value.
mod borrowed {
    use std::{
        borrow::Cow,
        collections::{btree_map::Entry, BTreeMap},
        fmt,
        marker::PhantomData,
    };

    use serde::{
        de::{Error, MapAccess, Visitor},
        Deserialize, Deserializer,
    };

    /// A string that borrows where it can (the derive borrows a `Cow` marked `borrow`).
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

    pub fn optional<'de: 'a, 'a, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Cow<'a, str>>, D::Error> {
        Ok(Option::<Text<'a>>::deserialize(d)?.map(|text| text.0))
    }

    type Map<'a> = BTreeMap<Cow<'a, str>, Cow<'a, str>>;

    struct Entries<'a>(Map<'a>);

    impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Collect<'a>(PhantomData<Map<'a>>);

            impl<'de: 'a, 'a> Visitor<'de> for Collect<'a> {
                type Value = Map<'a>;

                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a map")
                }

                fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Map<'a>, A::Error> {
                    let mut map = BTreeMap::new();
                    while let Some((key, value)) = entries.next_entry::<Text<'a>, Text<'a>>()? {
                        // A repeated key would otherwise keep only its last value, unseen.
                        match map.entry(key.0) {
                            Entry::Occupied(taken) => {
                                return Err(A::Error::custom(format!(
                                    "has the key {:?} more than once",
                                    taken.key()
                                )))
                            }
                            Entry::Vacant(free) => {
                                free.insert(value.0);
                            }
                        }
                    }
                    Ok(map)
                }
            }

            d.deserialize_map(Collect(PhantomData)).map(Entries)
        }
    }

    pub fn map<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Map<'a>>, D::Error> {
        Ok(Option::<Entries<'a>>::deserialize(d)?.map(|entries| entries.0))
    }
}

/// Event times as chrono's own deserializer reads them, with RFC 3339 (what clients send)
/// tried first: chrono's general parser walks a format description for every value, which
/// was ~3 % of the CPU of 100-event batches.
mod time {
    use std::fmt;

    use chrono::{DateTime, FixedOffset, Utc};
    use serde::de::{self, Deserializer, Visitor};

    fn parse(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
        DateTime::parse_from_rfc3339(text)
            .or_else(|_| text.parse::<DateTime<FixedOffset>>())
            .map(|t| t.with_timezone(&Utc))
    }

    struct Time;

    impl Visitor<'_> for Time {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an RFC 3339 date and time")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            parse(text).map_err(E::custom)
        }
    }

    struct MaybeTime;

    impl<'de> Visitor<'de> for MaybeTime {
        type Value = Option<DateTime<Utc>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an RFC 3339 date and time, or null")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            required(d).map(Some)
        }
    }

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        d.deserialize_str(Time)
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        d.deserialize_option(MaybeTime)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_what_chrono_reads() {
            for text in [
                "2026-11-30T12:00:00Z",
                "2026-11-30T12:00:00.123Z",
                "2026-11-30T12:00:00.123456789+05:30",
                "2026-11-30t12:00:00z",
                "2026-11-30 12:00:00Z",
                "2026-11-30T12:00:00",
                "2026-11-30",
                "2026-13-30T12:00:00Z",
                "yesterday",
            ] {
                let ours = serde_json::from_value::<Wrapped>(serde_json::json!({ "t": text }));
                let chrono = serde_json::from_value::<DateTime<Utc>>(serde_json::json!(text));
                assert_eq!(ours.ok().map(|w| w.t), chrono.ok(), "{text}");
            }
        }

        #[derive(serde::Deserialize)]
        struct Wrapped {
            #[serde(deserialize_with = "required")]
            t: DateTime<Utc>,
        }
    }
}

/// Explains why a JSON value is not a valid event: every field that is missing, unknown,
/// given twice or of the wrong type. Used only on the slow path, after the typed parse failed.
pub fn explain_parse_error(raw: &str) -> Vec<FieldError> {
    let fields = match fields_of(raw) {
        Ok(fields) => fields,
        Err(error) => return vec![error],
    };
    let mut errors = Vec::new();
    let mut seen: Vec<&str> = Vec::with_capacity(fields.len());
    for (name, value) in &fields {
        if seen.contains(&name.as_str()) {
            errors.push(FieldError::new(name, "is given more than once"));
            continue;
        }
        seen.push(name);
        let problem = field_problem(name, value.get()).unwrap_or_else(|| {
            Some("is not a known event field (put custom data in `attributes`)".to_string())
        });
        if let Some(message) = problem {
            errors.push(FieldError::new(name, message));
        }
    }
    for name in REQUIRED {
        if !seen.contains(&name) {
            errors.push(FieldError::new(name, "is required"));
        }
    }
    if errors.is_empty() {
        errors.push(FieldError::new("", "is not a valid event"));
    }
    errors
}

const REQUIRED: [&str; 6] = [
    "event_id",
    "event_type",
    "timestamp",
    "campaign_id",
    "ad_id",
    "publisher_id",
];

/// The object's fields in order, repeats included, each value as raw JSON; or why `raw` is not
/// a JSON object (naming the field whose value is not valid JSON, when there is one).
fn fields_of(raw: &str) -> Result<Vec<(String, Box<RawValue>)>, FieldError> {
    struct Fields<'k>(&'k std::cell::RefCell<String>);

    impl<'de> Visitor<'de> for Fields<'_> {
        type Value = Vec<(String, Box<RawValue>)>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = Vec::new();
            loop {
                self.0.take(); // while a name is read, no field is at fault yet
                let Some(name) = map.next_key::<String>()? else {
                    return Ok(fields);
                };
                self.0.replace(name.clone());
                fields.push((name, map.next_value()?));
            }
        }
    }

    let current = std::cell::RefCell::new(String::new());
    let mut de = serde_json::Deserializer::from_str(raw);
    let fields = de
        .deserialize_map(Fields(&current))
        .and_then(|fields| de.end().map(|()| fields));
    fields.map_err(|err| {
        if err.is_data() {
            return FieldError::new("", "must be a JSON object");
        }
        let text = json_error_text(&err);
        FieldError::new(current.take(), format!("is not valid JSON: {text}"))
    })
}

/// What is wrong with the value of event field `name` (`Some(None)`: nothing), or `None`
/// when there is no such field. Reads the value as the typed parse does.
fn field_problem(name: &str, value: &str) -> Option<Option<String>> {
    fn unless<T: for<'de> Deserialize<'de>>(value: &str, message: &str) -> Option<String> {
        serde_json::from_str::<T>(value)
            .is_err()
            .then(|| message.to_string())
    }
    let problem = match name {
        "event_id" => unless::<Uuid>(
            value,
            "must be a UUID, e.g. 0b8a1d2e-4f6c-4a1b-9c3d-2e5f7a9b1c4d",
        ),
        "event_type" => unless::<EventType>(value, "must be one of impression, click, conversion"),
        "timestamp" | "sent_at" => {
            let mut de = serde_json::Deserializer::from_str(value);
            let read = match name {
                "sent_at" => time::optional(&mut de).map(drop),
                _ => time::required(&mut de).map(drop),
            };
            read.is_err().then(|| {
                "must be an RFC 3339 date-time with a zone, e.g. 2026-01-31T12:00:00.000Z".into()
            })
        }
        "campaign_id" | "ad_id" | "publisher_id" | "advertiser_id" | "user_id" | "country"
        | "os" | "browser" => match serde_json::from_str::<Option<String>>(value) {
            Ok(Some(_)) => None,
            Ok(None) if !REQUIRED.contains(&name) => None,
            // A string with a broken escape (a lone surrogate, say).
            Err(err) if value.starts_with('"') => Some(format!(
                "is not a valid JSON string: {}",
                json_error_text(&err)
            )),
            _ => Some("must be a string".to_string()),
        },
        "device" => {
            unless::<Option<Device>>(value, "must be one of desktop, mobile, tablet, ctv, other")
        }
        "cost_micros" | "revenue_micros" => unless::<Option<u64>>(
            value,
            "must be a non-negative integer (micro-units of currency)",
        ),
        "attributes" => {
            let mut de = serde_json::Deserializer::from_str(value);
            borrowed::map(&mut de).err().map(|err| {
                let text = json_error_text(&err);
                match text.starts_with("has the key") {
                    true => text,
                    false => value_not_a_string(value).unwrap_or_else(|| {
                        "must be an object of string keys to string values".to_string()
                    }),
                }
            })
        }
        _ => return None,
    };
    Some(problem)
}

/// The first attribute (in the order sent) whose value is not a string, when the attributes
/// are an object: "value of \"slot\" must be a string, not a number (…)".
fn value_not_a_string(attributes: &str) -> Option<String> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_json::Value;

    struct FirstNotString;
    impl<'de> Visitor<'de> for FirstNotString {
        type Value = Option<(String, Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut first = None;
            // Read to the end: the parser checks that the object was read whole.
            while let Some((key, value)) = map.next_entry::<String, Value>()? {
                if first.is_none() && !value.is_string() {
                    first = Some((key, value));
                }
            }
            Ok(first)
        }
    }
    let mut de = serde_json::Deserializer::from_str(attributes);
    let (key, value) = de.deserialize_map(FirstNotString).ok()??;
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::Array(_) => "an array",
        _ => "an object",
    };
    Some(format!(
        "value of {key:?} must be a string, not {kind} (attributes map string keys to string values)"
    ))
}

/// serde_json's message without its " at line L column C" suffix (reported separately, or
/// meaningless within one event).
pub fn json_error_text(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000_000;

    fn rules() -> TimeRules {
        TimeRules {
            received_at_ms: NOW,
            max_future_ms: 300_000,
            retention_ms: 30 * 86_400_000,
        }
    }

    fn iso(ms: i64) -> String {
        DateTime::<Utc>::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339()
    }

    fn event_json(extra: &str) -> String {
        format!(
            r#"{{"event_id":"0b8a1d2e-4f6c-4a1b-9c3d-2e5f7a9b1c4d","event_type":"click",
            "timestamp":"{}","campaign_id":"c1","ad_id":"a1","publisher_id":"p1"{extra}}}"#,
            iso(NOW - 1000)
        )
    }

    fn check(json: &str) -> Result<ValidEvent<'_>, Vec<FieldError>> {
        match serde_json::from_str::<WireEvent>(json) {
            Ok(event) => event.into_valid(&rules()),
            Err(_) => Err(explain_parse_error(json)),
        }
    }

    fn fields(json: &str) -> Vec<String> {
        check(json)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_minimal_event_is_valid() {
        let json = event_json("");
        let event = check(&json).unwrap();
        assert_eq!(event.event_time_ms, NOW - 1000);
        assert_eq!(event.wire.campaign_id, "c1");
    }

    #[test]
    fn strings_borrow_from_the_body_unless_escaped() {
        let json = event_json(
            r#","user_id":"u1","country":"US","os":"iOS","browser":"Saf\u0061ri",
            "attributes":{"slot":"top","say":"\"hi\""}"#,
        );
        let event = check(&json).unwrap().wire;
        let borrowed = |text: &Cow<'_, str>| matches!(text, Cow::Borrowed(_));
        let attributes = event.attributes.unwrap();
        for text in [
            &event.campaign_id,
            event.user_id.as_ref().unwrap(),
            event.country.as_ref().unwrap(),
            event.os.as_ref().unwrap(),
        ]
        .into_iter()
        .chain(attributes.keys())
        .chain([&attributes["slot"]])
        {
            assert!(borrowed(text), "{text} was copied");
        }
        assert_eq!(event.browser.as_deref(), Some("Safari"));
        assert_eq!(attributes["say"], r#""hi""#);
    }

    #[test]
    fn text_lengths_are_explained_like_every_other_rule() {
        let json = event_json(&format!(r#","user_id":"","os":"{}""#, "x".repeat(33)));
        let errors: Vec<(String, String)> = check(&json)
            .unwrap_err()
            .into_iter()
            .map(|e| (e.field, e.message))
            .collect();
        assert_eq!(
            errors,
            [
                (
                    "os".into(),
                    "has 33 characters; must be at most 32 characters".into()
                ),
                (
                    "user_id".into(),
                    "has 0 characters; must be 1-128 characters".into()
                ),
            ]
        );
    }

    #[test]
    fn sent_at_corrects_the_client_clock() {
        // The client's clock runs 1 hour behind: it says it sent at NOW - 1h.
        let json = format!(
            r#"{{"event_id":"0b8a1d2e-4f6c-4a1b-9c3d-2e5f7a9b1c4d","event_type":"click",
            "timestamp":"{}","sent_at":"{}","campaign_id":"c1","ad_id":"a1","publisher_id":"p1"}}"#,
            iso(NOW - 3_600_000 - 5000),
            iso(NOW - 3_600_000)
        );
        let event = check(&json).unwrap();
        assert_eq!(event.event_time_ms, NOW - 5000);
        assert_eq!(event.timestamp_ms, NOW - 3_600_000 - 5000);
    }

    #[test]
    fn every_missing_and_unknown_field_is_named() {
        let json = r#"{"event_id":"0b8a1d2e-4f6c-4a1b-9c3d-2e5f7a9b1c4d","event_type":"click"}"#;
        let errors = explain_parse_error(json);
        let named: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.field.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(
            named,
            [
                ("timestamp", "is required"),
                ("campaign_id", "is required"),
                ("ad_id", "is required"),
                ("publisher_id", "is required")
            ]
        );
        assert_eq!(fields(&event_json(r#","campain":"x""#)), vec!["campain"]);
    }

    #[test]
    fn every_wrong_type_names_its_field() {
        assert_eq!(
            fields(&event_json(r#","cost_micros":-5"#)),
            vec!["cost_micros"]
        );
        assert_eq!(fields(&event_json(r#","device":"fridge""#)), vec!["device"]);
        let bad_uuid = event_json("").replace("0b8a1d2e-4f6c", "nope");
        assert_eq!(fields(&bad_uuid), vec!["event_id"]);
        // Not one at a time: every field that is wrong, whatever its JSON type.
        let json = event_json(r#","os":5,"device":null,"user_id":[],"revenue_micros":1.5"#)
            .replace(r#""event_type":"click""#, r#""event_type":null"#)
            .replace(r#""ad_id":"a1""#, r#""ad_id":{}"#);
        let errors = check(&json).unwrap_err();
        let mut named: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        named.sort();
        assert_eq!(
            named,
            ["ad_id", "event_type", "os", "revenue_micros", "user_id"]
        );
        let event_type = errors.iter().find(|e| e.field == "event_type").unwrap();
        assert_eq!(
            event_type.message,
            "must be one of impression, click, conversion"
        );
    }

    #[test]
    fn the_first_attribute_that_is_not_a_string_is_named() {
        let message = |attributes: &str| {
            let json = event_json(&format!(r#","attributes":{attributes}"#));
            let errors = check(&json).unwrap_err();
            assert_eq!(errors[0].field, "attributes");
            errors[0].message.clone()
        };
        assert!(message(r#"{"slot":"top","zone":3,"area":true}"#)
            .starts_with(r#"value of "zone" must be a string, not a number"#));
        assert!(message(r#"{"zone":null,"zone":"x"}"#)
            .starts_with(r#"value of "zone" must be a string, not null"#));
        assert_eq!(
            message(r#"["a"]"#),
            "must be an object of string keys to string values"
        );
    }

    #[test]
    fn a_field_given_twice_is_named() {
        let json = event_json(r#","campaign_id":"c2""#);
        let errors = check(&json).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].field.as_str(), errors[0].message.as_str()),
            ("campaign_id", "is given more than once")
        );
        let json = event_json(r#","attributes":{"k":"1","k":"2"}"#);
        let errors = check(&json).unwrap_err();
        assert_eq!(errors[0].field, "attributes");
        assert_eq!(errors[0].message, r#"has the key "k" more than once"#);
    }

    #[test]
    fn json_that_is_not_an_object_or_not_json_is_explained() {
        let errors = explain_parse_error(r#"["0b8a1d2e-4f6c-4a1b-9c3d-2e5f7a9b1c4d","click"]"#);
        assert_eq!(errors[0].message, "must be a JSON object");
        let errors = explain_parse_error(r#"{"user_id":"\ud800","cost_micros":1e400}"#);
        assert_eq!(errors[0].field, "user_id", "{errors:?}");
        assert!(
            errors[0].message.starts_with("is not a valid JSON string"),
            "{errors:?}"
        );
        assert_eq!(errors[1].field, "cost_micros", "{errors:?}");
        let errors = explain_parse_error(r#"{"user_id":"u1","os":"#);
        assert_eq!(errors[0].field, "os", "{errors:?}");
        let errors = explain_parse_error(r#"{"user_id":"u1","o"#);
        assert_eq!(errors[0].field, "", "{errors:?}");
        assert!(
            errors[0].message.starts_with("is not valid JSON"),
            "{errors:?}"
        );
    }

    #[test]
    fn amounts_are_capped_so_that_sums_stay_exact() {
        let at_cap = event_json(&format!(
            r#","cost_micros":{MAX_MICROS},"revenue_micros":0"#
        ));
        assert!(check(&at_cap).is_ok());
        let over = event_json(&format!(
            r#","cost_micros":{},"revenue_micros":{}"#,
            MAX_MICROS + 1,
            u64::MAX
        ));
        assert_eq!(fields(&over), vec!["cost_micros", "revenue_micros"]);
    }

    #[test]
    fn field_rules_report_every_problem() {
        let json = event_json(r#","country":"usa","browser":"0123456789012345678901234567890123""#)
            .replace(r#""campaign_id":"c1""#, r#""campaign_id":"c 1""#);
        let mut got = fields(&json);
        got.sort();
        assert_eq!(got, vec!["browser", "campaign_id", "country"]);
    }

    #[test]
    fn attributes_are_bounded() {
        let many: Vec<String> = (0..33).map(|i| format!(r#""k{i}":"v""#)).collect();
        let json = event_json(&format!(r#","attributes":{{{}}}"#, many.join(",")));
        assert_eq!(fields(&json), vec!["attributes"]);
        let long = "x".repeat(257);
        let json = event_json(&format!(r#","attributes":{{"k":"{long}"}}"#));
        assert_eq!(fields(&json), vec!["attributes"]);
    }

    #[test]
    fn future_and_expired_events_are_rejected_with_a_reason() {
        let future = event_json("").replace(&iso(NOW - 1000), &iso(NOW + 600_000));
        let err = check(&future).unwrap_err();
        assert_eq!(err[0].field, "timestamp");
        assert!(err[0].message.contains("future"), "{}", err[0].message);

        let old = event_json("").replace(&iso(NOW - 1000), &iso(NOW - 31 * 86_400_000));
        let err = check(&old).unwrap_err();
        assert!(err[0].message.contains("retention"), "{}", err[0].message);
    }
}
