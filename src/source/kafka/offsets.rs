//! Which offset of each assigned partition may be committed.
//!
//! The consumer records every message it hands to the pipeline as *pending* and every message it
//! finished itself (dead-lettered after the dead letter was durable, Debezium tombstone) as done.
//! The pipeline acknowledges "durable up to offset P" per partition. The committable offset of a
//! partition is the lowest pending offset, or one past the last consumed message when nothing is
//! pending (Kafka's commit names the next message to read). Acknowledgements for a partition that
//! is no longer assigned are ignored: its new owner decides what is committed.

use std::collections::{HashMap, VecDeque};

/// (topic, partition)
pub type Tp = (String, i32);

#[derive(Debug, Default)]
struct PartitionState {
    /// Offsets handed to the pipeline and not yet acknowledged, ascending.
    pending: VecDeque<i64>,
    /// One past the last consumed offset.
    next: Option<i64>,
    /// The offset last committed (or being committed) to the group.
    committed: Option<i64>,
}

impl PartitionState {
    fn committable(&self) -> Option<i64> {
        self.pending.front().copied().or(self.next)
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<Tp, PartitionState>,
}

impl OffsetTracker {
    /// Starts tracking a newly assigned partition (from its committed offset, unknown here).
    pub fn assign(&mut self, tp: Tp) {
        self.parts.insert(tp, PartitionState::default());
    }

    /// Stops tracking a revoked partition.
    pub fn revoke(&mut self, tp: &Tp) {
        self.parts.remove(tp);
    }

    /// The partitions tracked (assigned), sorted.
    pub fn assigned(&self) -> Vec<Tp> {
        let mut tps: Vec<Tp> = self.parts.keys().cloned().collect();
        tps.sort();
        tps
    }

    pub fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.parts.contains_key(&(topic.to_owned(), partition))
    }

    /// Records a consumed message: `pending` when the pipeline now owns it, otherwise done.
    /// Returns false when the partition is not assigned (a message fetched before a revoke).
    pub fn consumed(&mut self, topic: &str, partition: i32, offset: i64, pending: bool) -> bool {
        // Avoids allocating a key String per message on the hot path.
        let Some(state) = self
            .parts
            .iter_mut()
            .find(|((t, p), _)| *p == partition && t == topic)
            .map(|(_, s)| s)
        else {
            return false;
        };
        if pending {
            state.pending.push_back(offset);
        }
        state.next = Some(offset + 1);
        true
    }

    /// Takes back messages recorded as pending that never reached the pipeline (shutdown while
    /// handing them over): from `offset` on, the partition is as if never consumed, so they are
    /// re-delivered after the restart.
    pub fn unconsume_from(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(state) = self.parts.get_mut(&(topic.to_owned(), partition)) {
            while state.pending.back().is_some_and(|&o| o >= offset) {
                state.pending.pop_back();
            }
            if state.next.is_some_and(|n| n > offset) {
                state.next = Some(offset);
            }
        }
    }

    /// Events handed out and not yet acknowledged on every assigned partition.
    pub fn in_flight_all(&self) -> usize {
        self.parts.values().map(|s| s.pending.len()).sum()
    }

    /// The pipeline says everything up to and including `offset` is durable.
    pub fn ack(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(state) = self
            .parts
            .iter_mut()
            .find(|((t, p), _)| *p == partition && t == topic)
            .map(|(_, s)| s)
        {
            while state.pending.front().is_some_and(|&o| o <= offset) {
                state.pending.pop_front();
            }
        }
    }

    /// Events handed out and not yet acknowledged on these partitions.
    pub fn in_flight<'a>(&self, tps: impl IntoIterator<Item = &'a Tp>) -> usize {
        tps.into_iter()
            .filter_map(|tp| self.parts.get(tp))
            .map(|s| s.pending.len())
            .sum()
    }

    /// Offsets to commit (restricted to `only` when given) that moved since the last commit;
    /// marks them committed.
    pub fn take_commits(&mut self, only: Option<&[Tp]>) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, state) in &mut self.parts {
            if only.is_some_and(|o| !o.contains(tp)) {
                continue;
            }
            if let Some(offset) = state.committable()
                && state.committed != Some(offset)
            {
                state.committed = Some(offset);
                out.push((tp.clone(), offset));
            }
        }
        out.sort();
        out
    }

    /// A commit failed: offer these offsets again next time.
    pub fn commit_failed(&mut self, commits: &[(Tp, i64)]) {
        for (tp, offset) in commits {
            if let Some(state) = self.parts.get_mut(tp)
                && state.committed == Some(*offset)
            {
                state.committed = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("orders".into(), p)
    }

    #[test]
    fn commits_stop_at_the_lowest_unacknowledged_offset() {
        let mut t = OffsetTracker::default();
        t.assign(tp(0));
        assert!(t.take_commits(None).is_empty(), "nothing consumed yet");
        for o in 10..15 {
            assert!(t.consumed("orders", 0, o, o != 12));
        }
        assert_eq!(t.take_commits(None), vec![(tp(0), 10)]);
        t.ack("orders", 0, 11);
        // 12 was finished by the source itself (dead letter), 13 is still pending.
        assert_eq!(t.take_commits(None), vec![(tp(0), 13)]);
        assert!(
            t.take_commits(None).is_empty(),
            "unchanged offsets are not re-committed"
        );
        t.ack("orders", 0, 14);
        assert_eq!(t.in_flight([&tp(0)]), 0);
        assert!(t.consumed("orders", 0, 15, true));
        assert!(t.consumed("orders", 0, 16, true));
        t.unconsume_from("orders", 0, 15);
        assert_eq!(t.in_flight([&tp(0)]), 0, "unsent events are not waited for");
        assert_eq!(t.take_commits(None), vec![(tp(0), 15)]);
    }

    #[test]
    fn revoked_partitions_ignore_messages_and_acks() {
        let mut t = OffsetTracker::default();
        t.assign(tp(1));
        t.assign(tp(2));
        assert!(t.consumed("orders", 1, 0, true));
        assert!(t.consumed("orders", 2, 5, true));
        assert_eq!(t.in_flight([&tp(1), &tp(2)]), 2);
        t.revoke(&tp(1));
        assert!(!t.consumed("orders", 1, 1, true));
        t.ack("orders", 1, 0);
        assert_eq!(t.take_commits(Some(&[tp(2)])), vec![(tp(2), 5)]);
        let c = vec![(tp(2), 5)];
        t.commit_failed(&c);
        assert_eq!(t.take_commits(None), c, "a failed commit is retried");
    }
}
