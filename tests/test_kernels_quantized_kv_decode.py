"""KIVI-quantized KV-cache decode attention (``memlab_kernels.quantized_kv_decode``).

Kernel and reference results are checked against an independent float64 numpy
implementation written here: its own bit packing / unpacking (walking the
documented bit order), its own min/max quantizer, its own dense masked
attention.  The Triton kernel body runs in the HLO interpreter
(``backend="interpret"``); the Mosaic body runs once in TPU interpret mode; both
are lowered for CUDA / TPU from this CPU via ``jax.export``.
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export
from memlab_kernels import quantized_kv_decode as qk

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 2e-5, BF16: 2e-2}
NP_SCALE = {F32: np.float32, BF16: ml_dtypes.bfloat16}


# ---------------------------------------------------------------- numpy side
def np_pack(codes, axis, bits):
    """P = 8 // bits consecutive codes along ``axis`` per byte, the first in the low bits."""
    per = 8 // bits
    codes = np.moveaxis(np.asarray(codes, np.uint8), axis, 0)
    out = np.zeros((codes.shape[0] // per,) + codes.shape[1:], np.uint8)
    for i in range(codes.shape[0]):
        out[i // per] |= (codes[i] << (bits * (i % per))).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def np_unpack(packed, axis, bits):
    per = 8 // bits
    packed = np.moveaxis(np.asarray(packed, np.uint8), axis, 0)
    out = np.zeros((packed.shape[0] * per,) + packed.shape[1:], np.uint8)
    for i in range(out.shape[0]):
        out[i] = (packed[i // per] >> (bits * (i % per))) & ((1 << bits) - 1)
    return np.moveaxis(out, 0, axis)


def np_minmax(x, axis, bits, sdt):
    """KIVI's asymmetric quantizer on float32 ``x``, statistics over ``axis``."""
    levels = 2 ** bits - 1
    mn, mx = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    scale = ((mx - mn) * np.float32(1 / levels)).astype(sdt)
    zero = mn.astype(sdt)
    s32, z32 = scale.astype(np.float32), zero.astype(np.float32)
    inv = np.where(s32 > 0, np.float32(1) / np.where(s32 > 0, s32, np.float32(1)), np.float32(0))
    code = np.clip(np.round((x - z32) * inv), 0, levels)
    return code.astype(np.uint8), scale.squeeze(axis), zero.squeeze(axis)


def np_quantize(k, v, lengths, bits, g, r, sdt, capacity=None):
    """Independent KIVI quantization: dict of arrays named like KiviCache's fields."""
    k = np.asarray(jnp.asarray(k).astype(F32))
    v = np.asarray(jnp.asarray(v).astype(F32))
    b, t, hkv, d = k.shape
    s = capacity or t
    out = {f: [] for f in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")}
    k_res, v_res = np.zeros((b, r, hkv, d), np.float32), np.zeros((b, r, hkv, d), np.float32)
    qlens, rlens = [], []
    for i, n in enumerate(lengths):
        ql = n // g * g
        kq, vq = np.zeros((s, hkv, d), np.float32), np.zeros((s, hkv, d), np.float32)
        kq[:ql], vq[:ql] = k[i, :ql], v[i, :ql]
        kc, ks, kz = np_minmax(kq.reshape(s // g, g, hkv, d), 1, bits, sdt)       # per channel
        vc, vs, vz = np_minmax(vq.reshape(s, hkv, d // g, g), 3, bits, sdt)       # per token
        for f, a in (("k_codes", np_pack(kc.reshape(s, hkv, d), 0, bits)), ("k_scale", ks),
                     ("k_zero", kz), ("v_codes", np_pack(vc.reshape(s, hkv, d), 2, bits)),
                     ("v_scale", vs), ("v_zero", vz)):
            out[f].append(a)
        k_res[i, :n - ql], v_res[i, :n - ql] = k[i, ql:n], v[i, ql:n]
        qlens.append(ql)
        rlens.append(n - ql)
    out = {f: np.stack(a) for f, a in out.items()}
    out.update(k_res=k_res, v_res=v_res, quantized_lengths=np.array(qlens, np.int32),
               residual_lengths=np.array(rlens, np.int32))
    return out


def np_dequantize(cache):
    """float64 (k, v) lists of each row's valid tokens, from the cache's raw arrays."""
    bits, g = cache.bits, cache.group_size
    f64 = lambda a: np.asarray(jnp.asarray(a).astype(F32), np.float64)
    kc = np_unpack(cache.k_codes, 1, bits).astype(np.float64)
    k = kc * np.repeat(f64(cache.k_scale), g, 1) + np.repeat(f64(cache.k_zero), g, 1)
    vc = np_unpack(cache.v_codes, 3, bits).astype(np.float64)
    v = vc * np.repeat(f64(cache.v_scale), g, 3) + np.repeat(f64(cache.v_zero), g, 3)
    ks, vs = [], []
    for i, (ql, rl) in enumerate(zip(np.asarray(cache.quantized_lengths),
                                     np.asarray(cache.residual_lengths))):
        ks.append(np.concatenate([k[i, :ql], f64(cache.k_res)[i, :rl]]))
        vs.append(np.concatenate([v[i, :ql], f64(cache.v_res)[i, :rl]]))
    return ks, vs


def np_attention(q, cache, scale=None):
    q = np.asarray(jnp.asarray(q).astype(F32), np.float64)
    b, h, d = q.shape
    hkv = cache.k_res.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    ks, vs = np_dequantize(cache)
    out = np.zeros((b, h, d))
    for i in range(b):
        if len(ks[i]) == 0:
            continue
        for hh in range(h):
            kv = hh // (h // hkv)
            s = ks[i][:, kv] @ q[i, hh] * scale
            p = np.exp(s - s.max())
            out[i, hh] = p @ vs[i][:, kv] / p.sum()
    return out


def rand_kv(seed, b, t, hkv, d, dtype):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((b, t, hkv, d)) * (1 + 4 * (rng.random(d) < 0.1))  # outlier channels
    v = rng.standard_normal((b, t, hkv, d))
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def assert_close(y, ref64, dtype):
    tol = TOL[dtype]
    y = np.asarray(jnp.asarray(y).astype(F32), np.float64)
    scale = max(np.abs(ref64).max(), 1e-30)
    np.testing.assert_allclose(y, ref64, rtol=tol, atol=tol * scale)


def assert_matches_numpy_quantizer(cache, ref):
    for f, want in ref.items():
        got = np.asarray(jnp.asarray(getattr(cache, f)).astype(
            F32 if jnp.issubdtype(getattr(cache, f).dtype, jnp.floating) else getattr(cache, f).dtype))
        np.testing.assert_array_equal(got, np.asarray(want).astype(got.dtype), err_msg=f)


# --------------------------------------------------- kernel vs float64 numpy
# (bits, D, q dtype, H, Hkv, G, T, residual, scale dtype, block_k, num_splits):
# every bits value, both head dims, both dtypes, MHA / GQA / MQA and a
# non-power-of-two GQA group (padded query heads) each appear.
CASES = [
    (8, 64, F32, 8, 2, 16, 128, 16, F32, 32, 2),
    (4, 128, BF16, 4, 4, 32, 128, 48, F32, 32, 4),
    (2, 64, BF16, 8, 1, 16, 96, 16, BF16, 32, 3),
    (2, 128, F32, 6, 2, 32, 128, 32, F32, 64, 2),
    (4, 64, F32, 4, 1, 8, 64, 8, F32, 16, 2),
    (8, 128, BF16, 8, 2, 64, 128, 64, BF16, 64, 1),
]


def _case_id(c):
    bits, d, dt, h, hkv, g, t, r, sdt, bk, ns = c
    return (f"b{bits}-D{d}-{jnp.dtype(dt).name}-H{h}-Hkv{hkv}-G{g}-T{t}-R{r}"
            f"-s{jnp.dtype(sdt).name}-bk{bk}x{ns}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_float64_dequantize_then_attend(case):
    bits, d, dtype, h, hkv, g, t, r, sdt, bk, ns = case
    # Rows: off the group grid, empty, full, residual only, partly full residual.
    lengths = [t - 3, 0, t, g // 2 + 1, g + 1]
    k, v = rand_kv(bits * d + h, len(lengths), t, hkv, d, dtype)
    q = jnp.asarray(np.random.default_rng(h).standard_normal((len(lengths), h, d)), dtype)
    cache = qk.kivi_quantize(k, v, jnp.asarray(lengths), bits=bits, group_size=g, residual=r,
                             scale_dtype=sdt)
    assert_matches_numpy_quantizer(cache, np_quantize(k, v, lengths, bits, g, r, NP_SCALE[sdt]))
    ref64 = np_attention(q, cache)
    y_kernel = qk.quantized_decode_attention(
        q, cache, backend="interpret", block_sizes=qk.BlockSizes(block_k=bk, num_splits=ns))
    y_xla = qk.quantized_decode_attention(q, cache, backend="xla")
    for y in (y_kernel, y_xla):
        chex.assert_shape(y, (len(lengths), h, d))
        chex.assert_type(y, dtype)
        assert_close(y, ref64, dtype)
        chex.assert_trees_all_equal(y[1], jnp.zeros((h, d), dtype))   # empty row -> 0


def test_default_blocks_jit_auto_and_explicit_scale():
    k, v = rand_kv(1, 5, 128, 2, 64, F32)         # the shapes of CASES[0]
    q = jnp.asarray(np.random.default_rng(2).standard_normal((5, 8, 64)), F32)
    cache = qk.kivi_quantize(k, v, jnp.array([100, 77, 128, 0, 1]), bits=8, group_size=16,
                             residual=16)
    f = jax.jit(lambda q, c: qk.quantized_decode_attention(q, c, scale=0.3, backend="interpret"))
    assert_close(f(q, cache), np_attention(q, cache, scale=0.3), F32)
    if jax.default_backend() == "cpu":   # "auto" is the XLA reference on CPU.
        chex.assert_trees_all_equal(qk.quantized_decode_attention(q, cache),
                                    qk.quantized_decode_attention_reference(q, cache))


@settings(max_examples=6, deadline=None)
@given(case=st.sampled_from(CASES), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_property_kernel_equals_reference(case, data, seed):
    # Shapes and block sizes come from CASES (their kernels are already
    # compiled); lengths and data are drawn.
    bits, d, dtype, h, hkv, g, t, r, sdt, bk, ns = case
    lengths = data.draw(st.lists(st.integers(0, t), min_size=5, max_size=5), label="lengths")
    k, v = rand_kv(seed, 5, t, hkv, d, dtype)
    q = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((5, h, d)), dtype)
    cache = qk.kivi_quantize(k, v, jnp.asarray(lengths), bits=bits, group_size=g, residual=r,
                             scale_dtype=sdt)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    assert np.all(np.asarray(cache.quantized_lengths) % g == 0)
    assert np.all(np.asarray(cache.residual_lengths) < g)
    y = qk.quantized_decode_attention(q, cache, backend="interpret",
                                      block_sizes=qk.BlockSizes(block_k=bk, num_splits=ns))
    assert_close(y, np_attention(q, cache), dtype)


# ------------------------------------------------------------ the KIVI claim
def test_per_channel_keys_beat_per_token_keys_at_2_bits_with_outlier_channels():
    # Real LLM keys have a few channels of large magnitude (KIVI, section 3).
    # Per-channel quantization gives each such channel its own range; a
    # per-token group containing an outlier channel wastes its 4 levels on it.
    rng = np.random.default_rng(0)
    t, d, g = 256, 64, 32
    k = rng.standard_normal((1, t, 1, d))
    outliers = rng.choice(d, 4, replace=False)
    k[..., outliers] = k[..., outliers] * 3 + rng.choice([-15.0, 15.0], 4)
    k = jnp.asarray(k, F32)
    q = rng.standard_normal((64, d))
    # Keys on the key path are quantized per channel; passing the same keys as
    # values quantizes them per token with the same group size.
    cache = qk.kivi_quantize(k, k, jnp.array([t]), bits=2, group_size=g, residual=g)
    k_chan, k_tok, _ = qk.kivi_dequantize(cache)
    k64 = np.asarray(k, np.float64)[0, :, 0]
    err = {}
    for name, kh in (("per_channel", k_chan), ("per_token", k_tok)):
        kh = np.asarray(kh, np.float64)[0, :t, 0]
        err[name] = np.sqrt(np.mean((q @ (kh - k64).T) ** 2))
    score_rms = np.sqrt(np.mean((q @ k64.T) ** 2))
    assert err["per_channel"] < 0.5 * err["per_token"], err
    assert err["per_channel"] < 0.25 * score_rms, (err, score_rms)


# ----------------------------------------------------------------- appending
@pytest.mark.parametrize("bits,sdt,dtype", [(2, F32, F32), (8, BF16, BF16)])
def test_append_token_by_token_equals_quantizing_the_whole_sequence(bits, sdt, dtype):
    g, t, steps = 16, 128, 40
    start = np.array([0, 5, 31, 60])
    k, v = rand_kv(bits, 4, t, 2, 64, dtype)
    cache = qk.kivi_quantize(k, v, jnp.asarray(start), bits=bits, group_size=g, residual=g,
                             scale_dtype=sdt)
    append = jax.jit(qk.kivi_append, donate_argnums=0)
    rows = np.arange(4)
    for i in range(steps):
        pos = jnp.asarray(start + i)
        cache = append(cache, k[rows, pos], v[rows, pos])
    want = qk.kivi_quantize(k, v, jnp.asarray(start + steps), bits=bits, group_size=g,
                            residual=g, scale_dtype=sdt)
    chex.assert_trees_all_equal(cache, want)          # bit-exact codes, scales, residuals
    assert_matches_numpy_quantizer(cache, np_quantize(k, v, start + steps, bits, g, g,
                                                      NP_SCALE[sdt]))


def test_append_from_empty_and_overflow_keeps_first_tokens():
    s, r, g = 16, 16, 16
    cache = qk.kivi_empty(2, s, 1, 64, bits=4, group_size=g, residual=r, dtype=F32)
    k, v = rand_kv(3, 2, s + r + 10, 1, 64, F32)
    for i in range(s + r):
        cache = qk.kivi_append(cache, k[:, i], v[:, i])
    with pytest.raises(ValueError, match="are full"):       # eagerly: a clear error
        qk.kivi_append(cache, k[:, s + r], v[:, s + r])
    jitted = jax.jit(qk.kivi_append)                          # under jit: dropped, lengths stop
    for i in range(s + r, s + r + 10):
        cache = jitted(cache, k[:, i], v[:, i])
    np.testing.assert_array_equal(np.asarray(cache.quantized_lengths), [s, s])
    np.testing.assert_array_equal(np.asarray(cache.residual_lengths), [r, r])
    # Tokens past S + R were dropped; the cache holds exactly the first S + R.
    want = qk.kivi_quantize(k[:, :s], v[:, :s], jnp.array([s, s]), bits=4, group_size=g,
                            residual=r)
    chex.assert_trees_all_equal((cache.k_codes, cache.v_codes, cache.v_scale),
                                (want.k_codes, want.v_codes, want.v_scale))
    chex.assert_trees_all_equal(cache.k_res, k[:, s:s + r])
    kd, vd, lengths = qk.kivi_dequantize(cache)
    np.testing.assert_array_equal(np.asarray(lengths), [s + r, s + r])
    np.testing.assert_array_equal(np.asarray(kd[:, s:]), np.asarray(k[:, s:s + r]))


def test_dequantize_matches_numpy():
    k, v = rand_kv(4, 3, 64, 2, 64, BF16)
    cache = qk.kivi_quantize(k, v, jnp.array([50, 64, 7]), bits=4, group_size=16, residual=32,
                             capacity=96)
    assert cache.capacity == 96 and cache.residual == 32
    kd, vd, lengths = qk.kivi_dequantize(cache)
    chex.assert_shape(kd, (3, 96 + 32, 2, 64))
    ks, vs = np_dequantize(cache)
    for i, n in enumerate([50, 64, 7]):
        assert lengths[i] == n
        np.testing.assert_allclose(np.asarray(kd[i, :n]), ks[i], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(vd[i, :n]), vs[i], rtol=1e-6, atol=1e-6)
        assert not np.asarray(kd[i, n:]).any()
    # 4-bit codes of smooth data are close to the data.
    np.testing.assert_allclose(np.asarray(vd[1, :64]), np.asarray(v[1].astype(F32)),
                               atol=0.5)


# -------------------------------------------------------------------- bytes
@pytest.mark.parametrize("bits,g,sdt,dtype", [(2, 32, F32, BF16), (4, 64, BF16, F32),
                                              (8, 16, F32, jnp.float16)])
def test_cache_bytes_formula_is_exact(bits, g, sdt, dtype):
    b, s, hkv, d, r = 3, 256, 2, 128, 2 * g
    cache = jax.eval_shape(lambda: qk.kivi_empty(b, s, hkv, d, bits=bits, group_size=g,
                                                 residual=r, dtype=dtype, scale_dtype=sdt))
    leaves = jax.tree.leaves(cache)
    assert len(leaves) == 10
    assert cache.k_codes.dtype == cache.v_codes.dtype == jnp.uint8
    real = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in leaves)
    assert real == qk.kivi_cache_bytes(b, s, hkv, d, bits=bits, group_size=g, residual=r,
                                       dtype=dtype, scale_dtype=sdt)


def test_cache_bytes_worked_example():
    # 1 x 1024 tokens x 8 KV heads x 128, 2-bit, G=32, R=128 bf16, f32 scales:
    # codes 2*1024*128/4 + key scales 2*32*128*4 + value scales 2*1024*4*4
    # + residual 2*128*128*2, per head; + two int32 lengths.
    want = 8 * (65536 + 32768 + 32768 + 65536) + 8
    assert qk.kivi_cache_bytes(1, 1024, 8, 128, bits=2, group_size=32, residual=128) == want
    cache = qk.kivi_empty(1, 1024, 8, 128, bits=2, group_size=32, residual=128)
    assert cache.nbytes == want
    assert want < 2 * 1024 * 8 * 128 * 2 / 2      # under half of the bf16 dense cache


# ------------------------------------------------------- TPU interpret mode
def test_tpu_interpret_mode_4bit_gqa():
    # Row 0: 48 quantized tokens over 2 splits of 2 blocks (the last block is
    # past the length: not fetched, not computed); row 1: residual only (every
    # block skipped).  4-bit: 2 token planes (stride-2 value rows), 2 channel
    # planes, 4 value scale groups per head spread across lanes, 2 KV heads.
    k, v = rand_kv(5, 2, 64, 2, 64, F32)
    q = jnp.asarray(np.random.default_rng(6).standard_normal((2, 4, 64)), F32)
    cache = qk.kivi_quantize(k, v, jnp.array([53, 9]), bits=4, group_size=16, residual=16)
    y = qk.quantized_decode_attention(q, cache, backend="mosaic_tpu", interpret=True,
                                      block_sizes=qk.BlockSizes(block_k=16, num_splits=2))
    assert_close(y, np_attention(q, cache), F32)


# ----------------------------------------------------------------- lowering
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic_tpu", "tpu")])
def test_kernels_lower_for_gpu_and_tpu(bits, backend, platform):
    # Cross-platform lowering from this host: Pallas emits Triton IR / Mosaic
    # MLIR for the real kernel (the final PTX / TPU compilation needs a device).
    cache = jax.eval_shape(lambda: qk.kivi_empty(2, 4096, 8, 128, bits=bits, group_size=32,
                                                 residual=128, dtype=BF16))
    q = jax.ShapeDtypeStruct((2, 32, 128), BF16)
    f = jax.jit(lambda q, c: qk.quantized_decode_attention(q, c, backend=backend))
    exp = export.export(f, platforms=(platform,), disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, cache)
    assert ("xla.gpu.triton" if backend == "triton" else "tpu_custom_call") in exp.mlir_module()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton backend)")
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_triton_on_gpu(bits):
    k, v = rand_kv(7, 3, 1024, 2, 128, BF16)
    q = jnp.asarray(np.random.default_rng(8).standard_normal((3, 16, 128)), BF16)
    cache = qk.kivi_quantize(k, v, jnp.array([1000, 0, 333]), bits=bits, group_size=32,
                             residual=128)
    y = jax.jit(lambda q, c: qk.quantized_decode_attention(q, c, backend="triton"))(q, cache)
    assert_close(y, np_attention(q, cache), BF16)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic backend)")
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_mosaic_on_tpu(bits):
    k, v = rand_kv(9, 3, 1024, 2, 128, BF16)
    q = jnp.asarray(np.random.default_rng(10).standard_normal((3, 16, 128)), BF16)
    cache = qk.kivi_quantize(k, v, jnp.array([1000, 0, 333]), bits=bits, group_size=32,
                             residual=128)
    y = qk.quantized_decode_attention(q, cache, backend="mosaic_tpu")
    assert_close(y, np_attention(q, cache), BF16)


# ------------------------------------------------------------------ errors
K, V = rand_kv(11, 2, 64, 2, 64, F32)
Q = jnp.ones((2, 4, 64), F32)
C = qk.kivi_quantize(K, V, jnp.array([40, 3]), bits=4, group_size=16, residual=16)
C96 = qk.kivi_quantize(*rand_kv(12, 1, 96, 1, 64, F32), jnp.array([90]), bits=4,
                       group_size=16, residual=16)
Q96 = jnp.ones((1, 2, 64), F32)


def _quant(**kw):
    args = dict(bits=4, group_size=16, residual=16)
    args.update(kw)
    return lambda: qk.kivi_quantize(K, V, jnp.array([40, 3]), **args)


def _attn(q=Q, cache=C, **kw):
    return lambda: qk.quantized_decode_attention(q, cache, **kw)


ERRORS = [
    ("bits", _quant(bits=3), ValueError, r"bits=3 is not supported; use one of \(8, 4, 2\)"),
    ("group-divides-S", _quant(group_size=24), ValueError,
     r"group_size=24 does not divide the quantized capacity .*S=64"),
    ("group-divides-D", lambda: qk.kivi_quantize(*rand_kv(0, 1, 96, 1, 64, F32), [5],
                                                   bits=8, group_size=48, residual=48),
     ValueError, r"group_size=48 does not divide head_dim D=64"),
    ("group-vs-byte", _quant(bits=2, group_size=6, capacity=96), ValueError,
     r"group_size=6 must be a multiple of 4 for bits=2"),
    ("residual-small", _quant(residual=8), ValueError,
     r"residual=8 is smaller than group_size=16.*residual >= 16"),
    ("lengths-range", lambda: qk.kivi_quantize(K, V, jnp.array([65, 0]), bits=4, group_size=16,
                                               residual=16), ValueError,
     r"lengths must lie in \[0, T=64\]"),
    ("kv-dtype", lambda: qk.kivi_quantize(K, V.astype(BF16), jnp.array([1, 1]), bits=4,
                                          group_size=16, residual=16), TypeError,
     r"k dtype float32 != v dtype bfloat16"),
    ("scale-dtype", _quant(scale_dtype=jnp.float16), TypeError,
     r"scale_dtype=float16 is not supported"),
    ("heads", _attn(q=jnp.ones((2, 3, 64), F32)), ValueError,
     r"query heads H=3 must be a multiple of the cache's KV heads Hkv=2"),
    ("q-dtype", _attn(q=Q.astype(BF16)), TypeError, r"q dtype bfloat16 != cache dtype float32"),
    ("q-shape", _attn(q=jnp.ones((2, 1, 4, 64), F32)), ValueError, r"q must be \[batch, heads"),
    ("q-head-dim", _attn(q=jnp.ones((2, 4, 32), F32)), ValueError, r"q head_dim 32 != cache"),
    ("scales-mixed", _attn(cache=dataclasses.replace(C, k_zero=C.k_zero.astype(BF16))),
     TypeError, r"k_zero has dtype bfloat16 but k_scale is float32"),
    ("codes-dtype", _attn(cache=dataclasses.replace(C, v_codes=C.v_codes.astype(jnp.int8))),
     TypeError, r"v_codes must be uint8"),
    ("scale-shape", _attn(cache=dataclasses.replace(C, k_scale=C.k_scale[:, :2])), ValueError,
     r"k_scale has shape \(2, 2, 2, 64\), expected \(2, 4, 2, 64\)"),
    ("not-a-cache", _attn(cache=(K, V)), TypeError, r"cache must be a KiviCache"),
    ("cache-bits", lambda: dataclasses.replace(C, bits=5), ValueError, r"bits=5 is not supported"),
    ("block-pow2", _attn(backend="interpret", block_sizes=qk.BlockSizes(block_k=24)), ValueError,
     r"block_k=24 must be a power of two .* block_k=32"),
    ("block-group", _attn(backend="interpret", block_sizes=qk.BlockSizes(block_k=8)), ValueError,
     r"block_k=8 must be a multiple of group_size=16"),
    ("block-divides", _attn(q=Q96, cache=C96, backend="interpret",
                            block_sizes=qk.BlockSizes(block_k=64)), ValueError,
     r"block_k=64 does not divide the quantized capacity S=96; use block_k=32"),
    ("mosaic-block", _attn(backend="mosaic_tpu", interpret=True,
                           block_sizes=qk.BlockSizes(block_k=24)), ValueError,
     r"block_k=24 must be a multiple of group_size=16 that divides .* S=64 on mosaic_tpu"),
    ("triton-head-dim", lambda: qk.quantized_decode_attention(
        jnp.ones((1, 1, 96), F32),
        qk.kivi_quantize(*rand_kv(0, 1, 64, 1, 96, F32), [9], bits=8, group_size=16,
                         residual=16), backend="interpret"), ValueError,
     r"head_dim=96 must be a power of two on the triton/interpret backends"),
    ("block-positive", lambda: qk.BlockSizes(num_splits=0), ValueError,
     r"BlockSizes.num_splits=0 must be a positive int"),
    ("block-type", _attn(block_sizes=(16, 2)), TypeError, r"block_sizes must be a BlockSizes"),
    ("backend", _attn(backend="cuda"), ValueError, r"backend='cuda' is not one of"),
    ("append-shape", lambda: qk.kivi_append(C, K[:, 0, 0], V[:, 0]), ValueError,
     r"k_new must be \[B, Hkv, D\] = \(2, 2, 64\)"),
]


@pytest.mark.parametrize("call,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
