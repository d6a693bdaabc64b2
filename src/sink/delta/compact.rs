//! `tributary compact`: delta-rs's `optimize` on a Bronze table — bin-packing of small files into
//! files of `compact_target_mb`, or Z-ordering by `zorder_columns`.
//!
//! `optimize` commits with `dataChange = false`, so delta-rs's conflict checker lets it pass beside
//! streaming appends (they only add files) while a concurrent rewrite of the same files loses with
//! a conflict instead of doubling rows; `txn` versions are untouched, so exactly-once replay
//! detection keeps working across a compaction.

use std::num::NonZeroU64;

use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::optimize::OptimizeType;

use super::{DeltaSink, DeltaSinkError};

/// What [`DeltaSink::compact`] did to one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactOutcome {
    /// Partitions rewritten.
    pub partitions: u64,
    pub files_removed: u64,
    pub files_added: u64,
    /// Bytes of the files written.
    pub bytes_added: u64,
}

impl DeltaSink {
    /// Compacts the table of `source` (a name from
    /// [`existing_tables`](Self::existing_tables)); safe beside a running writer.
    pub async fn compact(&mut self, source: &str) -> Result<CompactOutcome, DeltaSinkError> {
        let delta_err = |e| DeltaSinkError::Delta {
            table: source.to_owned(),
            source: e,
        };
        let Some(table) = self.load_existing(source).await? else {
            return Ok(CompactOutcome::default());
        };
        let schema = table
            .snapshot()
            .map_err(delta_err)?
            .snapshot()
            .arrow_schema();
        for c in &self.compact.zorder {
            if schema.field_with_name(c).is_err() {
                return Err(DeltaSinkError::Config {
                    uri: self.table_uri(source),
                    message: format!(
                        "sinks.delta.zorder_columns: table {source} has no column {c:?}"
                    ),
                });
            }
        }
        let kind = if self.compact.zorder.is_empty() {
            OptimizeType::Compact
        } else {
            OptimizeType::ZOrder(self.compact.zorder.clone())
        };
        let mut builder = table
            .optimize()
            .with_type(kind)
            .with_commit_properties(CommitProperties::default().with_max_retries(15))
            .with_max_concurrent_tasks(2);
        if let Some(target) = NonZeroU64::new(self.compact.target_bytes) {
            builder = builder.with_target_size(target);
        }
        let (_, metrics) = builder.await.map_err(delta_err)?;
        self.tables.remove(source);
        let outcome = CompactOutcome {
            partitions: metrics.partitions_optimized,
            files_removed: metrics.num_files_removed,
            files_added: metrics.num_files_added,
            bytes_added: metrics.files_added.total_size.max(0) as u64,
        };
        tracing::info!(table = source, ?outcome, "compacted");
        Ok(outcome)
    }
}
