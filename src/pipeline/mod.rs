//! `tributary run`: sources → batches → enrichment → sinks, acknowledging only what is durable.
//!
//! ```text
//! source ─forward─┐                                                     ┌─► sink (Delta)
//! source ─forward─┴► merged ─► batcher ─► enrich ─► delivery ─accept───┼─► sink (pgvector)
//!    ▲                                                  │   dead letters └─► destination
//!    └──────────── ack(position) ◄── checkpoints (lowest durable over sinks) ◄┘
//! ```
//!
//! - Backpressure: every hop is a bounded channel; a slow sink fills them and the sources stop
//!   fetching, so memory stays bounded.
//! - Ordering: one batcher, one enrichment task and one delivery task, so events reach the sinks
//!   in source order.
//! - Acknowledgement: see [`delivery`]; a position reaches its source only once every sink holds
//!   it durably and its dead letters are durable.
//! - Supervision: every stage is a task in one [`supervisor::Supervisor`]. A stage that panics,
//!   fails, or ends while the run needs it stops the run with an error naming it (non-zero
//!   exit); nothing unacknowledged is lost, it is delivered again after a restart.
//! - Shutdown: the first SIGINT/SIGTERM stops intake; in-flight batches drain through the sinks
//!   and are acknowledged, then the run returns (bounded by `pipeline.shutdown_timeout_s`;
//!   whatever was not acknowledged by then is delivered again next time).
//! - Errors keep their kind ([`ErrorKind`]); what each kind means is [`crate::retry`]'s table.

mod delivery;
mod stages;
mod supervisor;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{Config, PipelineConfig};
use crate::dead_letter::DeadLetters;
use crate::enrich::{Enriched, Enricher};
use crate::error::{Classify, ErrorKind};
use crate::event::ChangeEvent;
use crate::sink::durable::Durable;
use crate::sink::{self, Sink};
use crate::source::{self, Source, SourceError, StartContext, Stop};
use crate::telemetry::{self, health::Health};
use delivery::Delivery;
use stages::Output;
use supervisor::{Ended, Supervisor};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The configuration cannot run: the message says what to change.
    #[error("{0}")]
    Config(String),
    /// A stage failed; its error kept its kind.
    #[error("{stage}: {message}")]
    Stage {
        stage: String,
        kind: ErrorKind,
        message: String,
    },
    /// A stage panicked or ended while the run still needed it.
    #[error("{stage} {cause}")]
    Died { stage: String, cause: String },
}

impl PipelineError {
    fn stage<E: Classify + std::fmt::Display>(stage: &str, e: &E) -> Self {
        match e.kind() {
            ErrorKind::Config => PipelineError::Config(format!("{stage}: {e}")),
            kind => PipelineError::Stage {
                stage: stage.to_owned(),
                kind,
                message: e.to_string(),
            },
        }
    }
}

impl Classify for PipelineError {
    fn kind(&self) -> ErrorKind {
        match self {
            PipelineError::Config(_) => ErrorKind::Config,
            PipelineError::Stage { kind, .. } => *kind,
            PipelineError::Died { .. } => ErrorKind::Connection,
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunSummary {
    pub events: u64,
    pub batches: u64,
    pub dead_letters: u64,
}

/// Runs the configured sources and sinks until `shutdown` resolves (then drains) or a stage
/// fails.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, PipelineError> {
    let sources = source::configured(&config);
    if sources.is_empty() {
        return Err(PipelineError::Config(
            "sources: `run` needs [sources.postgres] or [sources.kafka]".into(),
        ));
    }
    let health = Health::new(Duration::from_secs(config.telemetry.ready_window_s));
    let _http = serve_telemetry(&config, &health).await?;
    let dead_letters =
        DeadLetters::open(&config).map_err(|e| PipelineError::stage("dead_letter", &e))?;
    tracing::info!(destination = dead_letters.describe(), "dead letters");
    let sinks = sink::open(&config, &health)
        .await
        .map_err(|e| PipelineError::stage("sinks", &e))?;
    let enrich = Enrichment::load(&config).await?;
    let parts = Parts {
        sources,
        sinks,
        enrich,
        dead_letters,
        health,
    };
    run_parts(parts, &config.pipeline, shutdown).await
}

/// Everything a run is made of, built from the configuration (or, in tests, by hand).
struct Parts {
    sources: Vec<Box<dyn Source>>,
    sinks: Vec<Box<dyn Sink>>,
    enrich: Option<Enrichment>,
    dead_letters: DeadLetters,
    health: Health,
}

/// The data path: start every source, wire the stages, deliver, supervise.
async fn run_parts(
    parts: Parts,
    settings: &PipelineConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, PipelineError> {
    if parts.sinks.is_empty() {
        return Err(PipelineError::Config(
            "sinks: `run` needs [sinks.delta] or [sinks.pgvector]".into(),
        ));
    }
    let mut stages: Supervisor<Output> = Supervisor::new();
    // `channel_capacity` counts events; the merged channel holds batches of up to
    // `batch_max_events`.
    let batches = (settings.channel_capacity / settings.batch_max_events.max(1)).max(1);
    let (merged_tx, merged_rx) = mpsc::channel(batches);
    let mut ackers = Vec::new();
    let mut stops: Vec<Box<dyn Stop>> = Vec::new();
    // Lent to the sources while they start (a snapshot durable everywhere is not taken again).
    let durable = Durable::new(parts.sinks);
    for source in parts.sources {
        let name = source.name();
        let context = StartContext {
            capacity_events: settings.channel_capacity,
            batch_max_events: settings.batch_max_events,
            health: parts.health.source(name),
            dead_letters: parts.dead_letters.clone(),
            durable: durable.clone(),
        };
        let started = match source.start(context).await {
            Ok(s) => s,
            Err(e) => {
                stop_all(stops).await;
                return Err(PipelineError::stage(&source_stage(name), &e));
            }
        };
        let forward = stages::forward(started.batches, merged_tx.clone());
        stages.spawn(source_stage(name), forward);
        ackers.push(started.acker);
        stops.push(started.stop);
    }
    drop(merged_tx);
    let sinks = durable.into_sinks().await;
    let (batch_tx, batch_rx) = mpsc::channel::<Vec<ChangeEvent>>(4);
    let max_wait = Duration::from_millis(settings.batch_max_wait_ms);
    let batcher = stages::batch(merged_rx, batch_tx, settings.batch_max_events, max_wait);
    stages.spawn("batcher", batcher);
    let (enriched_tx, enriched_rx) = mpsc::channel::<Enriched>(4);
    match parts.enrich {
        Some(e) => stages.spawn("enrich", e.run(batch_rx, enriched_tx)),
        None => stages.spawn("enrich", stages::pass_through(batch_rx, enriched_tx)),
    }
    let delivery = Delivery::new(sinks, ackers, parts.dead_letters, &parts.health);
    stages.spawn("delivery", async move {
        delivery.run(enriched_rx).await.map(Some)
    });
    supervise(stages, stops, settings, shutdown).await
}

/// Waits for the run to end: drained after `shutdown`, or stopped by a stage that ended.
async fn supervise(
    mut stages: Supervisor<Output>,
    stops: Vec<Box<dyn Stop>>,
    settings: &PipelineConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, PipelineError> {
    tokio::pin!(shutdown);
    let timeout = Duration::from_secs(settings.shutdown_timeout_s);
    let mut intake = Intake::Open(stops);
    let mut failure: Option<PipelineError> = None;
    let mut summary = None;
    while !stages.is_empty() {
        tokio::select! {
            () = &mut shutdown, if intake.is_open() => {
                tracing::info!("shutdown requested: draining in-flight batches");
                intake.stop(timeout);
            }
            () = sleep_until(intake.deadline()) => {
                tracing::warn!("shutdown timeout reached; unacknowledged events will be delivered again");
                stages.abort_all();
                break;
            }
            Some((stage, ended)) = stages.next() => match ended {
                Ended::Finished(Some(s)) => summary = Some(s),
                Ended::Finished(None) if stage.starts_with("sources.") && intake.is_open() => {
                    tracing::error!(%stage, "source stopped; draining and stopping the run");
                    failure.get_or_insert(PipelineError::Died {
                        stage,
                        cause: "stopped while the run needed it".into(),
                    });
                    intake.stop(timeout);
                }
                Ended::Finished(None) | Ended::Cancelled => {}
                Ended::Failed(e) if failure.is_none() => {
                    tracing::error!(%stage, error = %e, "stage failed; stopping the run");
                    failure = Some(e);
                    stages.abort_all();
                    intake.stop(timeout);
                }
                Ended::Panicked(cause) if failure.is_none() => {
                    tracing::error!(%stage, %cause, "stage panicked; stopping the run");
                    failure = Some(PipelineError::Died {
                        stage,
                        cause: format!("panicked: {cause}"),
                    });
                    stages.abort_all();
                    intake.stop(timeout);
                }
                Ended::Failed(_) | Ended::Panicked(_) => {}
            },
        }
    }
    // Every acknowledgement handle went with the delivery task: the sources can finish.
    drop(stages);
    let source_errors = intake.finish().await;
    // A source's own error says why it stopped: it beats the bare "stopped" above.
    if let Some(first) = source_errors.into_iter().next()
        && failure.as_ref().is_none_or(
            |f| matches!(f, PipelineError::Died { stage, .. } if stage.starts_with("sources.")),
        )
    {
        failure = Some(PipelineError::stage("sources", &first));
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(summary.unwrap_or_default()),
    }
}

/// Whether the sources still read, and stopping them (in the background: they apply the
/// acknowledgements of what drains meanwhile).
enum Intake {
    Open(Vec<Box<dyn Stop>>),
    Stopping {
        task: tokio::task::JoinHandle<Vec<SourceError>>,
        deadline: tokio::time::Instant,
    },
}

impl Intake {
    fn is_open(&self) -> bool {
        matches!(self, Intake::Open(_))
    }

    fn stop(&mut self, timeout: Duration) {
        if let Intake::Open(stops) = self {
            let stops = std::mem::take(stops);
            *self = Intake::Stopping {
                task: tokio::spawn(stop_all(stops)),
                deadline: tokio::time::Instant::now() + timeout,
            };
        }
    }

    fn deadline(&self) -> Option<tokio::time::Instant> {
        match self {
            Intake::Open(_) => None,
            Intake::Stopping { deadline, .. } => Some(*deadline),
        }
    }

    /// Stops the sources (if not yet) and returns their errors.
    async fn finish(self) -> Vec<SourceError> {
        match self {
            Intake::Open(stops) => stop_all(stops).await,
            Intake::Stopping { task, .. } => task.await.unwrap_or_else(|e| {
                vec![SourceError {
                    kind: ErrorKind::Connection,
                    message: format!("stopping the sources: {e}"),
                }]
            }),
        }
    }
}

/// Stops every source concurrently; returns their errors.
async fn stop_all(stops: Vec<Box<dyn Stop>>) -> Vec<SourceError> {
    let results = futures::future::join_all(stops.into_iter().map(|s| s.shutdown())).await;
    results.into_iter().filter_map(Result::err).collect()
}

/// A source's stage name: its config section.
fn source_stage(name: &str) -> String {
    format!("sources.{name}")
}

/// The embedding stage with the lookups it answers cache misses from.
struct Enrichment {
    enricher: Enricher,
    lookups: Option<EnrichLookups>,
    max_wait: Duration,
}

/// What the enrichment stage asks when its memory does not know a row: the pgvector table (each
/// row's text hash and payload), on a connection of its own, and the PostgreSQL source (a row's
/// current values, for unchanged-TOAST values nothing else holds).
struct EnrichLookups {
    sink: sink::pgvector::PgvectorSink,
    source: Option<crate::source::postgres::lookup::RowReader>,
}

impl crate::enrich::Lookups for EnrichLookups {
    async fn stored_row(
        &mut self,
        source: &str,
        key: &crate::event::Row,
    ) -> Option<crate::enrich::StoredRow> {
        crate::enrich::Lookups::stored_row(&mut self.sink, source, key).await
    }

    async fn source_row(
        &mut self,
        source: &str,
        key: &crate::event::Row,
        columns: &[crate::event::Name],
    ) -> Option<crate::event::Row> {
        let reader = self.source.as_mut()?;
        match reader.read(source, key, columns).await {
            Ok(row) => row,
            Err(e) => {
                tracing::warn!(source, error = %e, "reading an unchanged TOAST value from the source failed");
                None
            }
        }
    }
}

impl Enrichment {
    async fn load(config: &Config) -> Result<Option<Self>, PipelineError> {
        let Some(e) = config.embedding.clone() else {
            return Ok(None);
        };
        let max_wait = Duration::from_millis(e.max_wait_ms);
        let enricher = tokio::task::spawn_blocking(move || Enricher::new(&e))
            .await
            .map_err(|e| PipelineError::Config(format!("embedding model: {e}")))?
            .map_err(|e| PipelineError::Config(e.to_string()))?;
        let lookups = match &config.sinks.pgvector {
            Some(p) if p.dimension as usize != enricher.dimension() => {
                return Err(PipelineError::Config(format!(
                    "sinks.pgvector.dimension is {} but the model in embedding.model_dir returns \
                     {} dimensions",
                    p.dimension,
                    enricher.dimension()
                )));
            }
            Some(p) => Some(EnrichLookups {
                sink: sink::pgvector::PgvectorSink::connect(p.clone())
                    .await
                    .map_err(|e| PipelineError::stage("sinks.pgvector", &e))?,
                source: config
                    .sources
                    .postgres
                    .as_ref()
                    .map(|pg| crate::source::postgres::lookup::RowReader::new(pg.url.clone())),
            }),
            None => None,
        };
        Ok(Some(Enrichment {
            enricher,
            lookups,
            max_wait,
        }))
    }

    async fn run(
        self,
        input: mpsc::Receiver<Vec<ChangeEvent>>,
        output: mpsc::Sender<Enriched>,
    ) -> Result<Output, PipelineError> {
        crate::enrich::run(self.enricher, self.lookups, input, output, self.max_wait).await;
        Ok(None)
    }
}

async fn serve_telemetry(
    config: &Config,
    health: &Health,
) -> Result<Option<AbortOnDrop>, PipelineError> {
    if config.telemetry.listen.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = config
        .telemetry
        .listen
        .parse()
        .map_err(|_| PipelineError::Config("telemetry.listen: not an address".into()))?;
    let (bound, task) = telemetry::http::serve(addr, telemetry::install_metrics(), health.clone())
        .await
        .map_err(|e| PipelineError::Config(format!("telemetry.listen {addr}: {e}")))?;
    tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
    Ok(Some(AbortOnDrop(task)))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
