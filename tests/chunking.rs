//! Long texts in chunks (`embedding.chunking`), with the real all-MiniLM-L6-v2 model and a real
//! pgvector: the windows, their vectors, and the chunk table following the source row.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::vectors::cosine;
use common::{env, pg_connect, unique};
use tributary::config::{ChunkStore, ChunkingConfig, Config, EmbeddingConfig};
use tributary::enrich::{Embedder, Enricher};
use tributary::event::{ChangeEvent, Chunk, Lsn, Op, Position, Row, Value};
use tributary::sink::pgvector::PgvectorSink;

const SOURCE: &str = "public.docs";

/// Words the MiniLM (BERT uncased) vocabulary holds whole: one token each.
const WORDS: [&str; 24] = [
    "the", "river", "runs", "past", "old", "mill", "and", "under", "a", "stone", "bridge", "where",
    "children", "fish", "in", "summer", "while", "birds", "sing", "over", "green", "fields", "of",
    "wheat",
];

/// `n` one-token words (a deterministic walk over [`WORDS`], `seed` picks the walk).
fn words(n: usize, seed: usize) -> String {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            WORDS[(x >> 33) % WORDS.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn model_dir() -> PathBuf {
    PathBuf::from(env("TRIBUTARY_MODEL_DIR"))
}

fn token_count(text: &str) -> usize {
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    // The model's tokenizer.json truncates at 256; counting must not.
    tokenizer.with_truncation(None).unwrap();
    tokenizer.encode(text, false).unwrap().len()
}

fn config(store: ChunkStore) -> EmbeddingConfig {
    let mut cfg = EmbeddingConfig::for_model(model_dir());
    cfg.templates.insert(SOURCE.into(), "{note}".into());
    cfg.chunking.insert(
        SOURCE.into(),
        ChunkingConfig {
            chunk_tokens: 200,
            chunk_overlap: 50,
            store,
        },
    );
    cfg
}

fn pos(lsn: u64) -> Position {
    tributary::source::postgres::position(Lsn(lsn), 0)
}

fn doc(op: Op, id: i32, note: &str, status: &str, lsn: u64) -> ChangeEvent {
    ChangeEvent {
        source: SOURCE.into(),
        op,
        key: [("id", Value::Int32(id))].into_iter().collect(),
        before: None,
        after: Some(Row::from_iter([
            ("id", Value::Int32(id)),
            ("note", Value::Text(note.into())),
            ("status", Value::Text(status.into())),
        ])),
        schema_version: 1,
        position: pos(lsn),
        source_ts: None,
        embedding: None,
        text_hash: None,
        chunks: None,
        schema: None,
        origin: None,
    }
}

fn enrich(en: &mut Enricher, mut events: Vec<ChangeEvent>) -> Vec<ChangeEvent> {
    let dead = en.enrich(&mut events, &HashMap::new());
    assert!(dead.is_empty(), "{dead:?}");
    events
}

fn mean(chunks: &[Chunk]) -> Vec<f32> {
    let mut m = vec![0f32; chunks[0].vector.len()];
    for c in chunks {
        for (a, x) in m.iter_mut().zip(&c.vector) {
            *a += x;
        }
    }
    let norm = m.iter().map(|x| x * x).sum::<f32>().sqrt();
    m.iter().map(|x| x / norm).collect()
}

#[test]
fn a_2000_token_text_is_embedded_in_overlapping_windows_each_equal_to_its_text_alone() {
    let text = words(2000, 1);
    assert_eq!(
        token_count(&text),
        2000,
        "the fixture words are not one token each"
    );
    let mut en = Enricher::new(&config(ChunkStore::Rows)).unwrap();
    let out = enrich(&mut en, vec![doc(Op::Insert, 1, &text, "new", 10)]);
    let chunks = out[0]
        .chunks
        .clone()
        .expect("a long text under store = rows carries chunks");
    // Windows of 200 tokens, each starting 150 after the one before: 1 + ⌈1800 / 150⌉.
    assert_eq!(chunks.len(), 13);
    let chars: Vec<char> = text.chars().collect();
    let mut alone = Embedder::load(&config(ChunkStore::Rows)).unwrap();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.seq as usize, i);
        let at: String = chars[c.start as usize..c.end as usize].iter().collect();
        assert_eq!(at, c.text, "chunk {i}'s offsets do not locate its text");
        let tokens = token_count(&c.text);
        if i + 1 < chunks.len() {
            assert_eq!(tokens, 200, "chunk {i}");
            assert!(
                chunks[i + 1].start < c.end,
                "chunk {} does not overlap {i}",
                i + 1
            );
            let shared: String = chars[chunks[i + 1].start as usize..c.end as usize]
                .iter()
                .collect();
            assert_eq!(token_count(&shared), 50, "chunks {i} and {} share", i + 1);
        } else {
            assert!(tokens <= 200);
            assert_eq!(c.end as usize, chars.len(), "the last chunk ends the text");
        }
        let own = alone.embed(&[&c.text]).unwrap().remove(0);
        let cos = cosine(&own, &c.vector);
        assert!(
            cos > 1.0 - 1e-6,
            "chunk {i}: cosine {cos} to embedding it alone"
        );
    }
    let row = out[0].embedding.as_ref().unwrap();
    assert!(
        cosine(row, &mean(&chunks)) > 1.0 - 1e-6,
        "the row vector is not the chunks' mean"
    );

    // store = "mean": the same row vector, no chunk rows.
    let mut en = Enricher::new(&config(ChunkStore::Mean)).unwrap();
    let out_mean = enrich(&mut en, vec![doc(Op::Insert, 1, &text, "new", 10)]);
    assert_eq!(out_mean[0].chunks, None);
    assert!(cosine(out_mean[0].embedding.as_ref().unwrap(), row) > 1.0 - 1e-6);
}

#[test]
fn mixed_short_and_long_texts_in_one_batch_give_the_vectors_of_one_by_one() {
    let long = words(900, 2);
    let texts = [
        "a short note".to_owned(),
        long.clone(),
        words(120, 3),
        "another short one".to_owned(),
        words(450, 4),
    ];
    let batch: Vec<ChangeEvent> = texts
        .iter()
        .zip(1..)
        .map(|(t, id)| doc(Op::Insert, id, t, "s", 10))
        .collect();
    let together = enrich(
        &mut Enricher::new(&config(ChunkStore::Rows)).unwrap(),
        batch,
    );
    let mut plain = Embedder::load(&EmbeddingConfig::for_model(model_dir())).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let one = enrich(
            &mut Enricher::new(&config(ChunkStore::Rows)).unwrap(),
            vec![doc(Op::Insert, i as i32 + 1, t, "s", 10)],
        );
        let (a, b) = (&together[i], &one[0]);
        let (ca, cb) = (a.chunks.as_ref().unwrap(), b.chunks.as_ref().unwrap());
        assert_eq!(ca.len(), cb.len(), "text {i}: chunk count");
        for (x, y) in ca.iter().zip(cb) {
            assert_eq!((x.start, x.end), (y.start, y.end));
            assert!(
                cosine(&x.vector, &y.vector) > 1.0 - 1e-6,
                "text {i} chunk {}",
                x.seq
            );
        }
        let cos = cosine(a.embedding.as_ref().unwrap(), b.embedding.as_ref().unwrap());
        assert!(cos > 1.0 - 1e-6, "text {i}: {cos}");
        if token_count(t) <= 200 {
            // A text that fits is one chunk: its vector is the unchunked embedding.
            assert_eq!(ca.len(), 1);
            let whole = plain.embed(&[t]).unwrap().remove(0);
            assert!(cosine(&whole, a.embedding.as_ref().unwrap()) > 1.0 - 1e-6);
        }
    }
}

fn sink_config(schema: &str) -> tributary::config::PgvectorSinkConfig {
    let text = format!(
        "name = \"t\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\n[[sources.kafka.topics]]\nname = \"o\"\n\
         [sinks.pgvector]\nurl = \"{}\"\nschema = \"{schema}\"\n",
        env("TRIBUTARY_PG_URL")
    );
    Config::parse(&text, Path::new("."), |_| None)
        .unwrap()
        .sinks
        .pgvector
        .unwrap()
}

/// The chunk table as (id, seq, chunk text equals the payload's note at its offsets, xmin).
async fn chunk_rows(c: &tokio_postgres::Client, schema: &str) -> Vec<(i32, i32, bool, String)> {
    c.query(
        &format!(
            "SELECT c.id, c.chunk_seq,
                    substring(t.payload->>'note' from c.chunk_start + 1
                              for c.chunk_end - c.chunk_start) = c.chunk,
                    c.xmin::text
               FROM \"{schema}\".docs_chunks c JOIN \"{schema}\".docs t USING (id)
              ORDER BY c.id, c.chunk_seq"
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

fn count_of(rows: &[(i32, i32, bool, String)], id: i32) -> usize {
    rows.iter().filter(|r| r.0 == id).count()
}

#[tokio::test]
async fn the_chunk_table_follows_updates_deletes_and_truncates_of_the_source_row() {
    let schema = unique("chunks");
    let mut sink = PgvectorSink::connect(sink_config(&schema)).await.unwrap();
    let client = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let mut en = Enricher::new(&config(ChunkStore::Rows)).unwrap();
    let long = words(2000, 5);

    let first = enrich(
        &mut en,
        vec![
            doc(Op::Snapshot, 1, &long, "new", 10),
            doc(Op::Snapshot, 2, "a short note", "new", 10),
        ],
    );
    sink.write(&first).await.unwrap();
    let rows = chunk_rows(&client, &schema).await;
    assert_eq!((count_of(&rows, 1), count_of(&rows, 2)), (13, 1));
    assert!(
        rows.iter().all(|r| r.2),
        "a chunk's offsets do not locate its text: {rows:?}"
    );
    let seqs: Vec<i32> = rows.iter().filter(|r| r.0 == 1).map(|r| r.1).collect();
    assert_eq!(seqs, (0..13).collect::<Vec<_>>());
    let stored: pgvector::Vector = client
        .query_one(
            &format!("SELECT embedding FROM \"{schema}\".docs WHERE id = 1"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        Some(stored.to_vec()),
        first[0].embedding,
        "the row keeps the chunks' mean"
    );

    // A new text replaces all of the key's chunks: 700 tokens are 1 + ⌈500 / 150⌉ windows.
    let shorter = words(700, 6);
    sink.write(&enrich(
        &mut en,
        vec![doc(Op::Update, 1, &shorter, "edited", 20)],
    ))
    .await
    .unwrap();
    let rows = chunk_rows(&client, &schema).await;
    assert_eq!(count_of(&rows, 1), 5, "{rows:?}");
    assert!(rows.iter().all(|r| r.2), "old chunks remain: {rows:?}");
    // The first streamed change ends the snapshot: both tables get their HNSW index.
    let hnsw: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_indexes WHERE schemaname = $1 AND indexdef LIKE '%hnsw%'
              ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(hnsw, ["docs", "docs_chunks"]);

    // Only `status` changes (not in the template): no chunk row is touched, the payload is.
    let before = chunk_rows(&client, &schema).await;
    let same = enrich(&mut en, vec![doc(Op::Update, 1, &shorter, "shipped", 30)]);
    assert_eq!(same[0].chunks, None, "an unchanged text carries no chunks");
    sink.write(&same).await.unwrap();
    assert_eq!(
        chunk_rows(&client, &schema).await,
        before,
        "chunk rows were rewritten"
    );
    // After a restart, the stored hash answers the same way.
    let mut restarted = Enricher::new(&config(ChunkStore::Rows)).unwrap();
    let mut again = vec![doc(Op::Update, 1, &shorter, "returned", 40)];
    let stored_hash: HashMap<_, _> = [(
        tributary::enrich::cache_key(&again[0]),
        same[0].text_hash.unwrap(),
    )]
    .into_iter()
    .collect();
    assert!(restarted.enrich(&mut again, &stored_hash).is_empty());
    assert_eq!(
        (again[0].embedding.as_ref(), again[0].chunks.as_ref()),
        (None, None)
    );
    sink.write(&again).await.unwrap();
    assert_eq!(
        chunk_rows(&client, &schema).await,
        before,
        "chunk rows were rewritten"
    );
    let status: String = client
        .query_one(
            &format!("SELECT payload->>'status' FROM \"{schema}\".docs WHERE id = 1"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "returned");

    // A text change and then a status change, enriched apart but written in one batch: the
    // last change per key reaches the table and still brings the new text's chunks.
    let mut two = enrich(
        &mut en,
        vec![doc(Op::Update, 2, &words(400, 7), "long now", 50)],
    );
    two.extend(enrich(
        &mut en,
        vec![doc(Op::Update, 2, &words(400, 7), "and shipped", 60)],
    ));
    assert!(two[1].chunks.is_none());
    sink.write(&two).await.unwrap();
    let rows = chunk_rows(&client, &schema).await;
    assert_eq!(count_of(&rows, 2), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r.2), "{rows:?}");

    // A delete removes all of a key's chunks; a truncate all chunks.
    let mut delete = doc(Op::Delete, 1, "", "", 70);
    delete.after = None;
    sink.write(&enrich(&mut en, vec![delete])).await.unwrap();
    let rows = chunk_rows(&client, &schema).await;
    assert_eq!((count_of(&rows, 1), count_of(&rows, 2)), (0, 3));
    let mut truncate = doc(Op::Truncate, 0, "", "", 80);
    truncate.after = None;
    truncate.key = Row::new();
    sink.write(&enrich(&mut en, vec![truncate])).await.unwrap();
    let left: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".docs_chunks"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}
