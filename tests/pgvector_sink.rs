//! The pgvector sink against real PostgreSQL + pgvector: the target table equals the source.

mod common;

use std::path::Path;

use common::{env, pg_connect, unique};
use tributary::config::Config;
use tributary::event::{ChangeEvent, Lsn, Op, Position, Row, Value};
use tributary::sink::pgvector::{PgvectorError, PgvectorSink};

const DIM: usize = 8;

fn sink_config(schema: &str, extra: &str) -> tributary::config::PgvectorSinkConfig {
    let text = format!(
        r#"
name = "t"
[sources.kafka]
brokers = "x:1"
group_id = "g"
[[sources.kafka.topics]]
name = "orders"
[sinks.pgvector]
url = "{}"
schema = "{schema}"
dimension = {DIM}
{extra}
"#,
        env("TRIBUTARY_PG_URL")
    );
    Config::parse(&text, Path::new("."), |_| None)
        .unwrap()
        .sinks
        .pgvector
        .unwrap()
}

/// A unit vector pointing mostly along axis `i`.
fn vec_along(i: usize) -> Vec<f32> {
    let mut v = vec![0.05f32; DIM];
    v[i % DIM] = 1.0;
    v
}

fn pos(lsn: u64, ord: u64) -> Position {
    tributary::source::postgres::position(Lsn(lsn), ord)
}

fn event(op: Op, id: i32, note: Option<&str>, position: Position) -> ChangeEvent {
    let key: Row = [("id", Value::Int32(id))].into_iter().collect();
    let after = note.map(|n| {
        [("id", Value::Int32(id)), ("note", Value::Text(n.into()))]
            .into_iter()
            .collect()
    });
    ChangeEvent {
        source: "public.items".into(),
        op,
        key,
        before: None,
        after,
        schema_version: 1,
        position,
        source_ts: None,
        embedding: note.map(|_| vec_along(id as usize)),
        text_hash: note.map(|n| n.len() as u64),
        chunks: None,
        schema: None,
        origin: None,
    }
}

/// The target table as (id, note, has embedding), ordered by id.
async fn contents(client: &tokio_postgres::Client, schema: &str) -> Vec<(i32, String, bool)> {
    client
        .query(
            &format!(
                "SELECT id, payload->>'note', embedding IS NOT NULL FROM \"{schema}\".items ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn index_count(c: &tokio_postgres::Client, schema: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND indexdef LIKE '%hnsw%'",
        &[&schema],
    )
    .await
    .unwrap()
    .get(0)
}

async fn xmins(c: &tokio_postgres::Client, schema: &str) -> Vec<String> {
    c.query(
        &format!("SELECT xmin::text FROM \"{schema}\".items ORDER BY id"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn snapshot_then_stream_leaves_the_table_equal_to_the_source() {
    let schema = unique("pgv");
    let client = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let mut sink = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();

    let snapshot: Vec<_> = (1..=5)
        .map(|i| {
            event(
                Op::Snapshot,
                i,
                Some(&format!("row {i}")),
                pos(100, i as u64),
            )
        })
        .collect();
    let out = sink.write(&snapshot).await.unwrap();
    assert_eq!(out.applied, 5);
    // No index while the snapshot loads.
    assert_eq!(index_count(&client, &schema).await, 0);

    let stream = vec![
        event(Op::Insert, 6, Some("row 6"), pos(200, 0)),
        event(Op::Update, 2, Some("row 2 v2"), pos(200, 1)),
        event(Op::Delete, 3, None, pos(200, 2)),
        event(Op::Update, 2, Some("row 2 v3"), pos(300, 0)),
        event(Op::Insert, 7, Some("row 7"), pos(300, 1)),
        event(Op::Delete, 7, None, pos(300, 2)),
    ];
    let out = sink.write(&stream).await.unwrap();
    assert!(out.dead_letters.is_empty());
    assert_eq!(
        contents(&client, &schema).await,
        vec![
            (1, "row 1".into(), true),
            (2, "row 2 v3".into(), true),
            (4, "row 4".into(), true),
            (5, "row 5".into(), true),
            (6, "row 6".into(), true),
        ]
    );
    // The first streamed batch ended the snapshot: the HNSW index exists now, and answers.
    assert_eq!(index_count(&client, &schema).await, 1);
    let nearest: i32 = client
        .query_one(
            &format!("SELECT id FROM \"{schema}\".items ORDER BY embedding <=> $1 LIMIT 1"),
            &[&pgvector::Vector::from(vec_along(4))],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(nearest, 4);

    // Truncate empties it; later inserts land.
    let out = sink
        .write(&[
            event(Op::Insert, 8, Some("row 8"), pos(400, 0)),
            ChangeEvent {
                op: Op::Truncate,
                key: Row::new(),
                after: None,
                embedding: None,
                ..event(Op::Truncate, 0, None, pos(400, 1))
            },
            event(Op::Insert, 9, Some("row 9"), pos(400, 2)),
        ])
        .await
        .unwrap();
    assert!(out.dead_letters.is_empty());
    assert_eq!(
        contents(&client, &schema).await,
        vec![(9, "row 9".into(), true)]
    );
}

#[tokio::test]
async fn replays_and_older_changes_change_nothing() {
    let schema = unique("pgv");
    let client = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let mut sink = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();
    let batch = vec![
        event(Op::Insert, 1, Some("a"), pos(10, 0)),
        event(Op::Insert, 2, Some("b"), pos(10, 1)),
        event(Op::Update, 1, Some("a2"), pos(20, 0)),
    ];
    assert_eq!(sink.write(&batch).await.unwrap().applied, 2);
    let before = contents(&client, &schema).await;
    let xmin_before = xmins(&client, &schema).await;

    // The same batch again, through the same sink and through a restarted one.
    let again = sink.write(&batch).await.unwrap();
    assert_eq!((again.applied, again.skipped), (0, 3));
    let mut restarted = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();
    assert_eq!(
        restarted.positions().values().next(),
        Some(&pos(20, 0)),
        "the sink reports where it is"
    );
    assert_eq!(restarted.write(&batch).await.unwrap().skipped, 3);

    // An older change than the stored one is ignored, even past the stream watermark
    // (as from a second writer): the per-row position guards it.
    client
        .batch_execute(&format!("DELETE FROM \"{schema}\"._tributary_positions"))
        .await
        .unwrap();
    let mut fresh = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();
    let out = fresh
        .write(&[event(Op::Update, 1, Some("stale"), pos(15, 0))])
        .await
        .unwrap();
    assert_eq!(out.applied, 1);
    assert_eq!(contents(&client, &schema).await, before);
    assert_eq!(
        xmins(&client, &schema).await,
        xmin_before,
        "rows were rewritten"
    );

    // A re-read snapshot row that exists already (a restarted snapshot) falls back from the
    // bulk COPY to the merge and, being unchanged, writes nothing.
    let out = fresh
        .write(&[event(Op::Snapshot, 1, Some("a2"), pos(25, 0))])
        .await
        .unwrap();
    assert_eq!(out.applied, 1);
    assert_eq!(
        xmins(&client, &schema).await,
        xmin_before,
        "an unchanged snapshot row was rewritten"
    );

    // An update whose payload and embedding are unchanged writes nothing.
    let out = fresh
        .write(&[event(Op::Update, 2, Some("b"), pos(30, 0))])
        .await
        .unwrap();
    assert_eq!(out.applied, 1);
    assert_eq!(
        xmins(&client, &schema).await,
        xmin_before,
        "a no-op update wrote a row"
    );
    // A real change does write.
    fresh
        .write(&[event(Op::Update, 2, Some("b2"), pos(31, 0))])
        .await
        .unwrap();
    assert_ne!(xmins(&client, &schema).await[1], xmin_before[1]);
}

#[tokio::test]
async fn unchanged_toast_and_missing_embedding_keep_the_stored_values() {
    let schema = unique("pgv");
    let client = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let mut sink = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();
    let mut first = event(Op::Insert, 1, Some("short"), pos(1, 0));
    if let Some(after) = first.after.as_mut() {
        after.push("big", Value::Text("x".repeat(10_000).into()));
    }
    sink.write(&[first]).await.unwrap();
    // An update that did not touch the TOASTed column, whose text was unchanged (no embedding).
    let mut update = event(Op::Update, 1, Some("short v2"), pos(2, 0));
    if let Some(after) = update.after.as_mut() {
        after.push("big", Value::UnchangedToast);
    }
    update.embedding = None;
    update.text_hash = None;
    sink.write(&[update]).await.unwrap();
    let row = client
        .query_one(
            &format!(
                "SELECT payload->>'note', length(payload->>'big'), embedding = $1, text_hash
                   FROM \"{schema}\".items"
            ),
            &[&pgvector::Vector::from(vec_along(1))],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "short v2");
    assert_eq!(row.get::<_, Option<i32>>(1), Some(10_000));
    assert_eq!(row.get::<_, Option<bool>>(2), Some(true));
    assert_eq!(row.get::<_, Option<i64>>(3), Some(5));
    assert_eq!(
        sink.stored_text_hash("public.items", &first_key(1))
            .await
            .unwrap(),
        Some(5)
    );
    assert_eq!(
        sink.stored_text_hash("public.items", &first_key(99))
            .await
            .unwrap(),
        None
    );
}

fn first_key(id: i32) -> Row {
    [("id", Value::Int32(id))].into_iter().collect()
}

#[tokio::test]
async fn dimension_mismatches_are_clear_errors_and_dead_letters() {
    let schema = unique("pgv");
    let client = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let mut sink = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();
    let mut bad = event(Op::Insert, 2, Some("bad"), pos(1, 1));
    bad.embedding = Some(vec![1.0, 0.0, 0.0]);
    let out = sink
        .write(&[
            event(Op::Insert, 1, Some("good"), pos(1, 0)),
            bad,
            event(Op::Insert, 3, Some("good too"), pos(1, 2)),
        ])
        .await
        .unwrap();
    assert_eq!(out.dead_letters.len(), 1, "{out:?}");
    let dl = &out.dead_letters[0];
    assert_eq!(dl.position, pos(1, 1));
    assert!(
        dl.error.contains("3 dimensions") && dl.error.contains("vector(8)"),
        "{}",
        dl.error
    );
    let ids: Vec<i32> = contents(&client, &schema)
        .await
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(ids, vec![1, 3]);

    // A sink configured for another dimension refuses the existing table at start.
    let mut cfg = sink_config(&schema, "");
    cfg.dimension = 384;
    let mut other = PgvectorSink::connect(cfg).await.unwrap();
    let err = other
        .write(&[event(Op::Insert, 4, Some("x"), pos(2, 0))])
        .await
        .unwrap_err();
    assert!(matches!(err, PgvectorError::Config(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("vector(8)") && text.contains("vector(384)"),
        "{text}"
    );
}

#[tokio::test]
async fn a_lost_connection_is_retried_and_the_batch_lands_once() {
    let schema = unique("pgv");
    let client = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    // Its own application_name, so that only this sink's connection is killed.
    let app = unique("pgv_app");
    let mut cfg = sink_config(&schema, "");
    cfg.url = tributary::secret::ConnString::new(format!(
        "{}?application_name={app}",
        env("TRIBUTARY_PG_URL")
    ));
    let mut sink = PgvectorSink::connect(cfg).await.unwrap();
    sink.write(&[event(Op::Insert, 1, Some("a"), pos(1, 0))])
        .await
        .unwrap();
    // Kill the sink's server connection, as a failover or restart would.
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1);
    let out = sink
        .write(&[
            event(Op::Insert, 2, Some("b"), pos(2, 0)),
            event(Op::Update, 1, Some("a2"), pos(2, 1)),
        ])
        .await
        .unwrap();
    assert_eq!(out.applied, 2);
    assert_eq!(
        contents(&client, &schema).await,
        vec![(1, "a2".into(), true), (2, "b".into(), true)]
    );
}

#[tokio::test]
async fn halfvec_storage_with_an_l2_index() {
    let schema = unique("pgv");
    let client = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let cfg = sink_config(
        &schema,
        "halfvec = true\n[sinks.pgvector.index]\ndistance = \"l2\"\nm = 8\nef_construction = 32",
    );
    let mut sink = PgvectorSink::connect(cfg).await.unwrap();
    let snapshot: Vec<_> = (0..6)
        .map(|i| event(Op::Snapshot, i, Some(&format!("n{i}")), pos(1, i as u64)))
        .collect();
    sink.write(&snapshot).await.unwrap();
    sink.finish_snapshot("public.items").await.unwrap();
    let row = client
        .query_one(
            "SELECT format_type(a.atttypid, a.atttypmod), i.indexdef
               FROM pg_attribute a, pg_indexes i
              WHERE a.attrelid = to_regclass($1) AND a.attname = 'embedding'
                AND i.schemaname = $2 AND i.indexdef LIKE '%hnsw%'",
            &[&format!("\"{schema}\".items"), &schema],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "halfvec(8)");
    let indexdef: String = row.get(1);
    assert!(
        indexdef.contains("halfvec_l2_ops") && indexdef.contains("m='8'"),
        "{indexdef}"
    );
    let nearest: i32 = client
        .query_one(
            &format!("SELECT id FROM \"{schema}\".items ORDER BY embedding <-> $1::vector::halfvec LIMIT 1"),
            &[&pgvector::Vector::from(vec_along(3))],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(nearest, 3);
}

fn truncate_at(position: Position) -> ChangeEvent {
    ChangeEvent {
        key: Row::new(),
        after: None,
        embedding: None,
        text_hash: None,
        chunks: None,
        ..event(Op::Truncate, 0, None, position)
    }
}

/// After a restart nothing is cached: a batch whose only event for a source is a TRUNCATE must
/// still truncate its table (it used to panic, and every restart re-read the same TRUNCATE).
#[tokio::test]
async fn a_truncate_alone_after_a_restart_empties_the_table() {
    let schema = unique("pgv");
    let client = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    {
        let mut before = PgvectorSink::connect(sink_config(&schema, ""))
            .await
            .unwrap();
        let snapshot: Vec<_> = (1..=3)
            .map(|i| {
                event(
                    Op::Snapshot,
                    i,
                    Some(&format!("row {i}")),
                    pos(100, i as u64),
                )
            })
            .collect();
        before.write(&snapshot).await.unwrap();
    }
    assert_eq!(contents(&client, &schema).await.len(), 3);

    // "Restart": a new sink, then the TRUNCATE the source sent while it was stopped.
    let mut sink = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();
    let out = sink.write(&[truncate_at(pos(200, 0))]).await.unwrap();
    assert!(out.dead_letters.is_empty());
    assert_eq!(contents(&client, &schema).await, vec![]);
    // Replayed (the acknowledgement was lost): nothing changes, nothing fails.
    let out = sink.write(&[truncate_at(pos(200, 0))]).await.unwrap();
    assert_eq!(out.skipped, 1);
    // The table found for the truncate serves the next changes with the right key.
    sink.write(&[
        event(Op::Insert, 4, Some("row 4"), pos(300, 0)),
        event(Op::Update, 4, Some("row 4 v2"), pos(300, 1)),
    ])
    .await
    .unwrap();
    assert_eq!(
        contents(&client, &schema).await,
        vec![(4, "row 4 v2".into(), true)]
    );

    // A truncate of a source whose table was never created: nothing to do, no table made.
    let mut fresh = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();
    let never = ChangeEvent {
        source: "public.never_written".into(),
        ..truncate_at(pos(400, 0))
    };
    fresh.write(&[never]).await.unwrap();
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("\"{schema}\".never_written")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
}

/// The first batch a sink ever writes into a new schema may hold nothing but truncates (a
/// keyless table's snapshot read again after a crash starts with one): the position is still
/// recorded, so the batch commits and is skipped when replayed. It used to fail with
/// `_tributary_positions does not exist` on every restart.
#[tokio::test]
async fn a_first_batch_of_truncates_only_records_its_position() {
    let schema = unique("pgv");
    let client = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let mut sink = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();
    let truncate = ChangeEvent {
        source: "public.no_key".into(),
        ..truncate_at(pos(500, 0))
    };
    let out = sink.write(std::slice::from_ref(&truncate)).await.unwrap();
    assert!(out.dead_letters.is_empty());
    let recorded: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\"._tributary_positions WHERE source = 'public.no_key'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1);
    let mut restarted = PgvectorSink::connect(sink_config(&schema, ""))
        .await
        .unwrap();
    assert_eq!(restarted.write(&[truncate]).await.unwrap().skipped, 1);
}
