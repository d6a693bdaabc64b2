//! Reading a source row by primary key, for values replication did not send (an unchanged TOASTed
//! column whose value no earlier state holds).
//!
//! The row is read as it is now, on an ordinary connection (not inside the replication stream):
//! at or after the position of the event that needed it. Columns are selected as text and
//! converted by [`super::decode::convert`], the function replication's values go through, so a
//! value read here equals the one a change would have carried. The key is matched with the
//! key column's own type (`"id" = $1::text::integer`), so the primary-key index serves it.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::decode;
use crate::event::{Name, Row};
use crate::pg::{error_text, quote_ident};
use crate::secret::ConnString;

/// A column of a source table: its type oid and its SQL type name.
#[derive(Debug, Clone)]
struct ColumnInfo {
    oid: u32,
    sql_type: String,
}

#[derive(Debug, Clone)]
struct TableInfo {
    qualified: String,
    columns: HashMap<String, ColumnInfo>,
}

/// Reads source rows by key; one connection, opened on first use and again after a failure.
pub struct RowReader {
    url: ConnString,
    client: Option<Client>,
    tables: HashMap<String, TableInfo>,
    /// Type names by oid, for the conversions that need them (`vector`).
    type_names: HashMap<u32, String>,
}

impl std::fmt::Debug for RowReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowReader")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl RowReader {
    pub fn new(url: ConnString) -> Self {
        RowReader {
            url,
            client: None,
            tables: HashMap::new(),
            type_names: HashMap::new(),
        }
    }

    /// The current values of `columns` of the row of `table` (`schema.name`, as events name
    /// it) under `key`; `None` when the row is gone.
    pub async fn read(
        &mut self,
        table: &str,
        key: &Row,
        columns: &[Name],
    ) -> Result<Option<Row>, String> {
        let result = self.read_once(table, key, columns).await;
        if result.is_err() {
            // A failed connection is opened again next time.
            self.client = None;
        }
        result
    }

    async fn read_once(
        &mut self,
        table: &str,
        key: &Row,
        columns: &[Name],
    ) -> Result<Option<Row>, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(crate::pg::connect(&self.url).await?);
            self.tables.clear();
        }
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| "no connection".to_owned())?;
        if !self.tables.contains_key(table) {
            let info = table_info(client, table, &mut self.type_names).await?;
            self.tables.insert(table.to_owned(), info);
        }
        let info = self
            .tables
            .get(table)
            .ok_or_else(|| format!("{table}: no such table"))?;
        let mut conds = Vec::new();
        let mut params: Vec<Option<String>> = Vec::new();
        for (i, c) in key.columns().enumerate() {
            let col = info
                .columns
                .get(c.name.as_str())
                .ok_or_else(|| format!("{table}: no key column {:?}", c.name))?;
            conds.push(format!(
                "{} = ${}::text::{}",
                quote_ident(&c.name),
                i + 1,
                col.sql_type
            ));
            params.push(crate::sink::pgvector::key_text(&c.value));
        }
        let wanted: Vec<(&Name, &ColumnInfo)> = columns
            .iter()
            .filter_map(|n| info.columns.get(n.as_str()).map(|c| (n, c)))
            .collect();
        if wanted.is_empty() || conds.is_empty() {
            return Ok(None);
        }
        let select: Vec<String> = wanted
            .iter()
            .map(|(n, _)| format!("{}::text", quote_ident(n)))
            .collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            select.join(", "),
            info.qualified,
            conds.join(" AND ")
        );
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as _).collect();
        let row = client
            .query_opt(&sql, &refs)
            .await
            .map_err(|e| format!("reading {table} by key: {}", error_text(&e)))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut out = Row::new();
        for (i, (name, col)) in wanted.iter().enumerate() {
            let text: Option<String> = row
                .try_get(i)
                .map_err(|e| format!("reading {table}.{name}: {}", error_text(&e)))?;
            let value = match text {
                Some(t) => decode::convert(col.oid, &t, &self.type_names),
                None => crate::event::Value::Null,
            };
            out.push((*name).clone(), value);
        }
        Ok(Some(out))
    }
}

/// The columns of `table` (`schema.name`), matched exactly as replication names it.
async fn table_info(
    client: &Client,
    table: &str,
    type_names: &mut HashMap<u32, String>,
) -> Result<TableInfo, String> {
    let rows = client
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), a.attname::text,
                    a.atttypid::oid, format_type(a.atttypid, a.atttypmod), t.typname::text
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               JOIN pg_type t ON t.oid = a.atttypid
              WHERE n.nspname || '.' || c.relname = $1",
            &[&table],
        )
        .await
        .map_err(|e| format!("looking up {table}: {}", error_text(&e)))?;
    let mut qualified = None;
    let mut columns = HashMap::new();
    for r in rows {
        let q: String = r.try_get(0).map_err(|e| e.to_string())?;
        let name: String = r.try_get(1).map_err(|e| e.to_string())?;
        let oid: u32 = r.try_get(2).map_err(|e| e.to_string())?;
        let sql_type: String = r.try_get(3).map_err(|e| e.to_string())?;
        let type_name: String = r.try_get(4).map_err(|e| e.to_string())?;
        type_names.insert(oid, type_name);
        qualified = Some(q);
        columns.insert(name, ColumnInfo { oid, sql_type });
    }
    Ok(TableInfo {
        qualified: qualified.ok_or_else(|| format!("{table}: no such table"))?,
        columns,
    })
}
