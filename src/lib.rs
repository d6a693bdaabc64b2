//! Tributary: streaming change-data-capture from PostgreSQL and Kafka into Bronze Delta tables
//! and a pgvector index, with embeddings computed in-process.
//!
//! The data path, stage by stage: a [`source::Source`] (`postgres`, `kafka`) →
//! [`event::ChangeEvent`] → [`enrich`] → every [`sink::Sink`] (`delta`, `pgvector`), wired and
//! supervised by [`pipeline`], which acknowledges a position to its source only once every sink
//! has durably committed everything up to it ([`checkpoint`]). What an error means (retry,
//! dead letter, stop) is [`retry`]'s table over [`error::ErrorKind`]; what cannot be processed
//! goes to the run's one [`dead_letter`] destination.

pub mod check;
pub mod checkpoint;
pub mod config;
pub mod dead_letter;
pub mod enrich;
pub mod error;
pub mod event;
pub mod pg;
pub mod pipeline;
pub mod retry;
pub mod secret;
pub mod sink;
pub mod source;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod verify;
