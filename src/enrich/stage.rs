//! The enrichment stage as a task between bounded channels: batches by text count or by time,
//! runs the model on a blocking thread so the async workers keep reading sources, and keeps
//! event order.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Enricher, StoredHashes, cache_key};
use crate::dead_letter::DeadLetter;
use crate::event::ChangeEvent;

/// What leaves the stage: the events in order (embedded where a template applies) and the
/// events that could not be embedded, as dead letters.
#[derive(Debug)]
pub struct Enriched {
    pub events: Vec<ChangeEvent>,
    pub dead_letters: Vec<DeadLetter>,
}

/// [`run`] as a task of its own.
pub fn spawn<S: StoredHashes + Send + 'static>(
    enricher: Enricher,
    stored: Option<S>,
    input: mpsc::Receiver<Vec<ChangeEvent>>,
    output: mpsc::Sender<Enriched>,
    max_wait: Duration,
) -> JoinHandle<Enricher> {
    tokio::spawn(run(enricher, stored, input, output, max_wait))
}

/// Runs `enricher` over batches from `input` until it closes; returns the enricher (with its
/// stats) at the end. Partial batches wait at most `max_wait` for more texts. A panic of the
/// model is raised again here, so whoever supervises this task sees it.
pub async fn run<S: StoredHashes + Send + 'static>(
    mut enricher: Enricher,
    mut stored: Option<S>,
    mut input: mpsc::Receiver<Vec<ChangeEvent>>,
    output: mpsc::Sender<Enriched>,
    max_wait: Duration,
) -> Enricher {
    {
        while let Some(first) = input.recv().await {
            let mut events = first;
            let texts = |evs: &[ChangeEvent], en: &Enricher| {
                evs.iter().filter(|e| en.embeds(&e.source)).count()
            };
            let deadline = tokio::time::Instant::now() + max_wait;
            let mut closed = false;
            while texts(&events, &enricher) < enricher.max_batch {
                match tokio::time::timeout_at(deadline, input.recv()).await {
                    Ok(Some(more)) => events.extend(more),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let mut known = HashMap::new();
            if let Some(store) = stored.as_mut() {
                let unknown: Vec<(String, String, crate::event::Row)> = enricher
                    .unknown_keys(&events)
                    .into_iter()
                    .map(|e| {
                        let (s, k) = cache_key(e);
                        (s, k, e.key.clone())
                    })
                    .collect();
                for (source, key_text, key) in unknown {
                    if let Some(h) = store.stored_hash(&source, &key).await {
                        known.insert((source, key_text), h);
                    }
                }
            }
            let joined = tokio::task::spawn_blocking(move || {
                // Fault injection for the supervision tests (no-op unless built with `failpoints`).
                fail::fail_point!("enrich::embed");
                let dead = enricher.enrich(&mut events, &known);
                (enricher, events, dead)
            })
            .await;
            let (back, events, dead_letters) = match joined {
                Ok(r) => r,
                // The model panicked: nothing sensible can continue in this process.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            enricher = back;
            if output
                .send(Enriched {
                    events,
                    dead_letters,
                })
                .await
                .is_err()
                || closed
            {
                break;
            }
        }
        enricher
    }
}
