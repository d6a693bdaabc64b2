//! The pgvector table equals the source under TOAST: `tributary run` against real PostgreSQL
//! with a TOASTed (`STORAGE EXTERNAL`, ~4 kB) column in the embedding template, consecutive
//! updates of one key in one batch, key moves, and restarts with a cold cache. After each phase
//! every pgvector row's payload equals the source row, its `text_hash` is the hash of the current
//! text, and its vector equals a fresh embedding of that text.

mod common;

use std::path::PathBuf;

use common::run::{start, stop, wait_for};
use common::vectors::{big, divergence};
use common::{env, pg_connect, unique};
use tributary::config::EmbeddingConfig;
use tributary::enrich::Embedder;

const ORDERS_TEMPLATE: &str = "{customer}: {note} | {big}";
const DOCS_TEMPLATE: &str = "{title}. {body}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vector_table_equals_the_source_under_toast_key_moves_and_restarts() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let mut seed = String::from(
        "CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, note text NOT NULL,
                              big text NOT NULL);
         ALTER TABLE orders ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE TABLE docs (id int PRIMARY KEY, title text NOT NULL, body text NOT NULL);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
    );
    for id in 1..=12 {
        seed.push_str(&format!(
            "INSERT INTO orders VALUES ({id}, 'Customer {id}', 'note {id}', '{}');
             INSERT INTO docs VALUES ({id}, 'Title {id}', '{}');",
            big(id, 0),
            big(id + 100, 0)
        ));
    }
    let (dbname, src_url, src) = common::create_source_db(&admin, "toastsrc", &seed).await;
    let slot = unique("slot");
    let schema = unique("toast");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "toast-test"
[sources.postgres]
url = "{src_url}"
publication = "toast_pub"
slot = "{slot}"
tables = ["orders", "docs"]
[embedding]
model_dir = "{model}"
[embedding.templates]
"public.orders" = "{ORDERS_TEMPLATE}"
"public.docs" = "{DOCS_TEMPLATE}"
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
# docs keeps only its title in the payload: a TOASTed body must come from the source.
[sinks.pgvector.payload_columns]
"public.docs" = ["id", "title"]
[pipeline]
batch_max_wait_ms = 1000
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
    let orders = format!("\"{schema}\".\"orders\"");
    let docs = format!("\"{schema}\".\"docs\"");
    let mut embedder = Embedder::load(&EmbeddingConfig::for_model(PathBuf::from(env(
        "TRIBUTARY_MODEL_DIR",
    ))))
    .unwrap();
    let count = |sql: String| {
        let pg = &pg;
        async move {
            pg.query_one(&sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };
    let orders_sql = "SELECT id, customer, note, big FROM orders ORDER BY id";
    let docs_sql = "SELECT id, title, body FROM docs ORDER BY id";
    let check = async |embedder: &mut Embedder, phase: &str| {
        let mut diffs = divergence(
            &src,
            &pg,
            embedder,
            orders_sql,
            &orders,
            &["id", "customer", "note", "big"],
            4,
            ORDERS_TEMPLATE,
        )
        .await;
        diffs.extend(
            divergence(
                &src,
                &pg,
                embedder,
                docs_sql,
                &docs,
                &["id", "title", "body"],
                2,
                DOCS_TEMPLATE,
            )
            .await,
        );
        assert!(diffs.is_empty(), "after {phase}:\n{}", diffs.join("\n"));
        // The operator's check agrees: every vector re-embedded, nothing to report.
        let (code, out) = common::vectors::verify(&config, &["--all-vectors"]);
        assert_eq!(code, 0, "tributary verify after {phase}:\n{out}");
    };

    let run = start(&config);
    wait_for("the snapshot in pgvector", async || {
        count(format!(
            "SELECT count(*) FROM {orders} WHERE embedding IS NOT NULL"
        ))
        .await
            == 12
            && count(format!(
                "SELECT count(*) FROM {docs} WHERE embedding IS NOT NULL"
            ))
            .await
                == 12
    })
    .await;
    // One batch (the batcher waits up to a second): the TOASTed column changes, then another
    // column in the next transaction; an insert then an update of the new row; a note update
    // with the TOASTed column untouched; a key move of a row whose TOASTed column is untouched.
    src.batch_execute(&format!(
        "UPDATE orders SET big = '{b1}' WHERE id = 1;
         UPDATE orders SET note = 'note 1, later' WHERE id = 1;
         INSERT INTO orders VALUES (30, 'Customer 30', 'note 30', '{b30}');
         UPDATE orders SET note = 'note 30, later' WHERE id = 30;
         UPDATE orders SET note = 'note 2, later' WHERE id = 2;
         UPDATE orders SET id = 1003 WHERE id = 3;
         UPDATE docs SET title = 'Title 1, later' WHERE id = 1;
         UPDATE docs SET id = 1002 WHERE id = 2;",
        b1 = big(1, 1),
        b30 = big(30, 0)
    ))
    .await
    .unwrap();
    wait_for("the first changes in pgvector", async || {
        count(format!(
            "SELECT count(*) FROM {orders} WHERE id IN (30, 1003)"
        ))
        .await
            == 2
            && count(format!("SELECT count(*) FROM {docs} WHERE id = 1002")).await == 1
            && count(format!(
                "SELECT count(*) FROM {orders} WHERE payload->>'note' = 'note 30, later'"
            ))
            .await
                == 1
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");
    check(&mut embedder, "changes in one batch").await;

    // A restart: the stage's memory is cold, so the values come from the stored payload (orders)
    // or the source (docs, whose payload lacks the body).
    src.batch_execute(
        "UPDATE orders SET note = 'note 4, after restart' WHERE id = 4;
         UPDATE orders SET note = 'note 1003, after restart' WHERE id = 1003;
         UPDATE orders SET id = 1005 WHERE id = 5;
         UPDATE docs SET title = 'Title 4, after restart' WHERE id = 4;
         UPDATE docs SET id = 1006 WHERE id = 6;",
    )
    .await
    .unwrap();
    let run = start(&config);
    wait_for("the changes after the restart", async || {
        count(format!("SELECT count(*) FROM {orders} WHERE id = 1005")).await == 1
            && count(format!("SELECT count(*) FROM {docs} WHERE id = 1006")).await == 1
            && count(format!(
                "SELECT count(*) FROM {orders} WHERE payload->>'note' = 'note 1003, after restart'"
            ))
            .await
                == 1
            && count(format!(
                "SELECT count(*) FROM {docs} WHERE payload->>'title' = 'Title 4, after restart'"
            ))
            .await
                == 1
    })
    .await;
    let (code, stderr) = stop(run, &config);
    assert_eq!(code, 0, "{stderr}");
    check(&mut embedder, "changes after a restart").await;
    // Bronze holds every change once: 24 snapshot rows + 8 + 5 changes.
    let lake = dir.path().join("lake");
    let (orders_rows, _) = common::bronze_positions(&lake.join("public.orders"));
    let (docs_rows, _) = common::bronze_positions(&lake.join("public.docs"));
    assert_eq!(orders_rows + docs_rows, 24 + 13);

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
