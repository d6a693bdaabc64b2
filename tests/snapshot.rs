//! The initial snapshot under crashes: `tributary run` is killed with SIGKILL at random moments
//! while it reads a 200,000-row table (and a keyless `REPLICA IDENTITY FULL` one) and a
//! workload inserts, updates and deletes rows of both; it is restarted each time. At the end no
//! key is in Bronze twice as `snapshot`, replaying Bronze in position order gives exactly each
//! source table, and the pgvector table equals the keyed one.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::run::{Running, start, stop, wait_for};
use common::{env, pg_connect, unique};

const ROWS: i64 = 200_000;
const LOG_ROWS: i64 = 5_000;

/// Inserts, updates and deletes on both tables, each in its own transaction, until `stop`.
async fn workload(url: String, stop: Arc<AtomicBool>) -> u64 {
    let c = pg_connect(&url).await;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = ROWS + 1;
    let mut statements = 0;
    while !stop.load(Ordering::Relaxed) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Ids spread over the whole table: some in chunks already read, some not yet.
        let id = 1 + ((x >> 33) as i64) % next;
        match (x >> 20) % 6 {
            0 | 1 => {
                c.execute(
                    "INSERT INTO orders VALUES ($1::int8, 'new ' || $1::int8, $1::int8 % 1000 + 0.25, NULL)",
                    &[&next],
                )
                .await
                .unwrap();
                next += 1;
            }
            2 | 3 => {
                c.execute(
                    "UPDATE orders SET note = coalesce(note, '') || '+', amount = amount + 1 WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            }
            4 => {
                c.execute("DELETE FROM orders WHERE id = $1", &[&id])
                    .await
                    .unwrap();
            }
            _ => {
                let at = (id % LOG_ROWS) as i32;
                c.batch_execute(&format!(
                    "INSERT INTO log VALUES ({at}, 'late {id}');
                     UPDATE log SET msg = msg || '*' WHERE at = {};
                     DELETE FROM log WHERE ctid = (SELECT ctid FROM log WHERE at = {} LIMIT 1)",
                    (at + 7) % LOG_ROWS as i32,
                    (at + 13) % LOG_ROWS as i32
                ))
                .await
                .unwrap();
            }
        }
        statements += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    statements
}

/// Bronze replayed in position order: `{"dup_snapshot_keys": n, "orders": {id: [customer,
/// amount, note]}, "log": [[at, msg], …] sorted}`, read by Python `deltalake`.
fn replay(lake: &std::path::Path) -> serde_json::Value {
    let script = r#"
import json, os, sys
from collections import Counter
from deltalake import DeltaTable
def rows(name):
    t = DeltaTable(os.path.join(sys.argv[1], name)).to_pyarrow_table().to_pylist()
    t.sort(key=lambda r: (r["_position_major"], r["_position_minor"]))
    return t
orders, snap = {}, Counter()
for r in rows("public.orders"):
    op = r["_op"]
    if op == "truncate":
        orders.clear()
    elif op == "delete":
        orders.pop(r["_key"], None)
    else:
        if op == "snapshot":
            snap[r["_key"]] += 1
        orders[r["_key"]] = [r["customer"], str(r["amount"]), r["note"]]
log = Counter()
for r in rows("public.log"):
    op = r["_op"]
    if op == "truncate":
        log.clear()
        continue
    if r["_before"] is not None:
        b = json.loads(r["_before"])
        log[(b["at"], b["msg"])] -= 1
    if op != "delete":
        log[(r["at"], r["msg"])] += 1
out = {
    "dup_snapshot_keys": sum(1 for n in snap.values() if n > 1),
    "orders": {json.loads(k)["id"]: v for k, v in orders.items()},
    "log": sorted([list(k) for k, n in log.items() for _ in range(n)]),
    "log_negative": sum(1 for n in log.values() if n < 0),
}
print(json.dumps(out))
sys.stdout.flush()
os._exit(0)  # deltalake's runtime threads can abort the interpreter at exit
"#;
    common::python_json(script, lake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_snapshot_keeps_bronze_and_pgvector_exact() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db(
        &admin,
        "snapkill",
        &format!(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL,
                                  amount numeric(12,2) NOT NULL, note text);
             INSERT INTO orders SELECT g, 'customer ' || (g % 977), (g % 1000) + 0.5, NULL
               FROM generate_series(1, {ROWS}) g;
             CREATE TABLE log (at int NOT NULL, msg text NOT NULL);
             ALTER TABLE log REPLICA IDENTITY FULL;
             INSERT INTO log SELECT g % {LOG_ROWS}, 'entry ' || g FROM generate_series(1, {LOG_ROWS}) g;"
        ),
    )
    .await;
    let slot = unique("slot");
    let schema = unique("snapkill");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "snapshot-kill-test"
[sources.postgres]
url = "{src_url}"
publication = "snap_pub"
slot = "{slot}"
tables = ["orders", "log"]
snapshot_chunk_rows = 4000
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

    let stop_work = Arc::new(AtomicBool::new(false));
    let work = tokio::spawn(workload(src_url.clone(), stop_work.clone()));
    let done = async || {
        src.query_one(
            "SELECT count(*) FILTER (WHERE done) = 2 FROM public.tributary_snapshot_state WHERE slot = $1",
            &[&slot],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
    };
    // Deterministic pseudo-random kill moments (an LCG), until the snapshot is done and two
    // more runs were killed while streaming.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut interrupted, mut after_done) = (0, 0);
    let started = Instant::now();
    // What every run logged above DEBUG, for the failure messages below.
    let mut history = String::new();
    let keep_log = |history: &mut String, run: usize| {
        let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
        history.push_str(&format!("--- run {run}\n"));
        for l in log
            .lines()
            .filter(|l| !l.contains("DEBUG") && !l.contains("TRACE"))
        {
            history.push_str(l);
            history.push('\n');
        }
    };
    while after_done < 2 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let run = start(&config);
        // Each run lives a little longer than the last: a run killed before its sinks commit
        // anything makes no progress, and start-up (reading the Delta log that every run grows)
        // slowly takes longer.
        let runs = (interrupted + after_done) as u64;
        tokio::time::sleep(Duration::from_millis(300 + (x >> 33) % 1200 + 100 * runs)).await;
        let mut run: Running = run;
        run.0.kill().unwrap();
        run.0.wait().unwrap();
        keep_log(&mut history, (interrupted + after_done) as usize);
        if done().await {
            after_done += 1;
        } else {
            interrupted += 1;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("DEBUG") && !l.contains("TRACE"))
                .collect();
            panic!(
                "the snapshot never finished ({interrupted} kills mid-snapshot); the last run:\n{}",
                tail[tail.len().saturating_sub(40)..].join("\n")
            );
        }
    }
    assert!(
        interrupted >= 2,
        "the snapshot was interrupted {interrupted} times"
    );
    stop_work.store(true, Ordering::Relaxed);
    let statements = work.await.unwrap();
    assert!(
        statements > 100,
        "the workload ran ({statements} statements)"
    );

    // A last clean run catches up.
    let run = start(&config);
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"orders\"");
    let source: BTreeMap<i64, (String, String, Option<String>)> = src
        .query("SELECT id, customer, amount::text, note FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let last_id = *source.keys().last().unwrap();
    wait_for("pgvector to catch up", async || {
        pg.query_one(&format!("SELECT count(*), max(id) FROM {table}"), &[])
            .await
            .map(|r| {
                r.get::<_, i64>(0) == source.len() as i64
                    && r.get::<_, Option<i64>>(1) == Some(last_id)
            })
            .unwrap_or(false)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");

    let pgvector: BTreeMap<i64, (String, String, Option<String>)> = pg
        .query(
            &format!(
                "SELECT id, payload->>'customer', payload->>'amount', payload->>'note' FROM {table}"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let normalise = |m: &BTreeMap<i64, (String, String, Option<String>)>| {
        m.iter()
            .map(|(k, (c, a, n))| (*k, (c.clone(), a.parse::<f64>().unwrap(), n.clone())))
            .collect::<Vec<_>>()
    };
    assert!(
        normalise(&pgvector) == normalise(&source),
        "pgvector equals the source after {interrupted} kills mid-snapshot"
    );

    let bronze = replay(&lake);
    if bronze["dup_snapshot_keys"] != 0 {
        let snapshot_lines: Vec<&str> = history
            .lines()
            .filter(|l| {
                l.starts_with("--- run")
                    || ["snapshot", "slot", "chunk", "ERROR", "WARN"]
                        .iter()
                        .any(|k| l.contains(k))
            })
            .collect();
        panic!(
            "{} keys twice as snapshot in Bronze; what the runs logged:\n{}",
            bronze["dup_snapshot_keys"],
            snapshot_lines.join("\n")
        );
    }
    let replayed: BTreeMap<i64, (String, String, Option<String>)> = serde_json::from_value::<
        BTreeMap<String, (String, String, Option<String>)>,
    >(bronze["orders"].clone())
    .unwrap()
    .into_iter()
    .map(|(k, v)| (k.parse().unwrap(), v))
    .collect();
    assert_eq!(
        replayed.len(),
        source.len(),
        "Bronze replayed has the source's rows"
    );
    assert!(
        normalise(&replayed) == normalise(&source),
        "Bronze replayed by position equals the source"
    );
    let mut source_log: Vec<(i32, String)> = src
        .query("SELECT at, msg FROM log", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    source_log.sort();
    let bronze_log: Vec<(i32, String)> = serde_json::from_value(bronze["log"].clone()).unwrap();
    assert_eq!(
        bronze["log_negative"], 0,
        "no keyless row removed before it was there"
    );
    assert!(
        bronze_log == source_log,
        "the keyless table replayed from Bronze equals the source ({} vs {} rows)",
        bronze_log.len(),
        source_log.len()
    );

    drop(src);
    common::drop_source_db(&admin, &dbname, &slot).await;
}
