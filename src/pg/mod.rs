//! PostgreSQL plumbing shared by the PostgreSQL source, the pgvector sink, `check`, `status`
//! and `verify`.
//!
//! This is the one place where connection strings are read and connections to PostgreSQL are
//! opened: [`Target::parse`] takes libpq's `sslmode` / `sslrootcert` out of the string
//! ([`dsn`]) and builds the rustls connector once ([`tls`]); [`Target::open`] connects with it;
//! [`Target::replication_url`] gives the replication connection (which `pg_walstream` opens
//! itself) the same resolved settings. It also holds how a server error is put into words and
//! how identifiers are quoted, so every module says and quotes them alike.

pub mod dsn;
mod tls;

use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

pub use dsn::{Roots, SslMode, TlsOptions};

use crate::secret::ConnString;

/// A PostgreSQL server to connect to: the tokio-postgres configuration, how the connection is
/// secured, and the connector that does it.
#[derive(Clone)]
pub struct Target {
    config: Config,
    split: dsn::Split,
    connector: Option<MakeRustlsConnect>,
}

impl Target {
    /// Reads a connection string (URL or key/value form). The error says what is wrong and
    /// never quotes the string (it may hold a password).
    pub fn parse(url: &str) -> Result<Self, String> {
        let split = dsn::split(url)?;
        let mut config: Config = split
            .rest
            .parse()
            .map_err(|e| format!("invalid PostgreSQL connection string: {e}"))?;
        config.ssl_mode(match split.tls.mode {
            SslMode::Disable | SslMode::Allow => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        let connector = tls::client_config(&split.tls)?.map(MakeRustlsConnect::new);
        Ok(Target {
            config,
            split,
            connector,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    pub fn tls(&self) -> &TlsOptions {
        &self.split.tls
    }

    /// The string for a replication connection (`pg_walstream`), with this target's resolved
    /// TLS settings and `replication=database`.
    pub fn replication_url(&self) -> String {
        self.split.replication_url()
    }

    /// Opens a connection and drives it on its own task until the client is dropped. An error
    /// that ends the connection (the server went away, a protocol failure) goes to `closed`;
    /// the end of a connection whose client was dropped is not an error.
    pub async fn open(
        &self,
        closed: impl FnOnce(tokio_postgres::Error) + Send + 'static,
    ) -> Result<Client, tokio_postgres::Error> {
        match (&self.connector, self.split.tls.mode) {
            (Some(tls), SslMode::Allow) => {
                // libpq's `allow`: plaintext first, TLS if the server turns plaintext away.
                match self.config.connect(NoTls).await {
                    Err(e) if e.as_db_error().is_some() => {
                        let mut config = self.config.clone();
                        config.ssl_mode(PgSslMode::Require);
                        spawn(config.connect(tls.clone()).await, closed)
                    }
                    plain => spawn(plain, closed),
                }
            }
            (Some(tls), _) => spawn(self.config.connect(tls.clone()).await, closed),
            (None, _) => spawn(self.config.connect(NoTls).await, closed),
        }
    }
}

fn spawn<C>(
    connected: Result<(Client, C), tokio_postgres::Error>,
    closed: impl FnOnce(tokio_postgres::Error) + Send + 'static,
) -> Result<Client, tokio_postgres::Error>
where
    C: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    let (client, connection) = connected?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            closed(e);
        }
    });
    Ok(client)
}

/// A client for short-lived look-ups (`check`, `status`, `verify`, row look-ups): the error
/// names the server (password redacted) and says why, and a connection that fails afterwards
/// is of no interest.
pub(crate) async fn connect(url: &ConnString) -> Result<Client, String> {
    let target = Target::parse(url.expose()).map_err(|e| format!("{url}: {e}"))?;
    target
        .open(|_| {})
        .await
        .map_err(|e| connect_error(url, &target, &e))
}

/// "cannot connect to URL: why", with a hint for the TLS failures users meet: a certificate
/// not signed by the configured CA, a server that refuses plaintext.
pub fn connect_error(url: &ConnString, target: &Target, e: &tokio_postgres::Error) -> String {
    let mut text = format!("cannot connect to {url}: {}", error_text(e));
    if let Some(db) = e.as_db_error()
        && db.code().code() == "28000"
        && db.message().contains("no encryption")
    {
        text.push_str(&format!(
            " (the server accepts only TLS connections; sslmode is {}: use sslmode=require or \
             stronger)",
            target.tls().mode
        ));
    }
    if let Some(Roots::File(path)) = &target.tls().roots
        && let Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        )) = tls::rustls_error(e)
    {
        text.push_str(&format!(" (sslrootcert is {})", path.display()));
    }
    text
}

/// The tokio-postgres view of a connection string (TLS keys taken out, no CA file read), for
/// what only needs its user, hosts and password.
pub(crate) fn config_only(url: &str) -> Option<Config> {
    dsn::split(url).ok()?.rest.parse().ok()
}

/// Whether `e` is the server's certificate being rejected (retrying cannot change that).
pub fn is_certificate_error(e: &tokio_postgres::Error) -> bool {
    matches!(
        tls::rustls_error(e),
        Some(rustls::Error::InvalidCertificate(_))
    )
}

/// The negotiated TLS version and cipher of `client`'s own connection, as the server reports
/// it (`pg_stat_ssl`); `None` for a plaintext connection.
pub(crate) async fn tls_in_use(client: &Client) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
            &[],
        )
        .await?;
    Ok(row.map(|r| {
        let version: Option<String> = r.get(0);
        let cipher: Option<String> = r.get(1);
        format!(
            "{} ({})",
            version.as_deref().unwrap_or("TLS"),
            cipher.as_deref().unwrap_or("cipher unknown")
        )
    }))
}

/// The text of a PostgreSQL error for people: the server's severity and message for a server
/// error (tokio-postgres's `Display` of one is just "db error"), otherwise the error with its
/// chain of causes.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            if let Some(problem) = tls::rustls_error(e).and_then(tls::certificate_problem) {
                s.push_str(" (");
                s.push_str(problem);
                s.push(')');
            }
            s
        }
    }
}

/// Quotes an SQL identifier: wrapped in `"`, any `"` inside doubled
/// (`Order "Items"` → `"Order ""Items"""`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a schema-qualified name, each part on its own (`my schema`, `t` → `"my schema"."t"`).
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_and_qualified_names() {
        assert_eq!(quote_ident("plain"), "\"plain\"");
        assert_eq!(quote_ident("Order \"Items\""), "\"Order \"\"Items\"\"\"");
        assert_eq!(quote_qualified("my schema", "t"), "\"my schema\".\"t\"");
        assert_eq!(quote_qualified("a.b", "\"c\""), "\"a.b\".\"\"\"c\"\"\"");
    }
}
