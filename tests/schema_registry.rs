//! Schema Registry formats end to end: messages written by confluent-kafka's real serializers
//! (AvroSerializer, JSONSerializer) against the file-backed registry of `scripts/services`, read
//! by `tributary run` into typed Bronze columns and pgvector; a field added mid-stream, each bad
//! case a dead letter, and a registry outage that loses and dead-letters nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::kafka::{committed, create_topic, produce};
use common::run::{start, stop, wait_for};
use common::{env, pg_connect, unique};
use serde_json::{Value as J, json};

/// Produces `records` with the real Confluent serializer for `format` (`avro` / `json`) under
/// `schema`, registered in the registry at `registry`; returns the schema id used.
fn produce_registered(registry: &str, topic: &str, format: &str, schema: &J, records: &[J]) -> u32 {
    let dir = tempfile::tempdir().unwrap();
    let schema_file = dir.path().join("schema");
    std::fs::write(&schema_file, schema.to_string()).unwrap();
    let records_file = dir.path().join("records.jsonl");
    let lines: Vec<String> = records.iter().map(J::to_string).collect();
    std::fs::write(&records_file, lines.join("\n")).unwrap();
    let out = Command::new(env("TRIBUTARY_PYTHON"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/produce_registry.py"))
        .args(["--brokers", &env("TRIBUTARY_KAFKA_BROKERS")])
        .args(["--registry", registry, "--topic", topic, "--format", format])
        .arg("--schema")
        .arg(&schema_file)
        .arg("--records")
        .arg(&records_file)
        .args(["--key-field", "id"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "producing failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: J = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["count"], records.len(), "{got}");
    got["id"].as_u64().unwrap() as u32
}

/// A framed value: magic byte 0, the schema id, then `body`.
fn framed(id: u32, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0];
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn config(
    dir: &Path,
    topic: &str,
    group: &str,
    format: &str,
    registry: &str,
    extra: &str,
) -> PathBuf {
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "registry-test"
[sources.kafka]
brokers = "{brokers}"
group_id = "{group}"
drain_timeout_ms = 2000
commit_interval_ms = 200
dead_letter = {{ path = "{dlq}" }}
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
[sources.kafka.schema_registry]
url = "{registry}"
[[sources.kafka.topics]]
name = "{topic}"
format = "{format}"
key_columns = ["id"]
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[pipeline]
batch_max_wait_ms = 100
{extra}
"#,
            brokers = env("TRIBUTARY_KAFKA_BROKERS"),
            dlq = dir.join("dead.jsonl").display(),
            lake = dir.join("lake").display(),
        ),
    )
    .unwrap();
    config
}

/// Runs the connector until the group has committed `end` on the topic's one partition, stops it
/// (cleanly) and returns the dead letters' reasons.
async fn run_until_committed(config: &Path, topic: &str, group: &str, end: i64) -> Vec<String> {
    let run = start(config);
    wait_for("every message committed", async || {
        committed(topic, group, 1) == vec![Some(end)]
    })
    .await;
    let (code, log) = stop(run, config);
    assert_eq!(code, 0, "{log}");
    let dir = config.parent().unwrap();
    dead_letters(dir)
        .iter()
        .map(|l| l["error"].as_str().unwrap().to_owned())
        .collect()
}

fn dead_letters(dir: &Path) -> Vec<J> {
    std::fs::read_to_string(dir.join("dead.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Bronze `table`'s column types and its rows (by position), read by Python deltalake.
fn bronze(table: &Path, columns: &[&str]) -> (J, Vec<J>) {
    let script = r#"
import datetime, json, os, sys
from deltalake import DeltaTable
t = DeltaTable(sys.argv[1]).to_pyarrow_table()
cols = sys.argv[2].split(",")
def plain(v):
    return v.isoformat() if isinstance(v, (datetime.date, datetime.datetime)) else v
rows = sorted(zip(*[[plain(v) for v in t.column(c).to_pylist()] for c in ["_position_major"] + cols]))
print(json.dumps({"fields": {f.name: str(f.type) for f in t.schema},
                  "rows": [dict(zip(cols, r[1:])) for r in rows]}))
sys.stdout.flush()
os._exit(0)
"#;
    let out = Command::new(env("TRIBUTARY_PYTHON"))
        .arg("-c")
        .arg(script)
        .arg(table)
        .arg(columns.join(","))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: J = serde_json::from_slice(&out.stdout).unwrap();
    (
        got["fields"].clone(),
        got["rows"].as_array().unwrap().clone(),
    )
}

fn order_schema(with_qty: bool) -> J {
    let mut fields = vec![
        json!({"name": "id", "type": "long"}),
        json!({"name": "customer", "type": "string"}),
        json!({"name": "note", "type": ["null", "string"], "default": null}),
        json!({"name": "amount", "type": {"type": "bytes", "logicalType": "decimal",
                                          "precision": 10, "scale": 2}}),
        json!({"name": "day", "type": {"type": "int", "logicalType": "date"}}),
        json!({"name": "placed", "type": {"type": "long", "logicalType": "timestamp-micros"}}),
        json!({"name": "paid", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}],
               "default": null}),
        json!({"name": "ref", "type": {"type": "string", "logicalType": "uuid"}}),
        json!({"name": "tags", "type": {"type": "array", "items": "string"}}),
        json!({"name": "ship", "type": ["null", {"type": "record", "name": "Address",
               "fields": [{"name": "city", "type": "string"}]}], "default": null}),
    ];
    if with_qty {
        fields.push(json!({"name": "qty", "type": ["null", "int"], "default": null}));
    }
    json!({"type": "record", "name": "Order", "namespace": "shop.registry_test", "fields": fields})
}

fn order(id: i64, note: &str) -> J {
    json!({"id": id, "customer": format!("Customer {id}"), "note": note,
           "amount": format!("{id}.25"), "day": "2024-05-06",
           "placed": "2024-05-06T07:08:09.123456Z", "paid": null,
           "ref": "6f1c3c52-8f7e-4a51-9d7a-0f0c6b3d2a11", "tags": ["a", "b"],
           "ship": {"city": "Oslo"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_topic_into_typed_bronze_and_pgvector_with_a_field_added_and_dead_letters() {
    let registry = env("TRIBUTARY_SCHEMA_REGISTRY_URL");
    let topic = create_topic(1).await;
    let group = unique("group");
    let schema = unique("reg");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        r#"
[embedding]
model_dir = "{model}"
[embedding.templates]
"{topic}" = "{{customer}} wrote: {{note}}"
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[telemetry]
listen = ""
"#,
        model = env("TRIBUTARY_MODEL_DIR"),
        pg = env("TRIBUTARY_PG_URL"),
    );
    let config = config(dir.path(), &topic, &group, "avro", &registry, &extra);

    // Three orders with schema v1, three bad messages, two orders with v2 (a field added).
    let v1: Vec<J> = (1..=3).map(|i| order(i, &format!("note {i}"))).collect();
    let id1 = produce_registered(&registry, &topic, "avro", &order_schema(false), &v1);
    produce(
        &topic,
        &[
            ("4".into(), br#"{"id":4}"#.to_vec()),
            ("5".into(), framed(2_000_000_000, b"\x02")),
            ("6".into(), framed(id1, b"\xff\xff\xff")),
        ],
        1,
    )
    .await;
    let mut v2: Vec<J> = (7..=8).map(|i| order(i, &format!("note {i}"))).collect();
    v2[0]["qty"] = json!(3);
    v2[1]["paid"] = json!("2024-05-07T10:00:00.5Z");
    let id2 = produce_registered(&registry, &topic, "avro", &order_schema(true), &v2);
    assert_ne!(id1, id2);

    // Each bad message is a dead letter whose reason names what is wrong.
    let reasons = run_until_committed(&config, &topic, &group, 8).await;
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains("not Schema Registry framed: magic byte is 0x7b"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("schema id 2000000000 is not in the Schema Registry"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains(&format!("schema id {id1}"))
            && reasons[2].contains("does not match its Avro schema"),
        "{reasons:?}"
    );

    let columns = [
        "_op", "id", "customer", "note", "amount", "day", "placed", "paid", "ref", "tags", "ship",
        "qty",
    ];
    let (fields, rows) = bronze(&dir.path().join("lake").join(&topic), &columns);
    for (column, ty) in [
        ("id", "int64"),
        ("customer", "string"),
        ("amount", "string"),
        ("day", "date32[day]"),
        ("placed", "timestamp[us, tz=UTC]"),
        ("paid", "timestamp[us, tz=UTC]"),
        ("ref", "string"),
        ("tags", "string"),
        ("qty", "int32"),
    ] {
        assert_eq!(fields[column], ty, "{column}: {fields}");
    }
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert_eq!(rows[0]["id"], 1);
    assert_eq!(rows[0]["amount"], "1.25");
    assert_eq!(rows[0]["day"], "2024-05-06");
    assert_eq!(rows[0]["placed"], "2024-05-06T07:08:09.123456+00:00");
    assert_eq!(rows[0]["paid"], J::Null);
    assert_eq!(rows[0]["ref"], "6f1c3c52-8f7e-4a51-9d7a-0f0c6b3d2a11");
    assert_eq!(
        serde_json::from_str::<J>(rows[0]["tags"].as_str().unwrap()).unwrap(),
        json!(["a", "b"])
    );
    assert_eq!(
        serde_json::from_str::<J>(rows[0]["ship"].as_str().unwrap()).unwrap(),
        json!({"city": "Oslo"})
    );
    assert_eq!(rows[0]["qty"], J::Null, "v1 rows have no qty");
    assert_eq!(rows[3]["id"], 7);
    assert_eq!(rows[3]["qty"], 3, "the added field is a column from v2 on");
    assert_eq!(rows[4]["paid"], "2024-05-07T10:00:00.500000+00:00");

    // pgvector: the five orders, embedded, with their typed payload.
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"{topic}\"");
    let row = pg
        .query_one(
            &format!(
                "SELECT count(*), count(embedding), \
                 max(payload->>'amount') FILTER (WHERE id = '7'), \
                 max(payload->>'qty') FILTER (WHERE id = '7') FROM {table}"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 5);
    assert_eq!(row.get::<_, i64>(1), 5);
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("7.25"));
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_topic_into_typed_bronze_and_mismatches_are_dead_letters() {
    let registry = env("TRIBUTARY_SCHEMA_REGISTRY_URL");
    let topic = create_topic(1).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &topic,
        &group,
        "json_schema",
        &registry,
        "[telemetry]\nlisten = \"\"",
    );
    let schema = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Payment", "type": "object", "required": ["id", "amount"],
        "properties": {
            "id": {"type": "integer"},
            "amount": {"type": "number"},
            "at": {"type": "string", "format": "date-time"},
            "note": {"type": ["null", "string"]},
            "ok": {"type": "boolean"}
        }
    });
    let records: Vec<J> = (1..=3)
        .map(|i| {
            json!({"id": i, "amount": i as f64 + 0.5, "at": "2024-05-06T07:08:09Z",
                        "note": null, "ok": true})
        })
        .collect();
    let id = produce_registered(&registry, &topic, "json", &schema, &records);
    produce(
        &topic,
        &[
            ("4".into(), framed(id, br#"{"id":"four","amount":1}"#)),
            ("5".into(), framed(id, br#"{"id":5}"#)),
            ("6".into(), br#"{"id":6,"amount":1}"#.to_vec()),
        ],
        1,
    )
    .await;

    // Each bad message is a dead letter whose reason names what is wrong.
    let reasons = run_until_committed(&config, &topic, &group, 6).await;
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains(r#"property "id" is a string, the schema declares integer"#),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains(r#"required property "amount" is missing"#),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("not Schema Registry framed"),
        "{reasons:?}"
    );

    let (fields, rows) = bronze(
        &dir.path().join("lake").join(&topic),
        &["id", "amount", "at", "note", "ok"],
    );
    assert_eq!(fields["id"], "int64", "{fields}");
    assert_eq!(fields["amount"], "double", "{fields}");
    assert_eq!(fields["at"], "timestamp[us, tz=UTC]", "{fields}");
    assert_eq!(fields["note"], "string", "{fields}");
    assert_eq!(fields["ok"], "bool", "{fields}");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[2]["amount"], 3.5);
    assert_eq!(rows[2]["at"], "2024-05-06T07:08:09+00:00");
}

/// A registry of our own (port and data directory), so stopping it disturbs no other test.
struct OwnRegistry {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl OwnRegistry {
    fn start(dir: &Path, port: u16) -> Self {
        let child = Command::new(env("TRIBUTARY_PYTHON"))
            .arg(env("TRIBUTARY_SCHEMA_REGISTRY_SCRIPT"))
            .args(["--port", &port.to_string(), "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed().as_secs() < 20, "registry did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        OwnRegistry {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(mut self) -> (u16, PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.port, self.dir.clone())
    }
}

impl Drop for OwnRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn readyz(port: u16) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/readyz"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_then_up_loses_nothing_and_dead_letters_nothing() {
    let data = tempfile::tempdir().unwrap();
    let reg = OwnRegistry::start(data.path(), free_port());
    let url = reg.url();
    let topic = create_topic(1).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let telemetry = free_port();
    let config = config(
        dir.path(),
        &topic,
        &group,
        "avro",
        &url,
        &format!("[telemetry]\nlisten = \"127.0.0.1:{telemetry}\"\nready_window_s = 30"),
    );
    let records: Vec<J> = (1..=20)
        .map(|i| order(i, "while the registry is down"))
        .collect();
    produce_registered(&url, &topic, "avro", &order_schema(false), &records);
    let (port, data_dir) = reg.stop();

    // The registry is away: nothing is committed, nothing dead-lettered, readiness says why.
    let run = start(&config);
    wait_for("readiness red, naming the registry", async || {
        let (code, body) = readyz(telemetry).await;
        code == 503 && body.contains("Schema Registry")
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(committed(&topic, &group, 1), vec![None]);
    assert!(dead_letters(dir.path()).is_empty());

    // Back on the same port with the same data: every message arrives, once.
    let reg = OwnRegistry::start(&data_dir, port);
    wait_for("all twenty committed", async || {
        committed(&topic, &group, 1) == vec![Some(20)]
    })
    .await;
    wait_for("readiness green again", async || {
        readyz(telemetry).await.0 == 200
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");
    drop(reg);
    assert!(
        dead_letters(dir.path()).is_empty(),
        "{:?}",
        dead_letters(dir.path())
    );
    let (_, rows) = bronze(&dir.path().join("lake").join(&topic), &["id"]);
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=20).collect::<Vec<_>>());
    assert!(
        log.contains("Schema Registry unavailable; retrying"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_topic_into_typed_bronze_by_its_message_indexes() {
    let registry = env("TRIBUTARY_SCHEMA_REGISTRY_URL");
    let topic = create_topic(1).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &topic,
        &group,
        "protobuf",
        &registry,
        "[telemetry]\nlisten = \"\"",
    );
    // `Order` is the file's second message: its messages carry the index path [1].
    let schema = json!({
        "package": "shop.registry_test",
        "messages": [
            {"name": "Address", "fields": [{"name": "city", "number": 1, "type": "string"}]},
            {"name": "Order", "fields": [
                {"name": "id", "number": 1, "type": "int64"},
                {"name": "customer", "number": 2, "type": "string"},
                {"name": "amount", "number": 3, "type": "double"},
                {"name": "tags", "number": 4, "type": "string", "repeated": true},
                {"name": "status", "number": 5, "type": "enum:NEW,PAID"},
                {"name": "ship", "number": 6, "type": "message", "message": "Address"},
                {"name": "ok", "number": 7, "type": "bool"},
                {"name": "big", "number": 8, "type": "uint64"}]}
        ],
        "produce": "Order"
    });
    let records: Vec<J> = (1..=3)
        .map(|i| {
            json!({"id": i, "customer": format!("Customer {i}"), "amount": i as f64 + 0.5,
                        "tags": ["a", "b"], "status": "PAID", "ship": {"city": "Oslo"},
                        "ok": true, "big": "18446744073709551615"})
        })
        .collect();
    let id = produce_registered(&registry, &topic, "protobuf", &schema, &records);
    produce(
        &topic,
        &[
            // Index path [1] (count 1, index 1, zig-zag), then bytes that are no Order.
            ("4".into(), framed(id, b"\x02\x02\x0a\xff")),
            ("5".into(), framed(id, b"\x02\x08\x00")),
        ],
        1,
    )
    .await;

    // Each bad message is a dead letter whose reason names what is wrong.
    let reasons = run_until_committed(&config, &topic, &group, 5).await;
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("does not match its Protobuf schema"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("message index 4 is not in the schema"),
        "{reasons:?}"
    );

    let (fields, rows) = bronze(
        &dir.path().join("lake").join(&topic),
        &[
            "id", "customer", "amount", "tags", "status", "ship", "ok", "big",
        ],
    );
    assert_eq!(fields["id"], "int64", "{fields}");
    assert_eq!(fields["amount"], "double", "{fields}");
    assert_eq!(fields["status"], "string", "{fields}");
    assert_eq!(fields["ok"], "bool", "{fields}");
    assert_eq!(fields["big"], "string", "{fields}");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[1]["id"], 2);
    assert_eq!(rows[1]["customer"], "Customer 2");
    assert_eq!(rows[1]["status"], "PAID");
    assert_eq!(rows[1]["big"], "18446744073709551615");
    assert_eq!(
        serde_json::from_str::<J>(rows[1]["ship"].as_str().unwrap()).unwrap(),
        json!({"city": "Oslo"})
    );
    assert_eq!(
        serde_json::from_str::<J>(rows[1]["tags"].as_str().unwrap()).unwrap(),
        json!(["a", "b"])
    );
}
