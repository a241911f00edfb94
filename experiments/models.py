"""Every decoder family memlab reads, and its two real models side by side.

    python experiments/models.py                         # both parts
    python experiments/models.py --part=families         # the table of families only
    python experiments/models.py --part=real --windows=4

**families** (``--target=h100`` for a compile-only H100 as well): for each family's shipped config (``memlab/models/configs``; abstract
params, nothing allocated) its parameter count, exact weight bytes per format (the
quantize pass's own estimate) and XLA's compiled peak for a prefill, a decode step and a
train step (:func:`memlab.memory.profile`, AdamW, remat ``nothing_saveable``, bfloat16),
plus the dense cache's bytes at ``--kv_seq`` tokens (sliding-window layers keep their
window only) against every layer keeping every position.

**real**: SmolLM2-135M-Instruct and Gemma-3-270M on held-out Austen (Persuasion):
perplexity of the float model, of int4 weights by RTN, AWQ and GPTQ (group 64,
calibrated on training-book windows), and teacher-forced decode perplexity through KV
policies; Gemma-3-270M's train-step peak with the naive [B, T, V] loss and with the
chunked (cut) cross-entropy, where its 262,144-token vocabulary makes the difference.

Writes ``results/models.json``.
"""
import time

from absl import app, flags

import memlab as ml
from memlab import data, results
from memlab.evaluate import decode_perplexity, perplexity
from memlab.passes.kv_compress import policy_bytes

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "all", ["all", "families", "real"], "Which part to run.")
flags.DEFINE_list("families", ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen3-0.6b",
                               "gemma2-2b", "mistral-7b", "llama2-7b", "llama3-8b"],
                  "Named configs for the family table.")
flags.DEFINE_integer("batch", 1, "Batch of the profiled steps.")
flags.DEFINE_integer("seq", 2048, "Sequence length of the profiled steps.")
flags.DEFINE_integer("kv_seq", 32768, "Context length of the KV-cache columns.")
flags.DEFINE_integer("eval_seq", 512, "Evaluation window length (real models).")
flags.DEFINE_integer("windows", 4, "Evaluation windows from the test book.")
flags.DEFINE_integer("calib_batches", 4, "Calibration batches of 4 x 256 training tokens.")
flags.DEFINE_list("kv", ["dense", "kivi4", "kivi2", "streaming:budget=128,sinks=4",
                         "snapkv:budget=128,window=16"], "KV policies (decode perplexity).")
flags.DEFINE_integer("prefix", 256, "Prefilled tokens before teacher-forced decoding.")
flags.DEFINE_string("target", None, "Profile the family table for a compile-only device "
                    "(memlab.targets: h100, v5e, ...; run with the targets environment, "
                    "make targets-env): its compiler's peaks, no XLA:CPU float32 copies of "
                    "bfloat16 weights.  Default: this machine's XLA:CPU.")
flags.DEFINE_string("out", "results/models.json", "Output JSON.")
flags.DEFINE_bool("table", False, "Print the README's tables from --out and exit.")

FORMATS = {"bf16": None, "int8": lambda q: q.int8(), "nf4-b64": lambda q: q.nf4(64, False),
           "int4-g64": lambda q: q.intn(4, 64)}


def family_row(name: str) -> dict:
    import jax.numpy as jnp
    from memlab.memory.bytes import tree_bytes
    cfg = ml.models.config(name, dtype="bfloat16", param_dtype="bfloat16")
    model = ml.models.abstract(cfg)
    row = {"model": name, "arch": cfg.arch, "params": cfg.param_count(),
           "sliding_layers": sum(cfg.sliding_layers()), "window": cfg.sliding_window,
           "vocab": cfg.vocab_size, "weight_bytes": {}, "peak_bytes": {}}
    for fmt, make in FORMATS.items():
        m = model if make is None else ml.passes.quantize(make(ml.quant))(model)
        row["weight_bytes"][fmt] = int(tree_bytes(m.params))
    seq = min(FLAGS.seq, cfg.max_seq_len)
    kv_seq = min(FLAGS.kv_seq, cfg.max_seq_len)
    row["kv_seq"] = kv_seq
    row["kv_cache_bytes"] = int(cfg.kv_cache_bytes(FLAGS.batch, kv_seq))
    row["kv_cache_bytes_without_windows"] = int(2 * cfg.n_layers * FLAGS.batch * kv_seq
                                                * cfg.n_kv_heads * cfg.head_dim
                                                * jnp.dtype(cfg.dtype).itemsize)
    remat = ml.passes.remat("nothing_saveable")(model)
    for task, m in (("prefill", model), ("decode", model), ("train", remat)):
        t0 = time.perf_counter()
        r = ml.memory.profile(m, task, batch=FLAGS.batch, seq=seq, target=FLAGS.target,
                              optimizer="adamw" if task == "train" else None)
        row["peak_bytes"][task] = int(r.peak_bytes)
        print(f"{name:<14} {task:<8} peak {r.peak_bytes / 1e9:8.3f} GB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    row["seq"] = seq
    return row


def real_rows(name: str) -> dict:
    import jax
    model = ml.models.load(name)
    corpus = data.load_corpus("austen")
    windows = data.eval_windows(data.tokenize(corpus, "test", model.tokenizer), FLAGS.eval_seq,
                                max_windows=FLAGS.windows, bos=data.bos_id(model.tokenizer))
    calib = [b[:, :-1] for b, _ in zip(data.train_batches(
        data.tokenize(corpus, "train", model.tokenizer), 4, 256, seed=0),
        range(FLAGS.calib_batches))]
    out = {"model": name, "eval": f"{len(windows)} Persuasion windows of {FLAGS.eval_seq}",
           "quantize": {}, "kv": {}}
    t0 = time.perf_counter()
    base = perplexity(model, windows)["perplexity"]
    out["perplexity"] = base
    print(f"{name}: float perplexity {base:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    stats = ml.quant.calibrate.collect(model, calib)
    fmt = ml.quant.intn(4, 64)
    for method in ("rtn", "awq", "gptq"):
        t0 = time.perf_counter()
        q = ml.passes.quantize(ml.quant.methods.get(method)(fmt))(model, calib=stats)
        ppl = perplexity(q, windows)["perplexity"]
        out["quantize"][f"{method}-int4-g64"] = {"perplexity": ppl, "relative": ppl / base - 1,
                                                 "seconds": time.perf_counter() - t0}
        print(f"{name}: {method}-int4-g64 perplexity {ppl:.3f} ({ppl / base - 1:+.2%})",
              flush=True)
        del q
        jax.clear_caches()
    for spec in FLAGS.kv:
        m = ml.passes.kv_compress(spec)(model)
        ppl = decode_perplexity(m, windows, FLAGS.prefix)["perplexity"]
        dense = out["kv"].get("dense", {}).get("perplexity", ppl)
        nbytes = policy_bytes(m.extra("kv_policy"), model.spec, 1, FLAGS.eval_seq + 1)
        out["kv"][spec] = {"decode_perplexity": ppl, "relative_to_dense": ppl / dense - 1,
                           "cache_bytes_per_row": int(nbytes)}
        print(f"{name}: kv {spec:<30} decode perplexity {ppl:.3f}  cache "
              f"{nbytes / 2**20:.2f} MiB/row", flush=True)
    if model.spec.vocab_size > 100_000:  # the loss's share of a train step
        out["train_peak_bytes_by_loss"] = {}
        abstract = ml.passes.remat("nothing_saveable")(ml.models.abstract(model.spec))
        for loss in ("naive", "chunked"):
            with ml.nn.use_cross_entropy(loss):
                r = ml.memory.profile(abstract, "train", batch=4, seq=1024, optimizer="adamw")
            out["train_peak_bytes_by_loss"][loss] = int(r.peak_bytes)
            print(f"{name}: train 4x1024 peak with {loss} loss {r.peak_bytes / 1e9:.3f} GB",
                  flush=True)
    return out


def _gb(n):
    return f"{n / 1e9:.2f}"


def tables(doc: dict) -> str:
    """The README's markdown tables from a results file."""
    lines = []
    fam = doc.get("families_h100") or doc.get("families")
    if fam:
        lines += ["| model | family | params | bf16 / int8 / NF4 weights (GB) | dense KV cache "
                  "(MiB): tokens, windows kept / every position | prefill / decode / train "
                  f"peak at {fam['settings']['seq']} tokens (GB) |", "|---|---|---|---|---|---|"]
        for r in fam["rows"]:
            w, p = r["weight_bytes"], r["peak_bytes"]
            lines.append(
                f"| `{r['model']}` | {r['arch']} | {r['params'] / 1e9:.3f}B | "
                f"{_gb(w['bf16'])} / {_gb(w['int8'])} / {_gb(w['nf4-b64'])} | "
                f"{r['kv_seq'] // 1024}k: {r['kv_cache_bytes'] / 2**20:,.0f} / "
                f"{r['kv_cache_bytes_without_windows'] / 2**20:,.0f} | "
                f"{_gb(p['prefill'])} / {_gb(p['decode'])} / {_gb(p['train'])} |")
    real = doc.get("real")
    if real:
        lines += ["", "| model | float perplexity | int4 g64 RTN / AWQ / GPTQ | "
                      + " / ".join(real["rows"][0]["kv"]) + " (decode perplexity) |",
                  "|---|---|---|---|"]
        for r in real["rows"]:
            q = r["quantize"]
            lines.append(
                f"| `{r['model']}` | {r['perplexity']:.2f} | "
                + " / ".join(f"{q[k]['perplexity']:.2f}" for k in q) + " | "
                + " / ".join(f"{v['decode_perplexity']:.2f}" for v in r["kv"].values()) + " |")
        loss = [r for r in real["rows"] if "train_peak_bytes_by_loss" in r]
        for r in loss:
            b = r["train_peak_bytes_by_loss"]
            lines += ["", f"`{r['model']}` train step 4×1024 (XLA:CPU peak): naive loss "
                          f"{_gb(b['naive'])} GB, chunked cross-entropy {_gb(b['chunked'])} GB."]
    return "\n".join(lines)


def main(_):
    if FLAGS.table:
        import json
        with open(FLAGS.out) as f:
            print(tables(json.load(f)))
        return
    if FLAGS.target:  # compile-only: register the GPU/TPU compilers without starting them
        import jax
        jax.config.update("jax_platforms", "cpu")
    if FLAGS.part in ("all", "families"):
        results.write(FLAGS.out, {"rows": [family_row(n) for n in FLAGS.families],
                                  "settings": {"batch": FLAGS.batch, "seq": FLAGS.seq,
                                               "dtype": "bfloat16",
                                               "train": "adamw, remat nothing_saveable",
                                               "compiler": FLAGS.target or "xla:cpu"}},
                      key="families" if FLAGS.target is None else f"families_{FLAGS.target}")
    if FLAGS.part in ("all", "real"):
        results.write(FLAGS.out, {"rows": [real_rows(n) for n in ("smollm2-135m",
                                                                  "gemma3-270m")]},
                      key="real")


if __name__ == "__main__":
    app.run(main)
