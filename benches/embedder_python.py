"""Baseline for benches/embedder.rs: Python onnxruntime running the same model.onnx with the same
thread count and the same tokenization (the `tokenizers` package reading the same tokenizer.json,
padded to the longest text, truncated at 256), mean pooling + L2 as sentence-transformers.

Usage: python embedder_python.py MODEL_DIR THREADS REPS TEXTS_FILE BATCH [BATCH ...]
Prints one line per batch size: `BATCH median_sentences_per_second`."""
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

model_dir, threads, reps, texts_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
batches = [int(b) for b in sys.argv[5:]]
texts = json.load(open(texts_file))

opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
session = ort.InferenceSession(f"{model_dir}/model.onnx", opts, providers=["CPUExecutionProvider"])
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tok.enable_padding()
tok.enable_truncation(256)


def embed(chunk):
    enc = tok.encode_batch(chunk)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    types = np.array([e.type_ids for e in enc], dtype=np.int64)
    (hidden,) = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    m = mask[:, :, None].astype(np.float32)
    pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


embed(texts[:8])  # warm-up
for b in batches:
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(0, len(texts), b):
            embed(texts[i:i + b])
        rates.append(len(texts) / (time.perf_counter() - t))
    print(b, statistics.median(rates), flush=True)
