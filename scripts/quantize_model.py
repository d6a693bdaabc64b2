#!/usr/bin/env python3
"""Write a faithful int8 copy of an ONNX sentence-embedding model folder, and prove it.

Why not onnxruntime's `quantize_dynamic`: it quantizes each activation tensor with one scale for
the whole batch, so a few outlier channels and tokens of BERT's hidden states eat the 8 bits;
all-MiniLM-L6-v2 came out at a min cosine of 0.90 to its float32 self, and per-channel weights
alone only reach 0.98 (measured, README "Embedding models"). ORT's `MatMulNBits` (8-bit,
block-wise) is faithful but no faster than float32 here. Nothing in the onnxruntime wheel does
the scheme below, so this script writes the graph itself with `onnx.helper` (standard ops only,
any ONNX Runtime >= 1.14 runs it):

  for every MatMul with a constant weight W [K, N] (the attention score/context MatMuls, the
  embeddings, LayerNorm and softmax stay float32):
    smoothing   s_k = max|x_k|^a / max|W_k,:|^(1-a)  (SmoothQuant, a = --alpha, 0.5), from the
                per-channel activation maxima over calibration texts; x / s and diag(s) W give the
                same product in exact arithmetic but move the activations' outlier channels into
                the weights, where per-channel scales absorb them;
    weights     int8, symmetric, one scale per output column;
    activations uint8 (zero point 128), symmetric, one scale per *token* computed at run time
                (ReduceMax |x| over the hidden axis), so one long or odd token never coarsens
                another's;
    y = MatMulInteger(xq, Wq) * token_scale * column_scale  (exact int32 accumulation).

Calibration texts are 300 order events from kafka/generate_orders.py with a seed other than the
sample's, so the figures below are measured on texts the calibration never saw.

Checks before anything is written to --out (the build fails below a bound, never ships a bad
model): cosine of each int8 vector to the float32 model's on --fixture texts and on the 1,000
order notes of kafka/orders.sample.jsonl's generator (min >= --min-cosine 0.995, mean >=
--mean-cosine 0.998), recall@10 of the int8 nearest neighbours against the float32 ones on the
order notes (>= --min-recall 0.95), and, reported, texts/s of both models at batch 32 on one
thread in the same run (--min-speedup fails the build only when given; the machine is shared).

Usage: quantize_model.py --src DIR --out DIR [--fixture JSONL] [--alpha 0.5]
Copies tokenizer.json and config.json; the folder appears at --out atomically.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "kafka"))
import generate_orders  # noqa: E402  (the order-event generator the sample is made with)

CALIBRATION_SEED = 7
CALIBRATION_TEXTS = 300
BATCH = 32


def order_note(o):
    """An order event as the text a connector would embed: who, what, status, note."""
    items = ", ".join(f"{i['qty']} x {i['name']}" for i in o["items"])
    return (f"{o['customer_name']} ordered {items} ({o['status']}, {o['shipping_country']}): "
            f"{o['note'] or 'no note'}")


class Model:
    """One ONNX Runtime session plus the folder's tokenizer: mean-pooled, L2-normalised vectors."""

    def __init__(self, model, tokenizer, threads=1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.tok = tokenizer
        self.inputs = {i.name for i in self.session.get_inputs()}

    def feed(self, texts):
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
        return feed

    def embed(self, texts, batch=BATCH):
        out = []
        for i in range(0, len(texts), batch):
            feed = self.feed(texts[i:i + batch])
            (hidden,) = self.session.run(["last_hidden_state"], feed)
            m = feed["attention_mask"][..., None].astype(np.float64)
            pooled = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(out)


def weight_matmuls(graph):
    inits = {i.name: i for i in graph.initializer}
    return [n for n in graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2], inits


def activation_maxima(model, tok, texts):
    """Per-channel max |x| of every weight MatMul's input over the real (unmasked) tokens."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = sorted({n.input[0] for n in weight_matmuls(probe.graph)[0]})
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    m = Model(probe.SerializeToString(), tok, threads=os.cpu_count() or 1)
    maxima = {}
    for i in range(0, len(texts), BATCH):
        feed = m.feed(texts[i:i + BATCH])
        valid = feed["attention_mask"].astype(bool)
        for name, x in zip(names, m.session.run(names, feed)):
            a = np.abs(x[valid]).max(0)
            maxima[name] = np.maximum(maxima[name], a) if name in maxima else a
    return maxima


def quantize(model, maxima, alpha):
    """Rewrites every weight MatMul of `model` (in place) as described in the module doc."""
    g = model.graph
    wmm, inits = weight_matmuls(g)
    wmm = {n.output[0] for n in wmm}

    def const(name, arr):
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    const("q8_eps", np.array(1e-12, np.float32))
    const("q8_127", np.array(127.0, np.float32))
    const("q8_128", np.array(128.0, np.float32))
    const("q8_zp", np.array(128, np.uint8))
    nodes = []

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    for n in list(g.node):
        if n.output[0] not in wmm:
            nodes.append(n)
            continue
        p, x, y = n.name or n.output[0], n.input[0], n.output[0]
        w_init = inits[n.input[1]]
        w = numpy_helper.to_array(w_init).astype(np.float64)
        s = np.maximum(maxima[x], 1e-5) ** alpha / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha)
        w = w * s[:, None]
        col = np.maximum(np.abs(w).max(0), 1e-12) / 127.0
        wq = np.clip(np.rint(w / col), -127, 127).astype(np.int8)
        g.initializer.remove(w_init)
        xs = node("Mul", [x, const(p + "_q8_smooth", (1.0 / s).astype(np.float32))], p + "_q8_xs")
        amax = node("ReduceMax", [node("Abs", [xs], p + "_q8_abs")], p + "_q8_amax", axes=[-1], keepdims=1)
        scale = node("Div", [node("Max", [amax, "q8_eps"], p + "_q8_amax_e"), "q8_127"], p + "_q8_tscale")
        shifted = node("Add", [node("Round", [node("Div", [xs, scale], p + "_q8_xdiv")], p + "_q8_xr"), "q8_128"],
                       p + "_q8_xo")
        xq = node("Cast", [shifted], p + "_q8_xq", to=TensorProto.UINT8)
        acc = node("MatMulInteger", [xq, const(p + "_q8_W", wq), "q8_zp",
                                     const(p + "_q8_wzp", np.zeros(wq.shape[1], np.int8))], p + "_q8_acc")
        yf = node("Mul", [node("Cast", [acc], p + "_q8_accf", to=TensorProto.FLOAT), scale], p + "_q8_yt")
        node("Mul", [yf, const(p + "_q8_cscale", col.astype(np.float32))], y)
    del g.node[:]
    g.node.extend(nodes)
    model.producer_name = "tributary/quantize_model.py"
    onnx.checker.check_model(model, full_check=True)
    return len(wmm)


def recall_at(ref, got, k=10):
    """Mean share of each text's k nearest neighbours under `ref` that `got` also ranks top k."""
    sr, sg = ref @ ref.T, got @ got.T
    np.fill_diagonal(sr, -np.inf)
    np.fill_diagonal(sg, -np.inf)
    tr, tg = np.argsort(-sr, 1)[:, :k], np.argsort(-sg, 1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(tr, tg)]))


def texts_per_second(models, texts, reps=3):
    """Median texts/s of each model, the runs interleaved so load on the machine hits all alike."""
    for m in models:
        m.embed(texts[:8])
    rates = [[] for _ in models]
    for _ in range(reps):
        for m, r in zip(models, rates):
            t = time.perf_counter()
            m.embed(texts)
            r.append(len(texts) / (time.perf_counter() - t))
    return [float(np.median(r)) for r in rates]


def check(src, candidate, tok, fixture, args):
    """Prints the figures; returns the list of bounds that failed."""
    f32, q8 = Model(os.path.join(src, "model.onnx"), tok), Model(candidate, tok)
    notes = [order_note(o) for o in generate_orders.generate()]
    corpora = [("order notes", notes)]
    if fixture:
        corpora.insert(0, ("fixture", [json.loads(line)["text"] for line in open(fixture, encoding="utf-8") if line.strip()]))
    failed = []
    for label, texts in corpora:
        ref, got = f32.embed(texts), q8.embed(texts)
        cos = (ref * got).sum(1)
        line = f"int8 vs float32, {label} ({len(texts)} texts): min cosine {cos.min():.5f}, mean {cos.mean():.5f}"
        if cos.min() < args.min_cosine:
            failed.append(f"{label}: min cosine {cos.min():.5f} < {args.min_cosine}")
        if cos.mean() < args.mean_cosine:
            failed.append(f"{label}: mean cosine {cos.mean():.5f} < {args.mean_cosine}")
        if label == "order notes":
            rec = recall_at(ref, got)
            line += f", recall@10 {rec:.4f}"
            if rec < args.min_recall:
                failed.append(f"{label}: recall@10 {rec:.4f} < {args.min_recall}")
        print(line, file=sys.stderr)
    fast, slow = texts_per_second([q8, f32], notes[:192])
    print(f"int8 {fast:.1f} texts/s vs float32 {slow:.1f} texts/s (batch {BATCH}, 1 thread, median of 3): "
          f"{fast / slow:.2f}x", file=sys.stderr)
    if args.min_speedup and fast / slow < args.min_speedup:
        failed.append(f"speed-up {fast / slow:.2f}x < {args.min_speedup}x")
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", required=True, help="float32 model folder (model.onnx, tokenizer.json, config.json)")
    ap.add_argument("--out", required=True, help="folder to write")
    ap.add_argument("--fixture", help="JSONL of {text, ...}: texts to check fidelity on as well")
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (0.5)")
    ap.add_argument("--min-cosine", type=float, default=0.995)
    ap.add_argument("--mean-cosine", type=float, default=0.998)
    ap.add_argument("--min-recall", type=float, default=0.95)
    ap.add_argument("--min-speedup", type=float, default=0.0, help="fail below this int8/float32 ratio (off)")
    args = ap.parse_args()

    t0 = time.monotonic()
    tok = Tokenizer.from_file(os.path.join(args.src, "tokenizer.json"))
    model = onnx.load(os.path.join(args.src, "model.onnx"))
    calibration = [order_note(o) for o in generate_orders.generate(CALIBRATION_SEED, CALIBRATION_TEXTS)]
    maxima = activation_maxima(model, tok, calibration)
    count = quantize(model, maxima, args.alpha)

    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".int8-", dir=parent)
    try:
        onnx.save(model, os.path.join(tmp, "model.onnx"))
        for name in ("tokenizer.json", "config.json"):
            shutil.copy2(os.path.join(args.src, name), os.path.join(tmp, name))
        print(f"quantized {count} MatMuls (alpha {args.alpha}, calibrated on {len(calibration)} texts) "
              f"in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        failed = check(args.src, os.path.join(tmp, "model.onnx"), tok, args.fixture, args)
        if failed:
            print("FAIL: the int8 model is not written: " + "; ".join(failed), file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
            sys.exit(1)
        if os.path.exists(args.out):
            shutil.rmtree(args.out)
        os.rename(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
