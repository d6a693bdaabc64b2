//! The pgvector sink behind the pipeline's [`Sink`] contract: each `accept` is one committed
//! transaction (see [`PgvectorSink::write`]), so nothing ever waits for a flush.

use super::PgvectorSink;
use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Position, StreamId};
use crate::sink::{FlushWhen, Flushed, Sink, SinkError, SinkFuture};

impl Sink for PgvectorSink {
    fn name(&self) -> &'static str {
        "pgvector"
    }

    fn accept<'a>(&'a mut self, events: &'a [ChangeEvent]) -> SinkFuture<'a, Vec<DeadLetter>> {
        Box::pin(async move {
            let outcome = self
                .write(events)
                .await
                .map_err(|e| SinkError::from_stage(&e))?;
            Ok(outcome.dead_letters)
        })
    }

    fn flush_when(&self) -> FlushWhen {
        // Durable when `accept` returned.
        FlushWhen::Idle
    }

    fn flush(&mut self) -> SinkFuture<'_, Flushed> {
        Box::pin(async { Ok(Flushed::default()) })
    }

    fn committed<'a>(
        &'a mut self,
        source: &'a str,
        stream: &'a StreamId,
    ) -> SinkFuture<'a, Option<Position>> {
        let held = self
            .positions()
            .get(&(source.to_owned(), stream.clone()))
            .cloned();
        Box::pin(async move { Ok(held) })
    }
}
