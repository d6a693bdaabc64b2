//! `[sinks.pgvector]`: the pgvector sink (database, target table per source, payload columns,
//! vector storage and the HNSW index).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::validate::{validate_pg_name, validate_pg_url};
use super::{ConfigError, default_true};
use crate::secret::ConnString;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgvectorSinkConfig {
    pub url: ConnString,
    /// Schema holding the target tables (one per source).
    #[serde(default = "default_pg_schema")]
    pub schema: String,
    /// Target table per source; by default the source name (`public.orders` → `orders`, other
    /// schemas → `schema_table`, a topic → its name).
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
    /// Columns of the source row kept in the `payload` jsonb column, per source (default: all).
    #[serde(default)]
    pub payload_columns: BTreeMap<String, Vec<String>>,
    /// Dimension of the `embedding` column; must equal the model's output dimension.
    #[serde(default = "default_dimension")]
    pub dimension: u32,
    /// Store embeddings as `halfvec` (half the space; for large dimensions).
    #[serde(default)]
    pub halfvec: bool,
    #[serde(default)]
    pub index: VectorIndexConfig,
}

fn default_pg_schema() -> String {
    "public".to_owned()
}

fn default_dimension() -> u32 {
    384
}

/// The similarity index built once the initial snapshot is loaded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorIndexConfig {
    #[serde(default = "default_true")]
    pub hnsw: bool,
    #[serde(default)]
    pub distance: Distance,
    #[serde(default = "default_hnsw_m")]
    pub m: u32,
    #[serde(default = "default_ef_construction")]
    pub ef_construction: u32,
}

impl Default for VectorIndexConfig {
    fn default() -> Self {
        VectorIndexConfig {
            hnsw: true,
            distance: Distance::default(),
            m: default_hnsw_m(),
            ef_construction: default_ef_construction(),
        }
    }
}

fn default_hnsw_m() -> u32 {
    16
}

fn default_ef_construction() -> u32 {
    64
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distance {
    #[default]
    Cosine,
    L2,
    InnerProduct,
}

impl PgvectorSinkConfig {
    /// The target table of a source, unquoted (see [`PgvectorSinkConfig::tables`]).
    pub fn target_table(&self, source: &str) -> String {
        if let Some(t) = self.tables.get(source) {
            return t.clone();
        }
        let name = source.strip_prefix("public.").unwrap_or(source);
        // PostgreSQL truncates identifiers at 63 bytes; do it here so the name we query is the name
        // that exists.
        truncate(&name.replace('.', "_"), 63).to_owned()
    }

    /// Whether column `column` of `source` is kept in the `payload` jsonb column
    /// ([`PgvectorSinkConfig::payload_columns`]; every column when the source has no list).
    pub fn keeps_in_payload(&self, source: &str, column: &str) -> bool {
        self.payload_columns
            .get(source)
            .is_none_or(|wanted| wanted.iter().any(|n| n == column))
    }

    /// `known_sources` are the source names when the configuration lists them all
    /// ([`super::Config::known_sources`]): no two of them may map to one table.
    pub(super) fn validate(&self, known_sources: Option<&[String]>) -> Result<(), ConfigError> {
        validate_pg_url("sinks.pgvector.url", &self.url)?;
        validate_pg_name("sinks.pgvector.schema", &self.schema)?;
        for (source, table) in &self.tables {
            validate_pg_name(&format!("sinks.pgvector.tables.{source:?}"), table)?;
        }
        if let Some(known) = known_sources {
            let mut seen: BTreeMap<String, &String> = BTreeMap::new();
            for source in known {
                let table = self.target_table(source);
                if let Some(other) = seen.insert(table.clone(), source) {
                    return Err(ConfigError::invalid(
                        "sinks.pgvector.tables",
                        format!(
                            "sources {other:?} and {source:?} would both write table \
                             {table:?}: map one to another name here"
                        ),
                    ));
                }
            }
        }
        // pgvector's limits: vector ≤ 16000 dimensions, an HNSW index ≤ 2000 (4000 halfvec).
        let max = match (self.index.hnsw, self.halfvec) {
            (false, _) => 16_000,
            (true, false) => 2_000,
            (true, true) => 4_000,
        };
        if self.dimension == 0 || self.dimension > max {
            return Err(ConfigError::invalid(
                "sinks.pgvector.dimension",
                format!(
                    "{} is outside 1..={max} (pgvector's limit for this storage and index)",
                    self.dimension
                ),
            ));
        }
        if !(2..=100).contains(&self.index.m) {
            return Err(ConfigError::invalid(
                "sinks.pgvector.index.m",
                format!("{} is outside pgvector's 2..=100", self.index.m),
            ));
        }
        if self.index.ef_construction < 2 * self.index.m || self.index.ef_construction > 1000 {
            return Err(ConfigError::invalid(
                "sinks.pgvector.index.ef_construction",
                format!(
                    "{} must be between 2 × m ({}) and 1000",
                    self.index.ef_construction,
                    2 * self.index.m
                ),
            ));
        }
        Ok(())
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
