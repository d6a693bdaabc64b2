//! Dead letters: inputs Tributary could not turn into a row, kept with the reason, in one
//! destination for the whole run.
//!
//! Nothing is dropped: a message that cannot be decoded, an event the embedding model cannot
//! take, or an event a sink rejects becomes a [`DeadLetter`] (source, position, key, the raw
//! input, the reason) written to the one destination the run configures ([`DeadLetters`]): the
//! `[dead_letter]` section's JSONL `path` or Kafka `topic`, else the Bronze `_dlq` Delta table when
//! `[sinks.delta]` is configured. The pipeline owns it and hands a clone to each source; a write
//! returns only once the letters are durable, and the positions behind them are acknowledged
//! only after that.

mod writer;

pub use writer::DeadLetterWriter;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::Config;
use crate::error::{Classify, ErrorKind};
use crate::event::Position;
use crate::sink::delta::{DLQ_TABLE, DeltaSink};

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

/// A dead-letter write that failed, with the kind that decides retry or stop.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DeadLetterError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DeadLetterError {
    fn config(message: String) -> Self {
        DeadLetterError {
            kind: ErrorKind::Config,
            message,
        }
    }

    fn connection(message: String) -> Self {
        DeadLetterError {
            kind: ErrorKind::Connection,
            message,
        }
    }
}

impl Classify for DeadLetterError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

enum Destination {
    /// The Bronze `_dlq` table (its own writer beside the Bronze sink: another table, so the two
    /// never contend for a commit).
    Delta(Box<DeltaSink>),
    Writer(DeadLetterWriter),
    /// Nothing configured: the first dead letter stops the run (nothing is dropped).
    Nowhere,
    /// Kept in memory, for the pipeline's unit tests.
    #[cfg(test)]
    Memory(Arc<std::sync::Mutex<Vec<DeadLetter>>>),
}

/// The run's dead-letter destination; cheap to clone, shared by the pipeline and the sources.
#[derive(Clone)]
pub struct DeadLetters {
    destination: Arc<Mutex<Destination>>,
    describe: Arc<str>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DeadLetters").field(&self.describe).finish()
    }
}

impl DeadLetters {
    /// Opens the destination `config` names (see the module doc for which).
    pub fn open(config: &Config) -> Result<Self, DeadLetterError> {
        let (destination, describe) = match config.dead_letter_config() {
            Some((key, d)) => {
                let props = match (&d.topic, &config.sources.kafka) {
                    (None, _) => crate::secret::SecretMap::default(),
                    (Some(_), Some(k)) => k
                        .librdkafka_properties()
                        .map_err(|e| DeadLetterError::config(e.to_string()))?,
                    (Some(_), None) => {
                        return Err(DeadLetterError::config(format!(
                            "{key}.topic needs [sources.kafka] (the topic lives on its cluster)"
                        )));
                    }
                };
                let describe = match (&d.topic, &d.path) {
                    (Some(t), _) => format!("topic {t}"),
                    (None, Some(p)) => format!("file {}", p.display()),
                    (None, None) => String::new(),
                };
                (
                    Destination::Writer(DeadLetterWriter::open(d, &props)?),
                    describe,
                )
            }
            None => match &config.sinks.delta {
                Some(d) => {
                    let sink = DeltaSink::new(&config.name, d)
                        .map_err(|e| DeadLetterError::config(e.to_string()))?;
                    let describe = format!("Delta table {}", sink.table_uri(DLQ_TABLE));
                    (Destination::Delta(Box::new(sink)), describe)
                }
                None => (Destination::Nowhere, "nowhere".to_owned()),
            },
        };
        if matches!(destination, Destination::Nowhere) && config.sources.kafka.is_some() {
            // Undecodable messages are common on a topic: refuse to start without a place.
            return Err(DeadLetterError::config(
                "dead_letter: set `path` or `topic` (where undecodable Kafka messages go), or \
                 configure [sinks.delta], whose _dlq table is then the default"
                    .into(),
            ));
        }
        if matches!(destination, Destination::Nowhere) {
            tracing::warn!(
                "no dead-letter destination: set [dead_letter] path or topic, or configure \
                 [sinks.delta] (its _dlq table); a rejected event will stop the run"
            );
        }
        Ok(DeadLetters {
            destination: Arc::new(Mutex::new(destination)),
            describe: describe.into(),
        })
    }

    /// A JSONL file or topic writer as the destination (the Kafka source started on its own,
    /// outside a pipeline, with its section's `dead_letter`).
    pub fn from_writer(writer: DeadLetterWriter, describe: impl Into<String>) -> Self {
        let describe: String = describe.into();
        DeadLetters {
            destination: Arc::new(Mutex::new(Destination::Writer(writer))),
            describe: describe.into(),
        }
    }

    /// No destination: the first dead letter fails (a source used on its own, outside a run).
    pub fn nowhere() -> Self {
        DeadLetters {
            destination: Arc::new(Mutex::new(Destination::Nowhere)),
            describe: "nowhere".into(),
        }
    }

    /// A destination in memory, for the pipeline's unit tests: the letters land in the vector.
    #[cfg(test)]
    pub fn memory() -> (Self, Arc<std::sync::Mutex<Vec<DeadLetter>>>) {
        let letters = Arc::default();
        let this = DeadLetters {
            destination: Arc::new(Mutex::new(Destination::Memory(Arc::clone(&letters)))),
            describe: "memory".into(),
        };
        (this, letters)
    }

    /// Where the letters go, for logs (no secrets: a path, a topic or a table URI).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Writes `letters`; returns once every one is durable.
    pub async fn write(&self, letters: &[DeadLetter]) -> Result<(), DeadLetterError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut destination = self.destination.lock().await;
        match &mut *destination {
            Destination::Delta(sink) => {
                sink.write_dead_letters(letters)
                    .await
                    .map_err(|e| DeadLetterError {
                        kind: e.kind(),
                        message: e.to_string(),
                    })?;
            }
            Destination::Writer(w) => {
                for letter in letters {
                    w.write(letter).await?;
                }
            }
            #[cfg(test)]
            Destination::Memory(kept) => {
                kept.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(letters);
            }
            Destination::Nowhere => {
                return Err(DeadLetterError::config(format!(
                    "{} events were rejected and there is nowhere to put them (first: {} at \
                     {}: {}): set [dead_letter] path or topic, or configure [sinks.delta]",
                    letters.len(),
                    letters[0].source,
                    letters[0].position,
                    letters[0].error
                )));
            }
        }
        metrics::counter!("tributary_dead_letters_written_total").increment(letters.len() as u64);
        Ok(())
    }
}
