//! The embedding stage with the real all-MiniLM-L6-v2 model and ONNX Runtime.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::env;
use common::vectors::cosine;
use tributary::config::EmbeddingConfig;
use tributary::enrich::{Embedder, Enricher, NoLookups};
use tributary::event::{ChangeEvent, Lsn, Op, Row, Value};

fn model_config() -> EmbeddingConfig {
    EmbeddingConfig::for_model(PathBuf::from(env("TRIBUTARY_MODEL_DIR")))
}

fn reference() -> Vec<(String, Vec<f32>)> {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm-reference.jsonl"),
    )
    .unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let emb = v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (v["text"].as_str().unwrap().to_owned(), emb)
        })
        .collect()
}

#[test]
fn matches_sentence_transformers_one_by_one_and_in_one_batch() {
    let refs = reference();
    assert!(refs.len() >= 5, "fixture too small");
    let mut e = Embedder::load(&model_config()).unwrap();
    assert_eq!(e.dimension(), 384);
    for (text, want) in &refs {
        let got = e.embed(&[text]).unwrap().remove(0);
        let c = cosine(&got, want);
        assert!(c >= 0.99999, "cosine {c} for {text:?}");
    }
    let texts: Vec<&str> = refs.iter().map(|(t, _)| t.as_str()).collect();
    let batch = e.embed(&texts).unwrap();
    for ((text, want), got) in refs.iter().zip(&batch) {
        let c = cosine(got, want);
        assert!(c >= 0.99999, "cosine {c} for {text:?} in a batch");
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}

/// The int8 copy scripts/services builds (scripts/quantize_model.py) is a model a user may pick
/// for speed: its vectors must stay within the documented bounds of the float32 model's
/// (min cosine 0.995, mean 0.998), alone and in a padded batch.
#[test]
fn the_int8_model_stays_within_its_fidelity_bounds() {
    let refs = reference();
    let mut cfg = EmbeddingConfig::for_model(PathBuf::from(env("TRIBUTARY_MODEL_INT8_DIR")));
    cfg.intra_threads = Some(1);
    let mut e = Embedder::load(&cfg).unwrap();
    assert_eq!(e.dimension(), 384);
    let texts: Vec<&str> = refs.iter().map(|(t, _)| t.as_str()).collect();
    let alone: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| e.embed(&[t]).unwrap().remove(0))
        .collect();
    let batch = e.embed(&texts).unwrap();
    for (mode, got) in [("alone", &alone), ("in a batch", &batch)] {
        let cos: Vec<f64> = refs
            .iter()
            .zip(got)
            .map(|((_, want), v)| cosine(v, want))
            .collect();
        let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = cos.iter().sum::<f64>() / cos.len() as f64;
        assert!(min >= 0.995, "{mode}: min cosine {min} < 0.995 ({cos:?})");
        assert!(mean >= 0.998, "{mode}: mean cosine {mean} < 0.998");
    }
}

/// Token-aware batching: a window of short texts with long ones among them is sorted by length
/// and cut by padded tokens, so the short texts run together and are not padded to a long
/// text's length — and every vector is the one the text gets alone.
#[test]
fn a_mixed_short_and_long_window_is_cut_by_tokens_and_matches_one_by_one() {
    let mut cfg = model_config();
    cfg.max_batch = 8;
    cfg.max_batch_tokens = 256;
    let mut e = Embedder::load(&cfg).unwrap();
    let long = |i: usize| {
        format!(
            "Ticket {i}: {}",
            "the parcel arrived late and the lamp shade was cracked again, please send a \
             replacement before the weekend. "
                .repeat(8)
        )
    };
    let owned: Vec<String> = vec![
        "a rug".into(),
        long(1),
        "two chairs for the kitchen".into(),
        "late delivery".into(),
        long(2),
        "refund the kettle".into(),
        long(3),
        "gift wrap please".into(),
    ];
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let (vectors, runs) = e.embed_runs(&texts);
    // Five short texts (< 20 tokens each) fit one run of 256 padded tokens; each long text
    // (~150 tokens) needs a run of its own.
    let sizes: Vec<usize> = runs.iter().map(|r| r.texts).collect();
    assert_eq!(sizes, vec![5, 1, 1, 1], "runs {runs:?}");
    for (text, got) in texts.iter().zip(&vectors) {
        let got = got.as_ref().unwrap();
        let alone = e.embed(&[text]).unwrap().remove(0);
        let c = cosine(got, &alone);
        assert!(c > 0.999_999, "cosine {c} to the text alone: {text:?}");
    }
}

#[test]
fn identical_text_gives_identical_vectors_whatever_the_batch() {
    let mut e = Embedder::load(&model_config()).unwrap();
    let texts = [
        "Two lamps and a rug, deliver after 5pm.",
        "A much longer note about the order: the customer wants the blue variant, gift wrapped, \
         with a card that says happy birthday, and delivery to the back door.",
        "short",
    ];
    let alone: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| e.embed(&[t]).unwrap().remove(0))
        .collect();
    let together = e.embed(&texts).unwrap();
    let split: Vec<Vec<f32>> =
        [e.embed(&texts[..2]).unwrap(), e.embed(&texts[2..]).unwrap()].concat();
    for i in 0..3 {
        assert!(
            cosine(&alone[i], &together[i]) > 0.999_999,
            "padding changed text {i}"
        );
        assert!(
            cosine(&alone[i], &split[i]) > 0.999_999,
            "batch split changed text {i}"
        );
    }
    assert_eq!(
        e.embed(&[texts[0]]).unwrap()[0],
        alone[0],
        "same text, different vector"
    );
}

#[test]
fn awkward_texts_embed_without_error() {
    let mut e = Embedder::load(&model_config()).unwrap();
    let huge = "lamp ".repeat(200_000); // 1 MB: truncated at 256 tokens
    let texts = [
        "",
        huge.as_str(),
        "tab\there\u{0007}bell\u{0000}nul \u{200b}zero-width",
    ];
    let out = e.embed(&texts).unwrap();
    assert_eq!(out.len(), 3);
    for v in &out {
        assert_eq!(v.len(), 384);
        assert!(v.iter().all(|x| x.is_finite()));
    }
}

fn order(id: i64, note: &str, lsn: u64) -> ChangeEvent {
    ChangeEvent {
        source: "public.orders".into(),
        op: Op::Update,
        key: [("id", Value::Int64(id))].into_iter().collect(),
        before: None,
        after: Some(Row::from_iter([
            ("id", Value::Int64(id)),
            ("customer", Value::Text("Ada".into())),
            ("note", Value::Text(note.into())),
            ("status", Value::Text(format!("status at {lsn}").into())),
        ])),
        schema_version: 1,
        position: tributary::source::postgres::position(Lsn(lsn), 0),
        source_ts: None,
        embedding: None,
        text_hash: None,
        chunks: None,
        schema: None,
        origin: None,
    }
}

fn enricher() -> Enricher {
    let mut cfg = model_config();
    cfg.templates
        .insert("public.orders".into(), "{customer} ordered: {note}".into());
    Enricher::new(&cfg).unwrap()
}

#[test]
fn an_update_with_unchanged_text_does_not_run_the_model() {
    let mut en = enricher();
    let mut first = vec![order(1, "two lamps", 10), order(2, "a rug", 10)];
    assert!(en.enrich(&mut first, &HashMap::new()).is_empty());
    let after_first = en.stats();
    assert_eq!(after_first.embedded, 2);

    // Only `status` changed (not in the template); the note is an unchanged TOAST value.
    let mut second = vec![order(1, "two lamps", 20)];
    if let Some(after) = second[0].after.as_mut() {
        after.0.iter_mut().find(|c| c.name == "note").unwrap().value = Value::UnchangedToast;
    }
    assert!(en.enrich(&mut second, &HashMap::new()).is_empty());
    let s = en.stats();
    assert_eq!(
        s.model_runs, after_first.model_runs,
        "the model ran for an unchanged text"
    );
    assert_eq!(s.embedded, 2);
    assert_eq!(s.skipped_unchanged, 1);
    assert_eq!(second[0].embedding, first[0].embedding);
    assert_eq!(second[0].text_hash, first[0].text_hash);

    // A changed text runs it; a source without a template is passed through untouched.
    let mut third = vec![order(1, "three lamps", 30), {
        let mut o = order(9, "x", 30);
        o.source = "public.audit".into();
        o
    }];
    en.enrich(&mut third, &HashMap::new());
    assert_eq!(en.stats().embedded, 3);
    assert_ne!(third[0].embedding, first[0].embedding);
    assert_eq!(
        (third[1].embedding.as_ref(), third[1].text_hash),
        (None, None)
    );
}

#[test]
fn after_a_restart_the_sinks_stored_hash_avoids_the_model() {
    let mut en = enricher();
    let mut first = vec![order(1, "two lamps", 10)];
    en.enrich(&mut first, &HashMap::new());
    let hash = first[0].text_hash.unwrap();

    let mut restarted = enricher();
    let mut update = vec![order(1, "two lamps", 20)];
    let unknown: Vec<_> = restarted
        .unknown_keys(&update)
        .iter()
        .map(|e| tributary::enrich::cache_key(e))
        .collect();
    assert_eq!(unknown.len(), 1);
    let stored: HashMap<_, _> = unknown.into_iter().map(|k| (k, hash)).collect();
    restarted.enrich(&mut update, &stored);
    assert_eq!(restarted.stats().model_runs, 0);
    // No vector here: the sink keeps the one it stored.
    assert_eq!(update[0].embedding, None);
    assert_eq!(update[0].text_hash, Some(hash));
}

#[tokio::test]
async fn the_stage_batches_by_count_and_time_and_keeps_order() {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(4);
    let handle = tributary::enrich::spawn(
        enricher(),
        None::<NoLookups>,
        rx,
        out_tx,
        Duration::from_millis(50),
    );
    for i in 0..5 {
        tx.send(vec![order(i, &format!("note {i}"), 100 + i as u64)])
            .await
            .unwrap();
    }
    drop(tx);
    let mut seen = Vec::new();
    while let Some(batch) = out_rx.recv().await {
        assert!(batch.dead_letters.is_empty());
        for e in batch.events {
            assert_eq!(e.embedding.as_ref().map(Vec::len), Some(384));
            seen.push(e.key.get("id").cloned());
        }
    }
    let en = handle.await.unwrap();
    assert_eq!(
        seen,
        (0..5).map(|i| Some(Value::Int64(i))).collect::<Vec<_>>()
    );
    // Five one-event batches arriving together were embedded in fewer model runs.
    assert!(en.stats().model_runs < 5, "{:?}", en.stats());
}

fn run_embed(args: &[&str], envs: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("embed")
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_embeds_lines_and_replaces_invalid_utf8() {
    let model = env("TRIBUTARY_MODEL_DIR");
    let (code, out, err) = run_embed(
        &["--model", &model],
        &[],
        b"hello world\n\xff\xfe broken\n\n",
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Vec<f32>> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|v| v.len() == 384));
    let mut e = Embedder::load(&model_config()).unwrap();
    let direct = e.embed(&["hello world"]).unwrap().remove(0);
    assert!(cosine(&lines[0], &direct) > 0.999_999);
}

#[test]
fn bad_model_folders_and_runtimes_are_named() {
    let model = PathBuf::from(env("TRIBUTARY_MODEL_DIR"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(model.join("model.onnx"), dir.path().join("model.onnx")).unwrap();
    let (code, _, err) = run_embed(&["--model", dir.path().to_str().unwrap()], &[], b"x\n");
    assert_eq!(code, 2);
    assert!(err.contains("tokenizer.json is missing"), "{err}");

    // A missing ONNX Runtime library names the path it tried.
    let (code, _, err) = run_embed(
        &["--model", model.to_str().unwrap()],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
        b"x\n",
    );
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");

    // An ONNX file that is not a sentence-embedding model: its inputs are named.
    std::fs::copy(
        model.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let script = format!(
        "import onnx\nfrom onnx import helper, TensorProto\n\
         x = helper.make_tensor_value_info('pixels', TensorProto.FLOAT, [1, 3])\n\
         y = helper.make_tensor_value_info('logits', TensorProto.FLOAT, [1, 3])\n\
         g = helper.make_graph([helper.make_node('Identity', ['pixels'], ['logits'])], 'g', [x], [y])\n\
         onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)]), '{}')\n",
        dir.path().join("model.onnx").display()
    );
    let status = Command::new(env("TRIBUTARY_PYTHON"))
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    let err = Embedder::load(&EmbeddingConfig::for_model(dir.path().to_owned())).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("model.onnx") && text.contains("pixels"),
        "{text}"
    );
}

#[tokio::test]
async fn with_the_pgvector_sink_an_unchanged_text_after_restart_keeps_the_stored_vector() {
    use tributary::sink::pgvector::PgvectorSink;
    let schema = common::unique("emb");
    let text = format!(
        "name = \"t\"\n[sources.kafka]\nbrokers = \"x:1\"\ngroup_id = \"g\"\n[[sources.kafka.topics]]\nname = \"o\"\n\
         [sinks.pgvector]\nurl = \"{}\"\nschema = \"{schema}\"\n",
        env("TRIBUTARY_PG_URL")
    );
    let cfg = tributary::config::Config::parse(&text, std::path::Path::new("."), |_| None)
        .unwrap()
        .sinks
        .pgvector
        .unwrap();
    let mut sink = PgvectorSink::connect(cfg.clone()).await.unwrap();

    let run = |en: Enricher, sink: PgvectorSink, events: Vec<ChangeEvent>| async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(1);
        let h = tributary::enrich::spawn(en, Some(sink), rx, out_tx, Duration::from_millis(10));
        tx.send(events).await.unwrap();
        drop(tx);
        let out = out_rx.recv().await.unwrap();
        (h.await.unwrap(), out.events)
    };
    let (_, events) = run(
        enricher(),
        PgvectorSink::connect(cfg.clone()).await.unwrap(),
        vec![order(1, "two lamps", 10)],
    )
    .await;
    sink.write(&events).await.unwrap();
    let stored = events[0].embedding.clone().unwrap();

    // A restarted enricher (empty cache) sees an update whose text did not change.
    let (en, events) = run(
        enricher(),
        PgvectorSink::connect(cfg.clone()).await.unwrap(),
        vec![order(1, "two lamps", 20)],
    )
    .await;
    assert_eq!(
        en.stats().model_runs,
        0,
        "the model ran for a text the sink already had"
    );
    assert_eq!(events[0].embedding, None);
    sink.write(&events).await.unwrap();
    let client = common::pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let row = client
        .query_one(
            &format!("SELECT embedding, payload->>'status' FROM \"{schema}\".orders"),
            &[],
        )
        .await
        .unwrap();
    let kept: pgvector::Vector = row.get(0);
    assert_eq!(kept.to_vec(), stored, "the stored vector was not kept");
    assert_eq!(
        row.get::<_, String>(1),
        "status at 20",
        "the payload was not updated"
    );
}

/// A model that answers a batch with fewer rows than it was given (here: always the first row
/// only) is an error naming the shapes, never a panic on the slice.
#[test]
fn a_model_returning_fewer_rows_than_texts_is_an_error() {
    let model = PathBuf::from(env("TRIBUTARY_MODEL_DIR"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        model.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let script = format!(
        "import onnx\nfrom onnx import helper, TensorProto\n\
         ids = helper.make_tensor_value_info('input_ids', TensorProto.INT64, ['b', 's'])\n\
         mask = helper.make_tensor_value_info('attention_mask', TensorProto.INT64, ['b', 's'])\n\
         out = helper.make_tensor_value_info('last_hidden_state', TensorProto.FLOAT, ['one', 's', 4])\n\
         c = lambda n, v: helper.make_tensor(n, TensorProto.INT64, [len(v)], v)\n\
         nodes = [\n\
           helper.make_node('Cast', ['input_ids'], ['f'], to=TensorProto.FLOAT),\n\
           helper.make_node('Slice', ['f', 'starts', 'ends', 'axes'], ['first']),\n\
           helper.make_node('Unsqueeze', ['first', 'ax2'], ['col']),\n\
           helper.make_node('Expand', ['col', 'shape'], ['last_hidden_state']),\n\
         ]\n\
         inits = [c('starts', [0]), c('ends', [1]), c('axes', [0]), c('ax2', [2]), c('shape', [1, 1, 4])]\n\
         g = helper.make_graph(nodes, 'g', [ids, mask], [out], initializer=inits)\n\
         onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)]), '{}')\n",
        dir.path().join("model.onnx").display()
    );
    let status = Command::new(env("TRIBUTARY_PYTHON"))
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    let mut embedder = Embedder::load(&EmbeddingConfig::for_model(dir.path().to_owned())).unwrap();
    // One text: the model's one row is right.
    let one = embedder.embed(&["a single text"]).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].len(), 4);
    // Three texts, one row back: a clear error with both shapes.
    let err = embedder
        .embed(&["first text", "second", "the third text"])
        .unwrap_err();
    assert!(
        err.contains("model output has shape") && err.contains("expected [3,"),
        "{err}"
    );
}
