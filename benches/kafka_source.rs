//! Kafka source throughput against a bare rdkafka consume loop over the same messages.
//!
//! Run: `scripts/services up && eval "$(scripts/services env)" &&
//!       cargo bench --profile dev --bench kafka_source [-- MESSAGES]`
//! Produces MESSAGES (default 1,000,000) `orders` JSON messages of ~300 bytes to a fresh
//! 3-partition topic, then, alternating, RUNS times each: (a) a bare `StreamConsumer::recv` loop
//! that only touches the payload, (b) the Tributary source (decode into `ChangeEvent`, hand over a
//! bounded channel, acknowledge every event). Each run uses a fresh consumer group. Also measures
//! the decoder alone on in-memory messages, and serde_json's bare parse of them. Also reports the
//! CPU time per message of this process and of the local broker (its pid file from
//! `scripts/services`) for both loops. Medians are reported; the topic is deleted afterwards.
//! The decoder alone also runs on the same orders as Schema Registry framed Avro (the schema
//! registered in the services' registry, `TRIBUTARY_SCHEMA_REGISTRY_URL`), beside JSON.

use std::time::Instant;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;

use tributary::config::TopicConfig;
use tributary::event::Position;
use tributary::source::kafka::KafkaEvent;
use tributary::source::kafka::decode::{Decoder, RawMessage};

const RUNS: usize = 3;

// As in the binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
use common::{CpuMeter, PARTITIONS, broker_pid, brokers, median, order, produce, source_config};

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

async fn source(topic: &str, n: usize) -> f64 {
    let (mut rx, handle) = tributary::source::kafka::start(&source_config(topic), 8)
        .await
        .expect("source");
    let acker = handle.acker();
    // Like the pipeline: acknowledge a batch's last position per partition once it is durable.
    let ack_batch = |batch: &[KafkaEvent]| {
        let mut last: [Option<&Position>; PARTITIONS as usize] = [None; PARTITIONS as usize];
        for e in batch {
            if let Some(partition) = e.event.position.stream.partition() {
                last[partition as usize] = Some(&e.event.position);
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
            timestamp_type: None,
            headers: Vec::new(),
        };
        std::hint::black_box(decoder.decode(&msg).expect("decode"));
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The same order as a Debezium envelope: schemaless, or with the Connect JSON converter's schema
/// (`schemas.enable=true`; `total` an `org.apache.kafka.connect.data.Decimal`, `created_at` an
/// `io.debezium.time.MicroTimestamp`).
fn debezium_order(i: usize, with_schema: bool) -> String {
    let mut after: serde_json::Value = serde_json::from_str(&order(i)).expect("order");
    if with_schema {
        // 12.34-style totals as base64 unscaled bytes (scale 2), the timestamp as µs.
        let cents = (after["total"].as_f64().unwrap_or(0.0) * 100.0).round() as i64;
        let bytes = cents.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count().min(6);
        use base64::Engine as _;
        after["total"] = base64::engine::general_purpose::STANDARD
            .encode(&bytes[skip..])
            .into();
        let at = chrono::DateTime::parse_from_rfc3339(after["created_at"].as_str().unwrap_or(""))
            .map_or(0, |t| t.timestamp_micros());
        after["created_at"] = at.into();
        after["items"] = after["items"].to_string().into();
    }
    let payload = serde_json::json!({"before": null, "after": after, "op": "c",
        "ts_ms": 1_732_356_000_000_i64,
        "source": {"connector": "postgresql", "ts_ms": 1_732_356_000_000_i64, "lsn": i}});
    if !with_schema {
        return payload.to_string();
    }
    let s = |f: &str| serde_json::json!({"type": "string", "optional": true, "field": f});
    let fields = serde_json::json!([
        s("order_id"), s("customer_id"), s("status"), s("currency"),
        {"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal",
         "version": 1, "parameters": {"scale": "2", "connect.decimal.precision": "10"},
         "field": "total"},
        {"type": "string", "optional": true, "name": "io.debezium.data.Json", "version": 1,
         "field": "items"},
        {"type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp",
         "version": 1, "field": "created_at"},
        s("note")]);
    let value = |f: &str| {
        serde_json::json!({"type": "struct", "fields": fields, "optional": true,
                           "name": "shop.public.orders.Value", "field": f})
    };
    serde_json::json!({"schema": {"type": "struct", "optional": false,
        "name": "shop.public.orders.Envelope", "version": 2, "fields": [
            value("before"), value("after"),
            {"type": "struct", "optional": false, "field": "source",
             "name": "io.debezium.connector.postgresql.Source", "fields": [
                {"type": "string", "optional": false, "field": "connector"},
                {"type": "int64", "optional": false, "field": "ts_ms"},
                {"type": "int64", "optional": true, "field": "lsn"}]},
            {"type": "string", "optional": false, "field": "op"},
            {"type": "int64", "optional": true, "field": "ts_ms"}]},
        "payload": payload})
    .to_string()
}

/// The decoder alone on Debezium envelopes (no declared columns): (msg/s, average bytes).
fn decode_debezium(n: usize, with_schema: bool) -> (f64, usize) {
    let config: tributary::config::KafkaSourceConfig = toml::from_str(
        "brokers = \"127.0.0.1:9\"\ngroup_id = \"g\"\n[[topics]]\nname = \"orders\"\n\
         format = \"debezium\"\nkey_columns = [\"order_id\"]\n",
    )
    .expect("config");
    let decoder = Decoder::new(&config.topics[0], config.max_message_bytes);
    let payloads: Vec<String> = (0..n.min(20_000))
        .map(|i| debezium_order(i, with_schema))
        .collect();
    let avg = payloads.iter().map(String::len).sum::<usize>() / payloads.len();
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
            timestamp_type: None,
            headers: Vec::new(),
        };
        std::hint::black_box(decoder.decode(&msg).expect("decode"));
    }
    (n as f64 / start.elapsed().as_secs_f64(), avg)
}

/// The order of [`order`] as an Avro schema: decimals for money, timestamp-micros, an array of
/// item records.
const ORDER_AVRO: &str = r#"{"type":"record","name":"Order","namespace":"bench","fields":[
    {"name":"order_id","type":"string"},{"name":"customer_id","type":"string"},
    {"name":"status","type":"string"},{"name":"currency","type":"string"},
    {"name":"total","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}},
    {"name":"items","type":{"type":"array","items":{"type":"record","name":"Item","fields":[
        {"name":"sku","type":"string"},{"name":"qty","type":"int"},
        {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}}]}}},
    {"name":"created_at","type":{"type":"long","logicalType":"timestamp-micros"}},
    {"name":"note","type":["null","string"]}]}"#;

/// A JSON order as the Avro datum of [`ORDER_AVRO`].
fn avro_order(i: usize, schema: &apache_avro::Schema) -> Vec<u8> {
    use apache_avro::types::Value as A;
    let j: serde_json::Value = serde_json::from_str(&order(i)).expect("order");
    let text = |k: &str| A::String(j[k].as_str().unwrap_or_default().to_owned());
    let cents = |v: &serde_json::Value| {
        let c = (v.as_f64().unwrap_or(0.0) * 100.0).round() as i64;
        A::Decimal(apache_avro::Decimal::from(c.to_be_bytes().to_vec()))
    };
    let items = j["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|it| {
                    A::Record(vec![
                        (
                            "sku".into(),
                            A::String(it["sku"].as_str().unwrap_or_default().into()),
                        ),
                        ("qty".into(), A::Int(it["qty"].as_i64().unwrap_or(0) as i32)),
                        ("price".into(), cents(&it["price"])),
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    let at = chrono::DateTime::parse_from_rfc3339(j["created_at"].as_str().unwrap_or_default())
        .expect("created_at")
        .timestamp_micros();
    let value = A::Record(vec![
        ("order_id".into(), text("order_id")),
        ("customer_id".into(), text("customer_id")),
        ("status".into(), text("status")),
        ("currency".into(), text("currency")),
        ("total".into(), cents(&j["total"])),
        ("items".into(), A::Array(items)),
        ("created_at".into(), A::TimestampMicros(at)),
        ("note".into(), A::Union(1, Box::new(text("note")))),
    ]);
    apache_avro::to_avro_datum(schema, value).expect("avro datum")
}

/// The decoder alone on the orders as Confluent-framed Avro, the schema fetched from the
/// services' registry: (msg/s, average bytes); `None` without a registry.
async fn decode_avro(n: usize) -> Option<(f64, usize)> {
    let url = std::env::var("TRIBUTARY_SCHEMA_REGISTRY_URL").ok()?;
    let answer = reqwest::Client::new()
        .post(format!("{url}/subjects/bench-orders-value/versions"))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .body(serde_json::json!({ "schema": ORDER_AVRO }).to_string())
        .send()
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    let id = serde_json::from_slice::<serde_json::Value>(&answer).ok()?["id"].as_u64()? as u32;
    let config: tributary::config::KafkaSourceConfig = toml::from_str(&format!(
        "brokers = \"127.0.0.1:9\"\ngroup_id = \"g\"\n[schema_registry]\nurl = \"{url}\"\n\
         [[topics]]\nname = \"orders\"\nformat = \"avro\"\nkey_columns = [\"order_id\"]\n"
    ))
    .expect("config");
    let settings = config.registry().expect("registry settings")?;
    let registry = tributary::source::kafka::registry::Registry::new(&settings, None).ok()?;
    let decoder = Decoder::new(&config.topics[0], config.max_message_bytes)
        .with_registry(Some(std::sync::Arc::new(registry)));
    let schema = apache_avro::Schema::parse_str(ORDER_AVRO).expect("schema");
    let payloads: Vec<Vec<u8>> = (0..n.min(20_000))
        .map(|i| {
            let mut framed = vec![0];
            framed.extend_from_slice(&id.to_be_bytes());
            framed.extend_from_slice(&avro_order(i, &schema));
            framed
        })
        .collect();
    decoder.fetch_schema(Some(&payloads[0])).await.ok()?;
    let avg = payloads.iter().map(Vec::len).sum::<usize>() / payloads.len();
    let start = Instant::now();
    for i in 0..n {
        let p = &payloads[i % payloads.len()];
        let msg = RawMessage {
            topic: "orders",
            partition: 0,
            offset: i as i64,
            key: None,
            payload: Some(p),
            timestamp_ms: Some(1_732_356_000_000),
            headers: Vec::new(),
            timestamp_type: None,
        };
        std::hint::black_box(decoder.decode(&msg).expect("decode"));
    }
    Some((n as f64 / start.elapsed().as_secs_f64(), avg))
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

    // `KAFKA_BENCH_ONLY=bare|source|decode` runs one measure only (for profiling it apart).
    let only = std::env::var("KAFKA_BENCH_ONLY").unwrap_or_default();
    let broker = broker_pid();
    let (mut bares, mut ours) = (Vec::new(), Vec::new());
    let (mut bare_cpu, mut our_cpu) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let cpu = CpuMeter::start(broker.as_deref());
        let b = if only.is_empty() || only == "bare" {
            bare(&topic, n).await
        } else {
            f64::NAN
        };
        bare_cpu.push(cpu.per_message(n));
        let cpu = CpuMeter::start(broker.as_deref());
        let s = if only.is_empty() || only == "source" {
            source(&topic, n).await
        } else {
            f64::NAN
        };
        our_cpu.push(cpu.per_message(n));
        eprintln!("run {run}: bare {b:.0} msg/s, source {s:.0} msg/s");
        bares.push(b);
        ours.push(s);
    }
    let decode = if only.is_empty() || only == "decode" {
        median((0..RUNS).map(|_| decode_only(n)).collect())
    } else {
        f64::NAN
    };
    let parse = if only.is_empty() || only == "decode" {
        median((0..RUNS).map(|_| parse_only(n)).collect())
    } else {
        f64::NAN
    };
    let debezium = |with_schema: bool| {
        let runs: Vec<(f64, usize)> = (0..RUNS)
            .map(|_| decode_debezium(n.min(300_000), with_schema))
            .collect();
        let avg = runs[0].1;
        (median(runs.into_iter().map(|r| r.0).collect()), avg)
    };
    let (dbz_plain, dbz_schema) = if only.is_empty() || only == "decode" {
        (debezium(false), debezium(true))
    } else {
        ((f64::NAN, 0), (f64::NAN, 0))
    };
    let mut avro_runs = Vec::new();
    if only.is_empty() || only == "decode" {
        for _ in 0..RUNS {
            match decode_avro(n.min(300_000)).await {
                Some(r) => avro_runs.push(r),
                None => {
                    eprintln!("no Schema Registry at TRIBUTARY_SCHEMA_REGISTRY_URL: Avro skipped")
                }
            }
        }
    }
    let avro_avg = avro_runs.first().map_or(0, |r| r.1);
    let avro = if avro_runs.is_empty() {
        f64::NAN
    } else {
        median(avro_runs.into_iter().map(|r| r.0).collect())
    };
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
    println!(
        "| decoder alone, the same orders as Schema Registry Avro (~{avro_avg} B) | {avro:.0} |"
    );
    println!("| serde_json parse alone (`IgnoredAny`, no values kept) | {parse:.0} |");
    println!(
        "| decoder alone, Debezium envelope without schema (~{} B) | {:.0} |",
        dbz_plain.1, dbz_plain.0
    );
    println!(
        "| decoder alone, Debezium envelope with Connect schema (~{} B) | {:.0} |",
        dbz_schema.1, dbz_schema.0
    );
    println!("| ratio source / bare | {:.2} |", s / b);
    let cpu =
        |v: &[(f64, f64)], side: fn(&(f64, f64)) -> f64| median(v.iter().map(side).collect()) * 1e6;
    println!();
    println!("| CPU per message (µs, median) | this process | broker |");
    println!("|---|---|---|");
    for (name, v) in [("bare loop", &bare_cpu), ("Tributary source", &our_cpu)] {
        println!(
            "| {name} | {:.2} | {:.2} |",
            cpu(v, |c| c.0),
            cpu(v, |c| c.1)
        );
    }
}

/// Parses each payload with serde_json into nothing: the floor under any serde_json decoding.
fn parse_only(n: usize) -> f64 {
    let payloads: Vec<String> = (0..n.min(100_000)).map(order).collect();
    let start = Instant::now();
    for i in 0..n {
        let p = &payloads[i % payloads.len()];
        let v: serde::de::IgnoredAny = serde_json::from_str(p).expect("json");
        std::hint::black_box(v);
    }
    n as f64 / start.elapsed().as_secs_f64()
}
