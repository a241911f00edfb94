"""Lightning Attention-2 (``memlab_kernels.lightning_attention``).

Every kernel result is checked against an independent float64 numpy
implementation written here: the forward as the token-by-token recurrence
``S_t = lambda S_{t-1} + k_t v_t^T, o_t = q_t S_t`` (not the block algorithm of
the module), the gradients by ordinary matrix backprop through the quadratic
form ``o = (A * Q K^T) V`` with an explicit decay matrix ``A``.  The Pallas
kernel runs in the HLO interpreter (``backend="interpret"``, the Triton body)
and, for one tiny case, in TPU interpret mode (the Mosaic body); the pure-JAX
chunked ``backend="xla"`` runs everything the interpreter runs.  Both Pallas
kernels are also lowered for CUDA / TPU from this CPU via ``jax.export``, and
the memory test compiles (never runs) T=8192 to show the chunked version's
temporaries grow linearly in T while the naive reference's grow quadratically.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export
from jax.experimental.pallas import tpu as pltpu
from memlab_kernels import lightning_attention as la

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 2e-5, BF16: 2e-2}


# ---------------------------------------------------------------- numpy side
def np_lightning(q, k, v, lam, scale=1.0):
    """float64 recurrence: ``S = lam S + k_t v_t^T; o_t = scale q_t S``."""
    b, t, h, d = q.shape
    s = np.zeros((b, h, d, v.shape[-1]))
    o = np.empty((b, t, h, v.shape[-1]))
    for i in range(t):
        s = lam[None, :, None, None] * s + np.einsum("bhd,bhe->bhde", k[:, i], v[:, i])
        o[:, i] = np.einsum("bhd,bhde->bhe", q[:, i], s)
    return scale * o


def np_lightning_grads(q, k, v, lam, do, scale=1.0):
    """float64 backprop of ``o = scale (A * Q K^T) V``, ``A[h, t, s] = lam_h^(t-s) [t >= s]``."""
    t = q.shape[1]
    dist = np.arange(t)[:, None] - np.arange(t)[None, :]
    a = np.where(dist >= 0, lam[:, None, None] ** np.maximum(dist, 0), 0.0)   # [H, T, T]
    p = np.einsum("bthd,bshd->bhts", q, k) * a
    dv = scale * np.einsum("bhts,bthe->bshe", p, do)
    dp = scale * np.einsum("bthe,bshe->bhts", do, v) * a
    return np.einsum("bhts,bshd->bthd", dp, k), np.einsum("bhts,bthd->bshd", dp, q), dv


def make_case(b, t, h, d, dv, dtype, decay, seed):
    """Random normal inputs (never zero) and their float64 values as the kernel sees them."""
    rng = np.random.default_rng(seed)
    arrs = [jnp.asarray(rng.standard_normal(s), dtype)
            for s in ((b, t, h, d), (b, t, h, d), (b, t, h, dv), (b, t, h, dv))]
    as64 = [np.asarray(a.astype(F32), np.float64) for a in arrs]
    if decay == "none":
        dec, lam = None, np.ones(h)
    elif decay == "lightning":
        dec = la.lightning_decay(h)
        lam = np.asarray(dec, np.float64)
    elif decay == "uniform":
        lam32 = rng.uniform(0.7, 1.0, h).astype(np.float32)
        dec, lam = jnp.asarray(lam32), lam32.astype(np.float64)
    else:   # an explicit list of lambdas
        dec = jnp.asarray(decay, F32)
        lam = np.asarray(dec, np.float64)
    return arrs, as64, dec, lam


def assert_close(y, ref64, dtype, what=""):
    tol = TOL[dtype]
    y = np.asarray(jnp.asarray(y).astype(F32), np.float64)
    scale = np.abs(ref64).max()
    assert scale > 0
    np.testing.assert_allclose(y, ref64, rtol=tol, atol=tol * scale, err_msg=what)


@functools.partial(jax.jit, static_argnames=("backend", "block_sizes", "scale"))
def fwd_and_grads(q, k, v, cot, decay, *, backend, block_sizes, scale):
    """Output and (dq, dk, dv) for the cotangent ``cot``, one compile per case."""
    f = lambda q, k, v: la.lightning_attention(q, k, v, decay=decay, scale=scale,
                                               backend=backend, block_sizes=block_sizes)
    o, vjp = jax.vjp(f, q, k, v)
    return (o, *vjp(cot))


# (B, T, H, D, Dv, dtype, decay, block sizes, scale).  T is off the block grid
# everywhere but case 3; D covers 64 / 80 / 128 (+ 32), Dv also 48 / 80.
BS = la.BlockSizes
CASES = [
    (2, 100, 2, 64, 64, F32, "uniform", BS(32, 32), 0.125),   # 4 blocks, 2 Dv tiles
    (1, 130, 3, 80, 48, F32, "none", BS(64, 64), None),       # head dims padded to 128 / 64
    (1, 256, 2, 128, 128, BF16, "lightning", None, None),     # default blocks
    (2, 77, 2, 64, 80, BF16, "none", BS(16, 16), 0.5),        # 5 blocks of 16
    (1, 130, 4, 32, 32, F32, [1.0, 0.05, 0.5, 0.999], BS(128, 64), None),  # lambda^128 underflows
]


def _case_id(c):
    b, t, h, d, dv, dtype, decay, bs, scale = c
    dec = decay if isinstance(decay, str) else "list"
    blk = "default" if bs is None else f"{bs.block_t}x{bs.block_dv}"
    sc = "" if scale is None else f"-scale{scale}"
    return f"B{b}-T{t}-H{h}-D{d}-Dv{dv}-{jnp.dtype(dtype).name}-{dec}-{blk}{sc}"


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_grads_match_float64(case, backend):
    b, t, h, d, dv, dtype, decay, bs, scale = case
    (q, k, v, cot), (q64, k64, v64, cot64), dec, lam = make_case(b, t, h, d, dv, dtype, decay,
                                                                seed=t + d + dv)
    s = 1.0 if scale is None else scale
    o, dq, dk, dv_ = fwd_and_grads(q, k, v, cot, dec, backend=backend, block_sizes=bs, scale=scale)
    for name, y, shape in (("o", o, (b, t, h, dv)), ("dq", dq, q.shape), ("dk", dk, k.shape),
                           ("dv", dv_, v.shape)):
        chex.assert_shape(y, shape)
        chex.assert_type(y, dtype)
    assert_close(o, np_lightning(q64, k64, v64, lam, s), dtype, "o")
    for name, y, ref in zip(("dq", "dk", "dv"), (dq, dk, dv_),
                            np_lightning_grads(q64, k64, v64, lam, cot64, s)):
        assert_close(y, ref, dtype, name)


@pytest.mark.parametrize("case", CASES[:2], ids=_case_id)
def test_naive_reference_matches_float64(case):
    b, t, h, d, dv, dtype, decay, _, scale = case
    (q, k, v, _), (q64, k64, v64, _), dec, lam = make_case(b, t, h, d, dv, dtype, decay, seed=1)
    y = jax.jit(functools.partial(la.lightning_attention_reference, scale=scale))(q, k, v, decay=dec)
    assert_close(y, np_lightning(q64, k64, v64, lam, 1.0 if scale is None else scale), dtype)


def test_auto_backend_jit_and_zero_decay_gradient():
    (q, k, v, _), (q64, k64, v64, _), dec, lam = make_case(1, 40, 2, 16, 16, F32, "uniform", 2)
    y = jax.jit(lambda q, k, v, d: la.lightning_attention(q, k, v, decay=d))(q, k, v, dec)
    assert_close(y, np_lightning(q64, k64, v64, lam), F32)
    if jax.default_backend() == "cpu":   # "auto" is the chunked XLA version on CPU.
        chex.assert_trees_all_equal(y, la.lightning_attention(q, k, v, decay=dec, backend="xla"))
    # decay is a constant for the kernels (documented): zero cotangent; the
    # naive reference is plain autodiff and differentiates it.
    g_kernel, g_ref = jax.jit(lambda d: (
        jax.grad(lambda d: la.lightning_attention(q, k, v, decay=d).sum())(d),
        jax.grad(lambda d: la.lightning_attention_reference(q, k, v, decay=d).sum())(d)))(dec)
    chex.assert_trees_all_equal(g_kernel, jnp.zeros_like(dec))
    assert np.abs(np.asarray(g_ref)).min() > 0
    # Empty sequence.
    chex.assert_shape(la.lightning_attention(q[:, :0], k[:, :0], v[:, :0]), (1, 0, 2, 16))


# ------------------------------------------------------------- property test
@settings(max_examples=5, deadline=None)
@given(t=st.integers(1, 70), d=st.sampled_from([8, 24, 64]), dv=st.sampled_from([16, 40]),
       block_t=st.sampled_from([16, 32]), decay=st.sampled_from(["none", "uniform"]),
       backend=st.sampled_from(["interpret", "xla"]), seed=st.integers(0, 2**16))
def test_property_any_shape_matches_float64(t, d, dv, block_t, decay, backend, seed):
    (q, k, v, _), (q64, k64, v64, _), dec, lam = make_case(1, t, 2, d, dv, F32, decay, seed)
    y = la.lightning_attention(q, k, v, decay=dec, backend=backend,
                               block_sizes=la.BlockSizes(block_t=block_t, block_dv=16))
    chex.assert_shape(y, (1, t, 2, dv))
    assert_close(y, np_lightning(q64, k64, v64, lam), F32)


# ---------------------------------------------------------------- memory
def _temp_bytes(f, t, dtype=F32):
    sds = jax.ShapeDtypeStruct
    q = sds((1, t, 2, 64), dtype)
    compiled = jax.jit(f).lower(q, q, q, sds((2,), F32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_flat_in_sequence_length():
    # Compile only: XLA's temp bytes track real peak memory on CPU (JAX_NOTES).
    chunked = lambda q, k, v, d: la.lightning_attention(q, k, v, decay=d, backend="xla")
    naive = lambda q, k, v, d: la.lightning_attention_reference(q, k, v, decay=d)

    def grad_of(f):
        return jax.grad(lambda q, k, v, d: f(q, k, v, d).sum(), argnums=(0, 1, 2))

    for name, c, n in (("forward", chunked, naive),
                       ("forward+backward", grad_of(chunked), grad_of(naive))):
        c2, c8 = _temp_bytes(c, 2048), _temp_bytes(c, 8192)
        n2, n8 = _temp_bytes(n, 2048), _temp_bytes(n, 8192)
        print(f"{name}: chunked temp {c2 / 2**20:.1f} -> {c8 / 2**20:.1f} MiB, "
              f"naive {n2 / 2**20:.1f} -> {n8 / 2**20:.1f} MiB (T 2048 -> 8192)")
        assert c8 <= 4.4 * c2, (name, c2, c8)        # at most ~linear (4x the tokens)
        assert n8 >= 12 * n2, (name, n2, n8)         # quadratic (16x)
        assert c8 * 20 < n8, (name, c8, n8)          # far below the T x T version
        # And O(T * D): a few copies of the [1, T, 2, 64] inputs at most.
        assert c8 < 8 * 3 * 8192 * 2 * 64 * 4, (name, c8)


# ------------------------------------------------------- TPU interpret mode
def test_tpu_interpret_forward_and_backward():
    # Mosaic body: 2 blocks of 128 (T=200 padded), 2 heads with different decay.
    (q, k, v, cot), (q64, k64, v64, cot64), dec, lam = make_case(
        1, 200, 2, 32, 32, F32, [0.99, 0.9], seed=3)
    with pltpu.force_tpu_interpret_mode():
        o, dq, dk, dv = fwd_and_grads(q, k, v, cot, dec, backend="mosaic_tpu",
                                      block_sizes=la.BlockSizes(128, 128), scale=None)
    assert_close(o, np_lightning(q64, k64, v64, lam), F32, "o")
    for name, y, ref in zip(("dq", "dk", "dv"), (dq, dk, dv),
                            np_lightning_grads(q64, k64, v64, lam, cot64)):
        assert_close(y, ref, F32, name)


# ----------------------------------------------------------------- lowering
LOWER = [   # (what, T, D, Dv, dtype, with decay)
    ("forward", 1000, 80, 128, BF16, True),
    ("grad", 4096, 128, 128, BF16, True),
    ("grad", 300, 256, 256, F32, False),      # 2 output-feature tiles per pass on TPU
]


@pytest.mark.parametrize("what,t,d,dv,dtype,with_decay", LOWER,
                         ids=[f"{c[0]}-T{c[1]}-D{c[2]}-{jnp.dtype(c[4]).name}" for c in LOWER])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic_tpu", "tpu")])
def test_kernels_lower_for_gpu_and_tpu(backend, platform, what, t, d, dv, dtype, with_decay):
    # Cross-platform lowering from this host: Pallas emits Triton IR / Mosaic
    # MLIR for the real kernels (the final PTX / TPU compilation needs a device).
    sds = jax.ShapeDtypeStruct
    q, v = sds((2, t, 4, d), dtype), sds((2, t, 4, dv), dtype)
    dec = sds((4,), F32)

    def f(q, k, v, dec):
        return la.lightning_attention(q, k, v, decay=dec if with_decay else None,
                                      backend=backend)

    fn = f if what == "forward" else jax.grad(
        lambda *a: f(*a).astype(F32).sum(), argnums=(0, 1, 2))
    exp = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, q, v, dec)
    text = exp.mlir_module()
    marker = "xla.gpu.triton" if backend == "triton" else "tpu_custom_call"
    # forward: one kernel; backward: the forward sweep for dq, two reverse sweeps.
    assert text.count(marker) == (1 if what == "forward" else 3)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton backend)")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_on_gpu(case):
    b, t, h, d, dv, dtype, decay, bs, scale = case
    (q, k, v, cot), (q64, k64, v64, cot64), dec, lam = make_case(b, t, h, d, dv, dtype, decay, 4)
    o, *grads = fwd_and_grads(q, k, v, cot, dec, backend="triton", block_sizes=bs, scale=scale)
    s = 1.0 if scale is None else scale
    assert_close(o, np_lightning(q64, k64, v64, lam, s), dtype)
    for y, ref in zip(grads, np_lightning_grads(q64, k64, v64, lam, cot64, s)):
        assert_close(y, ref, dtype)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic backend)")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mosaic_on_tpu(case):
    b, t, h, d, dv, dtype, decay, _, scale = case
    (q, k, v, cot), (q64, k64, v64, cot64), dec, lam = make_case(b, t, h, d, dv, dtype, decay, 5)
    o, *grads = fwd_and_grads(q, k, v, cot, dec, backend="mosaic_tpu", block_sizes=None,
                              scale=scale)
    s = 1.0 if scale is None else scale
    assert_close(o, np_lightning(q64, k64, v64, lam, s), dtype)
    for y, ref in zip(grads, np_lightning_grads(q64, k64, v64, lam, cot64, s)):
        assert_close(y, ref, dtype)


# ------------------------------------------------------------ decay helpers
def test_slopes_and_decay_helpers():
    np.testing.assert_allclose(la.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    # Non-power of two: the 8 slopes of 8 heads, then every other slope of 16 heads.
    np.testing.assert_allclose(la.alibi_slopes(12),
                               np.r_[2.0 ** -np.arange(1, 9), 2.0 ** -np.arange(0.5, 4, 1.0)],
                               rtol=1e-6)
    np.testing.assert_allclose(la.lightning_decay(4), np.exp(-(2.0 ** -np.arange(2, 10, 2))),
                               rtol=1e-6)
    first = la.lightning_decay(8, layer_idx=0, num_layers=4)
    last = la.lightning_decay(8, layer_idx=3, num_layers=4)
    np.testing.assert_allclose(first, np.exp(-(1 + 1e-5) * 2.0 ** -np.arange(1, 9)), rtol=1e-6)
    assert np.all(np.asarray(last) > 0.9999) and np.all(np.asarray(last) < 1)
    np.testing.assert_allclose(la.decay_from_slopes([0.0, np.log(2)]), [1.0, 0.5], rtol=1e-6)


def test_block_size_defaults():
    assert la.BlockSizes() == la.BlockSizes(64, 64)
    assert la.BlockSizes.get_default("mosaic_tpu").block_t % 128 == 0
    assert la.BlockSizes.get_default("mosaic_tpu").block_dv % 128 == 0


# ------------------------------------------------------------------ errors
(QE, KE, VE, _), _, _, _ = make_case(1, 8, 2, 16, 16, F32, "none", seed=6)
LAM = jnp.asarray([0.9, 0.5])
ERRORS = [
    ("q-rank", lambda: la.lightning_attention(QE[0], KE[0], VE[0]), ValueError, r"q must be 4-D \[B, T, H, D\]"),
    ("k-shape", lambda: la.lightning_attention(QE, KE[:, :7], VE), ValueError, r"k.shape=\(1, 7, 2, 16\) must equal q.shape"),
    ("k-head-dim", lambda: la.lightning_attention(QE, KE[..., :8], VE), ValueError, r"k.shape=.* must equal q.shape"),
    ("v-shape", lambda: la.lightning_attention(QE, KE, VE[:, :, :1]), ValueError, r"v.shape=\(1, 8, 1, 16\) must be \[B, T, H, Dv\]"),
    ("dtype-mismatch", lambda: la.lightning_attention(QE, KE.astype(BF16), VE), TypeError, r"dtype mismatch: q is float32, k is bfloat16"),
    ("int-dtype", lambda: la.lightning_attention(QE.astype(jnp.int32), KE, VE), TypeError, r"q must be one of"),
    ("decay-shape", lambda: la.lightning_attention(QE, KE, VE, decay=jnp.ones(3)), ValueError, r"decay must have shape \(H,\) = \(2,\)"),
    ("decay-scalar", lambda: la.lightning_attention(QE, KE, VE, decay=0.9), ValueError, r"decay must have shape \(H,\)"),
    ("decay-range-high", lambda: la.lightning_attention(QE, KE, VE, decay=jnp.asarray([0.5, 1.5])), ValueError, r"decay must lie in \(0, 1\]"),
    ("decay-range-zero", lambda: la.lightning_attention(QE, KE, VE, decay=jnp.asarray([0.0, 0.5])), ValueError, r"decay must lie in \(0, 1\]"),
    ("decay-nan", lambda: la.lightning_attention(QE, KE, VE, decay=jnp.asarray([np.nan, 0.5])), ValueError, r"decay must lie in \(0, 1\]"),
    ("decay-int", lambda: la.lightning_attention(QE, KE, VE, decay=jnp.ones(2, jnp.int32)), TypeError, r"decay must be a float array"),
    ("scale-traced", lambda: la.lightning_attention(QE, KE, VE, scale=jnp.float32(0.5)), TypeError, r"scale must be a Python float"),
    ("scale-inf", lambda: la.lightning_attention(QE, KE, VE, scale=float("inf")), ValueError, r"scale must be finite"),
    ("triton-block_t-pow2", lambda: la.lightning_attention(QE, KE, VE, backend="interpret", block_sizes=BS(48, 64)),
     ValueError, r"block_t=48 must be a power of two >= 16 .* block_t=64"),
    ("triton-block_t-small", lambda: la.lightning_attention(QE, KE, VE, backend="interpret", block_sizes=BS(8, 64)),
     ValueError, r"block_t=8 must be a power of two >= 16 .* block_t=16"),
    ("triton-block_dv", lambda: la.lightning_attention(QE, KE, VE, backend="triton", block_sizes=BS(64, 40)),
     ValueError, r"block_dv=40 must be a power of two"),
    ("mosaic-block_t", lambda: la.lightning_attention(QE, KE, VE, backend="mosaic_tpu", interpret=True, block_sizes=BS(4, 128)),
     ValueError, r"block_t=4 must be a multiple of 128 on mosaic_tpu when T=8 is longer .* block_t=128"),
    ("mosaic-block_dv", lambda: la.lightning_attention(jnp.ones((1, 8, 1, 256)), jnp.ones((1, 8, 1, 256)), jnp.ones((1, 8, 1, 256)),
                                                       backend="mosaic_tpu", block_sizes=BS(8, 64)),
     ValueError, r"block_dv=64 must be a multiple of 128 on mosaic_tpu"),
    ("block-positive", lambda: BS(block_t=0), ValueError, r"BlockSizes.block_t=0 must be a positive int"),
    ("block-bool", lambda: BS(block_dv=True), ValueError, r"BlockSizes.block_dv=True must be a positive int"),
    ("block_sizes-type", lambda: la.lightning_attention(QE, KE, VE, block_sizes=(64, 64)), TypeError, r"block_sizes must be a BlockSizes"),
    ("backend", lambda: la.lightning_attention(QE, KE, VE, backend="cuda"), ValueError, r"backend='cuda' is not one of"),
    ("reference-shapes", lambda: la.lightning_attention_reference(QE, KE, VE[:, :4]), ValueError, r"v.shape=.* must be \[B, T, H, Dv\]"),
    ("slopes-heads", lambda: la.alibi_slopes(0), ValueError, r"num_heads=0 must be a positive int"),
    ("decay-layer", lambda: la.lightning_decay(8, layer_idx=1), ValueError, r"pass both layer_idx and num_layers"),
    ("decay-layer-range", lambda: la.lightning_decay(8, layer_idx=4, num_layers=4), ValueError, r"0 <= layer_idx < num_layers"),
]


@pytest.mark.parametrize("call,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
