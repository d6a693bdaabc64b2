//! The Bronze row layout: change events (and dead letters) as Arrow record batches.
//!
//! Every Bronze table has the same columns, so a batch from any source appends without a schema
//! change: the event's metadata, its position as two sortable integers, the row as a JSON string
//! (`_payload`), the old row (`_before`) when the source sent one, and the embedding as
//! `list<float32>`. Tables are partitioned by `_ingest_date`.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, Float32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use chrono::{DateTime, NaiveDate, Utc};

use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Position, Value};

/// The partition column of every Bronze and `_dlq` table.
pub const PARTITION_COLUMN: &str = "_ingest_date";

/// Position as two sortable integers: (commit LSN, ordinal) or (partition, offset).
pub fn position_parts(p: &Position) -> (i64, i64) {
    match p {
        Position::Lsn {
            commit_lsn,
            tx_ordinal,
        } => (commit_lsn.0 as i64, *tx_ordinal as i64),
        Position::Kafka {
            partition, offset, ..
        } => (i64::from(*partition), *offset),
    }
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn embedding_field() -> Field {
    Field::new(
        "embedding",
        DataType::List(Arc::new(Field::new("element", DataType::Float32, true))),
        true,
    )
}

/// The Arrow schema of a Bronze table.
pub fn bronze_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("_op", DataType::Utf8, false),
        Field::new("_source", DataType::Utf8, false),
        Field::new("_position_major", DataType::Int64, false),
        Field::new("_position_minor", DataType::Int64, false),
        Field::new("_source_ts", ts_type(), true),
        Field::new("_ingested_at", ts_type(), false),
        Field::new("_key", DataType::Utf8, true),
        Field::new("_payload", DataType::Utf8, true),
        Field::new("_before", DataType::Utf8, true),
        embedding_field(),
        Field::new(PARTITION_COLUMN, DataType::Date32, false),
    ]))
}

/// The Arrow schema of the `_dlq` table.
pub fn dlq_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("_source", DataType::Utf8, false),
        Field::new("_position", DataType::Utf8, false),
        Field::new("_position_major", DataType::Int64, false),
        Field::new("_position_minor", DataType::Int64, false),
        Field::new("_key", DataType::Utf8, true),
        Field::new("raw_base64", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("rejected_at", ts_type(), false),
        Field::new(PARTITION_COLUMN, DataType::Date32, false),
    ]))
}

fn days_since_epoch(t: DateTime<Utc>) -> i32 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    (t.date_naive() - epoch).num_days() as i32
}

/// A row as a JSON object; an unchanged TOASTed column is resolved from `before` when it holds the
/// column, else written as `{"unchanged_toast": true}` so it is never mistaken for a NULL.
fn row_json(row: &crate::event::Row, before: Option<&crate::event::Row>) -> String {
    let mut obj = serde_json::Map::new();
    for c in row.columns() {
        let v = match &c.value {
            Value::UnchangedToast => match before.and_then(|b| b.get(&c.name)) {
                Some(v) if !matches!(v, Value::UnchangedToast) => v.to_json(),
                _ => serde_json::json!({"unchanged_toast": true}),
            },
            other => other.to_json(),
        };
        obj.insert(c.name.clone(), v);
    }
    serde_json::Value::Object(obj).to_string()
}

/// Builds one Bronze record batch from events, all stamped with the same ingest time.
pub fn events_to_batch(
    events: &[&ChangeEvent],
    ingested_at: DateTime<Utc>,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = events.len();
    let mut op = StringBuilder::with_capacity(n, n * 8);
    let mut source = StringBuilder::with_capacity(n, n * 16);
    let mut major = Int64Builder::with_capacity(n);
    let mut minor = Int64Builder::with_capacity(n);
    let mut source_ts = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut ingested = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut key = StringBuilder::with_capacity(n, n * 16);
    let mut payload = StringBuilder::with_capacity(n, n * 128);
    let mut before = StringBuilder::with_capacity(n, 0);
    let mut embedding = ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new(
        "element",
        DataType::Float32,
        true,
    )));
    let mut date = Date32Builder::with_capacity(n);
    let day = days_since_epoch(ingested_at);
    for e in events {
        op.append_value(e.op.as_str());
        source.append_value(&e.source);
        let (a, b) = position_parts(&e.position);
        major.append_value(a);
        minor.append_value(b);
        source_ts.append_option(e.source_ts.map(|t| t.timestamp_micros()));
        ingested.append_value(ingested_at.timestamp_micros());
        if e.key.is_empty() {
            key.append_null();
        } else {
            key.append_value(e.key.to_json().to_string());
        }
        match &e.after {
            Some(row) => payload.append_value(row_json(row, e.before.as_ref())),
            None => payload.append_null(),
        }
        match &e.before {
            Some(row) => before.append_value(row_json(row, None)),
            None => before.append_null(),
        }
        match &e.embedding {
            Some(v) => {
                embedding.values().append_slice(v);
                embedding.append(true);
            }
            None => embedding.append(false),
        }
        date.append_value(day);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(op.finish()),
        Arc::new(source.finish()),
        Arc::new(major.finish()),
        Arc::new(minor.finish()),
        Arc::new(source_ts.finish()),
        Arc::new(ingested.finish()),
        Arc::new(key.finish()),
        Arc::new(payload.finish()),
        Arc::new(before.finish()),
        Arc::new(embedding.finish()),
        Arc::new(date.finish()),
    ];
    RecordBatch::try_new(bronze_schema(), columns)
}

/// Builds one `_dlq` record batch.
pub fn dead_letters_to_batch(
    letters: &[&DeadLetter],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = letters.len();
    let mut source = StringBuilder::with_capacity(n, n * 16);
    let mut pos = StringBuilder::with_capacity(n, n * 16);
    let mut major = Int64Builder::with_capacity(n);
    let mut minor = Int64Builder::with_capacity(n);
    let mut key = StringBuilder::with_capacity(n, n * 16);
    let mut raw = StringBuilder::with_capacity(n, n * 64);
    let mut error = StringBuilder::with_capacity(n, n * 64);
    let mut at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut date = Date32Builder::with_capacity(n);
    for d in letters {
        source.append_value(&d.source);
        pos.append_value(d.position.to_string());
        let (a, b) = position_parts(&d.position);
        major.append_value(a);
        minor.append_value(b);
        key.append_option(d.key.as_deref());
        raw.append_value(&d.raw_base64);
        error.append_value(&d.error);
        at.append_value(d.at.timestamp_micros());
        date.append_value(days_since_epoch(d.at));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(source.finish()),
        Arc::new(pos.finish()),
        Arc::new(major.finish()),
        Arc::new(minor.finish()),
        Arc::new(key.finish()),
        Arc::new(raw.finish()),
        Arc::new(error.finish()),
        Arc::new(at.finish()),
        Arc::new(date.finish()),
    ];
    RecordBatch::try_new(dlq_schema(), columns)
}
