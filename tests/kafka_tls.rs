//! The Kafka source over TLS and SASL_SSL, configured the Confluent way (a `client.properties`
//! file), against the TLS brokers of `scripts/services`: the TLS broker
//! (`TRIBUTARY_KAFKA_TLS_BROKERS`, certificate from the script's own CA) and the TLS broker that
//! requires SASL (`TRIBUTARY_KAFKA_SASL_BROKERS`).
//!
//! The local broker (tansu 0.6.0) cannot complete a SASL login: it offers only SCRAM-SHA-256/512,
//! and its memory/S3 storage keeps no SCRAM credentials (`tansu user create` is a no-op there,
//! every login ends in `unknown-user`). So consume, commit and dead letters run over TLS with
//! certificate verification, and the SASL_SSL tests cover what a real login failure looks like.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{env, unique};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tributary::config::KafkaSourceConfig;
use tributary::event::Value;
use tributary::source::kafka::{self, KafkaEvent};

const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "hunter2-correct-horse-battery";

/// The properties a Confluent-style `client.properties` holds for the TLS broker.
fn tls_properties() -> Vec<(&'static str, String)> {
    vec![
        ("bootstrap.servers", env("TRIBUTARY_KAFKA_TLS_BROKERS")),
        ("security.protocol", "SSL".into()),
        ("ssl.ca.location", env("TRIBUTARY_KAFKA_TLS_CA")),
        // librdkafka's default, spelled out: the certificate must name the broker's address.
        ("ssl.endpoint.identification.algorithm", "https".into()),
    ]
}

fn client(props: &[(&str, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in props {
        c.set(*k, v);
    }
    c
}

fn write_properties(dir: &Path, lines: &[(&str, String)]) -> std::path::PathBuf {
    let path = dir.join("client.properties");
    let mut text = String::from("# Confluent-style client configuration\n");
    for (k, v) in lines {
        text.push_str(&format!("{k}={v}\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

async fn create_topic(partitions: i32) -> String {
    let topic = unique("tls_orders");
    let admin: AdminClient<DefaultClientContext> = client(&tls_properties()).create().unwrap();
    for r in admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    topic
}

async fn produce(topic: &str, messages: &[(i32, Vec<u8>)]) {
    let producer: FutureProducer = client(&tls_properties())
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    for (partition, value) in messages {
        producer
            .send(
                FutureRecord::<(), _>::to(topic)
                    .partition(*partition)
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

fn committed(topic: &str, group: &str, partitions: i32) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = client(&tls_properties())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).unwrap().offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
        .collect()
}

fn order(id: usize) -> Vec<u8> {
    format!(r#"{{"order_id":"o-{id}","amount":{id}.5}}"#).into_bytes()
}

fn source_config(topic: &str, group: &str, properties: &Path, dlq: &Path) -> KafkaSourceConfig {
    toml::from_str(&format!(
        r#"
client_properties = "{properties}"
group_id = "{group}"
drain_timeout_ms = 2000
commit_interval_ms = 200
dead_letter = {{ path = "{dlq}" }}
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
[[topics]]
name = "{topic}"
key_columns = ["order_id"]
"#,
        properties = properties.display(),
        dlq = dlq.display(),
    ))
    .unwrap()
}

async fn next(
    rx: &mut tokio::sync::mpsc::Receiver<Vec<KafkaEvent>>,
    queued: &mut Vec<KafkaEvent>,
) -> KafkaEvent {
    while queued.is_empty() {
        let mut batch = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no event within 60 s")
            .expect("the source stopped");
        batch.reverse();
        *queued = batch;
    }
    queued.pop().unwrap()
}

fn order_id(e: &KafkaEvent) -> String {
    match e.event.key.get("order_id") {
        Some(Value::Text(id)) => id.to_string(),
        other => panic!("key: {other:?}"),
    }
}

/// Over TLS (certificate checked against the CA in `ssl.ca.location`), configured only by a
/// `client.properties` file: every message once, malformed ones dead-lettered with their reason,
/// offsets committed, and a restart resumes after the committed offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consume_commit_restart_and_dead_letter_over_tls_from_client_properties() {
    let topic = create_topic(2).await;
    let group = unique("tls_group");
    let dir = tempfile::tempdir().unwrap();
    let properties = write_properties(dir.path(), &tls_properties());
    let dlq = dir.path().join("dlq.jsonl");
    let config = source_config(&topic, &group, &properties, &dlq);

    // 10 orders and 2 malformed messages (offsets 3 and 4 of partition 0).
    let mut first: Vec<(i32, Vec<u8>)> = (0..10).map(|i| ((i % 2) as i32, order(i))).collect();
    first.insert(5, (0, b"{\"order_id\": ".to_vec()));
    first.insert(6, (0, b"[1, 2]".to_vec()));
    produce(&topic, &first).await;

    let (mut rx, handle) = kafka::start(&config, 4).await.unwrap();
    let mut queued = Vec::new();
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        let e = next(&mut rx, &mut queued).await;
        assert!(
            seen.insert(order_id(&e)),
            "{} delivered twice",
            order_id(&e)
        );
        handle.acker().ack(&e.event.position);
    }
    handle.shutdown().await.unwrap();
    assert_eq!(seen.len(), 10);
    assert_eq!(committed(&topic, &group, 2), vec![Some(7), Some(5)]);
    let letters = std::fs::read_to_string(&dlq).unwrap();
    let reasons: Vec<serde_json::Value> = letters
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{letters}");
    assert!(
        reasons[0]["error"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{letters}"
    );
    assert!(
        reasons[1]["error"]
            .as_str()
            .unwrap()
            .contains("must be a JSON object"),
        "{letters}"
    );

    // A restart resumes after the committed offsets: only the new orders arrive, and the
    // malformed messages are not dead-lettered again.
    let second: Vec<(i32, Vec<u8>)> = (10..14).map(|i| ((i % 2) as i32, order(i))).collect();
    produce(&topic, &second).await;
    let (mut rx, handle) = kafka::start(&config, 4).await.unwrap();
    let mut again = BTreeSet::new();
    for _ in 0..4 {
        let e = next(&mut rx, &mut queued).await;
        again.insert(order_id(&e));
        handle.acker().ack(&e.event.position);
    }
    let expected: BTreeSet<String> = (10..14).map(|i| format!("o-{i}")).collect();
    assert_eq!(again, expected);
    // Nothing older follows.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .is_err(),
        "a message before the committed offset was delivered again"
    );
    handle.shutdown().await.unwrap();
    assert_eq!(committed(&topic, &group, 2), vec![Some(9), Some(7)]);
    assert_eq!(std::fs::read_to_string(&dlq).unwrap(), letters);
}

/// `tributary check` for a connector file whose Kafka source uses `client_properties`.
fn check(dir: &Path, properties: &Path) -> (bool, String) {
    let cfg = dir.join("connector.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"tls\"\n[sources.kafka]\nclient_properties = \"{}\"\ngroup_id = \"{}\"\n\
             dead_letter = {{ path = \"dlq.jsonl\" }}\n[[sources.kafka.topics]]\nname = \"orders\"\n\
             [sinks.delta]\nuri = \"{}\"\n",
            properties.display(),
            unique("g"),
            dir.join("lake").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_reaches_the_tls_broker_and_names_an_untrusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_properties(dir.path(), &tls_properties());
    let (ok, text) = check(dir.path(), &good);
    assert!(ok, "{text}");
    assert!(text.contains("orders (3 partitions)"), "{text}");

    // Without the CA the broker's certificate cannot be verified.
    let untrusted: Vec<_> = tls_properties()
        .into_iter()
        .filter(|(k, _)| *k != "ssl.ca.location")
        .collect();
    let bad = write_properties(dir.path(), &untrusted);
    let (ok, text) = check(dir.path(), &bad);
    assert!(!ok, "{text}");
    let kafka_line = text.lines().find(|l| l.contains("kafka")).unwrap_or(&text);
    assert!(
        kafka_line.contains(&env("TRIBUTARY_KAFKA_TLS_BROKERS")),
        "{text}"
    );
    assert!(kafka_line.contains("certificate"), "{text}");
}

/// SASL_SSL with a password the broker rejects: `check` fails naming the broker, the mechanism
/// and the user, and neither `check` nor `run` ever prints the password. `run` stops with the
/// same error instead of retrying a login that cannot succeed.
#[test]
fn a_rejected_sasl_login_names_the_broker_and_mechanism_never_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let brokers = env("TRIBUTARY_KAFKA_SASL_BROKERS");
    for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256"] {
        let properties = write_properties(
            dir.path(),
            &[
                ("bootstrap.servers", brokers.clone()),
                ("security.protocol", "SASL_SSL".into()),
                ("sasl.mechanisms", mechanism.into()),
                ("sasl.username", "tributary".into()),
                ("sasl.password", PASSWORD.into()),
                ("ssl.ca.location", env("TRIBUTARY_KAFKA_TLS_CA")),
            ],
        );
        let (ok, text) = check(dir.path(), &properties);
        assert!(!ok, "{text}");
        assert!(!text.contains(PASSWORD), "the password was shown: {text}");
        let line = text
            .lines()
            .find(|l| l.contains("Kafka authentication failed"))
            .unwrap_or_else(|| panic!("no authentication error: {text}"));
        assert!(line.contains(&brokers), "{line}");
        assert!(line.contains(mechanism), "{line}");
        assert!(line.contains("tributary"), "{line}");

        let cfg = dir.path().join("connector.toml");
        let started = std::time::Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{text}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "run took {:?} to give up",
            started.elapsed()
        );
        assert!(!text.contains(PASSWORD), "the password was shown: {text}");
        let line = text
            .lines()
            .rev()
            .find(|l| l.contains("Kafka authentication failed"))
            .unwrap_or_else(|| panic!("no authentication error: {text}"));
        assert!(
            line.contains(&brokers) && line.contains(mechanism),
            "{line}"
        );
    }
}
