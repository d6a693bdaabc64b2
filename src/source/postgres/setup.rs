//! Start-up and upkeep of what the source reads through: the publication (created when missing,
//! identifiers quoted), replica identities, the heartbeat and snapshot-state tables, the slot
//! (created with an exported snapshot, or checked, with the lost-slot policy), snapshot planning
//! and per-table completion, and the slot's health (lag, `wal_status`) sampled for metrics.

use std::time::Duration;

use pg_walstream::{
    LogicalReplicationStream, ReplicationSlotOptions, ReplicationStreamConfig, RetryConfig,
    StreamingMode,
};

use super::snapshot::{self, Snapshot};
use super::{
    PgSourceError, PostgresSourceReader, SlotHealth, db, repl, replication_url, source_name,
};
use crate::config::{PostgresSourceConfig, SlotLostPolicy, SnapshotMode, parse_table_name};
use crate::event::Lsn;
use crate::pg::{error_text, quote_ident, quote_qualified};
use crate::sink::durable::Durable;

/// What earlier attempts left of the tables about to be read, and the next free chunk number.
#[derive(Debug, Default)]
pub(super) struct Resumes {
    tables: std::collections::HashMap<(String, String), snapshot::Resume>,
    next_chunk: u64,
}

impl Resumes {
    /// Table `t` continues by key from an earlier attempt (its chunks all have key bounds).
    fn by_key(&self, t: &(String, String)) -> bool {
        self.tables
            .get(t)
            .is_some_and(|r| !r.chunks.is_empty() && r.chunks.iter().all(|c| c.1.is_some()))
    }
}

impl PostgresSourceReader {
    pub(super) fn qualified(t: &(String, String)) -> String {
        quote_qualified(&t.0, &t.1)
    }

    pub(super) async fn ensure_state_table(&self) -> Result<(), PgSourceError> {
        self.client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {0} (
                    slot text NOT NULL, schema_name text NOT NULL, table_name text NOT NULL,
                    snapshot_lsn pg_lsn NOT NULL, epoch int8 NOT NULL, done bool NOT NULL,
                    done_at timestamptz, PRIMARY KEY (slot, schema_name, table_name));
                 ALTER TABLE {0} ADD COLUMN IF NOT EXISTS last_major int8,
                                 ADD COLUMN IF NOT EXISTS last_minor int8;
                 CREATE TABLE IF NOT EXISTS {1} (
                    slot text NOT NULL, schema_name text NOT NULL, table_name text NOT NULL,
                    chunk int8 NOT NULL, upper_key text[],
                    PRIMARY KEY (slot, schema_name, table_name, chunk));
                 ALTER TABLE {1} ADD COLUMN IF NOT EXISTS rows int8,
                                 ADD COLUMN IF NOT EXISTS recorded_at timestamptz DEFAULT now()",
                Self::qualified(&self.state_table),
                Self::qualified(&self.chunk_table)
            ))
            .await
            .map_err(|e| {
                PgSourceError::Setup(format!(
                    "creating the snapshot state table {} (sources.postgres.state_table): {}",
                    self.cfg.state_table,
                    error_text(&e)
                ))
            })?;
        super::incremental::ensure_requests_table(&self.client, self.on_demand.requests_table())
            .await
            .map_err(|e| {
                PgSourceError::Setup(format!(
                    "creating the on-demand snapshot requests table {}: {}",
                    source_name(self.on_demand.requests_table()),
                    error_text(&e)
                ))
            })
    }

    pub(super) async fn ensure_heartbeat_table(&self) -> Result<(), PgSourceError> {
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
                tracing::warn!(error = %error_text(&e), table = %h,
                    "could not add the heartbeat table to the publication; the slot advances on keepalives only");
            }
        }
        Ok(())
    }

    /// Published tables (minus our own), sorted.
    pub(super) async fn published_tables(&self) -> Result<Vec<(String, String)>, PgSourceError> {
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
            .filter(|t| !self.internal.contains(&source_name(t)))
            .collect())
    }

    /// `(plugin, wal_status, confirmed_flush)` of the slot, if it exists.
    pub(super) async fn slot_row(
        &self,
    ) -> Result<Option<(Option<String>, Option<String>, Lsn)>, PgSourceError> {
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

    pub(super) fn stream_config(
        &self,
        slot: &str,
        snapshot: &str,
        temporary: bool,
    ) -> ReplicationStreamConfig {
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
        // Logical messages carry the on-demand snapshots' watermarks (PostgreSQL 14 on).
        .with_messages(self.streaming_protocol)
        .with_slot_options(ReplicationSlotOptions {
            temporary,
            snapshot: Some(snapshot.to_string()),
            ..Default::default()
        })
    }

    /// Creates (or checks) the slot, applies the lost-slot policy, and plans the snapshot.
    ///
    /// A table whose snapshot is not marked done but was read completely, and whose last row
    /// every sink already holds (`durable`), only lost its acknowledgement to a crash: it is
    /// marked done, not read again (a new snapshot would put its rows in Bronze a second time).
    pub(super) async fn prepare_slot_and_snapshot(
        &mut self,
        durable: &Durable,
    ) -> Result<(), PgSourceError> {
        let state_rows = self
            .client
            .query(
                &format!(
                    "SELECT schema_name, table_name, (snapshot_lsn - '0/0')::int8, epoch, done,
                            last_major, last_minor FROM {} WHERE slot = $1 ORDER BY 2, 3",
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
            // Snapshot state without a slot: someone dropped it (unless the state is only the
            // plan an attempt recorded before its slot was created, LSN 0/0: that attempt died
            // creating it, and this one starts over).
            None => state_rows
                .iter()
                .any(|r| r.try_get::<_, i64>(2).is_ok_and(|lsn| lsn != 0)),
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
                        if slot_exists {
                            "invalidated (wal_status = lost)"
                        } else {
                            "dropped"
                        },
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
        let incremental = self.cfg.snapshot == SnapshotMode::Incremental;
        if incremental {
            self.check_incremental().await?;
        }
        if !slot_exists {
            for t in [&self.state_table, &self.chunk_table] {
                self.client
                    .execute(
                        &format!("DELETE FROM {} WHERE slot = $1", Self::qualified(t)),
                        &[&self.cfg.slot],
                    )
                    .await
                    .map_err(db)?;
            }
            // The plan goes first (at LSN 0/0): a crash between the slot's creation and the
            // plan's LSN leaves a slot whose tables the next start reads from a new snapshot,
            // not a slot without any snapshot.
            let tables = if want_snapshot || incremental {
                let tables = self.published_tables().await?;
                self.record_snapshot_plan(&tables, Lsn(0), 1).await?;
                tables
            } else {
                Vec::new()
            };
            let mode = if want_snapshot { "export" } else { "nothing" };
            let mut stream = LogicalReplicationStream::new(
                &replication_url(&self.cfg.url)?,
                self.stream_config(&self.cfg.slot, mode, false),
            )
            .await
            .map_err(repl)?;
            stream.ensure_replication_slot().await.map_err(repl)?;
            let (_, _, consistent) = self.slot_row().await?.ok_or_else(|| {
                PgSourceError::Setup(format!(
                    "slot {:?} vanished right after creation",
                    self.cfg.slot
                ))
            })?;
            if want_snapshot {
                let name = stream
                    .exported_snapshot_name()
                    .map(str::to_string)
                    .ok_or_else(|| {
                        PgSourceError::Setup("the new slot exported no snapshot".into())
                    })?;
                fail::fail_point!("postgres::slot-created-before-plan", |_| {
                    std::process::abort()
                });
                self.record_snapshot_plan(&tables, consistent, 1).await?;
                self.open_snapshot_at(&name, tables, consistent, consistent, Resumes::default())
                    .await?;
                // Every snapshot connection imported the exported snapshot, which stays valid in
                // their transactions: the replication connection closes, so the server sees
                // `snapshot_workers` + 1 connections while the snapshot is read; the stream
                // connects anew once it is.
                drop(stream);
            } else {
                if incremental {
                    self.plan_incremental(&tables, consistent).await?;
                }
                // Kept: it becomes the stream.
                self.stream = Some(stream);
            }
            return Ok(());
        }
        // Existing slot: resume an interrupted snapshot, if any.
        let mut epoch = 0u64;
        let mut pending = Vec::new();
        let mut planned = std::collections::HashSet::new();
        for r in &state_rows {
            // The state table is ours, but anyone may edit it: a NULL is an error, not a panic.
            let t: (String, String) = (r.try_get(0).map_err(db)?, r.try_get(1).map_err(db)?);
            let lsn = Lsn(r.try_get::<_, i64>(2).map_err(db)? as u64);
            epoch = epoch.max(r.try_get::<_, i64>(3).map_err(db)? as u64);
            planned.insert(t.clone());
            let last = match (
                r.try_get::<_, Option<i64>>(5).map_err(db)?,
                r.try_get::<_, Option<i64>>(6).map_err(db)?,
            ) {
                (Some(major), Some(minor)) => {
                    Some(super::position(Lsn(major as u64), minor as u64))
                }
                _ => None,
            };
            let done = r.try_get::<_, bool>(4).map_err(db)?
                || match last {
                    Some(last) => self.durable_everywhere(durable, &t, &last).await?,
                    None => false,
                };
            if done {
                self.snapshot_lsn.insert(source_name(&t), lsn);
            } else {
                pending.push(t);
            }
        }
        // A table added to the publication since the slot's initial snapshot: its existing rows
        // are read like an interrupted table's, from a fresh snapshot whose LSN filters its
        // stream (a slot created without a snapshot keeps `never` for tables added later too).
        if (want_snapshot || incremental) && !state_rows.is_empty() {
            let added: Vec<(String, String)> = self
                .published_tables()
                .await?
                .into_iter()
                .filter(|t| !planned.contains(t))
                .collect();
            if !added.is_empty() {
                tracing::info!(tables = ?added.iter().map(source_name).collect::<Vec<_>>(), "tables new to the publication: taking their snapshot");
                pending.extend(added);
            }
        }
        if incremental && !pending.is_empty() {
            // Planned but not handed to the on-demand reader yet (a crash came in between), or
            // new to the publication: read while streaming, like the rest.
            let confirmed = slot.map(|s| s.2).unwrap_or(Lsn(0));
            return self.plan_incremental(&pending, confirmed).await;
        }
        if !pending.is_empty() {
            let confirmed = slot.map(|s| s.2).unwrap_or(Lsn(0));
            let temp_slot = format!("{}_snap_{}", self.cfg.slot, std::process::id());
            let mut temp = LogicalReplicationStream::new(
                &replication_url(&self.cfg.url)?,
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
            let name = temp
                .exported_snapshot_name()
                .map(str::to_string)
                .ok_or_else(|| {
                    PgSourceError::Setup("the temporary slot exported no snapshot".into())
                })?;
            tracing::info!(
                tables = pending.len(),
                "snapshot of tables not (completely) read yet"
            );
            let resumes = self.resumes(durable, &pending, confirmed).await?;
            // A table resumed by key keeps the first snapshot's LSN: every change since is streamed.
            let (by_key, fresh): (Vec<_>, Vec<_>) =
                pending.iter().cloned().partition(|t| resumes.by_key(t));
            self.record_snapshot_plan(&fresh, Lsn(at as u64), epoch + 1)
                .await?;
            self.record_snapshot_plan(&by_key, confirmed, epoch + 1)
                .await?;
            self.open_snapshot_at(&name, pending, confirmed, Lsn(at as u64), resumes)
                .await?;
            drop(temp);
        }
        Ok(())
    }

    /// `snapshot = "incremental"`: the `tables` are noted done in the state table at `lsn` (no
    /// exported snapshot to read; their stream starts there) and requested from the on-demand
    /// reader, in one transaction, so a crash leaves either the plan to do again or both.
    async fn plan_incremental(
        &mut self,
        tables: &[(String, String)],
        lsn: Lsn,
    ) -> Result<(), PgSourceError> {
        self.client.batch_execute("BEGIN").await.map_err(db)?;
        let planned = async {
            self.record_snapshot_plan(tables, lsn, 1).await?;
            for t in tables {
                self.client
                    .execute(
                        &format!(
                            "UPDATE {} SET done = true, done_at = now()
                             WHERE slot = $1 AND schema_name = $2 AND table_name = $3",
                            Self::qualified(&self.state_table)
                        ),
                        &[&self.cfg.slot, &t.0, &t.1],
                    )
                    .await
                    .map_err(db)?;
                super::incremental::enqueue(
                    &self.client,
                    self.on_demand.requests_table(),
                    &self.cfg.slot,
                    t,
                )
                .await?;
            }
            self.client.batch_execute("COMMIT").await.map_err(db)
        }
        .await;
        if planned.is_err() {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        planned?;
        for t in tables {
            self.snapshot_lsn.insert(source_name(t), lsn);
        }
        tracing::info!(
            tables = tables.len(),
            "incremental snapshot planned: tables are read in chunks while streaming"
        );
        Ok(())
    }

    /// `snapshot = "incremental"` reads key ranges and logical messages: every published table
    /// needs a primary key, the server PostgreSQL 14.
    async fn check_incremental(&self) -> Result<(), PgSourceError> {
        if !self.streaming_protocol {
            return Err(PgSourceError::Setup(
                "sources.postgres.snapshot = \"incremental\" needs PostgreSQL 14 or later \
                 (logical messages in pgoutput); use \"initial\""
                    .into(),
            ));
        }
        let rows = self
            .client
            .query(
                "SELECT quote_ident(p.schemaname) || '.' || quote_ident(p.tablename)
                 FROM pg_publication_tables p
                 WHERE p.pubname = $1 AND NOT EXISTS (
                    SELECT 1 FROM pg_index i
                    WHERE i.indrelid = (quote_ident(p.schemaname) || '.' || quote_ident(p.tablename))::regclass
                      AND i.indisprimary)
                 ORDER BY 1",
                &[&self.cfg.publication],
            )
            .await
            .map_err(db)?;
        let keyless: Vec<String> = rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|t| {
                parse_table_name(t).is_ok_and(|n| !self.internal.contains(&source_name(&n)))
            })
            .collect();
        if keyless.is_empty() {
            return Ok(());
        }
        Err(PgSourceError::Setup(format!(
            "sources.postgres.snapshot = \"incremental\" reads tables in primary-key ranges, and \
             these have no primary key: {}; add one or use snapshot = \"initial\"",
            keyless.join(", ")
        )))
    }

    /// Whether every sink holds table `t`'s snapshot up to its `last` row; if so, it is marked
    /// done in the state table.
    async fn durable_everywhere(
        &self,
        durable: &Durable,
        t: &(String, String),
        last: &crate::event::Position,
    ) -> Result<bool, PgSourceError> {
        let held = durable
            .everywhere(&source_name(t), &super::stream())
            .await?;
        if !held.is_some_and(|h| h >= *last) {
            return Ok(false);
        }
        self.mark_done(&t.0, &t.1).await?;
        tracing::info!(table = %source_name(t), "snapshot of table already durable in every sink (its acknowledgement was lost): not taken again");
        Ok(true)
    }

    async fn mark_done(&self, schema: &str, name: &str) -> Result<(), PgSourceError> {
        self.client.batch_execute("BEGIN").await.map_err(db)?;
        let done = async {
            self.client
                .execute(
                    &format!(
                        "UPDATE {} SET done = true, done_at = now() WHERE slot = $1 AND schema_name = $2 AND table_name = $3",
                        Self::qualified(&self.state_table)
                    ),
                    &[&self.cfg.slot, &schema, &name],
                )
                .await?;
            self.client
                .execute(
                    &format!(
                        "DELETE FROM {} WHERE slot = $1 AND schema_name = $2 AND table_name = $3",
                        Self::qualified(&self.chunk_table)
                    ),
                    &[&self.cfg.slot, &schema, &name],
                )
                .await?;
            self.client.batch_execute("COMMIT").await
        }
        .await;
        if done.is_err() {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        done.map_err(db)
    }

    /// Records a snapshot chunk before its rows are handed out (see [`snapshot`]).
    pub(super) async fn record_chunk(
        &self,
        r: &snapshot::ChunkRecord,
    ) -> Result<(), PgSourceError> {
        self.client
            .execute(
                &format!(
                    "INSERT INTO {} (slot, schema_name, table_name, chunk, upper_key, rows)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (slot, schema_name, table_name, chunk)
                     DO UPDATE SET upper_key = excluded.upper_key, rows = excluded.rows",
                    Self::qualified(&self.chunk_table)
                ),
                &[
                    &self.cfg.slot,
                    &r.schema,
                    &r.name,
                    &(r.chunk as i64),
                    &r.upper,
                    &(r.rows as i64),
                ],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    /// What earlier attempts recorded of the `pending` tables' chunks, each chunk with whether
    /// every sink (`durable`) holds it; snapshot positions sort just below `slot_start`.
    async fn resumes(
        &self,
        durable: &Durable,
        pending: &[(String, String)],
        slot_start: Lsn,
    ) -> Result<Resumes, PgSourceError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT schema_name, table_name, chunk, upper_key FROM {} WHERE slot = $1
                     ORDER BY 2, 3, chunk",
                    Self::qualified(&self.chunk_table)
                ),
                &[&self.cfg.slot],
            )
            .await
            .map_err(db)?;
        let base = Lsn(slot_start.0.saturating_sub(1));
        let mut out = Resumes::default();
        for r in &rows {
            let chunk = r.try_get::<_, i64>(2).map_err(db)?;
            out.next_chunk = out.next_chunk.max(chunk as u64 + 1);
            let t: (String, String) = (r.try_get(0).map_err(db)?, r.try_get(1).map_err(db)?);
            if !pending.contains(&t) {
                continue;
            }
            let upper: Option<Vec<String>> = r.try_get(3).map_err(db)?;
            out.tables
                .entry(t)
                .or_default()
                .chunks
                .push((chunk as u64, upper, false));
        }
        for (t, resume) in out.tables.iter_mut() {
            let held = durable
                .everywhere(&source_name(t), &super::stream())
                .await?;
            for (chunk, _, everywhere) in resume.chunks.iter_mut() {
                let end = super::position(base, snapshot::chunk_end(*chunk));
                *everywhere = held.as_ref().is_some_and(|h| *h >= end);
            }
            let again = resume.chunks.iter().filter(|c| !c.2).count();
            tracing::info!(table = %source_name(t), chunks = resume.chunks.len(), read_again = again,
                "resuming an interrupted snapshot");
        }
        Ok(out)
    }

    /// Records the position of each completely read table's last row, so a restart can ask the
    /// sinks whether they hold it (see [`Self::prepare_slot_and_snapshot`]).
    pub(super) async fn record_read_tables(&mut self) -> Result<(), PgSourceError> {
        let Some(snap) = &mut self.snapshot else {
            return Ok(());
        };
        let base = snap.base;
        let mut read = Vec::new();
        for t in snap.tables.iter_mut().filter(|t| !t.recorded) {
            let Some(last) = t.last_ordinal else { break };
            t.recorded = true;
            if t.rows > 0 {
                read.push((t.schema.clone(), t.name.clone(), last));
            }
        }
        for (schema, name, last) in read {
            self.client
                .execute(
                    &format!(
                        "UPDATE {} SET last_major = $4, last_minor = $5
                         WHERE slot = $1 AND schema_name = $2 AND table_name = $3",
                        Self::qualified(&self.state_table)
                    ),
                    &[
                        &self.cfg.slot,
                        &schema,
                        &name,
                        &(base.0 as i64),
                        &(last as i64),
                    ],
                )
                .await
                .map_err(db)?;
        }
        Ok(())
    }

    pub(super) async fn record_snapshot_plan(
        &self,
        tables: &[(String, String)],
        lsn: Lsn,
        epoch: u64,
    ) -> Result<(), PgSourceError> {
        let sql = format!(
            "INSERT INTO {} (slot, schema_name, table_name, snapshot_lsn, epoch, done)
             VALUES ($1, $2, $3, $4::text::pg_lsn, $5, false)
             ON CONFLICT (slot, schema_name, table_name)
             DO UPDATE SET snapshot_lsn = excluded.snapshot_lsn, epoch = excluded.epoch, done = false,
                           last_major = NULL, last_minor = NULL",
            Self::qualified(&self.state_table)
        );
        for t in tables {
            self.client
                .execute(
                    &sql,
                    &[
                        &self.cfg.slot,
                        &t.0,
                        &t.1,
                        &lsn.to_string(),
                        &(epoch as i64),
                    ],
                )
                .await
                .map_err(db)?;
        }
        Ok(())
    }

    /// `slot_start`: where the slot's stream begins (snapshot positions sort just below it);
    /// `at`: the LSN the snapshot is consistent at (changes of these tables committed before it
    /// are skipped).
    pub(super) async fn open_snapshot_at(
        &mut self,
        name: &str,
        tables: Vec<(String, String)>,
        slot_start: Lsn,
        at: Lsn,
        resumes: Resumes,
    ) -> Result<(), PgSourceError> {
        for t in &tables {
            if resumes.by_key(t) {
                self.snapshot_lsn.remove(&source_name(t));
            } else {
                self.snapshot_lsn.insert(source_name(t), at);
            }
        }
        let snap = Snapshot::open(
            &self.cfg.url,
            name,
            tables,
            &resumes.tables,
            Lsn(slot_start.0.saturating_sub(1)),
            resumes.next_chunk,
            self.cfg.snapshot_chunk_rows,
            self.cfg.snapshot_workers,
        )
        .await?;
        self.snapshot = Some(snap);
        Ok(())
    }

    /// Marks tables whose snapshot rows are all acknowledged (`acked`: highest durable ordinal)
    /// as done in the state table.
    pub(super) async fn settle_snapshot(
        &mut self,
        acked: Option<u64>,
    ) -> Result<(), PgSourceError> {
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
            // Crash point for the tests: every sink holds the table, the source has not noted it.
            fail::fail_point!("postgres::before-snapshot-done", |_| std::process::abort());
            self.mark_done(&schema, &name).await?;
            tracing::info!(table = %format!("{schema}.{name}"), "snapshot of table durable");
        }
        Ok(())
    }

    /// Heartbeat writes and slot health, at their configured intervals.
    pub(super) async fn periodic(&mut self) -> Result<(), PgSourceError> {
        self.ensure_client().await?;
        let now = std::time::Instant::now();
        if let Some(h) = &self.cfg.heartbeat_table
            && now.duration_since(self.last_heartbeat)
                >= Duration::from_secs(self.cfg.heartbeat_interval_s)
            && self.in_flight.is_empty()
        {
            self.last_heartbeat = now;
            let t = parse_table_name(h).map_err(PgSourceError::Setup)?;
            let sql = format!(
                "INSERT INTO {} (id, ts) VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET ts = now()",
                Self::qualified(&t)
            );
            if let Err(e) = self.client.batch_execute(&sql).await {
                tracing::warn!(error = %error_text(&e), "heartbeat write failed");
            }
        }
        let due = self.last_slot_check.is_none_or(|t| {
            now.duration_since(t) >= Duration::from_secs(self.cfg.slot_check_interval_s)
        });
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

    pub(super) async fn ensure_publication(
        &self,
        cfg: &PostgresSourceConfig,
    ) -> Result<(), PgSourceError> {
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
            return self.add_configured_tables(cfg).await;
        }
        let target = if let Some(schema) = &cfg.schema {
            format!("FOR TABLES IN SCHEMA {}", quote_ident(schema))
        } else if !cfg.tables.is_empty() {
            let names = cfg
                .tables
                .iter()
                .map(|t| {
                    let (s, n) = parse_table_name(t).map_err(PgSourceError::Setup)?;
                    Ok(quote_qualified(&s, &n))
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

    /// Adds the configured tables an existing publication lacks (a table added to
    /// `sources.postgres.tables` after the first run); a publication for all tables or for a
    /// schema is left as it is.
    async fn add_configured_tables(&self, cfg: &PostgresSourceConfig) -> Result<(), PgSourceError> {
        if cfg.tables.is_empty() || cfg.schema.is_some() {
            return Ok(());
        }
        let for_all: bool = self
            .client
            .query_one(
                "SELECT puballtables FROM pg_publication WHERE pubname = $1",
                &[&self.cfg.publication],
            )
            .await
            .map_err(db)?
            .get(0);
        if for_all {
            return Ok(());
        }
        let published = self.published_tables().await?;
        for t in &cfg.tables {
            let (schema, name) = parse_table_name(t).map_err(PgSourceError::Setup)?;
            if published.contains(&(schema.clone(), name.clone())) {
                continue;
            }
            self.client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(&self.cfg.publication),
                    quote_qualified(&schema, &name)
                ))
                .await
                .map_err(|e| {
                    PgSourceError::Setup(format!(
                        "sources.postgres.tables: {t} is not in publication {:?} and adding it \
                         failed ({}); add it yourself (ALTER PUBLICATION … ADD TABLE) or remove it \
                         from the list",
                        self.cfg.publication,
                        e.as_db_error()
                            .map_or_else(|| e.to_string(), |d| d.message().to_owned())
                    ))
                })?;
            tracing::info!(table = %t, publication = %self.cfg.publication, "table added to the publication");
        }
        Ok(())
    }

    pub(super) async fn check_replica_identity(&self) -> Result<(), PgSourceError> {
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
}
