//! Values that must never reach a log line, an error message or `Debug` output.
//!
//! Three shapes of secret reach Tributary: whole values (a password, a storage key), connection
//! strings with a password inside (`postgres://u:pw@h/db`, `host=h password=pw`), and property maps
//! whose *keys* say which values are secret (`sasl.password`, `azure_storage_account_key`). Each has
//! a type here whose `Debug` redacts, so deriving `Debug` on a config struct is safe.
//!
//! Libraries put values into their own error text, though (librdkafka quotes the value of a
//! property it rejects): [`Redactor`] scrubs every secret the loaded configuration holds from any
//! text, and the binary passes everything it prints or logs through it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

mod redactor;

pub use redactor::{Redactor, install_redactor, redact};

pub const REDACTED: &str = "***";

/// A secret value; only [`Secret::expose`] reveals it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A connection string that may carry a password, in URL form or libpq key=value form.
/// `Debug` and `Display` show it with the password replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnString(String);

impl ConnString {
    pub fn new(value: impl Into<String>) -> Self {
        ConnString(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn redacted(&self) -> String {
        redact_conn_str(&self.0)
    }
}

impl fmt::Debug for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for ConnString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(ConnString)
    }
}

/// Replaces passwords in a URL (`scheme://user:pw@host`, `?password=pw`) or in a libpq
/// key=value string (`password=pw`, `password='p w'`).
pub fn redact_conn_str(s: &str) -> String {
    if s.contains("://") {
        if let Ok(mut url) = url::Url::parse(s) {
            if url.password().is_some() {
                let _ = url.set_password(Some(REDACTED));
            }
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if is_sensitive_key(&k) {
                        REDACTED.to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            return url.to_string();
        }
        // Not a parseable URL: hide everything between "://" and the last '@'.
        if let (Some(start), Some(at)) = (s.find("://"), s.rfind('@'))
            && at > start
        {
            return format!("{}://{REDACTED}{}", &s[..start], &s[at..]);
        }
        return s.to_owned();
    }
    redact_key_values(s)
}

fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for kv in key_values(s) {
        if is_sensitive_key(kv.key) {
            out.push_str(&s[last..kv.span.start]);
            out.push_str(REDACTED);
            last = kv.span.end;
        }
    }
    out.push_str(&s[last..]);
    out
}

/// One `key=value` of a libpq-style string (`password='p w'`) or a JAAS line
/// (`password="pw";`): its key, where its value is written, and the value unquoted.
pub(crate) struct KeyValue<'a> {
    pub key: &'a str,
    /// Where the key begins (the pair is `key_start..span.end`).
    pub key_start: usize,
    pub span: std::ops::Range<usize>,
    pub value: String,
}

/// The `key=value` pairs of `s`: the key is the word before `=`; the value is bare (up to the
/// next whitespace) or quoted with `'` or `"`, with backslash escapes inside the quotes (libpq
/// and JAAS syntax).
pub(crate) fn key_values(s: &str) -> Vec<KeyValue<'_>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(rel) = s[pos..].find('=') {
        let eq = pos + rel;
        let before = s[pos..eq].trim_end();
        let key = before
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or("");
        let key_start = pos + before.len() - key.len();
        let after = &s[eq + 1..];
        let trimmed = after.trim_start();
        let start = eq + 1 + (after.len() - trimmed.len());
        let (len, value) = match trimmed.chars().next() {
            Some(quote @ ('\'' | '"')) => {
                let mut value = String::new();
                let mut escaped = false;
                let mut end = trimmed.len();
                for (i, c) in trimmed.char_indices().skip(1) {
                    if escaped {
                        value.push(c);
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == quote {
                        end = i + 1;
                        break;
                    } else {
                        value.push(c);
                    }
                }
                (end, value)
            }
            _ => {
                let len = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
                (len, trimmed[..len].to_owned())
            }
        };
        out.push(KeyValue {
            key,
            key_start,
            span: start..start + len,
            value,
        });
        pos = start + len;
    }
    out
}

/// Whether a property/option key names a secret (librdkafka, object_store and libpq spellings):
/// any of its `.`/`_`/`-` separated words is one of the words below, or it is one of the few
/// secret keys without such a word (`sasl.oauthbearer.config`, which holds a client secret).
pub fn is_sensitive_key(key: &str) -> bool {
    const KEYS: [&str; 1] = ["sasl.oauthbearer.config"];
    const WORDS: [&str; 11] = [
        "password",
        "passwd",
        "secret",
        "token",
        "sas",
        "jaas",
        "credential",
        "credentials",
        "key",
        "pem",
        "private",
    ];
    let key = key.to_ascii_lowercase();
    KEYS.contains(&key.as_str()) || key.split(['.', '_', '-']).any(|w| WORDS.contains(&w))
}

/// A string map (librdkafka properties, object-store options) whose `Debug` hides the values of
/// sensitive keys.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct SecretMap(pub BTreeMap<String, String>);

impl SecretMap {
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if is_sensitive_key(k) {
                    REDACTED
                } else {
                    v.as_str()
                };
                (k, shown)
            }))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_redacted() {
        assert_eq!(
            redact_conn_str("postgres://app:hunter2@db:5432/x?sslmode=require"),
            "postgres://app:***@db:5432/x?sslmode=require"
        );
        let r = redact_conn_str("postgres://app@db/x?password=hunter2&application_name=t");
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.contains("application_name=t"), "{r}");
        assert_eq!(redact_conn_str("http://h:1/p"), "http://h:1/p");
    }

    #[test]
    fn key_value_passwords_are_redacted() {
        let r = redact_conn_str("host=db user=app password=hunter2 dbname=x");
        assert_eq!(r, "host=db user=app password=*** dbname=x");
        let r = redact_conn_str("host=db password = 'hun ter\\'2' dbname=x");
        assert!(!r.contains("hun"), "{r}");
        assert!(r.ends_with("dbname=x"), "{r}");
    }

    #[test]
    fn sensitive_keys_are_recognised() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "sasl.jaas.config",
            "aws_secret_access_key",
            "azure_storage_account_key",
            "azure_storage_sas_key",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "sasl.oauthbearer.config",
            "token",
        ] {
            assert!(is_sensitive_key(k), "{k}");
        }
        for k in [
            "bootstrap.servers",
            "sasl.mechanisms",
            "sasl.username",
            "aws_region",
            "aws_endpoint",
        ] {
            assert!(!is_sensitive_key(k), "{k}");
        }
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let m = SecretMap(
            [
                ("sasl.password".to_owned(), "hunter2".to_owned()),
                ("sasl.username".to_owned(), "alice".to_owned()),
            ]
            .into(),
        );
        let d = format!("{m:?} {:?}", Secret::new("hunter2"));
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("alice"), "{d}");
    }
}
