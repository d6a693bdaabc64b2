//! The Bronze sink across an object-store outage: a private azurite (its own port and folder, so
//! no other test sees it go away) is stopped while the sink commits and started again on the same
//! data; the commit is retried with backoff and completes, nothing is lost or doubled.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{env, insert_event, unique};
use tributary::config::Config;
use tributary::event::{ChangeEvent, Lsn};
use tributary::sink::delta::DeltaSink;

const SOURCE: &str = "public.orders";

struct Azurite {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Azurite {
    fn start(port: u16, dir: tempfile::TempDir) -> Azurite {
        let child = Command::new(env("TRIBUTARY_AZURITE_BIN"))
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path())
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite (TRIBUTARY_AZURITE_BIN from scripts/services env)");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "azurite did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Azurite { child, port, dir }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/devstoreaccount1", self.port)
    }

    /// Stops the store (SIGTERM, so azurite saves its metadata to the folder it restarts from;
    /// a SIGKILL may lose the last seconds of it, as a real store never does).
    fn stop(mut self) -> (u16, tempfile::TempDir) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap();
        (self.port, self.dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_during_a_commit_is_retried_and_nothing_is_lost_or_doubled() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let azurite = Azurite::start(port, tempfile::tempdir().unwrap());
    let container = "outage";
    let created = Command::new(env("TRIBUTARY_PYTHON"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/azure_container.py"))
        .args(["--endpoint", &azurite.endpoint(), "create", container])
        .status()
        .unwrap();
    assert!(created.success(), "creating the container failed");
    let text = format!(
        "name = \"t\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\n\
         [[sources.kafka.topics]]\nname = \"orders\"\n[sinks.delta]\n\
         uri = \"az://{container}/{root}\"\n[sinks.delta.storage]\n\
         azure_storage_account_name = \"devstoreaccount1\"\n\
         azure_storage_account_key = \"{key}\"\n\
         azure_storage_endpoint = \"{endpoint}\"\nazure_allow_http = \"true\"\n\
         azure_storage_use_emulator = \"false\"\n",
        root = unique("bronze"),
        key = env("AZURE_STORAGE_ACCOUNT_KEY"),
        endpoint = azurite.endpoint(),
    );
    let cfg = Config::parse(&text, Path::new("."), |_| None)
        .unwrap()
        .sinks
        .delta
        .unwrap();
    let mut sink = DeltaSink::new("t", &cfg).unwrap();
    let first: Vec<ChangeEvent> = (0..5).map(|i| insert_event(i, 100, i as u64)).collect();
    assert_eq!(sink.write(SOURCE, &first).await.unwrap().rows, 5);

    // The store goes away; the next commit is already under way when it comes back.
    let (port, dir) = azurite.stop();
    let second: Vec<ChangeEvent> = (5..10).map(|i| insert_event(i, 200, i as u64)).collect();
    let pending = second.clone();
    let commit = tokio::spawn(async move {
        let out = sink.write(SOURCE, &pending).await;
        (sink, out)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !commit.is_finished(),
        "the commit returned while the store was down"
    );
    let azurite = Azurite::start(port, dir);
    let (sink, out) = tokio::time::timeout(Duration::from_secs(120), commit)
        .await
        .expect("the commit did not complete after the store came back")
        .unwrap();
    assert_eq!(out.unwrap().rows, 5);

    // Every row once; the committed position is the last one; a replay writes nothing.
    let summary = sink.summary(SOURCE).await.unwrap();
    assert_eq!(summary.rows, 10, "{summary:?}");
    let mut restarted = DeltaSink::new("t", &cfg).unwrap();
    assert_eq!(
        restarted
            .committed(SOURCE, &tributary::source::postgres::stream())
            .await
            .unwrap(),
        Some(tributary::source::postgres::position(Lsn(200), 9))
    );
    assert_eq!(restarted.write(SOURCE, &second).await.unwrap().rows, 0);
    drop(azurite.stop());
}
