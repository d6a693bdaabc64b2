//! A sentence-embedding model run in-process by ONNX Runtime.
//!
//! Faithful to sentence-transformers: the text is tokenized by the model's own `tokenizer.json`,
//! a batch is padded to its longest text and truncated at `max_length` (256 for all-MiniLM-L6-v2,
//! whatever its tokenizer.json says), the last hidden state is pooled (mean over the attention
//! mask, or the CLS token) and L2-normalised. The dimension is read from the model's output.
//!
//! Batching: [`Embedder::embed_runs`] sorts a window of texts by token count and cuts it into
//! model runs of at most `max_batch` texts and `max_batch_tokens` padded tokens, so one long text
//! does not pad 31 short ones to its length. A text's vector does not depend on its neighbours
//! (padding is masked), so the order is restored afterwards and the vectors are those of
//! embedding each text alone.
//!
//! The ONNX Runtime library is loaded at run time from `ORT_DYLIB_PATH` (ort's `load-dynamic`):
//! nothing is downloaded.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::value::{Tensor, ValueType};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use crate::config::{EmbeddingConfig, Pooling};
use crate::error::{Classify, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    /// The model folder, the model file, the tokenizer or the runtime library is unusable.
    /// (One event's failure is not an error of the stage: it becomes a dead letter.)
    #[error("embedding model: {0}")]
    Model(String),
}

impl Classify for EnrichError {
    fn kind(&self) -> ErrorKind {
        match self {
            EnrichError::Model(_) => ErrorKind::Config,
        }
    }
}

/// ONNX Runtime's environment, initialised once per process from `ORT_DYLIB_PATH`.
fn environment() -> Result<&'static ort::environment::Environment, EnrichError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .ok_or_else(|| {
                "ORT_DYLIB_PATH is not set: point it at libonnxruntime.so (scripts/services env \
             exports it)"
                    .to_owned()
            })?;
        if !path.is_file() {
            return Err(format!(
                "ORT_DYLIB_PATH={}: no such file (the ONNX Runtime library)",
                path.display()
            ));
        }
        ort::init_from(&path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?
            .with_name("tributary")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))
    })
    .as_ref()
    .map_err(|e| EnrichError::Model(e.clone()))
}

pub struct Embedder {
    session: Session,
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation: it finds the windows of a long text.
    chunker: Tokenizer,
    dimension: usize,
    pooling: Pooling,
    normalize: bool,
    token_type_ids: bool,
    output: String,
    /// Token and type ids a padded position gets (masked out).
    pad_id: i64,
    pad_type_id: i64,
    max_batch: usize,
    max_batch_tokens: usize,
}

/// One model run of [`Embedder::embed_runs`]: the texts it held and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub texts: usize,
    pub seconds: f64,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dimension", &self.dimension)
            .field("pooling", &self.pooling)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    pub fn load(config: &EmbeddingConfig) -> Result<Self, EnrichError> {
        let dir = &config.model_dir;
        let model_path = dir.join("model.onnx");
        let tokenizer_path = dir.join("tokenizer.json");
        for p in [&model_path, &tokenizer_path] {
            if !p.is_file() {
                return Err(EnrichError::Model(format!(
                    "{} is missing (the model folder must hold model.onnx and tokenizer.json)",
                    p.display()
                )));
            }
        }
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EnrichError::Model(format!("{}: {e}", tokenizer_path.display())))?;
        // Padding is done here, per run, to that run's longest text.
        let pad = tokenizer.get_padding().cloned().unwrap_or_default();
        tokenizer.with_padding(None);
        let mut chunker = tokenizer.clone();
        chunker
            .with_truncation(None)
            .map_err(|e| EnrichError::Model(format!("{}: {e}", tokenizer_path.display())))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: config.max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| EnrichError::Model(format!("{}: {e}", tokenizer_path.display())))?;

        let env = environment()?;
        let session = Session::builder(env)
            .and_then(|b| Ok(b.with_intra_threads(config.threads())?))
            // Idle intra-op threads sleep instead of spinning: the embedder shares the cores
            // with the sources and sinks, which the spinning would starve between batches.
            .and_then(|b| Ok(b.with_intra_op_spinning(false)?))
            .and_then(|mut b| b.commit_from_file(&model_path))
            .map_err(|e| EnrichError::Model(format!("{}: {e}", model_path.display())))?;
        let (output, dimension, token_type_ids) = check_signature(&session, &model_path)?;
        Ok(Embedder {
            session,
            tokenizer,
            chunker,
            dimension,
            pooling: config.pooling,
            normalize: config.normalize,
            token_type_ids,
            output,
            pad_id: i64::from(pad.pad_id),
            pad_type_id: i64::from(pad.pad_type_id),
            max_batch: config.max_batch.max(1),
            max_batch_tokens: config.max_batch_tokens.max(1),
        })
    }

    /// Length of every vector this model returns.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The windows of `text` (byte ranges, in order) of at most `tokens` tokens each, every one
    /// sharing about `overlap` tokens with the one before; a text of at most `tokens` tokens is
    /// one window, the whole text. Windows start and end at word boundaries where a word
    /// boundary lies in the window's second half, so a window's text tokenizes as it did inside
    /// the whole text (a window is embedded on its own).
    pub fn windows(
        &self,
        text: &str,
        tokens: usize,
        overlap: usize,
    ) -> Result<Vec<std::ops::Range<usize>>, String> {
        let encoding = self
            .chunker
            .encode(text, false)
            .map_err(|e| format!("tokenizer: {e}"))?;
        Ok(windows(
            encoding.get_offsets(),
            encoding.get_word_ids(),
            tokens.max(1),
            overlap.min(tokens.saturating_sub(1)),
        )
        .unwrap_or_else(|| std::iter::once(0..text.len()).collect()))
    }

    /// Embeds `texts` as one batch, in order.
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| format!("tokenizer: {e}"))?;
        let all: Vec<&Encoding> = encodings.iter().collect();
        self.run(&all)
    }

    /// Embeds `texts` in runs cut by count and by padded tokens, shortest texts first (module
    /// doc); returns each text's vector or error in the order given, and the runs made. A text
    /// the tokenizer rejects, or a run the model fails, fails only its own texts.
    #[allow(clippy::type_complexity)]
    pub fn embed_runs(&mut self, texts: &[&str]) -> (Vec<Result<Vec<f32>, String>>, Vec<Run>) {
        let mut results: Vec<Result<Vec<f32>, String>> =
            vec![Err("not embedded".to_owned()); texts.len()];
        let encodings: Vec<Result<Encoding, String>> =
            match self.tokenizer.encode_batch(texts.to_vec(), true) {
                Ok(all) => all.into_iter().map(Ok).collect(),
                // Find the text at fault: the others still embed.
                Err(_) => texts
                    .iter()
                    .map(|t| {
                        self.tokenizer
                            .encode(*t, true)
                            .map_err(|e| format!("tokenizer: {e}"))
                    })
                    .collect(),
            };
        let mut order: Vec<(usize, &Encoding)> = Vec::with_capacity(texts.len());
        for (i, e) in encodings.iter().enumerate() {
            match e {
                Ok(e) => order.push((i, e)),
                Err(msg) => results[i] = Err(msg.clone()),
            }
        }
        order.sort_by_key(|(_, e)| e.len());
        let lengths: Vec<usize> = order.iter().map(|(_, e)| e.len()).collect();
        let mut runs = Vec::new();
        let mut start = 0;
        for len in cut_runs(&lengths, self.max_batch, self.max_batch_tokens) {
            let part = &order[start..start + len];
            start += len;
            let started = std::time::Instant::now();
            let encs: Vec<&Encoding> = part.iter().map(|(_, e)| *e).collect();
            let outcome = self.run(&encs);
            runs.push(Run {
                texts: len,
                seconds: started.elapsed().as_secs_f64(),
            });
            match outcome {
                Ok(vectors) => {
                    for ((i, _), v) in part.iter().zip(vectors) {
                        results[*i] = Ok(v);
                    }
                }
                Err(msg) => {
                    for (i, _) in part {
                        results[*i] = Err(msg.clone());
                    }
                }
            }
        }
        (results, runs)
    }

    /// One model run over `encodings`, padded to the longest.
    fn run(&mut self, encodings: &[&Encoding]) -> Result<Vec<Vec<f32>>, String> {
        let batch = encodings.len();
        let seq = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch * seq);
        let mut mask = Vec::with_capacity(batch * seq);
        let mut types = Vec::with_capacity(batch * seq);
        for e in encodings {
            let pad = seq - e.len();
            ids.extend(e.get_ids().iter().map(|&x| i64::from(x)));
            ids.extend(std::iter::repeat_n(self.pad_id, pad));
            mask.extend(e.get_attention_mask().iter().map(|&x| i64::from(x)));
            mask.extend(std::iter::repeat_n(0, pad));
            types.extend(e.get_type_ids().iter().map(|&x| i64::from(x)));
            types.extend(std::iter::repeat_n(self.pad_type_id, pad));
        }
        let shape = [batch, seq];
        let tensor = |v: Vec<i64>| Tensor::from_array((shape, v)).map_err(|e| e.to_string());
        let mask_values = mask.clone();
        let outputs = if self.token_type_ids {
            self.session.run(ort::inputs! {
                "input_ids" => tensor(ids)?,
                "attention_mask" => tensor(mask)?,
                "token_type_ids" => tensor(types)?,
            })
        } else {
            self.session.run(ort::inputs! {
                "input_ids" => tensor(ids)?,
                "attention_mask" => tensor(mask)?,
            })
        }
        .map_err(|e| format!("model run: {e}"))?;
        let (out_shape, hidden) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("model output: {e}"))?;
        let dim = self.dimension;
        // The model comes from outside: every dimension is checked before the output is sliced
        // (a model that returns fewer rows than it was given must be an error, not a panic).
        let expected = [batch as i64, seq as i64, dim as i64];
        if out_shape[..] != expected[..] || hidden.len() != batch * seq * dim {
            return Err(format!(
                "model output has shape {out_shape:?}, expected [{batch}, {seq}, {dim}]"
            ));
        }
        let mut vectors = Vec::with_capacity(batch);
        for b in 0..batch {
            let rows = &hidden[b * seq * dim..(b + 1) * seq * dim];
            let m = &mask_values[b * seq..(b + 1) * seq];
            let mut v = vec![0f32; dim];
            match self.pooling {
                Pooling::Cls => v.copy_from_slice(&rows[..dim]),
                Pooling::Mean => {
                    let mut count = 0f32;
                    for (t, &on) in m.iter().enumerate() {
                        if on != 0 {
                            count += 1.0;
                            for (acc, x) in v.iter_mut().zip(&rows[t * dim..(t + 1) * dim]) {
                                *acc += x;
                            }
                        }
                    }
                    let count = count.max(1e-9);
                    v.iter_mut().for_each(|x| *x /= count);
                }
            }
            if self.normalize {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x /= norm);
            }
            vectors.push(v);
        }
        Ok(vectors)
    }
}

/// The byte ranges of the windows over tokens at `offsets` (byte ranges in the text) whose words
/// are `words`; `None` when the tokens fit in one window.
fn windows(
    offsets: &[(usize, usize)],
    words: &[Option<u32>],
    tokens: usize,
    overlap: usize,
) -> Option<Vec<std::ops::Range<usize>>> {
    let n = offsets.len();
    if n <= tokens {
        return None;
    }
    let starts_word = |i: usize| i == 0 || i >= n || words.get(i) != words.get(i - 1);
    // Backs `i` off towards `floor` to the nearest word start, if one lies above `floor`.
    let word_start = |i: usize, floor: usize| (floor + 1..=i).rev().find(|&b| starts_word(b));
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let mut end = (start + tokens).min(n);
        if end < n {
            end = word_start(end, start + tokens / 2).unwrap_or(end);
        }
        out.push(offsets[start].0..offsets[end - 1].1);
        if end == n {
            return Some(out);
        }
        let next = end.saturating_sub(overlap).max(start + 1);
        start = word_start(next, start + 1).unwrap_or(next);
    }
}

/// Lengths of consecutive runs over texts of `lengths` tokens (sorted ascending): each run
/// holds at most `max_texts` texts and, unless one text alone exceeds it, at most `max_tokens`
/// padded tokens (texts × the run's longest).
pub fn cut_runs(lengths: &[usize], max_texts: usize, max_tokens: usize) -> Vec<usize> {
    let mut runs = Vec::new();
    let (mut count, mut longest) = (0usize, 0usize);
    for &len in lengths {
        let wider = longest.max(len);
        if count > 0 && (count + 1 > max_texts || (count + 1) * wider > max_tokens) {
            runs.push(count);
            count = 0;
        }
        longest = if count == 0 { len } else { longest.max(len) };
        count += 1;
    }
    if count > 0 {
        runs.push(count);
    }
    runs
}

/// The model must take `input_ids` and `attention_mask` (and optionally `token_type_ids`) and
/// return a `[batch, seq, dim]` float tensor; returns (output name, dim, takes token_type_ids).
fn check_signature(session: &Session, path: &Path) -> Result<(String, usize, bool), EnrichError> {
    let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
    let unexpected: Vec<&&str> = inputs
        .iter()
        .filter(|n| !["input_ids", "attention_mask", "token_type_ids"].contains(n))
        .collect();
    if !inputs.contains(&"input_ids")
        || !inputs.contains(&"attention_mask")
        || !unexpected.is_empty()
    {
        return Err(EnrichError::Model(format!(
            "{}: inputs are {inputs:?}; a sentence-embedding model takes input_ids, attention_mask \
             and optionally token_type_ids",
            path.display()
        )));
    }
    let outputs = session.outputs();
    let chosen = outputs
        .iter()
        .find(|o| o.name() == "last_hidden_state")
        .or_else(|| outputs.first());
    let Some(out) = chosen else {
        return Err(EnrichError::Model(format!(
            "{}: the model has no output",
            path.display()
        )));
    };
    let dim = match out.dtype() {
        ValueType::Tensor { shape, .. } if shape.len() == 3 && shape[2] > 0 => shape[2] as usize,
        other => {
            return Err(EnrichError::Model(format!(
                "{}: output {:?} is {other:?}; expected a float tensor [batch, sequence, dimension] \
                 (the last hidden state)",
                path.display(),
                out.name()
            )));
        }
    };
    Ok((
        out.name().to_owned(),
        dim,
        inputs.contains(&"token_type_ids"),
    ))
}

#[cfg(test)]
mod tests {
    use super::{cut_runs, windows};

    #[test]
    fn windows_overlap_and_end_on_word_starts() {
        // Ten one-token words "w0 w1 …", 3 bytes each with the space.
        let offsets: Vec<(usize, usize)> = (0..10).map(|i| (3 * i, 3 * i + 2)).collect();
        let words: Vec<Option<u32>> = (0..10).map(Some).collect();
        assert_eq!(windows(&offsets, &words, 10, 2), None);
        // Windows of 4 sharing 1: tokens 0-3, 3-6, 6-9.
        assert_eq!(
            windows(&offsets, &words, 4, 1),
            Some(vec![0..11, 9..20, 18..29])
        );
        // Tokens 3 and 4 are one word ("w3##x"): a window ends before it, the next starts at it.
        let mut words = words;
        words[4] = Some(3);
        let got = windows(&offsets, &words, 4, 0).unwrap();
        assert_eq!(got[0], 0..8, "the first window ends before the split word");
        assert_eq!(got[1].start, 9, "the next window starts at the word");
        // Every token is covered.
        assert_eq!(got.last().map(|r| r.end), Some(29));
    }

    #[test]
    fn runs_are_cut_by_count_and_by_padded_tokens() {
        assert_eq!(cut_runs(&[], 32, 8192), Vec::<usize>::new());
        assert_eq!(cut_runs(&[10; 70], 32, 8192), vec![32, 32, 6]);
        // 12 short texts (12 × 20 = 240) fit; a 200-token text alone exceeds nothing but
        // cannot join them (13 × 200 > 256).
        let mut lengths = vec![20; 12];
        lengths.push(200);
        assert_eq!(cut_runs(&lengths, 32, 256), vec![12, 1]);
        // A text longer than the budget still runs, alone.
        assert_eq!(cut_runs(&[5, 300, 300], 32, 256), vec![1, 1, 1]);
    }
}
