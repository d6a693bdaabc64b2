//! The top level of a Debezium message, parsed in one pass without building what is not needed:
//! the envelope object itself, or the JSON converter's `{schema, payload}` wrapper around one
//! (its `schema` hashed token by token, not built; [`super::connect`] compiles it once per hash).
//!
//! The `before`/`after` images are parsed one of two ways ([`Images`]):
//! - **into rows** when no Connect schema will type them: straight into a [`Row`] by
//!   [`super::row_json`], declared columns converted, **numbers keeping their digits** exactly as
//!   on a plain JSON topic (`123456789012345678901234567890` stays that number, never an `f64`);
//! - **into trees** (`serde_json` objects) when a Connect schema will: its field types say what
//!   each number is, so nothing is lost by the tree.
//!
//! The images' exact number text is found by the n-th-number rule of [`Numbers`], so every
//! number of the message before an image is counted while it is parsed (the schema's, the
//! `source` block's), and the other fields are built by a counting visitor rather than by
//! `serde_json::Value`'s own.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value as J};
use twox_hash::XxHash3_64;

use super::decode::DecodeError;
use super::row_json::{Numbers, RowSeed};
use crate::config::ColumnType;
use crate::event::{Name, Row};

/// How the `before`/`after` images are parsed.
#[derive(Debug, Clone, Copy)]
pub(super) enum Images<'a> {
    /// As `serde_json` objects, for a Connect schema to type.
    Trees,
    /// Straight into rows, these declared columns converted to their types.
    Rows(&'a [(Name, ColumnType)]),
}

/// A `before` or `after` image as parsed.
#[derive(Debug)]
pub(super) enum Image {
    /// Absent, or `null`.
    Absent,
    Tree(Map<String, J>),
    Row(Row),
    /// Not an object: what it was.
    NotObject(&'static str),
}

/// The fields of an envelope: its images, and the others (`op`, `source`, `ts_ms`, …).
#[derive(Debug)]
pub(super) struct Fields {
    pub(super) before: Image,
    pub(super) after: Image,
    pub(super) rest: Map<String, J>,
}

/// A Debezium message as parsed.
#[derive(Debug)]
pub(super) struct Envelope {
    /// The hash of the `schema` value, when the message wraps the envelope in `payload`.
    pub(super) schema_hash: Option<u64>,
    /// The envelope's fields; `None` for a null `payload` (a tombstone).
    pub(super) fields: Option<Fields>,
}

/// Whether the message looks like the JSON converter's `{schema, payload}` wrapper (which
/// writes `schema` first; other writers may not): then it is parsed for a Connect schema first.
/// A schemaless envelope names neither key outside its `source` block (whose `schema` is the
/// table's schema name), so one of them alone does not count.
pub(super) fn looks_wrapped(text: &str) -> bool {
    let schema_first = text
        .trim_start()
        .strip_prefix('{')
        .is_some_and(|t| t.trim_start().starts_with("\"schema\""));
    schema_first || (text.contains("\"payload\"") && text.contains("\"schema\""))
}

/// Parses a Debezium message (`text`, valid UTF-8), its images as `images` says.
pub(super) fn parse(text: &str, images: Images<'_>) -> Result<Envelope, DecodeError> {
    let ctx = Ctx {
        images,
        failure: RefCell::new(None),
        numbers: Numbers::new(text),
        size_hint: text.len(),
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let top = TopSeed(&ctx)
        .deserialize(&mut de)
        .and_then(|top| de.end().map(|()| top));
    let top = match (top, ctx.failure.into_inner()) {
        (_, Some(e)) => return Err(e),
        (Ok(top), None) => top,
        (Err(e), None) => return Err(DecodeError::InvalidJson(e.to_string())),
    };
    match (top.schema_hash, top.payload) {
        (Some(hash), Some(payload)) => match payload {
            Payload::Object(fields) => Ok(Envelope {
                schema_hash: Some(hash),
                fields: Some(fields),
            }),
            Payload::Null => Ok(Envelope {
                schema_hash: Some(hash),
                fields: None,
            }),
            Payload::Other(found) => Err(DecodeError::NotAnObject {
                what: "Debezium `payload`",
                found,
            }),
        },
        // Not the wrapper: the message is the envelope (a `payload` field of it means nothing).
        (schema_hash, _) => Ok(Envelope {
            schema_hash,
            fields: Some(top.fields),
        }),
    }
}

/// What every seed of one parse shares.
struct Ctx<'a> {
    images: Images<'a>,
    /// A decoding error that is not a JSON syntax error (kept apart from serde's error text).
    failure: RefCell<Option<DecodeError>>,
    numbers: Numbers<'a>,
    /// The message's length: room enough for its schema's tokens.
    size_hint: usize,
}

impl Ctx<'_> {
    fn fail<E: de::Error>(&self, e: DecodeError) -> E {
        *self.failure.borrow_mut() = Some(e);
        E::custom("not an envelope")
    }
}

/// The top-level object.
struct Top {
    schema_hash: Option<u64>,
    payload: Option<Payload>,
    /// The envelope fields when the message is not the wrapper.
    fields: Fields,
}

/// The wrapper's `payload`.
enum Payload {
    Object(Fields),
    Null,
    Other(&'static str),
}

/// Visits one field of an envelope object into `fields`.
fn field<'de, A: MapAccess<'de>>(
    ctx: &Ctx<'_>,
    key: String,
    map: &mut A,
    fields: &mut Fields,
) -> Result<(), A::Error> {
    match key.as_str() {
        "before" => fields.before = map.next_value_seed(ImageSeed(ctx, "Debezium `before`"))?,
        "after" => fields.after = map.next_value_seed(ImageSeed(ctx, "Debezium `after`"))?,
        _ => {
            let value = map.next_value_seed(TreeSeed(&ctx.numbers))?;
            fields.rest.insert(key, value);
        }
    }
    Ok(())
}

fn empty_fields() -> Fields {
    Fields {
        before: Image::Absent,
        after: Image::Absent,
        rest: Map::new(),
    }
}

struct TopSeed<'a, 'c>(&'a Ctx<'c>);

impl<'de> DeserializeSeed<'de> for TopSeed<'_, '_> {
    type Value = Top;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Top, D::Error> {
        d.deserialize_any(self)
    }
}

impl TopSeed<'_, '_> {
    fn not_object<E: de::Error>(&self, found: &'static str) -> E {
        self.0.fail(DecodeError::NotAnObject {
            what: "Debezium message",
            found,
        })
    }
}

impl<'de> Visitor<'de> for TopSeed<'_, '_> {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let ctx = self.0;
        let mut top = Top {
            schema_hash: None,
            payload: None,
            fields: empty_fields(),
        };
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "schema" => {
                    let mut tokens = Vec::with_capacity(ctx.size_hint);
                    map.next_value_seed(HashSeed(&mut tokens, &ctx.numbers))?;
                    top.schema_hash = Some(XxHash3_64::oneshot(&tokens));
                }
                "payload" => top.payload = Some(map.next_value_seed(PayloadSeed(ctx))?),
                _ => field(ctx, key, &mut map, &mut top.fields)?,
            }
        }
        Ok(top)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Top, A::Error> {
        Err(self.not_object("an array"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Top, E> {
        Err(self.not_object("a string"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Top, E> {
        Err(self.not_object("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Top, E> {
        Err(self.not_object("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Top, E> {
        Err(self.not_object("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Top, E> {
        Err(self.not_object("a number"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Top, E> {
        Err(self.not_object("null"))
    }
}

/// The wrapper's `payload`: an envelope object, `null`, or (consumed, counted) anything else.
struct PayloadSeed<'a, 'c>(&'a Ctx<'c>);

impl<'de> DeserializeSeed<'de> for PayloadSeed<'_, '_> {
    type Value = Payload;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Payload, D::Error> {
        Ok(match d.deserialize_any(self)? {
            Kind::Object(fields) => Payload::Object(fields),
            Kind::Null => Payload::Null,
            Kind::Other(found) => Payload::Other(found),
        })
    }
}

/// What a value expected to be an object was.
enum Kind<T> {
    Object(T),
    Null,
    Other(&'static str),
}

/// Implements the non-object visits of a seed whose value is a [`Kind`]: `null` is
/// [`Kind::Null`], anything else is consumed (its numbers counted) as [`Kind::Other`].
macro_rules! other_kinds {
    ($t:ty) => {
        fn visit_unit<E>(self) -> Result<Kind<$t>, E> {
            Ok(Kind::Null)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Kind<$t>, E> {
            Ok(Kind::Other("a boolean"))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Kind<$t>, E> {
            self.0.numbers.visit();
            Ok(Kind::Other("a number"))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Kind<$t>, E> {
            self.0.numbers.visit();
            Ok(Kind::Other("a number"))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Kind<$t>, E> {
            self.0.numbers.visit();
            Ok(Kind::Other("a number"))
        }
        fn visit_str<E>(self, _: &str) -> Result<Kind<$t>, E> {
            Ok(Kind::Other("a string"))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind<$t>, A::Error> {
            while seq.next_element_seed(TreeSeed(&self.0.numbers))?.is_some() {}
            Ok(Kind::Other("an array"))
        }
    };
}

impl<'de> Visitor<'de> for PayloadSeed<'_, '_> {
    type Value = Kind<Fields>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Debezium envelope object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind<Fields>, A::Error> {
        let mut fields = empty_fields();
        while let Some(key) = map.next_key::<String>()? {
            field(self.0, key, &mut map, &mut fields)?;
        }
        Ok(Kind::Object(fields))
    }

    other_kinds!(Fields);
}

/// A `before` or `after` image, parsed as [`Ctx::images`] says; the `&str` names it in errors.
struct ImageSeed<'a, 'c>(&'a Ctx<'c>, &'static str);

impl<'de> DeserializeSeed<'de> for ImageSeed<'_, '_> {
    type Value = Image;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Image, D::Error> {
        Ok(match d.deserialize_any(self)? {
            Kind::Object(image) => image,
            Kind::Null => Image::Absent,
            Kind::Other(found) => Image::NotObject(found),
        })
    }
}

impl<'de> Visitor<'de> for ImageSeed<'_, '_> {
    type Value = Kind<Image>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a row object or null")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind<Image>, A::Error> {
        let ctx = self.0;
        Ok(Kind::Object(match ctx.images {
            Images::Rows(columns) => Image::Row(
                RowSeed::new(columns, self.1, &ctx.failure, &ctx.numbers).visit_map(map)?,
            ),
            Images::Trees => {
                let mut object = Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value_seed(TreeSeed(&ctx.numbers))?;
                    object.insert(key, value);
                }
                Image::Tree(object)
            }
        }))
    }

    other_kinds!(Image);
}

/// Builds a `serde_json` value like its own deserializer, counting the numbers it visits.
struct TreeSeed<'a, 't>(&'a Numbers<'t>);

impl<'de> DeserializeSeed<'de> for TreeSeed<'_, '_> {
    type Value = J;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<J, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TreeSeed<'_, '_> {
    type Value = J;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<J, E> {
        Ok(J::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<J, E> {
        self.0.visit();
        Ok(J::from(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<J, E> {
        self.0.visit();
        Ok(J::from(u))
    }
    fn visit_f64<E>(self, x: f64) -> Result<J, E> {
        self.0.visit();
        // JSON text holds no NaN or infinity, so every parsed float has a `Number`.
        Ok(serde_json::Number::from_f64(x).map_or(J::Null, J::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<J, E> {
        Ok(J::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<J, E> {
        Ok(J::String(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element_seed(TreeSeed(self.0))? {
            out.push(v);
        }
        Ok(J::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(TreeSeed(self.0))?;
            out.insert(key, value);
        }
        Ok(J::Object(out))
    }
}

/// Writes the tokens of the JSON value being parsed to a buffer, each tagged with its kind and
/// strings with their length (so different documents never write the same bytes), building
/// nothing: the buffer is then hashed in one pass (far cheaper than feeding a streaming hasher
/// token by token). Its numbers are counted.
struct HashSeed<'a, 'n, 't>(&'a mut Vec<u8>, &'n Numbers<'t>);

impl HashSeed<'_, '_, '_> {
    fn tag(&mut self, tag: u8, bytes: &[u8]) {
        self.0.push(tag);
        self.0
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.0.extend_from_slice(bytes);
    }
}

impl<'de> DeserializeSeed<'de> for HashSeed<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for HashSeed<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.push(b'n');
        Ok(())
    }
    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.0.push(if b { b't' } else { b'F' });
        Ok(())
    }
    fn visit_i64<E>(self, i: i64) -> Result<(), E> {
        self.1.visit();
        self.0.push(b'i');
        self.0.extend_from_slice(&i.to_le_bytes());
        Ok(())
    }
    fn visit_u64<E>(self, u: u64) -> Result<(), E> {
        self.1.visit();
        self.0.push(b'u');
        self.0.extend_from_slice(&u.to_le_bytes());
        Ok(())
    }
    fn visit_f64<E>(self, x: f64) -> Result<(), E> {
        self.1.visit();
        self.0.push(b'f');
        self.0.extend_from_slice(&x.to_bits().to_le_bytes());
        Ok(())
    }
    fn visit_str<E>(mut self, s: &str) -> Result<(), E> {
        self.tag(b's', s.as_bytes());
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push(b'[');
        while seq
            .next_element_seed(HashSeed(&mut *self.0, self.1))?
            .is_some()
        {}
        self.0.push(b']');
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.push(b'{');
        while map.next_key_seed(HashSeed(&mut *self.0, self.1))?.is_some() {
            map.next_value_seed(HashSeed(&mut *self.0, self.1))?;
        }
        self.0.push(b'}');
        Ok(())
    }
}
