//! The text an embedding is computed from: a source's template rendered over a row, and its hash.
//!
//! One definition for everything that must agree on it: the enrichment stage (which embeds the
//! text and stores its hash beside the vector) and `tributary verify` (which renders the
//! source's current row the same way and compares).

use crate::config::TemplatePart;
use crate::event::{Row, Value};

/// Renders a template over a row. A column the row lacks renders as nothing, NULL as nothing;
/// `None` when a template column is still an unresolved unchanged-TOAST value (the text would
/// have a hole in it).
pub fn render(parts: &[TemplatePart], row: &Row) -> Option<String> {
    let mut out = String::new();
    for p in parts {
        match p {
            TemplatePart::Literal(s) => out.push_str(s),
            TemplatePart::Column(c) => match row.get(c) {
                None | Some(Value::Null) => {}
                Some(Value::UnchangedToast) => return None,
                Some(Value::Text(s) | Value::Numeric(s)) => out.push_str(s),
                Some(Value::Json(j)) => out.push_str(j.as_str()),
                Some(other) => match other.to_json() {
                    serde_json::Value::String(s) => out.push_str(&s),
                    j => out.push_str(&j.to_string()),
                },
            },
        }
    }
    Some(out)
}

/// The hash stored beside a vector (`text_hash`): xxh3-64 of the rendered text.
pub fn text_hash(text: &str) -> u64 {
    twox_hash::XxHash3_64::oneshot(text.as_bytes())
}

/// The template columns of `parts`, in template order.
pub fn columns(parts: &[TemplatePart]) -> impl Iterator<Item = &str> {
    parts.iter().filter_map(|p| match p {
        TemplatePart::Column(c) => Some(c.as_str()),
        TemplatePart::Literal(_) => None,
    })
}
