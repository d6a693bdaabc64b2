//! Kafka source throughput against a bare rdkafka consume loop over the same messages.
//!
//! Run: `scripts/services up && eval "$(scripts/services env)" &&
//!       cargo bench --profile dev --bench kafka_source [-- MESSAGES]`
//! Produces MESSAGES (default 1,000,000) `orders` JSON messages of ~300 bytes to a fresh
//! 3-partition topic, then, alternating, RUNS times each: (a) a bare `StreamConsumer::recv` loop
//! that only touches the payload, (b) the Tributary source (decode into `ChangeEvent`, hand over a
//! bounded channel, acknowledge every event). Each run uses a fresh consumer group. Also measures
//! the decoder alone on in-memory messages. Medians are reported; the topic is deleted afterwards.

use std::time::Instant;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tributary::config::{KafkaSource, TopicConfig};
use tributary::event::Position;
use tributary::source::kafka::KafkaEvent;
use tributary::source::kafka::decode::{Decoder, RawMessage};

const RUNS: usize = 3;
const PARTITIONS: i32 = 3;

fn order(i: usize) -> String {
    let statuses = ["pending", "paid", "shipped", "delivered", "cancelled"];
    format!(
        r#"{{"order_id":"ord-{i:08}","customer_id":"cust-{:05}","status":"{}","currency":"EUR","total":{}.{:02},"items":[{{"sku":"SKU-{:04}","qty":{},"price":{}.99}}],"created_at":"2026-11-23T10:{:02}:{:02}Z","note":"Please leave the parcel with the neighbour at number {} if nobody answers."}}"#,
        i % 50_000,
        statuses[i % 5],
        10 + i % 990,
        i % 100,
        i % 5000,
        1 + i % 4,
        5 + i % 200,
        i % 60,
        (i / 60) % 60,
        i % 97
    )
}

fn brokers() -> String {
    std::env::var("TRIBUTARY_KAFKA_BROKERS")
        .expect("TRIBUTARY_KAFKA_BROKERS is not set: eval \"$(scripts/services env)\"")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn produce(topic: &str, n: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "none")
        .create()
        .expect("producer");
    let mut pending = futures::stream::FuturesUnordered::new();
    use futures::StreamExt as _;
    for i in 0..n {
        let payload = order(i);
        let key = format!("ord-{i:08}");
        let delivery = producer
            .send_result(
                FutureRecord::to(topic)
                    .partition((i % PARTITIONS as usize) as i32)
                    .key(&key)
                    .payload(&payload),
            )
            .map_err(|(e, _)| e)
            .expect("enqueue");
        pending.push(delivery);
        if pending.len() >= 50_000 {
            while let Some(r) = pending.next().await {
                r.expect("delivery").map_err(|(e, _)| e).expect("produce");
                if pending.len() < 10_000 {
                    break;
                }
            }
        }
    }
    while let Some(r) = pending.next().await {
        r.expect("delivery").map_err(|(e, _)| e).expect("produce");
    }
}

async fn bare(topic: &str, n: usize) -> f64 {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set(
            "group.id",
            format!("bench-bare-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut bytes = 0usize;
    let first = consumer.recv().await.expect("recv");
    bytes += first.payload().map_or(0, <[u8]>::len);
    drop(first);
    let start = Instant::now();
    for _ in 1..n {
        let m = consumer.recv().await.expect("recv");
        bytes += m.payload().map_or(0, <[u8]>::len);
    }
    std::hint::black_box(bytes);
    (n - 1) as f64 / start.elapsed().as_secs_f64()
}

fn source_config(topic: &str) -> KafkaSource {
    let dlq =
        std::env::temp_dir().join(format!("bench-dlq-{}.jsonl", uuid::Uuid::new_v4().simple()));
    toml::from_str(&format!(
        r#"
brokers = "{}"
group_id = "bench-src-{}"
dead_letter = {{ path = "{}" }}
properties = {{ "session.timeout.ms" = "6000" }}
[[topics]]
name = "{topic}"
key_columns = ["order_id"]
columns = {{ total = "float64", created_at = "timestamptz" }}
"#,
        brokers(),
        uuid::Uuid::new_v4().simple(),
        dlq.display()
    ))
    .expect("config")
}

async fn source(topic: &str, n: usize) -> f64 {
    let (mut rx, handle) = tributary::source::kafka::start(&source_config(topic), 8)
        .await
        .expect("source");
    let acker = handle.acker();
    // Like the pipeline: acknowledge a batch's last position per partition once it is durable.
    let ack_batch = |batch: &[KafkaEvent]| {
        let mut last: [Option<&Position>; PARTITIONS as usize] = [None; PARTITIONS as usize];
        for e in batch {
            if let Position::Kafka { partition, .. } = &e.event.position {
                last[*partition as usize] = Some(&e.event.position);
            }
        }
        for p in last.into_iter().flatten() {
            acker.ack(p);
        }
    };
    let first = rx.recv().await.expect("event");
    ack_batch(&first);
    let mut got = first.len();
    drop(first);
    let start = Instant::now();
    let timed_from = got;
    while got < n {
        let batch = rx.recv().await.expect("batch");
        got += batch.len();
        ack_batch(&batch);
    }
    let rate = (got - timed_from) as f64 / start.elapsed().as_secs_f64();
    handle.shutdown().await.expect("shutdown");
    rate
}

fn decode_only(n: usize) -> f64 {
    let config = source_config("orders");
    let topic: &TopicConfig = &config.topics[0];
    let decoder = Decoder::new(topic, config.max_message_bytes);
    let payloads: Vec<String> = (0..n.min(100_000)).map(order).collect();
    let start = Instant::now();
    for i in 0..n {
        let p = &payloads[i % payloads.len()];
        let msg = RawMessage {
            topic: "orders",
            partition: 0,
            offset: i as i64,
            key: None,
            payload: Some(p.as_bytes()),
            timestamp_ms: Some(1_732_356_000_000),
            headers: Vec::new(),
        };
        std::hint::black_box(decoder.decode(&msg).expect("decode"));
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let topic = format!("bench_orders_{}", uuid::Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin");
    admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    let avg = (0..1000).map(|i| order(i).len()).sum::<usize>() / 1000;
    eprintln!("producing {n} messages (~{avg} bytes) to {topic}");
    let t = Instant::now();
    produce(&topic, n).await;
    eprintln!("produced in {:.1} s", t.elapsed().as_secs_f64());

    let (mut bares, mut ours) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let b = bare(&topic, n).await;
        let s = source(&topic, n).await;
        eprintln!("run {run}: bare {b:.0} msg/s, source {s:.0} msg/s");
        bares.push(b);
        ours.push(s);
    }
    let decode = median((0..RUNS).map(|_| decode_only(n)).collect());
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;

    let (b, s) = (median(bares), median(ours));
    println!(
        "| measure ({n} msgs, ~{avg} B, {PARTITIONS} partitions) | msg/s (median of {RUNS}) |"
    );
    println!("|---|---|");
    println!("| bare rdkafka StreamConsumer::recv loop | {b:.0} |");
    println!(
        "| Tributary Kafka source → ChangeEvent (decode + batches over a channel + ack per batch) | {s:.0} |"
    );
    println!("| decoder alone (in memory, no Kafka) | {decode:.0} |");
    println!("| ratio source / bare | {:.2} |", s / b);
}
