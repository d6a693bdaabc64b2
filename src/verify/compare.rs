//! The pure comparisons of `verify`: key order, payload equality, vector similarity.

use std::cmp::Ordering;

use serde_json::{Map, Value as J};

use crate::event::Value;

/// Orders two keys as both databases' `ORDER BY` does for the key types the pgvector sink
/// writes (text keys are compared as text under `COLLATE "C"`, i.e. bytewise); the merge of the
/// two ordered streams relies on it.
pub fn cmp_key(a: &[Value], b: &[Value]) -> Ordering {
    a.iter()
        .zip(b)
        .map(|(x, y)| cmp_value(x, y))
        .find(|o| o.is_ne())
        .unwrap_or_else(|| a.len().cmp(&b.len()))
}

fn cmp_value(a: &Value, b: &Value) -> Ordering {
    use Value as V;
    match (a, b) {
        (V::Int16(_) | V::Int32(_) | V::Int64(_), V::Int16(_) | V::Int32(_) | V::Int64(_)) => {
            as_i64(a).cmp(&as_i64(b))
        }
        (V::Float32(_) | V::Float64(_), V::Float32(_) | V::Float64(_)) => {
            cmp_float(as_f64(a), as_f64(b))
        }
        (V::Numeric(x), V::Numeric(y)) => cmp_numeric(x, y),
        (V::Text(x), V::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (V::Bool(x), V::Bool(y)) => x.cmp(y),
        (V::Uuid(x), V::Uuid(y)) => x.cmp(y),
        (V::Date(x), V::Date(y)) => x.cmp(y),
        (V::Timestamp(x), V::Timestamp(y)) => x.cmp(y),
        (V::TimestampTz(x), V::TimestampTz(y)) => x.cmp(y),
        (V::Bytes(x), V::Bytes(y)) => x.cmp(y),
        // No order the databases share (a value that did not convert, say): some total order,
        // so that the stream order check reports the disagreement.
        _ => rank(a)
            .cmp(&rank(b))
            .then_with(|| a.to_json().to_string().cmp(&b.to_json().to_string())),
    }
}

fn rank(v: &Value) -> u8 {
    match v {
        Value::Null | Value::UnchangedToast => 0,
        Value::Bool(_) => 1,
        Value::Int16(_) | Value::Int32(_) | Value::Int64(_) => 2,
        Value::Float32(_) | Value::Float64(_) => 3,
        Value::Numeric(_) => 4,
        Value::Text(_) => 5,
        Value::Bytes(_) => 6,
        Value::Uuid(_) => 7,
        Value::Date(_) => 8,
        Value::Timestamp(_) => 9,
        Value::TimestampTz(_) => 10,
        Value::Json(_) => 11,
        Value::Array(_) => 12,
        Value::Vector(_) => 13,
    }
}

fn as_i64(v: &Value) -> i64 {
    match v {
        Value::Int16(i) => i64::from(*i),
        Value::Int32(i) => i64::from(*i),
        Value::Int64(i) => *i,
        _ => 0,
    }
}

fn as_f64(v: &Value) -> f64 {
    match v {
        Value::Float32(x) => f64::from(*x),
        Value::Float64(x) => *x,
        _ => 0.0,
    }
}

/// PostgreSQL's float order: NaN equals NaN and sorts above everything.
fn cmp_float(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// A `numeric` in its output form.
enum Num<'a> {
    NegInf,
    /// Digits without leading (integer part) or trailing (fraction) zeros; zero is not negative.
    Finite {
        negative: bool,
        int: &'a str,
        frac: &'a str,
    },
    PosInf,
    NaN,
}

fn parse_numeric(s: &str) -> Num<'_> {
    match s {
        "NaN" => Num::NaN,
        "Infinity" => Num::PosInf,
        "-Infinity" => Num::NegInf,
        _ => {
            let (negative, digits) = match s.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, s.strip_prefix('+').unwrap_or(s)),
            };
            let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
            let (int, frac) = (int.trim_start_matches('0'), frac.trim_end_matches('0'));
            Num::Finite {
                negative: negative && !(int.is_empty() && frac.is_empty()),
                int,
                frac,
            }
        }
    }
}

/// PostgreSQL's `numeric` order (`-Infinity` < numbers < `Infinity` < `NaN`), on decimal text of
/// any length.
fn cmp_numeric(a: &str, b: &str) -> Ordering {
    fn class(n: &Num<'_>) -> u8 {
        match n {
            Num::NegInf => 0,
            Num::Finite { negative: true, .. } => 1,
            Num::Finite { .. } => 2,
            Num::PosInf => 3,
            Num::NaN => 4,
        }
    }
    let (x, y) = (parse_numeric(a), parse_numeric(b));
    match (&x, &y) {
        (
            Num::Finite {
                negative,
                int: xi,
                frac: xf,
            },
            Num::Finite {
                negative: other,
                int: yi,
                frac: yf,
            },
        ) if negative == other => {
            let magnitude = xi.len().cmp(&yi.len()).then(xi.cmp(yi)).then(xf.cmp(yf));
            if *negative {
                magnitude.reverse()
            } else {
                magnitude
            }
        }
        _ => class(&x).cmp(&class(&y)),
    }
}

/// JSON equality as jsonb sees it: numbers by value (a float written `1e16` by the sink comes
/// back from jsonb as `10000000000000000`), objects regardless of key order.
pub fn json_eq(a: &J, b: &J) -> bool {
    match (a, b) {
        (J::Number(x), J::Number(y)) => {
            if let (Some(p), Some(q)) = (x.as_i64(), y.as_i64()) {
                p == q
            } else if let (Some(p), Some(q)) = (x.as_u64(), y.as_u64()) {
                p == q
            } else {
                x.as_f64() == y.as_f64()
            }
        }
        (J::Array(x), J::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (J::Object(x), J::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// What differs between the payload the source row calls for and the stored one, one entry per
/// column (`note: "a" ≠ stored "b"`); empty when they are equal.
pub fn payload_diff(expected: &Map<String, J>, stored: Option<&J>) -> Vec<String> {
    let stored = match stored {
        None => return vec!["payload is NULL".into()],
        Some(J::Object(o)) => o,
        Some(other) => return vec![format!("payload is not an object: {}", short(other))],
    };
    let mut out = Vec::new();
    for (column, want) in expected {
        match stored.get(column) {
            Some(got) if json_eq(want, got) => {}
            Some(got) => out.push(format!("{column}: {} ≠ stored {}", short(want), short(got))),
            None => out.push(format!("{column}: {} ≠ stored (absent)", short(want))),
        }
    }
    for (column, got) in stored {
        if !expected.contains_key(column) {
            out.push(format!(
                "{column}: not in the source row ≠ stored {}",
                short(got)
            ));
        }
    }
    out
}

/// A value's JSON text, cut at 40 characters.
pub fn short(j: &J) -> String {
    let text = j.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// A `vector` or `halfvec` in its text form (`[1,2.5,-3]`).
pub fn parse_vector(text: &str) -> Option<Vec<f32>> {
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    if inner.trim().is_empty() {
        return Some(Vec::new());
    }
    inner.split(',').map(|s| s.trim().parse().ok()).collect()
}

/// Cosine similarity (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(s: &str) -> Value {
        Value::Numeric(s.into())
    }

    #[test]
    fn numeric_order_is_by_value() {
        let sorted = [
            "-Infinity",
            "-100",
            "-2.5",
            "-0.05",
            "0",
            "0.05",
            "0.5",
            "0.51",
            "2",
            "10.000",
            "100",
            "Infinity",
            "NaN",
        ];
        for w in sorted.windows(2) {
            assert_eq!(cmp_value(&num(w[0]), &num(w[1])), Ordering::Less, "{w:?}");
            assert_eq!(
                cmp_value(&num(w[1]), &num(w[0])),
                Ordering::Greater,
                "{w:?}"
            );
        }
        assert_eq!(cmp_value(&num("1.50"), &num("1.5")), Ordering::Equal);
        assert_eq!(cmp_value(&num("-0.0"), &num("0")), Ordering::Equal);
    }

    #[test]
    fn keys_order_column_by_column_and_text_bytewise() {
        let k = |i: i32, s: &str| vec![Value::Int32(i), Value::Text(s.into())];
        assert_eq!(cmp_key(&k(1, "b"), &k(2, "a")), Ordering::Less);
        assert_eq!(cmp_key(&k(1, "B"), &k(1, "a")), Ordering::Less);
        assert_eq!(cmp_key(&k(1, "a"), &k(1, "a")), Ordering::Equal);
        assert_eq!(
            cmp_key(&[Value::Int16(3)], &[Value::Int64(20)]),
            Ordering::Less
        );
        assert_eq!(
            cmp_key(
                &[Value::Float64(f64::NAN)],
                &[Value::Float64(f64::INFINITY)]
            ),
            Ordering::Greater
        );
    }

    #[test]
    fn json_numbers_compare_by_value_and_objects_by_content() {
        assert!(json_eq(
            &json!(1e16),
            &serde_json::from_str("10000000000000000").unwrap()
        ));
        assert!(json_eq(
            &json!({"a": 1, "b": [1.5]}),
            &json!({"b": [1.5], "a": 1})
        ));
        assert!(!json_eq(&json!(1), &json!(2)));
        assert!(!json_eq(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!json_eq(&json!("1"), &json!(1)));
    }

    #[test]
    fn payload_differences_name_their_columns() {
        let expected = json!({"id": 1, "note": "new text", "gone": null});
        let J::Object(expected) = expected else {
            unreachable!()
        };
        let stored = json!({"id": 1, "note": "old text", "extra": true});
        let mut d = payload_diff(&expected, Some(&stored));
        d.sort();
        assert_eq!(
            d,
            vec![
                "extra: not in the source row ≠ stored true",
                "gone: null ≠ stored (absent)",
                "note: \"new text\" ≠ stored \"old text\"",
            ]
        );
        assert!(payload_diff(&expected, Some(&J::Object(expected.clone()))).is_empty());
        assert_eq!(payload_diff(&expected, None), vec!["payload is NULL"]);
        let long = json!("x".repeat(100));
        assert_eq!(short(&long).chars().count(), 41);
    }

    #[test]
    fn vectors_parse_and_compare() {
        assert_eq!(parse_vector("[1,2.5,-3]"), Some(vec![1.0, 2.5, -3.0]));
        assert_eq!(parse_vector("[]"), Some(vec![]));
        assert_eq!(parse_vector("[1,x]"), None);
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
