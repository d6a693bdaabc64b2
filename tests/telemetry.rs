//! The operator endpoint over real HTTP: metrics move with what is recorded, readiness follows the
//! components' progress.

mod common;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_connector_reports_its_work_and_leaks_no_secret() {
    use common::kafka::{create_topic, produce};
    use common::run::{start, stop, wait_for};
    use common::{env, unique};

    let topic = create_topic(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    const SECRET: &str = "sasl-secret-Zq81x";
    std::fs::write(
        &config,
        format!(
            r#"
name = "telemetry-test"
[sources.kafka]
brokers = "{brokers}"
group_id = "{group}"
dead_letter = {{ path = "{dlq}" }}
# A secret the run must never print, even at debug level (librdkafka reports unused properties).
properties = {{ "session.timeout.ms" = "6000", "sasl.username" = "alice", "sasl.password" = "{SECRET}" }}
[[sources.kafka.topics]]
name = "{topic}"
key_columns = ["order_id"]
[embedding]
model_dir = "{model}"
[embedding.templates]
"{topic}" = "{{note}}"
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_wait_ms = 50
[telemetry]
listen = "127.0.0.1:{port}"
"#,
            brokers = env("TRIBUTARY_KAFKA_BROKERS"),
            group = unique("group"),
            dlq = dir.path().join("dlq.jsonl").display(),
            model = env("TRIBUTARY_MODEL_DIR"),
            pg = env("TRIBUTARY_PG_URL"),
            schema = unique("tel"),
        ),
    )
    .unwrap();
    let run = start(&config);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("the endpoint", async || {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let messages: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                format!("o-{i}"),
                format!(r#"{{"order_id":"o-{i}","note":"note {i}"}}"#).into_bytes(),
            )
        })
        .collect();
    produce(&topic, &messages, 1).await;
    wait_for("20 rows committed", async || {
        let text = get(addr, "/metrics").await.1;
        sample(&text, "tributary_sink_rows_total{sink=\"pgvector\"}").unwrap_or(0.0) >= 20.0
    })
    .await;
    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        sample(&text, "tributary_embed_texts_total").unwrap_or(0.0) >= 20.0,
        "{text}"
    );
    assert!(text.contains("tributary_sink_commit_seconds"), "{text}");
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        assert!(
            line.rsplit(' ').next().unwrap().parse::<f64>().is_ok(),
            "{line:?}"
        );
    }
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("ok   pgvector"), "{body}");
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("batch done"), "{log}");
    assert!(!log.contains(SECRET), "the secret leaked into the log");
    assert!(!text.contains(SECRET), "the secret leaked into a metric");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sources_stay_ready_and_a_stalled_postgres_loop_turns_readyz_red() {
    use common::kafka::create_topic;
    use common::run::{start, stop, wait_for};
    use common::{env, pg_connect, unique};

    let topic = create_topic(1).await;
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let dbname = unique("telsrc");
    admin
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .unwrap();
    let src_url = common::pg_url_for_db(&dbname);
    pg_connect(&src_url)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let slot = unique("slot");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    std::fs::write(
        &config,
        format!(
            r#"
name = "readiness-test"
[sources.postgres]
url = "{src_url}"
publication = "p"
slot = "{slot}"
tables = ["t"]
slot_check_interval_s = 1
[sources.kafka]
brokers = "{brokers}"
group_id = "{group}"
commit_interval_ms = 300
dead_letter = {{ path = "{dlq}" }}
properties = {{ "statistics.interval.ms" = "1000", "session.timeout.ms" = "6000" }}
[[sources.kafka.topics]]
name = "{topic}"
key_columns = ["id"]
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[telemetry]
listen = "127.0.0.1:{port}"
ready_window_s = 2
"#,
            brokers = env("TRIBUTARY_KAFKA_BROKERS"),
            group = unique("group"),
            dlq = dir.path().join("dlq.jsonl").display(),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();
    let run = start(&config);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("the endpoint", async || {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    wait_for("ready", async || get(addr, "/readyz").await.0 == 200).await;
    // Nothing happens on either source for twice the window: both are idle, not stalled.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("kafka") && body.contains("postgres"),
        "{body}"
    );
    let text = get(addr, "/metrics").await.1;
    assert!(
        sample(
            &text,
            &format!("tributary_postgres_slot_lag_bytes{{slot=\"{slot}\"}}")
        )
        .is_some(),
        "{text}"
    );
    // Per-partition offsets from librdkafka's statistics, once the group assigned the partition.
    wait_for("the Kafka partition gauges", async || {
        get(addr, "/metrics").await.1.lines().any(|l| {
            l.starts_with("tributary_kafka_high_watermark{")
                && l.contains(&format!("topic=\"{topic}\""))
        })
    })
    .await;

    // The replication connection drops and cannot come back: the loop stalls, /readyz says so.
    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    wait_for("/readyz to turn red", async || {
        let (code, body) = get(addr, "/readyz").await;
        code == 503
            && body
                .lines()
                .any(|l| l.contains("postgres") && l.contains("no progress"))
    })
    .await;
    // Connections allowed again: the source reconnects (backoff) and is ready again.
    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    wait_for("/readyz to recover", async || {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");

    common::drop_source_db(&admin, &dbname, &slot).await;
}
