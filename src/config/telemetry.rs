//! `[telemetry]`: the `/metrics`, `/healthz`, `/readyz` endpoint and when a source counts as
//! stalled.

use serde::Deserialize;

use super::ConfigError;

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

impl TelemetryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "telemetry.listen",
                format!("{:?} is not an address like 127.0.0.1:9187", self.listen),
            ));
        }
        Ok(())
    }
}
