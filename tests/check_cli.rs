//! `tributary check`: one line per service, non-zero exit when anything fails, secrets redacted.

mod common;

use std::process::Command;

use common::env;

fn write_config(dir: &std::path::Path, pg_url: &str, brokers: &str) -> std::path::PathBuf {
    let path = dir.join("c.toml");
    let text = format!(
        r#"
name = "check-test"
[sources.postgres]
url = "{pg_url}"
publication = "p"
slot = "s"
tables = ["orders"]
[sources.kafka]
brokers = "{brokers}"
group_id = "g"
[[sources.kafka.topics]]
name = "orders"
[sinks.delta]
uri = "lake"
[sinks.pgvector.tables]
orders = "kafka_orders"
[sinks.pgvector]
url = "{pg_url}"
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn check(config: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["check", "--timeout", "5", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn all_services_reachable_exits_zero_with_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &env("TRIBUTARY_PG_URL"),
        &env("TRIBUTARY_KAFKA_BROKERS"),
    );
    let (code, stdout, stderr) = check(&cfg);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for service in [
        "config",
        "postgres source",
        "kafka source",
        "delta sink",
        "pgvector sink",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(service)),
            "no ok line for {service}:\n{stdout}"
        );
    }
    assert!(stdout.contains("wal_level=logical"), "{stdout}");
    // The services' password ("postgres") never shows: the URL is printed redacted.
    assert!(stdout.contains("postgres:***@"), "{stdout}");
    assert!(!stdout.contains("postgres:postgres@"), "{stdout}");
}

#[test]
fn an_unreachable_service_fails_with_its_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    // A closed loopback port: the postgres probe must fail, the others still pass.
    let pg = "postgres://postgres:hunter2-secret@127.0.0.1:1/postgres";
    let cfg = write_config(dir.path(), pg, &env("TRIBUTARY_KAFKA_BROKERS"));
    let (code, stdout, stderr) = check(&cfg);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let fail: Vec<_> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fail.len(), 2, "{stdout}");
    assert!(
        fail.iter()
            .any(|l| l.contains("postgres source") && l.contains("cannot connect"))
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("kafka source")),
        "{stdout}"
    );
    assert!(!format!("{stdout}{stderr}").contains("hunter2-secret"));
}

#[test]
fn a_bad_config_exits_two_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &env("TRIBUTARY_PG_URL"), "b:1");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("uri = \"lake\"", "uri = \"ftp://x/y\"");
    std::fs::write(&cfg, text).unwrap();
    let (code, stdout, stderr) = check(&cfg);
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("sinks.delta.uri: unsupported scheme \"ftp\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn status_json_reports_what_the_pgvector_sink_holds() {
    use tributary::event::{ChangeEvent, Lsn, Op, Value};
    let schema = common::unique("st");
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write_config(
        dir.path(),
        &env("TRIBUTARY_PG_URL"),
        &env("TRIBUTARY_KAFKA_BROKERS"),
    );
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let text = format!("{text}schema = \"{schema}\"\ndimension = 2\n");
    std::fs::write(&cfg_path, &text).unwrap();
    let config = tributary::config::Config::load(&cfg_path).unwrap();
    let mut sink =
        tributary::sink::pgvector::PgvectorSink::connect(config.sinks.pgvector.clone().unwrap())
            .await
            .unwrap();
    let position = tributary::source::postgres::position(Lsn(0x1_0000_0010), 3);
    let event = ChangeEvent {
        source: "public.orders".into(),
        op: Op::Insert,
        key: [("id", Value::Int32(1))].into_iter().collect(),
        before: None,
        after: Some([("id", Value::Int32(1))].into_iter().collect()),
        schema_version: 1,
        position: position.clone(),
        source_ts: None,
        embedding: Some(vec![1.0, 0.0]),
        text_hash: None,
        chunks: None,
        schema: None,
        origin: None,
    };
    sink.write(std::slice::from_ref(&event)).await.unwrap();
    let mut bronze =
        tributary::sink::delta::DeltaSink::new(&config.name, config.sinks.delta.as_ref().unwrap())
            .unwrap();
    bronze.write("public.orders", &[event]).await.unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["status", "--json", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tables = v["pgvector"]["ok"].as_array().unwrap();
    let orders = tables
        .iter()
        .find(|t| t["source"] == "public.orders")
        .unwrap();
    assert_eq!(orders["rows"], 1);
    assert_eq!(
        orders["positions"][0],
        serde_json::to_value(&position).unwrap()
    );
    let bronze = v["bronze"]["ok"].as_array().unwrap();
    let orders_bronze = bronze
        .iter()
        .find(|t| t["table"] == "public.orders")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(orders_bronze["rows"], 1, "{v}");
    assert!(orders_bronze["version"].as_u64().unwrap() >= 1, "{v}");
    assert!(orders_bronze["last_commit"].is_string(), "{v}");
    let kafka_orders = tables.iter().find(|t| t["source"] == "orders").unwrap();
    assert_eq!(kafka_orders["exists"], false);
    assert!(v["postgres"]["ok"]["exists"] == false, "{v}");
    assert!(v["kafka"]["ok"].as_array().unwrap().len() >= 3, "{v}");
}

/// `tributary compact` rewrites a table's small files into one (rows unchanged), names a table
/// that does not exist, and `vacuum` runs over the same tables.
#[tokio::test]
async fn compact_rewrites_small_files_and_vacuum_follows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write_config(dir.path(), &env("TRIBUTARY_PG_URL"), "b:1");
    let config = tributary::config::Config::load(&cfg_path).unwrap();
    let mut bronze =
        tributary::sink::delta::DeltaSink::new(&config.name, config.sinks.delta.as_ref().unwrap())
            .unwrap();
    for i in 0..5 {
        let event = common::insert_event(i, 100 + i as u64, 0);
        bronze.write("public.orders", &[event]).await.unwrap();
    }
    assert_eq!(bronze.summary("public.orders").await.unwrap().files, 5);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
            .args(args)
            .arg("--config")
            .arg(&cfg_path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["compact"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("ok    public.orders: 5 files rewritten into 1 ("),
        "{stdout}"
    );
    let after = bronze.summary("public.orders").await.unwrap();
    assert_eq!((after.files, after.rows), (1, 5));
    let (code, _, stderr) = run(&["compact", "--table", "public.nope"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("no Bronze table \"public.nope\""),
        "{stderr}"
    );
    let (code, stdout, stderr) = run(&["vacuum"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("ok    public.orders: 0 files removed"),
        "{stdout}"
    );
}
