//! `[sinks.delta]`: the Delta Lake Bronze sink (table root URI, object-store options, flush
//! thresholds, checkpoints, and the `compact`/`vacuum` maintenance settings).

use serde::Deserialize;

use super::ConfigError;
use crate::secret::SecretMap;

/// The URI schemes the Delta sink can write to.
pub const DELTA_SCHEMES: [&str; 7] = ["file", "s3", "s3a", "az", "azure", "abfs", "abfss"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaSinkConfig {
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

impl DeltaSinkConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        validate_delta_uri(&self.uri)?;
        if self.checkpoint_interval == 0 {
            return Err(ConfigError::invalid(
                "sinks.delta.checkpoint_interval",
                "must be at least 1 (commits between Delta checkpoints)",
            ));
        }
        for (key, zero) in [
            ("sinks.delta.flush_rows", self.flush_rows == 0),
            ("sinks.delta.flush_mb", self.flush_mb == 0),
            ("sinks.delta.flush_interval_ms", self.flush_interval_ms == 0),
            ("sinks.delta.compact_target_mb", self.compact_target_mb == 0),
        ] {
            if zero {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        Ok(())
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
