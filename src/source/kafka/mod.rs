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
//!   A login the broker rejects is not an outage: the source stops with an error naming the
//!   brokers, the SASL mechanism and the user ([`login`]), since retrying cannot fix it.
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
mod envelope;
mod handle;
pub mod login;
pub mod offsets;
mod rebalance;
pub mod registry;
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
use crate::secret::{Redactor, SecretMap};

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
    /// A client error with every secret of the properties scrubbed from its text (`redactor`
    /// from [`redactor`]): librdkafka quotes offending values in configuration errors. A
    /// property librdkafka rejects is a configuration error, not a connection one.
    pub(crate) fn client(e: rdkafka::error::KafkaError, redactor: &Redactor) -> Self {
        let text = redactor.redact(&e.to_string()).into_owned();
        match e {
            rdkafka::error::KafkaError::ClientCreation(_)
            | rdkafka::error::KafkaError::ClientConfig(..) => KafkaSourceError::Config(text),
            _ => KafkaSourceError::Client(text),
        }
    }
}

/// What to scrub from text that may quote these librdkafka properties: the values of secret
/// keys, and of every property librdkafka rejects on its own (an unknown key such as a
/// misspelled `sasl.passwrod` or a Java-only `sasl.jaas.config`, or a value it refuses): its
/// error quotes them.
pub fn redactor(props: &SecretMap) -> Redactor {
    let mut r = Redactor::new();
    for (key, value) in props.iter() {
        // Setting `plugin.library.paths` loads the plugins: not done once more just to check.
        let rejected = key != "plugin.library.paths"
            && rdkafka::ClientConfig::new()
                .set(key, value)
                .create_native_config()
                .is_err();
        r.add_property(key, value, rejected);
    }
    r
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_librdkafka_rejects_are_redacted_with_the_secret_ones() {
        let props = SecretMap(
            [
                ("bootstrap.servers", "127.0.0.1:9092"),
                ("session.timeout.ms", "6000"),
                ("sasl.username", "alice"),
                ("sasl.password", "known-secret"),
                ("sasl.passwrod", "typo-secret"),
                ("security.protocol", "bogus-protocol"),
                (
                    "sasl.jaas.config",
                    "x.PlainLoginModule required username='KEY' password='jaas-secret';",
                ),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
        );
        let r = redactor(&props);
        let text = "127.0.0.1:9092 6000 alice known-secret typo-secret bogus-protocol jaas-secret";
        assert_eq!(r.redact(text), "127.0.0.1:9092 6000 alice *** *** *** ***");
        let e = rdkafka::ClientConfig::new()
            .set("sasl.passwrod", "typo-secret")
            .create::<rdkafka::consumer::BaseConsumer>()
            .err()
            .map(|e| KafkaSourceError::client(e, &r));
        match e {
            Some(KafkaSourceError::Config(text)) => {
                assert!(text.contains("sasl.passwrod"), "{text}");
                assert!(!text.contains("typo-secret"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }
}
