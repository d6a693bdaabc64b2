//! Supervision: every stage task of a run in one [`JoinSet`], known by name.
//!
//! A stage that panics, returns an error, or ends while the run still needs it is reported by
//! [`Supervisor::next`] with its name and cause; the pipeline then stops the run with a non-zero
//! exit. Nothing is lost by that: positions are acknowledged only once durable, so whatever was
//! in flight is delivered again after a restart.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};

use super::PipelineError;

/// How a stage ended.
#[derive(Debug)]
pub enum Ended<T> {
    /// Returned normally, with its output.
    Finished(T),
    /// Returned an error.
    Failed(PipelineError),
    /// Panicked; the panic's message.
    Panicked(String),
    /// Aborted by [`Supervisor::abort_all`].
    Cancelled,
}

pub struct Supervisor<T> {
    tasks: JoinSet<Result<T, PipelineError>>,
    names: HashMap<Id, String>,
}

impl<T: Send + 'static> Supervisor<T> {
    pub fn new() -> Self {
        Supervisor {
            tasks: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    /// Runs `stage` as a task named `name`.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        stage: impl Future<Output = Result<T, PipelineError>> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(stage);
        self.names.insert(handle.id(), name.into());
    }

    /// The next stage to end, with its name; `None` when none is left.
    pub async fn next(&mut self) -> Option<(String, Ended<T>)> {
        let joined = self.tasks.join_next_with_id().await?;
        Some(match joined {
            Ok((id, Ok(out))) => (self.name(id), Ended::Finished(out)),
            Ok((id, Err(e))) => (self.name(id), Ended::Failed(e)),
            Err(e) => {
                let name = self.name(e.id());
                if e.is_panic() {
                    (name, Ended::Panicked(panic_message(e.into_panic())))
                } else {
                    (name, Ended::Cancelled)
                }
            }
        })
    }

    /// Whether no stage is left.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Cancels every stage still running.
    pub fn abort_all(&mut self) {
        self.tasks.abort_all();
    }

    fn name(&mut self, id: Id) -> String {
        self.names
            .remove(&id)
            .unwrap_or_else(|| "an unnamed stage".into())
    }
}

/// The text a panic was raised with (`panic!("…")` gives a `&str` or a `String`).
pub(super) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "a panic without a message".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_the_stage_that_panicked_failed_or_finished() {
        let mut s: Supervisor<u32> = Supervisor::new();
        s.spawn("enrich", async {
            let exploded = true;
            assert!(!exploded, "model exploded");
            Ok(0)
        });
        let (name, ended) = s.next().await.unwrap();
        assert_eq!(name, "enrich");
        assert!(
            matches!(&ended, Ended::Panicked(m) if m == "model exploded"),
            "{ended:?}"
        );

        s.spawn("sinks", async {
            Err(PipelineError::Config("bad key".into()))
        });
        let (name, ended) = s.next().await.unwrap();
        assert_eq!(name, "sinks");
        assert!(matches!(&ended, Ended::Failed(PipelineError::Config(m)) if m == "bad key"));

        s.spawn("batcher", async { Ok(7) });
        assert!(matches!(s.next().await, Some((n, Ended::Finished(7))) if n == "batcher"));
        assert!(s.is_empty());
        assert!(s.next().await.is_none());
    }
}
