//! The commit of a table's buffer: data files and `txn` versions in one atomic Delta commit,
//! retried with backoff while the store is unavailable.
//!
//! Guarantees: a commit returns only once its version is in the log; the data files and the
//! `txn` actions of the rows' highest positions land in that same version or not at all. A retry
//! first re-reads the committed positions and drops the rows already in the table (a commit
//! whose response was lost, or a concurrent writer of the same stream), and re-uses the files an
//! earlier attempt uploaded as long as the rows did not change; so retrying never duplicates rows.

use arrow::array::RecordBatch;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, Transaction, Version};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};

use super::buffer::Buffer;
use super::schema::add_missing_columns;
use super::txn::{committed_in, txn_actions};
use super::{DeltaSink, DeltaSinkError, bronze};
use crate::retry::{Patience, Retry};

impl DeltaSink {
    /// A retry loop for commits to the store: the bounded patience of [`crate::retry`]
    /// (about 15 minutes; object_store retries each request for a few seconds underneath),
    /// reporting every failure to readiness. Then the error stops the run, and a restart
    /// resumes from what is committed.
    pub(super) fn commit_retry(&self, what: &'static str) -> Retry {
        Retry::new(what, Patience::Bounded).with_health(self.health.as_ref())
    }

    /// Commits `buffer` to the table of `source`, retrying connection errors (each retry opens
    /// the table afresh and first drops the rows a lost-response commit already holds); `None`
    /// when a retry found every row already committed.
    pub(super) async fn commit_retrying(
        &mut self,
        source: &str,
        buffer: &mut Buffer,
    ) -> Result<Option<Version>, DeltaSinkError> {
        let mut retry = self.commit_retry("Delta commit");
        let mut recheck = false;
        loop {
            match self.commit_buffer(source, buffer, recheck).await {
                Err(e) => {
                    retry.after(e).await?;
                    self.tables.remove(source);
                    recheck = true;
                }
                ok => return ok,
            }
        }
    }

    /// One commit attempt for a table's buffer; `recheck` re-reads the committed positions
    /// first and drops rows already in the table.
    async fn commit_buffer(
        &mut self,
        source: &str,
        buffer: &mut Buffer,
        recheck: bool,
    ) -> Result<Option<Version>, DeltaSinkError> {
        let name = self.name.clone();
        let delta_err = |e| DeltaSinkError::Delta {
            table: source.to_owned(),
            source: e,
        };
        let table = self.table(source, &bronze::bronze_schema()).await?;
        if recheck {
            let mut committed = Vec::with_capacity(buffer.streams.len());
            for stream in &buffer.streams {
                committed.push(committed_in(table, &name, source, stream).await?);
            }
            let before = buffer.rows;
            buffer
                .drop_committed(&committed)
                .map_err(|e| DeltaSinkError::Arrow {
                    table: source.to_owned(),
                    source: e,
                })?;
            if buffer.rows == 0 {
                return Ok(None);
            }
            if buffer.rows != before {
                // Files written by an earlier attempt hold rows now committed elsewhere.
                buffer.written = None;
            }
        }
        // New typed columns are added before the data that fills them.
        let added = add_missing_columns(table, source, &buffer.schema).await?;
        let txns: Vec<Transaction> = buffer
            .highest
            .values()
            .flat_map(|p| txn_actions(&name, p))
            .collect();
        // The background encoder has been writing the files while rows arrived; on a retry,
        // after a schema change or if it failed, the files are written here from the batches.
        let encoded = match buffer.encoder.take() {
            Some(encoder) if !recheck && !added => match encoder.finish().await {
                Ok(adds) => Some(adds),
                Err(e) => {
                    tracing::warn!(table = source, error = %e, "background Parquet encoding failed; writing the files again");
                    None
                }
            },
            _ => None,
        };
        // A retry re-uses the files an earlier attempt wrote (delta-rs's own conflict loop has
        // no backoff; ours does, and need not upload the data again).
        let adds = match (buffer.written.take(), encoded) {
            (Some(adds), _) | (None, Some(adds)) => adds,
            (None, None) => write_files(table, &buffer.batches)
                .await
                .map_err(delta_err)?,
        };
        buffer.written = Some(adds.clone());
        let version = commit_adds(table, source, adds, txns, buffer.rows).await?;
        buffer.written = None;
        for p in buffer.highest.values() {
            self.seen
                .insert((source.to_owned(), p.stream()), Some(p.clone()));
        }
        Ok(Some(version))
    }
}

/// Writes the data files of `batches` (no commit) and returns their `add` actions.
async fn write_files(
    table: &DeltaTable,
    batches: &[RecordBatch],
) -> Result<Vec<Add>, DeltaTableError> {
    let mut writer = RecordBatchWriter::for_table(table)?;
    for batch in batches {
        writer.write(batch.clone()).await?;
    }
    writer.flush().await
}

/// Writes the data files of `batches` and commits them with `txns`, atomically; returns the
/// committed version.
pub(super) async fn commit_files(
    table: &mut DeltaTable,
    source: &str,
    batches: &[RecordBatch],
    txns: Vec<Transaction>,
) -> Result<Version, DeltaSinkError> {
    let adds = write_files(table, batches)
        .await
        .map_err(|e| DeltaSinkError::Delta {
            table: source.to_owned(),
            source: e,
        })?;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    commit_adds(table, source, adds, txns, rows).await
}

/// Commits already written data files with `txns`, atomically; returns the committed version.
async fn commit_adds(
    table: &mut DeltaTable,
    source: &str,
    adds: Vec<Add>,
    txns: Vec<Transaction>,
    rows: usize,
) -> Result<Version, DeltaSinkError> {
    let delta_err = |e| DeltaSinkError::Delta {
        table: source.to_owned(),
        source: e,
    };
    let adds: Vec<Action> = adds.into_iter().map(Action::Add).collect();
    let snapshot = table.snapshot().map_err(delta_err)?;
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: Some(vec![bronze::PARTITION_COLUMN.to_owned()]),
        predicate: None,
    };
    let finalized = CommitBuilder::from(
        CommitProperties::default()
            .with_application_transactions(txns)
            .with_max_retries(15),
    )
    .with_actions(adds)
    .build(Some(snapshot), table.log_store(), operation)
    .await
    .map_err(delta_err)?;
    let version = finalized.version();
    table.update_state().await.map_err(delta_err)?;
    tracing::debug!(table = source, version, rows, "delta commit");
    metrics::gauge!("tributary_delta_table_version", "table" => source.to_owned())
        .set(version as f64);
    Ok(version)
}
