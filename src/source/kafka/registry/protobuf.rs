//! Protobuf topics: Confluent-framed messages decoded by the registry's schema at run time.
//!
//! The schema is fetched as Confluent's own clients fetch it, `?format=serialized`: the base64 of
//! a `FileDescriptorProto`, so no `.proto` parser is needed (prost-reflect reads the descriptor).
//! After the 5-byte header come the message indexes, zig-zag varints: their count, then the
//! index path of the message type in the file (`[0]`, the first message, is written as the
//! single byte 0).
//!
//! Types: int32/sint32/sfixed32 → int32, int64/sint64/sfixed64/uint32/fixed32 → int64,
//! uint64/fixed64 → numeric text, float, double, bool, string, bytes; enums → their value's
//! name as text; `google.protobuf.Timestamp` → timestamp with zone; other messages, repeated
//! fields and maps → JSON text (proto3 JSON mapping). A scalar without presence that is not set
//! reads as its default, as Protobuf defines.

use std::sync::Arc;

use base64::Engine as _;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::Value as J;

use crate::event::{Row, RowSchema, Value, ValueType};

/// A compiled Protobuf schema: the file's message types.
#[derive(Debug)]
pub struct ProtobufSchema {
    /// Top-level messages of the schema's file, in order, with their rows' schema.
    messages: Vec<(MessageDescriptor, Arc<RowSchema>)>,
}

impl ProtobufSchema {
    /// From the registry's `format=serialized` answer: base64 of a `FileDescriptorProto`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| {
                "the registry answered Protobuf schema text, not the serialized descriptor \
                 (`?format=serialized` unsupported?)"
                    .to_owned()
            })?;
        let file = prost_types::FileDescriptorProto::decode(bytes.as_slice())
            .map_err(|e| format!("not a Protobuf file descriptor: {e}"))?;
        let name = file.name().to_owned();
        let mut pool = DescriptorPool::new();
        pool.add_file_descriptor_proto(file)
            .map_err(|e| format!("Protobuf schema: {e}"))?;
        let file = pool
            .get_file_by_name(&name)
            .ok_or("Protobuf schema: its file is missing")?;
        let messages = file
            .messages()
            .map(|m| {
                let columns = m
                    .fields()
                    .map(|f| (f.name().to_owned(), column_type(&f)))
                    .collect();
                (m, Arc::new(RowSchema { columns }))
            })
            .collect();
        Ok(ProtobufSchema { messages })
    }

    /// The message type at `indexes` (top-level index, then nested indexes).
    fn message(&self, indexes: &[i64]) -> Result<&(MessageDescriptor, Arc<RowSchema>), String> {
        let (first, rest) = indexes.split_first().ok_or("no message index")?;
        let top = usize::try_from(*first)
            .ok()
            .and_then(|i| self.messages.get(i))
            .ok_or_else(|| format!("message index {first} is not in the schema"))?;
        if rest.is_empty() {
            return Ok(top);
        }
        Err(format!(
            "nested message index path {indexes:?} is not supported"
        ))
    }

    /// The row of a framed body (after the 5-byte header) and its message type's row schema.
    pub fn decode(&self, body: &[u8]) -> Result<(Row, Arc<RowSchema>), String> {
        let (indexes, mut message) = message_indexes(body)?;
        let (desc, row_schema) = self.message(&indexes)?;
        let msg = DynamicMessage::decode(desc.clone(), &mut message)
            .map_err(|e| format!("does not match its Protobuf schema: {e}"))?;
        let mut row = Row(Vec::with_capacity(desc.fields().len()));
        // The proto3 JSON of the whole message, made once if a field needs JSON.
        let mut json: Option<J> = None;
        for field in desc.fields() {
            let value = if field.supports_presence() && !msg.has_field(&field) {
                Value::Null
            } else {
                column(&field, &msg, &mut json)?
            };
            row.push(field.name(), value);
        }
        Ok((row, row_schema.clone()))
    }
}

/// The zig-zag varint message indexes after the header, and the message bytes after them.
fn message_indexes(mut body: &[u8]) -> Result<(Vec<i64>, &[u8]), String> {
    let count = zigzag(&mut body)?;
    if count == 0 {
        return Ok((vec![0], body));
    }
    if !(1..=100).contains(&count) {
        return Err(format!("message index count {count} out of range"));
    }
    let mut indexes = Vec::new();
    for _ in 0..count {
        indexes.push(zigzag(&mut body)?);
    }
    Ok((indexes, body))
}

fn zigzag(body: &mut &[u8]) -> Result<i64, String> {
    let v = prost::encoding::decode_varint(body)
        .map_err(|_| "bad message indexes (not Confluent Protobuf framing)".to_owned())?;
    Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
}

fn column_type(field: &FieldDescriptor) -> ValueType {
    if field.is_list() || field.is_map() {
        return ValueType::Json;
    }
    match field.kind() {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => ValueType::Int32,
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint32 | Kind::Fixed32 => {
            ValueType::Int64
        }
        Kind::Uint64 | Kind::Fixed64 => ValueType::Numeric,
        Kind::Float => ValueType::Float32,
        Kind::Double => ValueType::Float64,
        Kind::Bool => ValueType::Bool,
        Kind::String | Kind::Enum(_) => ValueType::Text,
        Kind::Bytes => ValueType::Bytes,
        Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => ValueType::TimestampTz,
        Kind::Message(_) => ValueType::Json,
    }
}

fn column(
    field: &FieldDescriptor,
    msg: &DynamicMessage,
    json: &mut Option<J>,
) -> Result<Value, String> {
    use prost_reflect::Value as P;
    if column_type(field) == ValueType::Json {
        if json.is_none() {
            *json = Some(
                serde_json::to_value(msg).map_err(|e| format!("Protobuf message as JSON: {e}"))?,
            );
        }
        let member = json
            .as_ref()
            .and_then(|j| j.get(field.json_name()))
            .cloned()
            .unwrap_or(J::Null);
        return Ok(match member {
            J::Null => Value::Null,
            j => Value::Json(j.into()),
        });
    }
    let v = msg.get_field(field);
    Ok(match (&*v, field.kind()) {
        (P::I32(i), _) => Value::Int32(*i),
        (P::I64(i), _) => Value::Int64(*i),
        (P::U32(u), _) => Value::Int64(i64::from(*u)),
        (P::U64(u), _) => Value::Numeric(compact_str::format_compact!("{u}")),
        (P::F32(x), _) => Value::Float32(*x),
        (P::F64(x), _) => Value::Float64(*x),
        (P::Bool(b), _) => Value::Bool(*b),
        (P::String(s), _) => Value::Text(s.as_str().into()),
        (P::Bytes(b), _) => Value::Bytes(b.to_vec()),
        (P::EnumNumber(n), Kind::Enum(e)) => match e.get_value(*n) {
            Some(v) => Value::Text(v.name().into()),
            None => Value::Text(compact_str::format_compact!("{n}")),
        },
        (P::Message(m), _) => {
            let get = |name: &str| {
                m.get_field_by_name(name)
                    .and_then(|v| v.as_i64().or_else(|| v.as_i32().map(i64::from)))
                    .unwrap_or(0)
            };
            let nanos = u32::try_from(get("nanos")).map_err(|_| "Timestamp nanos out of range")?;
            Value::TimestampTz(
                chrono::DateTime::from_timestamp(get("seconds"), nanos)
                    .ok_or("Timestamp out of range")?,
            )
        }
        (other, _) => return Err(format!("field {:?}: unexpected {other:?}", field.name())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_indexes_are_zigzag_varints_with_a_zero_shortcut() {
        assert_eq!(message_indexes(&[0, 9]).unwrap(), (vec![0], &[9u8][..]));
        // count 1 (zig-zag 2), index 1 (zig-zag 2)
        assert_eq!(message_indexes(&[2, 2, 7]).unwrap(), (vec![1], &[7u8][..]));
        assert!(message_indexes(&[0x80]).is_err());
    }
}
