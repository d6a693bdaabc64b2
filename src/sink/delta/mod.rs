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

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::Utc;
use deltalake::kernel::Action;
use deltalake::kernel::Transaction;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{StructType, Version};
use deltalake::operations::vacuum::VacuumMode;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};

use crate::config;
use crate::dead_letter::DeadLetter;
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Lsn, Position, StreamId};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Rows appended (0 when the whole batch was already committed).
    pub rows: usize,
    /// The table version committed, `None` when nothing was written.
    pub version: Option<Version>,
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
    tables: HashMap<String, DeltaTable>,
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
    pub fn new(connector_name: &str, cfg: &config::DeltaSink) -> Result<Self, DeltaSinkError> {
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
            tables: HashMap::new(),
        })
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

    /// Appends `events` (all of one source) in one atomic commit and returns once it is durable.
    /// Events at or below a stream's committed position are skipped. A store that is unavailable
    /// is retried with bounded exponential backoff; each attempt re-reads the committed positions
    /// first, so a commit that succeeded although its response was lost is not written twice.
    pub async fn write(
        &mut self,
        source: &str,
        events: &[ChangeEvent],
    ) -> Result<WriteOutcome, DeltaSinkError> {
        let mut backoff = retry_policy();
        loop {
            match self.write_once(source, events).await {
                Err(e) if e.is_retryable() => match backoff.next() {
                    Some(delay) => {
                        tracing::warn!(table = source, error = %e, ?delay, "delta commit failed, retrying");
                        self.tables.remove(source);
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    async fn write_once(
        &mut self,
        source: &str,
        events: &[ChangeEvent],
    ) -> Result<WriteOutcome, DeltaSinkError> {
        let name = self.name.clone();
        let schema = bronze::bronze_schema();
        let table = self.table(source, &schema).await?;
        let fresh = fresh_events(table, &name, source, events, |e| &e.position).await?;
        if fresh.is_empty() {
            return Ok(WriteOutcome {
                rows: 0,
                version: None,
            });
        }
        let batch =
            bronze::events_to_batch(&fresh, Utc::now()).map_err(|e| DeltaSinkError::Arrow {
                table: source.to_owned(),
                source: e,
            })?;
        let positions: Vec<&Position> = fresh.iter().map(|e| &e.position).collect();
        commit_batch(table, &name, source, batch, &positions).await
    }

    /// Appends dead letters to the `_dlq` table, exactly once per (stream, position).
    pub async fn write_dead_letters(
        &mut self,
        letters: &[DeadLetter],
    ) -> Result<WriteOutcome, DeltaSinkError> {
        let name = format!("{}:dlq", self.name);
        let table = self.table(DLQ_TABLE, &bronze::dlq_schema()).await?;
        let fresh = fresh_events(table, &name, DLQ_TABLE, letters, |d| &d.position).await?;
        if fresh.is_empty() {
            return Ok(WriteOutcome {
                rows: 0,
                version: None,
            });
        }
        let batch = bronze::dead_letters_to_batch(&fresh).map_err(|e| DeltaSinkError::Arrow {
            table: DLQ_TABLE.to_owned(),
            source: e,
        })?;
        let positions: Vec<&Position> = fresh.iter().map(|d| &d.position).collect();
        commit_batch(table, &name, DLQ_TABLE, batch, &positions).await
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
        let url = self.url(source)?;
        let mut table = DeltaTableBuilder::from_url(url)
            .map_err(delta_err)?
            .with_storage_options(self.options.clone())
            .build()
            .map_err(delta_err)?;
        match table.load().await {
            Ok(()) => {}
            // Nothing was ever written for this source: nothing to vacuum.
            Err(DeltaTableError::NotATable(_)) => return Ok(0),
            Err(e) => return Err(delta_err(e)),
        }
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

/// Bounded exponential backoff for an unavailable store: 6 retries, 200 ms doubling to 10 s.
fn retry_policy() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(6)
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

/// The items whose position is above what the table already holds for their stream.
async fn fresh_events<'a, T>(
    table: &mut DeltaTable,
    name: &str,
    source: &str,
    items: &'a [T],
    pos: impl Fn(&T) -> &Position,
) -> Result<Vec<&'a T>, DeltaSinkError> {
    let mut committed: BTreeMap<StreamId, Option<Position>> = BTreeMap::new();
    for item in items {
        let stream = pos(item).stream();
        if !committed.contains_key(&stream) {
            let c = committed_in(table, name, source, &stream).await?;
            committed.insert(stream, c);
        }
    }
    Ok(items
        .iter()
        .filter(|item| {
            let p = pos(item);
            match committed.get(&p.stream()) {
                Some(Some(c)) => p > c,
                _ => true,
            }
        })
        .collect())
}

/// Writes the data files and commits them with the `txn` actions of the highest position of each
/// stream, atomically.
async fn commit_batch(
    table: &mut DeltaTable,
    name: &str,
    source: &str,
    batch: arrow::array::RecordBatch,
    positions: &[&Position],
) -> Result<WriteOutcome, DeltaSinkError> {
    let delta_err = |e| DeltaSinkError::Delta {
        table: source.to_owned(),
        source: e,
    };
    let mut highest: BTreeMap<StreamId, &Position> = BTreeMap::new();
    for p in positions {
        let e = highest.entry(p.stream()).or_insert(p);
        if *p > *e {
            *e = p;
        }
    }
    let txns: Vec<Transaction> = highest
        .values()
        .flat_map(|p| txn_actions(name, p))
        .collect();
    let rows = batch.num_rows();
    let mut writer = RecordBatchWriter::for_table(table).map_err(delta_err)?;
    writer.write(batch).await.map_err(delta_err)?;
    let adds: Vec<Action> = writer
        .flush()
        .await
        .map_err(delta_err)?
        .into_iter()
        .map(Action::Add)
        .collect();
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
    Ok(WriteOutcome {
        rows,
        version: Some(version),
    })
}
