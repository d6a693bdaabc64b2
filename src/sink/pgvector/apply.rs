//! Applying one batch inside a transaction: staging by binary COPY, the MERGE, positions, and
//! the row-by-row retry that isolates rows the database rejects (see the module doc of
//! [`super`] for the guarantees this implements).

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient};

use super::jsonb::JsonbText;
use super::table::{Target, key_text, positions_table};
use super::{PgvectorError, WriteOutcome, chunks, load};
use crate::config::PgvectorSinkConfig as Config;
use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Op, Position, StreamId, Value, json_string, write_json_str};
use crate::pg::quote_ident;

pub(super) fn group_by_source<'a>(
    events: &[&'a ChangeEvent],
) -> Vec<(&'a str, Vec<&'a ChangeEvent>)> {
    let mut groups: Vec<(&str, Vec<&ChangeEvent>)> = Vec::new();
    for e in events {
        match groups.iter_mut().find(|(s, _)| *s == e.source) {
            Some((_, g)) => g.push(e),
            None => groups.push((e.source.as_str(), vec![e])),
        }
    }
    groups
}

pub(super) async fn apply_row_by_row(
    client: &mut Client,
    config: &Config,
    targets: &HashMap<String, Target>,
    events: &[&ChangeEvent],
    seq: &mut u64,
) -> Result<WriteOutcome, PgvectorError> {
    let mut tx = client.transaction().await.map_err(PgvectorError::from_pg)?;
    let mut outcome = WriteOutcome::default();
    for e in events {
        let Some(target) = targets.get(&e.source) else {
            continue; // a truncate of a table that was never created
        };
        let mut sp = tx.savepoint("row").await.map_err(PgvectorError::from_pg)?;
        match apply_source(&mut sp, config, target, &[*e], seq).await {
            Ok(n) => {
                sp.commit().await.map_err(PgvectorError::from_pg)?;
                outcome.applied += n;
            }
            Err(PgvectorError::Data(msg)) => {
                sp.rollback().await.map_err(PgvectorError::from_pg)?;
                let key = serde_json::to_string(&e.key.to_json()).ok();
                let raw = serde_json::to_vec(e).unwrap_or_default();
                outcome.dead_letters.push(DeadLetter::new(
                    e.source.clone(),
                    e.position.clone(),
                    key,
                    &raw,
                    format!("pgvector sink rejected the row: {msg}"),
                ));
            }
            Err(other) => return Err(other),
        }
    }
    record_positions(&tx, config, events).await?;
    tx.commit().await.map_err(PgvectorError::from_pg)?;
    metrics::counter!("tributary_dead_letters_total", "stage" => "pgvector")
        .increment(outcome.dead_letters.len() as u64);
    Ok(outcome)
}

pub(super) async fn record_positions(
    tx: &impl GenericClient,
    config: &Config,
    events: &[&ChangeEvent],
) -> Result<(), PgvectorError> {
    let mut last: HashMap<(&str, StreamId), &Position> = HashMap::new();
    for e in events {
        // Events arrive in order per stream, so the last one seen is the highest.
        last.insert((e.source.as_str(), e.position.stream()), &e.position);
    }
    let sql = format!(
        "INSERT INTO {} (source, stream, position) VALUES ($1, $2, $3)
         ON CONFLICT (source, stream) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
        positions_table(&config.schema)
    );
    for ((source, stream), position) in last {
        let json = serde_json::to_value(position)
            .map_err(|e| PgvectorError::Data(format!("position {position}: {e}")))?;
        tx.execute(&sql, &[&source, &stream.to_string(), &json])
            .await
            .map_err(PgvectorError::from_pg)?;
    }
    Ok(())
}

/// A position as the three sortable columns rows carry: (partition, major, minor). Postgres:
/// (NULL, commit LSN, ordinal); Kafka: (partition, offset, 0).
fn position_columns(p: &Position) -> (Option<i32>, i64, i64) {
    (p.stream.partition(), p.major, p.minor)
}

/// For an update whose old key (sent by the source when the key changed) differs from its new
/// key: a delete of the old key at the same position.
fn moved_from(target: &Target, e: &ChangeEvent) -> Option<ChangeEvent> {
    if e.op != Op::Update {
        return None;
    }
    let before = e.before.as_ref()?;
    let mut old_key = crate::event::Row::new();
    for (k, _) in &target.keys {
        old_key.push(k.clone(), before.get(k)?.clone());
    }
    let changed = target
        .keys
        .iter()
        .any(|(k, _)| old_key.get(k) != e.key.get(k));
    changed.then(|| ChangeEvent {
        op: Op::Delete,
        key: old_key,
        after: None,
        embedding: None,
        text_hash: None,
        chunks: None,
        schema: None,
        origin: None,
        ..e.clone()
    })
}

/// Applies one source's events (in order) inside `tx`; returns how many rows were staged.
pub(super) async fn apply_source(
    tx: &mut tokio_postgres::Transaction<'_>,
    config: &Config,
    target: &Target,
    events: &[&ChangeEvent],
    seq: &mut u64,
) -> Result<usize, PgvectorError> {
    // A truncate wipes everything before it.
    let start = match events.iter().rposition(|e| e.op == Op::Truncate) {
        Some(i) => {
            let tables = match &target.chunks {
                Some(chunks) => format!("{}, {chunks}", target.qualified),
                None => target.qualified.clone(),
            };
            tx.batch_execute(&format!("TRUNCATE {tables}"))
                .await
                .map_err(PgvectorError::from_pg)?;
            i + 1
        }
        None => 0,
    };
    // A change's unchanged-TOAST values take the values of the same row's earlier change in the
    // batch (under its old key, for a moved row), so collapsing to the last change loses none.
    let key_of = |row: &crate::event::Row| -> Vec<Option<String>> {
        target
            .keys
            .iter()
            .map(|(k, _)| row.get(k).and_then(key_text))
            .collect()
    };
    let mut latest: HashMap<Vec<Option<String>>, usize> = HashMap::new();
    let mut merged: Vec<Cow<'_, ChangeEvent>> = Vec::with_capacity(events.len() - start);
    for e in &events[start..] {
        let key = key_of(&e.key);
        let from = latest.get(&key).copied().or_else(|| {
            let old = crate::enrich::toast::old_key(e)?;
            latest.get(&key_of(&old)).copied()
        });
        let row = match from {
            Some(i) => inherited(&merged[i], e),
            None => Cow::Borrowed(*e),
        };
        if e.op == Op::Delete {
            latest.remove(&key);
        } else {
            latest.insert(key, merged.len());
        }
        merged.push(row);
    }
    // An update that changed the key removes the row under the old key first.
    let old_keys: Vec<Option<ChangeEvent>> = merged.iter().map(|e| moved_from(target, e)).collect();
    let ordered: Vec<&ChangeEvent> = merged
        .iter()
        .zip(&old_keys)
        .flat_map(|(e, old)| old.iter().chain(std::iter::once(e.as_ref())))
        .collect();
    // Only the last change per key matters.
    let mut last: HashMap<Vec<Option<String>>, usize> = HashMap::new();
    let mut rows = Vec::new();
    for e in &ordered {
        let key: Vec<Option<String>> = target
            .keys
            .iter()
            .map(|(k, _)| e.key.get(k).and_then(key_text))
            .collect();
        if key.iter().any(Option::is_none) {
            return Err(PgvectorError::Data(format!(
                "{} at {}: key {} lacks a value for one of {:?}",
                e.source,
                e.position,
                e.key.to_json(),
                target.keys.iter().map(|k| &k.0).collect::<Vec<_>>()
            )));
        }
        if let Some(v) = &e.embedding
            && v.len() != config.dimension as usize
        {
            return Err(PgvectorError::Data(format!(
                "{} at {}: embedding has {} dimensions but {} is vector({})",
                e.source,
                e.position,
                v.len(),
                target.qualified,
                config.dimension
            )));
        }
        match last.get(&key) {
            Some(&i) => rows[i] = (key, *e),
            None => {
                last.insert(key.clone(), rows.len());
                rows.push((key, *e));
            }
        }
    }
    if rows.is_empty() {
        return Ok(0);
    }
    let events: Vec<&ChangeEvent> = rows.iter().map(|(_, e)| *e).collect();
    *seq += 1;
    if load::try_direct_copy(tx, config, target, &events).await? {
        chunks::write(tx, config, target, &events, *seq).await?;
        return Ok(rows.len());
    }
    let stage = format!("_tributary_stage_{seq}");
    let key_cols: Vec<String> = (0..target.keys.len())
        .map(|i| format!("k{i} text"))
        .collect();
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE {stage} (
           _op text NOT NULL, {keys}, payload jsonb, toast_keys text[], embedding vector,
           text_hash bigint, _pos_partition integer, _pos_major bigint NOT NULL,
           _pos_minor bigint NOT NULL, _source_ts timestamptz
         ) ON COMMIT DROP",
        keys = key_cols.join(", ")
    ))
    .await
    .map_err(PgvectorError::from_pg)?;
    let types = column_types(tx, &format!("SELECT * FROM {stage}")).await?;
    let sink = tx
        .copy_in::<_, Bytes>(&format!("COPY {stage} FROM STDIN (FORMAT binary)"))
        .await
        .map_err(PgvectorError::from_pg)?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    let mut has_toast = false;
    for (key, e) in &rows {
        let op = if e.op == Op::Delete { "d" } else { "u" };
        let tail = RowTail::new(config, e);
        has_toast |= tail.toast_keys.is_some();
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![&op];
        for k in key {
            values.push(k);
        }
        values.push(&tail.payload);
        values.push(&tail.toast_keys);
        tail.push_after_payload(&mut values);
        writer
            .as_mut()
            .write(&values)
            .await
            .map_err(PgvectorError::from_pg)?;
    }
    writer.finish().await.map_err(PgvectorError::from_pg)?;
    merge(tx, config, target, &stage, has_toast).await?;
    tx.batch_execute(&format!("DROP TABLE {stage}"))
        .await
        .map_err(PgvectorError::from_pg)?;
    chunks::write(tx, config, target, &events, *seq).await?;
    Ok(rows.len())
}

/// `later` with what it leaves to the stored row taken from `earlier` (a change of the same row
/// before it in the batch), which only the last change per key reaches the table: its
/// unchanged-TOAST values, and the chunks of an unchanged text (the stored rows are older).
fn inherited<'a>(earlier: &ChangeEvent, later: &'a ChangeEvent) -> Cow<'a, ChangeEvent> {
    let inherits_chunks = later.chunks.is_none()
        && earlier.chunks.is_some()
        && later.after.is_some()
        && later.text_hash.is_some()
        && later.text_hash == earlier.text_hash;
    let (Some(after), Some(before)) = (&later.after, &earlier.after) else {
        return Cow::Borrowed(later);
    };
    if !after.has_unchanged_toast() && !inherits_chunks {
        return Cow::Borrowed(later);
    }
    let mut merged = later.clone();
    if inherits_chunks {
        merged.chunks.clone_from(&earlier.chunks);
        if merged.embedding.is_none() {
            merged.embedding.clone_from(&earlier.embedding);
        }
    }
    if let Some(row) = merged.after.as_mut() {
        for c in row.columns_mut() {
            if c.value == Value::UnchangedToast
                && let Some(v) = before.get(&c.name)
            {
                c.value = v.clone();
            }
        }
    }
    Cow::Owned(merged)
}

/// The types of a query's result columns: what a binary COPY into those columns must send.
pub(super) async fn column_types(
    client: &impl GenericClient,
    query: &str,
) -> Result<Vec<tokio_postgres::types::Type>, PgvectorError> {
    Ok(client
        .prepare(query)
        .await
        .map_err(PgvectorError::from_pg)?
        .columns()
        .iter()
        .map(|c| c.type_().clone())
        .collect())
}

/// The columns a row carries after its key, as sent by binary COPY (staging and bulk load).
pub(super) struct RowTail<'e> {
    pub payload: Option<JsonbText>,
    /// Names of unchanged-TOAST columns (staging only: the bulk load never sees them).
    pub toast_keys: Option<Vec<String>>,
    embedding: Option<pgvector::Vector>,
    text_hash: Option<i64>,
    partition: Option<i32>,
    major: i64,
    minor: i64,
    source_ts: &'e Option<chrono::DateTime<chrono::Utc>>,
}

impl<'e> RowTail<'e> {
    pub fn new(config: &Config, e: &'e ChangeEvent) -> Self {
        let (payload, toast_keys) = payload_of(config, e);
        let (partition, major, minor) = position_columns(&e.position);
        RowTail {
            payload,
            toast_keys,
            embedding: e.embedding.clone().map(pgvector::Vector::from),
            text_hash: e.text_hash.map(|h| h as i64),
            partition,
            major,
            minor,
            source_ts: &e.source_ts,
        }
    }

    /// Appends, in table order, the columns that follow `payload`.
    pub fn push_after_payload<'a>(&'a self, values: &mut Vec<&'a (dyn ToSql + Sync)>) {
        values.extend_from_slice(&[
            &self.embedding,
            &self.text_hash,
            &self.partition,
            &self.major,
            &self.minor,
            self.source_ts,
        ]);
    }
}

/// The row's payload (selected columns as jsonb, numbers as the source wrote them) and the
/// names of its unchanged-TOAST columns, whose stored values the merge keeps.
fn payload_of(config: &Config, e: &ChangeEvent) -> (Option<JsonbText>, Option<Vec<String>>) {
    let Some(after) = &e.after else {
        return (None, None);
    };
    let mut out = Vec::with_capacity(32 * after.len() + 2);
    out.push(b'{');
    let mut toast = Vec::new();
    for c in after.columns() {
        if !config.keeps_in_payload(&e.source, &c.name) {
            continue;
        }
        match &c.value {
            Value::UnchangedToast => toast.push(c.name.to_string()),
            v => {
                if out.len() > 1 {
                    out.push(b',');
                }
                write_json_str(&mut out, &c.name);
                out.push(b':');
                v.write_json(&mut out);
            }
        }
    }
    out.push(b'}');
    (
        Some(JsonbText(json_string(out))),
        (!toast.is_empty()).then_some(toast),
    )
}

async fn merge(
    tx: &impl GenericClient,
    config: &Config,
    target: &Target,
    stage: &str,
    has_toast: bool,
) -> Result<(), PgvectorError> {
    let t = &target.qualified;
    let on = target.key_match("t", "s");
    let storage = if config.halfvec { "halfvec" } else { "vector" };
    let key_names: Vec<String> = target.keys.iter().map(|(k, _)| quote_ident(k)).collect();
    let key_values: Vec<String> = target
        .keys
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("s.k{i}::{ty}"))
        .collect();
    let newer = "(t._pos_partition IS DISTINCT FROM s._pos_partition \
                 OR (t._pos_major, t._pos_minor) < (s._pos_major, s._pos_minor))";
    if has_toast {
        // Unchanged TOAST columns take their stored values before the merge compares payloads.
        tx.batch_execute(&format!(
            "UPDATE {stage} s
                SET payload = s.payload || COALESCE(
                      (SELECT jsonb_object_agg(k, t.payload -> k) FROM unnest(s.toast_keys) k
                        WHERE t.payload ? k), '{{}}'::jsonb)
               FROM {t} t
              WHERE s.toast_keys IS NOT NULL AND {on}"
        ))
        .await
        .map_err(PgvectorError::from_pg)?;
    }
    let sql = format!(
        "MERGE INTO {t} t USING {stage} s ON {on}
         WHEN MATCHED AND s._op = 'd' AND {newer} THEN DELETE
         WHEN MATCHED AND s._op = 'u' AND {newer}
              AND (t.payload IS DISTINCT FROM s.payload
                   OR (s.embedding IS NOT NULL AND t.embedding IS DISTINCT FROM s.embedding::{storage}))
           THEN UPDATE SET payload = s.payload,
                embedding = COALESCE(s.embedding::{storage}, t.embedding),
                text_hash = COALESCE(s.text_hash, t.text_hash),
                _pos_partition = s._pos_partition, _pos_major = s._pos_major,
                _pos_minor = s._pos_minor, _source_ts = s._source_ts, _updated_at = now()
         WHEN NOT MATCHED AND s._op = 'u' THEN
           INSERT ({keys}, payload, embedding, text_hash, _pos_partition, _pos_major, _pos_minor, _source_ts)
           VALUES ({vals}, s.payload, s.embedding::{storage}, s.text_hash, s._pos_partition,
                   s._pos_major, s._pos_minor, s._source_ts)",
        keys = key_names.join(", "),
        vals = key_values.join(", "),
    );
    tx.batch_execute(&sql).await.map_err(PgvectorError::from_pg)
}
