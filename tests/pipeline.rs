//! `tributary run` end to end on real services: Kafka → embeddings → pgvector, dead letters,
//! graceful shutdown that acknowledges everything, and a restart that re-applies nothing.

mod common;

use common::kafka::{committed, create_topic, produce};
use common::run::{start, stop, wait_for};
use common::{env, pg_connect, unique};

fn order(id: usize, note: &str) -> (String, Vec<u8>) {
    (
        format!("o-{id}"),
        format!(
            r#"{{"order_id":"o-{id}","customer":"Customer {}","amount":{id}.5,"note":"{note}"}}"#,
            id % 5
        )
        .into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_pgvector_with_embeddings_dead_letters_and_clean_restarts() {
    const PARTS: i32 = 3;
    let topic = create_topic(PARTS).await;
    let group = unique("group");
    let schema = unique("pipe");
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dead.jsonl");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "pipeline-test"
[sources.kafka]
brokers = "{brokers}"
group_id = "{group}"
drain_timeout_ms = 2000
commit_interval_ms = 200
dead_letter = {{ path = "{dlq}" }}
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
[[sources.kafka.topics]]
name = "{topic}"
key_columns = ["order_id"]
[embedding]
model_dir = "{model}"
[embedding.templates]
"{topic}" = "{{customer}} wrote: {{note}}"
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
            brokers = env("TRIBUTARY_KAFKA_BROKERS"),
            dlq = dlq.display(),
            model = env("TRIBUTARY_MODEL_DIR"),
            pg = env("TRIBUTARY_PG_URL"),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();

    let mut messages: Vec<_> = (0..30)
        .map(|i| order(i, &format!("note number {i}")))
        .collect();
    messages.insert(10, ("bad".into(), b"{not json".to_vec()));
    let end = produce(&topic, &messages, PARTS).await;

    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"{topic}\"");
    let count = |sql: String| {
        let pg = &pg;
        async move {
            pg.query_one(&sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };
    let run = start(&config);
    wait_for("30 rows in pgvector", async || {
        count(format!(
            "SELECT count(*) FROM {table} WHERE embedding IS NOT NULL"
        ))
        .await
            == 30
    })
    .await;
    wait_for("the dead letter", async || {
        std::fs::read_to_string(&dlq).is_ok_and(|s| s.lines().count() == 1)
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");
    // Everything processed was acknowledged: the group's offsets are at the end of each partition.
    assert_eq!(
        committed(&topic, &group, PARTS),
        end.iter().map(|&o| Some(o)).collect::<Vec<_>>(),
        "{stderr}"
    );
    let letter: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&dlq).unwrap().trim()).unwrap();
    assert_eq!(letter["key"], "bad");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("json"),
        "{letter}"
    );

    // The nearest order to a query text is the one whose note says so.
    let mut embedder = tributary::enrich::Embedder::load(
        &tributary::config::EmbeddingConfig::for_model(env("TRIBUTARY_MODEL_DIR").into()),
    )
    .unwrap();
    let q = embedder
        .embed(&["Customer 2 wrote: note number 17"])
        .unwrap()
        .remove(0);
    let nearest: String = pg
        .query_one(
            &format!("SELECT order_id FROM {table} ORDER BY embedding <=> $1 LIMIT 1"),
            &[&pgvector::Vector::from(q)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(nearest, "o-17");

    // Restart: nothing is applied again; a new change arrives once.
    let before: i64 = count(format!("SELECT count(*) FROM {table}")).await;
    let marker: String = pg
        .query_one(&format!("SELECT max(_updated_at)::text FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    let run = start(&config);
    produce(&topic, &[order(3, "changed its mind: three lamps")], PARTS).await;
    wait_for("the update", async || {
        count(format!(
            "SELECT count(*) FROM {table} WHERE order_id = 'o-3' AND payload->>'note' LIKE 'changed%'"
        ))
        .await
            == 1
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(format!("SELECT count(*) FROM {table}")).await, before);
    let rewritten = count(format!(
        "SELECT count(*) FROM {table} WHERE _updated_at > '{marker}'::timestamptz"
    ))
    .await;
    assert_eq!(rewritten, 1, "rows were re-applied after the restart");

    // Bronze holds every change exactly once: 30 orders + the update, no position twice, read by
    // an independent reader (the Python deltalake package).
    let (rows, distinct) = common::bronze_positions(&dir.path().join("lake").join(&topic));
    assert_eq!((rows, distinct), (31, 31));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_snapshot_and_stream_land_once_in_bronze_and_pgvector_equals_the_source() {
    // The source database with rows before the connector's first start.
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db(
        &admin,
        "pipesrc",
        "CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, note text NOT NULL);
         INSERT INTO orders SELECT g, 'Customer ' || (g % 5), 'note number ' || g
         FROM generate_series(1, 200) g;",
    )
    .await;
    let slot = unique("slot");
    let schema = unique("pipe");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "pipeline-pg-test"
[sources.postgres]
url = "{src_url}"
publication = "orders_pub"
slot = "{slot}"
tables = ["orders"]
snapshot_chunk_rows = 50
[embedding]
model_dir = "{model}"
[embedding.templates]
"public.orders" = "{{customer}} wrote: {{note}}"
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
            model = env("TRIBUTARY_MODEL_DIR"),
            pg = env("TRIBUTARY_PG_URL"),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"orders\"");
    let count = |sql: String| {
        let pg = &pg;
        async move {
            pg.query_one(&sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };
    let run = start(&config);
    wait_for("the snapshot in pgvector", async || {
        count(format!(
            "SELECT count(*) FROM {table} WHERE embedding IS NOT NULL"
        ))
        .await
            == 200
    })
    .await;
    src.batch_execute(
        "INSERT INTO orders VALUES (201, 'Customer 1', 'three brass lamps');
         UPDATE orders SET note = 'changed its mind' WHERE id = 7;
         DELETE FROM orders WHERE id = 8;
         BEGIN; UPDATE orders SET id = 1000 WHERE id = 9; COMMIT;",
    )
    .await
    .unwrap();
    wait_for("the live changes in pgvector", async || {
        count(format!("SELECT count(*) FROM {table}")).await == 200
            && count(format!(
                "SELECT count(*) FROM {table} WHERE payload->>'note' = 'changed its mind'"
            ))
            .await
                == 1
            && count(format!("SELECT count(*) FROM {table} WHERE id = 1000")).await == 1
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");

    // pgvector equals the source table (keys and text).
    let expected: Vec<(i32, String)> = src
        .query("SELECT id, note FROM orders ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let got: Vec<(i32, String)> = pg
        .query(
            &format!("SELECT id, payload->>'note' FROM {table} ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, expected);
    // Bronze: 200 snapshot rows + 4 changes (the key change is one update), each once.
    let bronze = dir.path().join("lake").join("public.orders");
    assert_eq!(common::bronze_positions(&bronze), (204, 204));

    // Restart: the acknowledged snapshot and changes are not delivered again.
    let run = start(&config);
    src.batch_execute("INSERT INTO orders VALUES (202, 'Customer 2', 'one more')")
        .await
        .unwrap();
    wait_for("the new row", async || {
        count(format!("SELECT count(*) FROM {table} WHERE id = 202")).await == 1
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(common::bronze_positions(&bronze), (205, 205));

    // A TRUNCATE while the connector is stopped: the next start applies it (it used to panic in
    // the pgvector sink, and every restart re-read the same TRUNCATE).
    src.batch_execute("TRUNCATE orders").await.unwrap();
    let run = start(&config);
    wait_for("the truncate in pgvector", async || {
        count(format!("SELECT count(*) FROM {table}")).await == 0
    })
    .await;
    src.batch_execute("INSERT INTO orders VALUES (300, 'Customer 3', 'after the truncate')")
        .await
        .unwrap();
    wait_for("a row after the truncate", async || {
        count(format!("SELECT count(*) FROM {table} WHERE id = 300")).await == 1
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(common::bronze_positions(&bronze), (207, 207));

    drop(src);
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE {dbname} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_a_running_connector_stops_it_with_the_reason() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let dbname = unique("dropsrc");
    admin
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .unwrap();
    let src_url = common::pg_url_for_db(&dbname);
    let src = pg_connect(&src_url).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let slot = unique("slot");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "dropped-slot-test"
[sources.postgres]
url = "{src_url}"
publication = "p"
slot = "{slot}"
tables = ["t"]
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[telemetry]
listen = ""
"#,
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();
    let mut run = start(&config);
    wait_for("streaming", async || {
        admin
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .is_ok_and(|r| r.is_some())
    })
    .await;
    // An operator drops the slot: terminate its walsender and drop it before the reconnect.
    wait_for("the slot to be dropped", async || {
        let _ = admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok()
    })
    .await;
    for _ in 0..300 {
        if run.0.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        run.0.try_wait().unwrap().is_some(),
        "the run must stop: {}",
        std::fs::read_to_string(config.with_extension("log")).unwrap()
    );
    let code = run.0.wait().unwrap().code();
    let log = std::fs::read_to_string(config.with_extension("log")).unwrap();
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains(&slot), "the error names the slot: {log}");
    drop(src);
    admin
        .batch_execute(&format!("DROP DATABASE {dbname} WITH (FORCE)"))
        .await
        .unwrap();
}

/// `tributary status --json` for `config`.
fn status(config: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Rows of Bronze table `table` and dead letters held, as `status` reports them.
fn bronze_and_dead_letters(config: &std::path::Path, table: &str) -> (Option<u64>, Option<u64>) {
    let s = status(config);
    let rows = s["bronze"]["ok"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["table"] == table))
        .and_then(|t| t["rows"].as_u64());
    (rows, s["dead_letters"]["ok"]["count"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_that_cannot_be_decoded_go_to_the_dlq_table_and_the_run_goes_on() {
    // SQL_ASCII stores text bytes unchecked: row 2 holds Latin-1, which is not UTF-8.
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db_with(
        &admin,
        "pgdlq",
        "TEMPLATE template0 ENCODING 'SQL_ASCII' LOCALE 'C'",
        "CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL);
         INSERT INTO notes VALUES (1, 'first'), (2, E'caf\\351'), (3, 'third');",
    )
    .await;
    let slot = unique("slot");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "pipeline-pg-dlq-test"
[sources.postgres]
url = "{src_url}"
publication = "notes_pub"
slot = "{slot}"
tables = ["notes"]
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[pipeline]
batch_max_wait_ms = 100
[telemetry]
listen = ""
"#,
            lake = lake.display(),
        ),
    )
    .unwrap();
    let run = start(&config);
    wait_for(
        "the good snapshot rows in Bronze, the bad one in _dlq",
        async || bronze_and_dead_letters(&config, "public.notes") == (Some(2), Some(1)),
    )
    .await;
    src.batch_execute("INSERT INTO notes VALUES (4, 'streamed')")
        .await
        .unwrap();
    wait_for("the streamed row", async || {
        bronze_and_dead_letters(&config, "public.notes").0 == Some(3)
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");
    // The run's one destination (here the default, Bronze's `_dlq` table) holds the row as it
    // arrived, with the table, its position and key, and why.
    let letters = common::delta_rows(&lake.join("_dlq"));
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["_source"], "public.notes", "{letter}");
    assert_eq!(letter["_key"], r#"{"id":2}"#, "{letter}");
    assert!(
        letter["_position"]
            .as_str()
            .unwrap()
            .starts_with("postgres@"),
        "{letter}"
    );
    let error = letter["error"].as_str().unwrap();
    assert!(
        error.contains("column body (text) is not valid UTF-8"),
        "{error}"
    );
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(letter["raw_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, b"2\tcaf\xe9");

    // Restart: the snapshot (dead-lettered row included) is past; only the new change comes.
    let run = start(&config);
    src.batch_execute("INSERT INTO notes VALUES (5, 'after the restart')")
        .await
        .unwrap();
    wait_for("the change after the restart", async || {
        bronze_and_dead_letters(&config, "public.notes").0 == Some(4)
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(common::bronze_positions(&lake.join("public.notes")), (4, 4));
    assert_eq!(common::delta_rows(&lake.join("_dlq")).len(), 1);

    drop(src);
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE {dbname} WITH (FORCE)"))
        .await
        .unwrap();
}

/// A Debezium PostgreSQL change event with its Kafka Connect schema (the JSON converter's
/// `schemas.enable=true`, Debezium's defaults: `decimal.handling.mode=precise`,
/// `time.precision.mode=adaptive`): `orders(id int, placed timestamp, paid_at timestamptz,
/// amount numeric(10,2), day date, note text)`, plus `qty smallint` when `with_qty`.
fn debezium_order(op: &str, after: serde_json::Value, with_qty: bool) -> Vec<u8> {
    use serde_json::json;
    let mut fields = vec![
        json!({"type": "int32", "optional": false, "field": "id"}),
        json!({"type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp",
               "version": 1, "field": "placed"}),
        json!({"type": "string", "optional": true, "name": "io.debezium.time.ZonedTimestamp",
               "version": 1, "field": "paid_at"}),
        json!({"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal",
               "version": 1, "parameters": {"scale": "2", "connect.decimal.precision": "10"},
               "field": "amount"}),
        json!({"type": "int32", "optional": true, "name": "io.debezium.time.Date", "version": 1,
               "field": "day"}),
        json!({"type": "string", "optional": true, "field": "note"}),
    ];
    if with_qty {
        fields.push(json!({"type": "int16", "optional": true, "field": "qty"}));
    }
    let value = |field: &str| {
        json!({"type": "struct", "fields": fields, "optional": true,
               "name": "shop.public.orders.Value", "field": field})
    };
    json!({
        "schema": {"type": "struct", "optional": false, "name": "shop.public.orders.Envelope",
            "version": 2, "fields": [value("before"), value("after"),
            {"type": "struct", "optional": false, "name": "io.debezium.connector.postgresql.Source",
             "field": "source", "fields": [
                {"type": "string", "optional": false, "field": "connector"},
                {"type": "int64", "optional": false, "field": "ts_ms"},
                {"type": "string", "optional": false, "field": "table"},
                {"type": "int64", "optional": true, "field": "lsn"}]},
            {"type": "string", "optional": false, "field": "op"},
            {"type": "int64", "optional": true, "field": "ts_ms"}]},
        "payload": {"before": null, "after": after, "op": op, "ts_ms": 1_714_979_290_000_i64,
            "source": {"connector": "postgresql", "ts_ms": 1_714_979_289_900_i64,
                       "table": "orders", "lsn": 24_023_128}}
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_topic_without_declared_columns_gets_typed_bronze_from_the_envelope_schema() {
    use serde_json::json;
    let topic = create_topic(1).await;
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    let lake = dir.path().join("lake");
    std::fs::write(
        &config,
        format!(
            r#"
name = "debezium-test"
[sources.kafka]
brokers = "{brokers}"
group_id = "{group}"
drain_timeout_ms = 2000
commit_interval_ms = 200
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
[[sources.kafka.topics]]
name = "{topic}"
format = "debezium"
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[pipeline]
batch_max_wait_ms = 100
[telemetry]
listen = ""
"#,
            brokers = env("TRIBUTARY_KAFKA_BROKERS"),
            lake = lake.display(),
        ),
    )
    .unwrap();
    let key = |id: i32| {
        format!(
            r#"{{"schema":{{"type":"struct","fields":[{{"type":"int32","optional":false,"field":"id"}}],"optional":false,"name":"shop.public.orders.Key"}},"payload":{{"id":{id}}}}}"#
        )
    };
    // 2024-05-06T07:08:09.123456 as µs since the epoch; 12.34 and -0.05 as unscaled base64; day
    // 19849 = 2024-05-06. The third event comes with a column added at the source.
    let messages = vec![
        (
            key(1),
            debezium_order(
                "r",
                json!({"id": 1, "placed": 1_714_979_289_123_456_i64,
                       "paid_at": "2024-05-06T07:08:09.123456Z", "amount": "BNI=",
                       "day": 19_849, "note": "first"}),
                false,
            ),
        ),
        (
            key(2),
            debezium_order(
                "c",
                json!({"id": 2, "placed": 0, "paid_at": null, "amount": "+w==",
                       "day": -1, "note": null}),
                false,
            ),
        ),
        (
            key(2),
            debezium_order(
                "u",
                json!({"id": 2, "placed": 0, "paid_at": "2024-05-06T09:00:00+02:00",
                       "amount": "AA==", "day": 0, "note": "paid", "qty": 3}),
                true,
            ),
        ),
    ];
    let end = produce(&topic, &messages, 1).await;
    let run = start(&config);
    // Offsets are committed only once the events are durable in Bronze.
    wait_for("the three events committed", async || {
        committed(&topic, &group, 1) == vec![Some(end[0])]
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");

    // Read back by an independent reader (Python deltalake).
    let script = r#"
import datetime, json, os, sys
from deltalake import DeltaTable
t = DeltaTable(sys.argv[1]).to_pyarrow_table()
def plain(v):
    return v.isoformat() if isinstance(v, (datetime.date, datetime.datetime)) else v
cols = ["_position_major", "_position_minor", "_op", "id", "placed", "paid_at", "amount", "day",
        "note", "qty", "_payload"]
rows = sorted(zip(*[[plain(v) for v in t.column(c).to_pylist()] for c in cols]),
              key=lambda r: (r[0], r[1]))
print(json.dumps({"fields": {f.name: str(f.type) for f in t.schema},
                  "rows": [dict(zip(cols, r)) for r in rows]}))
sys.stdout.flush()
os._exit(0)  # deltalake's runtime threads can abort the interpreter at exit
"#;
    let out = std::process::Command::new(env("TRIBUTARY_PYTHON"))
        .arg("-c")
        .arg(script)
        .arg(lake.join(&topic))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fields = &got["fields"];
    assert_eq!(fields["id"], "int32", "{fields}");
    assert_eq!(fields["placed"], "timestamp[us]", "{fields}");
    assert_eq!(fields["paid_at"], "timestamp[us, tz=UTC]", "{fields}");
    assert_eq!(fields["amount"], "string", "{fields}");
    assert_eq!(fields["day"], "date32[day]", "{fields}");
    assert_eq!(fields["note"], "string", "{fields}");
    assert_eq!(fields["qty"], "int16", "{fields}");
    let rows = got["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{got}");
    let row = |i: usize, c: &str| rows[i][c].clone();
    assert_eq!(row(0, "_op"), "snapshot");
    assert_eq!(row(0, "id"), 1);
    assert_eq!(row(0, "placed"), "2024-05-06T07:08:09.123456");
    assert_eq!(row(0, "paid_at"), "2024-05-06T07:08:09.123456+00:00");
    assert_eq!(row(0, "amount"), "12.34");
    assert_eq!(row(0, "day"), "2024-05-06");
    assert_eq!(row(0, "note"), "first");
    assert_eq!(
        row(0, "qty"),
        json!(null),
        "written before the column existed"
    );
    assert_eq!(row(1, "placed"), "1970-01-01T00:00:00");
    assert_eq!(row(1, "paid_at"), json!(null));
    assert_eq!(row(1, "amount"), "-0.05");
    assert_eq!(row(1, "day"), "1969-12-31");
    assert_eq!(row(2, "_op"), "update");
    assert_eq!(row(2, "paid_at"), "2024-05-06T07:00:00+00:00");
    assert_eq!(row(2, "amount"), "0.00");
    assert_eq!(row(2, "qty"), 3);
    // Every column was typed: nothing left over in `_payload`.
    for i in 0..3 {
        assert_eq!(row(i, "_payload"), json!(null), "{got}");
    }
}
