//! Bronze Delta appends vs plain Parquet files (the physical limit), rows/s.
//!
//! `cargo bench --profile dev --bench delta_sink` with the services' environment. Rows per case:
//! `DELTA_BENCH_ROWS` (default 200,000), in batches of 10,000, orders-shaped (typed columns, as
//! from PostgreSQL), with and without a 384-d embedding. The sink buffers the batches and commits
//! by its default flush policy (rows/bytes/time: 1,000,000 rows or 64 MiB), plus a final flush;
//! the time covers Arrow conversion + Parquet + commits. The baseline converts the same events to
//! the same Arrow batches and writes one Parquet file per batch with the `parquet` crate to local
//! disk.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use tributary::config::Config;
use tributary::event::{ChangeEvent, Lsn, Op, Row, RowSchema, Value, ValueType};
use tributary::sink::delta::{DeltaSink, bronze};

const BATCH: usize = 10_000;
const DIM: usize = 384;

/// The orders table's columns as the PostgreSQL source announces them.
static SCHEMA: LazyLock<Arc<RowSchema>> = LazyLock::new(|| {
    Arc::new(RowSchema {
        columns: vec![
            ("id".into(), ValueType::Int64),
            ("customer_id".into(), ValueType::Int64),
            ("status".into(), ValueType::Text),
            ("amount".into(), ValueType::Numeric),
            ("note".into(), ValueType::Text),
            ("created_at".into(), ValueType::TimestampTz),
        ],
    })
});

fn events(start: usize, with_embedding: bool) -> Vec<ChangeEvent> {
    (start..start + BATCH)
        .map(|i| {
            let key: Row = [("id", Value::Int64(i as i64))].into_iter().collect();
            let after: Row = [
                ("id", Value::Int64(i as i64)),
                ("customer_id", Value::Int64((i % 9973) as i64)),
                ("status", Value::Text("shipped".into())),
                (
                    "amount",
                    Value::Numeric(format!("{}.{:02}", i % 1000, i % 100).into()),
                ),
                (
                    "note",
                    Value::Text(format!("order {i}: two blue widgets, gift wrapped").into()),
                ),
                ("created_at", Value::TimestampTz(Utc::now())),
            ]
            .into_iter()
            .collect();
            ChangeEvent {
                source: "public.orders".into(),
                op: Op::Insert,
                key,
                before: None,
                after: Some(after),
                schema_version: 1,
                position: tributary::source::postgres::position(Lsn(1_000 + i as u64), 0),
                source_ts: Some(Utc::now()),
                embedding: with_embedding
                    .then(|| (0..DIM).map(|d| ((i + d) % 97) as f32 / 97.0).collect()),
                text_hash: None,
                chunks: None,
                schema: Some(SCHEMA.clone()),
                origin: None,
            }
        })
        .collect()
}

fn delta_config(uri: &str, storage: &str) -> tributary::config::DeltaSinkConfig {
    let text = format!(
        "name = \"bench\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\n\
         [[sources.kafka.topics]]\nname = \"orders\"\n[sinks.delta]\nuri = \"{uri}\"\n\
         checkpoint_interval = 1000\n{storage}"
    );
    Config::parse(&text, std::path::Path::new("."), |_| None)
        .expect("bench config")
        .sinks
        .delta
        .expect("delta section")
}

async fn bench_delta(cfg: &tributary::config::DeltaSinkConfig, rows: usize, emb: bool) -> Duration {
    let mut sink = DeltaSink::new("bench", cfg).expect("sink");
    let mut total = Duration::ZERO;
    let mut written = 0;
    for start in (0..rows).step_by(BATCH) {
        let batch = events(start, emb);
        let t = Instant::now();
        let rejected = sink.append("public.orders", &batch).await.expect("append");
        assert!(rejected.is_empty());
        if sink.should_flush() {
            written += sink.flush().await.expect("flush").rows;
        }
        total += t.elapsed();
    }
    let t = Instant::now();
    written += sink.flush().await.expect("flush").rows;
    total += t.elapsed();
    assert_eq!(written, rows);
    total
}

fn bench_parquet(dir: &std::path::Path, rows: usize, emb: bool) -> Duration {
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    std::fs::create_dir_all(dir).expect("dir");
    let mut total = Duration::ZERO;
    for start in (0..rows).step_by(BATCH) {
        let batch = events(start, emb);
        let t = Instant::now();
        let refs: Vec<&ChangeEvent> = batch.iter().collect();
        let schema = bronze::bronze_schema_for(&SCHEMA);
        let rb = bronze::events_to_batch(&refs, &schema, Utc::now()).expect("batch");
        let file = std::fs::File::create(dir.join(format!("part-{start}.parquet"))).expect("file");
        let props = WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut w = ArrowWriter::try_new(file, rb.schema(), Some(props)).expect("writer");
        w.write(&rb).expect("write");
        w.close().expect("close");
        total += t.elapsed();
    }
    total
}

fn rate(rows: usize, d: Duration) -> f64 {
    rows as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("DELTA_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let s3 = std::env::var("TRIBUTARY_S3_ENDPOINT").ok().map(|endpoint| {
        let bucket = std::env::var("TRIBUTARY_S3_BUCKET").unwrap_or_else(|_| "tributary".into());
        (bucket, endpoint)
    });
    println!("rows per case: {rows}, batches of {BATCH}, commits by the default flush policy");
    println!(
        "| case | parquet local rows/s | delta local rows/s | ratio | delta S3 (moto) rows/s |"
    );
    println!("|---|---:|---:|---:|---:|");
    for emb in [false, true] {
        let label = if emb {
            "with 384-d embedding"
        } else {
            "no embedding"
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let pq = bench_parquet(&tmp.path().join(format!("pq-{id}")), rows, emb);
        let local_uri = format!(
            "file://{}",
            tmp.path().join(format!("delta-{id}")).display()
        );
        let local = bench_delta(&delta_config(&local_uri, ""), rows, emb).await;
        let s3_rate = match &s3 {
            Some((bucket, endpoint)) => {
                let storage = format!(
                    "[sinks.delta.storage]\naws_endpoint = \"{endpoint}\"\naws_allow_http = \"true\"\n"
                );
                let cfg = delta_config(&format!("s3://{bucket}/bench-{id}"), &storage);
                format!("{:.0}", rate(rows, bench_delta(&cfg, rows, emb).await))
            }
            None => "n/a (no TRIBUTARY_S3_ENDPOINT)".into(),
        };
        println!(
            "| {label} | {:.0} | {:.0} | {:.2} | {s3_rate} |",
            rate(rows, pq),
            rate(rows, local),
            pq.as_secs_f64() / local.as_secs_f64()
        );
    }
}
