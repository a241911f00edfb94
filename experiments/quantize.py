"""Weight quantization on the real SmolLM2-135M: method x bits x group.

    python experiments/quantize.py --windows=16 --calib_batches=8

For each configuration: exact bytes and bits/param of the layer kernels,
perplexity on held-out Austen (Persuasion) relative to the float baseline (the
GGUF's dequantized weights: they were stored as Q4_1 with blocks of 32, so
asymmetric int4 with group 32 would re-quantize them losslessly; groups here
are 64 and 192), and time to quantize.  Directions to show: AWQ and GPTQ beat
RTN at int4 and int3; NF4 beats absmax int4; LLM.int8() and SmoothQuant keep
perplexity where naive W8A8 (per-token int8 activations) degrades -- SmolLM2's
MLP down-projection inputs carry outlier features up to |x| ~ 100; SpQR-style
outliers beat RTN at the same small groups.  Calibration statistics are
collected once and shared; its time is added to each calibrated method's.  Writes results/quantize.json and
results/quantize.png (perplexity vs bits/param).
"""
import os
import time

from absl import app, flags

import memlab as ml
from memlab import data, results
from memlab.evaluate import perplexity

FLAGS = flags.FLAGS
flags.DEFINE_integer("seq", 512, "Evaluation window length.")
flags.DEFINE_integer("windows", 16, "Evaluation windows from the test book.")
flags.DEFINE_integer("calib_batches", 8, "Calibration batches (4 x 256 tokens each, train books).")
flags.DEFINE_list("configs", [], "Subset of configuration names to run (default: all).")
flags.DEFINE_string("out", "results/quantize.json", "Output JSON.")
flags.DEFINE_enum("part", "all", ["all", "smollm2", "minilm"], "Which model(s) to run; a part "
                  "updates its own key in the output JSON.")
flags.DEFINE_integer("sentences", 256, "Held-out sentences for the MiniLM embedding comparison.")


def configs():
    q, m = ml.quant, ml.quant.methods
    out = {}
    for bits in (4, 3):
        for group in (64, 192):
            fmt = q.intn(bits, group)
            out[f"rtn-int{bits}-g{group}"] = m.get("rtn")(fmt)
            out[f"awq-int{bits}-g{group}"] = m.get("awq")(fmt)
            out[f"gptq-int{bits}-g{group}"] = m.get("gptq")(fmt)
    out["rtn-int4-g64-sym(absmax)"] = m.get("rtn")(q.int4(64, symmetric=True))
    out["rtn-nf4-b64"] = m.get("rtn")(q.nf4(64, double_quant=False))
    out["rtn-nf4-b64-dq"] = m.get("rtn")(q.nf4(64, double_quant=True))
    out["rtn-int8"] = m.get("rtn")(q.int8())
    out["w8a8-naive"] = m.get("rtn")(q.w8a8())
    out["llm.int8-t6"] = m.get("rtn")(q.llm_int8(6.0))
    out["smoothquant-a0.5"] = m.get("smoothquant")(0.5)
    out["spqr-int3-g16-o1%"] = m.get("spqr")(3, 16, 0.01)
    out["rtn-int3-g16"] = m.get("rtn")(q.intn(3, 16))
    out["rtn-fp8-e4m3"] = m.get("rtn")(q.fp8("e4m3"))
    out["rtn-fp4-g32"] = m.get("rtn")(q.fp4(32))
    return out


def main(_):
    if FLAGS.part in ("all", "smollm2"):
        run_smollm2()
    if FLAGS.part in ("all", "minilm"):
        run_minilm()


def _sentences(text, n, min_words=6):
    import re
    sents = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in sents if len(s.split()) >= min_words][:n]


def run_minilm():
    """Real fp32 weights: relative weight MSE and sentence-embedding cosine similarity."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from memlab.models import bert

    model = bert.load_minilm()
    corpus = data.load_corpus("austen")
    held_out = _sentences(corpus.text("test"), FLAGS.sentences)
    calib_text = _sentences(corpus.text("train"), 512)
    ids, mask = bert.encode_batch(model.tokenizer, held_out)
    embed = jax.jit(lambda m, i, k: m(i, k))
    ref = np.asarray(embed(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    # the encoder takes (ids, mask): calibration batches are tuples of its inputs
    calib = [bert.encode_batch(model.tokenizer, calib_text[i:i + 64]) for i in range(0, 512, 64)]
    stats = None
    q, m = ml.quant, ml.quant.methods
    cfgs = {"rtn-int8": m.get("rtn")(q.int8()),
            "rtn-nf4-b64": m.get("rtn")(q.nf4(64, False)),
            "rtn-int4-g64-sym(absmax)": m.get("rtn")(q.int4(64, symmetric=True))}
    for bits in (4, 3):
        for group in (64, 192):
            fmt = q.intn(bits, group)
            for name in ("rtn", "awq", "gptq"):
                cfgs[f"{name}-int{bits}-g{group}"] = m.get(name)(fmt)
    kernels = {ml.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(model.params)[0]
               if ml.path_str(p).endswith("kernel")}
    n_kernel = sum(x.size for x in kernels.values())
    rows = []
    for name, method in cfgs.items():
        if method.needs_calibration and stats is None:
            stats = ml.quant.calibrate.collect(model, calib)
        t0 = time.perf_counter()
        qm = ml.passes.quantize(method)(model, calib=stats)
        secs = time.perf_counter() - t0
        qk = {ml.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
            qm.params, is_leaf=lambda a: isinstance(a, ml.quant.QArray))[0]
            if ml.path_str(p).endswith("kernel")}
        num = sum(float(jnp.sum((qk[k].dequantize() - kernels[k]) ** 2)) for k in kernels)
        den = sum(float(jnp.sum(kernels[k] ** 2)) for k in kernels)
        got = np.asarray(embed(qm, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
        cos = float(np.mean(np.sum(got * ref, -1) / np.linalg.norm(got, axis=-1)
                            / np.linalg.norm(ref, axis=-1)))
        bits = 8 * sum(ml.memory.tree_bytes(qk[k]) for k in kernels) / n_kernel
        rows.append({"config": name, "method": method.name, "bits_per_param": bits,
                     "relative_weight_mse": num / den, "embedding_cosine": cos, "seconds": secs})
        print(f"minilm {name:<26} {bits:6.3f} bits  weight rel-MSE {num / den:.2e}  "
              f"cos {cos:.5f}", flush=True)
    results.write(FLAGS.out, {"model": "all-MiniLM-L6-v2 (fp32 safetensors)",
                              "eval": f"{len(held_out)} held-out Persuasion sentences, "
                                      "mean cosine to fp32",
                              "calibration": "512 training-book sentences", "rows": rows},
                  key="minilm")


def run_smollm2():
    import jax

    model = ml.models.load("smollm2-135m")
    corpus = data.load_corpus("austen")
    windows = data.eval_windows(data.tokenize(corpus, "test", model.tokenizer), FLAGS.seq,
                                max_windows=FLAGS.windows)
    calib = [b[:, :-1] for b, _ in zip(data.train_batches(
        data.tokenize(corpus, "train", model.tokenizer), 4, 256, seed=0), range(FLAGS.calib_batches))]
    t0 = time.perf_counter()
    stats = ml.quant.calibrate.collect(model, calib)  # once, shared by every calibrated method
    calib_seconds = time.perf_counter() - t0
    kernels_float = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(model.params)[0]
                        if ml.path_str(p).startswith("layers") and x.ndim == 3)
    base = perplexity(model, windows, progress=True)["perplexity"]
    rows = [{"config": "float (dequantized GGUF)", "bits_per_param": 32.0, "perplexity": base,
             "delta_ppl": 0.0, "param_bytes": ml.memory.tree_bytes(model.params), "seconds": 0.0}]
    print(f"float baseline perplexity {base:.3f}")
    todo = configs()
    if FLAGS.configs:
        todo = {k: v for k, v in todo.items() if k in FLAGS.configs}
    for name, method in todo.items():
        t0 = time.perf_counter()
        qm = ml.passes.quantize(method)(model, calib=stats)
        jax.block_until_ready(qm.params)
        secs = time.perf_counter() - t0 + (calib_seconds if method.needs_calibration else 0.0)
        layer_bytes = sum(ml.memory.tree_bytes(v) for k, v in qm.params["layers"].items()
                          if k in ("attn", "mlp"))
        ppl = perplexity(qm, windows, progress=True)["perplexity"]
        row = {"config": name, "method": method.name, "bits_per_param": 8 * layer_bytes / kernels_float,
               "perplexity": ppl, "delta_ppl": ppl - base,
               "param_bytes": ml.memory.tree_bytes(qm.params), "seconds": secs}
        rows.append(row)
        print(f"{name:<28} {row['bits_per_param']:6.3f} bits  ppl {ppl:8.3f}  "
              f"({ppl - base:+.3f})  quantized in {secs:.1f}s", flush=True)
    out = {"model": "smollm2-135m",
           "baseline_note": "float = GGUF Q4_1/Q8_0 weights dequantized to float32",
           "corpus": "austen/test (Persuasion)",
           "settings": {"seq": FLAGS.seq, "windows": FLAGS.windows,
                        "calib_batches": FLAGS.calib_batches, "calib_tokens": FLAGS.calib_batches * 4 * 256},
           "rows": rows}
    results.write(FLAGS.out, out, key="smollm2")
    _plot(rows, os.path.splitext(FLAGS.out)[0] + ".png")


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows[1:]:
        family = r["config"].split("-")[0]
        color = {"rtn": "tab:gray", "awq": "tab:blue", "gptq": "tab:red",
                 "spqr": "tab:green"}.get(family, "k")
        ax.scatter(r["bits_per_param"], r["perplexity"], color=color, s=18)
        ax.annotate(r["config"], (r["bits_per_param"], r["perplexity"]), fontsize=6)
    ax.axhline(rows[0]["perplexity"], color="k", ls="--", lw=0.8, label="float baseline")
    ax.set_xlabel("bits / parameter (layer kernels)")
    ax.set_ylabel("perplexity (Persuasion)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M weight quantization")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    app.run(main)
