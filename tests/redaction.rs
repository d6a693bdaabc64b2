//! Secrets never reach the output: each is fed through a failing configuration on `check`,
//! `status` and `run` (at debug level), and all they print, stdout and stderr, is searched for
//! it. Each case also checks that the failure under test really happened (its marker shows).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{env, unique};

/// A secret no other text contains: `tag` and a random suffix.
fn secret(tag: &str) -> String {
    format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A TOML basic string holding `s` (JSON's escapes are TOML's).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A connector reading topic `orders` with `[sources.kafka]` (given as TOML lines) into a
/// local Bronze table.
fn kafka_config(dir: &Path, kafka: &str) -> PathBuf {
    kafka_topic_config(dir, kafka, "orders")
}

fn kafka_topic_config(dir: &Path, kafka: &str, topic: &str) -> PathBuf {
    let path = dir.join(format!("{}.toml", unique("c")));
    let text = format!(
        r#"
name = "redaction-test"
[sources.kafka]
group_id = "{group}"
dead_letter = {{ path = "{dlq}" }}
{kafka}
[[sources.kafka.topics]]
name = "{topic}"
[sinks.delta]
uri = "{lake}"
[telemetry]
listen = ""
"#,
        group = unique("g"),
        dlq = dir.join("dlq.jsonl").display(),
        lake = dir.join("lake").display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A connector from PostgreSQL `source_url` into pgvector at `sink_url`.
fn postgres_config(dir: &Path, source_url: &str, sink_url: &str) -> PathBuf {
    let path = dir.join(format!("{}.toml", unique("c")));
    let text = format!(
        r#"
name = "redaction-test"
[sources.postgres]
url = {source}
publication = "p"
slot = "{slot}"
tables = ["orders"]
[sinks.pgvector]
url = {sink}
[sinks.pgvector.tables]
"public.orders" = "orders"
[telemetry]
listen = ""
"#,
        source = toml_str(source_url),
        sink = toml_str(sink_url),
        slot = unique("s"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// What each command printed, stdout and stderr together: `check`, `status`, `run`, and, with
/// `json`, `run --log-format json`. A `run` that does not stop by itself is sent SIGTERM once
/// `marker` shows in its output (or after 20 s).
fn every_command(config: &Path, marker: &str, json: bool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for command in ["check", "status"] {
        let o = Command::new(env!("CARGO_BIN_EXE_tributary"))
            .args([command, "--timeout", "5", "--config"])
            .arg(config)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        out.push((command.to_owned(), text));
    }
    out.push(("run".to_owned(), run(config, &[], marker)));
    if json {
        out.push((
            "run --log-format json".to_owned(),
            run(config, &["--log-format", "json"], marker),
        ));
    }
    out
}

fn run(config: &Path, args: &[&str], marker: &str) -> String {
    let log_path = config.with_file_name(format!("{}.log", unique("run")));
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("run")
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut running = common::run::Running(child);
    let started = Instant::now();
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    while running.0.try_wait().unwrap().is_none() {
        if read().contains(marker) || started.elapsed() > Duration::from_secs(20) {
            // It may have exited meanwhile: then `kill` fails, which is fine.
            let _ = Command::new("kill")
                .args(["-TERM", &running.0.id().to_string()])
                .status();
            let stopping = Instant::now();
            while running.0.try_wait().unwrap().is_none() {
                assert!(
                    stopping.elapsed() < Duration::from_secs(30),
                    "run did not stop within 30 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    read()
}

/// Every output shows `marker` (the failure happened) and none shows any of `secrets`.
fn assert_failed_without_showing(outputs: &[(String, String)], marker: &str, secrets: &[&str]) {
    for (command, text) in outputs {
        assert!(
            text.contains(marker),
            "{command}: no {marker:?}, so the failure under test did not happen:\n{text}"
        );
    }
    assert_never_shown(outputs, secrets);
}

fn assert_never_shown(outputs: &[(String, String)], secrets: &[&str]) {
    for (command, text) in outputs {
        for s in secrets {
            assert!(!text.contains(s), "{command} showed {s:?}:\n{text}");
        }
    }
}

#[test]
fn the_value_of_a_misspelled_property_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    // Quotes and backslashes too: a JSON log line escapes them, and the escaped form must go.
    let core = secret("typo");
    let value = format!("q\"u\\o{core}");
    let cfg = kafka_config(
        dir.path(),
        &format!(
            "brokers = \"{}\"\nproperties = {{ \"session.timeout.ms\" = \"6000\", \
             \"sasl.passwrod\" = {} }}",
            env("TRIBUTARY_KAFKA_BROKERS"),
            toml_str(&value)
        ),
    );
    let outputs = every_command(&cfg, "sasl.passwrod", true);
    assert_failed_without_showing(&outputs, "sasl.passwrod", &[&core, &value]);
    // A rejected property stops the run as a configuration error.
    assert!(
        outputs[2].1.contains("Kafka source configuration"),
        "{}",
        outputs[2].1
    );
}

#[test]
fn a_java_sasl_jaas_config_line_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    let password = secret("jaas");
    // As people copy it from a Java client.properties.
    let file = dir.path().join("client.properties");
    std::fs::write(
        &file,
        format!(
            "bootstrap.servers={}\nsession.timeout.ms=6000\n\
             sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required \
             username=\"ALICEKEY\" password=\"{password}\";\n",
            env("TRIBUTARY_KAFKA_BROKERS")
        ),
    )
    .unwrap();
    let cfg = kafka_config(
        dir.path(),
        &format!(
            "client_properties = {}",
            toml_str(&file.display().to_string())
        ),
    );
    let outputs = every_command(&cfg, "sasl.jaas.config", true);
    assert_failed_without_showing(
        &outputs,
        "sasl.jaas.config",
        &[&password, "PlainLoginModule"],
    );
}

/// A tansu broker of this test's own that requires SASL authentication; it knows no user, so
/// any credentials fail (its `user create` needs an authenticated client, and users created
/// before restarting it with `--authentication` do not survive in its storage engines).
struct AuthBroker {
    port: u16,
    child: std::process::Child,
}

impl AuthBroker {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(env("TRIBUTARY_TANSU"))
            .args([
                "broker",
                "--cluster-id",
                &unique("auth"),
                "--listener-url",
                &url,
            ])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/", "--authentication"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cannot start tansu");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tansu did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        AuthBroker { port, child }
    }
}

impl Drop for AuthBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_wrong_sasl_password_fails_authentication_without_showing() {
    let broker = AuthBroker::start();
    let dir = tempfile::tempdir().unwrap();
    let password = secret("sasl");
    // librdkafka's own debug log (configuration, security) goes through the redaction too.
    let cfg = kafka_config(
        dir.path(),
        &format!(
            "brokers = \"127.0.0.1:{}\"\nproperties = {{ \"session.timeout.ms\" = \"6000\", \
             \"security.protocol\" = \"SASL_PLAINTEXT\", \"sasl.mechanisms\" = \"SCRAM-SHA-512\", \
             \"sasl.username\" = \"alice\", \"sasl.password\" = \"{password}\", \
             \"debug\" = \"conf,security\" }}",
            broker.port
        ),
    );
    let outputs = every_command(&cfg, "SASL authentication error", false);
    // `check` and `status` give up on the metadata after their timeout and may exit before
    // librdkafka's log of the failure is served; `run` keeps polling until it shows.
    assert!(
        outputs[0].1.contains("FAIL  kafka source"),
        "{}",
        outputs[0].1
    );
    assert!(
        outputs[1].1.contains("kafka     error:"),
        "{}",
        outputs[1].1
    );
    assert_failed_without_showing(&outputs[2..], "SASL authentication error", &[&password]);
    assert_never_shown(&outputs, &[&password]);
}

#[test]
fn a_wrong_postgres_password_fails_without_showing() {
    let dir = tempfile::tempdir().unwrap();
    let password = secret("pgpass");
    let mut url = url::Url::parse(&env("TRIBUTARY_PG_URL")).unwrap();
    url.set_password(Some(&password)).unwrap();
    let cfg = postgres_config(dir.path(), url.as_str(), url.as_str());
    let outputs = every_command(&cfg, "password authentication failed", false);
    assert_failed_without_showing(&outputs, "password authentication failed", &[&password]);
}

#[test]
fn a_password_for_a_closed_port_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    // key=value form with a quoted password holding a space; URL form with an escaped `@`.
    let kv = secret("kv pass");
    let suffix = secret("url");
    let (written, decoded) = (format!("p%40{suffix}"), format!("p@{suffix}"));
    let cfg = postgres_config(
        dir.path(),
        &format!("host=127.0.0.1 port=1 user=app password='{kv}' dbname=app"),
        &format!("postgres://app:{written}@127.0.0.1:1/app"),
    );
    let outputs = every_command(&cfg, "Connection refused", false);
    assert_failed_without_showing(&outputs, "Connection refused", &[&kv, &written, &decoded]);
}

#[test]
fn a_kafka_password_for_a_closed_port_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    let password = secret("closed");
    let cfg = kafka_config(
        dir.path(),
        &format!(
            "brokers = \"127.0.0.1:1\"\nproperties = {{ \"session.timeout.ms\" = \"6000\", \
             \"security.protocol\" = \"SASL_PLAINTEXT\", \"sasl.mechanisms\" = \"PLAIN\", \
             \"sasl.username\" = \"alice\", \"sasl.password\" = \"{password}\" }}"
        ),
    );
    let outputs = every_command(&cfg, "Connection refused", false);
    assert_failed_without_showing(&outputs, "Connection refused", &[&password]);
}

#[tokio::test]
async fn the_value_of_an_unknown_storage_option_never_shows() {
    // The run opens a Bronze table with its first event: one message takes it there.
    let topic = common::kafka::create_topic(1).await;
    let message = (String::from("k"), br#"{"id":1}"#.to_vec());
    common::kafka::produce(&topic, &[message], 1).await;
    let dir = tempfile::tempdir().unwrap();
    let key = secret("s3key");
    let cfg = kafka_topic_config(
        dir.path(),
        &format!(
            "brokers = \"{}\"\nproperties = {{ \"session.timeout.ms\" = \"6000\" }}",
            env("TRIBUTARY_KAFKA_BROKERS")
        ),
        &topic,
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("uri = \"{}\"", dir.path().join("lake").display()),
        &format!(
            "uri = \"s3://{}/redaction\"\n[sinks.delta.storage]\naws_secret_acess_key = \"{key}\"",
            env("TRIBUTARY_S3_BUCKET")
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let outputs = every_command(&cfg, "Bronze commit", false);
    // `check` and `status` open the store themselves and reject the key (naming it); `run` hands
    // the options to deltalake, which ignores a key it does not know and commits with the
    // environment's credentials.
    assert_failed_without_showing(&outputs[..2], "aws_secret_acess_key", &[&key]);
    assert!(outputs[2].1.contains("Bronze commit"), "{}", outputs[2].1);
    assert_never_shown(&outputs, &[&key]);
}
