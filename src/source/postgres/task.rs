//! The PostgreSQL source as a task for the pipeline: it polls the reader, sends batches on a
//! bounded channel (a slow pipeline slows the reader, and the server keeps the WAL), and applies
//! acknowledgements between polls. On shutdown it stops reading, keeps applying the
//! acknowledgements of batches still draining until every acker is dropped, then closes the
//! replication connection after a last status update.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{PgSourceError, PostgresSourceReader};
use crate::config::PostgresSourceConfig;
use crate::dead_letter::DeadLetters;
use crate::event::{ChangeEvent, Position};
use crate::sink::durable::Durable;
use crate::source::{SourceError, StartContext, Started};
use crate::telemetry::health::SourceHealth;

/// How long a poll waits for new changes before acknowledgements are applied.
const POLL_WAIT: Duration = Duration::from_millis(100);

/// Acknowledges durable positions; cheap to clone. Positions of other sources are ignored.
#[derive(Clone)]
pub struct PostgresAcker {
    tx: mpsc::UnboundedSender<Position>,
}

impl PostgresAcker {
    pub fn ack(&self, position: &Position) {
        if super::lsn_of(position).is_some() {
            // The task is gone only after every acker was dropped or it failed.
            let _ = self.tx.send(position.clone());
        }
    }
}

pub struct PostgresSourceHandle {
    acker: PostgresAcker,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), PgSourceError>>,
}

impl PostgresSourceHandle {
    pub fn acker(&self) -> PostgresAcker {
        self.acker.clone()
    }

    /// Stops reading; returns once the acknowledgements of batches in flight were applied
    /// (every acker dropped) and the connection closed.
    pub async fn shutdown(self) -> Result<(), PgSourceError> {
        let _ = self.stop.send(true);
        drop(self.acker);
        self.task
            .await
            .map_err(|e| PgSourceError::Setup(format!("PostgreSQL source task failed: {e}")))?
    }
}

/// Connects (publication, slot, snapshot plan; `durable`: what the sinks hold) and starts reading: batches of up to
/// `max_events`, at most `capacity` queued; every completed poll is reported to `health`; rows
/// that cannot be decoded go to `dead_letters`.
pub async fn start(
    cfg: &PostgresSourceConfig,
    capacity: usize,
    max_events: usize,
    health: Option<SourceHealth>,
    dead_letters: DeadLetters,
    durable: &Durable,
) -> Result<(mpsc::Receiver<Vec<ChangeEvent>>, PostgresSourceHandle), PgSourceError> {
    let mut reader = PostgresSourceReader::connect_with(cfg, durable).await?;
    reader.set_dead_letters(dead_letters);
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Position>();
    let (stop, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            apply_acks(&mut reader, &mut ack_rx).await?;
            if *stop_rx.borrow() {
                break;
            }
            let events = reader.poll(max_events, POLL_WAIT).await?;
            // A poll that returned is a live loop, idle or not; a stalled connection (retrying
            // with backoff inside `poll`) or a full pipeline stops these signals.
            if let Some(h) = &health {
                h.progress();
            }
            if events.is_empty() {
                continue;
            }
            let sender = tx.as_ref().expect("sender kept until stop");
            tokio::select! {
                sent = sender.send(events) => if sent.is_err() { break },
                // Not sent: not acknowledged, so delivered again on the next start.
                _ = stop_rx.changed() => break,
            }
        }
        tx.take();
        while let Some(p) = ack_rx.recv().await {
            reader.ack(&p).await?;
            apply_acks(&mut reader, &mut ack_rx).await?;
        }
        reader.close().await;
        Ok(())
    });
    Ok((
        rx,
        PostgresSourceHandle {
            acker: PostgresAcker { tx: ack_tx },
            stop,
            task,
        },
    ))
}

/// Applies the highest pending acknowledgement (they only move forward).
async fn apply_acks(
    reader: &mut PostgresSourceReader,
    rx: &mut mpsc::UnboundedReceiver<Position>,
) -> Result<(), PgSourceError> {
    let mut best: Option<Position> = None;
    while let Ok(p) = rx.try_recv() {
        if best.as_ref().is_none_or(|b| p > *b) {
            best = Some(p);
        }
    }
    match best {
        Some(p) => reader.ack(&p).await,
        None => Ok(()),
    }
}

/// The PostgreSQL source behind the pipeline's [`crate::source::Source`] contract.
pub struct PostgresSource {
    config: PostgresSourceConfig,
}

impl PostgresSource {
    pub fn new(config: PostgresSourceConfig) -> Self {
        PostgresSource { config }
    }
}

impl crate::source::Acknowledge for PostgresAcker {
    fn ack(&self, position: &Position) {
        PostgresAcker::ack(self, position);
    }
}

impl crate::source::Stop for PostgresSourceHandle {
    fn shutdown(self: Box<Self>) -> crate::source::SourceFuture<()> {
        Box::pin(async move {
            PostgresSourceHandle::shutdown(*self)
                .await
                .map_err(|e| SourceError::from_stage(&e))
        })
    }
}

impl crate::source::Source for PostgresSource {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn start(self: Box<Self>, context: StartContext) -> crate::source::SourceFuture<Started> {
        Box::pin(async move {
            let batch = context.batch_max_events.max(1);
            let capacity = (context.capacity_events / batch).max(1);
            let (rx, handle) = start(
                &self.config,
                capacity,
                batch,
                Some(context.health),
                context.dead_letters,
                &context.durable,
            )
            .await
            .map_err(|e| SourceError::from_stage(&e))?;
            let batches = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|events| (events, rx))
            });
            Ok(Started {
                batches: Box::pin(batches),
                acker: std::sync::Arc::new(handle.acker()),
                stop: Box::new(handle),
            })
        })
    }
}
