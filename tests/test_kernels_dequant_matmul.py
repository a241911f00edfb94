"""Fused dequantize + matmul kernels (``memlab_kernels.dequant_matmul``).

Every kernel result is checked against an independent float64 numpy
dequantize + matmul written here (its own nibble packing, its own NF4 table
lookup), never against the module's own helpers alone.  The Pallas kernels run
in the HLO interpreter (``backend="interpret"``, the Triton kernel body) and,
for a few tiny shapes, in TPU interpret mode (the Mosaic kernel body).  Both
kernels are also lowered for CUDA / TPU from this CPU via ``jax.export``.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export
from jax.experimental.pallas import tpu as pltpu
from memlab_kernels import dequant_matmul as dm

# QLoRA's NormalFloat4 levels, copied from the paper (appendix E), in float64.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


# ---------------------------------------------------------------- numpy side
def np_pack(codes):
    codes = np.asarray(codes, np.uint8)
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def np_unpack(packed):
    packed = np.asarray(packed, np.uint8)
    out = np.empty((2 * packed.shape[0], packed.shape[1]), np.uint8)
    out[0::2] = packed & 0xF
    out[1::2] = packed >> 4
    return out


def make_case(fmt, m, k, n, group, dtype, seed):
    """Random inputs (no zeros) and the float64 weight they encode."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)   # exactly what the kernel sees
    if fmt == "int8":
        q = rng.integers(-127, 128, (k, n)).astype(np.int8)
        scale = rng.uniform(0.01, 0.05, n).astype(np.float32)
        w64 = q.astype(np.float64) * scale.astype(np.float64)[None, :]
        return x, x64, (q, scale), {}, w64
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
    packed = np_pack(codes)
    if fmt == "int4":
        scales = rng.uniform(0.01, 0.05, (k // group, n)).astype(np.float32)
        zeros = rng.uniform(0.5, 14.5, (k // group, n)).astype(np.float32)
        w64 = ((codes - np.repeat(zeros.astype(np.float64), group, 0))
               * np.repeat(scales.astype(np.float64), group, 0))
        return x, x64, (packed, scales, zeros), {"group_size": group}, w64
    absmax = rng.uniform(0.05, 0.2, (k // group, n)).astype(np.float32)
    w64 = NF4_LEVELS[codes] * np.repeat(absmax.astype(np.float64), group, 0)
    return x, x64, (packed, absmax), {"block_size": group}, w64


MATMUL = {"int8": dm.int8_matmul, "int4": dm.int4_matmul, "nf4": dm.nf4_matmul}
REFERENCE = {"int8": dm.int8_matmul_reference, "int4": dm.int4_matmul_reference,
             "nf4": dm.nf4_matmul_reference}


def assert_close(y, ref64, dtype):
    tol = TOL[dtype]
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    scale = np.abs(ref64).max()
    assert scale > 0
    np.testing.assert_allclose(y, ref64, rtol=tol, atol=tol * scale)


# (fmt, M, K, N, group, dtype): every M in {1, 7, 130}, K in {64, 192},
# N in {40, 136} and both dtypes appear for each format; none is a multiple of
# the blocks, so edge blocks (M, N) and several K steps are exercised.
F32, BF16 = jnp.float32, jnp.bfloat16
CASES = [
    ("int8", 1, 64, 40, 0, F32),
    ("int8", 7, 192, 136, 0, BF16),
    ("int8", 130, 64, 136, 0, F32),
    ("int8", 130, 192, 40, 0, BF16),
    ("int4", 1, 192, 136, 32, BF16),
    ("int4", 7, 64, 40, 64, F32),
    ("int4", 130, 192, 40, 64, F32),
    ("int4", 130, 64, 136, 32, BF16),
    ("int4", 7, 192, 136, 32, F32),
    ("int4", 1, 64, 40, 64, BF16),
    ("nf4", 1, 192, 40, 64, F32),
    ("nf4", 7, 64, 136, 64, BF16),
    ("nf4", 130, 192, 136, 64, BF16),
    ("nf4", 130, 64, 40, 64, F32),
]


def _case_id(c):
    fmt, m, k, n, g, dtype = c
    return f"{fmt}-M{m}-K{k}-N{n}-g{g}-{jnp.dtype(dtype).name}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_and_reference_match_float64(case):
    fmt, m, k, n, g, dtype = case
    x, x64, w, kw, w64 = make_case(fmt, m, k, n, g, dtype, seed=m * 1000 + k + n + g)
    ref64 = x64 @ w64
    y_kernel = MATMUL[fmt](x, *w, **kw, backend="interpret")
    y_xla = MATMUL[fmt](x, *w, **kw, backend="xla")
    for y in (y_kernel, y_xla):
        chex.assert_shape(y, (m, n))
        chex.assert_type(y, dtype)
        assert_close(y, ref64, dtype)
    chex.assert_trees_all_close(y_xla, REFERENCE[fmt](x, *w, **kw))


@pytest.mark.parametrize("fmt,k,group", [("int8", 200, 0), ("int4", 48, 16), ("nf4", 80, 16)])
def test_k_without_power_of_two_block_is_zero_padded(fmt, k, group):
    # K's largest power-of-two factor is below the minimum tl.dot K: the
    # wrapper zero-pads K (x with zeros), which must not change the result.
    x, x64, w, kw, w64 = make_case(fmt, 9, k, 24, group, F32, seed=k)
    assert_close(MATMUL[fmt](x, *w, **kw, backend="interpret"), x64 @ w64, F32)


def test_explicit_block_sizes_and_leading_dims():
    x, x64, w, kw, w64 = make_case("int4", 30, 192, 72, 32, F32, seed=3)
    bs = dm.BlockSizes(block_m=16, block_n=32, block_k=64)     # 2 x 3 x 3 grid/loop
    y = dm.int4_matmul(x.reshape(5, 6, 192), *w, **kw, block_sizes=bs, backend="interpret")
    chex.assert_shape(y, (5, 6, 72))
    assert_close(y.reshape(30, 72), x64 @ w64, F32)


def test_jit_and_auto_backend_on_cpu():
    x, x64, w, _kw, w64 = make_case("nf4", 3, 64, 40, 64, F32, seed=4)
    f = jax.jit(lambda x, p, a: dm.nf4_matmul(x, p, a, block_size=64, backend="interpret"))
    assert_close(f(x, *w), x64 @ w64, F32)
    if jax.default_backend() == "cpu":   # "auto" is the XLA reference on CPU.
        chex.assert_trees_all_equal(dm.nf4_matmul(x, *w, block_size=64),
                                    dm.nf4_matmul_reference(x, *w, block_size=64))


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("fmt,m,k,n,g,dtype", [
    ("int8", 7, 192, 40, 0, F32),
    ("int4", 130, 64, 136, 32, F32),
    ("nf4", 1, 192, 136, 64, BF16),
])
def test_grad_wrt_x(fmt, m, k, n, g, dtype):
    x, _x64, w, kw, w64 = make_case(fmt, m, k, n, g, dtype, seed=m + k + n)
    cot = np.random.default_rng(1).standard_normal((m, n)).astype(np.float32)

    def loss(backend):
        return lambda x: jnp.sum(MATMUL[fmt](x, *w, **kw, backend=backend).astype(jnp.float32) * cot)

    dx_kernel = jax.jit(jax.grad(loss("interpret")))(x)
    dx_ref = jax.grad(loss("xla"))(x)
    # d/dx sum(c * (x @ W)) = c @ W^T
    dx64 = cot.astype(np.float64) @ w64.T
    for dx in (dx_kernel, dx_ref):
        chex.assert_type(dx, dtype)
        assert_close(dx, dx64, dtype)
    chex.assert_trees_all_close(dx_kernel.astype(jnp.float32), dx_ref.astype(jnp.float32),
                                rtol=TOL[dtype], atol=TOL[dtype] * float(np.abs(dx64).max()))


def test_scales_get_zero_gradient_on_pallas_backends():
    x, _, (packed, scales, zeros), kw, _ = make_case("int4", 4, 64, 40, 32, F32, seed=5)
    f = lambda x, s, z: dm.int4_matmul(x, packed, s, z, **kw, backend="interpret").sum()
    dx, ds, dz = jax.grad(f, argnums=(0, 1, 2))(x, scales, zeros)
    assert np.abs(np.asarray(dx)).max() > 0
    chex.assert_trees_all_equal(ds, jnp.zeros_like(ds))
    chex.assert_trees_all_equal(dz, jnp.zeros_like(dz))


# ------------------------------------------------------- TPU interpret mode
def test_tpu_interpret_int4_multiblock_with_edges():
    # Grid (2, 2, 2): edge blocks on M (20 % 16) and N (136 % 128), 2 K steps.
    x, x64, w, kw, w64 = make_case("int4", 20, 512, 136, 32, F32, seed=6)
    y = dm.int4_matmul(x, *w, **kw, backend="mosaic_tpu", interpret=True,
                       block_sizes=dm.BlockSizes(block_m=16, block_n=128, block_k=256))
    assert_close(y, x64 @ w64, F32)


def test_tpu_interpret_mode_context_nf4_and_int8_padded_k():
    x, x64, w, kw, w64 = make_case("nf4", 7, 64, 40, 32, BF16, seed=7)
    xi, xi64, wi, _, wi64 = make_case("int8", 3, 300, 40, 0, F32, seed=8)  # K padded to 512
    with pltpu.force_tpu_interpret_mode():
        y = dm.nf4_matmul(x, *w, **kw, backend="mosaic_tpu")
        yi = dm.int8_matmul(xi, *wi, backend="mosaic_tpu",
                            block_sizes=dm.BlockSizes(block_k=256))
    assert_close(y, x64 @ w64, BF16)
    assert_close(yi, xi64 @ wi64, F32)


# ----------------------------------------------------------------- lowering
def _abstract_args(fmt, m, k, n, g, dtype):
    sds = jax.ShapeDtypeStruct
    x = sds((m, k), dtype)
    if fmt == "int8":
        return x, (sds((k, n), jnp.int8), sds((n,), jnp.float32)), {}
    p, s = sds((k // 2, n), jnp.uint8), sds((k // g, n), jnp.float32)
    if fmt == "int4":
        return x, (p, s, s), {"group_size": g}
    return x, (p, s), {"block_size": g}


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic_tpu", "tpu")])
@pytest.mark.parametrize("m", [1, 512])
def test_kernels_lower_for_gpu_and_tpu(fmt, backend, platform, m):
    # Cross-platform lowering from this host: Pallas emits Triton IR / Mosaic
    # MLIR for the real kernel (the final PTX / TPU compilation needs a device).
    x, w, kw = _abstract_args(fmt, m, 4096, 1536, 128, jnp.bfloat16)
    f = jax.jit(lambda x, *w: MATMUL[fmt](x, *w, **kw, backend=backend))
    exp = export.export(f, platforms=(platform,), disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, *w)
    text = exp.mlir_module()
    assert ("xla.gpu.triton" if backend == "triton" else "tpu_custom_call") in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton backend)")
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_triton_on_gpu(fmt):
    x, _, w, kw, _ = make_case(fmt, 130, 192, 136, 64, BF16, seed=9)
    f = jax.jit(lambda x, *w: MATMUL[fmt](x, *w, **kw, backend="triton"))
    f.lower(x, *w)
    assert_close(f(x, *w), np.asarray(REFERENCE[fmt](x, *w, **kw).astype(jnp.float32)), BF16)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic backend)")
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_mosaic_on_tpu(fmt):
    x, _, w, kw, _ = make_case(fmt, 130, 512, 256, 64, BF16, seed=10)
    y = MATMUL[fmt](x, *w, **kw, backend="mosaic_tpu")
    assert_close(y, np.asarray(REFERENCE[fmt](x, *w, **kw).astype(jnp.float32)), BF16)


# ------------------------------------------------------- packing and table
@settings(max_examples=20, deadline=None)
@given(k2=st.integers(1, 6), n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(k2, n, seed):
    codes = np.random.default_rng(seed).integers(0, 16, (2 * k2, n)).astype(np.uint8)
    packed = dm.pack_int4(codes)
    chex.assert_type(packed, jnp.uint8)
    np.testing.assert_array_equal(np.asarray(packed), np_pack(codes))
    np.testing.assert_array_equal(np.asarray(dm.unpack_int4(packed)), codes)
    np.testing.assert_array_equal(np_unpack(np.asarray(packed)), codes)


def test_nf4_table_and_in_kernel_lookup():
    assert len(dm.NF4_TABLE) == 16 and all(isinstance(v, float) for v in dm.NF4_TABLE)
    np.testing.assert_array_equal(np.asarray(dm.NF4_TABLE), NF4_LEVELS)
    codes = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    np.testing.assert_array_equal(np.asarray(dm._nf4_lookup(codes)).ravel(),
                                  NF4_LEVELS.astype(np.float32))


def test_dequantize_helpers_match_numpy():
    for fmt, g in (("int8", 0), ("int4", 32), ("nf4", 64)):
        _, _, w, kw, w64 = make_case(fmt, 1, 128, 24, g, F32, seed=11)
        fn = {"int8": dm.dequantize_int8, "int4": dm.dequantize_int4, "nf4": dm.dequantize_nf4}[fmt]
        np.testing.assert_allclose(np.asarray(fn(*w, **kw)), w64, rtol=1e-6, atol=1e-7)


def test_block_size_defaults():
    assert dm.BlockSizes() == dm.BlockSizes(128, 128, 256)
    decode = dm.BlockSizes.get_default(1)
    prefill = dm.BlockSizes.get_default(512)
    assert decode.block_m <= 16 < prefill.block_m
    assert dm.BlockSizes.get_default(1, backend="mosaic_tpu").block_n % 128 == 0


# ------------------------------------------------------------------ errors
def _int4_args(k=64, n=8, g=32):
    x, _, w, _, _ = make_case("int4", 2, k, n, g, F32, seed=12)
    return x, *w


X, P, S, Z = _int4_args()
XI, _, (Q, SC), _, _ = make_case("int8", 2, 64, 8, 0, F32, seed=13)

ERRORS = [
    ("q-dtype", lambda: dm.int8_matmul(XI, Q.astype(np.float32), SC), TypeError, r"q must be int8"),
    ("scale-shape", lambda: dm.int8_matmul(XI, Q, SC[:-1]), ValueError, r"scale must have shape \(N,\) = \(8,\)"),
    ("x-k-int8", lambda: dm.int8_matmul(XI[:, :63], Q, SC), ValueError, r"x has K=63 .* q.shape\[0\]=64"),
    ("x-dtype", lambda: dm.int8_matmul(XI.astype(jnp.int32), Q, SC), TypeError, r"x must be float32, bfloat16 or float16"),
    ("packed-dtype", lambda: dm.int4_matmul(X, P.astype(np.int8), S, Z, group_size=32), TypeError, r"packed must be uint8.*pack_int4"),
    ("x-k-int4", lambda: dm.int4_matmul(X[:, :62], P, S, Z, group_size=32), ValueError, r"x has K=62 .* packed.shape\[0\]=32 \(K = 2 \* 32 = 64\)"),
    ("scales-shape", lambda: dm.int4_matmul(X, P, S[:1], Z, group_size=32), ValueError, r"scales must have shape \(K//group_size, N\) = \(2, 8\)"),
    ("zeros-shape", lambda: dm.int4_matmul(X, P, S, Z.T, group_size=32), ValueError, r"zeros must have shape"),
    ("group-divides", lambda: dm.int4_matmul(X, P, S, Z, group_size=24), ValueError, r"group_size=24 does not divide K=64"),
    ("group-even", lambda: dm.int4_matmul(X, P, S, Z, group_size=1), ValueError, r"group_size=1 must be even"),
    ("scales-dtype", lambda: dm.int4_matmul(X, P, S.astype(np.int32), Z, group_size=32), TypeError, r"scales must be a float array"),
    ("absmax-shape", lambda: dm.nf4_matmul(X, P, S, block_size=64), ValueError, r"absmax must have shape \(K//block_size, N\) = \(1, 8\)"),
    ("nf4-block-divides", lambda: dm.nf4_matmul(X, P, S, block_size=48), ValueError, r"block_size=48 does not divide K=64"),
    ("block_k-group", lambda: dm.int4_matmul(X, P, S, Z, group_size=32, backend="interpret",
                                             block_sizes=dm.BlockSizes(block_k=16)),
     ValueError, r"block_k=16 must be a multiple of group_size=32"),
    ("block_k-pow2", lambda: dm.int8_matmul(XI, Q, SC, backend="interpret",
                                            block_sizes=dm.BlockSizes(block_k=96)),
     ValueError, r"block_k=96 must be a power of two .* block_k=128"),
    ("mosaic-block_n", lambda: dm.int8_matmul(jnp.ones((2, 64)), jnp.ones((64, 300), jnp.int8),
                                              jnp.ones((300,)), backend="mosaic_tpu", interpret=True,
                                              block_sizes=dm.BlockSizes(block_n=200)),
     ValueError, r"block_n=200 must be a multiple of 128 on mosaic_tpu"),
    ("block-positive", lambda: dm.BlockSizes(block_m=0), ValueError, r"BlockSizes.block_m=0 must be a positive int"),
    ("block_sizes-type", lambda: dm.int8_matmul(XI, Q, SC, block_sizes=(16, 16, 16)), TypeError, r"block_sizes must be a BlockSizes"),
    ("backend", lambda: dm.int8_matmul(XI, Q, SC, backend="cuda"), ValueError, r"backend='cuda' is not one of"),
    ("pack-odd-k", lambda: dm.pack_int4(np.zeros((3, 4), np.uint8)), ValueError, r"K must be even"),
    ("pack-range", lambda: dm.pack_int4(np.full((2, 4), 16, np.uint8)), ValueError, r"codes must lie in 0..15"),
]


@pytest.mark.parametrize("call,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
