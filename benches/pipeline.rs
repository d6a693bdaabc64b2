//! End-to-end `tributary run` (in-process `pipeline::run`) against its slowest stage alone,
//! measured in the same run.
//!
//! Run: `scripts/services up && eval "$(scripts/services env)" &&
//!       cargo bench --profile dev --bench pipeline [-- KAFKA_MESSAGES PG_ROWS]` (0 skips a part)
//! (a) Kafka → Bronze, no embeddings: KAFKA_MESSAGES (default 1,000,000) `orders` messages on a
//!     3-partition topic. Stages alone: the Kafka source (decode, batches, acks) and the Delta sink
//!     (the same events, pre-decoded, appended 5,000 at a time under the default flush policy).
//!     Pipeline rate = rows in Bronze / (commit time of the last commit − the earliest
//!     `_ingested_at`, i.e. when the first batch reached the sink): the consumer-group join is
//!     not counted.
//! (b) PostgreSQL → Bronze + pgvector with embeddings of short texts: PG_ROWS (default 6,000) rows
//!     snapshotted, then a steady insert load (10-row transactions) for 20 s at each rate in
//!     RATES (the load's session commits with `synchronous_commit = on`, PostgreSQL's default).
//!     Stage alone: the embedder on the same texts (batch 32). Latency per row = pgvector
//!     `_updated_at` (start of the applying transaction) − `_source_ts` (source commit time), both
//!     from the same server clock; p50/p99 over the steady phase.

mod common;

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tributary::config::Config;
use tributary::event::ChangeEvent;
use tributary::sink::delta::DeltaSink;
use tributary::source::kafka::decode::{Decoder, RawMessage};

use common::{PARTITIONS, brokers, order, produce, source_config};

const RATES: [u64; 2] = [250, 1000];

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: eval \"$(scripts/services env)\""))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A pipeline running in this process.
struct Running {
    stop: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<
        Result<tributary::pipeline::RunSummary, tributary::pipeline::PipelineError>,
    >,
}

fn spawn_run(config: Config) -> Running {
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let task = tokio::spawn(tributary::pipeline::run(config, async move {
        s.notified().await
    }));
    Running { stop, task }
}

impl Running {
    async fn finish(self) {
        self.stop.notify_one();
        self.task.await.unwrap().unwrap();
    }
}

fn load(dir: &std::path::Path, toml: &str) -> Config {
    let path = dir.join("bench.toml");
    std::fs::write(&path, toml).unwrap();
    Config::load(&path).unwrap()
}

async fn kafka_to_bronze(n: usize) {
    let topic = format!("bench_pipe_{}", uuid::Uuid::new_v4().simple());
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                PARTITIONS,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    produce(&topic, n).await;

    // Stage alone: the Delta sink on the same events, decoded beforehand.
    let kcfg = source_config(&topic);
    let decoder = Decoder::new(&kcfg.topics[0], kcfg.max_message_bytes);
    let events: Vec<ChangeEvent> = (0..n)
        .map(|i| {
            let p = order(i);
            let msg = RawMessage {
                topic: &topic,
                partition: (i % PARTITIONS as usize) as i32,
                offset: (i / PARTITIONS as usize) as i64,
                key: None,
                payload: Some(p.as_bytes()),
                timestamp_ms: Some(1_732_356_000_000),
                timestamp_type: None,
                headers: Vec::new(),
            };
            match decoder.decode(&msg).unwrap() {
                tributary::source::kafka::Decoded::Event(e) => e.event,
                _ => panic!("not an event"),
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &format!(
            "name = \"b\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\ndead_letter = {{ path = \"d.jsonl\" }}\n[[sources.kafka.topics]]\nname = \"{topic}\"\n[sinks.delta]\nuri = \"{}\"\n",
            dir.path().join("alone").display()
        ),
    );
    let mut sink = DeltaSink::new("b", cfg.sinks.delta.as_ref().unwrap()).unwrap();
    let broker = common::broker_pid();
    let cpu = common::CpuMeter::start(broker.as_deref());
    let t = Instant::now();
    let mut written = 0;
    for chunk in events.chunks(5000) {
        sink.append(&topic, chunk).await.unwrap();
        if sink.should_flush() {
            written += sink.flush().await.unwrap().rows;
        }
    }
    written += sink.flush().await.unwrap().rows;
    assert_eq!(written, n);
    let delta_alone = n as f64 / t.elapsed().as_secs_f64();
    let delta_cpu = cpu.per_message(n);
    drop(events);

    // Stage alone: the Kafka source (decode, batches over a channel, acks).
    let cpu = common::CpuMeter::start(broker.as_deref());
    let (mut rx, handle) = tributary::source::kafka::start(&source_config(&topic), 64)
        .await
        .unwrap();
    let acker = handle.acker();
    let first = rx.recv().await.unwrap();
    let mut got = first.len();
    let t = Instant::now();
    let from = got;
    while got < n {
        let batch = rx.recv().await.unwrap();
        got += batch.len();
        if let Some(last) = batch.last() {
            acker.ack(&last.event.position);
        }
    }
    let source_alone = (got - from) as f64 / t.elapsed().as_secs_f64();
    drop(acker);
    let _ = handle.shutdown().await;
    let source_cpu = cpu.per_message(n);

    // The pipeline.
    let lake = dir.path().join("lake");
    let config = load(
        dir.path(),
        &format!(
            r#"
name = "bench-pipeline"
[sources.kafka]
brokers = "{}"
group_id = "bench-pipe-{}"
dead_letter = {{ path = "{}" }}
properties = {{ "session.timeout.ms" = "6000" }}
[[sources.kafka.topics]]
name = "{topic}"
key_columns = ["order_id"]
[sinks.delta]
uri = "{}"
flush_interval_ms = 200
[pipeline]
batch_max_events = 5000
batch_max_wait_ms = 200
channel_capacity = 20000
[telemetry]
listen = ""
"#,
            brokers(),
            uuid::Uuid::new_v4().simple(),
            dir.path().join("dlq.jsonl").display(),
            lake.display()
        ),
    );
    let reader = DeltaSink::new("bench-pipeline", config.sinks.delta.as_ref().unwrap()).unwrap();
    let table = topic.clone();
    // A marker for profiling this phase alone (`perf record -p` once it is printed).
    eprintln!("(a) pipeline run starts");
    let cpu = common::CpuMeter::start(broker.as_deref());
    let run = spawn_run(config);
    let summary = loop {
        if let Ok(s) = reader.summary(&table).await
            && (s.rows >= n as u64 || run.task.is_finished())
        {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    run.finish().await;
    let pipeline_cpu = cpu.per_message(n);
    // From the first batch taken into the sink (its `_ingested_at`) to the commit that made the
    // last row durable (the log's commit time): the group join before it is not counted.
    let first = min_ingested_at(&reader.table_uri(&table)).await;
    let last = chrono::DateTime::parse_from_rfc3339(summary.last_commit.as_deref().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let pipeline = summary.rows as f64 / (last - first).as_seconds_f64();
    let slowest = delta_alone.min(source_alone);
    println!("(a) Kafka → Bronze, {n} messages, no embeddings");
    println!("| measure | events/s |\n|---|---|");
    println!("| Kafka source alone | {source_alone:.0} |");
    println!("| Delta sink alone (5,000-event appends, default flush policy) | {delta_alone:.0} |");
    println!("| pipeline `run` | {pipeline:.0} |");
    println!(
        "| ratio pipeline / slowest stage | {:.2} |",
        pipeline / slowest
    );
    // What the cores allow when the stages' work (and the broker's) must share them.
    let per_event = |c: (f64, f64)| (c.0 + if c.1.is_nan() { 0.0 } else { c.1 }) * 1e6;
    println!("\n| CPU per event (µs; process + broker) | µs |\n|---|---|");
    println!("| Kafka source alone | {:.2} |", per_event(source_cpu));
    println!("| Delta sink alone | {:.2} |", per_event(delta_cpu));
    println!("| pipeline `run` | {:.2} |", per_event(pipeline_cpu));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "| CPU-bound ceiling: {cores} cores ÷ (source + sink) | {:.0} events/s |",
        cores / ((per_event(source_cpu) + per_event(delta_cpu)) / 1e6)
    );
    let _ = admin
        .delete_topics(&[&topic], &rdkafka::admin::AdminOptions::new())
        .await;
}

/// The earliest `_ingested_at` in a Bronze table.
async fn min_ingested_at(uri: &str) -> chrono::DateTime<chrono::Utc> {
    use arrow::array::AsArray as _;
    use arrow::datatypes::TimestampMicrosecondType;
    use object_store::ObjectStoreExt as _;
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let url = url::Url::parse(uri)
        .or_else(|_| url::Url::from_directory_path(uri).map_err(|()| "not a path"))
        .unwrap();
    let table = deltalake::open_table(url).await.unwrap();
    let store = table.object_store();
    let paths: Vec<_> = table
        .snapshot()
        .unwrap()
        .log_data()
        .into_iter()
        .map(|f| f.object_store_path())
        .collect();
    let mut min = i64::MAX;
    for path in paths {
        let bytes = store.get(&path).await.unwrap().bytes().await.unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        let mask = ProjectionMask::columns(builder.parquet_schema(), ["_ingested_at"]);
        for batch in builder.with_projection(mask).build().unwrap() {
            let col = batch.unwrap();
            let ts = col.column(0).as_primitive::<TimestampMicrosecondType>();
            for i in 0..ts.len() {
                min = min.min(ts.value(i));
            }
        }
    }
    chrono::DateTime::from_timestamp_micros(min).unwrap()
}

async fn postgres_to_bronze_and_pgvector(rows: usize) {
    let base = env("TRIBUTARY_PG_URL");
    let (admin, conn) = tokio_postgres::connect(&base, NoTls).await.unwrap();
    tokio::spawn(conn);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db = format!("bench_pipe_{id}");
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&db);
    let src_url = url.to_string();
    let (src, conn) = tokio_postgres::connect(&src_url, NoTls).await.unwrap();
    tokio::spawn(conn);
    src.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, customer text NOT NULL, note text NOT NULL);
         INSERT INTO items SELECT g, 'Customer ' || (g % 50),
           (ARRAY['two lamps and a rug','a broken mug, refund please','deliver after 5pm',
                  'gift wrap the walnut shelf','wrong size, exchange it'])[1 + g % 5] || ' #' || g
         FROM generate_series(1, {rows}) g;"
    ))
    .await
    .unwrap();
    let texts: Vec<String> = src
        .query(
            "SELECT customer || ' wrote: ' || note FROM items ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    // Stage alone: the embedder on the same texts.
    // PIPELINE_BENCH_MODEL_DIR / PIPELINE_BENCH_THREADS select another model (e.g. the int8
    // copy, $TRIBUTARY_MODEL_INT8_DIR) and intra-op threads, for both measures.
    let model =
        std::env::var("PIPELINE_BENCH_MODEL_DIR").unwrap_or_else(|_| env("TRIBUTARY_MODEL_DIR"));
    let threads: Option<usize> = std::env::var("PIPELINE_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok());
    let mut embedding = tributary::config::EmbeddingConfig::for_model(model.clone().into());
    embedding.intra_threads = threads;
    let mut embedder = tributary::enrich::Embedder::load(&embedding).unwrap();
    let t = Instant::now();
    for chunk in texts.chunks(32) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        std::hint::black_box(embedder.embed(&refs).unwrap());
    }
    let embed_alone = rows as f64 / t.elapsed().as_secs_f64();
    drop(embedder);

    let dir = tempfile::tempdir().unwrap();
    let schema = format!("bench_{id}");
    let slot = format!("bench_{id}");
    let config = load(
        dir.path(),
        &format!(
            r#"
name = "bench-pg"
[sources.postgres]
url = "{src_url}"
publication = "bench"
slot = "{slot}"
tables = ["items"]
[embedding]
model_dir = "{model}"
{threads}
[embedding.templates]
"public.items" = "{{customer}} wrote: {{note}}"
[sinks.delta]
uri = "{}"
flush_interval_ms = 1000
[sinks.pgvector]
url = "{base}"
schema = "{schema}"
[pipeline]
batch_max_wait_ms = 50
[telemetry]
listen = ""
"#,
            dir.path().join("lake").display(),
            threads = threads.map_or(String::new(), |t| format!("intra_threads = {t}")),
        ),
    );
    let pg = admin;
    let table = format!("\"{schema}\".\"items\"");
    let count = |sql: String| {
        let pg = &pg;
        async move {
            pg.query_one(&sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0)
        }
    };
    // Snapshot: from start (connections, model load: ≈ 1 s) until every row is in pgvector.
    let t0 = Instant::now();
    let run = spawn_run(config);
    loop {
        let have = count(format!("SELECT count(*) FROM {table}")).await;
        if have >= rows as i64 || run.task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t1 = Instant::now();
    let mut steady = Vec::new();
    let mut next_id = rows as i32 + 1;
    // The local test server runs `synchronous_commit = off` (scripts/services, for test speed):
    // its WAL then reaches the walsender only at the WAL writer's next round (up to
    // `wal_writer_delay`, 200 ms). The application writing the steady load commits the way a
    // production database does by default.
    src.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    for rate in RATES {
        // Steady load at `rate` events/s for 20 s, in 10-row transactions.
        let from = next_id;
        let t = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(10.0 / rate as f64));
        while t.elapsed() < Duration::from_secs(20) {
            tick.tick().await;
            src.execute(
                "INSERT INTO items SELECT g, 'Customer ' || (g % 50), 'steady order #' || g
                 FROM generate_series($1::int, $1::int + 9) g",
                &[&next_id],
            )
            .await
            .unwrap();
            next_id += 10;
        }
        let to = next_id - 1;
        let deadline = Instant::now() + Duration::from_secs(300);
        while count(format!(
            "SELECT count(*) FROM {table} WHERE id BETWEEN {from} AND {to}"
        ))
        .await
            < (to - from + 1) as i64
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut lat = pg_latencies(&pg, &table, from, to).await;
        lat.sort_by(f64::total_cmp);
        steady.push((
            rate,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.len(),
        ));
    }
    run.finish().await;
    let pipeline = rows as f64 / t1.duration_since(t0).as_secs_f64();
    println!(
        "\n(b) PostgreSQL → Bronze + pgvector with embeddings ({model}, intra-op threads: {})",
        threads.map_or("default".to_string(), |t| t.to_string())
    );
    println!("| measure | events/s |\n|---|---|");
    println!("| embedder alone (batch 32) | {embed_alone:.0} |");
    println!("| pipeline `run`, snapshot of {rows} rows (incl. start-up) | {pipeline:.0} |");
    println!(
        "| ratio pipeline / slowest stage | {:.2} |",
        pipeline / embed_alone
    );
    println!("| steady load | p50 latency | p99 latency | rows |\n|---|---|---|---|");
    for (rate, p50, p99, n) in steady {
        println!("| {rate} events/s | {p50:.3} s | {p99:.3} s | {n} |");
    }
    let _ = pg
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await;
    let _ = pg
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await;
    drop(src);
    let _ = pg
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await;
}

async fn pg_latencies(pg: &tokio_postgres::Client, table: &str, from: i32, to: i32) -> Vec<f64> {
    pg.query(
        &format!(
            "SELECT extract(epoch FROM _updated_at - _source_ts)::float8 FROM {table}
             WHERE id BETWEEN $1 AND $2"
        ),
        &[&from, &to],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    // KAFKA_MESSAGES = 0 skips (a), PG_ROWS = 0 skips (b).
    let kafka_n = args.first().copied().unwrap_or(1_000_000);
    let pg_rows = args.get(1).copied().unwrap_or(6_000);
    if kafka_n > 0 {
        kafka_to_bronze(kafka_n).await;
    }
    if pg_rows > 0 {
        postgres_to_bronze_and_pgvector(pg_rows).await;
    }
}
