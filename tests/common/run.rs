//! Running the `tributary` binary in tests: start, SIGTERM, wait.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `tributary run`; its log goes to the config's path with `.log` (read back by [`stop`];
/// a file, not a pipe, so a chatty run never blocks on a full pipe).
pub fn start(config: &Path) -> Running {
    start_with_env(config, &[])
}

/// [`start`] with extra environment variables (e.g. `FAILPOINTS`).
pub fn start_with_env(config: &Path, vars: &[(&str, &str)]) -> Running {
    let log = std::fs::File::create(config.with_extension("log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .envs(vars.iter().copied())
        .args(["run", "--config"])
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Running(child)
}

/// A running connector; killed if the test ends (or panics) without [`stop`], so a failed test
/// never leaves a process holding a replication slot or a consumer group.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// SIGTERM, then the exit status and the run's log (panics if it takes over 30 s).
pub fn stop(mut run: Running, config: &Path) -> (i32, String) {
    let child = &mut run.0;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
            return (s.code().unwrap_or(-1), log);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "run did not stop within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
