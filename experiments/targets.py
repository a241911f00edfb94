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
* **checks**: single candidates compiled to show why the planner leaves them out
  (FSDP with a block-wise 8-bit optimizer state).
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
flags.DEFINE_enum("part", "all", ["all", "steps", "plans", "multi", "checks"], "Which part to run; each "
                  "part updates its own key of the output JSON.")
flags.DEFINE_string("out", "results/targets.json", "Output JSON.")
flags.DEFINE_bool("table", False, "Print the README's Markdown tables from --out; compile nothing.")
flags.DEFINE_string("row", None, "Internal: compute one row (plans:<i>:<target> or multi:<i>) in "
                    "this process and print it as JSON; the parent runs every row this way, so "
                    "a compiler that aborts the process loses one row, not the run.")

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


# single candidates compiled to explain what the planner excludes: (model, task, batch, seq,
# target, candidate fields)
CHECKS = [
    ("llama3-70b", "train", 8, 2048, "h100x8",
     dict(weights="bf16", remat="nothing_saveable", optimizer="adamw8bit", shard="fsdp",
          devices=8)),
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


def _isolated(row: str) -> dict:
    """Run one row in a child process (see ``--row``); a compiler abort becomes an error."""
    import json
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, __file__, f"--row={row}"], capture_output=True,
                          text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    why = [ln for ln in proc.stderr.splitlines() if "Check failed" in ln or "Error" in ln]
    return {"error": f"the compiler aborted the process (exit {proc.returncode}): "
                     + (why[-1].strip()[:300] if why else proc.stderr.strip()[-300:])}


def _plan_choice(i: int):
    name, task, budget, kw = PLANS[i]
    plan = ml.memory.plan(name, task, budget, verify=0, **kw)
    return name, task, budget, plan


def _plan_target(i: int, target: str) -> dict:
    name, task, budget, plan = _plan_choice(i)
    c, e = plan.candidate, plan.estimate
    t0 = time.perf_counter()
    v = P.verify_candidate(P._config(name)[1], c, e, plan.task, plan.batch, plan.seq, target)
    t = ml.targets.get(target)
    return dict(device=t.device_kind, memory_bytes=t.memory_bytes,
                compiled_device_bytes=v.compiled_device_bytes,
                compiled_host_bytes=v.compiled_host_bytes, relative_error=v.relative_error,
                fits_device=(None if v.compiled_device_bytes is None
                             else v.compiled_device_bytes <= t.memory_bytes),
                error=v.error, seconds=round(time.perf_counter() - t0, 1))


def plans() -> list:
    rows = []
    for i in range(len(PLANS)):
        name, task, budget, plan = _plan_choice(i)
        c, e = plan.candidate, plan.estimate
        row = dict(model=name, task=task, budget=budget, seq=plan.seq, batch=plan.batch,
                   candidate=c.label(), predicted_device_bytes=e.device_bytes,
                   predicted_host_bytes=e.host_bytes, by_target={})
        print(f"\n{name} {task} {budget} seq {plan.seq}: {c.label()} (predicted device "
              f"{e.device_bytes / GB:.2f} GB, host {e.host_bytes / GB:.2f} GB)")
        for target in FLAGS.plan_targets:
            got = _isolated(f"plans:{i}:{target}")
            if "device" not in got:   # the child died
                t = ml.targets.get(target)
                got = dict(device=t.device_kind, memory_bytes=t.memory_bytes,
                           compiled_device_bytes=None, compiled_host_bytes=None,
                           relative_error=None, fits_device=None, error=got["error"])
            row["by_target"][target] = got
            d = got["compiled_device_bytes"]
            print(f"  {target:5s} " + ("—" if d is None else
                                       f"device {d / GB:.2f} GB, host "
                                       f"{(got['compiled_host_bytes'] or 0) / GB:.2f} GB "
                                       f"({got['relative_error']:+.1%})")
                  + (f"  {got['error'][:200]}" if got["error"] else ""), flush=True)
        rows.append(row)
    return rows


def _multi_row(i: int) -> dict:
    name, task, batch, seq, target, budget = MULTI[i]
    t0 = time.perf_counter()
    row = dict(model=name, task=task, batch=batch, seq=seq, target=target, budget=budget)
    try:
        plan = ml.memory.plan(name, task, budget, batch=batch, seq=seq, verify=2,
                              target=target)
        print("\n" + plan.table(), file=__import__("sys").stderr, flush=True)
        row.update(plan.to_dict(), feasible=True)
    except P.NoPlanError as e:
        row.update(feasible=False, error=str(e), minimum_bytes=e.minimum_bytes,
                   nearest=e.nearest)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _check_row(i: int) -> dict:
    name, task, batch, seq, target, fields = CHECKS[i]
    cfg = P._config(name)[1]
    c = P.Candidate(**fields)
    platform = ml.targets.get(target).dispatch_platform
    e = P.estimate(cfg, c, task, batch, seq, platform)
    v = P.verify_candidate(cfg, c, e, task, batch, seq, target)
    return dict(model=name, task=task, batch=batch, seq=seq, target=target,
                candidate=c.label(), predicted_device_bytes=e.device_bytes,
                compiled_device_bytes=v.compiled_device_bytes, temp_bytes=v.temp_bytes,
                error=v.error)


def checks() -> list:
    rows = []
    for i in range(len(CHECKS)):
        row = _isolated(f"checks:{i}")
        print(f"check {row.get('candidate')} on {CHECKS[i][4]}: predicted "
              f"{_gb(row.get('predicted_device_bytes'))}, compiled "
              f"{_gb(row.get('compiled_device_bytes'))}", flush=True)
        rows.append(row)
    return rows


def multi() -> list:
    rows = []
    for i, (name, task, batch, seq, target, budget) in enumerate(MULTI):
        row = _isolated(f"multi:{i}")
        row.update(model=name, task=task, batch=batch, seq=seq, target=target, budget=budget)
        row.setdefault("feasible", False)
        print(f"\n{name} {task} {batch}x{seq} on {target} in {budget}: "
              + (f"{row['chosen']['label']}, predicted {row['estimate']['device_bytes'] / GB:.2f}"
                 f" GB, compiled {(row['compiled_device_bytes'] or 0) / GB:.2f} GB"
                 if row["feasible"] else row.get("error", "")[:300]), flush=True)
        rows.append(row)
    return rows


def _gb(x) -> str:
    return "—" if x is None else f"{x / GB:.2f} GB"


def _why(error: str) -> str:
    """A table cell for a compile that gave no figure."""
    import re
    if "memory kinds" in error:
        return "no host memory space on the compile-only GPU"
    m = re.search(r"temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", error)
    if m:
        return f"refused: {m.group(1)} of temporaries > {m.group(2)} HBM"
    if "aborted" in error:
        return "XLA:TPU aborted: " + ("sublane slicing check" if "ublane" in error
                                      else error.split(":")[-1][:60])
    return error[:80]


def tables(path: str) -> str:
    """The README's tables, from the results file."""
    import json
    with open(path) as f:
        doc = json.load(f)
    out = []
    st = doc.get("steps")
    if st:
        keys = ["xla_cpu"] + [k for k in st["rows"][0]["by_target"] if k != "xla_cpu"]
        out += ["| step (bf16) | " + " | ".join(f"{k} peak (temp)" for k in keys)
                + " | attention reached (HLO) |", "|---" * (len(keys) + 2) + "|"]
        for r in st["rows"]:
            cells, att = [], []
            for k in keys:
                v = r["by_target"].get(k, {})
                if "error" in v:
                    cells.append(_why(v["error"]))
                else:
                    cells.append(f"{_gb(v['peak_bytes'])} ({_gb(v['temp_bytes'])})")
                    if v.get("attention"):
                        att.append(f"{k}: {', '.join(v['attention'])}")
            out.append(f"| {r['model']} {r['task']} {r['batch']}x{r['seq']} | "
                       + " | ".join(cells) + f" | {'; '.join(att)} |")
    pl = doc.get("plans")
    if pl:
        tg = list(pl["rows"][0]["by_target"])
        out += ["", "| plan | predicted device / host | " + " | ".join(tg) + " |",
                "|---" * (len(tg) + 2) + "|"]
        for r in pl["rows"]:
            cells = []
            for t in tg:
                v = r["by_target"][t]
                if v["compiled_device_bytes"] is not None:
                    cells.append(f"device {_gb(v['compiled_device_bytes'])}"
                                 + (f", host {_gb(v['compiled_host_bytes'])}"
                                    if v["compiled_host_bytes"] else "")
                                 + f" ({v['relative_error']:+.0%})")
                else:
                    cells.append(_why(v["error"] or ""))
            out.append(f"| {r['model']} {r['task']} {r['budget']} seq {r['seq']}: "
                       f"{r['candidate']} | {_gb(r['predicted_device_bytes'])} / "
                       f"{_gb(r['predicted_host_bytes'])} | " + " | ".join(cells) + " |")
    mu = doc.get("multi")
    if mu:
        out += ["", "| model, task | target, budget | chosen plan | predicted | compiled |",
                "|---|---|---|---|---|"]
        for r in mu["rows"]:
            if not r.get("feasible"):
                out.append(f"| {r['model']} {r['task']} {r['batch']}x{r['seq']} | {r['target']}, "
                           f"{r['budget']} | no plan: {r['error'][:120]} | | |")
                continue
            out.append(f"| {r['model']} {r['task']} {r['batch']}x{r['seq']} | {r['target']}, "
                       f"{r['budget']} | {r['chosen']['label']} | "
                       f"{_gb(r['estimate']['device_bytes'])} | "
                       f"{_gb(r['compiled_device_bytes'])}"
                       + ("" if r["confirmed_by_compile"] else " (not confirmed)") + " |")
    return "\n".join(out)


def main(_):
    if FLAGS.table:
        print(tables(FLAGS.out))
        return
    jax.config.update("jax_platforms", "cpu")
    if FLAGS.row:
        import json
        part, *args = FLAGS.row.split(":", 2)
        row = (_plan_target(int(args[0]), args[1]) if part == "plans" else
               _check_row(int(args[0])) if part == "checks" else _multi_row(int(args[0])))
        print("ROW " + json.dumps(row, default=str), flush=True)
        return
    env = {t: ml.targets.environment(ml.targets.get(t).platform)
           for t in set(FLAGS.targets + FLAGS.plan_targets)}
    targets = {t: ml.targets.get(t).facts() for t in
               set(FLAGS.targets + FLAGS.plan_targets + [m[4] for m in MULTI])}
    parts = {"steps": steps, "plans": plans, "multi": multi, "checks": checks}
    for part, fn in parts.items():
        if FLAGS.part in ("all", part):
            t0 = time.perf_counter()
            rows = fn()
            results.write(FLAGS.out, {"rows": rows, "seconds": time.perf_counter() - t0,
                                      "targets": targets, "compilers": env}, key=part)


if __name__ == "__main__":
    app.run(main)
