//! Long texts in chunks (`embedding.chunking`): a text longer than its source's `chunk_tokens`
//! is split into overlapping windows on token (and, where possible, word) boundaries
//! ([`super::Embedder::windows`]); each window is embedded on its own, so a chunk's vector is the
//! vector of its text alone. The row's vector is the mean of its chunk vectors (normalised again
//! when the model's are): what `store = "mean"` keeps, and what Bronze and the pgvector row carry
//! under `store = "rows"`, beside one `<table>_chunks` row per window.

use std::sync::Arc;

use crate::config::{ChunkStore, ChunkingConfig};
use crate::event::Chunk;

use super::{Embedder, text};

/// A text the model runs on: a whole text, or one window of it.
#[derive(Debug)]
pub(super) struct Piece {
    pub text: String,
    pub hash: u64,
    /// Character offsets in the whole text.
    pub chars: std::ops::Range<u32>,
}

/// The pieces of `text`: the text itself when `chunking` is `None` or the text fits in one
/// window, else its windows. A text the tokenizer rejects stays whole (the model run reports it).
pub(super) fn pieces(
    embedder: &Embedder,
    chunking: Option<&ChunkingConfig>,
    text: String,
    hash: u64,
) -> Vec<Piece> {
    let whole = |text: String| {
        let chars = 0..u32::try_from(text.chars().count()).unwrap_or(u32::MAX);
        vec![Piece { text, hash, chars }]
    };
    let Some(c) = chunking else {
        return vec![Piece {
            text,
            hash,
            chars: 0..0,
        }];
    };
    let windows = match embedder.windows(&text, c.chunk_tokens, c.chunk_overlap) {
        Ok(w) if w.len() > 1 => w,
        _ => return whole(text),
    };
    // Byte offsets to character offsets, in one pass over the text.
    let mut bounds: Vec<usize> = windows.iter().flat_map(|r| [r.start, r.end]).collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut chars_at = std::collections::HashMap::with_capacity(bounds.len());
    let mut next = bounds.iter().peekable();
    for (n, (byte, _)) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
        .enumerate()
    {
        while next.peek().is_some_and(|b| **b <= byte) {
            if let Some(b) = next.next() {
                chars_at.insert(*b, u32::try_from(n).unwrap_or(u32::MAX));
            }
        }
    }
    windows
        .into_iter()
        .filter_map(|r| {
            let piece = text.get(r.clone())?.to_owned();
            let chars = chars_at.get(&r.start).copied()?..chars_at.get(&r.end).copied()?;
            Some(Piece {
                hash: text::text_hash(&piece),
                text: piece,
                chars,
            })
        })
        .collect()
}

/// The row's vector from its pieces' vectors: the only one, or their mean.
pub(super) fn row_vector(vectors: &[Arc<Vec<f32>>], normalize: bool) -> Option<Arc<Vec<f32>>> {
    match vectors {
        [] => None,
        [one] => Some(one.clone()),
        many => {
            let dim = many[0].len();
            let mut mean = vec![0f32; dim];
            for v in many {
                for (m, x) in mean.iter_mut().zip(v.iter()) {
                    *m += x;
                }
            }
            let n = many.len() as f32;
            mean.iter_mut().for_each(|m| *m /= n);
            if normalize {
                let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                mean.iter_mut().for_each(|x| *x /= norm);
            }
            Some(Arc::new(mean))
        }
    }
}

/// The row vector of each of `texts` as the enrichment stage computes it (`tributary verify`
/// compares stored vectors with these).
pub fn row_vectors(
    embedder: &mut Embedder,
    chunking: Option<&ChunkingConfig>,
    normalize: bool,
    texts: &[&str],
) -> Result<Vec<Vec<f32>>, String> {
    let mut out = Vec::with_capacity(texts.len());
    for text in texts {
        let pieces = pieces(embedder, chunking, (*text).to_owned(), 0);
        let refs: Vec<&str> = pieces.iter().map(|p| p.text.as_str()).collect();
        let vectors: Vec<Arc<Vec<f32>>> =
            embedder.embed(&refs)?.into_iter().map(Arc::new).collect();
        let row = row_vector(&vectors, normalize).ok_or("no vector for an empty text")?;
        out.push(row.as_ref().clone());
    }
    Ok(out)
}

/// What the event carries for the pgvector chunk table: every piece with its vector, under
/// `store = "rows"`; nothing otherwise.
pub(super) fn chunks(
    chunking: Option<&ChunkingConfig>,
    pieces: &[Piece],
    vectors: &[Arc<Vec<f32>>],
) -> Option<Vec<Chunk>> {
    if chunking?.store != ChunkStore::Rows {
        return None;
    }
    Some(
        pieces
            .iter()
            .zip(vectors)
            .zip(0u32..)
            .map(|((p, v), seq)| Chunk {
                seq,
                start: p.chars.start,
                end: p.chars.end,
                text: p.text.clone(),
                vector: v.as_ref().clone(),
            })
            .collect(),
    )
}
