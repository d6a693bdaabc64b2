//! PostgreSQL source against the services' real PostgreSQL: each test has its own database and
//! slot (UUID names), and drops the slot at the end.

mod common;

use tributary::config::PostgresSource;
use tributary::event::{ChangeEvent, Op, Position, Value};
use tributary::secret::ConnString;
use tributary::source::postgres::PostgresSourceReader;

const WAIT: std::time::Duration = std::time::Duration::from_millis(200);

struct Db {
    admin: tokio_postgres::Client,
    client: tokio_postgres::Client,
    url: String,
    slot: String,
}

impl Db {
    async fn new(setup: &str) -> Db {
        let admin = common::pg_connect(&common::env("TRIBUTARY_PG_URL")).await;
        let name = common::unique("pgsrc");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
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

    fn config(&self, tables: &[&str]) -> PostgresSource {
        PostgresSource::new(ConnString::new(self.url.clone()), "trib pub", &self.slot, tables)
    }

    /// Drops the slot (it holds WAL on the shared server) and the database.
    async fn drop_slot(&self) {
        // The walsender of a reader just dropped may take a moment to exit.
        for _ in 0..100 {
            let gone = self
                .admin
                .query_one(
                    "SELECT count(*) = 0 FROM pg_replication_slots WHERE slot_name = $1 \
                     AND (active OR pg_drop_replication_slot(slot_name) IS NOT NULL)",
                    &[&self.slot],
                )
                .await
                .unwrap()
                .get::<_, bool>(0);
            if gone {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
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

#[tokio::test]
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
    match (pos[0], pos[1]) {
        (
            Position::Lsn {
                commit_lsn: a,
                tx_ordinal: 0,
            },
            Position::Lsn {
                commit_lsn: b,
                tx_ordinal: 1,
            },
        ) => assert_eq!(a, b),
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

#[tokio::test]
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
            >= match evs[1].position {
                Position::Lsn { commit_lsn, .. } => commit_lsn,
                _ => unreachable!(),
            }
    );
    src.close().await;
    db.drop_slot().await;
}

#[tokio::test]
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

#[tokio::test]
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
    assert_eq!(
        int(&evs[1], "after", "added"),
        Some(Value::Json(serde_json::json!({"k": [1]})))
    );
    assert!(evs[1].schema_version > evs[0].schema_version);
    src.close().await;
    db.drop_slot().await;
}
