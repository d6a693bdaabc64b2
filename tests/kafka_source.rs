//! The Kafka source against the real (tansu) broker from `scripts/services`: exactly-once through
//! commit and restart, re-delivery of unacknowledged events, dead letters, Debezium envelopes,
//! and a rebalance between two running consumers.

mod common;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::kafka::{committed, create_topic, producer};
use common::{env, unique};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc::Receiver;
use tributary::config::KafkaSourceConfig;
use tributary::event::{Op, Position, Value};
use tributary::source::kafka::{self, KafkaEvent, KafkaSourceHandle};

const WAIT: Duration = Duration::from_secs(60);

/// Produces `(partition, key, value)` messages in order; returns their (partition, offset).
/// (partition, key, value)
type Outgoing<'a> = (i32, Option<&'a [u8]>, Option<&'a [u8]>);

async fn produce(topic: &str, messages: &[Outgoing<'_>]) -> Vec<(i32, i64)> {
    let producer = producer();
    let mut out = Vec::new();
    for (partition, key, value) in messages {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).partition(*partition);
        if let Some(k) = key {
            record = record.key(*k);
        }
        if let Some(v) = value {
            record = record.payload(*v);
        }
        let d = producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        out.push((d.partition, d.offset));
    }
    out
}

fn order(id: usize) -> Vec<u8> {
    format!(
        r#"{{"order_id":"o-{id}","customer":"c-{}","amount":{}.5,"note":"order {id}"}}"#,
        id % 7,
        id
    )
    .into_bytes()
}

fn source_config(topic: &str, group: &str, extra: &str, dlq: &Path) -> KafkaSourceConfig {
    let text = format!(
        r#"
brokers = "{brokers}"
group_id = "{group}"
drain_timeout_ms = 2000
commit_interval_ms = 200
dead_letter = {{ path = "{dlq}" }}
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
{extra}
"#,
        brokers = env("TRIBUTARY_KAFKA_BROKERS"),
        dlq = dlq.display(),
    );
    let text = if extra.contains("[[topics]]") {
        text
    } else {
        format!("{text}\n[[topics]]\nname = \"{topic}\"\nkey_columns = [\"order_id\"]\n")
    };
    toml::from_str(&text).unwrap()
}

/// The source's batches, one event at a time.
struct Events {
    rx: Receiver<Vec<KafkaEvent>>,
    queued: VecDeque<KafkaEvent>,
}

async fn start(config: &KafkaSourceConfig) -> (Events, KafkaSourceHandle) {
    let (rx, handle) = kafka::start(config, 4).await.unwrap();
    let events = Events {
        rx,
        queued: VecDeque::new(),
    };
    (events, handle)
}

async fn next(events: &mut Events) -> KafkaEvent {
    while events.queued.is_empty() {
        let batch = tokio::time::timeout(WAIT, events.rx.recv())
            .await
            .expect("no event within 60 s")
            .expect("the source stopped");
        events.queued.extend(batch);
    }
    events.queued.pop_front().unwrap()
}

fn offset_of(e: &KafkaEvent) -> (i32, i64) {
    match tributary::source::kafka::offset_of(&e.event.position) {
        Some((_, partition, offset)) => (partition, offset),
        None => panic!("not a Kafka position: {}", e.event.position),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumes_each_message_once_across_commit_and_restart() {
    let topic = create_topic(3).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let config = source_config(&topic, &group, "", &dir.path().join("dlq.jsonl"));
    let first: Vec<Vec<u8>> = (0..30).map(order).collect();
    let batch: Vec<_> = first
        .iter()
        .enumerate()
        .map(|(i, v)| ((i % 3) as i32, None, Some(v.as_slice())))
        .collect();
    produce(&topic, &batch).await;

    let (mut rx, handle) = start(&config).await;
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let e = next(&mut rx).await;
        assert_eq!(e.event.op, Op::Insert);
        let Some(Value::Text(id)) = e.event.key.get("order_id") else {
            panic!("key: {:?}", e.event.key)
        };
        assert!(seen.insert(id.clone()), "{id} delivered twice");
        handle.acker().ack(&e.event.position);
    }
    assert_eq!(seen.len(), 30);
    handle.shutdown().await.unwrap();
    assert_eq!(
        committed(&topic, &group, 3),
        vec![Some(10), Some(10), Some(10)]
    );

    // After a restart only new messages arrive: a sentinel per partition, produced after the new
    // orders, proves nothing older was re-delivered before it.
    let second: Vec<Vec<u8>> = (30..39).map(order).collect();
    let mut batch: Vec<_> = second
        .iter()
        .enumerate()
        .map(|(i, v)| ((i % 3) as i32, None, Some(v.as_slice())))
        .collect();
    let sentinels: Vec<Vec<u8>> = (0..3).map(|p| order(1000 + p)).collect();
    batch.extend(
        sentinels
            .iter()
            .enumerate()
            .map(|(p, v)| (p as i32, None, Some(v.as_slice()))),
    );
    produce(&topic, &batch).await;
    let (mut rx, handle) = start(&config).await;
    let mut again = Vec::new();
    let mut sentinels_seen = 0;
    while sentinels_seen < 3 {
        let e = next(&mut rx).await;
        handle.acker().ack(&e.event.position);
        let Some(Value::Text(id)) = e.event.key.get("order_id").cloned() else {
            panic!("no key")
        };
        if id.starts_with("o-100") {
            sentinels_seen += 1;
        } else {
            again.push(id);
        }
    }
    again.sort();
    let expected: Vec<String> = (30..39).map(|i| format!("o-{i}")).collect();
    assert_eq!(again, expected);
    handle.shutdown().await.unwrap();
    assert_eq!(
        committed(&topic, &group, 3),
        vec![Some(14), Some(14), Some(14)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unacknowledged_events_are_redelivered_after_restart() {
    let topic = create_topic(1).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let mut config = source_config(&topic, &group, "", &dir.path().join("dlq.jsonl"));
    config.drain_timeout_ms = 300;
    let values: Vec<Vec<u8>> = (0..20).map(order).collect();
    let batch: Vec<_> = values
        .iter()
        .map(|v| (0, None, Some(v.as_slice())))
        .collect();
    produce(&topic, &batch).await;

    let (mut rx, handle) = start(&config).await;
    for _ in 0..20 {
        let e = next(&mut rx).await;
        // The pipeline made only the first ten durable.
        if offset_of(&e).1 <= 9 {
            handle.acker().ack(&e.event.position);
        }
    }
    handle.shutdown().await.unwrap();
    assert_eq!(committed(&topic, &group, 1), vec![Some(10)]);

    let (mut rx, handle) = start(&config).await;
    let mut redelivered = Vec::new();
    for _ in 10..20 {
        let e = next(&mut rx).await;
        redelivered.push(offset_of(&e).1);
        handle.acker().ack(&e.event.position);
    }
    assert_eq!(redelivered, (10..20).collect::<Vec<_>>());
    handle.shutdown().await.unwrap();
    assert_eq!(committed(&topic, &group, 1), vec![Some(20)]);
}

#[derive(serde::Deserialize)]
struct Letter {
    source: String,
    position: Position,
    key: Option<String>,
    raw_base64: String,
    error: String,
}

/// Decoding runs on several tasks; what they decode must still come out in partition order,
/// once each, with dead letters in their place, and commit to the end of each partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_decoding_keeps_partition_order() {
    const PER_PARTITION: usize = 2_000;
    let topic = create_topic(3).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dlq.jsonl");
    let config = source_config(&topic, &group, "decode_tasks = 3", &dlq);
    assert_eq!(config.decode_tasks(), 3);
    // Every 700th message of a partition is not JSON: the chunks holding one take the
    // one-by-one path while the chunks around them take the fast one.
    let values: Vec<(i32, Vec<u8>)> = (0..3 * PER_PARTITION)
        .map(|i| {
            let partition = (i % 3) as i32;
            let value = if (i / 3) % 700 == 699 {
                b"{not json".to_vec()
            } else {
                order(i)
            };
            (partition, value)
        })
        .collect();
    // Concurrently, so that thousands of messages are produced in a few seconds.
    let producer = producer();
    let deliveries: Vec<_> = values
        .iter()
        .map(|(partition, value)| {
            producer.send(
                FutureRecord::<[u8], [u8]>::to(&topic)
                    .partition(*partition)
                    .payload(value.as_slice()),
                Duration::from_secs(10),
            )
        })
        .collect();
    for d in futures::future::join_all(deliveries).await {
        d.map_err(|(e, _)| e).unwrap();
    }
    let bad = values
        .iter()
        .filter(|(_, v)| v.starts_with(b"{not"))
        .count();
    assert_eq!(bad, 6);

    let (mut rx, handle) = start(&config).await;
    let mut last: [i64; 3] = [-1; 3];
    let mut seen = HashSet::new();
    for _ in 0..values.len() - bad {
        let e = next(&mut rx).await;
        let (partition, offset) = offset_of(&e);
        assert!(
            offset > last[partition as usize],
            "partition {partition}: offset {offset} after {}",
            last[partition as usize]
        );
        last[partition as usize] = offset;
        let Some(Value::Text(id)) = e.event.key.get("order_id") else {
            panic!("no order_id in {:?}", e.event.key)
        };
        assert!(seen.insert(id.to_string()), "{id} twice");
        handle.acker().ack(&e.event.position);
    }
    assert_eq!(last, [PER_PARTITION as i64 - 1; 3]);
    handle.shutdown().await.unwrap();
    assert_eq!(
        committed(&topic, &group, 3),
        vec![Some(PER_PARTITION as i64); 3]
    );
    let letters = std::fs::read_to_string(&dlq).unwrap();
    assert_eq!(letters.lines().count(), bad, "{letters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_messages_are_dead_lettered_while_good_ones_flow() {
    let topic = create_topic(1).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dlq.jsonl");
    let extra = format!(
        "max_message_bytes = 400\n[[topics]]\nname = \"{topic}\"\nkey_columns = [\"order_id\"]\n\
         columns = {{ amount = \"float64\", order_id = \"text\" }}\n"
    );
    let config = source_config(&topic, &group, &extra, &dlq);
    let oversize = format!(r#"{{"order_id":"big","note":"{}"}}"#, "x".repeat(500));
    let bad: Vec<(&[u8], &str)> = vec![
        (b"{\"order_id\":\"o-\xff\"}", "not valid UTF-8"),
        (b"{\"order_id\": ", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, found an array"),
        (br#"{"amount": 3.5}"#, "key column \"order_id\" is missing"),
        (
            br#"{"order_id": "o-x", "amount": "lots"}"#,
            "declared float64 but holds a string",
        ),
        (oversize.as_bytes(), "exceeds max_message_bytes (400)"),
    ];
    let good: Vec<Vec<u8>> = (0..3).map(order).collect();
    let mut batch = vec![(0, Some(b"k-0".as_slice()), Some(good[0].as_slice()))];
    for (raw, _) in &bad {
        batch.push((0, Some(b"bad-key".as_slice()), Some(*raw)));
    }
    batch.push((0, None, Some(good[1].as_slice())));
    batch.push((0, None, Some(good[2].as_slice())));
    produce(&topic, &batch).await;

    let (mut rx, handle) = start(&config).await;
    let mut offsets = Vec::new();
    for _ in 0..3 {
        let e = next(&mut rx).await;
        let after = e.event.after.as_ref().unwrap();
        assert!(
            matches!(after.get("amount"), Some(Value::Float64(_))),
            "{after:?}"
        );
        offsets.push(offset_of(&e).1);
        handle.acker().ack(&e.event.position);
    }
    assert_eq!(
        offsets,
        vec![0, 7, 8],
        "good messages flow around the bad ones"
    );
    handle.shutdown().await.unwrap();
    assert_eq!(committed(&topic, &group, 1), vec![Some(9)]);

    let text = std::fs::read_to_string(&dlq).unwrap();
    let letters: Vec<Letter> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), bad.len(), "{text}");
    for (i, (letter, (raw, reason))) in letters.iter().zip(&bad).enumerate() {
        assert_eq!(letter.source, topic);
        assert_eq!(
            letter.position,
            tributary::source::kafka::position(&topic, 0, i as i64 + 1)
        );
        assert_eq!(letter.key.as_deref(), Some("bad-key"));
        assert!(
            letter.error.contains(reason),
            "{} should say {reason:?}",
            letter.error
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&letter.raw_base64)
            .unwrap();
        assert_eq!(bytes, *raw, "the raw bytes are kept as they arrived");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debezium_envelopes_become_change_events_and_tombstones_are_skipped() {
    let topic = create_topic(1).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[[topics]]\nname = \"{topic}\"\nformat = \"debezium\"\n");
    let config = source_config(&topic, &group, &extra, &dir.path().join("dlq.jsonl"));
    let source = r#""source":{"version":"2.7.0.Final","connector":"postgresql","name":"shop","ts_ms":1732356000000,"db":"shop","schema":"public","table":"orders","txId":771,"lsn":24023128}"#;
    let row = |status: &str| format!(r#"{{"id":1,"status":"{status}","total":99.5}}"#);
    // With the JSON converter's schemas enabled: {"schema": ..., "payload": envelope}.
    let snapshot = format!(
        r#"{{"before":null,"after":{},{source},"op":"r","ts_ms":1732356000100}}"#,
        row("new")
    );
    let created = format!(
        r#"{{"schema":{{"type":"struct","optional":false,"name":"shop.public.orders.Envelope"}},"payload":{{"before":null,"after":{},{source},"op":"c","ts_ms":1732356000200}}}}"#,
        row("new")
    );
    let updated = format!(
        r#"{{"before":{},"after":{},{source},"op":"u","ts_ms":1732356000300}}"#,
        row("new"),
        row("paid")
    );
    let deleted = format!(
        r#"{{"before":{},"after":null,{source},"op":"d","ts_ms":1732356000400}}"#,
        row("paid")
    );
    let key = br#"{"schema":{"type":"struct","fields":[{"type":"int32","optional":false,"field":"id"}],"optional":false,"name":"shop.public.orders.Key"},"payload":{"id":1}}"#;
    let batch = vec![
        (0, Some(key.as_slice()), Some(snapshot.as_bytes())),
        (0, Some(key.as_slice()), Some(created.as_bytes())),
        (0, Some(key.as_slice()), Some(updated.as_bytes())),
        (0, Some(key.as_slice()), Some(deleted.as_bytes())),
        (0, Some(key.as_slice()), None),
        (0, Some(key.as_slice()), Some(snapshot.as_bytes())),
    ];
    produce(&topic, &batch).await;
    // Headers are kept: one more snapshot row with a header.
    producer()
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key(key.as_slice())
                .payload(snapshot.as_bytes())
                .headers(OwnedHeaders::new().insert(Header {
                    key: "trace",
                    value: Some("abc"),
                })),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let (mut rx, handle) = start(&config).await;
    let mut events = Vec::new();
    for _ in 0..6 {
        let e = next(&mut rx).await;
        handle.acker().ack(&e.event.position);
        events.push(e);
    }
    handle.shutdown().await.unwrap();
    let ops: Vec<(Op, i64)> = events
        .iter()
        .map(|e| (e.event.op, offset_of(e).1))
        .collect();
    assert_eq!(
        ops,
        vec![
            (Op::Snapshot, 0),
            (Op::Insert, 1),
            (Op::Update, 2),
            (Op::Delete, 3),
            (Op::Snapshot, 5),
            (Op::Snapshot, 6)
        ],
        "the tombstone at offset 4 is skipped"
    );
    for e in &events {
        assert_eq!(
            e.event.key.get("id"),
            Some(&Value::Int64(1)),
            "key from the Debezium key payload"
        );
        assert_eq!(e.meta.source_lsn, Some(24023128));
        assert_eq!(e.event.source_ts.unwrap().timestamp_millis(), 1732356000000);
    }
    let update = &events[2].event;
    assert_eq!(
        update.before.as_ref().unwrap().get("status"),
        Some(&Value::Text("new".into()))
    );
    assert_eq!(
        update.after.as_ref().unwrap().get("status"),
        Some(&Value::Text("paid".into()))
    );
    assert_eq!(
        update.after.as_ref().unwrap().get("total"),
        Some(&Value::Float64(99.5))
    );
    let delete = &events[3].event;
    assert!(delete.after.is_none());
    assert_eq!(
        delete.before.as_ref().unwrap().get("status"),
        Some(&Value::Text("paid".into()))
    );
    assert_eq!(
        events[5].meta.headers,
        vec![("trace".to_owned(), Some(b"abc".to_vec()))]
    );
    assert!(
        events[5].meta.timestamp.is_some(),
        "the message timestamp is kept"
    );
    assert_eq!(committed(&topic, &group, 1), vec![Some(7)]);
}

/// What the stand-in pipelines wrote: (instance, partition, offset).
type Output = Arc<Mutex<Vec<(&'static str, i32, i64)>>>;

/// A pipeline stand-in: records every event it receives (tagged with the instance), then acks.
fn pipeline(
    name: &'static str,
    mut events: Events,
    handle: &KafkaSourceHandle,
    out: Output,
) -> tokio::task::JoinHandle<()> {
    let acker = handle.acker();
    tokio::spawn(async move {
        while let Some(batch) = events.rx.recv().await {
            for e in batch {
                let (p, o) = offset_of(&e);
                out.lock().unwrap().push((name, p, o));
                acker.ack(&e.event.position);
            }
        }
    })
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_split_partitions_and_one_leaves_without_loss_or_duplicates() {
    let topic = create_topic(3).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let config = source_config(&topic, &group, "", &dir.path().join("dlq.jsonl"));
    let out = Arc::new(Mutex::new(Vec::new()));

    let (rx_a, a) = start(&config).await;
    let (rx_b, b) = start(&config).await;
    let pa = pipeline("a", rx_a, &a, Arc::clone(&out));
    let pb = pipeline("b", rx_b, &b, Arc::clone(&out));
    wait_until("both instances to own partitions", || {
        let (x, y) = (a.assignment(), b.assignment());
        !x.is_empty() && !y.is_empty() && x.len() + y.len() == 3
    })
    .await;

    let values: Vec<Vec<u8>> = (0..300).map(order).collect();
    let batch: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, v)| ((i % 3) as i32, None, Some(v.as_slice())))
        .collect();
    let mut produced: Vec<(i32, i64)> = produce(&topic, &batch[..150]).await;
    wait_until("the first half", || out.lock().unwrap().len() >= 150).await;
    {
        let seen = out.lock().unwrap();
        assert!(
            seen.iter().any(|e| e.0 == "a") && seen.iter().any(|e| e.0 == "b"),
            "both instances consumed"
        );
    }

    // b leaves while messages keep arriving; a takes over b's partitions from b's commits.
    let producing = tokio::spawn({
        let topic = topic.clone();
        let batch: Vec<(i32, Vec<u8>)> = batch[150..]
            .iter()
            .map(|(p, _, v)| (*p, v.unwrap().to_vec()))
            .collect();
        async move {
            let borrowed: Vec<_> = batch
                .iter()
                .map(|(p, v)| (*p, None, Some(v.as_slice())))
                .collect();
            produce(&topic, &borrowed).await
        }
    });
    b.shutdown().await.unwrap();
    pb.await.unwrap();
    produced.extend(producing.await.unwrap());
    wait_until("a to own every partition", || a.assignment().len() == 3).await;
    wait_until("every message", || out.lock().unwrap().len() >= 300).await;
    a.shutdown().await.unwrap();
    pa.await.unwrap();

    let seen = out.lock().unwrap();
    let unique_positions: HashSet<(i32, i64)> = seen.iter().map(|e| (e.1, e.2)).collect();
    assert_eq!(
        unique_positions.len(),
        seen.len(),
        "an event was delivered twice"
    );
    assert_eq!(
        unique_positions,
        produced.into_iter().collect::<HashSet<_>>(),
        "an event was lost"
    );
    assert_eq!(
        committed(&topic, &group, 3),
        vec![Some(100), Some(100), Some(100)]
    );
}

#[test]
fn every_sample_order_decodes_with_the_documented_topic_config() {
    let config: KafkaSourceConfig = toml::from_str(
        r#"
brokers = "127.0.0.1:9"
group_id = "g"
[[topics]]
name = "orders"
key_columns = ["order_id"]
columns = { order_id = "text", total = "float64", subtotal = "float64", created_at = "timestamptz", updated_at = "timestamptz", items = "json" }
"#,
    )
    .unwrap();
    let decoder = kafka::decode::Decoder::new(&config.topics[0], config.max_message_bytes);
    let sample = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("kafka/orders.sample.jsonl"),
    )
    .unwrap();
    let mut ids = HashSet::new();
    let mut notes = 0;
    for (i, line) in sample.lines().enumerate() {
        let raw = kafka::decode::RawMessage {
            topic: "orders",
            partition: 0,
            offset: i as i64,
            key: None,
            payload: Some(line.as_bytes()),
            timestamp_ms: None,
            timestamp_type: None,
            headers: Vec::new(),
        };
        let kafka::Decoded::Event(e) = decoder.decode(&raw).unwrap() else {
            panic!("line {i} is not an event")
        };
        let after = e.event.after.unwrap();
        assert!(matches!(after.get("total"), Some(Value::Float64(t)) if *t > 0.0));
        assert!(matches!(
            after.get("created_at"),
            Some(Value::TimestampTz(_))
        ));
        if let Some(Value::Text(_)) = after.get("note") {
            notes += 1;
        }
        let Some(Value::Text(id)) = e.event.key.get("order_id") else {
            panic!("line {i}: no order_id key")
        };
        ids.insert(id.clone());
    }
    assert_eq!(sample.lines().count(), 1000);
    assert!(ids.len() < 1000, "orders move through statuses: ids repeat");
    assert!(notes > 500, "most orders carry a note to embed ({notes})");
}

#[test]
fn drain_timeout_must_be_shorter_than_the_session_timeout() {
    let text = |drain: u64, session: &str| {
        format!(
            "name = \"t\"\n[sources.kafka]\nbrokers = \"h:9092\"\ngroup_id = \"g\"\n\
             drain_timeout_ms = {drain}\nproperties = {{ \"session.timeout.ms\" = \"{session}\" }}\n\
             [[sources.kafka.topics]]\nname = \"orders\"\n\
             [sinks.delta]\nuri = \"/tmp/bronze\"\n"
        )
    };
    let no_env = |_: &str| None;
    let err =
        tributary::config::Config::parse(&text(6000, "6000"), Path::new("."), no_env).unwrap_err();
    assert_eq!(err.key(), Some("sources.kafka.drain_timeout_ms"), "{err}");
    assert!(
        err.to_string().contains("session.timeout.ms (6000)"),
        "{err}"
    );
    tributary::config::Config::parse(&text(2000, "6000"), Path::new("."), no_env).unwrap();
    let err =
        tributary::config::Config::parse(&text(2000, "soon"), Path::new("."), no_env).unwrap_err();
    assert!(err.to_string().contains("not a number"), "{err}");
}

/// A tansu broker of this test's own, storing in a fresh S3 bucket (so it survives a restart).
struct DurableBroker {
    port: u16,
    child: std::process::Child,
}

impl DurableBroker {
    fn start(port: u16, bucket: &str) -> Self {
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(env("TRIBUTARY_TANSU"))
            .args(["broker", "--cluster-id", bucket, "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", &format!("s3://{bucket}/")])
            // Both names: tansu prefers AWS_ENDPOINT_URL, which the services' environment
            // points at SeaweedFS (where this bucket does not exist).
            .env("AWS_ENDPOINT", env("TRIBUTARY_MOTO_ENDPOINT"))
            .env("AWS_ENDPOINT_URL", env("TRIBUTARY_MOTO_ENDPOINT"))
            .env("AWS_ALLOW_HTTP", "true")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cannot start tansu");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        DurableBroker { port, child }
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for DurableBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An unsigned `PUT /bucket` against moto (kept for tansu's own S3 storage here: it accepts
/// unsigned requests, so the broker needs no credentials).
fn create_bucket(bucket: &str) {
    use std::io::{Read, Write};
    let endpoint = url::Url::parse(&env("TRIBUTARY_MOTO_ENDPOINT")).unwrap();
    let addr = (
        endpoint.host_str().unwrap().to_owned(),
        endpoint.port_or_known_default().unwrap(),
    );
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "PUT /{bucket} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        endpoint.host_str().unwrap()
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

/// The broker is down when the source starts, comes up, is killed mid-run and restarted (its log
/// and group offsets live in S3): the source never stops, delivers every message once, and its
/// commits survive the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survives_broker_outages_at_start_and_mid_run() {
    let bucket = unique("tansu").replace('_', "-");
    create_bucket(&bucket);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut broker = DurableBroker::start(port, &bucket);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .create()
        .unwrap();
    let topic = unique("orders");
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    drop(admin);
    let address = broker.brokers();
    let produce_to = |from: usize, to: usize| {
        let brokers = address.clone();
        let topic = topic.clone();
        async move {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("message.timeout.ms", "30000")
                .set("reconnect.backoff.max.ms", "500")
                .create()
                .unwrap();
            let mut offsets = Vec::new();
            for i in from..to {
                let value = order(i);
                let delivered = producer
                    .send(
                        FutureRecord::<(), [u8]>::to(&topic)
                            .partition(0)
                            .payload(&value),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .unwrap();
                offsets.push(delivered.offset);
            }
            offsets
        }
    };
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let mut config = source_config(&topic, &group, "", &dir.path().join("dlq.jsonl"));
    config.brokers = Some(broker.brokers());
    // Reconnect quickly (librdkafka's default backoff grows to 10 s) to keep the test short.
    config
        .properties
        .0
        .insert("reconnect.backoff.max.ms".into(), "500".into());
    config
        .properties
        .0
        .insert("topic.metadata.refresh.interval.ms".into(), "1000".into());
    // Broker down at start: the source starts anyway and waits.
    broker.kill();
    let (mut rx, handle) = start(&config).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!handle.is_finished(), "the source must wait for the broker");
    let mut broker = DurableBroker::start(port, &bucket);
    assert_eq!(produce_to(0, 20).await, (0..20).collect::<Vec<i64>>());
    for expected in 0..20 {
        let e = next(&mut rx).await;
        assert_eq!(offset_of(&e), (0, expected));
        handle.acker().ack(&e.event.position);
    }
    // Wait for the periodic commit to reach the broker, then take the broker away mid-run.
    let check = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", &group)
        .create::<BaseConsumer>()
        .unwrap();
    wait_until("offset 20 to be committed", || {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        check
            .committed_offsets(tpl, Duration::from_secs(5))
            .ok()
            .and_then(|t| t.find_partition(&topic, 0).map(|p| p.offset()))
            == Some(Offset::Offset(20))
    })
    .await;
    drop(check);
    broker.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !handle.is_finished(),
        "the source must not stop while the broker is down"
    );

    let mut broker = DurableBroker::start(port, &bucket);
    assert_eq!(
        produce_to(20, 30).await,
        (20..30).collect::<Vec<i64>>(),
        "the restarted broker kept the log"
    );
    // The source reconnects by itself and continues exactly where it was.
    for expected in 20..30 {
        let e = next(&mut rx).await;
        assert_eq!(offset_of(&e), (0, expected));
        handle.acker().ack(&e.event.position);
    }
    handle.shutdown().await.unwrap();
    // A new instance resumes from the offsets committed across the restart.
    produce_to(30, 32).await;
    let (mut rx, handle) = start(&config).await;
    assert_eq!(offset_of(&next(&mut rx).await), (0, 30));
    handle.shutdown().await.unwrap();
    broker.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_can_go_to_a_kafka_topic() {
    let topic = create_topic(1).await;
    let dlq_topic = create_topic(1).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let mut config = source_config(&topic, &group, "", &dir.path().join("unused.jsonl"));
    config.dead_letter = Some(tributary::config::DeadLetterConfig {
        topic: Some(dlq_topic.clone()),
        path: None,
    });
    let good = order(1);
    let batch = vec![
        (0, Some(b"k1".as_slice()), Some(b"not json".as_slice())),
        (0, None, Some(good.as_slice())),
    ];
    produce(&topic, &batch).await;
    let (mut rx, handle) = start(&config).await;
    let e = next(&mut rx).await;
    assert_eq!(offset_of(&e), (0, 1));
    handle.acker().ack(&e.event.position);
    handle.shutdown().await.unwrap();
    assert_eq!(committed(&topic, &group, 1), vec![Some(2)]);

    let reader: rdkafka::consumer::StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", env("TRIBUTARY_KAFKA_BROKERS"))
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    reader.subscribe(&[&dlq_topic]).unwrap();
    let m = tokio::time::timeout(WAIT, reader.recv())
        .await
        .expect("no dead letter within 60 s")
        .unwrap();
    use rdkafka::message::Message as _;
    assert_eq!(m.key(), Some(b"k1".as_slice()));
    let letter: Letter = serde_json::from_slice(m.payload().unwrap()).unwrap();
    assert_eq!(
        letter.position,
        tributary::source::kafka::position(&topic, 0, 0)
    );
    assert!(letter.error.contains("not valid JSON"), "{}", letter.error);
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&letter.raw_base64)
        .unwrap();
    assert_eq!(raw, b"not json");
}
