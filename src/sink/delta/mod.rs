//! Bronze Delta sink: appends change events to one Delta table per source, and dead letters to
//! the `_dlq` table beside them, exactly once.
//!
//! [`DeltaSink::append`] only buffers a source's events (Parquet encoding starts in the background,
//! `buffer.rs`); [`DeltaSink::flush`] commits every buffered table; [`DeltaSink::write`] does both.
//! [`DeltaSink::should_flush`] says when a flush is due: a table buffered `flush_rows` rows, the
//! buffers hold `flush_mb`, or the oldest buffered row waited `flush_interval_ms`.
//!
//! Guarantees:
//! - **Durability**: [`DeltaSink::flush`] returns only after the Delta commit of every buffered
//!   table succeeded (one atomic commit per table); only then may the pipeline acknowledge the
//!   buffered positions. Nothing appended is durable before.
//! - **Exactly-once**: every commit carries Delta `txn` actions (app id = connector name + stream,
//!   version = the highest position committed for that stream) in the same atomic commit as the
//!   data files (`txn.rs`). The first time a stream reaches a table, [`DeltaSink::append`] reads
//!   its committed position back ([`DeltaSink::committed`]) and skips events at or below it, or
//!   at or below what is already buffered, so a replayed batch writes nothing. Dead letters get
//!   the same treatment in `_dlq` (`dlq.rs`).
//! - **Retries**: a flush retries an unavailable store with bounded exponential backoff (about
//!   15 minutes); each retry first re-reads the committed positions and drops the rows already
//!   there, so a commit that succeeded although its response was lost is not written twice
//!   (`commit.rs`). When the retries run out the error is returned, the buffers are dropped and
//!   what was seen is forgotten, so the events are taken again when the source replays them.
//! - **Schema evolution**: a column a source declares and the table lacks becomes a typed column,
//!   added before the data that fills it; an event whose column changed type incompatibly is
//!   returned by [`DeltaSink::append`] as a dead letter for `_dlq`, never coerced (`schema.rs`).
//! - **Crash safety**: data files written by a commit that never happened (including files the
//!   background encoder uploaded) are referenced by no version of the table;
//!   [`DeltaSink::vacuum`] removes them.
//! - **Concurrency**: commits use the store's atomic put-if-absent (local rename, Azure and S3
//!   conditional put; [`DeltaSink::new`] refuses a configuration that disables it), and delta-rs
//!   re-checks and retries a commit that lost a race; appends of different streams never
//!   conflict, a concurrent commit for the *same* stream is rejected by delta-rs's conflict
//!   checker (`txn` app id), and the retry then drops the rows the other writer committed instead
//!   of duplicating them.
//! - Checkpoints are written every `checkpoint_interval` commits (table property
//!   `delta.checkpointInterval`, set when the sink creates the table).

pub mod bronze;
mod buffer;
mod commit;
mod compact;
mod dlq;
mod maintenance;
mod schema;
mod sink;
mod tables;
mod txn;

pub use compact::CompactOutcome;
pub use dlq::DLQ_TABLE;
pub use tables::BronzeTableSummary;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use deltalake::kernel::Version;
use deltalake::writer::RecordBatchWriter;
use deltalake::{DeltaTable, DeltaTableError};

use crate::config;
use crate::dead_letter::DeadLetter;
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Position, StreamId};
use buffer::{Buffer, Encoder};
use schema::{evolve, table_arrow_schema};
use tables::register_handlers;
use txn::committed_in;

#[derive(Debug, thiserror::Error)]
pub enum DeltaSinkError {
    #[error("[sinks.delta] uri {uri:?}: {message}")]
    Config { uri: String, message: String },
    #[error("Delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
    #[error("Delta table {table}: cannot build the batch: {source}")]
    Arrow {
        table: String,
        #[source]
        source: arrow::error::ArrowError,
    },
}

impl Classify for DeltaSinkError {
    fn kind(&self) -> ErrorKind {
        match self {
            DeltaSinkError::Config { .. } => ErrorKind::Config,
            DeltaSinkError::Arrow { .. } => ErrorKind::Data,
            DeltaSinkError::Delta { source, .. } => match source {
                DeltaTableError::ObjectStore { .. }
                | DeltaTableError::Io { .. }
                | DeltaTableError::Transaction { .. }
                | DeltaTableError::VersionAlreadyExists(_) => ErrorKind::Connection,
                DeltaTableError::InvalidTableLocation(_) | DeltaTableError::NotATable(_) => {
                    ErrorKind::Config
                }
                // Writing a data file failed in the store underneath the Parquet writer.
                DeltaTableError::Parquet {
                    source: parquet::errors::ParquetError::External(_),
                } => ErrorKind::Connection,
                // The batch does not fit the table: retrying cannot help.
                DeltaTableError::SchemaMismatch { .. }
                | DeltaTableError::Arrow { .. }
                | DeltaTableError::Parquet { .. } => ErrorKind::Data,
                // Anything else from the store or the log is treated as transient.
                _ => ErrorKind::Connection,
            },
        }
    }
}

/// What a [`DeltaSink::write`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteOutcome {
    /// Rows appended (0 when the whole batch was already committed).
    pub rows: usize,
    /// The table version committed, `None` when nothing was written.
    pub version: Option<Version>,
    /// Events Bronze cannot hold (an incompatible schema change), as dead letters for `_dlq`.
    pub rejected: Vec<DeadLetter>,
}

/// What a [`DeltaSink::flush`] committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    pub rows: usize,
    /// The version committed per table.
    pub versions: Vec<(String, Version)>,
}

/// How `compact` rewrites files.
#[derive(Debug, Clone)]
struct CompactPolicy {
    target_bytes: u64,
    zorder: Vec<String>,
}

/// When buffered rows are committed: whichever limit is reached first.
#[derive(Debug, Clone, Copy)]
struct FlushPolicy {
    rows: usize,
    bytes: usize,
    interval: Duration,
}

/// Writes Bronze tables (and `_dlq`) under one root URI.
pub struct DeltaSink {
    name: String,
    root: String,
    options: HashMap<String, String>,
    storage: crate::secret::SecretMap,
    checkpoint_interval: u64,
    flush: FlushPolicy,
    compact: CompactPolicy,
    tables: HashMap<String, DeltaTable>,
    /// Per (table, stream): the highest position committed or buffered (`None`: nothing).
    seen: HashMap<(String, StreamId), Option<Position>>,
    buffers: BTreeMap<String, Buffer>,
    /// Schema errors already logged (each is logged once, counted every time).
    reported: HashSet<String>,
    /// Told about every failed commit attempt, so readiness turns red during a store outage.
    health: Option<crate::telemetry::health::SinkHealth>,
}

impl std::fmt::Debug for DeltaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The storage options hold credentials: never print them.
        f.debug_struct("DeltaSink")
            .field("name", &self.name)
            .field("root", &self.root)
            .field("tables", &self.tables.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl DeltaSink {
    /// Prepares the sink; tables are opened (or created) on first use.
    pub fn new(
        connector_name: &str,
        cfg: &config::DeltaSinkConfig,
    ) -> Result<Self, DeltaSinkError> {
        register_handlers();
        let options: HashMap<String, String> = cfg
            .storage
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let disabled = |k: &str| {
            options
                .iter()
                .any(|(key, v)| key.eq_ignore_ascii_case(k) && v.eq_ignore_ascii_case("disabled"))
        };
        if disabled("aws_conditional_put") || disabled("conditional_put") {
            return Err(DeltaSinkError::Config {
                uri: cfg.uri.clone(),
                message: "S3 commits need conditional put (If-None-Match) to be safe without a \
                          lock; remove `conditional_put = \"disabled\"` from \
                          [sinks.delta.storage] (or set AWS_S3_ALLOW_UNSAFE_RENAME=true to accept \
                          unsafe concurrent commits with a single writer)"
                    .into(),
            });
        }
        Ok(DeltaSink {
            name: connector_name.to_owned(),
            root: cfg.uri.trim_end_matches('/').to_owned(),
            options,
            storage: cfg.storage.clone(),
            checkpoint_interval: cfg.checkpoint_interval,
            flush: FlushPolicy {
                rows: cfg.flush_rows,
                bytes: cfg.flush_mb.saturating_mul(1 << 20),
                interval: Duration::from_millis(cfg.flush_interval_ms),
            },
            compact: CompactPolicy {
                target_bytes: cfg.compact_target_mb.saturating_mul(1 << 20),
                zorder: cfg.zorder_columns.clone(),
            },
            tables: HashMap::new(),
            seen: HashMap::new(),
            buffers: BTreeMap::new(),
            reported: HashSet::new(),
            health: None,
        })
    }

    /// Reports every failed commit attempt (retried or not) to `health`.
    pub fn with_health(mut self, health: crate::telemetry::health::SinkHealth) -> Self {
        self.health = Some(health);
        self
    }

    /// The highest position of `stream` committed to the table of `source` (where the stream
    /// must resume: after it), or `None` when nothing of that stream was committed.
    pub async fn committed(
        &mut self,
        source: &str,
        stream: &StreamId,
    ) -> Result<Option<Position>, DeltaSinkError> {
        let name = self.name.clone();
        let table = self.table(source, &bronze::bronze_schema()).await?;
        committed_in(table, &name, source, stream).await
    }

    /// The highest position of `stream` the table of `source` holds or the buffer will commit.
    async fn seen(
        &mut self,
        source: &str,
        stream: &StreamId,
    ) -> Result<Option<Position>, DeltaSinkError> {
        let key = (source.to_owned(), stream.clone());
        if let Some(p) = self.seen.get(&key) {
            return Ok(p.clone());
        }
        let p = self.committed(source, stream).await?;
        self.seen.insert(key, p.clone());
        Ok(p)
    }

    /// Buffers `events` (all of one source) for the next commit of its table and returns the
    /// events that cannot go to Bronze as dead letters (a column whose type changed
    /// incompatibly). Events at or below a stream's committed (or already buffered) position
    /// are skipped. Nothing is durable until [`flush`](Self::flush) returns.
    pub async fn append(
        &mut self,
        source: &str,
        events: &[ChangeEvent],
    ) -> Result<Vec<DeadLetter>, DeltaSinkError> {
        let mut fresh = Vec::with_capacity(events.len());
        let mut last: Option<(StreamId, Option<Position>)> = None;
        for e in events {
            let stream = e.position.stream();
            if last.as_ref().is_none_or(|(s, _)| *s != stream) {
                let seen = self.seen(source, &stream).await?;
                last = Some((stream, seen));
            }
            if let Some((_, Some(seen))) = &last
                && e.position <= *seen
            {
                continue;
            }
            fresh.push(e);
        }
        if fresh.is_empty() {
            return Ok(Vec::new());
        }
        let base = match self.buffers.get(source) {
            Some(b) => b.schema.clone(),
            None => {
                let table = self.table(source, &bronze::bronze_schema()).await?;
                table_arrow_schema(table).map_err(|e| DeltaSinkError::Delta {
                    table: source.to_owned(),
                    source: e,
                })?
            }
        };
        let (schema, verdicts) = evolve(source, &base, &fresh);
        let mut letters = Vec::new();
        let mut accepted = Vec::with_capacity(fresh.len());
        for (e, verdict) in fresh.into_iter().zip(verdicts) {
            match verdict {
                None => accepted.push(e),
                Some(error) => letters.push(self.reject(source, e, error)),
            }
        }
        if accepted.is_empty() {
            self.note_seen(source, events);
            return Ok(letters);
        }
        let arrow_err = |e| DeltaSinkError::Arrow {
            table: source.to_owned(),
            source: e,
        };
        let batch = bronze::events_to_batch(&accepted, &schema, Utc::now()).map_err(arrow_err)?;
        if !self.buffers.contains_key(source) {
            let mut buffer = Buffer::new(schema.clone());
            // Encode in the background when the table already has every column of the batch
            // (`base` is the table's schema here; `evolve` only appends columns to it).
            let table = self.table(source, &bronze::bronze_schema()).await?;
            if base.fields().len() == schema.fields().len()
                && let Ok(writer) = RecordBatchWriter::for_table(table)
            {
                buffer.encoder = Some(Encoder::start(writer));
            }
            self.buffers.insert(source.to_owned(), buffer);
        }
        let Some(buffer) = self.buffers.get_mut(source) else {
            return Ok(letters);
        };
        if buffer.schema != schema {
            buffer.widen(&schema).map_err(arrow_err)?;
        }
        if let Some(encoder) = &buffer.encoder
            && !encoder.send(batch.clone()).await
        {
            buffer.encoder = None;
        }
        buffer.push(batch, accepted.iter().map(|e| &e.position));
        self.note_seen(source, events);
        Ok(letters)
    }

    /// Remembers the last position of each stream in `events` as seen (buffered or rejected).
    fn note_seen(&mut self, source: &str, events: &[ChangeEvent]) {
        for e in events {
            let key = (source.to_owned(), e.position.stream());
            let newer = match self.seen.get(&key) {
                Some(Some(p)) => e.position > *p,
                _ => true,
            };
            if newer {
                self.seen.insert(key, Some(e.position.clone()));
            }
        }
    }

    /// Whether a buffered table reached `flush_rows` or the buffers `flush_mb`, or the oldest
    /// buffered row waited `flush_interval_ms`.
    pub fn should_flush(&self) -> bool {
        let bytes: usize = self.buffers.values().map(|b| b.bytes).sum();
        self.buffers.values().any(|b| b.rows >= self.flush.rows)
            || bytes >= self.flush.bytes
            || self
                .flush_deadline()
                .is_some_and(|d| d <= tokio::time::Instant::now())
    }

    /// When the oldest buffered row has waited `flush_interval_ms` (`None`: nothing buffered).
    pub fn flush_deadline(&self) -> Option<tokio::time::Instant> {
        self.buffers
            .values()
            .map(|b| b.since + self.flush.interval)
            .min()
    }

    /// Rows buffered and not yet committed.
    pub fn buffered_rows(&self) -> usize {
        self.buffers.values().map(|b| b.rows).sum()
    }

    /// Commits every buffered table (one atomic commit each, with its `txn` versions) and
    /// returns once all are durable. A store that is unavailable is retried with bounded
    /// exponential backoff; each retry first re-reads the committed positions and drops the
    /// rows already there, so a commit that succeeded although its response was lost is not
    /// written twice.
    pub async fn flush(&mut self) -> Result<FlushOutcome, DeltaSinkError> {
        let mut outcome = FlushOutcome::default();
        let sources: Vec<String> = self.buffers.keys().cloned().collect();
        for source in sources {
            let Some(mut buffer) = self.buffers.remove(&source) else {
                continue;
            };
            match self.commit_retrying(&source, &mut buffer).await {
                Ok(Some(version)) => {
                    outcome.rows += buffer.rows;
                    outcome.versions.push((source, version));
                }
                Ok(None) => {}
                Err(e) => {
                    // Whatever was buffered is dropped: forget what was seen, so the events
                    // are taken again when the source replays them.
                    self.buffers.clear();
                    self.seen.clear();
                    return Err(e);
                }
            }
        }
        Ok(outcome)
    }

    /// Buffers `events` and commits them at once: [`append`](Self::append) + [`flush`](Self::flush).
    pub async fn write(
        &mut self,
        source: &str,
        events: &[ChangeEvent],
    ) -> Result<WriteOutcome, DeltaSinkError> {
        let rejected = self.append(source, events).await?;
        let flushed = self.flush().await?;
        Ok(WriteOutcome {
            rows: flushed.rows,
            version: flushed.versions.iter().map(|(_, v)| *v).max(),
            rejected,
        })
    }

    /// Appends dead letters to the `_dlq` table, exactly once per (stream, position), and
    /// returns once they are durable.
    pub async fn write_dead_letters(
        &mut self,
        letters: &[DeadLetter],
    ) -> Result<WriteOutcome, DeltaSinkError> {
        let mut retry = self.commit_retry("Delta dead-letter commit");
        loop {
            match self.write_dead_letters_once(letters).await {
                Err(e) => {
                    retry.after(e).await?;
                    self.tables.remove(DLQ_TABLE);
                }
                ok => return ok,
            }
        }
    }
}
