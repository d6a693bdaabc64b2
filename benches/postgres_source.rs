//! PostgreSQL source throughput against PostgreSQL's own `pg_recvlogical`.
//!
//! Run: `scripts/services up && eval "$(scripts/services env)" &&
//!       cargo bench --profile dev --bench postgres_source [-- ROWS]`
//! Two workloads of ROWS narrow rows (default 200,000): (a) one transaction, (b) transactions of
//! 20 rows. Before each workload two identical pgoutput slots are created; afterwards
//! `pg_recvlogical` (same server, same options: proto_version 2, streaming on) drains one up to
//! the current WAL position into /dev/null, and the source decodes the other into typed events.
//! Each measurement runs 3 times on fresh slots; medians and the ratio are reported. Each reader
//! starts 2 s after the workload and after the other reader: a reader started within
//! milliseconds of the big commit was measured up to 7× faster than the same reader started
//! later (whichever tool it was), which says more about timing than about the tool.

use std::process::Command;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tributary::config::{PostgresSourceConfig, SnapshotMode};
use tributary::secret::ConnString;
use tributary::source::postgres::PostgresSourceReader;

const RUNS: usize = 3;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

async fn rss_run(url: &str) {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let slot = format!("bench_rss_{}", std::process::id());
    client.batch_execute("TRUNCATE narrow").await.unwrap();
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();
    let rows = 1_000_000;
    client
        .batch_execute(&format!(
            "INSERT INTO narrow SELECT g, g % 1000, 'row ' || g FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    let mut cfg = PostgresSourceConfig::new(
        ConnString::new(url.to_string()),
        "bench_pub",
        &slot,
        &["narrow"],
    );
    cfg.snapshot = SnapshotMode::Never;
    let before = vm_kib("VmRSS:");
    let t = Instant::now();
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let mut got = 0;
    while got < rows {
        got += src
            .poll(10_000, Duration::from_millis(200))
            .await
            .unwrap()
            .len();
    }
    let secs = t.elapsed().as_secs_f64();
    src.close().await;
    println!(
        "{:>20}: {rows} rows in {secs:.1} s; peak RSS {} MiB (before reading {} MiB; bound 512 MiB)",
        "1M-row transaction",
        vm_kib("VmHWM:") / 1024,
        before / 1024
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rss") {
        rss_run(&args[i + 1]).await;
        return;
    }
    let rows: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let base = std::env::var("TRIBUTARY_PG_URL").expect("eval \"$(scripts/services env)\" first");
    let bin = std::env::var("TRIBUTARY_PG_BIN").expect("TRIBUTARY_PG_BIN");
    let (admin, conn) = tokio_postgres::connect(&base, NoTls).await.unwrap();
    tokio::spawn(conn);
    let db = format!("bench_pgsrc_{}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&db);
    let url = url.to_string();
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "CREATE TABLE narrow (id int PRIMARY KEY, v int NOT NULL, s text NOT NULL);
             CREATE PUBLICATION bench_pub FOR TABLE narrow;",
        )
        .await
        .unwrap();
    println!("PostgreSQL source vs pg_recvlogical, {rows} narrow rows, median of {RUNS}");
    for (label, per_tx) in [("one transaction", rows), ("20-row transactions", 20)] {
        let (mut ours, mut theirs, mut connect) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..RUNS {
            client.batch_execute("TRUNCATE narrow").await.unwrap();
            let pid = std::process::id();
            let (a, b) = (
                format!("bench_a_{pid}_{run}_{per_tx}"),
                format!("bench_b_{pid}_{run}_{per_tx}"),
            );
            for s in [&a, &b] {
                client
                    .execute(
                        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                        &[s],
                    )
                    .await
                    .unwrap();
            }
            // The workload: ROWS rows in transactions of `per_tx`.
            let mut sql = String::new();
            let mut start = 0;
            while start < rows {
                let end = (start + per_tx).min(rows);
                sql.push_str(&format!(
                    "BEGIN; INSERT INTO narrow SELECT g, g % 1000, 'row ' || g FROM generate_series({}, {}) g; COMMIT;\n",
                    start + 1,
                    end
                ));
                start = end;
            }
            client.batch_execute(&sql).await.unwrap();
            let endpos: String = client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);

            let recv = || {
                // pg_recvlogical: receives the same changes and writes them out (to /dev/null).
                let t = Instant::now();
                let status = Command::new(format!("{bin}/pg_recvlogical"))
                    .args([
                        "-d",
                        &url,
                        "--slot",
                        &b,
                        "--start",
                        "--no-loop",
                        "-f",
                        "/dev/null",
                    ])
                    .args(["--endpos", &endpos])
                    .args(["-o", "proto_version=2", "-o", "publication_names=bench_pub"])
                    .args(["-o", "streaming=on"])
                    .status()
                    .unwrap();
                assert!(status.success(), "pg_recvlogical failed");
                rows as f64 / t.elapsed().as_secs_f64()
            };
            // Tributary: decoded, typed events, read in a task as the pipeline does.
            let mut cfg = PostgresSourceConfig::new(
                ConnString::new(url.clone()),
                "bench_pub",
                &a,
                &["narrow"],
            );
            cfg.snapshot = SnapshotMode::Never;
            let ours_run = move || {
                tokio::spawn(async move {
                    let t = Instant::now();
                    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
                    let connected = t.elapsed();
                    let mut got = 0;
                    while got < rows {
                        got += src
                            .poll(10_000, Duration::from_millis(200))
                            .await
                            .unwrap()
                            .len();
                    }
                    let rate = rows as f64 / t.elapsed().as_secs_f64();
                    src.close().await;
                    (rate, connected.as_secs_f64() * 1000.0)
                })
            };
            let settle = || std::thread::sleep(Duration::from_secs(2));
            // Alternate who reads first: the first reader of fresh WAL pays for reading it.
            let (rate, ms) = if run % 2 == 0 {
                settle();
                theirs.push(recv());
                settle();
                ours_run().await.unwrap()
            } else {
                settle();
                let r = ours_run().await.unwrap();
                settle();
                theirs.push(recv());
                r
            };
            ours.push(rate);
            connect.push(ms);
            tokio::time::sleep(Duration::from_millis(300)).await;
            for s in [&a, &b] {
                let _ = client
                    .execute("SELECT pg_drop_replication_slot($1)", &[s])
                    .await;
            }
        }
        let (o, p) = (median(ours.clone()), median(theirs.clone()));
        println!(
            "{label:>20}: tributary {o:>10.0} rows/s  pg_recvlogical {p:>10.0} rows/s  ratio {:.2}  (runs: {:?} / {:?})",
            o / p,
            ours.iter().map(|x| *x as u64).collect::<Vec<_>>(),
            theirs.iter().map(|x| *x as u64).collect::<Vec<_>>()
        );
        println!(
            "{:>20}  (tributary's time includes connecting and checking the publication: median {:.0} ms)",
            "",
            median(connect)
        );
    }
    // Memory: one 1,000,000-row transaction through the source (streamed by the server in
    // chunks, spilled by the source past `max_tx_memory_mb`), events dropped as they come.
    // This runs in its own process (`--rss`) so its peak RSS is the source's alone.
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--rss", &url])
        .status()
        .unwrap();
    assert!(status.success());
    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
