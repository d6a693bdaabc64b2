//! One redaction step for all text that leaves the process: what the CLI prints, every log line,
//! the `/readyz` body.
//!
//! The types of [`super`] keep a secret out of `Debug` and `Display`, but libraries quote values
//! in their own error text: librdkafka names the value of any property it rejects
//! (`No such configuration property: "sasl.passwrod" sasl.passwrod <value>`), and a Java
//! `sasl.jaas.config` line pasted from a `client.properties` carries a password. A [`Redactor`]
//! built from the loaded configuration knows every value that is, or may be, secret and replaces
//! each occurrence with `***`, whatever produced the text.
//!
//! Secret values:
//! - the password of each connection string, as written and decoded, and the values of its
//!   secret parameters;
//! - the value of each librdkafka property and object-store option whose key names a secret
//!   ([`is_sensitive_key`]) *or that the client does not accept*: a misspelled key
//!   (`sasl.passwrod`) may hold exactly the secret its correct spelling would;
//! - `key=value` secrets inside any such value (the `password='…'` of a JAAS line), besides the
//!   whole value;
//!
//! each also as JSON and `{:?}` escape it (a JSON log line, a `{value:?}` in a message).
//!
//! Judgement calls:
//! - A value of [`MIN_ANYWHERE`] characters or more is replaced wherever it occurs; a shorter
//!   one only where it stands as a whole token (no letter, digit or `_` on either side), so a
//!   2-character password hides where it is quoted (`password=ab`) without turning every `ab`
//!   of every message into `***`.
//! - A password equal to the user, database or host name of its own connection string is left
//!   to the structural redaction of [`ConnString`] (`postgres://postgres:***@…/postgres`): those
//!   names are shown on purpose, and replacing them would garble every line that mentions them
//!   (the test services' password is `postgres`).

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, RwLock};

use super::{ConnString, REDACTED, is_sensitive_key, key_values};
use crate::config::Config;

/// Secret values at least this long (in characters) are replaced wherever they occur; shorter
/// ones only as whole tokens.
pub const MIN_ANYWHERE: usize = 4;

/// The secret values of a configuration, and the replacement of them in any text.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Every form of every secret value, longest first (a secret containing another is replaced
    /// whole).
    needles: Vec<String>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} values)", self.needles.len())
    }
}

impl Redactor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every secret `config` holds: connection-string passwords, secret and unknown librdkafka
    /// properties (from `properties` and the `client_properties` file), secret and unknown
    /// object-store options.
    pub fn for_config(config: &Config) -> Redactor {
        let mut r = Redactor::new();
        if let Some(pg) = &config.sources.postgres {
            r.add_conn_str(&pg.url);
        }
        if let Some(p) = &config.sinks.pgvector {
            r.add_conn_str(&p.url);
        }
        if let Some(k) = &config.sources.kafka {
            let props = k
                .librdkafka_properties()
                .unwrap_or_else(|_| k.properties.clone());
            r.extend(crate::source::kafka::redactor(&props));
            if let Ok(Some(registry)) = k.registry()
                && let Some(p) = &registry.password
            {
                r.add(p.expose());
            }
        }
        if let Some(d) = &config.sinks.delta {
            let unknown = crate::storage::unknown_options(&d.uri, &d.storage);
            for (k, v) in d.storage.iter() {
                r.add_property(k, v, unknown.contains(&k.as_str()));
            }
        }
        r
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// Adds a secret value: as it is, trimmed, and JSON- and `{:?}`-escaped.
    pub fn add(&mut self, secret: &str) {
        let mut forms = Vec::with_capacity(6);
        for f in [secret, secret.trim()] {
            forms.push(f.to_owned());
            if let Ok(json) = serde_json::to_string(f) {
                forms.push(unquote(&json).to_owned());
            }
            forms.push(unquote(&format!("{f:?}")).to_owned());
        }
        for f in forms {
            // "***" stays what it is.
            if !f.chars().all(|c| c == '*') && !self.needles.contains(&f) {
                self.needles.push(f);
            }
        }
        self.sort();
    }

    /// Adds a librdkafka property or object-store option. Its value is secret when its key names
    /// a secret or when `unknown` (the client rejects the key or the value: the key may be a
    /// secret one misspelled); `key=value` secrets inside any value are secret too.
    pub fn add_property(&mut self, key: &str, value: &str, unknown: bool) {
        if unknown || is_sensitive_key(key) {
            self.add(value);
        }
        self.add_embedded(value);
    }

    /// The secrets of `key=value` pairs inside a value (`… required username='u' password='p';`).
    fn add_embedded(&mut self, value: &str) {
        if !value.contains('=') {
            return;
        }
        for kv in key_values(value) {
            if names_secret(kv.key) {
                if let Some(bare) = kv.value.strip_suffix(';') {
                    self.add(bare);
                }
                self.add(&kv.value);
                self.add(&value[kv.span]);
            }
        }
    }

    /// Adds the password of a connection string (URL or `key=value` form; as written and
    /// decoded) and the values of its secret parameters, except one equal to the string's own
    /// user, database or host name (see the module doc).
    pub fn add_conn_str(&mut self, url: &ConnString) {
        let s = url.expose();
        let mut secrets: Vec<String> = Vec::new();
        let mut shown: Vec<String> = Vec::new();
        if s.contains("://") {
            match url::Url::parse(s) {
                Ok(u) => {
                    if let Some(p) = u.password() {
                        secrets.push(p.to_owned());
                        secrets.push(percent_decode(p));
                    }
                    shown.push(percent_decode(u.username()));
                    shown.extend(u.host_str().map(str::to_owned));
                    shown.push(percent_decode(u.path().trim_start_matches('/')));
                    for (k, v) in u.query_pairs() {
                        if is_sensitive_key(&k) {
                            secrets.push(v.into_owned());
                        }
                    }
                }
                // What `redact_conn_str` hides of it: the user info's password part.
                Err(_) => {
                    if let (Some(start), Some(at)) = (s.find("://"), s.rfind('@'))
                        && at > start + 3
                    {
                        let info = &s[start + 3..at];
                        secrets.push(info.split_once(':').map_or(info, |(_, p)| p).to_owned());
                    }
                }
            }
        } else {
            for kv in key_values(s) {
                if is_sensitive_key(kv.key) {
                    secrets.push(s[kv.span.clone()].to_owned());
                    secrets.push(kv.value);
                }
            }
        }
        if let Some(c) = crate::pg::config_only(s) {
            if let Some(p) = c.get_password() {
                secrets.push(String::from_utf8_lossy(p).into_owned());
            }
            shown.extend(c.get_user().map(str::to_owned));
            shown.extend(c.get_dbname().map(str::to_owned));
            for h in c.get_hosts() {
                if let tokio_postgres::config::Host::Tcp(h) = h {
                    shown.push(h.clone());
                }
            }
        }
        for secret in secrets {
            if !shown.contains(&secret) {
                self.add(&secret);
            }
        }
    }

    /// Adds every secret `other` knows.
    pub fn extend(&mut self, other: Redactor) {
        for n in other.needles {
            if !self.needles.contains(&n) {
                self.needles.push(n);
            }
        }
        self.sort();
    }

    /// `text` with every occurrence of a secret replaced by `***` (borrowed when none occurs).
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if !out.contains(needle.as_str()) {
                continue;
            }
            if needle.chars().count() >= MIN_ANYWHERE {
                out = Cow::Owned(out.replace(needle.as_str(), REDACTED));
            } else if let Some(replaced) = replace_tokens(&out, needle) {
                out = Cow::Owned(replaced);
            }
        }
        out
    }

    fn sort(&mut self) {
        self.needles
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    }
}

/// The process's redactor (installed by the binary once the configuration is loaded).
static INSTALLED: RwLock<Option<Arc<Redactor>>> = RwLock::new(None);

/// Makes `redactor` the process's: [`redact`], and through it every log line the binary writes,
/// uses it from now on.
pub fn install_redactor(redactor: Redactor) {
    let mut slot = INSTALLED.write().unwrap_or_else(|p| p.into_inner());
    *slot = Some(Arc::new(redactor));
}

/// `text` with every secret of the installed redactor replaced (unchanged until one is
/// installed).
pub fn redact(text: &str) -> Cow<'_, str> {
    let installed = INSTALLED.read().unwrap_or_else(|p| p.into_inner()).clone();
    match installed {
        Some(r) => r.redact(text),
        None => Cow::Borrowed(text),
    }
}

/// Whether a key inside a value (a JAAS option, an OAuth `key=value` list) names a secret; looser
/// than [`is_sensitive_key`] because such keys are camel case (`clientSecret`).
fn names_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    is_sensitive_key(&key)
        || ["password", "passwd", "secret", "token", "credential"]
            .iter()
            .any(|w| key.contains(w))
}

/// Replaces the occurrences of `needle` that stand as whole tokens; `None` when there are none.
fn replace_tokens(text: &str, needle: &str) -> Option<String> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (i, _) in text.match_indices(needle) {
        let before = text[..i].chars().next_back();
        let after = text[i + needle.len()..].chars().next();
        if before.is_some_and(word) || after.is_some_and(word) {
            continue;
        }
        out.push_str(&text[last..i]);
        out.push_str(REDACTED);
        last = i + needle.len();
    }
    (last > 0).then(|| {
        out.push_str(&text[last..]);
        out
    })
}

/// `"…"` → `…` (a JSON string or a `{:?}` of one).
fn unquote(quoted: &str) -> &str {
    quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(quoted)
}

/// Decodes `%XX` escapes (a URL's user and password); invalid ones stay as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(secrets: &[&str]) -> Redactor {
        let mut r = Redactor::new();
        for s in secrets {
            r.add(s);
        }
        r
    }

    #[test]
    fn every_occurrence_and_escaped_form_is_replaced() {
        let r = with(&["hunter2", r#"q"u\ote"#]);
        assert_eq!(r.redact("a hunter2 b hunter2"), "a *** b ***");
        assert_eq!(r.redact(r#"{"v":"q\"u\\ote"}"#), r#"{"v":"***"}"#);
        assert_eq!(r.redact("nothing here"), "nothing here");
        assert!(matches!(r.redact("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_longer_secret_is_replaced_whole_before_a_shorter_inside_it() {
        let r = with(&["pass", "password-long"]);
        assert_eq!(r.redact("x password-long y pass"), "x *** y ***");
    }

    #[test]
    fn short_values_are_replaced_only_as_whole_tokens() {
        let r = with(&["ab", "7"]);
        assert_eq!(
            r.redact("password=ab tab abc 'ab'"),
            "password=*** tab abc '***'"
        );
        assert_eq!(r.redact("70 7 17"), "70 *** 17");
        assert_eq!(with(&["", "*"]).redact("a * b"), "a * b");
    }

    #[test]
    fn jaas_lines_hide_their_password_and_themselves() {
        let jaas = "org.apache.kafka.common.security.plain.PlainLoginModule required \
                    username=\"KEY\" password=\"s3cr3t-jaas\";";
        let mut r = Redactor::new();
        r.add_property("sasl.jaas.config", jaas, false);
        assert_eq!(r.redact(&format!("bad: {jaas}")), "bad: ***");
        assert_eq!(r.redact("pw s3cr3t-jaas"), "pw ***");
        let mut r = Redactor::new();
        r.add_property("x", "a=1 clientSecret=oauth-s3cret", false);
        assert_eq!(r.redact("oauth-s3cret a=1"), "*** a=1");
    }

    #[test]
    fn unknown_properties_are_secret_known_plain_ones_are_not() {
        let mut r = Redactor::new();
        r.add_property("sasl.passwrod", "typo-secret", true);
        r.add_property("sasl.username", "alice", false);
        r.add_property("sasl.password", "known-secret", false);
        assert_eq!(r.redact("typo-secret alice known-secret"), "*** alice ***");
    }

    #[test]
    fn connection_string_passwords_as_written_and_decoded() {
        let mut r = Redactor::new();
        r.add_conn_str(&ConnString::new("postgres://app:p%40ss-w0rd@db:5432/x"));
        r.add_conn_str(&ConnString::new(
            "host=db user=app password='kv pass\\'1' dbname=x",
        ));
        assert_eq!(
            r.redact("p%40ss-w0rd p@ss-w0rd kv pass'1 app db x"),
            "*** *** *** app db x"
        );
    }

    #[test]
    fn a_password_equal_to_its_user_or_database_is_left_to_the_url_redaction() {
        let mut r = Redactor::new();
        r.add_conn_str(&ConnString::new(
            "postgres://postgres:postgres@127.0.0.1/postgres",
        ));
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn the_installed_redactor_applies_to_redact() {
        install_redactor(with(&["installed-secret"]));
        assert_eq!(redact("x installed-secret"), "x ***");
    }
}
