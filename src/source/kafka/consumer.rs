//! Starting the Kafka source: the consumer, its decode and sequencing tasks and its receive loop,
//! wired together. The module doc of [`super`] states the guarantees; those of each part are in
//! its own module: `handle`, `worker` (the receive loop), `chunk`, `sequencer` (decoding, in
//! receive order) and `rebalance` (commits and the drain on revoke).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::{mpsc, watch};

pub use super::chunk::MAX_BATCH;
pub use super::handle::{KafkaAcker, KafkaSourceHandle};

use super::KafkaSourceError;
use super::chunk::Chunk;
use super::decode::{Decoder, KafkaEvent};
use super::handle::Shared;
use super::offsets::OffsetTracker;
use super::rebalance::SourceContext;
use super::sequencer::{self, TopicState};
use super::worker::Worker;
use crate::config::KafkaSourceConfig as KafkaConfig;
use crate::dead_letter::{DeadLetterWriter, DeadLetters};
use crate::telemetry::health::SourceHealth;

/// Starts the consumer group on the configured topics. Events arrive on the returned receiver in
/// batches (in partition order, up to 512 per batch; at most `capacity` batches queued: a slow
/// pipeline slows the consumer).
pub async fn start(
    config: &KafkaConfig,
    capacity: usize,
) -> Result<(mpsc::Receiver<Vec<KafkaEvent>>, KafkaSourceHandle), KafkaSourceError> {
    start_with_health(config, capacity, None).await
}

/// [`start`], reporting liveness to `health`: every message received, and every commit tick
/// while the consumer has no errors (an idle topic is alive; a broker out of reach is not).
/// Undecodable messages go to the section's own `dead_letter` destination (a Kafka source
/// started outside a pipeline, as in tests and benchmarks).
pub async fn start_with_health(
    config: &KafkaConfig,
    capacity: usize,
    health: Option<SourceHealth>,
) -> Result<(mpsc::Receiver<Vec<KafkaEvent>>, KafkaSourceHandle), KafkaSourceError> {
    let props = config
        .librdkafka_properties()
        .map_err(|e| KafkaSourceError::Config(e.to_string()))?;
    let dlq_config = config.dead_letter.as_ref().ok_or_else(|| {
        KafkaSourceError::Config(
            "sources.kafka.dead_letter: set `topic` or `path` (where undecodable messages go)"
                .into(),
        )
    })?;
    let writer = DeadLetterWriter::open(dlq_config, &props)
        .map_err(|e| KafkaSourceError::DeadLetter(e.to_string()))?;
    start_with(
        config,
        capacity,
        health,
        DeadLetters::from_writer(writer, "sources.kafka.dead_letter"),
    )
    .await
}

/// [`start_with_health`], writing undecodable messages to the run's `dead_letters`.
pub async fn start_with(
    config: &KafkaConfig,
    capacity: usize,
    health: Option<SourceHealth>,
    dead_letters: DeadLetters,
) -> Result<(mpsc::Receiver<Vec<KafkaEvent>>, KafkaSourceHandle), KafkaSourceError> {
    let props = config
        .librdkafka_properties()
        .map_err(|e| KafkaSourceError::Config(e.to_string()))?;
    let shared = Arc::new(Shared {
        tracker: Mutex::new(OffsetTracker::default()),
        acked: Condvar::new(),
        drain_timeout: Duration::from_millis(config.drain_timeout_ms),
    });
    let mut cc = ClientConfig::new();
    // librdkafka pauses fetching for `fetch.queue.backoff.ms` (1 s) whenever its prefetch queue
    // is full; a consumer that decodes slower than the fetcher then idles for most of each
    // second (measured: 120k msg/s instead of the decoder's rate). The user may still override.
    cc.set("fetch.queue.backoff.ms", "10");
    // Statistics feed the per-partition lag gauges (see `SourceContext::stats`).
    cc.set("statistics.interval.ms", "5000");
    for (k, v) in props.iter() {
        cc.set(k, v);
    }
    let redactor = super::redactor(&props);
    let consumer: StreamConsumer<SourceContext> = cc
        .create_with_context(SourceContext {
            shared: Arc::clone(&shared),
            failure: Default::default(),
        })
        .map_err(|e| KafkaSourceError::client(e, &redactor))?;
    let topics: Vec<&str> = config.topics.iter().map(|t| t.name.as_str()).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| KafkaSourceError::client(e, &redactor))?;
    tracing::info!(group = %config.group_id, topics = ?topics, "Kafka source subscribed");

    let registry = config
        .registry()
        .map_err(|e| KafkaSourceError::Config(e.to_string()))?
        .map(|settings| super::registry::Registry::new(&settings, health.clone()).map(Arc::new))
        .transpose()
        .map_err(KafkaSourceError::Config)?;
    // Messages name their topic by its index in this list from here on.
    let decoders: Vec<TopicState> = config
        .topics
        .iter()
        .map(|t| {
            let labels = [("source", t.name.clone())];
            TopicState {
                name: t.name.clone(),
                decoder: Decoder::new(t, config.max_message_bytes).with_registry(registry.clone()),
                events: metrics::counter!("tributary_source_events_total", &labels),
            }
        })
        .collect();
    let decoders = Arc::new(decoders);
    let names = config.topics.iter().map(|t| t.name.clone()).collect();
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let (stop, stopped) = watch::channel(false);
    let (chunk_senders, decode_task) = sequencer::spawn(
        config.decode_tasks(),
        Arc::clone(&shared),
        decoders,
        dead_letters,
        tx,
        stopped.clone(),
    );
    let worker = Worker {
        consumer: Arc::new(consumer),
        shared: Arc::clone(&shared),
        topics: names,
        last_topic: 0,
        chunks: chunk_senders,
        next_decoder: 0,
        decode_task: Some(decode_task),
        chunk: Chunk::with_capacity(0),
        redactor,
        props,
        commit_interval: Duration::from_millis(config.commit_interval_ms),
        health,
    };
    let task = tokio::spawn(worker.run(stopped));
    Ok((rx, KafkaSourceHandle::new(shared, stop, task)))
}
