"""Whole-model steps and the planner's plans compiled for devices this machine does not have.

    .venv-targets/bin/python experiments/targets.py            # results/targets.json

(``make targets-env`` builds ``.venv-targets``.)  Three parts, each compiled by
XLA for the target on abstract shapes (nothing is allocated) with
:mod:`memlab.targets`:

* **steps**: SmolLM2-135M in bf16 (train 4 x 512, prefill 1 x 2048, decode 8 rows
  over 2048 slots), the llama2-7b and llama3-8b bf16 training step (1 x 2048,
  AdamW) and llama3-8b prefill / decode, for an H100, a TPU v5e and a v5p, each beside
  the same step compiled by XLA:CPU on this machine.  Per step: XLA's
  ``memory_analysis()`` (device and host apart), and the attention
  implementation the compiled program reached, read from its HLO.
* **plans**: the planner's single-device plans of ``experiments/plan.py`` (llama2-7b
  full training in 24 GB and 12 GB, llama3-8b decode over 128k and 1M tokens in
  24 GB), chosen as on XLA:CPU (``verify=0``), then compiled for an H100, a v5e
  (16 GiB) and a v6e (32 GiB): predicted device bytes against XLA:GPU's /
  XLA:TPU's, host bytes as the TPU reports them, or the compiler's refusal.
* **multi-device**: Llama-3-70B (3.1, 128k context) full fine-tuning (8 x 2048
  tokens) and 128k-token inference planned and compile-verified for eight H100s
  (``h100x8``) and a v5e-16 slice (``v5e:4x4``).
"""
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: register the plugins, start none

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

import memlab as ml  # noqa: E402
from memlab import results  # noqa: E402

P = ml.memory.planner
FLAGS = flags.FLAGS
flags.DEFINE_list("targets", ["h100", "v5e", "v5p"], "Single-device targets for the steps "
                  "(a v5e has 16 GiB: the 7B/8B steps are refused there; a v5p has 95 GiB).")
flags.DEFINE_list("plan_targets", ["h100", "v5e", "v6e"], "Targets the plans are compiled for.")
flags.DEFINE_enum("part", "all", ["all", "steps", "plans", "multi"], "Which part to run; each "
                  "part updates its own key of the output JSON.")
flags.DEFINE_string("out", "results/targets.json", "Output JSON.")

GB = 1e9
STEPS = [  # (model, task, batch, seq)
    ("smollm2-135m", "train", 4, 512), ("smollm2-135m", "prefill", 1, 2048),
    ("smollm2-135m", "decode", 8, 2048),
    ("llama2-7b", "train", 1, 2048), ("llama3-8b", "train", 1, 2048),
    ("llama3-8b", "prefill", 1, 8192), ("llama3-8b", "decode", 8, 8192),
]
PLANS = [  # (model, task, budget, kwargs): experiments/plan.py's single-device targets
    ("llama2-7b", "train", "24GB", dict(seq=2048)),
    ("llama2-7b", "train", "12GB", dict(seq=2048)),
    ("llama3-8b", "decode", "24GB", dict(seq=131072)),
    ("llama3-8b", "decode", "24GB", dict(seq=2**20, objective="quality")),
]
MULTI = [  # (model, task, batch, seq, target, budget)
    ("llama3-70b", "train", 8, 2048, "h100x8", "80GB"),
    ("llama3-70b", "decode", 1, 131072, "h100x8", "80GB"),
    ("llama3-70b", "train", 16, 2048, "v5e:4x4", "16GiB"),
    ("llama3-70b", "decode", 1, 131072, "v5e:4x4", "16GiB"),
]


def _err(e) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


def _report_row(r) -> dict:
    return {"peak_bytes": r.peak_bytes, "argument_bytes": r.argument_bytes,
            "output_bytes": r.output_bytes, "alias_bytes": r.alias_bytes,
            "temp_bytes": r.temp_bytes, "host_bytes": r.host_bytes,
            "host_argument_bytes": r.host_argument_bytes, "attention": r.attention,
            "compile_seconds": round(r.compile_seconds, 2)}


def steps() -> list:
    rows = []
    for name, task, batch, seq in STEPS:
        model = ml.models.abstract(name, dtype="bfloat16", param_dtype="bfloat16")
        row = dict(model=name, task=task, batch=batch, seq=seq, dtype="bfloat16", by_target={})
        for target in [None] + FLAGS.targets:
            key = target or "xla_cpu"
            try:
                r = ml.memory.profile(model, task, batch=batch, seq=seq, target=target)
                row["by_target"][key] = _report_row(r)
                row.setdefault("by_category", r.by_category)
                print(f"{name:13s} {task:8s} {key:8s} peak {r.peak_bytes / GB:8.2f} GB  temp "
                      f"{r.temp_bytes / GB:8.2f} GB  attention {r.attention or '-'}", flush=True)
            except Exception as e:  # noqa: BLE001 -- recorded with the compiler's words
                row["by_target"][key] = {"error": _err(e)}
                print(f"{name:13s} {task:8s} {key:8s} FAILED {_err(e)[:200]}", flush=True)
        rows.append(row)
    return rows


def plans() -> list:
    rows = []
    for name, task, budget, kw in PLANS:
        plan = ml.memory.plan(name, task, budget, verify=0, **kw)
        c, e = plan.candidate, plan.estimate
        cfg = P._config(name)[1]
        row = dict(model=name, task=task, budget=budget, seq=plan.seq, batch=plan.batch,
                   candidate=c.label(), predicted_device_bytes=e.device_bytes,
                   predicted_host_bytes=e.host_bytes, by_target={})
        print(f"\n{name} {task} {budget} seq {plan.seq}: {c.label()} (predicted device "
              f"{e.device_bytes / GB:.2f} GB, host {e.host_bytes / GB:.2f} GB)")
        for target in FLAGS.plan_targets:
            t0 = time.perf_counter()
            v = P.verify_candidate(cfg, c, e, plan.task, plan.batch, plan.seq, target)
            t = ml.targets.get(target)
            row["by_target"][target] = dict(
                device=t.device_kind, memory_bytes=t.memory_bytes,
                compiled_device_bytes=v.compiled_device_bytes,
                compiled_host_bytes=v.compiled_host_bytes, relative_error=v.relative_error,
                fits_device=(None if v.compiled_device_bytes is None
                             else v.compiled_device_bytes <= t.memory_bytes),
                error=v.error, seconds=round(time.perf_counter() - t0, 1))
            got = ("—" if v.compiled_device_bytes is None else
                   f"device {v.compiled_device_bytes / GB:.2f} GB, host "
                   f"{(v.compiled_host_bytes or 0) / GB:.2f} GB ({v.relative_error:+.1%})")
            print(f"  {target:5s} {got}" + (f"  {v.error[:200]}" if v.error else ""), flush=True)
        rows.append(row)
    return rows


def multi() -> list:
    rows = []
    for name, task, batch, seq, target, budget in MULTI:
        t0 = time.perf_counter()
        row = dict(model=name, task=task, batch=batch, seq=seq, target=target, budget=budget)
        try:
            plan = ml.memory.plan(name, task, budget, batch=batch, seq=seq, verify=2,
                                  target=target)
            print("\n" + plan.table(), flush=True)
            row.update(plan.to_dict(), feasible=True)
        except P.NoPlanError as e:
            print(f"\n{name} {task} on {target} in {budget}: {e}", flush=True)
            row.update(feasible=False, error=str(e), minimum_bytes=e.minimum_bytes,
                       nearest=e.nearest)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    return rows


def main(_):
    jax.config.update("jax_platforms", "cpu")
    env = {t: ml.targets.environment(ml.targets.get(t).platform)
           for t in set(FLAGS.targets + FLAGS.plan_targets)}
    targets = {t: ml.targets.get(t).facts() for t in
               set(FLAGS.targets + FLAGS.plan_targets + [m[4] for m in MULTI])}
    parts = {"steps": steps, "plans": plans, "multi": multi}
    for part, fn in parts.items():
        if FLAGS.part in ("all", part):
            t0 = time.perf_counter()
            rows = fn()
            results.write(FLAGS.out, {"rows": rows, "seconds": time.perf_counter() - t0,
                                      "targets": targets, "compilers": env}, key=part)


if __name__ == "__main__":
    app.run(main)
