//! The consumer's context: offset commits, the drain on revoke, and the lag gauges.
//!
//! Guarantees: an offset is committed only once its message is done (its event acknowledged as
//! durable, its dead letter durable, or a tombstone), and every message before it on the
//! partition too. On revoke, librdkafka's callback blocks until the revoked
//! partitions' in-flight events are acknowledged (up to the drain timeout), commits them
//! synchronously and only then releases the partitions, so the next owner resumes exactly after
//! what was durable; what was not acknowledged in time is re-delivered to it.

use std::sync::Arc;
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::handle::Shared;
use super::offsets::Tp;

/// Commits the tracker's committable offsets (of `only`, or of every assigned partition).
pub(super) fn commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    shared: &Shared,
    only: Option<&[Tp]>,
    mode: CommitMode,
) {
    let commits = shared.tracker().take_commits(only);
    if commits.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in &commits {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::warn!(error = %e, "cannot build the offset commit");
            shared.tracker().commit_failed(&commits);
            return;
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => tracing::debug!(?commits, "offsets committed"),
        Err(e) => {
            tracing::warn!(error = %e, "offset commit failed; will retry");
            shared.tracker().commit_failed(&commits);
        }
    }
}

/// Waits (bounded by the drain timeout) until the pipeline acknowledged every in-flight event of
/// `only` (or of all partitions), then commits synchronously.
pub(super) fn drain_and_commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    shared: &Shared,
    only: Option<&[Tp]>,
) {
    let deadline = Instant::now() + shared.drain_timeout;
    let mut tracker = shared.tracker();
    loop {
        let in_flight = match only {
            Some(tps) => tracker.in_flight(tps),
            None => tracker.in_flight_all(),
        };
        let now = Instant::now();
        if in_flight == 0 {
            break;
        }
        if now >= deadline {
            tracing::warn!(
                in_flight,
                "drain timeout: releasing partitions with unacknowledged events (they will be \
                 re-delivered to the next owner)"
            );
            break;
        }
        tracker = shared
            .acked
            .wait_timeout(tracker, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    drop(tracker);
    commit(consumer, shared, only, CommitMode::Sync);
}

/// The librdkafka context of the source's consumer.
pub(super) struct SourceContext {
    pub(super) shared: Arc<Shared>,
    /// Why the last broker connection failed (a rejected login, an untrusted certificate).
    pub(super) failure: super::login::LastFailure,
}

impl ClientContext for SourceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.failure.record(level, fac, log_message);
        super::login::forward_log(level, fac, log_message);
    }

    /// librdkafka's statistics (every `statistics.interval.ms`, 5 s unless configured): per
    /// partition, the group's committed offset, the broker's high watermark and their difference.
    /// The lag is only as right as the broker's watermark (the local test broker, tansu, reports
    /// it wrongly, so there it can even be negative).
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (id, p) in &t.partitions {
                if *id < 0 || p.committed_offset < 0 && p.hi_offset < 0 {
                    continue;
                }
                let labels = [("topic", topic.clone()), ("partition", id.to_string())];
                metrics::gauge!("tributary_kafka_high_watermark", &labels).set(p.hi_offset as f64);
                metrics::gauge!("tributary_kafka_committed_offset", &labels)
                    .set(p.committed_offset as f64);
                if p.committed_offset >= 0 && p.hi_offset >= 0 {
                    metrics::gauge!("tributary_kafka_consumer_lag_messages", &labels)
                        .set((p.hi_offset - p.committed_offset) as f64);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps: Vec<Tp> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(partitions = ?tps, "partitions revoked: draining");
            drain_and_commit(consumer, &self.shared, Some(&tps));
            let mut tracker = self.shared.tracker();
            for tp in &tps {
                tracker.revoke(tp);
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut tracker = self.shared.tracker();
                let mut tps = Vec::new();
                for e in tpl.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    tps.push(tp.clone());
                    tracker.assign(tp);
                }
                tracing::info!(partitions = ?tps, "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}
