//! The Bronze sink behind the pipeline's [`Sink`] contract: `accept` buffers (sized commits by
//! rows / bytes / time, see [`DeltaSink::should_flush`]), `flush` commits every buffered table.

use std::borrow::Cow;
use std::time::Instant;

use super::DeltaSink;
use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Position, StreamId};
use crate::sink::{FlushWhen, Flushed, Sink, SinkError, SinkFuture};

impl Sink for DeltaSink {
    fn name(&self) -> &'static str {
        "delta"
    }

    fn accept<'a>(&'a mut self, events: &'a [ChangeEvent]) -> SinkFuture<'a, Vec<DeadLetter>> {
        Box::pin(async move {
            let mut rejected = Vec::new();
            for (source, group) in by_source(events) {
                let letters = self
                    .append(source, &group)
                    .await
                    .map_err(|e| SinkError::from_stage(&e))?;
                rejected.extend(letters);
            }
            Ok(rejected)
        })
    }

    fn flush_when(&self) -> FlushWhen {
        if self.should_flush() {
            return FlushWhen::Now;
        }
        match self.flush_deadline() {
            Some(at) => FlushWhen::At(at),
            None => FlushWhen::Idle,
        }
    }

    fn flush(&mut self) -> SinkFuture<'_, Flushed> {
        Box::pin(async move {
            let started = Instant::now();
            let outcome = DeltaSink::flush(self)
                .await
                .map_err(|e| SinkError::from_stage(&e))?;
            if outcome.rows > 0 {
                tracing::info!(
                    bronze_rows = outcome.rows,
                    tables = outcome.versions.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "Bronze commit"
                );
            }
            Ok(Flushed { rows: outcome.rows })
        })
    }

    fn committed<'a>(
        &'a mut self,
        source: &'a str,
        stream: &'a StreamId,
    ) -> SinkFuture<'a, Option<Position>> {
        Box::pin(async move {
            DeltaSink::committed(self, source, stream)
                .await
                .map_err(|e| SinkError::from_stage(&e))
        })
    }
}

/// A batch's events grouped by source (one Bronze table each), each group in source order. The
/// common case, a batch of one source, borrows the batch instead of copying it.
fn by_source(events: &[ChangeEvent]) -> Vec<(&str, Cow<'_, [ChangeEvent]>)> {
    match events.first() {
        None => return Vec::new(),
        Some(first) if events.iter().all(|e| e.source == first.source) => {
            return vec![(first.source.as_str(), Cow::Borrowed(events))];
        }
        Some(_) => {}
    }
    let mut groups: Vec<(&str, Vec<ChangeEvent>)> = Vec::new();
    for e in events {
        match groups.iter_mut().find(|(s, _)| *s == e.source) {
            Some((_, g)) => g.push(e.clone()),
            None => groups.push((e.source.as_str(), vec![e.clone()])),
        }
    }
    groups
        .into_iter()
        .map(|(s, g)| (s, Cow::Owned(g)))
        .collect()
}
