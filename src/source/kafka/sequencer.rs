//! Parallel decoding, and putting the decoded chunks back in the order they were received.
//!
//! Decoding runs apart from receiving (which, with librdkafka's threads, keeps a core busy on its
//! own): the receive loop hands chunks of raw messages round-robin to `decode_tasks` tasks that
//! decode them in parallel, and one sequencing task takes the decoded chunks back in the same
//! turn. Guarantees: events (and offsets) of a partition leave in offset order; an offset is
//! recorded as consumed only in that order, and a dead letter is durable before its offset can be
//! committed; a batch cancelled by the stop signal has its offsets taken back, so they are
//! neither waited for nor committed (they are re-delivered later).

use std::sync::Arc;

use metrics::Counter;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::KafkaSourceError;
use super::chunk::{Chunk, Copied};
use super::decode::{DecodeError, Decoded, Decoder, KafkaEvent, RawMessage};
use super::handle::Shared;
use crate::dead_letter::DeadLetter;
use crate::dead_letter::DeadLetters;

/// A subscribed topic: its decoder and its events counter.
pub(super) struct TopicState {
    pub(super) name: String,
    pub(super) decoder: Decoder,
    pub(super) events: Counter,
}

/// Starts `tasks` decode tasks and the sequencing task, which hands events over on `tx`. Returns
/// one chunk sender per decode task, to be given chunks in turn from the first, and the
/// sequencing task (its result says why decoding ended).
pub(super) fn spawn(
    tasks: usize,
    shared: Arc<Shared>,
    topics: Arc<Vec<TopicState>>,
    dead_letters: DeadLetters,
    tx: mpsc::Sender<Vec<KafkaEvent>>,
    stopped: watch::Receiver<bool>,
) -> (
    Vec<mpsc::Sender<Chunk>>,
    JoinHandle<Result<(), KafkaSourceError>>,
) {
    let mut chunk_senders = Vec::new();
    let mut decoded_receivers = Vec::new();
    for _ in 0..tasks {
        let (chunks_tx, chunks_rx) = mpsc::channel::<Chunk>(1);
        let (decoded_tx, decoded_rx) = mpsc::channel::<DecodedChunk>(1);
        tokio::spawn(decode_chunks(
            Arc::clone(&topics),
            chunks_rx,
            decoded_tx,
            stopped.clone(),
        ));
        chunk_senders.push(chunks_tx);
        decoded_receivers.push(decoded_rx);
    }
    let sequencer = Sequencer {
        shared,
        topics,
        dead_letters,
        tx,
    };
    let task = tokio::spawn(sequencer.run(decoded_receivers, stopped));
    (chunk_senders, task)
}

/// A chunk and what each of its messages decoded to, or why decoding cannot go on (the
/// Schema Registry refused the credentials).
type DecodedChunk = Result<(Chunk, Vec<Result<Decoded, DecodeError>>), KafkaSourceError>;

/// One decode task: decodes the chunks it is given, in the order given. The schemas that framed
/// messages name are fetched first (an outage of the registry waits here, retried, until it is
/// back or the source stops).
async fn decode_chunks(
    topics: Arc<Vec<TopicState>>,
    mut chunks: mpsc::Receiver<Chunk>,
    decoded: mpsc::Sender<DecodedChunk>,
    mut stopped: watch::Receiver<bool>,
) {
    while let Some(chunk) = chunks.recv().await {
        for m in &chunk.messages {
            let decoder = &topics[m.topic].decoder;
            if decoder.missing_schema(chunk.payload(m)).is_none() {
                continue;
            }
            if *stopped.borrow() {
                return;
            }
            tokio::select! {
                // The chunk's offsets were never recorded: its messages are re-delivered later.
                _ = stopped.changed() => return,
                fetched = decoder.fetch_schema(chunk.payload(m)) => {
                    if let Err(e) = fetched {
                        let _ = decoded.send(Err(KafkaSourceError::Config(e.to_string()))).await;
                        return;
                    }
                }
            }
        }
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
                    timestamp_type: m.timestamp_type,
                    headers: m.headers.clone(),
                })
            })
            .collect();
        if decoded.send(Ok((chunk, results))).await.is_err() {
            // The sequencing task ended (shutdown or failure): nothing more to do.
            return;
        }
    }
}

/// Takes decoded chunks back in the order they were received, records their offsets, writes
/// dead letters and hands the events over.
struct Sequencer {
    shared: Arc<Shared>,
    topics: Arc<Vec<TopicState>>,
    dead_letters: DeadLetters,
    tx: mpsc::Sender<Vec<KafkaEvent>>,
}

impl Sequencer {
    async fn run(
        mut self,
        mut decoded_chunks: Vec<mpsc::Receiver<DecodedChunk>>,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<(), KafkaSourceError> {
        // The decode tasks were given chunks in turn: taking them back in the same turn keeps
        // the order they were received in.
        let mut next = 0;
        loop {
            let Some(received) = decoded_chunks[next].recv().await else {
                // The receiver stopped handing chunks out, so every chunk before was taken.
                break;
            };
            let (chunk, decoded) = received?;
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
                    super::position(topic, partition, offset),
                    chunk
                        .key(m)
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    chunk.payload(m).unwrap_or_default(),
                    error.to_string(),
                );
                tracing::warn!(%topic, partition, offset, %error, "message dead-lettered");
                self.dead_letters
                    .write(std::slice::from_ref(&letter))
                    .await
                    .map_err(|e| KafkaSourceError::DeadLetter(e.to_string()))?;
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
        if let Some((topic, partition, offset)) = super::offset_of(&e.event.position)
            && !firsts.iter().any(|f| f.1 == partition && f.0 == topic)
        {
            firsts.push((topic.to_owned(), partition, offset));
        }
    }
    firsts
}
