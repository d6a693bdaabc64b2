//! The enrichment stage: renders each event's text from its source's template, embeds it, and
//! never runs the model twice for the same text of the same row.
//!
//! Guarantees:
//! - Order: events leave in the order they came; only events whose source has a template are
//!   touched.
//! - Economy: the text's xxh3 hash is remembered per key (bounded cache; on a miss the sink's
//!   stored hash can answer through [`StoredHashes`]). An update whose text hash is unchanged gets
//!   the remembered vector, or — when only the sink has the vector — `embedding: None` with the
//!   hash set, which the pgvector sink reads as "keep the stored vector". Identical texts within
//!   a batch run once.
//! - Unchanged TOAST: before anything is rendered, every unchanged-TOAST column is resolved in
//!   order ([`toast`]: the batch, the remembered row state, the stored pgvector payload, the
//!   source row), so the text and the sinks see the row's current values; whenever the rendered
//!   text changes it is embedded again. Only a value no tier has leaves the event un-embedded
//!   (`embedding: None`, the sink keeps the stored vector) rather than embedding a text with a
//!   hole in it.
//! - Key moves: an update that moved its row to a new key reuses the old key's vector when the
//!   text is the same, else embeds.
//! - Long texts: for a source in `embedding.chunking` a text longer than `chunk_tokens` is
//!   embedded in overlapping windows ([`chunk`]); the row's vector is their mean, and under
//!   `store = "rows"` the event carries every chunk for the pgvector chunk table. An unchanged
//!   text carries no chunks (the sink keeps its rows); a moved row is embedded again, since its
//!   chunk rows go with the old key.
//! - Failures: an event that cannot be embedded is returned as a dead letter with the reason;
//!   the rest of the batch goes on. A model that cannot be loaded stops the stage at start.

pub mod chunk;
pub mod model;
mod stage;
pub mod text;
pub mod toast;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

pub use model::{Embedder, EnrichError};
pub use stage::{Enriched, run, spawn};

use crate::config::{ChunkStore, ChunkingConfig, EmbeddingConfig, TemplatePart, parse_template};
use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, Name, Op, Row};

/// What the pgvector sink stores for a row: the hash of the text its vector came from, and the
/// payload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredRow {
    pub text_hash: Option<u64>,
    pub payload: Option<serde_json::Value>,
}

/// Where the stage looks up what its own memory does not know (after a restart, past the
/// cache's capacity): the row the sink stores, and the row the source holds now. A failed lookup
/// is a miss: a text is embedded again, a TOAST value looked up at the next tier.
pub trait Lookups {
    fn stored_row(
        &mut self,
        source: &str,
        key: &Row,
    ) -> impl Future<Output = Option<StoredRow>> + Send;

    /// The source's current values of `columns` of the row under `key`.
    fn source_row(
        &mut self,
        source: &str,
        key: &Row,
        columns: &[Name],
    ) -> impl Future<Output = Option<Row>> + Send;
}

/// For running without a sink or source to ask: every lookup misses.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLookups;

impl Lookups for NoLookups {
    async fn stored_row(&mut self, _source: &str, _key: &Row) -> Option<StoredRow> {
        None
    }

    async fn source_row(&mut self, _source: &str, _key: &Row, _columns: &[Name]) -> Option<Row> {
        None
    }
}

/// Counts since start; the same figures go to the `tributary_embed_*` metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EnrichStats {
    /// Texts the model embedded.
    pub embedded: u64,
    /// Texts skipped because their hash matched the key's previous text.
    pub skipped_unchanged: u64,
    /// Model invocations (batches).
    pub model_runs: u64,
}

#[derive(Debug, Clone)]
struct Remembered {
    hash: u64,
    vector: Option<Arc<Vec<f32>>>,
}

/// A bounded map by row; the oldest insertion goes first when full.
#[derive(Debug)]
struct Cache<V> {
    map: HashMap<(String, String), V>,
    order: VecDeque<(String, String)>,
    capacity: usize,
}

impl<V> Cache<V> {
    fn new(capacity: usize) -> Self {
        Cache {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, k: &(String, String)) -> Option<&V> {
        self.map.get(k)
    }

    /// Keeps only the rows `keep` says yes to.
    fn retain(&mut self, mut keep: impl FnMut(&(String, String)) -> bool) {
        self.map.retain(|k, _| keep(k));
        self.order.retain(|k| keep(k));
    }

    fn put(&mut self, k: (String, String), v: V) {
        if self.capacity == 0 {
            return;
        }
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.map.len() > self.capacity {
                match self.order.pop_front() {
                    Some(old) => {
                        self.map.remove(&old);
                    }
                    None => break,
                }
            }
        }
    }

    fn remove(&mut self, k: &(String, String)) {
        // The queue entry stays until it reaches the front; removing it there is a no-op.
        self.map.remove(k);
    }
}

/// Renders, hashes and embeds events.
pub struct Enricher {
    embedder: Embedder,
    templates: HashMap<String, Vec<TemplatePart>>,
    chunking: HashMap<String, ChunkingConfig>,
    normalize: bool,
    cache: Cache<Remembered>,
    rows: toast::RowState,
    max_batch: usize,
    stats: EnrichStats,
}

impl std::fmt::Debug for Enricher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enricher")
            .field("sources", &self.templates.keys())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The per-event work left after rendering.
enum Plan {
    /// No template, a delete, or nothing to embed.
    Pass,
    /// Reuse: set this vector (or keep the stored one when `None`) and hash.
    Reuse(Option<Arc<Vec<f32>>>, u64),
    /// Run the model on these pieces of the text with this hash (the text itself, or its
    /// windows).
    Embed(Vec<chunk::Piece>, u64),
}

impl Enricher {
    pub fn new(config: &EmbeddingConfig) -> Result<Self, EnrichError> {
        let mut templates = HashMap::new();
        for (source, t) in &config.templates {
            let parts = parse_template(t)
                .map_err(|m| EnrichError::Model(format!("embedding.templates.{source:?}: {m}")))?;
            templates.insert(source.clone(), parts);
        }
        let template_columns = templates
            .iter()
            .map(|(source, parts)| {
                let columns = text::columns(parts).map(str::to_owned).collect();
                (source.clone(), columns)
            })
            .collect();
        Ok(Enricher {
            embedder: Embedder::load(config)?,
            templates,
            chunking: config
                .chunking
                .iter()
                .map(|(s, c)| (s.clone(), *c))
                .collect(),
            normalize: config.normalize,
            cache: Cache::new(config.cache_capacity),
            rows: toast::RowState::new(config.cache_capacity, template_columns),
            max_batch: config.max_batch.max(1),
            stats: EnrichStats::default(),
        })
    }

    pub fn dimension(&self) -> usize {
        self.embedder.dimension()
    }

    pub fn stats(&self) -> EnrichStats {
        self.stats
    }

    /// Whether `source` has a template.
    pub fn embeds(&self, source: &str) -> bool {
        self.templates.contains_key(source)
    }

    /// Keys of `events` whose text the cache cannot judge: ask [`StoredHashes`] for these.
    pub fn unknown_keys<'a>(&self, events: &'a [ChangeEvent]) -> Vec<&'a ChangeEvent> {
        events
            .iter()
            .filter(|e| {
                self.embeds(&e.source)
                    && matches!(e.op, Op::Update)
                    && self.cache.get(&cache_key(e)).is_none()
            })
            .collect()
    }

    /// The rows of `events` whose unchanged-TOAST values must be looked up outside the stage
    /// before [`Enricher::enrich_with`].
    pub fn toast_needs(&self, events: &[ChangeEvent]) -> Vec<toast::Need> {
        self.rows.needs(events)
    }

    /// Resolves the unchanged-TOAST values of `events` from what the stage knows (earlier events,
    /// its memory), then fills `embedding`/`text_hash` in place. `stored` holds hashes the sink
    /// had for keys the cache did not know. Returns the events that failed, as dead letters (their
    /// `embedding` stays `None`).
    pub fn enrich(
        &mut self,
        events: &mut [ChangeEvent],
        stored: &HashMap<(String, String), u64>,
    ) -> Vec<DeadLetter> {
        self.enrich_with(events, &toast::Fetched::new(), stored)
    }

    /// [`Enricher::enrich`] with the values `fetched` found outside the stage for
    /// [`Enricher::toast_needs`].
    pub fn enrich_with(
        &mut self,
        events: &mut [ChangeEvent],
        fetched: &toast::Fetched,
        stored: &HashMap<(String, String), u64>,
    ) -> Vec<DeadLetter> {
        self.rows.resolve(events, fetched);
        let plans: Vec<Plan> = events.iter().map(|e| self.plan(e, stored)).collect();
        // Unique texts to run, in first-seen order.
        let mut texts: Vec<&str> = Vec::new();
        let mut index: HashMap<u64, usize> = HashMap::new();
        for p in &plans {
            if let Plan::Embed(pieces, _) = p {
                for piece in pieces {
                    index.entry(piece.hash).or_insert_with(|| {
                        texts.push(&piece.text);
                        texts.len() - 1
                    });
                }
            }
        }
        // Sorted by token length and cut by count and tokens inside the embedder.
        let (results, runs) = self.embedder.embed_runs(&texts);
        for run in &runs {
            self.stats.model_runs += 1;
            metrics::histogram!("tributary_embed_batch_size").record(run.texts as f64);
            metrics::histogram!("tributary_embed_seconds").record(run.seconds);
        }
        let vectors: Vec<Result<Arc<Vec<f32>>, String>> = results
            .into_iter()
            .map(|r| {
                if r.is_ok() {
                    self.stats.embedded += 1;
                    metrics::counter!("tributary_embed_texts_total").increment(1);
                }
                r.map(Arc::new)
            })
            .collect();
        let mut dead = Vec::new();
        let missing = "not embedded".to_owned();
        for (e, plan) in events.iter_mut().zip(plans) {
            let (vector, hash, chunks) = match plan {
                Plan::Pass => {
                    match e.op {
                        Op::Delete => self.cache.remove(&cache_key(e)),
                        // The sink's rows are gone: no stored vector can be kept any more.
                        Op::Truncate => self.cache.retain(|(s, _)| *s != e.source),
                        _ => {}
                    }
                    continue;
                }
                Plan::Reuse(v, hash) => {
                    self.stats.skipped_unchanged += 1;
                    metrics::counter!("tributary_embed_skipped_unchanged_total").increment(1);
                    (v, hash, None)
                }
                Plan::Embed(pieces, hash) => {
                    let got: Result<Vec<Arc<Vec<f32>>>, &String> = pieces
                        .iter()
                        .map(|p| match index.get(&p.hash).and_then(|&i| vectors.get(i)) {
                            Some(Ok(v)) => Ok(v.clone()),
                            Some(Err(msg)) => Err(msg),
                            None => Err(&missing),
                        })
                        .collect();
                    let got = match got {
                        Ok(v) => v,
                        Err(msg) => {
                            dead.push(dead_letter(e, msg));
                            continue;
                        }
                    };
                    let chunking = self.chunking.get(&e.source);
                    let chunks = chunk::chunks(chunking, &pieces, &got);
                    (chunk::row_vector(&got, self.normalize), hash, chunks)
                }
            };
            e.embedding = vector.as_ref().map(|v| v.as_ref().clone());
            e.text_hash = Some(hash);
            e.chunks = chunks;
            if let Some(old) = toast::old_key(e) {
                self.cache.remove(&toast::row_key(&e.source, &old));
            }
            self.cache.put(cache_key(e), Remembered { hash, vector });
        }
        dead
    }

    fn plan(&self, e: &ChangeEvent, stored: &HashMap<(String, String), u64>) -> Plan {
        let Some(parts) = self.templates.get(&e.source) else {
            return Plan::Pass;
        };
        let Some(after) = &e.after else {
            return Plan::Pass;
        };
        let key = cache_key(e);
        let chunking = self.chunking.get(&e.source);
        let chunk_rows = chunking.is_some_and(|c| c.store == ChunkStore::Rows);
        // A moved row is the old key's row: its vector serves while the text is the same, if
        // this stage holds it (the sink's copy is under the old key, which the move deletes).
        // Chunk rows cannot be carried over: they are under the old key too.
        let remembered = self.cache.get(&key).or_else(|| {
            toast::old_key(e)
                .filter(|_| !chunk_rows)
                .and_then(|old| self.cache.get(&toast::row_key(&e.source, &old)))
                .filter(|r| r.vector.is_some())
        });
        let Some(text) = text::render(parts, after) else {
            // An unchanged TOAST value no tier had: the sink keeps the stored vector.
            return Plan::Pass;
        };
        let hash = text::text_hash(&text);
        match remembered {
            Some(r) if r.hash == hash => Plan::Reuse(r.vector.clone(), hash),
            None if stored.get(&key) == Some(&hash) => Plan::Reuse(None, hash),
            _ => Plan::Embed(chunk::pieces(&self.embedder, chunking, text, hash), hash),
        }
    }
}

/// The cache key: source and the key as JSON text.
pub fn cache_key(e: &ChangeEvent) -> (String, String) {
    toast::row_key(&e.source, &e.key)
}

fn dead_letter(e: &ChangeEvent, msg: &str) -> DeadLetter {
    metrics::counter!("tributary_dead_letters_total", "stage" => "enrich").increment(1);
    DeadLetter::new(
        e.source.clone(),
        e.position.clone(),
        Some(e.key.to_json().to_string()),
        &serde_json::to_vec(e).unwrap_or_default(),
        format!("embedding failed: {msg}"),
    )
}
