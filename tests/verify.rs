//! `tributary verify` on real services: the pipeline's pgvector tables verify clean; every kind
//! of tampering (and a source change the connector has not seen) is reported, with exit 1;
//! a database it cannot reach is exit 2 with the password redacted.

mod common;

use std::path::Path;
use std::process::Command;

use common::run::{start, stop, wait_for};
use common::{env, pg_connect, unique};

fn verify(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("verify")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn has_line(stdout: &str, start: &str) -> bool {
    stdout.lines().any(|l| l.starts_with(start))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_is_clean_after_the_pipeline_and_reports_every_difference() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db(
        &admin,
        "verifysrc",
        "CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, note text NOT NULL,
                              amount numeric(10,2), weight real, placed timestamptz, tags text[]);
         INSERT INTO orders SELECT g, 'Customer ' || (g % 5),
                                   CASE WHEN g <= 2 THEN repeat('the river runs past the old mill ', 100) || g
                                        ELSE 'note number ' || g END, g * 1.25,
                                   g * 0.1, '2024-01-01 12:00:00+02'::timestamptz + g * interval '1 hour',
                                   ARRAY['t' || g, 'x']
         FROM generate_series(1, 30) g;
         CREATE TABLE items (order_id int, sku text, qty int NOT NULL, PRIMARY KEY (order_id, sku));
         INSERT INTO items SELECT o, s, o + length(s) FROM generate_series(1, 4) o,
                                  unnest(ARRAY['A-1', 'a-1', 'B', 'Zz']) s;",
    )
    .await;
    let slot = unique("slot");
    let schema = unique("verify");
    let dir = tempfile::tempdir().unwrap();
    let run_config = format!(
        r#"
name = "verify-test"
[sources.postgres]
url = "{src_url}"
publication = "verify_pub"
slot = "{slot}"
tables = ["orders", "items"]
[embedding]
model_dir = "{model}"
[embedding.templates]
"public.orders" = "{{customer}} wrote: {{note}}"
[embedding.chunking."public.orders"]
chunk_tokens = 128
chunk_overlap = 16
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[sinks.pgvector.payload_columns]
"public.items" = ["sku", "qty"]
[pipeline]
batch_max_wait_ms = 100
[telemetry]
listen = ""
"#,
        model = env("TRIBUTARY_MODEL_DIR"),
        pg = env("TRIBUTARY_PG_URL"),
    );
    let config = dir.path().join("run.toml");
    std::fs::write(&config, &run_config).unwrap();
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let orders = format!("\"{schema}\".\"orders\"");
    let items = format!("\"{schema}\".\"items\"");
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
            "SELECT count(*) FROM {orders} WHERE embedding IS NOT NULL"
        ))
        .await
            == 30
            && count(format!("SELECT count(*) FROM {items}")).await == 16
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");
    // The two long notes (~700 tokens) are in windows of 128 sharing 16; the rest in one each.
    let chunks = |id: i32| {
        count(format!(
            "SELECT count(*) FROM \"{schema}\".orders_chunks WHERE id = {id}"
        ))
    };
    assert!(chunks(1).await >= 6 && chunks(2).await >= 6, "{log}");
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM (SELECT id FROM \"{schema}\".orders_chunks GROUP BY id
              HAVING count(*) = 1) one"
        ))
        .await,
        28
    );

    // The verify configuration also names a Kafka topic: it is listed as skipped, never read.
    let verify_config = dir.path().join("verify.toml");
    std::fs::write(
        &verify_config,
        format!(
            "{run_config}\n[sources.kafka]\nbrokers = \"{}\"\ngroup_id = \"g\"\n\
             [[sources.kafka.topics]]\nname = \"events\"\n",
            env("TRIBUTARY_KAFKA_BROKERS")
        ),
    )
    .unwrap();

    let (code, stdout, stderr) = verify(&verify_config, &["--sample", "1000"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(
            "public.orders: 30 rows, 0 missing, 0 extra, 0 payload, 0 hash, 0 vector (30 sampled)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "public.items: 16 rows, 0 missing, 0 extra, 0 payload, 0 hash, 0 vector \
             (no embedding template)"
        ),
        "{stdout}"
    );
    assert!(
        has_line(&stdout, "skip     events: a Kafka topic"),
        "{stdout}"
    );

    // Tamper with the pgvector tables, and change the source behind the stopped connector.
    pg.batch_execute(&format!(
        "DELETE FROM {orders} WHERE id = 3;
         UPDATE {orders} SET payload = jsonb_set(payload, '{{note}}', '\"tampered\"') WHERE id = 5;
         UPDATE {orders} SET text_hash = text_hash + 1 WHERE id = 7;
         UPDATE {orders} SET embedding = (SELECT embedding FROM {orders} WHERE id = 20) WHERE id = 9;
         UPDATE {orders} SET embedding = NULL WHERE id = 11;
         INSERT INTO {orders} (id, payload, embedding, text_hash, _pos_major, _pos_minor)
           SELECT 999, payload, embedding, text_hash, _pos_major, _pos_minor FROM {orders} WHERE id = 1;
         UPDATE {items} SET payload = jsonb_set(payload, '{{qty}}', '77') WHERE order_id = 2 AND sku = 'a-1';"
    ))
    .await
    .unwrap();
    src.batch_execute("UPDATE orders SET note = 'changed behind its back' WHERE id = 13")
        .await
        .unwrap();

    let (code, stdout, stderr) = verify(&verify_config, &["--sample", "1000"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    for line in [
        r#"missing  public.orders {"id":3}"#,
        r#"extra    public.orders {"id":999}"#,
        r#"payload  public.orders {"id":5}: note: "note number 5" ≠ stored "tampered""#,
        r#"payload  public.orders {"id":13}: note: "changed behind its back" ≠ stored "note number 13""#,
        r#"hash     public.orders {"id":7}: stored text_hash"#,
        r#"hash     public.orders {"id":13}: stored text_hash"#,
        r#"vector   public.orders {"id":9}: cosine"#,
        r#"vector   public.orders {"id":11}: embedding is NULL"#,
        r#"vector   public.orders {"id":13}: cosine"#,
        r#"payload  public.items {"order_id":2,"sku":"a-1"}: qty: 5 ≠ stored 77"#,
    ] {
        assert!(has_line(&stdout, line), "no line {line:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains(
            "public.orders: 30 rows, 1 missing, 1 extra, 2 payload, 2 hash, 3 vector (28 sampled)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("public.items: 16 rows, 0 missing, 0 extra, 1 payload, 0 hash, 0 vector"),
        "{stdout}"
    );
    // Nothing else was reported: every other row compared equal.
    let reported = stdout
        .lines()
        .filter(|l| {
            ["missing ", "extra ", "payload ", "hash ", "vector "]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .count();
    assert_eq!(reported, 10, "{stdout}");

    // Without a sample only the NULL embedding is a vector difference; one table on its own.
    let (code, stdout, stderr) = verify(&verify_config, &["--sample", "0", "--table", "orders"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(
            "public.orders: 30 rows, 1 missing, 1 extra, 2 payload, 2 hash, 1 vector (0 sampled)"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("public.items"), "{stdout}");
    // Every vector, checked as the merge goes.
    let (code, stdout, stderr) = verify(&verify_config, &["--all-vectors", "--table", "orders"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(
            "public.orders: 30 rows, 1 missing, 1 extra, 2 payload, 2 hash, 3 vector (28 sampled)"
        ),
        "{stdout}"
    );
    // A small sample is deterministic: the same rows each run.
    let (_, first, _) = verify(&verify_config, &["--sample", "5", "--table", "orders"]);
    let (_, second, _) = verify(&verify_config, &["--sample", "5", "--table", "orders"]);
    assert_eq!(first, second);
    assert!(first.contains("(5 sampled)"), "{first}");
    // Only a Kafka topic: nothing can be compared.
    let (code, stdout, _) = verify(&verify_config, &["--table", "events"]);
    assert_eq!(code, 2, "{stdout}");

    drop(src);
    common::drop_source_db(&admin, &dbname, &slot).await;
    pg.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

#[test]
fn an_unreachable_database_exits_two_and_never_shows_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        r#"
name = "verify-unreachable"
[sources.postgres]
url = "postgres://tributary:hunter2secret@127.0.0.1:1/db"
publication = "p"
slot = "s"
tables = ["orders"]
[sinks.pgvector]
url = "postgres://tributary:hunter2secret@127.0.0.1:1/db"
"#,
    )
    .unwrap();
    let (code, stdout, stderr) = verify(&config, &["--timeout", "5"]);
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(stderr.contains("sources.postgres"), "{stderr}");
    assert!(stderr.contains("tributary:***@"), "{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("hunter2secret"));
}
