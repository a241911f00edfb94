"""Cut cross-entropy (``memlab_kernels.cut_cross_entropy``): Pallas kernels and the chunked path.

Every result (per-row loss, dH, dW) is checked against a float64 numpy
implementation written here (its own log-sum-exp, soft-cap chain rule and
gradient), on odd shapes that are multiples of no block (N=37, D=24/40,
V=1000/1003).  The Triton kernels run in the HLO interpreter
(``backend="interpret"``), the Mosaic kernels once in TPU interpret mode, and
both are lowered for CUDA / TPU via ``jax.export``; the
memory claim is measured with ``memory_analysis()`` on abstract shapes.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export
from memlab_kernels import cut_cross_entropy as cce

F32, BF16 = jnp.float32, jnp.bfloat16
O0 = {"xla_backend_optimization_level": 0}
IGNORE = -100


# ---------------------------------------------------------------- numpy side
def np_cross_entropy(h, w, t, g, *, tied=False, softcap=None, ignore_index=IGNORE):
    """float64 ``(loss [N], dH, dW)`` for per-row cotangent ``g``."""
    h, w, g = (np.asarray(x, np.float64) for x in (h, w, g))
    t = np.asarray(t)
    wdv = w.T if tied else w
    u = h @ wdv                                                  # [N, V]
    z = u if softcap is None else softcap * np.tanh(u / softcap)
    mx = z.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(axis=1))
    valid = t != ignore_index
    tz = np.where(valid, z[np.arange(len(t)), np.where(valid, t, 0)], 0.0)
    loss = np.where(valid, lse - tz, 0.0)
    p = np.exp(z - lse[:, None])
    onehot = np.zeros_like(p)
    onehot[np.arange(len(t))[valid], t[valid]] = 1.0
    dz = np.where(valid, g, 0.0)[:, None] * (p - onehot)
    if softcap is not None:
        dz = dz * (1.0 - np.tanh(u / softcap) ** 2)
    dh = dz @ wdv.T
    dw_dv = h.T @ dz
    return loss, dh, dw_dv.T if tied else dw_dv


def make_case(seed, n, d, v, dtype, *, tied=False, scale=1.0, n_ignored=3):
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k1, (n, d), F32).astype(dtype)
    w = (jax.random.normal(k2, (v, d) if tied else (d, v), F32) * scale / np.sqrt(d)).astype(dtype)
    t = jax.random.randint(k3, (n,), 0, v)
    drop = jax.random.choice(k4, n, (n_ignored,), replace=False)
    t = t.at[drop].set(IGNORE)
    g = jax.random.normal(k5, (n,), F32)
    return h, w, t, g


def run(fn, h, w, g, compile_opts=O0):
    """``(loss, dH, dW)`` of ``fn(h, w)`` under one jit (unoptimized: compiles fast)."""
    def f(h, w):
        loss, vjp = jax.vjp(fn, h, w)
        return (loss,) + vjp(g)
    return jax.jit(f, compiler_options=compile_opts)(h, w)


def assert_matches(got, want, dtype):
    tol = {F32: 3e-5, BF16: 3e-2}[dtype]
    for name, a, b in zip(("loss", "dH", "dW"), got, want):
        a = np.asarray(a, np.float64)
        chex.assert_shape(a, b.shape)
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max())
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def np_inputs(h, w):
    return np.asarray(h, np.float64), np.asarray(w, np.float64)


# ---------------------------------------------------------------- reference
def test_reference_matches_numpy():
    h, w, t, g = make_case(0, 37, 24, 1000, F32)
    got = run(lambda h, w: cce.cross_entropy_reference(h, w, t, softcap=7.0), h, w, g)
    assert_matches(got, np_cross_entropy(*np_inputs(h, w), t, g, softcap=7.0), F32)


# ---------------------------------------------------------------- chunked path
@pytest.mark.parametrize("dtype,tied,softcap,n,d,v,chunk,vchunk", [
    (F32, False, None, 37, 24, 1000, 16, 300),
    (F32, True, 5.0, 37, 40, 1003, 10, 256),
    (BF16, False, 5.0, 37, 40, 1000, 16, 300),
    (BF16, True, None, 37, 24, 1003, 37, 1003),     # one chunk each way
    (F32, False, None, 1, 24, 50, 1024, 2048),      # chunks larger than N and V shrink
], ids=["f32", "f32-tied-cap", "bf16-cap", "bf16-tied-single", "n1-shrink"])
def test_chunked_loss_and_grads(dtype, tied, softcap, n, d, v, chunk, vchunk):
    h, w, t, g = make_case(1, n, d, v, dtype, tied=tied, n_ignored=min(3, n - 1))
    got = run(lambda h, w: cce.chunked_cross_entropy(
        h, w, t, tied=tied, softcap=softcap, chunk=chunk, vocab_chunk=vchunk), h, w, g)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    want = np_cross_entropy(*np_inputs(h, w), t, g, tied=tied, softcap=softcap)
    assert_matches(got, want, dtype)


def test_chunked_ignored_rows_have_zero_loss_and_gradient():
    h, w, t, g = make_case(2, 37, 24, 1000, F32, n_ignored=5)
    loss, dh, _ = run(lambda h, w: cce.chunked_cross_entropy(h, w, t, chunk=16, vocab_chunk=300),
                      h, w, g)
    ignored = np.asarray(t) == IGNORE
    assert ignored.sum() == 5
    assert np.all(np.asarray(loss)[ignored] == 0) and np.all(np.asarray(loss)[~ignored] > 0)
    assert np.all(np.asarray(dh)[ignored] == 0) and np.abs(np.asarray(dh)[~ignored]).min() > 0


def test_gradient_filtering_skips_blocks():
    # Peaked softmax (large logits): most blocks are negligible.  A small eps
    # keeps the gradient close; an eps above every |softmax - onehot| skips all.
    h, w, t, g = make_case(3, 37, 24, 1000, F32, scale=6.0)
    exact = np_cross_entropy(*np_inputs(h, w), t, g)
    f = lambda eps: lambda h, w: cce.chunked_cross_entropy(  # noqa: E731
        h, w, t, chunk=16, vocab_chunk=128, filter_eps=eps)
    loss, dh, dw = run(f(2.0**-12), h, w, g)
    chex.assert_trees_all_close(np.asarray(loss, np.float64), exact[0], atol=3e-5, rtol=3e-5)
    assert np.abs(np.asarray(dh) - exact[1]).max() < 1e-2 * np.abs(exact[1]).max()
    assert np.abs(np.asarray(dw) - exact[2]).max() < 1e-2 * np.abs(exact[2]).max()
    loss, dh, dw = run(f(2.0), h, w, g)          # |p - y| <= 1 < 2: every block skipped
    chex.assert_trees_all_close(np.asarray(loss, np.float64), exact[0], atol=3e-5, rtol=3e-5)
    assert not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))


# ---------------------------------------------------------------- Pallas kernels
SMALL = cce.BlockSizes(block_n=16, block_v=128, block_d=16)


@pytest.mark.parametrize("dtype,tied,softcap,d,v,bs", [
    (F32, False, None, 24, 1000, SMALL),
    (BF16, True, 8.0, 40, 1003, cce.BlockSizes(block_n=16, block_v=256, block_d=32)),
], ids=["f32-ragged-all", "bf16-tied-cap"])
def test_kernels_interpret_loss_and_grads(dtype, tied, softcap, d, v, bs):
    h, w, t, g = make_case(4, 37, d, v, dtype, tied=tied)
    got = run(lambda h, w: cce.cut_cross_entropy(
        h, w, t, tied=tied, softcap=softcap, block_sizes=bs, backend="interpret"), h, w, g)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    want = np_cross_entropy(*np_inputs(h, w), t, g, tied=tied, softcap=softcap)
    assert_matches(got, want, dtype)


def test_kernel_gradient_filter_and_eager_call():
    # Eager (no outer jit) through the custom VJP; filter_eps=2 skips every block.
    h, w, t, g = make_case(5, 37, 24, 1000, F32)
    f = lambda h, w: cce.cut_cross_entropy(h, w, t, block_sizes=SMALL, backend="interpret",  # noqa: E731
                                           filter_eps=2.0)
    loss, vjp = jax.vjp(f, h, w)
    dh, dw = vjp(g)
    want = np_cross_entropy(*np_inputs(h, w), t, g)
    chex.assert_trees_all_close(np.asarray(loss, np.float64), want[0], atol=3e-5, rtol=3e-5)
    assert not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))


def test_xla_backend_is_the_reference():
    h, w, t, g = make_case(6, 37, 24, 1000, F32)
    a = cce.cut_cross_entropy(h, w, t, backend="xla")
    b = cce.cross_entropy_reference(h, w, t)
    chex.assert_trees_all_close(a, b)
    assert cce.cut_cross_entropy(h, w, t, backend="auto").shape == (37,)   # xla on CPU


def test_mosaic_kernels_tpu_interpret_ragged_rows_and_vocab():
    # N=300 and V=1003 leave ragged edge blocks (garbage the kernels must zero).
    h, w, t, g = make_case(8, 300, 40, 1003, F32, tied=True)
    bs = cce.BlockSizes(block_n=128, block_v=256)
    got = run(lambda h, w: cce.cut_cross_entropy(
        h, w, t, tied=True, softcap=5.0, block_sizes=bs, backend="mosaic_tpu", interpret=True),
        h, w, g)
    assert_matches(got, np_cross_entropy(*np_inputs(h, w), t, g, tied=True, softcap=5.0), F32)


@pytest.mark.parametrize("backend,platform,marker", [
    ("triton", "cuda", "xla.gpu.triton"), ("mosaic_tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype,tied", [(BF16, True), (F32, False)])
def test_kernels_lower_for_gpu_and_tpu(backend, platform, marker, dtype, tied):
    # Pallas emits Triton IR / Mosaic MLIR for the forward and both backward kernels.
    n, d, v = 8192, 576, 49152
    sds = jax.ShapeDtypeStruct
    args = (sds((n, d), dtype), sds((v, d) if tied else (d, v), dtype), sds((n,), jnp.int32))

    def fwd(h, w, t):
        return cce.cut_cross_entropy(h, w, t, tied=tied, backend=backend, softcap=30.0).sum()

    grad = jax.grad(fwd, argnums=(0, 1))
    for fn, n_kernels in ((fwd, 1), (grad, 3)):
        exp = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
        assert exp.mlir_module().count(marker) >= n_kernels


# ---------------------------------------------------------------- memory
def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_fwd_bwd_temp_50x_below_naive_at_smollm2_vocab():
    """8,192 tokens, D=576, V=49,152 (SmolLM2): compiled on abstract shapes only."""
    n, d, v = 8192, 576, 49152
    sds = jax.ShapeDtypeStruct
    args = (sds((n, d), F32), sds((d, v), F32), sds((n,), jnp.int32))

    def naive(h, w, t):
        return optax.softmax_cross_entropy_with_integer_labels((h @ w).astype(F32), t).mean()

    def chunked(h, w, t):
        return cce.chunked_cross_entropy(h, w, t).mean()

    grad = lambda f: jax.grad(f, argnums=(0, 1))  # noqa: E731
    naive_b, chunked_b = _temp_bytes(grad(naive), *args), _temp_bytes(grad(chunked), *args)
    assert naive_b >= 2 * n * v * 4            # logits and their gradient, float32
    assert chunked_b * 50 <= naive_b, (naive_b, chunked_b)
    # bf16 hidden and head: XLA:CPU computes in float32, the blocks stay blocks.
    args16 = (sds((n, d), BF16), sds((d, v), BF16), args[2])
    naive16, chunked16 = _temp_bytes(grad(naive), *args16), _temp_bytes(grad(chunked), *args16)
    assert chunked16 * 20 <= naive16, (naive16, chunked16)


# ---------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    h, w, t, _ = make_case(7, 5, 24, 40, F32)
    with pytest.raises(ValueError, match="pass tied=True"):
        cce.chunked_cross_entropy(h, w.T, t)
    with pytest.raises(ValueError, match="pass tied=False"):
        cce.chunked_cross_entropy(h, w, t, tied=True)
    with pytest.raises(ValueError, match="targets must be"):
        cce.chunked_cross_entropy(h, w, t[:4])
    with pytest.raises(TypeError, match="integer class ids"):
        cce.chunked_cross_entropy(h, w, t.astype(F32))
    with pytest.raises(ValueError, match="hidden must be"):
        cce.chunked_cross_entropy(h[None], w, t)
    with pytest.raises(ValueError, match="chunk=0 must be a positive int"):
        cce.chunked_cross_entropy(h, w, t, chunk=0)
    with pytest.raises(ValueError, match="softcap=-1.0 must be > 0"):
        cce.chunked_cross_entropy(h, w, t, softcap=-1.0)
    with pytest.raises(ValueError, match="filter_eps"):
        cce.chunked_cross_entropy(h, w, t, filter_eps=0.0)
    with pytest.raises(TypeError, match="ignore_index"):
        cce.chunked_cross_entropy(h, w, t, ignore_index=None)
    with pytest.raises(ValueError, match="power of two >= 16"):
        cce.BlockSizes(block_v=100)
    with pytest.raises(TypeError, match="block_sizes must be a BlockSizes"):
        cce.cut_cross_entropy(h, w, t, block_sizes=(16, 16, 16), backend="interpret")
    with pytest.raises(ValueError, match="multiple of 128 on mosaic_tpu"):
        cce.cut_cross_entropy(h, w, t, backend="mosaic_tpu", block_sizes=cce.BlockSizes(block_v=16))
    with pytest.raises(ValueError, match="backend="):
        cce.cut_cross_entropy(h, w, t, backend="cuda")
    with pytest.raises(TypeError, match="classifier must be floating point"):
        cce.cut_cross_entropy(h, w.astype(jnp.int8), t, backend="interpret")
