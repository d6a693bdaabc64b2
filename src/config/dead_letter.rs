//! `[dead_letter]`: the one place the run puts what it cannot process (undecodable messages,
//! events the model or a sink rejects): a JSONL `path` or a Kafka `topic` on the source's
//! cluster. Without it, the Bronze `_dlq` Delta table when `[sinks.delta]` is configured.
//! `sources.kafka.dead_letter` is the same setting in its older place.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// A dead-letter destination: exactly one of `topic` or `path`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// A Kafka topic on the Kafka source's cluster (same security properties).
    pub topic: Option<String>,
    /// A local JSONL file, appended to and fsynced before positions move past a dead letter.
    pub path: Option<PathBuf>,
}

impl DeadLetterConfig {
    /// `key`: where the section was given (`dead_letter` or `sources.kafka.dead_letter`).
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        match (&self.topic, &self.path) {
            (Some(t), None) if !t.trim().is_empty() => Ok(()),
            (None, Some(p)) if !p.as_os_str().is_empty() => Ok(()),
            _ => Err(ConfigError::invalid(
                key,
                "give exactly one of `topic` or `path`",
            )),
        }
    }
}
