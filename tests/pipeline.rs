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
