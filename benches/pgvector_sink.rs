//! pgvector sink throughput against the physical limit, a plain binary COPY.
//!
//! Run: `scripts/services up && eval "$(scripts/services env)" &&
//!       cargo bench --profile dev --bench pgvector_sink [-- ROWS STREAM_ROWS]`
//! (a) initial load of ROWS `vector(384)` rows through the sink (no index), then the HNSW build;
//! (b) STREAM_ROWS upserts (updates of existing rows with new vectors) with the index present;
//! baseline: the same rows by binary COPY into an unindexed table. Each phase runs 3 times on
//! fresh schemas; medians are reported.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use futures::pin_mut;
use tokio_postgres::NoTls;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tributary::config::Config;
use tributary::event::{ChangeEvent, Lsn, Op, Row, Value};
use tributary::sink::pgvector::PgvectorSink;

const DIM: usize = 384;
const BATCH: usize = 10_000;
const RUNS: usize = 3;

fn vector(i: usize) -> Vec<f32> {
    // Deterministic, varied unit-ish vectors (an LCG); HNSW cost depends on the data's spread.
    let mut x = (i as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..DIM)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn event(i: usize, op: Op, lsn: u64, seed: usize) -> ChangeEvent {
    let note = format!("order {i}: two lamps and a rug, deliver after 5pm");
    ChangeEvent {
        source: "public.orders".into(),
        op,
        key: [("id", Value::Int64(i as i64))].into_iter().collect(),
        before: None,
        after: Some(Row::from_iter([
            ("id", Value::Int64(i as i64)),
            (
                "customer",
                Value::Text(format!("customer {}", i % 997).into()),
            ),
            ("note", Value::Text(note.into())),
        ])),
        schema_version: 1,
        position: tributary::source::postgres::position(Lsn(lsn), i as u64),
        source_ts: None,
        embedding: Some(vector(seed)),
        text_hash: Some(seed as u64),
        chunks: None,
        schema: None,
        origin: None,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = args.first().copied().unwrap_or(100_000);
    let stream_rows = args.get(1).copied().unwrap_or(2_000);
    let url = std::env::var("TRIBUTARY_PG_URL").expect("eval \"$(scripts/services env)\" first");
    let (admin, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);

    let (mut copy_rates, mut load_rates, mut build_secs, mut stream_rates, mut stream_noidx) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..RUNS {
        // Baseline: binary COPY of the same rows into an unindexed table.
        let schema = format!("bench_copy_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (id bigint PRIMARY KEY, payload jsonb, embedding vector({DIM}))"
            ))
            .await
            .unwrap();
        let types: Vec<_> = admin
            .prepare(&format!("SELECT * FROM {schema}.t"))
            .await
            .unwrap()
            .columns()
            .iter()
            .map(|c| c.type_().clone())
            .collect();
        let events: Vec<ChangeEvent> = (0..rows).map(|i| event(i, Op::Snapshot, 1, i)).collect();
        let t = Instant::now();
        let sink = admin
            .copy_in::<_, Bytes>(&format!("COPY {schema}.t FROM STDIN (FORMAT binary)"))
            .await
            .unwrap();
        let writer = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(writer);
        for e in &events {
            let id = match e.key.get("id") {
                Some(Value::Int64(i)) => *i,
                _ => unreachable!(),
            };
            let payload = e.after.as_ref().map(Row::to_json);
            let v = e.embedding.clone().map(pgvector::Vector::from);
            writer.as_mut().write(&[&id, &payload, &v]).await.unwrap();
        }
        writer.finish().await.unwrap();
        copy_rates.push(rows as f64 / t.elapsed().as_secs_f64());
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();

        // (a) the sink's initial load, then the index build.
        let schema = format!("bench_sink_{}", uuid::Uuid::new_v4().simple());
        let text = format!(
            "name = \"b\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\n[[sources.kafka.topics]]\nname = \"o\"\n[sinks.pgvector]\nurl = \"{url}\"\nschema = \"{schema}\"\n"
        );
        let cfg = Config::parse(&text, Path::new("."), |_| None)
            .unwrap()
            .sinks
            .pgvector
            .unwrap();
        let mut sink = PgvectorSink::connect(cfg).await.unwrap();
        let t = Instant::now();
        for chunk in events.chunks(BATCH) {
            sink.write(chunk).await.unwrap();
        }
        load_rates.push(rows as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        sink.finish_snapshot("public.orders").await.unwrap();
        build_secs.push(t.elapsed().as_secs_f64());

        // (b) streaming upserts with the index present: new vectors for existing keys.
        let updates: Vec<ChangeEvent> = (0..stream_rows)
            .map(|i| event((i * 7919) % rows, Op::Update, 2 + i as u64, rows + i))
            .collect();
        let t = Instant::now();
        for chunk in updates.chunks(500) {
            sink.write(chunk).await.unwrap();
        }
        stream_rates.push(stream_rows as f64 / t.elapsed().as_secs_f64());
        // The same upserts without the index: the difference is index maintenance.
        admin
            .batch_execute(&format!("DROP INDEX {schema}.orders_embedding_hnsw"))
            .await
            .unwrap();
        let updates: Vec<ChangeEvent> = (0..stream_rows)
            .map(|i| {
                event(
                    (i * 7919) % rows,
                    Op::Update,
                    1_000_000 + i as u64,
                    2 * rows + i,
                )
            })
            .collect();
        let t = Instant::now();
        for chunk in updates.chunks(500) {
            sink.write(chunk).await.unwrap();
        }
        stream_noidx.push(stream_rows as f64 / t.elapsed().as_secs_f64());
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
        eprintln!("run {} done", run + 1);
    }
    let (copy, load) = (median(copy_rates), median(load_rates));
    let (with_idx, without) = (median(stream_rates), median(stream_noidx));
    println!("pgvector sink, vector({DIM}), {rows} rows, medians of {RUNS} runs");
    println!("| phase | rows/s | vs COPY |");
    println!("|---|---|---|");
    println!("| plain binary COPY (baseline) | {copy:.0} | 1.00 |");
    println!(
        "| (a) sink initial load, no index | {load:.0} | {:.2} |",
        load / copy
    );
    println!(
        "| (a) HNSW build after load | {:.1} s | |",
        median(build_secs)
    );
    println!("| (b) streaming upserts, HNSW present ({stream_rows} rows) | {with_idx:.0} | |");
    println!("| (b) same upserts without index | {without:.0} | |");
    println!(
        "share of (b) time spent in index maintenance: {:.0}%",
        100.0 * (1.0 - with_idx / without)
    );
}
