//! Avro datums → rows: a record's fields become typed columns.
//!
//! Types: boolean, int, long, float, double, string, bytes map to their own column types; the
//! logical types decimal (exact text, by the schema's scale), date, time-millis/-micros (as
//! `HH:MM:SS.ffffff` text), timestamp-millis/-micros/-nanos (instants in UTC),
//! local-timestamp-* (timestamps without zone) and uuid to theirs; enums are text, fixed is
//! bytes; a union of null and one type is that type, nullable; records, arrays, maps and other
//! unions are JSON text. A record with `before`, `after` and `op` fields is a Debezium envelope
//! (Avro converter): its `before`/`after` records are the row images, `source.lsn`/`ts_ms` and
//! `ts_ms` its metadata.
//!
//! Decoding uses `apache-avro` with the writer's schema; the payload must be exactly one datum
//! (bytes left over mean it was written with another schema).

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::schema::{Name, ResolvedSchema, Schema};
use apache_avro::types::Value as Avro;
use base64::Engine as _;
use chrono::{DateTime, NaiveDate, NaiveTime};
use serde_json::Value as J;

use crate::event::{Row, RowSchema, Value, ValueType};

/// A compiled Avro writer schema.
#[derive(Debug)]
pub struct AvroSchema {
    schema: Schema,
    names: HashMap<Name, Schema>,
    /// The columns of the rows this schema writes (the envelope's row record for Debezium).
    pub row_schema: Arc<RowSchema>,
    envelope: bool,
}

/// What one datum holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    /// A plain record: one row.
    Row(Row),
    /// A Debezium envelope.
    Envelope {
        op: Option<String>,
        before: Option<Row>,
        after: Option<Row>,
        source_lsn: Option<i64>,
        source_ts_ms: Option<i64>,
        ts_ms: Option<i64>,
    },
}

impl AvroSchema {
    pub fn parse(text: &str) -> Result<Self, String> {
        let schema =
            Schema::parse_str(text).map_err(|e| format!("not a valid Avro schema: {e}"))?;
        let names = ResolvedSchema::try_from(&schema)
            .map_err(|e| format!("Avro schema: {e}"))?
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect();
        let mut compiled = AvroSchema {
            schema,
            names,
            row_schema: Arc::default(),
            envelope: false,
        };
        let (envelope, columns) = {
            let Schema::Record(record) = &compiled.schema else {
                return Err("the Avro schema is not a record (a topic's rows need fields)".into());
            };
            let field = |name: &str| record.fields.iter().find(|f| f.name == name);
            let (envelope, row_record) = match (field("before"), field("after"), field("op")) {
                (Some(_), Some(after), Some(_)) => (true, compiled.record_of(&after.schema)),
                _ => (false, Some(&compiled.schema)),
            };
            let columns: Vec<(String, ValueType)> = match row_record.map(|s| compiled.resolve(s)) {
                Some(Schema::Record(r)) => r
                    .fields
                    .iter()
                    .map(|f| (f.name.clone(), compiled.column_type(&f.schema)))
                    .collect(),
                _ => return Err("the Debezium envelope's `after` is not a record".into()),
            };
            (envelope, columns)
        };
        compiled.envelope = envelope;
        compiled.row_schema = Arc::new(RowSchema { columns });
        Ok(compiled)
    }

    /// Decodes one datum; the error says how the payload does not match the schema.
    pub fn decode(&self, mut bytes: &[u8]) -> Result<Datum, String> {
        let value = apache_avro::from_avro_datum(&self.schema, &mut bytes, None)
            .map_err(|e| format!("does not match its Avro schema: {e}"))?;
        if !bytes.is_empty() {
            return Err(format!(
                "does not match its Avro schema: {} bytes left after the datum",
                bytes.len()
            ));
        }
        let Avro::Record(fields) = value else {
            return Err("the Avro datum is not a record".into());
        };
        if !self.envelope {
            return self.row(&self.schema, fields).map(Datum::Row);
        }
        let Schema::Record(record) = &self.schema else {
            return Err("the Avro datum is not a record".into());
        };
        let (mut op, mut before, mut after) = (None, None, None);
        let (mut source_lsn, mut source_ts_ms, mut ts_ms) = (None, None, None);
        for (name, v) in fields {
            let Some(field) = record.fields.iter().find(|f| f.name == name) else {
                continue;
            };
            let v = unwrap_union(v);
            match (name.as_str(), v) {
                (_, Avro::Null) => {}
                ("op", Avro::String(s)) => op = Some(s),
                ("before" | "after", Avro::Record(r)) => {
                    let schema = self
                        .record_of(&field.schema)
                        .ok_or("the envelope's row image is not a record")?;
                    let row = Some(self.row(schema, r)?);
                    if name == "before" {
                        before = row;
                    } else {
                        after = row;
                    }
                }
                ("source", Avro::Record(r)) => {
                    for (k, v) in r {
                        match (k.as_str(), unwrap_union(v)) {
                            ("lsn", Avro::Long(l)) => source_lsn = Some(l),
                            ("ts_ms", Avro::Long(t)) => source_ts_ms = Some(t),
                            _ => {}
                        }
                    }
                }
                ("ts_ms", Avro::Long(t)) => ts_ms = Some(t),
                _ => {}
            }
        }
        Ok(Datum::Envelope {
            op,
            before,
            after,
            source_lsn,
            source_ts_ms,
            ts_ms,
        })
    }

    fn row(&self, schema: &Schema, fields: Vec<(String, Avro)>) -> Result<Row, String> {
        let Schema::Record(record) = self.resolve(schema) else {
            return Err("the Avro datum is not a record".into());
        };
        let mut row = Row(Vec::with_capacity(fields.len()));
        for (i, (name, v)) in fields.into_iter().enumerate() {
            // Fields come in schema order.
            let field = record
                .fields
                .get(i)
                .filter(|f| f.name == name)
                .or_else(|| record.fields.iter().find(|f| f.name == name))
                .ok_or_else(|| format!("field {name:?} is not in the schema"))?;
            let value = self
                .column(&field.schema, v)
                .map_err(|e| format!("field {name:?}: {e}"))?;
            row.push(name, value);
        }
        Ok(row)
    }

    /// A named type's definition, other schemas as they are.
    fn resolve<'a>(&'a self, schema: &'a Schema) -> &'a Schema {
        match schema {
            Schema::Ref { name } => self.names.get(name).unwrap_or(schema),
            other => other,
        }
    }

    /// The record of a `["null", record]` union (or a record).
    fn record_of<'a>(&'a self, schema: &'a Schema) -> Option<&'a Schema> {
        match self.resolve(schema) {
            s @ Schema::Record(_) => Some(s),
            Schema::Union(u) => u
                .variants()
                .iter()
                .map(|v| self.resolve(v))
                .find(|v| matches!(v, Schema::Record(_))),
            _ => None,
        }
    }

    /// The one non-null branch of a nullable union.
    fn nullable<'a>(&'a self, schema: &'a Schema) -> Option<&'a Schema> {
        let Schema::Union(u) = schema else {
            return None;
        };
        let mut others = u.variants().iter().filter(|v| !matches!(v, Schema::Null));
        match (others.next(), others.next()) {
            (Some(one), None) if u.is_nullable() => Some(self.resolve(one)),
            _ => None,
        }
    }

    /// The column type of a field of this schema.
    fn column_type(&self, schema: &Schema) -> ValueType {
        let schema = self.resolve(schema);
        if let Some(inner) = self.nullable(schema) {
            return self.column_type(inner);
        }
        match schema {
            Schema::Boolean => ValueType::Bool,
            Schema::Int => ValueType::Int32,
            Schema::Long => ValueType::Int64,
            Schema::Float => ValueType::Float32,
            Schema::Double => ValueType::Float64,
            Schema::Bytes | Schema::Fixed(_) => ValueType::Bytes,
            Schema::String | Schema::Enum(_) => ValueType::Text,
            Schema::TimeMillis | Schema::TimeMicros => ValueType::Text,
            Schema::Decimal(_) | Schema::BigDecimal => ValueType::Numeric,
            Schema::Uuid => ValueType::Uuid,
            Schema::Date => ValueType::Date,
            Schema::TimestampMillis | Schema::TimestampMicros | Schema::TimestampNanos => {
                ValueType::TimestampTz
            }
            Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => ValueType::Timestamp,
            Schema::Null
            | Schema::Array(_)
            | Schema::Map(_)
            | Schema::Record(_)
            | Schema::Union(_)
            | Schema::Duration
            | Schema::Ref { .. } => ValueType::Json,
        }
    }

    /// A field's value as its column type says ([`Self::column_type`]).
    fn column(&self, schema: &Schema, v: Avro) -> Result<Value, String> {
        let schema = self.resolve(schema);
        if let Some(inner) = self.nullable(schema) {
            return match v {
                Avro::Null => Ok(Value::Null),
                Avro::Union(_, v) if matches!(*v, Avro::Null) => Ok(Value::Null),
                Avro::Union(_, v) => self.column(inner, *v),
                v => self.column(inner, v),
            };
        }
        if self.column_type(schema) == ValueType::Json {
            return Ok(match self.json(schema, v)? {
                J::Null => Value::Null,
                j => Value::Json(j.into()),
            });
        }
        self.scalar(schema, v)
    }

    /// A value that is not JSON by its schema.
    fn scalar(&self, schema: &Schema, v: Avro) -> Result<Value, String> {
        Ok(match v {
            Avro::Null if matches!(schema, Schema::Null) => Value::Null,
            // apache-avro reads a string cut short by the end of the payload as null.
            Avro::Null => return Err(TRUNCATED.into()),
            Avro::Boolean(b) => Value::Bool(b),
            Avro::Int(i) => Value::Int32(i),
            Avro::Long(l) => Value::Int64(l),
            Avro::Float(x) => Value::Float32(x),
            Avro::Double(x) => Value::Float64(x),
            Avro::Bytes(b) | Avro::Fixed(_, b) => Value::Bytes(b),
            Avro::String(s) | Avro::Enum(_, s) => Value::Text(s.into()),
            Avro::Uuid(u) => Value::Uuid(u),
            Avro::Date(d) => Value::Date(date(d)?),
            Avro::TimeMillis(ms) => Value::Text(time_of_day(i64::from(ms) * 1_000)?.into()),
            Avro::TimeMicros(us) => Value::Text(time_of_day(us)?.into()),
            Avro::TimestampMillis(t) => Value::TimestampTz(
                DateTime::from_timestamp_millis(t).ok_or("timestamp-millis out of range")?,
            ),
            Avro::TimestampMicros(t) => Value::TimestampTz(
                DateTime::from_timestamp_micros(t).ok_or("timestamp-micros out of range")?,
            ),
            Avro::TimestampNanos(t) => Value::TimestampTz(DateTime::from_timestamp_nanos(t)),
            Avro::LocalTimestampMillis(t) => Value::Timestamp(
                DateTime::from_timestamp_millis(t)
                    .ok_or("local-timestamp-millis out of range")?
                    .naive_utc(),
            ),
            Avro::LocalTimestampMicros(t) => Value::Timestamp(
                DateTime::from_timestamp_micros(t)
                    .ok_or("local-timestamp-micros out of range")?
                    .naive_utc(),
            ),
            Avro::LocalTimestampNanos(t) => {
                Value::Timestamp(DateTime::from_timestamp_nanos(t).naive_utc())
            }
            Avro::Decimal(d) => Value::Numeric(decimal(schema, &d)?.into()),
            Avro::BigDecimal(d) => Value::Numeric(d.to_string().into()),
            Avro::Duration(d) => Value::Text(format!("{d:?}").into()),
            other @ (Avro::Union(..) | Avro::Array(_) | Avro::Map(_) | Avro::Record(_)) => {
                Value::Json(self.json(schema, other)?.into())
            }
        })
    }

    /// A nested value as JSON (records → objects, unions → their branch's value, bytes →
    /// base64, logical types → their text).
    fn json(&self, schema: &Schema, v: Avro) -> Result<J, String> {
        let schema = self.resolve(schema);
        Ok(match v {
            Avro::Null if matches!(schema, Schema::Null | Schema::Union(_)) => J::Null,
            Avro::Null => return Err(TRUNCATED.into()),
            Avro::Boolean(b) => J::Bool(b),
            Avro::Int(i) => J::from(i),
            Avro::Long(l) => J::from(l),
            Avro::Float(x) => J::from(f64::from(x)),
            Avro::Double(x) => J::from(x),
            Avro::Bytes(b) | Avro::Fixed(_, b) => {
                J::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            Avro::String(s) | Avro::Enum(_, s) => J::String(s),
            Avro::Union(i, v) => {
                let branch = match schema {
                    Schema::Union(u) => usize::try_from(i).ok().and_then(|i| u.variants().get(i)),
                    _ => None,
                };
                self.json(branch.unwrap_or(schema), *v)?
            }
            Avro::Array(items) => {
                let item = match schema {
                    Schema::Array(a) => &*a.items,
                    other => other,
                };
                J::Array(
                    items
                        .into_iter()
                        .map(|v| self.json(item, v))
                        .collect::<Result<_, _>>()?,
                )
            }
            Avro::Map(entries) => {
                let item = match schema {
                    Schema::Map(m) => &*m.types,
                    other => other,
                };
                let mut sorted: Vec<_> = entries.into_iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(&b.0));
                J::Object(
                    sorted
                        .into_iter()
                        .map(|(k, v)| Ok((k, self.json(item, v)?)))
                        .collect::<Result<_, String>>()?,
                )
            }
            Avro::Record(fields) => {
                let record = match schema {
                    Schema::Record(r) => Some(r),
                    _ => None,
                };
                J::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| {
                            let field_schema = record
                                .and_then(|r| r.fields.iter().find(|f| f.name == k))
                                .map_or(schema, |f| &f.schema);
                            Ok((k.clone(), self.json(field_schema, v)?))
                        })
                        .collect::<Result<_, String>>()?,
                )
            }
            Avro::Duration(d) => J::String(format!("{d:?}")),
            other => self.scalar(schema, other)?.to_json(),
        })
    }
}

/// A null where the schema has no null: the payload ended early (apache-avro reads a string
/// cut short as null).
const TRUNCATED: &str = "does not match its Avro schema: the payload ends before a value";

/// A union's branch value.
fn unwrap_union(v: Avro) -> Avro {
    match v {
        Avro::Union(_, v) => *v,
        v => v,
    }
}

fn date(days: i32) -> Result<NaiveDate, String> {
    i64::from(days)
        .checked_add(super::super::decode::EPOCH_DAYS_FROM_CE)
        .and_then(|d| i32::try_from(d).ok())
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .ok_or_else(|| format!("date {days} out of range"))
}

/// Microseconds since midnight as `HH:MM:SS[.ffffff]`.
fn time_of_day(micros: i64) -> Result<String, String> {
    let secs = u32::try_from(micros.div_euclid(1_000_000)).map_err(|_| "time out of range")?;
    let nanos = u32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0);
    let t = NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos)
        .ok_or_else(|| format!("time of day {micros} µs out of range"))?;
    Ok(if nanos == 0 {
        t.format("%H:%M:%S").to_string()
    } else {
        t.format("%H:%M:%S%.6f").to_string()
    })
}

/// A decimal's exact text by its schema's scale.
fn decimal(schema: &Schema, d: &apache_avro::Decimal) -> Result<String, String> {
    let scale = match schema {
        Schema::Decimal(s) => i32::try_from(s.scale).map_err(|_| "decimal scale out of range")?,
        _ => 0,
    };
    let bytes = Vec::<u8>::try_from(d).map_err(|e| format!("decimal: {e}"))?;
    super::super::connect::decimal_text(&bytes, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Record;

    const ORDER: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
        {"name":"id","type":"long"},
        {"name":"note","type":["null","string"],"default":null},
        {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":10,"scale":2}},
        {"name":"day","type":{"type":"int","logicalType":"date"}},
        {"name":"at","type":{"type":"long","logicalType":"timestamp-micros"}},
        {"name":"ref","type":{"type":"string","logicalType":"uuid"}},
        {"name":"tags","type":{"type":"array","items":"string"}},
        {"name":"addr","type":["null",{"type":"record","name":"Addr","fields":[{"name":"city","type":"string"}]}],"default":null}
    ]}"#;

    #[test]
    fn record_fields_become_typed_columns() {
        let s = AvroSchema::parse(ORDER).unwrap();
        let types: Vec<_> = s
            .row_schema
            .columns
            .iter()
            .map(|(n, t)| (n.as_str(), *t))
            .collect();
        assert_eq!(
            types,
            vec![
                ("id", ValueType::Int64),
                ("note", ValueType::Text),
                ("amount", ValueType::Numeric),
                ("day", ValueType::Date),
                ("at", ValueType::TimestampTz),
                ("ref", ValueType::Uuid),
                ("tags", ValueType::Json),
                ("addr", ValueType::Json),
            ]
        );
        let mut r = Record::new(&s.schema).unwrap();
        r.put("id", 7i64);
        r.put("note", Avro::Union(0, Box::new(Avro::Null)));
        r.put(
            "amount",
            Avro::Decimal(apache_avro::Decimal::from(vec![0xfbu8, 0x2e])),
        );
        r.put("day", Avro::Date(19_849));
        r.put("at", Avro::TimestampMicros(1_714_979_289_123_456));
        r.put(
            "ref",
            Avro::Uuid("6f1c3c52-8f7e-4a51-9d7a-0f0c6b3d2a11".parse().unwrap()),
        );
        r.put("tags", Avro::Array(vec![Avro::String("a".into())]));
        r.put(
            "addr",
            Avro::Union(
                1,
                Box::new(Avro::Record(vec![(
                    "city".into(),
                    Avro::String("Oslo".into()),
                )])),
            ),
        );
        let bytes = apache_avro::to_avro_datum(&s.schema, r).unwrap();
        let Datum::Row(row) = s.decode(&bytes).unwrap() else {
            panic!("not a row")
        };
        assert_eq!(row.get("id"), Some(&Value::Int64(7)));
        assert_eq!(row.get("note"), Some(&Value::Null));
        assert_eq!(row.get("amount"), Some(&Value::Numeric("-12.34".into())));
        assert_eq!(
            row.get("day"),
            Some(&Value::Date(NaiveDate::from_ymd_opt(2024, 5, 6).unwrap()))
        );
        match row.get("at") {
            Some(Value::TimestampTz(t)) => assert_eq!(t.timestamp_micros(), 1_714_979_289_123_456),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            row.get("tags").map(Value::to_json),
            Some(serde_json::json!(["a"]))
        );
        assert_eq!(
            row.get("addr").map(Value::to_json),
            Some(serde_json::json!({"city": "Oslo"}))
        );
        // A truncated datum, and one with bytes left over, do not match the schema.
        assert!(
            s.decode(&bytes[..bytes.len() - 3])
                .unwrap_err()
                .contains("does not match")
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(s.decode(&longer).unwrap_err().contains("1 bytes left"));
    }

    #[test]
    fn time_of_day_text() {
        assert_eq!(time_of_day(0).unwrap(), "00:00:00");
        assert_eq!(time_of_day(3_723_000_001).unwrap(), "01:02:03.000001");
        assert!(time_of_day(86_400_000_000).is_err());
    }
}
