//! Embedding throughput: Tributary's in-process ONNX Runtime against Python onnxruntime on the
//! same model, thread count and tokenization (benches/embedder_python.py), in the same run.
//!
//! Run: `scripts/services up && eval "$(scripts/services env)" &&
//!       cargo bench --profile dev --bench embedder`
//! 1. Rust against Python on `TRIBUTARY_MODEL_DIR`: sentences/s (median of REPS) at batch
//!    1/8/32/128 for short (~12 tokens) and medium (~100 tokens) texts.
//! 2. With `TRIBUTARY_MODEL_FUSED_DIR` set (a model built by `scripts/build_minilm_onnx.py
//!    --fused`: onnxruntime's com.microsoft kernels): that graph against the plain one and
//!    against Python on the plain one, batch 32, 1 and 2 threads.
//! 3. The int8 copy (`TRIBUTARY_MODEL_INT8_DIR`) against float32, batch 32, 1 and 2 threads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tributary::config::EmbeddingConfig;
use tributary::enrich::Embedder;

const BATCHES: [usize; 4] = [1, 8, 32, 128];
const REPS: usize = 3;
const THREADS: usize = 1;

fn short_texts(n: usize) -> Vec<String> {
    let items = [
        "lamps",
        "a rug",
        "two chairs",
        "a kettle",
        "blue towels",
        "a desk",
    ];
    (0..n)
        .map(|i| {
            format!(
                "Customer {i} ordered {} for delivery on Friday.",
                items[i % items.len()]
            )
        })
        .collect()
}

fn medium_texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "Order {i}: the customer asked for the blue variant of the reading lamp, gift \
                 wrapped, with a handwritten card that says happy birthday to my sister. Please \
                 deliver after five in the evening to the back door because the front bell is \
                 broken, and call ahead if the parcel does not fit the letterbox. They also want \
                 to swap the rug from order {} for the larger size if it is still in stock, and \
                 asked whether the kettle comes with a two year warranty.",
                i + 1000
            )
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn dir(var: &str) -> PathBuf {
    PathBuf::from(
        std::env::var(var)
            .unwrap_or_else(|_| panic!("{var} is not set: eval \"$(scripts/services env)\" first")),
    )
}

/// Python onnxruntime's sentences/s (median of REPS) on `model_dir`, one figure per batch size.
fn python_rates(model_dir: &Path, threads: usize, texts: &[String], batches: &[usize]) -> Vec<f64> {
    let python = std::env::var("TRIBUTARY_PYTHON").expect("TRIBUTARY_PYTHON");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/embedder_python.py");
    let file = std::env::temp_dir().join(format!("tributary-bench-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_string(texts).unwrap()).unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg(model_dir)
        .arg(threads.to_string())
        .arg(REPS.to_string())
        .arg(&file)
        .args(batches.iter().map(|b| b.to_string()))
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect()
}

fn load(dir: &Path, threads: usize) -> Embedder {
    let mut cfg = EmbeddingConfig::for_model(dir.to_path_buf());
    cfg.intra_threads = Some(threads);
    Embedder::load(&cfg).unwrap()
}

fn main() {
    let model_dir = dir("TRIBUTARY_MODEL_DIR");
    let mut embedder = load(&model_dir, THREADS);
    println!("all-MiniLM-L6-v2, {THREADS} intra-op thread, sentences/s (median of {REPS})");
    println!("| texts | batch | Tributary (Rust, ort) | Python onnxruntime | ratio |");
    println!("|---|---|---|---|---|");
    for (label, texts) in [
        ("short ~12 tok", short_texts(256)),
        ("medium ~100 tok", medium_texts(64)),
    ] {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        embedder.embed(&refs[..8]).unwrap();
        let rust: Vec<f64> = BATCHES
            .iter()
            .map(|&b| {
                median(
                    (0..REPS)
                        .map(|_| {
                            let t = Instant::now();
                            for chunk in refs.chunks(b) {
                                embedder.embed(chunk).unwrap();
                            }
                            refs.len() as f64 / t.elapsed().as_secs_f64()
                        })
                        .collect(),
                )
            })
            .collect();
        let py = python_rates(&model_dir, THREADS, &texts, &BATCHES);
        for (i, b) in BATCHES.iter().enumerate() {
            println!(
                "| {label} | {b} | {:.0} | {:.0} | {:.2} |",
                rust[i],
                py[i],
                rust[i] / py[i]
            );
        }
    }
    match std::env::var_os("TRIBUTARY_MODEL_FUSED_DIR") {
        Some(fused_dir) => fused_vs_plain(Path::new(&fused_dir), &model_dir),
        None => println!("\nTRIBUTARY_MODEL_FUSED_DIR is not set: the fused graph skipped"),
    }
    int8_vs_float32(&model_dir);
}

fn fused_vs_plain(fused_dir: &Path, plain_dir: &Path) {
    println!(
        "\nfused float32 ({}) vs the plain graph, batch 32, sentences/s (median of {REPS})",
        fused_dir.display()
    );
    println!("| texts | threads | plain | fused | ratio | Python, plain | fused / Python |");
    println!("|---|---|---|---|---|---|---|");
    for threads in [1, 2] {
        let (mut plain, mut fused) = (load(plain_dir, threads), load(fused_dir, threads));
        for (label, texts) in [
            ("short ~12 tok", short_texts(256)),
            ("medium ~100 tok", medium_texts(64)),
        ] {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let (p, f) = (rate(&mut plain, &refs), rate(&mut fused, &refs));
            let py = python_rates(plain_dir, threads, &texts, &[32])[0];
            println!(
                "| {label} | {threads} | {p:.0} | {f:.0} | {:.2} | {py:.0} | {:.2} |",
                f / p,
                f / py
            );
        }
    }
}

/// Texts/s (median of REPS) of `embedder` over `texts` in batches of 32.
fn rate(embedder: &mut Embedder, texts: &[&str]) -> f64 {
    embedder.embed(&texts[..8]).unwrap();
    median(
        (0..REPS)
            .map(|_| {
                let t = Instant::now();
                for chunk in texts.chunks(32) {
                    embedder.embed(chunk).unwrap();
                }
                texts.len() as f64 / t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn int8_vs_float32(float_dir: &Path) {
    let Some(int8_dir) = std::env::var_os("TRIBUTARY_MODEL_INT8_DIR").map(PathBuf::from) else {
        println!("TRIBUTARY_MODEL_INT8_DIR is not set: int8 skipped");
        return;
    };
    println!(
        "\nint8 ({}) vs float32, batch 32, sentences/s (median of {REPS})",
        int8_dir.display()
    );
    println!("| texts | threads | float32 | int8 | ratio |");
    println!("|---|---|---|---|---|");
    for threads in [1, 2] {
        let (mut f32_model, mut int8_model) = (load(float_dir, threads), load(&int8_dir, threads));
        for (label, texts) in [
            ("short ~12 tok", short_texts(256)),
            ("medium ~100 tok", medium_texts(64)),
        ] {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let (f, q) = (rate(&mut f32_model, &refs), rate(&mut int8_model, &refs));
            println!("| {label} | {threads} | {f:.0} | {q:.0} | {:.2} |", q / f);
        }
    }
}
