//! The initial snapshot: every row of every published table, read inside the snapshot the slot
//! exported when it was created (or a temporary slot exported when an interrupted snapshot
//! resumes), so that nothing is missed or doubled between snapshot and stream.
//!
//! Each table is read through a cursor ordered by its primary key (or every column under
//! `REPLICA IDENTITY FULL` without one) and handed out `chunk_rows` rows at a time. Values are
//! selected as text and converted by the same [`decode::convert_raw`] the stream uses, so a
//! snapshot row and a streamed insert of the same row are equal. A row with a value that cannot
//! be decoded takes its ordinal and becomes a dead letter instead (in a `SQL_ASCII` database the
//! snapshot reads the bytes as stored, so such a row is found, not an error for its whole chunk).
//!
//! Which tables are durably done is kept in the source database's state table: a table is
//! marked done once the pipeline acknowledged its last row, and a restart re-reads only the
//! others (from a fresh exported snapshot, whose LSN becomes that table's stream filter). The
//! state table also holds the position of each completely read table's last row: when a crash
//! lost the acknowledgement after every sink had committed it, the restart learns from the sinks
//! that the table is durable and does not read it again.
//!
//! Still open (#17): a table interrupted *mid-read* is read again whole from a new snapshot, so
//! Bronze holds its already committed rows twice, and the new snapshot's stream filter hides the
//! deletes committed between the two snapshots from rows the sinks already hold. The planned
//! cure is the watermark method (chunks by key range outside a long transaction, reconciled with
//! the stream between low/high `pg_logical_emit_message` watermarks, progress per chunk).

use std::collections::HashMap;

use chrono::Utc;
use tokio_postgres::Client;
use tokio_postgres::types::{FromSql, Type};

use super::{PgSourceError, db, decode};
use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Lsn, Op, Position, Row, Value};
use crate::pg::{quote_ident, quote_qualified};

/// Snapshot ordinals carry the attempt number in their high bits, so rows of a resumed snapshot
/// always sort after anything an interrupted attempt could have made durable.
pub const EPOCH_SHIFT: u32 = 40;

#[derive(Debug, Clone)]
pub struct SnapTable {
    pub schema: String,
    pub name: String,
    pub columns: Vec<(String, u32)>,
    pub key: Vec<String>,
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
}

pub struct Snapshot {
    client: Client,
    pub tables: Vec<SnapTable>,
    current: usize,
    cursor_open: bool,
    /// Commit LSN stamped on snapshot positions (just below the slot's start).
    pub base: Lsn,
    next_ordinal: u64,
    chunk_rows: u32,
    type_names: HashMap<u32, String>,
    /// Rows done / estimated, drawn only when stderr is a terminal (metrics carry it otherwise).
    bar: Option<indicatif::ProgressBar>,
}

impl Snapshot {
    /// Opens a read-only transaction on the exported snapshot `snapshot_name` and plans the
    /// tables. `url` is an ordinary (non-replication) connection string.
    pub async fn open(
        url: &crate::secret::ConnString,
        snapshot_name: &str,
        tables: Vec<(String, String)>,
        base: Lsn,
        epoch: u64,
        chunk_rows: u32,
    ) -> Result<Self, PgSourceError> {
        let client = super::sql_connect(url).await?;
        // A SQL_ASCII database holds bytes unchecked, and the server fails a whole FETCH whose
        // rows are not valid in the client encoding: read them as stored, to find the row.
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
                super::quote_literal(snapshot_name)
            ))
            .await
            .map_err(db)?;
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
            planned.push(plan_table(&client, schema, name).await?);
        }
        let type_names = super::load_type_names(&client).await?;
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
        Ok(Snapshot {
            bar,
            client,
            tables: planned,
            current: 0,
            cursor_open: false,
            base,
            next_ordinal: epoch << EPOCH_SHIFT,
            chunk_rows,
            type_names,
        })
    }

    pub fn finished(&self) -> bool {
        self.current >= self.tables.len()
    }

    /// The next chunk of rows (empty once every table was read), and the dead letters of rows in
    /// it that cannot be decoded (to be made durable before any of the chunk is acknowledged).
    pub async fn next_chunk(
        &mut self,
    ) -> Result<(Vec<ChangeEvent>, Vec<DeadLetter>), PgSourceError> {
        while self.current < self.tables.len() {
            let t = &self.tables[self.current];
            if !self.cursor_open {
                let cols: Vec<String> = t
                    .columns
                    .iter()
                    .map(|(c, _)| format!("t.{}::text", quote_ident(c)))
                    .collect();
                // Qualified: a bare name would sort by the `::text` output column of that
                // name (so 10 before 9), not by the column's own type.
                let order: Vec<String> = if t.key.is_empty() {
                    t.columns
                        .iter()
                        .map(|(c, _)| format!("t.{}", quote_ident(c)))
                        .collect()
                } else {
                    t.key
                        .iter()
                        .map(|c| format!("t.{}", quote_ident(c)))
                        .collect()
                };
                self.client
                    .batch_execute(&format!(
                        "DECLARE tributary_snap NO SCROLL CURSOR FOR SELECT {} FROM {} t ORDER BY {}",
                        if cols.is_empty() {
                            "1".to_string()
                        } else {
                            cols.join(", ")
                        },
                        quote_qualified(&t.schema, &t.name),
                        order.join(", ")
                    ))
                    .await
                    .map_err(db)?;
                self.cursor_open = true;
            }
            let rows = self
                .client
                .query(
                    &format!("FETCH {} FROM tributary_snap", self.chunk_rows),
                    &[],
                )
                .await
                .map_err(db)?;
            if rows.is_empty() {
                self.client
                    .batch_execute("CLOSE tributary_snap")
                    .await
                    .map_err(db)?;
                self.cursor_open = false;
                let t = &mut self.tables[self.current];
                t.last_ordinal = Some(t.last_event.unwrap_or(self.next_ordinal.saturating_sub(1)));
                tracing::info!(table = %format!("{}.{}", t.schema, t.name), rows = t.rows, dead_letters = t.dead_letters, "snapshot of table read");
                self.current += 1;
                continue;
            }
            let t = &mut self.tables[self.current];
            let source = format!("{}.{}", t.schema, t.name);
            let now = Utc::now();
            let schema = std::sync::Arc::new(decode::row_schema(
                t.columns.iter().map(|(c, oid)| (c.as_str(), *oid)),
                &self.type_names,
            ));
            let mut out = Vec::with_capacity(rows.len());
            let mut letters = Vec::new();
            let mut raw: Vec<Option<&[u8]>> = Vec::with_capacity(t.columns.len());
            for r in &rows {
                let ordinal = self.next_ordinal;
                let position = super::position(self.base, ordinal);
                self.next_ordinal += 1;
                raw.clear();
                for i in 0..t.columns.len() {
                    let v: Option<RawText<'_>> = r.try_get(i).map_err(db)?;
                    raw.push(v.map(|v| v.0));
                }
                let mut row = Row::new();
                let mut failed = None;
                for ((col, oid), v) in t.columns.iter().zip(&raw) {
                    let value = match v {
                        None => Value::Null,
                        Some(bytes) => {
                            match decode::convert_raw(col, *oid, bytes, &self.type_names) {
                                Ok(value) => value,
                                Err(e) => {
                                    failed = Some(e);
                                    break;
                                }
                            }
                        }
                    };
                    row.push(col.clone(), value);
                }
                if let Some(e) = failed {
                    letters.push(rejected(t, &source, &raw, &e, position, &self.type_names));
                    t.dead_letters += 1;
                    continue;
                }
                let mut key = Row::new();
                for k in &t.key {
                    if let Some(v) = row.get(k) {
                        key.push(k.clone(), v.clone());
                    }
                }
                t.last_event = Some(ordinal);
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
                    schema: Some(schema.clone()),
                    origin: None,
                });
            }
            t.rows += out.len() as u64;
            if let Some(bar) = &self.bar {
                bar.set_message(source.clone());
                bar.inc(out.len() as u64);
            }
            metrics::counter!("tributary_snapshot_rows_total", "table" => source)
                .increment(out.len() as u64);
            return Ok((out, letters));
        }
        Ok((Vec::new(), Vec::new()))
    }

    /// Ends the snapshot transaction.
    pub async fn close(self) -> Result<(), PgSourceError> {
        if let Some(bar) = &self.bar {
            bar.finish_with_message("done");
        }
        self.client.batch_execute("COMMIT").await.map_err(db)
    }
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

/// The dead letter of snapshot row `raw` of `t`, whose value failed with `error`.
fn rejected(
    t: &SnapTable,
    source: &str,
    raw: &[Option<&[u8]>],
    error: &decode::ValueError,
    position: Position,
    type_names: &HashMap<u32, String>,
) -> DeadLetter {
    let mut key = Row::new();
    for k in &t.key {
        let Some(((col, oid), Some(bytes))) = t.columns.iter().zip(raw).find(|((c, _), _)| c == k)
        else {
            continue;
        };
        match decode::convert_raw(col, *oid, bytes, type_names) {
            Ok(v) => key.push(col.clone(), v),
            Err(_) => {
                key = Row::new();
                break;
            }
        }
    }
    let columns: Vec<&str> = t.columns.iter().map(|(c, _)| c.as_str()).collect();
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

async fn plan_table(
    client: &Client,
    schema: String,
    name: String,
) -> Result<SnapTable, PgSourceError> {
    let qualified = quote_qualified(&schema, &name);
    let cols = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8,
                    coalesce(a.attnum = ANY(i.indkey), false)
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
    for r in &cols {
        let name: String = r.try_get(0).map_err(db)?;
        if r.try_get::<_, bool>(2).map_err(db)? {
            key.push(name.clone());
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
        estimated_rows: est,
        last_ordinal: None,
        rows: 0,
        dead_letters: 0,
        last_event: None,
        done: false,
        recorded: false,
    })
}
