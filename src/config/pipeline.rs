//! `[pipeline]`: batching, buffering between stages, and shutdown of `tributary run`.

use serde::Deserialize;

use super::ConfigError;

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

impl PipelineConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_max_events == 0 || self.channel_capacity == 0 {
            return Err(ConfigError::invalid(
                "pipeline",
                "batch_max_events and channel_capacity must be at least 1",
            ));
        }
        Ok(())
    }
}
