//! Parses a JSON object straight into a typed [`Row`], without building a `serde_json::Value`
//! tree first (the intermediate map's allocations cost more than the parse itself): a nested
//! array or object is re-written as compact JSON text ([`JsonText`]) while it is parsed.
//!
//! **Numbers keep their digits.** serde_json (without `arbitrary_precision`) hands a visitor
//! only an `f64` for any number that is not an `i64`/`u64`, so `123456789012345678901234567890`
//! or `0.1000000000000000000000001` would be rounded. Where a number is not converted to a
//! declared type its source text is kept instead: an undeclared number whose `f64` does not
//! print as it was written becomes a JSON number of exactly that text ([`Value::Json`]), a
//! nested number is copied as written, and a declared `numeric` takes the text. The text is
//! found by [`Numbers`]: numbers are visited in document order, so the n-th number visited is
//! the n-th number token of the message; the tokens are located only as far as the last number
//! that needs its text (one scan on from the previous, strings skipped with `memchr`), so
//! messages with integers alone pay nothing. Not serde_json's `arbitrary_precision`: that feature changes `serde_json::Number`
//! in the whole dependency graph (deltalake, tokio-postgres, …) and breaks numbers inside
//! `#[serde(untagged)]` enums, such as [`crate::event::Position`]'s older forms. Not its
//! `raw_value` either: capturing every value raw and parsing it again costs a second pass over
//! every value, where this costs one over the messages that need it.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::ops::Range;

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
    let numbers = Numbers::new(text);
    let seed = RowSeed::new(columns, what, &failure, &numbers);
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

/// Parses one JSON object into a row (see [`parse_row`]); also the images of schemaless
/// Debezium envelopes ([`super::envelope`]), sharing that message's [`Numbers`].
pub(super) struct RowSeed<'a> {
    columns: &'a [(Name, ColumnType)],
    what: &'static str,
    /// A decoding error that is not a JSON syntax error (kept apart from serde's error text).
    failure: &'a RefCell<Option<DecodeError>>,
    numbers: &'a Numbers<'a>,
}

impl<'a> RowSeed<'a> {
    /// A row of `columns` (declared), called `what` in errors, which go to `failure`; `numbers`
    /// is the whole message's.
    pub(super) fn new(
        columns: &'a [(Name, ColumnType)],
        what: &'static str,
        failure: &'a RefCell<Option<DecodeError>>,
        numbers: &'a Numbers<'a>,
    ) -> Self {
        RowSeed {
            columns,
            what,
            failure,
            numbers,
        }
    }
}

/// The source text of the numbers of one message, by their order in it (see the module doc).
pub(super) struct Numbers<'t> {
    text: &'t str,
    /// Numbers visited so far.
    seen: Cell<usize>,
    /// How far the number tokens of `text` have been located: how many, and the byte after the
    /// last. Texts are asked for in document order, so each is found by scanning on from there
    /// and the scan stops at the last number whose text is needed.
    located: Cell<(usize, usize)>,
}

impl<'t> Numbers<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        Numbers {
            text,
            seen: Cell::new(0),
            located: Cell::new((0, 0)),
        }
    }

    /// Counts a number that is visited: the next in document order; returns its index.
    pub(super) fn visit(&self) -> usize {
        let n = self.seen.get();
        self.seen.set(n + 1);
        n
    }

    /// The text of the number with index `n`, as the message wrote it (`None` for a number
    /// before the last one located, which document order never asks for).
    fn text(&self, n: usize) -> Option<&'t str> {
        let bytes = self.text.as_bytes();
        let (mut found, mut at) = self.located.get();
        let mut span = None;
        while found <= n {
            let token = next_number(bytes, at)?;
            at = token.end;
            found += 1;
            span = Some(token);
        }
        self.located.set((found, at));
        span.filter(|_| found == n + 1)
            .and_then(|r| self.text.get(r))
    }

    /// A number visited as `x`: its text (`None` when it cannot be found, which valid JSON
    /// never does; the caller then uses `x`).
    fn float_text(&self) -> Option<&'t str> {
        let n = self.visit();
        self.text(n)
    }
}

/// The next number token of a JSON text at or after byte `from` (outside strings, starting with
/// a digit or `-`); strings are skipped with `memchr`.
fn next_number(b: &[u8], from: usize) -> Option<Range<usize>> {
    let mut i = from;
    loop {
        i += b
            .get(i..)?
            .iter()
            .position(|c| matches!(c, b'"' | b'-' | b'0'..=b'9'))?;
        if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
                let escape = b.get(i) == Some(&b'\\');
                i += if escape { 2 } else { 1 };
                if !escape {
                    break;
                }
            }
        } else {
            let start = i;
            while b
                .get(i)
                .is_some_and(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
            {
                i += 1;
            }
            return Some(start..i);
        }
    }
}

/// Whether `x` prints (as serde_json prints an `f64`) exactly as `text`: then `x` carries the
/// number without loss of its digits.
fn prints_as(x: f64, text: &str) -> bool {
    let mut buf = [0u8; 32];
    let mut out = std::io::Cursor::new(&mut buf[..]);
    if serde_json::to_writer(&mut out, &x).is_err() {
        return false;
    }
    let n = out.position() as usize;
    buf.get(..n) == Some(text.as_bytes())
}

/// An undeclared number that serde_json gave as `x`, written as `text`: a float when it prints
/// as written, else the exact text as a JSON number.
fn inferred_float(x: f64, text: Option<&str>) -> Value {
    match text {
        Some(t) if !prints_as(x, t) => Value::Json(JsonText::from_written(t.to_owned())),
        _ => Value::Float64(x),
    }
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
            let numbers = self.numbers;
            let value = match declared {
                Some((_, ColumnType::Json)) => map.next_value_seed(JsonSeed(numbers))?,
                Some((_, ty)) => map.next_value_seed(TypedSeed {
                    column: &name,
                    ty: *ty,
                    failure: self.failure,
                    numbers,
                })?,
                None => map.next_value_seed(Inferred(numbers))?,
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
    numbers: &'a Numbers<'a>,
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
        self.numbers.visit();
        self.convert(Scalar::Int(i))
    }
    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.numbers.visit();
        match i64::try_from(u) {
            Ok(i) => self.convert(Scalar::Int(i)),
            Err(_) => self.convert(Scalar::UInt(u)),
        }
    }
    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Value, E> {
        let n = self.numbers.visit();
        // A float64 column is the f64 itself: its text is not needed (nor looked for).
        let text = match self.ty {
            ColumnType::Float64 => None,
            _ => self.numbers.text(n),
        };
        self.convert(Scalar::Float(x, text))
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

/// An undeclared column: typed from its JSON form (integers → Int64, other numbers → Float64
/// when that keeps their digits, else their exact text as a JSON number, arrays/objects →
/// Json).
struct Inferred<'a>(&'a Numbers<'a>);

impl<'de> DeserializeSeed<'de> for Inferred<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Inferred<'_> {
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
        self.0.visit();
        Ok(Value::Int64(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        self.0.visit();
        Ok(i64::try_from(u).map_or_else(|_| big_integer(u), Value::Int64))
    }
    fn visit_f64<E>(self, x: f64) -> Result<Value, E> {
        Ok(inferred_float(x, self.0.float_text()))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::Text(s.into()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::Text(s.into()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(64);
        JsonWriter(&mut out, self.0).visit_seq(seq)?;
        Ok(Value::Json(JsonText::from_written(json_string(out))))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(64);
        JsonWriter(&mut out, self.0).visit_map(map)?;
        Ok(Value::Json(JsonText::from_written(json_string(out))))
    }
}

/// An undeclared integer beyond `i64`: its digits as a JSON number (not a string: `_payload`
/// and the pgvector payload keep it a number).
pub(super) fn big_integer(u: u64) -> Value {
    Value::Json(JsonText::from_written(u.to_string()))
}

/// A column declared `json`: any JSON value, kept as compact text (`null` is a NULL).
struct JsonSeed<'a>(&'a Numbers<'a>);

impl<'de> DeserializeSeed<'de> for JsonSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        let mut out = Vec::with_capacity(64);
        JsonWriter(&mut out, self.0).deserialize(d)?;
        Ok(if out == b"null" {
            Value::Null
        } else {
            Value::Json(JsonText::from_written(json_string(out)))
        })
    }
}

/// Writes the JSON value being parsed to the buffer as compact JSON (numbers as written,
/// strings re-escaped), without an intermediate tree.
struct JsonWriter<'a, 'n>(&'a mut Vec<u8>, &'n Numbers<'n>);

impl<'de> DeserializeSeed<'de> for JsonWriter<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonWriter<'_, '_> {
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
        self.1.visit();
        Value::Int64(i).write_json(self.0);
        Ok(())
    }
    fn visit_u64<E>(self, u: u64) -> Result<(), E> {
        self.1.visit();
        // serde_json writes integers with itoa.
        let _ = serde_json::to_writer(&mut *self.0, &u);
        Ok(())
    }
    fn visit_f64<E>(self, x: f64) -> Result<(), E> {
        match self.1.float_text() {
            Some(text) => self.0.extend_from_slice(text.as_bytes()),
            None => Value::Float64(x).write_json(self.0),
        }
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
            if seq
                .next_element_seed(JsonWriter(&mut *self.0, self.1))?
                .is_none()
            {
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
            if map
                .next_key_seed(JsonWriter(&mut *self.0, self.1))?
                .is_none()
            {
                self.0.truncate(mark);
                break;
            }
            self.0.push(b':');
            map.next_value_seed(JsonWriter(&mut *self.0, self.1))?;
            first = false;
        }
        self.0.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Value {
        Value::Json(JsonText::from_written(text.to_owned()))
    }

    #[test]
    fn numbers_a_float_would_round_keep_their_text() {
        let text = r#"{"big": 123456789012345678901234567890, "u": 18446744073709551615,
            "dec": 1234567890.123456789012345678901234567890, "plain": 12.5, "exp": 1e3,
            "s": "a \"quoted\" 1.0000000000000000000001 in a string", "i": -7,
            "deep": {"x": [0.1000000000000000000000001, 2, "3"], "y": 0.25}}"#;
        let row = parse_row(text, &[], "message value").unwrap();
        assert_eq!(
            row.get("big"),
            Some(&json("123456789012345678901234567890"))
        );
        assert_eq!(row.get("u"), Some(&json("18446744073709551615")));
        assert_eq!(
            row.get("dec"),
            Some(&json("1234567890.123456789012345678901234567890"))
        );
        assert_eq!(row.get("plain"), Some(&Value::Float64(12.5)));
        assert_eq!(row.get("exp"), Some(&json("1e3")));
        assert_eq!(row.get("i"), Some(&Value::Int64(-7)));
        assert_eq!(
            row.get("deep"),
            Some(&json(
                r#"{"x":[0.1000000000000000000000001,2,"3"],"y":0.25}"#
            ))
        );
        assert_eq!(
            row.json_text(),
            r#"{"big":123456789012345678901234567890,"u":18446744073709551615,"dec":1234567890.123456789012345678901234567890,"plain":12.5,"exp":1e3,"s":"a \"quoted\" 1.0000000000000000000001 in a string","i":-7,"deep":{"x":[0.1000000000000000000000001,2,"3"],"y":0.25}}"#
        );
    }

    #[test]
    fn number_texts_are_found_past_strings_with_escapes_and_digits() {
        // A string ending in an escaped backslash, one holding an escaped quote and digits, and
        // negative and exponent forms between the numbers whose text is needed.
        let text = r#"{"p":"c:\\","q":"say \"1.5\" -2","a":-1,"b":0.1000000000000000000000001,
            "c":"\\\"3","d":[-2.5e-3,7],"e":1.10}"#;
        let row = parse_row(text, &[], "message value").unwrap();
        assert_eq!(row.get("a"), Some(&Value::Int64(-1)));
        assert_eq!(row.get("b"), Some(&json("0.1000000000000000000000001")));
        assert_eq!(row.get("d"), Some(&json("[-2.5e-3,7]")));
        assert_eq!(row.get("e"), Some(&json("1.10")));
        assert_eq!(row.get("p"), Some(&Value::Text("c:\\".into())));
    }

    #[test]
    fn declared_numeric_takes_the_text_and_an_overflowing_int64_names_the_value() {
        let columns = [
            (Name::from("amount"), ColumnType::Numeric),
            (Name::from("n"), ColumnType::Int64),
        ];
        let row = parse_row(
            r#"{"amount": 0.1000000000000000000000000000000000000001, "n": 5}"#,
            &columns,
            "message value",
        )
        .unwrap();
        assert_eq!(
            row.get("amount"),
            Some(&Value::Numeric(
                "0.1000000000000000000000000000000000000001".into()
            ))
        );
        for big in [
            "123456789012345678901234567890",
            "9223372036854775808",
            "1.5",
        ] {
            let err = parse_row(&format!(r#"{{"n": {big}}}"#), &columns, "message value")
                .unwrap_err()
                .to_string();
            assert!(err.contains(r#"column "n""#), "{err}");
            assert!(err.contains(big), "{err}");
        }
    }
}
