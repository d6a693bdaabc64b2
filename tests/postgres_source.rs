//! PostgreSQL source against the services' real PostgreSQL: each test has its own database and
//! slot (UUID names), and drops the slot at the end.

mod common;

use tributary::config::PostgresSourceConfig;
use tributary::dead_letter::{DeadLetter, DeadLetters};
use tributary::event::{ChangeEvent, Op, Position, Value};
use tributary::secret::ConnString;
use tributary::source::postgres::{PostgresSourceReader, lsn_of};

const WAIT: std::time::Duration = std::time::Duration::from_millis(200);

struct Db {
    admin: tokio_postgres::Client,
    client: tokio_postgres::Client,
    url: String,
    slot: String,
}

impl Db {
    async fn new(setup: &str) -> Db {
        Db::with_options("", setup).await
    }

    /// A database created `WITH` `options` (e.g. another encoding), after running `setup` in it.
    async fn with_options(options: &str, setup: &str) -> Db {
        let admin = common::pg_connect(&common::env("TRIBUTARY_PG_URL")).await;
        let name = common::unique("pgsrc");
        admin
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await
            .unwrap();
        let url = common::pg_url_for_db(&name);
        let client = common::pg_connect(&url).await;
        client.batch_execute(setup).await.unwrap();
        Db {
            admin,
            client,
            url,
            slot: common::unique("slot"),
        }
    }

    fn config(&self, tables: &[&str]) -> PostgresSourceConfig {
        PostgresSourceConfig::new(
            ConnString::new(self.url.clone()),
            "trib pub",
            &self.slot,
            tables,
        )
    }

    async fn drop_only_slot(&self) {
        // The walsender of a reader just closed may take a moment to exit.
        for _ in 0..100 {
            let active: Option<bool> = self
                .admin
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot],
                )
                .await
                .unwrap()
                .map(|r| r.get(0));
            match active {
                None => return,
                Some(false) => {
                    // Only this test's slot: never a filter that could reach other tests' slots.
                    let _ = self
                        .admin
                        .execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                        .await;
                }
                Some(true) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Drops the slot (it holds WAL on the shared server) and the database.
    async fn drop_slot(&self) {
        self.drop_only_slot().await;
        let db = url::Url::parse(&self.url)
            .unwrap()
            .path()
            .trim_start_matches('/')
            .to_owned();
        self.admin
            .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .await
            .unwrap();
    }
}

/// Polls until `n` events arrived: the server decodes only WAL it has flushed, which with
/// asynchronous commit can trail the commit by the WAL writer's delay.
async fn poll_n(src: &mut PostgresSourceReader, n: usize) -> Vec<ChangeEvent> {
    let mut out = Vec::new();
    for _ in 0..100 {
        out.extend(src.poll(10_000, WAIT).await.unwrap());
        if out.len() >= n {
            break;
        }
    }
    out
}

fn int(ev: &ChangeEvent, side: &str, col: &str) -> Option<Value> {
    let row = if side == "after" {
        &ev.after
    } else {
        &ev.before
    };
    row.as_ref().and_then(|r| r.get(col).cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_inserts_updates_deletes_truncates_with_positions() {
    let db =
        Db::new("CREATE TABLE items (id int PRIMARY KEY, name text, tags text[], price numeric);")
            .await;
    let mut src = PostgresSourceReader::connect(&db.config(&["items"]))
        .await
        .unwrap();
    // TRUNCATE waits for the initial snapshot (it holds ACCESS SHARE locks): read it first.
    assert!(src.poll(10, WAIT).await.unwrap().is_empty());
    db.client
        .batch_execute(
            "BEGIN; INSERT INTO items VALUES (1, 'a', '{x,\"y z\"}', 1.50), (2, 'b', NULL, NULL); COMMIT;
             UPDATE items SET name = 'a2' WHERE id = 1;
             UPDATE items SET id = 3 WHERE id = 2;
             DELETE FROM items WHERE id = 1;
             TRUNCATE items;",
        )
        .await
        .unwrap();
    let evs = poll_n(&mut src, 6).await;
    let ops: Vec<Op> = evs.iter().map(|e| e.op).collect();
    assert_eq!(
        ops,
        vec![
            Op::Insert,
            Op::Insert,
            Op::Update,
            Op::Update,
            Op::Delete,
            Op::Truncate
        ]
    );
    assert!(evs.iter().all(|e| e.source == "public.items"));
    assert_eq!(int(&evs[0], "after", "id"), Some(Value::Int32(1)));
    assert_eq!(
        int(&evs[0], "after", "tags"),
        Some(Value::Array(vec![
            Value::Text("x".into()),
            Value::Text("y z".into())
        ]))
    );
    assert_eq!(
        int(&evs[0], "after", "price"),
        Some(Value::Numeric("1.50".into()))
    );
    assert_eq!(int(&evs[1], "after", "tags"), Some(Value::Null));
    // Plain update: no old row under the default replica identity.
    assert_eq!(evs[2].before, None);
    assert_eq!(
        int(&evs[2], "after", "name"),
        Some(Value::Text("a2".into()))
    );
    // Key change: the old key comes along, the event's key is the new one.
    assert_eq!(int(&evs[3], "before", "id"), Some(Value::Int32(2)));
    assert_eq!(evs[3].key.get("id"), Some(&Value::Int32(3)));
    assert_eq!(evs[4].key.get("id"), Some(&Value::Int32(1)));
    assert_eq!(evs[4].after, None);
    // Both inserts share the commit, ordered by ordinal; later transactions come later.
    let pos: Vec<&Position> = evs.iter().map(|e| &e.position).collect();
    match (lsn_of(pos[0]), lsn_of(pos[1])) {
        (Some((a, 0)), Some((b, 1))) => assert_eq!(a, b),
        other => panic!("unexpected positions {other:?}"),
    }
    for w in pos.windows(2).skip(1) {
        assert!(w[0] < w[1], "positions must increase: {w:?}");
    }
    // Nothing new: a second poll hands out nothing again.
    assert!(src.poll(10_000, WAIT).await.unwrap().is_empty());
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_positions_are_not_redelivered_after_restart() {
    let db = Db::new("CREATE TABLE t (id int PRIMARY KEY);").await;
    let cfg = db.config(&["t"]);
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    for i in 1..=3 {
        db.client
            .execute("INSERT INTO t VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    let evs = poll_n(&mut src, 3).await;
    assert_eq!(evs.len(), 3);
    src.ack(&evs[1].position).await.unwrap();
    src.close().await;
    // A new reader (a restarted process) gets only what was not acknowledged.
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let again = poll_n(&mut src, 1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].position, evs[2].position);
    assert_eq!(int(&again[0], "after", "id"), Some(Value::Int32(3)));
    assert!(
        src.confirmed_flush().await.unwrap()
            >= lsn_of(&evs[1].position).expect("a PostgreSQL position").0
    );
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_table_names_toast_and_replica_identity() {
    let db = Db::new(
        r#"CREATE TABLE "Order Items" (id int PRIMARY KEY, "it's" text, big text);
           ALTER TABLE "Order Items" ALTER COLUMN big SET STORAGE EXTERNAL;
           CREATE TABLE full_rows (id int PRIMARY KEY, big text, n int);
           ALTER TABLE full_rows REPLICA IDENTITY FULL;
           CREATE TABLE nokey (v int);"#,
    )
    .await;
    // A table without key or FULL identity is refused by name.
    let err = PostgresSourceReader::connect(&db.config(&["nokey"]))
        .await
        .err()
        .expect("a table without primary key must be refused");
    assert!(err.to_string().contains("nokey"), "{err}");
    db.client
        .batch_execute(r#"DROP PUBLICATION "trib pub""#)
        .await
        .unwrap();

    let mut src =
        PostgresSourceReader::connect(&db.config(&[r#"public."Order Items""#, "full_rows"]))
            .await
            .unwrap();
    db.client
        .batch_execute(
            r#"INSERT INTO "Order Items" VALUES (1, 'q''uote', repeat('x', 100000));
               UPDATE "Order Items" SET "it's" = 'changed' WHERE id = 1;
               INSERT INTO full_rows VALUES (1, repeat('y', 100000), 1);
               UPDATE full_rows SET n = 2 WHERE id = 1;"#,
        )
        .await
        .unwrap();
    let evs = poll_n(&mut src, 4).await;
    assert_eq!(evs.len(), 4);
    assert_eq!(evs[0].source, "public.Order Items");
    assert_eq!(
        int(&evs[0], "after", "it's"),
        Some(Value::Text("q'uote".into()))
    );
    // Default identity: the untouched TOASTed column is "unchanged", never NULL.
    assert_eq!(int(&evs[1], "after", "big"), Some(Value::UnchangedToast));
    assert_eq!(
        int(&evs[1], "after", "it's"),
        Some(Value::Text("changed".into()))
    );
    // FULL identity: the whole old row comes along, with the old value of n.
    assert_eq!(int(&evs[3], "before", "n"), Some(Value::Int32(1)));
    assert_eq!(int(&evs[3], "after", "n"), Some(Value::Int32(2)));
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_and_dropped_columns_show_in_later_events() {
    let db = Db::new("CREATE TABLE s (id int PRIMARY KEY, gone text);").await;
    let mut src = PostgresSourceReader::connect(&db.config(&["s"]))
        .await
        .unwrap();
    // DDL waits for the initial snapshot (it holds ACCESS SHARE locks): read it first.
    assert!(src.poll(10, WAIT).await.unwrap().is_empty());
    db.client
        .batch_execute(
            "INSERT INTO s VALUES (1, 'x');
             ALTER TABLE s ADD COLUMN added jsonb, DROP COLUMN gone;
             INSERT INTO s VALUES (2, '{\"k\": [1]}');",
        )
        .await
        .unwrap();
    let evs = poll_n(&mut src, 2).await;
    assert_eq!(evs.len(), 2);
    assert_eq!(int(&evs[0], "after", "gone"), Some(Value::Text("x".into())));
    assert_eq!(int(&evs[0], "after", "added"), None);
    assert_eq!(int(&evs[1], "after", "gone"), None);
    match int(&evs[1], "after", "added") {
        Some(Value::Json(j)) => assert_eq!(j.to_value(), serde_json::json!({"k": [1]})),
        other => panic!("expected the jsonb column as JSON, got {other:?}"),
    }
    assert!(evs[1].schema_version > evs[0].schema_version);
    src.close().await;
    db.drop_slot().await;
}

/// Polls until `idle` consecutive polls return nothing.
async fn poll_all(src: &mut PostgresSourceReader) -> Vec<ChangeEvent> {
    let mut out = Vec::new();
    let mut empty = 0;
    while empty < 5 {
        let got = src.poll(50_000, WAIT).await.unwrap();
        if got.is_empty() {
            empty += 1;
        } else {
            empty = 0;
        }
        out.extend(got);
    }
    out
}

/// Applies events to a key → name map, as a consumer keeping the table in sync would.
fn apply(state: &mut std::collections::BTreeMap<i32, String>, evs: &[ChangeEvent]) {
    for e in evs {
        let id = match e.key.get("id") {
            Some(Value::Int32(i)) => *i,
            other => panic!("unexpected key {other:?}"),
        };
        match e.op {
            Op::Delete => {
                state.remove(&id);
            }
            _ => {
                let name = match int(e, "after", "name") {
                    Some(Value::Text(s)) => s.to_string(),
                    other => panic!("unexpected name {other:?}"),
                };
                state.insert(id, name);
            }
        }
    }
}

async fn table_state(
    client: &tokio_postgres::Client,
    table: &str,
) -> std::collections::BTreeMap<i32, String> {
    client
        .query(&format!("SELECT id, name FROM {table}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn no_duplicate_positions(evs: &[ChangeEvent]) {
    let mut seen = std::collections::HashSet::new();
    for e in evs {
        assert!(
            seen.insert(e.position.clone()),
            "position {:?} delivered twice",
            e.position
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_with_concurrent_writes_misses_and_doubles_nothing() {
    let db = Db::new(
        "CREATE TABLE t (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 3000) g;
         ANALYZE t;",
    )
    .await;
    let mut cfg = db.config(&["t"]);
    cfg.snapshot_chunk_rows = 500;
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let connections = async || -> i64 {
        db.client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    };
    assert_eq!(
        connections().await,
        i64::from(cfg.snapshot_workers) + 1,
        "while the snapshot is read the server sees snapshot_workers + 1 connections"
    );
    // Writes racing the snapshot: committed after the slot exported it.
    let writer = {
        let url = db.url.clone();
        tokio::spawn(async move {
            let c = common::pg_connect(&url).await;
            for i in 0..50 {
                c.batch_execute(&format!(
                    "INSERT INTO t VALUES ({0}, 'new {0}');
                     UPDATE t SET name = 'upd {1}' WHERE id = {1};
                     DELETE FROM t WHERE id = {2};",
                    3001 + i,
                    1 + i * 7,
                    2000 + i
                ))
                .await
                .unwrap();
            }
        })
    };
    let first = src.poll(50_000, WAIT).await.unwrap();
    assert!(
        first.len() <= 500,
        "snapshot chunks hold at most snapshot_chunk_rows rows"
    );
    writer.await.unwrap();
    let mut evs = first;
    evs.extend(poll_all(&mut src).await);
    let snap: Vec<&ChangeEvent> = evs.iter().filter(|e| e.op == Op::Snapshot).collect();
    assert_eq!(
        snap.len(),
        3000,
        "every row existing at slot creation, once"
    );
    assert!(
        evs[..3000].iter().all(|e| e.op == Op::Snapshot),
        "snapshot rows come first"
    );
    assert_eq!(evs.len() - 3000, 150, "every later change, once");
    no_duplicate_positions(&evs);
    for w in evs.windows(2) {
        assert!(w[0].position < w[1].position, "positions increase: {:?}", w);
    }
    let mut state = Default::default();
    apply(&mut state, &evs);
    assert_eq!(state, table_state(&db.client, "t").await);
    assert_eq!(
        connections().await,
        2,
        "once it is read, the snapshot connections are closed (one SQL, one replication)"
    );

    // The table's snapshot is recorded done only once its last row is acknowledged.
    assert!(!snapshot_done(&db).await);
    src.ack(&evs[2999].position).await.unwrap();
    assert!(snapshot_done(&db).await);
    src.close().await;
    db.drop_slot().await;
}

/// A table added to the connector after its first snapshot: its existing rows are read once from
/// a snapshot of their own, its later changes streamed once, and the other table is not read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_later_gets_its_own_snapshot() {
    let db = Db::new(
        "CREATE TABLE a (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE b (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 50) g;
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 70) g;",
    )
    .await;
    let cfg = db.config(&["a"]);
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let first = poll_all(&mut src).await;
    assert_eq!(first.len(), 50);
    assert!(first.iter().all(|e| e.source == "public.a"));
    src.ack(&first.last().unwrap().position).await.unwrap();
    src.close().await;
    // Changes while the connector is away, to the table it knows and the one it does not yet.
    db.client
        .batch_execute(
            "INSERT INTO a VALUES (51, 'a51'); UPDATE b SET name = 'changed' WHERE id = 1;",
        )
        .await
        .unwrap();

    let cfg = db.config(&["a", "b"]);
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let second = poll_all(&mut src).await;
    let count = |source: &str, op: Op| {
        second
            .iter()
            .filter(|e| e.source == source && e.op == op)
            .count()
    };
    assert_eq!(count("public.a", Op::Snapshot), 0, "a is not read again");
    assert_eq!(count("public.a", Op::Insert), 1);
    assert_eq!(
        count("public.b", Op::Snapshot),
        70,
        "b's existing rows, once"
    );
    assert_eq!(
        count("public.b", Op::Update),
        0,
        "the update is in b's snapshot"
    );
    let changed = second
        .iter()
        .find(|e| e.source == "public.b" && e.key.get("id") == Some(&Value::Int32(1)))
        .unwrap();
    assert_eq!(
        changed.after.as_ref().unwrap().get("name"),
        Some(&Value::Text("changed".into()))
    );
    src.ack(&second.last().unwrap().position).await.unwrap();
    // b is streamed from now on; a restart reads nothing again.
    db.client
        .batch_execute("INSERT INTO b VALUES (71, 'b71');")
        .await
        .unwrap();
    let third = poll_all(&mut src).await;
    assert_eq!(third.len(), 1, "{third:?}");
    assert_eq!(
        (third[0].source.as_str(), third[0].op),
        ("public.b", Op::Insert)
    );
    src.ack(&third[0].position).await.unwrap();
    src.close().await;
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    assert!(poll_all(&mut src).await.is_empty());
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_snapshot_resumes_without_emitting_completed_tables_again() {
    let db = Db::new(
        "CREATE TABLE a (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE b (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 100) g;
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 100) g;",
    )
    .await;
    let mut cfg = db.config(&["a", "b"]);
    cfg.snapshot_chunk_rows = 40;
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let mut first = Vec::new();
    while first
        .iter()
        .filter(|e: &&ChangeEvent| e.source == "public.b")
        .count()
        == 0
    {
        first.extend(src.poll(1000, WAIT).await.unwrap());
    }
    let last_a = first.iter().rev().find(|e| e.source == "public.a").unwrap();
    assert_eq!(first.iter().filter(|e| e.source == "public.a").count(), 100);
    src.ack(&last_a.position).await.unwrap();
    // Crash in the middle of table b.
    drop(src);
    // `status` shows how far b's snapshot is: the rows its recorded chunks read, of the
    // planner's estimate.
    db.client.batch_execute("ANALYZE b").await.unwrap();
    let progress = tributary::status::snapshot_progress(&db.client, &cfg)
        .await
        .unwrap();
    let b = progress.iter().find(|t| t.table == "public.b").unwrap();
    let b_read = first.iter().filter(|e| e.source == "public.b").count() as i64;
    assert_eq!(
        (b.done, b.rows_read, b.rows_estimated),
        (false, b_read, Some(100))
    );
    assert_eq!(b.percent, Some(b_read as f64));
    db.client
        .batch_execute("INSERT INTO a VALUES (101, 'a101'); INSERT INTO b VALUES (101, 'b101');")
        .await
        .unwrap();

    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let second = poll_all(&mut src).await;
    let a_snap = second
        .iter()
        .filter(|e| e.source == "public.a" && e.op == Op::Snapshot)
        .count();
    assert_eq!(
        a_snap, 0,
        "table a's snapshot was durable: not emitted again"
    );
    let b_snap = second
        .iter()
        .filter(|e| e.source == "public.b" && e.op == Op::Snapshot)
        .count();
    assert_eq!(
        b_snap, 101,
        "table b: its chunk handed out before the crash read again, then the rest (with the new row)"
    );
    // Nothing was acknowledged of b, so the chunk it handed out is read again at the same
    // positions: a sink that held it would skip it whole.
    let second_positions: std::collections::HashSet<_> =
        second.iter().map(|e| e.position.clone()).collect();
    let first_b: Vec<&ChangeEvent> = first.iter().filter(|e| e.source == "public.b").collect();
    assert!(!first_b.is_empty());
    assert!(
        first_b
            .iter()
            .all(|e| second_positions.contains(&e.position)),
        "b's first chunk is handed out again at its own positions"
    );
    let mut inserts: Vec<&str> = second
        .iter()
        .filter(|e| e.op == Op::Insert)
        .map(|e| e.source.as_str())
        .collect();
    inserts.sort();
    assert_eq!(
        inserts,
        vec!["public.a", "public.b"],
        "b resumes by key, so every change since the first snapshot is streamed for it"
    );
    // What a sink does: apply the first attempt, then the second, skipping what it holds.
    for table in ["a", "b"] {
        let source = format!("public.{table}");
        let mut state = Default::default();
        let firsts: Vec<ChangeEvent> = first
            .iter()
            .filter(|e| e.source == source)
            .cloned()
            .collect();
        let held = firsts.last().map(|e| e.position.clone());
        apply(&mut state, &firsts);
        let seconds: Vec<ChangeEvent> = second
            .iter()
            .filter(|e| e.source == source && held.as_ref().is_none_or(|h| e.position > *h))
            .cloned()
            .collect();
        apply(&mut state, &seconds);
        assert_eq!(state, table_state(&db.client, table).await, "{source}");
        let mut snapshot_keys: Vec<String> = firsts
            .iter()
            .chain(&seconds)
            .filter(|e| e.op == Op::Snapshot)
            .map(|e| e.key.json_text())
            .collect();
        let all = snapshot_keys.len();
        snapshot_keys.sort();
        snapshot_keys.dedup();
        assert_eq!(
            all,
            snapshot_keys.len(),
            "{source}: no key twice as snapshot"
        );
    }
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transaction_is_streamed_and_spilled_and_an_aborted_one_emits_nothing() {
    let db = Db::new("CREATE TABLE big (id int PRIMARY KEY, name text NOT NULL);").await;
    // Make the server stream any transaction past 1 MB of changes (protocol v2).
    let dbname = url::Url::parse(&db.url)
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_owned();
    db.admin
        .batch_execute(&format!(
            "ALTER DATABASE {dbname} SET logical_decoding_work_mem = '1MB'"
        ))
        .await
        .unwrap();
    let mut cfg = db.config(&["big"]);
    cfg.max_tx_memory_mb = 1;
    let spill = tempfile::tempdir().unwrap();
    cfg.spill_dir = Some(spill.path().to_owned());
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    assert!(src.poll(10, WAIT).await.unwrap().is_empty());
    db.client
        .batch_execute(
            "BEGIN; INSERT INTO big SELECT g, 'x' || g FROM generate_series(1, 50000) g; ROLLBACK;
             BEGIN;
             INSERT INTO big SELECT g, 'n' || g FROM generate_series(1, 100000) g;
             SAVEPOINT s; INSERT INTO big SELECT g, 'gone' FROM generate_series(100001, 120000) g;
             ROLLBACK TO SAVEPOINT s;
             INSERT INTO big SELECT g, 'n' || g FROM generate_series(100001, 200000) g;
             COMMIT;",
        )
        .await
        .unwrap();
    // While the server streams the transaction in, polls return nothing: wait for the commit.
    let mut evs = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while evs.len() < 200_000 && std::time::Instant::now() < deadline {
        evs.extend(src.poll(50_000, WAIT).await.unwrap());
    }
    evs.extend(poll_all(&mut src).await);
    if evs.len() != 200_000 {
        let ids: std::collections::BTreeSet<i32> = evs
            .iter()
            .filter_map(|e| match e.key.get("id") {
                Some(Value::Int32(i)) => Some(*i),
                _ => None,
            })
            .collect();
        let missing: Vec<i32> = (1..=200_000).filter(|i| !ids.contains(i)).take(5).collect();
        eprintln!(
            "missing {missing:?}; first {:?}",
            evs.first().map(|e| (&e.position, &e.key))
        );
    }
    assert_eq!(
        evs.len(),
        200_000,
        "the committed rows once; aborted ones never"
    );
    let commit = lsn_of(&evs[0].position).expect("a PostgreSQL position").0;
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(
            e.position,
            tributary::source::postgres::position(commit, i as u64)
        );
    }
    assert!(
        evs.iter()
            .all(|e| !matches!(int(e, "after", "name"), Some(Value::Text(ref s)) if s == "gone"))
    );
    let streamed: i64 = db
        .admin
        .query_one(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        streamed >= 1,
        "the server streamed the transaction in progress"
    );
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_resumes_with_no_gap_and_no_duplicate() {
    let db = Db::new("CREATE TABLE t (id int PRIMARY KEY, name text NOT NULL);").await;
    let mut src = PostgresSourceReader::connect(&db.config(&["t"]))
        .await
        .unwrap();
    assert!(src.poll(10, WAIT).await.unwrap().is_empty());
    db.client
        .batch_execute("INSERT INTO t SELECT g, 'r' || g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    let mut evs = poll_n(&mut src, 100).await;
    // The server side of the replication connection goes away.
    db.admin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot],
        )
        .await
        .unwrap();
    for i in 101..=200 {
        db.client
            .batch_execute(&format!("INSERT INTO t VALUES ({i}, 'r{i}')"))
            .await
            .unwrap();
    }
    evs.extend(poll_all(&mut src).await);
    assert_eq!(evs.len(), 200);
    no_duplicate_positions(&evs);
    let mut state = Default::default();
    apply(&mut state, &evs);
    assert_eq!(state, table_state(&db.client, "t").await);
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_publication_still_advances_the_slot() {
    let db = Db::new(
        "CREATE TABLE t (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE busy (id serial PRIMARY KEY, v text);",
    )
    .await;
    let mut src = PostgresSourceReader::connect(&db.config(&["t"]))
        .await
        .unwrap();
    assert!(src.poll(10, WAIT).await.unwrap().is_empty());
    let before = src.confirmed_flush().await.unwrap();
    db.client
        .batch_execute("INSERT INTO busy (v) SELECT 'x' FROM generate_series(1, 10000)")
        .await
        .unwrap();
    let wal: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let mut advanced = false;
    for _ in 0..50 {
        assert!(src.poll(10, WAIT).await.unwrap().is_empty());
        let now = src.confirmed_flush().await.unwrap();
        if now > before && now.0 >= lsn(&wal) {
            advanced = true;
            break;
        }
    }
    assert!(
        advanced,
        "confirmed_flush_lsn must move past WAL written to unpublished tables"
    );
    src.close().await;
    db.drop_slot().await;
}

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_stops_with_a_recovery_hint_or_is_recreated() {
    let db = Db::new(
        "CREATE TABLE t (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO t VALUES (1, 'one');",
    )
    .await;
    let mut cfg = db.config(&["t"]);
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let evs = poll_all(&mut src).await;
    assert_eq!(evs.len(), 1);
    src.close().await;
    db.drop_only_slot().await;
    let err = PostgresSourceReader::connect(&cfg)
        .await
        .err()
        .expect("a dropped slot is an error");
    let msg = err.to_string();
    assert!(
        msg.contains("dropped") && msg.contains("on_slot_lost"),
        "{msg}"
    );
    cfg.on_slot_lost = tributary::config::SlotLostPolicy::Recreate;
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let again = poll_all(&mut src).await;
    assert_eq!(again.len(), 1, "recreate takes a new snapshot");
    assert_eq!(again[0].op, Op::Snapshot);
    src.close().await;
    db.drop_slot().await;
}

async fn snapshot_done(db: &Db) -> bool {
    db.client
        .query_one(
            "SELECT done FROM public.tributary_snapshot_state WHERE slot = $1",
            &[&db.slot],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_table_is_written_while_idle_and_never_emitted() {
    let db = Db::new("CREATE TABLE t (id int PRIMARY KEY, name text NOT NULL);").await;
    let mut cfg = db.config(&["t"]);
    cfg.heartbeat_table = Some("public.trib_heartbeat".into());
    cfg.heartbeat_interval_s = 1;
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    // Tributary created the table and added it to the publication.
    let published: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'trib pub' AND tablename = 'trib_heartbeat'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1);
    let before = src.confirmed_flush().await.unwrap();
    let mut evs = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(4);
    while std::time::Instant::now() < deadline {
        evs.extend(src.poll(100, WAIT).await.unwrap());
    }
    assert!(evs.is_empty(), "heartbeats are not events: {evs:?}");
    let beats: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM public.trib_heartbeat WHERE ts > now() - interval '3 seconds'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        beats, 1,
        "the heartbeat row is refreshed every heartbeat_interval_s"
    );
    assert!(
        src.confirmed_flush().await.unwrap() > before,
        "heartbeats move the slot"
    );
    src.close().await;
    db.drop_slot().await;
}

/// A database whose encoding (SQL_ASCII) stores text bytes unchecked: legacy data in Latin-1 sits
/// beside UTF-8 there, and the bytes that are not UTF-8 have no `Value`.
async fn sql_ascii_db(setup: &str) -> Db {
    Db::with_options("TEMPLATE template0 ENCODING 'SQL_ASCII' LOCALE 'C'", setup).await
}

/// Dead letters to a JSONL file in `dir`, and the file.
fn jsonl_dead_letters(dir: &std::path::Path) -> (DeadLetters, std::path::PathBuf) {
    let path = dir.join("dead.jsonl");
    let config = tributary::config::DeadLetterConfig {
        topic: None,
        path: Some(path.clone()),
    };
    let writer =
        tributary::dead_letter::DeadLetterWriter::open(&config, &Default::default()).unwrap();
    (DeadLetters::from_writer(writer, "file"), path)
}

fn read_letters(path: &std::path::Path) -> Vec<DeadLetter> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn raw_of(letter: &DeadLetter) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(&letter.raw_base64)
        .unwrap()
}

fn ordinal(p: &Position) -> u64 {
    match lsn_of(p) {
        Some((_, ordinal)) => ordinal,
        None => panic!("not an LSN position: {p:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rows_that_cannot_be_decoded_are_dead_lettered_and_passed() {
    // Row 2 holds Latin-1 bytes (not UTF-8); so does row 4, the table's last row, whose position
    // no acknowledgement covers: the source must pass it itself. 'infinity' has no chrono value
    // but is kept as its text, not dead-lettered.
    let db = sql_ascii_db(
        "CREATE TABLE notes (id int PRIMARY KEY, body text, at timestamptz);
         INSERT INTO notes VALUES (1, 'good', '2024-01-02 03:04:05+00'),
                                  (2, E'caf\\351', 'infinity'),
                                  (3, 'caf\u{e9} in UTF-8', 'infinity'),
                                  (4, E'\\377\\tend', NULL);",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (dead_letters, dlq) = jsonl_dead_letters(dir.path());
    let cfg = db.config(&["notes"]);
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    src.set_dead_letters(dead_letters.clone());
    let evs = poll_n(&mut src, 2).await;
    let ids: Vec<_> = evs.iter().map(|e| int(e, "after", "id")).collect();
    assert_eq!(ids, vec![Some(Value::Int32(1)), Some(Value::Int32(3))]);
    assert_eq!(
        int(&evs[1], "after", "body"),
        Some(Value::Text("caf\u{e9} in UTF-8".into()))
    );
    assert_eq!(
        int(&evs[1], "after", "at"),
        Some(Value::Text("infinity".into()))
    );
    let letters = read_letters(&dlq);
    assert_eq!(letters.len(), 2, "{letters:?}");
    let (two, four) = (&letters[0], &letters[1]);
    assert_eq!(two.source, "public.notes");
    assert_eq!(two.key.as_deref(), Some(r#"{"id":2}"#));
    assert_eq!(raw_of(two), b"2\tcaf\xe9\tinfinity");
    for needle in [
        "public.notes",
        "column body (text)",
        "not valid UTF-8",
        "0xe9",
    ] {
        assert!(two.error.contains(needle), "{needle:?} in {}", two.error);
    }
    assert_eq!(raw_of(four), b"4\t\xff\\tend\t\\N");
    // Each row keeps its own position, in key order (the chunk's last event at its end).
    let ords = [
        ordinal(&evs[0].position),
        ordinal(&two.position),
        ordinal(&four.position),
        ordinal(&evs[1].position),
    ];
    assert!(ords.windows(2).all(|w| w[0] < w[1]), "{ords:?}");
    assert_eq!(ordinal(&evs[0].position) + 1, ordinal(&two.position));

    // Acknowledging the last event finishes the table: the dead letter after it is passed.
    assert!(src.poll(10, WAIT).await.unwrap().is_empty());
    src.ack(&evs[1].position).await.unwrap();
    assert!(src.poll(10, WAIT).await.unwrap().is_empty());
    assert!(snapshot_done(&db).await);
    // The stream goes on, and its acknowledgement moves the slot.
    let flushed = src.confirmed_flush().await.unwrap();
    db.client
        .batch_execute("INSERT INTO notes VALUES (5, 'streamed', now())")
        .await
        .unwrap();
    let streamed = poll_n(&mut src, 1).await;
    assert_eq!(streamed.len(), 1);
    src.ack(&streamed[0].position).await.unwrap();
    let mut moved = false;
    for _ in 0..50 {
        assert!(src.poll(10, WAIT).await.unwrap().is_empty());
        if src.confirmed_flush().await.unwrap() > flushed {
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "confirmed_flush_lsn must move past the acknowledged change"
    );
    src.close().await;

    // A restart reads neither the snapshot nor the change again, nor writes a letter twice.
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    src.set_dead_letters(dead_letters);
    assert_eq!(poll_all(&mut src).await.len(), 0);
    assert_eq!(read_letters(&dlq).len(), 2);
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_row_that_cannot_be_decoded_stops_a_reader_with_nowhere_to_put_it() {
    let db = sql_ascii_db(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         INSERT INTO notes VALUES (1, 'good'), (2, E'caf\\351');",
    )
    .await;
    let mut src = PostgresSourceReader::connect(&db.config(&["notes"]))
        .await
        .unwrap();
    let err = src.poll(10, WAIT).await.expect_err("nowhere to put it");
    assert!(
        err.to_string().contains("nowhere") && err.to_string().contains("public.notes"),
        "{err}"
    );
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_server_cannot_send_stops_the_reader_instead_of_reconnecting_forever() {
    let db = sql_ascii_db("CREATE TABLE notes (id int PRIMARY KEY, body text);").await;
    let mut src = PostgresSourceReader::connect(&db.config(&["notes"]))
        .await
        .unwrap();
    assert!(src.poll(10, WAIT).await.unwrap().is_empty());
    db.client
        .batch_execute("INSERT INTO notes VALUES (1, 'good')")
        .await
        .unwrap();
    let good = poll_n(&mut src, 1).await;
    assert_eq!(good.len(), 1);
    src.ack(&good[0].position).await.unwrap();
    // The walsender fails to convert this row to the replication connection's UTF-8, at every
    // attempt: the reader must stop and say why and what to do.
    db.client
        .batch_execute("INSERT INTO notes VALUES (2, E'caf\\351')")
        .await
        .unwrap();
    let mut failed = None;
    for _ in 0..100 {
        match src.poll(10, WAIT).await {
            Ok(evs) => assert!(evs.is_empty(), "{evs:?}"),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let err = failed.expect("the reader must stop").to_string();
    for needle in [
        "invalid byte sequence",
        "SQL_ASCII",
        "pg_replication_slot_advance",
        "after LSN",
        &db.slot,
    ] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    src.close().await;
    db.drop_slot().await;
}

/// The snapshot reads a table in its key's own order (9 before 10), not in the order of the key
/// selected as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_reads_numeric_keys_in_numeric_order() {
    let db = Db::new(
        "CREATE TABLE n (id bigint PRIMARY KEY, note text);
         INSERT INTO n SELECT g, 'n' || g FROM generate_series(1, 120) g;",
    )
    .await;
    let mut cfg = db.config(&["n"]);
    cfg.snapshot_chunk_rows = 7;
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    let evs = poll_n(&mut src, 120).await;
    let ids: Vec<Option<Value>> = evs.iter().map(|e| int(e, "after", "id")).collect();
    let expected: Vec<Option<Value>> = (1..=120).map(|i| Some(Value::Int64(i))).collect();
    assert_eq!(ids, expected);
    assert!(evs.iter().all(|e| e.op == Op::Snapshot));
    src.close().await;
    db.drop_slot().await;
}
