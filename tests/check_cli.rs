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
