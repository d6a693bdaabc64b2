//! The vector check: a stored embedding against a fresh embedding of the row's current text.
//!
//! With `--all-vectors` every row with a vector is checked as the merge goes (the cursor then
//! reads the vectors too), a model batch at a time. Otherwise the sample is the `--sample` rows
//! whose key hashes lowest: the same rows on every run (so a re-run after a repair checks the
//! same ones), spread over the whole key range; only their vectors are read, by key, at the end.

use std::collections::BinaryHeap;
use std::io::Write;

use tokio_postgres::Client;

use super::compare::{cosine, parse_vector};
use super::read::{Target, stored_vector};
use super::{Kind, Reporter};
use crate::config::EmbeddingConfig;
use crate::enrich::Embedder;

/// The model, loaded the first time a vector is to be compared.
pub struct Model<'a> {
    config: Option<&'a EmbeddingConfig>,
    embedder: Option<Result<Embedder, String>>,
}

impl<'a> Model<'a> {
    pub fn new(config: Option<&'a EmbeddingConfig>) -> Self {
        Model {
            config,
            embedder: None,
        }
    }

    fn get(&mut self) -> Result<&mut Embedder, String> {
        let config = self
            .config
            .ok_or("templates need an [embedding] section to be embedded")?;
        self.embedder
            .get_or_insert_with(|| Embedder::load(config).map_err(|e| e.to_string()))
            .as_mut()
            .map_err(|e| e.clone())
    }

    /// Each text's vector as the enrichment stage of `source` computes it (in chunks where the
    /// source's texts are chunked).
    fn embed(&mut self, source: &str, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        let chunking = self.config.and_then(|c| c.chunking.get(source)).copied();
        let normalize = self.config.is_none_or(|c| c.normalize);
        let embedder = self.get()?;
        match chunking {
            None => embedder.embed(texts),
            Some(c) => crate::enrich::chunk::row_vectors(embedder, Some(&c), normalize, texts),
        }
    }

    fn batch(&self) -> usize {
        self.config.map_or(32, |c| c.max_batch.max(1))
    }
}

/// A row whose vector is to be checked.
pub struct Candidate {
    rank: u64,
    /// The key as shown in difference lines.
    key: String,
    key_texts: Vec<String>,
    text: String,
    /// The stored vector's text, once read.
    stored: Option<String>,
}

impl Candidate {
    pub fn new(key: String, key_texts: Vec<String>, text: String, stored: Option<String>) -> Self {
        Candidate {
            rank: twox_hash::XxHash3_64::oneshot(key.as_bytes()),
            key,
            key_texts,
            text,
            stored,
        }
    }
}

// A max-heap by rank keeps the `sample` lowest ranks: the largest is the one to evict.
impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.rank == other.rank
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank.cmp(&other.rank)
    }
}

pub struct VectorCheck {
    source: String,
    all: bool,
    sample: usize,
    pub min_cosine: f64,
    heap: BinaryHeap<Candidate>,
    pending: Vec<Candidate>,
}

impl VectorCheck {
    pub fn new(source: String, all: bool, sample: usize, min_cosine: f64) -> Self {
        VectorCheck {
            source,
            all,
            sample,
            min_cosine,
            heap: BinaryHeap::new(),
            pending: Vec::new(),
        }
    }

    /// Whether the cursor must read every stored vector.
    pub fn reads_all(&self) -> bool {
        self.all
    }

    /// Offers a row with a stored vector; with `--all-vectors`, checks a full batch at once.
    pub fn offer<W: Write>(
        &mut self,
        c: Candidate,
        model: &mut Model<'_>,
        rep: &mut Reporter<'_, W>,
    ) -> Result<(), String> {
        if self.all {
            self.pending.push(c);
            if self.pending.len() >= model.batch() {
                self.check_pending(model, rep)?;
            }
        } else if self.heap.len() < self.sample {
            self.heap.push(c);
        } else if self.heap.peek().is_some_and(|top| c.rank < top.rank) {
            self.heap.pop();
            self.heap.push(c);
        }
        Ok(())
    }

    /// Checks what is left: the sample (its vectors read now, inside the table's transaction)
    /// or the last partial batch.
    pub async fn finish<W: Write>(
        &mut self,
        client: &Client,
        target: &Target,
        model: &mut Model<'_>,
        rep: &mut Reporter<'_, W>,
    ) -> Result<(), String> {
        let mut sample = std::mem::take(&mut self.heap).into_sorted_vec();
        for c in &mut sample {
            c.stored = stored_vector(client, target, &c.key_texts).await?;
        }
        self.pending
            .extend(sample.into_iter().filter(|c| c.stored.is_some()));
        while !self.pending.is_empty() {
            self.check_pending(model, rep)?;
        }
        Ok(())
    }

    /// Embeds up to a batch of pending rows and compares each with its stored vector.
    fn check_pending<W: Write>(
        &mut self,
        model: &mut Model<'_>,
        rep: &mut Reporter<'_, W>,
    ) -> Result<(), String> {
        let n = self.pending.len().min(model.batch());
        let batch: Vec<Candidate> = self.pending.drain(..n).collect();
        if batch.is_empty() {
            return Ok(());
        }
        let texts: Vec<&str> = batch.iter().map(|c| c.text.as_str()).collect();
        let fresh = model
            .embed(&self.source, &texts)
            .map_err(|e| format!("embedding the current text: {e}"))?;
        for (c, fresh) in batch.iter().zip(fresh) {
            rep.counts.sampled += 1;
            let Some(stored) = c.stored.as_deref() else {
                continue;
            };
            let detail = match parse_vector(stored) {
                None => Some("the stored embedding does not parse as a vector".to_owned()),
                Some(v) if v.len() != fresh.len() => Some(format!(
                    "the stored embedding has {} dimensions, the model gives {}",
                    v.len(),
                    fresh.len()
                )),
                Some(v) => {
                    let cos = cosine(&v, &fresh);
                    (cos < self.min_cosine).then(|| {
                        format!(
                            "cosine {cos:.6} between the stored vector and a fresh embedding of \
                             the current text (minimum {})",
                            self.min_cosine
                        )
                    })
                }
            };
            if let Some(detail) = detail {
                rep.diff(Kind::Vector, &c.key, &detail);
            }
        }
        Ok(())
    }
}
