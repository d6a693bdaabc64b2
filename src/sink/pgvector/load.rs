//! The bulk-load fast path: a batch of snapshot/insert rows goes straight into the target table
//! by binary COPY, without the staging table and merge (which write every row twice).
//!
//! It is only an optimisation: it runs under a savepoint, and if any key already exists (unique
//! violation) the savepoint is rolled back and the caller applies the batch through the merge,
//! which handles every case. An initial snapshot into a new table always takes this path.

use bytes::{Bytes, BytesMut};
use futures::pin_mut;
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::PgvectorError;
use super::apply::{RowTail, column_types};
use super::table::{Target, sql_type};
use crate::config::PgvectorSinkConfig as Config;
use crate::event::{ChangeEvent, Op, Value};
use crate::pg::quote_ident;

/// A key value sent in its own binary form; only for the key types [`supported`] accepts.
#[derive(Debug)]
struct KeyParam<'a>(&'a Value);

impl ToSql for KeyParam<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Value::Int16(v) => v.to_sql(ty, out),
            Value::Int32(v) => v.to_sql(ty, out),
            Value::Int64(v) => v.to_sql(ty, out),
            Value::Text(v) => v.as_str().to_sql(ty, out),
            Value::Uuid(v) => v.to_sql(ty, out),
            Value::Bool(v) => v.to_sql(ty, out),
            other => Err(format!("key value {other:?} has no binary form here").into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        [
            Type::INT2,
            Type::INT4,
            Type::INT8,
            Type::TEXT,
            Type::UUID,
            Type::BOOL,
        ]
        .contains(ty)
    }

    to_sql_checked!();
}

fn supported(v: &Value) -> bool {
    matches!(
        v,
        Value::Int16(_)
            | Value::Int32(_)
            | Value::Int64(_)
            | Value::Text(_)
            | Value::Uuid(_)
            | Value::Bool(_)
    )
}

/// Tries the fast path for `rows` (already deduplicated by key). `Ok(false)`: not applicable or
/// a key already existed — nothing was written, use the merge.
pub async fn try_direct_copy(
    tx: &mut Transaction<'_>,
    config: &Config,
    target: &Target,
    rows: &[&ChangeEvent],
) -> Result<bool, PgvectorError> {
    let applicable = !config.halfvec
        && rows.iter().all(|e| {
            matches!(e.op, Op::Snapshot | Op::Insert)
                && target.keys.iter().all(|(k, ty)| {
                    e.key
                        .get(k)
                        .is_some_and(|v| supported(v) && sql_type(v) == *ty)
                })
                && e.after
                    .as_ref()
                    .is_some_and(|a| a.columns().all(|c| c.value != Value::UnchangedToast))
        });
    if !applicable || rows.is_empty() {
        return Ok(false);
    }
    let sp = tx
        .savepoint("direct_load")
        .await
        .map_err(PgvectorError::from_pg)?;
    let keys: Vec<String> = target.keys.iter().map(|(k, _)| quote_ident(k)).collect();
    let columns = format!(
        "{}, payload, embedding, text_hash, _pos_partition, _pos_major, _pos_minor, _source_ts",
        keys.join(", ")
    );
    let types = column_types(&sp, &format!("SELECT {columns} FROM {}", target.qualified)).await?;
    let result = async {
        let sink = sp
            .copy_in::<_, Bytes>(&format!(
                "COPY {} ({columns}) FROM STDIN (FORMAT binary)",
                target.qualified
            ))
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(writer);
        for e in rows {
            let key_params: Vec<KeyParam<'_>> = target
                .keys
                .iter()
                .filter_map(|(k, _)| e.key.get(k).map(KeyParam))
                .collect();
            let tail = RowTail::new(config, e);
            let mut values: Vec<&(dyn ToSql + Sync)> = key_params
                .iter()
                .map(|k| k as &(dyn ToSql + Sync))
                .collect();
            values.push(&tail.payload);
            tail.push_after_payload(&mut values);
            writer.as_mut().write(&values).await?;
        }
        writer.finish().await
    }
    .await;
    match result {
        Ok(_) => {
            sp.commit().await.map_err(PgvectorError::from_pg)?;
            Ok(true)
        }
        Err(e) if e.code().is_some_and(|c| c.code() == "23505") => {
            // A key exists already (a replayed or resumed snapshot): the merge decides per row.
            sp.rollback().await.map_err(PgvectorError::from_pg)?;
            Ok(false)
        }
        Err(e) => {
            sp.rollback().await.map_err(PgvectorError::from_pg)?;
            Err(PgvectorError::from_pg(e))
        }
    }
}
