//! The TLS keys of a PostgreSQL connection string, read with libpq's meanings.
//!
//! tokio-postgres 0.7 knows `sslmode` only as disable/prefer/require and rejects `verify-ca`,
//! `verify-full` and `sslrootcert` outright, so they are taken out of the string here (URL form
//! `postgres://…?sslmode=verify-full&sslrootcert=/ca.pem` or key/value form
//! `host=h sslmode=verify-full sslrootcert='/ca.pem'`), resolved once by libpq's rules into
//! [`TlsOptions`], and the rest of the string is left byte for byte to tokio-postgres. Written by
//! hand: no crate reads libpq's TLS keys for tokio-postgres, and only two keys need taking out.
//!
//! libpq's rules kept here: the default mode is `prefer`; `sslrootcert=system` means the
//! publicly trusted roots and implies `verify-full` (a weaker explicit mode is refused);
//! `require` with a CA file behaves as `verify-ca`; a verifying mode without `sslrootcert` uses
//! `~/.postgresql/root.crt`, and without that file it is an error. Not read: the `PGSSLMODE` /
//! `PGSSLROOTCERT` environment variables, client certificates (`sslcert`, `sslkey`).

use std::fmt;
use std::path::{Path, PathBuf};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What a URL query value must escape: all but RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

use crate::secret::key_values;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext first; TLS (unverified) if the server refuses plaintext.
    Allow,
    /// TLS (unverified) if the server offers it, else plaintext.
    Prefer,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate chain verified against the CA; host name not checked.
    VerifyCa,
    /// TLS, certificate chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, \
                     verify-full"
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate is checked against a CA.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the CA certificates that verify the server come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// A PEM file of CA certificates (only these are trusted).
    File(PathBuf),
    /// `sslrootcert=system`: the publicly trusted roots (Mozilla's set, as `webpki-roots`
    /// ships it; the replication connection uses the same set).
    System,
}

impl Roots {
    fn as_value(&self) -> String {
        match self {
            Roots::File(p) => p.display().to_string(),
            Roots::System => "system".to_owned(),
        }
    }
}

/// How a connection is secured, resolved from `sslmode` and `sslrootcert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub mode: SslMode,
    /// Set whenever `mode` verifies.
    pub roots: Option<Roots>,
}

/// A connection string with its TLS keys taken out.
#[derive(Clone)]
pub(crate) struct Split {
    /// The string without `sslmode` and `sslrootcert`, for tokio-postgres.
    pub rest: String,
    pub url_form: bool,
    pub tls: TlsOptions,
}

// Not derived: `rest` may hold a password.
impl fmt::Debug for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Split")
            .field("url_form", &self.url_form)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Split {
    /// The string for the replication connection (`pg_walstream`): the same resolved
    /// `sslmode`/`sslrootcert` as every other connection, and `replication=database`.
    /// `channel_binding` is left out: pg_walstream refuses `require` (it binds when the server
    /// offers SCRAM-SHA-256-PLUS, but cannot enforce it); the SQL connection made first to the
    /// same server enforces it.
    pub fn replication_url(&self) -> String {
        let (mut s, _) = take(&self.rest, self.url_form, &["channel_binding"]);
        let mut params = vec![("sslmode", self.tls.mode.as_str().to_owned())];
        if let Some(r) = &self.tls.roots {
            params.push(("sslrootcert", r.as_value()));
        }
        params.push(("replication", "database".to_owned()));
        for (k, v) in params {
            append(&mut s, self.url_form, k, &v);
        }
        s
    }
}

/// Takes `sslmode` and `sslrootcert` out of `s` and resolves them by libpq's rules.
pub(crate) fn split(s: &str) -> Result<Split, String> {
    split_with(s, default_root_file().as_deref())
}

/// libpq's default CA file, `~/.postgresql/root.crt`, if it exists.
fn default_root_file() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".postgresql").join("root.crt");
    p.is_file().then_some(p)
}

fn split_with(s: &str, default_root: Option<&Path>) -> Result<Split, String> {
    let url_form = is_url(s);
    let (rest, taken) = take(s, url_form, &["sslmode", "sslrootcert"]);
    // As libpq, the last occurrence of a key wins.
    let last = |key: &str| {
        taken
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let tls = resolve(last("sslmode"), last("sslrootcert"), default_root)?;
    Ok(Split {
        rest,
        url_form,
        tls,
    })
}

fn resolve(
    sslmode: Option<&str>,
    sslrootcert: Option<&str>,
    default_root: Option<&Path>,
) -> Result<TlsOptions, String> {
    let explicit = sslmode.map(SslMode::parse).transpose()?;
    let roots = match sslrootcert {
        Some("system") => Some(Roots::System),
        Some("") => return Err("sslrootcert is empty".into()),
        Some(path) => Some(Roots::File(PathBuf::from(path))),
        None => None,
    };
    let mode = match (&roots, explicit) {
        (Some(Roots::System), None) => SslMode::VerifyFull,
        (Some(Roots::System), Some(SslMode::VerifyFull)) => SslMode::VerifyFull,
        (Some(Roots::System), Some(weak)) => {
            return Err(format!(
                "sslmode={weak} may not be used with sslrootcert=system (which trusts every \
                 public CA, so only verify-full, which also checks the host name, means \
                 anything): use sslmode=verify-full"
            ));
        }
        (_, Some(m)) => m,
        (_, None) => SslMode::Prefer,
    };
    let wants_roots = matches!(
        mode,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
    );
    let roots = match roots {
        None if wants_roots => default_root.map(|p| Roots::File(p.to_owned())),
        r => r,
    };
    // libpq: "if a root CA file exists, the behavior of sslmode=require will be the same as
    // that of verify-ca".
    let mode = match (mode, &roots) {
        (SslMode::Require, Some(Roots::File(_))) => SslMode::VerifyCa,
        (m, _) => m,
    };
    if mode.verifies() && roots.is_none() {
        return Err(format!(
            "sslmode={mode} needs the CA to check the server's certificate against: set \
             sslrootcert to its PEM file (or sslrootcert=system for a publicly trusted \
             certificate); the default ~/.postgresql/root.crt does not exist"
        ));
    }
    Ok(TlsOptions { mode, roots })
}

fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `s` without the parameters named in `keys`, and those parameters (decoded), in order.
fn take(s: &str, url_form: bool, keys: &[&str]) -> (String, Vec<(String, String)>) {
    let mut taken = Vec::new();
    if url_form {
        let Some(q) = s.find('?') else {
            return (s.to_owned(), taken);
        };
        let mut kept: Vec<&str> = Vec::new();
        for param in s[q + 1..].split('&') {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            let k = percent_decode_str(k).decode_utf8_lossy();
            if keys.contains(&k.as_ref()) {
                let v = percent_decode_str(v).decode_utf8_lossy().into_owned();
                taken.push((k.into_owned(), v));
            } else if !param.is_empty() {
                kept.push(param);
            }
        }
        let mut rest = s[..q].to_owned();
        if !kept.is_empty() {
            rest.push('?');
            rest.push_str(&kept.join("&"));
        }
        (rest, taken)
    } else {
        let mut rest = String::with_capacity(s.len());
        let mut last = 0;
        for kv in key_values(s) {
            if keys.contains(&kv.key) {
                rest.push_str(&s[last..kv.key_start]);
                last = kv.span.end;
                taken.push((kv.key.to_owned(), kv.value));
            }
        }
        rest.push_str(&s[last..]);
        (rest.trim().to_owned(), taken)
    }
}

/// Appends `key=value` to a connection string of either form, quoted as that form needs.
fn append(s: &mut String, url_form: bool, key: &str, value: &str) {
    if url_form {
        s.push(if s.contains('?') { '&' } else { '?' });
        s.push_str(key);
        s.push('=');
        s.extend(utf8_percent_encode(value, QUERY_VALUE));
    } else {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(key);
        s.push_str("='");
        for c in value.chars() {
            if matches!(c, '\'' | '\\') {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('\'');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_no_home(s: &str) -> Result<Split, String> {
        split_with(s, None)
    }

    #[test]
    fn takes_the_tls_keys_out_of_a_url_and_leaves_the_rest() {
        let s = split_no_home(
            "postgres://u:p%40ss@db.example.com:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            s.rest,
            "postgres://u:p%40ss@db.example.com:5432/app?application_name=x"
        );
        assert_eq!(
            s.tls,
            TlsOptions {
                mode: SslMode::VerifyFull,
                roots: Some(Roots::File("/etc/ca dir/ca.pem".into()))
            }
        );
        // What is left parses for tokio-postgres, which refuses the original.
        assert!(s.rest.parse::<tokio_postgres::Config>().is_ok());
    }

    #[test]
    fn takes_the_tls_keys_out_of_key_values_with_quotes() {
        let s = split_no_home(
            "host=h user=u password='a b\\'c' sslmode = verify-ca sslrootcert='/ca dir/ca.pem' dbname=d",
        )
        .unwrap();
        let words: Vec<&str> = s.rest.split_whitespace().collect();
        assert_eq!(
            words,
            ["host=h", "user=u", "password='a", "b\\'c'", "dbname=d"]
        );
        assert_eq!(s.tls.mode, SslMode::VerifyCa);
        assert_eq!(s.tls.roots, Some(Roots::File("/ca dir/ca.pem".into())));
        let c: tokio_postgres::Config = s.rest.parse().unwrap();
        assert_eq!(c.get_password(), Some(&b"a b'c"[..]));
    }

    #[test]
    fn libpq_defaults_and_implications() {
        let mode = |s: &str| split_no_home(s).map(|s| s.tls.mode);
        assert_eq!(mode("postgres://h/db"), Ok(SslMode::Prefer));
        assert_eq!(mode("host=h sslmode=disable"), Ok(SslMode::Disable));
        assert_eq!(mode("host=h sslmode=allow"), Ok(SslMode::Allow));
        assert_eq!(mode("host=h sslmode=require"), Ok(SslMode::Require));
        // system implies verify-full and refuses anything weaker
        assert_eq!(mode("host=h sslrootcert=system"), Ok(SslMode::VerifyFull));
        let weak = mode("host=h sslrootcert=system sslmode=require").unwrap_err();
        assert!(weak.contains("sslmode=require may not be used with sslrootcert=system"));
        // require with a CA file is verify-ca
        assert_eq!(
            mode("host=h sslmode=require sslrootcert=/ca.pem"),
            Ok(SslMode::VerifyCa)
        );
        // the last occurrence wins
        assert_eq!(
            mode("postgres://h/db?sslmode=disable&sslmode=require"),
            Ok(SslMode::Require)
        );
        let bad = mode("postgres://h/db?sslmode=verify_full").unwrap_err();
        assert!(bad.contains("\"verify_full\" is not one of"), "{bad}");
    }

    #[test]
    fn a_verifying_mode_needs_a_ca() {
        let e = split_no_home("postgres://h/db?sslmode=verify-full").unwrap_err();
        assert!(
            e.contains("needs the CA") && e.contains("sslrootcert"),
            "{e}"
        );
        // ~/.postgresql/root.crt stands in, as in libpq, also turning require into verify-ca
        let home = Path::new("/home/u/.postgresql/root.crt");
        let s = split_with("postgres://h/db?sslmode=verify-full", Some(home)).unwrap();
        assert_eq!(s.tls.roots, Some(Roots::File(home.into())));
        let s = split_with("postgres://h/db?sslmode=require", Some(home)).unwrap();
        assert_eq!(s.tls.mode, SslMode::VerifyCa);
        // prefer never verifies, so the default file is not used
        let s = split_with("postgres://h/db", Some(home)).unwrap();
        assert_eq!(s.tls.roots, None);
    }

    #[test]
    fn the_replication_url_carries_the_resolved_settings() {
        let s = split_no_home(
            "postgres://u@h/db?sslmode=require&sslrootcert=/c.pem&channel_binding=require",
        )
        .unwrap();
        assert_eq!(
            s.replication_url(),
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert=%2Fc.pem&replication=database"
        );
        let s = split_no_home("host=h user=u").unwrap();
        assert_eq!(
            s.replication_url(),
            "host=h user=u sslmode='prefer' replication='database'"
        );
        let s = split_no_home("host=h sslrootcert=system").unwrap();
        assert_eq!(
            s.replication_url(),
            "host=h sslmode='verify-full' sslrootcert='system' replication='database'"
        );
    }
}
