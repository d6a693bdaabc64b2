//! The checkpoint coordinator: which position may be acknowledged to each source.
//!
//! A position is acknowledged (Postgres flush LSN, Kafka offset commit) only once **every** sink
//! has durably committed everything up to it. Sinks commit independently and at different
//! paces (a Delta commit every few seconds, a pgvector transaction per batch), so per source
//! stream the coordinator keeps each sink's durable position and acknowledges their minimum.
//! Dead letters count as one more "sink": a rejected event's position is durable once its dead
//! letter is.
//!
//! On start, each sink reports the positions it already holds (Delta `txn` versions, pgvector's
//! `_tributary_positions`); a stream resumes after the lowest of them, so a sink that fell behind
//! before a crash is caught up and the others skip what they already have.
//!
//! Postgres positions must be acknowledged at transaction boundaries; the pipeline only cuts
//! batches there, so every durable position it reports ends a transaction.

use std::collections::HashMap;

use crate::event::{Position, StreamId};

#[derive(Debug)]
pub struct Checkpoints {
    sinks: Vec<String>,
    /// Per (source, stream): each sink's durable position, by sink index.
    durable: HashMap<(String, StreamId), Vec<Option<Position>>>,
    /// Per (source, stream): the last position handed out for acknowledgement.
    acked: HashMap<(String, StreamId), Position>,
}

impl Checkpoints {
    /// `sinks` names every participant whose durability gates acknowledgements.
    pub fn new<S: Into<String>>(sinks: impl IntoIterator<Item = S>) -> Self {
        Checkpoints {
            sinks: sinks.into_iter().map(Into::into).collect(),
            durable: HashMap::new(),
            acked: HashMap::new(),
        }
    }

    fn index(&self, sink: &str) -> usize {
        self.sinks
            .iter()
            .position(|s| s == sink)
            .unwrap_or_else(|| panic!("sink {sink:?} was not registered with the coordinator"))
    }

    /// Records that `sink` has durably committed `stream` of `source` up to `position`. Returns
    /// the position to acknowledge to the source when the acknowledgeable position advanced.
    pub fn durable(&mut self, sink: &str, source: &str, position: &Position) -> Option<Position> {
        let i = self.index(sink);
        let key = (source.to_owned(), position.stream());
        let n = self.sinks.len();
        let slots = self
            .durable
            .entry(key.clone())
            .or_insert_with(|| vec![None; n]);
        let newer = slots[i]
            .as_ref()
            .is_none_or(|p| position.partial_cmp(p) == Some(std::cmp::Ordering::Greater));
        if newer {
            slots[i] = Some(position.clone());
        }
        let low = lowest(slots)?;
        let advanced = self
            .acked
            .get(&key)
            .is_none_or(|a| low.partial_cmp(a) == Some(std::cmp::Ordering::Greater));
        if advanced {
            self.acked.insert(key, low.clone());
            Some(low)
        } else {
            None
        }
    }

    /// Where `stream` of `source` resumes: the lowest position every sink holds, or `None` when
    /// some sink holds nothing for it (then from the source's own committed position).
    pub fn resume_from(&self, source: &str, stream: &StreamId) -> Option<Position> {
        self.durable
            .get(&(source.to_owned(), stream.clone()))
            .and_then(|slots| lowest(slots))
    }

    /// Every (source, stream) with its acknowledgeable position.
    pub fn acknowledged(&self) -> impl Iterator<Item = (&(String, StreamId), &Position)> {
        self.acked.iter()
    }
}

/// The minimum over all sinks, or `None` if a sink has no position yet.
fn lowest(slots: &[Option<Position>]) -> Option<Position> {
    let mut low: Option<&Position> = None;
    for slot in slots {
        let p = slot.as_ref()?;
        if low.is_none_or(|l| p.partial_cmp(l) == Some(std::cmp::Ordering::Less)) {
            low = Some(p);
        }
    }
    low.cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Lsn;

    fn lsn(n: u64) -> Position {
        Position::Lsn {
            commit_lsn: Lsn(n),
            tx_ordinal: 0,
        }
    }

    fn off(p: i32, o: i64) -> Position {
        Position::Kafka {
            topic: "orders".into(),
            partition: p,
            offset: o,
        }
    }

    #[test]
    fn acknowledges_only_what_every_sink_has() {
        let mut c = Checkpoints::new(["delta", "pgvector"]);
        assert_eq!(c.durable("pgvector", "public.orders", &lsn(10)), None);
        assert_eq!(c.durable("pgvector", "public.orders", &lsn(20)), None);
        // Delta catches up to 10: 10 is durable everywhere.
        assert_eq!(c.durable("delta", "public.orders", &lsn(10)), Some(lsn(10)));
        assert_eq!(c.durable("delta", "public.orders", &lsn(30)), Some(lsn(20)));
        // Nothing new below the minimum: no repeated acknowledgement.
        assert_eq!(c.durable("delta", "public.orders", &lsn(30)), None);
        // A stale report never moves a sink backwards.
        assert_eq!(c.durable("pgvector", "public.orders", &lsn(5)), None);
        assert_eq!(
            c.durable("pgvector", "public.orders", &lsn(30)),
            Some(lsn(30))
        );
    }

    #[test]
    fn kafka_partitions_are_independent_streams() {
        let mut c = Checkpoints::new(["delta", "dead_letters"]);
        c.durable("dead_letters", "orders", &off(0, 5));
        c.durable("dead_letters", "orders", &off(1, 7));
        assert_eq!(c.durable("delta", "orders", &off(1, 9)), Some(off(1, 7)));
        assert_eq!(c.durable("delta", "orders", &off(0, 3)), Some(off(0, 3)));
        assert_eq!(
            c.resume_from("orders", &off(0, 0).stream()),
            Some(off(0, 3))
        );
        assert_eq!(c.acknowledged().count(), 2);
    }

    #[test]
    fn resume_needs_every_sink() {
        let mut c = Checkpoints::new(["delta", "pgvector"]);
        c.durable("delta", "t", &lsn(100));
        assert_eq!(c.resume_from("t", &StreamId::Postgres), None);
        c.durable("pgvector", "t", &lsn(90));
        assert_eq!(c.resume_from("t", &StreamId::Postgres), Some(lsn(90)));
    }
}
