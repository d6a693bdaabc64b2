//! The operator's endpoint: `/metrics` (Prometheus text), `/healthz` (the process is up) and
//! `/readyz` (200 only when every source made progress within the window and every sink's last
//! commit succeeded; 503 otherwise, with one line per component saying which is behind).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use super::health::Health;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Health,
}

/// Binds `addr` and serves until the returned task is dropped/aborted. Returns the bound address
/// (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Health,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "telemetry endpoint stopped");
        }
    });
    Ok((bound, task))
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let statuses = s.health.statuses();
    let ready = statuses.iter().all(|c| c.ready);
    let mut body = String::new();
    for c in &statuses {
        let mark = if c.ready { "ok  " } else { "FAIL" };
        // A sink's last error may quote a configured value.
        let detail = crate::secret::redact(&c.detail);
        body.push_str(&format!("{mark} {}: {detail}\n", c.name));
    }
    if statuses.is_empty() {
        body.push_str("no components registered yet\n");
    }
    let code = if ready && !statuses.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}
