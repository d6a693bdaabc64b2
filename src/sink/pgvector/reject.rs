//! Events no pgvector table can take, told apart before any SQL runs.
//!
//! A pgvector table is keyed: an event without a key (a keyless Kafka topic's message with a
//! null message key, a PostgreSQL table without a primary key), with a key that lacks one of
//! the table's key columns, or with an embedding of the wrong dimension can never be upserted,
//! however often it is retried. Such an event becomes a dead letter of this sink with the reason,
//! and its position counts as done, so one message can never stop a topic (before this check,
//! a keyless event arriving before its table existed failed the batch on every restart). The
//! other sinks still take the event: Bronze is the raw record and keeps it (`_key` NULL).

use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Op};

use super::table::{Target, key_text};

/// Why `e` cannot be written to pgvector (its table `target`, when known), or `None`.
pub(super) fn reason(e: &ChangeEvent, target: Option<&Target>, dimension: u32) -> Option<String> {
    if e.op == Op::Truncate {
        return None;
    }
    if e.key.is_empty() {
        return Some(format!(
            "{} at {}: the event has no key (no primary key or key_columns, and no message key), \
             so it cannot be upserted into pgvector; set key_columns for the topic or give the \
             messages a key",
            e.source, e.position
        ));
    }
    if let Some(target) = target {
        let lacking: Vec<&str> = target
            .keys
            .iter()
            .filter(|(k, _)| e.key.get(k).and_then(key_text).is_none())
            .map(|(k, _)| k.as_str())
            .collect();
        if !lacking.is_empty() {
            return Some(format!(
                "{} at {}: key {} lacks a value for {:?}, a key column of {}",
                e.source,
                e.position,
                e.key.json_text(),
                lacking,
                target.qualified
            ));
        }
    }
    // Only against a table already checked to have the configured dimension: before that, a
    // table of another dimension must stop the sink as a configuration error (every event
    // would be "wrong"), not turn every event into a dead letter.
    if let Some(v) = &e.embedding
        && target.is_some()
        && v.len() != dimension as usize
    {
        return Some(format!(
            "{} at {}: the embedding has {} dimensions but the table's column is vector({dimension})",
            e.source,
            e.position,
            v.len()
        ));
    }
    None
}

/// The dead letter for an event this sink rejects.
pub(super) fn dead_letter(e: &ChangeEvent, reason: String) -> DeadLetter {
    let key = (!e.key.is_empty()).then(|| e.key.json_text());
    let raw = serde_json::to_vec(e).unwrap_or_default();
    DeadLetter::new(
        e.source.clone(),
        e.position.clone(),
        key,
        &raw,
        format!("pgvector sink rejected the event (the other sinks took it): {reason}"),
    )
}
