//! The Kafka source behind the pipeline's [`Source`] contract.

use std::sync::Arc;

use super::consumer::{self, KafkaAcker, KafkaSourceHandle, MAX_BATCH};
use crate::config::KafkaSourceConfig as KafkaConfig;
use crate::event::{ChangeEvent, Position};
use crate::source::{Acknowledge, Source, SourceError, SourceFuture, StartContext, Started, Stop};

/// A configured Kafka source (consumer group over the configured topics).
pub struct KafkaSource {
    config: KafkaConfig,
}

impl KafkaSource {
    pub fn new(config: KafkaConfig) -> Self {
        KafkaSource { config }
    }
}

impl Acknowledge for KafkaAcker {
    fn ack(&self, position: &Position) {
        KafkaAcker::ack(self, position);
    }
}

impl Stop for KafkaSourceHandle {
    fn shutdown(self: Box<Self>) -> SourceFuture<()> {
        Box::pin(async move {
            KafkaSourceHandle::shutdown(*self)
                .await
                .map_err(|e| SourceError::from_stage(&e))
        })
    }
}

impl Source for KafkaSource {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn start(self: Box<Self>, context: StartContext) -> SourceFuture<Started> {
        Box::pin(async move {
            let capacity = (context.capacity_events / MAX_BATCH).max(1);
            let (rx, handle) = consumer::start_with(
                &self.config,
                capacity,
                Some(context.health),
                context.dead_letters,
            )
            .await
            .map_err(|e| SourceError::from_stage(&e))?;
            // The Kafka metadata stays with the source; the pipeline needs the events.
            let batches = futures::stream::unfold(rx, |mut rx| async move {
                let batch = rx.recv().await?;
                let events: Vec<ChangeEvent> = batch.into_iter().map(|e| e.event).collect();
                Some((events, rx))
            });
            Ok(Started {
                batches: Box::pin(batches),
                acker: Arc::new(handle.acker()),
                stop: Box::new(handle),
            })
        })
    }
}
