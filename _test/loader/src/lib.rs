//! Mock ad traffic for adtrack: a deterministic generator of realistic events
//! ([`generator`]), and a driver that sends them at a set rate with retries ([`run`]).

pub mod generator;
pub mod run;
pub mod stats;
