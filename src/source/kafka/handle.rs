//! What the pipeline holds of a running Kafka source: the [`KafkaSourceHandle`] that stops it,
//! and the [`KafkaAcker`] through which durable events are acknowledged.
//!
//! Guarantees: an acknowledgement covers every event of its partition up to and including its
//! position, and wakes a rebalance or shutdown that is draining; one for a partition this
//! instance no longer owns is ignored (the new owner re-delivers those messages).
//! [`KafkaSourceHandle::shutdown`] returns only after the final drain and commit.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::KafkaSourceError;
use super::offsets::OffsetTracker;
use crate::event::Position;

/// The state the handle, the acker, the consumer's tasks and its rebalance callbacks share.
pub(super) struct Shared {
    pub(super) tracker: Mutex<OffsetTracker>,
    /// Signalled on every acknowledgement, so a draining revoke wakes up.
    pub(super) acked: Condvar,
    pub(super) drain_timeout: Duration,
}

impl Shared {
    pub(super) fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
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
        if let Some((topic, partition, offset)) = super::offset_of(position) {
            self.shared.tracker().ack(topic, partition, offset);
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
    /// The handle of the consumer task that `stop` stops, acknowledging into `shared`.
    pub(super) fn new(
        shared: Arc<Shared>,
        stop: watch::Sender<bool>,
        task: JoinHandle<Result<(), KafkaSourceError>>,
    ) -> Self {
        KafkaSourceHandle {
            acker: KafkaAcker { shared },
            stop,
            task,
        }
    }

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
