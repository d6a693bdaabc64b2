//! `tributary run`: source → batches → enrichment → sinks, acknowledging only what is durable.
//!
//! ```text
//! sources ──events──► batcher ──Vec<ChangeEvent>──► enrich ──Enriched──► sink loop ──► Delta (Bronze)
//!      ▲          (bounded)          (bounded)                   (bounded)        │      ──► pgvector
//!      │                                                                          │      ──► dead letters
//!      └──────────────── ack(position) ◄── Checkpoints (min durable over sinks) ◄─┘
//! ```
//!
//! - Backpressure: every hop is a bounded channel; a slow sink fills them and the source stops
//!   fetching, so memory stays bounded.
//! - Ordering: one batcher, one enrichment task and one sink loop, so events reach the sinks in
//!   source order.
//! - Acknowledgement: after a batch is committed in every sink and its dead letters are durable,
//!   the checkpoint coordinator hands the source the highest position durable everywhere.
//! - Shutdown: the first SIGINT/SIGTERM stops intake; in-flight batches drain through the sinks
//!   and are acknowledged, then the process exits 0 (bounded by `pipeline.shutdown_timeout_s`;
//!   whatever was not acknowledged by then is simply delivered again next time).
//! - Errors: connection errors are retried with backoff inside the stages; data errors become
//!   dead letters; configuration errors stop `run` with the message.
//!
//! Both sources (PostgreSQL snapshot + stream, Kafka) feed one bounded channel, each in its own
//! order; a position is acknowledged to the source it came from. Dead letters go to the Delta
//! `_dlq` table when a Delta sink is configured, otherwise to `sources.kafka.dead_letter`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::enrich::{self, Enriched, Enricher};
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Position, StreamId};
use crate::sink::delta::DeltaSink;
use crate::sink::pgvector::PgvectorSink;
use crate::source::kafka::{self, dead_letters::DeadLetterWriter};
use crate::source::postgres;
use crate::telemetry::{self, health::Health};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The configuration cannot run: the message says what to change.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Sink(String),
}

impl Classify for PipelineError {
    fn kind(&self) -> ErrorKind {
        match self {
            PipelineError::Config(_) => ErrorKind::Config,
            PipelineError::Source(_) | PipelineError::Sink(_) => ErrorKind::Connection,
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

/// Runs until `shutdown` resolves (then drains) or the source ends.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, PipelineError> {
    let kafka_config = config.sources.kafka.clone();
    let pg_source_config = config.sources.postgres.clone();
    if kafka_config.is_none() && pg_source_config.is_none() {
        return Err(PipelineError::Config(
            "sources: `run` needs [sources.postgres] or [sources.kafka]".into(),
        ));
    }
    let pg_config = config.sinks.pgvector.clone();
    let dead_letter_config = match &kafka_config {
        Some(k) => Some(k.dead_letter.clone().ok_or_else(|| {
            PipelineError::Config(
                "sources.kafka.dead_letter: set `topic` or `path` (where rejected events go)"
                    .into(),
            )
        })?),
        None => None,
    };

    let health = Health::new(Duration::from_secs(config.telemetry.ready_window_s));
    let _http = if config.telemetry.listen.is_empty() {
        None
    } else {
        let addr: SocketAddr = config
            .telemetry
            .listen
            .parse()
            .map_err(|_| PipelineError::Config("telemetry.listen: not an address".into()))?;
        let (bound, task) =
            telemetry::http::serve(addr, telemetry::install_metrics(), health.clone())
                .await
                .map_err(|e| PipelineError::Config(format!("telemetry.listen {addr}: {e}")))?;
        tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
        Some(AbortOnDrop(task))
    };

    let delta = match &config.sinks.delta {
        Some(d) => Some(
            DeltaSink::new(&config.name, d).map_err(|e| PipelineError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let mut pgvector = match &pg_config {
        Some(p) => Some(
            PgvectorSink::connect(p.clone())
                .await
                .map_err(|e| PipelineError::Sink(e.to_string()))?,
        ),
        None => None,
    };
    let delta_health = delta.as_ref().map(|_| health.sink("delta"));
    let mut delta = match (delta, &delta_health) {
        (Some(d), Some(h)) => Some(d.with_health(h.clone())),
        (d, _) => d,
    };
    let pg_health = pgvector.as_ref().map(|_| health.sink("pgvector"));
    let mut sink_names = Vec::new();
    if delta.is_some() {
        sink_names.push("delta");
    }
    if pgvector.is_some() {
        sink_names.push("pgvector");
    }

    let enricher = match config.embedding.clone() {
        Some(e) => {
            let en = tokio::task::spawn_blocking(move || Enricher::new(&e))
                .await
                .map_err(|e| PipelineError::Config(format!("embedding model: {e}")))?
                .map_err(|e| PipelineError::Config(e.to_string()))?;
            if let Some(p) = pg_config
                .as_ref()
                .filter(|p| p.dimension as usize != en.dimension())
            {
                return Err(PipelineError::Config(format!(
                    "sinks.pgvector.dimension is {} but the model in embedding.model_dir returns \
                     {} dimensions",
                    p.dimension,
                    en.dimension()
                )));
            }
            Some(en)
        }
        None => None,
    };

    let mut dead_letters = match (&kafka_config, &dead_letter_config) {
        (Some(k), Some(d)) => {
            let props = k
                .librdkafka_properties()
                .map_err(|e| PipelineError::Config(e.to_string()))?;
            Some(
                DeadLetterWriter::open(d, &props)
                    .await
                    .map_err(|e| PipelineError::Config(e.to_string()))?,
            )
        }
        _ => None,
    };
    // Every source feeds one bounded channel, each in its own order. `channel_capacity` counts
    // events; the channels hold batches, so each is sized in batches of its producer.
    let cap = config.pipeline.channel_capacity;
    let in_batches = |batch: usize| (cap / batch.max(1)).max(1);
    let (merged_tx, mut merged_rx) =
        mpsc::channel::<Vec<ChangeEvent>>(in_batches(config.pipeline.batch_max_events));
    let mut forwarders = Vec::new();
    // A source whose task ends (it failed) stops the run: it must not go on silently without it.
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<&'static str>();
    let mut sources = Sources::default();
    if let Some(k) = &kafka_config {
        let (mut rx, handle) = kafka::start_with_health(
            k,
            in_batches(kafka::consumer::MAX_BATCH),
            Some(health.source("kafka")),
        )
        .await
        .map_err(|e| PipelineError::Source(e.to_string()))?;
        sources.kafka_acker = Some(handle.acker());
        sources.kafka = Some(handle);
        let tx = merged_tx.clone();
        let ended = ended_tx.clone();
        forwarders.push(AbortOnDrop(tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                let events = batch.into_iter().map(|e| e.event).collect();
                if tx.send(events).await.is_err() {
                    return;
                }
            }
            let _ = ended.send("kafka");
        })));
    }
    if let Some(p) = &pg_source_config {
        let (mut rx, handle) = postgres::start(
            p,
            in_batches(config.pipeline.batch_max_events),
            config.pipeline.batch_max_events,
            Some(health.source("postgres")),
        )
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::Config => PipelineError::Config(format!("sources.postgres: {e}")),
            _ => PipelineError::Source(format!("sources.postgres: {e}")),
        })?;
        sources.pg_acker = Some(handle.acker());
        sources.postgres = Some(handle);
        let tx = merged_tx.clone();
        let ended = ended_tx.clone();
        forwarders.push(AbortOnDrop(tokio::spawn(async move {
            while let Some(events) = rx.recv().await {
                if tx.send(events).await.is_err() {
                    return;
                }
            }
            let _ = ended.send("postgres");
        })));
    }
    drop(merged_tx);

    // Batcher: cut by count or by time.
    let (batch_tx, batch_rx) = mpsc::channel::<Vec<ChangeEvent>>(4);
    let (max_events, max_wait) = (
        config.pipeline.batch_max_events,
        Duration::from_millis(config.pipeline.batch_max_wait_ms),
    );
    let batcher = tokio::spawn(async move {
        while let Some(first) = merged_rx.recv().await {
            let mut batch = first;
            let deadline = tokio::time::Instant::now() + max_wait;
            while batch.len() < max_events {
                match tokio::time::timeout_at(deadline, merged_rx.recv()).await {
                    Ok(Some(more)) => batch.extend(more),
                    Ok(None) | Err(_) => break,
                }
            }
            if batch_tx.send(batch).await.is_err() {
                break;
            }
        }
    });

    let (enriched_tx, mut enriched_rx) = mpsc::channel::<Enriched>(4);
    let enrich_task = match enricher {
        Some(en) => {
            // The pgvector table remembers each row's text hash: a second connection answers
            // the enrichment stage's cache misses.
            let lookups = match &pg_config {
                Some(p) => Some(
                    PgvectorSink::connect(p.clone())
                        .await
                        .map_err(|e| PipelineError::Sink(e.to_string()))?,
                ),
                None => None,
            };
            let wait =
                Duration::from_millis(config.embedding.as_ref().map_or(20, |e| e.max_wait_ms));
            enrich::spawn(en, lookups, batch_rx, enriched_tx, wait);
            None
        }
        None => Some(tokio::spawn(async move {
            let mut rx = batch_rx;
            while let Some(events) = rx.recv().await {
                let out = Enriched {
                    events,
                    dead_letters: Vec::new(),
                };
                if enriched_tx.send(out).await.is_err() {
                    break;
                }
            }
        })),
    };

    let mut checkpoints = Checkpoints::new(sink_names.iter().copied());
    let kafka_acker = sources.kafka_acker.take();
    let pg_acker = sources.pg_acker.take();
    let mut summary = RunSummary::default();
    let mut source = Some(sources);
    let mut stopping = None;
    let mut drain_deadline = None;
    // Last positions of the batches buffered in the Delta sink and not yet committed there.
    let mut delta_pending: Vec<((String, StreamId), Position)> = Vec::new();
    tokio::pin!(shutdown);
    loop {
        let flush_at = delta.as_ref().and_then(DeltaSink::flush_deadline);
        let next = tokio::select! {
            () = &mut shutdown, if source.is_some() => {
                tracing::info!("shutdown requested: draining in-flight batches");
                if let Some(s) = source.take() {
                    stopping = Some(tokio::spawn(s.shutdown()));
                }
                drain_deadline = Some(
                    tokio::time::Instant::now()
                        + Duration::from_secs(config.pipeline.shutdown_timeout_s),
                );
                continue;
            }
            Some(name) = ended_rx.recv(), if source.is_some() => {
                tracing::error!(source = name, "source stopped; draining and stopping the run");
                if let Some(s) = source.take() {
                    stopping = Some(tokio::spawn(s.shutdown()));
                }
                drain_deadline = Some(
                    tokio::time::Instant::now()
                        + Duration::from_secs(config.pipeline.shutdown_timeout_s),
                );
                continue;
            }
            () = sleep_until(drain_deadline) => {
                tracing::warn!("shutdown timeout reached; unacknowledged events will be delivered again");
                break;
            }
            () = sleep_until(flush_at) => {
                // Time-based Delta flush while no batch arrives.
                if let (Some(d), Some(h)) = (delta.as_mut(), delta_health.as_ref()) {
                    flush_delta(d, h, &mut delta_pending, &mut checkpoints, &kafka_acker, &pg_acker).await?;
                }
                continue;
            }
            next = enriched_rx.recv() => next,
        };
        let Some(batch) = next else {
            // Drained: commit what the Delta sink still holds, then acknowledge it.
            if let (Some(d), Some(h)) = (delta.as_mut(), delta_health.as_ref()) {
                flush_delta(
                    d,
                    h,
                    &mut delta_pending,
                    &mut checkpoints,
                    &kafka_acker,
                    &pg_acker,
                )
                .await?;
            }
            break;
        };
        let started = Instant::now();
        let mut letters = batch.dead_letters;
        let mut rows = 0;
        let last = last_positions(&batch.events);
        if let (Some(d), Some(h)) = (delta.as_mut(), delta_health.as_ref()) {
            for (source, events) in by_source(&batch.events) {
                match d.append(source, &events).await {
                    Ok(rejected) => letters.extend(rejected),
                    Err(e) => {
                        h.commit_failed(&e);
                        return Err(PipelineError::Sink(e.to_string()));
                    }
                }
            }
            delta_pending.extend(last.iter().map(|(k, p)| (k.clone(), p.clone())));
            // Bronze commits are sized by rows/bytes/time, not by pipeline batch.
            if d.should_flush() {
                // Dead letters first: a position is durable in Delta only with its dead letters.
                write_dead_letters(&mut delta, &mut dead_letters, &mut letters).await?;
                summary.dead_letters += letters.len() as u64;
                letters.clear();
                if let (Some(d), Some(h)) = (delta.as_mut(), delta_health.as_ref()) {
                    rows = flush_delta(
                        d,
                        h,
                        &mut delta_pending,
                        &mut checkpoints,
                        &kafka_acker,
                        &pg_acker,
                    )
                    .await?;
                }
                // Crash point for the crash-safety tests (no-op unless built with `failpoints`).
                fail::fail_point!("pipeline::after-delta-commit", |_| std::process::abort());
            }
        }
        if let (Some(p), Some(h)) = (pgvector.as_mut(), pg_health.as_ref()) {
            match p.write(&batch.events).await {
                Ok(o) => {
                    h.commit_succeeded();
                    letters.extend(o.dead_letters);
                }
                Err(e) => {
                    h.commit_failed(&e);
                    return Err(PipelineError::Sink(e.to_string()));
                }
            }
        }
        // Dead letters are durable before any position behind them is acknowledged.
        write_dead_letters(&mut delta, &mut dead_letters, &mut letters).await?;
        fail::fail_point!("pipeline::before-ack", |_| std::process::abort());
        summary.events += batch.events.len() as u64;
        summary.batches += 1;
        summary.dead_letters += letters.len() as u64;
        for ((source_name, _), position) in &last {
            for sink in sink_names.iter().filter(|s| **s != "delta") {
                if let Some(ack) = checkpoints.durable(sink, source_name, position) {
                    sources_ack(&kafka_acker, &pg_acker, &ack);
                }
            }
        }
        tracing::info!(
            events = batch.events.len(),
            bronze_rows_committed = rows,
            delta_buffered = delta.as_ref().map_or(0, DeltaSink::buffered_rows),
            dead_letters = letters.len(),
            ms = started.elapsed().as_millis() as u64,
            "batch done"
        );
    }
    batcher.abort();
    if let Some(t) = enrich_task {
        t.abort();
    }
    drop(forwarders);
    // The PostgreSQL source applies acknowledgements until every acker is gone.
    drop((kafka_acker, pg_acker));
    let source_result = match (stopping, source) {
        (Some(task), _) => task
            .await
            .map_err(|e| PipelineError::Source(e.to_string()))?,
        // The source ended by itself (its channel closed): why?
        (None, Some(s)) => s.shutdown().await,
        (None, None) => Ok(()),
    };
    source_result.map_err(|e| PipelineError::Source(e.to_string()))?;
    Ok(summary)
}

/// Commits what the Delta sink buffered and marks the batches it held durable in "delta",
/// acknowledging whatever thereby became durable everywhere. Returns the rows committed.
async fn flush_delta(
    delta: &mut DeltaSink,
    health: &telemetry::health::SinkHealth,
    pending: &mut Vec<((String, StreamId), Position)>,
    checkpoints: &mut Checkpoints,
    kafka_acker: &Option<kafka::KafkaAcker>,
    pg_acker: &Option<postgres::PostgresAcker>,
) -> Result<usize, PipelineError> {
    let started = Instant::now();
    let outcome = match delta.flush().await {
        Ok(o) => {
            health.commit_succeeded();
            o
        }
        Err(e) => {
            health.commit_failed(&e);
            return Err(PipelineError::Sink(e.to_string()));
        }
    };
    for ((source, _), position) in pending.drain(..) {
        if let Some(ack) = checkpoints.durable("delta", &source, &position) {
            sources_ack(kafka_acker, pg_acker, &ack);
        }
    }
    if outcome.rows > 0 {
        tracing::info!(
            bronze_rows = outcome.rows,
            tables = outcome.versions.len(),
            ms = started.elapsed().as_millis() as u64,
            "Bronze commit"
        );
    }
    Ok(outcome.rows)
}

/// Makes `letters` durable (the Delta `_dlq` table, else the Kafka source's dead-letter
/// destination).
async fn write_dead_letters(
    delta: &mut Option<DeltaSink>,
    fallback: &mut Option<DeadLetterWriter>,
    letters: &mut [crate::dead_letter::DeadLetter],
) -> Result<(), PipelineError> {
    if letters.is_empty() {
        return Ok(());
    }
    match delta.as_mut() {
        Some(d) => {
            d.write_dead_letters(letters)
                .await
                .map_err(|e| PipelineError::Sink(e.to_string()))?;
        }
        None => {
            let Some(writer) = fallback.as_mut() else {
                return Err(PipelineError::Config(format!(
                    "{} events were rejected and there is nowhere to put them: configure \
                     [sinks.delta] (its _dlq table) or sources.kafka.dead_letter",
                    letters.len()
                )));
            };
            for letter in letters.iter() {
                writer
                    .write(letter)
                    .await
                    .map_err(|e| PipelineError::Sink(e.to_string()))?;
            }
        }
    }
    Ok(())
}

/// The running sources.
#[derive(Default)]
struct Sources {
    kafka: Option<kafka::KafkaSourceHandle>,
    kafka_acker: Option<kafka::KafkaAcker>,
    postgres: Option<postgres::PostgresSourceHandle>,
    pg_acker: Option<postgres::PostgresAcker>,
}

impl Sources {
    /// Stops every source (concurrently) and reports the first failure.
    async fn shutdown(self) -> Result<(), String> {
        let k = async {
            match self.kafka {
                Some(k) => k.shutdown().await.map_err(|e| e.to_string()),
                None => Ok(()),
            }
        };
        let p = async {
            match self.postgres {
                Some(p) => p.shutdown().await.map_err(|e| e.to_string()),
                None => Ok(()),
            }
        };
        let (k, p) = tokio::join!(k, p);
        k.and(p)
    }
}

fn sources_ack(
    kafka: &Option<kafka::KafkaAcker>,
    pg: &Option<postgres::PostgresAcker>,
    position: &Position,
) {
    match position {
        Position::Kafka { .. } => {
            if let Some(k) = kafka {
                k.ack(position);
            }
        }
        Position::Lsn { .. } => {
            if let Some(p) = pg {
                p.ack(position);
            }
        }
    }
}

/// A batch's events grouped by source, each group in source order. The common case, a batch of
/// one source, borrows the batch instead of copying it.
fn by_source(events: &[ChangeEvent]) -> Vec<(&str, std::borrow::Cow<'_, [ChangeEvent]>)> {
    use std::borrow::Cow;
    match events.first() {
        None => return Vec::new(),
        Some(first) if events.iter().all(|e| e.source == first.source) => {
            return vec![(first.source.as_str(), Cow::Borrowed(events))];
        }
        Some(_) => {}
    }
    let mut groups: Vec<(&str, Vec<ChangeEvent>)> = Vec::new();
    for e in events {
        match groups.iter_mut().find(|(s, _)| *s == e.source) {
            Some((_, g)) => g.push(e.clone()),
            None => groups.push((e.source.as_str(), vec![e.clone()])),
        }
    }
    groups
        .into_iter()
        .map(|(s, g)| (s, Cow::Owned(g)))
        .collect()
}

/// The last position of each (source, stream) in a batch (events are in stream order).
fn last_positions(events: &[ChangeEvent]) -> HashMap<(String, StreamId), Position> {
    let mut last = HashMap::new();
    for e in events {
        last.insert((e.source.clone(), e.position.stream()), e.position.clone());
    }
    last
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
