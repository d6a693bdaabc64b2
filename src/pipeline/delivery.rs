//! Delivery: hands each enriched batch to every sink, makes its dead letters durable, flushes
//! the sinks when they ask, and acknowledges to the sources what became durable everywhere.
//!
//! Per batch, in this order:
//! 1. every sink [`accept`](Sink::accept)s the batch (their rejections become dead letters);
//! 2. the batch's dead letters are written, durably, to the run's destination;
//! 3. every sink that asks for it is flushed; once a sink is durable (flushed, or holding
//!    nothing unflushed), the batches it took count as durable in it;
//! 4. the checkpoint coordinator acknowledges to the sources the positions durable in every sink.
//!
//! Between batches, a sink's timed flush (Delta's `flush_interval_ms`) runs when due; when the
//! input ends (drained) every sink is flushed. The same metrics and readiness are kept for every
//! sink by name: `tributary_sink_accepted_total`, `_rejected_total`, `_rows_total`,
//! `_commit_seconds`, `_durable_lag_seconds`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::mpsc;

use super::{PipelineError, RunSummary};
use crate::checkpoint::Checkpoints;
use crate::dead_letter::{DeadLetter, DeadLetters};
use crate::enrich::Enriched;
use crate::event::{ChangeEvent, Position, StreamId};
use crate::sink::{FlushWhen, Sink, SinkError};
use crate::source::Acknowledge;
use crate::telemetry::health::{Health, SinkHealth};

pub struct Delivery {
    sinks: Vec<Slot>,
    checkpoints: Checkpoints,
    ackers: Vec<Arc<dyn Acknowledge>>,
    dead_letters: DeadLetters,
    summary: RunSummary,
}

/// One sink with what the pipeline tracks for it.
struct Slot {
    sink: Box<dyn Sink>,
    health: SinkHealth,
    /// Per (source, stream): the last position accepted and not yet durable.
    pending: HashMap<(String, StreamId), Position>,
    /// When the oldest of those was accepted.
    pending_since: Option<Instant>,
    accepted: Counter,
    rejected: Counter,
    rows: Counter,
    commit: Histogram,
    durable_lag: Gauge,
}

/// Which sinks a flush round flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Those whose flush is due.
    Due,
    /// All that hold anything (drain).
    All,
}

impl Delivery {
    pub fn new(
        sinks: Vec<Box<dyn Sink>>,
        ackers: Vec<Arc<dyn Acknowledge>>,
        dead_letters: DeadLetters,
        health: &Health,
    ) -> Self {
        let sinks: Vec<Slot> = sinks
            .into_iter()
            .map(|sink| {
                let name = sink.name();
                Slot {
                    health: health.sink(name),
                    pending: HashMap::new(),
                    pending_since: None,
                    accepted: metrics::counter!("tributary_sink_accepted_total", "sink" => name),
                    rejected: metrics::counter!("tributary_sink_rejected_total", "sink" => name),
                    rows: metrics::counter!("tributary_sink_rows_total", "sink" => name),
                    commit: metrics::histogram!("tributary_sink_commit_seconds", "sink" => name),
                    durable_lag: metrics::gauge!("tributary_sink_durable_lag_seconds", "sink" => name),
                    sink,
                }
            })
            .collect();
        Delivery {
            checkpoints: Checkpoints::new(sinks.len()),
            sinks,
            ackers,
            dead_letters,
            summary: RunSummary::default(),
        }
    }

    /// Delivers every batch from `input` until it ends, then flushes every sink.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Enriched>,
    ) -> Result<RunSummary, PipelineError> {
        loop {
            let next = tokio::select! {
                () = super::sleep_until(self.next_flush()) => {
                    self.flush(Round::Due).await?;
                    continue;
                }
                next = input.recv() => next,
            };
            match next {
                Some(batch) => self.deliver(batch).await?,
                None => break,
            }
        }
        self.flush(Round::All).await?;
        Ok(self.summary)
    }

    async fn deliver(&mut self, batch: Enriched) -> Result<(), PipelineError> {
        let started = Instant::now();
        let mut letters = batch.dead_letters;
        let last = last_positions(&batch.events, &letters);
        for slot in &mut self.sinks {
            let accepted = AssertUnwindSafe(slot.sink.accept(&batch.events)).catch_unwind();
            let rejected = match accepted.await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(slot.failed(e)),
                Err(panic) => return Err(slot.panicked(panic)),
            };
            slot.accepted.increment(batch.events.len() as u64);
            slot.rejected.increment(rejected.len() as u64);
            slot.rows
                .increment(batch.events.len().saturating_sub(rejected.len()) as u64);
            letters.extend(rejected);
            for (stream, position) in &last {
                slot.pending.insert(stream.clone(), position.clone());
            }
            slot.pending_since.get_or_insert(started);
        }
        // A position is acknowledged only after the dead letters before it are durable.
        self.dead_letters
            .write(&letters)
            .await
            .map_err(|e| PipelineError::stage("dead_letter", &e))?;
        fail::fail_point!("pipeline::before-ack", |_| std::process::abort());
        self.summary.events += batch.events.len() as u64;
        self.summary.batches += 1;
        self.summary.dead_letters += letters.len() as u64;
        let rows = self.flush(Round::Due).await?;
        tracing::info!(
            events = batch.events.len(),
            rows_committed = rows,
            dead_letters = letters.len(),
            ms = started.elapsed().as_millis() as u64,
            "batch done"
        );
        Ok(())
    }

    /// Flushes the sinks `round` names and acknowledges what became durable everywhere.
    /// Returns the rows flushed.
    async fn flush(&mut self, round: Round) -> Result<usize, PipelineError> {
        let now = tokio::time::Instant::now();
        let mut rows = 0;
        for (i, slot) in self.sinks.iter_mut().enumerate() {
            let due = match slot.sink.flush_when() {
                FlushWhen::Idle => false,
                FlushWhen::Now => true,
                FlushWhen::At(at) => round == Round::All || at <= now,
            };
            if due {
                let started = Instant::now();
                match AssertUnwindSafe(slot.sink.flush()).catch_unwind().await {
                    Ok(Ok(flushed)) => rows += flushed.rows,
                    Ok(Err(e)) => return Err(slot.failed(e)),
                    Err(panic) => return Err(slot.panicked(panic)),
                }
                slot.commit.record(started.elapsed().as_secs_f64());
                // Crash point for the crash-safety tests (no-op unless built with `failpoints`).
                fail::fail_point!("pipeline::after-sink-flush", |_| std::process::abort());
            } else if slot.sink.flush_when() != FlushWhen::Idle {
                // Holds unflushed data: what it took is not durable yet.
                if let Some(since) = slot.pending_since {
                    slot.durable_lag.set(since.elapsed().as_secs_f64());
                }
                continue;
            }
            slot.health.commit_succeeded();
            slot.durable_lag.set(0.0);
            slot.pending_since = None;
            for ((source, _), position) in slot.pending.drain() {
                if let Some(ack) = self.checkpoints.durable(i, &source, &position) {
                    for acker in &self.ackers {
                        acker.ack(&ack);
                    }
                }
            }
        }
        Ok(rows)
    }

    /// The earliest timed flush any sink asked for.
    fn next_flush(&self) -> Option<tokio::time::Instant> {
        self.sinks
            .iter()
            .filter_map(|s| match s.sink.flush_when() {
                FlushWhen::At(at) => Some(at),
                FlushWhen::Now => Some(tokio::time::Instant::now()),
                FlushWhen::Idle => None,
            })
            .min()
    }
}

impl Slot {
    /// Readiness red with the reason; the error, naming the sink, for the run.
    fn failed(&self, e: SinkError) -> PipelineError {
        self.health.commit_failed(&e);
        PipelineError::stage(&format!("sinks.{}", self.sink.name()), &e)
    }

    /// A panic inside the sink, named after it (the delivery task would only say "delivery").
    fn panicked(&self, panic: Box<dyn std::any::Any + Send>) -> PipelineError {
        let cause = super::supervisor::panic_message(panic);
        self.health.commit_failed(format!("panicked: {cause}"));
        PipelineError::Died {
            stage: format!("sinks.{}", self.sink.name()),
            cause: format!("panicked: {cause}"),
        }
    }
}

/// The last position of each (source, stream) in a batch, over its events and its dead letters
/// (both are in stream order, so the highest one counts).
fn last_positions(
    events: &[ChangeEvent],
    letters: &[DeadLetter],
) -> HashMap<(String, StreamId), Position> {
    let mut last: HashMap<(String, StreamId), Position> = HashMap::new();
    let all = events
        .iter()
        .map(|e| (&e.source, &e.position))
        .chain(letters.iter().map(|d| (&d.source, &d.position)));
    for (source, position) in all {
        let key = (source.clone(), position.stream());
        let newer = last
            .get(&key)
            .is_none_or(|p| position.partial_cmp(p) == Some(std::cmp::Ordering::Greater));
        if newer {
            last.insert(key, position.clone());
        }
    }
    last
}
