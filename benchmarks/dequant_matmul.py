"""Fused dequant-matmul vs bf16 jnp.dot vs XLA's dequantize-then-dot.

    python benchmarks/dequant_matmul.py --out=results/bench_dequant_matmul.json

On a GPU: decode shapes (M = 1..16) report the achieved fraction of HBM
bandwidth (bytes of packed weights + activations + output over time, against
the device's peak); prefill shapes report TFLOP/s.  On CPU the script runs
small shapes through the XLA path only, to check it end to end -- CPU timings
are not speed claims.  Results are JSON with the device name.
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _bench import HBM_PEAK, time_fn

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results/bench_dequant_matmul.json", "Output JSON.")
flags.DEFINE_integer("iters", 50, "Timed iterations per case.")


def _cases(on_gpu):
    if on_gpu:
        shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]
        ms = [1, 4, 16, 512, 2048]
    else:
        shapes = [(512, 512)]
        ms = [1, 64]
    return [(m, k, n) for (k, n) in shapes for m in ms]


def main(_):
    import memlab as ml
    from memlab import results
    from memlab.quant import qmatmul

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    peak = HBM_PEAK.get(dev.device_kind)
    rng = np.random.default_rng(0)
    fmts = {"int8": ml.quant.int8(), "int4-g128": ml.quant.int4(128, symmetric=False),
            "nf4-b64": ml.quant.nf4(64, double_quant=False)}
    rows = []
    for m, k, n in _cases(on_gpu):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
        dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
        t_dense = time_fn(dense, x, w, iters=FLAGS.iters)
        for name, fmt in fmts.items():
            q = fmt.quantize(w)
            xla = jax.jit(lambda a, qq: jnp.dot(a, qq.dequantize(a.dtype),
                                                preferred_element_type=jnp.float32).astype(a.dtype))
            fused = jax.jit(lambda a, qq: qmatmul(a, qq))  # Pallas kernel where one lowers
            t_xla = time_fn(xla, x, q, iters=FLAGS.iters)
            t_fused = time_fn(fused, x, q, iters=FLAGS.iters)
            moved = q.nbytes + x.nbytes + m * n * 2
            row = {"M": m, "K": k, "N": n, "format": name, "weight_bytes": q.nbytes,
                   "seconds": {"bf16_dot": t_dense, "xla_dequant_dot": t_xla, "memlab": t_fused}}
            if m <= 16:
                row["bandwidth_GBps"] = {kk: moved / v / 1e9 for kk, v in row["seconds"].items()}
                if peak:
                    row["fraction_of_hbm_peak"] = {kk: moved / v / peak
                                                   for kk, v in row["seconds"].items()}
            else:
                row["TFLOPs"] = {kk: 2 * m * k * n / v / 1e12 for kk, v in row["seconds"].items()}
            rows.append(row)
            print(m, k, n, name, {kk: f"{v * 1e6:.1f}us" for kk, v in row["seconds"].items()})
    results.write(FLAGS.out, {
        "benchmark": "dequant_matmul", "hbm_peak_Bps": peak,
        "note": None if on_gpu else "CPU run: checks the script end to end; timings are not claims",
        "rows": rows})


if __name__ == "__main__":
    app.run(main)
