//! The Bronze sink on a real S3 server across store restarts: a private SeaweedFS (`weed mini`
//! on ports of its own and a folder of its own, so no other test sees it go away) is killed while
//! the sink commits and started again on the same data. SeaweedFS keeps objects on disk, so what
//! was committed before the kill is still there; the interrupted commit is retried with backoff
//! and every row is in the table exactly once, whatever moment the kill hit.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{env, insert_event, unique};
use tributary::config::Config;
use tributary::event::{ChangeEvent, Lsn};
use tributary::sink::delta::DeltaSink;

const SOURCE: &str = "public.orders";
const BUCKET: &str = "restart";
const ROWS_PER_ROUND: i64 = 20_000;

/// A private SeaweedFS: S3 on `ports[0]`, its master, volume, filer, gRPC and admin listeners on
/// the other nine.
struct SeaweedFs {
    child: Child,
    ports: Vec<u16>,
    /// `None` only once [`kill`](Self::kill) handed it back.
    dir: Option<tempfile::TempDir>,
}

impl SeaweedFs {
    fn start(ports: Vec<u16>, dir: tempfile::TempDir) -> SeaweedFs {
        let log = dir.path().join("weed.log");
        let p = |i: usize| ports[i].to_string();
        let child = Command::new(env("TRIBUTARY_SEAWEEDFS_BIN"))
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .arg("mini")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-bucket={BUCKET}"))
            .arg(format!("-s3.port={}", p(0)))
            .arg(format!("-master.port={}", p(1)))
            .arg(format!("-master.port.grpc={}", p(2)))
            .arg(format!("-volume.port={}", p(3)))
            .arg(format!("-volume.port.grpc={}", p(4)))
            .arg(format!("-filer.port={}", p(5)))
            .arg(format!("-filer.port.grpc={}", p(6)))
            .arg(format!("-s3.port.grpc={}", p(7)))
            .arg(format!("-admin.port={}", p(8)))
            .arg(format!("-admin.port.grpc={}", p(9)))
            .args([
                "-admin.ui=false",
                "-webdav=false",
                "-master.telemetry=false",
            ])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!(
                "-filer.localSocket={}",
                dir.path().join("filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                dir.path().join("s3.sock").display()
            ))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weed (TRIBUTARY_SEAWEEDFS_BIN from scripts/services env)");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("All enabled components are running")
        {
            assert!(Instant::now() < deadline, "SeaweedFS did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        SeaweedFs {
            child,
            ports,
            dir: Some(dir),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[0])
    }

    /// Kills the store (SIGKILL: a crash, no shutdown work) and waits for it to be gone.
    fn kill(mut self) -> (Vec<u16>, tempfile::TempDir) {
        let _ = self.child.kill();
        self.child.wait().unwrap();
        let dir = self.dir.take().expect("the store's folder");
        (std::mem::take(&mut self.ports), dir)
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ten free loopback ports (held at once, so they are distinct).
fn free_ports() -> Vec<u16> {
    let held: Vec<TcpListener> = (0..10)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn storage_options(endpoint: &str) -> HashMap<String, String> {
    [
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_region", "us-east-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// (commit LSN, ordinal) → how many rows of the table's current version carry it, read from the
/// data files with the `deltalake` crate and the parquet reader.
async fn positions(uri: &str, endpoint: &str) -> BTreeMap<(i64, i64), usize> {
    use arrow::array::{AsArray, Int64Array};
    use object_store::ObjectStoreExt as _;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let table = deltalake::DeltaTableBuilder::from_url(url::Url::parse(uri).unwrap())
        .unwrap()
        .with_storage_options(storage_options(endpoint))
        .load()
        .await
        .unwrap();
    let store = table.object_store();
    let mut seen = BTreeMap::new();
    for add in table.snapshot().unwrap().log_data() {
        let bytes = store
            .get(&add.object_store_path())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader.map(Result::unwrap) {
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
        }
    }
    seen
}

/// The events of round `round`: one transaction of [`ROWS_PER_ROUND`] rows at its own LSN.
fn round_events(round: u64) -> Vec<ChangeEvent> {
    (0..ROWS_PER_ROUND)
        .map(|i| insert_event(i, 1_000 * (round + 1), i as u64))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaweedfs_killed_and_restarted_mid_commit_keeps_every_row_exactly_once() {
    let mut store = SeaweedFs::start(free_ports(), tempfile::tempdir().unwrap());
    let text = format!(
        "name = \"t\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\n\
         [[sources.kafka.topics]]\nname = \"orders\"\n[sinks.delta]\n\
         uri = \"s3://{BUCKET}/{root}\"\n[sinks.delta.storage]\n\
         aws_endpoint = \"{endpoint}\"\naws_allow_http = \"true\"\n\
         aws_access_key_id = \"test\"\naws_secret_access_key = \"test\"\n\
         aws_region = \"us-east-1\"\n",
        root = unique("bronze"),
        endpoint = store.endpoint(),
    );
    let cfg = Config::parse(&text, Path::new("."), |_| None)
        .unwrap()
        .sinks
        .delta
        .unwrap();
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    let uri = sink.table_uri(SOURCE);
    assert_eq!(
        sink.write(SOURCE, &round_events(0)).await.unwrap().rows,
        ROWS_PER_ROUND as usize
    );

    // Each round kills the store a little later into a commit: before its first request, while
    // the data file is uploaded, around the `_delta_log` conditional PUT, or after it.
    let delays_ms = [0u64, 30, 80, 150, 300];
    let mut interrupted = 0;
    for (i, delay) in delays_ms.iter().enumerate() {
        let round = i as u64 + 1;
        let events = round_events(round);
        let commit = tokio::spawn(async move {
            let out = sink.write(SOURCE, &events).await;
            (sink, out)
        });
        tokio::time::sleep(Duration::from_millis(*delay)).await;
        let pending = !commit.is_finished();
        let (ports, dir) = store.kill();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        if pending {
            interrupted += 1;
        }
        store = SeaweedFs::start(ports, dir);
        let (back, out) = tokio::time::timeout(Duration::from_secs(180), commit)
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: the commit did not complete after the restart")
            })
            .unwrap();
        sink = back;
        let written = out.unwrap_or_else(|e| panic!("round {round}: {e}")).rows;
        // A kill after the `_delta_log` PUT landed but before its response arrived leaves the
        // rows committed; the retry re-reads the positions, finds them there and writes nothing.
        // Whether the rows are in the table exactly once is checked for every round below.
        let lost_response = pending && written == 0;
        assert!(
            written == ROWS_PER_ROUND as usize || lost_response,
            "round {round}: the commit wrote {written} rows, expected {ROWS_PER_ROUND} \
             (or 0 after a lost response)"
        );
        eprintln!(
            "round {round}: killed after {delay} ms, commit still running: {pending}, \
             rows written by the retry: {written}"
        );
    }
    assert!(
        interrupted >= 1,
        "no round killed the store while a commit was running"
    );

    // Every row of every round once; the committed position is the last; a replay writes nothing.
    let seen = positions(&uri, &store.endpoint()).await;
    let rounds = delays_ms.len() as i64 + 1;
    assert_eq!(seen.len() as i64, rounds * ROWS_PER_ROUND, "rows lost");
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).take(5).collect();
    assert!(
        doubled.is_empty(),
        "rows written more than once: {doubled:?}"
    );
    let mut restarted = DeltaSink::new("t", &cfg).unwrap();
    let last = delays_ms.len() as u64;
    assert_eq!(
        restarted
            .committed(SOURCE, &tributary::source::postgres::stream())
            .await
            .unwrap(),
        Some(tributary::source::postgres::position(
            Lsn(1_000 * (last + 1)),
            ROWS_PER_ROUND as u64 - 1
        ))
    );
    assert_eq!(
        restarted
            .write(SOURCE, &round_events(last))
            .await
            .unwrap()
            .rows,
        0
    );
}
