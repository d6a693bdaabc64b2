//! The operator endpoint over real HTTP: metrics move with what is recorded, readiness follows the
//! components' progress.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tributary::telemetry::{self, health::Health};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    (code, body)
}

/// Value of a Prometheus sample line `name{labels} value`.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_and_readiness_over_http() {
    let handle = telemetry::install_metrics();
    let health = Health::new(Duration::from_millis(300));
    let (addr, _task) =
        telemetry::http::serve("127.0.0.1:0".parse().unwrap(), handle, health.clone())
            .await
            .unwrap();

    assert_eq!(get(addr, "/healthz").await.0, 200);
    // Nothing registered: not ready.
    assert_eq!(get(addr, "/readyz").await.0, 503);

    metrics::counter!("tributary_test_events_total", "source" => "orders").increment(3);
    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        sample(&text, "tributary_test_events_total{source=\"orders\"}"),
        Some(3.0),
        "{text}"
    );
    metrics::counter!("tributary_test_events_total", "source" => "orders").increment(2);
    let text = get(addr, "/metrics").await.1;
    assert_eq!(
        sample(&text, "tributary_test_events_total{source=\"orders\"}"),
        Some(5.0)
    );
    // Every non-comment line is `name[{labels}] value`.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }

    let source = health.source("postgres");
    let sink = health.sink("delta");
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    // A stalled source turns it red and names itself.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("FAIL postgres: no progress"), "{body}");
    source.progress();
    assert_eq!(get(addr, "/readyz").await.0, 200);
    sink.commit_failed("store unreachable");
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("FAIL delta: last commit failed: store unreachable"),
        "{body}"
    );
}
