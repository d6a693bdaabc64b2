//! Where the sink's tables live and how they are opened: one directory per source under the
//! root URI, `_dlq` beside them.
//!
//! Guarantees: a table is created on first use with the Bronze partitioning and the configured
//! `delta.checkpointInterval` (an existing table keeps its own properties: creation never
//! overwrites); the writer keeps each table open between commits, while the status and
//! maintenance commands load a fresh copy and never create a table.

use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};

use super::{DeltaSink, DeltaSinkError, bronze};

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

/// Registers the S3 and Azure handlers with delta-rs (idempotent).
pub(super) fn register_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        deltalake::aws::register_handlers(None);
        deltalake::azure::register_handlers(None);
    });
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

    pub(super) fn url(&self, source: &str) -> Result<url::Url, DeltaSinkError> {
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
    pub(super) async fn table(
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

    /// The current version of the table of `source`, freshly loaded (not the writer's cached
    /// one); `None` when nothing was ever written there.
    pub(super) async fn load_existing(
        &self,
        source: &str,
    ) -> Result<Option<DeltaTable>, DeltaSinkError> {
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
}
