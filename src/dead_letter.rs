//! A dead letter: an input Tributary could not turn into a row, kept with the reason.
//!
//! Nothing is dropped: a message that cannot be decoded, or an event a sink rejects, becomes a
//! [`DeadLetter`] written to the dead-letter destination (the Bronze `_dlq` Delta table, or a
//! Kafka topic / JSONL file), and its position is acknowledged only once that write is durable.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::Position;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Table or topic the input came from.
    pub source: String,
    pub position: Position,
    /// The message key or row key as text, when there is one.
    pub key: Option<String>,
    /// The input as it arrived, base64-encoded (it may not be UTF-8).
    pub raw_base64: String,
    /// Why it was rejected, naming the stage and the field where possible.
    pub error: String,
    /// When Tributary rejected it.
    pub at: DateTime<Utc>,
}

impl DeadLetter {
    pub fn new(
        source: impl Into<String>,
        position: Position,
        key: Option<String>,
        raw: &[u8],
        error: impl Into<String>,
    ) -> Self {
        use base64::Engine as _;
        DeadLetter {
            source: source.into(),
            position,
            key,
            raw_base64: base64::engine::general_purpose::STANDARD.encode(raw),
            error: error.into(),
            at: Utc::now(),
        }
    }
}
