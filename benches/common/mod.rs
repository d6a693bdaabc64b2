//! Helpers shared by the Kafka benchmarks: the `orders` payloads, producing them, medians.

#![allow(dead_code)]

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tributary::config::KafkaSource;

pub const PARTITIONS: i32 = 3;

pub fn order(i: usize) -> String {
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

pub fn brokers() -> String {
    std::env::var("TRIBUTARY_KAFKA_BROKERS")
        .expect("TRIBUTARY_KAFKA_BROKERS is not set: eval \"$(scripts/services env)\"")
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub async fn produce(topic: &str, n: usize) {
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

pub fn source_config(topic: &str) -> KafkaSource {
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
