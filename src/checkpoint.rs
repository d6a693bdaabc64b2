//! The checkpoint coordinator: which position may be acknowledged to each source.
//!
//! A position is acknowledged (Postgres flush LSN, Kafka offset commit) only once **every** sink
//! has durably committed everything up to it. Sinks commit independently and at different
//! paces (a Delta commit every few seconds, a pgvector transaction per batch), so per source
//! stream the coordinator keeps each sink's durable position and acknowledges their minimum.
//! Sinks are known by their index in the pipeline's list, never by name or kind. A rejected
//! event's dead letter is made durable before any sink flushes the batch holding it, so dead
//! letters need no slot of their own.
//!
//! Where a stream resumes after a restart is the source's own durable marker (the slot's flush
//! LSN, the group's committed offsets), which only moves on these acknowledgements; each sink
//! skips what it already holds (Delta `txn` versions, pgvector's `_tributary_positions`), so a
//! sink that fell behind before a crash is caught up and the others write nothing twice.
//!
//! PostgreSQL positions are acknowledged at transaction boundaries: the source hands over whole
//! transactions, and moves the slot only over transactions wholly acknowledged.

use std::collections::HashMap;

use crate::event::{Position, StreamId};

#[derive(Debug)]
pub struct Checkpoints {
    sinks: usize,
    /// Per (source, stream): each sink's durable position, by sink index.
    durable: HashMap<(String, StreamId), Vec<Option<Position>>>,
    /// Per (source, stream): the last position handed out for acknowledgement.
    acked: HashMap<(String, StreamId), Position>,
}

impl Checkpoints {
    /// `sinks`: how many sinks gate acknowledgements (indexes `0..sinks`).
    pub fn new(sinks: usize) -> Self {
        Checkpoints {
            sinks,
            durable: HashMap::new(),
            acked: HashMap::new(),
        }
    }

    /// Records that sink `sink` has durably committed `stream` of `source` up to `position`.
    /// Returns the position to acknowledge to the source when the acknowledgeable position
    /// advanced. An index out of range is ignored (it gates nothing).
    pub fn durable(&mut self, sink: usize, source: &str, position: &Position) -> Option<Position> {
        if sink >= self.sinks {
            return None;
        }
        let key = (source.to_owned(), position.stream());
        let slots = self
            .durable
            .entry(key.clone())
            .or_insert_with(|| vec![None; self.sinks]);
        let newer = slots[sink]
            .as_ref()
            .is_none_or(|p| position.partial_cmp(p) == Some(std::cmp::Ordering::Greater));
        if newer {
            slots[sink] = Some(position.clone());
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
        crate::source::postgres::position(Lsn(n), 0)
    }

    fn off(p: i32, o: i64) -> Position {
        crate::source::kafka::position("orders", p, o)
    }

    const DELTA: usize = 0;
    const PGVECTOR: usize = 1;

    #[test]
    fn acknowledges_only_what_every_sink_has() {
        let mut c = Checkpoints::new(2);
        assert_eq!(c.durable(PGVECTOR, "public.orders", &lsn(10)), None);
        assert_eq!(c.durable(PGVECTOR, "public.orders", &lsn(20)), None);
        // Delta catches up to 10: 10 is durable everywhere.
        assert_eq!(c.durable(DELTA, "public.orders", &lsn(10)), Some(lsn(10)));
        assert_eq!(c.durable(DELTA, "public.orders", &lsn(30)), Some(lsn(20)));
        // Nothing new below the minimum: no repeated acknowledgement.
        assert_eq!(c.durable(DELTA, "public.orders", &lsn(30)), None);
        // A stale report never moves a sink backwards.
        assert_eq!(c.durable(PGVECTOR, "public.orders", &lsn(5)), None);
        assert_eq!(
            c.durable(PGVECTOR, "public.orders", &lsn(30)),
            Some(lsn(30))
        );
    }

    #[test]
    fn kafka_partitions_are_independent_streams() {
        let mut c = Checkpoints::new(2);
        c.durable(PGVECTOR, "orders", &off(0, 5));
        c.durable(PGVECTOR, "orders", &off(1, 7));
        assert_eq!(c.durable(DELTA, "orders", &off(1, 9)), Some(off(1, 7)));
        assert_eq!(c.durable(DELTA, "orders", &off(0, 3)), Some(off(0, 3)));
        assert_eq!(c.acknowledged().count(), 2);
    }

    #[test]
    fn one_sink_acknowledges_alone_and_unknown_indexes_gate_nothing() {
        let mut c = Checkpoints::new(1);
        assert_eq!(c.durable(0, "t", &lsn(100)), Some(lsn(100)));
        assert_eq!(c.durable(3, "t", &lsn(200)), None);
        let mut none = Checkpoints::new(0);
        assert_eq!(none.durable(0, "t", &lsn(1)), None);
    }
}
