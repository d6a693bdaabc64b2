//! The connector's TOML configuration: what to read, how to embed, where to write.
//!
//! Loading is three steps, each of which names the key it rejects:
//! 1. parse TOML (syntax errors give line and column, never the offending line: it may hold a
//!    password);
//! 2. interpolate `${VAR}` and `${VAR:-default}` in every string from the environment (`$${`
//!    writes a literal `${`); an unset variable without a default is an error at its key;
//! 3. deserialize into typed structs that reject unknown keys, then validate values that types
//!    cannot (URI schemes, slot names, template syntax, references between sections).
//!
//! Secrets are held in [`crate::secret`] types, so `format!("{config:?}")` never shows them.
//!
//! Each section is a module here that validates its own keys; [`Config`] checks that there is at
//! least one source and one sink, and hands the configured source names to the sections whose
//! keys name sources (embedding templates, pgvector tables).

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod dead_letter;
mod delta;
mod embedding;
mod kafka;
mod pgvector;
mod pipeline;
mod postgres;
mod raw;
mod syntax;
mod telemetry;
mod validate;

pub use dead_letter::DeadLetterConfig;
pub use delta::{DELTA_SCHEMES, DeltaSinkConfig};
pub use embedding::{ChunkStore, ChunkingConfig, EmbeddingConfig, Pooling};
pub use kafka::{
    ColumnType, KafkaSourceConfig, MessageFormat, RegistrySettings, SchemaRegistryConfig,
    StartFrom, TopicConfig,
};
pub(crate) use pgvector::truncate;
pub use pgvector::{Distance, PgvectorSinkConfig, VectorIndexConfig};
pub use pipeline::PipelineConfig;
pub use postgres::{PostgresSourceConfig, SlotLostPolicy, SnapshotMode};
pub use raw::interpolate_str;
use raw::{interpolate, sanitize_serde_message, syntax_error};
pub use syntax::{TemplatePart, parse_properties, parse_table_name, parse_template};
pub use telemetry::TelemetryConfig;

/// A configuration problem, naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// A key holds a value Tributary cannot use. `key` is the dotted path (`sinks.delta.uri`).
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The dotted key path the error is about, when it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this connector: prefixes Delta `txn` app ids and default slot/group names.
    pub name: String,
    pub sources: SourcesConfig,
    #[serde(default)]
    pub embedding: Option<EmbeddingConfig>,
    pub sinks: SinksConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Where everything the run cannot process goes (see [`DeadLetterConfig`]).
    #[serde(default)]
    pub dead_letter: Option<DeadLetterConfig>,
}

/// `[sources]`: at least one of `postgres` and `kafka`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    pub postgres: Option<PostgresSourceConfig>,
    pub kafka: Option<KafkaSourceConfig>,
}

/// `[sinks]`: at least one of `delta` and `pgvector`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    pub delta: Option<DeltaSinkConfig>,
    pub pgvector: Option<PgvectorSinkConfig>,
}

impl Config {
    /// Reads and validates `path`, interpolating from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base, |name| std::env::var(name).ok())
    }

    /// Parses and validates `text`. `base_dir` anchors relative paths; `env` looks up variables.
    pub fn parse(
        text: &str,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        interpolate(&mut value, &mut Vec::new(), &env)?;
        let mut config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.inner().to_string();
            // toml appends "\nin `a.b`": the path is already in front.
            let inner = inner.split("\nin `").next().unwrap_or_default();
            let message = sanitize_serde_message(inner.trim());
            ConfigError::invalid(
                if path == "." {
                    "(top level)".into()
                } else {
                    path
                },
                message,
            )
        })?;
        config.resolve_paths(base_dir);
        config.validate()?;
        Ok(config)
    }

    /// The configured dead-letter destination and the key it was given at: `[dead_letter]`, or
    /// its older place `sources.kafka.dead_letter`; `None` means the Delta `_dlq` table (or,
    /// without `[sinks.delta]`, nowhere).
    pub fn dead_letter_config(&self) -> Option<(&'static str, &DeadLetterConfig)> {
        if let Some(d) = &self.dead_letter {
            return Some(("dead_letter", d));
        }
        let legacy = self.sources.kafka.as_ref()?.dead_letter.as_ref()?;
        Some(("sources.kafka.dead_letter", legacy))
    }

    fn resolve_paths(&mut self, base: &Path) {
        if let Some(p) = self.dead_letter.as_mut().and_then(|d| d.path.as_mut())
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
        if let Some(k) = &mut self.sources.kafka {
            if let Some(p) = &mut k.client_properties
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
            if let Some(p) = k.dead_letter.as_mut().and_then(|d| d.path.as_mut())
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        if let Some(e) = &mut self.embedding
            && e.model_dir.is_relative()
        {
            e.model_dir = base.join(&e.model_dir);
        }
        if let Some(d) = &mut self.sinks.delta
            && !d.uri.contains("://")
            && Path::new(&d.uri).is_relative()
        {
            d.uri = base.join(&d.uri).to_string_lossy().into_owned();
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::invalid(
                "name",
                format!(
                    "{:?} must be non-empty ASCII letters, digits, '-', '_' or '.'",
                    self.name
                ),
            ));
        }
        self.telemetry.validate()?;
        self.pipeline.validate()?;
        if self.sources.postgres.is_none() && self.sources.kafka.is_none() {
            return Err(ConfigError::invalid(
                "sources",
                "configure at least one of [sources.postgres] or [sources.kafka]",
            ));
        }
        if self.sinks.delta.is_none() && self.sinks.pgvector.is_none() {
            return Err(ConfigError::invalid(
                "sinks",
                "configure at least one of [sinks.delta] or [sinks.pgvector]",
            ));
        }
        if let Some(pg) = &self.sources.postgres {
            pg.validate()?;
        }
        if let Some(k) = &self.sources.kafka {
            k.validate()?;
        }
        if let Some(d) = &self.dead_letter {
            d.validate("dead_letter")?;
            if self
                .sources
                .kafka
                .as_ref()
                .is_some_and(|k| k.dead_letter.is_some())
            {
                return Err(ConfigError::invalid(
                    "dead_letter",
                    "also given as sources.kafka.dead_letter (its older place): keep one",
                ));
            }
            if d.topic.is_some() && self.sources.kafka.is_none() {
                return Err(ConfigError::invalid(
                    "dead_letter.topic",
                    "needs [sources.kafka]: the topic lives on its cluster, with its settings",
                ));
            }
        }
        // Templates and pgvector tables are checked against the sources configured above.
        let known = self.known_sources();
        if let Some(e) = &self.embedding {
            e.validate(known.as_deref())?;
        }
        if let Some(d) = &self.sinks.delta {
            d.validate()?;
        }
        if let Some(p) = &self.sinks.pgvector {
            p.validate(known.as_deref())?;
        }
        Ok(())
    }

    /// Every source name, when the configuration lists them all (`None` when a whole Postgres
    /// schema is published and the tables are only known at run time).
    pub fn known_sources(&self) -> Option<Vec<String>> {
        let mut names = Vec::new();
        if let Some(pg) = &self.sources.postgres {
            if pg.tables.is_empty() {
                return None;
            }
            for t in &pg.tables {
                let (schema, table) = parse_table_name(t).ok()?;
                names.push(format!("{schema}.{table}"));
            }
        }
        if let Some(k) = &self.sources.kafka {
            names.extend(k.topics.iter().map(|t| t.name.clone()));
        }
        Some(names)
    }
}

/// The serde default of the boolean settings that are on unless turned off.
fn default_true() -> bool {
    true
}
