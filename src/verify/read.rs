//! Reading the two sides of a comparison: which tables are published, how a pgvector table is
//! keyed, and each table's rows as a cursor ordered by that key.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Client;

use super::compare::cmp_key;
use crate::config::{PostgresSourceConfig, parse_table_name};
use crate::event::{Row, Value};
use crate::pg::{error_text, quote_ident, quote_qualified};
use crate::secret::ConnString;
use crate::source::postgres::decode::convert;
use crate::source::postgres::{PgSourceError, TEXT_SETTINGS, load_type_names};

/// Rows fetched from a cursor per round trip.
const FETCH_ROWS: usize = 1000;

/// Type oids of the key columns the pgvector sink writes (`text` aside); `jsonb` keys (arrays,
/// JSON, vectors) have no order this module can mirror.
const ORDERED_KEY_TYPES: [u32; 12] = [16, 21, 23, 20, 700, 701, 1700, 2950, 1082, 1114, 1184, 17];
const TEXT_OID: u32 = 25;

/// A connection reading values as text the way the PostgreSQL source does.
pub async fn connect(url: &ConnString, timeout: Duration) -> Result<Client, String> {
    let client = tokio::time::timeout(timeout, crate::pg::connect(url))
        .await
        .map_err(|_| {
            format!(
                "cannot connect to {url}: no answer within {} s",
                timeout.as_secs()
            )
        })??;
    client
        .batch_execute(TEXT_SETTINGS)
        .await
        .map_err(|e| format!("{url}: {}", error_text(&e)))?;
    Ok(client)
}

/// Names of the source database's extension types, for [`convert`].
pub async fn type_names(client: &Client) -> Result<HashMap<u32, String>, String> {
    load_type_names(client).await.map_err(|e| match e {
        PgSourceError::Connection(e) | PgSourceError::Connect { error: e, .. } => error_text(&e),
        other => other.to_string(),
    })
}

/// The tables the source publishes (and those it is configured to add), minus its own state
/// and heartbeat tables, sorted.
pub async fn published_tables(
    client: &Client,
    pg: &PostgresSourceConfig,
) -> Result<Vec<(String, String)>, String> {
    let mut tables: Vec<(String, String)> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&pg.publication],
        )
        .await
        .map_err(|e| error_text(&e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for t in &pg.tables {
        tables.push(parse_table_name(t)?);
    }
    if tables.is_empty()
        && let Some(schema) = &pg.schema
    {
        let rows = client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_tables WHERE schemaname = $1",
                &[schema],
            )
            .await
            .map_err(|e| error_text(&e))?;
        tables.extend(rows.iter().map(|r| (r.get(0), r.get(1))));
    }
    let mut internal = vec![parse_table_name(&pg.state_table)?];
    if let Some(h) = &pg.heartbeat_table {
        internal.push(parse_table_name(h)?);
    }
    tables.retain(|t| !internal.contains(t));
    tables.sort();
    tables.dedup();
    Ok(tables)
}

/// A key column of a pgvector table.
#[derive(Debug, Clone)]
pub struct KeyColumn {
    pub name: String,
    /// Its type's oid and name (`integer`), as the pgvector table declares it.
    pub oid: u32,
    pub type_name: String,
    /// Ordered (and compared) as text under `COLLATE "C"` on both sides.
    pub as_text: bool,
}

/// What `verify` needs to know of a pgvector table.
#[derive(Debug, Clone)]
pub struct Target {
    /// `"schema"."table"`, quoted.
    pub qualified: String,
    pub keys: Vec<KeyColumn>,
    /// The `embedding` column is `halfvec`.
    pub halfvec: bool,
}

/// The pgvector table `schema.table`, or `None` when it does not exist.
pub async fn target(client: &Client, schema: &str, table: &str) -> Result<Option<Target>, String> {
    let qualified = quote_qualified(schema, table);
    let err = |e: tokio_postgres::Error| format!("{qualified}: {}", error_text(&e));
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
        .await
        .map_err(err)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, format_type(a.atttypid, NULL)
               FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = to_regclass($1) AND i.indisprimary
              ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&qualified],
        )
        .await
        .map_err(err)?;
    let mut keys = Vec::with_capacity(rows.len());
    for r in &rows {
        let name: String = r.try_get(0).map_err(err)?;
        let oid = r.try_get::<_, i64>(1).map_err(err)? as u32;
        let type_name: String = r.try_get(2).map_err(err)?;
        if oid != TEXT_OID && !ORDERED_KEY_TYPES.contains(&oid) {
            return Err(format!(
                "{qualified}: key column {name} is {type_name}, which verify cannot order \
                 alike in both databases"
            ));
        }
        keys.push(KeyColumn {
            name,
            oid,
            type_name,
            as_text: oid == TEXT_OID,
        });
    }
    if keys.is_empty() {
        return Err(format!(
            "{qualified} has no primary key: it was not written by the pgvector sink"
        ));
    }
    let embedding: Option<String> = client
        .query_opt(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = to_regclass($1) AND attname = 'embedding' AND NOT attisdropped",
            &[&qualified],
        )
        .await
        .map_err(err)?
        .map(|r| r.get(0));
    Ok(Some(Target {
        qualified,
        keys,
        halfvec: embedding.is_some_and(|t| t.starts_with("halfvec")),
    }))
}

/// The source table's columns (name, type oid) in table order, as the snapshot reads them.
pub async fn source_columns(
    client: &Client,
    qualified: &str,
) -> Result<Vec<(String, u32)>, String> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8 FROM pg_attribute a
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attgenerated = ''
              ORDER BY a.attnum",
            &[&qualified],
        )
        .await
        .map_err(|e| format!("{qualified}: {}", error_text(&e)))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u32))
        .collect())
}

/// A row of a cursor, read on demand `FETCH_ROWS` at a time.
pub struct Cursor<'c> {
    client: &'c Client,
    name: &'static str,
    buf: std::vec::IntoIter<tokio_postgres::Row>,
    done: bool,
}

impl<'c> Cursor<'c> {
    /// Declares cursor `name` for `query` (inside the caller's transaction).
    pub async fn open(client: &'c Client, name: &'static str, query: &str) -> Result<Self, String> {
        client
            .batch_execute(&format!("DECLARE {name} NO SCROLL CURSOR FOR {query}"))
            .await
            .map_err(|e| error_text(&e))?;
        Ok(Cursor {
            client,
            name,
            buf: Vec::new().into_iter(),
            done: false,
        })
    }

    pub async fn next(&mut self) -> Result<Option<tokio_postgres::Row>, String> {
        loop {
            if let Some(r) = self.buf.next() {
                return Ok(Some(r));
            }
            if self.done {
                return Ok(None);
            }
            let rows = self
                .client
                .query(&format!("FETCH {FETCH_ROWS} FROM {}", self.name), &[])
                .await
                .map_err(|e| error_text(&e))?;
            self.done = rows.len() < FETCH_ROWS;
            self.buf = rows.into_iter();
        }
    }
}

/// `ORDER BY` of the key columns of table alias `t` on either side: text keys bytewise, the
/// others natively. (Qualified: a bare `"id"` would name the output column `"id"::text` and sort
/// integers as text.)
pub fn order_by(keys: &[KeyColumn]) -> String {
    keys.iter()
        .map(|k| {
            if k.as_text {
                format!("t.{}::text COLLATE \"C\"", quote_ident(&k.name))
            } else {
                format!("t.{}", quote_ident(&k.name))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A source row: its key (as [`super::compare::cmp_key`] orders it) and its values.
pub struct SourceRow {
    pub key: Vec<Value>,
    pub row: Row,
}

/// The query reading a source table for [`parse_source`].
pub fn source_query(qualified: &str, columns: &[(String, u32)], keys: &[KeyColumn]) -> String {
    let cols: Vec<String> = columns
        .iter()
        .map(|(c, _)| format!("t.{}::text", quote_ident(c)))
        .collect();
    format!(
        "SELECT {} FROM {qualified} t ORDER BY {}",
        cols.join(", "),
        order_by(keys)
    )
}

/// `key_index[i]` is the position of key column `i` among `columns`.
pub fn parse_source(
    r: &tokio_postgres::Row,
    columns: &[(String, u32)],
    keys: &[KeyColumn],
    key_index: &[usize],
    type_names: &HashMap<u32, String>,
) -> Result<SourceRow, String> {
    let mut row = Row::new();
    for (i, (name, oid)) in columns.iter().enumerate() {
        let text: Option<&str> = r.try_get(i).map_err(|e| e.to_string())?;
        let value = match text {
            None => Value::Null,
            Some(s) => convert(*oid, s, type_names),
        };
        row.push(name.clone(), value);
    }
    let mut key = Vec::with_capacity(keys.len());
    for (k, &i) in keys.iter().zip(key_index) {
        let text: Option<&str> = r.try_get(i).map_err(|e| e.to_string())?;
        let Some(text) = text else {
            return Err(format!("a source row has NULL in key column {}", k.name));
        };
        key.push(if k.as_text {
            Value::Text(text.into())
        } else {
            row.0[i].value.clone()
        });
    }
    Ok(SourceRow { key, row })
}

/// A pgvector row as the merge needs it.
pub struct TargetRow {
    pub key: Vec<Value>,
    /// The key columns' text, to look the row up again.
    pub key_texts: Vec<String>,
    pub payload: Option<serde_json::Value>,
    pub text_hash: Option<i64>,
    pub embedding_null: bool,
    /// The stored vector's text, when the query asked for it.
    pub embedding: Option<String>,
}

/// The query reading a pgvector table for [`parse_target`]; `vectors`: with the embeddings.
pub fn target_query(target: &Target, vectors: bool) -> String {
    let keys: Vec<String> = target
        .keys
        .iter()
        .map(|k| format!("t.{}::text", quote_ident(&k.name)))
        .collect();
    format!(
        "SELECT {}, t.payload, t.text_hash, t.embedding IS NULL{} FROM {} t ORDER BY {}",
        keys.join(", "),
        if vectors { ", t.embedding::text" } else { "" },
        target.qualified,
        order_by(&target.keys)
    )
}

pub fn parse_target(r: &tokio_postgres::Row, target: &Target) -> Result<TargetRow, String> {
    let err = |e: tokio_postgres::Error| format!("{}: {e}", target.qualified);
    let n = target.keys.len();
    let mut key = Vec::with_capacity(n);
    let mut key_texts = Vec::with_capacity(n);
    for (i, k) in target.keys.iter().enumerate() {
        let text: String = r.try_get(i).map_err(err)?;
        key.push(if k.as_text {
            Value::Text(text.as_str().into())
        } else {
            convert(k.oid, &text, &HashMap::new())
        });
        key_texts.push(text);
    }
    Ok(TargetRow {
        key,
        key_texts,
        payload: r.try_get(n).map_err(err)?,
        text_hash: r.try_get(n + 1).map_err(err)?,
        embedding_null: r.try_get(n + 2).map_err(err)?,
        embedding: if r.len() > n + 3 {
            r.try_get(n + 3).map_err(err)?
        } else {
            None
        },
    })
}

/// The stored vector of the row with these key texts (`None`: no row, or no vector).
pub async fn stored_vector(
    client: &Client,
    target: &Target,
    key_texts: &[String],
) -> Result<Option<String>, String> {
    let conds: Vec<String> = target
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "{} = ${}::text::{}",
                quote_ident(&k.name),
                i + 1,
                k.type_name
            )
        })
        .collect();
    let sql = format!(
        "SELECT embedding::text FROM {} WHERE {}",
        target.qualified,
        conds.join(" AND ")
    );
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        key_texts.iter().map(|t| t as _).collect();
    let row = client
        .query_opt(&sql, &params)
        .await
        .map_err(|e| format!("{}: {}", target.qualified, error_text(&e)))?;
    Ok(row.and_then(|r| r.get(0)))
}

/// A row with a key.
pub trait Keyed {
    fn key(&self) -> &[Value];
}

impl Keyed for SourceRow {
    fn key(&self) -> &[Value] {
        &self.key
    }
}

impl Keyed for TargetRow {
    fn key(&self) -> &[Value] {
        &self.key
    }
}

/// A cursor's rows in key order; a row out of order is an error (the databases would be
/// ordering the key differently from [`cmp_key`], and the merge would invent differences).
pub struct Ordered<'c> {
    cursor: Cursor<'c>,
    what: String,
    last: Option<Vec<Value>>,
}

impl<'c> Ordered<'c> {
    pub fn new(cursor: Cursor<'c>, what: String) -> Self {
        Ordered {
            cursor,
            what,
            last: None,
        }
    }

    /// The next row, checked to come after the previous one.
    pub async fn next<T: Keyed>(
        &mut self,
        parse: impl FnOnce(&tokio_postgres::Row) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        let Some(r) = self.cursor.next().await? else {
            return Ok(None);
        };
        let row = parse(&r)?;
        let k = row.key();
        if let Some(prev) = &self.last
            && cmp_key(prev, k).is_ge()
        {
            return Err(format!(
                "rows of {} do not arrive in key order ({:?} then {:?}): this key type is \
                 ordered differently than verify expects, so the tables cannot be merged",
                self.what, prev, k
            ));
        }
        self.last = Some(k.to_vec());
        Ok(Some(row))
    }
}
