//! Tributary: streaming change-data-capture from PostgreSQL and Kafka into Bronze Delta tables
//! and a pgvector index, with embeddings computed in-process.
//!
//! The data path, stage by stage (see `DESIGN.md`):
//! source (`postgres`, `kafka`) → [`event::ChangeEvent`] → enrich → sinks (`delta`, `pgvector`),
//! wired by the pipeline, which acknowledges a position to its source only once every sink has
//! durably committed everything up to it.

pub mod check;
pub mod checkpoint;
pub mod config;
pub mod dead_letter;
pub mod enrich;
pub mod error;
pub mod event;
pub mod pg;
pub mod pipeline;
pub mod secret;
pub mod sink;
pub mod source;
pub mod status;
pub mod storage;
pub mod telemetry;
