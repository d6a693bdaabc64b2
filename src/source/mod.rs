//! Sources: where change events come from, behind one contract the pipeline drives alike.
//!
//! [`Source::start`] connects and returns a [`Started`]: a stream of event batches (in the
//! source's order per stream), an [`Acknowledge`] handle and a [`Stop`] handle. The pipeline
//! acknowledges a position only once every sink holds everything up to it durably; the source
//! moves its own durable marker (PostgreSQL flush LSN, Kafka committed offsets) only on those
//! acknowledgements. Events delivered but never acknowledged come again after a restart: the
//! sinks recognise them. A source writes what it cannot decode to the run's [`DeadLetters`]
//! and acknowledges such a position itself, once the letter is durable.
//!
//! A batch stream that ends before the pipeline asked the source to stop means the source
//! failed: the run stops, and [`Stop::shutdown`] says why.
//!
//! Adding a source: a module implementing [`Source`], its `[sources.NAME]` config section, and
//! one line in [`configured`].

pub mod kafka;
pub mod postgres;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::stream::BoxStream;

use crate::config::Config;
use crate::dead_letter::DeadLetters;
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Position};
use crate::telemetry::health::SourceHealth;

/// The future a source method returns.
pub type SourceFuture<T> = Pin<Box<dyn Future<Output = Result<T, SourceError>> + Send>>;

/// A source's failure, with the kind that decides retry or stop.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub kind: ErrorKind,
    pub message: String,
}

impl SourceError {
    /// Keeps a stage error's kind and (secret-free) text.
    pub fn from_stage<E: Classify + std::fmt::Display>(e: &E) -> Self {
        SourceError {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl Classify for SourceError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// What a source needs from the pipeline to start.
pub struct StartContext {
    /// How many events may wait in the source's channel (backpressure).
    pub capacity_events: usize,
    /// The largest batch the pipeline wants.
    pub batch_max_events: usize,
    pub health: SourceHealth,
    pub dead_letters: DeadLetters,
    /// What every sink already holds (ask only while starting; see [`crate::sink::durable`]).
    pub durable: crate::sink::durable::Durable,
}

/// Acknowledges durable positions to a source; positions of other sources are ignored.
pub trait Acknowledge: Send + Sync {
    /// Everything of `position`'s stream up to and including it is durable in every sink.
    fn ack(&self, position: &Position);
}

/// Stops a running source.
pub trait Stop: Send {
    /// Stops reading, applies the acknowledgements of batches still draining (until every
    /// [`Acknowledge`] handle is dropped or a drain timeout passes), closes the connection.
    /// The error, if any, is why the source failed.
    fn shutdown(self: Box<Self>) -> SourceFuture<()>;
}

/// A started source.
pub struct Started {
    pub batches: BoxStream<'static, Vec<ChangeEvent>>,
    pub acker: Arc<dyn Acknowledge>,
    pub stop: Box<dyn Stop>,
}

/// A configured source, not yet started.
pub trait Source: Send {
    /// A short stable name for logs, metrics labels and readiness (`postgres`, `kafka`); errors
    /// name the source by its config section, `sources.NAME`.
    fn name(&self) -> &'static str;

    fn start(self: Box<Self>, context: StartContext) -> SourceFuture<Started>;
}

/// Every configured source, in a fixed order.
pub fn configured(config: &Config) -> Vec<Box<dyn Source>> {
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    if let Some(k) = &config.sources.kafka {
        sources.push(Box::new(kafka::KafkaSource::new(k.clone())));
    }
    if let Some(p) = &config.sources.postgres {
        sources.push(Box::new(postgres::task::PostgresSource::new(p.clone())));
    }
    sources
}
