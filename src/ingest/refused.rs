//! Which log records ClickHouse refused rows of, so that `?wait=true` never answers 200 for
//! an event that went to the dead-letter file instead of the table.
//!
//! The shipper notes a record here before it publishes the committed position past it; a
//! waiting request looks up its own record once that position is reached. Refusals are
//! rare (a row that passed validation but breaks a rule the table has, such as a constraint
//! an operator added), so the most recent ones are kept and older ones forgotten.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

/// Records remembered; a request looks its record up within moments of the commit.
const KEPT: usize = 4096;

/// Cheap to clone; shared by the events shipper and the ingest handlers.
#[derive(Clone, Default)]
pub struct Refusals {
    /// Record sequence number → (where the refused rows start in their batch → how many).
    by_lsn: Arc<Mutex<BTreeMap<u64, BTreeMap<usize, u32>>>>,
}

impl Refusals {
    /// `rows` rows of record `lsn`, starting at byte `at` of their batch, went to the
    /// dead-letter file. The same rows refused again (their batch retried after a network
    /// error) count once.
    pub fn note(&self, lsn: u64, at: usize, rows: u32) {
        let mut by_lsn = self.by_lsn.lock().unwrap_or_else(|e| e.into_inner());
        by_lsn.entry(lsn).or_default().insert(at, rows);
        while by_lsn.len() > KEPT {
            by_lsn.pop_first();
        }
    }

    /// Rows of record `lsn` ClickHouse refused (0 when none), forgetting the record.
    pub fn take(&self, lsn: u64) -> u32 {
        let mut by_lsn = self.by_lsn.lock().unwrap_or_else(|e| e.into_inner());
        by_lsn.remove(&lsn).map_or(0, |rows| rows.values().sum())
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
        assert_eq!(refusals.take(6), 0);
        assert_eq!(refusals.take(7), 2);
        assert_eq!(refusals.take(7), 0);
    }

    #[test]
    fn only_the_most_recent_records_are_kept() {
        let refusals = Refusals::default();
        for lsn in 0..(KEPT as u64 + 10) {
            refusals.note(lsn, 0, 1);
        }
        assert_eq!(refusals.take(9), 0);
        assert_eq!(refusals.take(10), 1);
        assert_eq!(refusals.take(KEPT as u64 + 9), 1);
    }
}
