//! The rows of one table waiting for their commit, and their Parquet encoding in the background.
//!
//! Guarantees: the buffer knows, per stream, the highest position it holds (the commit's `txn`
//! versions) and which stream each row came from, so a retry can drop exactly the rows another
//! attempt already committed; a stream left without rows writes no `txn` version. Files the
//! background [`Encoder`] uploads are referenced by no table version until the flush commits
//! them, so a flush that never commits leaves only files `vacuum` removes.

use std::collections::BTreeMap;

use arrow::array::{RecordBatch, new_null_array};
use arrow::datatypes::SchemaRef;
use deltalake::DeltaTableError;
use deltalake::kernel::Add;
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};

use super::bronze;
use crate::event::{Position, StreamId};

/// Rows of one table waiting for their commit.
pub(super) struct Buffer {
    pub(super) schema: SchemaRef,
    pub(super) batches: Vec<RecordBatch>,
    /// The streams of the buffered rows; `row_streams` holds each row's index into it, so rows
    /// another writer committed meanwhile can be dropped on a retry.
    pub(super) streams: Vec<StreamId>,
    row_streams: Vec<u32>,
    /// The highest buffered position of each stream (the commit's `txn` versions).
    pub(super) highest: BTreeMap<StreamId, Position>,
    pub(super) rows: usize,
    pub(super) bytes: usize,
    pub(super) since: tokio::time::Instant,
    /// Encodes the batches to Parquet on another task while more rows arrive (`None` once the
    /// schema changed under it: the flush then writes the files itself).
    pub(super) encoder: Option<Encoder>,
    /// Data files written by a commit attempt that failed, for the retry.
    pub(super) written: Option<Vec<Add>>,
}

/// Parquet encoding of a buffer's batches on a task of its own, so that building the next Arrow
/// batch and encoding the previous one use both cores; the files are uploaded as they fill and
/// committed by the flush (files of a flush that never commits are referenced by no version, and
/// `vacuum` removes them).
pub(super) struct Encoder {
    tx: Option<tokio::sync::mpsc::Sender<RecordBatch>>,
    task: Option<tokio::task::JoinHandle<Result<Vec<Add>, DeltaTableError>>>,
}

impl Encoder {
    pub(super) fn start(mut writer: RecordBatchWriter) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<RecordBatch>(2);
        let task = tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                writer.write(batch).await?;
            }
            writer.flush().await
        });
        Encoder {
            tx: Some(tx),
            task: Some(task),
        }
    }

    /// Hands a batch over; `false` when the encoder has stopped (it failed).
    pub(super) async fn send(&self, batch: RecordBatch) -> bool {
        match &self.tx {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        }
    }

    /// Finishes the files and returns their `add` actions.
    pub(super) async fn finish(mut self) -> Result<Vec<Add>, String> {
        drop(self.tx.take());
        match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            None => Err("encoder already finished".into()),
        }
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Buffer {
    pub(super) fn new(schema: SchemaRef) -> Self {
        Buffer {
            schema,
            encoder: None,
            written: None,
            batches: Vec::new(),
            streams: Vec::new(),
            row_streams: Vec::new(),
            highest: BTreeMap::new(),
            rows: 0,
            bytes: 0,
            since: tokio::time::Instant::now(),
        }
    }

    pub(super) fn push<'a>(
        &mut self,
        batch: RecordBatch,
        positions: impl Iterator<Item = &'a Position>,
    ) {
        for p in positions {
            let stream = p.stream();
            let i = match self.streams.iter().position(|s| *s == stream) {
                Some(i) => i,
                None => {
                    self.streams.push(stream.clone());
                    self.streams.len() - 1
                }
            };
            self.row_streams.push(i as u32);
            match self.highest.get(&stream) {
                Some(h) if p <= h => {}
                _ => {
                    self.highest.insert(stream, p.clone());
                }
            }
        }
        self.rows += batch.num_rows();
        self.bytes += batch.get_array_memory_size();
        self.batches.push(batch);
    }

    /// Re-lays the buffered batches out in `schema` (which only adds columns, filled with nulls).
    pub(super) fn widen(&mut self, schema: &SchemaRef) -> Result<(), arrow::error::ArrowError> {
        self.encoder = None;
        self.written = None;
        for batch in &mut self.batches {
            let columns = schema
                .fields()
                .iter()
                .map(|f| match batch.column_by_name(f.name()) {
                    Some(c) => c.clone(),
                    None => new_null_array(f.data_type(), batch.num_rows()),
                })
                .collect();
            *batch = RecordBatch::try_new(schema.clone(), columns)?;
        }
        self.schema = schema.clone();
        Ok(())
    }

    /// Drops the rows at or below `committed[i]` for stream `i`.
    pub(super) fn drop_committed(
        &mut self,
        committed: &[Option<Position>],
    ) -> Result<(), arrow::error::ArrowError> {
        use arrow::array::{AsArray as _, BooleanArray};
        use arrow::datatypes::Int64Type;
        let limits: Vec<Option<(i64, i64)>> = committed
            .iter()
            .map(|c| c.as_ref().map(bronze::position_parts))
            .collect();
        let mut offset = 0;
        let mut kept_streams = Vec::with_capacity(self.row_streams.len());
        let mut rows = 0;
        for batch in &mut self.batches {
            let major = batch
                .column_by_name("_position_major")
                .map(|c| c.as_primitive::<Int64Type>().clone());
            let minor = batch
                .column_by_name("_position_minor")
                .map(|c| c.as_primitive::<Int64Type>().clone());
            let (Some(major), Some(minor)) = (major, minor) else {
                return Err(arrow::error::ArrowError::SchemaError(
                    "buffered batch without position columns".into(),
                ));
            };
            let keep: BooleanArray = (0..batch.num_rows())
                .map(|r| {
                    let stream = self.row_streams[offset + r] as usize;
                    let keep =
                        limits[stream].is_none_or(|limit| (major.value(r), minor.value(r)) > limit);
                    if keep {
                        kept_streams.push(stream as u32);
                    }
                    Some(keep)
                })
                .collect();
            offset += batch.num_rows();
            *batch = arrow::compute::filter_record_batch(batch, &keep)?;
            rows += batch.num_rows();
        }
        self.batches.retain(|b| b.num_rows() > 0);
        self.row_streams = kept_streams;
        self.rows = rows;
        // A stream left without rows must not write its (now stale) `txn` version.
        let live: std::collections::BTreeSet<u32> = self.row_streams.iter().copied().collect();
        let streams = self.streams.clone();
        self.highest.retain(|s, _| {
            streams
                .iter()
                .position(|x| x == s)
                .is_some_and(|i| live.contains(&(i as u32)))
        });
        Ok(())
    }
}
