//! The replication stream: (re)connecting with backoff, buffering each transaction's pgoutput
//! messages until its commit (streamed v2 chunks per xid, spilled past the bound), handing its
//! changes out as positioned events, and moving the slot's flush position only over what the
//! pipeline acknowledged (or, while nothing is in flight, to the server's reported position).

use chrono::{DateTime, Utc};
use pg_walstream::{LogicalReplicationStream, ReplicationError};

use super::decode::{self, Message, Relation, TupleValue};
use super::incremental::{self, Action};
use super::txbuf::TxBuffer;
use super::{
    InFlight, PgSourceError, PostgresSourceReader, Replaying, is_permanent_start_error, is_refused,
    repl, replication_url, sql_connect,
};
use crate::dead_letter::DeadLetter;
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Lsn, Op, Position, Row};
use crate::retry::{Patience, backoff};

impl PostgresSourceReader {
    /// Starts (or restarts, after a lost connection) streaming from the slot's confirmed
    /// position, retrying with exponential backoff.
    pub(super) async fn ensure_stream(&mut self) -> Result<(), PgSourceError> {
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
        use backon::Retryable;
        let url = replication_url(&self.cfg.url)?;
        let config = self.stream_config(&self.cfg.slot, "nothing", false);
        // The first attempt starts the connection that created the slot, if there is one.
        let mut existing = self.stream.take();
        let start = || {
            let url = url.clone();
            let config = config.clone();
            let reuse = existing.take();
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
            .retry(backoff(Patience::Unbounded))
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

    /// One pgoutput message off the wire.
    pub(super) fn handle(&mut self, data: &[u8]) -> Result<(), PgSourceError> {
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
                    && let Some(buf) = self.open_tx.take()
                {
                    self.commit(buf, commit_lsn, end_lsn, commit_ts)?;
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
                        tracing::info!(
                            xid,
                            messages = buf.messages(),
                            spilled_bytes = buf.spilled_bytes(),
                            "large streamed transaction committed"
                        );
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

    pub(super) fn apply_meta(&mut self, msg: Message) {
        match msg {
            Message::Relation(rel) => {
                let changed = self.relations.get(&rel.id) != Some(&rel);
                if changed {
                    *self.schema_versions.entry(rel.id).or_insert(0) += 1;
                    let schema = decode::row_schema(
                        rel.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
                        &self.type_names,
                    );
                    self.row_schemas.insert(rel.id, std::sync::Arc::new(schema));
                }
                self.relations.insert(rel.id, rel);
            }
            Message::Type { oid, name } => {
                self.type_names.insert(oid, name);
            }
            _ => {}
        }
    }

    pub(super) fn commit(
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
            last_event: None,
        });
        Ok(())
    }

    /// Hands out the committed transaction's changes, up to `max` events in `out`. A change with a
    /// value that cannot be decoded takes its position like any other and becomes a dead letter
    /// (kept in `pending_letters` until [`Self::write_dead_letters`]) instead of an event.
    pub(super) fn drain_replay(
        &mut self,
        out: &mut Vec<ChangeEvent>,
        max: usize,
    ) -> Result<(), PgSourceError> {
        let mut buf = std::mem::take(&mut self.msg_buf);
        while out.len() < max {
            let r = self.replaying.as_mut().expect("replaying");
            if !r.replay.next_into(&mut buf)? {
                let done = self.replaying.take().expect("replaying");
                if let Some(f) = self
                    .in_flight
                    .iter_mut()
                    .rev()
                    .find(|f| f.commit_lsn == done.commit_lsn)
                {
                    // Acknowledging the last event acknowledges the transaction: the dead letters
                    // after it are durable before anything can be acknowledged.
                    f.events = Some(done.last_event.map_or(0, |o| o + 1));
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
                Message::Logical {
                    transactional: true,
                    prefix,
                    content,
                } if prefix == incremental::PREFIX => match self.on_demand.on_message(&content) {
                    Action::None => {}
                    Action::Emit => {
                        let end_lsn = self.end_lsn_of(commit_lsn);
                        let chunk = self.on_demand.emit(commit_lsn, end_lsn)?;
                        self.hand_out_chunk(chunk, commit_ts, out);
                    }
                    action => {
                        // Needs the database: done by the poll before the replay goes on.
                        self.work = Some(action);
                        break;
                    }
                },
                Message::Insert { .. }
                | Message::Update { .. }
                | Message::Delete { .. }
                | Message::Truncate { .. } => {
                    for change in self.to_events(msg)? {
                        let source = match &change {
                            Ok(ev) => &ev.source,
                            Err(rejected) => &rejected.source,
                        };
                        if self.internal.contains(source)
                            || self
                                .snapshot_lsn
                                .get(source)
                                .is_some_and(|at| commit_lsn < *at)
                        {
                            continue;
                        }
                        let r = self.replaying.as_mut().expect("replaying");
                        let position = super::position(commit_lsn, r.ordinal);
                        match change {
                            Ok(mut ev) => {
                                r.last_event = Some(r.ordinal);
                                ev.position = position;
                                ev.source_ts = Some(commit_ts);
                                self.on_demand.saw(&ev);
                                out.push(ev);
                            }
                            Err(rejected) => {
                                self.pending_letters.push(rejected.into_letter(position))
                            }
                        }
                        r.ordinal += 1;
                    }
                }
                _ => {}
            }
        }
        self.msg_buf = buf;
        Ok(())
    }

    /// The end LSN of the transaction committed at `commit_lsn` (being handed out).
    fn end_lsn_of(&self, commit_lsn: Lsn) -> Lsn {
        self.in_flight
            .iter()
            .rev()
            .find(|f| f.commit_lsn == commit_lsn)
            .map_or(commit_lsn, |f| f.end_lsn)
    }

    /// Hands out an on-demand snapshot chunk as the changes of the transaction being replayed
    /// (its high watermark's): its last event ends the transaction's ordinals.
    fn hand_out_chunk(
        &mut self,
        chunk: incremental::Handout,
        commit_ts: DateTime<Utc>,
        out: &mut Vec<ChangeEvent>,
    ) {
        let r = self.replaying.as_mut().expect("replaying");
        if let Some(last) = chunk.events.last() {
            let end = last.position.minor as u64;
            r.last_event = Some(end);
            r.ordinal = end + 1;
        }
        self.pending_letters.extend(chunk.letters);
        out.extend(chunk.events.into_iter().map(|mut ev| {
            ev.source_ts = Some(commit_ts);
            ev
        }));
    }

    /// Does what a watermark asked for (see [`incremental`]).
    pub(super) async fn on_watermark(
        &mut self,
        action: Action,
        out: &mut Vec<ChangeEvent>,
    ) -> Result<(), PgSourceError> {
        let result = match action {
            Action::Select => self.on_demand.select(&self.client).await,
            Action::Redo {
                lower, upper, last, ..
            } => {
                let Some((commit_lsn, commit_ts)) =
                    self.replaying.as_ref().map(|r| (r.commit_lsn, r.commit_ts))
                else {
                    return Ok(());
                };
                let end_lsn = self.end_lsn_of(commit_lsn);
                match self
                    .on_demand
                    .redo(&self.client, lower, upper, last, commit_lsn, end_lsn)
                    .await
                {
                    Ok(chunk) => {
                        self.hand_out_chunk(chunk, commit_ts, out);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Action::None | Action::Emit => Ok(()),
        };
        match result {
            // The table cannot be read as asked (no key any more, dropped, renamed): the request
            // ends with the error, the stream goes on.
            Err(PgSourceError::Setup(e)) => self.on_demand.fail(&self.client, &e).await,
            Err(PgSourceError::Connection(e)) if e.as_db_error().is_some() => {
                let text = crate::pg::error_text(&e);
                self.on_demand.fail(&self.client, &text).await
            }
            other => other,
        }
    }

    /// Tells the source that everything up to `pos` is durable in every sink. For streamed
    /// changes the slot's flush position moves to the end of the last transaction wholly
    /// acknowledged; for snapshot rows, finished tables are recorded as done.
    pub async fn ack(&mut self, pos: &Position) -> Result<(), PgSourceError> {
        let Some((commit_lsn, tx_ordinal)) = super::lsn_of(pos) else {
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
                Some(n) => {
                    f.commit_lsn < commit_lsn || (f.commit_lsn == commit_lsn && tx_ordinal + 1 >= n)
                }
                None => false,
            };
            if !whole && f.events != Some(0) {
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

    pub(super) fn snapshot_base(&self) -> Option<Lsn> {
        self.snapshot
            .as_ref()
            .map(|s| s.base)
            .or(self.snapshot_base_done)
    }

    /// Reports `lsn` as flushed to the server.
    pub(super) async fn flush(&mut self, lsn: Lsn) -> Result<(), PgSourceError> {
        if lsn <= self.flushed {
            return Ok(());
        }
        // On-demand snapshot chunks up to here are durable: recorded before the slot passes them.
        self.on_demand.record(&self.client, lsn).await?;
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
    pub(super) async fn advance_idle(&mut self) -> Result<(), PgSourceError> {
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
        if idle
            && let Some(received) = self
                .stream
                .as_ref()
                .filter(|_| self.started)
                .map(|s| s.current_lsn())
        {
            self.flush(Lsn(received)).await?;
        }
        Ok(())
    }

    /// Re-opens the SQL connection after the server went away (restart, failover), retrying
    /// with backoff until it is back.
    pub(super) async fn ensure_client(&mut self) -> Result<(), PgSourceError> {
        if !self.client.is_closed() {
            return Ok(());
        }
        use backon::Retryable;
        let url = self.cfg.url.clone();
        self.client = (|| sql_connect(&url))
            .retry(backoff(Patience::Unbounded))
            .when(|e: &PgSourceError| e.kind() == ErrorKind::Connection || is_refused(e))
            .notify(|e, after| {
                tracing::warn!(error = %e, retry_in = ?after, "PostgreSQL connection failed; retrying");
            })
            .await?;
        Ok(())
    }

    /// A change message as events, one per relation; a change with a value that cannot be decoded
    /// comes back as [`Rejected`]. A relation never announced means the stream is broken: an error.
    pub(super) fn to_events(
        &self,
        msg: Message,
    ) -> Result<Vec<Result<ChangeEvent, Rejected>>, PgSourceError> {
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
                let source = format!("{}.{}", rel.schema, rel.name);
                let decoded = old
                    .as_ref()
                    .map(|t| self.row(rel, t).map_err(|e| (t, "old row", e)))
                    .transpose()
                    .and_then(|before| {
                        new.as_ref()
                            .map(|t| self.row(rel, t).map_err(|e| (t, "row", e)))
                            .transpose()
                            .map(|after| (before, after))
                    });
                let (before, after) = match decoded {
                    Ok(rows) => rows,
                    Err((tuple, which, e)) => {
                        // The event's key comes from the new row, or the old one on delete.
                        let keyed = new.as_ref().or(old.as_ref()).unwrap_or(tuple);
                        return Ok(Err(self.rejected(rel, source, keyed, tuple, which, e)));
                    }
                };
                let key = match (&after, &before) {
                    _ if op == Op::Truncate => Row::new(),
                    (_, Some(b)) if op == Op::Delete => self.key_of(rel, b),
                    (Some(a), _) => self.key_of(rel, a),
                    _ => Row::new(),
                };
                // The server sends an old tuple only when it matters: the old key when the key
                // changed (or on delete), the whole old row under REPLICA IDENTITY FULL.
                Ok(Ok(ChangeEvent {
                    source,
                    op,
                    key,
                    before,
                    after,
                    schema_version: self.schema_versions.get(&id).copied().unwrap_or(1),
                    position: super::position(Lsn(0), 0),
                    source_ts: None::<DateTime<Utc>>,
                    embedding: None,
                    text_hash: None,
                    chunks: None,
                    schema: self.row_schemas.get(&id).cloned(),
                    origin: None,
                }))
            })
            .collect()
    }

    /// What becomes of a change whose `tuple` (its `which`) holds a value that cannot be decoded:
    /// the key when `keyed`'s key columns decode, the tuple's values as they arrived.
    fn rejected(
        &self,
        rel: &Relation,
        source: String,
        keyed: &[TupleValue],
        tuple: &[TupleValue],
        which: &str,
        error: decode::ValueError,
    ) -> Rejected {
        let mut key = Row::new();
        for (c, v) in rel.columns.iter().zip(keyed).filter(|(c, _)| c.is_key) {
            match v {
                TupleValue::Text(raw) => {
                    match decode::convert_raw(&c.name, c.type_oid, raw, &self.type_names) {
                        Ok(value) => key.push(c.name.clone(), value),
                        Err(_) => {
                            key = Row::new();
                            break;
                        }
                    }
                }
                TupleValue::Null | TupleValue::UnchangedToast => {}
            }
        }
        let raw = decode::copy_text_line(tuple.iter().map(|v| match v {
            TupleValue::Text(raw) => Some(raw.as_slice()),
            TupleValue::Null | TupleValue::UnchangedToast => None,
        }));
        let columns: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
        let unsent: Vec<&str> = rel
            .columns
            .iter()
            .zip(tuple)
            .filter(|(_, v)| **v == TupleValue::UnchangedToast)
            .map(|(c, _)| c.name.as_str())
            .collect();
        let mut error = format!(
            "{source}: the {which}'s {error}; raw is the {which} as a COPY text line ({})",
            columns.join(", ")
        );
        if !unsent.is_empty() {
            error.push_str(&format!(
                ", where the unchanged TOASTed {} (not sent) show as \\N",
                unsent.join(", ")
            ));
        }
        Rejected {
            source,
            key: (!key.is_empty()).then(|| key.json_text()),
            raw,
            error,
        }
    }

    /// A tuple as a row; `Null` columns of a key-only old tuple are left out.
    pub(super) fn row(
        &self,
        rel: &Relation,
        tuple: &[TupleValue],
    ) -> Result<Row, decode::ValueError> {
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
                TupleValue::Text(raw) => {
                    decode::convert_raw(&col.name, col.type_oid, raw, &self.type_names)?
                }
            };
            row.push(col.name.clone(), value);
        }
        Ok(row)
    }

    pub(super) fn key_of(&self, rel: &Relation, row: &Row) -> Row {
        let mut key = Row::new();
        for c in rel.columns.iter().filter(|c| c.is_key) {
            if let Some(v) = row.get(&c.name) {
                key.push(c.name.clone(), v.clone());
            }
        }
        key
    }
}

/// A change with a value that cannot be decoded, before it has its position.
pub(super) struct Rejected {
    source: String,
    key: Option<String>,
    raw: Vec<u8>,
    error: String,
}

impl Rejected {
    pub(super) fn into_letter(self, position: Position) -> DeadLetter {
        DeadLetter::new(self.source, position, self.key, &self.raw, self.error)
    }
}
