//! The `events` row in ClickHouse's RowBinary format, written once per event in the request
//! path. These bytes go into the write-ahead log; the background writer sends each batch of
//! them as one Native block (`native`, a transposition without re-encoding a value), or as
//! they are should ClickHouse refuse that block.
//!
//! The column order is [`COLUMNS`]; `schema::verify` checks at start-up that the table has
//! exactly these columns and types, so a schema change cannot silently misalign the bytes.

use std::collections::BTreeMap;

use serde::Serialize;
use uuid::Uuid;

use crate::domain::{EventType, ValidEvent};

/// Column names and ClickHouse types, in RowBinary order.
pub const COLUMNS: &[(&str, &str)] = &[
    ("tenant", "LowCardinality(String)"),
    ("event_id", "UUID"),
    (
        "event_type",
        "Enum8('impression' = 1, 'click' = 2, 'conversion' = 3)",
    ),
    ("timestamp", "DateTime64(3, 'UTC')"),
    ("event_time", "DateTime64(3, 'UTC')"),
    ("sent_at", "Nullable(DateTime64(3, 'UTC'))"),
    ("received_at", "DateTime64(3, 'UTC')"),
    ("campaign_id", "LowCardinality(String)"),
    ("ad_id", "String"),
    ("publisher_id", "LowCardinality(String)"),
    ("advertiser_id", "LowCardinality(String)"),
    ("user_id", "String"),
    ("country", "LowCardinality(String)"),
    ("device", "LowCardinality(String)"),
    ("os", "LowCardinality(String)"),
    ("browser", "LowCardinality(String)"),
    ("cost_micros", "UInt64"),
    ("revenue_micros", "UInt64"),
    ("attributes", "Map(String, String)"),
];

/// Appends one event as a RowBinary row.
pub fn encode(event: &ValidEvent<'_>, tenant: &str, received_at_ms: i64, out: &mut Vec<u8>) {
    let w = &event.wire;
    put_str(out, tenant);
    let (high, low) = w.event_id.as_u64_pair();
    out.extend_from_slice(&high.to_le_bytes());
    out.extend_from_slice(&low.to_le_bytes());
    out.push(w.event_type as u8);
    out.extend_from_slice(&event.timestamp_ms.to_le_bytes());
    out.extend_from_slice(&event.event_time_ms.to_le_bytes());
    match event.sent_at_ms {
        Some(ms) => {
            out.push(0);
            out.extend_from_slice(&ms.to_le_bytes());
        }
        None => out.push(1),
    }
    out.extend_from_slice(&received_at_ms.to_le_bytes());
    put_str(out, &w.campaign_id);
    put_str(out, &w.ad_id);
    put_str(out, &w.publisher_id);
    put_str(out, w.advertiser_id.as_deref().unwrap_or(""));
    put_str(out, w.user_id.as_deref().unwrap_or(""));
    put_str(out, w.country.as_deref().unwrap_or(""));
    put_str(out, w.device.map_or("", |d| d.as_str()));
    put_str(out, w.os.as_deref().unwrap_or(""));
    put_str(out, w.browser.as_deref().unwrap_or(""));
    out.extend_from_slice(&w.cost_micros.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&w.revenue_micros.unwrap_or(0).to_le_bytes());
    match &w.attributes {
        Some(map) => {
            put_len(out, map.len());
            for (k, v) in map {
                put_str(out, k);
                put_str(out, v);
            }
        }
        None => put_len(out, 0),
    }
}

pub(crate) fn put_len(out: &mut Vec<u8>, mut n: usize) {
    // Unsigned LEB128, as ClickHouse writes string and collection lengths.
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// An event decoded back from RowBinary: for dead-letter files and tests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodedEvent {
    pub tenant: String,
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub timestamp_ms: i64,
    pub event_time_ms: i64,
    pub sent_at_ms: Option<i64>,
    pub received_at_ms: i64,
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
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("corrupt RowBinary row at byte {0}")]
pub struct DecodeError(usize);

/// Splits `rows` into rows and decodes each one.
pub fn decode_all(rows: &[u8]) -> Result<Vec<DecodedEvent>, DecodeError> {
    let mut reader = Reader { buf: rows, pos: 0 };
    let mut out = Vec::new();
    while reader.pos < rows.len() {
        out.push(reader.event()?);
    }
    Ok(out)
}

/// Byte ranges of the rows in `rows`, so a batch can be split without decoding it fully.
pub fn row_bounds(rows: &[u8]) -> Result<Vec<std::ops::Range<usize>>, DecodeError> {
    let mut reader = Reader { buf: rows, pos: 0 };
    let mut out = Vec::new();
    while reader.pos < rows.len() {
        let start = reader.pos;
        reader.event()?;
        out.push(start..reader.pos);
    }
    Ok(out)
}

/// Calls `f(tenant, event_id)` for every row, without allocating (the shipper counts
/// re-sent events with it).
pub fn for_each_identity(rows: &[u8], mut f: impl FnMut(&[u8], u128)) -> Result<(), DecodeError> {
    let mut reader = Reader { buf: rows, pos: 0 };
    while reader.pos < rows.len() {
        let (tenant, id) = reader.identity()?;
        f(tenant, id);
    }
    Ok(())
}

/// Reads RowBinary values one after another.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Where the next value starts.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let at = self.pos;
        self.take(N)?.try_into().map_err(|_| DecodeError(at))
    }

    /// A string borrowed from the rows.
    pub(crate) fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.len()?;
        let at = self.pos;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError(at))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError(self.pos))?;
        let slice = self.buf.get(self.pos..end).ok_or(DecodeError(self.pos))?;
        self.pos = end;
        Ok(slice)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }

    /// A varuint length.
    pub(crate) fn len(&mut self) -> Result<usize, DecodeError> {
        // Most lengths (a string shorter than 128 bytes) are one byte.
        if let Some(&byte) = self.buf.get(self.pos).filter(|b| **b < 0x80) {
            self.pos += 1;
            return Ok(usize::from(byte));
        }
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return usize::try_from(n).map_err(|_| DecodeError(self.pos));
            }
        }
        Err(DecodeError(self.pos))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }

    /// A string as the rows hold it: its length, then its bytes.
    pub(crate) fn raw_str(&mut self) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        self.bytes()?;
        Ok(&self.buf[start..self.pos])
    }

    /// Reads a row's identity (tenant, event_id) and skips the rest without allocating.
    fn identity(&mut self) -> Result<(&'a [u8], u128), DecodeError> {
        let tenant = self.bytes()?;
        let id = (u128::from(self.u64()?) << 64) | u128::from(self.u64()?);
        // event_type, timestamp, event_time
        self.take(1 + 8 + 8)?;
        if self.u8()? == 0 {
            self.take(8)?; // sent_at
        }
        self.take(8)?; // received_at
        for _ in 0..9 {
            self.bytes()?; // campaign_id … browser
        }
        self.take(16)?; // cost_micros, revenue_micros
        for _ in 0..self.len()? {
            self.bytes()?;
            self.bytes()?;
        }
        Ok((tenant, id))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.len()?;
        let at = self.pos;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError(at))
    }

    fn event(&mut self) -> Result<DecodedEvent, DecodeError> {
        let tenant = self.string()?;
        let high = self.u64()?;
        let low = self.u64()?;
        let at = self.pos;
        let event_type = EventType::from_code(self.u8()? as i8)
            .ok_or(DecodeError(at))?
            .as_str();
        let timestamp_ms = self.i64()?;
        let event_time_ms = self.i64()?;
        let sent_at_ms = match self.u8()? {
            0 => Some(self.i64()?),
            _ => None,
        };
        let received_at_ms = self.i64()?;
        let mut event = DecodedEvent {
            tenant,
            event_id: Uuid::from_u64_pair(high, low),
            event_type,
            timestamp_ms,
            event_time_ms,
            sent_at_ms,
            received_at_ms,
            campaign_id: self.string()?,
            ad_id: self.string()?,
            publisher_id: self.string()?,
            advertiser_id: self.string()?,
            user_id: self.string()?,
            country: self.string()?,
            device: self.string()?,
            os: self.string()?,
            browser: self.string()?,
            cost_micros: self.u64()?,
            revenue_micros: self.u64()?,
            attributes: BTreeMap::new(),
        };
        for _ in 0..self.len()? {
            let key = self.string()?;
            let value = self.string()?;
            event.attributes.insert(key, value);
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{TimeRules, WireEvent};

    #[test]
    fn an_encoded_event_decodes_to_the_same_values() {
        let json = r#"{"event_id":"0b8a1d2e-4f6c-4a1b-9c3d-2e5f7a9b1c4d","event_type":"conversion",
            "timestamp":"2026-11-20T10:00:00.123Z","sent_at":"2026-11-20T10:00:01Z",
            "campaign_id":"camp-1","ad_id":"ad:7","publisher_id":"pub.9","user_id":"u-ü",
            "country":"DE","device":"ctv","cost_micros":1500,"revenue_micros":300000000000,
            "attributes":{"placement":"top","long":"LONG"}}"#;
        let json = json.replace("LONG", &"x".repeat(200));
        let received = 1_795_600_000_000;
        let rules = TimeRules {
            received_at_ms: received,
            max_future_ms: 300_000,
            retention_ms: 30 * 86_400_000,
        };
        let event = serde_json::from_str::<WireEvent>(&json)
            .unwrap()
            .into_valid(&rules)
            .unwrap();
        let mut buf = Vec::new();
        encode(&event, "acme", received, &mut buf);
        encode(&event, "acme", received, &mut buf);

        let decoded = decode_all(&buf).unwrap();
        assert_eq!(decoded.len(), 2);
        let mut identities = Vec::new();
        for_each_identity(&buf, |tenant, id| identities.push((tenant.to_vec(), id))).unwrap();
        let id = event.wire.event_id.as_u128();
        assert_eq!(
            identities,
            vec![(b"acme".to_vec(), id), (b"acme".to_vec(), id)]
        );
        assert_eq!(row_bounds(&buf).unwrap().len(), 2);
        let d = &decoded[0];
        assert_eq!(d.tenant, "acme");
        assert_eq!(
            d.event_id.to_string(),
            "0b8a1d2e-4f6c-4a1b-9c3d-2e5f7a9b1c4d"
        );
        assert_eq!(d.event_type, "conversion");
        assert_eq!(d.timestamp_ms, event.timestamp_ms);
        assert_eq!(d.sent_at_ms, event.sent_at_ms);
        assert_eq!(d.user_id, "u-ü");
        assert_eq!(d.device, "ctv");
        assert_eq!(d.revenue_micros, 300_000_000_000);
        assert_eq!(d.attributes["placement"], "top");
        assert_eq!(d.attributes["long"].len(), 200, "multi-byte LEB128 length");
    }

    #[test]
    fn truncated_rows_are_reported_not_misread() {
        let mut buf = Vec::new();
        put_str(&mut buf, "tenant");
        assert!(decode_all(&buf).is_err());
    }
}
