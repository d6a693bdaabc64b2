//! The small stages between sources and sinks: forwarding a source's batches into the one
//! merged channel, cutting batches by count or time, and passing batches on when no embedding
//! is configured. Each keeps order and ends when its input ends.

use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use super::PipelineError;
use crate::enrich::Enriched;
use crate::event::ChangeEvent;

/// What a stage task returns: the delivery stage's summary, nothing for the others.
pub type Output = Option<super::RunSummary>;

/// Forwards a source's batches until its stream ends (or the pipeline stops taking them).
pub async fn forward(
    mut batches: BoxStream<'static, Vec<ChangeEvent>>,
    merged: mpsc::Sender<Vec<ChangeEvent>>,
) -> Result<Output, PipelineError> {
    while let Some(events) = batches.next().await {
        if merged.send(events).await.is_err() {
            break;
        }
    }
    Ok(None)
}

/// Merges incoming batches into batches of up to `max_events`, waiting at most `max_wait` for
/// more after the first.
pub async fn batch(
    mut input: mpsc::Receiver<Vec<ChangeEvent>>,
    output: mpsc::Sender<Vec<ChangeEvent>>,
    max_events: usize,
    max_wait: Duration,
) -> Result<Output, PipelineError> {
    while let Some(mut batch) = input.recv().await {
        let deadline = tokio::time::Instant::now() + max_wait;
        while batch.len() < max_events {
            match tokio::time::timeout_at(deadline, input.recv()).await {
                Ok(Some(more)) => batch.extend(more),
                Ok(None) | Err(_) => break,
            }
        }
        if output.send(batch).await.is_err() {
            break;
        }
    }
    Ok(None)
}

/// Without an embedding model: batches pass through unchanged.
pub async fn pass_through(
    mut input: mpsc::Receiver<Vec<ChangeEvent>>,
    output: mpsc::Sender<Enriched>,
) -> Result<Output, PipelineError> {
    while let Some(events) = input.recv().await {
        let batch = Enriched {
            events,
            dead_letters: Vec::new(),
        };
        if output.send(batch).await.is_err() {
            break;
        }
    }
    Ok(None)
}
