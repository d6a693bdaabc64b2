//! Readiness that watches the loop, not the process.
//!
//! A peer's probe that only checks "the process is up" stays green through hours-long replication
//! stalls. Here every source must *prove* progress — an event, or a keepalive answered — within
//! the configured window, and every sink's last commit attempt must have succeeded; otherwise
//! `/readyz` is red and says which component is behind and why.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug)]
enum State {
    /// `blocked`: why the source cannot make progress right now (readiness is red meanwhile).
    Source {
        last_progress: Instant,
        blocked: Option<String>,
    },
    Sink {
        last_error: Option<String>,
    },
}

/// Shared health registry; cheap to clone.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Mutex<BTreeMap<String, State>>>,
    window: Duration,
}

/// One component's readiness line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentStatus {
    pub name: String,
    pub ready: bool,
    pub detail: String,
}

impl Health {
    /// `window`: how long a source may go without progress before it counts as stalled.
    pub fn new(window: Duration) -> Self {
        Health {
            inner: Arc::default(),
            window,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, State>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a source; it counts as having made progress now.
    pub fn source(&self, name: impl Into<String>) -> SourceHealth {
        let name = name.into();
        self.lock().insert(
            name.clone(),
            State::Source {
                last_progress: Instant::now(),
                blocked: None,
            },
        );
        SourceHealth {
            health: self.clone(),
            name,
        }
    }

    /// Registers a sink; it is ready until a commit attempt fails.
    pub fn sink(&self, name: impl Into<String>) -> SinkHealth {
        let name = name.into();
        self.lock()
            .insert(name.clone(), State::Sink { last_error: None });
        SinkHealth {
            health: self.clone(),
            name,
        }
    }

    /// Every component's status, in name order.
    pub fn statuses(&self) -> Vec<ComponentStatus> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|(name, state)| {
                let (ready, detail) = match state {
                    State::Source {
                        blocked: Some(reason),
                        ..
                    } => (false, reason.clone()),
                    State::Source {
                        last_progress,
                        blocked: None,
                    } => {
                        let idle = now.saturating_duration_since(*last_progress);
                        if idle <= self.window {
                            (true, format!("progress {:.1}s ago", idle.as_secs_f64()))
                        } else {
                            (
                                false,
                                format!(
                                    "no progress or keepalive for {:.1}s (window {:.1}s)",
                                    idle.as_secs_f64(),
                                    self.window.as_secs_f64()
                                ),
                            )
                        }
                    }
                    State::Sink { last_error: None } => (true, "last commit succeeded".into()),
                    State::Sink {
                        last_error: Some(e),
                    } => (false, format!("last commit failed: {e}")),
                };
                ComponentStatus {
                    name: name.clone(),
                    ready,
                    detail,
                }
            })
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.statuses().iter().all(|s| s.ready)
    }
}

/// A source's handle: call [`SourceHealth::progress`] on every event batch and keepalive.
#[derive(Debug, Clone)]
pub struct SourceHealth {
    health: Health,
    name: String,
}

impl SourceHealth {
    pub fn progress(&self) {
        if let Some(State::Source { last_progress, .. }) = self.health.lock().get_mut(&self.name) {
            *last_progress = Instant::now();
        }
    }

    /// The source waits on something outside its own server (the Schema Registry): readiness
    /// is red with `reason` (free of secrets) until [`SourceHealth::unblocked`].
    pub fn blocked(&self, reason: impl std::fmt::Display) {
        if let Some(State::Source { blocked, .. }) = self.health.lock().get_mut(&self.name) {
            *blocked = Some(reason.to_string());
        }
    }

    pub fn unblocked(&self) {
        if let Some(State::Source {
            blocked,
            last_progress,
        }) = self.health.lock().get_mut(&self.name)
            && blocked.take().is_some()
        {
            *last_progress = Instant::now();
        }
    }
}

/// A sink's handle: report each commit attempt's outcome.
#[derive(Debug, Clone)]
pub struct SinkHealth {
    health: Health,
    name: String,
}

impl SinkHealth {
    pub fn commit_succeeded(&self) {
        self.set(None);
    }

    /// `error` must already be free of secrets (stage errors are).
    pub fn commit_failed(&self, error: impl std::fmt::Display) {
        self.set(Some(error.to_string()));
    }

    fn set(&self, error: Option<String>) {
        if let Some(State::Sink { last_error }) = self.health.lock().get_mut(&self.name) {
            *last_error = error;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_sink_commit_turns_readiness_red_until_one_succeeds() {
        let h = Health::new(Duration::from_secs(60));
        let src = h.source("postgres");
        let sink = h.sink("delta");
        src.progress();
        assert!(h.is_ready());
        sink.commit_failed("object store unavailable");
        assert!(!h.is_ready());
        let s = h.statuses();
        assert_eq!(s[0].name, "delta");
        assert!(s[0].detail.contains("object store unavailable"));
        sink.commit_succeeded();
        assert!(h.is_ready());
    }

    #[test]
    fn a_source_without_progress_past_the_window_is_stalled() {
        let h = Health::new(Duration::ZERO);
        let src = h.source("kafka");
        std::thread::sleep(Duration::from_millis(5));
        assert!(!h.is_ready());
        assert!(h.statuses()[0].detail.contains("no progress"));
        let h = Health::new(Duration::from_secs(3600));
        let src2 = h.source("kafka");
        src2.progress();
        assert!(h.is_ready());
        drop(src);
    }
}
