//! The one retry policy, driven by an error's [`ErrorKind`]:
//!
//! | kind         | what happens                                                                |
//! |--------------|-----------------------------------------------------------------------------|
//! | `Connection` | retried with exponential backoff and jitter; readiness is red meanwhile     |
//! | `Data`       | not retried: the event becomes a dead letter and the run continues          |
//! | `Config`     | not retried: the run stops, and the message names the key or grant to fix  |
//!
//! Two patiences share the same curve (200 ms doubling to a cap, with jitter): a sink write or
//! commit gives up after about 15 minutes, so a store that stays away stops the run (a restart
//! resumes from what is durable) instead of hiding the outage; a source's connection to its own
//! server is retried until the server is back (the server keeps the WAL or the log meanwhile).
//! Every stage uses [`Retry`] for its loops or [`backoff`] with `backon`'s `Retryable`.

use std::fmt::Display;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::error::{Classify, ErrorKind};
use crate::telemetry::health::SinkHealth;

/// How long a stage keeps retrying a connection error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// A sink's write or commit, a dead-letter write: ~15 minutes (36 attempts up to 30 s apart).
    Bounded,
    /// A source's connection to its server: until it is back (10 s apart at most).
    Unbounded,
}

/// The backoff curve for `patience`, for `backon`'s `Retryable`.
pub fn backoff(patience: Patience) -> ExponentialBuilder {
    let curve = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_jitter();
    match patience {
        Patience::Bounded => curve
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(36),
        Patience::Unbounded => curve
            .with_max_delay(Duration::from_secs(10))
            .without_max_times(),
    }
}

/// What a stage does after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Retry,
    DeadLetter,
    Stop,
}

/// The policy table: what an error of `kind` means.
pub fn directive(kind: ErrorKind) -> Directive {
    match kind {
        ErrorKind::Connection => Directive::Retry,
        ErrorKind::Data => Directive::DeadLetter,
        ErrorKind::Config => Directive::Stop,
    }
}

/// A retry loop's state: call [`Retry::after`] with each failed attempt's error.
///
/// ```ignore
/// let mut retry = Retry::new("pgvector batch", Patience::Bounded);
/// let outcome = loop {
///     match attempt().await {
///         Ok(o) => break o,
///         Err(e) => retry.after(e).await?, // sleeps, or gives the error back
///     }
/// };
/// ```
pub struct Retry {
    what: &'static str,
    delays: ExponentialBackoff,
    health: Option<SinkHealth>,
}

impl Retry {
    pub fn new(what: &'static str, patience: Patience) -> Self {
        Retry {
            what,
            delays: backoff(patience).build(),
            health: None,
        }
    }

    /// Reports every failed attempt to a sink's readiness (red until a commit succeeds).
    pub fn with_health(mut self, health: Option<&SinkHealth>) -> Self {
        self.health = health.cloned();
        self
    }

    /// After a failed attempt: a connection error with attempts left waits out the next delay
    /// and returns `Ok` (try again); anything else, or the last attempt, returns the error.
    pub async fn after<E: Classify + Display>(&mut self, error: E) -> Result<(), E> {
        if directive(error.kind()) != Directive::Retry {
            return Err(error);
        }
        let Some(delay) = self.delays.next() else {
            tracing::error!(error = %error, "{}: giving up after repeated failures", self.what);
            return Err(error);
        };
        if let Some(h) = &self.health {
            h.commit_failed(&error);
        }
        tracing::warn!(error = %error, retry_in = ?delay, "{} failed; retrying", self.what);
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(ErrorKind);

    impl Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    impl Classify for E {
        fn kind(&self) -> ErrorKind {
            self.0
        }
    }

    #[tokio::test]
    async fn data_and_config_errors_are_not_retried() {
        let mut r = Retry::new("test", Patience::Bounded);
        assert!(r.after(E(ErrorKind::Data)).await.is_err());
        assert!(r.after(E(ErrorKind::Config)).await.is_err());
    }

    #[test]
    fn bounded_patience_gives_up_after_about_a_quarter_hour() {
        let delays: Vec<Duration> = backoff(Patience::Bounded).build().collect();
        assert_eq!(delays.len(), 36);
        let total: Duration = delays.iter().sum();
        // Jitter adds up to one delay again to each.
        assert!(total >= Duration::from_secs(14 * 60), "{total:?}");
        assert!(total <= Duration::from_secs(2 * 17 * 60), "{total:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(60)));
        let mut unbounded = backoff(Patience::Unbounded).build();
        assert!(unbounded.nth(1_000).is_some());
    }

    #[test]
    fn the_policy_table() {
        assert_eq!(directive(ErrorKind::Connection), Directive::Retry);
        assert_eq!(directive(ErrorKind::Data), Directive::DeadLetter);
        assert_eq!(directive(ErrorKind::Config), Directive::Stop);
    }
}
