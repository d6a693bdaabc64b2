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
//! then one `MERGE` per source table.

mod load;
mod table;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::{Client, GenericClient, NoTls};

use table::{Target, key_text, positions_table};
pub use table::{quote_ident, target_name};

use crate::config::PgvectorSink as Config;
use crate::dead_letter::DeadLetter;
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Op, Position, Row, StreamId, Value};

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
        let text = crate::check::pg_error_text(&e);
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
    positions: HashMap<(String, StreamId), Position>,
    stage_seq: u64,
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

/// How many times a batch is retried over lost connections before the error goes up.
const MAX_RETRIES: usize = 8;

/// Exponential backoff with jitter for work lost with a connection.
fn retry_policy() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(MAX_RETRIES)
        .with_jitter()
        .build()
}

impl PgvectorSink {
    /// Connects and loads the positions already applied (see [`PgvectorSink::positions`]).
    pub async fn connect(config: Config) -> Result<Self, PgvectorError> {
        let mut sink = PgvectorSink {
            config,
            client: None,
            targets: HashMap::new(),
            positions: HashMap::new(),
            stage_seq: 0,
        };
        sink.client().await?;
        sink.load_positions().await?;
        Ok(sink)
    }

    /// Per source and stream, the last position this sink durably applied: where the pipeline
    /// must resume this sink from.
    pub fn positions(&self) -> &HashMap<(String, StreamId), Position> {
        &self.positions
    }

    async fn client(&mut self) -> Result<&mut Client, PgvectorError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let mut pg: tokio_postgres::Config = self
                .config
                .url
                .expose()
                .parse()
                .map_err(|e| PgvectorError::Config(format!("sinks.pgvector.url: {e}")))?;
            if pg.get_application_name().is_none() {
                pg.application_name("tributary-pgvector");
            }
            let (client, connection) = pg.connect(NoTls).await.map_err(|e| {
                PgvectorError::Connection(format!(
                    "cannot connect to {}: {}",
                    self.config.url,
                    crate::check::pg_error_text(&e)
                ))
            })?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %crate::check::pg_error_text(&e), "pgvector connection closed");
                }
            });
            // Target tables may have been dropped or re-created meanwhile: look again.
            self.targets.clear();
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
            let source: String = row.get(0);
            let json: serde_json::Value = row.get(1);
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
        let schema = self.config.schema.clone();
        let table = format!(
            "{}.{}",
            quote_ident(&schema),
            quote_ident(&target_name(&self.config, source))
        );
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
            "SELECT text_hash FROM {table} WHERE {}",
            conds.join(" AND ").replace("$%", "$")
        );
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as _).collect();
        let row = client
            .query_opt(&sql, &refs)
            .await
            .map_err(PgvectorError::from_pg)?;
        Ok(row
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|h| h as u64))
    }

    /// Applies `events` (in source order) and returns once they are committed. Events at or
    /// below a stream's stored position are skipped; rejected rows come back as dead letters.
    pub async fn write(&mut self, events: &[ChangeEvent]) -> Result<WriteOutcome, PgvectorError> {
        let fresh: Vec<&ChangeEvent> = events.iter().filter(|e| !self.already_applied(e)).collect();
        let skipped = events.len() - fresh.len();
        if fresh.is_empty() {
            return Ok(WriteOutcome {
                skipped,
                ..WriteOutcome::default()
            });
        }
        let mut backoff = retry_policy();
        let started = Instant::now();
        let mut outcome = loop {
            match self.apply(&fresh).await {
                Ok(o) => break o,
                Err(PgvectorError::Connection(msg)) => match backoff.next() {
                    Some(delay) => {
                        tracing::warn!(error = %msg, retry_in = ?delay, "pgvector batch failed; retrying");
                        self.client = None;
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(PgvectorError::Connection(msg)),
                },
                Err(e) => return Err(e),
            }
        };
        outcome.skipped = skipped;
        metrics::histogram!("tributary_sink_commit_seconds", "sink" => "pgvector")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("tributary_sink_rows_total", "sink" => "pgvector")
            .increment(outcome.applied as u64);
        for e in &fresh {
            let key = (e.source.clone(), e.position.stream());
            let newer = self
                .positions
                .get(&key)
                .is_none_or(|p| e.position.partial_cmp(p) == Some(std::cmp::Ordering::Greater));
            if newer {
                self.positions.insert(key, e.position.clone());
            }
        }
        // The index is built once a source's snapshot is over: at its first streamed change.
        let streamed: HashSet<&str> = fresh
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
        let mut backoff = retry_policy();
        loop {
            let client = self.client().await?;
            match table::build_index(&*client, &config, &target).await {
                Ok(()) => break,
                Err(PgvectorError::Connection(msg)) => match backoff.next() {
                    Some(delay) => {
                        tracing::warn!(error = %msg, retry_in = ?delay, "HNSW index build failed; retrying");
                        self.client = None;
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(PgvectorError::Connection(msg)),
                },
                Err(e) => return Err(e),
            }
        }
        tracing::info!(table = %target.qualified, seconds = started.elapsed().as_secs_f64(), "HNSW index built");
        if let Some(t) = self.targets.get_mut(source) {
            t.has_index = true;
        }
        Ok(())
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
                let target = &targets[source];
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

    async fn prepare_targets(&mut self, events: &[&ChangeEvent]) -> Result<(), PgvectorError> {
        for e in events {
            if self.targets.contains_key(&e.source) || e.op == Op::Truncate {
                continue;
            }
            let config = self.config.clone();
            let client = self.client().await?;
            let target = table::ensure(&*client, &config, &e.source, &e.key).await?;
            self.targets.insert(e.source.clone(), target);
        }
        // A source whose only events are truncates and whose table does not exist yet has
        // nothing to truncate.
        Ok(())
    }
}

fn group_by_source<'a>(events: &[&'a ChangeEvent]) -> Vec<(&'a str, Vec<&'a ChangeEvent>)> {
    let mut groups: Vec<(&str, Vec<&ChangeEvent>)> = Vec::new();
    for e in events {
        match groups.iter_mut().find(|(s, _)| *s == e.source) {
            Some((_, g)) => g.push(e),
            None => groups.push((e.source.as_str(), vec![e])),
        }
    }
    groups
}

async fn apply_row_by_row(
    client: &mut Client,
    config: &Config,
    targets: &HashMap<String, Target>,
    events: &[&ChangeEvent],
    seq: &mut u64,
) -> Result<WriteOutcome, PgvectorError> {
    let mut tx = client.transaction().await.map_err(PgvectorError::from_pg)?;
    let mut outcome = WriteOutcome::default();
    for e in events {
        let Some(target) = targets.get(&e.source) else {
            continue; // a truncate of a table that was never created
        };
        let mut sp = tx.savepoint("row").await.map_err(PgvectorError::from_pg)?;
        match apply_source(&mut sp, config, target, &[*e], seq).await {
            Ok(n) => {
                sp.commit().await.map_err(PgvectorError::from_pg)?;
                outcome.applied += n;
            }
            Err(PgvectorError::Data(msg)) => {
                sp.rollback().await.map_err(PgvectorError::from_pg)?;
                let key = serde_json::to_string(&e.key.to_json()).ok();
                let raw = serde_json::to_vec(e).unwrap_or_default();
                outcome.dead_letters.push(DeadLetter::new(
                    e.source.clone(),
                    e.position.clone(),
                    key,
                    &raw,
                    format!("pgvector sink rejected the row: {msg}"),
                ));
            }
            Err(other) => return Err(other),
        }
    }
    record_positions(&tx, config, events).await?;
    tx.commit().await.map_err(PgvectorError::from_pg)?;
    metrics::counter!("tributary_dead_letters_total", "stage" => "pgvector")
        .increment(outcome.dead_letters.len() as u64);
    Ok(outcome)
}

async fn record_positions(
    tx: &impl GenericClient,
    config: &Config,
    events: &[&ChangeEvent],
) -> Result<(), PgvectorError> {
    let mut last: HashMap<(&str, StreamId), &Position> = HashMap::new();
    for e in events {
        // Events arrive in order per stream, so the last one seen is the highest.
        last.insert((e.source.as_str(), e.position.stream()), &e.position);
    }
    let sql = format!(
        "INSERT INTO {} (source, stream, position) VALUES ($1, $2, $3)
         ON CONFLICT (source, stream) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
        positions_table(&config.schema)
    );
    for ((source, stream), position) in last {
        let json = serde_json::to_value(position)
            .map_err(|e| PgvectorError::Data(format!("position {position}: {e}")))?;
        tx.execute(&sql, &[&source, &stream.to_string(), &json])
            .await
            .map_err(PgvectorError::from_pg)?;
    }
    Ok(())
}

/// A position as the three sortable columns rows carry: (partition, major, minor). Postgres:
/// (NULL, commit LSN, ordinal); Kafka: (partition, offset, 0).
pub(crate) fn position_columns(p: &Position) -> (Option<i32>, i64, i64) {
    match p {
        Position::Lsn {
            commit_lsn,
            tx_ordinal,
        } => (None, commit_lsn.0 as i64, *tx_ordinal as i64),
        Position::Kafka {
            partition, offset, ..
        } => (Some(*partition), *offset, 0),
    }
}

/// Applies one source's events (in order) inside `tx`; returns how many rows were staged.
async fn apply_source(
    tx: &mut tokio_postgres::Transaction<'_>,
    config: &Config,
    target: &Target,
    events: &[&ChangeEvent],
    seq: &mut u64,
) -> Result<usize, PgvectorError> {
    // A truncate wipes everything before it.
    let start = match events.iter().rposition(|e| e.op == Op::Truncate) {
        Some(i) => {
            tx.batch_execute(&format!("TRUNCATE {}", target.qualified))
                .await
                .map_err(PgvectorError::from_pg)?;
            i + 1
        }
        None => 0,
    };
    // Only the last change per key matters.
    let mut last: HashMap<Vec<Option<String>>, usize> = HashMap::new();
    let mut rows = Vec::new();
    for e in &events[start..] {
        let key: Vec<Option<String>> = target
            .keys
            .iter()
            .map(|(k, _)| e.key.get(k).and_then(key_text))
            .collect();
        if key.iter().any(Option::is_none) {
            return Err(PgvectorError::Data(format!(
                "{} at {}: key {} lacks a value for one of {:?}",
                e.source,
                e.position,
                e.key.to_json(),
                target.keys.iter().map(|k| &k.0).collect::<Vec<_>>()
            )));
        }
        if let Some(v) = &e.embedding {
            if v.len() != config.dimension as usize {
                return Err(PgvectorError::Data(format!(
                    "{} at {}: embedding has {} dimensions but {} is vector({})",
                    e.source,
                    e.position,
                    v.len(),
                    target.qualified,
                    config.dimension
                )));
            }
        }
        match last.get(&key) {
            Some(&i) => rows[i] = (key, *e),
            None => {
                last.insert(key.clone(), rows.len());
                rows.push((key, *e));
            }
        }
    }
    if rows.is_empty() {
        return Ok(0);
    }
    let events: Vec<&ChangeEvent> = rows.iter().map(|(_, e)| *e).collect();
    if load::try_direct_copy(tx, config, target, &events).await? {
        return Ok(rows.len());
    }
    *seq += 1;
    let stage = format!("_tributary_stage_{seq}");
    let key_cols: Vec<String> = (0..target.keys.len())
        .map(|i| format!("k{i} text"))
        .collect();
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE {stage} (
           _op text NOT NULL, {keys}, payload jsonb, toast_keys text[], embedding vector,
           text_hash bigint, _pos_partition integer, _pos_major bigint NOT NULL,
           _pos_minor bigint NOT NULL, _source_ts timestamptz
         ) ON COMMIT DROP",
        keys = key_cols.join(", ")
    ))
    .await
    .map_err(PgvectorError::from_pg)?;
    let types: Vec<_> = tx
        .prepare(&format!("SELECT * FROM {stage}"))
        .await
        .map_err(PgvectorError::from_pg)?
        .columns()
        .iter()
        .map(|c| c.type_().clone())
        .collect();
    let sink = tx
        .copy_in::<_, Bytes>(&format!("COPY {stage} FROM STDIN (FORMAT binary)"))
        .await
        .map_err(PgvectorError::from_pg)?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    let mut has_toast = false;
    for (key, e) in &rows {
        let op = if e.op == Op::Delete { "d" } else { "u" };
        let (payload, toast_keys) = payload_of(config, e);
        has_toast |= toast_keys.is_some();
        let embedding = e.embedding.clone().map(pgvector::Vector::from);
        let text_hash = e.text_hash.map(|h| h as i64);
        let (partition, major, minor) = position_columns(&e.position);
        let mut values: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&op];
        for k in key {
            values.push(k);
        }
        values.extend_from_slice(&[
            &payload,
            &toast_keys,
            &embedding,
            &text_hash,
            &partition,
            &major,
            &minor,
            &e.source_ts,
        ]);
        writer
            .as_mut()
            .write(&values)
            .await
            .map_err(PgvectorError::from_pg)?;
    }
    writer.finish().await.map_err(PgvectorError::from_pg)?;
    merge(tx, config, target, &stage, has_toast).await?;
    tx.batch_execute(&format!("DROP TABLE {stage}"))
        .await
        .map_err(PgvectorError::from_pg)?;
    Ok(rows.len())
}

/// The row's payload (selected columns as jsonb) and the names of its unchanged-TOAST columns,
/// whose stored values the merge keeps.
pub(crate) fn payload_of(
    config: &Config,
    e: &ChangeEvent,
) -> (Option<serde_json::Value>, Option<Vec<String>>) {
    let Some(after) = &e.after else {
        return (None, None);
    };
    let wanted = config.payload_columns.get(&e.source);
    let mut obj = serde_json::Map::new();
    let mut toast = Vec::new();
    for c in after.columns() {
        if wanted.is_some_and(|w| !w.contains(&c.name)) {
            continue;
        }
        match &c.value {
            Value::UnchangedToast => toast.push(c.name.clone()),
            v => {
                obj.insert(c.name.clone(), v.to_json());
            }
        }
    }
    (
        Some(serde_json::Value::Object(obj)),
        (!toast.is_empty()).then_some(toast),
    )
}

async fn merge(
    tx: &impl GenericClient,
    config: &Config,
    target: &Target,
    stage: &str,
    has_toast: bool,
) -> Result<(), PgvectorError> {
    let t = &target.qualified;
    let on = target.key_match("t", "s");
    let storage = if config.halfvec { "halfvec" } else { "vector" };
    let key_names: Vec<String> = target.keys.iter().map(|(k, _)| quote_ident(k)).collect();
    let key_values: Vec<String> = target
        .keys
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("s.k{i}::{ty}"))
        .collect();
    let newer = "(t._pos_partition IS DISTINCT FROM s._pos_partition \
                 OR (t._pos_major, t._pos_minor) < (s._pos_major, s._pos_minor))";
    if has_toast {
        // Unchanged TOAST columns take their stored values before the merge compares payloads.
        tx.batch_execute(&format!(
            "UPDATE {stage} s
                SET payload = s.payload || COALESCE(
                      (SELECT jsonb_object_agg(k, t.payload -> k) FROM unnest(s.toast_keys) k
                        WHERE t.payload ? k), '{{}}'::jsonb)
               FROM {t} t
              WHERE s.toast_keys IS NOT NULL AND {on}"
        ))
        .await
        .map_err(PgvectorError::from_pg)?;
    }
    let sql = format!(
        "MERGE INTO {t} t USING {stage} s ON {on}
         WHEN MATCHED AND s._op = 'd' AND {newer} THEN DELETE
         WHEN MATCHED AND s._op = 'u' AND {newer}
              AND (t.payload IS DISTINCT FROM s.payload
                   OR (s.embedding IS NOT NULL AND t.embedding IS DISTINCT FROM s.embedding::{storage}))
           THEN UPDATE SET payload = s.payload,
                embedding = COALESCE(s.embedding::{storage}, t.embedding),
                text_hash = COALESCE(s.text_hash, t.text_hash),
                _pos_partition = s._pos_partition, _pos_major = s._pos_major,
                _pos_minor = s._pos_minor, _source_ts = s._source_ts, _updated_at = now()
         WHEN NOT MATCHED AND s._op = 'u' THEN
           INSERT ({keys}, payload, embedding, text_hash, _pos_partition, _pos_major, _pos_minor, _source_ts)
           VALUES ({vals}, s.payload, s.embedding::{storage}, s.text_hash, s._pos_partition,
                   s._pos_major, s._pos_minor, s._source_ts)",
        keys = key_names.join(", "),
        vals = key_values.join(", "),
    );
    tx.batch_execute(&sql).await.map_err(PgvectorError::from_pg)
}

/// The enrichment stage asks the sink for a row's text hash when its own cache does not know the
/// key (after a restart, or past the cache's capacity). A failed lookup is a miss: the text is
/// embedded again, which is correct, only slower.
impl crate::enrich::StoredHashes for PgvectorSink {
    async fn stored_hash(&mut self, source: &str, key: &Row) -> Option<u64> {
        match self.stored_text_hash(source, key).await {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, source, "stored text hash lookup failed");
                None
            }
        }
    }
}
