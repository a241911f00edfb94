"""Which attention SmolLM2's own steps reach when compiled for an H100 and a v5e, and the
attention FLOPs of its causal train step with and without causal block skipping.

    .venv-targets/bin/python benchmarks/fast_paths.py      # results/fast_paths.json

(``make targets-env`` builds ``.venv-targets``.)  Two measurements:

* **Reached kernels.** The bf16 train, prefill and decode steps are compiled for
  each ``--targets`` entry by :func:`memlab.memory.profile`; the attention they
  reached is read from the optimized HLO (:func:`memlab.targets.report.attention_impls`).
* **Causal FLOPs.** The SmolLM2 gradient at ``--seq`` tokens is traced with the
  Triton flash kernel forced twice: as the model calls it (``causal=True``,
  default positions: the kernels skip the tiles above the diagonal) and with
  explicit ``arange`` positions (every tile computed, as a caller passing
  positions gets).  The FLOPs are what each ``pallas_call`` declares
  (:func:`memlab.targets.kernels.declared_cost`), the kernels' visited tiles.
"""
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never start a local GPU runtime

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

import memlab as ml  # noqa: E402
from memlab.targets import kernels as K  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model config (memlab.models.names()).")
flags.DEFINE_list("targets", ["h100", "v5e"], "Compile targets (memlab.targets.names()).")
flags.DEFINE_integer("batch", 2, "Batch of the compiled steps.")
flags.DEFINE_integer("seq", 2048, "Sequence length (train/prefill) and cache length (decode).")
flags.DEFINE_string("out", "results/fast_paths.json", "Output JSON.")
flags.DEFINE_string("table", None, "Print the README's Markdown table from this results file "
                    "and compile nothing.")


def table(path: str) -> str:
    with open(path) as f:
        r = json.load(f)
    rows = [f"| step | " + " | ".join(f"{t} ({r['reached'][t]['device']})" for t in r["reached"])
            + " |", "|---|" + "---|" * len(r["reached"])]
    for task in ("train", "prefill", "decode"):
        rows.append(f"| {task} | " + " | ".join(
            ", ".join(f"`{a}`" for a in r["reached"][t][task]["attention"]) for t in r["reached"])
            + " |")
    c = r["causal_train_flops"]
    lines = [f"{r['model']} bf16, batch {r['batch']}, {r['seq']} tokens "
             f"(`results/fast_paths.json`, from `benchmarks/fast_paths.py`):", "", *rows, "",
             f"Attention FLOPs of the causal train step with the Triton flash kernel forced, per "
             f"layer and sequence: {c['per_layer']['default_positions'] / 1e9:.1f} GFLOP with the model's default "
             f"positions against {c['per_layer']['explicit_positions'] / 1e9:.1f} GFLOP with explicit "
             f"positions, **{c['ratio']:.3f}×**."]
    return "\n".join(lines)


def reached(model, target: str) -> dict:
    out = {}
    for task in ("train", "prefill", "decode"):
        t0 = time.perf_counter()
        r = ml.memory.profile(model, task, batch=FLAGS.batch, seq=FLAGS.seq, target=target)
        out[task] = {"attention": r.attention, "peak_bytes": r.peak_bytes,
                     "compile_s": round(time.perf_counter() - t0, 1)}
        print(f"{target:>5} {task:>8}: {', '.join(r.attention)}")
    return out


def causal_flops(name: str, seq: int) -> dict:
    cfg = ml.models.config(name, attention="pallas_triton", dtype="bfloat16",
                           max_seq_len=max(seq, ml.models.config(name).max_seq_len))
    model = ml.models.abstract(cfg)
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    skipping = K.train_attention_flops(model, tokens)
    full = K.train_attention_flops(model, tokens, explicit_positions=True)
    per = {n: {"explicit_positions": full[n], "default_positions": skipping[n]}
           for n in sorted(skipping)}
    total = {k: sum(v[k] for v in per.values()) for k in ("explicit_positions", "default_positions")}
    return {"seq": seq, "per_kernel_per_layer": per, "per_layer": total,
            "ratio": total["default_positions"] / total["explicit_positions"]}


def main(argv):
    del argv
    if FLAGS.table:
        print(table(FLAGS.table))
        return
    model = ml.compose(ml.passes.cast("bfloat16", compute=True))(ml.models.abstract(FLAGS.model))
    out = {"model": FLAGS.model, "batch": FLAGS.batch, "seq": FLAGS.seq,
           "jax": jax.__version__, "reached": {}}
    for target in FLAGS.targets:
        out["reached"][target] = dict(reached(model, target),
                                      device=ml.targets.get(target).device_kind)
    out["causal_train_flops"] = causal_flops(FLAGS.model, FLAGS.seq)
    print(f"causal train step attention FLOPs: {out['causal_train_flops']['ratio']:.3f} of the "
          "explicit-position kernel's")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
