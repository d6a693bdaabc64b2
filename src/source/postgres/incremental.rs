//! On-demand snapshots of one table while the stream runs: the watermark method of DBLog
//! (Netflix, 2019), which Debezium's incremental snapshots follow too.
//!
//! `tributary snapshot --table T` ([`request`]) records a request row in the requests table
//! beside the state table. The reader takes requests in order and reads each table in
//! primary-key chunks of `snapshot_chunk_rows`, every chunk between two watermarks it writes to
//! the WAL as transactional logical messages (`pg_logical_emit_message`, prefix [`PREFIX`]),
//! which the slot delivers in commit order among the changes:
//!
//! 1. it writes the low watermark;
//! 2. when the stream delivers it, it selects the chunk's rows (the next `chunk_rows` keys after
//!    the last chunk: one read-committed statement, no transaction held open) and writes the
//!    high watermark, which names the chunk's key range;
//! 3. while the stream goes from the low to the high watermark, it notes the table's keys the
//!    stream changes (old and new key of a key move; a truncate drops the whole chunk);
//! 4. at the high watermark it hands out the chunk's rows minus those keys as `snapshot` events
//!    at the high watermark's position (its commit LSN; the last row at
//!    [`snapshot::chunk_end`]`(0)`, and one poll's batch, so a sink holds a chunk whole or not).
//!
//! A row the stream changed inside the window is carried by the stream at a lower position;
//! every other row is as of the high watermark. Replaying Bronze by position therefore ends at
//! the source's state, streaming pauses only for a chunk's SELECT, and the server holds no
//! snapshot open (no WAL or vacuum held back by it).
//!
//! Resumable: a chunk is recorded in the requests table once the slot's flush position passes
//! its high watermark (every sink holds it). After a crash the stream replays from the slot's
//! position and meets again the high watermarks of chunks handed out but not recorded: their
//! rows are read again then, by the key range the watermark names, and handed out at the same
//! positions, which a sink that holds them skips. Such a read is later than its watermark, so a
//! row is at most as new as the changes the stream replays after it: the end state is the same.
//! The new process's first low watermark follows all of them in the WAL, so a chunk is never
//! handed out at two positions and a key appears once as `snapshot` per request.
//!
//! Needs PostgreSQL 14 (pgoutput's `messages` option) and a primary key (chunks are key
//! ranges). A re-snapshot upserts: a row deleted at the source that a sink still holds from
//! before (a bug being repaired) is not found by it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::snapshot::{self, Job, TableSpec};
use super::{PgSourceError, db, source_name};
use crate::config::{PostgresSourceConfig, parse_table_name};
use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Lsn, Op, Row};
use crate::pg::{error_text, quote_qualified};

/// The prefix of the logical messages this source writes and reads.
pub const PREFIX: &str = "tributary";

/// How often the requests table is read for new requests.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The requests table of a state table: `<state_table>_requests`.
pub fn requests_table(state_table: &str) -> Result<(String, String), String> {
    let (schema, name) = parse_table_name(state_table)?;
    Ok((schema, format!("{name}_requests")))
}

/// Creates the requests table when missing.
pub async fn ensure_requests_table(
    client: &Client,
    table: &(String, String),
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                slot text NOT NULL, id text NOT NULL,
                schema_name text NOT NULL, table_name text NOT NULL,
                requested_at timestamptz NOT NULL DEFAULT now(),
                chunk int8 NOT NULL DEFAULT 0, after_key text[], rows int8 NOT NULL DEFAULT 0,
                estimated int8, started_at timestamptz, updated_at timestamptz,
                done bool NOT NULL DEFAULT false, done_at timestamptz, error text,
                PRIMARY KEY (slot, id))",
            quote_qualified(&table.0, &table.1)
        ))
        .await
}

/// A watermark as written to the WAL (the JSON content of a logical message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "watermark", rename_all = "snake_case")]
enum Watermark {
    Low {
        id: String,
        nonce: String,
        seq: u64,
    },
    High {
        id: String,
        nonce: String,
        seq: u64,
        chunk: u64,
        lower: Option<Vec<String>>,
        upper: Option<Vec<String>>,
        last: bool,
    },
}

/// A request being worked on, as far as chunks were handed out.
#[derive(Debug, Clone)]
struct Request {
    id: String,
    table: (String, String),
    /// The next chunk's number.
    chunk: u64,
    /// The last handed-out chunk's upper key: the next chunk reads after it.
    after: Option<Vec<String>>,
    rows: u64,
}

/// A chunk handed out, recorded once the slot's flush position passes `end_lsn`.
#[derive(Debug)]
struct Handed {
    end_lsn: Lsn,
    id: String,
    /// The request's state after the chunk.
    chunk: u64,
    after: Option<Vec<String>>,
    rows: u64,
    last: bool,
}

enum Window {
    Idle,
    /// Low watermark `seq` written; waiting for the stream to deliver it.
    Low {
        seq: u64,
    },
    /// The chunk was selected and the high watermark written.
    High {
        seq: u64,
        spec: Arc<TableSpec>,
        rows: Vec<tokio_postgres::Row>,
        upper: Option<Vec<String>>,
        last: bool,
        /// Keys (as key-column JSON) the stream changed since the low watermark.
        changed: HashSet<String>,
        truncated: bool,
    },
}

/// What a watermark in the stream asks of the reader.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Action {
    None,
    /// Our low watermark: select the chunk and write the high watermark ([`OnDemand::select`]).
    Select,
    /// Our high watermark: hand the chunk out ([`OnDemand::emit`]).
    Emit,
    /// An earlier process's high watermark of a chunk not recorded: read it again
    /// ([`OnDemand::redo`]).
    Redo {
        chunk: u64,
        lower: Option<Vec<String>>,
        upper: Option<Vec<String>>,
        last: bool,
    },
}

/// The reader's on-demand snapshots.
pub(super) struct OnDemand {
    slot: String,
    requests: (String, String),
    chunk_rows: u32,
    queue: VecDeque<Request>,
    /// This process's watermarks carry it; an earlier process's are recognised by another.
    nonce: String,
    seq: u64,
    window: Window,
    type_names: Option<Arc<HashMap<u32, String>>>,
    handed: VecDeque<Handed>,
    last_check: Option<Instant>,
}

/// Chunk `job`'s events and dead letters, ready to hand out.
pub(super) struct Handout {
    pub events: Vec<ChangeEvent>,
    pub letters: Vec<DeadLetter>,
}

impl OnDemand {
    pub(super) fn new(cfg: &PostgresSourceConfig) -> Result<Self, PgSourceError> {
        Ok(OnDemand {
            slot: cfg.slot.clone(),
            requests: requests_table(&cfg.state_table).map_err(PgSourceError::Setup)?,
            chunk_rows: cfg.snapshot_chunk_rows.max(1),
            queue: VecDeque::new(),
            nonce: uuid::Uuid::new_v4().to_string(),
            seq: 0,
            window: Window::Idle,
            type_names: None,
            handed: VecDeque::new(),
            last_check: None,
        })
    }

    pub(super) fn requests_table(&self) -> &(String, String) {
        &self.requests
    }

    /// Reads new requests (at most every [`CHECK_EVERY`]) and, between chunks, writes the next
    /// low watermark.
    pub(super) async fn tick(&mut self, client: &Client) -> Result<(), PgSourceError> {
        if self.last_check.is_none_or(|t| t.elapsed() >= CHECK_EVERY) {
            self.last_check = Some(Instant::now());
            self.load(client).await?;
        }
        if !matches!(self.window, Window::Idle) {
            return Ok(());
        }
        let Some(r) = self.queue.front() else {
            return Ok(());
        };
        self.seq += 1;
        let low = Watermark::Low {
            id: r.id.clone(),
            nonce: self.nonce.clone(),
            seq: self.seq,
        };
        emit(client, &low).await?;
        if r.chunk == 0 && r.rows == 0 {
            client
                .execute(
                    &format!(
                        "UPDATE {} SET started_at = coalesce(started_at, now()) WHERE slot = $1 AND id = $2",
                        self.qualified()
                    ),
                    &[&self.slot, &r.id],
                )
                .await
                .map_err(db)?;
        }
        self.window = Window::Low { seq: self.seq };
        Ok(())
    }

    fn qualified(&self) -> String {
        quote_qualified(&self.requests.0, &self.requests.1)
    }

    /// Adds the requests not done and not queued yet, oldest first.
    async fn load(&mut self, client: &Client) -> Result<(), PgSourceError> {
        let rows = client
            .query(
                &format!(
                    "SELECT id, schema_name, table_name, chunk, after_key, rows, estimated FROM {}
                     WHERE slot = $1 AND NOT done ORDER BY requested_at, id",
                    self.qualified()
                ),
                &[&self.slot],
            )
            .await
            .map_err(db)?;
        for r in rows {
            let id: String = r.try_get(0).map_err(db)?;
            if self.queue.iter().any(|q| q.id == id) || self.handed.iter().any(|h| h.id == id) {
                continue;
            }
            let table = (r.try_get(1).map_err(db)?, r.try_get(2).map_err(db)?);
            tracing::info!(table = %source_name(&table), request = %id, "on-demand snapshot requested");
            if let Some(e) = r.try_get::<_, Option<i64>>(6).map_err(db)? {
                metrics::gauge!("tributary_snapshot_rows_estimated", "table" => source_name(&table))
                    .set(e.max(0) as f64);
            }
            self.queue.push_back(Request {
                id,
                table,
                chunk: r.try_get::<_, i64>(3).map_err(db)? as u64,
                after: r.try_get(4).map_err(db)?,
                rows: r.try_get::<_, i64>(5).map_err(db)? as u64,
            });
        }
        Ok(())
    }

    /// What a logical message of ours (`content`) asks for.
    pub(super) fn on_message(&self, content: &[u8]) -> Action {
        let Ok(mark) = serde_json::from_slice::<Watermark>(content) else {
            tracing::warn!(content = %String::from_utf8_lossy(content), "ignoring a logical message with prefix {PREFIX:?} that is no watermark");
            return Action::None;
        };
        let Some(front) = self.queue.front() else {
            return Action::None;
        };
        match (mark, &self.window) {
            (Watermark::Low { id, nonce, seq }, Window::Low { seq: want })
                if id == front.id && nonce == self.nonce && seq == *want =>
            {
                Action::Select
            }
            (Watermark::High { id, nonce, seq, .. }, Window::High { seq: want, .. })
                if id == front.id && nonce == self.nonce && seq == *want =>
            {
                Action::Emit
            }
            (
                Watermark::High {
                    id,
                    nonce,
                    chunk,
                    lower,
                    upper,
                    last,
                    ..
                },
                _,
            ) if id == front.id && nonce != self.nonce && chunk == front.chunk => Action::Redo {
                chunk,
                lower,
                upper,
                last,
            },
            _ => Action::None,
        }
    }

    /// Notes a change the stream hands out: inside a window, its table's keys leave the chunk.
    pub(super) fn saw(&mut self, ev: &ChangeEvent) {
        let Window::High {
            spec,
            changed,
            truncated,
            ..
        } = &mut self.window
        else {
            return;
        };
        if ev.source != spec.source {
            return;
        }
        if ev.op == Op::Truncate {
            *truncated = true;
            return;
        }
        for image in [Some(&ev.key), ev.after.as_ref(), ev.before.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(k) = key_json(image, &spec.key) {
                changed.insert(k);
            }
        }
    }

    /// How the front request's table reads now (planned again for every chunk, so a column
    /// added or dropped meanwhile is read as it is).
    async fn spec(&mut self, client: &Client) -> Result<Arc<TableSpec>, PgSourceError> {
        let front = self.queue.front().expect("a request is active");
        let t = snapshot::plan_table(client, front.table.0.clone(), front.table.1.clone()).await?;
        if t.key.is_empty() {
            return Err(PgSourceError::Setup(format!(
                "on-demand snapshot of {}: the table has no primary key (chunks are key ranges)",
                source_name(&front.table)
            )));
        }
        let names = match &self.type_names {
            Some(n) => n.clone(),
            None => {
                let n = Arc::new(super::load_type_names(client).await?);
                self.type_names = Some(n.clone());
                n
            }
        };
        Ok(Arc::new(snapshot::table_spec(&t, &names, Lsn(0))))
    }

    /// Step 2: selects the chunk after the last one and writes the high watermark.
    pub(super) async fn select(&mut self, client: &Client) -> Result<(), PgSourceError> {
        let Window::Low { seq } = self.window else {
            return Ok(());
        };
        let spec = self.spec(client).await?;
        let front = self.queue.front().expect("a request is active");
        let lower = front.after.clone();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        let cond = match &lower {
            Some(l) => {
                params.push(l);
                format!(" WHERE ({}) > {}", spec.keys, spec.bound(1))
            }
            None => String::new(),
        };
        let sql = format!(
            "{}{cond} ORDER BY {} LIMIT {}",
            spec.select, spec.keys, self.chunk_rows
        );
        let rows = client.query(&sql, &params).await.map_err(db)?;
        let upper = match rows.last() {
            Some(r) => Some(snapshot::key_text(&spec, r)?),
            None => None,
        };
        let last = rows.len() < self.chunk_rows as usize;
        // For the tests: a wider window, so changes between the SELECT and the high watermark
        // (the ones the window exists for) are many.
        fail::fail_point!("postgres::on-demand-before-high-watermark");
        let high = Watermark::High {
            id: front.id.clone(),
            nonce: self.nonce.clone(),
            seq,
            chunk: front.chunk,
            lower,
            upper: upper.clone(),
            last,
        };
        emit(client, &high).await?;
        self.window = Window::High {
            seq,
            spec,
            rows,
            upper,
            last,
            changed: HashSet::new(),
            truncated: false,
        };
        Ok(())
    }

    /// Step 4: the chunk's rows the stream did not change in the window, at the high
    /// watermark's transaction (`commit_lsn`, `end_lsn`).
    pub(super) fn emit(&mut self, commit_lsn: Lsn, end_lsn: Lsn) -> Result<Handout, PgSourceError> {
        let Window::High {
            spec,
            rows,
            upper,
            last,
            changed,
            truncated,
            ..
        } = std::mem::replace(&mut self.window, Window::Idle)
        else {
            return Ok(Handout {
                events: Vec::new(),
                letters: Vec::new(),
            });
        };
        let mut out = decode(&spec, &rows, commit_lsn)?;
        let before = out.events.len();
        out.events.retain(|e| {
            !truncated && key_json(&e.key, &spec.key).is_none_or(|k| !changed.contains(&k))
        });
        if out.events.len() < before {
            tracing::debug!(table = %spec.source, dropped = before - out.events.len(),
                "on-demand snapshot chunk: rows the stream changed inside the window left out");
        }
        self.advance(&spec, out.events.len(), upper, last, end_lsn);
        Ok(finish(out, commit_lsn))
    }

    /// A chunk an earlier process handed out at the high watermark (`commit_lsn`, `end_lsn`)
    /// without recording it: its key range read again now, at the same positions.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn redo(
        &mut self,
        client: &Client,
        lower: Option<Vec<String>>,
        upper: Option<Vec<String>>,
        last: bool,
        commit_lsn: Lsn,
        end_lsn: Lsn,
    ) -> Result<Handout, PgSourceError> {
        let spec = self.spec(client).await?;
        let rows = match &upper {
            Some(u) => {
                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![u];
                let mut cond = format!("({}) <= {}", spec.keys, spec.bound(1));
                if let Some(l) = &lower {
                    params.push(l);
                    cond.push_str(&format!(" AND ({}) > {}", spec.keys, spec.bound(2)));
                }
                let sql = format!("{} WHERE {cond} ORDER BY {}", spec.select, spec.keys);
                client.query(&sql, &params).await.map_err(db)?
            }
            None => Vec::new(),
        };
        let out = decode(&spec, &rows, commit_lsn)?;
        tracing::info!(table = %spec.source, rows = out.events.len(), "on-demand snapshot: chunk handed out before a restart read again");
        self.advance(&spec, out.events.len(), upper, last, end_lsn);
        Ok(finish(out, commit_lsn))
    }

    /// The front request after a chunk of `rows` rows up to `upper` was handed out.
    fn advance(
        &mut self,
        spec: &TableSpec,
        rows: usize,
        upper: Option<Vec<String>>,
        last: bool,
        end_lsn: Lsn,
    ) {
        let Some(front) = self.queue.front_mut() else {
            return;
        };
        front.chunk += 1;
        front.rows += rows as u64;
        if upper.is_some() {
            front.after = upper;
        }
        metrics::counter!("tributary_snapshot_rows_total", "table" => spec.source.clone())
            .increment(rows as u64);
        self.handed.push_back(Handed {
            end_lsn,
            id: front.id.clone(),
            chunk: front.chunk,
            after: front.after.clone(),
            rows: front.rows,
            last,
        });
        if last {
            tracing::info!(table = %spec.source, rows = front.rows, request = %front.id, "on-demand snapshot read");
            self.queue.pop_front();
        }
    }

    /// Records the chunks whose high watermark's transaction ends at or before `flushed` (every
    /// sink holds them): called before the slot's flush position moves there.
    pub(super) async fn record(
        &mut self,
        client: &Client,
        flushed: Lsn,
    ) -> Result<(), PgSourceError> {
        while self.handed.front().is_some_and(|h| h.end_lsn <= flushed) {
            let h = self.handed.pop_front().expect("checked above");
            client
                .execute(
                    &format!(
                        "UPDATE {} SET chunk = $3, after_key = $4, rows = $5, done = $6,
                                updated_at = now(), done_at = CASE WHEN $6 THEN now() END
                         WHERE slot = $1 AND id = $2",
                        self.qualified()
                    ),
                    &[
                        &self.slot,
                        &h.id,
                        &(h.chunk as i64),
                        &h.after,
                        &(h.rows as i64),
                        &h.last,
                    ],
                )
                .await
                .map_err(db)?;
            if h.last {
                tracing::info!(request = %h.id, rows = h.rows, "on-demand snapshot durable");
            }
        }
        Ok(())
    }

    /// Ends the front request with `error` (recorded for `status` and `tributary snapshot`).
    pub(super) async fn fail(&mut self, client: &Client, error: &str) -> Result<(), PgSourceError> {
        self.window = Window::Idle;
        let Some(front) = self.queue.pop_front() else {
            return Ok(());
        };
        tracing::error!(table = %source_name(&front.table), request = %front.id, error, "on-demand snapshot failed");
        client
            .execute(
                &format!(
                    "UPDATE {} SET done = true, done_at = now(), error = $3 WHERE slot = $1 AND id = $2",
                    self.qualified()
                ),
                &[&self.slot, &front.id, &error],
            )
            .await
            .map_err(db)?;
        Ok(())
    }
}

/// Writes watermark `mark` to the WAL.
async fn emit(client: &Client, mark: &Watermark) -> Result<(), PgSourceError> {
    let content = serde_json::to_string(mark).expect("a watermark serializes");
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&PREFIX, &content],
        )
        .await
        .map_err(db)?;
    Ok(())
}

/// `rows` decoded as chunk 0 of the transaction at `commit_lsn`.
fn decode(
    spec: &TableSpec,
    rows: &[tokio_postgres::Row],
    commit_lsn: Lsn,
) -> Result<Handout, PgSourceError> {
    let job = Job {
        chunk: 0,
        lower: None,
        upper: None,
        new: false,
        truncate: false,
    };
    let read = snapshot::decode_chunk(spec, job, rows, commit_lsn)?;
    Ok(Handout {
        events: read.events,
        letters: read.letters,
    })
}

/// The last event at [`snapshot::chunk_end`]`(0)`, whatever rows were left out.
fn finish(mut out: Handout, commit_lsn: Lsn) -> Handout {
    if let Some(last) = out.events.last_mut() {
        last.position = super::position(commit_lsn, snapshot::chunk_end(0));
    }
    out
}

/// `image`'s key columns (in `key` order) as JSON; `None` when one is missing.
fn key_json(image: &Row, key: &[String]) -> Option<String> {
    let mut k = Row::new();
    for c in key {
        k.push(c.clone(), image.get(c)?.clone());
    }
    Some(k.json_text())
}

/// What `tributary snapshot` reports of a request.
#[derive(Debug, Clone, Serialize)]
pub struct RequestProgress {
    pub id: String,
    pub table: String,
    pub rows: i64,
    pub estimated: Option<i64>,
    pub started: bool,
    pub done: bool,
    pub error: Option<String>,
    /// Seconds since the first chunk was started.
    pub seconds: Option<f64>,
}

/// Records a request for an on-demand snapshot of `table` (`schema.table`, or `table` in
/// `public`) for the connector of `cfg`'s slot; returns its id. The table must be published
/// and have a primary key, and the server must be PostgreSQL 14 or later.
pub async fn request(cfg: &PostgresSourceConfig, table: &str) -> Result<String, PgSourceError> {
    let t = parse_table_name(table).map_err(PgSourceError::Setup)?;
    let client = super::sql_connect(&cfg.url).await?;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(db)?
        .get(0);
    if version < 140_000 {
        return Err(PgSourceError::Setup(
            "on-demand snapshots need PostgreSQL 14 or later (logical messages in pgoutput)".into(),
        ));
    }
    let published = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&cfg.publication, &t.0, &t.1],
        )
        .await
        .map_err(db)?
        .is_some();
    if !published {
        return Err(PgSourceError::Setup(format!(
            "--table {table}: {} is not in publication {:?}",
            source_name(&t),
            cfg.publication
        )));
    }
    let keyed = client
        .query_opt(
            "SELECT 1 FROM pg_index WHERE indrelid = $1::text::regclass AND indisprimary",
            &[&quote_qualified(&t.0, &t.1)],
        )
        .await
        .map_err(db)?
        .is_some();
    if !keyed {
        return Err(PgSourceError::Setup(format!(
            "--table {table}: {} has no primary key; an on-demand snapshot reads key ranges",
            source_name(&t)
        )));
    }
    let requests = requests_table(&cfg.state_table).map_err(PgSourceError::Setup)?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&quote_qualified(&requests.0, &requests.1)],
        )
        .await
        .map_err(db)?
        .get(0);
    if !exists {
        ensure_requests_table(&client, &requests)
            .await
            .map_err(|e| {
                PgSourceError::Setup(format!(
                    "creating the requests table {}: {}",
                    source_name(&requests),
                    error_text(&e)
                ))
            })?;
    }
    enqueue(&client, &requests, &cfg.slot, &t).await
}

/// Records a request to read table `t` for `slot` in `requests`; returns its id.
pub(super) async fn enqueue(
    client: &Client,
    requests: &(String, String),
    slot: &str,
    t: &(String, String),
) -> Result<String, PgSourceError> {
    let id = uuid::Uuid::new_v4().to_string();
    client
        .execute(
            &format!(
                "INSERT INTO {} (slot, id, schema_name, table_name, estimated)
                 SELECT $1, $2, $3, $4, CASE WHEN reltuples >= 0 THEN reltuples::int8 END
                   FROM pg_class WHERE oid = $5::text::regclass",
                quote_qualified(&requests.0, &requests.1)
            ),
            &[&slot, &id, &t.0, &t.1, &quote_qualified(&t.0, &t.1)],
        )
        .await
        .map_err(db)?;
    Ok(id)
}

/// The progress of every on-demand snapshot of `cfg`'s slot (`only`: of that request), oldest
/// first; empty when the requests table does not exist.
pub async fn progress(
    client: &Client,
    cfg: &PostgresSourceConfig,
    only: Option<&str>,
) -> Result<Vec<RequestProgress>, String> {
    let requests = requests_table(&cfg.state_table)?;
    let q = quote_qualified(&requests.0, &requests.1);
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&q])
        .await
        .map_err(|e| error_text(&e))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT id, schema_name || '.' || table_name, rows, estimated,
                        started_at IS NOT NULL, done, error,
                        extract(epoch FROM coalesce(done_at, now()) - started_at)::float8
                   FROM {q} WHERE slot = $1 AND ($2::text IS NULL OR id = $2)
                  ORDER BY requested_at, id"
            ),
            &[&cfg.slot, &only],
        )
        .await
        .map_err(|e| error_text(&e))?;
    Ok(rows
        .iter()
        .map(|r| RequestProgress {
            id: r.get(0),
            table: r.get(1),
            rows: r.get(2),
            estimated: r.get(3),
            started: r.get(4),
            done: r.get(5),
            error: r.get(6),
            seconds: r.get(7),
        })
        .collect())
}

/// Follows request `id` until it is done, calling `seen` with each reading (every half second).
pub async fn watch(
    cfg: &PostgresSourceConfig,
    id: &str,
    mut seen: impl FnMut(&RequestProgress),
) -> Result<RequestProgress, PgSourceError> {
    let client = super::sql_connect(&cfg.url).await?;
    loop {
        let now = progress(&client, cfg, Some(id))
            .await
            .map_err(PgSourceError::Setup)?
            .pop()
            .ok_or_else(|| {
                PgSourceError::Setup(format!("request {id} is gone from the requests table"))
            })?;
        seen(&now);
        if now.done {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PostgresSourceConfig {
        toml::from_str(
            r#"url = "postgres://localhost/db"
            publication = "p"
            slot = "s""#,
        )
        .expect("a minimal source config")
    }

    #[test]
    fn only_our_watermarks_of_the_active_request_act() {
        let mut od = OnDemand::new(&config()).unwrap();
        let low = |id: &str, nonce: &str, seq| {
            serde_json::to_vec(&Watermark::Low {
                id: id.into(),
                nonce: nonce.into(),
                seq,
            })
            .unwrap()
        };
        assert_eq!(
            od.on_message(&low("r1", &od.nonce.clone(), 1)),
            Action::None
        );
        od.queue.push_back(Request {
            id: "r1".into(),
            table: ("public".into(), "t".into()),
            chunk: 3,
            after: Some(vec!["30".into()]),
            rows: 30,
        });
        od.window = Window::Low { seq: 1 };
        let nonce = od.nonce.clone();
        assert_eq!(od.on_message(&low("r1", &nonce, 1)), Action::Select);
        assert_eq!(od.on_message(&low("r1", &nonce, 2)), Action::None);
        assert_eq!(od.on_message(&low("r2", &nonce, 1)), Action::None);
        assert_eq!(od.on_message(&low("r1", "earlier", 1)), Action::None);
        let high = |nonce: &str, chunk| {
            serde_json::to_vec(&Watermark::High {
                id: "r1".into(),
                nonce: nonce.into(),
                seq: 9,
                chunk,
                lower: Some(vec!["30".into()]),
                upper: Some(vec!["40".into()]),
                last: false,
            })
            .unwrap()
        };
        // An earlier process's high watermark of the next chunk is read again; of a recorded
        // chunk, or not next, it is passed over.
        assert_eq!(
            od.on_message(&high("earlier", 3)),
            Action::Redo {
                chunk: 3,
                lower: Some(vec!["30".into()]),
                upper: Some(vec!["40".into()]),
                last: false
            }
        );
        assert_eq!(od.on_message(&high("earlier", 2)), Action::None);
        assert_eq!(od.on_message(&high("earlier", 4)), Action::None);
        assert_eq!(od.on_message(b"not json"), Action::None);
    }

    #[test]
    fn key_json_projects_the_key_columns_in_key_order() {
        let mut row = Row::new();
        row.push("b", crate::event::Value::Int64(2));
        row.push("a", crate::event::Value::Text("x".into()));
        row.push("c", crate::event::Value::Null);
        let key = ["a".to_string(), "b".to_string()];
        let mut want = Row::new();
        want.push("a", crate::event::Value::Text("x".into()));
        want.push("b", crate::event::Value::Int64(2));
        assert_eq!(key_json(&row, &key), Some(want.json_text()));
        assert_eq!(key_json(&row, &["z".to_string()]), None);
    }
}
