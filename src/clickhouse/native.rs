//! ClickHouse's Native format, for inserts: the shipper turns a batch of RowBinary rows (as the
//! write-ahead log holds them) into one column-oriented block before sending it.
//!
//! Why: ClickHouse reads each `LowCardinality(String)` value of a RowBinary row by looking it
//! up in the column's dictionary, one value at a time; in Native such a column arrives as its
//! dictionary plus one small number per row. On the local engine, reading 100,000 event rows
//! cost 0.25–0.3 s of CPU as RowBinary and 0.01 s as Native (BENCHMARKS.md). The request path
//! keeps writing RowBinary: a row is appended at once, and a batch ClickHouse refuses is still
//! split by rows to find the bad ones.
//!
//! A block, as ClickHouse reads it over HTTP (no block info): the number of columns and of
//! rows (varuint each), then for each column its name, its type and its values:
//! - fixed-width types (`UUID`, `Enum8`, `DateTime64`, `UInt*`): back to back, as in RowBinary;
//! - `String`: each value as in RowBinary (varuint length, bytes);
//! - `Nullable(T)`, T fixed-width: one byte per row (1 = NULL), then every row's value (zeros
//!   for NULL);
//! - `Map(String, String)`: the running total of entries after each row (UInt64), then every
//!   key, then every value;
//! - `LowCardinality(String)`: the serialization version (UInt64 1), the index width with the
//!   flags "keys follow" and "new dictionary" (UInt64), the dictionary (UInt64 count, strings),
//!   the rows (UInt64 count, one index of 1, 2 or 4 bytes each).

use std::collections::hash_map::Entry;

use super::rowbinary::{put_len, put_str, DecodeError, Reader};

/// How a column's values are laid out, from its ClickHouse type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fixed(usize),
    Str,
    LowCardinalityStr,
    NullableFixed(usize),
    StrMap,
}

impl Kind {
    fn of(ty: &str) -> Option<Kind> {
        if let Some(inner) = ty
            .strip_prefix("Nullable(")
            .and_then(|t| t.strip_suffix(')'))
        {
            return match Kind::of(inner)? {
                Kind::Fixed(width) => Some(Kind::NullableFixed(width)),
                _ => None,
            };
        }
        let width = match ty {
            "String" => return Some(Kind::Str),
            "LowCardinality(String)" => return Some(Kind::LowCardinalityStr),
            "Map(String, String)" => return Some(Kind::StrMap),
            "UUID" => 16,
            "UInt8" | "Int8" => 1,
            "UInt16" | "Int16" => 2,
            "UInt32" | "Int32" => 4,
            "UInt64" | "Int64" => 8,
            _ if ty.starts_with("Enum8(") => 1,
            _ if ty.starts_with("DateTime64(") => 8,
            _ => return None,
        };
        Some(Kind::Fixed(width))
    }
}

/// The columns of a table, in RowBinary order, and how to turn its rows into a Native block.
#[derive(Debug, Clone)]
pub struct Layout {
    columns: Vec<(&'static str, &'static str, Kind)>,
}

impl Layout {
    /// `None` when a column has a type this module does not lay out (send RowBinary then).
    pub fn new(columns: &[(&'static str, &'static str)]) -> Option<Layout> {
        let columns = columns
            .iter()
            .map(|&(name, ty)| Some((name, ty, Kind::of(ty)?)))
            .collect::<Option<_>>()?;
        Some(Layout { columns })
    }

    /// `rows` (whole RowBinary rows of this layout) as one Native block.
    pub fn block(&self, rows: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        self.block_into(rows, &mut out)?;
        Ok(out)
    }

    /// `rows` as one Native block in `out`, replacing what it held (its memory is reused).
    ///
    /// Two passes over the rows, so that the block is the only copy made: the first counts
    /// the rows, measures every column and builds the dictionaries; `out` then takes the
    /// block's exact size, and the second pass copies each value into its column.
    pub fn block_into(&self, rows: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let mut measures: Vec<Measure> = self.columns.iter().map(|c| Measure::new(c.2)).collect();
        let mut reader = Reader::new(rows);
        let mut count = 0;
        while !reader.at_end() {
            for measure in &mut measures {
                measure.take(&mut reader)?;
            }
            count += 1;
        }

        let mut head = Vec::new();
        put_len(&mut head, self.columns.len());
        put_len(&mut head, count);
        let size = head.len()
            + self
                .columns
                .iter()
                .zip(&measures)
                .map(|(&(name, ty, _), m)| 20 + name.len() + ty.len() + m.size(count))
                .sum::<usize>();
        out.clear();
        out.reserve(size);
        out.extend_from_slice(&head);
        let mut cursors = Vec::with_capacity(measures.len());
        for (&(name, ty, _), measure) in self.columns.iter().zip(measures) {
            put_str(out, name);
            put_str(out, ty);
            // A block without rows has no column data at all (not even a dictionary's).
            if count > 0 {
                cursors.push(measure.place(out, count));
            }
        }

        let mut reader = Reader::new(rows);
        while !reader.at_end() {
            for cursor in &mut cursors {
                cursor.take(&mut reader, out)?;
            }
        }
        Ok(())
    }
}

/// The first pass over one column: how large its values are (strings borrow from the rows).
enum Measure<'a> {
    Fixed(usize),
    /// Bytes of all values, as in RowBinary (length first).
    Str(usize),
    LowCardinalityStr {
        dictionary: Vec<&'a [u8]>,
        positions: foldhash::HashMap<&'a [u8], u32>,
        rows: Vec<u32>,
        /// The previous row's value and position (rows in a batch often repeat it).
        last: Option<(&'a [u8], u32)>,
    },
    NullableFixed(usize),
    StrMap {
        keys: usize,
        values: usize,
    },
}

impl<'a> Measure<'a> {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Fixed(width) => Measure::Fixed(width),
            Kind::Str => Measure::Str(0),
            Kind::LowCardinalityStr => Measure::LowCardinalityStr {
                dictionary: Vec::new(),
                positions: foldhash::HashMap::default(),
                rows: Vec::new(),
                last: None,
            },
            Kind::NullableFixed(width) => Measure::NullableFixed(width),
            Kind::StrMap => Measure::StrMap { keys: 0, values: 0 },
        }
    }

    /// Takes this column's value of the row at `reader`.
    fn take(&mut self, reader: &mut Reader<'a>) -> Result<(), DecodeError> {
        match self {
            Measure::Fixed(width) => {
                reader.take(*width)?;
            }
            Measure::Str(size) => *size += reader.raw_str()?.len(),
            Measure::LowCardinalityStr {
                dictionary,
                positions,
                rows,
                last,
            } => {
                let value = reader.bytes()?;
                let position = match *last {
                    Some((previous, position)) if previous == value => position,
                    _ => match positions.entry(value) {
                        Entry::Occupied(known) => *known.get(),
                        Entry::Vacant(new) => {
                            dictionary.push(value);
                            *new.insert(dictionary.len() as u32 - 1)
                        }
                    },
                };
                *last = Some((value, position));
                rows.push(position);
            }
            Measure::NullableFixed(width) => {
                if reader.u8()? == 0 {
                    reader.take(*width)?;
                }
            }
            Measure::StrMap { keys, values } => {
                for _ in 0..reader.len()? {
                    *keys += reader.raw_str()?.len();
                    *values += reader.raw_str()?.len();
                }
            }
        }
        Ok(())
    }

    /// The column's values of `count` rows, in bytes.
    fn size(&self, count: usize) -> usize {
        match self {
            Measure::Fixed(width) => count * width,
            Measure::Str(size) => *size,
            Measure::LowCardinalityStr { dictionary, .. } => {
                let (_, width) = index_type(dictionary.len());
                8 * 4 + dictionary.iter().map(|v| 10 + v.len()).sum::<usize>() + count * width
            }
            Measure::NullableFixed(width) => count * (1 + width),
            Measure::StrMap { keys, values } => count * 8 + keys + values,
        }
    }

    /// Makes room for the column's values at the end of `out` (writing the ones it has
    /// already: a dictionary and its rows) and says where the second pass copies each value.
    fn place(self, out: &mut Vec<u8>, count: usize) -> Cursor {
        let at = out.len();
        let size = self.size(count);
        let cursor = match self {
            Measure::Fixed(width) => Cursor::Fixed { width, at },
            Measure::Str(_) => Cursor::Str { at },
            Measure::LowCardinalityStr {
                dictionary, rows, ..
            } => {
                const SHARED_DICTIONARIES_WITH_ADDITIONAL_KEYS: u64 = 1;
                const HAS_ADDITIONAL_KEYS: u64 = 1 << 9;
                const NEED_UPDATE_DICTIONARY: u64 = 1 << 10;
                let (index_type, width) = index_type(dictionary.len());
                put_u64(out, SHARED_DICTIONARIES_WITH_ADDITIONAL_KEYS);
                put_u64(
                    out,
                    HAS_ADDITIONAL_KEYS | NEED_UPDATE_DICTIONARY | index_type,
                );
                put_u64(out, dictionary.len() as u64);
                for value in dictionary {
                    put_len(out, value.len());
                    out.extend_from_slice(value);
                }
                put_u64(out, rows.len() as u64);
                for row in rows {
                    out.extend_from_slice(&row.to_le_bytes()[..width]);
                }
                return Cursor::Skip;
            }
            Measure::NullableFixed(width) => Cursor::NullableFixed {
                width,
                nulls: at,
                values: at + count,
            },
            Measure::StrMap { keys, .. } => Cursor::StrMap {
                entries: 0,
                ends: at,
                keys: at + count * 8,
                values: at + count * 8 + keys,
            },
        };
        // Zeros, which a NULL's value stays.
        out.resize(at + size, 0);
        cursor
    }
}

/// `(index type, bytes per index)` of a dictionary of `len` values.
fn index_type(len: usize) -> (u64, usize) {
    match len {
        n if n <= 1 << 8 => (0, 1),
        n if n <= 1 << 16 => (1, 2),
        _ => (2, 4),
    }
}

/// The second pass over one column: where its next value goes in the block.
enum Cursor {
    Fixed {
        width: usize,
        at: usize,
    },
    Str {
        at: usize,
    },
    /// Written whole already (a dictionary column).
    Skip,
    NullableFixed {
        width: usize,
        nulls: usize,
        values: usize,
    },
    StrMap {
        entries: u64,
        ends: usize,
        keys: usize,
        values: usize,
    },
}

impl Cursor {
    /// Copies this column's value of the row at `reader` into `out`.
    fn take(&mut self, reader: &mut Reader<'_>, out: &mut [u8]) -> Result<(), DecodeError> {
        match self {
            Cursor::Fixed { width, at } => put(out, at, reader.take(*width)?),
            Cursor::Str { at } => put(out, at, reader.raw_str()?),
            Cursor::Skip => {
                reader.bytes()?;
            }
            Cursor::NullableFixed {
                width,
                nulls,
                values,
            } => {
                let null = reader.u8()?;
                put(out, nulls, &[null]);
                match null {
                    0 => put(out, values, reader.take(*width)?),
                    _ => *values += *width,
                }
            }
            Cursor::StrMap {
                entries,
                ends,
                keys,
                values,
            } => {
                let n = reader.len()?;
                for _ in 0..n {
                    put(out, keys, reader.raw_str()?);
                    put(out, values, reader.raw_str()?);
                }
                *entries += n as u64;
                put(out, ends, &entries.to_le_bytes());
            }
        }
        Ok(())
    }
}

/// Copies `value` to `out` at `at`, and moves `at` past it.
fn put(out: &mut [u8], at: &mut usize, value: &[u8]) {
    out[*at..*at + value.len()].copy_from_slice(value);
    *at += value.len();
}
fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clickhouse::rowbinary::COLUMNS;

    #[test]
    fn both_tables_have_a_layout() {
        assert!(Layout::new(COLUMNS).is_some());
        assert!(Layout::new(crate::usage::COLUMNS).is_some());
        assert!(Layout::new(&[("x", "Array(String)")]).is_none());
        assert!(Layout::new(&[("x", "Nullable(String)")]).is_none());
    }

    #[test]
    fn columns_are_laid_out_as_clickhouse_reads_them() {
        let layout = Layout::new(&[
            ("id", "UInt16"),
            ("name", "String"),
            ("kind", "LowCardinality(String)"),
            ("at", "Nullable(DateTime64(3, 'UTC'))"),
            ("tags", "Map(String, String)"),
        ])
        .unwrap();
        let mut rows = Vec::new();
        for (id, name, kind, at, tags) in [
            (1u16, "a", "x", Some(5i64), vec![("k", "v")]),
            (2, "bc", "y", None, vec![]),
            (3, "", "x", Some(-1), vec![("k1", "v1"), ("k2", "")]),
        ] {
            rows.extend_from_slice(&id.to_le_bytes());
            put_str(&mut rows, name);
            put_str(&mut rows, kind);
            match at {
                Some(at) => {
                    rows.push(0);
                    rows.extend_from_slice(&at.to_le_bytes());
                }
                None => rows.push(1),
            }
            put_len(&mut rows, tags.len());
            for (k, v) in tags {
                put_str(&mut rows, k);
                put_str(&mut rows, v);
            }
        }
        let block = layout.block(&rows).unwrap();

        let mut expected = vec![5, 3];
        let mut column = |name: &str, ty: &str, data: &[u8]| {
            put_str(&mut expected, name);
            put_str(&mut expected, ty);
            expected.extend_from_slice(data);
        };
        column("id", "UInt16", &[1, 0, 2, 0, 3, 0]);
        column("name", "String", b"\x01a\x02bc\x00");
        let mut kind = Vec::new();
        for n in [1u64, (1 << 9) | (1 << 10), 2] {
            kind.extend_from_slice(&n.to_le_bytes());
        }
        kind.extend_from_slice(b"\x01x\x01y");
        kind.extend_from_slice(&3u64.to_le_bytes());
        kind.extend_from_slice(&[0, 1, 0]);
        column("kind", "LowCardinality(String)", &kind);
        let mut at = vec![0, 1, 0];
        for v in [5i64, 0, -1] {
            at.extend_from_slice(&v.to_le_bytes());
        }
        column("at", "Nullable(DateTime64(3, 'UTC'))", &at);
        let mut tags = Vec::new();
        for end in [1u64, 1, 3] {
            tags.extend_from_slice(&end.to_le_bytes());
        }
        tags.extend_from_slice(b"\x01k\x02k1\x02k2\x01v\x02v1\x00");
        column("tags", "Map(String, String)", &tags);
        assert_eq!(block, expected);
    }

    #[test]
    fn a_truncated_row_is_an_error() {
        let layout = Layout::new(&[("a", "UInt32"), ("b", "String")]).unwrap();
        let mut rows = 7u32.to_le_bytes().to_vec();
        put_str(&mut rows, "whole");
        rows.extend_from_slice(&8u32.to_le_bytes());
        assert!(layout.block(&rows).is_err());
    }

    #[test]
    fn indexes_are_as_wide_as_the_dictionary_needs() {
        let layout = Layout::new(&[("k", "LowCardinality(String)")]).unwrap();
        for (values, index_type, width) in
            [(256, 0, 1), (257, 1, 2), (65_536, 1, 2), (65_537, 2, 4)]
        {
            let mut rows = Vec::new();
            for i in 0..values {
                put_str(&mut rows, &i.to_string());
            }
            let block = layout.block(&rows).unwrap();
            let mut at = Reader::new(&block);
            assert_eq!((at.len().unwrap(), at.len().unwrap()), (1, values));
            at.bytes().unwrap(); // name
            at.bytes().unwrap(); // type
            let mut u64 = || u64::from_le_bytes(at.take(8).unwrap().try_into().unwrap());
            assert_eq!(u64(), 1);
            assert_eq!(u64() & 0xff, index_type, "{values} values");
            let last = (values - 1) as u32;
            assert!(
                block.ends_with(&last.to_le_bytes()[..width]),
                "{values} values"
            );
        }
    }

    #[test]
    fn a_block_without_rows_has_names_and_types_only() {
        let layout = Layout::new(&[("k", "LowCardinality(String)"), ("n", "UInt8")]).unwrap();
        let mut expected = vec![2, 0];
        for text in ["k", "LowCardinality(String)", "n", "UInt8"] {
            put_str(&mut expected, text);
        }
        assert_eq!(layout.block(&[]).unwrap(), expected);
    }
}
