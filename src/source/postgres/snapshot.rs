//! The initial snapshot: every row of every published table, read inside the snapshot the slot
//! exported when it was created (or a temporary slot exported when an interrupted snapshot
//! resumes), so that nothing is missed or doubled between snapshot and stream.
//!
//! A keyed table is read in chunks by primary key: the planner finds each chunk's upper key with
//! an index scan that skips `chunk_rows` keys (`ORDER BY key OFFSET n-1 LIMIT 1`), and
//! `snapshot_workers` connections, each in a read-only transaction on the same exported snapshot,
//! read `(lower, upper]` ranges ahead while decoding runs on blocking threads; chunks are handed
//! out in key order. A table without a primary key (`REPLICA IDENTITY FULL`) is read through a
//! cursor ordered by every column. Values are selected as text and converted by the same
//! [`decode::convert_raw`] the stream uses, so a snapshot row and a streamed insert of the same
//! row are equal. A row with a value that cannot be decoded takes its ordinal and becomes a dead
//! letter instead (in a `SQL_ASCII` database the snapshot reads the bytes as stored, so such a
//! row is found, not an error for its whole chunk).
//!
//! Which tables are durably done is kept in the source database's state table: a table is
//! marked done once the pipeline acknowledged its last row. The state table also holds the
//! position of each completely read table's last row: when a crash lost the acknowledgement
//! after every sink had committed it, the restart learns from the sinks that the table is durable
//! and does not read it again. A table not started before a crash is read from the fresh
//! exported snapshot, whose LSN becomes that table's stream filter.
//!
//! Resumable per chunk: each chunk's upper key is recorded in the chunk table ([`ChunkRecord`])
//! before its rows are handed out. Chunk `c`'s rows take the ordinals `c << CHUNK_BITS | i`, its
//! last event always [`chunk_end`]`(c)`, and the pipeline never splits a poll's batch across
//! commits, so a sink holds a chunk whole or not at all. A restart re-reads the recorded chunks
//! some sink may lack (by their key ranges, at their own ordinals: a sink that holds one skips it
//! whole by position) and continues after the last recorded key. Those rows are read at restart
//! time, not inside the first snapshot: the slot still starts at the first snapshot's LSN, and
//! for such a table every change since then is streamed (no filter), so replaying Bronze by
//! position ends at the source's state and no key is ever emitted twice as `snapshot`. A table
//! without a primary key has no key to resume at: it is read again whole from the new snapshot,
//! after a `truncate` event that tells Bronze and pgvector to forget the interrupted attempt.
//!
//! A snapshot of one table on demand, while the stream runs, is [`super::incremental`]'s: chunks
//! reconciled with the stream by watermarks, no transaction held open.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chrono::Utc;
use tokio_postgres::Client;
use tokio_postgres::types::{FromSql, Type};

use super::{PgSourceError, db, decode};
use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Lsn, Op, Position, Row, Value};
use crate::pg::{quote_ident, quote_qualified};

/// Ordinal bits of a chunk's own rows: chunk `c` owns ordinals `c << CHUNK_BITS ..= chunk_end(c)`.
pub const CHUNK_BITS: u32 = 24;

/// The ordinal of chunk `c`'s last event: whatever a re-read of the chunk yields, a sink that
/// holds the chunk holds this position and skips the re-read whole.
pub fn chunk_end(c: u64) -> u64 {
    (c << CHUNK_BITS) | ((1 << CHUNK_BITS) - 1)
}

/// A chunk as the chunk table records it before its rows are handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRecord {
    pub schema: String,
    pub name: String,
    pub chunk: u64,
    /// The key (as text, in key column order) of its last row; `None` for a table without a key.
    pub upper: Option<Vec<String>>,
    /// Rows the chunk read (dead letters included): the snapshot's progress in `status`.
    pub rows: u64,
}

/// What an interrupted earlier attempt left of a table: its recorded chunks in order, each with
/// whether every sink holds it.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub chunks: Vec<(u64, Option<Vec<String>>, bool)>,
}

/// A recorded chunk to read again by its key range.
#[derive(Debug, Clone)]
struct Redo {
    chunk: u64,
    lower: Option<Vec<String>>,
    upper: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SnapTable {
    pub schema: String,
    pub name: String,
    pub columns: Vec<(String, u32)>,
    pub key: Vec<String>,
    /// Where each key column is in `columns`, and its SQL type.
    key_columns: Vec<(usize, String)>,
    pub estimated_rows: i64,
    /// Ordinal of the table's last row handed out as an event, once it has been read completely
    /// (dead letters after it need no acknowledgement).
    pub last_ordinal: Option<u64>,
    /// Rows handed out as events.
    pub rows: u64,
    pub dead_letters: u64,
    last_event: Option<u64>,
    pub done: bool,
    /// Its last row's position is in the state table.
    pub recorded: bool,
    /// Recorded chunks of an earlier attempt that some sink may lack.
    redo: VecDeque<Redo>,
    /// Read only keys after this one (the last recorded chunk's upper key).
    after: Option<Vec<String>>,
    /// A keyless table read again whole: a truncate event goes first.
    truncate: bool,
    /// The keyed read found no more rows.
    exhausted: bool,
}

pub struct Snapshot {
    /// `snapshot_workers` connections, each in a read-only transaction on the exported snapshot;
    /// the first also runs the planning queries and a keyless table's cursor.
    clients: Vec<Arc<Client>>,
    /// Free connections for chunk reads (the semaphore counts them).
    pool: Arc<Pool>,
    pub tables: Vec<SnapTable>,
    current: usize,
    /// The current table as the readers need it.
    spec: Option<Arc<TableSpec>>,
    /// Chunk reads of the current table, in chunk order.
    reads: VecDeque<tokio::task::JoinHandle<Result<ChunkRead, PgSourceError>>>,
    cursor_open: bool,
    /// Commit LSN stamped on snapshot positions (just below the slot's start).
    pub base: Lsn,
    /// The next chunk's number.
    next_chunk: u64,
    chunk_rows: u32,
    type_names: Arc<HashMap<u32, String>>,
    /// Rows done / estimated, drawn only when stderr is a terminal (metrics carry it otherwise).
    bar: Option<indicatif::ProgressBar>,
}

/// The snapshot connections not reading right now.
struct Pool {
    free: std::sync::Mutex<Vec<Arc<Client>>>,
    permits: tokio::sync::Semaphore,
}

impl Pool {
    async fn take(
        self: &Arc<Self>,
    ) -> Result<(tokio::sync::SemaphorePermit<'_>, Arc<Client>), PgSourceError> {
        let permit =
            self.permits.acquire().await.map_err(|_| {
                PgSourceError::Setup("the snapshot's connections were closed".into())
            })?;
        let client = self
            .free
            .lock()
            .expect("pool lock")
            .pop()
            .ok_or_else(|| PgSourceError::Setup("no free snapshot connection".into()))?;
        Ok((permit, client))
    }

    fn give(&self, client: Arc<Client>) {
        self.free.lock().expect("pool lock").push(client);
    }
}

/// What reading and decoding a table's chunk needs, shared by its reads.
#[derive(Debug)]
pub(super) struct TableSpec {
    pub(super) source: String,
    columns: Vec<(String, u32)>,
    pub(super) key: Vec<String>,
    /// `SELECT {cols} FROM {table} t`, the key expression, and each key column's bound
    /// expression for a `text[]` parameter.
    pub(super) select: String,
    pub(super) keys: String,
    key_types: Vec<String>,
    row_schema: Arc<crate::event::RowSchema>,
    type_names: Arc<HashMap<u32, String>>,
    base: Lsn,
}

/// One chunk's key range: `(lower, upper]`, open where `None`.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub(super) chunk: u64,
    pub(super) lower: Option<Vec<String>>,
    pub(super) upper: Option<Vec<String>>,
    /// Recorded before its rows are handed out (a new chunk, not one read again).
    pub(super) new: bool,
    /// A truncate event goes first.
    pub(super) truncate: bool,
}

/// A chunk read and decoded.
pub(super) struct ChunkRead {
    pub(super) job: Job,
    pub(super) events: Vec<ChangeEvent>,
    pub(super) letters: Vec<DeadLetter>,
    /// The key of its last row, as text.
    pub(super) last_key: Option<Vec<String>>,
}

impl ChunkRead {
    /// Rows read: snapshot events and dead letters (a truncate is no row).
    fn rows(&self) -> u64 {
        let events = self.events.iter().filter(|e| e.op == Op::Snapshot).count();
        (events + self.letters.len()) as u64
    }
}

/// One chunk read: its events, the dead letters of rows in it that cannot be decoded (to be made
/// durable before any of it is acknowledged), and its record when it is new (to be written
/// before its events are handed out).
#[derive(Default)]
pub struct Chunk {
    pub events: Vec<ChangeEvent>,
    pub letters: Vec<DeadLetter>,
    pub record: Option<ChunkRecord>,
}

impl Snapshot {
    /// Opens `workers` read-only transactions on the exported snapshot `snapshot_name` and plans
    /// the tables; `resume` holds what earlier attempts recorded of them. `url` is an ordinary
    /// (non-replication) connection string; new chunks are numbered from `first_chunk`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        url: &crate::secret::ConnString,
        snapshot_name: &str,
        tables: Vec<(String, String)>,
        resume: &HashMap<(String, String), Resume>,
        base: Lsn,
        first_chunk: u64,
        chunk_rows: u32,
        workers: u32,
    ) -> Result<Self, PgSourceError> {
        let mut clients = Vec::new();
        for _ in 0..workers.max(1) {
            clients.push(Arc::new(snapshot_client(url, snapshot_name).await?));
        }
        let client = &clients[0];
        // Like pg_dump: hold ACCESS SHARE locks for the whole read so DDL on these tables waits
        // for the snapshot instead of breaking it (the table's current definition is what a
        // query parses against, whatever the snapshot).
        if !tables.is_empty() {
            let list: Vec<String> = tables.iter().map(|(s, n)| quote_qualified(s, n)).collect();
            client
                .batch_execute(&format!(
                    "LOCK TABLE {} IN ACCESS SHARE MODE",
                    list.join(", ")
                ))
                .await
                .map_err(db)?;
        }
        let mut planned = Vec::new();
        for (schema, name) in tables {
            let earlier = resume.get(&(schema.clone(), name.clone())).cloned();
            let mut t = plan_table(client, schema, name).await?;
            if let Some(r) = earlier.filter(|r| !r.chunks.is_empty()) {
                t.resume_from(r);
            }
            planned.push(t);
        }
        let type_names = Arc::new(super::load_type_names(client).await?);
        for t in &planned {
            metrics::gauge!("tributary_snapshot_rows_estimated", "table" => format!("{}.{}", t.schema, t.name))
                .set(t.estimated_rows.max(0) as f64);
        }
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let total: i64 = planned.iter().map(|t| t.estimated_rows.max(0)).sum();
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "snapshot {msg} [{bar:30}] {human_pos}/~{human_len} rows ({per_sec}, eta {eta})",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        let pool = Arc::new(Pool {
            free: std::sync::Mutex::new(clients.clone()),
            permits: tokio::sync::Semaphore::new(clients.len()),
        });
        Ok(Snapshot {
            bar,
            clients,
            pool,
            tables: planned,
            current: 0,
            spec: None,
            reads: VecDeque::new(),
            cursor_open: false,
            base,
            next_chunk: first_chunk.max(1),
            chunk_rows,
            type_names,
        })
    }

    pub fn finished(&self) -> bool {
        self.current >= self.tables.len()
    }

    /// The next chunk (empty once every table was read).
    pub async fn next_chunk(&mut self) -> Result<Chunk, PgSourceError> {
        while self.current < self.tables.len() {
            if self.spec.is_none() {
                self.spec = Some(Arc::new(self.spec_of(&self.tables[self.current])));
            }
            if self.tables[self.current].key.is_empty() {
                match self.next_keyless().await? {
                    Some(chunk) => return Ok(chunk),
                    None => {
                        self.table_read();
                        continue;
                    }
                }
            }
            // Keep a chunk per connection (and one more) read ahead.
            while self.reads.len() <= self.clients.len() {
                let Some(job) = self.plan_next().await? else {
                    break;
                };
                let spec = self.spec.clone().expect("spec set above");
                let pool = self.pool.clone();
                self.reads
                    .push_back(tokio::spawn(read_chunk(pool, spec, job)));
            }
            let Some(read) = self.reads.pop_front() else {
                self.table_read();
                continue;
            };
            let read = read
                .await
                .map_err(|e| PgSourceError::Setup(format!("a snapshot read failed: {e}")))??;
            let t = &mut self.tables[self.current];
            let record = read.job.new.then(|| ChunkRecord {
                schema: t.schema.clone(),
                name: t.name.clone(),
                chunk: read.job.chunk,
                // An open-ended final chunk ends at its last row.
                upper: read.job.upper.clone().or(read.last_key.clone()),
                rows: read.rows(),
            });
            if read.events.is_empty() && read.letters.is_empty() {
                continue;
            }
            return Ok(self.handed_out(read, record));
        }
        Ok(Chunk::default())
    }

    /// The current keyed table's next chunk to read: a recorded one some sink may lack, else the
    /// next `chunk_rows` keys after the last planned one (its upper key found by an index scan
    /// that skips them), else the rest; `None` once planned to its end.
    async fn plan_next(&mut self) -> Result<Option<Job>, PgSourceError> {
        let t = &mut self.tables[self.current];
        if let Some(redo) = t.redo.pop_front() {
            return Ok(Some(Job {
                chunk: redo.chunk,
                lower: redo.lower,
                upper: Some(redo.upper),
                new: false,
                truncate: std::mem::take(&mut t.truncate),
            }));
        }
        if t.exhausted {
            return Ok(None);
        }
        let spec = self.spec.clone().expect("spec set");
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        let after = t.after.clone();
        let cond = match &after {
            Some(a) => {
                params.push(a);
                format!(" WHERE ({}) > {}", spec.keys, spec.bound(1))
            }
            None => String::new(),
        };
        let texts: Vec<String> = t
            .key
            .iter()
            .map(|k| format!("t.{}::text", quote_ident(k)))
            .collect();
        let sql = format!(
            "SELECT {} FROM {} t{cond} ORDER BY {} OFFSET {} LIMIT 1",
            texts.join(", "),
            quote_qualified(&t.schema, &t.name),
            spec.keys,
            self.chunk_rows.saturating_sub(1)
        );
        let (permit, client) = self.pool.take().await?;
        let found = client.query_opt(&sql, &params).await;
        self.pool.give(client);
        drop(permit);
        let upper = match found.map_err(db)? {
            Some(r) => Some(
                (0..t.key.len())
                    .map(|i| r.try_get::<_, String>(i).map_err(db))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => {
                t.exhausted = true;
                None
            }
        };
        if let Some(u) = &upper {
            t.after = Some(u.clone());
        }
        let chunk = self.next_chunk;
        self.next_chunk += 1;
        Ok(Some(Job {
            chunk,
            lower: after,
            upper,
            new: true,
            truncate: std::mem::take(&mut t.truncate),
        }))
    }

    /// The current keyless table's next `chunk_rows` rows (through a cursor in the order of all
    /// its columns, on the first connection), or `None` at its end.
    async fn next_keyless(&mut self) -> Result<Option<Chunk>, PgSourceError> {
        let spec = self.spec.clone().expect("spec set");
        let client = self.clients[0].clone();
        if !self.cursor_open {
            // Qualified: a bare name would sort by the `::text` output column of that name (so
            // 10 before 9), not by the column's own type.
            let order: Vec<String> = spec
                .columns
                .iter()
                .map(|(c, _)| format!("t.{}", quote_ident(c)))
                .collect();
            client
                .batch_execute(&format!(
                    "DECLARE tributary_snap NO SCROLL CURSOR FOR {}{}",
                    spec.select,
                    if order.is_empty() {
                        String::new()
                    } else {
                        format!(" ORDER BY {}", order.join(", "))
                    }
                ))
                .await
                .map_err(db)?;
            self.cursor_open = true;
        }
        let rows = client
            .query(
                &format!("FETCH {} FROM tributary_snap", self.chunk_rows),
                &[],
            )
            .await
            .map_err(db)?;
        let t = &mut self.tables[self.current];
        if rows.is_empty() {
            client
                .batch_execute("CLOSE tributary_snap")
                .await
                .map_err(db)?;
            self.cursor_open = false;
            if !t.truncate {
                return Ok(None);
            }
        }
        let job = Job {
            chunk: self.next_chunk,
            lower: None,
            upper: None,
            new: true,
            truncate: std::mem::take(&mut t.truncate),
        };
        self.next_chunk += 1;
        let read = decode_chunk(&spec, job, &rows, spec.base)?;
        let record = ChunkRecord {
            schema: t.schema.clone(),
            name: t.name.clone(),
            chunk: read.job.chunk,
            upper: None,
            rows: read.rows(),
        };
        Ok(Some(self.handed_out(read, Some(record))))
    }

    /// Counts a read chunk into its table's progress.
    fn handed_out(&mut self, read: ChunkRead, record: Option<ChunkRecord>) -> Chunk {
        let t = &mut self.tables[self.current];
        if let Some(last) = read.events.last() {
            t.last_event = Some(last.position.minor as u64);
        }
        let rows = read.events.iter().filter(|e| e.op == Op::Snapshot).count() as u64;
        t.rows += rows;
        t.dead_letters += read.letters.len() as u64;
        let source = format!("{}.{}", t.schema, t.name);
        if let Some(bar) = &self.bar {
            bar.set_message(source.clone());
            bar.inc(rows);
        }
        metrics::counter!("tributary_snapshot_rows_total", "table" => source).increment(rows);
        Chunk {
            events: read.events,
            letters: read.letters,
            record,
        }
    }

    /// The current table was read to its end.
    fn table_read(&mut self) {
        let t = &mut self.tables[self.current];
        t.exhausted = true;
        t.last_ordinal = Some(t.last_event.unwrap_or(0));
        tracing::info!(table = %format!("{}.{}", t.schema, t.name), rows = t.rows, dead_letters = t.dead_letters, "snapshot of table read");
        self.current += 1;
        self.spec = None;
    }

    fn spec_of(&self, t: &SnapTable) -> TableSpec {
        table_spec(t, &self.type_names, self.base)
    }

    /// Ends the snapshot transactions.
    pub async fn close(self) -> Result<(), PgSourceError> {
        if let Some(bar) = &self.bar {
            bar.finish_with_message("done");
        }
        for c in &self.clients {
            c.batch_execute("COMMIT").await.map_err(db)?;
        }
        Ok(())
    }
}

/// How table `t`'s chunks are read and decoded; `base` is the commit LSN of their positions.
pub(super) fn table_spec(
    t: &SnapTable,
    type_names: &Arc<HashMap<u32, String>>,
    base: Lsn,
) -> TableSpec {
    TableSpec {
        source: format!("{}.{}", t.schema, t.name),
        columns: t.columns.clone(),
        key: t.key.clone(),
        select: format!(
            "SELECT {} FROM {} t",
            select_list(t),
            quote_qualified(&t.schema, &t.name)
        ),
        keys: t
            .key
            .iter()
            .map(|c| format!("t.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", "),
        key_types: t.key_columns.iter().map(|(_, ty)| ty.clone()).collect(),
        row_schema: Arc::new(decode::row_schema(
            t.columns.iter().map(|(c, oid)| (c.as_str(), *oid)),
            type_names,
        )),
        type_names: type_names.clone(),
        base,
    }
}

/// A connection in a read-only transaction on the exported snapshot `name`.
async fn snapshot_client(
    url: &crate::secret::ConnString,
    name: &str,
) -> Result<Client, PgSourceError> {
    let client = super::sql_connect(url).await?;
    // A SQL_ASCII database holds bytes unchecked, and the server fails a whole FETCH whose rows
    // are not valid in the client encoding: read them as stored, to find the row.
    let encoding: String = client
        .query_one("SELECT current_setting('server_encoding')", &[])
        .await
        .map_err(db)?
        .try_get(0)
        .map_err(db)?;
    if encoding == "SQL_ASCII" {
        client
            .batch_execute("SET client_encoding = 'SQL_ASCII'")
            .await
            .map_err(db)?;
    }
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            super::quote_literal(name)
        ))
        .await
        .map_err(db)?;
    Ok(client)
}

impl TableSpec {
    /// The key bound given as `text[]` parameter `$param`, each element cast to its column's type.
    pub(super) fn bound(&self, param: usize) -> String {
        let vals: Vec<String> = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("(${param}::text[])[{}]::{ty}", i + 1))
            .collect();
        format!("({})", vals.join(", "))
    }
}

/// Reads chunk `job` of a keyed table on a free connection and decodes it.
async fn read_chunk(
    pool: Arc<Pool>,
    spec: Arc<TableSpec>,
    job: Job,
) -> Result<ChunkRead, PgSourceError> {
    let mut conds = Vec::new();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    if let Some(l) = &job.lower {
        params.push(l);
        conds.push(format!("({}) > {}", spec.keys, spec.bound(params.len())));
    }
    if let Some(u) = &job.upper {
        params.push(u);
        conds.push(format!("({}) <= {}", spec.keys, spec.bound(params.len())));
    }
    let sql = format!(
        "{}{} ORDER BY {}",
        spec.select,
        if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        },
        spec.keys
    );
    let (permit, client) = pool.take().await?;
    let rows = client.query(&sql, &params).await;
    pool.give(client);
    drop(permit);
    let rows = rows.map_err(db)?;
    // Decoding is the CPU-heavy part: on a blocking thread, beside the other reads.
    tokio::task::spawn_blocking(move || decode_chunk(&spec, job, &rows, spec.base))
        .await
        .map_err(|e| PgSourceError::Setup(format!("decoding a snapshot chunk failed: {e}")))?
}

/// Chunk `job`'s `rows` as events at commit LSN `base` (rows from its second ordinal, the last
/// event at [`chunk_end`]; a truncate event first when one is due) and dead letters.
pub(super) fn decode_chunk(
    spec: &TableSpec,
    job: Job,
    rows: &[tokio_postgres::Row],
    base: Lsn,
) -> Result<ChunkRead, PgSourceError> {
    let source = &spec.source;
    let now = Utc::now();
    let chunk = job.chunk;
    let mut out = Vec::with_capacity(rows.len() + 1);
    let mut letters = Vec::new();
    if job.truncate {
        out.push(ChangeEvent {
            source: source.clone(),
            op: Op::Truncate,
            key: Row::new(),
            before: None,
            after: None,
            schema_version: 1,
            position: super::position(base, chunk << CHUNK_BITS),
            source_ts: Some(now),
            embedding: None,
            text_hash: None,
            chunks: None,
            schema: Some(spec.row_schema.clone()),
            origin: None,
        });
    }
    if rows.len() as u64 >= (1 << CHUNK_BITS) - 2 {
        return Err(PgSourceError::Setup(format!(
            "{source}: snapshot chunk {chunk} has more than {} rows",
            (1u64 << CHUNK_BITS) - 3
        )));
    }
    let mut raw: Vec<Option<&[u8]>> = Vec::with_capacity(spec.columns.len());
    for (ordinal, r) in ((chunk << CHUNK_BITS) + 1..).zip(rows) {
        let position = super::position(base, ordinal);
        raw.clear();
        for i in 0..spec.columns.len() {
            let v: Option<RawText<'_>> = r.try_get(i).map_err(db)?;
            raw.push(v.map(|v| v.0));
        }
        let mut row = Row::new();
        let mut failed = None;
        for ((col, oid), v) in spec.columns.iter().zip(&raw) {
            let value = match v {
                None => Value::Null,
                Some(bytes) => match decode::convert_raw(col, *oid, bytes, &spec.type_names) {
                    Ok(value) => value,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                },
            };
            row.push(col.clone(), value);
        }
        if let Some(e) = failed {
            letters.push(rejected(spec, &raw, &e, position));
            continue;
        }
        let mut key = Row::new();
        for k in &spec.key {
            if let Some(v) = row.get(k) {
                key.push(k.clone(), v.clone());
            }
        }
        out.push(ChangeEvent {
            source: source.clone(),
            op: Op::Snapshot,
            key,
            before: None,
            after: Some(row),
            schema_version: 1,
            position,
            source_ts: Some(now),
            embedding: None,
            text_hash: None,
            chunks: None,
            schema: Some(spec.row_schema.clone()),
            origin: None,
        });
    }
    let last_key = match rows.last() {
        Some(r) if !spec.key.is_empty() => Some(key_text(spec, r)?),
        _ => None,
    };
    if let Some(last) = out.last_mut() {
        last.position = super::position(base, chunk_end(chunk));
    }
    Ok(ChunkRead {
        job,
        events: out,
        letters,
        last_key,
    })
}

/// A text column's value as the server sent it, not yet checked to be UTF-8.
struct RawText<'a>(&'a [u8]);

impl<'a> FromSql<'a> for RawText<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawText(raw))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT
    }
}

/// The dead letter of snapshot row `raw` of `spec`'s table, whose value failed with `error`.
fn rejected(
    spec: &TableSpec,
    raw: &[Option<&[u8]>],
    error: &decode::ValueError,
    position: Position,
) -> DeadLetter {
    let source = &spec.source;
    let mut key = Row::new();
    for k in &spec.key {
        let Some(((col, oid), Some(bytes))) =
            spec.columns.iter().zip(raw).find(|((c, _), _)| c == k)
        else {
            continue;
        };
        match decode::convert_raw(col, *oid, bytes, &spec.type_names) {
            Ok(v) => key.push(col.clone(), v),
            Err(_) => {
                key = Row::new();
                break;
            }
        }
    }
    let columns: Vec<&str> = spec.columns.iter().map(|(c, _)| c.as_str()).collect();
    DeadLetter::new(
        source,
        position,
        (!key.is_empty()).then(|| key.json_text()),
        &decode::copy_text_line(raw.iter().copied()),
        format!(
            "{source}: the snapshot row's {error}; raw is the row as a COPY text line ({})",
            columns.join(", ")
        ),
    )
}

pub(super) async fn plan_table(
    client: &Client,
    schema: String,
    name: String,
) -> Result<SnapTable, PgSourceError> {
    let qualified = quote_qualified(&schema, &name);
    let cols = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8,
                    coalesce(a.attnum = ANY(i.indkey), false), format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&qualified],
        )
        .await
        .map_err(db)?;
    let mut columns: Vec<(String, u32)> = Vec::with_capacity(cols.len());
    let mut key = Vec::new();
    let mut key_columns = Vec::new();
    for (i, r) in cols.iter().enumerate() {
        let name: String = r.try_get(0).map_err(db)?;
        if r.try_get::<_, bool>(2).map_err(db)? {
            key.push(name.clone());
            key_columns.push((i, r.try_get::<_, String>(3).map_err(db)?));
        }
        columns.push((name, r.try_get::<_, i64>(1).map_err(db)? as u32));
    }
    let est = client
        .query_one(
            "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1::text::regclass",
            &[&qualified],
        )
        .await
        .map_err(db)?
        .get(0);
    Ok(SnapTable {
        schema,
        name,
        columns,
        key,
        key_columns,
        estimated_rows: est,
        last_ordinal: None,
        rows: 0,
        dead_letters: 0,
        last_event: None,
        done: false,
        recorded: false,
        redo: VecDeque::new(),
        after: None,
        truncate: false,
        exhausted: false,
    })
}

impl SnapTable {
    /// Plans the read of a table an earlier attempt recorded chunks of: keyed, the chunks some
    /// sink lacks again by key range, then on after the last; keyless, whole after a truncate.
    fn resume_from(&mut self, r: Resume) {
        if self.key.is_empty() {
            self.truncate = true;
            return;
        }
        let mut lower: Option<Vec<String>> = None;
        for (chunk, upper, held) in r.chunks {
            // A chunk recorded without a key (the table had none then) cannot be bounded.
            let Some(upper) = upper.filter(|u| u.len() == self.key.len()) else {
                self.redo.clear();
                self.after = None;
                self.truncate = true;
                return;
            };
            if !held {
                self.redo.push_back(Redo {
                    chunk,
                    lower: lower.clone(),
                    upper: upper.clone(),
                });
            }
            lower = Some(upper);
        }
        self.after = lower;
    }
}

/// The `SELECT` list of a snapshot read: every column as text.
fn select_list(t: &SnapTable) -> String {
    if t.columns.is_empty() {
        return "1".to_string();
    }
    t.columns
        .iter()
        .map(|(c, _)| format!("t.{}::text", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Row `r`'s key as text, in key column order (what a chunk's bound is recorded as).
pub(super) fn key_text(
    spec: &TableSpec,
    r: &tokio_postgres::Row,
) -> Result<Vec<String>, PgSourceError> {
    spec.key
        .iter()
        .map(|k| {
            let i = spec
                .columns
                .iter()
                .position(|(c, _)| c == k)
                .ok_or_else(|| {
                    PgSourceError::Setup(format!("{}: no key column {k}", spec.source))
                })?;
            let v: Option<RawText<'_>> = r.try_get(i).map_err(db)?;
            let bytes = v.map(|v| v.0).ok_or_else(|| {
                PgSourceError::Setup(format!(
                    "{}: a primary key column read as NULL",
                    spec.source
                ))
            })?;
            String::from_utf8(bytes.to_vec()).map_err(|_| {
                PgSourceError::Setup(format!(
                    "{}: a primary key value is not UTF-8, so the snapshot cannot record \
                     where its chunks end",
                    spec.source
                ))
            })
        })
        .collect()
}
