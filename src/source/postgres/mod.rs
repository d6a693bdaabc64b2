//! PostgreSQL logical-replication source (pgoutput).
//!
//! Guarantees:
//! - The publication and the logical slot (`pgoutput`) are created when missing; every
//!   identifier is quoted, so tables such as `public."Order Items"` work. A published table
//!   without a primary key and without `REPLICA IDENTITY FULL` is refused at start-up by name.
//! - On first start the slot is created on a replication connection with `EXPORT_SNAPSHOT`,
//!   and every existing row is emitted as `Op::Snapshot` from inside that snapshot
//!   ([`snapshot`]); streaming then starts at the slot's consistent point, so nothing is missed
//!   or doubled. Per-table completion is recorded in the state table once acknowledged.
//! - Changes stream over the replication protocol (`pg_walstream` for the transport: start-up,
//!   authentication, TLS, CopyBoth, keepalives, standby status updates). pgoutput messages are
//!   decoded here ([`decode`]): `pg_walstream`'s own decoder produces its event type, not ours,
//!   and we need the raw bytes anyway to buffer transactions undecoded.
//! - Protocol v2 `streaming` is negotiated on PostgreSQL ≥ 14: an in-progress transaction's
//!   chunks are buffered per xid ([`txbuf`]: memory up to `max_tx_memory_mb`, then a temporary
//!   file), emitted on Stream Commit a batch at a time, dropped on Stream Abort. Every event
//!   carries `Position::Lsn { commit_lsn, tx_ordinal }`.
//! - The slot's flush position moves only when the pipeline calls [`PostgresSourceReader::ack`]
//!   with a durable position, and only to the end of transactions wholly acknowledged. While
//!   nothing is in flight, the server's keepalive position (and the optional heartbeat table's
//!   transactions) advance it, so an idle publication does not retain WAL.
//! - A lost connection is re-established with `backon` exponential backoff and resumes at the
//!   last flushed LSN; transactions seen again are skipped by position here and in the sinks.

pub mod decode;
pub mod snapshot;
pub mod task;
pub mod txbuf;

pub use task::{PostgresAcker, PostgresSourceHandle, start};

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pg_walstream::{
    CancellationToken, LogicalReplicationStream, ReplicationError, ReplicationSlotOptions,
    ReplicationStreamConfig, RetryConfig, StreamingMode,
};
use tokio_postgres::{Client, NoTls};

use crate::config::{PostgresSource, SlotLostPolicy, SnapshotMode, parse_table_name};
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Lsn, Op, Position, Row};
use decode::{Message, Relation, TupleValue};
use snapshot::Snapshot;
use txbuf::{Replay, TxBuffer};

#[derive(Debug, thiserror::Error)]
pub enum PgSourceError {
    #[error("PostgreSQL connection: {0}")]
    Connection(#[source] tokio_postgres::Error),
    #[error("PostgreSQL replication connection: {0}")]
    Replication(String),
    #[error("PostgreSQL: {0}")]
    Setup(String),
    #[error(transparent)]
    Decode(#[from] decode::DecodeError),
    #[error("spilling a transaction to disk: {0}")]
    Spill(#[from] std::io::Error),
}

impl Classify for PgSourceError {
    fn kind(&self) -> ErrorKind {
        match self {
            PgSourceError::Connection(e) if e.as_db_error().is_none() => ErrorKind::Connection,
            PgSourceError::Replication(_) | PgSourceError::Spill(_) => ErrorKind::Connection,
            PgSourceError::Connection(_) | PgSourceError::Setup(_) => ErrorKind::Config,
            PgSourceError::Decode(_) => ErrorKind::Data,
        }
    }
}

fn db(e: tokio_postgres::Error) -> PgSourceError {
    PgSourceError::Connection(e)
}

fn repl(e: ReplicationError) -> PgSourceError {
    PgSourceError::Replication(e.to_string())
}

/// Quotes an SQL identifier (`"` doubled).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal (`'` doubled).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `url` with `replication=database` added (URL or key/value form).
fn replication_url(url: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}replication=database")
    } else {
        format!("{url} replication=database")
    }
}

/// An ordinary connection with the session settings the text conversions expect.
async fn sql_connect(url: &str) -> Result<Client, PgSourceError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.map_err(db)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "PostgreSQL source connection closed");
        }
    });
    client
        .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3")
        .await
        .map_err(db)?;
    Ok(client)
}

/// A server refusing connections for now (starting up, shutting down, connections disallowed).
fn is_refused(e: &PgSourceError) -> bool {
    match e {
        PgSourceError::Connection(e) => e.as_db_error().is_some_and(|d| {
            matches!(d.code().code(), "57P03" | "57P01" | "57P02" | "55000" | "53300")
        }),
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
async fn load_type_names(client: &Client) -> Result<HashMap<u32, String>, PgSourceError> {
    let rows = client
        .query("SELECT oid::int8, typname::text FROM pg_type WHERE oid >= 16384", &[])
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
    /// Events emitted for it; `None` while its replay is still running.
    events: Option<u64>,
}

/// A committed transaction whose changes are being handed out.
struct Replaying {
    replay: Replay,
    commit_lsn: Lsn,
    commit_ts: DateTime<Utc>,
    ordinal: u64,
}

/// Reads one publication through one logical slot.
pub struct PostgresSourceReader {
    cfg: PostgresSource,
    client: Client,
    stream: Option<LogicalReplicationStream>,
    /// `START_REPLICATION` was sent on `stream`.
    started: bool,
    streaming_protocol: bool,
    relations: HashMap<u32, Relation>,
    schema_versions: HashMap<u32, u32>,
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
    snapshot_lsn: HashMap<(String, String), Lsn>,
    /// The state and heartbeat tables: never emitted.
    internal: HashSet<(String, String)>,
    state_table: (String, String),
    last_heartbeat: std::time::Instant,
    last_slot_check: Option<std::time::Instant>,
    msg_buf: Vec<u8>,
}

impl PostgresSourceReader {
    /// Connects, creates the publication and slot when missing, checks replica identities and,
    /// on first start, prepares the initial snapshot.
    ///
    /// Needs a multi-thread Tokio runtime: there `pg_walstream` drives the replication socket on
    /// the caller's runtime, where a read interrupted by [`poll`](Self::poll)'s wait deadline
    /// keeps what it had buffered (its worker-thread driver would drop it).
    pub async fn connect(cfg: &PostgresSource) -> Result<Self, PgSourceError> {
        if tokio::runtime::Handle::current().runtime_flavor()
            != tokio::runtime::RuntimeFlavor::MultiThread
        {
            return Err(PgSourceError::Setup(
                "the PostgreSQL source needs a multi-thread Tokio runtime".into(),
            ));
        }
        let client = sql_connect(cfg.url.expose()).await?;
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .map_err(db)?
            .get(0);
        let state_table = parse_table_name(&cfg.state_table).map_err(PgSourceError::Setup)?;
        let mut internal = HashSet::from([state_table.clone()]);
        if let Some(h) = &cfg.heartbeat_table {
            internal.insert(parse_table_name(h).map_err(PgSourceError::Setup)?);
        }
        let mut reader = Self {
            cfg: cfg.clone(),
            client,
            stream: None,
            started: false,
            streaming_protocol: version >= 140_000,
            relations: HashMap::new(),
            schema_versions: HashMap::new(),
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
            last_heartbeat: std::time::Instant::now(),
            last_slot_check: None,
            msg_buf: Vec::new(),
        };
        reader.ensure_publication(cfg).await?;
        reader.check_replica_identity().await?;
        reader.ensure_heartbeat_table().await?;
        reader.ensure_state_table().await?;
        reader.prepare_slot_and_snapshot().await?;
        Ok(reader)
    }

    fn qualified(t: &(String, String)) -> String {
        format!("{}.{}", quote_ident(&t.0), quote_ident(&t.1))
    }

    async fn ensure_state_table(&self) -> Result<(), PgSourceError> {
        self.client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    slot text NOT NULL, schema_name text NOT NULL, table_name text NOT NULL,
                    snapshot_lsn pg_lsn NOT NULL, epoch int8 NOT NULL, done bool NOT NULL,
                    done_at timestamptz, PRIMARY KEY (slot, schema_name, table_name))",
                Self::qualified(&self.state_table)
            ))
            .await
            .map_err(|e| {
                PgSourceError::Setup(format!(
                    "creating the snapshot state table {} (sources.postgres.state_table): {}",
                    self.cfg.state_table,
                    crate::check::pg_error_text(&e)
                ))
            })
    }

    async fn ensure_heartbeat_table(&self) -> Result<(), PgSourceError> {
        let Some(h) = &self.cfg.heartbeat_table else {
            return Ok(());
        };
        let t = parse_table_name(h).map_err(PgSourceError::Setup)?;
        let q = Self::qualified(&t);
        self.client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {q} (id int PRIMARY KEY, ts timestamptz NOT NULL)"
            ))
            .await
            .map_err(db)?;
        let member = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&self.cfg.publication, &t.0, &t.1],
            )
            .await
            .map_err(db)?
            .is_some();
        if !member {
            let sql = format!(
                "ALTER PUBLICATION {} ADD TABLE {q}",
                quote_ident(&self.cfg.publication)
            );
            if let Err(e) = self.client.batch_execute(&sql).await {
                tracing::warn!(error = %crate::check::pg_error_text(&e), table = %h,
                    "could not add the heartbeat table to the publication; the slot advances on keepalives only");
            }
        }
        Ok(())
    }

    /// Published tables (minus our own), sorted.
    async fn published_tables(&self) -> Result<Vec<(String, String)>, PgSourceError> {
        let rows = self
            .client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables
                 WHERE pubname = $1 ORDER BY 1, 2",
                &[&self.cfg.publication],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .filter(|t| !self.internal.contains(t))
            .collect())
    }

    /// `(plugin, wal_status, confirmed_flush)` of the slot, if it exists.
    async fn slot_row(&self) -> Result<Option<(Option<String>, Option<String>, Lsn)>, PgSourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT plugin::text, wal_status, coalesce((confirmed_flush_lsn - '0/0')::int8, 0)
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|r| (r.get(0), r.get(1), Lsn(r.get::<_, i64>(2) as u64))))
    }

    fn stream_config(&self, slot: &str, snapshot: &str, temporary: bool) -> ReplicationStreamConfig {
        let (proto, mode) = if self.streaming_protocol {
            (2, StreamingMode::On)
        } else {
            (1, StreamingMode::Off)
        };
        ReplicationStreamConfig::new(
            slot.to_string(),
            // pg_walstream wraps the name in double quotes itself; double any inside it.
            self.cfg.publication.replace('"', "\"\""),
            proto,
            mode,
            Duration::from_secs(1),
            Duration::from_secs(30),
            Duration::from_secs(3600),
            RetryConfig {
                max_attempts: 1,
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(100),
                multiplier: 1.0,
                max_duration: Duration::from_secs(30),
                jitter: false,
            },
        )
        .with_slot_options(ReplicationSlotOptions {
            temporary,
            snapshot: Some(snapshot.to_string()),
            ..Default::default()
        })
    }

    /// Creates (or checks) the slot, applies the lost-slot policy, and plans the snapshot.
    async fn prepare_slot_and_snapshot(&mut self) -> Result<(), PgSourceError> {
        let state_rows = self
            .client
            .query(
                &format!(
                    "SELECT schema_name, table_name, (snapshot_lsn - '0/0')::int8, epoch, done FROM {} WHERE slot = $1",
                    Self::qualified(&self.state_table)
                ),
                &[&self.cfg.slot],
            )
            .await
            .map_err(db)?;
        let slot = self.slot_row().await?;
        let lost = match &slot {
            Some((plugin, wal_status, _)) => {
                if plugin.as_deref() != Some("pgoutput") {
                    return Err(PgSourceError::Setup(format!(
                        "replication slot {:?} exists but is not a pgoutput logical slot",
                        self.cfg.slot
                    )));
                }
                wal_status.as_deref() == Some("lost")
            }
            // Snapshot state without a slot: someone dropped it.
            None => !state_rows.is_empty(),
        };
        let mut slot_exists = slot.is_some();
        if lost {
            match self.cfg.on_slot_lost {
                SlotLostPolicy::Error => {
                    return Err(PgSourceError::Setup(format!(
                        "replication slot {:?} was {}: changes made since it was last read are \
                         gone. To recover, set sources.postgres.on_slot_lost = \"recreate\" (new \
                         slot and a new snapshot of every table) or drop the slot and delete its \
                         rows from {} yourself",
                        self.cfg.slot,
                        if slot_exists { "invalidated (wal_status = lost)" } else { "dropped" },
                        self.cfg.state_table
                    )));
                }
                SlotLostPolicy::Recreate => {
                    tracing::warn!(slot = %self.cfg.slot, "replication slot lost: recreating it and taking a new snapshot");
                    if slot_exists {
                        self.client
                            .execute("SELECT pg_drop_replication_slot($1)", &[&self.cfg.slot])
                            .await
                            .map_err(db)?;
                        slot_exists = false;
                    }
                }
            }
        }
        let want_snapshot = self.cfg.snapshot == SnapshotMode::Initial;
        if !slot_exists {
            self.client
                .execute(
                    &format!("DELETE FROM {} WHERE slot = $1", Self::qualified(&self.state_table)),
                    &[&self.cfg.slot],
                )
                .await
                .map_err(db)?;
            let mode = if want_snapshot { "export" } else { "nothing" };
            let mut stream = LogicalReplicationStream::new(
                &replication_url(self.cfg.url.expose()),
                self.stream_config(&self.cfg.slot, mode, false),
            )
            .await
            .map_err(repl)?;
            stream.ensure_replication_slot().await.map_err(repl)?;
            let (_, _, consistent) = self.slot_row().await?.ok_or_else(|| {
                PgSourceError::Setup(format!("slot {:?} vanished right after creation", self.cfg.slot))
            })?;
            if want_snapshot {
                let name = stream.exported_snapshot_name().map(str::to_string).ok_or_else(|| {
                    PgSourceError::Setup("the new slot exported no snapshot".into())
                })?;
                let tables = self.published_tables().await?;
                self.record_snapshot_plan(&tables, consistent, 1).await?;
                self.open_snapshot(&name, tables, consistent, 1).await?;
            }
            // Keep the connection: it becomes the stream once the snapshot is read.
            self.stream = Some(stream);
            return Ok(());
        }
        // Existing slot: resume an interrupted snapshot, if any.
        let mut epoch = 0u64;
        let mut pending = Vec::new();
        for r in &state_rows {
            let t: (String, String) = (r.get(0), r.get(1));
            let lsn = Lsn(r.get::<_, i64>(2) as u64);
            epoch = epoch.max(r.get::<_, i64>(3) as u64);
            if r.get::<_, bool>(4) {
                self.snapshot_lsn.insert(t, lsn);
            } else {
                pending.push(t);
            }
        }
        if !pending.is_empty() {
            let confirmed = slot.map(|s| s.2).unwrap_or(Lsn(0));
            let temp_slot = format!("{}_snap_{}", self.cfg.slot, std::process::id());
            let mut temp = LogicalReplicationStream::new(
                &replication_url(self.cfg.url.expose()),
                self.stream_config(&temp_slot, "export", true),
            )
            .await
            .map_err(repl)?;
            temp.ensure_replication_slot().await.map_err(repl)?;
            let at: i64 = self
                .client
                .query_one(
                    "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&temp_slot],
                )
                .await
                .map_err(db)?
                .get(0);
            let name = temp.exported_snapshot_name().map(str::to_string).ok_or_else(|| {
                PgSourceError::Setup("the temporary slot exported no snapshot".into())
            })?;
            tracing::info!(tables = pending.len(), "resuming an interrupted snapshot");
            self.record_snapshot_plan(&pending, Lsn(at as u64), epoch + 1).await?;
            self.open_snapshot_at(&name, pending, confirmed, Lsn(at as u64), epoch + 1).await?;
            drop(temp);
        }
        Ok(())
    }

    async fn record_snapshot_plan(
        &self,
        tables: &[(String, String)],
        lsn: Lsn,
        epoch: u64,
    ) -> Result<(), PgSourceError> {
        let sql = format!(
            "INSERT INTO {} (slot, schema_name, table_name, snapshot_lsn, epoch, done)
             VALUES ($1, $2, $3, $4::text::pg_lsn, $5, false)
             ON CONFLICT (slot, schema_name, table_name)
             DO UPDATE SET snapshot_lsn = excluded.snapshot_lsn, epoch = excluded.epoch, done = false",
            Self::qualified(&self.state_table)
        );
        for t in tables {
            self.client
                .execute(&sql, &[&self.cfg.slot, &t.0, &t.1, &lsn.to_string(), &(epoch as i64)])
                .await
                .map_err(db)?;
        }
        Ok(())
    }

    async fn open_snapshot(
        &mut self,
        name: &str,
        tables: Vec<(String, String)>,
        slot_start: Lsn,
        epoch: u64,
    ) -> Result<(), PgSourceError> {
        self.open_snapshot_at(name, tables, slot_start, slot_start, epoch).await
    }

    /// `slot_start`: where the slot's stream begins (snapshot positions sort just below it);
    /// `at`: the LSN the snapshot is consistent at (changes of these tables committed before it
    /// are skipped).
    async fn open_snapshot_at(
        &mut self,
        name: &str,
        tables: Vec<(String, String)>,
        slot_start: Lsn,
        at: Lsn,
        epoch: u64,
    ) -> Result<(), PgSourceError> {
        for t in &tables {
            self.snapshot_lsn.insert(t.clone(), at);
        }
        let snap = Snapshot::open(
            self.cfg.url.expose(),
            name,
            tables,
            Lsn(slot_start.0.saturating_sub(1)),
            epoch,
            self.cfg.snapshot_chunk_rows,
        )
        .await?;
        self.snapshot = Some(snap);
        Ok(())
    }

    /// True while the initial snapshot is being read.
    pub fn snapshotting(&self) -> bool {
        self.snapshot.as_ref().is_some_and(|s| !s.finished())
    }

    /// The slot's confirmed flush position (everything up to it was acknowledged).
    pub async fn confirmed_flush(&self) -> Result<Lsn, PgSourceError> {
        Ok(self.slot_row().await?.map(|s| s.2).unwrap_or(Lsn(0)))
    }

    /// Starts (or restarts, after a lost connection) streaming from the slot's confirmed
    /// position, retrying with exponential backoff.
    async fn ensure_stream(&mut self) -> Result<(), PgSourceError> {
        if self.started && self.stream.is_some() {
            return Ok(());
        }
        // `START_REPLICATION` through pg_walstream creates a missing slot: a slot dropped under
        // us would silently come back empty, its changes lost. Check first.
        self.ensure_client().await?;
        let dropped = || {
            PgSourceError::Setup(format!(
                "replication slot {:?} was dropped while running; restart to apply \
                 sources.postgres.on_slot_lost ({:?})",
                self.cfg.slot, self.cfg.on_slot_lost
            ))
        };
        let Some((_, _, before)) = self.slot_row().await? else {
            return Err(dropped());
        };
        use backon::{ExponentialBuilder, Retryable};
        let url = replication_url(self.cfg.url.expose());
        let config = self.stream_config(&self.cfg.slot, "nothing", false);
        let existing = self.stream.take();
        let mut existing = Some(existing);
        let start = || {
            let url = url.clone();
            let config = config.clone();
            let reuse = existing.take().flatten();
            async move {
                let mut s = match reuse {
                    Some(s) => s,
                    None => LogicalReplicationStream::new(&url, config).await?,
                };
                s.start(None).await?;
                Ok::<_, ReplicationError>(s)
            }
        };
        // The slot and publication were checked at start-up, so a failure here is the server
        // being away (restart, failover, connections refused): retry until it is back, except
        // for what no retry can fix.
        let stream = start
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10))
                    .without_max_times()
                    .with_jitter(),
            )
            .when(|e: &ReplicationError| e.is_transient() || !is_permanent_start_error(e))
            .notify(|e, after| {
                tracing::warn!(error = %e, retry_in = ?after, "PostgreSQL replication connection failed; retrying");
            })
            .await
            .map_err(repl)?;
        // Only this source moves the slot, so a slot now ahead of where it was (and of what we
        // flushed) was dropped and re-created by the START above in between: its changes are lost.
        match self.slot_row().await? {
            Some((_, _, now)) if now <= before.max(self.flushed) => {}
            _ => return Err(dropped()),
        }
        // Discard anything half-received on the old connection: the server sends it again.
        self.open_tx = None;
        self.streams.clear();
        self.stream_xid = None;
        self.stream = Some(stream);
        self.started = true;
        Ok(())
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
                if !chunk.is_empty() {
                    return Ok(chunk);
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
        if let Err(e) = self.ensure_stream().await {
            return Err(e);
        }
        let mut out = Vec::new();
        let token = CancellationToken::new();
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            if self.replaying.is_some() {
                self.drain_replay(&mut out, max_events)?;
                if out.len() >= max_events {
                    break;
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

    /// One pgoutput message off the wire.
    fn handle(&mut self, data: &[u8]) -> Result<(), PgSourceError> {
        let Some(&tag) = data.first() else {
            return Ok(());
        };
        let limit = (self.cfg.max_tx_memory_mb as usize) << 20;
        if let Some(xid) = self.stream_xid {
            if tag == b'E' {
                self.stream_xid = None;
                return Ok(());
            }
            let sub = if decode::has_stream_xid(tag) && data.len() >= 5 {
                u32::from_be_bytes(data[1..5].try_into().expect("4 bytes"))
            } else {
                xid
            };
            let spill = self.cfg.spill_dir.clone();
            self.streams
                .entry(xid)
                .or_insert_with(|| TxBuffer::new(limit, spill, true))
                .push(sub, data)?;
            return Ok(());
        }
        match tag {
            b'B' => {
                self.open_tx = Some(TxBuffer::new(limit, self.cfg.spill_dir.clone(), false));
            }
            b'C' => {
                if let Message::Commit {
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                } = decode::parse(data)?
                {
                    if let Some(buf) = self.open_tx.take() {
                        self.commit(buf, commit_lsn, end_lsn, commit_ts)?;
                    }
                }
            }
            b'S' => {
                if let Message::StreamStart { xid } = decode::parse(data)? {
                    self.stream_xid = Some(xid);
                }
            }
            b'c' => {
                if let Message::StreamCommit {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                } = decode::parse(data)?
                {
                    let buf = self
                        .streams
                        .remove(&xid)
                        .unwrap_or_else(|| TxBuffer::new(limit, None, true));
                    if buf.spilled_bytes() > 0 {
                        tracing::info!(xid, messages = buf.messages(), spilled_bytes = buf.spilled_bytes(),
                            "large streamed transaction committed");
                    }
                    self.commit(buf, commit_lsn, end_lsn, commit_ts)?;
                }
            }
            b'A' => {
                if let Message::StreamAbort { xid, subxid } = decode::parse(data)? {
                    if xid == subxid {
                        self.streams.remove(&xid);
                    } else if let Some(b) = self.streams.get_mut(&xid) {
                        b.abort_subtransaction(subxid);
                    }
                }
            }
            _ => match &mut self.open_tx {
                Some(buf) => buf.push(0, data)?,
                // Relation/Type messages between transactions.
                None => self.apply_meta(decode::parse(data)?),
            },
        }
        Ok(())
    }

    fn apply_meta(&mut self, msg: Message) {
        match msg {
            Message::Relation(rel) => {
                let changed = self.relations.get(&rel.id) != Some(&rel);
                if changed {
                    *self.schema_versions.entry(rel.id).or_insert(0) += 1;
                }
                self.relations.insert(rel.id, rel);
            }
            Message::Type { oid, name } => {
                self.type_names.insert(oid, name);
            }
            _ => {}
        }
    }

    fn commit(
        &mut self,
        buf: TxBuffer,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: DateTime<Utc>,
    ) -> Result<(), PgSourceError> {
        if commit_lsn <= self.last_emitted {
            return Ok(());
        }
        self.last_emitted = commit_lsn;
        self.in_flight.push_back(InFlight {
            commit_lsn,
            end_lsn,
            events: None,
        });
        self.replaying = Some(Replaying {
            replay: buf.into_replay()?,
            commit_lsn,
            commit_ts,
            ordinal: 0,
        });
        Ok(())
    }

    /// Hands out the committed transaction's changes, up to `max` events in `out`.
    fn drain_replay(&mut self, out: &mut Vec<ChangeEvent>, max: usize) -> Result<(), PgSourceError> {
        let mut buf = std::mem::take(&mut self.msg_buf);
        while out.len() < max {
            let r = self.replaying.as_mut().expect("replaying");
            if !r.replay.next_into(&mut buf)? {
                let done = self.replaying.take().expect("replaying");
                if let Some(f) = self.in_flight.iter_mut().rev().find(|f| f.commit_lsn == done.commit_lsn) {
                    f.events = Some(done.ordinal);
                }
                break;
            }
            let msg = if r.replay.streamed {
                decode::parse_streamed(&buf)?.1
            } else {
                decode::parse(&buf)?
            };
            let (commit_lsn, commit_ts) = (r.commit_lsn, r.commit_ts);
            match msg {
                Message::Relation(_) | Message::Type { .. } => self.apply_meta(msg),
                Message::Insert { .. } | Message::Update { .. } | Message::Delete { .. } | Message::Truncate { .. } => {
                    for mut ev in self.to_events(msg)? {
                        let Some((schema, name)) = ev.source.split_once('.').map(|(a, b)| (a.to_string(), b.to_string())) else {
                            continue;
                        };
                        let t = (schema, name);
                        if self.internal.contains(&t)
                            || self.snapshot_lsn.get(&t).is_some_and(|at| commit_lsn < *at)
                        {
                            continue;
                        }
                        let r = self.replaying.as_mut().expect("replaying");
                        ev.position = Position::Lsn {
                            commit_lsn,
                            tx_ordinal: r.ordinal,
                        };
                        r.ordinal += 1;
                        ev.source_ts = Some(commit_ts);
                        out.push(ev);
                    }
                }
                _ => {}
            }
        }
        self.msg_buf = buf;
        Ok(())
    }

    /// Tells the source that everything up to `pos` is durable in every sink. For streamed
    /// changes the slot's flush position moves to the end of the last transaction wholly
    /// acknowledged; for snapshot rows, finished tables are recorded as done.
    pub async fn ack(&mut self, pos: &Position) -> Result<(), PgSourceError> {
        let Position::Lsn { commit_lsn, tx_ordinal } = *pos else {
            return Ok(());
        };
        match self.snapshot_base() {
            Some(b) if b == commit_lsn => return self.settle_snapshot(Some(tx_ordinal)).await,
            // A durable change after the snapshot: every snapshot row before it is durable.
            Some(b) if b < commit_lsn => self.settle_snapshot(Some(u64::MAX)).await?,
            _ => {}
        }
        let mut upto = None;
        while let Some(f) = self.in_flight.front() {
            let whole = match f.events {
                Some(n) => f.commit_lsn < commit_lsn || (f.commit_lsn == commit_lsn && tx_ordinal + 1 >= n),
                None => false,
            };
            if !whole && !(f.events == Some(0)) {
                break;
            }
            upto = Some(f.end_lsn);
            self.in_flight.pop_front();
        }
        if let Some(lsn) = upto {
            self.flush(lsn).await?;
        }
        Ok(())
    }

    fn snapshot_base(&self) -> Option<Lsn> {
        self.snapshot
            .as_ref()
            .map(|s| s.base)
            .or(self.snapshot_base_done)
    }

    /// Reports `lsn` as flushed to the server.
    async fn flush(&mut self, lsn: Lsn) -> Result<(), PgSourceError> {
        if lsn <= self.flushed {
            return Ok(());
        }
        self.flushed = lsn;
        if let Some(s) = self.stream.as_mut().filter(|_| self.started) {
            s.shared_lsn_feedback.update_flushed_lsn(lsn.0);
            s.shared_lsn_feedback.update_applied_lsn(lsn.0);
            if let Err(e) = s.send_feedback().await {
                tracing::warn!(error = %e, "sending the flush position failed; it is sent again on reconnect");
            }
        }
        metrics::gauge!("tributary_postgres_flushed_lsn").set(lsn.0 as f64);
        Ok(())
    }

    /// While nothing is in flight, the server's last reported position is safe to confirm:
    /// everything committed up to it has been received and was empty or acknowledged.
    async fn advance_idle(&mut self) -> Result<(), PgSourceError> {
        // Transactions with no events (heartbeats, filtered tables) at the front are done.
        let mut upto = None;
        while let Some(f) = self.in_flight.front() {
            if f.events != Some(0) {
                break;
            }
            upto = Some(f.end_lsn);
            self.in_flight.pop_front();
        }
        if let Some(lsn) = upto {
            self.flush(lsn).await?;
        }
        let idle = self.in_flight.is_empty()
            && self.open_tx.is_none()
            && self.streams.is_empty()
            && self.stream_xid.is_none()
            && self.replaying.is_none()
            // Snapshot rows still on their way would be overtaken by the slot.
            && self.snapshot.is_none()
            && self.snapshot_done.iter().all(|t| t.done);
        if idle {
            if let Some(received) = self.stream.as_ref().filter(|_| self.started).map(|s| s.current_lsn()) {
                self.flush(Lsn(received)).await?;
            }
        }
        Ok(())
    }

    /// Marks tables whose snapshot rows are all acknowledged (`acked`: highest durable ordinal)
    /// as done in the state table.
    async fn settle_snapshot(&mut self, acked: Option<u64>) -> Result<(), PgSourceError> {
        if let Some(a) = acked {
            self.snapshot_acked = self.snapshot_acked.max(Some(a));
        }
        let acked = self.snapshot_acked;
        let tables: &mut Vec<snapshot::SnapTable> = match &mut self.snapshot {
            Some(s) => &mut s.tables,
            None => &mut self.snapshot_done,
        };
        let mut newly_done = Vec::new();
        for t in tables.iter_mut() {
            if t.done {
                continue;
            }
            let Some(last) = t.last_ordinal else { break };
            if t.rows == 0 || acked.is_some_and(|a| a >= last) {
                t.done = true;
                newly_done.push((t.schema.clone(), t.name.clone()));
            } else {
                break;
            }
        }
        for (schema, name) in newly_done {
            self.client
                .execute(
                    &format!(
                        "UPDATE {} SET done = true, done_at = now() WHERE slot = $1 AND schema_name = $2 AND table_name = $3",
                        Self::qualified(&self.state_table)
                    ),
                    &[&self.cfg.slot, &schema, &name],
                )
                .await
                .map_err(db)?;
            tracing::info!(table = %format!("{schema}.{name}"), "snapshot of table durable");
        }
        Ok(())
    }

    /// Re-opens the SQL connection after the server went away (restart, failover), retrying
    /// with backoff until it is back.
    async fn ensure_client(&mut self) -> Result<(), PgSourceError> {
        if !self.client.is_closed() {
            return Ok(());
        }
        use backon::{ExponentialBuilder, Retryable};
        let url = self.cfg.url.expose().to_string();
        self.client = (|| sql_connect(&url))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10))
                    .without_max_times()
                    .with_jitter(),
            )
            .when(|e: &PgSourceError| e.kind() == ErrorKind::Connection || is_refused(e))
            .notify(|e, after| {
                tracing::warn!(error = %e, retry_in = ?after, "PostgreSQL connection failed; retrying");
            })
            .await?;
        Ok(())
    }

    /// Heartbeat writes and slot health, at their configured intervals.
    async fn periodic(&mut self) -> Result<(), PgSourceError> {
        self.ensure_client().await?;
        let now = std::time::Instant::now();
        if let Some(h) = &self.cfg.heartbeat_table {
            if now.duration_since(self.last_heartbeat) >= Duration::from_secs(self.cfg.heartbeat_interval_s)
                && self.in_flight.is_empty()
            {
                self.last_heartbeat = now;
                let t = parse_table_name(h).map_err(PgSourceError::Setup)?;
                let sql = format!(
                    "INSERT INTO {} (id, ts) VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET ts = now()",
                    Self::qualified(&t)
                );
                if let Err(e) = self.client.batch_execute(&sql).await {
                    tracing::warn!(error = %crate::check::pg_error_text(&e), "heartbeat write failed");
                }
            }
        }
        let due = self
            .last_slot_check
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(self.cfg.slot_check_interval_s));
        if due {
            self.last_slot_check = Some(now);
            self.check_slot().await?;
        }
        Ok(())
    }

    /// Slot lag and status as metrics; a warning past the configured lag; the lost-slot policy.
    pub async fn check_slot(&mut self) -> Result<SlotHealth, PgSourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT coalesce((pg_current_wal_lsn() - confirmed_flush_lsn)::int8, 0), wal_status
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            )
            .await
            .map_err(db)?;
        let Some(row) = row else {
            return Err(PgSourceError::Setup(format!(
                "replication slot {:?} was dropped while running; restart to apply \
                 sources.postgres.on_slot_lost ({:?})",
                self.cfg.slot, self.cfg.on_slot_lost
            )));
        };
        let health = SlotHealth {
            lag_bytes: row.get::<_, i64>(0),
            wal_status: row.get::<_, Option<String>>(1).unwrap_or_default(),
        };
        metrics::gauge!("tributary_postgres_slot_lag_bytes", "slot" => self.cfg.slot.clone())
            .set(health.lag_bytes as f64);
        for s in ["reserved", "extended", "unreserved", "lost"] {
            metrics::gauge!("tributary_postgres_slot_wal_status", "slot" => self.cfg.slot.clone(), "status" => s)
                .set(if health.wal_status == s { 1.0 } else { 0.0 });
        }
        if health.wal_status == "lost" {
            return Err(PgSourceError::Setup(format!(
                "replication slot {:?} was invalidated (wal_status = lost); restart to apply \
                 sources.postgres.on_slot_lost ({:?})",
                self.cfg.slot, self.cfg.on_slot_lost
            )));
        }
        if health.lag_bytes > (self.cfg.slot_lag_warn_mb as i64) << 20 {
            tracing::warn!(slot = %self.cfg.slot, lag_bytes = health.lag_bytes, wal_status = %health.wal_status,
                "replication slot retains more WAL than sources.postgres.slot_lag_warn_mb");
        }
        Ok(health)
    }

    /// Closes the replication connection after sending the final flush position.
    pub async fn close(mut self) {
        if let Some(mut s) = self.stream.take() {
            if self.started {
                let _ = s.send_feedback().await;
            }
        }
    }

    async fn ensure_publication(&self, cfg: &PostgresSource) -> Result<(), PgSourceError> {
        let exists = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&self.cfg.publication],
            )
            .await
            .map_err(db)?
            .is_some();
        if exists {
            return Ok(());
        }
        let target = if let Some(schema) = &cfg.schema {
            format!("FOR TABLES IN SCHEMA {}", quote_ident(schema))
        } else if !cfg.tables.is_empty() {
            let names = cfg
                .tables
                .iter()
                .map(|t| {
                    let (s, n) = parse_table_name(t).map_err(PgSourceError::Setup)?;
                    Ok(format!("{}.{}", quote_ident(&s), quote_ident(&n)))
                })
                .collect::<Result<Vec<_>, PgSourceError>>()?;
            format!("FOR TABLE {}", names.join(", "))
        } else {
            return Err(PgSourceError::Setup(format!(
                "publication {:?} does not exist and neither sources.postgres.tables nor \
                 sources.postgres.schema says what to publish",
                self.cfg.publication
            )));
        };
        self.client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} {target}",
                quote_ident(&self.cfg.publication)
            ))
            .await
            .map_err(db)
    }

    async fn check_replica_identity(&self) -> Result<(), PgSourceError> {
        let rows = self
            .client
            .query(
                "SELECT quote_ident(p.schemaname) || '.' || quote_ident(p.tablename)
                 FROM pg_publication_tables p
                 JOIN pg_namespace n ON n.nspname = p.schemaname
                 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
                 WHERE p.pubname = $1 AND c.relreplident <> 'f'
                   AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
                   AND NOT (c.relreplident = 'i' AND EXISTS
                        (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident))
                 ORDER BY 1",
                &[&self.cfg.publication],
            )
            .await
            .map_err(db)?;
        if rows.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        Err(PgSourceError::Setup(format!(
            "published tables without a primary key cannot be replicated: {}; add a primary key \
             or run ALTER TABLE … REPLICA IDENTITY FULL",
            names.join(", ")
        )))
    }

    fn to_events(&self, msg: Message) -> Result<Vec<ChangeEvent>, PgSourceError> {
        let (rel_ids, op, old, new) = match msg {
            Message::Insert { rel, new } => (vec![rel], Op::Insert, None, Some(new)),
            Message::Update { rel, old, new } => (vec![rel], Op::Update, old, Some(new)),
            Message::Delete { rel, old } => (vec![rel], Op::Delete, Some(old), None),
            Message::Truncate { rels } => (rels, Op::Truncate, None, None),
            _ => return Ok(Vec::new()),
        };
        rel_ids
            .into_iter()
            .map(|id| {
                let rel = self.relations.get(&id).ok_or_else(|| {
                    PgSourceError::Setup(format!("change for unknown relation {id}"))
                })?;
                let before = old.as_ref().map(|t| self.row(rel, t));
                let after = new.as_ref().map(|t| self.row(rel, t));
                let key = match (&after, &before) {
                    _ if op == Op::Truncate => Row::new(),
                    (_, Some(b)) if op == Op::Delete => self.key_of(rel, b),
                    (Some(a), _) => self.key_of(rel, a),
                    _ => Row::new(),
                };
                // The server sends an old tuple only when it matters: the old key when the key
                // changed (or on delete), the whole old row under REPLICA IDENTITY FULL.
                Ok(ChangeEvent {
                    source: format!("{}.{}", rel.schema, rel.name),
                    op,
                    key,
                    before,
                    after,
                    schema_version: self.schema_versions.get(&id).copied().unwrap_or(1),
                    position: Position::Lsn {
                        commit_lsn: Lsn(0),
                        tx_ordinal: 0,
                    },
                    source_ts: None::<DateTime<Utc>>,
                    embedding: None,
                    text_hash: None,
                })
            })
            .collect()
    }

    /// A tuple as a row; `Null` columns of a key-only old tuple are left out.
    fn row(&self, rel: &Relation, tuple: &[TupleValue]) -> Row {
        let mut row = Row::new();
        let key_only = tuple.len() == rel.columns.len()
            && rel
                .columns
                .iter()
                .zip(tuple)
                .all(|(c, v)| c.is_key || *v == TupleValue::Null);
        for (col, v) in rel.columns.iter().zip(tuple) {
            let value = match v {
                TupleValue::Null if key_only && !col.is_key => continue,
                TupleValue::Null => crate::event::Value::Null,
                TupleValue::UnchangedToast => crate::event::Value::UnchangedToast,
                TupleValue::Text(s) => decode::convert(col.type_oid, s, &self.type_names),
            };
            row.push(col.name.clone(), value);
        }
        row
    }

    fn key_of(&self, rel: &Relation, row: &Row) -> Row {
        let mut key = Row::new();
        for c in rel.columns.iter().filter(|c| c.is_key) {
            if let Some(v) = row.get(&c.name) {
                key.push(c.name.clone(), v.clone());
            }
        }
        key
    }

}
