//! The pgvector sink: one table per source that always equals the source, with its embedding.
//!
//! Guarantees:
//! - **Durable means committed.** [`PgvectorSink::write`] returns only after the batch's single
//!   transaction committed; the pipeline may acknowledge the batch's positions from then on.
//! - **Idempotent under replay.** The transaction also records, per source stream, the last
//!   position applied (`_tributary_positions`); a replayed event at or below it is skipped before
//!   it reaches SQL, so a replay cannot resurrect a deleted row. Each row also carries its own
//!   position and the merge only applies strictly newer changes (last writer by position).
//! - **Cheap for the index.** Within a batch only the last change per key is applied; an update
//!   that changes neither payload nor embedding writes nothing (an HNSW index costs milliseconds
//!   per rewritten row). The HNSW index is built once, after the initial snapshot is loaded.
//! - **Bad rows do not block.** A row the database rejects (dimension mismatch, a constraint, a
//!   key that does not cast) is returned as a dead letter with the server's reason: the batch is
//!   retried row by row under savepoints, so only the bad rows are set aside. Lost connections
//!   are retried with exponential backoff (`backon`), replaying the whole batch safely.
//!
//! How a batch is applied (PostgreSQL ≥ 15, for `MERGE`): binary `COPY` into a temporary staging
//! table (keys as text, cast by the merge), fill unchanged-TOAST columns from the stored payload,
//! then one `MERGE` per source table; the chunk rows of texts embedded in chunks follow it
//! ([`chunks`]).

mod apply;
mod chunks;
mod jsonb;
mod load;
mod reject;
mod sink;
mod table;

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use tokio_postgres::Client;

use apply::{apply_row_by_row, apply_source, group_by_source, record_positions};
use table::Target;
pub use table::{key_text, positions_table};

use crate::config::PgvectorSinkConfig as Config;
use crate::dead_letter::DeadLetter;
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Op, Position, Row, StreamId};
use crate::pg::{error_text, quote_ident, quote_qualified};
use crate::retry::{Patience, Retry};
use crate::telemetry::health::SinkHealth;

#[derive(Debug, thiserror::Error)]
pub enum PgvectorError {
    #[error("pgvector sink: connection: {0}")]
    Connection(String),
    #[error("pgvector sink: {0}")]
    Data(String),
    #[error("pgvector sink: {0}")]
    Config(String),
}

impl Classify for PgvectorError {
    fn kind(&self) -> ErrorKind {
        match self {
            PgvectorError::Connection(_) => ErrorKind::Connection,
            PgvectorError::Data(_) => ErrorKind::Data,
            PgvectorError::Config(_) => ErrorKind::Config,
        }
    }
}

impl PgvectorError {
    /// Classifies a server/driver error by SQLSTATE: data exceptions and constraint violations
    /// are the row's fault; connection-class and shutdown errors are transient; the rest
    /// (permissions, missing objects) needs the operator.
    fn from_pg(e: tokio_postgres::Error) -> Self {
        let text = error_text(&e);
        match e.code().map(|c| c.code()) {
            Some(c) if c.starts_with("22") || c.starts_with("23") => PgvectorError::Data(text),
            Some(c)
                if c.starts_with("08") || c.starts_with("57P") || c == "40001" || c == "40P01" =>
            {
                PgvectorError::Connection(text)
            }
            Some(_) => PgvectorError::Config(text),
            None => {
                let io = std::error::Error::source(&e)
                    .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some());
                if e.is_closed() || io {
                    PgvectorError::Connection(text)
                } else {
                    PgvectorError::Config(text)
                }
            }
        }
    }
}

/// What one [`PgvectorSink::write`] did. Returned only once the batch is committed.
#[derive(Debug, Default, PartialEq)]
pub struct WriteOutcome {
    /// Events handed to the database (after replay filtering and per-key deduplication).
    pub applied: usize,
    /// Events at or below the stored position of their stream: already applied before.
    pub skipped: usize,
    /// Events the database rejected, with the reason; their positions count as applied.
    pub dead_letters: Vec<DeadLetter>,
}

pub struct PgvectorSink {
    config: Config,
    client: Option<Client>,
    targets: HashMap<String, Target>,
    /// The positions table exists (checked once per connection: every batch records positions,
    /// even one of truncates only, whose tables may not exist).
    positions_ready: bool,
    positions: HashMap<(String, StreamId), Position>,
    stage_seq: u64,
    /// Told about every failed attempt, so readiness turns red while the database is away.
    health: Option<SinkHealth>,
}

impl std::fmt::Debug for PgvectorSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgvectorSink")
            .field("url", &self.config.url)
            .field("schema", &self.config.schema)
            .field("positions", &self.positions)
            .finish_non_exhaustive()
    }
}

impl PgvectorSink {
    /// Connects and loads the positions already applied (see [`PgvectorSink::positions`]).
    pub async fn connect(config: Config) -> Result<Self, PgvectorError> {
        let mut sink = PgvectorSink {
            config,
            client: None,
            targets: HashMap::new(),
            positions_ready: false,
            positions: HashMap::new(),
            stage_seq: 0,
            health: None,
        };
        sink.client().await?;
        sink.load_positions().await?;
        Ok(sink)
    }

    /// Reports failed attempts to readiness.
    pub fn with_health(mut self, health: SinkHealth) -> Self {
        self.health = Some(health);
        self
    }

    /// Per source and stream, the last position this sink durably applied: where the pipeline
    /// must resume this sink from.
    pub fn positions(&self) -> &HashMap<(String, StreamId), Position> {
        &self.positions
    }

    async fn client(&mut self) -> Result<&mut Client, PgvectorError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let mut pg = crate::pg::Target::parse(self.config.url.expose())
                .map_err(|e| PgvectorError::Config(format!("sinks.pgvector.url: {e}")))?;
            if pg.config_mut().get_application_name().is_none() {
                pg.config_mut().application_name("tributary-pgvector");
            }
            let client = pg
                .open(|e| {
                    tracing::warn!(error = %error_text(&e), "pgvector connection closed");
                })
                .await
                .map_err(|e| {
                    let message = crate::pg::connect_error(&self.config.url, &pg, &e);
                    if crate::pg::is_certificate_error(&e) {
                        PgvectorError::Config(message)
                    } else {
                        PgvectorError::Connection(message)
                    }
                })?;
            // Target tables may have been dropped or re-created meanwhile: look again.
            self.targets.clear();
            self.positions_ready = false;
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| PgvectorError::Connection("no connection".into()))
    }

    async fn load_positions(&mut self) -> Result<(), PgvectorError> {
        let table = positions_table(&self.config.schema);
        let client = self.client().await?;
        let exists = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map_err(PgvectorError::from_pg)?
            .get::<_, bool>(0);
        if !exists {
            return Ok(());
        }
        let rows = client
            .query(&format!("SELECT source, position FROM {table}"), &[])
            .await
            .map_err(PgvectorError::from_pg)?;
        for row in rows {
            let source: String = row.try_get(0).map_err(PgvectorError::from_pg)?;
            let json: serde_json::Value = row.try_get(1).map_err(PgvectorError::from_pg)?;
            let position: Position = serde_json::from_value(json).map_err(|e| {
                PgvectorError::Config(format!("{table}: unreadable position for {source}: {e}"))
            })?;
            self.positions.insert((source, position.stream()), position);
        }
        Ok(())
    }

    /// The text hash stored with a row's embedding, for the enrichment stage's cache misses.
    pub async fn stored_text_hash(
        &mut self,
        source: &str,
        key: &Row,
    ) -> Result<Option<u64>, PgvectorError> {
        Ok(self
            .stored_row(source, key)
            .await?
            .and_then(|r| r.text_hash))
    }

    /// The stored text hash and payload of the row under `key`; `None` when there is no such row
    /// (or no table yet).
    pub async fn stored_row(
        &mut self,
        source: &str,
        key: &Row,
    ) -> Result<Option<crate::enrich::StoredRow>, PgvectorError> {
        let schema = self.config.schema.clone();
        let table = quote_qualified(&schema, &self.config.target_table(source));
        let client = self.client().await?;
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map_err(PgvectorError::from_pg)?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let mut conds = Vec::new();
        let mut params: Vec<Option<String>> = Vec::new();
        for (i, c) in key.columns().enumerate() {
            conds.push(format!(
                "{} = $%{}::text::{}",
                quote_ident(&c.name),
                i + 1,
                table::sql_type(&c.value)
            ));
            params.push(key_text(&c.value));
        }
        let sql = format!(
            "SELECT text_hash, payload FROM {table} WHERE {}",
            conds.join(" AND ").replace("$%", "$")
        );
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as _).collect();
        let row = client
            .query_opt(&sql, &refs)
            .await
            .map_err(PgvectorError::from_pg)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let hash: Option<i64> = row.try_get(0).map_err(PgvectorError::from_pg)?;
        let payload: Option<serde_json::Value> = row.try_get(1).map_err(PgvectorError::from_pg)?;
        Ok(Some(crate::enrich::StoredRow {
            text_hash: hash.map(|h| h as u64),
            payload,
        }))
    }

    /// Applies `events` (in source order) and returns once they are committed. Events at or
    /// below a stream's stored position are skipped; rejected rows come back as dead letters.
    pub async fn write(&mut self, events: &[ChangeEvent]) -> Result<WriteOutcome, PgvectorError> {
        let fresh: Vec<&ChangeEvent> = events.iter().filter(|e| !self.already_applied(e)).collect();
        let skipped = events.len() - fresh.len();
        // Events no pgvector table can hold are set aside before any SQL: one such event must
        // neither fail the batch nor stop the run (it would fail again on every restart).
        let mut rejected = Vec::new();
        let mut taken = Vec::with_capacity(fresh.len());
        for e in &fresh {
            match self.rejection(e) {
                Some(reason) => rejected.push(reject::dead_letter(e, reason)),
                None => taken.push(*e),
            }
        }
        if !rejected.is_empty() {
            metrics::counter!("tributary_dead_letters_total", "stage" => "pgvector")
                .increment(rejected.len() as u64);
        }
        if taken.is_empty() {
            self.advance_positions(&fresh);
            return Ok(WriteOutcome {
                skipped,
                dead_letters: rejected,
                ..WriteOutcome::default()
            });
        }
        // Fault injection for the supervision tests (no-op unless built with `failpoints`).
        fail::fail_point!("pgvector::write");
        let mut retry =
            Retry::new("pgvector batch", Patience::Bounded).with_health(self.health.as_ref());
        let mut outcome = loop {
            match self.apply(&taken).await {
                Ok(o) => break o,
                Err(e) => {
                    retry.after(e).await?;
                    // Replayed whole on a new connection: the transaction never committed.
                    self.client = None;
                }
            }
        };
        outcome.skipped = skipped;
        // The sink's own rejections first, then the database's.
        let mut letters = rejected;
        letters.append(&mut outcome.dead_letters);
        outcome.dead_letters = letters;
        self.advance_positions(&fresh);
        // The index is built once a source's snapshot is over: at its first streamed change.
        let streamed: HashSet<&str> = taken
            .iter()
            .filter(|e| e.op != Op::Snapshot)
            .map(|e| e.source.as_str())
            .collect();
        for source in streamed {
            self.finish_snapshot(source).await?;
        }
        Ok(outcome)
    }

    /// Declares `source`'s initial snapshot loaded: builds its HNSW index if it has none.
    pub async fn finish_snapshot(&mut self, source: &str) -> Result<(), PgvectorError> {
        if !self.config.index.hnsw {
            return Ok(());
        }
        let Some(target) = self.targets.get(source).cloned() else {
            return Ok(());
        };
        if target.has_index {
            return Ok(());
        }
        let config = self.config.clone();
        let started = Instant::now();
        let mut retry =
            Retry::new("HNSW index build", Patience::Bounded).with_health(self.health.as_ref());
        loop {
            let client = self.client().await?;
            let mut built =
                table::build_index(&*client, &config, &target.qualified, &target.table).await;
            if let (Ok(()), Some(chunks)) = (&built, &target.chunks) {
                let name = chunks::table_name(&target.table);
                built = table::build_index(&*client, &config, chunks, &name).await;
            }
            match built {
                Ok(()) => break,
                Err(e) => {
                    retry.after(e).await?;
                    self.client = None;
                }
            }
        }
        tracing::info!(table = %target.qualified, seconds = started.elapsed().as_secs_f64(), "HNSW index built");
        if let Some(t) = self.targets.get_mut(source) {
            t.has_index = true;
        }
        Ok(())
    }

    /// Remembers the events' positions as applied (rejected ones included: they are done).
    fn advance_positions(&mut self, events: &[&ChangeEvent]) {
        for e in events {
            let key = (e.source.clone(), e.position.stream());
            let newer = self
                .positions
                .get(&key)
                .is_none_or(|p| e.position.partial_cmp(p) == Some(std::cmp::Ordering::Greater));
            if newer {
                self.positions.insert(key, e.position.clone());
            }
        }
    }

    /// Why no pgvector table can take `e`, if none can.
    fn rejection(&self, e: &ChangeEvent) -> Option<String> {
        reject::reason(e, self.targets.get(&e.source), self.config.dimension)
    }

    fn already_applied(&self, e: &ChangeEvent) -> bool {
        self.positions
            .get(&(e.source.clone(), e.position.stream()))
            .is_some_and(|p| {
                matches!(
                    e.position.partial_cmp(p),
                    Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
                )
            })
    }

    /// One attempt: everything in one transaction; on a data error, again row by row.
    async fn apply(&mut self, events: &[&ChangeEvent]) -> Result<WriteOutcome, PgvectorError> {
        self.prepare_targets(events).await?;
        let config = self.config.clone();
        let targets = self.targets.clone();
        let mut seq = self.stage_seq;
        let client = self.client().await?;
        let result = {
            let mut tx = client.transaction().await.map_err(PgvectorError::from_pg)?;
            let mut applied = 0;
            let mut first_error = None;
            for (source, group) in group_by_source(events) {
                let Some(target) = targets.get(source) else {
                    // Only truncates of a table that does not exist: nothing to do.
                    continue;
                };
                match apply_source(&mut tx, &config, target, &group, &mut seq).await {
                    Ok(n) => applied += n,
                    Err(PgvectorError::Data(msg)) => {
                        first_error = Some(msg);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            match first_error {
                None => {
                    record_positions(&tx, &config, events).await?;
                    tx.commit().await.map_err(PgvectorError::from_pg)?;
                    Ok(WriteOutcome {
                        applied,
                        ..WriteOutcome::default()
                    })
                }
                Some(msg) => {
                    tracing::warn!(error = %msg, "pgvector batch rejected; applying row by row");
                    drop(tx);
                    Err(msg)
                }
            }
        };
        let outcome = match result {
            Ok(o) => o,
            Err(_) => apply_row_by_row(client, &config, &targets, events, &mut seq).await?,
        };
        self.stage_seq = seq;
        Ok(outcome)
    }

    /// Makes sure every source in `events` whose table exists or must exist has its target
    /// cached. A source seen only through truncates gets its table looked up, never created
    /// (a truncate carries no key to create it from): there is nothing to truncate without one.
    async fn prepare_targets(&mut self, events: &[&ChangeEvent]) -> Result<(), PgvectorError> {
        // (Re)connect first: a new connection forgets the cached targets, and every target
        // found below must belong to the connection the batch then runs on.
        self.client().await?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| PgvectorError::Connection("no connection".into()))?;
        if !self.positions_ready {
            table::ensure_positions_table(client, &self.config.schema).await?;
            self.positions_ready = true;
        }
        let mut truncated_only: Vec<&str> = Vec::new();
        for e in events {
            if self.targets.contains_key(&e.source) {
                continue;
            }
            if e.op == Op::Truncate {
                if !truncated_only.contains(&e.source.as_str()) {
                    truncated_only.push(&e.source);
                }
                continue;
            }
            let target = table::ensure(client, &self.config, &e.source, &e.key).await?;
            self.targets.insert(e.source.clone(), target);
        }
        // A source's first chunked text creates its chunk table.
        for e in events {
            if e.chunks.is_none() {
                continue;
            }
            if let Some(target) = self.targets.get_mut(&e.source)
                && target.chunks.is_none()
            {
                target.chunks = Some(chunks::ensure(client, &self.config, target).await?);
            }
        }
        for source in truncated_only {
            if self.targets.contains_key(source) {
                continue;
            }
            if let Some(target) = table::existing(client, &self.config, source).await? {
                self.targets.insert(source.to_owned(), target);
            }
        }
        Ok(())
    }
}

/// The enrichment stage asks the sink for a row's text hash and payload when its own memory does
/// not know the key (after a restart, or past the cache's capacity). A failed lookup is a miss:
/// the text is embedded again, a TOAST value read from the source; correct, only slower.
impl crate::enrich::Lookups for PgvectorSink {
    async fn stored_row(&mut self, source: &str, key: &Row) -> Option<crate::enrich::StoredRow> {
        match PgvectorSink::stored_row(self, source, key).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, source, "stored row lookup failed");
                None
            }
        }
    }

    async fn source_row(
        &mut self,
        _source: &str,
        _key: &Row,
        _columns: &[crate::event::Name],
    ) -> Option<Row> {
        None
    }
}
