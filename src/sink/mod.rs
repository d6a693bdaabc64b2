//! Sinks: where events end up. Each sink's write returns only once the data is durable there,
//! and each reports the positions it already holds, so the pipeline knows where to resume.

pub mod delta;
pub mod pgvector;
