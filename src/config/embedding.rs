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
