//! Schema Registry formats: Confluent-framed Avro, JSON Schema and Protobuf messages, decoded by the schema
//! their id names, fetched from the registry's REST API (`GET /schemas/ids/{id}`) and compiled
//! once per id.
//!
//! Guarantees:
//! - **A transient registry outage is never a dead letter.** A connection error, a timeout, 408,
//!   429 or a 5xx is retried with backoff until the registry answers (the decode task waits, so the
//!   source stops handing out events and readiness turns red after its window); the messages are
//!   then decoded as usual, none lost and none dead-lettered. Shutdown interrupts the wait.
//! - **A message that cannot be decoded is a dead letter with the reason**: no magic byte, an id
//!   the registry does not know (404 with error code 40403), a schema of another type than the
//!   topic's format, a payload that does not match its schema.
//! - **Wrong credentials or a wrong URL stop the source** with an error naming the registry URL
//!   and the status (401/403, or a 404 that is not the registry's own "schema not found"), never
//!   the password: dead-lettering every message for a configuration mistake would lose nothing
//!   but bury the cause.
//! - Schema evolution: each message is decoded with its writer's schema; Bronze gets the row
//!   schema of that id, which the Delta sink evolves additively (a field added becomes a column).
//!
//! The client is a few requests over the reqwest already in the tree (through object_store):
//! `schema_registry_converter` would add a second TLS/HTTP configuration and its own decoders,
//! while only `GET /schemas/ids/{id}` is needed.

pub mod avro;
pub mod json_schema;
pub mod protobuf;
pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use backon::Retryable as _;

use crate::config::RegistrySettings;
use crate::retry::{Patience, backoff};
use crate::secret::Secret;
use crate::telemetry::health::SourceHealth;

/// A schema as the decoder uses it.
#[derive(Debug)]
pub enum Compiled {
    /// Boxed: a parsed Avro schema is several times larger than the other variants.
    Avro(Box<avro::AvroSchema>),
    Json(json_schema::JsonSchema),
    Protobuf(protobuf::ProtobufSchema),
    /// A schema the registry holds but that cannot be used (unsupported type, references, a
    /// schema that does not parse): every message naming it is a dead letter with this reason.
    Unusable(String),
}

/// The registry client and the schemas fetched so far (shared by every decode task).
pub struct Registry {
    http: reqwest::Client,
    base: url::Url,
    auth: Option<(String, Option<Secret>)>,
    cache: RwLock<HashMap<u32, Arc<Compiled>>>,
    /// The source's readiness: red while the registry is out of reach.
    health: Option<SourceHealth>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("url", &self.base.as_str())
            .field("user", &self.auth.as_ref().map(|a| &a.0))
            .finish_non_exhaustive()
    }
}

/// Why a schema could not be fetched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    /// Worth retrying: the registry is unreachable or overloaded.
    #[error("{0}")]
    Transient(String),
    /// Not worth retrying: wrong credentials or URL.
    #[error("{0}")]
    Fatal(String),
}

impl Registry {
    pub fn new(settings: &RegistrySettings, health: Option<SourceHealth>) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .build()
            .map_err(|e| format!("Schema Registry client: {e}"))?;
        let mut base = settings.url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(Registry {
            http,
            base,
            auth: settings
                .username
                .clone()
                .map(|u| (u, settings.password.clone())),
            cache: RwLock::default(),
            health,
        })
    }

    /// The compiled schema of `id`, if fetched (`None`: not yet, or the registry does not know it).
    pub fn cached(&self, id: u32) -> Option<Arc<Compiled>> {
        self.cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Makes sure the schema of `id` is cached, retrying transient failures with backoff until
    /// the registry answers. `Ok` also when the registry does not know the id (the message is
    /// then a dead letter); `Err` only for a fatal answer.
    /// `serialized`: ask for the serialized form (`?format=serialized`: a Protobuf schema as the
    /// base64 of its `FileDescriptorProto`, as Confluent's own deserializers do).
    pub async fn ensure(&self, id: u32, serialized: bool) -> Result<(), FetchError> {
        if self.cached(id).is_some() {
            return Ok(());
        }
        let url = self.base.as_str().to_owned();
        let fetched = (|| self.fetch(id, serialized))
            .retry(backoff(Patience::Unbounded))
            .when(|e| matches!(e, FetchError::Transient(_)))
            .notify(|e, wait| {
                tracing::warn!(registry = %url, schema_id = id, error = %e, ?wait,
                    "Schema Registry unavailable; retrying");
                if let Some(h) = &self.health {
                    h.blocked(format!("waiting for the Schema Registry: {e}"));
                }
            })
            .await;
        if let Some(h) = &self.health {
            h.unblocked();
        }
        let fetched = fetched?;
        if let Some(compiled) = fetched {
            self.cache
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, Arc::new(compiled));
        }
        Ok(())
    }

    /// One `GET /schemas/ids/{id}`; `None` when the registry does not know the id.
    async fn fetch(&self, id: u32, serialized: bool) -> Result<Option<Compiled>, FetchError> {
        let query = if serialized { "?format=serialized" } else { "" };
        let url = self
            .base
            .join(&format!("schemas/ids/{id}{query}"))
            .map_err(|e| FetchError::Fatal(format!("Schema Registry URL: {e}")))?;
        let mut request = self
            .http
            .get(url)
            .header("Accept", "application/vnd.schemaregistry.v1+json");
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, password.as_ref().map(Secret::expose));
        }
        let where_ = self.base.as_str();
        let response = request.send().await.map_err(|e| {
            // reqwest's text names the URL (which carries no credentials) and the cause.
            FetchError::Transient(format!("Schema Registry {where_}: {}", error_chain(&e)))
        })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            FetchError::Transient(format!("Schema Registry {where_}: reading the answer: {e}"))
        })?;
        let code = || {
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|j| j.get("error_code").and_then(serde_json::Value::as_i64))
        };
        match status.as_u16() {
            200 => Ok(Some(compile(id, &body))),
            404 if code().is_some_and(|c| c == 40403 || c == 40401) => Ok(None),
            401 | 403 => Err(FetchError::Fatal(format!(
                "Schema Registry {where_} refused the credentials (HTTP {status}): check \
                 sources.kafka.schema_registry.username and password"
            ))),
            404 => Err(FetchError::Fatal(format!(
                "Schema Registry {where_} answered HTTP 404 for /schemas/ids/{id} without a \
                 registry error code: is sources.kafka.schema_registry.url the registry's URL?"
            ))),
            408 | 429 | 500..=599 => Err(FetchError::Transient(format!(
                "Schema Registry {where_}: HTTP {status}"
            ))),
            _ => Err(FetchError::Fatal(format!(
                "Schema Registry {where_}: HTTP {status} for /schemas/ids/{id}"
            ))),
        }
    }
}

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The registry's answer for `id` compiled by its `schemaType`.
fn compile(id: u32, body: &[u8]) -> Compiled {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Answer {
        schema: String,
        #[serde(default)]
        schema_type: Option<String>,
        #[serde(default)]
        references: Vec<serde_json::Value>,
    }
    let answer: Answer = match serde_json::from_slice(body) {
        Ok(a) => a,
        Err(e) => {
            return Compiled::Unusable(format!(
                "schema id {id}: the registry's answer is not a schema: {e}"
            ));
        }
    };
    if !answer.references.is_empty() {
        return Compiled::Unusable(format!(
            "schema id {id} references {} other schema(s), which are not supported",
            answer.references.len()
        ));
    }
    match answer.schema_type.as_deref().unwrap_or("AVRO") {
        "AVRO" => avro::AvroSchema::parse(&answer.schema)
            .map(|s| Compiled::Avro(Box::new(s)))
            .unwrap_or_else(|e| Compiled::Unusable(format!("schema id {id}: {e}"))),
        "JSON" => json_schema::JsonSchema::parse(&answer.schema)
            .map(Compiled::Json)
            .unwrap_or_else(|e| Compiled::Unusable(format!("schema id {id}: {e}"))),
        "PROTOBUF" => protobuf::ProtobufSchema::parse(&answer.schema)
            .map(Compiled::Protobuf)
            .unwrap_or_else(|e| Compiled::Unusable(format!("schema id {id}: {e}"))),
        other => Compiled::Unusable(format!(
            "schema id {id} is a {other} schema, which is not supported"
        )),
    }
}

impl Compiled {
    /// The schema's type as the registry names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Compiled::Avro(_) => "AVRO",
            Compiled::Json(_) => "JSON",
            Compiled::Protobuf(_) => "PROTOBUF",
            Compiled::Unusable(_) => "unusable",
        }
    }
}
