//! Validated domain types: what an event must look like before it is accepted.

pub mod country;
pub mod event;

pub use event::{
    explain_parse_error, json_error_text, EventType, FieldError, TimeRules, ValidEvent, WireEvent,
};
