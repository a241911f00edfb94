"""Compile every Pallas kernel for a device this machine does not have, and report its resources.

    .venv-targets/bin/python benchmarks/compile_report.py --target=h100   # results/kernels_h100.json
    .venv-targets/bin/python benchmarks/compile_report.py --target=v5e    # results/kernels_v5e.json

(``make targets-env`` builds ``.venv-targets``: the CUDA plugin matching jaxlib,
cuDNN, ``ptxas`` and libtpu.)  For each model's shapes (SmolLM2-135M,
Llama-3-8B, Gemma-3-270M; :data:`memlab.targets.kernels.MODEL_SHAPES`), each
dtype and each kernel (:func:`memlab.targets.kernels.cases`: flash attention
fwd/bwd, split-K / paged / KIVI decode, lightning attention fwd/bwd, int8 /
int4 / NF4 dequant-matmul, cut cross-entropy fwd/dH/dW) at its default block
sizes, the kernel is lowered with ``backend="triton"`` (GPU targets) or
``"mosaic_tpu"`` (TPU targets) and compiled by XLA for the target.

A row records: compiled, or the compiler's error; compile seconds; XLA's
``memory_analysis()``; the FLOPs and bytes each ``pallas_call`` declares and its
grid (so a timing on a real device converts to TFLOP/s and GB/s at once).  On a
GPU target also, per launched kernel, from XLA's dump: grid, threads, dynamic
shared memory, and from ``ptxas -v`` on the PTX: registers per thread, spill
stores/loads, stack frame and ptxas' performance notes.
"""
import json
import os
import platform as host_platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never start a local GPU runtime

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

import memlab as ml  # noqa: E402
from memlab.targets import kernels as K  # noqa: E402
from memlab.targets import report as R  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "h100", "Compile target (memlab.targets.names()).")
flags.DEFINE_list("models", list(K.MODEL_SHAPES), "Model shapes to compile at.")
flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Activation dtypes.")
flags.DEFINE_list("families", list(K.families()), "Kernel families.")
flags.DEFINE_string("out", None, "Output JSON (default results/kernels_<target>.json).")
flags.DEFINE_string("table", None, "Print the README's Markdown table from this results file "
                    "(e.g. results/kernels_h100.json) for --table_model and compile nothing.")
flags.DEFINE_string("table_model", "llama3-8b", "Model shapes the --table rows show.")


def compile_case(target, case, backend, ptxas) -> dict:
    row = {"case": case.name, "family": case.family, "shape": case.shape}
    dump = tempfile.mkdtemp(prefix="memlab-dump-") if target.is_gpu else None
    t0 = time.perf_counter()
    try:
        compiled = ml.targets.compile(case.fn, case.args, target, dump_to=dump)
        row["compile_seconds"] = round(time.perf_counter() - t0, 3)
        row["compiled"] = True
        ma = compiled.memory_analysis()
        row["memory"] = {"argument_bytes": int(ma.argument_size_in_bytes),
                         "output_bytes": int(ma.output_size_in_bytes),
                         "temp_bytes": int(ma.temp_size_in_bytes)}
        row["custom_calls"] = sorted({c["kernel"] or c["target"]
                                      for c in R.custom_calls(compiled.as_text())})
        if dump:
            arch = "sm_" + target.compute_capability.replace(".", "") + (
                "a" if target.compute_capability.startswith("9") else "")
            row["kernels"] = R.gpu_kernels(dump, ptxas, arch, names=case.kernels)
        row["declared"] = K.declared_cost(case.fn, case.args)
    except Exception as e:  # noqa: BLE001 -- a report records failures and goes on
        row["compiled"] = False
        row["compile_seconds"] = round(time.perf_counter() - t0, 3)
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"
    finally:
        if dump:
            shutil.rmtree(dump, ignore_errors=True)
    return row


def _summary(row) -> str:
    if not row["compiled"]:
        return f"  FAILED {row['error'][:160]}"
    ks = row.get("kernels") or []
    parts = [f"{k['name']}: {k['registers']} regs, {k['shared_memory_bytes'] // 1024} KiB smem, "
             f"spill {k['spill_stores']} B" for k in ks]
    return "  " + ("; ".join(parts) if parts else f"temp {row['memory']['temp_bytes']} B")


def table(path: str, model: str) -> str:
    """Markdown: one row per launched kernel at ``model``'s shapes, bf16 and float32."""
    with open(path) as f:
        doc = json.load(f)
    gpu = doc["backend"] == "triton"
    s = doc["summary"]
    spills = sorted({(r["dtype"], k["name"]) for r in doc["rows"]
                     for k in r.get("kernels") or () if k.get("spill_stores")})
    lines = [f"{doc['target']['device_kind']} ({doc['target']['name']}): {s['compiled']}/"
             f"{s['cases']} cases compiled (3 models x 2 dtypes x 13 kernel calls)"
             + (f"; register spills in {sum(d == 'bfloat16' for d, _ in spills)} bf16 and "
                f"{sum(d == 'float32' for d, _ in spills)} float32 kernels (any model)"
                if gpu else ""), ""]
    if gpu:
        lines += ["| kernel | dtype | grid | threads | shared mem | registers | spills (st/ld B) |",
                  "|---|---|---|---|---|---|---|"]
    else:
        lines += ["| kernel | dtype | grid | compiled | temp | declared GFLOP | declared MB |",
                  "|---|---|---|---|---|---|---|"]
    seen = set()  # a backward case launches its forward kernel again: one row each
    for r in doc["rows"]:
        if r["model"] != model:
            continue
        if not r["compiled"]:
            lines.append(f"| {r['case']} | {r['dtype']} | | failed: {r['error'][:80]} | | | |")
            continue
        if gpu:
            for k in r["kernels"]:
                if (k["name"], r["dtype"]) in seen:
                    continue
                seen.add((k["name"], r["dtype"]))
                lines.append(f"| {k['name']} | {r['dtype']} | {'x'.join(map(str, k['grid']))} | "
                             f"{k['threads'][0]} | {k['shared_memory_bytes'] / 1024:.0f} KiB | "
                             f"{k['registers']} | {k['spill_stores']}/{k['spill_loads']} |")
        else:
            for name, d in r["declared"].items():
                if (name, r["dtype"]) in seen:
                    continue
                seen.add((name, r["dtype"]))
                lines.append(f"| {name} | {r['dtype']} | {'x'.join(map(str, d['grid']))} | yes | "
                             f"{r['memory']['temp_bytes'] / 2**20:.1f} MiB | "
                             f"{d['flops'] / 1e9:.1f} | {d['bytes_accessed'] / 1e6:.1f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.table:
        print(table(FLAGS.table, FLAGS.table_model))
        return
    target = ml.targets.get(FLAGS.target)
    env = ml.targets.environment(target.platform)
    backend = "triton" if target.is_gpu else "mosaic_tpu"
    ptxas = ml.targets.ptxas_path() if target.is_gpu else None
    rows = []
    for model in FLAGS.models:
        for dtype in FLAGS.dtypes:
            for case in K.cases(model, dtype, backend):
                if case.family not in FLAGS.families:
                    continue
                row = dict(model=model, dtype=dtype, **compile_case(target, case, backend, ptxas))
                rows.append(row)
                print(f"{model:14s} {dtype:9s} {case.name:26s} "
                      f"{'ok' if row['compiled'] else 'FAILED'} ({row['compile_seconds']:.1f}s)")
                print(_summary(row), flush=True)
    out = FLAGS.out or os.path.join("results", f"kernels_{target.name.replace(':', '_')}.json")
    failed = [r for r in rows if not r["compiled"]]
    spills = [r for r in rows for k in r.get("kernels") or () if k.get("spill_stores")]
    doc = {"target": target.facts(), "backend": backend, "environment": env,
           "jax": jax.__version__, "host": host_platform.machine(),
           "python": sys.version.split()[0], "workload": {
               "prefill_tokens": K.PREFILL_T, "decode_rows": K.DECODE_B,
               "decode_cache": K.DECODE_S, "page_size": K.PAGE, "matmul_rows": K.MATMUL_M,
               "cross_entropy_tokens": K.CE_TOKENS, "quant_group": K.QUANT_GROUP},
           "summary": {"cases": len(rows), "compiled": len(rows) - len(failed),
                       "failed": len(failed), "cases_with_spills": len(spills)},
           "rows": rows}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\n{len(rows) - len(failed)}/{len(rows)} compiled for {target.device_kind}; "
          f"{len(spills)} with register spills -> {out}")


if __name__ == "__main__":
    app.run(main)
