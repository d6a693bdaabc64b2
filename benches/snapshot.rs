//! The initial snapshot into Bronze against PostgreSQL's own binary `COPY`, in the same run.
//!
//! Run: `scripts/services up && eval "$(scripts/services env)" &&
//!       cargo bench --profile dev --bench snapshot [-- ROWS [WORKERS…]]`
//! A ROWS-row (default 1,000,000) `orders` table of six columns (bigint key, text, text, numeric,
//! timestamptz, text), analysed and vacuumed. Baseline: one `COPY orders TO STDOUT (FORMAT
//! binary)`, drained by this process (to nowhere). Measured, for each number of
//! `snapshot_workers` (default 1, 2, 4): `tributary run` in this process (`pipeline::run`, Delta
//! sink only, no embedding) on a fresh slot, from its start until every row is in Bronze (the
//! sink's committed row count, polled every 20 ms; `flush_interval_ms = 500`, so the last rows
//! wait at most half a second for their commit). The reader alone
//! (`PostgresSourceReader::poll` until the snapshot is read, nothing else) is measured beside
//! it, as are process and server CPU, to say what bounds the rate. Last, the same run with
//! `snapshot = "incremental"` (chunks between watermarks while streaming, no exported
//! snapshot). Each measurement runs 3 times; medians are reported.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tributary::config::{Config, PostgresSourceConfig};
use tributary::secret::ConnString;
use tributary::sink::delta::DeltaSink;
use tributary::source::postgres::PostgresSourceReader;

const RUNS: usize = 3;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: eval \"$(scripts/services env)\""))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// CPU seconds (user + system) of the process with `stat` (its `/proc/<pid>/stat`).
fn stat_seconds(stat: &str) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (n(11) + n(12)) / ticks
}

/// PostgreSQL server processes' CPU seconds by pid.
fn server_cpu() -> std::collections::HashMap<u32, f64> {
    let mut out = std::collections::HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let p = e.path();
            let is_pg =
                std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == "postgres");
            if is_pg && let Ok(s) = std::fs::read_to_string(p.join("stat")) {
                out.insert(pid, stat_seconds(&s));
            }
        }
    }
    out
}

/// Samples the server's processes every 10 ms, so backends that exit during a measurement
/// (the snapshot's connections) still count: CPU seconds since it started.
struct ServerCpu {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl ServerCpu {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let start = server_cpu();
        let thread = std::thread::spawn(move || {
            let mut last = start.clone();
            loop {
                for (pid, secs) in server_cpu() {
                    last.insert(pid, secs);
                }
                if s.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            last.iter()
                .map(|(pid, secs)| secs - start.get(pid).copied().unwrap_or(0.0))
                .sum()
        });
        ServerCpu { stop, thread }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(f64::NAN)
    }
}

struct Measured {
    rate: f64,
    cpu_process: f64,
    cpu_server: f64,
}

async fn measure<F: std::future::Future<Output = ()>>(rows: i64, f: F) -> Measured {
    let me = || std::fs::read_to_string("/proc/self/stat").map_or(0.0, |s| stat_seconds(&s));
    let server = ServerCpu::start();
    let p0 = me();
    let started = Instant::now();
    f.await;
    let secs = started.elapsed().as_secs_f64();
    let p1 = me();
    Measured {
        rate: rows as f64 / secs,
        cpu_process: (p1 - p0) / secs,
        cpu_server: server.finish() / secs,
    }
}

async fn drop_slot(client: &tokio_postgres::Client, slot: &str) {
    for _ in 0..50 {
        if client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rows: i64 = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let workers: Vec<u32> = if args.len() > 1 {
        args[1..].iter().filter_map(|a| a.parse().ok()).collect()
    } else {
        vec![1, 2, 4]
    };
    let url = env("TRIBUTARY_PG_URL");
    let (admin, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let db = format!("bench_snapshot_{}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let db_url = match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("TRIBUTARY_PG_URL has no database: {url}"),
    };
    let (client, conn) = tokio_postgres::connect(&db_url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let load = Instant::now();
    client
        .batch_execute(&format!(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, status text NOT NULL,
                                  amount numeric(12,2) NOT NULL, placed timestamptz NOT NULL, note text);
             INSERT INTO orders SELECT g, 'customer ' || (g % 9973), (ARRAY['new','paid','shipped'])[1 + g % 3],
                    (g % 100000) / 100.0, timestamptz '2026-01-01' + g * interval '1 second',
                    'order note ' || md5(g::text)
               FROM generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE orders").await.unwrap();
    let heap: i64 = client
        .query_one("SELECT pg_relation_size('orders')", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "orders: {rows} rows, heap {} MB (loaded in {:.1} s)",
        heap >> 20,
        load.elapsed().as_secs_f64()
    );

    let mut copy = Vec::new();
    for _ in 0..RUNS {
        copy.push(
            measure(rows, async {
                use futures::StreamExt as _;
                let stream = client
                    .copy_out("COPY orders TO STDOUT (FORMAT binary)")
                    .await
                    .unwrap();
                futures::pin_mut!(stream);
                let mut bytes = 0usize;
                while let Some(b) = stream.next().await {
                    bytes += b.unwrap().len();
                }
                assert!(bytes > 0);
            })
            .await,
        );
    }
    let copy_rate = median(copy.iter().map(|m| m.rate).collect());
    println!("\n| measure | rows/s | ratio to COPY | CPU process (cores) | CPU server (cores) |");
    println!("|---|---|---|---|---|");
    let row = |what: &str, m: &[Measured]| {
        let rate = median(m.iter().map(|m| m.rate).collect());
        println!(
            "| {what} | {rate:.0} | {:.2} | {:.2} | {:.2} |",
            rate / copy_rate,
            median(m.iter().map(|m| m.cpu_process).collect()),
            median(m.iter().map(|m| m.cpu_server).collect()),
        );
    };
    row("`COPY orders TO STDOUT (FORMAT binary)`", &copy);

    let mut n: u32 = 0;
    for &w in &workers {
        // The reader alone.
        let mut alone = Vec::new();
        for _ in 0..RUNS {
            n += 1;
            let slot = format!("bench_snap_{}_{n}", std::process::id());
            let mut cfg = PostgresSourceConfig::new(
                ConnString::new(db_url.clone()),
                "bench_snap_pub",
                &slot,
                &["orders"],
            );
            cfg.snapshot_workers = w;
            let mut reader = PostgresSourceReader::connect(&cfg).await.unwrap();
            alone.push(
                measure(rows, async {
                    let mut got = 0usize;
                    while reader.snapshotting() {
                        let events = reader.poll(5000, Duration::from_millis(10)).await.unwrap();
                        got += events.len();
                        if let Some(last) = events.last() {
                            reader.ack(&last.position).await.unwrap();
                        }
                    }
                    assert_eq!(got as i64, rows);
                })
                .await,
            );
            reader.close().await;
            drop_slot(&admin, &slot).await;
        }
        row(&format!("reader alone, {w} worker(s)"), &alone);

        let mut run = Vec::new();
        for _ in 0..RUNS {
            n += 1;
            run.push(
                run_into_bronze(&admin, &db_url, rows, n, &format!("snapshot_workers = {w}")).await,
            );
        }
        row(&format!("`tributary run` into Bronze, {w} worker(s)"), &run);
    }
    // The same load through watermarked chunks while streaming (no exported snapshot).
    let mut run = Vec::new();
    for _ in 0..RUNS {
        n += 1;
        run.push(run_into_bronze(&admin, &db_url, rows, n, r#"snapshot = "incremental""#).await);
    }
    row(
        "`tributary run` into Bronze, `snapshot = \"incremental\"`",
        &run,
    );
    drop(client);
    let _ = admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await;
}

/// `tributary run` (in this process) from its start until Bronze holds `rows` rows of
/// `orders`; `source` is added to `[sources.postgres]`; run `n` names its slot.
async fn run_into_bronze(
    admin: &tokio_postgres::Client,
    db_url: &str,
    rows: i64,
    n: u32,
    source: &str,
) -> Measured {
    let slot = format!("bench_snap_{}_{n}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.toml");
    std::fs::write(
        &path,
        format!(
            r#"
name = "bench-snapshot"
[sources.postgres]
url = "{db_url}"
publication = "bench_snap_pub"
slot = "{slot}"
tables = ["orders"]
{source}
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 500
[dead_letter]
path = "{dlq}"
[pipeline]
batch_max_events = 10000
[telemetry]
listen = ""
"#,
            lake = dir.path().join("lake").display(),
            dlq = dir.path().join("dlq.jsonl").display(),
        ),
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    let sink = DeltaSink::new("bench-snapshot", config.sinks.delta.as_ref().unwrap()).unwrap();
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let mut task = None;
    let m = measure(rows, async {
        let t = task.insert(tokio::spawn(tributary::pipeline::run(config, async move {
            s.notified().await
        })));
        loop {
            if let Ok(s) = sink.summary("public.orders").await
                && s.rows >= rows as u64
            {
                break;
            }
            assert!(!t.is_finished(), "the run ended early");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    stop.notify_one();
    task.expect("spawned").await.unwrap().unwrap();
    drop_slot(admin, &slot).await;
    m
}
