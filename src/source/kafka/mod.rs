//! The Kafka source: a consumer group whose offsets move only when events are durable.
//!
//! Guarantees:
//! - **At-least-once into the pipeline, exactly-once with idempotent sinks.** Auto commit and the
//!   automatic offset store are off. An offset is committed to the group only after the pipeline
//!   acknowledged the event (and every event before it on that partition) as durable through
//!   [`KafkaAcker::ack`], or after its dead letter was durable. Commits run every
//!   `commit_interval_ms`, on revoke and on shutdown, so standard lag tooling sees progress.
//! - **Rebalances drain.** On revoke the consumer stops taking messages, waits (up to
//!   `drain_timeout_ms`, validated shorter than `session.timeout.ms`) for the pipeline to
//!   acknowledge the revoked partitions' in-flight events, commits them, then releases the
//!   partitions; the next owner resumes from that commit. Acknowledgements that arrive after the
//!   partition was released are ignored (the new owner re-delivers those messages).
//! - **Bad messages never stop the source.** A message that cannot be decoded ([`decode`]) is
//!   written to the dead-letter destination with its reason; the source continues.
//! - **Broker outages are survived.** librdkafka reconnects by itself with exponential backoff;
//!   the source logs each error it reports (and when messages flow again), never stops for a
//!   non-fatal one, and resumes from its position or, after a rebalance, the committed offsets.
//!
//! - **Order is kept.** Messages are copied out of librdkafka in chunks and decoded on
//!   `decode_tasks` tasks in parallel; one sequencing task takes the decoded chunks back in the
//!   order they were received, so events (and offsets) of a partition stay in offset order.
//!
//! The revoke drain blocks the polling task's thread (librdkafka runs the rebalance callback
//! inside `recv`), so the source must run on a multi-threaded Tokio runtime, as the pipeline does.

mod chunk;
mod connect;
pub mod consumer;
pub mod decode;
mod handle;
pub mod offsets;
mod rebalance;
mod row_json;
mod sequencer;
mod source;
mod worker;

pub use consumer::{KafkaAcker, KafkaSourceHandle, start, start_with, start_with_health};
pub use decode::{Decoded, KafkaEvent, KafkaMeta};
pub use source::KafkaSource;

use crate::event::{Position, StreamId};

/// The prefix of a Kafka stream's name: `kafka:{topic}`, one stream per partition.
const STREAM_PREFIX: &str = "kafka:";

/// The stream of one topic-partition.
pub fn stream(topic: &str, partition: i32) -> StreamId {
    StreamId::new(format!("{STREAM_PREFIX}{topic}"), Some(partition))
}

/// A message's position: its offset on its topic-partition's stream.
pub fn position(topic: &str, partition: i32, offset: i64) -> Position {
    Position::new(stream(topic, partition), offset, 0)
}

/// The (topic, partition, offset) of a Kafka position; `None` for other sources' positions.
pub fn offset_of(position: &Position) -> Option<(&str, i32, i64)> {
    let topic = position.stream.name().strip_prefix(STREAM_PREFIX)?;
    Some((topic, position.stream.partition()?, position.major))
}

use crate::error::{Classify, ErrorKind};
use crate::secret::{SecretMap, is_sensitive_key};

#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    #[error("Kafka source configuration: {0}")]
    Config(String),
    #[error("Kafka client: {0}")]
    Client(String),
    #[error("dead-letter destination: {0}")]
    DeadLetter(String),
    #[error("the pipeline stopped receiving Kafka events")]
    Closed,
}

impl KafkaSourceError {
    /// A client error with every secret property value scrubbed from its text (librdkafka quotes
    /// offending values in configuration errors).
    pub(crate) fn client(e: rdkafka::error::KafkaError, props: &SecretMap) -> Self {
        let mut text = e.to_string();
        for (k, v) in props.iter() {
            if is_sensitive_key(k) && !v.is_empty() {
                text = text.replace(v.as_str(), "***");
            }
        }
        match e {
            rdkafka::error::KafkaError::ClientCreation(_) => KafkaSourceError::Config(text),
            _ => KafkaSourceError::Client(text),
        }
    }
}

impl Classify for KafkaSourceError {
    fn kind(&self) -> ErrorKind {
        match self {
            KafkaSourceError::Config(_) => ErrorKind::Config,
            KafkaSourceError::Client(_) | KafkaSourceError::DeadLetter(_) => ErrorKind::Connection,
            KafkaSourceError::Closed => ErrorKind::Config,
        }
    }
}
