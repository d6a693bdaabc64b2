//! Sinks: where events end up, behind one two-step contract the pipeline drives alike for all.
//!
//! 1. [`Sink::accept`] takes a batch (events in source order) and returns, at once, the events
//!    it rejects as dead letters, with the reason. A replayed event the sink already holds is
//!    skipped silently. Nothing is durable yet.
//! 2. [`Sink::flush`] returns only once everything accepted before it is durable (a Delta
//!    commit, a PostgreSQL transaction). The pipeline acknowledges a position to its source only
//!    after every sink flushed the batch holding it, so it never needs to know what a sink is:
//!    a sink that commits inside `accept` (pgvector) simply asks for a flush at once, one that
//!    sizes its own commits (Delta, by rows / bytes / time) asks when it is ready.
//!
//! If `accept` or `flush` fails, nothing accepted since the last successful flush counts as
//! durable; the events are delivered again after a restart, and each sink must recognise what
//! it already holds (Delta `txn` versions, pgvector stored positions), so a replay neither loses
//! nor duplicates. Errors carry an [`ErrorKind`] ([`crate::retry`] decides what each kind
//! means); a sink retries its own connection errors before it reports one.
//!
//! Adding a sink: a module implementing [`Sink`], its `[sinks.NAME]` config section, and one
//! line in [`open`].

pub mod delta;
pub mod durable;
pub mod pgvector;

use std::future::Future;
use std::pin::Pin;

use crate::config::Config;
use crate::dead_letter::DeadLetter;
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Position, StreamId};
use crate::telemetry::health::Health;

/// The future a [`Sink`] method returns (boxed, so sinks can sit in one `Vec<Box<dyn Sink>>`).
pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SinkError>> + Send + 'a>>;

/// A sink's failure, with the kind that decides retry, dead letter or stop.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub kind: ErrorKind,
    pub message: String,
}

impl SinkError {
    /// Keeps a stage error's kind and (secret-free) text.
    pub fn from_stage<E: Classify + std::fmt::Display>(e: &E) -> Self {
        SinkError {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl Classify for SinkError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// When a sink wants [`Sink::flush`] called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushWhen {
    /// Nothing is waiting to become durable.
    Idle,
    /// Now (after the current batch).
    Now,
    /// At this instant, unless a batch makes it due earlier (time-based commits while idle).
    At(tokio::time::Instant),
}

/// What a [`Sink::flush`] made durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Rows written since the previous flush.
    pub rows: usize,
}

/// A destination of change events. See the module doc for the contract.
pub trait Sink: Send {
    /// A short stable name for logs, metrics labels and readiness (`delta`, `pgvector`).
    fn name(&self) -> &'static str;

    /// Takes `events`; returns the ones it rejects as dead letters (their positions count as
    /// taken). Durable only after the next successful [`flush`](Self::flush).
    fn accept<'a>(&'a mut self, events: &'a [ChangeEvent]) -> SinkFuture<'a, Vec<DeadLetter>>;

    /// Whether (or when) the sink wants a flush.
    fn flush_when(&self) -> FlushWhen;

    /// Makes everything accepted so far durable; returns once it is.
    fn flush(&mut self) -> SinkFuture<'_, Flushed>;

    /// The highest position of `stream` this sink durably holds for `source`; `None` when it
    /// holds nothing of it or cannot tell (then nothing is taken as durable). Asked at start-up,
    /// before anything is accepted (see [`durable::Durable`]).
    fn committed<'a>(
        &'a mut self,
        source: &'a str,
        stream: &'a StreamId,
    ) -> SinkFuture<'a, Option<Position>> {
        let _ = (source, stream);
        Box::pin(async { Ok(None) })
    }
}

/// Opens every configured sink, in a fixed order; each registers with readiness.
pub async fn open(config: &Config, health: &Health) -> Result<Vec<Box<dyn Sink>>, SinkError> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(d) = &config.sinks.delta {
        let sink = delta::DeltaSink::new(&config.name, d).map_err(|e| SinkError::from_stage(&e))?;
        sinks.push(Box::new(sink.with_health(health.sink("delta"))));
    }
    if let Some(p) = &config.sinks.pgvector {
        let sink = pgvector::PgvectorSink::connect(p.clone())
            .await
            .map_err(|e| SinkError::from_stage(&e))?;
        sinks.push(Box::new(sink.with_health(health.sink("pgvector"))));
    }
    Ok(sinks)
}
