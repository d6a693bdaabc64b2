//! Helpers shared by the Kafka benchmarks: the `orders` payloads, producing them, medians.

#![allow(dead_code)]

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tributary::config::KafkaSourceConfig;

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

pub fn source_config(topic: &str) -> KafkaSourceConfig {
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

/// The local broker's pid, from the pid file `scripts/services` keeps (its CPU counts too: on
/// one machine it competes with the consumer for the same cores).
pub fn broker_pid() -> Option<String> {
    let cache = std::env::var("TRIBUTARY_CACHE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/tributary",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let line = std::fs::read_to_string(format!("{cache}/run/kafka.pid")).ok()?;
    line.split_whitespace().next().map(str::to_owned)
}

/// CPU time (user + system) of this process and of the broker over a measure.
pub struct CpuMeter<'a> {
    broker: Option<&'a str>,
    at_start: (f64, f64),
}

impl<'a> CpuMeter<'a> {
    pub fn start(broker: Option<&'a str>) -> Self {
        CpuMeter {
            broker,
            at_start: (cpu_seconds("self"), broker.map_or(f64::NAN, cpu_seconds)),
        }
    }

    /// Seconds of CPU per message since `start`: (this process, broker).
    pub fn per_message(&self, n: usize) -> (f64, f64) {
        let now = (
            cpu_seconds("self"),
            self.broker.map_or(f64::NAN, cpu_seconds),
        );
        (
            (now.0 - self.at_start.0) / n as f64,
            (now.1 - self.at_start.1) / n as f64,
        )
    }
}

/// utime + stime of a process from /proc (Linux, USER_HZ = 100); NaN when unreadable.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name start at field 3 (state); utime and stime
    // are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}
