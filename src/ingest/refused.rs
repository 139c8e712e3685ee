//! Which log records ClickHouse refused rows of, so that `?wait=true` never answers 200 for
//! an event that went to the dead-letter file instead of the table.
//!
//! The shipper notes a record here before it publishes the committed position past it; a
//! waiting request looks up its own record once that position is reached. Refusals are
//! rare (a row that passed validation but breaks a rule the table has, such as a constraint
//! an operator added), so the most recent ones are kept and older ones forgotten; a record
//! that may be among the forgotten ones is reported as unknown, never as clean.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

/// Records remembered; a request looks its record up within moments of the commit.
const KEPT: usize = 4096;

/// Rows of one record that ClickHouse refused, from one place in their batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRows {
    pub count: u32,
    /// When it is one row: its position among the record's rows (the request's accepted
    /// events, in order) and its event id.
    pub row: Option<(u32, String)>,
}

/// Cheap to clone; shared by the events shipper and the ingest handlers.
#[derive(Clone, Default)]
pub struct Refusals {
    noted: Arc<Mutex<Noted>>,
}

#[derive(Default)]
struct Noted {
    /// Record sequence number → (where the refused rows start in their batch → which).
    by_lsn: BTreeMap<u64, BTreeMap<usize, RefusedRows>>,
    /// The highest record forgotten to keep within [`KEPT`].
    forgotten_through: u64,
}

impl Refusals {
    /// `rows` of record `lsn`, starting at byte `at` of their batch, went to the dead-letter
    /// file. The same rows refused again (their batch retried after a network error) count
    /// once.
    pub fn note(&self, lsn: u64, at: usize, rows: RefusedRows) {
        let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        noted.by_lsn.entry(lsn).or_default().insert(at, rows);
        while noted.by_lsn.len() > KEPT {
            if let Some((forgotten, _)) = noted.by_lsn.pop_first() {
                noted.forgotten_through = noted.forgotten_through.max(forgotten);
            }
        }
    }

    /// Rows of record `lsn` ClickHouse refused (none: empty), in order, forgetting the
    /// record; `None` when that is no longer known (the record may be among those forgotten).
    pub fn take(&self, lsn: u64) -> Option<Vec<RefusedRows>> {
        let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        match noted.by_lsn.remove(&lsn) {
            Some(rows) => Some(rows.into_values().collect()),
            None if lsn <= noted.forgotten_through => None,
            None => Some(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(row: u32) -> RefusedRows {
        RefusedRows {
            count: 1,
            row: Some((row, format!("id-{row}"))),
        }
    }

    fn counts(rows: Option<Vec<RefusedRows>>) -> Option<Vec<u32>> {
        rows.map(|rows| rows.iter().map(|r| r.row.as_ref().unwrap().0).collect())
    }

    #[test]
    fn a_refused_record_is_reported_once_and_others_are_clean() {
        let refusals = Refusals::default();
        refusals.note(7, 300, one(3));
        refusals.note(7, 100, one(1));
        refusals.note(7, 100, one(1)); // the batch retried
        assert_eq!(counts(refusals.take(6)), Some(vec![]));
        assert_eq!(counts(refusals.take(7)), Some(vec![1, 3]));
        assert_eq!(counts(refusals.take(7)), Some(vec![]));
    }

    #[test]
    fn only_the_most_recent_records_are_kept_and_the_others_are_unknown() {
        let refusals = Refusals::default();
        for lsn in 1..=(KEPT as u64 + 10) {
            refusals.note(lsn, 0, one(0));
        }
        assert_eq!(refusals.take(10), None, "forgotten: not reported clean");
        assert_eq!(counts(refusals.take(11)), Some(vec![0]));
        assert_eq!(counts(refusals.take(KEPT as u64 + 10)), Some(vec![0]));
        assert_eq!(counts(refusals.take(KEPT as u64 + 11)), Some(vec![]));
    }
}
