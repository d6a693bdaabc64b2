//! Writing dead letters of the Kafka source durably.
//!
//! [`DeadLetterWriter::write`] returns only once the dead letter is durable (the JSONL file
//! fsynced, or the Kafka dead-letter topic's delivery acknowledged with `acks=all`), so the consumer
//! may then treat the message's offset as done. Failures are retried with exponential backoff;
//! if they persist the source stops rather than commit past a message it could not keep.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::KafkaSourceError;
use crate::config::KafkaDeadLetterConfig;
use crate::dead_letter::DeadLetter;
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
    pub async fn open(
        config: &KafkaDeadLetterConfig,
        props: &SecretMap,
    ) -> Result<Self, KafkaSourceError> {
        if let Some(path) = &config.path {
            return Self::open_file(path);
        }
        let topic = config.topic.clone().ok_or_else(|| {
            KafkaSourceError::Config("sources.kafka.dead_letter: give `topic` or `path`".into())
        })?;
        let mut cc = ClientConfig::new();
        for (k, v) in props.iter() {
            if !CONSUMER_ONLY.contains(&k.as_str()) {
                cc.set(k, v);
            }
        }
        cc.set("acks", "all");
        cc.set("message.timeout.ms", "30000");
        let producer = cc
            .create()
            .map_err(|e| KafkaSourceError::client(e, props))?;
        Ok(DeadLetterWriter::Kafka { topic, producer })
    }

    fn open_file(path: &Path) -> Result<Self, KafkaSourceError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| KafkaSourceError::DeadLetter(format!("{}: {e}", path.display())))?;
        Ok(DeadLetterWriter::Jsonl {
            path: path.to_owned(),
            file: Arc::new(file),
        })
    }

    /// Writes one dead letter; returns once it is durable.
    pub async fn write(&mut self, letter: &DeadLetter) -> Result<(), KafkaSourceError> {
        let line = serde_json::to_string(letter)
            .map_err(|e| KafkaSourceError::DeadLetter(format!("cannot serialise: {e}")))?;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(8);
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
                    .map_err(|e| KafkaSourceError::DeadLetter(format!("{}: {e}", path.display())))
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
                    .map_err(|e| KafkaSourceError::DeadLetter(format!("topic {topic}: {e}")))
            }
        }
    }
}
