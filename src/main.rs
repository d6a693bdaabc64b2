//! The `tributary` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tributary::config::Config;
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
    /// Validate the configuration and try to reach every service it names.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Seconds each service may take to answer.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

/// Exit code for a configuration the connector cannot start with.
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    match cli.command {
        Command::Check { config, timeout } => check(&config, Duration::from_secs(timeout)).await,
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: config {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

async fn check(path: &std::path::Path, timeout: Duration) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("ok    config          {}", path.display());
    let probes = tributary::check::run(&config, timeout).await;
    let mut failed = 0;
    for p in &probes {
        match &p.result {
            Ok(detail) => println!("ok    {:<15} {}  ({detail})", p.service, p.target),
            Err(e) => {
                failed += 1;
                println!("FAIL  {:<15} {}  {e}", p.service, p.target);
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
