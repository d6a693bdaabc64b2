//! The Bronze Delta sink against real stores: local disk, a real S3 server (SeaweedFS, from
//! `TRIBUTARY_S3_ENDPOINT`) and azurite. Each behaviour is one async body run against every
//! backend it applies to; the store-restart test on S3 is in tests/seaweedfs.rs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{env, unique};
use std::sync::Arc;
use tributary::config::Config;
use tributary::dead_letter::DeadLetter;

use tributary::event::{ChangeEvent, Lsn, Op, Position, Row, RowSchema, Value, ValueType};
use tributary::sink::delta::{DLQ_TABLE, DeltaSink};

const SOURCE: &str = "public.orders";

#[derive(Debug, Clone, Copy)]
enum Backend {
    Local,
    S3,
    Azure,
}

impl Backend {
    /// The `[sinks.delta]` section for a fresh root on this backend.
    fn config(self, extra: &str) -> tributary::config::DeltaSinkConfig {
        let root = unique("bronze");
        let section = match self {
            Backend::Local => {
                let dir = std::env::temp_dir().join(&root);
                format!("uri = \"file://{}\"\n{extra}", dir.display())
            }
            Backend::S3 => format!(
                "uri = \"s3://{}/{root}\"\n{extra}\n[sinks.delta.storage]\n\
                 aws_endpoint = \"{}\"\naws_allow_http = \"true\"\n",
                env("TRIBUTARY_S3_BUCKET"),
                env("TRIBUTARY_S3_ENDPOINT"),
            ),
            Backend::Azure => {
                // The emulator's account and key come from AZURE_STORAGE_* in the environment.
                env("AZURE_STORAGE_USE_EMULATOR");
                format!(
                    "uri = \"az://{}/{root}\"\n{extra}",
                    env("TRIBUTARY_AZURE_CONTAINER")
                )
            }
        };
        parse(&section)
    }
}

fn parse(section: &str) -> tributary::config::DeltaSinkConfig {
    let text = format!(
        "name = \"t\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\n\
         [[sources.kafka.topics]]\nname = \"orders\"\n[sinks.delta]\n{section}"
    );
    Config::parse(&text, Path::new("."), |_| None)
        .unwrap()
        .sinks
        .delta
        .unwrap()
}

const ALL: [Backend; 3] = [Backend::Local, Backend::S3, Backend::Azure];

fn lsn(lsn: u64, ord: u64) -> Position {
    tributary::source::postgres::position(Lsn(lsn), ord)
}

fn kafka(partition: i32, offset: i64) -> Position {
    tributary::source::kafka::position("orders", partition, offset)
}

fn event(id: i64, position: Position) -> ChangeEvent {
    let key: Row = [("id", Value::Int64(id))].into_iter().collect();
    let after: Row = [
        ("id", Value::Int64(id)),
        ("note", Value::Text(format!("order {id}").into())),
    ]
    .into_iter()
    .collect();
    ChangeEvent {
        source: SOURCE.into(),
        op: Op::Insert,
        key,
        before: None,
        after: Some(after),
        schema_version: 1,
        position,
        source_ts: Some(chrono::Utc::now()),
        embedding: Some(vec![id as f32, 0.5, -0.25]),
        text_hash: None,
        chunks: None,
        schema: None,
        origin: None,
    }
}

/// Events `ids` of one Postgres transaction committed at `commit`.
fn tx(commit: u64, ids: std::ops::Range<i64>) -> Vec<ChangeEvent> {
    ids.enumerate()
        .map(|(i, id)| event(id, lsn(commit, i as u64)))
        .collect()
}

/// The table's schema and every record batch of its current version's data files, read with the
/// `deltalake` crate and the `parquet` reader (as any independent reader would).
async fn table_batches(
    sink: &DeltaSink,
    table: &str,
) -> (arrow::datatypes::SchemaRef, Vec<arrow::array::RecordBatch>) {
    use object_store::ObjectStoreExt as _;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let url = url::Url::parse(&sink.table_uri(table)).unwrap();
    let table = deltalake::open_table(url).await.unwrap();
    let schema = table.snapshot().unwrap().snapshot().arrow_schema();
    let store = table.object_store();
    let paths: Vec<_> = table
        .snapshot()
        .unwrap()
        .log_data()
        .into_iter()
        .map(|add| add.object_store_path())
        .collect();
    let mut batches = Vec::new();
    for path in paths {
        let bytes = store.get(&path).await.unwrap().bytes().await.unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        batches.extend(reader.map(Result::unwrap));
    }
    (schema, batches)
}

/// Every row of the table's current version, read with the `deltalake` crate: (major, minor) →
/// number of times present, plus the `_payload` of each.
async fn read_back(sink: &DeltaSink, table: &str) -> (BTreeMap<(i64, i64), usize>, Vec<String>) {
    use arrow::array::{Array as _, AsArray, Int64Array};
    let mut seen = BTreeMap::new();
    let mut payloads = Vec::new();
    for batch in table_batches(sink, table).await.1 {
        let major: &Int64Array = batch
            .column_by_name("_position_major")
            .unwrap()
            .as_primitive();
        let minor: &Int64Array = batch
            .column_by_name("_position_minor")
            .unwrap()
            .as_primitive();
        for i in 0..batch.num_rows() {
            *seen.entry((major.value(i), minor.value(i))).or_insert(0) += 1;
        }
        if let Some(p) = batch.column_by_name("_payload") {
            // Files rewritten by `optimize` (DataFusion) may store strings as views.
            let p = arrow::compute::cast(p, &arrow::datatypes::DataType::Utf8).unwrap();
            let p = p.as_string::<i32>();
            payloads.extend((0..p.len()).map(|i| p.value(i).to_owned()));
        }
    }
    (seen, payloads)
}

/// Every row of the table's current version as JSON objects (columns a data file lacks are
/// absent), keyed by position, plus the table's Arrow schema.
async fn rows_as_json(
    sink: &DeltaSink,
    table: &str,
) -> (
    BTreeMap<(i64, i64), serde_json::Map<String, serde_json::Value>>,
    arrow::datatypes::SchemaRef,
) {
    let (schema, batches) = table_batches(sink, table).await;
    let mut rows = BTreeMap::new();
    for batch in batches {
        let mut w = arrow::json::ArrayWriter::new(Vec::new());
        w.write(&batch).unwrap();
        w.finish().unwrap();
        let parsed: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_slice(&w.into_inner()).unwrap();
        for row in parsed {
            let key = (
                row["_position_major"].as_i64().unwrap(),
                row["_position_minor"].as_i64().unwrap(),
            );
            assert!(rows.insert(key, row).is_none(), "duplicate row at {key:?}");
        }
    }
    (rows, schema)
}

fn schema_of(columns: &[(&str, ValueType)]) -> Arc<RowSchema> {
    Arc::new(RowSchema {
        columns: columns.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
    })
}

/// An order row as the PostgreSQL source sends it: typed values and the relation's schema.
fn typed_event(
    id: i64,
    position: Position,
    schema: &Arc<RowSchema>,
    extra: &[(&str, Value)],
) -> ChangeEvent {
    let placed = chrono::NaiveDate::from_ymd_opt(2026, 11, 23)
        .unwrap()
        .and_hms_opt(10, 0, id as u32 % 60)
        .unwrap();
    let mut after: Row = [
        ("id", Value::Int64(id)),
        ("note", Value::Text(format!("order {id}").into())),
        ("amount", Value::Numeric(format!("{id}.50").into())),
        ("placed", Value::Timestamp(placed)),
    ]
    .into_iter()
    .collect();
    for (name, value) in extra {
        after.push(*name, value.clone());
    }
    ChangeEvent {
        schema: Some(schema.clone()),
        after: Some(after),
        ..event(id, position)
    }
}

fn all_once(seen: &BTreeMap<(i64, i64), usize>, expected: usize) {
    assert_eq!(seen.len(), expected, "distinct positions: {seen:?}");
    assert!(
        seen.values().all(|&n| n == 1),
        "a row is duplicated: {seen:?}"
    );
}

async fn append_read_back_and_replay(backend: Backend) {
    let cfg = backend.config("");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    assert_eq!(
        sink.committed(SOURCE, &tributary::source::postgres::stream())
            .await
            .unwrap(),
        None
    );
    let first = tx(100, 0..3);
    let second = tx(200, 3..5);
    assert_eq!(sink.write(SOURCE, &first).await.unwrap().rows, 3);
    assert_eq!(sink.write(SOURCE, &second).await.unwrap().rows, 2);

    let (seen, payloads) = read_back(&sink, SOURCE).await;
    all_once(&seen, 5);
    assert!(
        payloads.iter().any(|p| p.contains("\"note\":\"order 4\"")),
        "{payloads:?}"
    );

    // A restarted sink reports where to resume and skips a replayed batch.
    let mut restarted = DeltaSink::new("t", &cfg).unwrap();
    assert_eq!(
        restarted
            .committed(SOURCE, &tributary::source::postgres::stream())
            .await
            .unwrap(),
        Some(lsn(200, 1))
    );
    let replay = restarted.write(SOURCE, &second).await.unwrap();
    assert_eq!((replay.rows, replay.version), (0, None));
    // A batch overlapping the committed position writes only what is new.
    let mut overlap = second.clone();
    overlap.extend(tx(300, 5..7));
    assert_eq!(restarted.write(SOURCE, &overlap).await.unwrap().rows, 2);
    all_once(&read_back(&restarted, SOURCE).await.0, 7);
}

#[tokio::test]
async fn append_read_back_and_replay_on_every_backend() {
    for b in ALL {
        append_read_back_and_replay(b).await;
    }
}

/// A writer that wrote its data files and crashed before committing leaves files no version
/// references; after a restart the batch is written once and vacuum removes the orphans.
async fn crash_before_commit(backend: Backend) {
    let cfg = backend.config("");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    sink.write(SOURCE, &tx(10, 0..2)).await.unwrap();
    let batch = tx(20, 2..5);
    {
        use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
        let url = url::Url::parse(&sink.table_uri(SOURCE)).unwrap();
        let table = deltalake::open_table(url).await.unwrap();
        let refs: Vec<&ChangeEvent> = batch.iter().collect();
        let rb = tributary::sink::delta::bronze::events_to_batch(
            &refs,
            &tributary::sink::delta::bronze::bronze_schema(),
            chrono::Utc::now(),
        )
        .unwrap();
        let mut writer = RecordBatchWriter::for_table(&table).unwrap();
        writer.write(rb).await.unwrap();
        let orphans = writer.flush().await.unwrap();
        assert_eq!(orphans.len(), 1);
        // Dropped here: the crash.
    }
    let mut restarted = DeltaSink::new("t", &cfg).unwrap();
    assert_eq!(
        restarted
            .committed(SOURCE, &tributary::source::postgres::stream())
            .await
            .unwrap(),
        Some(lsn(10, 1))
    );
    assert_eq!(restarted.write(SOURCE, &batch).await.unwrap().rows, 3);
    all_once(&read_back(&restarted, SOURCE).await.0, 5);
    let removed = restarted.vacuum(SOURCE, Duration::ZERO).await.unwrap();
    assert!(removed >= 1, "vacuum removed {removed} files");
    all_once(&read_back(&restarted, SOURCE).await.0, 5);
}

#[tokio::test]
async fn crash_before_commit_on_every_backend() {
    for b in ALL {
        crash_before_commit(b).await;
    }
}

/// Two sinks append to the same table concurrently (one Kafka partition each).
async fn concurrent_writers(backend: Backend) {
    let cfg = backend.config("");
    let mut a = DeltaSink::new("t", &cfg).unwrap();
    let mut b = DeltaSink::new("t", &cfg).unwrap();
    // Create the table first so both writers append to the same one.
    a.write(SOURCE, &[event(0, kafka(9, 0))]).await.unwrap();
    async fn run(sink: &mut DeltaSink, partition: i32) {
        for n in 0..5 {
            let batch: Vec<ChangeEvent> = (0..4)
                .map(|i| event(i, kafka(partition, n * 4 + i)))
                .collect();
            sink.write(SOURCE, &batch).await.unwrap();
        }
    }
    tokio::join!(run(&mut a, 0), run(&mut b, 1));
    all_once(&read_back(&a, SOURCE).await.0, 41);
    for p in [0, 1] {
        let stream = tributary::source::kafka::stream("orders", p);
        assert_eq!(
            a.committed(SOURCE, &stream).await.unwrap(),
            Some(kafka(p, 19))
        );
    }
}

/// Columns the source declares become typed Bronze columns; a column added at the source is added
/// to the table (older rows read NULL); a column whose type changed incompatibly sends its events
/// to the dead-letter table with the reason instead of dropping or coercing them; a value the
/// source could not convert stays in `_payload`.
async fn typed_columns_and_schema_evolution(backend: Backend) {
    let cfg = backend.config("");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    let v1 = schema_of(&[
        ("id", ValueType::Int64),
        ("note", ValueType::Text),
        ("amount", ValueType::Numeric),
        ("placed", ValueType::Timestamp),
    ]);
    let first: Vec<ChangeEvent> = (0..3)
        .map(|i| typed_event(i, lsn(100, i as u64), &v1, &[]))
        .collect();
    let out = sink.write(SOURCE, &first).await.unwrap();
    assert_eq!((out.rows, out.rejected.len()), (3, 0));

    // ALTER TABLE … ADD COLUMN priority int
    let mut v2 = (*v1).clone();
    v2.columns.push(("priority".into(), ValueType::Int32));
    let v2 = Arc::new(v2);
    let mut second: Vec<ChangeEvent> = (3..5)
        .map(|i| {
            typed_event(
                i,
                lsn(200, i as u64),
                &v2,
                &[("priority", Value::Int32(i as i32))],
            )
        })
        .collect();
    // 'infinity' is a valid timestamp the source passes on as text: kept, untyped.
    second[1]
        .after
        .as_mut()
        .unwrap()
        .0
        .iter_mut()
        .find(|c| c.name == "placed")
        .unwrap()
        .value = Value::Text("infinity".into());
    let out = sink.write(SOURCE, &second).await.unwrap();
    assert_eq!((out.rows, out.rejected.len()), (2, 0));

    // ALTER TABLE … ALTER COLUMN priority TYPE text: Bronze cannot hold it.
    let mut v3 = (*v2).clone();
    v3.columns.last_mut().unwrap().1 = ValueType::Text;
    let v3 = Arc::new(v3);
    let third = vec![
        typed_event(
            5,
            lsn(300, 0),
            &v3,
            &[("priority", Value::Text("high".into()))],
        ),
        typed_event(
            6,
            lsn(300, 1),
            &v3,
            &[("priority", Value::Text("low".into()))],
        ),
    ];
    let out = sink.write(SOURCE, &third).await.unwrap();
    assert_eq!(out.rows, 0);
    assert_eq!(out.rejected.len(), 2);
    for (letter, e) in out.rejected.iter().zip(&third) {
        assert_eq!(letter.position, e.position);
        assert!(
            letter.error.contains("\"priority\"") && letter.error.contains("incompatible"),
            "{}",
            letter.error
        );
    }
    // The dead letters land in `_dlq` once; the stream goes on with compatible rows.
    assert_eq!(
        sink.write_dead_letters(&out.rejected).await.unwrap().rows,
        2
    );
    let fourth = vec![typed_event(
        7,
        lsn(400, 0),
        &v2,
        &[("priority", Value::Int32(7))],
    )];
    assert_eq!(sink.write(SOURCE, &fourth).await.unwrap().rows, 1);

    let (rows, schema) = rows_as_json(&sink, SOURCE).await;
    let ty = |name: &str| schema.field_with_name(name).unwrap().data_type().clone();
    use arrow::datatypes::{DataType, TimeUnit};
    assert_eq!(ty("id"), DataType::Int64);
    assert_eq!(ty("amount"), DataType::Utf8);
    assert_eq!(
        ty("placed"),
        DataType::Timestamp(TimeUnit::Microsecond, None)
    );
    assert_eq!(ty("priority"), DataType::Int32);
    assert_eq!(rows.len(), 6, "{rows:?}");
    let r0 = &rows[&(100, 0)];
    assert_eq!(r0["id"], 0);
    assert_eq!(r0["amount"], "0.50");
    assert_eq!(r0["placed"], "2026-11-23T10:00:00");
    assert!(r0.get("priority").is_none_or(|v| v.is_null()), "{r0:?}");
    assert!(r0.get("_payload").is_none_or(|v| v.is_null()), "{r0:?}");
    assert_eq!(rows[&(200, 3)]["priority"], 3);
    let odd = &rows[&(200, 4)];
    assert!(odd.get("placed").is_none_or(|v| v.is_null()), "{odd:?}");
    let payload: serde_json::Value =
        serde_json::from_str(odd["_payload"].as_str().unwrap()).unwrap();
    assert_eq!(payload, serde_json::json!({"placed": "infinity"}));
    assert_eq!(rows[&(400, 0)]["priority"], 7);
    assert!(!rows.contains_key(&(300, 0)));
    let (dlq, _) = rows_as_json(&sink, DLQ_TABLE).await;
    assert_eq!(dlq.len(), 2);
}

#[tokio::test]
async fn typed_columns_and_schema_evolution_on_every_backend() {
    for b in ALL {
        typed_columns_and_schema_evolution(b).await;
    }
}

/// Commits are sized by rows, bytes or time, not by the caller's batches: nothing is committed
/// (or durable) before a limit is reached; a replay of still-buffered events is not buffered
/// twice; the oldest buffered row's age triggers a flush of a small buffer.
#[tokio::test]
async fn commits_are_cut_by_rows_and_by_time() {
    let cfg = Backend::Local.config("flush_rows = 100\nflush_interval_ms = 400");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    let batch = |from: i64, n: i64| -> Vec<ChangeEvent> {
        (from..from + n)
            .map(|i| event(i, lsn(1_000 + i as u64, 0)))
            .collect()
    };
    assert!(sink.append(SOURCE, &batch(0, 60)).await.unwrap().is_empty());
    assert!(!sink.should_flush());
    assert_eq!(read_back(&sink, SOURCE).await.0.len(), 0, "committed early");
    // Re-delivered before its commit (a Kafka rebalance, say): not buffered again.
    sink.append(SOURCE, &batch(30, 30)).await.unwrap();
    assert_eq!(sink.buffered_rows(), 60);
    sink.append(SOURCE, &batch(60, 60)).await.unwrap();
    assert!(sink.should_flush(), "120 rows buffered, flush_rows = 100");
    let out = sink.flush().await.unwrap();
    assert_eq!((out.rows, out.versions.len()), (120, 1));
    assert_eq!(sink.buffered_rows(), 0);
    assert!(sink.flush_deadline().is_none());

    sink.append(SOURCE, &batch(120, 5)).await.unwrap();
    assert!(!sink.should_flush());
    let deadline = sink.flush_deadline().expect("a deadline while rows wait");
    tokio::time::sleep_until(deadline).await;
    assert!(
        sink.should_flush(),
        "the oldest row waited flush_interval_ms"
    );
    assert_eq!(sink.flush().await.unwrap().rows, 5);
    all_once(&read_back(&sink, SOURCE).await.0, 125);
    // One commit per flush (plus the table's creation).
    let version = sink.summary(SOURCE).await.unwrap().version;
    assert_eq!(version, 2);
}

#[test]
fn flush_limits_of_zero_are_refused_with_their_key() {
    for key in [
        "flush_rows",
        "flush_mb",
        "flush_interval_ms",
        "compact_target_mb",
    ] {
        let text = format!(
            "name = \"t\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\n\
             [[sources.kafka.topics]]\nname = \"orders\"\n[sinks.delta]\n\
             uri = \"file:///tmp/x\"\n{key} = 0\n"
        );
        let err = Config::parse(&text, Path::new("."), |_| None).unwrap_err();
        assert_eq!(
            err.key(),
            Some(format!("sinks.delta.{key}").as_str()),
            "{err}"
        );
    }
}

/// `compact` beside a running writer: the small files are rewritten into one, appends that
/// commit meanwhile are kept, and no row is lost or doubled.
async fn compact_during_appends(backend: Backend) {
    let cfg = backend.config("");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    for n in 0..12i64 {
        sink.write(SOURCE, &tx(100 + n as u64, n * 10..n * 10 + 10))
            .await
            .unwrap();
    }
    let before = sink.summary(SOURCE).await.unwrap();
    assert_eq!((before.files, before.rows), (12, 120));
    let writer = tokio::spawn(async move {
        for n in 12..24i64 {
            sink.write(SOURCE, &tx(100 + n as u64, n * 10..n * 10 + 10))
                .await
                .unwrap();
        }
        sink
    });
    let mut compactor = DeltaSink::new("t", &cfg).unwrap();
    let out = compactor.compact(SOURCE).await.unwrap();
    let sink = writer.await.unwrap();
    assert!(out.files_removed >= 12, "{out:?}");
    assert_eq!((out.partitions, out.files_added), (1, 1), "{out:?}");
    assert!(out.bytes_added > 0, "{out:?}");
    let after = sink.summary(SOURCE).await.unwrap();
    assert_eq!(after.rows, 240, "{after:?}");
    // 24 files were appended in all; the compaction swapped the ones it saw for one.
    assert_eq!(after.files as u64, 24 - out.files_removed + 1, "{after:?}");
    all_once(&read_back(&sink, SOURCE).await.0, 240);
    // The stream's position survived the rewrite: a replay writes nothing.
    let mut restarted = DeltaSink::new("t", &cfg).unwrap();
    assert_eq!(
        restarted
            .write(SOURCE, &tx(123, 230..240))
            .await
            .unwrap()
            .rows,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_during_appends_on_local_disk_and_azurite() {
    for b in [Backend::Local, Backend::Azure] {
        compact_during_appends(b).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_during_appends_on_seaweedfs_s3() {
    compact_during_appends(Backend::S3).await;
}

/// With Z-order columns every file of a partition is rewritten (delta-rs orders the rows), none
/// lost or doubled; a column the table lacks is refused with the setting named.
#[tokio::test]
async fn zorder_compaction_keeps_every_row() {
    let cfg = Backend::Local.config("zorder_columns = [\"_position_minor\", \"_position_major\"]");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    for n in 0..4i64 {
        sink.write(SOURCE, &tx(100 + n as u64, n * 10..n * 10 + 10))
            .await
            .unwrap();
    }
    let out = sink.compact(SOURCE).await.unwrap();
    assert_eq!((out.files_removed, out.files_added), (4, 1));
    all_once(&read_back(&sink, SOURCE).await.0, 40);

    let bad = Backend::Local.config("zorder_columns = [\"nope\"]");
    let mut other = DeltaSink::new("t", &bad).unwrap();
    other.write(SOURCE, &tx(1, 0..2)).await.unwrap();
    let err = other.compact(SOURCE).await.unwrap_err().to_string();
    assert!(
        err.contains("zorder_columns") && err.contains("nope"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_local_disk_and_azurite() {
    for b in [Backend::Local, Backend::Azure] {
        concurrent_writers(b).await;
    }
}

/// SeaweedFS answers a racing `If-None-Match: *` PUT with 412 for every loser, so two writers
/// share one table on S3 as on azurite (moto's conditional put was not atomic enough for this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_seaweedfs_s3() {
    for _ in 0..3 {
        concurrent_writers(Backend::S3).await;
    }
}

#[tokio::test]
async fn checkpoint_after_ten_commits_on_local_disk() {
    let cfg = Backend::Local.config("checkpoint_interval = 10");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    let log = url::Url::parse(&sink.table_uri(SOURCE))
        .unwrap()
        .to_file_path()
        .unwrap()
        .join("_delta_log");
    let checkpoints = || {
        std::fs::read_dir(&log)
            .map(|d| {
                d.filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    name.to_string_lossy().ends_with(".checkpoint.parquet")
                })
                .count()
            })
            .unwrap_or(0)
    };
    // Version 0 (the table's creation) is the first commit; each write is one more.
    for n in 0..9u64 {
        assert_eq!(checkpoints(), 0, "checkpoint before 10 commits");
        sink.write(SOURCE, &[event(n as i64, lsn(100 + n, 0))])
            .await
            .unwrap();
    }
    assert_eq!(
        checkpoints(),
        1,
        "no checkpoint after 10 commits in {}",
        log.display()
    );
    all_once(&read_back(&sink, SOURCE).await.0, 9);
}

#[tokio::test]
async fn dead_letters_go_to_the_dlq_table_once() {
    let cfg = Backend::Local.config("");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    let letters = vec![
        DeadLetter::new(
            "orders",
            kafka(0, 7),
            Some("k".into()),
            b"\xff{",
            "not JSON",
        ),
        DeadLetter::new("orders", kafka(0, 9), None, b"[]", "not an object"),
    ];
    assert_eq!(sink.write_dead_letters(&letters).await.unwrap().rows, 2);
    assert_eq!(sink.write_dead_letters(&letters).await.unwrap().rows, 0);
    all_once(&read_back(&sink, DLQ_TABLE).await.0, 2);
}

#[test]
fn disabling_conditional_put_is_refused_with_the_setting_named() {
    let cfg = parse(&format!(
        "uri = \"s3://{}/{}\"\n[sinks.delta.storage]\naws_conditional_put = \"disabled\"\n",
        env("TRIBUTARY_S3_BUCKET"),
        unique("bronze")
    ));
    let err = DeltaSink::new("t", &cfg).unwrap_err().to_string();
    assert!(err.contains("conditional_put"), "{err}");
}

/// An independent reader: the Python `deltalake` package (as Spark/Databricks/DuckDB users would
/// read the table) sees the same rows, the typed columns with their types, and the evolved schema.
#[tokio::test]
async fn python_deltalake_reads_the_bronze_table() {
    let cfg = Backend::Local.config("");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    let v1 = schema_of(&[
        ("id", ValueType::Int64),
        ("note", ValueType::Text),
        ("amount", ValueType::Numeric),
        ("placed", ValueType::Timestamp),
    ]);
    let mut v2 = (*v1).clone();
    v2.columns.push(("priority".into(), ValueType::Int32));
    let v2 = Arc::new(v2);
    let first: Vec<ChangeEvent> = (0..3)
        .map(|i| typed_event(i, lsn(100, i as u64), &v1, &[]))
        .collect();
    let second: Vec<ChangeEvent> = (3..5)
        .map(|i| typed_event(i, lsn(200, i as u64), &v2, &[("priority", Value::Int32(9))]))
        .collect();
    sink.write(SOURCE, &first).await.unwrap();
    sink.write(SOURCE, &second).await.unwrap();
    let (ours, _) = read_back(&sink, SOURCE).await;

    let script = r#"
import json, os, sys
from deltalake import DeltaTable
t = DeltaTable(sys.argv[1])
tbl = t.to_pyarrow_table()
rows = sorted(zip(tbl.column("_position_major").to_pylist(),
                  tbl.column("_position_minor").to_pylist(),
                  tbl.column("id").to_pylist(),
                  tbl.column("note").to_pylist(),
                  tbl.column("priority").to_pylist(),
                  [str(v) for v in tbl.column("placed").to_pylist()],
                  tbl.column("embedding").to_pylist()))
print(json.dumps({"fields": {f.name: str(f.type) for f in tbl.schema},
                  "partitions": t.metadata().partition_columns,
                  "rows": rows}))
sys.stdout.flush()
# deltalake's runtime threads can abort the interpreter at exit ("terminate called without an
# active exception"); the answer is printed, so leave without running the exit handlers.
os._exit(0)
"#;
    let out = std::process::Command::new(env("TRIBUTARY_PYTHON"))
        .arg("-c")
        .arg(script)
        .arg(sink.table_uri(SOURCE))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the Python reader failed (it needs `deltalake==1.1.4 pyarrow==21.0.0` in \
         $TRIBUTARY_PYTHON's venv): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fields = got["fields"].as_object().unwrap();
    let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
    names.sort_unstable();
    let expected_schema = tributary::sink::delta::bronze::bronze_schema_for(&v2);
    let mut expected: Vec<&str> = expected_schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    expected.sort_unstable();
    assert_eq!(names, expected);
    assert_eq!(fields["id"], "int64");
    assert_eq!(fields["priority"], "int32");
    assert_eq!(fields["placed"], "timestamp[us]");
    assert!(
        fields["note"].as_str().unwrap().contains("string"),
        "{fields:?}"
    );
    assert!(
        fields["_source_ts"].as_str().unwrap().contains("UTC"),
        "{fields:?}"
    );
    assert_eq!(got["partitions"], serde_json::json!(["_ingest_date"]));
    let rows = got["rows"].as_array().unwrap();
    let theirs: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| (r[0].as_i64().unwrap(), r[1].as_i64().unwrap()))
        .collect();
    assert_eq!(theirs, ours.keys().copied().collect::<Vec<_>>());
    assert_eq!(rows[0][2], 0);
    assert_eq!(
        rows[0][4],
        serde_json::Value::Null,
        "added column reads NULL in old rows"
    );
    assert_eq!(rows[4][2], 4);
    assert_eq!(rows[4][3], "order 4");
    assert_eq!(rows[4][4], 9);
    assert_eq!(rows[4][5], "2026-11-23 10:00:04");
    assert_eq!(rows[4][6], serde_json::json!([4.0, 0.5, -0.25]));
}

#[test]
fn a_zero_checkpoint_interval_is_refused_with_its_key() {
    let text = "name = \"t\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\n\
                [[sources.kafka.topics]]\nname = \"orders\"\n[sinks.delta]\n\
                uri = \"file:///tmp/x\"\ncheckpoint_interval = 0\n";
    let err = Config::parse(text, Path::new("."), |_| None).unwrap_err();
    assert_eq!(err.key(), Some("sinks.delta.checkpoint_interval"), "{err}");
}

#[tokio::test]
async fn existing_tables_lists_what_was_written() {
    for backend in [Backend::Local, Backend::Azure] {
        let cfg = backend.config("");
        let mut sink = DeltaSink::new("t", &cfg).unwrap();
        sink.write(SOURCE, &tx(1, 0..1)).await.unwrap();
        let letter = DeadLetter::new("orders", kafka(0, 1), None, b"x", "bad");
        sink.write_dead_letters(&[letter]).await.unwrap();
        assert_eq!(
            sink.existing_tables().await.unwrap(),
            vec![DLQ_TABLE.to_owned(), SOURCE.to_owned()]
        );
    }
}
