//! Bronze Delta sink: appends change events to one Delta table per source, exactly once.
//!
//! Guarantees:
//! - **Durability**: [`DeltaSink::write`] returns only after the Delta commit holding the batch
//!   succeeded; only then may the pipeline acknowledge the batch's positions.
//! - **Exactly-once**: every commit carries Delta `txn` actions (app id = connector name + stream,
//!   version = the highest position written for that stream) in the same atomic commit as the data
//!   files. [`DeltaSink::committed`] reads them back on start, so the pipeline knows where each
//!   stream resumes, and [`DeltaSink::write`] drops events at or below the committed position, so a
//!   replayed batch writes nothing. A PostgreSQL position needs two integers, so it is stored as two
//!   `txn` app ids (`…:postgres` = commit LSN, `…:postgres:ordinal` = ordinal) in the same commit.
//! - **Crash safety**: data files written by a commit that never happened are referenced by no
//!   version of the table; `vacuum` removes them.
//! - **Concurrency**: commits use the store's atomic put-if-absent (local rename, Azure and S3
//!   conditional put), and delta-rs re-checks and retries a commit that lost a race; appends of
//!   different streams never conflict, a concurrent commit for the *same* stream is rejected by
//!   delta-rs's conflict checker (`txn` app id) instead of duplicating rows.
//! - Checkpoints are written every `checkpoint_interval` commits (table property
//!   `delta.checkpointInterval`).

pub mod bronze;
mod compact;

pub use compact::CompactOutcome;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{RecordBatch, new_null_array};
use arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};

use chrono::Utc;
use deltalake::kernel::Action;
use deltalake::kernel::Transaction;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Add, StructField, StructType, Version};
use deltalake::operations::vacuum::VacuumMode;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};

use crate::config;
use crate::dead_letter::DeadLetter;
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Lsn, Position, RowSchema, StreamId};

/// Name of the dead-letter table under the sink's root.
pub const DLQ_TABLE: &str = "_dlq";

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
/// One Bronze table as `tributary status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BronzeTableSummary {
    pub table: String,
    pub version: u64,
    pub files: usize,
    /// From the data files' statistics.
    pub rows: u64,
    pub last_commit: Option<String>,
}

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

/// Registers the S3 and Azure handlers with delta-rs (idempotent).
fn register_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        deltalake::aws::register_handlers(None);
        deltalake::azure::register_handlers(None);
    });
}

/// The txn app ids (and how to read a position from their versions) for one stream.
fn app_ids(name: &str, stream: &StreamId) -> (String, Option<String>) {
    match stream {
        StreamId::Postgres => (
            format!("{name}:postgres"),
            Some(format!("{name}:postgres:ordinal")),
        ),
        StreamId::Kafka { .. } => (format!("{name}:{stream}"), None),
    }
}

fn txn_actions(name: &str, pos: &Position) -> Vec<Transaction> {
    let (major_id, minor_id) = app_ids(name, &pos.stream());
    match pos {
        Position::Lsn {
            commit_lsn,
            tx_ordinal,
        } => {
            let mut v = vec![Transaction::new(major_id, commit_lsn.0 as i64)];
            if let Some(id) = minor_id {
                v.push(Transaction::new(id, *tx_ordinal as i64));
            }
            v
        }
        Position::Kafka { offset, .. } => vec![Transaction::new(major_id, *offset)],
    }
}

/// Table directory name for a source (`public.orders` → `public.orders`; `/` is not allowed).
fn table_dir(source: &str) -> String {
    source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
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

    /// The tables under the root (each sub-directory holding a `_delta_log`), `_dlq` included.
    pub async fn existing_tables(&self) -> Result<Vec<String>, DeltaSinkError> {
        let cfg_err = |message: String| DeltaSinkError::Config {
            uri: self.root.clone(),
            message,
        };
        let (store, prefix) =
            crate::storage::open(&self.root, &self.storage).map_err(|e| cfg_err(e.to_string()))?;
        let listing = store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| cfg_err(e.to_string()))?;
        let mut tables = Vec::new();
        for dir in listing.common_prefixes {
            let log = dir.clone().join("_delta_log");
            let inner = store
                .list_with_delimiter(Some(&log))
                .await
                .map_err(|e| cfg_err(e.to_string()))?;
            if let (false, Some(name)) = (inner.objects.is_empty(), dir.filename()) {
                tables.push(name.to_owned());
            }
        }
        tables.sort();
        Ok(tables)
    }

    /// The URI of the table for `source`.
    pub fn table_uri(&self, source: &str) -> String {
        format!("{}/{}", self.root, table_dir(source))
    }

    fn url(&self, source: &str) -> Result<url::Url, DeltaSinkError> {
        let uri = self.table_uri(source);
        let cfg_err = |message: String| DeltaSinkError::Config {
            uri: uri.clone(),
            message,
        };
        if uri.contains("://") {
            if let Some(path) = uri.strip_prefix("file://") {
                std::fs::create_dir_all(path)
                    .map_err(|e| cfg_err(format!("cannot create {path}: {e}")))?;
            }
            url::Url::parse(&uri).map_err(|e| cfg_err(e.to_string()))
        } else {
            std::fs::create_dir_all(&uri).map_err(|e| cfg_err(format!("cannot create: {e}")))?;
            let abs = std::path::absolute(&uri).map_err(|e| cfg_err(e.to_string()))?;
            url::Url::from_directory_path(abs).map_err(|()| cfg_err("not a local path".into()))
        }
    }

    /// Version, data files, row count (from the files' statistics) and last commit time of the
    /// existing table in folder `dir` (a name from [`existing_tables`](Self::existing_tables)).
    pub async fn summary(&self, dir: &str) -> Result<BronzeTableSummary, DeltaSinkError> {
        let delta_err = |source_err| DeltaSinkError::Delta {
            table: dir.to_owned(),
            source: source_err,
        };
        let table = DeltaTableBuilder::from_url(self.url(dir)?)
            .map_err(delta_err)?
            .with_storage_options(self.options.clone())
            .load()
            .await
            .map_err(delta_err)?;
        let state = table.snapshot().map_err(delta_err)?;
        let version = state.version();
        let files = state.log_data();
        let rows = files
            .iter()
            .filter_map(|f| f.stats())
            .filter_map(|s| {
                serde_json::from_str::<serde_json::Value>(&s)
                    .ok()?
                    .get("numRecords")?
                    .as_u64()
            })
            .sum();
        Ok(BronzeTableSummary {
            table: dir.to_owned(),
            version,
            files: files.num_files(),
            rows,
            last_commit: state
                .version_timestamp(version)
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339()),
        })
    }

    /// Opens the table for `source`, creating it with `schema` when it does not exist.
    async fn table(
        &mut self,
        source: &str,
        schema: &arrow::datatypes::Schema,
    ) -> Result<&mut DeltaTable, DeltaSinkError> {
        if !self.tables.contains_key(source) {
            let delta_err = |source_err| DeltaSinkError::Delta {
                table: source.to_owned(),
                source: source_err,
            };
            let url = self.url(source)?;
            let table = DeltaTableBuilder::from_url(url)
                .map_err(delta_err)?
                .with_storage_options(self.options.clone())
                .build()
                .map_err(delta_err)?;
            let columns: StructType = schema.try_into_kernel().map_err(|e| delta_err(e.into()))?;
            let table = table
                .create()
                .with_columns(columns.fields().cloned())
                .with_partition_columns([bronze::PARTITION_COLUMN])
                .with_configuration_property(
                    deltalake::TableProperty::CheckpointInterval,
                    Some(self.checkpoint_interval.to_string()),
                )
                .with_save_mode(SaveMode::Ignore)
                .await
                .map_err(delta_err)?;
            self.tables.insert(source.to_owned(), table);
        }
        let table = self
            .tables
            .get_mut(source)
            .ok_or_else(|| DeltaSinkError::Config {
                uri: source.to_owned(),
                message: "table vanished from the cache".into(),
            })?;
        Ok(table)
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
                Some(error) => {
                    if self.reported.insert(error.clone()) {
                        tracing::error!(table = source, %error, "incompatible schema change: events go to the dead-letter table");
                    }
                    metrics::counter!("tributary_delta_schema_rejections_total", "table" => source.to_owned()).increment(1);
                    let raw = serde_json::to_vec(e).unwrap_or_default();
                    let key = (!e.key.is_empty()).then(|| e.key.to_json().to_string());
                    letters.push(DeadLetter::new(
                        source,
                        e.position.clone(),
                        key,
                        &raw,
                        error,
                    ));
                }
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
            let mut backoff = retry_policy();
            let mut recheck = false;
            let result = loop {
                match self.commit_buffer(&source, &mut buffer, recheck).await {
                    Err(e) if e.is_retryable() => match backoff.next() {
                        Some(delay) => {
                            tracing::warn!(table = %source, error = %e, ?delay, "delta commit failed, retrying");
                            if let Some(h) = &self.health {
                                h.commit_failed(&e);
                            }
                            self.tables.remove(&source);
                            tokio::time::sleep(delay).await;
                            recheck = true;
                        }
                        None => break Err(e),
                    },
                    other => break other,
                }
            };
            match result {
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
        let current = table_arrow_schema(table).map_err(delta_err)?;
        let added: Vec<&arrow::datatypes::FieldRef> = buffer
            .schema
            .fields()
            .iter()
            .filter(|f| current.field_with_name(f.name()).is_err())
            .collect();
        if !added.is_empty() {
            let mut fields = Vec::with_capacity(added.len());
            for f in &added {
                let field: StructField = f
                    .as_ref()
                    .try_into_kernel()
                    .map_err(|e| delta_err(e.into()))?;
                fields.push(field);
            }
            let names: Vec<&str> = added.iter().map(|f| f.name().as_str()).collect();
            let evolved = table
                .clone()
                .add_columns()
                .with_fields(fields)
                .await
                .map_err(delta_err)?;
            *table = evolved;
            tracing::info!(table = source, columns = ?names, "Bronze table schema evolved");
        }
        let txns: Vec<Transaction> = buffer
            .highest
            .values()
            .flat_map(|p| txn_actions(&name, p))
            .collect();
        // The background encoder has been writing the files while rows arrived; on a retry,
        // after a schema change or if it failed, the files are written here from the batches.
        let encoded = match buffer.encoder.take() {
            Some(encoder) if !recheck && added.is_empty() => match encoder.finish().await {
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

    /// Appends dead letters to the `_dlq` table, exactly once per (stream, position), and
    /// returns once they are durable.
    pub async fn write_dead_letters(
        &mut self,
        letters: &[DeadLetter],
    ) -> Result<WriteOutcome, DeltaSinkError> {
        let mut backoff = retry_policy();
        loop {
            match self.write_dead_letters_once(letters).await {
                Err(e) if e.is_retryable() => match backoff.next() {
                    Some(delay) => {
                        tracing::warn!(table = DLQ_TABLE, error = %e, ?delay, "delta commit failed, retrying");
                        if let Some(h) = &self.health {
                            h.commit_failed(&e);
                        }
                        self.tables.remove(DLQ_TABLE);
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    async fn write_dead_letters_once(
        &mut self,
        letters: &[DeadLetter],
    ) -> Result<WriteOutcome, DeltaSinkError> {
        let name = format!("{}:dlq", self.name);
        let table = self.table(DLQ_TABLE, &bronze::dlq_schema()).await?;
        let mut committed: BTreeMap<StreamId, Option<Position>> = BTreeMap::new();
        for d in letters {
            let stream = d.position.stream();
            if let std::collections::btree_map::Entry::Vacant(slot) = committed.entry(stream) {
                let c = committed_in(table, &name, DLQ_TABLE, slot.key()).await?;
                slot.insert(c);
            }
        }
        let fresh: Vec<&DeadLetter> = letters
            .iter()
            .filter(|d| match committed.get(&d.position.stream()) {
                Some(Some(c)) => d.position > *c,
                _ => true,
            })
            .collect();
        if fresh.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let batch = bronze::dead_letters_to_batch(&fresh).map_err(|e| DeltaSinkError::Arrow {
            table: DLQ_TABLE.to_owned(),
            source: e,
        })?;
        let mut highest: BTreeMap<StreamId, &Position> = BTreeMap::new();
        for d in &fresh {
            let e = highest.entry(d.position.stream()).or_insert(&d.position);
            if d.position > **e {
                *e = &d.position;
            }
        }
        let txns = highest
            .values()
            .flat_map(|p| txn_actions(&name, p))
            .collect();
        let rows = batch.num_rows();
        let version = commit_files(table, DLQ_TABLE, &[batch], txns).await?;
        Ok(WriteOutcome {
            rows,
            version: Some(version),
            rejected: Vec::new(),
        })
    }

    /// The current version of the table of `source`, freshly loaded (not the writer's cached
    /// one); `None` when nothing was ever written there.
    async fn load_existing(&self, source: &str) -> Result<Option<DeltaTable>, DeltaSinkError> {
        let delta_err = |e| DeltaSinkError::Delta {
            table: source.to_owned(),
            source: e,
        };
        let mut table = DeltaTableBuilder::from_url(self.url(source)?)
            .map_err(delta_err)?
            .with_storage_options(self.options.clone())
            .build()
            .map_err(delta_err)?;
        match table.load().await {
            Ok(()) => Ok(Some(table)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(delta_err(e)),
        }
    }

    /// Removes files no table version within `retention` references, including data files of
    /// commits that never happened (full mode: unreferenced files older than `retention`). Safe
    /// beside a running writer as long as `retention` exceeds the time a writer takes between
    /// writing a data file and committing it (seconds): vacuum commits no data change.
    pub async fn vacuum(
        &mut self,
        source: &str,
        retention: Duration,
    ) -> Result<usize, DeltaSinkError> {
        let delta_err = |e| DeltaSinkError::Delta {
            table: source.to_owned(),
            source: e,
        };
        // Nothing was ever written for this source: nothing to vacuum.
        let Some(table) = self.load_existing(source).await? else {
            return Ok(0);
        };
        let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7));
        let (_, metrics) = table
            .vacuum()
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .with_mode(VacuumMode::Full)
            .await
            .map_err(delta_err)?;
        self.tables.remove(source);
        Ok(metrics.files_deleted.len())
    }
}

/// Backoff for an unavailable store: 200 ms doubling to 30 s, for about 15 minutes in all
/// (object_store retries each request for a few seconds underneath); then the error stops the
/// run, and a restart resumes from what is committed.
fn retry_policy() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_max_times(36)
        .with_jitter()
        .build()
}

async fn committed_in(
    table: &mut DeltaTable,
    name: &str,
    source: &str,
    stream: &StreamId,
) -> Result<Option<Position>, DeltaSinkError> {
    let delta_err = |e| DeltaSinkError::Delta {
        table: source.to_owned(),
        source: e,
    };
    table.update_state().await.map_err(delta_err)?;
    let log_store = table.log_store();
    let state = table.snapshot().map_err(delta_err)?;
    let (major_id, minor_id) = app_ids(name, stream);
    let Some(major) = state
        .transaction_version(log_store.as_ref(), &major_id)
        .await
        .map_err(delta_err)?
    else {
        return Ok(None);
    };
    Ok(Some(match stream {
        StreamId::Postgres => {
            let minor = match minor_id {
                Some(id) => state
                    .transaction_version(log_store.as_ref(), id)
                    .await
                    .map_err(delta_err)?
                    .unwrap_or(i64::MAX),
                None => i64::MAX,
            };
            Position::Lsn {
                commit_lsn: Lsn(major as u64),
                tx_ordinal: minor as u64,
            }
        }
        StreamId::Kafka { topic, partition } => Position::Kafka {
            topic: topic.clone(),
            partition: *partition,
            offset: major,
        },
    }))
}

/// The table's current schema in Arrow form.
fn table_arrow_schema(table: &DeltaTable) -> Result<SchemaRef, DeltaTableError> {
    Ok(table.snapshot()?.snapshot().arrow_schema())
}

/// The table schema that holds `events`: `base` plus a nullable typed column for every column
/// an event's source schema declares and the table lacks. Per event, `Some(reason)` when one of
/// its declared columns has a type the table cannot hold (an incompatible change): such an event
/// is a dead letter, never silently dropped or coerced.
fn evolve(
    source: &str,
    base: &SchemaRef,
    events: &[&ChangeEvent],
) -> (SchemaRef, Vec<Option<String>>) {
    let mut fields: Vec<FieldRef> = base.fields().iter().cloned().collect();
    let mut verdicts: HashMap<*const RowSchema, Option<String>> = HashMap::new();
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let Some(schema) = &e.schema else {
            out.push(None);
            continue;
        };
        let verdict = verdicts
            .entry(Arc::as_ptr(schema))
            .or_insert_with(|| {
                let mut new = Vec::new();
                for (name, ty) in &schema.columns {
                    // A source column named like a metadata column stays in `_payload`.
                    if bronze::METADATA_COLUMNS.contains(&name.as_str()) {
                        continue;
                    }
                    let wanted = bronze::arrow_type(*ty);
                    match fields.iter().find(|f| f.name() == name) {
                        Some(f) if bronze::same_type(f.data_type(), &wanted) => {}
                        Some(f) => {
                            return Some(format!(
                                "Bronze table {source}: column {name:?} is {} in the table but the \
                                 source now sends {ty:?} values ({wanted}); an incompatible \
                                 schema change (rewrite the table, or route the source to a new \
                                 table, to accept it)",
                                f.data_type()
                            ));
                        }
                        None => new.push(Arc::new(Field::new(name, wanted, true))),
                    }
                }
                fields.extend(new);
                None
            })
            .clone();
        out.push(verdict);
    }
    (Arc::new(Schema::new(fields)), out)
}

/// Rows of one table waiting for their commit.
struct Buffer {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    /// The streams of the buffered rows; `row_streams` holds each row's index into it, so rows
    /// another writer committed meanwhile can be dropped on a retry.
    streams: Vec<StreamId>,
    row_streams: Vec<u32>,
    /// The highest buffered position of each stream (the commit's `txn` versions).
    highest: BTreeMap<StreamId, Position>,
    rows: usize,
    bytes: usize,
    since: tokio::time::Instant,
    /// Encodes the batches to Parquet on another task while more rows arrive (`None` once the
    /// schema changed under it: the flush then writes the files itself).
    encoder: Option<Encoder>,
    /// Data files written by a commit attempt that failed, for the retry.
    written: Option<Vec<Add>>,
}

/// Parquet encoding of a buffer's batches on a task of its own, so that building the next Arrow
/// batch and encoding the previous one use both cores; the files are uploaded as they fill and
/// committed by the flush (files of a flush that never commits are referenced by no version, and
/// `vacuum` removes them).
struct Encoder {
    tx: Option<tokio::sync::mpsc::Sender<RecordBatch>>,
    task: Option<tokio::task::JoinHandle<Result<Vec<Add>, DeltaTableError>>>,
}

impl Encoder {
    fn start(mut writer: RecordBatchWriter) -> Self {
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
    async fn send(&self, batch: RecordBatch) -> bool {
        match &self.tx {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        }
    }

    /// Finishes the files and returns their `add` actions.
    async fn finish(mut self) -> Result<Vec<Add>, String> {
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
    fn new(schema: SchemaRef) -> Self {
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

    fn push<'a>(&mut self, batch: RecordBatch, positions: impl Iterator<Item = &'a Position>) {
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
    fn widen(&mut self, schema: &SchemaRef) -> Result<(), arrow::error::ArrowError> {
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
    fn drop_committed(
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
async fn commit_files(
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
