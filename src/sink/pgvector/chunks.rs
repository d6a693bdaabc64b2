//! The chunk table of a source whose long texts are embedded in windows (`embedding.chunking`
//! with `store = "rows"`): `<table>_chunks` holds one row per chunk — the key columns,
//! `chunk_seq`, the chunk's character offsets in the rendered text, its text and its vector —
//! beside the source's row (whose `embedding` is the mean of its chunks).
//!
//! Guarantees, in the batch's transaction:
//! - An event that carries chunks replaces all of its key's chunk rows (delete, then insert)
//!   when its change is the one the row now holds (the row's position is not newer than the
//!   event's): a replayed older change cannot bring old chunks back.
//! - An event without chunks (the text did not change, or an unresolved TOAST value) touches
//!   none of them.
//! - A delete removes every chunk of the key, a key move those of the old key (a foreign key
//!   `ON DELETE CASCADE` to the row), and a truncate empties both tables.

use bytes::Bytes;
use futures::pin_mut;
use tokio_postgres::GenericClient;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;

use super::PgvectorError;
use super::apply::column_types;
use super::table::{self, Target, key_text};
use crate::config::{PgvectorSinkConfig as Config, truncate};
use crate::event::{ChangeEvent, Op};
use crate::pg::{quote_ident, quote_qualified};

/// The chunk table's name for target table `table`.
pub fn table_name(table: &str) -> String {
    format!("{}_chunks", truncate(table, 56))
}

/// The chunk table of `target` if it exists (qualified), for a target found at start-up.
pub async fn existing(
    client: &impl GenericClient,
    config: &Config,
    table: &str,
) -> Result<Option<String>, PgvectorError> {
    let qualified = quote_qualified(&config.schema, &table_name(table));
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
        .await
        .map_err(PgvectorError::from_pg)?
        .get(0);
    Ok(exists.then_some(qualified))
}

/// Creates the chunk table of `target` if missing (with its HNSW index when the target has one
/// already) and checks an existing one's dimension; returns its qualified name.
pub async fn ensure(
    client: &impl GenericClient,
    config: &Config,
    target: &Target,
) -> Result<String, PgvectorError> {
    let name = table_name(&target.table);
    let qualified = quote_qualified(&config.schema, &name);
    let wanted = table::embedding_type(config);
    match table::stored_embedding_type(client, &qualified).await? {
        Some(found) if found != wanted => Err(PgvectorError::Config(format!(
            "{}.{name}.embedding is {found} but the configuration (sinks.pgvector.dimension / \
             halfvec) says {wanted}: use another table, or drop it to rebuild",
            config.schema
        ))),
        Some(_) => Ok(qualified),
        None => {
            let cols: Vec<String> = target
                .keys
                .iter()
                .map(|(k, ty)| format!("{} {ty} NOT NULL", quote_ident(k)))
                .collect();
            let keys: Vec<String> = target.keys.iter().map(|(k, _)| quote_ident(k)).collect();
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {qualified} (
                       {cols},
                       chunk_seq integer NOT NULL,
                       chunk_start integer NOT NULL,
                       chunk_end integer NOT NULL,
                       chunk text NOT NULL,
                       embedding {wanted} NOT NULL,
                       PRIMARY KEY ({keys}, chunk_seq),
                       FOREIGN KEY ({keys}) REFERENCES {main} ({keys}) ON DELETE CASCADE
                     )",
                    cols = cols.join(",\n"),
                    keys = keys.join(", "),
                    main = target.qualified,
                ))
                .await
                .map_err(PgvectorError::from_pg)?;
            if config.index.hnsw && target.has_index {
                table::build_index(client, config, &qualified, &name).await?;
            }
            Ok(qualified)
        }
    }
}

/// Replaces the chunk rows of every event of `rows` (the last change per key, applied just
/// before in `tx`) that carries chunks; see the module doc.
pub async fn write(
    tx: &mut tokio_postgres::Transaction<'_>,
    config: &Config,
    target: &Target,
    rows: &[&ChangeEvent],
    seq: u64,
) -> Result<(), PgvectorError> {
    let Some(chunks_table) = &target.chunks else {
        return Ok(());
    };
    let carrying: Vec<&ChangeEvent> = rows
        .iter()
        .copied()
        .filter(|e| e.op != Op::Delete && e.chunks.is_some())
        .collect();
    if carrying.is_empty() {
        return Ok(());
    }
    let stage = format!("_tributary_chunks_{seq}");
    let key_cols: Vec<String> = (0..target.keys.len())
        .map(|i| format!("k{i} text"))
        .collect();
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE {stage} (
           {keys}, _pos_partition integer, _pos_major bigint NOT NULL, _pos_minor bigint NOT NULL,
           chunk_seq integer NOT NULL, chunk_start integer NOT NULL, chunk_end integer NOT NULL,
           chunk text NOT NULL, embedding vector NOT NULL
         ) ON COMMIT DROP",
        keys = key_cols.join(", ")
    ))
    .await
    .map_err(PgvectorError::from_pg)?;
    let types = column_types(&*tx, &format!("SELECT * FROM {stage}")).await?;
    let sink = tx
        .copy_in::<_, Bytes>(&format!("COPY {stage} FROM STDIN (FORMAT binary)"))
        .await
        .map_err(PgvectorError::from_pg)?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for e in carrying {
        let key: Vec<Option<String>> = target
            .keys
            .iter()
            .map(|(k, _)| e.key.get(k).and_then(key_text))
            .collect();
        let (partition, major, minor) = (
            e.position.stream.partition(),
            e.position.major,
            e.position.minor,
        );
        for c in e.chunks.iter().flatten() {
            if c.vector.len() != config.dimension as usize {
                return Err(PgvectorError::Data(format!(
                    "{} at {}: chunk {} has {} dimensions but {chunks_table} is vector({})",
                    e.source,
                    e.position,
                    c.seq,
                    c.vector.len(),
                    config.dimension
                )));
            }
            let seq = i32::try_from(c.seq).unwrap_or(i32::MAX);
            let start = i32::try_from(c.start).unwrap_or(i32::MAX);
            let end = i32::try_from(c.end).unwrap_or(i32::MAX);
            let vector = pgvector::Vector::from(c.vector.clone());
            let mut values: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(key.len() + 8);
            for k in &key {
                values.push(k);
            }
            values.extend_from_slice(&[
                &partition, &major, &minor, &seq, &start, &end, &c.text, &vector,
            ]);
            writer
                .as_mut()
                .write(&values)
                .await
                .map_err(PgvectorError::from_pg)?;
        }
    }
    writer.finish().await.map_err(PgvectorError::from_pg)?;
    let storage = if config.halfvec { "halfvec" } else { "vector" };
    let main = &target.qualified;
    // The row holds this change (not a newer one): the complement of the merge's "newer".
    let current = "(t._pos_partition IS DISTINCT FROM s._pos_partition \
                   OR (t._pos_major, t._pos_minor) <= (s._pos_major, s._pos_minor))";
    let key_names: Vec<String> = target.keys.iter().map(|(k, _)| quote_ident(k)).collect();
    let key_values: Vec<String> = target
        .keys
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("s.k{i}::{ty}"))
        .collect();
    tx.batch_execute(&format!(
        "DELETE FROM {chunks_table} c USING {stage} s, {main} t
          WHERE {c_s} AND {t_s} AND {current};
         INSERT INTO {chunks_table} ({keys}, chunk_seq, chunk_start, chunk_end, chunk, embedding)
         SELECT {vals}, s.chunk_seq, s.chunk_start, s.chunk_end, s.chunk, s.embedding::{storage}
           FROM {stage} s JOIN {main} t ON {t_s}
          WHERE {current};
         DROP TABLE {stage}",
        c_s = target.key_match("c", "s"),
        t_s = target.key_match("t", "s"),
        keys = key_names.join(", "),
        vals = key_values.join(", "),
    ))
    .await
    .map_err(PgvectorError::from_pg)
}
