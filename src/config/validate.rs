//! Checks shared by sections that name a PostgreSQL database: the source and the pgvector sink.

use super::ConfigError;
use crate::secret::ConnString;

pub(super) fn validate_pg_url(key: &str, url: &ConnString) -> Result<(), ConfigError> {
    crate::pg::Target::parse(url.expose())
        .map(|_| ())
        .map_err(|e| ConfigError::invalid(key, e))
}

pub(super) fn validate_pg_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 63 {
        return Err(ConfigError::invalid(
            key,
            format!("{name:?} must be 1 to 63 bytes (PostgreSQL's identifier limit)"),
        ));
    }
    Ok(())
}
