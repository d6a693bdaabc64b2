//! The Bronze row layout: change events (and dead letters) as Arrow record batches.
//!
//! Every Bronze table has the metadata columns ([`METADATA_COLUMNS`]): the event's operation and
//! source, its position as two sortable integers, source and ingest times, the key as JSON, the
//! old row (`_before`, JSON) when the source sent one, the embedding as `list<float32>`, and
//! what a Kafka message carried besides its key and value (`_headers`, `_kafka_ts`,
//! `_kafka_ts_type`, `_source_meta`: the Debezium `source` block as JSON; NULL for PostgreSQL).
//! When the source knows the row's columns (a PostgreSQL relation, a Kafka topic's declared
//! `columns`) each becomes a typed column of its own ([`arrow_type`]); whatever is not typed is
//! kept in `_payload` as a JSON object. Tables are partitioned by `_ingest_date`.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder,
    Int16Builder, Int32Builder, Int64Builder, ListArray, ListBuilder, RecordBatch, StringBuilder,
    StructArray, TimestampMicrosecondBuilder, new_null_array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, NaiveDate, Utc};

use crate::dead_letter::DeadLetter;
use crate::event::{
    ChangeEvent, Position, RowSchema, Value, ValueType, json_string, write_json_str,
};

/// The partition column of every Bronze and `_dlq` table.
pub const PARTITION_COLUMN: &str = "_ingest_date";

/// Position as the two sortable integers of `_position_major`/`_position_minor`: for a
/// partitioned stream (Kafka) the partition and the position in it (the offset), else the
/// position's own two parts (commit LSN, ordinal).
pub fn position_parts(p: &Position) -> (i64, i64) {
    match p.stream.partition() {
        Some(partition) => (i64::from(partition), p.major),
        None => (p.major, p.minor),
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
        Field::new("_headers", headers_type(), true),
        Field::new("_kafka_ts", ts_type(), true),
        Field::new("_kafka_ts_type", DataType::Utf8, true),
        Field::new("_source_meta", DataType::Utf8, true),
        Field::new(PARTITION_COLUMN, DataType::Date32, false),
    ]))
}

/// `_headers`: a Kafka message's headers in order, `list<struct<key: string, value: binary>>`
/// (a list, not a map: a key may repeat, and their order is kept; a value is any bytes or null).
fn headers_type() -> DataType {
    let entry = Fields::from(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Binary, true),
    ]);
    DataType::List(Arc::new(Field::new(
        "element",
        DataType::Struct(entry),
        true,
    )))
}

/// The Arrow schema of a Bronze table holding rows of `row` typed: the metadata columns, then one
/// nullable column per declared column (metadata names excepted), as the sink evolves it.
pub fn bronze_schema_for(row: &RowSchema) -> Arc<Schema> {
    let base = bronze_schema();
    let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
    for (name, ty) in &row.columns {
        if !METADATA_COLUMNS.contains(&name.as_str()) && !fields.iter().any(|f| f.name() == name) {
            fields.push(Field::new(name, arrow_type(*ty), true));
        }
    }
    Arc::new(Schema::new(fields))
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
fn row_json(row: &crate::event::Row, before: Option<&crate::event::Row>, out: &mut Vec<u8>) {
    out.clear();
    out.push(b'{');
    for (i, c) in row.columns().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_member(out, c, resolved(c, before));
    }
    out.push(b'}');
}

/// `"name":value` of a JSON object, for a column whose value is `value` once resolved.
fn write_member(out: &mut Vec<u8>, c: &crate::event::Column, value: Option<&Value>) {
    write_json_str(out, &c.name);
    out.push(b':');
    match value {
        Some(v) => v.write_json(out),
        None => out.extend_from_slice(UNCHANGED_TOAST_JSON.as_bytes()),
    }
}

/// The JSON just written to `buf` (UTF-8 by construction: `str`s and ASCII).
fn as_text(buf: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(buf)
}

/// What `_payload`/`_before` hold for an unchanged TOASTed value Tributary could not resolve.
const UNCHANGED_TOAST_JSON: &str = r#"{"unchanged_toast":true}"#;

/// Names of the columns Tributary itself writes to every Bronze table.
pub const METADATA_COLUMNS: [&str; 15] = [
    "_op",
    "_source",
    "_position_major",
    "_position_minor",
    "_source_ts",
    "_ingested_at",
    "_key",
    "_payload",
    "_before",
    "embedding",
    "_headers",
    "_kafka_ts",
    "_kafka_ts_type",
    "_source_meta",
    PARTITION_COLUMN,
];

/// The Arrow type a typed Bronze column gets for a source column type. Text-like types without
/// an exact Arrow/Delta counterpart (`numeric` of unknown precision, `uuid`, `json`, arrays) are
/// kept as their exact text.
pub fn arrow_type(t: ValueType) -> DataType {
    match t {
        ValueType::Bool => DataType::Boolean,
        ValueType::Int16 => DataType::Int16,
        ValueType::Int32 => DataType::Int32,
        ValueType::Int64 => DataType::Int64,
        ValueType::Float32 => DataType::Float32,
        ValueType::Float64 => DataType::Float64,
        ValueType::Numeric
        | ValueType::Text
        | ValueType::Uuid
        | ValueType::Json
        | ValueType::Array => DataType::Utf8,
        ValueType::Bytes => DataType::Binary,
        ValueType::Date => DataType::Date32,
        ValueType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        ValueType::TimestampTz => ts_type(),
        ValueType::Vector => {
            DataType::List(Arc::new(Field::new("element", DataType::Float32, true)))
        }
    }
}

/// Whether two Arrow types are the same column type (ignoring the nullability of list items and
/// the spelling of the UTC zone, which Delta round trips differently).
pub fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) => same_type(x.data_type(), y.data_type()),
        (DataType::Timestamp(u1, z1), DataType::Timestamp(u2, z2)) => {
            u1 == u2 && z1.is_some() == z2.is_some()
        }
        (DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8, y) => {
            matches!(y, DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8)
        }
        _ => a == b,
    }
}

/// A builder for one typed column.
enum Typed {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Text(StringBuilder),
    Binary(BinaryBuilder),
    Date(Date32Builder),
    /// Timestamp without time zone.
    Ts(TimestampMicrosecondBuilder),
    /// Timestamp in UTC.
    TsTz(TimestampMicrosecondBuilder),
    Vector(ListBuilder<Float32Builder>),
}

impl Typed {
    fn new(t: &DataType, n: usize) -> Option<Typed> {
        Some(match t {
            DataType::Boolean => Typed::Bool(BooleanBuilder::with_capacity(n)),
            DataType::Int16 => Typed::I16(Int16Builder::with_capacity(n)),
            DataType::Int32 => Typed::I32(Int32Builder::with_capacity(n)),
            DataType::Int64 => Typed::I64(Int64Builder::with_capacity(n)),
            DataType::Float32 => Typed::F32(Float32Builder::with_capacity(n)),
            DataType::Float64 => Typed::F64(Float64Builder::with_capacity(n)),
            DataType::Utf8 => Typed::Text(StringBuilder::with_capacity(n, n * 16)),
            DataType::Binary => Typed::Binary(BinaryBuilder::with_capacity(n, n * 16)),
            DataType::Date32 => Typed::Date(Date32Builder::with_capacity(n)),
            DataType::Timestamp(TimeUnit::Microsecond, None) => {
                Typed::Ts(TimestampMicrosecondBuilder::with_capacity(n))
            }
            DataType::Timestamp(TimeUnit::Microsecond, Some(zone)) => Typed::TsTz(
                TimestampMicrosecondBuilder::with_capacity(n).with_timezone(zone.clone()),
            ),
            DataType::List(item) if item.data_type() == &DataType::Float32 => {
                Typed::Vector(ListBuilder::new(Float32Builder::new()).with_field(item.clone()))
            }
            _ => return None,
        })
    }

    /// Appends `v` when it fits this column; `false` (and a null) when it does not, so the
    /// caller keeps the value in `_payload` instead.
    fn append(&mut self, v: Option<&Value>) -> bool {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            self.append_null();
            return true;
        };
        let fits = match (&mut *self, v) {
            (Typed::Bool(b), Value::Bool(x)) => {
                b.append_value(*x);
                true
            }
            (Typed::I16(b), Value::Int16(x)) => {
                b.append_value(*x);
                true
            }
            (Typed::I32(b), Value::Int32(x)) => {
                b.append_value(*x);
                true
            }
            (Typed::I64(b), Value::Int64(x)) => {
                b.append_value(*x);
                true
            }
            (Typed::F32(b), Value::Float32(x)) => {
                b.append_value(*x);
                true
            }
            (Typed::F64(b), Value::Float64(x)) => {
                b.append_value(*x);
                true
            }
            (Typed::Text(b), Value::Text(x) | Value::Numeric(x)) => {
                b.append_value(x);
                true
            }
            (Typed::Text(b), Value::Uuid(u)) => {
                b.append_value(u.to_string());
                true
            }
            (Typed::Text(b), Value::Json(j)) => {
                b.append_value(j.as_str());
                true
            }
            (Typed::Text(b), v @ Value::Array(_)) => {
                let mut out = Vec::new();
                v.write_json(&mut out);
                b.append_value(json_string(out));
                true
            }
            (Typed::Binary(b), Value::Bytes(x)) => {
                b.append_value(x);
                true
            }
            (Typed::Date(b), Value::Date(d)) => {
                b.append_value(days_since_epoch_naive(*d));
                true
            }
            (Typed::Ts(b), Value::Timestamp(t)) => {
                b.append_value(t.and_utc().timestamp_micros());
                true
            }
            (Typed::TsTz(b), Value::TimestampTz(t)) => {
                b.append_value(t.timestamp_micros());
                true
            }
            (Typed::Vector(b), Value::Vector(x)) => {
                b.values().append_slice(x);
                b.append(true);
                true
            }
            _ => false,
        };
        if !fits {
            self.append_null();
        }
        fits
    }

    fn append_null(&mut self) {
        match self {
            Typed::Bool(b) => b.append_null(),
            Typed::I16(b) => b.append_null(),
            Typed::I32(b) => b.append_null(),
            Typed::I64(b) => b.append_null(),
            Typed::F32(b) => b.append_null(),
            Typed::F64(b) => b.append_null(),
            Typed::Text(b) => b.append_null(),
            Typed::Binary(b) => b.append_null(),
            Typed::Date(b) => b.append_null(),
            Typed::Ts(b) | Typed::TsTz(b) => b.append_null(),
            Typed::Vector(b) => b.append(false),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Typed::Bool(b) => Arc::new(b.finish()),
            Typed::I16(b) => Arc::new(b.finish()),
            Typed::I32(b) => Arc::new(b.finish()),
            Typed::I64(b) => Arc::new(b.finish()),
            Typed::F32(b) => Arc::new(b.finish()),
            Typed::F64(b) => Arc::new(b.finish()),
            Typed::Text(b) => Arc::new(b.finish()),
            Typed::Binary(b) => Arc::new(b.finish()),
            Typed::Date(b) => Arc::new(b.finish()),
            Typed::Ts(b) | Typed::TsTz(b) => Arc::new(b.finish()),
            Typed::Vector(b) => Arc::new(b.finish()),
        }
    }
}

fn days_since_epoch_naive(d: NaiveDate) -> i32 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    (d - epoch).num_days() as i32
}

/// The value Bronze stores for column `c` of `row`: an unchanged TOASTed value is resolved from
/// `before` when it holds the column; `None` when it cannot be resolved.
fn resolved<'a>(
    c: &'a crate::event::Column,
    before: Option<&'a crate::event::Row>,
) -> Option<&'a Value> {
    match &c.value {
        Value::UnchangedToast => before
            .and_then(|b| b.get(&c.name))
            .filter(|v| !matches!(v, Value::UnchangedToast)),
        other => Some(other),
    }
}

/// Builds one Bronze record batch from events, all stamped with the same ingest time, in the
/// column layout of `schema` (the table's schema: the metadata columns plus any typed columns).
///
/// A row column goes to the typed column of its name when the table has one and the value fits
/// it; every other column (all of them for a table without typed columns, a value the source
/// could not convert, an unchanged TOASTed value that cannot be resolved — kept as
/// `{"unchanged_toast": true}`, never a NULL) goes to the `_payload` JSON object, which is NULL
/// when nothing is left over.
pub fn events_to_batch(
    events: &[&ChangeEvent],
    schema: &SchemaRef,
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
    let mut headers = HeadersBuilder::default();
    let mut kafka_ts = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut kafka_ts_type = StringBuilder::with_capacity(n, 0);
    let mut source_meta = StringBuilder::with_capacity(n, 0);
    // The table's typed columns, in schema order.
    let mut typed: Vec<(usize, &str, Typed)> = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        if METADATA_COLUMNS.contains(&f.name().as_str()) {
            continue;
        }
        let builder = Typed::new(f.data_type(), n).ok_or_else(|| {
            arrow::error::ArrowError::SchemaError(format!(
                "column {:?} has type {}, which Bronze cannot fill",
                f.name(),
                f.data_type()
            ))
        })?;
        typed.push((i, f.name().as_str(), builder));
    }
    let day = days_since_epoch(ingested_at);
    let mut filled = vec![false; typed.len()];
    // One buffer for the JSON of every `_key`, `_payload` and `_before`.
    let mut buf = Vec::with_capacity(256);
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
            buf.clear();
            e.key.write_json(&mut buf);
            key.append_value(as_text(&buf));
        }
        filled.iter_mut().for_each(|f| *f = false);
        match &e.after {
            Some(row) => {
                // The untyped remainder, as a JSON object in column order.
                buf.clear();
                buf.push(b'{');
                let mut members = 0usize;
                for c in row.columns() {
                    let value = resolved(c, e.before.as_ref());
                    let slot = typed.iter().position(|(_, name, _)| *name == c.name);
                    let stored = match (slot, value) {
                        (Some(i), Some(v)) if !filled[i] => {
                            filled[i] = true;
                            typed[i].2.append(Some(v))
                        }
                        _ => false,
                    };
                    if !stored {
                        if members > 0 {
                            buf.push(b',');
                        }
                        write_member(&mut buf, c, value);
                        members += 1;
                    }
                }
                buf.push(b'}');
                if members == 0 && !typed.is_empty() {
                    payload.append_null();
                } else {
                    payload.append_value(as_text(&buf));
                }
            }
            None => payload.append_null(),
        }
        for (i, (_, _, b)) in typed.iter_mut().enumerate() {
            if !filled[i] {
                b.append_null();
            }
        }
        match &e.before {
            Some(row) => {
                row_json(row, None, &mut buf);
                before.append_value(as_text(&buf));
            }
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
        let origin = e.origin.as_deref();
        headers.append(origin.map(|o| o.headers.as_slice()));
        kafka_ts.append_option(
            origin
                .and_then(|o| o.timestamp)
                .map(|t| t.timestamp_micros()),
        );
        kafka_ts_type.append_option(origin.and_then(|o| o.timestamp_type).map(|t| t.as_str()));
        source_meta.append_option(
            origin
                .and_then(|o| o.source_meta.as_ref())
                .map(|j| j.as_str()),
        );
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let mut typed = typed.into_iter().peekable();
    for (i, f) in schema.fields().iter().enumerate() {
        let column: ArrayRef = match f.name().as_str() {
            "_op" => Arc::new(op.finish()),
            "_source" => Arc::new(source.finish()),
            "_position_major" => Arc::new(major.finish()),
            "_position_minor" => Arc::new(minor.finish()),
            "_source_ts" => Arc::new(source_ts.finish()),
            "_ingested_at" => Arc::new(ingested.finish()),
            "_key" => Arc::new(key.finish()),
            "_payload" => Arc::new(payload.finish()),
            "_before" => Arc::new(before.finish()),
            "embedding" => Arc::new(embedding.finish()),
            "_headers" => headers.finish(f.data_type())?,
            "_kafka_ts" => Arc::new(kafka_ts.finish()),
            "_kafka_ts_type" => Arc::new(kafka_ts_type.finish()),
            "_source_meta" => Arc::new(source_meta.finish()),
            PARTITION_COLUMN => Arc::new(date.finish()),
            _ => match typed.next_if(|(j, _, _)| *j == i) {
                Some((_, _, mut b)) => b.finish(),
                None => new_null_array(f.data_type(), n),
            },
        };
        columns.push(column);
    }
    RecordBatch::try_new(schema.clone(), columns)
}

/// One Kafka header: its key, and its value (any bytes, or none).
type Header = (String, Option<Vec<u8>>);

/// The `_headers` column, built as its parts: a list per event (NULL when the event has no
/// headers) of `(key, value)` structs.
#[derive(Default)]
struct HeadersBuilder {
    keys: StringBuilder,
    values: BinaryBuilder,
    offsets: Vec<i32>,
    valid: Vec<bool>,
    /// Headers appended so far (the end offset of the last list).
    entries: i32,
}

impl HeadersBuilder {
    fn append(&mut self, headers: Option<&[Header]>) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        let headers = headers.filter(|h| !h.is_empty());
        for (k, v) in headers.unwrap_or_default() {
            self.keys.append_value(k);
            self.values.append_option(v.as_deref());
            self.entries += 1;
        }
        self.offsets.push(self.entries);
        self.valid.push(headers.is_some());
    }

    /// The column as the table types it (its list item and struct fields as the table has them).
    fn finish(&mut self, ty: &DataType) -> Result<ArrayRef, arrow::error::ArrowError> {
        let bad = || {
            arrow::error::ArrowError::SchemaError(format!(
                "column \"_headers\" has type {ty}, not a list of (key, value) structs"
            ))
        };
        let DataType::List(item) = ty else {
            return Err(bad());
        };
        let DataType::Struct(fields) = item.data_type() else {
            return Err(bad());
        };
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        let entries = StructArray::try_new(
            fields.clone(),
            vec![
                Arc::new(self.keys.finish()) as ArrayRef,
                Arc::new(self.values.finish()) as ArrayRef,
            ],
            None,
        )?;
        let offsets = OffsetBuffer::new(std::mem::take(&mut self.offsets).into());
        let valid = NullBuffer::from(std::mem::take(&mut self.valid));
        self.entries = 0;
        Ok(Arc::new(ListArray::try_new(
            item.clone(),
            offsets,
            Arc::new(entries),
            Some(valid),
        )?))
    }
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
