//! Debezium envelopes that carry their Kafka Connect schema (the JSON converter with
//! `schemas.enable=true`: `{"schema": {...}, "payload": {...}}`): each field of `before`/`after`
//! is decoded by its Connect `type` and semantic `name`, and the event gets a [`RowSchema`]
//! built from that schema, so Bronze has typed columns even when the topic declares none.
//!
//! Guarantees:
//! - **No unit is guessed.** A number is read in the unit its semantic type states
//!   (`io.debezium.time.MicroTimestamp` is microseconds, `NanoTimestamp` nanoseconds, `Date` days,
//!   …); a value its schema cannot describe (bad base64, a time of day past 24:00, an instant
//!   out of range) is a dead letter naming the column and its Connect type, never a guess.
//! - **Decimals are exact.** `org.apache.kafka.connect.data.Decimal` (base64 big-endian two's
//!   complement unscaled bytes and the `scale` parameter) and
//!   `io.debezium.data.VariableScaleDecimal` (`{scale, value}`) become their decimal text
//!   (`Value::Numeric`), however many digits they hold.
//! - **Declared `columns` still win**: a declared column is converted to its declared type (a
//!   `MicroTimestamp` declared `timestamptz` is that instant in UTC); plain Connect fields are read
//!   exactly as on a schemaless topic.
//! - **A schema is compiled once.** The `schema` value is hashed while the message is parsed
//!   ([`super::envelope`]: its tokens, so whitespace does not matter) without being built; only an unseen hash parses
//!   and compiles it. Schemas are cached per topic ([`SchemaCache`], bounded); each new one gets
//!   a new [`RowSchema`] (and `schema_version`), which the Delta sink evolves the table to.
//!
//! No type for a time of day exists in the event model, so `Time`/`MicroTime`/`NanoTime` become
//! text as PostgreSQL writes a `time` (`07:08:09.123456`, trailing fractional zeros dropped), the
//! same text the PostgreSQL source gives. `Timestamp`/`MicroTimestamp`/`NanoTimestamp` have no
//! zone (PostgreSQL `timestamp`): [`Value::Timestamp`]. Structs without a known name (PostGIS
//! `io.debezium.data.geometry.*` `{wkb, srid}` among them), maps and `SparseVector` are kept as
//! their JSON, byte fields inside base64 as the converter wrote them. Debezium's placeholder for
//! an unchanged TOASTed value (`__debezium_unavailable_value`) is [`Value::UnchangedToast`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value as J};

use super::decode::{DecodeError, typed};
use crate::config::ColumnType;
use crate::event::{JsonText, Name, Row, RowSchema, Text, Value, ValueType};

/// Debezium's stand-in for a TOASTed value the change did not touch (text columns).
const UNAVAILABLE: &str = "__debezium_unavailable_value";
/// The same placeholder in a bytes column, base64 as the JSON converter writes it.
const UNAVAILABLE_BASE64: &str = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==";

/// How many distinct schemas a topic keeps compiled; a topic that churns through more starts over.
const MAX_SCHEMAS: usize = 256;

/// The compiled schemas of one topic, by the hash of their JSON.
#[derive(Debug, Default)]
pub(super) struct SchemaCache {
    schemas: RwLock<HashMap<u64, Result<Arc<EnvelopeSchema>, String>>>,
    /// The last `schema_version` given out.
    versions: AtomicU32,
}

impl SchemaCache {
    /// The compiled schema of the message `text` whose `schema` hashed to `hash`: from the cache,
    /// or parsed out of `text` and compiled (an invalid schema is remembered as invalid too).
    pub(super) fn get(
        &self,
        hash: u64,
        text: &str,
        declared: &[(Name, ColumnType)],
    ) -> Result<Arc<EnvelopeSchema>, DecodeError> {
        let cached = self
            .schemas
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hash)
            .cloned();
        let compiled = match cached {
            Some(c) => c,
            None => {
                #[derive(serde::Deserialize)]
                struct SchemaOnly {
                    schema: J,
                }
                let compiled = serde_json::from_str::<SchemaOnly>(text)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
                        EnvelopeSchema::compile(&s.schema, declared, version)
                    })
                    .map(Arc::new);
                let mut schemas = self.schemas.write().unwrap_or_else(PoisonError::into_inner);
                if schemas.len() >= MAX_SCHEMAS {
                    schemas.clear();
                }
                schemas.entry(hash).or_insert(compiled).clone()
            }
        };
        compiled.map_err(|e| DecodeError::Envelope(format!("Connect schema: {e}")))
    }
}

/// A Debezium envelope's Connect schema, compiled: how to decode `before` and `after`.
#[derive(Debug)]
pub(super) struct EnvelopeSchema {
    before: Option<Vec<Field>>,
    after: Option<Vec<Field>>,
    /// The row's columns with their types (declared types where declared); `None` when the
    /// schema describes no row (its `before`/`after` are not structs with fields): the envelope
    /// is then decoded as a schemaless one.
    pub(super) row_schema: Option<Arc<RowSchema>>,
    pub(super) version: u32,
}

/// One field of the row, compiled.
#[derive(Debug)]
struct Field {
    name: Name,
    kind: Kind,
    /// The Connect type as named in errors: the semantic name, else the literal type.
    label: Text,
    /// The type the topic declares for the column, which wins.
    declared: Option<ColumnType>,
    /// The field has a semantic (named) type, so the declared type converts its decoded value
    /// rather than its JSON.
    semantic: bool,
}

/// What a Connect field's JSON holds, and how it becomes a [`Value`].
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Bool,
    /// `int8` and `int16` (the event model has no 8-bit integer).
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Text,
    /// Base64 in the JSON (plain `bytes`, `io.debezium.data.Bits`).
    Bytes,
    /// Days since the epoch.
    Date,
    /// A time of day in `unit`s past midnight, as text.
    Time(Unit),
    /// An instant without zone, in `unit`s since the epoch.
    Timestamp(Unit),
    /// An ISO 8601 timestamp with offset (`io.debezium.time.ZonedTimestamp`).
    ZonedTimestamp,
    /// Base64 unscaled two's-complement bytes with a fixed scale.
    Decimal {
        scale: i32,
    },
    /// `{scale, value}` with the bytes of `Decimal`.
    VariableScaleDecimal,
    /// A string holding a JSON document (`io.debezium.data.Json`).
    Json,
    Uuid,
    /// An array of numbers (`FloatVector`, `DoubleVector`).
    Vector,
    Array(Box<Kind>),
    /// Any other struct, and maps: kept as their JSON.
    Struct,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Unit {
    Millis,
    Micros,
    Nanos,
}

impl Unit {
    fn per_second(self) -> i64 {
        match self {
            Unit::Millis => 1_000,
            Unit::Micros => 1_000_000,
            Unit::Nanos => 1_000_000_000,
        }
    }
}

impl Kind {
    fn value_type(&self) -> ValueType {
        match self {
            Kind::Bool => ValueType::Bool,
            Kind::Int16 => ValueType::Int16,
            Kind::Int32 => ValueType::Int32,
            Kind::Int64 => ValueType::Int64,
            Kind::Float32 => ValueType::Float32,
            Kind::Float64 => ValueType::Float64,
            Kind::Text | Kind::Time(_) => ValueType::Text,
            Kind::Bytes => ValueType::Bytes,
            Kind::Date => ValueType::Date,
            Kind::Timestamp(_) => ValueType::Timestamp,
            Kind::ZonedTimestamp => ValueType::TimestampTz,
            Kind::Decimal { .. } | Kind::VariableScaleDecimal => ValueType::Numeric,
            Kind::Json | Kind::Struct => ValueType::Json,
            Kind::Uuid => ValueType::Uuid,
            Kind::Vector => ValueType::Vector,
            Kind::Array(_) => ValueType::Array,
        }
    }

    /// A Connect field schema (`{"type": …, "name": …, "parameters": …}`) as a kind.
    fn of(schema: &J) -> Result<(Kind, bool), String> {
        let ty = schema
            .get("type")
            .and_then(J::as_str)
            .ok_or("a field schema has no `type`")?;
        let name = schema.get("name").and_then(J::as_str);
        let named = match (name, ty) {
            (Some("io.debezium.time.Date" | "org.apache.kafka.connect.data.Date"), "int32") => {
                Some(Kind::Date)
            }
            (Some("io.debezium.time.Time" | "org.apache.kafka.connect.data.Time"), "int32") => {
                Some(Kind::Time(Unit::Millis))
            }
            (Some("io.debezium.time.MicroTime"), "int64") => Some(Kind::Time(Unit::Micros)),
            (Some("io.debezium.time.NanoTime"), "int64") => Some(Kind::Time(Unit::Nanos)),
            (
                Some("io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp"),
                "int64",
            ) => Some(Kind::Timestamp(Unit::Millis)),
            (Some("io.debezium.time.MicroTimestamp"), "int64") => {
                Some(Kind::Timestamp(Unit::Micros))
            }
            (Some("io.debezium.time.NanoTimestamp"), "int64") => Some(Kind::Timestamp(Unit::Nanos)),
            (Some("io.debezium.time.ZonedTimestamp"), "string") => Some(Kind::ZonedTimestamp),
            (Some("org.apache.kafka.connect.data.Decimal"), "bytes") => Some(Kind::Decimal {
                scale: decimal_scale(schema)?,
            }),
            (Some("io.debezium.data.VariableScaleDecimal"), "struct") => {
                Some(Kind::VariableScaleDecimal)
            }
            (Some("io.debezium.data.Json"), "string") => Some(Kind::Json),
            (Some("io.debezium.data.Uuid"), "string") => Some(Kind::Uuid),
            (
                Some(
                    "io.debezium.data.FloatVector"
                    | "io.debezium.data.DoubleVector"
                    | "io.debezium.data.vector.FloatVector"
                    | "io.debezium.data.vector.DoubleVector",
                ),
                "array",
            ) => Some(Kind::Vector),
            // Every other name (ZonedTime, Enum, Bits, geometries, MicroDuration, Year, …) is
            // read as its literal type: text, bytes, a struct kept as JSON, an integer.
            _ => None,
        };
        if let Some(kind) = named {
            return Ok((kind, true));
        }
        let kind = match ty {
            "boolean" => Kind::Bool,
            "int8" | "int16" => Kind::Int16,
            "int32" => Kind::Int32,
            "int64" => Kind::Int64,
            "float32" => Kind::Float32,
            "float64" => Kind::Float64,
            "string" => Kind::Text,
            "bytes" => Kind::Bytes,
            "array" => {
                let items = schema
                    .get("items")
                    .ok_or("an array schema has no `items`")?;
                Kind::Array(Box::new(Kind::of(items)?.0))
            }
            "struct" | "map" => Kind::Struct,
            other => return Err(format!("unknown Connect type {other:?}")),
        };
        Ok((kind, name.is_some()))
    }
}

/// The `scale` parameter of a `Decimal` schema (Connect writes it as a string).
fn decimal_scale(schema: &J) -> Result<i32, String> {
    let scale = schema.get("parameters").and_then(|p| p.get("scale"));
    let parsed = match scale {
        Some(J::String(s)) => s.trim().parse().ok(),
        Some(J::Number(n)) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        _ => None,
    };
    parsed.ok_or_else(|| "a Decimal schema has no integer `scale` parameter".to_owned())
}

impl EnvelopeSchema {
    /// Compiles an envelope schema (`{"type": "struct", "fields": [{"field": "before", …},
    /// {"field": "after", …}, …]}`).
    fn compile(
        schema: &J,
        declared: &[(Name, ColumnType)],
        version: u32,
    ) -> Result<EnvelopeSchema, String> {
        let image = |which: &str| -> Result<Option<Vec<Field>>, String> {
            let Some(fields) = schema.get("fields").and_then(J::as_array) else {
                return Ok(None);
            };
            let Some(image) = fields
                .iter()
                .find(|f| f.get("field").and_then(J::as_str) == Some(which))
            else {
                return Ok(None);
            };
            let Some(columns) = image.get("fields").and_then(J::as_array) else {
                return Ok(None);
            };
            columns
                .iter()
                .map(|c| {
                    let name = c
                        .get("field")
                        .and_then(J::as_str)
                        .ok_or_else(|| format!("a field of `{which}` has no name"))?;
                    let (kind, semantic) =
                        Kind::of(c).map_err(|e| format!("`{which}.{name}`: {e}"))?;
                    let label = c
                        .get("name")
                        .and_then(J::as_str)
                        .or_else(|| c.get("type").and_then(J::as_str))
                        .unwrap_or_default();
                    Ok(Field {
                        name: name.into(),
                        kind,
                        label: label.into(),
                        declared: declared.iter().find(|(n, _)| n == name).map(|(_, t)| *t),
                        semantic,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        };
        let before = image("before")?;
        let after = image("after")?;
        let row_schema = after.as_ref().or(before.as_ref()).map(|fields| {
            let mut columns: Vec<(String, ValueType)> = fields
                .iter()
                .map(|f| {
                    let ty = match f.declared {
                        Some(d) => super::decode::declared_type(d),
                        None => f.kind.value_type(),
                    };
                    (f.name.to_string(), ty)
                })
                .collect();
            for (name, ty) in declared {
                if !fields.iter().any(|f| f.name == *name) {
                    columns.push((name.to_string(), super::decode::declared_type(*ty)));
                }
            }
            Arc::new(RowSchema { columns })
        });
        Ok(EnvelopeSchema {
            before,
            after,
            row_schema,
            version,
        })
    }

    /// Whether the schema describes the row (else the envelope is decoded as schemaless).
    pub(super) fn describes_rows(&self) -> bool {
        self.row_schema.is_some()
    }

    /// Decodes the `before` (`after == false`) or `after` image by the schema; a field the schema
    /// does not list is decoded by `other` (declared or inferred, as on a schemaless topic).
    pub(super) fn row(
        &self,
        after: bool,
        mut object: Map<String, J>,
        other: impl Fn(String, J) -> Result<Value, DecodeError>,
    ) -> Result<Row, DecodeError> {
        let fields = if after {
            self.after.as_ref().or(self.before.as_ref())
        } else {
            self.before.as_ref().or(self.after.as_ref())
        };
        let fields = fields.map_or(&[][..], Vec::as_slice);
        let mut row = Row(Vec::with_capacity(object.len()));
        for f in fields {
            if let Some(json) = object.remove(f.name.as_str()) {
                row.push(f.name.clone(), f.value(json)?);
            }
        }
        for (name, json) in object {
            let value = other(name.clone(), json)?;
            row.push(name, value);
        }
        Ok(row)
    }
}

impl Field {
    fn value(&self, json: J) -> Result<Value, DecodeError> {
        let wrong = |problem: String| DecodeError::ConnectValue {
            column: self.name.to_string(),
            connect: self.label.to_string(),
            problem,
        };
        match self.declared {
            None => decode(&self.kind, json).map_err(wrong),
            Some(ty) if !self.semantic => typed(&self.name, ty, json),
            Some(ty) => {
                let value = decode(&self.kind, json).map_err(wrong)?;
                coerce(&self.name, ty, value, &self.label)
            }
        }
    }
}

/// A value decoded by its semantic type, as its column's declared type.
fn coerce(column: &str, ty: ColumnType, v: Value, label: &str) -> Result<Value, DecodeError> {
    use ColumnType as C;
    let text = |s: &str| Value::Text(s.into());
    let value = match (ty, v) {
        (_, v @ (Value::Null | Value::UnchangedToast)) => v,
        (C::Json, v @ Value::Json(_)) => v,
        (C::Json, v) => Value::Json(JsonText::from(v.to_json())),
        (C::Text, Value::Text(s) | Value::Numeric(s)) => Value::Text(s),
        (C::Text, v) => match v.to_json() {
            J::String(s) => text(&s),
            other => Value::Text(other.to_string().into()),
        },
        (C::Numeric, v @ Value::Numeric(_)) => v,
        (C::Numeric, Value::Int16(i)) => Value::Numeric(compact_str::format_compact!("{i}")),
        (C::Numeric, Value::Int32(i)) => Value::Numeric(compact_str::format_compact!("{i}")),
        (C::Numeric, Value::Int64(i)) => Value::Numeric(compact_str::format_compact!("{i}")),
        (C::Int64, Value::Int16(i)) => Value::Int64(i.into()),
        (C::Int64, Value::Int32(i)) => Value::Int64(i.into()),
        (C::Int64, v @ Value::Int64(_)) => v,
        (C::Int32, Value::Int16(i)) => Value::Int32(i.into()),
        (C::Int32, v @ Value::Int32(_)) => v,
        (C::Float64, Value::Float32(x)) => Value::Float64(x.into()),
        (C::Float64, v @ Value::Float64(_)) => v,
        (C::Bool, v @ Value::Bool(_)) => v,
        (C::Uuid, v @ Value::Uuid(_)) => v,
        (
            C::Timestamptz | C::TimestamptzMillis | C::TimestamptzMicros | C::TimestamptzNanos,
            v @ Value::TimestampTz(_),
        ) => v,
        // Debezium writes a zoneless timestamp as if it were UTC.
        (
            C::Timestamptz | C::TimestamptzMillis | C::TimestamptzMicros | C::TimestamptzNanos,
            Value::Timestamp(t),
        ) => Value::TimestampTz(t.and_utc()),
        (C::Date | C::DateDays, v @ Value::Date(_)) => v,
        _ => {
            return Err(DecodeError::WrongType {
                column: column.to_owned(),
                expected: ty,
                found: format!("a Connect {label} value"),
            });
        }
    };
    Ok(value)
}

/// A field's JSON as the value its kind says, or what is wrong with it (never quoting it).
fn decode(kind: &Kind, json: J) -> Result<Value, String> {
    let found = |j: &J| format!("found {}", kind_of(j));
    if let J::String(s) = &json {
        let placeholder = match kind {
            Kind::Bytes | Kind::Decimal { .. } => UNAVAILABLE_BASE64,
            _ => UNAVAILABLE,
        };
        if s == placeholder {
            return Ok(Value::UnchangedToast);
        }
    }
    let value = match (kind, json) {
        (_, J::Null) => Value::Null,
        (Kind::Bool, J::Bool(b)) => Value::Bool(b),
        (Kind::Int16, J::Number(n)) => Value::Int16(integer(&n)?),
        (Kind::Int32, J::Number(n)) => Value::Int32(integer(&n)?),
        (Kind::Int64, J::Number(n)) => Value::Int64(integer(&n)?),
        (Kind::Float32, j) => Value::Float32(float(&j)? as f32),
        (Kind::Float64, j) => Value::Float64(float(&j)?),
        (Kind::Text, J::String(s)) => Value::Text(s.into()),
        (Kind::Bytes, J::String(s)) => Value::Bytes(base64(&s)?),
        (Kind::Date, J::Number(n)) => {
            let days: i64 = integer(&n)?;
            days.checked_add(super::decode::EPOCH_DAYS_FROM_CE)
                .and_then(|d| i32::try_from(d).ok())
                .and_then(NaiveDate::from_num_days_from_ce_opt)
                .map(Value::Date)
                .ok_or("days since the epoch out of range")?
        }
        (Kind::Time(unit), J::Number(n)) => Value::Text(time_of_day(integer(&n)?, *unit)?),
        (Kind::Timestamp(unit), J::Number(n)) => {
            let v: i64 = integer(&n)?;
            // PostgreSQL's ±infinity, as Debezium writes them.
            match v {
                9_223_372_036_825_200_000 => Value::Text("infinity".into()),
                -9_223_372_036_832_400_000 => Value::Text("-infinity".into()),
                _ => {
                    let t = match unit {
                        Unit::Millis => DateTime::from_timestamp_millis(v),
                        Unit::Micros => DateTime::from_timestamp_micros(v),
                        Unit::Nanos => Some(DateTime::from_timestamp_nanos(v)),
                    };
                    Value::Timestamp(t.ok_or("instant out of range")?.naive_utc())
                }
            }
        }
        (Kind::ZonedTimestamp, J::String(s)) => match s.as_str() {
            "infinity" | "-infinity" => Value::Text(s.into()),
            _ => Value::TimestampTz(
                DateTime::parse_from_rfc3339(&s)
                    .map_err(|_| "a string that is not an ISO 8601 timestamp with offset")?
                    .with_timezone(&Utc),
            ),
        },
        (Kind::Decimal { scale }, J::String(s)) => {
            Value::Numeric(decimal_text(&base64(&s)?, *scale)?.into())
        }
        // The converter's `decimal.format=NUMERIC`: the decimal itself as a JSON number.
        (Kind::Decimal { scale }, J::Number(n)) => Value::Numeric(numeric_number(&n, *scale)?),
        (Kind::VariableScaleDecimal, J::Object(o)) => {
            let scale = o
                .get("scale")
                .and_then(J::as_i64)
                .and_then(|s| i32::try_from(s).ok())
                .ok_or("`scale` must be an integer")?;
            let bytes = match o.get("value") {
                Some(J::String(s)) => base64(s)?,
                _ => return Err("`value` must be a base64 string".into()),
            };
            Value::Numeric(decimal_text(&bytes, scale)?.into())
        }
        (Kind::Json, J::String(s)) => Value::Json(
            JsonText::parse(s).map_err(|_| "a string that is not a JSON document".to_owned())?,
        ),
        (Kind::Uuid, J::String(s)) => Value::Uuid(
            s.parse()
                .map_err(|_| "a string that is not a UUID".to_owned())?,
        ),
        (Kind::Vector, J::Array(items)) => Value::Vector(
            items
                .iter()
                .map(|x| float(x).map(|x| x as f32))
                .collect::<Result<_, _>>()?,
        ),
        (Kind::Array(item), J::Array(items)) => Value::Array(
            items
                .into_iter()
                .map(|x| decode(item, x))
                .collect::<Result<_, _>>()?,
        ),
        (Kind::Struct, j) => Value::Json(JsonText::from(j)),
        (_, j) => return Err(found(&j)),
    };
    Ok(value)
}

fn integer<T: TryFrom<i64>>(n: &serde_json::Number) -> Result<T, String> {
    n.as_i64()
        .and_then(|i| T::try_from(i).ok())
        .ok_or_else(|| "a number that is not an integer of this size".to_owned())
}

/// A float as the converter writes it: a number, or `"NaN"`/`"Infinity"`/`"-Infinity"`.
fn float(j: &J) -> Result<f64, String> {
    match j {
        J::Number(n) => n.as_f64().ok_or_else(|| "not a number".to_owned()),
        J::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            _ => Err("a string that is not a number".to_owned()),
        },
        other => Err(format!("found {}", kind_of(other))),
    }
}

fn base64(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| "a string that is not base64".to_owned())
}

/// A time of day `v` `unit`s past midnight as PostgreSQL writes a `time` (`07:08:09.123456`;
/// `24:00:00` is a valid time of day there).
fn time_of_day(v: i64, unit: Unit) -> Result<Text, String> {
    let per_second = unit.per_second();
    if !(0..=86_400 * per_second).contains(&v) {
        return Err("a time of day outside 00:00–24:00".into());
    }
    let (seconds, fraction) = (v / per_second, v % per_second);
    let mut text = compact_str::format_compact!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    );
    if fraction > 0 {
        let digits = per_second.ilog10() as usize;
        let f = format!("{fraction:0digits$}");
        text.push('.');
        text.push_str(f.trim_end_matches('0'));
    }
    Ok(text)
}

/// The decimal text of an unscaled big-endian two's-complement integer and a scale (Java's
/// `new BigDecimal(new BigInteger(bytes), scale)`).
pub(super) fn decimal_text(bytes: &[u8], scale: i32) -> Result<String, String> {
    let Some(&first) = bytes.first() else {
        return Err("an empty decimal".into());
    };
    let negative = first & 0x80 != 0;
    // The magnitude: two's complement negated when negative.
    let mut magnitude = bytes.to_vec();
    if negative {
        let mut carry = true;
        for b in magnitude.iter_mut().rev() {
            *b = !*b;
            if carry {
                let (sum, overflow) = b.overflowing_add(1);
                *b = sum;
                carry = overflow;
            }
        }
    }
    // Base 10^9 limbs, least significant first.
    const BASE: u64 = 1_000_000_000;
    let mut limbs: Vec<u64> = Vec::with_capacity(bytes.len() / 4 + 1);
    for &byte in &magnitude {
        let mut carry = u64::from(byte);
        for limb in &mut limbs {
            let v = *limb * 256 + carry;
            *limb = v % BASE;
            carry = v / BASE;
        }
        while carry > 0 {
            limbs.push(carry % BASE);
            carry /= BASE;
        }
    }
    let mut digits = match limbs.split_last() {
        None => "0".to_owned(),
        Some((top, rest)) => {
            let mut s = top.to_string();
            for limb in rest.iter().rev() {
                s.push_str(&format!("{limb:09}"));
            }
            s
        }
    };
    let zero = digits == "0";
    match usize::try_from(scale) {
        Ok(0) => {}
        Ok(scale) => {
            if digits.len() <= scale {
                digits.insert_str(0, &"0".repeat(scale + 1 - digits.len()));
            }
            digits.insert(digits.len() - scale, '.');
        }
        // A negative scale multiplies by a power of ten.
        Err(_) if !zero => {
            let zeros = usize::try_from(scale.unsigned_abs()).unwrap_or(0);
            if zeros > 10_000 {
                return Err("a decimal scale out of range".into());
            }
            digits.push_str(&"0".repeat(zeros));
        }
        Err(_) => {}
    }
    if negative && !zero {
        digits.insert(0, '-');
    }
    Ok(digits)
}

/// A decimal the converter wrote as a JSON number (`decimal.format=NUMERIC`), as its text with
/// `scale` digits; only while an `f64` holds it exactly (below 2^53 at that scale), else the
/// reader could not know the digits.
fn numeric_number(n: &serde_json::Number, scale: i32) -> Result<Text, String> {
    if let Some(i) = n.as_i64()
        && scale <= 0
    {
        return Ok(compact_str::format_compact!("{i}"));
    }
    let x = n.as_f64().ok_or("not a number")?;
    let places = usize::try_from(scale).unwrap_or(0);
    let exact_below = 9_007_199_254_740_992.0; // 2^53
    let scaled = x.abs() * 10f64.powi(places as i32);
    if places > 15 || scaled.is_nan() || scaled >= exact_below {
        return Err(
            "a decimal with more digits than a JSON number holds exactly (set the converter's \
             decimal.format=BASE64)"
                .into(),
        );
    }
    Ok(compact_str::format_compact!("{x:.places$}"))
}

fn kind_of(j: &J) -> &'static str {
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
    use std::collections::BTreeMap;

    use chrono::{NaiveDateTime, Timelike as _};
    use serde_json::json;

    use super::*;
    use crate::config::{MessageFormat, TopicConfig};
    use crate::event::ChangeEvent;
    use crate::source::kafka::decode::{Decoded, Decoder, RawMessage};

    /// The Debezium PostgreSQL connector's `source` block and its schema.
    fn source() -> (J, J) {
        let schema = json!({"type": "struct", "optional": false,
            "name": "io.debezium.connector.postgresql.Source", "field": "source", "fields": [
            {"type": "string", "optional": false, "field": "version"},
            {"type": "string", "optional": false, "field": "connector"},
            {"type": "string", "optional": false, "field": "name"},
            {"type": "int64", "optional": false, "field": "ts_ms"},
            {"type": "string", "optional": true, "name": "io.debezium.data.Enum", "version": 1,
             "parameters": {"allowed": "true,last,false,incremental"}, "default": "false",
             "field": "snapshot"},
            {"type": "string", "optional": false, "field": "db"},
            {"type": "string", "optional": false, "field": "schema"},
            {"type": "string", "optional": false, "field": "table"},
            {"type": "int64", "optional": true, "field": "txId"},
            {"type": "int64", "optional": true, "field": "lsn"}]});
        let value = json!({"version": "2.7.0.Final", "connector": "postgresql",
            "name": "dbserver1", "ts_ms": 1_714_979_289_000_i64, "snapshot": "false",
            "db": "shop", "schema": "public", "table": "t", "txId": 771, "lsn": 24_023_128});
        (schema, value)
    }

    /// A change event as the Debezium PostgreSQL connector writes it with the JSON converter's
    /// `schemas.enable=true`: the envelope schema (before, after, source, op, ts_ms) and the
    /// payload, with `fields` (Connect field schemas) and the `after` row.
    fn envelope(fields: &J, after: &J) -> String {
        let (source_schema, source) = source();
        let value = |field: &str| {
            json!({"type": "struct", "fields": fields, "optional": true,
                   "name": "dbserver1.public.t.Value", "field": field})
        };
        json!({
            "schema": {"type": "struct", "fields": [
                value("before"), value("after"), source_schema,
                {"type": "string", "optional": false, "field": "op"},
                {"type": "int64", "optional": true, "field": "ts_ms"},
                {"type": "struct", "fields": [
                    {"type": "string", "optional": false, "field": "id"},
                    {"type": "int64", "optional": false, "field": "total_order"},
                    {"type": "int64", "optional": false, "field": "data_collection_order"}],
                 "optional": true, "name": "event.block", "version": 1, "field": "transaction"}],
                "optional": false, "name": "dbserver1.public.t.Envelope", "version": 2},
            "payload": {"before": null, "after": after, "source": source, "op": "c",
                        "ts_ms": 1_714_979_289_500_i64, "transaction": null}
        })
        .to_string()
    }

    fn decoder(columns: &[(&str, ColumnType)]) -> Decoder {
        let topic = TopicConfig {
            name: "t".into(),
            format: MessageFormat::Debezium,
            key_columns: vec!["id".into()],
            columns: columns
                .iter()
                .map(|(n, t)| (n.to_string(), *t))
                .collect::<BTreeMap<_, _>>(),
        };
        Decoder::new(&topic, 1 << 20)
    }

    fn decode(d: &Decoder, text: &str) -> Result<ChangeEvent, DecodeError> {
        let msg = RawMessage {
            topic: "t",
            partition: 0,
            offset: 3,
            key: None,
            payload: Some(text.as_bytes()),
            timestamp_ms: None,
            timestamp_type: None,
            headers: Vec::new(),
        };
        match d.decode(&msg)? {
            Decoded::Event(e) => Ok(e.event),
            Decoded::Tombstone => panic!("tombstone"),
        }
    }

    /// The `v` column of an `{id, v}` row whose `v` has the Connect schema `schema`.
    fn one(schema: J, v: J) -> Result<Value, DecodeError> {
        one_declared(schema, v, &[])
    }

    fn one_declared(
        mut schema: J,
        v: J,
        columns: &[(&str, ColumnType)],
    ) -> Result<Value, DecodeError> {
        schema["field"] = json!("v");
        schema["optional"] = json!(true);
        let fields = json!([{"type": "int32", "optional": false, "field": "id"}, schema]);
        let e = decode(
            &decoder(columns),
            &envelope(&fields, &json!({"id": 1, "v": v})),
        )?;
        let after = e.after.expect("after");
        Ok(after.get("v").expect("v").clone())
    }

    fn ts(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn naive(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").unwrap()
    }

    fn numeric(s: &str) -> Value {
        Value::Numeric(s.into())
    }

    fn named(ty: &str, name: &str) -> J {
        json!({"type": ty, "name": name, "version": 1})
    }

    #[test]
    fn micro_timestamp_stays_that_instant_at_microsecond_precision() {
        let instant = ts("2024-05-06T07:08:09.123456Z");
        let micros = instant.timestamp_micros();
        assert_eq!(micros, 1_714_979_289_123_456);
        let schema = named("int64", "io.debezium.time.MicroTimestamp");
        // A PostgreSQL `timestamp`: no zone, the wall-clock time Debezium wrote as UTC.
        let v = one(schema.clone(), json!(micros)).unwrap();
        assert_eq!(v, Value::Timestamp(naive("2024-05-06T07:08:09.123456")));
        // Declared `timestamptz` (the reported case, read as milliseconds before: year 56314).
        let v = one_declared(schema, json!(micros), &[("v", ColumnType::Timestamptz)]).unwrap();
        assert_eq!(v, Value::TimestampTz(instant));
        let Value::TimestampTz(t) = v else { panic!() };
        assert_eq!(t.timestamp_micros(), micros);
    }

    #[test]
    fn nano_milli_and_connect_timestamps() {
        let v = one(
            named("int64", "io.debezium.time.NanoTimestamp"),
            json!(1_714_979_289_123_456_789_i64),
        )
        .unwrap();
        let Value::Timestamp(t) = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            t.and_utc().timestamp_nanos_opt(),
            Some(1_714_979_289_123_456_789)
        );
        assert_eq!(t.nanosecond(), 123_456_789);
        for name in [
            "io.debezium.time.Timestamp",
            "org.apache.kafka.connect.data.Timestamp",
        ] {
            assert_eq!(
                one(named("int64", name), json!(1_714_979_289_123_i64)).unwrap(),
                Value::Timestamp(naive("2024-05-06T07:08:09.123")),
                "{name}"
            );
        }
        // PostgreSQL's infinity as Debezium writes it is kept as text, not an error.
        assert_eq!(
            one(
                named("int64", "io.debezium.time.MicroTimestamp"),
                json!(9_223_372_036_825_200_000_i64)
            )
            .unwrap(),
            Value::Text("infinity".into())
        );
        let err = one(
            named("int64", "io.debezium.time.MicroTimestamp"),
            json!(i64::MAX),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("\"v\" (io.debezium.time.MicroTimestamp): instant out of range"),
            "{err}"
        );
    }

    #[test]
    fn zoned_timestamps_are_instants_in_utc() {
        let schema = named("string", "io.debezium.time.ZonedTimestamp");
        let expected = Value::TimestampTz(ts("2024-05-06T07:08:09.123456Z"));
        assert_eq!(
            one(schema.clone(), json!("2024-05-06T07:08:09.123456Z")).unwrap(),
            expected
        );
        assert_eq!(
            one(schema.clone(), json!("2024-05-06T09:08:09.123456+02:00")).unwrap(),
            expected
        );
        assert_eq!(
            one(schema.clone(), json!("infinity")).unwrap(),
            Value::Text("infinity".into())
        );
        let err = one(schema, json!("yesterday")).unwrap_err();
        assert_eq!(err.reason(), "wrong_type");
        assert!(!err.to_string().contains("yesterday"), "{err}");
    }

    #[test]
    fn dates_are_days_since_the_epoch() {
        for name in [
            "io.debezium.time.Date",
            "org.apache.kafka.connect.data.Date",
        ] {
            assert_eq!(
                one(named("int32", name), json!(19_849)).unwrap(),
                Value::Date(NaiveDate::from_ymd_opt(2024, 5, 6).unwrap()),
                "{name}"
            );
        }
        assert_eq!(
            one(named("int32", "io.debezium.time.Date"), json!(-1)).unwrap(),
            Value::Date(NaiveDate::from_ymd_opt(1969, 12, 31).unwrap())
        );
    }

    #[test]
    fn times_of_day_are_postgres_text() {
        let at: i64 = 7 * 3600 + 8 * 60 + 9; // 07:08:09
        let cases = [
            (
                "int32",
                "io.debezium.time.Time",
                json!(at * 1000 + 123),
                "07:08:09.123",
            ),
            (
                "int32",
                "org.apache.kafka.connect.data.Time",
                json!(at * 1000),
                "07:08:09",
            ),
            (
                "int64",
                "io.debezium.time.MicroTime",
                json!(at * 1_000_000 + 123_456),
                "07:08:09.123456",
            ),
            (
                "int64",
                "io.debezium.time.MicroTime",
                json!(at * 1_000_000 + 120_000),
                "07:08:09.12",
            ),
            (
                "int64",
                "io.debezium.time.NanoTime",
                json!(at * 1_000_000_000 + 123_456_789),
                "07:08:09.123456789",
            ),
            (
                "int64",
                "io.debezium.time.MicroTime",
                json!(86_400_000_000_i64),
                "24:00:00",
            ),
            (
                "string",
                "io.debezium.time.ZonedTime",
                json!("07:08:09.123456Z"),
                "07:08:09.123456Z",
            ),
        ];
        for (ty, name, v, text) in cases {
            assert_eq!(
                one(named(ty, name), v).unwrap(),
                Value::Text(text.into()),
                "{name}"
            );
        }
        let err = one(
            named("int64", "io.debezium.time.MicroTime"),
            json!(86_400_000_001_i64),
        )
        .unwrap_err();
        assert!(err.to_string().contains("outside 00:00"), "{err}");
    }

    fn decimal_schema(scale: &str) -> J {
        json!({"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
               "parameters": {"scale": scale, "connect.decimal.precision": "30"}})
    }

    #[test]
    fn base64_decimals_read_back_as_their_decimal_text() {
        let cases = [
            ("BNI=", "2", "12.34"),
            ("+y4=", "2", "-12.34"),
            ("BNI=", "0", "1234"),
            ("+y4=", "0", "-1234"),
            ("BQ==", "2", "0.05"),
            ("+w==", "2", "-0.05"),
            ("AA==", "3", "0.000"),
            ("AA==", "0", "0"),
            ("/4A=", "1", "-12.8"),
            ("AIA=", "0", "128"),
            ("J+QbMka+ybFuOYEV", "5", "123456789012345678901234.56789"),
            ("BNI=", "-2", "123400"),
        ];
        for (b64, scale, text) in cases {
            assert_eq!(
                one(decimal_schema(scale), json!(b64)).unwrap(),
                numeric(text),
                "{b64} scale {scale}"
            );
        }
        // `decimal.format=NUMERIC`: the decimal as a JSON number, exact at its scale.
        assert_eq!(
            one(decimal_schema("2"), json!(12.34)).unwrap(),
            numeric("12.34")
        );
        assert_eq!(
            one(decimal_schema("2"), json!(12)).unwrap(),
            numeric("12.00")
        );
        assert_eq!(one(decimal_schema("0"), json!(-7)).unwrap(), numeric("-7"));
        let err = one(decimal_schema("2"), json!(1.0e17)).unwrap_err();
        assert!(err.to_string().contains("decimal.format=BASE64"), "{err}");
        let err = one(decimal_schema("2"), json!("not base64!")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column \"v\" (org.apache.kafka.connect.data.Decimal): a string that is not base64"
        );
        // The reported case with `amount` declared numeric: 12.34, not a dead letter.
        assert_eq!(
            one_declared(
                decimal_schema("2"),
                json!("BNI="),
                &[("v", ColumnType::Numeric)]
            )
            .unwrap(),
            numeric("12.34")
        );
    }

    #[test]
    fn variable_scale_decimals() {
        let schema = json!({"type": "struct", "name": "io.debezium.data.VariableScaleDecimal",
            "version": 1, "doc": "Variable scaled decimal", "fields": [
                {"type": "int32", "optional": false, "field": "scale"},
                {"type": "bytes", "optional": false, "field": "value"}]});
        let cases = [
            (json!({"scale": 3, "value": "BNI="}), "1.234"),
            (json!({"scale": 2, "value": "+y4="}), "-12.34"),
            (json!({"scale": 0, "value": "BNI="}), "1234"),
            (
                json!({"scale": 5, "value": "J+QbMka+ybFuOYEV"}),
                "123456789012345678901234.56789",
            ),
        ];
        for (v, text) in cases {
            assert_eq!(one(schema.clone(), v).unwrap(), numeric(text));
        }
        assert!(one(schema, json!({"scale": 1})).is_err());
    }

    #[test]
    fn debezium_data_types() {
        let doc = one(
            named("string", "io.debezium.data.Json"),
            json!(r#"{"a": [1, 2]}"#),
        );
        assert_eq!(
            doc.unwrap(),
            Value::Json(JsonText::parse(r#"{"a": [1, 2]}"#).unwrap())
        );
        assert!(one(named("string", "io.debezium.data.Json"), json!("{")).is_err());
        let id = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(
            one(named("string", "io.debezium.data.Uuid"), json!(id)).unwrap(),
            Value::Uuid(id.parse().unwrap())
        );
        // BIT(10): little-endian bytes, base64.
        let bits = json!({"type": "bytes", "name": "io.debezium.data.Bits", "version": 1,
                          "parameters": {"length": "10"}});
        assert_eq!(
            one(bits, json!("BQI=")).unwrap(),
            Value::Bytes(vec![0x05, 0x02])
        );
        let status = json!({"type": "string", "name": "io.debezium.data.Enum", "version": 1,
                            "parameters": {"allowed": "new,paid"}});
        assert_eq!(
            one(status, json!("paid")).unwrap(),
            Value::Text("paid".into())
        );
        // PostGIS: the {wkb, srid} struct kept as its JSON (wkb base64).
        let geometry = json!({"type": "struct", "name": "io.debezium.data.geometry.Geometry",
            "version": 1, "fields": [
                {"type": "bytes", "optional": false, "field": "wkb"},
                {"type": "int32", "optional": true, "field": "srid"}]});
        let point = json!({"wkb": "AQEAAAAAAAAAAADwPwAAAAAAAABA", "srid": 4326});
        assert_eq!(
            one(geometry, point.clone()).unwrap(),
            Value::Json(JsonText::from(point))
        );
        for name in [
            "io.debezium.data.FloatVector",
            "io.debezium.data.DoubleVector",
        ] {
            let items = if name.contains("Float") {
                "float32"
            } else {
                "float64"
            };
            let schema = json!({"type": "array", "name": name, "version": 1,
                                "items": {"type": items, "optional": false}});
            assert_eq!(
                one(schema, json!([0.5, -1.0, 2])).unwrap(),
                Value::Vector(vec![0.5, -1.0, 2.0]),
                "{name}"
            );
        }
        let err = one(
            json!({"type": "array", "name": "io.debezium.data.DoubleVector",
                   "items": {"type": "float64"}}),
            json!([0.5, "x"]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("DoubleVector"), "{err}");
    }

    #[test]
    fn plain_connect_types() {
        let plain = |ty: &str| json!({"type": ty});
        assert_eq!(
            one(plain("boolean"), json!(true)).unwrap(),
            Value::Bool(true)
        );
        assert_eq!(one(plain("int8"), json!(-5)).unwrap(), Value::Int16(-5));
        assert_eq!(one(plain("int16"), json!(300)).unwrap(), Value::Int16(300));
        assert_eq!(
            one(plain("int32"), json!(70_000)).unwrap(),
            Value::Int32(70_000)
        );
        assert_eq!(
            one(plain("int64"), json!(1_i64 << 40)).unwrap(),
            Value::Int64(1 << 40)
        );
        assert!(one(plain("int16"), json!(70_000)).is_err());
        assert_eq!(
            one(plain("float32"), json!(0.25)).unwrap(),
            Value::Float32(0.25)
        );
        assert_eq!(
            one(plain("float64"), json!(99.5)).unwrap(),
            Value::Float64(99.5)
        );
        let Value::Float64(nan) = one(plain("float64"), json!("NaN")).unwrap() else {
            panic!()
        };
        assert!(nan.is_nan());
        assert_eq!(
            one(plain("string"), json!("héllo")).unwrap(),
            Value::Text("héllo".into())
        );
        // `bytea`: base64 in JSON, binary in the event.
        assert_eq!(
            one(plain("bytes"), json!("AP8H")).unwrap(),
            Value::Bytes(vec![0, 255, 7])
        );
        assert_eq!(one(plain("string"), json!(null)).unwrap(), Value::Null);
        // `text[]` and `int4[]`.
        let tags = json!({"type": "array", "items": {"type": "string", "optional": true}});
        assert_eq!(
            one(tags, json!(["a", null])).unwrap(),
            Value::Array(vec![Value::Text("a".into()), Value::Null])
        );
        let days = json!({"type": "array",
                          "items": {"type": "int32", "name": "io.debezium.time.Date"}});
        assert_eq!(
            one(days, json!([0])).unwrap(),
            Value::Array(vec![Value::Date(
                NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()
            )])
        );
        // MicroDuration (an interval) is its literal int64.
        assert_eq!(
            one(
                named("int64", "io.debezium.time.MicroDuration"),
                json!(90_000_000)
            )
            .unwrap(),
            Value::Int64(90_000_000)
        );
        let err = one(plain("int32"), json!("7")).unwrap_err();
        assert_eq!(err.to_string(), "column \"v\" (int32): found a string");
    }

    #[test]
    fn unchanged_toasted_values_are_marked_as_such() {
        assert_eq!(
            one(
                json!({"type": "string"}),
                json!("__debezium_unavailable_value")
            )
            .unwrap(),
            Value::UnchangedToast
        );
        assert_eq!(
            one(json!({"type": "bytes"}), json!(UNAVAILABLE_BASE64)).unwrap(),
            Value::UnchangedToast
        );
    }

    fn orders_fields(extra: Option<J>) -> J {
        let mut fields = vec![
            json!({"type": "int32", "optional": false, "field": "id"}),
            json!({"type": "int64", "optional": true, "name": "io.debezium.time.MicroTimestamp",
                   "version": 1, "field": "placed"}),
            json!({"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal",
                   "version": 1, "parameters": {"scale": "2", "connect.decimal.precision": "10"},
                   "field": "amount"}),
            json!({"type": "string", "optional": true, "name": "io.debezium.time.ZonedTimestamp",
                   "version": 1, "field": "paid_at"}),
        ];
        fields.extend(extra);
        J::Array(fields)
    }

    #[test]
    fn the_envelope_schema_types_the_row_and_is_compiled_once() {
        let d = decoder(&[]);
        let fields = orders_fields(None);
        let after = json!({"id": 1, "placed": 1_714_979_289_123_456_i64, "amount": "BNI=",
                           "paid_at": "2024-05-06T07:08:09.123456Z"});
        let first = decode(&d, &envelope(&fields, &after)).unwrap();
        let schema = first
            .schema
            .clone()
            .expect("a row schema from the envelope");
        assert_eq!(
            schema.columns,
            vec![
                ("id".to_owned(), ValueType::Int32),
                ("placed".to_owned(), ValueType::Timestamp),
                ("amount".to_owned(), ValueType::Numeric),
                ("paid_at".to_owned(), ValueType::TimestampTz),
            ]
        );
        // Columns in the schema's order, typed.
        let row = first.after.unwrap();
        let names: Vec<&str> = row.columns().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "placed", "amount", "paid_at"]);
        assert_eq!(row.get("amount"), Some(&numeric("12.34")));
        assert_eq!(first.key.get("id"), Some(&Value::Int32(1)));
        // The same schema (here re-indented) is the same compiled schema: the same Arc.
        let spaced = serde_json::to_string_pretty(
            &serde_json::from_str::<J>(&envelope(&fields, &after)).unwrap(),
        )
        .unwrap();
        let again = decode(&d, &spaced).unwrap();
        assert!(Arc::ptr_eq(&schema, again.schema.as_ref().unwrap()));
        assert_eq!(again.schema_version, first.schema_version);
        // A column added at the source: a new schema, a new version.
        let fields = orders_fields(Some(json!({"type": "string", "optional": true,
                                               "field": "note"})));
        let mut after = after;
        after["note"] = json!("leave at the door");
        let evolved = decode(&d, &envelope(&fields, &after)).unwrap();
        let evolved_schema = evolved.schema.unwrap();
        assert_eq!(
            evolved_schema.columns.last(),
            Some(&("note".to_owned(), ValueType::Text))
        );
        assert!(evolved.schema_version > first.schema_version);
    }

    #[test]
    fn declared_columns_win_over_the_envelope_schema() {
        let d = decoder(&[
            ("amount", ColumnType::Text),
            ("placed", ColumnType::Timestamptz),
            ("extra", ColumnType::Int64),
            ("id", ColumnType::Int64),
        ]);
        let after = json!({"id": 1, "placed": 1_714_979_289_123_456_i64, "amount": "BNI=",
                           "paid_at": null});
        let e = decode(&d, &envelope(&orders_fields(None), &after)).unwrap();
        let schema = e.schema.unwrap();
        assert_eq!(
            schema.columns,
            vec![
                ("id".to_owned(), ValueType::Int64),
                ("placed".to_owned(), ValueType::TimestampTz),
                ("amount".to_owned(), ValueType::Text),
                ("paid_at".to_owned(), ValueType::TimestampTz),
                ("extra".to_owned(), ValueType::Int64),
            ]
        );
        let row = e.after.unwrap();
        assert_eq!(row.get("id"), Some(&Value::Int64(1)));
        assert_eq!(row.get("amount"), Some(&Value::Text("12.34".into())));
        assert_eq!(
            row.get("placed"),
            Some(&Value::TimestampTz(ts("2024-05-06T07:08:09.123456Z")))
        );
        assert_eq!(row.get("paid_at"), Some(&Value::Null));
        // A semantic value the declared type cannot hold is a dead letter that says so.
        let d = decoder(&[("amount", ColumnType::Bool)]);
        let err = decode(&d, &envelope(&orders_fields(None), &after)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column \"amount\" is declared bool but holds a Connect \
             org.apache.kafka.connect.data.Decimal value"
        );
    }

    #[test]
    fn envelopes_whose_schema_describes_no_row_decode_as_schemaless() {
        let d = decoder(&[]);
        let text = r#"{"schema":{"type":"struct","optional":false,"name":"x.Envelope"},"payload":{"op":"c","after":{"id":1,"v":"BNI="}}}"#;
        let e = decode(&d, text).unwrap();
        assert!(e.schema.is_none());
        assert_eq!(e.after.unwrap().get("v"), Some(&Value::Text("BNI=".into())));
        // An invalid schema is a dead letter naming the field.
        let bad = json!([{"type": "int32", "field": "id"}, {"type": "decimal", "field": "v"}]);
        let err = decode(&d, &envelope(&bad, &json!({"id": 1, "v": 1}))).unwrap_err();
        assert_eq!(err.reason(), "invalid_envelope");
        assert!(
            err.to_string()
                .contains("`before.v`: unknown Connect type \"decimal\""),
            "{err}"
        );
        let err = decode(&d, "[1]").unwrap_err();
        assert_eq!(
            err,
            DecodeError::NotAnObject {
                what: "Debezium message",
                found: "an array"
            }
        );
        assert_eq!(decode(&d, "{").unwrap_err().reason(), "invalid_json");
    }
}
