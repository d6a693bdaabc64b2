//! What an error means for the pipeline: retry, dead-letter, or stop.
//!
//! Every stage's error type implements [`Classify`]. The pipeline retries [`ErrorKind::Connection`]
//! with backoff, sends the event behind an [`ErrorKind::Data`] error to the dead-letter destination
//! and goes on, and stops on [`ErrorKind::Config`] with the message, which says what to fix.

/// How the pipeline must react to an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Network, server restart, object store or broker unavailable: retry with backoff.
    Connection,
    /// One event (or message) cannot be processed: dead-letter it, keep going.
    Data,
    /// Configuration, permissions, missing extension/model: stop and tell the operator.
    Config,
}

/// Implemented by every stage's error type.
pub trait Classify {
    fn kind(&self) -> ErrorKind;

    fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Connection
    }
}
