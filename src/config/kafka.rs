//! `[sources.kafka]`: the Kafka consumer source (brokers, group, topics and their message
//! formats and column types, the dead-letter destination), and the librdkafka properties built
//! from it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::DeadLetterConfig;
use super::{ConfigError, parse_properties};
use crate::secret::{Secret, SecretMap};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// `host:port,host:port`; may instead come from `client_properties` (`bootstrap.servers`).
    pub brokers: Option<String>,
    /// A Confluent-style `client.properties` file whose keys are librdkafka properties.
    pub client_properties: Option<PathBuf>,
    pub group_id: String,
    #[serde(default)]
    pub start: StartFrom,
    pub topics: Vec<TopicConfig>,
    /// Any librdkafka property; overrides `client_properties`.
    #[serde(default)]
    pub properties: SecretMap,
    /// A message value larger than this goes to the dead-letter destination.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// How long a revoke (or shutdown) waits for in-flight events of the revoked partitions to
    /// become durable before releasing them; must be shorter than `session.timeout.ms`.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// How often acknowledged offsets are committed to the group.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// How many tasks decode messages in parallel (their output is put back in order); default:
    /// the number of cores, at most 4.
    #[serde(default)]
    pub decode_tasks: Option<usize>,
    /// The Confluent Schema Registry the `avro`, `json_schema` and `protobuf` topics' schemas
    /// come from.
    #[serde(default)]
    pub schema_registry: Option<SchemaRegistryConfig>,
    /// Where undecodable messages go (until the Delta `_dlq` table takes over).
    #[serde(default)]
    /// The run's dead-letter destination in its older place (see [`super::DeadLetterConfig`]).
    pub dead_letter: Option<DeadLetterConfig>,
}

fn default_max_message_bytes() -> usize {
    1024 * 1024
}

fn default_drain_timeout_ms() -> u64 {
    5_000
}

fn default_commit_interval_ms() -> u64 {
    1_000
}

/// librdkafka's default `session.timeout.ms`.
const DEFAULT_SESSION_TIMEOUT_MS: u64 = 45_000;

/// The type a JSON topic declares for a column; a value of another JSON type is a dead letter.
///
/// A number is never given a unit by guessing: `timestamptz` and `date` take only text, and a
/// number in them is a dead letter that names the types that say the unit
/// (`timestamptz_millis`/`_micros`/`_nanos`, `date_days`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Bool,
    Int32,
    Int64,
    Float64,
    /// A decimal kept as exact text (a JSON number or a numeric string).
    Numeric,
    Text,
    Uuid,
    /// An RFC 3339 timestamp string (a number is a dead letter: its unit is unknown).
    Timestamptz,
    /// Milliseconds since the Unix epoch (UTC), or an RFC 3339 string.
    TimestamptzMillis,
    /// Microseconds since the Unix epoch (UTC), or an RFC 3339 string.
    TimestamptzMicros,
    /// Nanoseconds since the Unix epoch (UTC), or an RFC 3339 string.
    TimestamptzNanos,
    /// An ISO 8601 date string, `YYYY-MM-DD` (a number is a dead letter: its unit is unknown).
    Date,
    /// Days since the Unix epoch, or a `YYYY-MM-DD` string.
    DateDays,
    Json,
}

impl ColumnType {
    /// The type as the configuration spells it (`timestamptz_micros`).
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Bool => "bool",
            ColumnType::Int32 => "int32",
            ColumnType::Int64 => "int64",
            ColumnType::Float64 => "float64",
            ColumnType::Numeric => "numeric",
            ColumnType::Text => "text",
            ColumnType::Uuid => "uuid",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::TimestamptzMillis => "timestamptz_millis",
            ColumnType::TimestamptzMicros => "timestamptz_micros",
            ColumnType::TimestamptzNanos => "timestamptz_nanos",
            ColumnType::Date => "date",
            ColumnType::DateDays => "date_days",
            ColumnType::Json => "json",
        }
    }
}

impl std::fmt::Display for ColumnType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    #[serde(default)]
    pub format: MessageFormat,
    /// Columns of the message value that form the key; empty means the Kafka message key.
    #[serde(default)]
    pub key_columns: Vec<String>,
    /// Declared column types (`json`/`debezium`); undeclared columns are typed from the JSON, or
    /// by the Kafka Connect schema of a Debezium envelope that carries one. Declared types win.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnType>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageFormat {
    /// A JSON object per message.
    #[default]
    Json,
    /// A Debezium JSON change envelope, with or without the `schema`/`payload` wrapper.
    Debezium,
    /// The bytes as they are.
    Raw,
    /// Confluent Schema Registry framed Avro: magic byte 0, a 4-byte big-endian schema id, then
    /// the Avro binary datum written with that schema (a Debezium envelope is recognised too).
    Avro,
    /// Confluent Schema Registry framed JSON: magic byte 0, a 4-byte schema id, then a JSON
    /// object checked against that JSON Schema's declared types and `required` properties.
    JsonSchema,
    /// Confluent Schema Registry framed Protobuf: the header, the message indexes, then the
    /// message, decoded by the schema's descriptor.
    Protobuf,
}

impl MessageFormat {
    /// Whether messages carry a Schema Registry id to fetch their schema by.
    pub fn uses_registry(self) -> bool {
        matches!(
            self,
            MessageFormat::Avro | MessageFormat::JsonSchema | MessageFormat::Protobuf
        )
    }
}

/// `[sources.kafka.schema_registry]`. Every key may instead come from the `client_properties`
/// file as Confluent Cloud writes it (`schema.registry.url`, `basic.auth.user.info=KEY:SECRET`);
/// keys set here win. Use `${VAR}` to take the secret from the environment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// `https://psrc-….confluent.cloud`, `http://127.0.0.1:8081`.
    pub url: Option<String>,
    /// Basic-auth user (a Confluent Cloud Schema Registry API key).
    pub username: Option<String>,
    /// Basic-auth password (the API secret); never logged.
    pub password: Option<Secret>,
    /// Per-request timeout.
    #[serde(default = "default_registry_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_registry_timeout_ms() -> u64 {
    10_000
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        SchemaRegistryConfig {
            url: None,
            username: None,
            password: None,
            timeout_ms: default_registry_timeout_ms(),
        }
    }
}

/// The registry to use, resolved from the section and the properties file.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrySettings {
    pub url: url::Url,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub timeout: std::time::Duration,
}

/// Keys of a `client.properties` file meant for Schema Registry clients, not for librdkafka.
pub fn is_registry_property(key: &str) -> bool {
    key.starts_with("schema.registry.") || key.starts_with("basic.auth.")
}

impl KafkaSourceConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.topics.is_empty() {
            return Err(ConfigError::invalid(
                "sources.kafka.topics",
                "list at least one topic ([[sources.kafka.topics]] name = \"orders\")",
            ));
        }
        if self.group_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                "sources.kafka.group_id",
                "must not be empty",
            ));
        }
        for (i, t) in self.topics.iter().enumerate() {
            let valid = !t.name.is_empty()
                && t.name.len() <= 249
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !valid {
                return Err(ConfigError::invalid(
                    format!("sources.kafka.topics[{i}].name"),
                    format!("{:?} is not a valid Kafka topic name", t.name),
                ));
            }
        }
        let props = self.client_properties()?;
        self.registry()?;
        let has_brokers = self
            .brokers
            .as_deref()
            .is_some_and(|b| !b.trim().is_empty())
            || props.contains_key("bootstrap.servers")
            || self.properties.get("bootstrap.servers").is_some();
        if !has_brokers {
            return Err(ConfigError::invalid(
                "sources.kafka.brokers",
                "missing: set `brokers`, or `bootstrap.servers` in `properties` or in the \
                 `client_properties` file",
            ));
        }
        self.validate_consumer_settings()
    }

    /// The Schema Registry settings; `None` when no topic needs one. An `avro` or `json_schema`
    /// topic without a registry URL is an error naming the key.
    pub fn registry(&self) -> Result<Option<RegistrySettings>, ConfigError> {
        let key = "sources.kafka.schema_registry.url";
        let Some(topic) = self.topics.iter().position(|t| t.format.uses_registry()) else {
            return Ok(None);
        };
        let file = self.client_properties()?;
        let section = self.schema_registry.clone().unwrap_or_default();
        let Some(raw) = section
            .url
            .clone()
            .or_else(|| file.get("schema.registry.url").cloned())
            .filter(|u| !u.trim().is_empty())
        else {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "missing: topic sources.kafka.topics[{topic}] has a Schema Registry format; \
                     set `url` in [sources.kafka.schema_registry] or `schema.registry.url` in the \
                     client_properties file"
                ),
            ));
        };
        // A URL list (`http://a,http://b`) is allowed by Confluent clients: the first is used.
        let first = raw.split(',').next().unwrap_or_default().trim();
        let url = url::Url::parse(first)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                ConfigError::invalid(key, "must be an http:// or https:// URL with a host")
            })?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ConfigError::invalid(
                key,
                "must not carry credentials: set `username` and `password` instead",
            ));
        }
        let (mut username, mut password) = (section.username, section.password);
        if let Some(info) = file
            .get("basic.auth.user.info")
            .or_else(|| file.get("schema.registry.basic.auth.user.info"))
            && let Some((user, secret)) = info.split_once(':')
        {
            username.get_or_insert_with(|| user.to_owned());
            password.get_or_insert_with(|| Secret::new(secret));
        }
        if password.is_some() && username.is_none() {
            return Err(ConfigError::invalid(
                "sources.kafka.schema_registry.username",
                "missing: a password is set, so basic auth needs its user",
            ));
        }
        if section.timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "sources.kafka.schema_registry.timeout_ms",
                "must be greater than 0",
            ));
        }
        Ok(Some(RegistrySettings {
            url,
            username,
            password,
            timeout: std::time::Duration::from_millis(section.timeout_ms),
        }))
    }

    /// `decode_tasks`, or its default.
    pub fn decode_tasks(&self) -> usize {
        self.decode_tasks
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
            .max(1)
    }

    fn validate_consumer_settings(&self) -> Result<(), ConfigError> {
        if self.decode_tasks == Some(0) {
            return Err(ConfigError::invalid(
                "sources.kafka.decode_tasks",
                "must be greater than 0",
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError::invalid(
                "sources.kafka.max_message_bytes",
                "must be greater than 0",
            ));
        }
        if self.commit_interval_ms == 0 {
            return Err(ConfigError::invalid(
                "sources.kafka.commit_interval_ms",
                "must be greater than 0",
            ));
        }
        let session = self.session_timeout_ms()?;
        if self.drain_timeout_ms == 0 || self.drain_timeout_ms >= session {
            return Err(ConfigError::invalid(
                "sources.kafka.drain_timeout_ms",
                format!(
                    "{} must be above 0 and below session.timeout.ms ({session}): a revoke that \
                     drains longer than the session is expelled from the group",
                    self.drain_timeout_ms
                ),
            ));
        }
        for key in ["enable.auto.commit", "enable.auto.offset.store"] {
            if self.properties.get(key).is_some_and(|v| v.trim() == "true") {
                return Err(ConfigError::invalid(
                    format!("sources.kafka.properties.{key:?}"),
                    "must stay false: offsets are committed only once events are durable",
                ));
            }
        }
        if let Some(d) = &self.dead_letter {
            d.validate("sources.kafka.dead_letter")?;
        }
        for (i, t) in self.topics.iter().enumerate() {
            if t.format == MessageFormat::Raw
                && (!t.key_columns.is_empty() || !t.columns.is_empty())
            {
                return Err(ConfigError::invalid(
                    format!("sources.kafka.topics[{i}].format"),
                    "`raw` messages have no columns: remove `key_columns` and `columns`",
                ));
            }
            if t.format.uses_registry() && !t.columns.is_empty() {
                return Err(ConfigError::invalid(
                    format!("sources.kafka.topics[{i}].columns"),
                    "the column types of a Schema Registry topic come from its schemas: remove \
                     `columns`",
                ));
            }
        }
        Ok(())
    }

    /// `session.timeout.ms` as librdkafka will see it (properties, then the properties file).
    pub fn session_timeout_ms(&self) -> Result<u64, ConfigError> {
        let file = self.client_properties()?;
        let raw = self
            .properties
            .get("session.timeout.ms")
            .or(file.get("session.timeout.ms").map(String::as_str));
        match raw {
            None => Ok(DEFAULT_SESSION_TIMEOUT_MS),
            Some(v) => v.trim().parse().map_err(|_| {
                ConfigError::invalid(
                    "sources.kafka.properties.\"session.timeout.ms\"",
                    format!("{v:?} is not a number of milliseconds"),
                )
            }),
        }
    }

    /// The librdkafka properties to use: the `client_properties` file, then `properties`, then
    /// `brokers` and `group_id` on top.
    pub fn librdkafka_properties(&self) -> Result<SecretMap, ConfigError> {
        let mut all = self.client_properties()?;
        // Confluent's client.properties carries the registry's keys too: they are not librdkafka's.
        all.retain(|k, _| !is_registry_property(k));
        all.extend(self.properties.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(b) = &self.brokers {
            all.insert("bootstrap.servers".into(), b.clone());
        }
        all.insert("group.id".into(), self.group_id.clone());
        // Offsets move only when the pipeline says the events are durable.
        all.insert("enable.auto.commit".into(), "false".into());
        all.insert("enable.auto.offset.store".into(), "false".into());
        all.insert(
            "auto.offset.reset".into(),
            match self.start {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            }
            .into(),
        );
        Ok(SecretMap(all))
    }

    fn client_properties(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let Some(path) = &self.client_properties else {
            return Ok(BTreeMap::new());
        };
        let key = "sources.kafka.client_properties";
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::invalid(key, format!("cannot read {}: {e}", path.display()))
        })?;
        parse_properties(&text)
            .map_err(|m| ConfigError::invalid(key, format!("{}: {m}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> KafkaSourceConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_registry_topic_needs_a_registry_url_and_credentials_come_from_client_properties() {
        let c = parse(
            "brokers = \"b:9092\"\ngroup_id = \"g\"\n[[topics]]\nname = \"t\"\nformat = \"avro\"\n",
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("sources.kafka.schema_registry.url"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client.properties");
        std::fs::write(
            &file,
            "bootstrap.servers=b:9092\nschema.registry.url=https://sr.example:443\n\
             basic.auth.credentials.source=USER_INFO\nbasic.auth.user.info=KEY:sr-secret\n",
        )
        .unwrap();
        let c = parse(&format!(
            "client_properties = {:?}\ngroup_id = \"g\"\n[[topics]]\nname = \"t\"\n\
             format = \"json_schema\"\n",
            file.display()
        ));
        c.validate().unwrap();
        let r = c.registry().unwrap().unwrap();
        assert_eq!(r.url.as_str(), "https://sr.example/");
        assert_eq!(r.username.as_deref(), Some("KEY"));
        assert_eq!(r.password.as_ref().map(Secret::expose), Some("sr-secret"));
        assert!(!format!("{r:?}").contains("sr-secret"));
        // The registry's keys are not librdkafka's.
        let props = c.librdkafka_properties().unwrap();
        assert!(props.iter().all(|(k, _)| !is_registry_property(k)));

        let c = parse(
            "brokers = \"b:9092\"\ngroup_id = \"g\"\n[schema_registry]\n\
             url = \"https://u:p@sr.example\"\n[[topics]]\nname = \"t\"\nformat = \"avro\"\n",
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("must not carry credentials") && !e.contains("u:p"),
            "{e}"
        );
    }
}
