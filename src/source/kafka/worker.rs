//! The receive loop: takes messages from librdkafka, hands them in chunks to the decode tasks
//! in turn, and commits offsets every `commit_interval_ms`.
//!
//! Guarantees: messages reach the decode tasks in the order librdkafka delivered them (the
//! sequencer relies on the strict turn); a message is consumed only once its chunk was handed
//! over, so on stop whatever is still in the current chunk is re-delivered later. On stop or
//! failure the loop waits for the sequencer, drains every in-flight event (bounded by the drain
//! timeout), commits synchronously and leaves the group. Non-fatal client errors are logged and
//! survived (librdkafka reconnects by itself); a fatal one ends the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::KafkaSourceError;
use super::chunk::{Chunk, MAX_BATCH};
use super::handle::Shared;
use super::rebalance::{SourceContext, commit, drain_and_commit};
use crate::secret::{Redactor, SecretMap};
use crate::telemetry::health::SourceHealth;

/// Receives messages, hands them to the decode task in chunks, commits offsets.
pub(super) struct Worker {
    pub(super) consumer: Arc<StreamConsumer<SourceContext>>,
    pub(super) shared: Arc<Shared>,
    /// The subscribed topics (a message of another topic is ignored).
    pub(super) topics: Vec<String>,
    /// Index of the topic of the last message (usually the next one's too).
    pub(super) last_topic: usize,
    /// One sender per decode task, used in turn (empty once the decoding has ended).
    pub(super) chunks: Vec<mpsc::Sender<Chunk>>,
    pub(super) next_decoder: usize,
    /// The sequencing task (its result says why decoding ended).
    pub(super) decode_task: Option<JoinHandle<Result<(), KafkaSourceError>>>,
    pub(super) chunk: Chunk,
    /// Scrubs the properties' secrets from client errors.
    pub(super) redactor: Redactor,
    /// The client's properties (to say which broker, mechanism and user a rejected login used).
    pub(super) props: SecretMap,
    pub(super) commit_interval: Duration,
    pub(super) health: Option<SourceHealth>,
}

impl Worker {
    pub(super) async fn run(
        mut self,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<(), KafkaSourceError> {
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
                        let reason = self.redactor.redact(&reason).into_owned();
                        break Err(KafkaSourceError::Client(format!("fatal: {reason}")));
                    }
                    // A rejected login does not heal by retrying: stop with what was rejected.
                    if matches!(
                        e,
                        KafkaError::MessageConsumption(RDKafkaErrorCode::Authentication)
                    ) {
                        let reason = consumer
                            .context()
                            .failure
                            .get()
                            .unwrap_or_else(|| "the broker rejected the login".into());
                        break Err(KafkaSourceError::Config(super::login::login_failure(
                            &self.props,
                            &reason,
                            &self.redactor,
                        )));
                    }
                    // librdkafka reconnects by itself with exponential backoff
                    // (`reconnect.backoff.ms` → `reconnect.backoff.max.ms`) and reports each
                    // failure once: sleeping here would only add a delay per queued error
                    // after the broker is back (measured: tens of seconds).
                    failures = failures.saturating_add(1);
                    let error = KafkaSourceError::client(e, &self.redactor);
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
