"""Compressed KV caches on the real SmolLM2-135M: quality against exact KV bytes.

    python experiments/kv_compress.py                     # everything (CPU: about an hour)
    python experiments/kv_compress.py --part=ppl --policies=dense,kivi2,snapkv

For every policy: exact KV bytes per token (``kv_compress`` pass estimate, equal
to the cache pytree's bytes), perplexity on held-out Austen (*Persuasion*) by
teacher-forced *decoding* -- the first ``--prefix`` tokens of each window are
prefilled (and compressed by the policy), every later token is fed one at a time
through the compressed cache -- and passkey retrieval (a 5-digit key hidden at
several depths of ``--passkey_len`` tokens of Austen).  Eviction policies get
``--budget_frac`` of the window as their token budget.  A paged-allocation
part measures slot waste on a mixed-length batch against max-length
preallocation.  Writes results/kv_compress.json and results/kv_compress.png.

Directions the papers claim: KIVI-2 near baseline perplexity at <= 1/4 of bf16
KV bytes; per-channel key quantization beats per-token at 2 bits; heavy hitters
(H2O) and SnapKV beat a plain recent window at a 20% budget; PyramidKV >= SnapKV
at equal total budget; paged allocation wastes < 4%.
"""
import time

import numpy as np
from absl import app, flags

import memlab as ml
from memlab import data, results
from memlab.evaluate import decode_perplexity
from memlab.passes.kv_compress import policy_bytes

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "all", ["all", "ppl", "passkey", "paged"], "Which part to run; a part "
                  "updates its own key in the output JSON.")
flags.DEFINE_integer("window", 512, "Evaluation window (tokens).")
flags.DEFINE_integer("prefix", 256, "Prefilled tokens per window; the rest are decoded.")
flags.DEFINE_integer("windows", 8, "Evaluation windows from the test book.")
flags.DEFINE_integer("batch", 4, "Windows per batch.")
flags.DEFINE_float("budget_frac", 0.2, "Token budget of eviction policies, as a fraction of the window.")
flags.DEFINE_integer("passkey_len", 1024, "Passkey prompt length (tokens).")
flags.DEFINE_integer("passkey_depths", 10, "Passkey depths between 0 and 1.")
flags.DEFINE_list("policies", [], "Subset of policy names to run (default: all).")
flags.DEFINE_string("out", "results/kv_compress.json", "Output JSON.")


def policies(budget: int, room: int) -> dict:
    """Name -> policy string (parsed by ml.kv.parse), in table order.  ``room``: decode tokens
    reserved after the kept prompt by the compositions (eviction + storage)."""
    out = {
        "dense-f32": "dense",
        "dense-bf16": "dense:dtype=bfloat16",
        "kivi8": "kivi:bits=8",
        "kivi4": "kivi:bits=4,scale_dtype=bfloat16",
        "kivi2": "kivi:bits=2,scale_dtype=bfloat16",
        "kivi2-per-token-keys": "kivi:bits=2,key_mode=token,scale_dtype=bfloat16",
        "kvquant4": "kvquant:bits=4,levels=kmeans",
        "kvquant2": "kvquant:bits=2,levels=kmeans",
        "gear4": "gear:bits=4",
        "gear2": "gear:bits=2",
        "palu-0.5": "palu:rank_ratio=0.5",
        "think-0.5": "think:keep_ratio=0.5",
        f"recent-window-{budget}": f"streaming:budget={budget},sinks=0",
        f"streamingllm-{budget}": f"streaming:budget={budget},sinks=4",
        f"h2o-{budget}": f"h2o:budget={budget}",
        f"snapkv-{budget}": f"snapkv:budget={budget}",
        f"pyramidkv-{budget}": f"pyramidkv:budget={budget}",
        "minicache-s15-r0": "minicache:start=15,retain=0.0",
        "minicache-s15-r0.05": "minicache:start=15,retain=0.05",
        "minicache-s15-r0.2": "minicache:start=15,retain=0.2",
        f"snapkv-{budget}+kivi2": f"snapkv:budget={budget}+kivi:bits=2,scale_dtype=bfloat16+room={room}",
        f"snapkv-{budget}+kivi4": f"snapkv:budget={budget}+kivi:bits=4,scale_dtype=bfloat16+room={room}",
        f"snapkv-{budget}+kivi2-r32": (f"snapkv:budget={budget}+kivi:bits=2,scale_dtype=bfloat16,"
                                       f"residual=32+room={room}"),
    }
    if FLAGS.policies:
        out = {k: v for k, v in out.items() if k in FLAGS.policies or v.split(":")[0] in FLAGS.policies}
    return out


def bytes_per_token(policy, spec, window):
    b = policy_bytes(policy, spec, 1, window) - 4          # one row; lengths excluded
    row = {"kv_bytes": b, "kv_bytes_per_token": b / window}
    if hasattr(policy, "logical_bytes"):                   # PyramidKV: the ragged layout's bytes
        from memlab.kv.base import Dims
        dims = Dims(1, window, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.dtype,
                    spec.n_layers)
        row["logical_kv_bytes_per_token"] = policy.logical_bytes(dims) / window
    return row


def run_ppl(model, windows, table):
    spec = model.spec
    rows = []
    for name, text in table.items():
        policy = ml.kv.parse(text)
        m = ml.passes.kv_compress(policy)(model)
        t0 = time.perf_counter()
        try:
            res = decode_perplexity(m, windows, FLAGS.prefix, batch_size=FLAGS.batch, progress=True)
        except Exception as e:  # noqa: BLE001 -- record and go on: one policy failing is a result
            rows.append({"policy": name, "spec": text, "error": f"{type(e).__name__}: {e}"[:400]})
            print(name, "ERROR", rows[-1]["error"])
            continue
        row = {"policy": name, "spec": text, "perplexity": res["perplexity"], "tokens": res["tokens"],
               "seconds": time.perf_counter() - t0, **bytes_per_token(policy, spec, FLAGS.window)}
        rows.append(row)
        print(f"{name:28s} ppl {row['perplexity']:8.3f}  KV {row['kv_bytes_per_token']:9.1f} B/token")
    return rows


def run_passkey(model, tokens, table):
    from memlab.tasks import passkey_accuracy, passkey_prompts
    depths = np.linspace(0.05, 0.95, FLAGS.passkey_depths).tolist()
    prompts = passkey_prompts(tokens, model.tokenizer, FLAGS.passkey_len, depths, seed=1)
    rows = []
    for name, text in table.items():
        m = ml.passes.kv_compress(ml.kv.parse(text))(model)
        try:
            res = passkey_accuracy(m, prompts, batch_size=FLAGS.batch)
        except Exception as e:  # noqa: BLE001
            rows.append({"policy": name, "spec": text, "error": f"{type(e).__name__}: {e}"[:400]})
            continue
        rows.append({"policy": name, "spec": text, "accuracy": res["accuracy"],
                     "by_depth": [(r["depth"], r["correct"]) for r in res["rows"]]})
        print(f"{name:28s} passkey accuracy {res['accuracy']:.2f}")
    return rows


def run_paged(model):
    from memlab.kv.base import Dims
    from memlab.kv.paged import Paged
    rng = np.random.default_rng(2023)
    lengths = rng.integers(100, 2001, 16)
    spec = model.spec
    policy = Paged(page_size=16, dtype="bfloat16")
    dims = Dims(16, 2048, spec.n_heads, spec.n_kv_heads, spec.head_dim, "bfloat16", spec.n_layers)
    alloc = policy.allocator(dims)
    for i, n in enumerate(lengths):
        alloc.allocate(i, int(n))
    stats = alloc.stats(max_len=2000).to_dict()
    stats["lengths"] = lengths.tolist()
    print(f"paged: {stats['waste_fraction']:.2%} of allocated slots wasted; dense max-length "
          f"preallocation wastes {stats['dense_waste_fraction']:.2%}")
    return stats


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if "perplexity" not in r:
            continue
        ax.scatter(r["kv_bytes_per_token"], r["perplexity"])
        ax.annotate(r["policy"], (r["kv_bytes_per_token"], r["perplexity"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes per token of context (exact)")
    ax.set_ylabel("perplexity (teacher-forced decoding, Persuasion)")
    ax.set_title("SmolLM2-135M: KV compression policies")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(_):
    model = ml.models.load("smollm2-135m")
    tokens = data.tokenize(data.load_corpus("austen"), "test", model.tokenizer)
    budget = int(FLAGS.budget_frac * FLAGS.window)
    table = policies(budget, FLAGS.window - FLAGS.prefix)
    out = {"settings": {"window": FLAGS.window, "prefix": FLAGS.prefix, "windows": FLAGS.windows,
                        "budget": budget, "passkey_len": FLAGS.passkey_len,
                        "passkey_depths": FLAGS.passkey_depths,
                        "passkey_budget": int(FLAGS.budget_frac * FLAGS.passkey_len),
                        "model": "smollm2-135m (float32)"}}
    if FLAGS.part in ("all", "ppl"):
        windows = data.eval_windows(tokens, FLAGS.window, max_windows=FLAGS.windows)
        out["perplexity"] = run_ppl(model, windows, table)
    if FLAGS.part in ("all", "passkey"):      # budgets relative to the passkey prompt
        out["passkey"] = run_passkey(model, tokens, policies(int(FLAGS.budget_frac * FLAGS.passkey_len),
                                                             FLAGS.window - FLAGS.prefix))
    if FLAGS.part in ("all", "paged"):
        out["paged"] = run_paged(model)
    out = merge_previous(FLAGS.out, out)
    if "perplexity" in out:
        plot(out["perplexity"], FLAGS.out.replace(".json", ".png"))
    results.write(FLAGS.out, out)
    print("wrote", FLAGS.out)


def merge_previous(path, out):
    """Keep rows of policies (and parts) not rerun this time, when the settings match."""
    import json
    import os
    if not os.path.exists(path):
        return out
    with open(path) as f:
        old = json.load(f)
    if old.get("settings") != out["settings"]:
        return out
    for part in ("perplexity", "passkey"):
        new_rows = {r["policy"]: r for r in out.get(part, [])}
        rows = [new_rows.pop(r["policy"], r) for r in old.get(part, [])] + list(new_rows.values())
        if rows:
            out[part] = rows
    if "paged" not in out and "paged" in old:
        out["paged"] = old["paged"]
    return out


if __name__ == "__main__":
    app.run(main)
