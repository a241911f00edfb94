"""Chunked (Rabe & Staats) attention in plain JAX: exactness, gradients, O(T) memory.

The forward is checked against a float64 numpy attention written here; the
gradients against ``jax.grad`` of a naive float64 jnp attention, also written
here (independent of ``memlab_kernels.attention_reference``).  The memory
claim is read from XLA's compiled ``memory_analysis()`` at T=8192.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memlab  # noqa: F401  (memory-optimized XLA:CPU scheduler for the memory test)
from memlab_kernels.attention_reference import attention_reference
from memlab_kernels.chunked_attention import chunked_attention, chunked_attention_with_lse


def np_visible(b, t, s, causal, window, seg, qpos, kpos):
    qpos = np.broadcast_to(np.arange(t) + s - t, (b, t)) if qpos is None else np.asarray(qpos)
    kpos = np.broadcast_to(np.arange(s), (b, s)) if kpos is None else np.asarray(kpos)
    qp, kp = qpos[:, :, None].astype(np.int64), kpos[:, None, :].astype(np.int64)
    vis = np.ones((b, t, s), bool)
    if causal:
        vis &= kp <= qp
    if window is not None:
        vis &= qp - kp < window
        if not causal:
            vis &= kp - qp < window
    if seg is not None:
        qs, ks = seg if isinstance(seg, tuple) else (seg, seg)
        vis &= np.asarray(qs)[:, :, None] == np.asarray(ks)[:, None, :]
    return vis


def np_attention(q, k, v, causal=False, window=None, seg=None, qpos=None, kpos=None):
    """float64 numpy: out [B,T,H,Dv], lse [B,H,T] (-inf for rows that see nothing)."""
    q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    vis = np_visible(b, t, s, causal, window, seg, qpos, kpos)
    out = np.zeros((b, t, h, v.shape[-1]))
    lse = np.full((b, h, t), -np.inf)
    for hi in range(h):
        kh = hi // (h // hkv)
        sc = np.einsum("btd,bsd->bts", q[:, :, hi], k[:, :, kh]) / math.sqrt(d)
        sc = np.where(vis, sc, -np.inf)
        mx = sc.max(-1, keepdims=True)
        mx = np.where(np.isfinite(mx), mx, 0.0)
        p = np.where(vis, np.exp(sc - mx), 0.0)
        l = p.sum(-1, keepdims=True)
        out[:, :, hi] = np.einsum("bts,bsd->btd", p / np.where(l > 0, l, 1), v[:, :, kh])
        lse[:, hi] = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1)) + mx[..., 0], -np.inf)
    return out, lse


def jnp64_attention(q, k, v, vis):
    """Naive float64 jnp attention for reference gradients; vis [B,T,S]."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    sc = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    sc = jnp.where(vis[:, None], sc, -jnp.inf)
    mx = jax.lax.stop_gradient(jnp.max(sc, -1, keepdims=True))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(vis[:, None], jnp.exp(sc - mx), 0.0)
    l = jnp.sum(p, -1, keepdims=True)
    return jnp.einsum("bhts,bshd->bthd", p / jnp.where(l > 0, l, 1.0), v)


def make(b, t, s, h, hkv, d, dtype=jnp.float32, seed=0):
    """Fresh normal q, k, v (in ``dtype``) and a float32 output cotangent.

    numpy's generator: eager ``jax.random`` compiles anew for every shape (seconds each)."""
    rng = np.random.default_rng(seed)
    rand = lambda shape, dt: jnp.asarray(rng.standard_normal(shape).astype(np.float32).astype(dt))  # noqa: E731
    return (rand((b, t, h, d), dtype), rand((b, s, hkv, d), dtype),
            rand((b, s, hkv, d), dtype), rand((b, t, h, d), np.float32))


CASES = {
    "full": dict(),
    "causal": dict(causal=True),
    "causal_window": dict(causal=True, window=11),
    "bidirectional_window": dict(window=6),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", [(2, 37, 53, 4, 2, 16), (1, 64, 64, 3, 1, 8), (2, 29, 29, 2, 2, 12)])
def test_forward_matches_float64(name, shape):
    kw = CASES[name]
    b, t, s, h, hkv, d = shape
    q, k, v, _ = make(*shape, seed=hash((name, shape)) % 1000)
    out, lse = chunked_attention_with_lse(q, k, v, q_chunk=8, kv_chunk=16, **kw)
    ref, ref_lse = np_attention(q, k, v, **kw)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(np.asarray(lse, np.float64), ref_lse, atol=2e-5, rtol=2e-5)


def test_segments_and_cache_positions():
    b, t, s, h, hkv, d = 2, 24, 40, 4, 2, 16
    q, k, v, _ = make(b, t, s, h, hkv, d, seed=3)
    rng = np.random.default_rng(3)
    qseg = np.sort(rng.integers(0, 3, (b, t)), axis=1)
    kseg = np.sort(rng.integers(0, 3, (b, s)), axis=1)
    out = chunked_attention(q, k, v, causal=True, segment_ids=(qseg, kseg), q_chunk=8, kv_chunk=8)
    ref, _ = np_attention(q, k, v, causal=True, seg=(qseg, kseg))
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, atol=2e-5)
    # A KV cache: slots beyond each row's length carry INT32_MAX and are hidden by causality.
    lengths = np.array([30, 13])
    kpos = np.where(np.arange(s)[None] < lengths[:, None], np.arange(s)[None], np.iinfo(np.int32).max)
    qpos = lengths[:, None] - t + np.arange(t)[None]
    qpos = np.maximum(qpos, 0)
    out = chunked_attention(q, k, v, causal=True, q_positions=qpos, kv_positions=kpos,
                            q_chunk=16, kv_chunk=8)
    ref, _ = np_attention(q, k, v, causal=True, qpos=qpos, kpos=kpos)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, atol=2e-5)


def test_bf16_close_to_float64():
    q, k, v, _ = make(2, 70, 70, 4, 2, 32, jnp.bfloat16, seed=5)
    out = chunked_attention(q, k, v, causal=True, q_chunk=16, kv_chunk=32)
    assert out.dtype == jnp.bfloat16
    ref, _ = np_attention(q, k, v, causal=True)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", ["full", "causal_window", "segments"])
def test_gradients_match_float64(name):
    b, t, s, h, hkv, d = 2, 21, 34, 4, 2, 8
    q, k, v, ct = make(b, t, s, h, hkv, d, seed=7)
    kw = dict(CASES.get(name, {}))
    seg = None
    if name == "segments":
        rng = np.random.default_rng(1)
        seg = (np.sort(rng.integers(0, 2, (b, t)), 1), np.sort(rng.integers(0, 2, (b, s)), 1))
        kw = dict(causal=True, segment_ids=seg)
    loss = lambda q, k, v: jnp.sum(chunked_attention(q, k, v, q_chunk=8, kv_chunk=8, **kw) * ct)  # noqa: E731
    got = jax.grad(loss, (0, 1, 2))(q, k, v)
    vis = np_visible(b, t, s, kw.get("causal", False), kw.get("window"), seg, None, None)
    with jax.enable_x64(True):
        ct64 = jnp.asarray(np.asarray(ct), jnp.float64)
        args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (q, k, v)]
        ref = jax.grad(lambda q, k, v: jnp.sum(jnp64_attention(q, k, v, jnp.asarray(vis)) * ct64),
                       (0, 1, 2))(*args)
        ref = [np.asarray(r) for r in ref]
    for g, r in zip(got, ref):
        chex.assert_trees_all_close(np.asarray(g, np.float64), r, atol=5e-5, rtol=5e-5)


def test_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v, ct = make(1, 16, 16, 2, 2, 8, seed=11)
    qseg = np.array([[0] * 8 + [5] * 8])       # segment 5 has no keys
    kseg = np.zeros((1, 16), int)
    f = lambda q, k, v: chunked_attention(q, k, v, segment_ids=(qseg, kseg), q_chunk=4, kv_chunk=4)  # noqa: E731
    out = f(q, k, v)
    np.testing.assert_array_equal(np.asarray(out[0, 8:]), 0.0)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * ct), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(grads[0][0, 8:]), 0.0)


# one compile per drawn shape (eagerly every pad, reshape and scan compiles on its own: ~3x the time)
_chunked_jit = jax.jit(chunked_attention, static_argnames=("causal", "window", "q_chunk", "kv_chunk"))


@settings(max_examples=8, deadline=None)
@given(t=st.integers(1, 40), s=st.integers(1, 40), g=st.sampled_from([1, 2, 3]),
       hkv=st.sampled_from([1, 2]), qc=st.sampled_from([1, 5, 8, 64]), kc=st.sampled_from([3, 8, 64]),
       causal=st.booleans(), use_window=st.booleans(), seed=st.integers(0, 10_000))
def test_property_any_shape_and_mask(t, s, g, hkv, qc, kc, causal, use_window, seed):
    q, k, v, _ = make(1, t, s, g * hkv, hkv, 4, seed=seed)
    window = max(1, s // 2) if use_window else None
    out = _chunked_jit(q, k, v, causal=causal, window=window, q_chunk=qc, kv_chunk=kc)
    ref, _ = np_attention(q, k, v, causal=causal, window=window)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, atol=3e-5, rtol=3e-5)


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_is_linear_at_8k_forward_and_backward():
    """Rabe & Staats: at T=8192 the chunked path needs >= 20x less temp memory than naive."""
    sd = jax.ShapeDtypeStruct((1, 8192, 4, 64), jnp.float32)
    naive = lambda q, k, v: attention_reference(q, k, v, causal=True)  # noqa: E731
    chunked = lambda q, k, v: chunked_attention(q, k, v, causal=True)  # noqa: E731

    def grad_of(f):
        return lambda q, k, v: jax.grad(lambda *a: jnp.sum(f(*a)), (0, 1, 2))(q, k, v)

    fwd = temp_bytes(naive, sd, sd, sd), temp_bytes(chunked, sd, sd, sd)
    bwd = temp_bytes(grad_of(naive), sd, sd, sd), temp_bytes(grad_of(chunked), sd, sd, sd)
    # the naive forward holds at least one [1, 4, 8192, 8192] float32 score matrix (1 GiB)
    assert fwd[0] >= 4 * 8192 * 8192 * 4
    assert fwd[0] >= 20 * fwd[1], fwd
    assert bwd[0] >= 20 * bwd[1], bwd


def test_bad_input_errors():
    q, k, v, _ = make(1, 8, 8, 3, 3, 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        chunked_attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(TypeError, match="dtypes differ"):
        chunked_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="window=9 is larger"):
        chunked_attention(q, k, v, window=9)
    with pytest.raises(ValueError, match="q_chunk"):
        chunked_attention(q, k, v, q_chunk=0)
    with pytest.raises(ValueError, match="head_dim"):
        chunked_attention(q, k[..., :2], v)
