//! The connector's TOML configuration: what to read, how to embed, where to write.
//!
//! Loading is three steps, each of which names the key it rejects:
//! 1. parse TOML (syntax errors give line and column, never the offending line: it may hold a
//!    password);
//! 2. interpolate `${VAR}` and `${VAR:-default}` in every string from the environment (`$${`
//!    writes a literal `${`); an unset variable without a default is an error at its key;
//! 3. deserialize into typed structs that reject unknown keys, then validate values that types
//!    cannot (URI schemes, slot names, template syntax, references between sections).
//!
//! Secrets are held in [`crate::secret`] types, so `format!("{config:?}")` never shows them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::secret::{ConnString, SecretMap};

mod raw;
mod syntax;

pub use raw::interpolate_str;
use raw::{interpolate, sanitize_serde_message, syntax_error};
pub use syntax::{TemplatePart, parse_properties, parse_table_name, parse_template};

/// A configuration problem, naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// A key holds a value Tributary cannot use. `key` is the dotted path (`sinks.delta.uri`).
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The dotted key path the error is about, when it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this connector: prefixes Delta `txn` app ids and default slot/group names.
    pub name: String,
    pub sources: Sources,
    #[serde(default)]
    pub embedding: Option<EmbeddingConfig>,
    pub sinks: Sinks,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// Batching and shutdown of `tributary run`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Events per batch handed to the sinks (a batch is also cut after `batch_max_wait_ms`).
    pub batch_max_events: usize,
    pub batch_max_wait_ms: u64,
    /// Events buffered between stages; a full buffer slows the source (backpressure).
    pub channel_capacity: usize,
    /// How long SIGINT/SIGTERM may take to drain in-flight batches before exiting anyway.
    pub shutdown_timeout_s: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            batch_max_events: 5_000,
            batch_max_wait_ms: 200,
            channel_capacity: 10_000,
            shutdown_timeout_s: 30,
        }
    }
}

/// The `/metrics`, `/healthz`, `/readyz` endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address to serve on; empty disables the endpoint.
    pub listen: String,
    /// A source that neither delivered events nor answered a keepalive for this long is stalled.
    pub ready_window_s: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: "127.0.0.1:9187".into(),
            ready_window_s: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    pub postgres: Option<PostgresSource>,
    pub kafka: Option<KafkaSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSource {
    /// `postgres://user:pw@host:port/db` or libpq `host=… user=… password=…`.
    pub url: ConnString,
    /// Publication to read; created for `tables` (or every table of `schema`) when missing.
    pub publication: String,
    /// Logical replication slot (pgoutput); created when missing.
    pub slot: String,
    /// Tables to publish, `schema.table` or `table` (schema `public`); identifiers may be quoted:
    /// `public."Order Items"`.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Publish every table of this schema instead of a list.
    pub schema: Option<String>,
    /// `initial` (default): on first start, emit every existing row as a snapshot read inside
    /// the snapshot the slot exported; `never`: stream changes only.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Rows per primary-key chunk while snapshotting.
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: u32,
    /// Table (in the source database) recording which tables' snapshots are durable, so an
    /// interrupted snapshot resumes without emitting completed tables twice.
    #[serde(default = "default_state_table")]
    pub state_table: String,
    /// A transaction's changes are held in memory up to this many MiB, then spilled to disk.
    #[serde(default = "default_max_tx_memory_mb")]
    pub max_tx_memory_mb: u64,
    /// Where spilled transactions go (default: the system temporary directory).
    pub spill_dir: Option<PathBuf>,
    /// Optional table written every `heartbeat_interval_s` while the publication is idle so the
    /// slot advances even when only unpublished tables change (created when missing; add it to
    /// the publication or let Tributary add it when it creates the publication).
    pub heartbeat_table: Option<String>,
    #[serde(default = "default_heartbeat_interval_s")]
    pub heartbeat_interval_s: u64,
    /// A warning is logged while the slot retains more WAL than this many MiB.
    #[serde(default = "default_slot_lag_warn_mb")]
    pub slot_lag_warn_mb: u64,
    /// What to do when the slot was invalidated (`wal_status = lost`) or dropped: `error`
    /// (default: stop and say how to recover) or `recreate` (new slot, new snapshot).
    #[serde(default)]
    pub on_slot_lost: SlotLostPolicy,
    /// How often the slot's lag and status are sampled for metrics.
    #[serde(default = "default_slot_check_interval_s")]
    pub slot_check_interval_s: u64,
}

impl PostgresSource {
    /// A source with every optional setting at its default.
    pub fn new(url: ConnString, publication: &str, slot: &str, tables: &[&str]) -> Self {
        PostgresSource {
            url,
            publication: publication.into(),
            slot: slot.into(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            schema: None,
            snapshot: SnapshotMode::default(),
            snapshot_chunk_rows: default_snapshot_chunk_rows(),
            state_table: default_state_table(),
            max_tx_memory_mb: default_max_tx_memory_mb(),
            spill_dir: None,
            heartbeat_table: None,
            heartbeat_interval_s: default_heartbeat_interval_s(),
            slot_lag_warn_mb: default_slot_lag_warn_mb(),
            on_slot_lost: SlotLostPolicy::default(),
            slot_check_interval_s: default_slot_check_interval_s(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    #[default]
    Initial,
    Never,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotLostPolicy {
    #[default]
    Error,
    Recreate,
}

fn default_snapshot_chunk_rows() -> u32 {
    10_000
}
fn default_state_table() -> String {
    "public.tributary_snapshot_state".into()
}
fn default_max_tx_memory_mb() -> u64 {
    64
}
fn default_heartbeat_interval_s() -> u64 {
    30
}
fn default_slot_lag_warn_mb() -> u64 {
    1024
}
fn default_slot_check_interval_s() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSource {
    /// `host:port,host:port`; may instead come from `client_properties` (`bootstrap.servers`).
    pub brokers: Option<String>,
    /// A Confluent-style `client.properties` file whose keys are librdkafka properties.
    pub client_properties: Option<PathBuf>,
    pub group_id: String,
    #[serde(default)]
    pub start: StartFrom,
    pub topics: Vec<TopicConfig>,
    /// Any librdkafka property; overrides `client_properties`.
    #[serde(default)]
    pub properties: SecretMap,
    /// A message value larger than this goes to the dead-letter destination.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// How long a revoke (or shutdown) waits for in-flight events of the revoked partitions to
    /// become durable before releasing them; must be shorter than `session.timeout.ms`.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// How often acknowledged offsets are committed to the group.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// How many tasks decode messages in parallel (their output is put back in order); default:
    /// the number of cores, at most 4.
    #[serde(default)]
    pub decode_tasks: Option<usize>,
    /// Where undecodable messages go (until the Delta `_dlq` table takes over).
    #[serde(default)]
    pub dead_letter: Option<KafkaDeadLetter>,
}

fn default_max_message_bytes() -> usize {
    1024 * 1024
}

fn default_drain_timeout_ms() -> u64 {
    5_000
}

fn default_commit_interval_ms() -> u64 {
    1_000
}

/// librdkafka's default `session.timeout.ms`.
const DEFAULT_SESSION_TIMEOUT_MS: u64 = 45_000;

/// The dead-letter destination of the Kafka source: exactly one of `topic` or `path`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaDeadLetter {
    /// A Kafka topic on the same cluster (same security properties).
    pub topic: Option<String>,
    /// A local JSONL file, appended to and fsynced before offsets move past a dead letter.
    pub path: Option<PathBuf>,
}

/// The type a JSON topic declares for a column; a value of another JSON type is a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Bool,
    Int32,
    Int64,
    Float64,
    /// A decimal kept as exact text (a JSON number or a numeric string).
    Numeric,
    Text,
    Uuid,
    /// An RFC 3339 timestamp string.
    Timestamptz,
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    #[serde(default)]
    pub format: MessageFormat,
    /// Columns of the message value that form the key; empty means the Kafka message key.
    #[serde(default)]
    pub key_columns: Vec<String>,
    /// Declared column types (`json`/`debezium`); undeclared columns are typed from the JSON.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnType>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageFormat {
    /// A JSON object per message.
    #[default]
    Json,
    /// A Debezium JSON change envelope, with or without the `schema`/`payload` wrapper.
    Debezium,
    /// The bytes as they are.
    Raw,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// Folder holding `model.onnx` and `tokenizer.json`.
    pub model_dir: PathBuf,
    /// Per source (`schema.table` or topic): the text to embed, e.g.
    /// `"{customer} ordered {items}: {note}"`. Sources without a template are not embedded.
    #[serde(default)]
    pub templates: BTreeMap<String, String>,
    /// `mean` over the attention mask (sentence-transformers) or the `cls` token.
    #[serde(default)]
    pub pooling: Pooling,
    /// L2-normalise vectors (cosine similarity = dot product).
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Tokens per text; longer texts are truncated (256 for all-MiniLM-L6-v2).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Texts per model run.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long a partial batch may wait for more texts.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// ONNX Runtime intra-op threads (default: 1 on machines with ≤ 2 cores, else half).
    pub intra_threads: Option<usize>,
    /// Keys whose last text hash and vector are remembered, to skip unchanged texts.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: usize,
}

impl EmbeddingConfig {
    /// A configuration with defaults for a model folder (`tributary embed --model DIR`).
    pub fn for_model(model_dir: PathBuf) -> Self {
        EmbeddingConfig {
            model_dir,
            templates: BTreeMap::new(),
            pooling: Pooling::default(),
            normalize: true,
            max_length: default_max_length(),
            max_batch: default_max_batch(),
            max_wait_ms: default_max_wait_ms(),
            intra_threads: None,
            cache_capacity: default_cache_capacity(),
        }
    }

    pub fn threads(&self) -> usize {
        self.intra_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cores <= 2 { 1 } else { cores / 2 }
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    #[default]
    Mean,
    Cls,
}

fn default_max_length() -> usize {
    256
}

fn default_max_batch() -> usize {
    32
}

fn default_max_wait_ms() -> u64 {
    20
}

fn default_cache_capacity() -> usize {
    100_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sinks {
    pub delta: Option<DeltaSink>,
    pub pgvector: Option<PgvectorSink>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaSink {
    /// Root of the Bronze tables (one table per source beneath it): `file:///…`, a plain local
    /// path, `s3://bucket/prefix`, `az://container/prefix` or
    /// `abfss://container@account.dfs.core.windows.net/prefix`.
    pub uri: String,
    /// object_store options (`aws_endpoint`, `azure_storage_account_key`, …); the usual `AWS_*` /
    /// `AZURE_*` environment variables apply too.
    #[serde(default)]
    pub storage: SecretMap,
    /// A Delta checkpoint is written every this many commits.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: u64,
    /// `tributary vacuum` removes unreferenced files older than this (default 168 h = 7 days;
    /// keep it well above a commit's duration so files of an in-flight commit are never removed).
    #[serde(default = "default_vacuum_retention_hours")]
    pub vacuum_retention_hours: u64,
    /// A table's buffered rows are committed once any of these is reached: this many rows…
    #[serde(default = "default_flush_rows")]
    pub flush_rows: usize,
    /// …this many MiB of buffered (in-memory Arrow) data, roughly 2–4× the Parquet file size…
    #[serde(default = "default_flush_mb")]
    pub flush_mb: usize,
    /// …or this long since the oldest buffered row arrived. Positions are acknowledged to the
    /// sources only after the commit, so this is also the longest an acknowledgement waits.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// `tributary compact`: small files of a partition are rewritten into files of about this
    /// many MiB.
    #[serde(default = "default_compact_target_mb")]
    pub compact_target_mb: u64,
    /// `tributary compact`: files rewritten are Z-ordered by these columns (empty: bin-packing
    /// only, rows keep their order).
    #[serde(default)]
    pub zorder_columns: Vec<String>,
}

fn default_flush_rows() -> usize {
    1_000_000
}

fn default_flush_mb() -> usize {
    64
}

fn default_flush_interval_ms() -> u64 {
    60_000
}

fn default_compact_target_mb() -> u64 {
    128
}

fn default_vacuum_retention_hours() -> u64 {
    168
}

fn default_checkpoint_interval() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgvectorSink {
    pub url: ConnString,
    /// Schema holding the target tables (one per source).
    #[serde(default = "default_pg_schema")]
    pub schema: String,
    /// Target table per source; by default the source name (`public.orders` → `orders`, other
    /// schemas → `schema_table`, a topic → its name).
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
    /// Columns of the source row kept in the `payload` jsonb column, per source (default: all).
    #[serde(default)]
    pub payload_columns: BTreeMap<String, Vec<String>>,
    /// Dimension of the `embedding` column; must equal the model's output dimension.
    #[serde(default = "default_dimension")]
    pub dimension: u32,
    /// Store embeddings as `halfvec` (half the space; for large dimensions).
    #[serde(default)]
    pub halfvec: bool,
    #[serde(default)]
    pub index: VectorIndex,
}

fn default_pg_schema() -> String {
    "public".to_owned()
}

fn default_dimension() -> u32 {
    384
}

/// The similarity index built once the initial snapshot is loaded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorIndex {
    #[serde(default = "default_true")]
    pub hnsw: bool,
    #[serde(default)]
    pub distance: Distance,
    #[serde(default = "default_hnsw_m")]
    pub m: u32,
    #[serde(default = "default_ef_construction")]
    pub ef_construction: u32,
}

impl Default for VectorIndex {
    fn default() -> Self {
        VectorIndex {
            hnsw: true,
            distance: Distance::default(),
            m: default_hnsw_m(),
            ef_construction: default_ef_construction(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_hnsw_m() -> u32 {
    16
}

fn default_ef_construction() -> u32 {
    64
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distance {
    #[default]
    Cosine,
    L2,
    InnerProduct,
}

/// The URI schemes the Delta sink can write to.
pub const DELTA_SCHEMES: [&str; 7] = ["file", "s3", "s3a", "az", "azure", "abfs", "abfss"];

impl Config {
    /// Reads and validates `path`, interpolating from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base, |name| std::env::var(name).ok())
    }

    /// Parses and validates `text`. `base_dir` anchors relative paths; `env` looks up variables.
    pub fn parse(
        text: &str,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        interpolate(&mut value, &mut Vec::new(), &env)?;
        let mut config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.inner().to_string();
            // toml appends "\nin `a.b`": the path is already in front.
            let inner = inner.split("\nin `").next().unwrap_or_default();
            let message = sanitize_serde_message(inner.trim());
            ConfigError::invalid(
                if path == "." {
                    "(top level)".into()
                } else {
                    path
                },
                message,
            )
        })?;
        config.resolve_paths(base_dir);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if let Some(k) = &mut self.sources.kafka {
            if let Some(p) = &mut k.client_properties
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
            if let Some(p) = k.dead_letter.as_mut().and_then(|d| d.path.as_mut())
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        if let Some(e) = &mut self.embedding
            && e.model_dir.is_relative()
        {
            e.model_dir = base.join(&e.model_dir);
        }
        if let Some(d) = &mut self.sinks.delta
            && !d.uri.contains("://")
            && Path::new(&d.uri).is_relative()
        {
            d.uri = base.join(&d.uri).to_string_lossy().into_owned();
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::invalid(
                "name",
                format!(
                    "{:?} must be non-empty ASCII letters, digits, '-', '_' or '.'",
                    self.name
                ),
            ));
        }
        if !self.telemetry.listen.is_empty()
            && self
                .telemetry
                .listen
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(ConfigError::invalid(
                "telemetry.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9187",
                    self.telemetry.listen
                ),
            ));
        }
        if self.pipeline.batch_max_events == 0 || self.pipeline.channel_capacity == 0 {
            return Err(ConfigError::invalid(
                "pipeline",
                "batch_max_events and channel_capacity must be at least 1",
            ));
        }
        if self.sources.postgres.is_none() && self.sources.kafka.is_none() {
            return Err(ConfigError::invalid(
                "sources",
                "configure at least one of [sources.postgres] or [sources.kafka]",
            ));
        }
        if self.sinks.delta.is_none() && self.sinks.pgvector.is_none() {
            return Err(ConfigError::invalid(
                "sinks",
                "configure at least one of [sinks.delta] or [sinks.pgvector]",
            ));
        }
        if let Some(pg) = &self.sources.postgres {
            validate_pg_url("sources.postgres.url", &pg.url)?;
            validate_pg_name("sources.postgres.publication", &pg.publication)?;
            validate_slot_name(&pg.slot)?;
            if !pg.tables.is_empty() && pg.schema.is_some() {
                return Err(ConfigError::invalid(
                    "sources.postgres.schema",
                    "give either `tables` or `schema`, not both",
                ));
            }
            for (i, t) in pg.tables.iter().enumerate() {
                parse_table_name(t).map_err(|m| {
                    ConfigError::invalid(format!("sources.postgres.tables[{i}]"), m)
                })?;
            }
            parse_table_name(&pg.state_table)
                .map_err(|m| ConfigError::invalid("sources.postgres.state_table", m))?;
            if let Some(t) = &pg.heartbeat_table {
                parse_table_name(t)
                    .map_err(|m| ConfigError::invalid("sources.postgres.heartbeat_table", m))?;
            }
            for (key, value, range) in [
                (
                    "sources.postgres.snapshot_chunk_rows",
                    u64::from(pg.snapshot_chunk_rows),
                    1..=10_000_000,
                ),
                (
                    "sources.postgres.max_tx_memory_mb",
                    pg.max_tx_memory_mb,
                    1..=1_048_576,
                ),
                (
                    "sources.postgres.heartbeat_interval_s",
                    pg.heartbeat_interval_s,
                    1..=86_400,
                ),
                (
                    "sources.postgres.slot_check_interval_s",
                    pg.slot_check_interval_s,
                    1..=86_400,
                ),
            ] {
                if !range.contains(&value) {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{value} is outside {}..={}", range.start(), range.end()),
                    ));
                }
            }
        }
        if let Some(k) = &self.sources.kafka {
            k.validate()?;
        }
        if let Some(e) = &self.embedding {
            for (key, value, range) in [
                ("embedding.max_length", e.max_length, 1..=8192),
                ("embedding.max_batch", e.max_batch, 1..=4096),
                (
                    "embedding.intra_threads",
                    e.intra_threads.unwrap_or(1),
                    1..=256,
                ),
            ] {
                if !range.contains(&value) {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{value} is outside {}..={}", range.start(), range.end()),
                    ));
                }
            }
            let known = self.known_sources();
            for (source, template) in &e.templates {
                let key = format!("embedding.templates.{source:?}");
                parse_template(template).map_err(|m| ConfigError::invalid(&key, m))?;
                if let Some(known) = &known
                    && !known.contains(source)
                {
                    return Err(ConfigError::invalid(
                        key,
                        format!(
                            "no configured source is named {source:?} (sources: {})",
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
        if let Some(d) = &self.sinks.delta {
            validate_delta_uri(&d.uri)?;
            if d.checkpoint_interval == 0 {
                return Err(ConfigError::invalid(
                    "sinks.delta.checkpoint_interval",
                    "must be at least 1 (commits between Delta checkpoints)",
                ));
            }
            for (key, zero) in [
                ("sinks.delta.flush_rows", d.flush_rows == 0),
                ("sinks.delta.flush_mb", d.flush_mb == 0),
                ("sinks.delta.flush_interval_ms", d.flush_interval_ms == 0),
                ("sinks.delta.compact_target_mb", d.compact_target_mb == 0),
            ] {
                if zero {
                    return Err(ConfigError::invalid(key, "must be at least 1"));
                }
            }
        }
        if let Some(p) = &self.sinks.pgvector {
            validate_pg_url("sinks.pgvector.url", &p.url)?;
            validate_pg_name("sinks.pgvector.schema", &p.schema)?;
            for (source, table) in &p.tables {
                validate_pg_name(&format!("sinks.pgvector.tables.{source:?}"), table)?;
            }
            if let Some(known) = self.known_sources() {
                let mut seen: BTreeMap<String, &String> = BTreeMap::new();
                for source in &known {
                    let table = crate::sink::pgvector::target_name(p, source);
                    if let Some(other) = seen.insert(table.clone(), source) {
                        return Err(ConfigError::invalid(
                            "sinks.pgvector.tables",
                            format!(
                                "sources {other:?} and {source:?} would both write table \
                                 {table:?}: map one to another name here"
                            ),
                        ));
                    }
                }
            }
            // pgvector's limits: vector ≤ 16000 dimensions, an HNSW index ≤ 2000 (4000 halfvec).
            let max = match (p.index.hnsw, p.halfvec) {
                (false, _) => 16_000,
                (true, false) => 2_000,
                (true, true) => 4_000,
            };
            if p.dimension == 0 || p.dimension > max {
                return Err(ConfigError::invalid(
                    "sinks.pgvector.dimension",
                    format!(
                        "{} is outside 1..={max} (pgvector's limit for this storage and index)",
                        p.dimension
                    ),
                ));
            }
            if !(2..=100).contains(&p.index.m) {
                return Err(ConfigError::invalid(
                    "sinks.pgvector.index.m",
                    format!("{} is outside pgvector's 2..=100", p.index.m),
                ));
            }
            if p.index.ef_construction < 2 * p.index.m || p.index.ef_construction > 1000 {
                return Err(ConfigError::invalid(
                    "sinks.pgvector.index.ef_construction",
                    format!(
                        "{} must be between 2 × m ({}) and 1000",
                        p.index.ef_construction,
                        2 * p.index.m
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every source name, when the configuration lists them all (`None` when a whole Postgres
    /// schema is published and the tables are only known at run time).
    pub fn known_sources(&self) -> Option<Vec<String>> {
        let mut names = Vec::new();
        if let Some(pg) = &self.sources.postgres {
            if pg.tables.is_empty() {
                return None;
            }
            for t in &pg.tables {
                let (schema, table) = parse_table_name(t).ok()?;
                names.push(format!("{schema}.{table}"));
            }
        }
        if let Some(k) = &self.sources.kafka {
            names.extend(k.topics.iter().map(|t| t.name.clone()));
        }
        Some(names)
    }
}

impl KafkaSource {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.topics.is_empty() {
            return Err(ConfigError::invalid(
                "sources.kafka.topics",
                "list at least one topic ([[sources.kafka.topics]] name = \"orders\")",
            ));
        }
        if self.group_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                "sources.kafka.group_id",
                "must not be empty",
            ));
        }
        for (i, t) in self.topics.iter().enumerate() {
            let valid = !t.name.is_empty()
                && t.name.len() <= 249
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !valid {
                return Err(ConfigError::invalid(
                    format!("sources.kafka.topics[{i}].name"),
                    format!("{:?} is not a valid Kafka topic name", t.name),
                ));
            }
        }
        let props = self.client_properties()?;
        let has_brokers = self
            .brokers
            .as_deref()
            .is_some_and(|b| !b.trim().is_empty())
            || props.contains_key("bootstrap.servers")
            || self.properties.get("bootstrap.servers").is_some();
        if !has_brokers {
            return Err(ConfigError::invalid(
                "sources.kafka.brokers",
                "missing: set `brokers`, or `bootstrap.servers` in `properties` or in the \
                 `client_properties` file",
            ));
        }
        self.validate_consumer_settings()
    }

    /// `decode_tasks`, or its default.
    pub fn decode_tasks(&self) -> usize {
        self.decode_tasks
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
            .max(1)
    }

    fn validate_consumer_settings(&self) -> Result<(), ConfigError> {
        if self.decode_tasks == Some(0) {
            return Err(ConfigError::invalid(
                "sources.kafka.decode_tasks",
                "must be greater than 0",
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError::invalid(
                "sources.kafka.max_message_bytes",
                "must be greater than 0",
            ));
        }
        if self.commit_interval_ms == 0 {
            return Err(ConfigError::invalid(
                "sources.kafka.commit_interval_ms",
                "must be greater than 0",
            ));
        }
        let session = self.session_timeout_ms()?;
        if self.drain_timeout_ms == 0 || self.drain_timeout_ms >= session {
            return Err(ConfigError::invalid(
                "sources.kafka.drain_timeout_ms",
                format!(
                    "{} must be above 0 and below session.timeout.ms ({session}): a revoke that \
                     drains longer than the session is expelled from the group",
                    self.drain_timeout_ms
                ),
            ));
        }
        for key in ["enable.auto.commit", "enable.auto.offset.store"] {
            if self.properties.get(key).is_some_and(|v| v.trim() == "true") {
                return Err(ConfigError::invalid(
                    format!("sources.kafka.properties.{key:?}"),
                    "must stay false: offsets are committed only once events are durable",
                ));
            }
        }
        if let Some(d) = &self.dead_letter {
            match (&d.topic, &d.path) {
                (Some(t), None) if !t.trim().is_empty() => {}
                (None, Some(p)) if !p.as_os_str().is_empty() => {}
                _ => {
                    return Err(ConfigError::invalid(
                        "sources.kafka.dead_letter",
                        "give exactly one of `topic` or `path`",
                    ));
                }
            }
        }
        for (i, t) in self.topics.iter().enumerate() {
            if t.format == MessageFormat::Raw
                && (!t.key_columns.is_empty() || !t.columns.is_empty())
            {
                return Err(ConfigError::invalid(
                    format!("sources.kafka.topics[{i}].format"),
                    "`raw` messages have no columns: remove `key_columns` and `columns`",
                ));
            }
        }
        Ok(())
    }

    /// `session.timeout.ms` as librdkafka will see it (properties, then the properties file).
    pub fn session_timeout_ms(&self) -> Result<u64, ConfigError> {
        let file = self.client_properties()?;
        let raw = self
            .properties
            .get("session.timeout.ms")
            .or(file.get("session.timeout.ms").map(String::as_str));
        match raw {
            None => Ok(DEFAULT_SESSION_TIMEOUT_MS),
            Some(v) => v.trim().parse().map_err(|_| {
                ConfigError::invalid(
                    "sources.kafka.properties.\"session.timeout.ms\"",
                    format!("{v:?} is not a number of milliseconds"),
                )
            }),
        }
    }

    /// The librdkafka properties to use: the `client_properties` file, then `properties`, then
    /// `brokers` and `group_id` on top.
    pub fn librdkafka_properties(&self) -> Result<SecretMap, ConfigError> {
        let mut all = self.client_properties()?;
        all.extend(self.properties.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(b) = &self.brokers {
            all.insert("bootstrap.servers".into(), b.clone());
        }
        all.insert("group.id".into(), self.group_id.clone());
        // Offsets move only when the pipeline says the events are durable.
        all.insert("enable.auto.commit".into(), "false".into());
        all.insert("enable.auto.offset.store".into(), "false".into());
        all.insert(
            "auto.offset.reset".into(),
            match self.start {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            }
            .into(),
        );
        Ok(SecretMap(all))
    }

    fn client_properties(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let Some(path) = &self.client_properties else {
            return Ok(BTreeMap::new());
        };
        let key = "sources.kafka.client_properties";
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::invalid(key, format!("cannot read {}: {e}", path.display()))
        })?;
        parse_properties(&text)
            .map_err(|m| ConfigError::invalid(key, format!("{}: {m}", path.display())))
    }
}

fn validate_pg_url(key: &str, url: &ConnString) -> Result<(), ConfigError> {
    url.expose()
        .parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| {
            ConfigError::invalid(key, format!("invalid PostgreSQL connection string: {e}"))
        })
}

fn validate_pg_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 63 {
        return Err(ConfigError::invalid(
            key,
            format!("{name:?} must be 1 to 63 bytes (PostgreSQL's identifier limit)"),
        ));
    }
    Ok(())
}

fn validate_slot_name(slot: &str) -> Result<(), ConfigError> {
    let ok = !slot.is_empty()
        && slot.len() <= 63
        && slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "sources.postgres.slot",
            format!(
                "{slot:?} is not a valid replication slot name (lowercase letters, digits and \
                 underscores, at most 63)"
            ),
        ))
    }
}

fn validate_delta_uri(uri: &str) -> Result<(), ConfigError> {
    let key = "sinks.delta.uri";
    if !uri.contains("://") {
        return Ok(()); // a local path, made absolute by resolve_paths
    }
    let parsed = url::Url::parse(uri)
        .map_err(|e| ConfigError::invalid(key, format!("invalid URI {uri:?}: {e}")))?;
    let scheme = parsed.scheme();
    if !DELTA_SCHEMES.contains(&scheme) {
        return Err(ConfigError::invalid(
            key,
            format!(
                "unsupported scheme {scheme:?} (use one of {})",
                DELTA_SCHEMES.join(", ")
            ),
        ));
    }
    if scheme != "file" && parsed.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(
            key,
            format!("{uri:?} names no bucket or container"),
        ));
    }
    if parsed.password().is_some() {
        return Err(ConfigError::invalid(
            key,
            "put credentials in [sinks.delta.storage] or the environment, not in the URI",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn interpolation_expands_defaults_and_escapes() {
        let env = env_of(&[("A", "1"), ("EMPTY", "")]);
        assert_eq!(interpolate_str("x${A}y", &env).unwrap(), "x1y");
        assert_eq!(interpolate_str("${B:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(interpolate_str("${EMPTY:-d}", &env).unwrap(), "d");
        assert_eq!(interpolate_str("${EMPTY}", &env).unwrap(), "");
        assert_eq!(interpolate_str("$${A} $5", &env).unwrap(), "${A} $5");
        assert_eq!(interpolate_str("${B:-}", &env).unwrap(), "");
        let err = interpolate_str("${NOPE}", &env).unwrap_err();
        assert!(err.contains("NOPE") && err.contains("not set"), "{err}");
        assert!(
            interpolate_str("${A", &env)
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            interpolate_str("${1X}", &env)
                .unwrap_err()
                .contains("not a valid")
        );
    }

    #[test]
    fn table_names_parse_with_quotes() {
        assert_eq!(
            parse_table_name("orders").unwrap(),
            ("public".into(), "orders".into())
        );
        assert_eq!(
            parse_table_name("Sales.Orders").unwrap(),
            ("sales".into(), "orders".into())
        );
        assert_eq!(
            parse_table_name(r#"public."Order Items""#).unwrap(),
            ("public".into(), "Order Items".into())
        );
        assert_eq!(
            parse_table_name(r#""we""ird"."a.b""#).unwrap(),
            (r#"we"ird"#.into(), "a.b".into())
        );
        for bad in ["", "a.", ".a", "a.b.c", r#""open"#, r#"a"b"#] {
            assert!(parse_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_parse_and_reject_malformed() {
        assert_eq!(
            parse_template("{customer} ordered {{x}}: {note}").unwrap(),
            vec![
                TemplatePart::Column("customer".into()),
                TemplatePart::Literal(" ordered {x}: ".into()),
                TemplatePart::Column("note".into()),
            ]
        );
        for bad in ["{", "a}", "{}", "no columns", "{a{b}"] {
            assert!(parse_template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn properties_files_parse() {
        let p = parse_properties(
            "# Required connection configs\nbootstrap.servers=pkc-1.aws.confluent.cloud:9092\n\
             security.protocol = SASL_SSL\n\nsasl.mechanisms=PLAIN\n! comment\nsasl.password=a=b\n",
        )
        .unwrap();
        assert_eq!(p["bootstrap.servers"], "pkc-1.aws.confluent.cloud:9092");
        assert_eq!(p["security.protocol"], "SASL_SSL");
        assert_eq!(p["sasl.password"], "a=b");
        assert!(
            parse_properties("novalue\n")
                .unwrap_err()
                .contains("line 1")
        );
    }

    #[test]
    fn serde_messages_lose_string_values() {
        assert_eq!(
            sanitize_serde_message("invalid type: string \"hunter2\", expected u32"),
            "invalid type: string, expected u32"
        );
        assert_eq!(
            sanitize_serde_message("missing field `x`"),
            "missing field `x`"
        );
    }
}
