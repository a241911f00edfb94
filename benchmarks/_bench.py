"""Shared by the benchmark scripts: timing and device peaks (run the scripts from the repo root)."""
import time

import jax

# Peak HBM bandwidth in bytes/s by device kind (vendor datasheets).
HBM_PEAK = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12,
            "NVIDIA A100-SXM4-80GB": 2.04e12, "NVIDIA A100-SXM4-40GB": 1.55e12}


def time_fn(fn, *args, iters):
    """Mean seconds per call after one warm-up call (compile excluded)."""
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def temp_bytes(fn, *args):
    """XLA's compiled temp bytes of ``jit(fn)`` on ``args`` (arrays or ShapeDtypeStructs)."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)
