//! The consumer loop, its rebalance callbacks and offset commits (see the module doc of
//! [`super`] for the guarantees).

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::telemetry::health::SourceHealth;
use futures::FutureExt as _;
use metrics::Counter;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::KafkaSourceError;
use super::dead_letters::DeadLetterWriter;
use super::decode::{DecodeError, Decoded, Decoder, KafkaEvent, RawMessage};
use super::offsets::{OffsetTracker, Tp};
use crate::config::KafkaSourceConfig as KafkaConfig;
use crate::dead_letter::DeadLetter;
use crate::event::Position;
use crate::secret::SecretMap;

struct Shared {
    tracker: Mutex<OffsetTracker>,
    /// Signalled on every acknowledgement, so a draining revoke wakes up.
    acked: Condvar,
    drain_timeout: Duration,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        // A panic while holding the lock leaves plain offsets behind: still usable.
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Acknowledges durable events to the source; cheap to clone, usable from any task or thread.
#[derive(Clone)]
pub struct KafkaAcker {
    shared: Arc<Shared>,
}

impl KafkaAcker {
    /// Everything up to and including `position` on its partition is durable in every sink.
    /// Positions of other sources are ignored.
    pub fn ack(&self, position: &Position) {
        if let Position::Kafka {
            topic,
            partition,
            offset,
        } = position
        {
            self.shared.tracker().ack(topic, *partition, *offset);
            self.shared.acked.notify_all();
        }
    }
}

/// The running source: acknowledge through [`KafkaSourceHandle::acker`], stop with
/// [`KafkaSourceHandle::shutdown`].
pub struct KafkaSourceHandle {
    acker: KafkaAcker,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), KafkaSourceError>>,
}

impl KafkaSourceHandle {
    pub fn acker(&self) -> KafkaAcker {
        self.acker.clone()
    }

    /// The partitions this instance currently owns, sorted.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.acker.shared.tracker().assigned()
    }

    /// Stops taking messages, waits up to the drain timeout for in-flight events to be
    /// acknowledged, commits, and leaves the group.
    pub async fn shutdown(self) -> Result<(), KafkaSourceError> {
        // The task may already have ended (its result says why).
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| KafkaSourceError::Client(format!("consumer task failed: {e}")))?
    }

    /// Whether the consumer task has ended (after an error, or because the events receiver
    /// was dropped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

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
    let dead_letters = DeadLetterWriter::open(dlq_config, &props).await?;
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
    let consumer: StreamConsumer<SourceContext> = cc
        .create_with_context(SourceContext {
            shared: Arc::clone(&shared),
        })
        .map_err(|e| KafkaSourceError::client(e, &props))?;
    let topics: Vec<&str> = config.topics.iter().map(|t| t.name.as_str()).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| KafkaSourceError::client(e, &props))?;
    tracing::info!(group = %config.group_id, topics = ?topics, "Kafka source subscribed");

    // Messages name their topic by its index in this list from here on.
    let decoders: Vec<TopicState> = config
        .topics
        .iter()
        .map(|t| {
            let labels = [("source", t.name.clone())];
            TopicState {
                name: t.name.clone(),
                decoder: Decoder::new(t, config.max_message_bytes),
                events: metrics::counter!("tributary_source_events_total", &labels),
            }
        })
        .collect();
    let decoders = Arc::new(decoders);
    let names = config.topics.iter().map(|t| t.name.clone()).collect();
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let (stop, stopped) = watch::channel(false);
    // Decoding runs apart from receiving (which, with librdkafka's threads, keeps a core busy
    // on its own): chunks of raw messages go round-robin to `decode_tasks` tasks that decode
    // them in parallel, and the sequencing task takes the decoded chunks back in the same order
    // (so partition order holds) to record offsets, write dead letters and hand events over.
    let mut chunk_senders = Vec::new();
    let mut decoded_receivers = Vec::new();
    for _ in 0..config.decode_tasks() {
        let (chunks_tx, chunks_rx) = mpsc::channel::<Chunk>(1);
        let (decoded_tx, decoded_rx) = mpsc::channel::<DecodedChunk>(1);
        tokio::spawn(decode_chunks(Arc::clone(&decoders), chunks_rx, decoded_tx));
        chunk_senders.push(chunks_tx);
        decoded_receivers.push(decoded_rx);
    }
    let decoding = Decoding {
        shared: Arc::clone(&shared),
        topics: decoders,
        dead_letters,
        tx,
    };
    let decode_task = tokio::spawn(decoding.run(decoded_receivers, stopped.clone()));
    let worker = Worker {
        consumer: Arc::new(consumer),
        shared: Arc::clone(&shared),
        topics: names,
        last_topic: 0,
        chunks: chunk_senders,
        next_decoder: 0,
        decode_task: Some(decode_task),
        chunk: Chunk::with_capacity(0),
        props,
        commit_interval: Duration::from_millis(config.commit_interval_ms),
        health,
    };
    let task = tokio::spawn(worker.run(stopped));
    Ok((
        rx,
        KafkaSourceHandle {
            acker: KafkaAcker { shared },
            stop,
            task,
        },
    ))
}

struct TopicState {
    name: String,
    decoder: Decoder,
    events: Counter,
}

/// Messages copied out of librdkafka's buffers, on their way to the decode task. Their keys and
/// payloads share one buffer: one allocation per chunk instead of two per message (and fewer
/// frees on the decode task's core of memory allocated on this one).
struct Chunk {
    bytes: Vec<u8>,
    messages: Vec<Copied>,
}

/// A message of a [`Chunk`].
struct Copied {
    /// Index of the topic in the subscribed topics.
    topic: usize,
    partition: i32,
    offset: i64,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    timestamp_ms: Option<i64>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Chunk {
    fn with_capacity(bytes: usize) -> Self {
        Chunk {
            bytes: Vec::with_capacity(bytes),
            messages: Vec::with_capacity(MAX_BATCH),
        }
    }

    fn push(&mut self, topic: usize, m: &BorrowedMessage<'_>) {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let key = m.key().map(|k| self.copy(k));
        let payload = m.payload().map(|p| self.copy(p));
        self.messages.push(Copied {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            key,
            payload,
            timestamp_ms: m.timestamp().to_millis(),
            headers,
        });
    }

    fn copy(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    fn key(&self, m: &Copied) -> Option<&[u8]> {
        m.key.clone().map(|r| &self.bytes[r])
    }

    fn payload(&self, m: &Copied) -> Option<&[u8]> {
        m.payload.clone().map(|r| &self.bytes[r])
    }
}

/// Receives messages, hands them to the decode task in chunks, commits offsets.
struct Worker {
    consumer: Arc<StreamConsumer<SourceContext>>,
    shared: Arc<Shared>,
    /// The subscribed topics (a message of another topic is ignored).
    topics: Vec<String>,
    /// Index of the topic of the last message (usually the next one's too).
    last_topic: usize,
    /// One sender per decode task, used in turn (empty once the decoding has ended).
    chunks: Vec<mpsc::Sender<Chunk>>,
    next_decoder: usize,
    /// The sequencing task (its result says why decoding ended).
    decode_task: Option<JoinHandle<Result<(), KafkaSourceError>>>,
    chunk: Chunk,
    props: SecretMap,
    commit_interval: Duration,
    health: Option<SourceHealth>,
}

/// Messages handed over per chunk and events per channel message: one wake-up of the next task
/// per batch, not per event (waking a parked task costs more than decoding a message).
pub const MAX_BATCH: usize = 512;

impl Worker {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) -> Result<(), KafkaSourceError> {
        let mut tick = tokio::time::interval(self.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures: u32 = 0;
        let consumer = Arc::clone(&self.consumer);
        let mut last_commit = Instant::now();
        let result = loop {
            // Fast path while messages are queued: no timer or stop-signal registration per
            // message (they cost more than the message itself); `recv` is cancellation safe.
            let ready = if *stopped.borrow() {
                break Ok(());
            } else if self.chunk.messages.len() >= MAX_BATCH {
                None
            } else {
                consumer.recv().now_or_never()
            };
            if ready.is_none() && !self.chunk.messages.is_empty() {
                // Nothing more is queued right now (or the chunk is full): hand it over.
                // Liveness and the commit clock are looked at per chunk, not per message.
                if let Some(h) = &self.health {
                    h.progress();
                }
                if last_commit.elapsed() >= self.commit_interval {
                    commit(&*consumer, &self.shared, None, CommitMode::Async);
                    last_commit = Instant::now();
                }
                match self.flush(&mut stopped).await {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
            let received = match ready {
                Some(m) => m,
                None => tokio::select! {
                    biased;
                    _ = stopped.changed() => break Ok(()),
                    _ = tick.tick() => {
                        if failures == 0
                            && let Some(h) = &self.health
                        {
                            h.progress();
                        }
                        commit(&*consumer, &self.shared, None, CommitMode::Async);
                        last_commit = Instant::now();
                        continue;
                    }
                    m = consumer.recv() => m,
                },
            };
            match received {
                Ok(message) => {
                    if failures > 0 {
                        tracing::info!("Kafka consumer receiving again");
                        failures = 0;
                    }
                    self.take(&message);
                }
                Err(e) => {
                    if let Some((_, reason)) = consumer.client().fatal_error() {
                        break Err(KafkaSourceError::Client(format!("fatal: {reason}")));
                    }
                    // librdkafka reconnects by itself with exponential backoff
                    // (`reconnect.backoff.ms` → `reconnect.backoff.max.ms`) and reports each
                    // failure once: sleeping here would only add a delay per queued error
                    // after the broker is back (measured: tens of seconds).
                    failures = failures.saturating_add(1);
                    let error = KafkaSourceError::client(e, &self.props);
                    tracing::warn!(%error, failures, "Kafka consumer error; librdkafka retries");
                }
            }
        };
        // Messages never handed to the decode task were never consumed: they are re-delivered
        // later. The decode task finishes what it holds (or stops on the signal) and ends.
        self.chunk.messages.clear();
        self.chunks.clear();
        let decoded = match self.decode_task.take() {
            Some(task) => task
                .await
                .map_err(|e| KafkaSourceError::Client(format!("decode task failed: {e}")))
                .and_then(|r| r),
            None => Ok(()),
        };
        // Shutdown (or failure): give in-flight events their chance, commit, leave the group.
        drain_and_commit(&*consumer, &self.shared, None);
        consumer.unsubscribe();
        result.and(decoded)
    }

    /// Copies a message into the current chunk.
    fn take(&mut self, m: &BorrowedMessage<'_>) {
        let name = m.topic();
        let topic = if self.topics.get(self.last_topic).is_some_and(|t| t == name) {
            self.last_topic
        } else {
            match self.topics.iter().position(|t| t == name) {
                Some(i) => i,
                None => return,
            }
        };
        self.last_topic = topic;
        self.chunk.push(topic, m);
    }

    /// Hands the current chunk to the decode task; `false` when asked to stop meanwhile (the
    /// chunk's messages were never consumed, so they are re-delivered after a restart).
    async fn flush(
        &mut self,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<bool, KafkaSourceError> {
        // The next chunk's buffer is sized like this one's.
        let next = Chunk::with_capacity(self.chunk.bytes.len());
        let chunk = std::mem::replace(&mut self.chunk, next);
        let Some(chunks) = self.chunks.get(self.next_decoder) else {
            return Ok(false);
        };
        tokio::select! {
            sent = chunks.send(chunk) => match sent {
                Ok(()) => {
                    self.next_decoder = (self.next_decoder + 1) % self.chunks.len();
                    Ok(true)
                }
                // Decoding ended: the sequencing task's result says why.
                Err(_) => {
                    self.chunks.clear();
                    match self.decode_task.take() {
                        Some(task) => match task.await {
                            Ok(Ok(())) => Err(KafkaSourceError::Closed),
                            Ok(Err(e)) => Err(e),
                            Err(e) => Err(KafkaSourceError::Client(format!("decode task failed: {e}"))),
                        },
                        None => Err(KafkaSourceError::Closed),
                    }
                }
            },
            _ = stopped.changed() => Ok(false),
        }
    }
}

/// A chunk and what each of its messages decoded to.
type DecodedChunk = (Chunk, Vec<Result<Decoded, DecodeError>>);

/// One decode task: decodes the chunks it is given, in the order given.
async fn decode_chunks(
    topics: Arc<Vec<TopicState>>,
    mut chunks: mpsc::Receiver<Chunk>,
    decoded: mpsc::Sender<DecodedChunk>,
) {
    while let Some(chunk) = chunks.recv().await {
        let results = chunk
            .messages
            .iter()
            .map(|m| {
                let state = &topics[m.topic];
                state.decoder.decode(&RawMessage {
                    topic: &state.name,
                    partition: m.partition,
                    offset: m.offset,
                    key: chunk.key(m),
                    payload: chunk.payload(m),
                    timestamp_ms: m.timestamp_ms,
                    headers: m.headers.clone(),
                })
            })
            .collect();
        if decoded.send((chunk, results)).await.is_err() {
            // The sequencing task ended (shutdown or failure): nothing more to do.
            return;
        }
    }
}

/// Takes decoded chunks back in the order they were received, records their offsets, writes
/// dead letters and hands the events over.
struct Decoding {
    shared: Arc<Shared>,
    topics: Arc<Vec<TopicState>>,
    dead_letters: DeadLetterWriter,
    tx: mpsc::Sender<Vec<KafkaEvent>>,
}

impl Decoding {
    async fn run(
        mut self,
        mut decoded_chunks: Vec<mpsc::Receiver<DecodedChunk>>,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<(), KafkaSourceError> {
        // The decode tasks were given chunks in turn: taking them back in the same turn keeps
        // the order they were received in.
        let mut next = 0;
        loop {
            let Some((chunk, decoded)) = decoded_chunks[next].recv().await else {
                // The receiver stopped handing chunks out, so every chunk before was taken.
                break;
            };
            next = (next + 1) % decoded_chunks.len();
            let mut batch = Vec::with_capacity(chunk.messages.len());
            if decoded.iter().all(Result::is_ok) {
                // The common case: one lock of the offset tracker for the whole chunk.
                let mut tracker = self.shared.tracker();
                for (m, d) in chunk.messages.iter().zip(decoded) {
                    let state = &self.topics[m.topic];
                    let (topic, partition, offset) = (state.name.as_str(), m.partition, m.offset);
                    match d {
                        Ok(Decoded::Event(event)) => {
                            if tracker.consumed(topic, partition, offset, true) {
                                state.events.increment(1);
                                batch.push(event);
                            }
                        }
                        Ok(Decoded::Tombstone) => {
                            tracker.consumed(topic, partition, offset, false);
                        }
                        Err(_) => {}
                    }
                }
            } else {
                // A dead letter must be durable before its offset may be committed: one by one.
                for (m, d) in chunk.messages.iter().zip(decoded) {
                    self.handle(&chunk, m, d, &mut batch).await?;
                }
            }
            if batch.is_empty() {
                continue;
            }
            let firsts = first_offsets(&batch);
            tokio::select! {
                sent = self.tx.send(batch) => {
                    sent.map_err(|_| KafkaSourceError::Closed)?;
                }
                _ = stopped.changed() => {
                    // The batch was moved into the cancelled send: take its offsets back, so
                    // they are neither waited for nor committed (re-delivered later).
                    let mut tracker = self.shared.tracker();
                    for (topic, partition, offset) in &firsts {
                        tracker.unconsume_from(topic, *partition, *offset);
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Puts one decoded message into `batch`, or dead-letters it.
    async fn handle(
        &mut self,
        chunk: &Chunk,
        m: &Copied,
        decoded: Result<Decoded, DecodeError>,
        batch: &mut Vec<KafkaEvent>,
    ) -> Result<(), KafkaSourceError> {
        let state = &self.topics[m.topic];
        let (topic, partition, offset) = (state.name.as_str(), m.partition, m.offset);
        match decoded {
            Ok(Decoded::Event(event)) => {
                if !self
                    .shared
                    .tracker()
                    .consumed(topic, partition, offset, true)
                {
                    return Ok(());
                }
                state.events.increment(1);
                batch.push(event);
                Ok(())
            }
            Ok(Decoded::Tombstone) => {
                self.shared
                    .tracker()
                    .consumed(topic, partition, offset, false);
                Ok(())
            }
            Err(error) => {
                if !self.shared.tracker().is_assigned(topic, partition) {
                    return Ok(());
                }
                let letter = DeadLetter::new(
                    topic,
                    Position::Kafka {
                        topic: topic.to_owned(),
                        partition,
                        offset,
                    },
                    chunk
                        .key(m)
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    chunk.payload(m).unwrap_or_default(),
                    error.to_string(),
                );
                tracing::warn!(%topic, partition, offset, %error, "message dead-lettered");
                self.dead_letters.write(&letter).await?;
                metrics::counter!(
                    "tributary_dead_letters_total",
                    "source" => topic.to_owned(),
                    "reason" => error.reason()
                )
                .increment(1);
                self.shared
                    .tracker()
                    .consumed(topic, partition, offset, false);
                Ok(())
            }
        }
    }
}

/// The first offset of each partition in a batch.
fn first_offsets(batch: &[KafkaEvent]) -> Vec<(String, i32, i64)> {
    let mut firsts: Vec<(String, i32, i64)> = Vec::new();
    for e in batch {
        if let Position::Kafka {
            topic,
            partition,
            offset,
        } = &e.event.position
            && !firsts.iter().any(|f| f.1 == *partition && f.0 == *topic)
        {
            firsts.push((topic.clone(), *partition, *offset));
        }
    }
    firsts
}

/// Commits the tracker's committable offsets (of `only`, or of every assigned partition).
fn commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    shared: &Shared,
    only: Option<&[Tp]>,
    mode: CommitMode,
) {
    let commits = shared.tracker().take_commits(only);
    if commits.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in &commits {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::warn!(error = %e, "cannot build the offset commit");
            shared.tracker().commit_failed(&commits);
            return;
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => tracing::debug!(?commits, "offsets committed"),
        Err(e) => {
            tracing::warn!(error = %e, "offset commit failed; will retry");
            shared.tracker().commit_failed(&commits);
        }
    }
}

/// Waits (bounded by the drain timeout) until the pipeline acknowledged every in-flight event of
/// `only` (or of all partitions), then commits synchronously.
fn drain_and_commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    shared: &Shared,
    only: Option<&[Tp]>,
) {
    let deadline = Instant::now() + shared.drain_timeout;
    let mut tracker = shared.tracker();
    loop {
        let in_flight = match only {
            Some(tps) => tracker.in_flight(tps),
            None => tracker.in_flight_all(),
        };
        let now = Instant::now();
        if in_flight == 0 {
            break;
        }
        if now >= deadline {
            tracing::warn!(
                in_flight,
                "drain timeout: releasing partitions with unacknowledged events (they will be \
                 re-delivered to the next owner)"
            );
            break;
        }
        tracker = shared
            .acked
            .wait_timeout(tracker, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    drop(tracker);
    commit(consumer, shared, only, CommitMode::Sync);
}

struct SourceContext {
    shared: Arc<Shared>,
}

impl ClientContext for SourceContext {
    /// librdkafka's statistics (every `statistics.interval.ms`, 5 s unless configured): per
    /// partition, the group's committed offset, the broker's high watermark and their difference.
    /// The lag is only as right as the broker's watermark (the local test broker, tansu, reports
    /// it wrongly, so there it can even be negative).
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (id, p) in &t.partitions {
                if *id < 0 || p.committed_offset < 0 && p.hi_offset < 0 {
                    continue;
                }
                let labels = [("topic", topic.clone()), ("partition", id.to_string())];
                metrics::gauge!("tributary_kafka_high_watermark", &labels).set(p.hi_offset as f64);
                metrics::gauge!("tributary_kafka_committed_offset", &labels)
                    .set(p.committed_offset as f64);
                if p.committed_offset >= 0 && p.hi_offset >= 0 {
                    metrics::gauge!("tributary_kafka_consumer_lag_messages", &labels)
                        .set((p.hi_offset - p.committed_offset) as f64);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps: Vec<Tp> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(partitions = ?tps, "partitions revoked: draining");
            drain_and_commit(consumer, &self.shared, Some(&tps));
            let mut tracker = self.shared.tracker();
            for tp in &tps {
                tracker.revoke(tp);
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut tracker = self.shared.tracker();
                let mut tps = Vec::new();
                for e in tpl.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    tps.push(tp.clone());
                    tracker.assign(tp);
                }
                tracing::info!(partitions = ?tps, "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}
