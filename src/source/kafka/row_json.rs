//! Parses a JSON object straight into a typed [`Row`], without building a `serde_json::Value`
//! tree first (the intermediate map's allocations cost more than the parse itself): a nested
//! array or object is re-written as compact JSON text ([`JsonText`]) while it is parsed.

use std::cell::RefCell;
use std::fmt;

use super::decode::{DecodeError, Scalar, typed_scalar};
use crate::config::ColumnType;
use crate::event::{JsonText, Name, Row, Value, json_string, write_json_str};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Parses `text` (already checked to be UTF-8) as one JSON object into a row; `columns` are the
/// declared columns and their types (the others are typed from their JSON form).
pub(super) fn parse_row(
    text: &str,
    columns: &[(Name, ColumnType)],
    what: &'static str,
) -> Result<Row, DecodeError> {
    let failure = RefCell::new(None);
    let seed = RowSeed {
        columns,
        what,
        failure: &failure,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let result = seed
        .deserialize(&mut de)
        .and_then(|row| de.end().map(|()| row));
    match (result, failure.into_inner()) {
        (_, Some(e)) => Err(e),
        (Ok(row), None) => Ok(row),
        (Err(e), None) => Err(DecodeError::InvalidJson(e.to_string())),
    }
}

struct RowSeed<'a> {
    columns: &'a [(Name, ColumnType)],
    what: &'static str,
    /// A decoding error that is not a JSON syntax error (kept apart from serde's error text).
    failure: &'a RefCell<Option<DecodeError>>,
}

impl RowSeed<'_> {
    fn not_object<E: de::Error>(&self, found: &'static str) -> E {
        *self.failure.borrow_mut() = Some(DecodeError::NotAnObject {
            what: self.what,
            found,
        });
        E::custom("not an object")
    }
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Row;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Row, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = Row;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Row, A::Error> {
        let mut row = Row(Vec::with_capacity(map.size_hint().unwrap_or(8)));
        while let Some(name) = map.next_key::<Name>()? {
            let declared = self.columns.iter().find(|(n, _)| *n == name);
            let value = match declared {
                Some((_, ColumnType::Json)) => map.next_value_seed(JsonSeed)?,
                Some((_, ty)) => map.next_value_seed(TypedSeed {
                    column: &name,
                    ty: *ty,
                    failure: self.failure,
                })?,
                None => map.next_value_seed(Inferred)?,
            };
            row.push(name, value);
        }
        Ok(row)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Row, A::Error> {
        Err(self.not_object("an array"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Row, E> {
        Err(self.not_object("a string"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Row, E> {
        Err(self.not_object("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Row, E> {
        Err(self.not_object("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Row, E> {
        Err(self.not_object("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Row, E> {
        Err(self.not_object("a number"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Row, E> {
        Err(self.not_object("null"))
    }
}

/// A declared (non-`json`) column: the value converted to its type, or the reason it cannot be
/// (kept in `failure`, the parse stopped).
struct TypedSeed<'a> {
    column: &'a str,
    ty: ColumnType,
    failure: &'a RefCell<Option<DecodeError>>,
}

impl TypedSeed<'_> {
    fn convert<E: de::Error>(self, v: Scalar<'_>) -> Result<Value, E> {
        typed_scalar(self.column, self.ty, v).map_err(|e| {
            *self.failure.borrow_mut() = Some(e);
            E::custom("wrong type")
        })
    }
}

impl<'de> DeserializeSeed<'de> for TypedSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TypedSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a value of type {:?}", self.ty)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.convert(Scalar::Null)
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.convert(Scalar::Bool(b))
    }
    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.convert(Scalar::Int(i))
    }
    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        match i64::try_from(u) {
            Ok(i) => self.convert(Scalar::Int(i)),
            Err(_) => self.convert(Scalar::UInt(u)),
        }
    }
    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Value, E> {
        self.convert(Scalar::Float(x))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.convert(Scalar::Str(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        self.convert(Scalar::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        self.convert(Scalar::Object)
    }
}

/// An undeclared column: typed from its JSON form (integers → Int64, other numbers → Float64,
/// integers beyond i64 → Numeric, arrays/objects → Json).
struct Inferred;

impl<'de> DeserializeSeed<'de> for Inferred {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Inferred {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int64(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(i64::try_from(u).map_or_else(
            |_| Value::Numeric(compact_str::format_compact!("{u}")),
            Value::Int64,
        ))
    }
    fn visit_f64<E>(self, x: f64) -> Result<Value, E> {
        Ok(Value::Float64(x))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::Text(s.into()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::Text(s.into()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(64);
        JsonWriter(&mut out).visit_seq(seq)?;
        Ok(Value::Json(JsonText::from_written(json_string(out))))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(64);
        JsonWriter(&mut out).visit_map(map)?;
        Ok(Value::Json(JsonText::from_written(json_string(out))))
    }
}

/// A column declared `json`: any JSON value, kept as compact text (`null` is a NULL).
struct JsonSeed;

impl<'de> DeserializeSeed<'de> for JsonSeed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        let mut out = Vec::with_capacity(64);
        JsonWriter(&mut out).deserialize(d)?;
        Ok(if out == b"null" {
            Value::Null
        } else {
            Value::Json(JsonText::from_written(json_string(out)))
        })
    }
}

/// Writes the JSON value being parsed to the buffer as compact JSON (numbers as `serde_json`
/// writes them once parsed, strings re-escaped), without an intermediate tree.
struct JsonWriter<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for JsonWriter<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonWriter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }
    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        Value::Bool(b).write_json(self.0);
        Ok(())
    }
    fn visit_i64<E>(self, i: i64) -> Result<(), E> {
        Value::Int64(i).write_json(self.0);
        Ok(())
    }
    fn visit_u64<E>(self, u: u64) -> Result<(), E> {
        // serde_json writes integers with itoa.
        let _ = serde_json::to_writer(&mut *self.0, &u);
        Ok(())
    }
    fn visit_f64<E>(self, x: f64) -> Result<(), E> {
        Value::Float64(x).write_json(self.0);
        Ok(())
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        write_json_str(self.0, s);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push(b'[');
        let mut first = true;
        loop {
            let mark = self.0.len();
            if !first {
                self.0.push(b',');
            }
            if seq.next_element_seed(JsonWriter(&mut *self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            first = false;
        }
        self.0.push(b']');
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.push(b'{');
        let mut first = true;
        loop {
            let mark = self.0.len();
            if !first {
                self.0.push(b',');
            }
            if map.next_key_seed(JsonWriter(&mut *self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            self.0.push(b':');
            map.next_value_seed(JsonWriter(&mut *self.0))?;
            first = false;
        }
        self.0.push(b'}');
        Ok(())
    }
}
