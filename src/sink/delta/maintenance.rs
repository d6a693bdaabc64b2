//! `tributary vacuum`: removal of the files no table version references (`compact.rs` holds the
//! other maintenance command).
//!
//! Guarantees: vacuum commits no data change, so it is safe beside a running writer as long as the
//! retention exceeds the seconds a writer takes between uploading a data file and committing it.

use std::time::Duration;

use deltalake::operations::vacuum::VacuumMode;

use super::{DeltaSink, DeltaSinkError};

impl DeltaSink {
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
