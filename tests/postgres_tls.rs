//! PostgreSQL over TLS against the services' `pgtls` server: `ssl=on`, a `hostssl`-only pg_hba
//! with scram-sha-256 and a certificate signed by a CA the services script made. Each test has
//! its own database or schema (UUID names). The password must never show in an error.

mod common;

use std::path::Path;
use std::process::Command;

use common::{env, unique};
use tributary::config::{Config, PostgresSourceConfig};
use tributary::event::{ChangeEvent, Lsn, Op, Row, Value};
use tributary::pg::Target;
use tributary::secret::ConnString;
use tributary::sink::pgvector::PgvectorSink;
use tributary::source::postgres::PostgresSourceReader;

const WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// The TLS server's URL (verify-full against the services' CA) with `db` as its database.
fn url_for_db(db: &str) -> String {
    env("TRIBUTARY_PGTLS_URL").replacen("/postgres?", &format!("/{db}?"), 1)
}

/// The TLS server's URL without its query, plus `query`.
fn url_with(query: &str) -> String {
    let url = env("TRIBUTARY_PGTLS_URL");
    let base = url.split_once('?').map_or(url.as_str(), |(b, _)| b);
    format!("{base}?{query}")
}

async fn connect(url: &str) -> tokio_postgres::Client {
    Target::parse(url)
        .unwrap()
        .open(|_| {})
        .await
        .unwrap_or_else(|e| panic!("cannot connect over TLS: {}", tributary::pg::error_text(&e)))
}

/// `(ssl, version)` of the connection's own backend, as the server reports it.
async fn own_tls(client: &tokio_postgres::Client) -> (bool, Option<String>) {
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

fn assert_no_password(text: &str) {
    let pw = env("TRIBUTARY_PGTLS_PASSWORD");
    assert!(!text.contains(&pw), "the password leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_snapshot_and_stream_over_verify_full() {
    let admin = connect(&env("TRIBUTARY_PGTLS_URL")).await;
    let db = unique("tls_src");
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = url_for_db(&db);
    let client = connect(&url).await;
    client
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, note text);
             INSERT INTO orders SELECT g, 'row ' || g FROM generate_series(1, 20) g;",
        )
        .await
        .unwrap();
    let slot = unique("tls_slot");
    let cfg =
        PostgresSourceConfig::new(ConnString::new(url.clone()), "tls_pub", &slot, &["orders"]);
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();

    let mut events: Vec<ChangeEvent> = Vec::new();
    let mut inserted = false;
    for _ in 0..200 {
        events.extend(src.poll(10_000, WAIT).await.unwrap());
        let snapshot = events.iter().filter(|e| e.op == Op::Snapshot).count();
        if snapshot == 20 && !inserted {
            client
                .batch_execute(
                    "INSERT INTO orders VALUES (21, 'streamed');
                     UPDATE orders SET note = 'changed' WHERE id = 1;
                     DELETE FROM orders WHERE id = 2;",
                )
                .await
                .unwrap();
            inserted = true;
        }
        if events.iter().filter(|e| e.op != Op::Snapshot).count() >= 3 {
            break;
        }
    }
    let count = |op: Op| events.iter().filter(|e| e.op == op).count();
    assert_eq!(count(Op::Snapshot), 20, "{events:?}");
    assert_eq!(
        (count(Op::Insert), count(Op::Update), count(Op::Delete)),
        (1, 1, 1),
        "{events:?}"
    );
    let streamed = events.iter().find(|e| e.op == Op::Insert).unwrap();
    assert_eq!(
        streamed.after.as_ref().and_then(|r| r.get("note")).cloned(),
        Some(Value::Text("streamed".into()))
    );

    // The replication connection (pg_walstream) is TLS too, with the same settings.
    let repl_tls: Vec<bool> = admin
        .query(
            "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)
             JOIN pg_replication_slots sl ON sl.active_pid = r.pid WHERE sl.slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(repl_tls, vec![true]);

    drop(src);
    drop(client);
    for _ in 0..100 {
        let gone = admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok();
        if gone {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

fn sink_config(url: &str, schema: &str) -> tributary::config::PgvectorSinkConfig {
    let text = format!(
        r#"
name = "t"
[sources.kafka]
brokers = "x:1"
group_id = "g"
[[sources.kafka.topics]]
name = "orders"
[sinks.pgvector]
url = "{url}"
schema = "{schema}"
dimension = 2
"#
    );
    Config::parse(&text, Path::new("."), |_| None)
        .unwrap()
        .sinks
        .pgvector
        .unwrap()
}

fn item(id: i32, note: &str, lsn: u64) -> ChangeEvent {
    let key: Row = [("id", Value::Int32(id))].into_iter().collect();
    let after: Row = [("id", Value::Int32(id)), ("note", Value::Text(note.into()))]
        .into_iter()
        .collect();
    ChangeEvent {
        source: "public.items".into(),
        op: Op::Insert,
        key,
        before: None,
        after: Some(after),
        schema_version: 1,
        position: tributary::source::postgres::position(Lsn(lsn), 0),
        source_ts: None,
        embedding: Some(vec![1.0, 0.0]),
        text_hash: Some(note.len() as u64),
        chunks: None,
        schema: None,
        origin: None,
    }
}

#[tokio::test]
async fn pgvector_sink_over_verify_full() {
    let schema = unique("tls_pgv");
    let mut sink = PgvectorSink::connect(sink_config(&env("TRIBUTARY_PGTLS_URL"), &schema))
        .await
        .unwrap();
    let out = sink
        .write(&[item(1, "one", 100), item(2, "two", 101)])
        .await
        .unwrap();
    assert_eq!(out.applied, 2);
    let client = connect(&env("TRIBUTARY_PGTLS_URL")).await;
    let rows: Vec<(i32, String)> = client
        .query(
            &format!("SELECT id, payload->>'note' FROM \"{schema}\".items ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(1, "one".into()), (2, "two".into())]);
    // The sink's own session is TLS.
    let sink_tls: Vec<bool> = client
        .query(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = 'tributary-pgvector'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !sink_tls.is_empty() && sink_tls.iter().all(|s| *s),
        "{sink_tls:?}"
    );
    client
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_naming_the_host_and_the_certificate_problem() {
    let wrong = env("TRIBUTARY_PGTLS_WRONG_CA");
    let url = url_with(&format!("sslmode=verify-full&sslrootcert={wrong}"));

    // pgvector sink
    let err = PgvectorSink::connect(sink_config(&url, &unique("tls_bad")))
        .await
        .expect_err("a certificate from another CA must be refused")
        .to_string();
    assert!(err.contains("localhost:"), "names the host: {err}");
    assert!(
        err.contains("not signed by a CA in sslrootcert") && err.contains(&wrong),
        "says what is wrong with the certificate: {err}"
    );
    assert_no_password(&err);

    // PostgreSQL source: a configuration error (no retry can fix it), same words.
    let cfg = PostgresSourceConfig::new(ConnString::new(url), "p", "s", &["orders"]);
    let err = PostgresSourceReader::connect(&cfg).await.err().unwrap();
    use tributary::error::{Classify, ErrorKind};
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let err = err.to_string();
    assert!(
        err.contains("localhost:") && err.contains("not signed by a CA in sslrootcert"),
        "{err}"
    );
    assert_no_password(&err);
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let ca = env("TRIBUTARY_PGTLS_CA");
    let pw = env("TRIBUTARY_PGTLS_PASSWORD");
    let port = env("TRIBUTARY_PGTLS_PORT");
    // Connect to 127.0.0.1 under a name the certificate does not carry.
    let kv = |mode: &str| {
        format!(
            "host=db.invalid hostaddr=127.0.0.1 port={port} user=tributary_tls password={pw} \
             dbname=postgres sslmode={mode} sslrootcert={ca}"
        )
    };
    let e = Target::parse(&kv("verify-full"))
        .unwrap()
        .open(|_| {})
        .await
        .expect_err("verify-full must refuse a certificate for another name");
    let text = tributary::pg::error_text(&e);
    assert!(text.contains("does not name this host"), "{text}");
    assert_no_password(&text);
    let client = connect(&kv("verify-ca")).await;
    assert!(own_tls(&client).await.0);
    // The IP address is in the certificate too.
    let ip = url_with(&format!("sslmode=verify-full&sslrootcert={ca}"))
        .replace("@localhost:", "@127.0.0.1:");
    assert!(own_tls(&connect(&ip).await).await.0);
}

#[tokio::test]
async fn sslmode_disable_is_refused_by_the_server_and_reported_clearly() {
    let url = url_with("sslmode=disable");
    let err = PgvectorSink::connect(sink_config(&url, &unique("tls_plain")))
        .await
        .expect_err("the server takes only TLS")
        .to_string();
    assert!(err.contains("no pg_hba.conf entry"), "{err}");
    assert!(err.contains("no encryption"), "{err}");
    assert!(
        err.contains("accepts only TLS connections") && err.contains("sslmode=require"),
        "{err}"
    );
    assert_no_password(&err);
}

#[tokio::test]
async fn every_weaker_mode_ends_up_encrypted_against_a_tls_only_server() {
    let ca = env("TRIBUTARY_PGTLS_CA");
    // allow tries plaintext first and falls back to TLS when the server refuses it.
    for query in [
        "sslmode=allow".to_owned(),
        "sslmode=prefer".to_owned(),
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslrootcert={ca}&sslmode=require&channel_binding=require"),
    ] {
        let client = connect(&url_with(&query)).await;
        let (ssl, version) = own_tls(&client).await;
        assert!(ssl, "{query}");
        assert!(version.is_some_and(|v| v.starts_with("TLSv1.")), "{query}");
    }
}

fn write_check_config(dir: &Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("c.toml");
    let text = format!(
        r#"
name = "tls-check"
[sources.postgres]
url = "{url}"
publication = "p"
slot = "s"
tables = ["orders"]
[sinks.pgvector]
url = "{url}"
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_prints_the_negotiated_tls_version() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_check_config(dir.path(), &env("TRIBUTARY_PGTLS_URL"));
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["check", "--timeout", "10", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for service in ["postgres source", "pgvector sink"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(service) && l.contains("TLS TLSv1.3")),
            "no ok line with the TLS version for {service}:\n{stdout}\n{stderr}"
        );
    }
    assert_no_password(&format!("{stdout}{stderr}"));

    // A wrong CA: the probe fails with the certificate problem, the password redacted.
    let url = url_with(&format!(
        "sslmode=verify-full&sslrootcert={}",
        env("TRIBUTARY_PGTLS_WRONG_CA")
    ));
    let cfg = write_check_config(dir.path(), &url);
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["check", "--timeout", "10", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("not signed by a CA in sslrootcert")),
        "{stdout}"
    );
    assert_no_password(&stdout);
}
