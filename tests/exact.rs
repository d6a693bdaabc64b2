//! Values kept exactly, end to end on real services (tansu broker, Delta read back by an
//! independent reader, pgvector): a message no sink can take is a dead letter and the run goes
//! on; Kafka headers, timestamps and the Debezium `source` block reach Bronze; numbers keep
//! their exact digits.

mod common;

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use common::kafka::{committed, create_topic, producer};
use common::run::{start, stop, wait_for};
use common::{env, pg_connect, unique};

/// Produces one message to partition 0 (no key when `key` is `None`); returns its offset.
async fn send(
    topic: &str,
    key: Option<&str>,
    value: &[u8],
    headers: Option<OwnedHeaders>,
    timestamp_ms: Option<i64>,
) -> i64 {
    let producer = producer();
    let mut record = FutureRecord::<str, [u8]>::to(topic)
        .partition(0)
        .payload(value);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(h) = headers {
        record = record.headers(h);
    }
    if let Some(ts) = timestamp_ms {
        record = record.timestamp(ts);
    }
    let delivered = producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    delivered.offset
}

/// Runs a Python snippet over the services' venv (which has `deltalake` and `pyarrow`) with
/// `args`; returns its stdout as JSON.
fn python(script: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env("TRIBUTARY_PYTHON"))
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every row of a Bronze table, binary values as hex, timestamps as ISO text.
fn bronze_rows(table: &std::path::Path) -> Vec<serde_json::Value> {
    let script = r#"
import datetime, json, os, sys
from deltalake import DeltaTable
def plain(v):
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, (datetime.date, datetime.datetime)):
        return v.isoformat()
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v
rows = [plain(r) for r in DeltaTable(sys.argv[1]).to_pyarrow_table().to_pylist()]
rows.sort(key=lambda r: (r["_position_major"], r["_position_minor"]))
print(json.dumps(rows))
sys.stdout.flush()
os._exit(0)  # deltalake's runtime threads can abort the interpreter at exit
"#;
    let v = python(script, &[table.to_str().unwrap()]);
    v.as_array().unwrap().clone()
}

fn kafka_config(
    dir: &std::path::Path,
    topic: &str,
    format: &str,
    extra_topic: &str,
    pgvector_schema: Option<&str>,
) -> std::path::PathBuf {
    let config = dir.join("run.toml");
    let pgvector = pgvector_schema
        .map(|s| {
            format!(
                "[sinks.pgvector]\nurl = \"{}\"\nschema = \"{s}\"\n",
                env("TRIBUTARY_PG_URL")
            )
        })
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            r#"
name = "exact-test"
[sources.kafka]
brokers = "{brokers}"
group_id = "{group}"
drain_timeout_ms = 2000
commit_interval_ms = 200
dead_letter = {{ path = "{dlq}" }}
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
[[sources.kafka.topics]]
name = "{topic}"
format = "{format}"
{extra_topic}
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
{pgvector}
[pipeline]
batch_max_wait_ms = 100
[telemetry]
listen = ""
"#,
            brokers = env("TRIBUTARY_KAFKA_BROKERS"),
            group = unique("group"),
            dlq = dir.join("dead.jsonl").display(),
            lake = dir.join("lake").display(),
        ),
    )
    .unwrap();
    config
}

fn group_of(config: &std::path::Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text.lines().find(|l| l.starts_with("group_id")).unwrap();
    line.split('"').nth(1).unwrap().to_owned()
}

fn dead_letters(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("dead.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_key_message_first_on_a_keyless_topic_is_a_dead_letter_and_the_messages_after_it_land()
 {
    let topic = create_topic(1).await;
    let schema = unique("exact");
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &topic, "json", "", Some(&schema));
    let group = group_of(&config);
    // First on the topic, before its pgvector table exists: a message without a key.
    send(&topic, None, br#"{"n":0}"#, None, None).await;
    send(&topic, Some("a"), br#"{"n":1}"#, None, None).await;
    send(&topic, Some("b"), br#"{"n":2}"#, None, None).await;

    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"{topic}\"");
    let keys = async || -> Vec<String> {
        pg.query(&format!("SELECT key FROM {table} ORDER BY key"), &[])
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default()
    };
    let run = start(&config);
    wait_for(
        "the keyed messages in pgvector and all offsets committed",
        async || keys().await == ["a", "b"] && committed(&topic, &group, 1) == vec![Some(3)],
    )
    .await;
    // Mid-stream, with the table there: the same again.
    send(&topic, None, br#"{"n":3}"#, None, None).await;
    send(&topic, Some("c"), br#"{"n":4}"#, None, None).await;
    wait_for("the message after the second keyless one", async || {
        keys().await == ["a", "b", "c"] && committed(&topic, &group, 1) == vec![Some(5)]
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");

    // Each keyless message is a dead letter of the pgvector sink, with the reason and its offset.
    let letters = dead_letters(dir.path());
    assert_eq!(letters.len(), 2, "{letters:?}");
    for (letter, offset) in letters.iter().zip([0, 3]) {
        assert_eq!(letter["position"]["major"], offset, "{letter}");
        assert_eq!(letter["source"], topic.as_str());
        let error = letter["error"].as_str().unwrap();
        assert!(
            error.starts_with("pgvector sink rejected the event"),
            "{error}"
        );
        assert!(error.contains("has no key"), "{error}");
        assert!(error.contains(&format!("@{offset}.0")), "{error}");
    }
    // Bronze is the raw record: every message, the keyless ones with `_key` NULL.
    let rows = bronze_rows(&dir.path().join("lake").join(&topic));
    let got: Vec<(i64, serde_json::Value, String)> = rows
        .iter()
        .map(|r| {
            (
                r["_position_minor"].as_i64().unwrap(),
                r["_key"].clone(),
                r["_payload"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let null = serde_json::Value::Null;
    let key = |k: &str| serde_json::Value::String(format!(r#"{{"key":"{k}"}}"#));
    assert_eq!(
        got,
        vec![
            (0, null.clone(), r#"{"n":0}"#.to_owned()),
            (1, key("a"), r#"{"n":1}"#.to_owned()),
            (2, key("b"), r#"{"n":2}"#.to_owned()),
            (3, null, r#"{"n":3}"#.to_owned()),
            (4, key("c"), r#"{"n":4}"#.to_owned()),
        ]
    );
}

/// A Debezium PostgreSQL envelope with its Connect schema: `orders(id int, note text)`, with
/// the connector's `source` block.
fn debezium_with_schema(id: i32, note: &str) -> String {
    use serde_json::json;
    let row = json!({"type": "struct", "optional": true, "name": "shop.public.orders.Value",
        "fields": [{"type": "int32", "optional": false, "field": "id"},
                   {"type": "string", "optional": true, "field": "note"}]});
    let mut before = row.clone();
    before["field"] = json!("before");
    let mut after = row;
    after["field"] = json!("after");
    json!({
        "schema": {"type": "struct", "optional": false, "name": "shop.public.orders.Envelope",
            "fields": [before, after,
                {"type": "struct", "optional": false, "field": "source",
                 "name": "io.debezium.connector.postgresql.Source", "fields": [
                    {"type": "string", "optional": false, "field": "connector"},
                    {"type": "int64", "optional": false, "field": "ts_ms"},
                    {"type": "string", "optional": false, "field": "db"},
                    {"type": "string", "optional": false, "field": "table"},
                    {"type": "int64", "optional": true, "field": "txId"},
                    {"type": "int64", "optional": true, "field": "lsn"}]},
                {"type": "string", "optional": false, "field": "op"},
                {"type": "int64", "optional": true, "field": "ts_ms"}]},
        "payload": {"before": null, "after": {"id": id, "note": note}, "op": "c",
            "ts_ms": 1_714_979_290_000_i64,
            "source": {"connector": "postgresql", "ts_ms": 1_714_979_289_900_i64, "db": "shop",
                       "table": "orders", "txId": 771, "lsn": 24_023_128}}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_headers_timestamp_and_the_debezium_source_block_read_back_from_bronze() {
    let topic = create_topic(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(
        dir.path(),
        &topic,
        "debezium",
        "key_columns = [\"id\"]",
        None,
    );
    let group = group_of(&config);
    let table = dir.path().join("lake").join(&topic);

    // A Bronze table written by an earlier version (without the metadata columns added since),
    // holding one row: it must gain the columns, its row reading NULL in them.
    let old_layout = r#"
import datetime, json, os, sys
import pyarrow as pa
from deltalake import write_deltalake
ts = pa.timestamp("us", tz="UTC")
schema = pa.schema([
    pa.field("_op", pa.string(), False), pa.field("_source", pa.string(), False),
    pa.field("_position_major", pa.int64(), False), pa.field("_position_minor", pa.int64(), False),
    pa.field("_source_ts", ts), pa.field("_ingested_at", ts, False), pa.field("_key", pa.string()),
    pa.field("_payload", pa.string()), pa.field("_before", pa.string()),
    pa.field("embedding", pa.list_(pa.field("element", pa.float32()))),
    pa.field("_ingest_date", pa.date32(), False)])
now = datetime.datetime.now(datetime.timezone.utc)
row = {"_op": "insert", "_source": sys.argv[2], "_position_major": -1, "_position_minor": 0,
       "_source_ts": None, "_ingested_at": now, "_key": '{"id":0}', "_payload": '{"id":0}',
       "_before": None, "embedding": None, "_ingest_date": now.date()}
write_deltalake(sys.argv[1], pa.Table.from_pylist([row], schema=schema), partition_by=["_ingest_date"])
print(json.dumps(True))
sys.stdout.flush()
os._exit(0)
"#;
    python(old_layout, &[table.to_str().unwrap(), &topic]);

    // Headers as producers write them: binary values, a repeated key, a null value.
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "trace",
            value: Some(&b"\x00\xffbin"[..]),
        })
        .insert(Header {
            key: "trace",
            value: Some(&b"second"[..]),
        })
        .insert(Header {
            key: "empty",
            value: None::<&[u8]>,
        });
    let created = 1_714_979_289_123_i64; // 2024-05-06T07:08:09.123Z
    send(
        &topic,
        Some(r#"{"id":1}"#),
        debezium_with_schema(1, "first").as_bytes(),
        Some(headers),
        Some(created),
    )
    .await;
    // A schemaless envelope without headers.
    send(
        &topic,
        Some(r#"{"id":2}"#),
        br#"{"op":"c","after":{"id":2,"note":"second"},"source":{"lsn":24023200,"txId":772,"ts_ms":1714979289950,"table":"orders"}}"#,
        None,
        Some(created + 1),
    )
    .await;
    let run = start(&config);
    wait_for("both messages committed", async || {
        committed(&topic, &group, 1) == vec![Some(2)]
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");

    let rows = bronze_rows(&table);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let (old, first, second) = (&rows[0], &rows[1], &rows[2]);
    for column in ["_headers", "_kafka_ts", "_kafka_ts_type", "_source_meta"] {
        assert_eq!(old[column], serde_json::Value::Null, "{column}: {old}");
    }
    assert_eq!(
        first["_headers"],
        serde_json::json!([
            {"key": "trace", "value": "00ff62696e"},
            {"key": "trace", "value": "7365636f6e64"},
            {"key": "empty", "value": null},
        ]),
        "{first}"
    );
    assert_eq!(first["_kafka_ts"], "2024-05-06T07:08:09.123000+00:00");
    assert_eq!(first["_kafka_ts_type"], "create_time");
    let source: serde_json::Value =
        serde_json::from_str(first["_source_meta"].as_str().unwrap()).unwrap();
    assert_eq!(
        source,
        serde_json::json!({"connector": "postgresql", "ts_ms": 1_714_979_289_900_i64,
                           "db": "shop", "table": "orders", "txId": 771, "lsn": 24_023_128})
    );
    // `_source_ts` is when the origin database committed (`source.ts_ms`).
    assert_eq!(first["_source_ts"], "2024-05-06T07:08:09.900000+00:00");
    assert_eq!(second["_headers"], serde_json::Value::Null, "{second}");
    assert_eq!(second["_kafka_ts"], "2024-05-06T07:08:09.124000+00:00");
    let source: serde_json::Value =
        serde_json::from_str(second["_source_meta"].as_str().unwrap()).unwrap();
    assert_eq!(source["txId"], 772);
    assert_eq!(source["lsn"], 24_023_200);
}

/// 30 significant digits, beyond `u64`; and a decimal of 40 significant digits.
const BIG_INT: &str = "123456789012345678901234567890";
const BIG_DECIMAL: &str = "1234567890.123456789012345678901234567890";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_numbers_keep_their_digits_in_bronze_and_pgvector_and_an_int64_overflow_is_a_dead_letter()
 {
    let topic = create_topic(1).await;
    let schema = unique("exact");
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(
        dir.path(),
        &topic,
        "json",
        r#"columns = { amount = "numeric", n64 = "int64" }"#,
        Some(&schema),
    );
    let group = group_of(&config);
    let key = format!(r#"{{"id":{BIG_INT}}}"#);
    let first = format!(
        r#"{{"serial": {BIG_INT}, "price": {BIG_DECIMAL}, "amount": {BIG_DECIMAL}, "n64": 7,
            "ratio": 12.5, "trailing": 1.50, "deep": {{"v": [0.1000000000000000000000001, {BIG_INT}]}}}}"#
    );
    send(&topic, Some(&key), first.as_bytes(), None, None).await;
    // A declared int64 that overflows: a dead letter naming the column and the value.
    let overflow = format!(r#"{{"n64": {BIG_INT}}}"#);
    send(&topic, Some("k2"), overflow.as_bytes(), None, None).await;
    send(
        &topic,
        Some(r#"{"id":3}"#),
        br#"{"n64": 9223372036854775807}"#,
        None,
        None,
    )
    .await;

    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"{topic}\"");
    let run = start(&config);
    wait_for("all offsets committed", async || {
        committed(&topic, &group, 1) == vec![Some(3)]
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");

    let letters = dead_letters(dir.path());
    assert_eq!(letters.len(), 1, "{letters:?}");
    let error = letters[0]["error"].as_str().unwrap();
    assert!(error.contains(r#"column "n64""#), "{error}");
    assert!(error.contains(BIG_INT), "{error}");
    assert_eq!(letters[0]["position"]["major"], 1);

    let rows = bronze_rows(&dir.path().join("lake").join(&topic));
    assert_eq!(rows.len(), 2, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["_key"], key.as_str());
    assert_eq!(
        row["amount"], BIG_DECIMAL,
        "declared numeric keeps the exact text"
    );
    assert_eq!(row["n64"], 7);
    let payload = row["_payload"].as_str().unwrap();
    assert_eq!(
        payload,
        format!(
            r#"{{"serial":{BIG_INT},"price":{BIG_DECIMAL},"ratio":12.5,"trailing":1.50,"deep":{{"v":[0.1000000000000000000000001,{BIG_INT}]}}}}"#
        )
    );
    assert_eq!(rows[1]["n64"], 9_223_372_036_854_775_807_i64);

    // pgvector's payload (jsonb stores numbers as numeric) holds the same digits.
    let got = pg
        .query_one(
            &format!(
                "SELECT payload->>'serial', payload->>'price', payload->>'amount',
                        payload->>'trailing', (payload->'deep')::text
                   FROM {table} WHERE payload ? 'serial'"
            ),
            &[],
        )
        .await
        .unwrap();
    let text = |i: usize| got.get::<_, String>(i);
    assert_eq!(text(0), BIG_INT);
    assert_eq!(text(1), BIG_DECIMAL);
    assert_eq!(text(2), BIG_DECIMAL, "a declared numeric is exact text");
    assert_eq!(text(3), "1.50");
    assert_eq!(
        text(4),
        format!(r#"{{"v": [0.1000000000000000000000001, {BIG_INT}]}}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_envelopes_without_a_schema_keep_their_numbers_in_bronze_and_pgvector() {
    let topic = create_topic(1).await;
    let schema = unique("exactdbz");
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(
        dir.path(),
        &topic,
        "debezium",
        "key_columns = [\"id\"]\ncolumns = { amount = \"numeric\" }",
        Some(&schema),
    );
    let group = group_of(&config);
    let old = format!(r#"{{"id":1,"serial":{BIG_INT},"amount":{BIG_DECIMAL}}}"#);
    // The `source` block (with numbers of its own) before the images, as producers may order it.
    let insert = format!(
        r#"{{"source":{{"lsn":100,"ts_ms":1714979289000,"w":[1.5]}},"op":"c","before":null,"after":{old}}}"#
    );
    let update = format!(
        r#"{{"op":"u","source":{{"lsn":200,"ts_ms":1714979290000}},"before":{old},
            "after":{{"id":1,"serial":{BIG_INT}1,"amount":0.1000000000000000000000000000000000000001,
                     "deep":[{BIG_DECIMAL}]}}}}"#
    );
    send(&topic, Some(r#"{"id":1}"#), insert.as_bytes(), None, None).await;
    send(&topic, Some(r#"{"id":1}"#), update.as_bytes(), None, None).await;

    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let run = start(&config);
    wait_for("all offsets committed", async || {
        committed(&topic, &group, 1) == vec![Some(2)]
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");
    assert!(dead_letters(dir.path()).is_empty());

    let rows = bronze_rows(&dir.path().join("lake").join(&topic));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["amount"], BIG_DECIMAL);
    let payload = rows[0]["_payload"].as_str().unwrap();
    assert!(
        payload.contains(&format!(r#""serial":{BIG_INT}"#)),
        "{payload}"
    );
    assert_eq!(
        rows[1]["amount"],
        "0.1000000000000000000000000000000000000001"
    );
    let payload = rows[1]["_payload"].as_str().unwrap();
    assert!(
        payload.contains(&format!(r#""serial":{BIG_INT}1"#)),
        "{payload}"
    );
    assert!(
        payload.contains(&format!(r#""deep":[{BIG_DECIMAL}]"#)),
        "{payload}"
    );
    let before = rows[1]["_before"].as_str().unwrap();
    assert!(
        before.contains(&format!(r#""serial":{BIG_INT}"#)),
        "{before}"
    );
    // A declared numeric is written as its exact text.
    assert!(
        before.contains(&format!(r#""amount":"{BIG_DECIMAL}""#)),
        "{before}"
    );

    let got = pg
        .query_one(
            &format!(
                "SELECT payload->>'serial', payload->>'amount', (payload->'deep')::text
                   FROM \"{schema}\".\"{topic}\""
            ),
            &[],
        )
        .await
        .unwrap();
    let text = |i: usize| got.get::<_, String>(i);
    assert_eq!(text(0), format!("{BIG_INT}1"));
    assert_eq!(text(1), "0.1000000000000000000000000000000000000001");
    assert_eq!(text(2), format!("[{BIG_DECIMAL}]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_numeric_of_40_digits_lands_exactly_in_bronze_and_pgvector() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, _src) = common::create_source_db(
        &admin,
        "exactsrc",
        &format!(
            "CREATE TABLE amounts (id int PRIMARY KEY, amount numeric, serial numeric(30, 0));
             INSERT INTO amounts VALUES (1, {BIG_DECIMAL}, {BIG_INT}), (2, -0.{z}1, 0);",
            z = "0".repeat(38)
        ),
    )
    .await;
    let tiny = format!("-0.{}1", "0".repeat(38));
    let slot = unique("slot");
    let schema = unique("exact");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "exact-pg-test"
[sources.postgres]
url = "{src_url}"
publication = "amounts_pub"
slot = "{slot}"
tables = ["amounts"]
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_wait_ms = 100
[telemetry]
listen = ""
"#,
            pg = env("TRIBUTARY_PG_URL"),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"amounts\"");
    let run = start(&config);
    wait_for("both rows in pgvector", async || {
        pg.query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 2)
    })
    .await;
    // Bronze commits on its own clock: wait for its rows too.
    let lake = dir.path().join("lake").join("public.amounts");
    wait_for("both rows in Bronze", async || {
        lake.join("_delta_log").exists() && common::bronze_positions(&lake).0 == 2
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");

    let rows = pg
        .query(
            &format!("SELECT payload->>'amount', payload->>'serial' FROM {table} ORDER BY id"),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![
            (BIG_DECIMAL.to_owned(), BIG_INT.to_owned()),
            (tiny.clone(), "0".to_owned())
        ]
    );
    let mut bronze = bronze_rows(&lake);
    bronze.sort_by_key(|r| r["id"].as_i64());
    let got: Vec<(String, String)> = bronze
        .iter()
        .map(|r| {
            (
                r["amount"].as_str().unwrap().to_owned(),
                r["serial"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (BIG_DECIMAL.to_owned(), BIG_INT.to_owned()),
            (tiny, "0".to_owned())
        ]
    );
    drop(_src);
    common::drop_source_db(&admin, &dbname, &slot).await;
}
