//! `[sources.postgres]`: the PostgreSQL logical-replication source (publication, slot, snapshot,
//! transaction spilling, heartbeats and slot monitoring).

use std::path::PathBuf;

use serde::Deserialize;

use super::validate::{validate_pg_name, validate_pg_url};
use super::{ConfigError, parse_table_name};
use crate::secret::ConnString;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
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
    /// the snapshot the slot exported (parallel, fastest); `incremental`: stream from the start
    /// and read every table in key chunks between watermarks, as `tributary snapshot` does (no
    /// transaction held open, streaming never waits; needs primary keys and PostgreSQL 14);
    /// `never`: stream changes only.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Rows per primary-key chunk while snapshotting.
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: u32,
    /// Connections reading a keyed table's chunks at once, all inside the snapshot (the server
    /// sees these plus the replication and one control connection).
    #[serde(default = "default_snapshot_workers")]
    pub snapshot_workers: u32,
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

impl PostgresSourceConfig {
    /// A source with every optional setting at its default.
    pub fn new(url: ConnString, publication: &str, slot: &str, tables: &[&str]) -> Self {
        PostgresSourceConfig {
            url,
            publication: publication.into(),
            slot: slot.into(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            schema: None,
            snapshot: SnapshotMode::default(),
            snapshot_chunk_rows: default_snapshot_chunk_rows(),
            snapshot_workers: default_snapshot_workers(),
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
    Incremental,
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
fn default_snapshot_workers() -> u32 {
    2
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

impl PostgresSourceConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        validate_pg_url("sources.postgres.url", &self.url)?;
        validate_pg_name("sources.postgres.publication", &self.publication)?;
        validate_slot_name(&self.slot)?;
        if !self.tables.is_empty() && self.schema.is_some() {
            return Err(ConfigError::invalid(
                "sources.postgres.schema",
                "give either `tables` or `schema`, not both",
            ));
        }
        for (i, t) in self.tables.iter().enumerate() {
            parse_table_name(t)
                .map_err(|m| ConfigError::invalid(format!("sources.postgres.tables[{i}]"), m))?;
        }
        parse_table_name(&self.state_table)
            .map_err(|m| ConfigError::invalid("sources.postgres.state_table", m))?;
        if let Some(t) = &self.heartbeat_table {
            parse_table_name(t)
                .map_err(|m| ConfigError::invalid("sources.postgres.heartbeat_table", m))?;
        }
        for (key, value, range) in [
            (
                "sources.postgres.snapshot_chunk_rows",
                u64::from(self.snapshot_chunk_rows),
                1..=10_000_000,
            ),
            (
                "sources.postgres.snapshot_workers",
                u64::from(self.snapshot_workers),
                1..=64,
            ),
            (
                "sources.postgres.max_tx_memory_mb",
                self.max_tx_memory_mb,
                1..=1_048_576,
            ),
            (
                "sources.postgres.heartbeat_interval_s",
                self.heartbeat_interval_s,
                1..=86_400,
            ),
            (
                "sources.postgres.slot_check_interval_s",
                self.slot_check_interval_s,
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
        Ok(())
    }
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
