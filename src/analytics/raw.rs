//! Raw events: one by id, newest-first pages, and the export in order of receipt.
//!
//! Both listings are keyset-paginated on the server's receive time, then the event's identity
//! as tie-breaker (a batch shares one `received_at`, and one `event_id` sent with two types,
//! campaigns or hours is two events): `(received_at, event_id, type, campaign_id, timestamp)`,
//! where the timestamp stands for its hour (the table keeps one row per hour). A cursor is the
//! key of the last event served; the next read starts strictly after it, so no OFFSET scan happens and
//! inserts during paging neither repeat nor skip events already there: new events are received
//! later than any cursor taken before, so they sort above a newest-first listing and after an
//! export's cursor.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::event::{is_plain_id, EventType};

use super::{
    model::{Filter, TimeRange},
    sql::{where_clause, Sql, FROM_EVENTS},
    InvalidInput,
};

/// One stored event, as read back.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub struct EventRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    pub kind: String,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub timestamp: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub event_time: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis::option")]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub received_at: DateTime<Utc>,
    pub campaign_id: String,
    pub ad_id: String,
    pub publisher_id: String,
    pub advertiser_id: String,
    pub user_id: String,
    pub country: String,
    pub device: String,
    pub os: String,
    pub browser: String,
    pub cost_micros: u64,
    pub revenue_micros: u64,
    pub attributes: Vec<(String, String)>,
}

const COLUMNS: &str = "SELECT event_id, toString(event_type) AS kind, timestamp, event_time, \
     sent_at, received_at, campaign_id, ad_id, publisher_id, advertiser_id, user_id, country, \
     device, os, browser, cost_micros, revenue_micros, attributes";

/// Where a listing continues: strictly after this event in its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub received_at_ms: i64,
    pub event_id: Uuid,
    /// The rest of the event's identity. `None` in the two-part cursors of versions before it
    /// (`<received_at ms>_<event id hex>`), still taken: they resume with every event of that
    /// receive time and id, so at worst a few events come again, none is skipped.
    pub identity: Option<Identity>,
}

/// What tells apart events that share a receive time and an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: EventType,
    pub campaign_id: String,
    pub timestamp_ms: i64,
}

/// The listings' order: the key a cursor holds.
const KEY: &str = "(received_at, event_id, toString(event_type), campaign_id, timestamp)";

impl Cursor {
    pub fn of(row: &EventRow) -> Self {
        Cursor {
            received_at_ms: row.received_at.timestamp_millis(),
            event_id: row.event_id,
            identity: Some(Identity {
                // A type the table holds is one the service wrote.
                kind: EventType::parse(&row.kind).unwrap_or(EventType::Impression),
                campaign_id: row.campaign_id.clone(),
                timestamp_ms: row.timestamp.timestamp_millis(),
            }),
        }
    }

    /// Opaque to clients, and safe in a URL as it is (campaign ids are plain ids):
    /// `<received_at ms>_<event id hex>_<timestamp ms>_<type>_<campaign id>`.
    pub fn encode(&self) -> String {
        let mut text = format!("{}_{}", self.received_at_ms, self.event_id.simple());
        if let Some(i) = &self.identity {
            let kind = i.kind.as_str();
            text.push_str(&format!("_{}_{kind}_{}", i.timestamp_ms, i.campaign_id));
        }
        text
    }

    pub fn decode(text: &str, field: &str) -> Result<Self, InvalidInput> {
        let invalid = || {
            InvalidInput::new(
                "invalid_cursor",
                field,
                "not a cursor this API returned (pass `next_cursor` or an exported line's `cursor` as is)",
            )
        };
        let millis = |text: &str| {
            text.parse::<i64>()
                .ok()
                .filter(|ms| (0..=i64::from(i32::MAX) * 1000).contains(ms))
        };
        // The campaign id comes last: it may hold `_` itself.
        let parts: Vec<&str> = text.splitn(5, '_').collect();
        let (received_at, id, rest) = match parts[..] {
            [received_at, id] => (received_at, id, None),
            [received_at, id, timestamp, kind, campaign] => {
                (received_at, id, Some((timestamp, kind, campaign)))
            }
            _ => return Err(invalid()),
        };
        let received_at_ms = millis(received_at).ok_or_else(invalid)?;
        if id.len() != 32 {
            return Err(invalid());
        }
        let event_id = Uuid::try_parse(id).map_err(|_| invalid())?;
        let identity = match rest {
            None => None,
            Some((timestamp, kind, campaign)) => Some(Identity {
                kind: EventType::parse(kind).ok_or_else(invalid)?,
                campaign_id: Some(campaign)
                    .filter(|c| is_plain_id(c))
                    .ok_or_else(invalid)?
                    .to_owned(),
                timestamp_ms: millis(timestamp).ok_or_else(invalid)?,
            }),
        };
        Ok(Cursor {
            received_at_ms,
            event_id,
            identity,
        })
    }

    /// `KEY <op> (the cursor's key)`.
    fn after(&self, sql: &mut Sql, op: &'static str) {
        let (kind, campaign, timestamp_ms) = match &self.identity {
            Some(i) => (i.kind.as_str(), i.campaign_id.as_str(), i.timestamp_ms),
            // A two-part cursor: below every key of its receive time and id when reading on
            // upwards, above all of them when reading on downwards (`~` sorts after every type).
            None if op == ">" => ("", "", 0),
            None => ("~", "", 0),
        };
        let received_at = sql.bind_i64(self.received_at_ms);
        let id = sql.bind_uuid(&self.event_id);
        let kind = sql.bind_str(kind);
        let campaign = sql.bind_str(campaign);
        let timestamp = sql.bind_i64(timestamp_ms);
        sql.push(" AND ")
            .push(KEY)
            .push(" ")
            .push(op)
            .push(" (fromUnixTimestamp64Milli(")
            .push_expr(&received_at)
            .push(", 'UTC'), ")
            .push_expr(&id)
            .push(", ")
            .push_expr(&kind)
            .push(", ")
            .push_expr(&campaign)
            .push(", fromUnixTimestamp64Milli(")
            .push_expr(&timestamp)
            .push(", 'UTC'))");
    }
}

/// The optional time bounds of a listing, on `event_time`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bounds {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl Bounds {
    fn range(&self) -> Option<TimeRange> {
        // Open ends: the epoch, and a date far beyond any event's.
        const FAR_FUTURE_MS: i64 = 7_258_118_400_000; // 2200-01-01
        if self.from.is_none() && self.to.is_none() {
            return None;
        }
        let from_ms = self.from.map_or(0, super::model::ceil_ms);
        let to_ms = self.to.map_or(FAR_FUTURE_MS, super::model::ceil_ms);
        Some(TimeRange { from_ms, to_ms })
    }
}

/// One event of `tenant` by id: the one received last, should the id have been sent with
/// another type, campaign or hour too (which makes another event).
pub fn get(tenant: &str, event_id: &Uuid) -> Sql {
    let mut sql = Sql::new();
    let filter = where_clause(&mut sql, tenant, None, &[]);
    let id = sql.bind_uuid(event_id);
    sql.push(COLUMNS)
        .push(FROM_EVENTS)
        .push(" WHERE ")
        .push_expr(&filter)
        .push(" AND event_id = ")
        .push_expr(&id)
        .push(" ORDER BY received_at DESC LIMIT 1");
    sql
}

/// A page, newest received first, strictly after `after` in that order.
pub fn page(
    tenant: &str,
    bounds: Bounds,
    filters: &[Filter],
    after: Option<Cursor>,
    limit: u64,
) -> Sql {
    let mut sql = Sql::new();
    let filter = where_clause(&mut sql, tenant, bounds.range(), filters);
    sql.push(COLUMNS)
        .push(FROM_EVENTS)
        .push(" WHERE ")
        .push_expr(&filter);
    if let Some(cursor) = after {
        cursor.after(&mut sql, "<");
    }
    let limit = sql.bind_u64(limit);
    sql.push(" ORDER BY ")
        .push(KEY)
        .push(" DESC LIMIT ")
        .push_expr(&limit);
    sql
}

/// The export: oldest received first, strictly after `after`, and received no later than
/// `until_ms` (events received later may still be on their way into ClickHouse).
pub fn export(
    tenant: &str,
    bounds: Bounds,
    filters: &[Filter],
    after: Option<Cursor>,
    until_ms: i64,
    limit: u64,
) -> Sql {
    let mut sql = Sql::new();
    let filter = where_clause(&mut sql, tenant, bounds.range(), filters);
    let until = sql.bind_i64(until_ms);
    sql.push(COLUMNS)
        .push(FROM_EVENTS)
        .push(" WHERE ")
        .push_expr(&filter)
        .push(" AND received_at <= fromUnixTimestamp64Milli(")
        .push_expr(&until)
        .push(", 'UTC')");
    if let Some(cursor) = after {
        cursor.after(&mut sql, ">");
    }
    let limit = sql.bind_u64(limit);
    sql.push(" ORDER BY ")
        .push(KEY)
        .push(" ASC LIMIT ")
        .push_expr(&limit);
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::sql::Param;

    fn cursor() -> Cursor {
        Cursor {
            received_at_ms: 1_760_000_000_123,
            event_id: Uuid::new_v4(),
            identity: Some(Identity {
                kind: EventType::Click,
                campaign_id: "spring_sale:2026-04.b".into(),
                timestamp_ms: 1_759_999_000_000,
            }),
        }
    }

    #[test]
    fn cursors_round_trip_and_reject_anything_else() {
        let c = cursor();
        let text = c.encode();
        assert_eq!(Cursor::decode(&text, "cursor").unwrap(), c);
        // Two-part cursors of earlier versions are still taken.
        let id = c.event_id.simple();
        let old = Cursor::decode(&format!("5_{id}"), "cursor").unwrap();
        assert_eq!((old.received_at_ms, old.identity), (5, None));
        for bad in [
            "",
            "123",
            "abc_def",
            &format!("-1_{id}"),
            &format!("1_{id}_1_click"),
            &format!("-1_{id}_1_click_c1"),
            &format!("1_{id}_1_bogus_c1"),
            &format!("1_{id}_x_click_c1"),
            &format!("1_{id}_1_click_"),
            &format!("1_{id}_1_click_a b"),
            "1_' OR 1=1 --_1_click_c1",
            &format!("1_{}_1_click_c1", Uuid::new_v4()), // hyphenated is not what we hand out
        ] {
            let err = Cursor::decode(bad, "cursor").unwrap_err();
            assert_eq!(
                (err.code, err.field.as_str()),
                ("invalid_cursor", "cursor"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_two_part_cursor_resumes_with_every_event_of_its_time_and_id() {
        let old = Cursor {
            identity: None,
            ..cursor()
        };
        let kinds = |sql: &Sql| -> Vec<String> {
            sql.params()
                .iter()
                .filter_map(|(_, v)| match v {
                    Param::Str(s) if s.is_empty() || s == "~" => Some(s.clone()),
                    _ => None,
                })
                .collect()
        };
        // (kind, campaign): above every type reading downwards, below all reading upwards.
        let page = page("t", Bounds::default(), &[], Some(old.clone()), 10);
        assert_eq!(kinds(&page), ["~", ""]);
        let export = export("t", Bounds::default(), &[], Some(old), 9, 10);
        assert_eq!(kinds(&export), ["", ""]);
    }

    #[test]
    fn listings_are_keyset_paginated_and_scoped() {
        let sql = page("t'x", Bounds::default(), &[], Some(cursor()), 100);
        let text = sql.text();
        assert!(
            text.contains("FROM events FINAL WHERE tenant = {p0:String}"),
            "{text}"
        );
        let key = "(received_at, event_id, toString(event_type), campaign_id, timestamp)";
        assert!(text.contains(&format!("{key} < (")), "{text}");
        assert!(
            text.contains(&format!("ORDER BY {key} DESC LIMIT {{p")),
            "{text}"
        );
        assert!(!text.contains("OFFSET"));
        assert!(!text.contains("t'x"));
        assert!(!text.contains("spring_sale"));

        let sql = export("t", Bounds::default(), &[], Some(cursor()), 9, 10);
        let text = sql.text();
        assert!(
            text.contains("received_at <= fromUnixTimestamp64Milli("),
            "{text}"
        );
        assert!(text.contains(&format!("{key} > (")), "{text}");
        assert!(text.contains(&format!("ORDER BY {key} ASC")), "{text}");
    }
}
