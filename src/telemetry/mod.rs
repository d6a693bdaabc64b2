//! Logs, metrics and health.
//!
//! - Logs: `tracing` to stderr as text or JSON, filtered by `RUST_LOG` (default `info`). Nothing
//!   here formats configuration values: every secret in the config is held in a
//!   [`crate::secret`] type, so a stage that logs a config value logs it redacted.
//! - Metrics: stages record through the `metrics` facade (`tributary_*` names, Prometheus
//!   conventions); [`install_metrics`] installs the Prometheus recorder whose text the HTTP
//!   endpoint serves.
//! - Health: [`health::Health`] tracks whether each source is making progress and each sink's last
//!   commit succeeded; [`http::serve`] exposes `/metrics`, `/healthz` and `/readyz`.

pub mod health;
pub mod http;

use std::sync::OnceLock;

use clap::ValueEnum;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. Call once, at start-up.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,pg_walstream=warn,buoyant_kernel=warn,delta_kernel=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests, embedding in another program) keeps the first subscriber.
    let _ = result;
}

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (a host program's); then our
            // metrics go to that one and this handle renders nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
