//! `tributary compact`: rewrites a Bronze table's small files into bigger ones (bin-packing),
//! optionally Z-ordered by configured columns.
//!
//! Written here rather than with delta-rs's `optimize` because that operation lives behind the
//! `datafusion` feature, which would more than double the build of this crate for one
//! maintenance command. The parts that matter for safety are delta-rs's own: the rewritten files
//! are written by its `RecordBatchWriter` (statistics included) and committed by its
//! `CommitBuilder` as an `OPTIMIZE` operation whose actions all say `dataChange = false`, so the
//! conflict checker lets it pass beside streaming appends (they only add files) and a
//! concurrent compaction of the same files loses with a conflict instead of doubling rows.
//!
//! Per partition (`_ingest_date`): files smaller than the target are read back, conformed to the
//! table's current schema (older files lack columns added since), and written again at the
//! target size; one commit per partition removes the old files and adds the new. With Z-order
//! columns every file of the partition is rewritten, sorted by the interleaved bits of each
//! column's rank (a Z-order curve), so files cluster on all the columns at once and readers skip
//! more files by their min/max statistics.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, RecordBatch, UInt32Array, new_null_array};
use arrow::compute::{SortOptions, concat_batches, sort_to_indices, take_record_batch};
use arrow::datatypes::SchemaRef;
use deltalake::kernel::Action;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use object_store::ObjectStoreExt as _;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{DeltaSink, DeltaSinkError, bronze};

/// What [`DeltaSink::compact`] did to one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactOutcome {
    /// Partitions rewritten (one commit each).
    pub partitions: usize,
    pub files_removed: usize,
    pub files_added: usize,
    /// Rows rewritten (the table's row count does not change).
    pub rows: u64,
}

/// One data file of the table.
struct DataFile {
    remove: deltalake::kernel::Remove,
    path: object_store::path::Path,
    size: i64,
}

impl DeltaSink {
    /// Compacts the table of `source` (a name from
    /// [`existing_tables`](Self::existing_tables)); safe beside a running writer.
    pub async fn compact(&mut self, source: &str) -> Result<CompactOutcome, DeltaSinkError> {
        let delta_err = |e| DeltaSinkError::Delta {
            table: source.to_owned(),
            source: e,
        };
        let url = self.url(source)?;
        let mut table = DeltaTableBuilder::from_url(url)
            .map_err(delta_err)?
            .with_storage_options(self.options.clone())
            .build()
            .map_err(delta_err)?;
        match table.load().await {
            Ok(()) => {}
            Err(DeltaTableError::NotATable(_)) => return Ok(CompactOutcome::default()),
            Err(e) => return Err(delta_err(e)),
        }
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
        let target = self.compact.target_bytes;
        let mut partitions: BTreeMap<String, Vec<DataFile>> = BTreeMap::new();
        for f in table.snapshot().map_err(delta_err)?.log_data().iter() {
            let day = f
                .partition_values_map()
                .get(bronze::PARTITION_COLUMN)
                .cloned()
                .flatten()
                .unwrap_or_default();
            partitions.entry(day).or_default().push(DataFile {
                remove: f.remove_action(false),
                path: f.object_store_path(),
                size: f.size(),
            });
        }
        let mut outcome = CompactOutcome::default();
        for (day, files) in partitions {
            let chosen: Vec<DataFile> = if self.compact.zorder.is_empty() {
                files
                    .into_iter()
                    .filter(|f| (f.size as u64) < target)
                    .collect()
            } else {
                files
            };
            if chosen.len() < 2 {
                continue;
            }
            let (added, rows) = self
                .rewrite(source, &mut table, &schema, &day, &chosen)
                .await?;
            outcome.partitions += 1;
            outcome.files_removed += chosen.len();
            outcome.files_added += added;
            outcome.rows += rows;
        }
        self.tables.remove(source);
        Ok(outcome)
    }

    /// Rewrites `files` of partition `day` and commits the swap; returns (files added, rows).
    async fn rewrite(
        &self,
        source: &str,
        table: &mut DeltaTable,
        schema: &SchemaRef,
        day: &str,
        files: &[DataFile],
    ) -> Result<(usize, u64), DeltaSinkError> {
        let delta_err = |e| DeltaSinkError::Delta {
            table: source.to_owned(),
            source: e,
        };
        let arrow_err = |e| DeltaSinkError::Arrow {
            table: source.to_owned(),
            source: e,
        };
        let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").map_err(|e| {
            arrow_err(arrow::error::ArrowError::ParseError(format!(
                "partition {}={day:?}: {e}",
                bronze::PARTITION_COLUMN
            )))
        })?;
        let days = (date - chrono::NaiveDate::default()).num_days() as i32;
        let store = table.object_store();
        let mut writer = RecordBatchWriter::for_table(table)
            .map_err(delta_err)?
            .with_target_file_size(self.compact.target_bytes);
        let mut sorted_input = Vec::new();
        let mut rows = 0u64;
        for f in files {
            let bytes = store
                .get(&f.path)
                .await
                .map_err(|e| delta_err(e.into()))?
                .bytes()
                .await
                .map_err(|e| delta_err(e.into()))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.build())
                .map_err(|e| delta_err(e.into()))?;
            for batch in reader {
                let batch = batch.map_err(arrow_err)?;
                let batch = conform(&batch, schema, days).map_err(arrow_err)?;
                rows += batch.num_rows() as u64;
                if self.compact.zorder.is_empty() {
                    writer.write(batch).await.map_err(delta_err)?;
                } else {
                    sorted_input.push(batch);
                }
            }
        }
        if !self.compact.zorder.is_empty() {
            let all = concat_batches(schema, &sorted_input).map_err(arrow_err)?;
            drop(sorted_input);
            let ordered = zorder(&all, &self.compact.zorder).map_err(arrow_err)?;
            writer.write(ordered).await.map_err(delta_err)?;
        }
        let mut actions: Vec<Action> = writer
            .flush()
            .await
            .map_err(delta_err)?
            .into_iter()
            .map(|mut add| {
                add.data_change = false;
                Action::Add(add)
            })
            .collect();
        let added = actions.len();
        actions.extend(files.iter().map(|f| Action::Remove(f.remove.clone())));
        let snapshot = table.snapshot().map_err(delta_err)?;
        let operation = DeltaOperation::Optimize {
            predicate: Some(format!("{}='{day}'", bronze::PARTITION_COLUMN)),
            target_size: self.compact.target_bytes as i64,
        };
        let finalized = CommitBuilder::from(CommitProperties::default().with_max_retries(15))
            .with_actions(actions)
            .build(Some(snapshot), table.log_store(), operation)
            .await
            .map_err(delta_err)?;
        tracing::info!(
            table = source,
            partition = day,
            version = finalized.version(),
            removed = files.len(),
            added,
            rows,
            "compacted"
        );
        table.update_state().await.map_err(delta_err)?;
        Ok((added, rows))
    }
}

/// A batch read from a data file in the table's current column layout: the partition column
/// (not stored in the files) filled in, columns added since the file was written NULL.
fn conform(
    batch: &RecordBatch,
    schema: &SchemaRef,
    days: i32,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = batch.num_rows();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| {
            if f.name() == bronze::PARTITION_COLUMN {
                Arc::new(Date32Array::from(vec![days; n])) as ArrayRef
            } else {
                match batch.column_by_name(f.name()) {
                    Some(c) => c.clone(),
                    None => new_null_array(f.data_type(), n),
                }
            }
        })
        .collect();
    RecordBatch::try_new(schema.clone(), columns)
}

/// `batch` reordered along a Z-order curve over `columns`: each column's value is replaced by
/// its rank (NULLs first), the ranks' bits are interleaved into one key, rows sorted by key.
fn zorder(
    batch: &RecordBatch,
    columns: &[String],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = batch.num_rows();
    if n < 2 || columns.is_empty() {
        return Ok(batch.clone());
    }
    // Up to 4 columns get 32 bits of rank each in a 128-bit key; more share the bits.
    let bits = (128 / columns.len()).clamp(1, 32) as u32;
    let scale = |rank: usize| -> u128 { ((rank as u128) << bits) / n as u128 };
    let mut ranks: Vec<Vec<u128>> = Vec::with_capacity(columns.len());
    for c in columns {
        let column = batch.column_by_name(c).ok_or_else(|| {
            arrow::error::ArrowError::SchemaError(format!("no column {c:?} to Z-order by"))
        })?;
        let order = sort_to_indices(
            column,
            Some(SortOptions {
                descending: false,
                nulls_first: true,
            }),
            None,
        )?;
        let mut rank = vec![0u128; n];
        for (r, &i) in order.values().iter().enumerate() {
            rank[i as usize] = scale(r);
        }
        ranks.push(rank);
    }
    let mut keys: Vec<(u128, u32)> = (0..n)
        .map(|row| {
            let mut key = 0u128;
            for b in (0..bits).rev() {
                for rank in &ranks {
                    key = (key << 1) | ((rank[row] >> b) & 1);
                }
            }
            (key, row as u32)
        })
        .collect();
    keys.sort_unstable();
    let indices = UInt32Array::from_iter_values(keys.into_iter().map(|(_, row)| row));
    take_record_batch(batch, &indices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray as _, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    #[test]
    fn zorder_clusters_on_both_columns() {
        // A 4×4 grid in row-major order; a Z-curve visits it quadrant by quadrant.
        let xs: Vec<i64> = (0..16).map(|i| i / 4).collect();
        let ys: Vec<i64> = (0..16).map(|i| i % 4).collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("y", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(xs)) as ArrayRef,
                Arc::new(Int64Array::from(ys)) as ArrayRef,
            ],
        )
        .unwrap();
        let out = zorder(&batch, &["x".into(), "y".into()]).unwrap();
        let x = out.column(0).as_primitive::<Int64Type>();
        let y = out.column(1).as_primitive::<Int64Type>();
        // The first quarter of the rows is exactly the low quadrant (x < 2, y < 2).
        let first: Vec<(i64, i64)> = (0..4).map(|i| (x.value(i), y.value(i))).collect();
        assert!(first.iter().all(|&(a, b)| a < 2 && b < 2), "{first:?}");
        // Nothing is lost or doubled.
        let mut all: Vec<(i64, i64)> = (0..16).map(|i| (x.value(i), y.value(i))).collect();
        all.sort_unstable();
        let expected: Vec<(i64, i64)> = (0..16).map(|i| (i / 4, i % 4)).collect();
        assert_eq!(all, expected);
    }
}
