//! The pipeline's coordinator against an in-memory source and in-memory sinks of different
//! pace: ordering, acknowledgements only after durability in every sink (and after the dead
//! letters), shutdown drain, supervision. Milliseconds each; the real-service tests stay in
//! `tests/`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Parts, PipelineError, run_parts};
use crate::config::PipelineConfig;
use crate::dead_letter::{DeadLetter, DeadLetters};
use crate::error::ErrorKind;
use crate::event::{ChangeEvent, Lsn, Op, Position, Row, Value};
use crate::sink::{FlushWhen, Flushed, Sink, SinkError, SinkFuture};
use crate::source::{Acknowledge, Source, SourceError, SourceFuture, StartContext, Started, Stop};
use crate::telemetry::health::Health;

fn pos(lsn: u64) -> Position {
    crate::source::postgres::position(Lsn(lsn), 0)
}

fn lsn_of(p: &Position) -> u64 {
    p.major as u64
}

fn event(id: u64) -> ChangeEvent {
    let row: Row = [("id", Value::Int64(id as i64))].into_iter().collect();
    ChangeEvent {
        source: "public.t".into(),
        op: Op::Insert,
        key: row.clone(),
        before: None,
        after: Some(row),
        schema_version: 1,
        position: pos(id),
        source_ts: None,
        embedding: None,
        text_hash: None,
        chunks: None,
        schema: None,
        origin: None,
    }
}

/// What the test can see: per sink what it accepted and what is durable, the acknowledgements,
/// and any acknowledgement that outran a sink or a dead letter.
#[derive(Default)]
struct World {
    accepted: Vec<Vec<u64>>,
    durable: Vec<u64>,
    acks: Vec<u64>,
    violations: Vec<String>,
    letters: Option<Arc<Mutex<Vec<DeadLetter>>>>,
    rejected: Vec<u64>,
}

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a test sink behaves.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// Durable only on every `flush_every`-th accepted batch (0: durable in `accept`).
    flush_every: usize,
    /// Rejects events whose id is a multiple of this (0: none).
    reject_multiple_of: u64,
    /// `accept` fails (connection) on this batch number (1-based; 0: never).
    fail_on: usize,
    /// `accept` panics on this batch number (0: never).
    panic_on: usize,
}

struct MemorySink {
    index: usize,
    behaviour: Behaviour,
    world: Shared,
    batches: usize,
    unflushed: Vec<u64>,
}

impl MemorySink {
    fn boxed(index: usize, behaviour: Behaviour, world: &Shared) -> Box<dyn Sink> {
        let mut w = lock(world);
        while w.accepted.len() <= index {
            w.accepted.push(Vec::new());
            w.durable.push(0);
        }
        Box::new(MemorySink {
            index,
            behaviour,
            world: Arc::clone(world),
            batches: 0,
            unflushed: Vec::new(),
        })
    }
}

impl Sink for MemorySink {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn accept<'a>(&'a mut self, events: &'a [ChangeEvent]) -> SinkFuture<'a, Vec<DeadLetter>> {
        Box::pin(async move {
            self.batches += 1;
            if self.batches == self.behaviour.fail_on {
                return Err(SinkError {
                    kind: ErrorKind::Connection,
                    message: "store unavailable".into(),
                });
            }
            assert_ne!(self.batches, self.behaviour.panic_on, "sink exploded");
            let mut letters = Vec::new();
            let mut w = lock(&self.world);
            for e in events {
                let id = lsn_of(&e.position);
                let m = self.behaviour.reject_multiple_of;
                if m > 0 && id.is_multiple_of(m) {
                    w.rejected.push(id);
                    letters.push(DeadLetter::new(
                        &e.source,
                        e.position.clone(),
                        None,
                        b"raw",
                        "rejected by the test sink",
                    ));
                    // Taken all the same: durable with the next flush (its letter first).
                    self.unflushed.push(id);
                    continue;
                }
                w.accepted[self.index].push(id);
                self.unflushed.push(id);
            }
            if self.behaviour.flush_every == 0 {
                let last = self.unflushed.drain(..).max();
                if let Some(last) = last {
                    w.durable[self.index] = w.durable[self.index].max(last);
                }
            }
            Ok(letters)
        })
    }

    fn flush_when(&self) -> FlushWhen {
        match self.behaviour.flush_every {
            0 => FlushWhen::Idle,
            _ if self.unflushed.is_empty() => FlushWhen::Idle,
            n if self.batches.is_multiple_of(n) => FlushWhen::Now,
            // Otherwise only at the drain (far away).
            _ => FlushWhen::At(tokio::time::Instant::now() + Duration::from_secs(3600)),
        }
    }

    fn flush(&mut self) -> SinkFuture<'_, Flushed> {
        Box::pin(async move {
            let rows = self.unflushed.len();
            let mut w = lock(&self.world);
            if let Some(last) = self.unflushed.drain(..).max() {
                w.durable[self.index] = w.durable[self.index].max(last);
            }
            Ok(Flushed { rows })
        })
    }
}

/// Acknowledgements land in the world, checked against every sink's durable position and the
/// dead letters written.
struct MemoryAcker(Shared);

impl Acknowledge for MemoryAcker {
    fn ack(&self, position: &Position) {
        let id = lsn_of(position);
        let mut w = lock(&self.0);
        let durable_everywhere = w.durable.iter().copied().min().unwrap_or(0);
        let rejected_up_to: Vec<u64> = w.rejected.iter().copied().filter(|r| *r <= id).collect();
        let written: Vec<u64> = match &w.letters {
            Some(l) => lock_letters(l)
                .iter()
                .map(|d| lsn_of(&d.position))
                .collect(),
            None => Vec::new(),
        };
        if id > durable_everywhere {
            w.violations.push(format!(
                "ack {id} beyond durable-everywhere {durable_everywhere}"
            ));
        }
        for r in rejected_up_to {
            if !written.contains(&r) {
                w.violations.push(format!(
                    "ack {id} before the dead letter of {r} was written"
                ));
            }
        }
        if w.acks.last().is_some_and(|last| *last >= id) {
            w.violations.push(format!("ack {id} does not advance"));
        }
        w.acks.push(id);
    }
}

fn lock_letters(l: &Arc<Mutex<Vec<DeadLetter>>>) -> std::sync::MutexGuard<'_, Vec<DeadLetter>> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// A source fed by the test through a channel; `shutdown` ends its stream.
struct MemorySource {
    rx: mpsc::Receiver<Vec<ChangeEvent>>,
    world: Shared,
}

struct MemoryStop {
    stop: Option<oneshot::Sender<()>>,
}

impl Stop for MemoryStop {
    fn shutdown(mut self: Box<Self>) -> SourceFuture<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        Box::pin(async { Ok(()) })
    }
}

impl Source for MemorySource {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn start(self: Box<Self>, _context: StartContext) -> SourceFuture<Started> {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let MemorySource { rx, world } = *self;
        let batches = futures::stream::unfold((rx, stop_rx), |(mut rx, mut stop)| async move {
            tokio::select! {
                biased;
                _ = &mut stop => None,
                b = rx.recv() => b.map(|b| (b, (rx, stop))),
            }
        });
        Box::pin(async move {
            Ok(Started {
                batches: Box::pin(batches),
                acker: Arc::new(MemoryAcker(world)),
                stop: Box::new(MemoryStop {
                    stop: Some(stop_tx),
                }),
            })
        })
    }
}

struct Harness {
    world: Shared,
    feed: mpsc::Sender<Vec<ChangeEvent>>,
    shutdown: oneshot::Sender<()>,
    run: tokio::task::JoinHandle<Result<super::RunSummary, PipelineError>>,
}

fn settings() -> PipelineConfig {
    PipelineConfig {
        batch_max_events: 10,
        batch_max_wait_ms: 1,
        channel_capacity: 100,
        shutdown_timeout_s: 5,
    }
}

fn start(behaviours: &[Behaviour]) -> Harness {
    let world: Shared = Arc::default();
    let (dead_letters, letters) = DeadLetters::memory();
    lock(&world).letters = Some(letters);
    let sinks = behaviours
        .iter()
        .enumerate()
        .map(|(i, b)| MemorySink::boxed(i, *b, &world))
        .collect();
    let (feed, rx) = mpsc::channel(16);
    let source = MemorySource {
        rx,
        world: Arc::clone(&world),
    };
    let parts = Parts {
        sources: vec![Box::new(source)],
        sinks,
        enrich: None,
        dead_letters,
        health: Health::new(Duration::from_secs(60)),
    };
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        run_parts(parts, &settings(), async move {
            let _ = shutdown_rx.await;
        })
        .await
    });
    Harness {
        world,
        feed,
        shutdown,
        run,
    }
}

impl Harness {
    async fn send(&self, ids: std::ops::RangeInclusive<u64>) {
        self.feed.send(ids.map(event).collect()).await.unwrap();
    }

    async fn wait_until(&self, what: &str, check: impl Fn(&World) -> bool) {
        for _ in 0..2_000 {
            if check(&lock(&self.world)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting for {what}");
    }

    async fn stop(self) -> (Result<super::RunSummary, PipelineError>, Shared) {
        let _ = self.shutdown.send(());
        let result = tokio::time::timeout(Duration::from_secs(10), self.run)
            .await
            .expect("the run stops")
            .expect("the run task itself does not panic");
        (result, self.world)
    }
}

#[tokio::test]
async fn acknowledges_only_what_every_sink_holds_durably() {
    // Sink 0 is durable at once; sink 1 only every third batch.
    let h = start(&[
        Behaviour::default(),
        Behaviour {
            flush_every: 3,
            ..Behaviour::default()
        },
    ]);
    h.send(1..=5).await;
    h.wait_until("sink 0 holds batch 1", |w| w.durable[0] == 5)
        .await;
    h.send(6..=10).await;
    h.wait_until("sink 0 holds batch 2", |w| w.durable[0] == 10)
        .await;
    // Durable in sink 0 only: nothing may be acknowledged yet.
    assert!(lock(&h.world).acks.is_empty(), "{:?}", lock(&h.world).acks);
    h.send(11..=15).await;
    h.wait_until("the third batch flushes sink 1", |w| {
        w.acks.last() == Some(&15)
    })
    .await;
    h.send(16..=20).await;
    h.wait_until("sink 0 holds batch 4", |w| w.durable[0] == 20)
        .await;
    let (result, world) = h.stop().await;
    let summary = result.unwrap();
    assert_eq!(summary.events, 20);
    let w = lock(&world);
    // The drain flushed sink 1 and acknowledged the rest.
    assert_eq!(w.durable, vec![20, 20]);
    assert_eq!(w.acks.last(), Some(&20));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
    // Every sink saw every event once, in source order.
    for accepted in &w.accepted {
        assert_eq!(*accepted, (1..=20).collect::<Vec<u64>>());
    }
}

#[tokio::test]
async fn rejected_events_are_dead_letters_durable_before_their_acknowledgement() {
    let h = start(&[
        Behaviour {
            reject_multiple_of: 4,
            ..Behaviour::default()
        },
        Behaviour {
            flush_every: 2,
            ..Behaviour::default()
        },
    ]);
    for b in 0..6 {
        h.send(b * 5 + 1..=b * 5 + 5).await;
    }
    let (result, world) = h.stop().await;
    assert_eq!(result.unwrap().dead_letters, 7);
    let w = lock(&world);
    assert!(w.violations.is_empty(), "{:?}", w.violations);
    assert_eq!(w.acks.last(), Some(&30));
    let letters = lock_letters(w.letters.as_ref().unwrap());
    let ids: Vec<u64> = letters.iter().map(|d| lsn_of(&d.position)).collect();
    assert_eq!(ids, vec![4, 8, 12, 16, 20, 24, 28]);
    assert!(
        letters
            .iter()
            .all(|d| d.error.contains("rejected by the test sink"))
    );
}

#[tokio::test]
async fn a_failing_sink_stops_the_run_with_its_kind_and_acknowledges_nothing_after() {
    let h = start(&[
        Behaviour::default(),
        Behaviour {
            fail_on: 3,
            ..Behaviour::default()
        },
    ]);
    // One batch at a time (the batcher would merge batches sent together).
    h.send(1..=5).await;
    h.wait_until("batch 1 acknowledged", |w| w.acks.last() == Some(&5))
        .await;
    h.send(6..=10).await;
    h.wait_until("batch 2 acknowledged", |w| w.acks.last() == Some(&10))
        .await;
    h.send(11..=15).await;
    let result = tokio::time::timeout(Duration::from_secs(10), h.run)
        .await
        .expect("the run stops by itself")
        .unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(&err, PipelineError::Stage { stage, kind: ErrorKind::Connection, .. } if stage == "sinks.memory"),
        "{err:?}"
    );
    assert!(err.to_string().contains("store unavailable"), "{err}");
    let w = lock(&h.world);
    assert_eq!(w.acks.last(), Some(&10));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[tokio::test]
async fn a_panicking_sink_stops_the_run_naming_it() {
    let h = start(&[Behaviour {
        panic_on: 2,
        ..Behaviour::default()
    }]);
    h.send(1..=5).await;
    h.wait_until("batch 1 acknowledged", |w| w.acks.last() == Some(&5))
        .await;
    h.send(6..=10).await;
    let result = tokio::time::timeout(Duration::from_secs(10), h.run)
        .await
        .expect("the run stops by itself")
        .unwrap();
    match result {
        Err(PipelineError::Died { stage, cause }) => {
            assert_eq!(stage, "sinks.memory");
            assert!(cause.contains("sink exploded"), "{cause}");
        }
        other => panic!("expected a died stage, got {other:?}"),
    }
    assert_eq!(lock(&h.world).acks, vec![5]);
}

#[tokio::test]
async fn a_source_that_ends_by_itself_fails_the_run() {
    let h = start(&[Behaviour::default()]);
    h.send(1..=5).await;
    h.wait_until("the batch acknowledged", |w| w.acks.last() == Some(&5))
        .await;
    drop(h.feed);
    let result = tokio::time::timeout(Duration::from_secs(10), h.run)
        .await
        .expect("the run stops by itself")
        .unwrap();
    match result {
        Err(PipelineError::Died { stage, .. }) => assert_eq!(stage, "sources.memory"),
        other => panic!("expected the source to be named, got {other:?}"),
    }
}

#[tokio::test]
async fn a_source_that_fails_to_start_stops_the_run_with_its_error() {
    struct Broken;
    impl Source for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        fn start(self: Box<Self>, _: StartContext) -> SourceFuture<Started> {
            Box::pin(async {
                Err(SourceError {
                    kind: ErrorKind::Config,
                    message: "sources.broken.url: not a URL".into(),
                })
            })
        }
    }
    let world: Shared = Arc::default();
    let parts = Parts {
        sources: vec![Box::new(Broken)],
        sinks: vec![MemorySink::boxed(0, Behaviour::default(), &world)],
        enrich: None,
        dead_letters: DeadLetters::memory().0,
        health: Health::new(Duration::from_secs(60)),
    };
    let err = run_parts(parts, &settings(), std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PipelineError::Config(m) if m.contains("sources.broken.url")),
        "{err:?}"
    );
}
