//! PostgreSQL logical-replication source (pgoutput).
//!
//! Guarantees:
//! - The publication and the logical slot (`pgoutput`) are created when missing; every
//!   identifier is quoted, so tables such as `public."Order Items"` work. A published table
//!   without a primary key and without `REPLICA IDENTITY FULL` is refused at start-up by name.
//! - Changes are read through the slot with `pg_logical_slot_peek_binary_changes` over an
//!   ordinary connection (no replication-protocol dependency to build) and decoded here
//!   ([`decode`]). A transaction is emitted only once its Commit is seen, so every event carries
//!   `Position::Lsn { commit_lsn, tx_ordinal }`.
//! - Peeking never consumes: the slot only moves when the pipeline calls [`PostgresSourceReader::ack`]
//!   with a durable position (`pg_replication_slot_advance`). After a restart, everything after the
//!   last acknowledged commit is delivered again; transactions already emitted in this process are
//!   skipped by position, and sinks recognise replays by position too.
//!
//! Not done here (yet): initial snapshot, protocol v2 streaming of large transactions, slot-lag
//! metrics and reconnect policy; see the module's issue.

pub mod decode;

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, NoTls};

use crate::config::{PostgresSource, parse_table_name};
use crate::error::{Classify, ErrorKind};
use crate::event::{ChangeEvent, Lsn, Op, Position, Row};
use decode::{Message, Relation, TupleValue};

#[derive(Debug, thiserror::Error)]
pub enum PgSourceError {
    #[error("PostgreSQL connection: {0}")]
    Connection(#[source] tokio_postgres::Error),
    #[error("PostgreSQL: {0}")]
    Setup(String),
    #[error(transparent)]
    Decode(#[from] decode::DecodeError),
}

impl Classify for PgSourceError {
    fn kind(&self) -> ErrorKind {
        match self {
            PgSourceError::Connection(e) if e.as_db_error().is_none() => ErrorKind::Connection,
            PgSourceError::Connection(_) | PgSourceError::Setup(_) => ErrorKind::Config,
            PgSourceError::Decode(_) => ErrorKind::Data,
        }
    }
}

fn db(e: tokio_postgres::Error) -> PgSourceError {
    PgSourceError::Connection(e)
}

/// Quotes an SQL identifier (`"` doubled).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal (`'` doubled).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Reads changes from one publication through one logical slot.
pub struct PostgresSourceReader {
    client: Client,
    slot: String,
    publication: String,
    relations: HashMap<u32, Relation>,
    schema_versions: HashMap<u32, u32>,
    type_names: HashMap<u32, String>,
    /// Commit LSN of the last transaction handed out (replays at or below it are skipped).
    last_emitted: Lsn,
    /// Transactions handed out but not yet acknowledged: (commit LSN, end LSN, messages read).
    unacked: VecDeque<(Lsn, Lsn, i64)>,
}

impl PostgresSourceReader {
    /// Connects, creates the publication and slot when missing, and checks replica identities.
    pub async fn connect(cfg: &PostgresSource) -> Result<Self, PgSourceError> {
        let (client, conn) = tokio_postgres::connect(cfg.url.expose(), NoTls)
            .await
            .map_err(db)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "PostgreSQL source connection closed");
            }
        });
        client
            .batch_execute(
                "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3",
            )
            .await
            .map_err(db)?;
        let reader = Self {
            client,
            slot: cfg.slot.clone(),
            publication: cfg.publication.clone(),
            relations: HashMap::new(),
            schema_versions: HashMap::new(),
            type_names: HashMap::new(),
            last_emitted: Lsn(0),
            unacked: VecDeque::new(),
        };
        reader.ensure_publication(cfg).await?;
        reader.check_replica_identity().await?;
        reader.ensure_slot().await?;
        Ok(reader)
    }

    async fn ensure_publication(&self, cfg: &PostgresSource) -> Result<(), PgSourceError> {
        let exists = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&self.publication],
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
                self.publication
            )));
        };
        self.client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} {target}",
                quote_ident(&self.publication)
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
                &[&self.publication],
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

    async fn ensure_slot(&self) -> Result<(), PgSourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(db)?;
        match row {
            Some(r) => {
                let plugin: Option<String> = r.get(0);
                if plugin.as_deref() != Some("pgoutput") {
                    return Err(PgSourceError::Setup(format!(
                        "replication slot {:?} exists but is not a pgoutput logical slot",
                        self.slot
                    )));
                }
            }
            None => {
                self.client
                    .execute(
                        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                        &[&self.slot],
                    )
                    .await
                    .map_err(db)?;
            }
        }
        Ok(())
    }

    /// The slot's confirmed flush position (everything up to it was acknowledged).
    pub async fn confirmed_flush(&self) -> Result<Lsn, PgSourceError> {
        let row = self
            .client
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(db)?;
        Ok(Lsn(row.get::<_, Option<i64>>(0).unwrap_or(0) as u64))
    }

    /// Every complete transaction committed since the last one handed out. About `max_changes`
    /// new messages are read per call (the server always finishes the transaction it is in).
    pub async fn poll(&mut self, max_changes: i64) -> Result<Vec<ChangeEvent>, PgSourceError> {
        let limit = i32::try_from(max_changes + self.unacked.iter().map(|u| u.2).sum::<i64>())
            .unwrap_or(i32::MAX);
        let sql = format!(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
             'proto_version', '1', 'publication_names', {})",
            quote_literal(&quote_ident(&self.publication))
        );
        let rows = self
            .client
            .query(&sql, &[&self.slot, &limit])
            .await
            .map_err(db)?;
        let mut out = Vec::new();
        let mut tx: Vec<ChangeEvent> = Vec::new();
        let mut in_tx = false;
        let mut msgs: i64 = 0;
        for row in rows {
            msgs += 1;
            let data: &[u8] = row.get(0);
            match decode::parse(data)? {
                Message::Begin { .. } => {
                    tx.clear();
                    msgs = 1;
                    in_tx = true;
                }
                Message::Commit {
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                } => {
                    in_tx = false;
                    if commit_lsn <= self.last_emitted {
                        tx.clear();
                        continue;
                    }
                    self.last_emitted = commit_lsn;
                    self.unacked.push_back((commit_lsn, end_lsn, msgs));
                    for (i, mut ev) in tx.drain(..).enumerate() {
                        ev.position = Position::Lsn {
                            commit_lsn,
                            tx_ordinal: i as u64,
                        };
                        ev.source_ts = Some(commit_ts);
                        out.push(ev);
                    }
                }
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
                Message::Other => {}
                change if in_tx => tx.extend(self.to_events(change)?),
                _ => return Err(PgSourceError::Setup("change outside a transaction".into())),
            }
        }
        Ok(out)
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

    /// Tells the source that everything up to `pos` is durable: the slot's confirmed flush
    /// position moves there, and the server may recycle the WAL before it.
    pub async fn ack(&mut self, pos: &Position) -> Result<(), PgSourceError> {
        let Position::Lsn { commit_lsn, .. } = pos else {
            return Ok(());
        };
        // Decoding restarts after the confirmed position: confirm the end of the commit record
        // so the acknowledged transaction itself is not delivered again.
        let mut upto = Lsn(commit_lsn.0 + 1);
        while let Some(&(c, end, _)) = self.unacked.front() {
            if c > *commit_lsn {
                break;
            }
            upto = upto.max(end);
            self.unacked.pop_front();
        }
        self.client
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&self.slot, &upto.to_string()],
            )
            .await
            .map_err(db)?;
        Ok(())
    }
}
