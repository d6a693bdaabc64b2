//! Dead letters to a JSONL file or a Kafka topic.
//!
//! [`DeadLetterWriter::write`] returns only once the dead letter is durable (the JSONL file
//! fsynced, or the dead-letter topic's delivery acknowledged with `acks=all`), so the position
//! behind it may then be acknowledged. Failures are retried with the bounded patience of
//! [`crate::retry`]; if they persist the run stops rather than move past a letter it could not
//! keep.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{DeadLetter, DeadLetterError};
use crate::config::DeadLetterConfig;
use crate::error::ErrorKind;
use crate::retry::{Patience, backoff};
use crate::secret::SecretMap;

/// Consumer-only librdkafka properties that must not reach the dead-letter producer.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "auto.commit.interval.ms",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "fetch.min.bytes",
    "fetch.wait.max.ms",
    "fetch.max.bytes",
    "max.partition.fetch.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
];

pub enum DeadLetterWriter {
    Jsonl {
        path: PathBuf,
        file: Arc<std::fs::File>,
    },
    Kafka {
        topic: String,
        producer: FutureProducer,
    },
}

impl DeadLetterWriter {
    /// Opens the configured destination; `props` are the source's librdkafka properties (the
    /// dead-letter topic lives on the same cluster, with the same security settings).
    pub fn open(config: &DeadLetterConfig, props: &SecretMap) -> Result<Self, DeadLetterError> {
        if let Some(path) = &config.path {
            return Self::open_file(path);
        }
        let topic = config
            .topic
            .clone()
            .ok_or_else(|| DeadLetterError::config("dead_letter: give `topic` or `path`".into()))?;
        let mut cc = ClientConfig::new();
        for (k, v) in props.iter() {
            if !CONSUMER_ONLY.contains(&k.as_str()) {
                cc.set(k, v);
            }
        }
        cc.set("acks", "all");
        cc.set("message.timeout.ms", "30000");
        let producer = cc.create().map_err(|e| {
            // librdkafka quotes offending values in configuration errors.
            let text = crate::source::kafka::redactor(props)
                .redact(&e.to_string())
                .into_owned();
            DeadLetterError::config(format!("dead_letter.topic {topic}: {text}"))
        })?;
        Ok(DeadLetterWriter::Kafka { topic, producer })
    }

    fn open_file(path: &Path) -> Result<Self, DeadLetterError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| DeadLetterError::config(format!("{}: {e}", path.display())))?;
        Ok(DeadLetterWriter::Jsonl {
            path: path.to_owned(),
            file: Arc::new(file),
        })
    }

    /// Writes one dead letter; returns once it is durable.
    pub async fn write(&mut self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let line = serde_json::to_string(letter).map_err(|e| DeadLetterError {
            kind: ErrorKind::Data,
            message: format!("dead letter: cannot serialise: {e}"),
        })?;
        let backoff = backoff(Patience::Bounded);
        match self {
            DeadLetterWriter::Jsonl { path, file } => {
                let mut bytes = line.into_bytes();
                bytes.push(b'\n');
                let bytes = Arc::new(bytes);
                let write = || {
                    let (file, bytes) = (Arc::clone(file), Arc::clone(&bytes));
                    async move {
                        tokio::task::spawn_blocking(move || {
                            (&*file).write_all(&bytes)?;
                            file.sync_data()
                        })
                        .await
                        .map_err(std::io::Error::other)?
                    }
                };
                write
                    .retry(backoff)
                    .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "dead-letter file write failed"))
                    .await
                    .map_err(|e| DeadLetterError::connection(format!("{}: {e}", path.display())))
            }
            DeadLetterWriter::Kafka { topic, producer } => {
                let key = letter.key.clone().unwrap_or_default();
                let send = || async {
                    producer
                        .send(
                            FutureRecord::to(topic).key(&key).payload(&line),
                            Duration::from_secs(30),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|(e, _)| e)
                };
                send.retry(backoff)
                    .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "dead-letter topic write failed"))
                    .await
                    .map_err(|e| DeadLetterError::connection(format!("topic {topic}: {e}")))
            }
        }
    }
}
