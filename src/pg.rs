//! PostgreSQL plumbing shared by the PostgreSQL source, the pgvector sink, `check` and `status`.
//!
//! This is the one place where connections to PostgreSQL are opened (all but the source's
//! replication stream, which `pg_walstream` opens itself): how a connection is secured (TLS, when
//! it comes) is decided here, once, for every caller. It also holds how a server error is put
//! into words and how identifiers are quoted, so every module says and quotes them alike.

use tokio_postgres::{Client, Config, NoTls};

use crate::secret::ConnString;

/// Opens a connection with `config` and drives it on its own task until the client is dropped.
/// An error that ends the connection (the server went away, a protocol failure) goes to `closed`;
/// the end of a connection whose client was dropped is not an error.
pub(crate) async fn open(
    config: &Config,
    closed: impl FnOnce(tokio_postgres::Error) + Send + 'static,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            closed(e);
        }
    });
    Ok(client)
}

/// A client for short-lived look-ups (`check`, `status`): the error names the server (password
/// redacted) and says why, and a connection that fails afterwards is of no interest.
pub(crate) async fn connect(url: &ConnString) -> Result<Client, String> {
    let cannot = |e: tokio_postgres::Error| format!("cannot connect to {url}: {}", error_text(&e));
    let config: Config = url.expose().parse().map_err(cannot)?;
    open(&config, |_| {}).await.map_err(cannot)
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
