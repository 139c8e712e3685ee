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

/// Cheap to clone; shared by the events shipper and the ingest handlers.
#[derive(Clone, Default)]
pub struct Refusals {
    noted: Arc<Mutex<Noted>>,
}

#[derive(Default)]
struct Noted {
    /// Record sequence number → (where the refused rows start in their batch → how many).
    by_lsn: BTreeMap<u64, BTreeMap<usize, u32>>,
    /// The highest record forgotten to keep within [`KEPT`].
    forgotten_through: u64,
}

impl Refusals {
    /// `rows` rows of record `lsn`, starting at byte `at` of their batch, went to the
    /// dead-letter file. The same rows refused again (their batch retried after a network
    /// error) count once.
    pub fn note(&self, lsn: u64, at: usize, rows: u32) {
        let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        noted.by_lsn.entry(lsn).or_default().insert(at, rows);
        while noted.by_lsn.len() > KEPT {
            if let Some((forgotten, _)) = noted.by_lsn.pop_first() {
                noted.forgotten_through = noted.forgotten_through.max(forgotten);
            }
        }
    }

    /// Rows of record `lsn` ClickHouse refused (0 when none), forgetting the record; `None`
    /// when that is no longer known (the record may be among those forgotten).
    pub fn take(&self, lsn: u64) -> Option<u32> {
        let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        match noted.by_lsn.remove(&lsn) {
            Some(rows) => Some(rows.values().sum()),
            None if lsn <= noted.forgotten_through => None,
            None => Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_record_is_reported_once_and_others_are_clean() {
        let refusals = Refusals::default();
        refusals.note(7, 100, 1);
        refusals.note(7, 300, 1);
        refusals.note(7, 100, 1); // the batch retried
        assert_eq!(refusals.take(6), Some(0));
        assert_eq!(refusals.take(7), Some(2));
        assert_eq!(refusals.take(7), Some(0));
    }

    #[test]
    fn only_the_most_recent_records_are_kept_and_the_others_are_unknown() {
        let refusals = Refusals::default();
        for lsn in 1..=(KEPT as u64 + 10) {
            refusals.note(lsn, 0, 1);
        }
        assert_eq!(refusals.take(10), None, "forgotten: not reported clean");
        assert_eq!(refusals.take(11), Some(1));
        assert_eq!(refusals.take(KEPT as u64 + 10), Some(1));
        assert_eq!(refusals.take(KEPT as u64 + 11), Some(0));
    }
}
