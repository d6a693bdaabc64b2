//! Logs, metrics and health.
//!
//! - Logs: `tracing` to stderr as text or JSON, filtered by `RUST_LOG` (default `info`); librdkafka's
//!   own log reaches it through the `log` bridge. Every secret in the config is held in a
//!   [`crate::secret`] type, so a stage that logs a config value logs it redacted; and every line,
//!   whoever wrote it (a library's error may quote a value), passes through the installed
//!   [`crate::secret::Redactor`] on its way to stderr.
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
        .with_writer(RedactedStderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests, embedding in another program) keeps the first subscriber.
    let _ = result;
}

/// Stderr, each event's text passed through [`crate::secret::redact`] first.
struct RedactedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactedStderr {
    type Writer = EventBuffer;

    fn make_writer(&'a self) -> EventBuffer {
        EventBuffer(Vec::new())
    }
}

/// One event's text, written redacted when dropped: the formatter writes each event through a
/// writer of its own and drops it after, so a secret is never split across two writes.
struct EventBuffer(Vec<u8>);

impl std::io::Write for EventBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuffer {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.0);
        let text = crate::secret::redact(&text);
        // Nowhere to report a failed write to stderr.
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
    }
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
