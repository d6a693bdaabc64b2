//! Shared test harness: where the services are, fresh names, connections.
#![allow(dead_code)]

pub mod kafka;
pub mod run;
pub mod vectors;

/// An environment variable the services script exports; a clear panic when it is missing.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with scripts/test, or first \
             `scripts/services up && eval \"$(scripts/services env)\"`"
        )
    })
}

/// A fresh lowercase identifier, unique per call, usable as a database/topic/slot/path name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// The services' PostgreSQL URL pointed at another database.
pub fn pg_url_for_db(db: &str) -> String {
    let mut url = url::Url::parse(&env("TRIBUTARY_PG_URL")).unwrap();
    url.set_path(db);
    url.to_string()
}

pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL: {e}"));
    tokio::spawn(conn);
    client
}

/// (rows, distinct positions) of a Bronze table, read by Python `deltalake`.
pub fn bronze_positions(table: &std::path::Path) -> (u64, u64) {
    let script = r#"
import json, os, sys
from deltalake import DeltaTable
t = DeltaTable(sys.argv[1]).to_pyarrow_table()
pos = set(zip(t.column("_position_major").to_pylist(), t.column("_position_minor").to_pylist()))
print(json.dumps([t.num_rows, len(pos)]))
sys.stdout.flush()
os._exit(0)  # deltalake's runtime threads can abort the interpreter at exit
"#;
    serde_json::from_value(python_json(script, table)).unwrap()
}

/// Every row of a Delta table as a JSON object, read by Python `deltalake` (timestamps as text).
pub fn delta_rows(table: &std::path::Path) -> Vec<serde_json::Value> {
    let script = r#"
import json, os, sys
from deltalake import DeltaTable
print(json.dumps(DeltaTable(sys.argv[1]).to_pyarrow_table().to_pylist(), default=str))
sys.stdout.flush()
os._exit(0)  # deltalake's runtime threads can abort the interpreter at exit
"#;
    serde_json::from_value(python_json(script, table)).unwrap()
}

/// What the Python `script` (run by the services' interpreter with `arg` as `sys.argv[1]`)
/// prints as JSON; its stderr in the panic when it fails.
pub fn python_json(script: &str, arg: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(env("TRIBUTARY_PYTHON"))
        .arg("-c")
        .arg(script)
        .arg(arg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A database of its own for a PostgreSQL source under test: `(name, url, client)`, after
/// running `setup` in it.
pub async fn create_source_db(
    admin: &tokio_postgres::Client,
    prefix: &str,
    setup: &str,
) -> (String, String, tokio_postgres::Client) {
    create_source_db_with(admin, prefix, "", setup).await
}

/// [`create_source_db`] for a database created `WITH` `options` (e.g. another encoding).
pub async fn create_source_db_with(
    admin: &tokio_postgres::Client,
    prefix: &str,
    options: &str,
    setup: &str,
) -> (String, String, tokio_postgres::Client) {
    let name = unique(prefix);
    admin
        .batch_execute(&format!("CREATE DATABASE {name} {options}"))
        .await
        .unwrap();
    let url = pg_url_for_db(&name);
    let client = pg_connect(&url).await;
    client.batch_execute(setup).await.unwrap();
    (name, url, client)
}

/// Drops a test's slot (waiting for a just-stopped walsender to let go of it) and its database.
pub async fn drop_source_db(admin: &tokio_postgres::Client, name: &str, slot: &str) {
    for _ in 0..50 {
        if admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// An insert of the one-column row `{id}` into `public.orders` at (commit LSN, ordinal), as the
/// PostgreSQL source emits it (no embedding, no declared schema).
pub fn insert_event(id: i64, commit: u64, ordinal: u64) -> tributary::event::ChangeEvent {
    use tributary::event::{ChangeEvent, Lsn, Op, Row, Value};
    let row: Row = [("id", Value::Int64(id))].into_iter().collect();
    ChangeEvent {
        source: "public.orders".into(),
        op: Op::Insert,
        key: row.clone(),
        before: None,
        after: Some(row),
        schema_version: 1,
        position: tributary::source::postgres::position(Lsn(commit), ordinal),
        source_ts: None,
        embedding: None,
        text_hash: None,
        chunks: None,
        schema: None,
        origin: None,
    }
}
