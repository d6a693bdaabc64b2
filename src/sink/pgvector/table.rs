//! Target tables (named by the config's `target_table`): creation, the dimension check and the HNSW index.

use std::fmt::Write as _;

use tokio_postgres::GenericClient;

use super::PgvectorError;
use crate::config::{Distance, PgvectorSinkConfig as Config, truncate};
use crate::event::{Row, Value};
use crate::pg::{error_text, quote_ident, quote_qualified};

/// The SQL type a key value is stored as.
pub fn sql_type(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "boolean",
        Value::Int16(_) => "smallint",
        Value::Int32(_) => "integer",
        Value::Int64(_) => "bigint",
        Value::Float32(_) => "real",
        Value::Float64(_) => "double precision",
        Value::Numeric(_) => "numeric",
        Value::Uuid(_) => "uuid",
        Value::Date(_) => "date",
        Value::Timestamp(_) => "timestamp",
        Value::TimestampTz(_) => "timestamptz",
        Value::Bytes(_) => "bytea",
        Value::Json(_) | Value::Array(_) | Value::Vector(_) => "jsonb",
        Value::Null | Value::UnchangedToast | Value::Text(_) => "text",
    }
}

/// A key value as the text PostgreSQL parses back into its [`sql_type`] (staging holds keys as
/// text and the merge casts them, so one COPY layout serves every key type).
pub fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::Null | Value::UnchangedToast => None,
        Value::Text(s) | Value::Numeric(s) => Some(s.to_string()),
        Value::Bytes(b) => {
            let mut s = String::with_capacity(2 + 2 * b.len());
            s.push_str("\\x");
            for byte in b {
                let _ = write!(s, "{byte:02x}");
            }
            Some(s)
        }
        Value::Timestamp(t) => Some(t.format("%Y-%m-%d %H:%M:%S%.f").to_string()),
        Value::Json(j) => Some(j.as_str().to_owned()),
        other => match other.to_json() {
            serde_json::Value::String(s) => Some(s),
            j => Some(j.to_string()),
        },
    }
}

/// What the sink knows about one target table.
#[derive(Debug, Clone)]
pub struct Target {
    /// `"schema"."table"`, quoted.
    pub qualified: String,
    pub table: String,
    /// Key columns, in key order, with their SQL types.
    pub keys: Vec<(String, &'static str)>,
    pub has_index: bool,
    /// The chunk table (`"schema"."table_chunks"`, quoted) once there is one ([`super::chunks`]).
    pub chunks: Option<String>,
}

impl Target {
    /// `t."a" = s.k0::integer AND …` (staging holds key `i` as text column `k{i}`).
    pub fn key_match(&self, t: &str, s: &str) -> String {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, (k, ty))| format!("{t}.{} = {s}.k{i}::{ty}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

/// Creates the extension (if permitted), the table and the positions table if missing; checks an
/// existing table's key and dimension against what this source sends.
pub async fn ensure(
    client: &impl GenericClient,
    config: &Config,
    source: &str,
    key: &Row,
) -> Result<Target, PgvectorError> {
    let table = config.target_table(source);
    let schema = &config.schema;
    let qualified = quote_qualified(schema, &table);
    let keys: Vec<(String, &'static str)> = key
        .columns()
        .map(|c| (c.name.to_string(), sql_type(&c.value)))
        .collect();
    if keys.is_empty() {
        return Err(PgvectorError::Data(format!(
            "{source}: an event without key columns cannot be upserted (give the table a primary \
             key, or set key_columns for the topic)"
        )));
    }
    let wanted = embedding_type(config);
    match stored_embedding_type(client, &qualified).await? {
        Some(found) => {
            if found != wanted {
                return Err(PgvectorError::Config(format!(
                    "{schema}.{table}.embedding is {found} but the configuration \
                     (sinks.pgvector.dimension / halfvec) says {wanted}: the model's dimension must \
                     match the column — use another table, or drop it to rebuild"
                )));
            }
        }
        None => {
            create_extension(client).await?;
            let cols: Vec<String> = keys
                .iter()
                .map(|(k, ty)| format!("{} {ty} NOT NULL", quote_ident(k)))
                .collect();
            let pk: Vec<String> = keys.iter().map(|(k, _)| quote_ident(k)).collect();
            let ddl = format!(
                "CREATE SCHEMA IF NOT EXISTS {schema_q};
                 CREATE TABLE IF NOT EXISTS {qualified} (
                   {cols},
                   payload jsonb,
                   embedding {wanted},
                   text_hash bigint,
                   _pos_partition integer,
                   _pos_major bigint NOT NULL,
                   _pos_minor bigint NOT NULL,
                   _source_ts timestamptz,
                   _updated_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY ({pk})
                 )",
                schema_q = quote_ident(schema),
                cols = cols.join(",\n"),
                pk = pk.join(", "),
            );
            client
                .batch_execute(&ddl)
                .await
                .map_err(PgvectorError::from_pg)?;
        }
    }
    let has_index = index_exists(client, schema, &table).await?;
    let chunks = super::chunks::existing(client, config, &table).await?;
    Ok(Target {
        qualified,
        table,
        keys,
        has_index,
        chunks,
    })
}

/// The target table of `source` as it already exists, or `None` when there is none: for a batch
/// that only truncates a source (after a restart nothing is cached yet, and a truncate carries
/// no key to create the table from). Key columns and their types come from the primary key.
pub async fn existing(
    client: &impl GenericClient,
    config: &Config,
    source: &str,
) -> Result<Option<Target>, PgvectorError> {
    let table = config.target_table(source);
    let qualified = format!("{}.{}", quote_ident(&config.schema), quote_ident(&table));
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL)
               FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = to_regclass($1) AND i.indisprimary
              ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&qualified],
        )
        .await
        .map_err(PgvectorError::from_pg)?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get(0).map_err(PgvectorError::from_pg)?;
        let ty: String = row.try_get(1).map_err(PgvectorError::from_pg)?;
        let Some(ty) = KEY_TYPES.iter().copied().find(|t| sql_type_name(t) == ty) else {
            return Err(PgvectorError::Config(format!(
                "{qualified}: key column {name} has type {ty}, which this sink does not write \
                 (drop the table to let the sink create it)"
            )));
        };
        keys.push((name, ty));
    }
    let has_index = index_exists(client, &config.schema, &table).await?;
    let chunks = super::chunks::existing(client, config, &table).await?;
    Ok(Some(Target {
        qualified,
        table,
        keys,
        has_index,
        chunks,
    }))
}

/// Every type [`sql_type`] gives a key column.
const KEY_TYPES: [&str; 14] = [
    "boolean",
    "smallint",
    "integer",
    "bigint",
    "real",
    "double precision",
    "numeric",
    "uuid",
    "date",
    "timestamp",
    "timestamptz",
    "bytea",
    "jsonb",
    "text",
];

/// How `format_type` spells a type of [`KEY_TYPES`].
fn sql_type_name(ty: &str) -> &str {
    match ty {
        "timestamp" => "timestamp without time zone",
        "timestamptz" => "timestamp with time zone",
        other => other,
    }
}

async fn create_extension(client: &impl GenericClient) -> Result<(), PgvectorError> {
    let installed = client
        .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'vector'", &[])
        .await
        .map_err(PgvectorError::from_pg)?
        .is_some();
    if installed {
        return Ok(());
    }
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
        .await
        .map_err(|e| {
            PgvectorError::Config(format!(
                "the pgvector extension is not installed and could not be created ({}): install \
                 pgvector on the server, or have a superuser run CREATE EXTENSION vector",
                error_text(&e)
            ))
        })
}

/// The SQL type the configuration wants for `embedding` columns, e.g. `vector(384)`.
pub fn embedding_type(config: &Config) -> String {
    let storage = if config.halfvec { "halfvec" } else { "vector" };
    format!("{storage}({})", config.dimension)
}

/// The type of the `embedding` column of table `qualified`; `None` when there is no such table.
pub async fn stored_embedding_type(
    client: &impl GenericClient,
    qualified: &str,
) -> Result<Option<String>, PgvectorError> {
    Ok(client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a
              WHERE a.attrelid = to_regclass($1) AND a.attname = 'embedding' AND NOT a.attisdropped",
            &[&qualified],
        )
        .await
        .map_err(PgvectorError::from_pg)?
        .map(|r| r.get(0)))
}

/// Where the sink records, per source stream, the last position it applied — in the same
/// transaction as the rows, so it is exactly as durable as they are.
pub fn positions_table(schema: &str) -> String {
    format!("{}._tributary_positions", quote_ident(schema))
}

pub(super) async fn ensure_positions_table(
    client: &impl GenericClient,
    schema: &str,
) -> Result<(), PgvectorError> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};
             CREATE TABLE IF NOT EXISTS {} (
               source text NOT NULL,
               stream text NOT NULL,
               position jsonb NOT NULL,
               updated_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (source, stream)
             )",
            quote_ident(schema),
            positions_table(schema)
        ))
        .await
        .map_err(PgvectorError::from_pg)
}

async fn index_exists(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
) -> Result<bool, PgvectorError> {
    let row = client
        .query_one(
            "SELECT EXISTS (
               SELECT 1 FROM pg_index i
                 JOIN pg_class c ON c.oid = i.indexrelid
                 JOIN pg_am am ON am.oid = c.relam
                WHERE i.indrelid = to_regclass($1) AND am.amname IN ('hnsw', 'ivfflat'))",
            &[&quote_qualified(schema, table)],
        )
        .await
        .map_err(PgvectorError::from_pg)?;
    Ok(row.get(0))
}

/// Builds the HNSW index of the table `qualified` named `table` (once; an existing one is kept).
pub async fn build_index(
    client: &impl GenericClient,
    config: &Config,
    qualified: &str,
    table: &str,
) -> Result<(), PgvectorError> {
    let prefix = if config.halfvec { "halfvec" } else { "vector" };
    let ops = match config.index.distance {
        Distance::Cosine => "cosine_ops",
        Distance::L2 => "l2_ops",
        Distance::InnerProduct => "ip_ops",
    };
    let name = quote_ident(&format!("{}_embedding_hnsw", truncate(table, 45)));
    // A one-off build is far cheaper with room to sort in memory.
    client
        .batch_execute(&format!(
            "SET maintenance_work_mem = '512MB';
             CREATE INDEX IF NOT EXISTS {name} ON {table} USING hnsw (embedding {prefix}_{ops})
               WITH (m = {m}, ef_construction = {ef});
             RESET maintenance_work_mem",
            table = qualified,
            m = config.index.m,
            ef = config.index.ef_construction,
        ))
        .await
        .map_err(PgvectorError::from_pg)
}
