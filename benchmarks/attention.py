"""Attention kernels against jax.nn.dot_product_attention (XLA, cuDNN) and JAX's Pallas ops.

    python benchmarks/attention.py                       # writes results/bench_attention_<device>.json
    python benchmarks/attention.py --part=decode --seqs=1024,8192

On a GPU:

* ``prefill``: causal attention forward and forward+backward TFLOP/s over
  sequence lengths 1k-32k (bf16, llama3-8b heads: H=32, Hkv=8, D=128, batch
  chosen to keep ``batch * T`` = ``--tokens``) for memlab's flash kernel
  (Triton), cuDNN and XLA through ``jax.nn.dot_product_attention``, JAX's Pallas
  reference ``pallas.ops.gpu.attention.mha`` (MHA only: KV heads repeated
  outside the timed region) and memlab's chunked XLA path.  FLOPs follow
  FlashAttention's convention: forward ``4 * B * H * T * S * D / 2`` when causal,
  backward 2.5x the forward.
* ``decode``: one query token per row over a cache of S tokens: achieved
  bandwidth (cache bytes read + q + out, over time) as a fraction of the HBM
  peak, for memlab's split-K decode, its paged decode, its KIVI 4/2-bit decode
  (bytes = the quantized cache), JAX's ``pallas.ops.gpu.decode_attention.gqa``
  and a plain XLA masked softmax.

Every case also records XLA's compiled temp bytes.  A case that fails (out of
memory, a lowering error) is recorded with its error instead of stopping the run.

On CPU the script measures memory only: compiled temp bytes of naive vs chunked
attention (forward and forward+backward) and of lightning attention's chunked
path, over the same sequence lengths; compile only, nothing is run at 32k.
"""
import math
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _bench import HBM_PEAK, temp_bytes, time_fn

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON (default results/bench_attention_<device>.json).")
flags.DEFINE_enum("part", "all", ["all", "prefill", "decode"], "Which benchmark to run.")
flags.DEFINE_list("seqs", ["1024", "2048", "4096", "8192", "16384", "32768"], "Sequence lengths.")
flags.DEFINE_integer("tokens", 16384, "Prefill: batch * T held at this many tokens.")
flags.DEFINE_integer("decode_batch", 8, "Decode: batch rows.")
flags.DEFINE_integer("heads", 32, "Query heads.")
flags.DEFINE_integer("kv_heads", 8, "KV heads.")
flags.DEFINE_integer("head_dim", 128, "Head dim.")
flags.DEFINE_integer("iters", 20, "Timed iterations per case.")


def _record(rows, row, fn):
    """Run ``fn(row)``; keep the error (not the run) if it fails."""
    try:
        fn(row)
    except Exception as e:  # noqa: BLE001 -- a benchmark records failures and goes on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc(limit=2)
    rows.append(row)
    print({k: v for k, v in row.items() if k != "traceback"})


def _prefill_impls():
    import memlab as ml
    from jax.experimental.pallas.ops.gpu import attention as jax_pallas

    def jax_mha(q, k, v):
        g = q.shape[2] // k.shape[2]
        return jax_pallas.mha(q, jnp.repeat(k, g, 2), jnp.repeat(v, g, 2), None,
                              sm_scale=1 / math.sqrt(q.shape[-1]), causal=True)

    return {
        "memlab_flash_triton": lambda q, k, v: ml.nn.attention(q, k, v, causal=True, impl="pallas_triton"),
        "cudnn": lambda q, k, v: ml.nn.attention(q, k, v, causal=True, impl="cudnn"),
        "xla": lambda q, k, v: ml.nn.attention(q, k, v, causal=True, impl="xla"),
        "jax_pallas_mha": jax_mha,
        "memlab_chunked": lambda q, k, v: ml.nn.attention(q, k, v, causal=True, impl="chunked"),
    }


def prefill_gpu(rows):
    h, hkv, d = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
    rng = jax.random.key(0)
    for t in map(int, FLAGS.seqs):
        b = max(1, FLAGS.tokens // t)
        kq, kk, kv, kc = jax.random.split(jax.random.fold_in(rng, t), 4)
        q = jax.random.normal(kq, (b, t, h, d), jnp.bfloat16)
        k = jax.random.normal(kk, (b, t, hkv, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, t, hkv, d), jnp.bfloat16)
        ct = jax.random.normal(kc, (b, t, h, d), jnp.bfloat16)
        flops_fwd = 4 * b * h * t * t * d / 2
        for name, f in _prefill_impls().items():
            def case(row, f=f):
                if name == "xla" and b * h * t * t * 4 > 24 * 2**30:
                    row["skipped"] = "XLA materializes the scores: over 24 GiB"
                    return
                fwd = jax.jit(f)
                bwd = jax.jit(lambda q, k, v, ct: jax.vjp(f, q, k, v)[1](ct))
                row["temp_bytes"] = {"fwd": temp_bytes(f, q, k, v),
                                     "fwd_bwd": temp_bytes(lambda *a: jax.vjp(f, *a[:3])[1](a[3]), q, k, v, ct)}
                tf = time_fn(fwd, q, k, v, iters=FLAGS.iters)
                tb = time_fn(bwd, q, k, v, ct, iters=FLAGS.iters)
                row["seconds"] = {"fwd": tf, "fwd_bwd": tf + tb}
                row["TFLOPs"] = {"fwd": flops_fwd / tf / 1e12, "fwd_bwd": 3.5 * flops_fwd / (tf + tb) / 1e12}
            _record(rows, {"part": "prefill", "impl": name, "B": b, "T": t, "H": h, "Hkv": hkv,
                           "D": d, "dtype": "bfloat16", "causal": True}, case)


def decode_gpu(rows, peak):
    import memlab as ml
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
    from memlab_kernels import decode_attention as mdec
    from memlab_kernels import quantized_kv_decode as kivi

    h, hkv, d, b = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.decode_batch
    rng = jax.random.key(1)
    for s in map(int, FLAGS.seqs):
        kq, kk, kv = jax.random.split(jax.random.fold_in(rng, s), 3)
        q = jax.random.normal(kq, (b, h, d), jnp.bfloat16)
        k = jax.random.normal(kk, (b, s, hkv, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, s, hkv, d), jnp.bfloat16)
        lengths = jnp.full((b,), s, jnp.int32)
        dense_bytes = k.nbytes + v.nbytes + 2 * q.nbytes
        page = 64
        pages = s // page
        perm = np.random.default_rng(s).permutation(b * pages).astype(np.int32)
        tables = jnp.asarray(perm.reshape(b, pages))
        to_pages = lambda a: jnp.zeros((hkv, b * pages, page, d), a.dtype).at[:, tables.reshape(-1)].set(  # noqa: E731
            a.reshape(b * pages, page, hkv, d).transpose(2, 0, 1, 3))
        kp, vp = to_pages(k), to_pages(v)
        impls = {
            "memlab_split_k": (lambda: jax.jit(lambda q, k, v, n: mdec.decode_attention(q, k, v, n, backend="triton")),
                               (q, k, v, lengths), dense_bytes),
            "memlab_paged": (lambda: jax.jit(lambda q, kp, vp, n, t: mdec.paged_decode_attention(
                q, kp, vp, n, t, backend="triton")), (q, kp, vp, lengths, tables), dense_bytes),
            "jax_pallas_gqa": (lambda: jax.jit(lambda q, k, v, n: jax_decode.gqa(q, k, v, kv_seq_len=n)),
                               (q, k, v, lengths), dense_bytes),
            "xla": (lambda: jax.jit(lambda q, k, v, n: ml.nn.decode_attention(q, k, v, n, impl="xla")),
                    (q, k, v, lengths), dense_bytes),
        }
        for bits in (4, 2):
            try:
                cache = kivi.kivi_quantize(k, v, lengths, bits=bits, group_size=128, residual=128)
                nbytes = sum(x.nbytes for x in jax.tree.leaves(cache)) + 2 * q.nbytes
                impls[f"memlab_kivi{bits}"] = (
                    lambda: jax.jit(lambda q, c: kivi.quantized_decode_attention(q, c, backend="triton")),
                    (q, cache), nbytes)
            except Exception as e:  # noqa: BLE001
                rows.append({"part": "decode", "impl": f"memlab_kivi{bits}", "S": s, "error": repr(e)[:300]})
        for name, (make, args, nbytes) in impls.items():
            def case(row, make=make, args=args, nbytes=nbytes):
                fn = make()
                row["temp_bytes"] = int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
                sec = time_fn(fn, *args, iters=FLAGS.iters)
                row.update(seconds=sec, bytes_read=int(nbytes), bandwidth_GBps=nbytes / sec / 1e9)
                if peak:
                    row["fraction_of_hbm_peak"] = nbytes / sec / peak
            _record(rows, {"part": "decode", "impl": name, "B": b, "S": s, "H": h, "Hkv": hkv, "D": d,
                           "dtype": "bfloat16"}, case)


def memory_cpu(rows):
    """Compile-only temp bytes: naive vs chunked vs lightning (linear) attention."""
    import memlab as ml
    from memlab_kernels.lightning_attention import lightning_attention

    h, hkv, d = 8, 2, 64
    for t in map(int, FLAGS.seqs):
        q = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, hkv, d), jnp.float32)
        kv_full = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
        fns = {
            "naive": (lambda q, k, v: ml.nn.attention(q, k, v, causal=True, impl="naive"), (q, kv, kv)),
            "chunked": (lambda q, k, v: ml.nn.attention(q, k, v, causal=True, impl="chunked"), (q, kv, kv)),
            "lightning_xla": (lambda q, k, v: lightning_attention(q, k, v, backend="xla"),
                              (q, kv_full, kv_full)),
        }
        for name, (f, args) in fns.items():
            def case(row, f=f, args=args):
                grad = lambda *a: jax.grad(lambda *x: jnp.sum(f(*x)), (0, 1, 2))(*a)  # noqa: E731
                row["temp_bytes"] = {"fwd": temp_bytes(f, *args), "fwd_bwd": temp_bytes(grad, *args)}
            _record(rows, {"part": "memory", "impl": name, "B": 1, "T": t, "H": h,
                           "Hkv": h if name.startswith("lightning") else hkv, "D": d,
                           "dtype": "float32", "causal": True}, case)


def main(_):
    from memlab import results

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    peak = HBM_PEAK.get(dev.device_kind)
    rows = []
    if on_gpu:
        if FLAGS.part in ("all", "prefill"):
            prefill_gpu(rows)
        if FLAGS.part in ("all", "decode"):
            decode_gpu(rows, peak)
    else:
        memory_cpu(rows)
    kind = dev.device_kind.replace(" ", "_") if on_gpu else "cpu"
    out = FLAGS.out or f"results/bench_attention_{kind}.json"
    results.write(out, {
        "benchmark": "attention", "hbm_peak_Bps": peak,
        "note": None if on_gpu else "CPU: compiled memory only (temp bytes); speed needs a GPU",
        "rows": rows})
    print("wrote", out)


if __name__ == "__main__":
    app.run(main)
