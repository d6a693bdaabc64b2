//! Kafka message → [`ChangeEvent`], one format per topic, with no I/O.
//!
//! Decoding is a pure function of the message so that it can be unit-tested and benchmarked apart
//! from the consumer. Every way a message can be unusable is a [`DecodeError`] whose text names the
//! problem and the field; the consumer turns it into a dead letter and goes on. A Debezium
//! tombstone (a null value after a delete) is recognised and yields [`Decoded::Tombstone`], which
//! carries nothing to write but whose offset still counts as processed. A Debezium envelope that
//! carries its Kafka Connect schema is decoded by that schema ([`super::connect`]).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value as J};

use super::connect::{EnvelopeSchema, SchemaCache};
use super::envelope::{self, Image, Images};
use super::registry::avro::Datum;
use super::registry::{Compiled, FetchError, Registry, wire};
use crate::config::{ColumnType, MessageFormat, TopicConfig};
use crate::event::{
    ChangeEvent, JsonText, Name, Op, Origin, Position, Row, RowSchema, StreamId, TimestampType,
    Value, ValueType,
};

/// A consumed message, borrowed from the client.
#[derive(Debug, Clone)]
pub struct RawMessage<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// Message timestamp (create or log-append time), milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// What the timestamp records.
    pub timestamp_type: Option<TimestampType>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// What the Kafka message carried beyond the row: kept for Bronze.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KafkaMeta {
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The Kafka message timestamp.
    pub timestamp: Option<DateTime<Utc>>,
    /// Debezium `source.lsn` (PostgreSQL connector), when present.
    pub source_lsn: Option<i64>,
    /// Debezium `source.ts_ms`: when the change was committed in the origin database.
    pub source_ts_ms: Option<i64>,
    /// Debezium envelope `ts_ms`: when the connector processed the change.
    pub envelope_ts_ms: Option<i64>,
    /// The Debezium `source` block, as JSON text.
    pub source_block: Option<JsonText>,
}

/// A decoded message with its Kafka metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaEvent {
    pub event: ChangeEvent,
    pub meta: KafkaMeta,
}

#[derive(Debug, Clone, PartialEq)]
// Moved once, into the batch: boxing it would cost an allocation (and a free on another core)
// per message.
#[allow(clippy::large_enum_variant)]
pub enum Decoded {
    Event(KafkaEvent),
    /// A Debezium tombstone: nothing to write, the offset is simply done.
    Tombstone,
}

/// Why a message cannot become an event. The text never quotes the message body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {size} bytes exceeds max_message_bytes ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("value is not valid UTF-8 (first invalid byte at {valid_up_to})")]
    InvalidUtf8 { valid_up_to: usize },
    #[error("value is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{what} must be a JSON object, found {found}")]
    NotAnObject {
        what: &'static str,
        found: &'static str,
    },
    #[error("key column {0:?} is missing or null")]
    MissingKey(String),
    #[error("message has no key and no key_columns are configured")]
    NoKey,
    #[error("column {column:?} is declared {expected} but holds {found}")]
    WrongType {
        column: String,
        expected: ColumnType,
        found: String,
    },
    /// A field of a Debezium envelope that its Kafka Connect schema does not describe.
    #[error("column {column:?} ({connect}): {problem}")]
    ConnectValue {
        column: String,
        /// The field's Connect type: its semantic name, else its literal type.
        connect: String,
        problem: String,
    },
    #[error("invalid Debezium envelope: {0}")]
    Envelope(String),
    /// A Schema Registry topic's message without the Confluent header.
    #[error("not Schema Registry framed: {0}")]
    Framing(String),
    #[error("schema id {0} is not in the Schema Registry")]
    UnknownSchema(u32),
    /// A schema the registry holds that cannot decode this topic's messages.
    #[error("{0}")]
    UnusableSchema(String),
    /// A payload that does not match the schema its id names.
    #[error("value (schema id {id}) {problem}")]
    SchemaMismatch { id: u32, problem: String },
    /// A JSON Schema check that failed (wrapped in `SchemaMismatch` with its id).
    #[error("{0}")]
    Schema(String),
}

impl DecodeError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::InvalidUtf8 { .. } => "invalid_utf8",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::NotAnObject { .. } => "not_an_object",
            DecodeError::MissingKey(_) | DecodeError::NoKey => "missing_key",
            DecodeError::WrongType { .. } | DecodeError::ConnectValue { .. } => "wrong_type",
            DecodeError::Envelope(_) => "invalid_envelope",
            DecodeError::Framing(_) => "not_framed",
            DecodeError::UnknownSchema(_) => "unknown_schema",
            DecodeError::UnusableSchema(_) => "unusable_schema",
            DecodeError::SchemaMismatch { .. } | DecodeError::Schema(_) => "schema_mismatch",
        }
    }
}

/// Decodes the messages of one topic.
#[derive(Debug, Clone)]
pub struct Decoder {
    format: MessageFormat,
    key_columns: Vec<String>,
    /// The declared columns and their types (a list: found faster than in a map while a
    /// message is parsed).
    declared: Vec<(Name, ColumnType)>,
    /// The declared columns as the event schema (`None` when the topic declares none).
    schema: Option<std::sync::Arc<RowSchema>>,
    /// Compiled Connect schemas of Debezium envelopes that carry one (shared by clones).
    connect: std::sync::Arc<SchemaCache>,
    max_bytes: usize,
    /// The topic, and its stream name (`kafka:{topic}`) built once: each position shares it.
    topic: String,
    stream_name: std::sync::Arc<str>,
    /// The Schema Registry of `avro` / `json_schema` / `protobuf` topics.
    registry: Option<std::sync::Arc<Registry>>,
}

impl Decoder {
    pub fn new(topic: &TopicConfig, max_message_bytes: usize) -> Self {
        Decoder {
            format: topic.format,
            key_columns: topic.key_columns.clone(),
            declared: topic
                .columns
                .iter()
                .map(|(n, t)| (Name::from(n.as_str()), *t))
                .collect(),
            schema: declared_schema(&topic.columns),
            connect: std::sync::Arc::default(),
            max_bytes: max_message_bytes,
            topic: topic.name.clone(),
            stream_name: super::stream(&topic.name, 0).name().into(),
            registry: None,
        }
    }

    /// This decoder, taking the schemas of framed messages from `registry`.
    pub fn with_registry(mut self, registry: Option<std::sync::Arc<Registry>>) -> Self {
        self.registry = registry;
        self
    }

    /// The schema id a framed message names when it is not fetched yet.
    pub fn missing_schema(&self, payload: Option<&[u8]>) -> Option<u32> {
        if !self.format.uses_registry() {
            return None;
        }
        let registry = self.registry.as_ref()?;
        payload
            .and_then(wire::schema_id)
            .filter(|id| registry.cached(*id).is_none())
    }

    /// Makes sure the schema a framed message names is fetched (retrying a registry outage
    /// until it answers), so that [`Decoder::decode`] finds it; nothing to do for other formats
    /// or unframed values (those are dead letters).
    pub async fn fetch_schema(&self, payload: Option<&[u8]>) -> Result<(), FetchError> {
        if !self.format.uses_registry() {
            return Ok(());
        }
        match (&self.registry, payload.and_then(wire::schema_id)) {
            (Some(registry), Some(id)) => {
                registry
                    .ensure(id, self.format == MessageFormat::Protobuf)
                    .await
            }
            _ => Ok(()),
        }
    }

    pub fn decode(&self, msg: &RawMessage<'_>) -> Result<Decoded, DecodeError> {
        let size = msg.payload.map_or(0, <[u8]>::len);
        if size > self.max_bytes {
            return Err(DecodeError::TooLarge {
                size,
                max: self.max_bytes,
            });
        }
        let mut meta = KafkaMeta {
            headers: msg.headers.clone(),
            timestamp: msg.timestamp_ms.and_then(DateTime::from_timestamp_millis),
            ..KafkaMeta::default()
        };
        let mut schema = (self.schema.clone(), 0);
        let (op, key, before, after) = match self.format {
            MessageFormat::Raw => self.raw(msg),
            MessageFormat::Json => self.json(msg)?,
            MessageFormat::Debezium => match self.debezium(msg, &mut meta, &mut schema)? {
                Some(parts) => parts,
                None => return Ok(Decoded::Tombstone),
            },
            MessageFormat::Avro | MessageFormat::JsonSchema | MessageFormat::Protobuf => {
                match self.registered(msg, &mut meta, &mut schema)? {
                    Some(parts) => parts,
                    None => return Ok(Decoded::Tombstone),
                }
            }
        };
        let source_ts = meta
            .source_ts_ms
            .and_then(DateTime::from_timestamp_millis)
            .or(meta.timestamp);
        let origin = Some(Box::new(Origin {
            headers: meta.headers.clone(),
            timestamp: meta.timestamp,
            timestamp_type: msg.timestamp_type.filter(|_| meta.timestamp.is_some()),
            source_meta: meta.source_block.clone(),
        }));
        Ok(Decoded::Event(KafkaEvent {
            event: ChangeEvent {
                source: msg.topic.to_owned(),
                op,
                key,
                before,
                after,
                schema_version: schema.1,
                position: self.position(msg),
                source_ts,
                embedding: None,
                text_hash: None,
                chunks: None,
                schema: schema.0,
                origin,
            },
            meta,
        }))
    }

    fn position(&self, msg: &RawMessage<'_>) -> Position {
        if msg.topic == self.topic {
            let stream = StreamId::new(self.stream_name.clone(), Some(msg.partition));
            Position::new(stream, msg.offset, 0)
        } else {
            super::position(msg.topic, msg.partition, msg.offset)
        }
    }

    fn raw(&self, msg: &RawMessage<'_>) -> Parts {
        let mut key = Row::new();
        if let Some(k) = msg.key {
            key.push("key", Value::Bytes(k.to_vec()));
        }
        let value = msg
            .payload
            .map_or(Value::Null, |p| Value::Bytes(p.to_vec()));
        let after: Row = [("value", value)].into_iter().collect();
        (Op::Insert, key, None, Some(after))
    }

    fn json(&self, msg: &RawMessage<'_>) -> Result<Parts, DecodeError> {
        let Some(payload) = msg.payload else {
            // A null value on a JSON topic is a compaction delete of the message key.
            if !self.key_columns.is_empty() {
                return Err(DecodeError::MissingKey(self.key_columns[0].clone()));
            }
            let key = message_key(msg.key)?.ok_or(DecodeError::NoKey)?;
            return Ok((Op::Delete, key, None, None));
        };
        let text = std::str::from_utf8(payload).map_err(|e| DecodeError::InvalidUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
        let row = super::row_json::parse_row(text, &self.declared, "message value")?;
        let key = self.key(msg.key, Some(&row))?;
        Ok((Op::Insert, key, None, Some(row)))
    }

    /// A Schema Registry framed message (`avro`, `json_schema`, `protobuf`); `None` for a tombstone. Sets
    /// `schema` to the rows' schema, versioned by the schema id.
    fn registered(
        &self,
        msg: &RawMessage<'_>,
        meta: &mut KafkaMeta,
        schema: &mut (Option<std::sync::Arc<RowSchema>>, u32),
    ) -> Result<Option<Parts>, DecodeError> {
        let Some(payload) = msg.payload else {
            // A null value: a Debezium tombstone when keyless, else a compaction delete.
            return match message_key(msg.key)? {
                Some(key) if self.key_columns.is_empty() => Ok(Some((Op::Delete, key, None, None))),
                _ => Ok(None),
            };
        };
        let (id, body) = wire::split(payload)?;
        let compiled = self
            .registry
            .as_ref()
            .and_then(|r| r.cached(id))
            .ok_or(DecodeError::UnknownSchema(id))?;
        let mismatch = |problem: String| DecodeError::SchemaMismatch { id, problem };
        match (self.format, &*compiled) {
            (_, Compiled::Unusable(reason)) => Err(DecodeError::UnusableSchema(reason.clone())),
            (MessageFormat::Avro, Compiled::Avro(avro)) => {
                *schema = (Some(avro.row_schema.clone()), id);
                match avro.decode(body).map_err(mismatch)? {
                    Datum::Row(row) => {
                        let key = self.key(msg.key, Some(&row))?;
                        Ok(Some((Op::Insert, key, None, Some(row))))
                    }
                    Datum::Envelope {
                        op,
                        before,
                        after,
                        source_lsn,
                        source_ts_ms,
                        ts_ms,
                    } => {
                        meta.source_lsn = source_lsn;
                        meta.source_ts_ms = source_ts_ms;
                        meta.envelope_ts_ms = ts_ms;
                        let op = op.ok_or_else(|| DecodeError::Envelope("missing `op`".into()))?;
                        self.envelope_parts(msg, op_of(&op)?, before, after)
                            .map(Some)
                    }
                }
            }
            (MessageFormat::JsonSchema, Compiled::Json(js)) => {
                *schema = (Some(js.row_schema.clone()), id);
                let row = js.row(body).map_err(|e| match e {
                    DecodeError::Schema(problem) => mismatch(problem),
                    other => other,
                })?;
                let key = self.key(msg.key, Some(&row))?;
                Ok(Some((Op::Insert, key, None, Some(row))))
            }
            (MessageFormat::Protobuf, Compiled::Protobuf(pb)) => {
                let (row, row_schema) = pb.decode(body).map_err(mismatch)?;
                *schema = (Some(row_schema), id);
                let key = self.key(msg.key, Some(&row))?;
                Ok(Some((Op::Insert, key, None, Some(row))))
            }
            (format, other) => Err(DecodeError::UnusableSchema(format!(
                "schema id {id} is an {} schema, but the topic's format is {format:?}",
                other.kind()
            ))),
        }
    }

    /// The parts of a Debezium change: checks the images `op` needs, takes the key.
    fn envelope_parts(
        &self,
        msg: &RawMessage<'_>,
        op: Op,
        before: Option<Row>,
        after: Option<Row>,
    ) -> Result<Parts, DecodeError> {
        let missing = match op {
            Op::Insert | Op::Update | Op::Snapshot => after.is_none().then_some("after"),
            Op::Delete => (before.is_none() && msg.key.is_none()).then_some("before"),
            Op::Truncate => None,
        };
        if let Some(field) = missing {
            return Err(DecodeError::Envelope(format!(
                "op {:?} needs `{field}`",
                op.as_str()
            )));
        }
        let key = if op == Op::Truncate {
            Row::new()
        } else {
            self.key(msg.key, after.as_ref().or(before.as_ref()))?
        };
        Ok((op, key, before, after))
    }

    /// `None` for a tombstone. An envelope with a Connect schema that describes its rows sets
    /// `schema` to the rows' schema and its version.
    fn debezium(
        &self,
        msg: &RawMessage<'_>,
        meta: &mut KafkaMeta,
        schema: &mut (Option<std::sync::Arc<RowSchema>>, u32),
    ) -> Result<Option<Parts>, DecodeError> {
        let Some(payload) = msg.payload else {
            return Ok(None);
        };
        let text = std::str::from_utf8(payload).map_err(|e| DecodeError::InvalidUtf8 {
            valid_up_to: e.valid_up_to(),
        })?;
        let (parsed, connect) = self.parse_envelope(text)?;
        let Some(envelope) = parsed.fields else {
            return Ok(None);
        };
        if let Some(c) = &connect {
            *schema = (c.row_schema.clone(), c.version);
        }
        let rest = &envelope.rest;
        let op = match rest.get("op") {
            Some(J::String(s)) => op_of(s)?,
            Some(other) => {
                return Err(DecodeError::Envelope(format!(
                    "`op` must be a string, found {}",
                    json_kind(other)
                )));
            }
            None => return Err(DecodeError::Envelope("missing `op`".into())),
        };
        if let Some(block @ J::Object(source)) = rest.get("source") {
            meta.source_lsn = source.get("lsn").and_then(J::as_i64);
            meta.source_ts_ms = source.get("ts_ms").and_then(J::as_i64);
            meta.source_block = Some(JsonText::from_written(block.to_string()));
        }
        meta.envelope_ts_ms = rest.get("ts_ms").and_then(J::as_i64);
        let before = self.image(
            envelope.before,
            "Debezium `before`",
            false,
            connect.as_deref(),
        )?;
        let after = self.image(envelope.after, "Debezium `after`", true, connect.as_deref())?;
        self.envelope_parts(msg, op, before, after).map(Some)
    }

    /// Parses a Debezium message, its images the way they are decoded: as trees for a Connect
    /// schema that describes the rows, else straight into rows (numbers exact). A message that
    /// does not look like the JSON converter's wrapper is parsed into rows first, and again as
    /// trees only when it turns out to carry a schema or fails on a declared column that its
    /// schema may type.
    fn parse_envelope(
        &self,
        text: &str,
    ) -> Result<(envelope::Envelope, Option<std::sync::Arc<EnvelopeSchema>>), DecodeError> {
        let rows = Images::Rows(&self.declared);
        let schema_of =
            |parsed: &envelope::Envelope| match parsed.schema_hash {
                Some(hash) => Ok(Some(self.connect.get(hash, text, &self.declared)?)
                    .filter(|c| c.describes_rows())),
                None => Ok(None),
            };
        let first = if envelope::looks_wrapped(text) {
            None
        } else {
            match envelope::parse(text, rows) {
                Ok(parsed) if parsed.schema_hash.is_none() => return Ok((parsed, None)),
                other => Some(other),
            }
        };
        let trees = match envelope::parse(text, Images::Trees) {
            Ok(trees) => trees,
            Err(e) => return Err(first.and_then(Result::err).unwrap_or(e)),
        };
        if trees.fields.is_none() {
            return Ok((trees, None));
        }
        match (schema_of(&trees)?, first) {
            (Some(connect), _) => Ok((trees, Some(connect))),
            // A schema that describes no rows: the images are schemaless.
            (None, None) => Ok((envelope::parse(text, rows)?, None)),
            (None, Some(first)) => first.map(|parsed| (parsed, None)),
        }
    }

    /// A parsed image as a row: typed by the Connect schema when parsed as a tree for one.
    fn image(
        &self,
        image: Image,
        what: &'static str,
        after: bool,
        connect: Option<&EnvelopeSchema>,
    ) -> Result<Option<Row>, DecodeError> {
        match image {
            Image::Absent => Ok(None),
            Image::Row(row) => Ok(Some(row)),
            Image::Tree(o) => match connect {
                Some(c) => c
                    .row(after, o, |name, json| self.plain_value(&name, json))
                    .map(Some),
                None => self.typed_row(o).map(Some),
            },
            Image::NotObject(found) => Err(DecodeError::NotAnObject { what, found }),
        }
    }

    fn key(&self, msg_key: Option<&[u8]>, row: Option<&Row>) -> Result<Row, DecodeError> {
        if self.key_columns.is_empty() {
            return Ok(message_key(msg_key)?.unwrap_or_default());
        }
        let mut key = Row::new();
        for name in &self.key_columns {
            match row.and_then(|r| r.get(name)) {
                Some(v) if !v.is_null() => key.push(name.as_str(), v.clone()),
                _ => return Err(DecodeError::MissingKey(name.clone())),
            }
        }
        Ok(key)
    }

    fn typed_row(&self, object: Map<String, J>) -> Result<Row, DecodeError> {
        let mut row = Row(Vec::with_capacity(object.len()));
        for (name, json) in object {
            let value = self.plain_value(&name, json)?;
            row.push(name, value);
        }
        Ok(row)
    }

    /// A column of a schemaless row: converted to its declared type, else typed from its JSON.
    fn plain_value(&self, name: &str, json: J) -> Result<Value, DecodeError> {
        match self.declared.iter().find(|(n, _)| *n == name) {
            Some((_, ty)) => typed(name, *ty, json),
            None => Ok(inferred(json)),
        }
    }
}

/// A topic's declared columns as a row schema, typed as [`typed`] decodes them.
fn declared_schema(columns: &BTreeMap<String, ColumnType>) -> Option<std::sync::Arc<RowSchema>> {
    if columns.is_empty() {
        return None;
    }
    let columns = columns
        .iter()
        .map(|(name, ty)| (name.clone(), declared_type(*ty)))
        .collect();
    Some(std::sync::Arc::new(RowSchema { columns }))
}

/// The value type of a column declared `ty`, as [`typed`] decodes it.
pub(super) fn declared_type(ty: ColumnType) -> ValueType {
    match ty {
        ColumnType::Bool => ValueType::Bool,
        ColumnType::Int32 => ValueType::Int32,
        ColumnType::Int64 => ValueType::Int64,
        ColumnType::Float64 => ValueType::Float64,
        ColumnType::Numeric => ValueType::Numeric,
        ColumnType::Text => ValueType::Text,
        ColumnType::Uuid => ValueType::Uuid,
        ColumnType::Timestamptz
        | ColumnType::TimestamptzMillis
        | ColumnType::TimestamptzMicros
        | ColumnType::TimestamptzNanos => ValueType::TimestampTz,
        ColumnType::Date | ColumnType::DateDays => ValueType::Date,
        ColumnType::Json => ValueType::Json,
    }
}

type Parts = (Op, Row, Option<Row>, Option<Row>);

/// A Debezium `op` code.
fn op_of(code: &str) -> Result<Op, DecodeError> {
    Ok(match code {
        "c" => Op::Insert,
        "u" => Op::Update,
        "d" => Op::Delete,
        "r" => Op::Snapshot,
        "t" => Op::Truncate,
        other => return Err(DecodeError::Envelope(format!("unknown op {other:?}"))),
    })
}

/// The Kafka message key as key columns: a JSON object (Debezium's `{schema, payload}` key
/// unwrapped) gives its fields, any other UTF-8 text one `key` text column, other bytes one `key`
/// bytes column.
pub fn message_key(key: Option<&[u8]>) -> Result<Option<Row>, DecodeError> {
    let Some(bytes) = key else {
        return Ok(None);
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(Some(
            [("key", Value::Bytes(bytes.to_vec()))]
                .into_iter()
                .collect(),
        ));
    };
    // Parsed as a row (not a `serde_json` tree), so its numbers keep their digits.
    if text.trim_start().starts_with('{')
        && let Ok(row) = super::row_json::parse_row(text, &[], "message key")
    {
        if row.get("schema").is_some()
            && let Some(Value::Json(inner)) = row.get("payload")
            && inner.as_str().starts_with('{')
            && let Ok(inner) = super::row_json::parse_row(inner.as_str(), &[], "message key")
        {
            return Ok(Some(inner));
        }
        return Ok(Some(row));
    }
    Ok(Some(
        [("key", Value::Text(text.into()))].into_iter().collect(),
    ))
}

pub(super) fn inferred(json: J) -> Value {
    match json {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Int64(i),
            None => match n.as_u64() {
                Some(u) => super::row_json::big_integer(u),
                None => Value::Float64(n.as_f64().unwrap_or(f64::NAN)),
            },
        },
        J::String(s) => Value::Text(s.into()),
        other @ (J::Array(_) | J::Object(_)) => Value::Json(other.into()),
    }
}

pub(super) fn typed(column: &str, ty: ColumnType, json: J) -> Result<Value, DecodeError> {
    match (ty, &json) {
        (_, J::Null) => Ok(Value::Null),
        (ColumnType::Json, _) => Ok(Value::Json(json.into())),
        (_, J::Bool(b)) => typed_scalar(column, ty, Scalar::Bool(*b)),
        (_, J::Number(n)) => {
            let text = n.to_string();
            let scalar = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Scalar::Int(i),
                (None, Some(u)) => Scalar::UInt(u),
                _ => Scalar::Float(n.as_f64().unwrap_or(f64::NAN), Some(&text)),
            };
            typed_scalar(column, ty, scalar)
        }
        (_, J::String(s)) => typed_scalar(column, ty, Scalar::Str(s)),
        (_, J::Array(_)) => typed_scalar(column, ty, Scalar::Array),
        (_, J::Object(_)) => typed_scalar(column, ty, Scalar::Object),
    }
}

/// A JSON value as a declared (non-`json`) column sees it: arrays and objects only by kind.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i64),
    /// A positive integer beyond `i64`.
    UInt(u64),
    /// Any other number, with its text as the message wrote it (when known).
    Float(f64, Option<&'a str>),
    Str(&'a str),
    Array,
    Object,
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "a boolean",
            Scalar::Int(_) | Scalar::UInt(_) | Scalar::Float(..) => "a number",
            Scalar::Str(_) => "a string",
            Scalar::Array => "an array",
            Scalar::Object => "an object",
        }
    }
}

/// The value of a column declared `ty` (not `json`) holding `v`, or why it cannot be.
pub(super) fn typed_scalar(
    column: &str,
    ty: ColumnType,
    v: Scalar<'_>,
) -> Result<Value, DecodeError> {
    let wrong = || DecodeError::WrongType {
        column: column.to_owned(),
        expected: ty,
        found: v.kind().to_owned(),
    };
    // An integer column given a number it cannot hold: named with the number, never rounded.
    let beyond = |text: String| {
        wrong_text(
            column,
            ty,
            &format!("the number {text}, which is not a {ty} (out of range or not an integer)"),
        )
    };
    let float_text = |x: f64, text: Option<&str>| text.map_or_else(|| x.to_string(), str::to_owned);
    let value = match (ty, v) {
        (_, Scalar::Null) => Value::Null,
        (ColumnType::Bool, Scalar::Bool(b)) => Value::Bool(b),
        (ColumnType::Int32, Scalar::Int(i)) => {
            Value::Int32(i32::try_from(i).map_err(|_| beyond(i.to_string()))?)
        }
        (ColumnType::Int64, Scalar::Int(i)) => Value::Int64(i),
        (ColumnType::Int32 | ColumnType::Int64, Scalar::UInt(u)) => {
            return Err(beyond(u.to_string()));
        }
        (ColumnType::Int32 | ColumnType::Int64, Scalar::Float(x, text)) => {
            return Err(beyond(float_text(x, text)));
        }
        (ColumnType::Float64, Scalar::Int(i)) => Value::Float64(i as f64),
        (ColumnType::Float64, Scalar::UInt(u)) => Value::Float64(u as f64),
        (ColumnType::Float64, Scalar::Float(x, _)) => Value::Float64(x),
        (ColumnType::Numeric, Scalar::Int(i)) => {
            Value::Numeric(compact_str::format_compact!("{i}"))
        }
        (ColumnType::Numeric, Scalar::UInt(u)) => {
            Value::Numeric(compact_str::format_compact!("{u}"))
        }
        // The digits as the message wrote them.
        (ColumnType::Numeric, Scalar::Float(_, Some(text))) => Value::Numeric(text.into()),
        (ColumnType::Numeric, Scalar::Float(x, None)) => Value::Numeric(
            serde_json::Number::from_f64(x)
                .map(|n| compact_str::format_compact!("{n}"))
                .ok_or_else(wrong)?,
        ),
        (ColumnType::Numeric, Scalar::Str(s)) if s.trim().parse::<f64>().is_ok() => {
            Value::Numeric(s.trim().into())
        }
        (ColumnType::Text, Scalar::Str(s)) => Value::Text(s.into()),
        (ColumnType::Uuid, Scalar::Str(s)) => Value::Uuid(
            s.parse()
                .map_err(|_| wrong_text(column, ty, "a string that is not a UUID"))?,
        ),
        (
            ColumnType::Timestamptz
            | ColumnType::TimestamptzMillis
            | ColumnType::TimestamptzMicros
            | ColumnType::TimestamptzNanos,
            Scalar::Str(s),
        ) => Value::TimestampTz(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| wrong_text(column, ty, "a string that is not an RFC 3339 timestamp"))?
                .with_timezone(&Utc),
        ),
        (ColumnType::TimestamptzMillis, Scalar::Int(v)) => Value::TimestampTz(
            DateTime::from_timestamp_millis(v).ok_or_else(|| out_of_range(column, ty))?,
        ),
        (ColumnType::TimestamptzMicros, Scalar::Int(v)) => Value::TimestampTz(
            DateTime::from_timestamp_micros(v).ok_or_else(|| out_of_range(column, ty))?,
        ),
        (ColumnType::TimestamptzNanos, Scalar::Int(v)) => {
            Value::TimestampTz(DateTime::from_timestamp_nanos(v))
        }
        // A number has no unit of its own: never guess one.
        (ColumnType::Timestamptz, Scalar::Int(_) | Scalar::UInt(_) | Scalar::Float(..)) => {
            return Err(wrong_text(
                column,
                ty,
                "a number (an epoch number's unit is unknown: declare the column \
                 timestamptz_millis, timestamptz_micros or timestamptz_nanos)",
            ));
        }
        (ColumnType::Date | ColumnType::DateDays, Scalar::Str(s)) => Value::Date(
            NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map_err(|_| wrong_text(column, ty, "a string that is not a YYYY-MM-DD date"))?,
        ),
        (ColumnType::DateDays, Scalar::Int(days)) => Value::Date(
            days.checked_add(EPOCH_DAYS_FROM_CE)
                .and_then(|d| i32::try_from(d).ok())
                .and_then(NaiveDate::from_num_days_from_ce_opt)
                .ok_or_else(|| out_of_range(column, ty))?,
        ),
        (ColumnType::Date, Scalar::Int(_) | Scalar::UInt(_) | Scalar::Float(..)) => {
            return Err(wrong_text(
                column,
                ty,
                "a number (declare the column date_days for days since the epoch)",
            ));
        }
        _ => return Err(wrong()),
    };
    Ok(value)
}

/// 1970-01-01 as a day of the common era (chrono counts dates from 0001-01-01 as day 1).
pub(super) const EPOCH_DAYS_FROM_CE: i64 = 719_163;

fn out_of_range(column: &str, expected: ColumnType) -> DecodeError {
    wrong_text(column, expected, "a number out of range")
}

fn wrong_text(column: &str, expected: ColumnType, found: &str) -> DecodeError {
    DecodeError::WrongType {
        column: column.to_owned(),
        expected,
        found: found.to_owned(),
    }
}

pub(super) fn json_kind(j: &J) -> &'static str {
    match j {
        J::Null => "null",
        J::Bool(_) => "a boolean",
        J::Number(_) => "a number",
        J::String(_) => "a string",
        J::Array(_) => "an array",
        J::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder(format: MessageFormat, key_columns: &[&str]) -> Decoder {
        let topic = TopicConfig {
            name: "t".into(),
            format,
            key_columns: key_columns.iter().map(|s| s.to_string()).collect(),
            columns: BTreeMap::new(),
        };
        Decoder::new(&topic, 1024)
    }

    fn msg<'a>(key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> RawMessage<'a> {
        RawMessage {
            topic: "t",
            partition: 1,
            offset: 7,
            key,
            payload,
            timestamp_ms: Some(1_732_356_000_000),
            timestamp_type: None,
            headers: Vec::new(),
        }
    }

    fn event(d: Decoded) -> ChangeEvent {
        match d {
            Decoded::Event(e) => e.event,
            Decoded::Tombstone => panic!("tombstone"),
        }
    }

    #[test]
    fn raw_messages_keep_their_bytes() {
        let d = decoder(MessageFormat::Raw, &[]);
        let e = event(d.decode(&msg(Some(b"\x00k"), Some(b"\xff\xfe"))).unwrap());
        assert_eq!(e.op, Op::Insert);
        assert_eq!(e.key.get("key"), Some(&Value::Bytes(b"\x00k".to_vec())));
        let after = e.after.unwrap();
        assert_eq!(after.get("value"), Some(&Value::Bytes(vec![0xff, 0xfe])));
        assert_eq!(e.source_ts.unwrap().timestamp_millis(), 1_732_356_000_000);
    }

    #[test]
    fn json_message_key_is_the_default_key_and_null_value_deletes() {
        let d = decoder(MessageFormat::Json, &[]);
        let e = event(d.decode(&msg(Some(b"o-1"), Some(br#"{"a":1}"#))).unwrap());
        assert_eq!(e.key.get("key"), Some(&Value::Text("o-1".into())));
        let e = event(d.decode(&msg(Some(br#"{"id":5}"#), None)).unwrap());
        assert_eq!(
            (e.op, e.key.get("id")),
            (Op::Delete, Some(&Value::Int64(5)))
        );
        assert_eq!(d.decode(&msg(None, None)).unwrap_err(), DecodeError::NoKey);
    }

    #[test]
    fn debezium_truncate_and_bad_envelopes() {
        let d = decoder(MessageFormat::Debezium, &["id"]);
        let e = event(
            d.decode(&msg(
                None,
                Some(br#"{"op":"t","before":null,"after":null}"#),
            ))
            .unwrap(),
        );
        assert_eq!((e.op, e.key.is_empty()), (Op::Truncate, true));
        let err = d.decode(&msg(None, Some(br#"{"op":"x"}"#))).unwrap_err();
        assert!(err.to_string().contains("unknown op \"x\""), "{err}");
        let err = d
            .decode(&msg(None, Some(br#"{"op":"c","after":null}"#)))
            .unwrap_err();
        assert!(err.to_string().contains("needs `after`"), "{err}");
        let err = d
            .decode(&msg(None, Some(br#"{"op":"c","after":{"v":1}}"#)))
            .unwrap_err();
        assert_eq!(err, DecodeError::MissingKey("id".into()));
        assert_eq!(
            d.decode(&msg(None, Some(br#"{"schema":{},"payload":null}"#)))
                .unwrap(),
            Decoded::Tombstone
        );
    }

    #[test]
    fn schemaless_debezium_images_keep_every_number_as_written() {
        let d = declared(MessageFormat::Debezium, &[("amount", ColumnType::Numeric)]);
        let payload = r#"{"source":{"lsn":24023128,"ts_ms":1714979289000,"w":[1.5,2e3]},
            "ts_ms":1.25,"op":"u",
            "before":{"id":1,"serial":123456789012345678901234567890,"amount":0.5},
            "after":{"id":1,"serial":123456789012345678901234567891,
                     "amount":0.1000000000000000000000000000000000000001,
                     "deep":{"x":[1.00000000000000000000001, 7]},"f":0.25}}"#;
        // Bare, and wrapped with a schema that describes no row (its numbers come first and
        // are counted, so the images' numbers still find their own text).
        let wrapped = format!(
            r#"{{"schema":{{"type":"struct","version":3,"optional":false,"name":"x.Envelope",
                "parameters":{{"n":12.5}}}},"payload":{payload}}}"#
        );
        for text in [payload, wrapped.as_str()] {
            let Decoded::Event(KafkaEvent { event: e, meta }) =
                d.decode(&msg(None, Some(text.as_bytes()))).unwrap()
            else {
                panic!("tombstone")
            };
            let json = |t: &str| Value::Json(JsonText::from_written(t.to_owned()));
            let (before, after) = (e.before.unwrap(), e.after.unwrap());
            assert_eq!(
                before.get("serial"),
                Some(&json("123456789012345678901234567890"))
            );
            assert_eq!(before.get("amount"), Some(&Value::Numeric("0.5".into())));
            assert_eq!(
                after.get("serial"),
                Some(&json("123456789012345678901234567891"))
            );
            assert_eq!(
                after.get("amount"),
                Some(&Value::Numeric(
                    "0.1000000000000000000000000000000000000001".into()
                ))
            );
            assert_eq!(
                after.get("deep"),
                Some(&json(r#"{"x":[1.00000000000000000000001,7]}"#))
            );
            assert_eq!(after.get("f"), Some(&Value::Float64(0.25)));
            assert_eq!(meta.source_lsn, Some(24_023_128));
            assert_eq!(e.op, Op::Update);
        }

        // A declared column that cannot hold its value, and an image that is not an object.
        let d = declared(MessageFormat::Debezium, &[("n", ColumnType::Int64)]);
        let err = d
            .decode(&msg(
                None,
                Some(br#"{"op":"c","after":{"n":123456789012345678901}}"#),
            ))
            .unwrap_err();
        assert_eq!(err.reason(), "wrong_type");
        assert!(err.to_string().contains("123456789012345678901"), "{err}");
        let err = d
            .decode(&msg(None, Some(br#"{"op":"c","after":[1, 2.5]}"#)))
            .unwrap_err();
        assert_eq!(
            err,
            DecodeError::NotAnObject {
                what: "Debezium `after`",
                found: "an array"
            }
        );
    }

    fn declared(format: MessageFormat, columns: &[(&str, ColumnType)]) -> Decoder {
        let topic = TopicConfig {
            name: "t".into(),
            format,
            key_columns: Vec::new(),
            columns: columns.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
        };
        Decoder::new(&topic, 1024)
    }

    #[test]
    fn declared_epoch_numbers_say_their_unit_and_a_bare_timestamptz_never_guesses_one() {
        let instant = DateTime::parse_from_rfc3339("2024-05-06T07:08:09.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        let micros = |t: DateTime<Utc>| t.timestamp_micros();
        for format in [MessageFormat::Json, MessageFormat::Debezium] {
            let d = declared(
                format,
                &[
                    ("ms", ColumnType::TimestamptzMillis),
                    ("us", ColumnType::TimestamptzMicros),
                    ("ns", ColumnType::TimestamptzNanos),
                    ("text", ColumnType::TimestamptzMicros),
                    ("day", ColumnType::DateDays),
                    ("iso_day", ColumnType::Date),
                ],
            );
            let row = r#"{"ms":1714979289123,"us":1714979289123456,"ns":1714979289123456789,"text":"2024-05-06T07:08:09.123456Z","day":19849,"iso_day":"2024-05-06"}"#;
            let body = match format {
                MessageFormat::Json => row.to_owned(),
                _ => format!(r#"{{"op":"c","after":{row}}}"#),
            };
            let e = event(d.decode(&msg(Some(b"k"), Some(body.as_bytes()))).unwrap());
            let after = e.after.unwrap();
            let at = |c: &str| match after.get(c) {
                Some(Value::TimestampTz(t)) => *t,
                other => panic!("{c}: {other:?}"),
            };
            assert_eq!(at("ms").timestamp_millis(), instant.timestamp_millis());
            assert_eq!(micros(at("us")), micros(instant));
            assert_eq!(at("ns"), instant);
            assert_eq!(micros(at("text")), micros(instant));
            let day = Value::Date(NaiveDate::from_ymd_opt(2024, 5, 6).unwrap());
            assert_eq!(after.get("day"), Some(&day));
            assert_eq!(after.get("iso_day"), Some(&day));
            let schema = e.schema.unwrap();
            assert!(
                schema
                    .columns
                    .contains(&("us".into(), ValueType::TimestampTz))
            );
            assert!(schema.columns.contains(&("day".into(), ValueType::Date)));

            // A bare `timestamptz` (or `date`) given a number is a dead letter, never a guess.
            let d = declared(
                format,
                &[("at", ColumnType::Timestamptz), ("on", ColumnType::Date)],
            );
            for (row, column) in [
                (r#"{"at":1714979289123456}"#, "at"),
                (r#"{"on":19849}"#, "on"),
            ] {
                let body = match format {
                    MessageFormat::Json => row.to_owned(),
                    _ => format!(r#"{{"op":"c","after":{row}}}"#),
                };
                let err = d
                    .decode(&msg(Some(b"k"), Some(body.as_bytes())))
                    .unwrap_err();
                assert_eq!(err.reason(), "wrong_type");
                let text = err.to_string();
                assert!(
                    text.starts_with(&format!("column {column:?} is declared ")),
                    "{text}"
                );
                let hint = if column == "at" {
                    "timestamptz_micros"
                } else {
                    "date_days"
                };
                assert!(text.contains(hint), "{text}");
            }
        }
    }
}
