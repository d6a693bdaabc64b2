//! `tributary run` end to end on real services: Kafka → embeddings → pgvector, dead letters,
//! graceful shutdown that acknowledges everything, and a restart that re-applies nothing.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{env, pg_connect, unique};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

async fn create_topic(partitions: i32) -> String {
    let topic = unique("orders");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", env("TRIBUTARY_KAFKA_BROKERS"))
        .create()
        .unwrap();
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

/// Produces `(key, value)` messages; returns the offset after the last message per partition.
async fn produce(topic: &str, messages: &[(String, Vec<u8>)], partitions: i32) -> Vec<i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", env("TRIBUTARY_KAFKA_BROKERS"))
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    let mut next = vec![0i64; partitions as usize];
    for (i, (key, value)) in messages.iter().enumerate() {
        let partition = (i as i32) % partitions;
        let d = producer
            .send(
                FutureRecord::to(topic)
                    .partition(partition)
                    .key(key)
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        next[d.partition as usize] = next[d.partition as usize].max(d.offset + 1);
    }
    next
}

fn committed(topic: &str, group: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", env("TRIBUTARY_KAFKA_BROKERS"))
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
            Offset::Offset(o) => o,
            _ => 0,
        })
        .collect()
}

fn order(id: usize, note: &str) -> (String, Vec<u8>) {
    (
        format!("o-{id}"),
        format!(
            r#"{{"order_id":"o-{id}","customer":"Customer {}","amount":{id}.5,"note":"{note}"}}"#,
            id % 5
        )
        .into_bytes(),
    )
}

fn start(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SIGTERM, then the exit status (panics if it takes over 30 s).
fn stop(mut child: Child) -> (i32, String) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (s.code().unwrap_or(-1), err);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "run did not stop within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_pgvector_with_embeddings_dead_letters_and_clean_restarts() {
    const PARTS: i32 = 3;
    let topic = create_topic(PARTS).await;
    let group = unique("group");
    let schema = unique("pipe");
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dead.jsonl");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "pipeline-test"
[sources.kafka]
brokers = "{brokers}"
group_id = "{group}"
drain_timeout_ms = 2000
commit_interval_ms = 200
dead_letter = {{ path = "{dlq}" }}
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
[[sources.kafka.topics]]
name = "{topic}"
key_columns = ["order_id"]
[embedding]
model_dir = "{model}"
[embedding.templates]
"{topic}" = "{{customer}} wrote: {{note}}"
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_wait_ms = 100
[telemetry]
listen = ""
"#,
            brokers = env("TRIBUTARY_KAFKA_BROKERS"),
            dlq = dlq.display(),
            model = env("TRIBUTARY_MODEL_DIR"),
            pg = env("TRIBUTARY_PG_URL"),
        ),
    )
    .unwrap();

    let mut messages: Vec<_> = (0..30)
        .map(|i| order(i, &format!("note number {i}")))
        .collect();
    messages.insert(10, ("bad".into(), b"{not json".to_vec()));
    let end = produce(&topic, &messages, PARTS).await;

    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"{topic}\"");
    let count = |sql: String| {
        let pg = &pg;
        async move {
            pg.query_one(&sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };
    let run = start(&config);
    wait_for("30 rows in pgvector", async || {
        count(format!(
            "SELECT count(*) FROM {table} WHERE embedding IS NOT NULL"
        ))
        .await
            == 30
    })
    .await;
    wait_for("the dead letter", async || {
        std::fs::read_to_string(&dlq).is_ok_and(|s| s.lines().count() == 1)
    })
    .await;
    let (code, stderr) = stop(run);
    assert_eq!(code, 0, "{stderr}");
    // Everything processed was acknowledged: the group's offsets are at the end of each partition.
    assert_eq!(committed(&topic, &group, PARTS), end, "{stderr}");
    let letter: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&dlq).unwrap().trim()).unwrap();
    assert_eq!(letter["key"], "bad");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("json"),
        "{letter}"
    );

    // The nearest order to a query text is the one whose note says so.
    let mut embedder = tributary::enrich::Embedder::load(
        &tributary::config::EmbeddingConfig::for_model(env("TRIBUTARY_MODEL_DIR").into()),
    )
    .unwrap();
    let q = embedder
        .embed(&["Customer 2 wrote: note number 17"])
        .unwrap()
        .remove(0);
    let nearest: String = pg
        .query_one(
            &format!("SELECT order_id FROM {table} ORDER BY embedding <=> $1 LIMIT 1"),
            &[&pgvector::Vector::from(q)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(nearest, "o-17");

    // Restart: nothing is applied again; a new change arrives once.
    let before: i64 = count(format!("SELECT count(*) FROM {table}")).await;
    let marker: String = pg
        .query_one(&format!("SELECT max(_updated_at)::text FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    let run = start(&config);
    produce(&topic, &[order(3, "changed its mind: three lamps")], PARTS).await;
    wait_for("the update", async || {
        count(format!(
            "SELECT count(*) FROM {table} WHERE order_id = 'o-3' AND payload->>'note' LIKE 'changed%'"
        ))
        .await
            == 1
    })
    .await;
    let (code, stderr) = stop(run);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(format!("SELECT count(*) FROM {table}")).await, before);
    let rewritten = count(format!(
        "SELECT count(*) FROM {table} WHERE _updated_at > '{marker}'::timestamptz"
    ))
    .await;
    assert_eq!(rewritten, 1, "rows were re-applied after the restart");
}
