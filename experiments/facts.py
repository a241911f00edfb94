"""The planner's measured facts: ``memlab/measured.json`` from the experiments' results.

    python experiments/facts.py          # after experiments/quantize.py, kv_compress.py, plan.py

Every measured number the planner reads about an extension (:mod:`memlab.facts`) is
written here, from the results file of the experiment that measured it:

* **weight format** ``quality_loss``: relative perplexity increase of SmolLM2-135M
  (``results/quantize.json``, ``smollm2`` rows) over the float model, for the method
  the planner builds (``int8``: ``rtn-int8``; ``nf4``: ``rtn-nf4-b64-dq``).  A loss
  below the measurement's resolution (:data:`RESOLUTION`, e.g. int8's negative delta)
  is counted at the resolution, so exact weights win ties.
* **kv policy** ``quality_loss``: the same over the dense bf16 cache
  (``results/kv_compress.json`` ``perplexity``): KIVI by bits, SnapKV at the
  experiment's budget (``settings.budget`` of ``settings.window``) with that kept
  fraction.
* **optimizer** ``update_bytes``: bytes per trainable layer param of the gradient and
  update temporaries, per compiler: XLA:GPU's from ``results/plan.json``
  ``by_target.h100.fit`` (``experiments/plan.py --target=h100 --fit``), XLA:CPU's and
  the fused step's ``fused_update_bytes`` from :data:`FITTED` (the fits documented in
  :mod:`memlab.memory.activations` and :mod:`memlab.fused`).  ``quality_loss`` of the
  optimizers and LoRA, and the formats' ``compute_penalty``, are not measured by
  memlab: :data:`PRIORS`, ordering priors from the papers, recorded as such.
"""
import json
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("results", "results", "Directory of the experiments' result files.")
flags.DEFINE_string("out", "memlab/measured.json", "The facts file the planner reads.")

RESOLUTION = 0.001  # perplexity deltas below this are measurement noise
# weight formats: the planner's name -> the method row of results/quantize.json
FORMAT_ROWS = {"int8": "rtn-int8", "nf4": "rtn-nf4-b64-dq"}
# KIVI bits -> the policy row of results/kv_compress.json
KIVI_ROWS = {"4": "kivi4", "2": "kivi2"}
# Fitted elsewhere, carried here with their provenance: XLA:CPU's update bytes per trainable
# layer param (memlab.memory.activations: slopes over 2 -> 4 layers at d=256; the blockwise
# states' from the llama2-7b step) and the fused step's per-layer update bytes
# (memlab.fused: experiments/fused.py's llama2-7b compiles).
FITTED = {
    "adamw": {"cpu": 6.35, "fused": 181.0}, "adamw8bit": {"cpu": 6.17, "fused": 31.88},
    "adam4bit": {"cpu": 6.17, "fused": 16.69}, "apollo_mini": {"cpu": 6.37, "fused": 11.65},
    "apollo": {"cpu": 6.37, "fused": 12.40}, "galore": {"cpu": 6.37, "fused": 14.44},
    "came": {"cpu": 6.37, "fused": 14.0}, "sgd": {"cpu": 4.0, "gpu": 2.0, "fused": 6.0},
}
GPU_FROM = {"apollo": "apollo_mini"}  # not fitted on XLA:GPU: its neighbour's value
# Not measured by memlab: ordering priors from the papers (8-bit / 4-bit Adam match AdamW,
# GaLore / APOLLO-Mini trail slightly, LoRA trails full training) and the dequantization
# overhead of quantized weights.
PRIORS = {
    "optimizer": {"adamw": 0.0, "adamw8bit": 0.001, "adam4bit": 0.002, "came": 0.003,
                  "apollo": 0.005, "galore": 0.01, "apollo_mini": 0.01, "sgd": 0.05},
    "pass": {"lora": 0.02},
    "compute_penalty": {"int8": 1.05, "nf4": 1.15},
}


def _load(name: str) -> dict:
    with open(os.path.join(FLAGS.results, name)) as f:
        return json.load(f)


def _relative(ppl: float, base: float) -> float:
    return max((ppl - base) / base, RESOLUTION)


def weight_formats() -> dict:
    rows = {r.get("method", r["config"]): r["perplexity"]
            for r in _load("quantize.json")["smollm2"]["rows"]}
    base = next(r["perplexity"] for r in _load("quantize.json")["smollm2"]["rows"]
                if r["config"].startswith("float"))
    return {name: {"quality_loss": _relative(rows[row], base),
                   "compute_penalty": PRIORS["compute_penalty"][name]}
            for name, row in FORMAT_ROWS.items()}


def kv_policies() -> dict:
    doc = _load("kv_compress.json")
    ppl = {r["policy"]: r["perplexity"] for r in doc["perplexity"]}
    base = ppl["dense-bf16"]
    budget, window = doc["settings"]["budget"], doc["settings"]["window"]
    return {"kivi": {"quality_loss": {b: _relative(ppl[row], base)
                                      for b, row in KIVI_ROWS.items()}},
            "snapkv": {"quality_loss": _relative(ppl[f"snapkv-{budget}"], base),
                       "kept_fraction": budget / window}}


def optimizers() -> dict:
    fit = _load("plan.json").get("by_target", {}).get("h100", {}).get("fit") or {}
    gpu = (fit.get("constants") or {}).get("a", {})
    out = {}
    for name, fitted in FITTED.items():
        g = fitted.get("gpu", gpu.get(GPU_FROM.get(name, name)))
        update = {"cpu": fitted["cpu"]}
        if g is not None:
            update["gpu"] = round(float(g), 3)
        out[name] = {"quality_loss": PRIORS["optimizer"][name], "update_bytes": update,
                     "fused_update_bytes": fitted["fused"]}
    return out


def main(_):
    doc = {"note": "written by experiments/facts.py from results/*.json; see its docstring",
           "weight format": weight_formats(), "kv policy": kv_policies(),
           "optimizer": optimizers(),
           "pass": {name: {"quality_loss": v} for name, v in PRIORS["pass"].items()}}
    tmp = FLAGS.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, FLAGS.out)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
