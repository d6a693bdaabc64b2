//! PostgreSQL logical-replication source (pgoutput).
//!
//! Guarantees:
//! - The publication and the logical slot (`pgoutput`) are created when missing; every
//!   identifier is quoted, so tables such as `public."Order Items"` work. A published table
//!   without a primary key and without `REPLICA IDENTITY FULL` is refused at start-up by name.
//! - On first start the slot is created on a replication connection with `EXPORT_SNAPSHOT`,
//!   and every existing row is emitted as `Op::Snapshot` from inside that snapshot
//!   ([`snapshot`]); streaming then starts at the slot's consistent point, so nothing is missed
//!   or doubled. Per-table completion is recorded in the state table once acknowledged. A
//!   table can be read again while streaming (`tributary snapshot`): [`incremental`]'s chunks
//!   between watermarks the source writes to the WAL as logical messages.
//! - Changes stream over the replication protocol (`pg_walstream` for the transport: start-up,
//!   authentication, TLS, CopyBoth, keepalives, standby status updates). pgoutput messages are
//!   decoded here ([`decode`]): `pg_walstream`'s own decoder produces its event type, not ours,
//!   and we need the raw bytes anyway to buffer transactions undecoded.
//! - Protocol v2 `streaming` is negotiated on PostgreSQL ≥ 14: an in-progress transaction's
//!   chunks are buffered per xid ([`txbuf`]: memory up to `max_tx_memory_mb`, then a temporary
//!   file), emitted on Stream Commit a batch at a time, dropped on Stream Abort. Every event
//!   carries the position [`position`]`(commit_lsn, ordinal)` on the stream `postgres`.
//! - The slot's flush position moves only when the pipeline calls [`PostgresSourceReader::ack`]
//!   with a durable position, and only to the end of transactions wholly acknowledged. While
//!   nothing is in flight, the server's keepalive position (and the optional heartbeat table's
//!   transactions) advance it, so an idle publication does not retain WAL.
//! - A lost connection is re-established with `backon` exponential backoff and resumes at the
//!   last flushed LSN; transactions seen again are skipped by position here and in the sinks.
//! - A row with a value that cannot be decoded (text that is not UTF-8, which a `SQL_ASCII`
//!   database stores unchecked) keeps its position and goes to the run's dead letters with the
//!   table, key, reason and its values as they arrived; the source passes its position itself
//!   once the letter is durable, and the rest of the transaction and the stream go on. The
//!   snapshot reads such bytes as stored; the replication connection is UTF-8, so there the
//!   server refuses to send the change (a data error, SQLSTATE class 22), which stops the run
//!   with the LSN and the way out: it would recur at every reconnect. A malformed message or an
//!   unknown relation stops the run too (the stream itself is broken).

pub mod decode;
pub mod incremental;
pub mod lookup;
mod setup;
pub mod snapshot;
mod stream;
pub mod task;
pub mod txbuf;

pub use task::{PostgresAcker, PostgresSourceHandle, start};

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

/// How long a poll that already holds a complete transaction waits for more frames.
const LINGER: Duration = Duration::from_millis(5);

use chrono::{DateTime, Utc};
use pg_walstream::{CancellationToken, LogicalReplicationStream, ReplicationError};
use tokio_postgres::Client;

use crate::config::{PostgresSourceConfig, parse_table_name};
use crate::dead_letter::{DeadLetter, DeadLetters};
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Lsn, Position, StreamId};
use crate::secret::ConnString;
use crate::sink::durable::Durable;
use decode::Relation;
use snapshot::Snapshot;
use txbuf::{Replay, TxBuffer};

/// The name of the replication slot's stream (what sinks record positions under).
pub const STREAM: &str = "postgres";

/// The stream of the replication slot.
pub fn stream() -> StreamId {
    static STREAM_ID: std::sync::OnceLock<StreamId> = std::sync::OnceLock::new();
    STREAM_ID
        .get_or_init(|| StreamId::new(STREAM, None))
        .clone()
}

/// A change's position: its transaction's commit LSN, then its ordinal within the transaction
/// (so a transaction's changes keep their order). LSNs stay below 2^63 (8 EiB of WAL).
pub fn position(commit_lsn: Lsn, ordinal: u64) -> Position {
    Position::new(stream(), commit_lsn.0 as i64, ordinal as i64)
}

/// The (commit LSN, ordinal) of a position of this source; `None` for other sources' positions.
pub fn lsn_of(position: &Position) -> Option<(Lsn, u64)> {
    (position.stream.name() == STREAM && position.stream.partition().is_none())
        .then_some((Lsn(position.major as u64), position.minor as u64))
}

#[derive(Debug, thiserror::Error)]
pub enum PgSourceError {
    #[error("PostgreSQL connection: {0}")]
    Connection(#[source] tokio_postgres::Error),
    /// Opening a connection failed; `message` names the server and says why.
    #[error("PostgreSQL source: {message}")]
    Connect {
        message: String,
        #[source]
        error: tokio_postgres::Error,
    },
    #[error("PostgreSQL replication connection: {0}")]
    Replication(String),
    #[error("PostgreSQL: {0}")]
    Setup(String),
    #[error(transparent)]
    Decode(#[from] decode::DecodeError),
    #[error("spilling a transaction to disk: {0}")]
    Spill(#[from] std::io::Error),
    #[error("writing a dead letter: {0}")]
    DeadLetter(#[from] crate::dead_letter::DeadLetterError),
    #[error("asking the sinks what they hold: {0}")]
    Sink(#[from] crate::sink::SinkError),
}

impl Classify for PgSourceError {
    fn kind(&self) -> ErrorKind {
        match self {
            PgSourceError::Connection(e) if e.as_db_error().is_none() => ErrorKind::Connection,
            // A certificate the configured CA does not accept stays so: retrying cannot help.
            PgSourceError::Connect { error, .. }
                if error.as_db_error().is_none() && !crate::pg::is_certificate_error(error) =>
            {
                ErrorKind::Connection
            }
            PgSourceError::Connect { .. } => ErrorKind::Config,
            PgSourceError::Replication(_) | PgSourceError::Spill(_) => ErrorKind::Connection,
            PgSourceError::Connection(_) | PgSourceError::Setup(_) => ErrorKind::Config,
            PgSourceError::Decode(_) => ErrorKind::Data,
            PgSourceError::DeadLetter(e) => e.kind(),
            PgSourceError::Sink(e) => e.kind(),
        }
    }
}

fn db(e: tokio_postgres::Error) -> PgSourceError {
    PgSourceError::Connection(e)
}

fn repl(e: ReplicationError) -> PgSourceError {
    PgSourceError::Replication(e.to_string())
}

/// Quotes an SQL string literal (`'` doubled).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A table's name as events carry it in `source` (`schema.table`, unquoted).
fn source_name((schema, table): &(String, String)) -> String {
    format!("{schema}.{table}")
}

/// The replication connection's string: `url` with the TLS settings every connection of the
/// source uses, and `replication=database` (URL or key/value form).
fn replication_url(url: &ConnString) -> Result<String, PgSourceError> {
    crate::pg::Target::parse(url.expose())
        .map(|t| t.replication_url())
        .map_err(|e| PgSourceError::Setup(format!("sources.postgres.url: {e}")))
}

/// The session settings under which values selected as text read as [`decode::convert`]
/// expects (and as `tributary verify` must read them to compare alike).
pub(crate) const TEXT_SETTINGS: &str =
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3";

/// An ordinary connection with the session settings the text conversions expect.
async fn sql_connect(url: &ConnString) -> Result<Client, PgSourceError> {
    let target = crate::pg::Target::parse(url.expose())
        .map_err(|e| PgSourceError::Setup(format!("sources.postgres.url: {e}")))?;
    let client = target
        .open(|e| {
            tracing::warn!(error = %crate::pg::error_text(&e), "PostgreSQL source connection closed");
        })
        .await
        .map_err(|error| PgSourceError::Connect {
            message: crate::pg::connect_error(url, &target, &error),
            error,
        })?;
    client.batch_execute(TEXT_SETTINGS).await.map_err(db)?;
    Ok(client)
}

/// A server refusing connections for now (starting up, shutting down, connections disallowed).
fn is_refused(e: &PgSourceError) -> bool {
    match e {
        PgSourceError::Connection(e) | PgSourceError::Connect { error: e, .. } => {
            e.as_db_error().is_some_and(|d| {
                matches!(
                    d.code().code(),
                    "57P03" | "57P01" | "57P02" | "55000" | "53300"
                )
            })
        }
        _ => false,
    }
}

/// Errors re-connecting cannot fix: the slot or publication is gone, or the role lost its rights.
fn is_permanent_start_error(e: &ReplicationError) -> bool {
    let m = e.to_string();
    [
        "does not exist",
        "permission denied",
        "must be superuser or replication role",
        "password authentication failed",
    ]
    .iter()
    .any(|p| m.contains(p))
        && !m.contains("connection refused")
}

/// Names of non-built-in types (extensions such as pgvector's `vector`), by OID.
pub(crate) async fn load_type_names(
    client: &Client,
) -> Result<HashMap<u32, String>, PgSourceError> {
    let rows = client
        .query(
            "SELECT oid::int8, typname::text FROM pg_type WHERE oid >= 16384",
            &[],
        )
        .await
        .map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u32, r.get(1)))
        .collect())
}

/// The slot as last sampled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHealth {
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub lag_bytes: i64,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: String,
}

/// A transaction handed out (or being handed out) and not yet wholly acknowledged.
#[derive(Debug)]
struct InFlight {
    commit_lsn: Lsn,
    end_lsn: Lsn,
    /// Ordinals up to its last event (dead letters after it need no acknowledgement); `None`
    /// while its replay is still running.
    events: Option<u64>,
}

/// A committed transaction whose changes are being handed out.
struct Replaying {
    replay: Replay,
    commit_lsn: Lsn,
    commit_ts: DateTime<Utc>,
    ordinal: u64,
    /// Ordinal of the last change handed out as an event.
    last_event: Option<u64>,
}

/// Reads one publication through one logical slot.
pub struct PostgresSourceReader {
    cfg: PostgresSourceConfig,
    client: Client,
    stream: Option<LogicalReplicationStream>,
    /// `START_REPLICATION` was sent on `stream`.
    started: bool,
    streaming_protocol: bool,
    relations: HashMap<u32, Relation>,
    schema_versions: HashMap<u32, u32>,
    /// Each relation's typed columns, shared by its events.
    row_schemas: HashMap<u32, std::sync::Arc<crate::event::RowSchema>>,
    type_names: HashMap<u32, String>,
    /// Commit LSN of the last transaction handed out (replays at or below it are skipped).
    last_emitted: Lsn,
    in_flight: VecDeque<InFlight>,
    /// Highest LSN reported to the server as flushed.
    flushed: Lsn,
    open_tx: Option<TxBuffer>,
    streams: HashMap<u32, TxBuffer>,
    stream_xid: Option<u32>,
    replaying: Option<Replaying>,
    snapshot: Option<Snapshot>,
    /// The snapshot's tables once it was read, until every one is durably done.
    snapshot_done: Vec<snapshot::SnapTable>,
    snapshot_base_done: Option<Lsn>,
    /// Highest snapshot ordinal acknowledged.
    snapshot_acked: Option<u64>,
    /// Changes to a table committed before its snapshot's LSN are already in the snapshot.
    snapshot_lsn: HashMap<String, Lsn>,
    /// The state and heartbeat tables: never emitted.
    internal: HashSet<String>,
    state_table: (String, String),
    /// Where each snapshot chunk is recorded before its rows are handed out.
    chunk_table: (String, String),
    last_heartbeat: std::time::Instant,
    last_slot_check: Option<std::time::Instant>,
    msg_buf: Vec<u8>,
    /// Where rows that cannot be decoded go.
    dead_letters: DeadLetters,
    /// Dead letters of the transaction being handed out, written before the poll returns.
    pending_letters: Vec<DeadLetter>,
    /// On-demand snapshots ([`incremental`]).
    on_demand: incremental::OnDemand,
    /// A watermark met in the stream asked for this (done before the replay goes on).
    work: Option<incremental::Action>,
}

impl PostgresSourceReader {
    /// Connects, creates the publication and slot when missing, checks replica identities and,
    /// on first start, prepares the initial snapshot.
    ///
    /// Needs a multi-thread Tokio runtime: there `pg_walstream` drives the replication socket on
    /// the caller's runtime, where a read interrupted by [`poll`](Self::poll)'s wait deadline
    /// keeps what it had buffered (its worker-thread driver would drop it).
    pub async fn connect(cfg: &PostgresSourceConfig) -> Result<Self, PgSourceError> {
        Self::connect_with(cfg, &Durable::none()).await
    }

    /// [`connect`](Self::connect), asking `durable` whether an unfinished table's snapshot is
    /// in fact durable in every sink (its acknowledgement lost to a crash): such a table is
    /// marked done instead of being read again.
    pub async fn connect_with(
        cfg: &PostgresSourceConfig,
        durable: &Durable,
    ) -> Result<Self, PgSourceError> {
        if tokio::runtime::Handle::current().runtime_flavor()
            != tokio::runtime::RuntimeFlavor::MultiThread
        {
            return Err(PgSourceError::Setup(
                "the PostgreSQL source needs a multi-thread Tokio runtime".into(),
            ));
        }
        let client = sql_connect(&cfg.url).await?;
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .map_err(db)?
            .get(0);
        let state_table = parse_table_name(&cfg.state_table).map_err(PgSourceError::Setup)?;
        let chunk_table = (state_table.0.clone(), format!("{}_chunks", state_table.1));
        let requests_table =
            incremental::requests_table(&cfg.state_table).map_err(PgSourceError::Setup)?;
        let mut internal = HashSet::from([
            source_name(&state_table),
            source_name(&chunk_table),
            source_name(&requests_table),
        ]);
        if let Some(h) = &cfg.heartbeat_table {
            internal.insert(source_name(
                &parse_table_name(h).map_err(PgSourceError::Setup)?,
            ));
        }
        let mut reader = Self {
            cfg: cfg.clone(),
            client,
            stream: None,
            started: false,
            streaming_protocol: version >= 140_000,
            relations: HashMap::new(),
            schema_versions: HashMap::new(),
            row_schemas: HashMap::new(),
            type_names: HashMap::new(),
            last_emitted: Lsn(0),
            in_flight: VecDeque::new(),
            flushed: Lsn(0),
            open_tx: None,
            streams: HashMap::new(),
            stream_xid: None,
            replaying: None,
            snapshot: None,
            snapshot_done: Vec::new(),
            snapshot_base_done: None,
            snapshot_acked: None,
            snapshot_lsn: HashMap::new(),
            internal,
            state_table,
            chunk_table,
            last_heartbeat: std::time::Instant::now(),
            last_slot_check: None,
            msg_buf: Vec::new(),
            dead_letters: DeadLetters::nowhere(),
            pending_letters: Vec::new(),
            on_demand: incremental::OnDemand::new(cfg)?,
            work: None,
        };
        reader.ensure_publication(cfg).await?;
        reader.check_replica_identity().await?;
        reader.ensure_heartbeat_table().await?;
        reader.ensure_state_table().await?;
        reader.prepare_slot_and_snapshot(durable).await?;
        Ok(reader)
    }

    /// Sends rows that cannot be decoded to `dead_letters` (without, the first such row stops the
    /// reader: nothing is dropped).
    pub fn set_dead_letters(&mut self, dead_letters: DeadLetters) {
        self.dead_letters = dead_letters;
    }

    /// Writes dead letters; returns once they are durable, so the positions behind them may be
    /// passed (no acknowledgement comes for them).
    async fn write_dead_letters(
        dead_letters: &DeadLetters,
        letters: &[DeadLetter],
    ) -> Result<(), PgSourceError> {
        if letters.is_empty() {
            return Ok(());
        }
        for l in letters {
            tracing::warn!(source = %l.source, position = %l.position, error = %l.error, "row dead-lettered");
        }
        dead_letters.write(letters).await?;
        for l in letters {
            metrics::counter!(
                "tributary_dead_letters_total",
                "source" => l.source.clone(),
                "reason" => "invalid_utf8"
            )
            .increment(1);
        }
        Ok(())
    }

    /// The server failed to send the change after `after` with a data exception (SQLSTATE class
    /// 22, in `server`): it fails the same way at every reconnect, so the reader stops.
    fn unsendable(&self, server: &str, after: Lsn) -> PgSourceError {
        PgSourceError::Setup(format!(
            "slot {:?}: the server cannot send the change after LSN {after}: {server}. It fails \
             the same way at every restart. Usually a SQL_ASCII database holds bytes that are \
             not UTF-8, which the replication connection (UTF-8) cannot carry: the snapshot \
             dead-letters such rows, the stream never receives them. To go on without that \
             transaction, advance the slot past its commit with pg_replication_slot_advance \
             (its changes are then not replicated)",
            self.cfg.slot
        ))
    }

    /// True while the initial snapshot is being read.
    pub fn snapshotting(&self) -> bool {
        self.snapshot.as_ref().is_some_and(|s| !s.finished())
    }

    /// The slot's confirmed flush position (everything up to it was acknowledged).
    pub async fn confirmed_flush(&self) -> Result<Lsn, PgSourceError> {
        Ok(self.slot_row().await?.map(|s| s.2).unwrap_or(Lsn(0)))
    }

    /// The next batch: snapshot rows while the snapshot runs, then the changes of committed
    /// transactions (about `max_events`; a big transaction spans several calls). Waits at most
    /// `wait` for new data and returns what it has (possibly nothing) so the caller can
    /// acknowledge in between.
    pub async fn poll(
        &mut self,
        max_events: usize,
        wait: Duration,
    ) -> Result<Vec<ChangeEvent>, PgSourceError> {
        if let Some(snap) = &mut self.snapshot {
            if !snap.finished() {
                let chunk = snap.next_chunk().await?;
                Self::write_dead_letters(&self.dead_letters, &chunk.letters).await?;
                if let Some(r) = &chunk.record {
                    self.record_chunk(r).await?;
                }
                self.record_read_tables().await?;
                if !chunk.events.is_empty() {
                    return Ok(chunk.events);
                }
            }
            self.settle_snapshot(None).await?;
            if self.snapshot.as_ref().is_some_and(|s| !s.finished()) {
                return Ok(Vec::new());
            }
            if let Some(snap) = self.snapshot.take() {
                tracing::info!("initial snapshot read; streaming changes");
                let tables = snap.tables.clone();
                self.snapshot_base_done = Some(snap.base);
                snap.close().await?;
                // Keep the per-table progress for acknowledgements.
                self.snapshot_done = tables;
                self.settle_snapshot(None).await?;
            }
        }
        self.periodic().await?;
        self.ensure_stream().await?;
        if self.streaming_protocol {
            self.on_demand.tick(&self.client).await?;
        }
        let mut out = Vec::new();
        let token = CancellationToken::new();
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        let mut lingering = false;
        loop {
            if self.replaying.is_some() {
                self.drain_replay(&mut out, max_events)?;
                // A watermark stopped the replay: do what it asks, then go on with it.
                while let Some(action) = self.work.take() {
                    self.on_watermark(action, &mut out).await?;
                    if self.replaying.is_some() {
                        self.drain_replay(&mut out, max_events)?;
                    }
                }
                // Durable before anything of the transaction can be acknowledged.
                let letters = std::mem::take(&mut self.pending_letters);
                Self::write_dead_letters(&self.dead_letters, &letters).await?;
                if out.len() >= max_events {
                    break;
                }
            }
            // Once a transaction is ready, wait only briefly for more: a busy stream still fills
            // big batches, a quiet one hands each transaction over at once instead of holding it
            // for the whole `wait`.
            if !out.is_empty() && !lingering {
                lingering = true;
                let soon = tokio::time::Instant::now() + LINGER;
                if soon < sleep.deadline() {
                    sleep.as_mut().reset(soon);
                }
            }
            let stream = self.stream.as_mut().expect("stream started above");
            let frame = {
                let fut = stream.next_raw_event(&token);
                tokio::pin!(fut);
                tokio::select! {
                    biased;
                    r = &mut fut => r,
                    _ = &mut sleep, if !token.is_cancelled() => {
                        token.cancel();
                        fut.await
                    }
                }
            };
            match frame {
                Ok(raw) => self.handle(&raw.data)?,
                Err(ReplicationError::Cancelled(_)) => break,
                Err(ReplicationError::Protocol(m)) if m.starts_with("[22") => {
                    let after = self
                        .stream
                        .as_ref()
                        .map_or(self.flushed, |s| Lsn(s.current_lsn()));
                    // The first line: the server's message (its routine and file follow).
                    return Err(self.unsendable(m.lines().next().unwrap_or_default(), after));
                }
                Err(e) => {
                    self.stream = None;
                    self.started = false;
                    tracing::warn!(error = %e, "PostgreSQL replication stream lost; reconnecting");
                    if out.is_empty() {
                        self.ensure_stream().await?;
                        continue;
                    }
                    break;
                }
            }
            if out.len() >= max_events {
                break;
            }
        }
        if out.is_empty() {
            self.advance_idle().await?;
        }
        Ok(out)
    }

    /// Closes the replication connection after sending the final flush position.
    pub async fn close(mut self) {
        if let Some(mut s) = self.stream.take()
            && self.started
        {
            let _ = s.send_feedback().await;
        }
    }
}
