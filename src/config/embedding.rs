//! `[embedding]`: the ONNX sentence-embedding model, the text template per source, and how
//! texts are batched and cached.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, default_true, parse_template};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// Folder holding `model.onnx` and `tokenizer.json`.
    pub model_dir: PathBuf,
    /// Per source (`schema.table` or topic): the text to embed, e.g.
    /// `"{customer} ordered {items}: {note}"`. Sources without a template are not embedded.
    #[serde(default)]
    pub templates: BTreeMap<String, String>,
    /// `mean` over the attention mask (sentence-transformers) or the `cls` token.
    #[serde(default)]
    pub pooling: Pooling,
    /// L2-normalise vectors (cosine similarity = dot product).
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Tokens per text; longer texts are truncated (256 for all-MiniLM-L6-v2).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Texts per model run.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Tokens per model run, padding included (texts × the longest text's tokens): a run is cut
    /// at whichever of this and `max_batch` comes first.
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// How long a partial batch may wait for more texts.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// ONNX Runtime intra-op threads (default: 1 on machines with ≤ 2 cores, else half).
    pub intra_threads: Option<usize>,
    /// Keys whose last text hash and vector are remembered, to skip unchanged texts.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: usize,
    /// Per source with a template: texts longer than `chunk_tokens` are embedded in overlapping
    /// windows instead of being truncated at `max_length`.
    #[serde(default)]
    pub chunking: BTreeMap<String, ChunkingConfig>,
}

/// `[embedding.chunking."<source>"]`: how a long text is split into windows, and what the
/// pgvector sink keeps of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkingConfig {
    /// Tokens per window, special tokens not counted (at most `max_length` − 2); a text of at
    /// most this many tokens is one chunk, embedded whole.
    pub chunk_tokens: usize,
    /// Tokens a window shares with the one before it.
    #[serde(default)]
    pub chunk_overlap: usize,
    /// `rows`: one row per chunk in `<table>_chunks` beside the row's mean vector; `mean`: only
    /// the mean of the chunk vectors, in the row.
    #[serde(default)]
    pub store: ChunkStore,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkStore {
    #[default]
    Rows,
    Mean,
}

impl EmbeddingConfig {
    /// A configuration with defaults for a model folder (`tributary embed --model DIR`).
    pub fn for_model(model_dir: PathBuf) -> Self {
        EmbeddingConfig {
            model_dir,
            templates: BTreeMap::new(),
            pooling: Pooling::default(),
            normalize: true,
            max_length: default_max_length(),
            max_batch: default_max_batch(),
            max_batch_tokens: default_max_batch_tokens(),
            max_wait_ms: default_max_wait_ms(),
            intra_threads: None,
            cache_capacity: default_cache_capacity(),
            chunking: BTreeMap::new(),
        }
    }

    pub fn threads(&self) -> usize {
        self.intra_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cores <= 2 { 1 } else { cores / 2 }
        })
    }

    /// `known_sources` are the source names when the configuration lists them all
    /// ([`super::Config::known_sources`]): every template must name one of them.
    pub(super) fn validate(&self, known_sources: Option<&[String]>) -> Result<(), ConfigError> {
        for (key, value, range) in [
            ("embedding.max_length", self.max_length, 1..=8192),
            ("embedding.max_batch", self.max_batch, 1..=4096),
            (
                "embedding.max_batch_tokens",
                self.max_batch_tokens,
                1..=1_048_576,
            ),
            (
                "embedding.intra_threads",
                self.intra_threads.unwrap_or(1),
                1..=256,
            ),
        ] {
            if !range.contains(&value) {
                return Err(ConfigError::invalid(
                    key,
                    format!("{value} is outside {}..={}", range.start(), range.end()),
                ));
            }
        }
        for (source, template) in &self.templates {
            let key = format!("embedding.templates.{source:?}");
            parse_template(template).map_err(|m| ConfigError::invalid(&key, m))?;
            if let Some(known) = known_sources
                && !known.contains(source)
            {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "no configured source is named {source:?} (sources: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        for (source, c) in &self.chunking {
            let key = format!("embedding.chunking.{source:?}");
            if !self.templates.contains_key(source) {
                return Err(ConfigError::invalid(
                    key,
                    format!("{source:?} has no entry in embedding.templates: nothing to chunk"),
                ));
            }
            // The model sees a window plus its two special tokens ([CLS] … [SEP]).
            let most = self.max_length.saturating_sub(2);
            if !(8..=most).contains(&c.chunk_tokens) {
                return Err(ConfigError::invalid(
                    format!("{key}.chunk_tokens"),
                    format!(
                        "{} is outside 8..={most} (embedding.max_length − 2)",
                        c.chunk_tokens
                    ),
                ));
            }
            if c.chunk_overlap > c.chunk_tokens / 2 {
                return Err(ConfigError::invalid(
                    format!("{key}.chunk_overlap"),
                    format!(
                        "{} is more than half of chunk_tokens ({})",
                        c.chunk_overlap, c.chunk_tokens
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    #[default]
    Mean,
    Cls,
}

fn default_max_length() -> usize {
    256
}

fn default_max_batch() -> usize {
    32
}

/// 32 texts of 256 tokens: the default batch of the longest texts all-MiniLM-L6-v2 takes.
fn default_max_batch_tokens() -> usize {
    8192
}

fn default_max_wait_ms() -> u64 {
    20
}

fn default_cache_capacity() -> usize {
    100_000
}
