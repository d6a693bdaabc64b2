//! The TOML tree before it is typed: `${VAR}` interpolation with key paths, and error messages
//! that never quote a value (it may be a secret).

use std::fmt;

use super::ConfigError;

/// A dotted key path while walking the TOML tree.
#[derive(Debug, Clone)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

struct KeyPath<'a>(&'a [Seg]);

impl fmt::Display for KeyPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

pub(super) fn interpolate(
    value: &mut toml::Value,
    path: &mut Vec<Seg>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = interpolate_str(s, env)
                .map_err(|m| ConfigError::invalid(KeyPath(path).to_string(), m))?;
        }
        toml::Value::String(_) => {}
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(Seg::Index(i));
                interpolate(item, path, env)?;
                path.pop();
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                path.push(Seg::Key(k.clone()));
                interpolate(v, path, env)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands `${VAR}` and `${VAR:-default}`; `$${` is a literal `${`; any other `$` is kept.
pub fn interpolate_str(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body_start) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = body_start.find('}') else {
            return Err(format!("unclosed \"${{\" in {:?}", redact_for_message(s)));
        };
        let body = &body_start[..end];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        let valid_name = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            return Err(format!(
                "\"${{{name}}}\" is not a valid environment variable name"
            ));
        }
        match (env(name), default) {
            (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set and \"${{{name}}}\" has no default \
                     (write \"${{{name}:-default}}\" to give one)"
                ));
            }
        }
        rest = &body_start[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A string as it may appear in an error: connection-string passwords hidden.
fn redact_for_message(s: &str) -> String {
    crate::secret::redact_conn_str(s)
}

/// serde echoes mistyped string values (`invalid type: string "hunter2", expected …`): a password
/// put where a number belongs would reach the error. Keep the kind, drop the value.
pub(super) fn sanitize_serde_message(msg: &str) -> String {
    let marker = "invalid type: string \"";
    match msg.find(marker) {
        Some(start) => {
            let value_start = start + marker.len();
            match msg[value_start..].find("\", expected") {
                Some(len) => format!(
                    "{}invalid type: string{}",
                    &msg[..start],
                    &msg[value_start + len + 1..]
                ),
                None => format!("{}invalid type: string", &msg[..start]),
            }
        }
        None => msg.to_owned(),
    }
}

pub(super) fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
            (line, column)
        }
        None => (0, 0),
    };
    ConfigError::Syntax {
        line,
        column,
        message: e.message().trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn interpolation_expands_defaults_and_escapes() {
        let env = env_of(&[("A", "1"), ("EMPTY", "")]);
        assert_eq!(interpolate_str("x${A}y", &env).unwrap(), "x1y");
        assert_eq!(interpolate_str("${B:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(interpolate_str("${EMPTY:-d}", &env).unwrap(), "d");
        assert_eq!(interpolate_str("${EMPTY}", &env).unwrap(), "");
        assert_eq!(interpolate_str("$${A} $5", &env).unwrap(), "${A} $5");
        assert_eq!(interpolate_str("${B:-}", &env).unwrap(), "");
        let err = interpolate_str("${NOPE}", &env).unwrap_err();
        assert!(err.contains("NOPE") && err.contains("not set"), "{err}");
        assert!(
            interpolate_str("${A", &env)
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            interpolate_str("${1X}", &env)
                .unwrap_err()
                .contains("not a valid")
        );
    }

    #[test]
    fn serde_messages_lose_string_values() {
        assert_eq!(
            sanitize_serde_message("invalid type: string \"hunter2\", expected u32"),
            "invalid type: string, expected u32"
        );
        assert_eq!(
            sanitize_serde_message("missing field `x`"),
            "missing field `x`"
        );
    }
}
