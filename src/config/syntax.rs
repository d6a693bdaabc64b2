//! Small syntaxes inside configuration values: `client.properties` files, `schema.table`
//! names with quoted identifiers, and text templates.

use std::collections::BTreeMap;

/// Parses a Java-style `.properties` file as Confluent Cloud hands them out: `key=value` (or
/// `key: value`) per line, `#`/`!` comments, blank lines ignored.
pub fn parse_properties(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some(sep) = line.find(['=', ':']) else {
            return Err(format!("line {}: expected key=value", n + 1));
        };
        let (k, v) = (line[..sep].trim(), line[sep + 1..].trim());
        if k.is_empty() {
            return Err(format!("line {}: empty key", n + 1));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Splits `schema.table` (identifiers optionally double-quoted, `""` escaping a quote) into its
/// parts; a bare `table` is in schema `public`.
pub fn parse_table_name(s: &str) -> Result<(String, String), String> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("{s:?}: unterminated quoted identifier")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if c == '"' {
                    return Err(format!("{s:?}: a quote inside an unquoted identifier"));
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(format!("{s:?}: empty identifier"));
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(c) => return Err(format!("{s:?}: unexpected {c:?} after a quoted identifier")),
        }
    }
    match <[String; 2]>::try_from(parts) {
        Ok([schema, table]) => Ok((schema, table)),
        Err(parts) if parts.len() == 1 => Ok((
            "public".into(),
            parts.into_iter().next().unwrap_or_default(),
        )),
        Err(_) => Err(format!("{s:?}: expected `table` or `schema.table`")),
    }
}

/// A piece of a text template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Column(String),
}

/// Parses `"{customer} ordered {items}"`; `{{` and `}}` are literal braces.
pub fn parse_template(t: &str) -> Result<Vec<TemplatePart>, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut chars = t.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|p| p.1) == Some('{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek().map(|p| p.1) == Some('}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some((_, '}')) => break,
                        Some((_, '{')) | None => {
                            return Err(format!("unclosed '{{' at byte {i} of {t:?}"));
                        }
                        Some((_, c)) => name.push(c),
                    }
                }
                let name = name.trim();
                if name.is_empty() {
                    return Err(format!("empty column name '{{}}' at byte {i} of {t:?}"));
                }
                if !lit.is_empty() {
                    parts.push(TemplatePart::Literal(std::mem::take(&mut lit)));
                }
                parts.push(TemplatePart::Column(name.to_owned()));
            }
            '}' => {
                return Err(format!(
                    "unmatched '}}' at byte {i} of {t:?} (write '}}}}')"
                ));
            }
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        parts.push(TemplatePart::Literal(lit));
    }
    if !parts.iter().any(|p| matches!(p, TemplatePart::Column(_))) {
        return Err(format!("{t:?} names no column: write e.g. \"{{note}}\""));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_with_quotes() {
        assert_eq!(
            parse_table_name("orders").unwrap(),
            ("public".into(), "orders".into())
        );
        assert_eq!(
            parse_table_name("Sales.Orders").unwrap(),
            ("sales".into(), "orders".into())
        );
        assert_eq!(
            parse_table_name(r#"public."Order Items""#).unwrap(),
            ("public".into(), "Order Items".into())
        );
        assert_eq!(
            parse_table_name(r#""we""ird"."a.b""#).unwrap(),
            (r#"we"ird"#.into(), "a.b".into())
        );
        for bad in ["", "a.", ".a", "a.b.c", r#""open"#, r#"a"b"#] {
            assert!(parse_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_parse_and_reject_malformed() {
        assert_eq!(
            parse_template("{customer} ordered {{x}}: {note}").unwrap(),
            vec![
                TemplatePart::Column("customer".into()),
                TemplatePart::Literal(" ordered {x}: ".into()),
                TemplatePart::Column("note".into()),
            ]
        );
        for bad in ["{", "a}", "{}", "no columns", "{a{b}"] {
            assert!(parse_template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn properties_files_parse() {
        let p = parse_properties(
            "# Required connection configs\nbootstrap.servers=pkc-1.aws.confluent.cloud:9092\n\
             security.protocol = SASL_SSL\n\nsasl.mechanisms=PLAIN\n! comment\nsasl.password=a=b\n",
        )
        .unwrap();
        assert_eq!(p["bootstrap.servers"], "pkc-1.aws.confluent.cloud:9092");
        assert_eq!(p["security.protocol"], "SASL_SSL");
        assert_eq!(p["sasl.password"], "a=b");
        assert!(
            parse_properties("novalue\n")
                .unwrap_err()
                .contains("line 1")
        );
    }
}
