//! The one event type every stage speaks.
//!
//! Both sources decode into [`ChangeEvent`]; the enrichment stage fills [`ChangeEvent::embedding`];
//! both sinks consume it. The types say what the sources really deliver:
//! - a column value is typed ([`Value`]), and a TOASTed column that an update did not touch is
//!   [`Value::UnchangedToast`], never a silent NULL;
//! - a position is a [`Position`]: a [`StreamId`] and two integers, comparable only within one
//!   stream (one replication slot, or one Kafka topic-partition): positions of different streams
//!   have no order, so `partial_cmp` says `None` rather than inventing one. Sinks never ask which
//!   source a position came from.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A column name: up to 24 bytes inline, so naming the columns of an event allocates nothing.
pub type Name = compact_str::CompactString;

/// Text of a [`Value::Text`] or [`Value::Numeric`]: up to 24 bytes inline (ids, codes, statuses,
/// amounts), so most short values of an event allocate nothing.
pub type Text = compact_str::CompactString;

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// A row read by the initial snapshot, before streaming began.
    Snapshot,
    Truncate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Snapshot => "snapshot",
            Op::Truncate => "truncate",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A PostgreSQL write-ahead-log position, shown the way PostgreSQL shows it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal halves like \"16/B374D848\"")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The stream a position belongs to: positions are totally ordered within one stream, and have
/// no order across streams.
///
/// A stream is named by its source (`postgres` for the replication slot, `kafka:{topic}` for a
/// topic) and, for a partitioned source, a partition. Its text form, `{name}` or
/// `{name}:{partition}` (`postgres`, `kafka:orders:3`), is what sinks persist (Delta `txn` app
/// ids, the pgvector `_tributary_positions.stream` column); so a name never ends in `:` and
/// digits. Sinks treat streams alike: a new source brings new names, no new variant to match.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    name: Arc<str>,
    partition: Option<i32>,
}

impl StreamId {
    pub fn new(name: impl Into<Arc<str>>, partition: Option<i32>) -> Self {
        StreamId {
            name: name.into(),
            partition,
        }
    }

    /// The source's name of the stream (`postgres`, `kafka:orders`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The partition, for a partitioned source (a Kafka topic-partition).
    pub fn partition(&self) -> Option<i32> {
        self.partition
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.partition {
            None => f.write_str(&self.name),
            Some(p) => write!(f, "{}:{p}", self.name),
        }
    }
}

impl FromStr for StreamId {
    type Err = std::convert::Infallible;

    /// The inverse of `Display`: a trailing `:{integer}` is the partition.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.rsplit_once(':') {
            Some((name, p)) if !name.is_empty() => match p.parse::<i32>() {
                Ok(p) => StreamId::new(name, Some(p)),
                Err(_) => StreamId::new(s, None),
            },
            _ => StreamId::new(s, None),
        })
    }
}

/// Where an event sits in its source: a stream and two integers, ordered (major, minor) within
/// the stream and not at all across streams (`partial_cmp` says `None` rather than inventing an
/// order). Each source says what its integers mean: PostgreSQL (commit LSN, ordinal in the
/// transaction), Kafka (offset, 0). Both are non-negative.
///
/// Serialised as `{"stream": "kafka:orders:3", "major": 41, "minor": 0}`. Positions written by
/// earlier versions (`{"kind": "lsn", "commit_lsn": "0/16B3748", "tx_ordinal": 2}`,
/// `{"kind": "kafka", "topic": …, "partition": …, "offset": …}`) still read back, as the same
/// positions: pgvector's `_tributary_positions` and dead letters hold them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub stream: StreamId,
    pub major: i64,
    pub minor: i64,
}

impl Position {
    pub fn new(stream: StreamId, major: i64, minor: i64) -> Self {
        Position {
            stream,
            major,
            minor,
        }
    }

    pub fn stream(&self) -> StreamId {
        self.stream.clone()
    }

    /// The position after which a stream has nothing: everything at `major` (the end of a
    /// PostgreSQL transaction).
    pub fn end_of(stream: StreamId, major: i64) -> Self {
        Position::new(stream, major, i64::MAX)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}.{}", self.stream, self.major, self.minor)
    }
}

impl PartialOrd for Position {
    /// `None` when the two positions belong to different streams.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        (self.stream == other.stream)
            .then(|| (self.major, self.minor).cmp(&(other.major, other.minor)))
    }
}

impl Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("Position", 3)?;
        st.serialize_field("stream", &self.stream.to_string())?;
        st.serialize_field("major", &self.major)?;
        st.serialize_field("minor", &self.minor)?;
        st.end()
    }
}

/// Every form a position was ever written in.
#[derive(Deserialize)]
#[serde(untagged)]
enum PositionForm {
    Flat {
        stream: String,
        major: i64,
        minor: i64,
    },
    /// Written by versions before flat positions: a PostgreSQL position.
    LegacyLsn {
        kind: LegacyKind,
        commit_lsn: Lsn,
        tx_ordinal: u64,
    },
    /// Written by versions before flat positions: a Kafka position.
    LegacyKafka {
        kind: LegacyKind,
        topic: String,
        partition: i32,
        offset: i64,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum LegacyKind {
    Lsn,
    Kafka,
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let to_i64 = |n: u64, what: &str| {
            i64::try_from(n).map_err(|_| serde::de::Error::custom(format!("{what} {n} too large")))
        };
        Ok(match PositionForm::deserialize(d)? {
            PositionForm::Flat {
                stream,
                major,
                minor,
            } => {
                let Ok(stream) = stream.parse();
                Position::new(stream, major, minor)
            }
            PositionForm::LegacyLsn {
                kind: LegacyKind::Lsn,
                commit_lsn,
                tx_ordinal,
            } => Position::new(
                StreamId::new("postgres", None),
                to_i64(commit_lsn.0, "LSN")?,
                to_i64(tx_ordinal, "ordinal")?,
            ),
            PositionForm::LegacyKafka {
                kind: LegacyKind::Kafka,
                topic,
                partition,
                offset,
            } => Position::new(
                StreamId::new(format!("kafka:{topic}"), Some(partition)),
                offset,
                0,
            ),
            _ => return Err(serde::de::Error::custom("position: unknown kind")),
        })
    }
}

/// A typed column value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Value {
    Null,
    Bool(bool),
    Int16(i16),
    Int32(i32),
    Int64(i64),
    Float32(f32),
    Float64(f64),
    /// Arbitrary-precision decimal, kept as its exact text (`numeric` has no lossless float).
    Numeric(Text),
    Text(Text),
    Bytes(Vec<u8>),
    Uuid(Uuid),
    Date(NaiveDate),
    Timestamp(NaiveDateTime),
    TimestampTz(DateTime<Utc>),
    Json(JsonText),
    Array(Vec<Value>),
    /// A pgvector `vector` (or an embedding carried in the source row).
    Vector(Vec<f32>),
    /// A TOASTed column the change did not touch: its value is whatever the row held before.
    UnchangedToast,
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value as JSON, for `_key`/`_payload` columns and templates. `UnchangedToast` has no
    /// JSON form of its own and must be resolved by the caller; here it maps to `null`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null | Value::UnchangedToast => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int16(i) => J::from(*i),
            Value::Int32(i) => J::from(*i),
            Value::Int64(i) => J::from(*i),
            Value::Float32(x) => J::from(f64::from(*x)),
            Value::Float64(x) => J::from(*x),
            Value::Numeric(s) | Value::Text(s) => J::String(s.to_string()),
            Value::Bytes(b) => {
                use base64::Engine as _;
                J::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            Value::Uuid(u) => J::String(u.to_string()),
            Value::Date(d) => J::String(d.to_string()),
            Value::Timestamp(t) => J::String(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
            Value::TimestampTz(t) => J::String(t.to_rfc3339()),
            Value::Json(j) => j.to_value(),
            Value::Array(items) => J::Array(items.iter().map(Value::to_json).collect()),
            Value::Vector(v) => J::Array(v.iter().map(|x| J::from(f64::from(*x))).collect()),
        }
    }

    /// Appends the JSON text of [`Value::to_json`] to `out` without building the tree (JSON
    /// values are copied as their text).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        // Writing into a Vec cannot fail.
        match self {
            Value::Null | Value::UnchangedToast => out.extend_from_slice(b"null"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Int16(i) => {
                let _ = serde_json::to_writer(&mut *out, i);
            }
            Value::Int32(i) => {
                let _ = serde_json::to_writer(&mut *out, i);
            }
            Value::Int64(i) => {
                let _ = serde_json::to_writer(&mut *out, i);
            }
            Value::Float32(x) => write_f64(out, f64::from(*x)),
            Value::Float64(x) => write_f64(out, *x),
            Value::Numeric(s) | Value::Text(s) => write_json_str(out, s),
            Value::Bytes(b) => {
                use base64::Engine as _;
                out.push(b'"');
                let start = out.len();
                out.resize(start + base64::encoded_len(b.len(), true).unwrap_or(0), 0);
                let n = base64::engine::general_purpose::STANDARD
                    .encode_slice(b, &mut out[start..])
                    .unwrap_or(0);
                out.truncate(start + n);
                out.push(b'"');
            }
            // Their text forms need no escaping.
            Value::Uuid(u) => {
                let _ = write!(out, "\"{u}\"");
            }
            Value::Date(d) => {
                let _ = write!(out, "\"{d}\"");
            }
            Value::Timestamp(t) => {
                let _ = write!(out, "\"{}\"", t.format("%Y-%m-%dT%H:%M:%S%.f"));
            }
            Value::TimestampTz(t) => {
                let _ = write!(out, "\"{}\"", t.to_rfc3339());
            }
            Value::Json(j) => out.extend_from_slice(j.as_str().as_bytes()),
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write_json(out);
                }
                out.push(b']');
            }
            Value::Vector(v) => {
                out.push(b'[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_f64(out, f64::from(*x));
                }
                out.push(b']');
            }
        }
    }
}

/// A JSON string literal for `s`, escaped as `serde_json` escapes it.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a `str` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A number as `serde_json` writes it; like `serde_json::Value`, a non-finite one is `null`.
fn write_f64(out: &mut Vec<u8>, x: f64) {
    if x.is_finite() {
        let _ = serde_json::to_writer(&mut *out, &x);
    } else {
        out.extend_from_slice(b"null");
    }
}

/// A JSON document kept as its text (a Kafka message's nested value, PostgreSQL `json`/`jsonb`
/// output): valid JSON by construction, compared by text, parsed only when asked to. Carrying the
/// text instead of a `serde_json::Value` tree spares an allocation per nested key and value on
/// the way to Bronze, which stores JSON as text anyway.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JsonText(String);

impl JsonText {
    /// Checks that `text` is one JSON value and keeps it as written.
    pub fn parse(text: impl Into<String>) -> Result<Self, serde_json::Error> {
        let text = text.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&text)?;
        Ok(JsonText(text))
    }

    /// Text the caller has just written with `serde_json` (so known to be valid JSON).
    pub(crate) fn from_written(text: String) -> Self {
        JsonText(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The document as a `serde_json` tree.
    pub fn to_value(&self) -> serde_json::Value {
        // Valid by construction; a failure could only come from nesting deeper than serde_json's
        // recursion limit, shown as null rather than panicking.
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

impl From<serde_json::Value> for JsonText {
    fn from(value: serde_json::Value) -> Self {
        JsonText(value.to_string())
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Serialised as the JSON value itself (not as a string holding it).
impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(d).map(JsonText::from)
    }
}

/// The type of a column as the source declares it: what every non-null [`Value`] of that column
/// is (a value the source could not convert arrives as [`Value::Text`] and is kept untyped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Numeric,
    Text,
    Bytes,
    Uuid,
    Date,
    Timestamp,
    TimestampTz,
    Json,
    Array,
    Vector,
}

impl ValueType {
    /// Whether `value` is a non-null value of this type.
    pub fn matches(self, value: &Value) -> bool {
        matches!(
            (self, value),
            (ValueType::Bool, Value::Bool(_))
                | (ValueType::Int16, Value::Int16(_))
                | (ValueType::Int32, Value::Int32(_))
                | (ValueType::Int64, Value::Int64(_))
                | (ValueType::Float32, Value::Float32(_))
                | (ValueType::Float64, Value::Float64(_))
                | (ValueType::Numeric, Value::Numeric(_))
                | (ValueType::Text, Value::Text(_))
                | (ValueType::Bytes, Value::Bytes(_))
                | (ValueType::Uuid, Value::Uuid(_))
                | (ValueType::Date, Value::Date(_))
                | (ValueType::Timestamp, Value::Timestamp(_))
                | (ValueType::TimestampTz, Value::TimestampTz(_))
                | (ValueType::Json, Value::Json(_))
                | (ValueType::Array, Value::Array(_))
                | (ValueType::Vector, Value::Vector(_))
        )
    }
}

/// The columns a source knows a table (or topic) to have, with their types: the PostgreSQL
/// relation, or a topic's declared columns. Shared by every event of that shape.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RowSchema {
    pub columns: Vec<(String, ValueType)>,
}

/// One named column of a row or key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: Name,
    pub value: Value,
}

/// A row (or a key) in column order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Row(pub Vec<Column>);

impl Row {
    pub fn new() -> Self {
        Row(Vec::new())
    }

    pub fn push(&mut self, name: impl Into<Name>, value: Value) {
        self.0.push(Column {
            name: name.into(),
            value,
        });
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|c| c.name == name).map(|c| &c.value)
    }

    pub fn columns(&self) -> impl Iterator<Item = &Column> {
        self.0.iter()
    }

    pub fn columns_mut(&mut self) -> impl Iterator<Item = &mut Column> {
        self.0.iter_mut()
    }

    /// Replaces the value of column `name`, if the row has it; returns whether it did.
    pub fn set(&mut self, name: &str, value: Value) -> bool {
        match self.0.iter_mut().find(|c| c.name == name) {
            Some(c) => {
                c.value = value;
                true
            }
            None => false,
        }
    }

    /// Whether some column is an unchanged-TOAST value.
    pub fn has_unchanged_toast(&self) -> bool {
        self.0.iter().any(|c| c.value == Value::UnchangedToast)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The row as a JSON object (column order kept by `serde_json`'s map only if its
    /// `preserve_order` feature is on; consumers must not rely on key order).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|c| (c.name.to_string(), c.value.to_json()))
                .collect(),
        )
    }

    /// Appends the row as a JSON object in column order, the text [`Row::to_json`] describes.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_str(out, &c.name);
            out.push(b':');
            c.value.write_json(out);
        }
        out.push(b'}');
    }

    /// [`Row::write_json`] as a string.
    pub fn json_text(&self) -> String {
        let mut out = Vec::with_capacity(32 * self.0.len() + 2);
        self.write_json(&mut out);
        json_string(out)
    }
}

/// Text written by the JSON writers above (always UTF-8: every piece is a `str` or ASCII).
pub fn json_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl<S: Into<Name>> FromIterator<(S, Value)> for Row {
    fn from_iter<I: IntoIterator<Item = (S, Value)>>(iter: I) -> Self {
        Row(iter
            .into_iter()
            .map(|(name, value)| Column {
                name: name.into(),
                value,
            })
            .collect())
    }
}

/// One change, from either source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// The source table (`schema.table`) or Kafka topic; names the Bronze and pgvector tables.
    pub source: String,
    pub op: Op,
    /// Primary key (Postgres) or the configured key columns / message key (Kafka).
    pub key: Row,
    /// The row before the change, when the source sends it (updates/deletes; with REPLICA
    /// IDENTITY FULL the whole row, otherwise only the old key when the key changed).
    pub before: Option<Row>,
    /// The row after the change; `None` for deletes and truncates.
    pub after: Option<Row>,
    /// Bumped by the source each time the shape of `source` changes (Relation message, new
    /// declared schema); sinks use it to notice that they must evolve.
    pub schema_version: u32,
    pub position: Position,
    /// When the source committed the change (Postgres commit time, Kafka message timestamp).
    pub source_ts: Option<DateTime<Utc>>,
    /// Filled by the enrichment stage for sources that have a text template. `None` on such a
    /// source means "the text did not change: keep the stored vector".
    pub embedding: Option<Vec<f32>>,
    /// Content hash of the text the embedding was computed from (set with `embedding`), kept by
    /// the pgvector sink so a later unchanged text can reuse the stored vector.
    #[serde(default)]
    pub text_hash: Option<u64>,
    /// For a source whose texts are chunked into pgvector rows (`embedding.chunking`, `store =
    /// "rows"`): every chunk of the text `embedding` (their mean) came from. `None` means "keep
    /// the stored chunks", exactly as `embedding: None` does. An index concern: Bronze keeps one
    /// row per change and does not see them.
    #[serde(skip)]
    pub chunks: Option<Vec<Chunk>>,
    /// The row's declared columns when the source knows them (PostgreSQL always, Kafka when the
    /// topic declares `columns`); Bronze types those columns instead of keeping them as JSON.
    #[serde(skip)]
    pub schema: Option<std::sync::Arc<RowSchema>>,
    /// What the source said about the change beyond its row and position (Kafka headers and
    /// timestamp, the Debezium `source` block); `None` for PostgreSQL changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Box<Origin>>,
}

/// One window of a long text and its vector (see [`ChangeEvent::chunks`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// 0, 1, … in text order.
    pub seq: u32,
    /// Character offsets of the window in the rendered text: `text` is
    /// `substring(full from start + 1 for end - start)`.
    pub start: u32,
    pub end: u32,
    pub text: String,
    pub vector: Vec<f32>,
}

/// What a Kafka message carried besides its key and value, kept in Bronze (`_headers`,
/// `_kafka_ts`, `_kafka_ts_type`, `_source_meta`) for the audits and orderings a lakehouse
/// user needs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Origin {
    /// The message's headers in their order: a key may repeat, a value may be null or any bytes.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The message timestamp, and what it is.
    pub timestamp: Option<DateTime<Utc>>,
    pub timestamp_type: Option<TimestampType>,
    /// A Debezium envelope's `source` block (`lsn`, `txId`, `ts_ms`, `table`, …) as written.
    pub source_meta: Option<JsonText>,
}

/// What a Kafka message timestamp records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampType {
    /// Set by the producer when it created the message.
    CreateTime,
    /// Set by the broker when it appended the message to the log.
    LogAppendTime,
}

impl TimestampType {
    pub fn as_str(self) -> &'static str {
        match self {
            TimestampType::CreateTime => "create_time",
            TimestampType::LogAppendTime => "log_append_time",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn_pos(lsn: u64, ord: u64) -> Position {
        crate::source::postgres::position(Lsn(lsn), ord)
    }

    fn kafka_pos(topic: &str, partition: i32, offset: i64) -> Position {
        crate::source::kafka::position(topic, partition, offset)
    }

    #[test]
    fn lsn_positions_order_by_commit_then_ordinal() {
        assert!(lsn_pos(100, 5) < lsn_pos(101, 0));
        assert!(lsn_pos(100, 1) < lsn_pos(100, 2));
        assert_eq!(
            lsn_pos(7, 3).partial_cmp(&lsn_pos(7, 3)),
            Some(Ordering::Equal)
        );
        let mut v = vec![lsn_pos(3, 0), lsn_pos(1, 9), lsn_pos(1, 2), lsn_pos(2, 0)];
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(
            v,
            vec![lsn_pos(1, 2), lsn_pos(1, 9), lsn_pos(2, 0), lsn_pos(3, 0)]
        );
    }

    #[test]
    fn kafka_positions_order_within_a_partition_only() {
        assert!(kafka_pos("orders", 0, 9) < kafka_pos("orders", 0, 10));
        assert_eq!(
            kafka_pos("orders", 0, 1).partial_cmp(&kafka_pos("orders", 1, 2)),
            None
        );
        assert_eq!(
            kafka_pos("orders", 0, 1).partial_cmp(&kafka_pos("payments", 0, 2)),
            None
        );
        assert_eq!(lsn_pos(1, 0).partial_cmp(&kafka_pos("orders", 0, 0)), None);
        assert_eq!(
            kafka_pos("orders", 2, 5).stream(),
            StreamId::new("kafka:orders", Some(2))
        );
    }

    #[test]
    fn stream_ids_read_back_from_their_text() {
        for s in [
            StreamId::new("postgres", None),
            StreamId::new("kafka:orders", Some(3)),
            StreamId::new("kafka:2024", Some(0)),
            StreamId::new("kafka:a:b", Some(12)),
        ] {
            assert_eq!(s.to_string().parse::<StreamId>(), Ok(s.clone()), "{s}");
        }
        assert_eq!(
            "kafka:orders:3".parse::<StreamId>().unwrap().partition(),
            Some(3)
        );
        assert_eq!("postgres".parse::<StreamId>().unwrap().partition(), None);
    }

    #[test]
    fn positions_written_by_earlier_versions_read_back_as_the_same_positions() {
        let old_lsn =
            serde_json::json!({"kind": "lsn", "commit_lsn": "16/B374D848", "tx_ordinal": 7});
        let p: Position = serde_json::from_value(old_lsn).unwrap();
        assert_eq!(p, lsn_pos(0x16_B374_D848, 7));
        let old_kafka =
            serde_json::json!({"kind": "kafka", "topic": "orders", "partition": 2, "offset": 99});
        let p: Position = serde_json::from_value(old_kafka).unwrap();
        assert_eq!(p, kafka_pos("orders", 2, 99));
        // The flat form round-trips, and is what is written now.
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"stream": "kafka:orders:2", "major": 99, "minor": 0})
        );
        assert_eq!(serde_json::from_value::<Position>(v).unwrap(), p);
        let bad = serde_json::json!({"kind": "lsn", "topic": "x", "partition": 0, "offset": 1});
        assert!(serde_json::from_value::<Position>(bad).is_err());
    }

    #[test]
    fn lsn_text_form_round_trips_and_rejects_garbage() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        for bad in ["", "16", "16/", "x/1", "1/2/3", "100000000/0"] {
            let err = bad.parse::<Lsn>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    fn every_kind_ts() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:11:12.123456Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn every_kind_row() -> Row {
        let ts = every_kind_ts();
        [
            ("id", Value::Int64(42)),
            ("small", Value::Int16(-3)),
            ("mid", Value::Int32(70_000)),
            ("ok", Value::Bool(true)),
            ("ratio", Value::Float32(0.25)),
            ("amount", Value::Float64(12.5)),
            (
                "price",
                Value::Numeric("123456789012345678901234.5678".into()),
            ),
            ("note", Value::Text("héllo \"quoted\"".into())),
            ("blob", Value::Bytes(vec![0, 255, 7])),
            ("uid", Value::Uuid(Uuid::nil())),
            (
                "day",
                Value::Date(NaiveDate::from_ymd_opt(2026, 2, 28).unwrap()),
            ),
            ("local", Value::Timestamp(ts.naive_utc())),
            ("at", Value::TimestampTz(ts)),
            (
                "doc",
                Value::Json(serde_json::json!({"a": [1, null]}).into()),
            ),
            (
                "tags",
                Value::Array(vec![Value::Text("x".into()), Value::Null]),
            ),
            ("vec", Value::Vector(vec![0.5, -1.0])),
            ("big_text", Value::UnchangedToast),
            ("gone", Value::Null),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn event_round_trips_through_json_with_every_value_kind() {
        let ts = every_kind_ts();
        let after = every_kind_row();
        let event = ChangeEvent {
            source: "public.orders".into(),
            op: Op::Update,
            key: [("id", Value::Int64(42))].into_iter().collect(),
            before: Some([("id", Value::Int64(41))].into_iter().collect()),
            after: Some(after),
            schema_version: 3,
            position: lsn_pos(0x16_B374_D848, 7),
            source_ts: Some(ts),
            embedding: Some(vec![0.1, 0.2]),
            text_hash: Some(u64::MAX),
            chunks: None,
            schema: None,
            origin: None,
        };
        let json = serde_json::to_string(&event).unwrap();
        let back: ChangeEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event);
        // The unchanged-TOAST marker survives as itself, not as a NULL.
        let after = back.after.unwrap();
        assert_eq!(after.get("big_text"), Some(&Value::UnchangedToast));
        assert_ne!(after.get("big_text"), after.get("gone"));
        // Positions serialise readably.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["position"]["stream"], "postgres");
        assert_eq!(v["position"]["major"], 0x16_B374_D848_i64);
        assert_eq!(v["op"], "update");
    }

    #[test]
    fn kafka_event_round_trips() {
        let event = ChangeEvent {
            source: "orders".into(),
            op: Op::Delete,
            key: [("order_id", Value::Text("o-1".into()))]
                .into_iter()
                .collect(),
            before: None,
            after: None,
            schema_version: 0,
            position: kafka_pos("orders", 2, 99),
            source_ts: None,
            embedding: None,
            text_hash: None,
            chunks: None,
            schema: None,
            origin: None,
        };
        let back: ChangeEvent =
            serde_json::from_value(serde_json::to_value(&event).unwrap()).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.position.to_string(), "kafka:orders:2@99.0");
    }

    #[test]
    fn row_json_form_is_an_object_of_plain_values() {
        let row: Row = [
            ("id", Value::Int32(1)),
            ("blob", Value::Bytes(b"hi".to_vec())),
            ("t", Value::UnchangedToast),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            row.to_json(),
            serde_json::json!({"id": 1, "blob": "aGk=", "t": null})
        );
    }

    #[test]
    fn json_text_of_a_row_is_its_json_form_in_column_order() {
        let row = every_kind_row();
        let text = row.json_text();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, row.to_json());
        // Column order is kept (the tree form sorts keys).
        assert!(
            text.starts_with(r#"{"id":42,"small":-3,"mid":70000,"ok":true,"#),
            "{text}"
        );
        // JSON values are embedded as JSON, not as strings; non-finite floats are null.
        assert!(text.contains(r#""doc":{"a":[1,null]}"#), "{text}");
        let odd: Row = [("x", Value::Float64(f64::NAN)), ("y", Value::Float32(0.5))]
            .into_iter()
            .collect();
        assert_eq!(odd.json_text(), r#"{"x":null,"y":0.5}"#);
        assert!(JsonText::parse("{\"a\": [1, 2]}").is_ok());
        assert!(JsonText::parse("{\"a\": ").is_err());
    }
}
