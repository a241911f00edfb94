"""Baseline: SmolLM2-135M perplexity on held-out Austen, float32 vs the cast pass.

    python experiments/baseline.py --windows=64 --seq=512

Writes results/baseline.json (every setting, device, versions, numbers): the
float baseline later experiments report degradation against, and the first
measured pass (bf16 weights: exact bytes halved, perplexity change).
"""
import time

from absl import app, flags

import memlab as ml
from memlab import data, results
from memlab.evaluate import perplexity

FLAGS = flags.FLAGS
flags.DEFINE_integer("seq", 512, "Window length.")
flags.DEFINE_integer("windows", 64, "Windows of the test book to score (0 = the whole book).")
flags.DEFINE_integer("batch", 4, "Windows per forward pass.")
flags.DEFINE_string("out", "results/baseline.json", "Output JSON.")


def main(_):
    model = ml.models.load("smollm2-135m")
    tokens = data.tokenize(data.load_corpus("austen"), "test", model.tokenizer)
    windows = data.eval_windows(tokens, FLAGS.seq, max_windows=FLAGS.windows or None)
    variants = {
        "float32": ml.passes.identity(),
        "bf16 weights (f32 compute)": ml.passes.cast("bfloat16"),
        "bf16 weights + compute": ml.passes.cast("bfloat16", compute=True),
    }
    rows = []
    for name, p in variants.items():
        m = p(model)
        t0 = time.perf_counter()
        res = perplexity(m, windows, batch_size=FLAGS.batch, progress=True)
        prof = ml.memory.profile(m, "decode", batch=1, seq=FLAGS.seq)
        rows.append({"variant": name, "pass": p.name, "perplexity": res["perplexity"],
                     "tokens": res["tokens"], "param_bytes": ml.memory.tree_bytes(m.params),
                     "decode_kv_bytes": prof.by_category["kv_cache"],
                     "decode_peak_bytes": prof.peak_bytes, "seconds": time.perf_counter() - t0})
    base = rows[0]
    print(f"\nSmolLM2-135M on Persuasion (held out), {base['tokens']} tokens, windows of {FLAGS.seq}")
    print(f"{'variant':<28} {'params':>11} {'ppl':>8} {'Δppl':>8}")
    for r in rows:
        print(f"{r['variant']:<28} {ml.memory.fmt_bytes(r['param_bytes']):>11} "
              f"{r['perplexity']:8.3f} {r['perplexity'] - base['perplexity']:+8.3f}")
    results.write(FLAGS.out, {
        "experiment": "baseline", "model": "smollm2-135m", "memlab": ml.__version__,
        "corpus": "austen/test (Persuasion)",
        "settings": {"seq": FLAGS.seq, "windows": FLAGS.windows, "batch": FLAGS.batch},
        "rows": rows})


if __name__ == "__main__":
    app.run(main)
