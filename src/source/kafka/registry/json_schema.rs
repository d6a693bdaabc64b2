//! JSON Schema topics: the payload after the Confluent header is a JSON object, checked against
//! what its schema declares for the top level, and typed by it.
//!
//! Checked: the value is an object when the schema says `"type": "object"`, every `required`
//! property is present, and each declared property holds one of its declared `type`s (`integer`
//! means a number without a fraction). Typed columns: `integer` → int64, `number` → float64,
//! `boolean`, `string` (with `format` `date-time` → timestamp with zone, `date` → date, `uuid`
//! → uuid), objects and arrays → JSON text; `["null", T]` is T, nullable. Properties the schema
//! does not declare are typed from their JSON as on `json` topics.
//!
//! Written here rather than with a validator crate: the `jsonschema` crate compiles a full
//! draft 2020-12 engine (regex, URL resolution, format checkers) into the build, while what the
//! rows need is the declared types, and a payload violating a constraint the connector does not
//! check (a `pattern`, a `minimum`) is still a well-typed row. Nested objects are kept as JSON text
//! and not checked further.

use std::sync::Arc;

use serde_json::{Map, Value as J};

use super::super::decode::{DecodeError, declared_type, inferred, json_kind as kind, typed};
use crate::config::ColumnType;
use crate::event::{Row, RowSchema};

/// A compiled JSON Schema: its top-level properties and their column types.
#[derive(Debug)]
pub struct JsonSchema {
    object: bool,
    required: Vec<String>,
    /// Declared properties: name, the JSON types allowed, the column type.
    properties: Vec<(String, Vec<String>, ColumnType)>,
    pub row_schema: Arc<RowSchema>,
}

impl JsonSchema {
    pub fn parse(text: &str) -> Result<Self, String> {
        let schema: J =
            serde_json::from_str(text).map_err(|e| format!("not a valid JSON Schema: {e}"))?;
        let J::Object(schema) = schema else {
            return Err("a JSON Schema must be an object".into());
        };
        let object = types(&schema).iter().any(|t| t == "object");
        let required = match schema.get("required") {
            Some(J::Array(a)) => a.iter().filter_map(J::as_str).map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        let mut properties = Vec::new();
        if let Some(J::Object(props)) = schema.get("properties") {
            for (name, p) in props {
                let J::Object(p) = p else { continue };
                let allowed = types(p);
                properties.push((name.clone(), allowed.clone(), column_type(&allowed, p)));
            }
        }
        let columns = properties
            .iter()
            .map(|(n, _, t)| (n.clone(), declared_type(*t)))
            .collect();
        Ok(JsonSchema {
            object,
            required,
            properties,
            row_schema: Arc::new(RowSchema { columns }),
        })
    }

    /// The row of a payload, or how it does not match the schema.
    pub fn row(&self, payload: &[u8]) -> Result<Row, DecodeError> {
        let value: J =
            serde_json::from_slice(payload).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
        let J::Object(object) = value else {
            return Err(DecodeError::Schema(format!(
                "the value is {}, the schema declares an object",
                kind(&value)
            )));
        };
        if !self.object && self.properties.is_empty() {
            return Ok(object.into_iter().map(|(k, v)| (k, inferred(v))).collect());
        }
        self.check(&object)?;
        let mut row = Row(Vec::with_capacity(object.len()));
        for (name, json) in object {
            let value = match self.properties.iter().find(|(n, ..)| *n == name) {
                Some((_, _, ty)) => typed(&name, *ty, json)?,
                None => inferred(json),
            };
            row.push(name, value);
        }
        Ok(row)
    }

    fn check(&self, object: &Map<String, J>) -> Result<(), DecodeError> {
        for name in &self.required {
            if !object.contains_key(name) {
                return Err(DecodeError::Schema(format!(
                    "required property {name:?} is missing"
                )));
            }
        }
        for (name, allowed, _) in &self.properties {
            let Some(v) = object.get(name) else { continue };
            if allowed.is_empty() || allowed.iter().any(|t| is(t, v)) {
                continue;
            }
            return Err(DecodeError::Schema(format!(
                "property {name:?} is {}, the schema declares {}",
                kind(v),
                allowed.join(" or ")
            )));
        }
        Ok(())
    }
}

/// The `type` keyword as a list.
fn types(schema: &Map<String, J>) -> Vec<String> {
    match schema.get("type") {
        Some(J::String(t)) => vec![t.clone()],
        Some(J::Array(a)) => a.iter().filter_map(J::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn is(ty: &str, v: &J) -> bool {
    match (ty, v) {
        ("null", J::Null) | ("boolean", J::Bool(_)) | ("string", J::String(_)) => true,
        ("object", J::Object(_)) | ("array", J::Array(_)) | ("number", J::Number(_)) => true,
        ("integer", J::Number(n)) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|x| x.fract() == 0.0)
        }
        _ => false,
    }
}

/// The column type of a property allowing `allowed` types (null aside).
fn column_type(allowed: &[String], p: &Map<String, J>) -> ColumnType {
    let mut non_null = allowed.iter().filter(|t| *t != "null");
    let (Some(one), None) = (non_null.next(), non_null.next()) else {
        return ColumnType::Json;
    };
    match one.as_str() {
        "integer" => ColumnType::Int64,
        "number" => ColumnType::Float64,
        "boolean" => ColumnType::Bool,
        "string" => match p.get("format").and_then(J::as_str) {
            Some("date-time") => ColumnType::Timestamptz,
            Some("date") => ColumnType::Date,
            Some("uuid") => ColumnType::Uuid,
            _ => ColumnType::Text,
        },
        _ => ColumnType::Json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Value, ValueType};

    const SCHEMA: &str = r#"{"type":"object","required":["id","note"],"properties":{
        "id":{"type":"integer"},"note":{"type":["null","string"]},
        "at":{"type":"string","format":"date-time"},"qty":{"type":"number"}}}"#;

    #[test]
    fn declared_types_are_checked_and_type_the_columns() {
        let s = JsonSchema::parse(SCHEMA).unwrap();
        assert!(
            s.row_schema
                .columns
                .contains(&("at".into(), ValueType::TimestampTz))
        );
        let row = s
            .row(br#"{"id":3,"note":null,"at":"2024-05-06T07:08:09Z","extra":true}"#)
            .unwrap();
        assert_eq!(row.get("id"), Some(&Value::Int64(3)));
        assert_eq!(row.get("extra"), Some(&Value::Bool(true)));
        let e = s.row(br#"{"id":"3","note":null}"#).unwrap_err().to_string();
        assert!(
            e.contains(r#"property "id" is a string, the schema declares integer"#),
            "{e}"
        );
        let e = s.row(br#"{"id":3}"#).unwrap_err().to_string();
        assert!(e.contains(r#"required property "note" is missing"#), "{e}");
        assert!(s.row(b"[1]").is_err());
    }
}
