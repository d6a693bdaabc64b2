//! The Bronze Delta sink against real stores: local disk, the S3 server (moto) and azurite.
//! Each behaviour is one async body run against every backend it applies to.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{env, unique};
use tributary::config::Config;
use tributary::dead_letter::DeadLetter;
use tributary::event::{ChangeEvent, Lsn, Op, Position, Row, StreamId, Value};
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
    fn config(self, extra: &str) -> tributary::config::DeltaSink {
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

fn parse(section: &str) -> tributary::config::DeltaSink {
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
    Position::Lsn {
        commit_lsn: Lsn(lsn),
        tx_ordinal: ord,
    }
}

fn kafka(partition: i32, offset: i64) -> Position {
    Position::Kafka {
        topic: "orders".into(),
        partition,
        offset,
    }
}

fn event(id: i64, position: Position) -> ChangeEvent {
    let key: Row = [("id", Value::Int64(id))].into_iter().collect();
    let after: Row = [
        ("id", Value::Int64(id)),
        ("note", Value::Text(format!("order {id}"))),
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
    }
}

/// Events `ids` of one Postgres transaction committed at `commit`.
fn tx(commit: u64, ids: std::ops::Range<i64>) -> Vec<ChangeEvent> {
    ids.enumerate()
        .map(|(i, id)| event(id, lsn(commit, i as u64)))
        .collect()
}

/// Every row of the table's current version, read with the `deltalake` crate: (major, minor) →
/// number of times present, plus the `_payload` of each.
async fn read_back(sink: &DeltaSink, table: &str) -> (BTreeMap<(i64, i64), usize>, Vec<String>) {
    use arrow::array::{Array as _, AsArray, Int64Array};
    use object_store::ObjectStoreExt as _;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let url = url::Url::parse(&sink.table_uri(table)).unwrap();
    let table = deltalake::open_table(url).await.unwrap();
    let store = table.object_store();
    let mut seen = BTreeMap::new();
    let mut payloads = Vec::new();
    let paths: Vec<_> = table
        .snapshot()
        .unwrap()
        .log_data()
        .into_iter()
        .map(|add| add.object_store_path())
        .collect();
    for path in paths {
        let bytes = store.get(&path).await.unwrap().bytes().await.unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
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
                let p = p.as_string::<i32>();
                payloads.extend((0..p.len()).map(|i| p.value(i).to_owned()));
            }
        }
    }
    (seen, payloads)
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
        sink.committed(SOURCE, &StreamId::Postgres).await.unwrap(),
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
            .committed(SOURCE, &StreamId::Postgres)
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
        let rb =
            tributary::sink::delta::bronze::events_to_batch(&refs, chrono::Utc::now()).unwrap();
        let mut writer = RecordBatchWriter::for_table(&table).unwrap();
        writer.write(rb).await.unwrap();
        let orphans = writer.flush().await.unwrap();
        assert_eq!(orphans.len(), 1);
        // Dropped here: the crash.
    }
    let mut restarted = DeltaSink::new("t", &cfg).unwrap();
    assert_eq!(
        restarted
            .committed(SOURCE, &StreamId::Postgres)
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
        let stream = StreamId::Kafka {
            topic: "orders".into(),
            partition: p,
        };
        assert_eq!(
            a.committed(SOURCE, &stream).await.unwrap(),
            Some(kafka(p, 19))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_local_disk_and_azurite() {
    // Not on moto: its conditional put is not fully atomic under races.
    for b in [Backend::Local, Backend::Azure] {
        concurrent_writers(b).await;
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
/// read the table) sees the same rows and schema.
#[tokio::test]
async fn python_deltalake_reads_the_bronze_table() {
    let cfg = Backend::Local.config("");
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    sink.write(SOURCE, &tx(100, 0..3)).await.unwrap();
    sink.write(SOURCE, &tx(200, 3..5)).await.unwrap();
    let (ours, _) = read_back(&sink, SOURCE).await;

    let script = r#"
import json, os, sys
from deltalake import DeltaTable
t = DeltaTable(sys.argv[1])
tbl = t.to_pyarrow_table()
rows = sorted(zip(tbl.column("_position_major").to_pylist(),
                  tbl.column("_position_minor").to_pylist(),
                  tbl.column("_payload").to_pylist(),
                  tbl.column("embedding").to_pylist()))
print(json.dumps({"fields": [f.name for f in tbl.schema],
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
    let fields: Vec<&str> = got["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let expected: Vec<String> = tributary::sink::delta::bronze::bronze_schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut sorted_fields = fields.clone();
    sorted_fields.sort_unstable();
    let mut sorted_expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    sorted_expected.sort_unstable();
    assert_eq!(sorted_fields, sorted_expected);
    assert_eq!(got["partitions"], serde_json::json!(["_ingest_date"]));
    let rows = got["rows"].as_array().unwrap();
    let theirs: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| (r[0].as_i64().unwrap(), r[1].as_i64().unwrap()))
        .collect();
    assert_eq!(theirs, ours.keys().copied().collect::<Vec<_>>());
    let payload: serde_json::Value = serde_json::from_str(rows[4][2].as_str().unwrap()).unwrap();
    assert_eq!(payload, serde_json::json!({"id": 4, "note": "order 4"}));
    assert_eq!(rows[4][3], serde_json::json!([4.0, 0.5, -0.25]));
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
