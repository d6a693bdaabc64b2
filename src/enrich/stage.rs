//! The enrichment stage as a task between bounded channels: batches by text count or by time,
//! runs the model on a blocking thread so the async workers keep reading sources, and keeps
//! event order.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::toast::{self, Fetched, Tier};
use super::{Enricher, Lookups, cache_key};
use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Name};

/// What leaves the stage: the events in order (embedded where a template applies) and the
/// events that could not be embedded, as dead letters.
#[derive(Debug)]
pub struct Enriched {
    pub events: Vec<ChangeEvent>,
    pub dead_letters: Vec<DeadLetter>,
}

/// [`run`] as a task of its own.
pub fn spawn<S: Lookups + Send + 'static>(
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
pub async fn run<S: Lookups + Send + 'static>(
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
            let mut fetched = Fetched::new();
            if let Some(store) = stored.as_mut() {
                for need in enricher.toast_needs(&events) {
                    let found = fetch(store, &need).await;
                    if let Some(h) = found.1 {
                        known.insert(need.row.clone(), h);
                    }
                    fetched.insert(need.row, found.0);
                }
                let unknown: Vec<(String, String, crate::event::Row)> = enricher
                    .unknown_keys(&events)
                    .into_iter()
                    .map(|e| {
                        let (s, k) = cache_key(e);
                        (s, k, e.key.clone())
                    })
                    .filter(|(s, k, _)| !fetched.contains_key(&(s.clone(), k.clone())))
                    .collect();
                for (source, key_text, key) in unknown {
                    if let Some(h) = store
                        .stored_row(&source, &key)
                        .await
                        .and_then(|r| r.text_hash)
                    {
                        known.insert((source, key_text), h);
                    }
                }
            }
            let joined = tokio::task::spawn_blocking(move || {
                // Fault injection for the supervision tests (no-op unless built with `failpoints`).
                fail::fail_point!("enrich::embed");
                let dead = enricher.enrich_with(&mut events, &fetched, &known);
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

/// The values a row's unchanged-TOAST columns need, from the sink's stored payload, then the
/// source; and the sink's text hash of the row when it is stored under the event's own key.
async fn fetch<S: Lookups>(
    store: &mut S,
    need: &toast::Need,
) -> (Vec<(Name, crate::event::Value, Tier)>, Option<u64>) {
    let mut found = Vec::new();
    let mut hash = None;
    if let Some(row) = store.stored_row(&need.source, &need.stored_key).await {
        if need.stored_key == need.source_key {
            hash = row.text_hash;
        }
        if let Some(payload) = &row.payload {
            for (name, ty) in &need.columns {
                if let Some(v) = payload
                    .get(name.as_str())
                    .and_then(|j| toast::value_from_stored(j, *ty))
                {
                    found.push((name.clone(), v, Tier::Sink));
                }
            }
        }
    }
    let missing: Vec<Name> = need
        .columns
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| !found.iter().any(|(f, _, _)| f == n))
        .collect();
    if !missing.is_empty() {
        metrics::counter!("tributary_toast_source_reads_total", "source" => need.source.clone())
            .increment(1);
        if let Some(row) = store
            .source_row(&need.source, &need.source_key, &missing)
            .await
        {
            for c in row.columns() {
                if missing.contains(&c.name) {
                    found.push((c.name.clone(), c.value.clone(), Tier::Source));
                }
            }
        }
    }
    (found, hash)
}
