//! The `tributary` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tributary::config::Config;
use tributary::secret::redact;
use tributary::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "tributary",
    version,
    about = "Streaming CDC into Delta Lake and pgvector"
)]
struct Cli {
    /// Log format on stderr; filter with RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the connector until SIGINT/SIGTERM (the first drains and acknowledges, a second exits
    /// at once).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration and try to reach every service it names.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Seconds each service may take to answer.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Where the connector stands: slot position and lag, group offsets and lag, pgvector tables.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON for scripts instead of the one-screen summary.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Remove data files no Bronze table version references any more (older than
    /// `sinks.delta.vacuum_retention_hours`); safe beside a running connector.
    Vacuum {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Rewrite each Bronze table's small files into files of `sinks.delta.compact_target_mb`
    /// (Z-ordered by `sinks.delta.zorder_columns` when set); safe beside a running connector.
    Compact {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (a folder name under the Bronze root, e.g. `public.orders`).
        #[arg(long)]
        table: Option<String>,
    },
    /// Compare each pgvector table with its PostgreSQL source table (keys, payload, text hash,
    /// and for a sample of rows the stored vector against a fresh embedding); exits 1 when
    /// they differ, 2 when the check could not be completed.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this source table (`schema.table`, or `table` in `public`); repeatable.
        /// Default: every table the publication of `[sources.postgres]` holds.
        #[arg(long = "table", value_name = "TABLE")]
        tables: Vec<String>,
        /// Rows per table whose stored vector is compared with a fresh embedding (0: none).
        #[arg(long, default_value_t = 100)]
        sample: usize,
        /// Compare every row's vector (slow: runs the model over the whole table).
        #[arg(long)]
        all_vectors: bool,
        /// Lowest cosine accepted between a stored and a fresh vector (default 0.9999; 0.999
        /// for `halfvec` columns).
        #[arg(long)]
        min_cosine: Option<f64>,
        /// Difference lines listed per kind and table (all are counted).
        #[arg(long, default_value_t = 20)]
        show: usize,
        /// Seconds each database may take to accept a connection.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Read one table of `[sources.postgres]` again while the connector runs (an on-demand
    /// snapshot, reconciled with the stream by watermarks: no gap, no duplicate, streaming goes
    /// on). Waits until every sink holds it, with a progress bar on a terminal.
    Snapshot {
        #[arg(long, short)]
        config: PathBuf,
        /// The table (`schema.table`, or `table` in `public`); published, with a primary key.
        #[arg(long)]
        table: String,
        /// Record the request and exit (follow it with `tributary status`).
        #[arg(long)]
        no_wait: bool,
    },
    /// Embed lines of text from stdin: one JSON array of floats per line on stdout.
    Embed {
        /// Model folder (model.onnx + tokenizer.json).
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        model: Option<PathBuf>,
        /// Take the model and its options from this configuration's [embedding].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// The binary's allocator (and the benchmarks', to measure what it runs): building events is
/// allocation-heavy, and mimalloc made the Kafka source 1.8× faster than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` with every secret of the loaded configuration redacted: errors of librdkafka,
/// object_store and PostgreSQL may quote configured values (see [`tributary::secret::Redactor`]).
macro_rules! print_redacted {
    ($($arg:tt)*) => {
        println!("{}", redact(&format!($($arg)*)))
    };
}

/// `eprintln!`, redacted like [`print_redacted!`].
macro_rules! eprint_redacted {
    ($($arg:tt)*) => {
        eprintln!("{}", redact(&format!($($arg)*)))
    };
}

/// Exit code for a configuration the connector cannot start with.
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    // Crash points from FAILPOINTS (only in builds with the `failpoints` feature).
    let _failpoints = fail::FailScenario::setup();
    match cli.command {
        Command::Run { config } => run(&config).await,
        Command::Check { config, timeout } => check(&config, Duration::from_secs(timeout)).await,
        Command::Embed { model, config } => embed(model, config),
        Command::Snapshot {
            config,
            table,
            no_wait,
        } => snapshot(&config, &table, no_wait).await,
        Command::Vacuum { config } => maintain(&config, Maintenance::Vacuum, None).await,
        Command::Compact { config, table } => maintain(&config, Maintenance::Compact, table).await,
        Command::Status {
            config,
            json,
            timeout,
        } => status(&config, json, Duration::from_secs(timeout)).await,
        Command::Verify {
            config,
            tables,
            sample,
            all_vectors,
            min_cosine,
            show,
            timeout,
        } => {
            let options = tributary::verify::Options {
                tables,
                sample,
                all_vectors,
                min_cosine,
                show,
                connect_timeout: Duration::from_secs(timeout),
            };
            verify(&config, &options).await
        }
    }
}

/// Loads the configuration and makes its secrets the process's to redact (from every line printed
/// or logged from here on). A load error is printed as it is: it never quotes a value (see
/// [`tributary::config`]).
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    let config = Config::load(path).map_err(|e| {
        eprintln!("error: config {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })?;
    tributary::secret::install_redactor(tributary::secret::Redactor::for_config(&config));
    Ok(config)
}

async fn check(path: &std::path::Path, timeout: Duration) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    print_redacted!("ok    config          {}", path.display());
    let probes = tributary::check::run(&config, timeout).await;
    let mut failed = 0;
    for p in &probes {
        match &p.result {
            Ok(detail) => print_redacted!("ok    {:<15} {}  ({detail})", p.service, p.target),
            Err(e) => {
                failed += 1;
                print_redacted!("FAIL  {:<15} {}  {e}", p.service, p.target);
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("{failed} of {} services failed", probes.len());
        ExitCode::FAILURE
    }
}

#[derive(Clone, Copy)]
enum Maintenance {
    Vacuum,
    Compact,
}

/// Runs `vacuum` or `compact` over every Bronze table (or just `only`), one line per table.
async fn maintain(path: &std::path::Path, what: Maintenance, only: Option<String>) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(delta) = &config.sinks.delta else {
        eprint_redacted!(
            "error: config {}: sinks.delta: section missing",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let mut sink = match tributary::sink::delta::DeltaSink::new(&config.name, delta) {
        Ok(s) => s,
        Err(e) => {
            eprint_redacted!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let retention = Duration::from_secs(delta.vacuum_retention_hours * 3600);
    let mut failed = false;
    let tables = match sink.existing_tables().await {
        Ok(t) => t,
        Err(e) => {
            eprint_redacted!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tables: Vec<String> = match only {
        Some(t) if tables.contains(&t) => vec![t],
        Some(t) => {
            eprint_redacted!(
                "error: no Bronze table {t:?} under {} (tables: {})",
                delta.uri,
                tables.join(", ")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        None => tables,
    };
    // A bar over the tables on a terminal; the per-table lines either way.
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr())
        .then(|| indicatif::ProgressBar::new(tables.len() as u64));
    for table in tables {
        if let Some(b) = &bar {
            b.set_message(table.clone());
        }
        let result = match what {
            Maintenance::Vacuum => sink
                .vacuum(&table, retention)
                .await
                .map(|n| format!("{n} files removed")),
            Maintenance::Compact => sink.compact(&table).await.map(|o| {
                format!(
                    "{} files rewritten into {} ({:.1} MiB, {} partitions)",
                    o.files_removed,
                    o.files_added,
                    o.bytes_added as f64 / f64::from(1 << 20),
                    o.partitions
                )
            }),
        };
        let line = match result {
            Ok(done) => format!("ok    {table}: {done}"),
            Err(e) => {
                failed = true;
                format!("FAIL  {table}: {e}")
            }
        };
        match &bar {
            Some(b) => {
                b.println(redact(&line));
                b.inc(1);
            }
            None => print_redacted!("{line}"),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn embed(model: Option<PathBuf>, config: Option<PathBuf>) -> ExitCode {
    use std::io::{BufRead, Write};
    let embedding = match (model, config) {
        (Some(dir), _) => tributary::config::EmbeddingConfig::for_model(dir),
        (None, Some(path)) => match load(&path) {
            Ok(c) => match c.embedding {
                Some(e) => e,
                None => {
                    eprint_redacted!(
                        "error: config {}: embedding: section missing",
                        path.display()
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
            Err(code) => return code,
        },
        (None, None) => unreachable!("clap requires --model or --config"),
    };
    let mut embedder = match tributary::enrich::Embedder::load(&embedding) {
        Ok(e) => e,
        Err(e) => {
            eprint_redacted!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let stdin = std::io::stdin().lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut lines: Vec<String> = Vec::new();
    let mut flush = |lines: &mut Vec<String>, out: &mut dyn Write| -> Result<(), String> {
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        for v in embedder.embed(&refs)? {
            serde_json::to_writer(&mut *out, &v).map_err(|e| e.to_string())?;
            out.write_all(b"\n").map_err(|e| e.to_string())?;
        }
        lines.clear();
        out.flush().map_err(|e| e.to_string())
    };
    for (n, line) in stdin.split(b'\n').enumerate() {
        let bytes = match line {
            Ok(b) => b,
            Err(e) => {
                eprint_redacted!("error: stdin: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Invalid UTF-8 is replaced (U+FFFD), not fatal: the text is still embedded.
        let text = String::from_utf8_lossy(&bytes);
        let text = text.strip_suffix('\r').unwrap_or(&text).to_owned();
        lines.push(text);
        if lines.len() >= embedding.max_batch
            && let Err(e) = flush(&mut lines, &mut out)
        {
            eprint_redacted!("error: line {}: {e}", n + 1);
            return ExitCode::FAILURE;
        }
    }
    if !lines.is_empty()
        && let Err(e) = flush(&mut lines, &mut out)
    {
        eprint_redacted!("error: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

async fn status(path: &std::path::Path, json: bool, timeout: Duration) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let status = tributary::status::collect(&config, timeout).await;
    if json {
        match serde_json::to_string_pretty(&status) {
            Ok(s) => print_redacted!("{s}"),
            Err(e) => {
                eprint_redacted!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", redact(&tributary::status::render(&status)));
    }
    ExitCode::SUCCESS
}

async fn verify(path: &std::path::Path, options: &tributary::verify::Options) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut out = std::io::stdout();
    match tributary::verify::run(&config, options, &mut out).await {
        Ok(report) => {
            let code = report.exit_code();
            let compared = report
                .tables
                .iter()
                .filter(|(_, o)| matches!(o, tributary::verify::Outcome::Compared(_)))
                .count();
            match code {
                0 => eprintln!("{compared} tables equal their source"),
                1 => eprintln!("differences found"),
                _ if compared == 0 => eprintln!("error: no table was compared"),
                _ => eprintln!("error: not every table could be compared"),
            }
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Requests an on-demand snapshot of `table` and (unless `no_wait`) follows it to its end.
async fn snapshot(path: &std::path::Path, table: &str, no_wait: bool) -> ExitCode {
    use tributary::source::postgres::incremental;
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(pg) = &config.sources.postgres else {
        eprint_redacted!(
            "error: config {}: sources.postgres: section missing (on-demand snapshots read PostgreSQL tables)",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let id = match incremental::request(pg, table).await {
        Ok(id) => id,
        Err(e) => {
            eprint_redacted!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    print_redacted!(
        "requested snapshot of {table} for slot {} (request {id})",
        pg.slot
    );
    if no_wait {
        return ExitCode::SUCCESS;
    }
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "snapshot {msg} [{bar:30}] {human_pos}/~{human_len} rows ({per_sec}, eta {eta})",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_message(table.to_string());
        bar
    });
    let mut waiting_said = false;
    let end = incremental::watch(pg, &id, |p| {
        if let Some(b) = &bar {
            b.set_length(p.estimated.unwrap_or(0).max(p.rows).max(0) as u64);
            b.set_position(p.rows.max(0) as u64);
        } else if !p.started && !waiting_said {
            waiting_said = true;
            eprintln!(
                "waiting for the connector of slot {} to take the request",
                pg.slot
            );
        }
    })
    .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match end {
        Ok(p) if p.error.is_none() => {
            print_redacted!(
                "snapshot of {} durable in every sink: {} rows in {:.1} s",
                p.table,
                p.rows,
                p.seconds.unwrap_or(0.0)
            );
            ExitCode::SUCCESS
        }
        Ok(p) => {
            eprint_redacted!(
                "error: snapshot of {} failed: {}",
                p.table,
                p.error.unwrap_or_default()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprint_redacted!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = first_tx.send(());
        wait_for_signal().await;
        eprintln!("second signal: exiting now (unacknowledged events will be delivered again)");
        std::process::exit(130);
    });
    let shutdown = async move {
        let _ = first_rx.await;
    };
    match tributary::pipeline::run(config, shutdown).await {
        Ok(summary) => {
            tracing::info!(
                events = summary.events,
                batches = summary.batches,
                dead_letters = summary.dead_letters,
                "stopped"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            use tributary::error::{Classify, ErrorKind};
            eprint_redacted!("error: {e}");
            if e.kind() == ErrorKind::Config {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        // Without signal handlers, only Ctrl-C through tokio's portable path.
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
