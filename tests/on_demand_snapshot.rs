//! On-demand snapshots (`tributary snapshot --table T`) while the connector streams: a workload
//! inserts, updates, deletes and moves keys of `orders` (and updates `other`) the whole time.
//! The pgvector table was damaged before the request (rows deleted, payloads changed), as after
//! a bug: the snapshot repairs it. At the end the pgvector table equals the source, replaying
//! Bronze by position gives exactly the source table, no key is twice among the on-demand
//! snapshot's rows, every source row was re-read or changed by the stream meanwhile, and the
//! other table got no snapshot rows. The second test SIGKILLs the connector at random moments
//! during the on-demand snapshot and restarts it each time.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::run::{start, stop, wait_for};
use common::{env, pg_connect, unique};

const ROWS: i64 = 30_000;

/// Changes to `orders` (and `other`), each in its own transaction, until `stop`; ids moved
/// by a key update go above 10^9.
async fn workload(url: String, stop: Arc<AtomicBool>) -> u64 {
    let c = pg_connect(&url).await;
    let mut x: u64 = 0x5851_f42d_4c95_7f2d;
    let mut next = ROWS + 1;
    let mut statements = 0;
    while !stop.load(Ordering::Relaxed) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let id = 1 + ((x >> 33) as i64) % next;
        let sql = match (x >> 20) % 8 {
            0 | 1 => {
                next += 1;
                format!(
                    "INSERT INTO orders VALUES ({}, 'new', {}.25, NULL)",
                    next - 1,
                    next % 1000
                )
            }
            2..=4 => format!(
                "UPDATE orders SET note = coalesce(note, '') || '+', amount = amount + 1 WHERE id = {id}"
            ),
            5 => format!("DELETE FROM orders WHERE id = {id}"),
            6 => format!(
                "UPDATE orders SET id = id + 1000000000 WHERE id = {id} AND id < 1000000000"
            ),
            _ => format!("UPDATE other SET n = n + 1 WHERE k = {}", id % 100),
        };
        c.batch_execute(&sql).await.unwrap();
        statements += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    statements
}

/// Bronze replayed in position order: `{"orders": {id: [customer, amount, note]},
/// "on_demand_keys": [...], "on_demand_dups": n, "changed_keys": [...], "other_snapshot": n}`;
/// rows at or after `since` (a major position) count as the on-demand snapshot's.
fn replay(lake: &std::path::Path, since: i64) -> serde_json::Value {
    let script = format!(
        r#"
import json, os, sys
from collections import Counter
from deltalake import DeltaTable
def rows(name):
    t = DeltaTable(os.path.join(sys.argv[1], name)).to_pyarrow_table().to_pylist()
    t.sort(key=lambda r: (r["_position_major"], r["_position_minor"]))
    return t
since = {since}
orders, snap, changed = {{}}, Counter(), set()
for r in rows("public.orders"):
    op, k = r["_op"], json.loads(r["_key"])["id"] if r["_key"] else None
    late = r["_position_major"] >= since
    if op == "truncate":
        orders.clear()
        continue
    if r["_before"] is not None:
        old = json.loads(r["_before"]).get("id")
        if old is not None and old != k:
            orders.pop(old, None)
            if late:
                changed.add(old)
    if op == "delete":
        orders.pop(k, None)
    else:
        orders[k] = [r["customer"], str(r["amount"]), r["note"]]
    if late:
        if op == "snapshot":
            snap[k] += 1
        else:
            changed.add(k)
other = sum(1 for r in rows("public.other") if r["_op"] == "snapshot" and r["_position_major"] >= since)
positions = [(r["_position_major"], r["_position_minor"], r["_op"]) for r in rows("public.orders") if r["_position_major"] >= since]
changes = [p[:2] for p in positions if p[2] != "snapshot"]
snaps = [p[:2] for p in positions if p[2] == "snapshot"]
print(json.dumps({{
    "orders": {{str(k): v for k, v in orders.items()}},
    "on_demand_keys": sorted(snap),
    "on_demand_dups": sum(1 for n in snap.values() if n > 1),
    "changed_keys": sorted(changed),
    "other_snapshot": other,
    "interleaved": bool(changes and snaps and min(changes) < max(snaps)),
}}))
sys.stdout.flush()
os._exit(0)  # deltalake's runtime threads can abort the interpreter at exit
"#
    );
    common::python_json(&script, lake)
}

type Orders = BTreeMap<i64, (String, f64, Option<String>)>;

async fn source_orders(src: &tokio_postgres::Client) -> Orders {
    src.query("SELECT id, customer, amount::text, note FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let amount: String = r.get(2);
            (r.get(0), (r.get(1), amount.parse().unwrap(), r.get(3)))
        })
        .collect()
}

async fn pgvector_orders(pg: &tokio_postgres::Client, table: &str) -> Orders {
    pg.query(
        &format!(
            "SELECT id, payload->>'customer', payload->>'amount', payload->>'note' FROM {table}"
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let amount: String = r.get(2);
        (r.get(0), (r.get(1), amount.parse().unwrap(), r.get(3)))
    })
    .collect()
}

/// `tributary snapshot --config … --table orders` plus `extra`: (exit code, stdout + stderr).
/// Killed (and the test failed) after 180 s.
fn request(config: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let out = config.with_extension("request");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["snapshot", "--config"])
        .arg(config)
        .args(["--table", "orders"])
        .args(extra)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
            panic!(
                "tributary snapshot did not finish within 180 s; the run logged:\n{}",
                tail[tail.len().saturating_sub(40)..].join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&out).unwrap_or_default(),
    )
}

struct Setup {
    admin: tokio_postgres::Client,
    dbname: String,
    src: tokio_postgres::Client,
    src_url: String,
    pg: tokio_postgres::Client,
    slot: String,
    vector_table: String,
    config: std::path::PathBuf,
    lake: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A source database with `orders` (ROWS rows) and `other`, a config reading both into Bronze
/// and pgvector with `snapshot = mode`, and (for `initial`) the initial snapshot taken and
/// durable.
async fn setup(prefix: &str, mode: &str) -> Setup {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db(
        &admin,
        prefix,
        &format!(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL,
                                  amount numeric(12,2) NOT NULL, note text);
             INSERT INTO orders SELECT g, 'customer ' || (g % 977), (g % 1000) + 0.5, NULL
               FROM generate_series(1, {ROWS}) g;
             CREATE TABLE other (k int PRIMARY KEY, n int NOT NULL);
             INSERT INTO other SELECT g, 0 FROM generate_series(0, 99) g;"
        ),
    )
    .await;
    let slot = unique("slot");
    let schema = unique(prefix);
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "on-demand-snapshot-test"
[sources.postgres]
url = "{src_url}"
publication = "od_pub"
slot = "{slot}"
tables = ["orders", "other"]
snapshot = "{mode}"
snapshot_chunk_rows = 1500
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_wait_ms = 50
[telemetry]
listen = ""
"#,
            pg = env("TRIBUTARY_PG_URL"),
            lake = lake.display(),
        ),
    )
    .unwrap();
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let vector_table = format!("\"{schema}\".\"orders\"");
    if mode != "initial" {
        return Setup {
            admin,
            dbname,
            src,
            src_url,
            pg,
            slot,
            vector_table,
            config,
            lake,
            _dir: dir,
        };
    }
    let run = start(&config);
    wait_for("the initial snapshot to be durable", async || {
        src.query_one(
            "SELECT count(*) FILTER (WHERE done) = 2 FROM public.tributary_snapshot_state WHERE slot = $1",
            &[&slot],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");
    Setup {
        admin,
        dbname,
        src,
        src_url,
        pg,
        slot,
        vector_table,
        config,
        lake,
        _dir: dir,
    }
}

impl Setup {
    /// Drops the test's slot and source database (a slot left behind holds one of the server's
    /// `max_replication_slots` for good).
    async fn teardown(self) {
        drop(self.src);
        common::drop_source_db(&self.admin, &self.dbname, &self.slot).await;
    }
}

/// Damages the pgvector table as a bug would: 300 rows gone, 300 payloads wrong.
async fn damage(s: &Setup) {
    let t = &s.vector_table;
    let gone =
        s.pg.execute(&format!("DELETE FROM {t} WHERE id % 100 = 7"), &[])
            .await
            .unwrap();
    let wrong = s
        .pg
        .execute(
            &format!(
                "UPDATE {t} SET payload = jsonb_set(payload, '{{customer}}', '\"corrupt\"') WHERE id % 100 = 11"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!((gone, wrong), (300, 300));
}

/// The end checks shared by the tests, after the workload stopped and a clean run caught up;
/// returns Bronze's replay.
/// `other_read`: the other table was read too (the initial snapshot), not left alone.
async fn check_end(s: &Setup, since: i64, other_read: bool) -> serde_json::Value {
    let source = source_orders(&s.src).await;
    let pgvector = pgvector_orders(&s.pg, &s.vector_table).await;
    assert!(
        pgvector == source,
        "pgvector equals the source ({} rows vs {}; {} differ)",
        pgvector.len(),
        source.len(),
        source
            .iter()
            .filter(|(k, v)| pgvector.get(k) != Some(v))
            .count()
    );
    let bronze = replay(&s.lake, since);
    assert_eq!(
        bronze["on_demand_dups"], 0,
        "no key twice in the on-demand snapshot"
    );
    let other = bronze["other_snapshot"].as_i64().unwrap();
    if other_read {
        assert!(other > 0, "the other table was read too");
    } else {
        assert_eq!(other, 0, "the other table got no snapshot rows");
    }
    let replayed: Orders = serde_json::from_value::<
        BTreeMap<String, (String, String, Option<String>)>,
    >(bronze["orders"].clone())
    .unwrap()
    .into_iter()
    .map(|(k, (c, a, n))| (k.parse().unwrap(), (c, a.parse().unwrap(), n)))
    .collect();
    assert!(
        replayed == source,
        "Bronze replayed by position equals the source ({} rows vs {})",
        replayed.len(),
        source.len()
    );
    let read: std::collections::HashSet<i64> =
        serde_json::from_value(bronze["on_demand_keys"].clone()).unwrap();
    let changed: std::collections::HashSet<i64> =
        serde_json::from_value(bronze["changed_keys"].clone()).unwrap();
    let missed: Vec<&i64> = source
        .keys()
        .filter(|k| !read.contains(k) && !changed.contains(k))
        .take(10)
        .collect();
    assert!(
        missed.is_empty(),
        "every source row was re-read or changed by the stream meanwhile; not: {missed:?}"
    );
    assert!(
        read.len() as f64 > 0.8 * source.len() as f64,
        "most rows came from the snapshot ({} of {})",
        read.len(),
        source.len()
    );
    bronze
}

/// Stops the workload, waits until pgvector equals the source, stops `run` (exit 0) and returns
/// its log.
async fn settle(
    s: &Setup,
    stop_work: &AtomicBool,
    work: tokio::task::JoinHandle<u64>,
    run: common::run::Running,
) -> String {
    stop_work.store(true, Ordering::Relaxed);
    assert!(work.await.unwrap() > 100, "the workload ran");
    let source = source_orders(&s.src).await;
    wait_for("pgvector to catch up", async || {
        pgvector_orders(&s.pg, &s.vector_table).await == source
    })
    .await;
    let (code, log) = stop(run, &s.config);
    assert_eq!(code, 0, "{log}");
    log
}

async fn current_lsn(src: &tokio_postgres::Client) -> i64 {
    src.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_snapshot_while_streaming_repairs_pgvector_without_gap_or_duplicate() {
    let s = setup("ondemand", "initial").await;
    damage(&s).await;
    // Each chunk's window held open 150 ms: many changes fall between a chunk's SELECT and its
    // high watermark, the rows that must be left out of it.
    let run = common::run::start_with_env(
        &s.config,
        &[(
            "FAILPOINTS",
            "postgres::on-demand-before-high-watermark=sleep(150)",
        )],
    );
    let stop_work = Arc::new(AtomicBool::new(false));
    let work = tokio::spawn(workload(s.src_url.clone(), stop_work.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let since = current_lsn(&s.src).await;
    let (code, out) = tokio::task::spawn_blocking({
        let config = s.config.clone();
        move || request(&config, &[])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("durable in every sink"), "{out}");
    let log = settle(&s, &stop_work, work, run).await;
    assert!(log.contains("on-demand snapshot durable"), "{log}");
    assert!(
        log.contains("rows the stream changed inside the window left out"),
        "some chunk's window saw changes to it (the case the watermarks exist for)"
    );
    check_end(&s, since, false).await;

    // The status shows the finished request.
    let status = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["status", "--json", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let snaps = status["postgres"]["ok"]["snapshot"].as_array().unwrap();
    assert!(
        snaps
            .iter()
            .any(|p| p["table"] == "public.orders" && p["on_demand"] == true && p["done"] == true),
        "{status}"
    );
    s.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_an_on_demand_snapshot_neither_loses_nor_doubles_a_row() {
    let s = setup("odkill", "initial").await;
    damage(&s).await;
    let stop_work = Arc::new(AtomicBool::new(false));
    let work = tokio::spawn(workload(s.src_url.clone(), stop_work.clone()));
    let since = current_lsn(&s.src).await;
    let (code, out) = request(&s.config, &["--no-wait"]);
    assert_eq!(code, 0, "{out}");
    let done = async || {
        s.src
            .query_one(
                "SELECT bool_and(done) AND bool_and(error IS NULL) FROM public.tributary_snapshot_state_requests WHERE slot = $1",
                &[&s.slot],
            )
            .await
            .map(|r| r.get::<_, Option<bool>>(0) == Some(true))
            .unwrap_or(false)
    };
    let chunks = async || {
        s.src
            .query_one(
                "SELECT chunk FROM public.tributary_snapshot_state_requests WHERE slot = $1",
                &[&s.slot],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
    };
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let (mut kills, mut progressed) = (0, 0);
    let started = Instant::now();
    while !done().await {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let before = chunks().await;
        let mut run = start(&s.config);
        tokio::time::sleep(Duration::from_millis(700 + (x >> 33) % 1500)).await;
        run.0.kill().unwrap();
        run.0.wait().unwrap();
        kills += 1;
        if chunks().await > before {
            progressed += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the on-demand snapshot never finished ({kills} kills)"
        );
    }
    assert!(
        kills >= 2 && progressed >= 1,
        "the snapshot was killed {kills} times, {progressed} of them after progress"
    );
    let run = start(&s.config);
    settle(&s, &stop_work, work, run).await;
    check_end(&s, since, false).await;
    s.teardown().await;
}

/// `snapshot = "incremental"`: the initial load itself runs in chunks between watermarks while
/// the stream goes on from the slot's creation, and no connection holds a transaction open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_initial_snapshot_streams_meanwhile_and_holds_no_transaction_open() {
    let s = setup("odinit", "incremental").await;
    let stop_work = Arc::new(AtomicBool::new(false));
    let work = tokio::spawn(workload(s.src_url.clone(), stop_work.clone()));
    let run = start(&s.config);
    let mut longest: f64 = 0.0;
    wait_for("the incremental snapshot to be durable", async || {
        let open: f64 = s
            .src
            .query_one(
                "SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8
                   FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        longest = longest.max(open);
        s.src
            .query_one(
                "SELECT count(*) = 2 AND bool_and(done) AND bool_and(error IS NULL)
                   FROM public.tributary_snapshot_state_requests WHERE slot = $1",
                &[&s.slot],
            )
            .await
            .map(|r| r.get::<_, Option<bool>>(0) == Some(true))
            .unwrap_or(false)
    })
    .await;
    let log = settle(&s, &stop_work, work, run).await;
    assert!(
        !log.contains("initial snapshot read"),
        "no exported snapshot was read: {log}"
    );
    let bronze = check_end(&s, 0, true).await;
    assert_eq!(
        bronze["interleaved"], true,
        "streamed changes reached Bronze between the snapshot's chunks"
    );
    assert!(
        longest < 3.0,
        "no connection held a transaction open for long (longest {longest:.1} s)"
    );
    s.teardown().await;
}
