"""Composition of an eviction policy with a storage policy (``memlab.kv.compose``) against an
independent float64 numpy reference: the eviction's selection (SnapKV / PyramidKV / StreamingLLM
re-implemented here), the kept tokens in position order, quantized and dequantized by a numpy
KIVI (per-channel or per-token keys, per-token values, float residual), and attention over
exactly those entries plus the decoded tokens; through the tiny model; exact bytes; errors."""
import functools
import math
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.generate import make_cache
from memlab.kv import Dims, StepCtx
from memlab.kv.compose import Compose, compose
from memlab.kv.dense import Dense
from memlab.kv.gear import GEAR
from memlab.kv.h2o import H2O
from memlab.kv.kivi import KIVI
from memlab.kv.kvquant import KVQuant
from memlab.kv.pyramidkv import PyramidKV, pyramid_budgets
from memlab.kv.snapkv import SnapKV
from memlab.kv.streaming import StreamingLLM
from memlab.memory import tree_bytes

B, H, HKV, D = 3, 4, 2, 8


# ---------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------
def np_probs(q, ks):
    s = q @ ks.T / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def np_kept(pol, Q, K, n, h, cap):
    """Positions the eviction policy keeps of a prompt of ``n`` tokens, KV head ``h``."""
    if isinstance(pol, StreamingLLM):
        return sorted(j for j in range(n) if j < pol.sinks or j >= n - (pol.budget - pol.sinks))
    if n <= cap:
        return list(range(n))
    g = Q.shape[1] // K.shape[1]
    w, half = pol.window, pol.kernel // 2
    sc = np.zeros(n)
    for i in range(n - w, n):
        sc[:i + 1] += np_probs(Q[i, h * g:(h + 1) * g], K[:i + 1, h]).mean(0)
    lim = n - w
    if pol.pooling == "max":
        pooled = [sc[max(j - half, 0):min(j + half + 1, lim)].max() for j in range(lim)]
    else:
        pooled = [sc[max(j - half, 0):min(j + half + 1, lim)].sum() / pol.kernel for j in range(lim)]
    best = sorted(range(lim), key=lambda j: (-pooled[j], j))[:cap - w]
    return sorted(best + list(range(lim, n)))


def np_minmax(x, axis, bits):
    """Asymmetric min/max quantize-dequantize along ``axis`` (float64)."""
    mn, mx = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    scale = (mx - mn) / (2 ** bits - 1)
    code = np.clip(np.round(np.where(scale > 0, (x - mn) / np.where(scale > 0, scale, 1), 0)),
                   0, 2 ** bits - 1)
    return code * scale + mn


def np_store(storage, X, kind):
    """What a storage policy gives back for the tokens ``X [n, D]`` (one row, one KV head)."""
    if isinstance(storage, Dense):
        return X
    g, bits = storage.group_size, storage.bits
    n = X.shape[0]
    nq = (n // g) * g
    out = X.copy()
    for s in range(0, nq, g):
        blk = X[s:s + g]
        if kind == "k" and storage.key_mode == "channel":      # per channel over G tokens
            out[s:s + g] = np_minmax(blk, 0, bits)
        else:                                                    # per token over G channels
            out[s:s + g] = np_minmax(blk.reshape(g, -1, g), 2, bits).reshape(g, -1)
    return out


def np_attend(q, keys, values):
    """q [G, D] over keys, values [n, D]."""
    return np_probs(q, keys) @ values


# ---------------------------------------------------------------------------
# driving one layer directly
# ---------------------------------------------------------------------------
def _ctx(positions, n_new, lengths, layer, k):
    return StepCtx(positions=positions, n_new=n_new, lengths=lengths, layer=layer, k_pre=k, rope=None)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(pol, state, q, k, v, n_new, layer):
    t = q.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (q.shape[0], t))
    return pol.prefill(state, q, k, v, _ctx(pos, n_new, jnp.zeros_like(n_new), layer, k))


@functools.partial(jax.jit, static_argnums=0)
def _decode(pol, state, q, k, v, p, layer):
    return pol.decode(state, q, k, v, _ctx(p[:, None], jnp.ones_like(p), p, layer, k))


CASES = [
    ("snapkv_kivi2", Compose(SnapKV(budget=9, window=3, kernel=3), KIVI(bits=2, group_size=4,
                                                                        residual=4), room=8), 0, 1),
    ("streaming_kivi4_token", Compose(StreamingLLM(budget=8, sinks=2),
                                      KIVI(bits=4, group_size=4, residual=4, key_mode="token"),
                                      room=7), 0, 1),
    ("snapkv_avg_kivi8", Compose(SnapKV(budget=10, window=2, kernel=5, pooling="avg"),
                                 KIVI(bits=8, group_size=8, residual=8)), 0, 1),
    ("pyramid_dense", Compose(PyramidKV(budget=8, window=3, kernel=3, beta=3), Dense(), room=9), 2, 3),
]


@pytest.mark.parametrize("name,pol,layer,n_layers", CASES, ids=[c[0] for c in CASES])
def test_matches_storage_of_the_kept_tokens(name, pol, layer, n_layers):
    """After prefill and every decode step the output equals float64 attention over exactly the
    tokens the eviction keeps (in position order) plus the decoded ones, as the numpy storage
    reference stores them; the prompt attends to itself in full; the stored count is right."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    P, steps = 19, 6
    n_new = np.array([19, 13, 5])
    N = P + steps
    Q = 1.5 * rng.standard_normal((B, N, H, D))
    K = rng.standard_normal((B, N, HKV, D))
    V = rng.standard_normal((B, N, HKV, D))
    dims = Dims(batch=B, max_len=40, n_heads=H, n_kv_heads=HKV, head_dim=D, n_layers=n_layers)
    ev = pol.eviction
    cap = pyramid_budgets(ev.budget, ev.window, ev.beta, n_layers)[layer] if isinstance(
        ev, PyramidKV) else ev.budget
    kept = [[np_kept(ev, Q[b], K[b], int(n_new[b]), h, cap) for h in range(HKV)] for b in range(B)]

    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    state = pol.init(dims)
    out, state = _prefill(pol, state, f32(Q[:, :P]), f32(K[:, :P]), f32(V[:, :P]),
                          jnp.asarray(n_new, jnp.int32), jnp.int32(layer))
    g = H // HKV
    for b in range(B):      # the prompt attends to itself uncompressed
        for i in (0, int(n_new[b]) - 1):
            want = np.concatenate([np_attend(Q[b, i, h * g:(h + 1) * g], K[b, :i + 1, h], V[b, :i + 1, h])
                                   for h in range(HKV)])
            np.testing.assert_allclose(np.asarray(out[b, i]), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(state["count"]), [len(kept[b][0]) for b in range(B)])
    if name != "pyramid_dense":
        assert any(len(kept[b][0]) < n_new[b] for b in range(B))     # something was evicted
    for step in range(steps):
        p = n_new + step
        idx = p[:, None, None, None]
        qs, ks, vs = (np.take_along_axis(A, idx, axis=1) for A in (Q, K, V))
        out, state = _decode(pol, state, f32(qs), f32(ks), f32(vs), jnp.asarray(p, jnp.int32),
                             jnp.int32(layer))
        for b in range(B):
            want = []
            for h in range(HKV):
                toks = kept[b][h] + list(range(n_new[b], p[b] + 1))
                keys = np_store(pol.storage, K[b, toks, h], "k")
                values = np_store(pol.storage, V[b, toks, h], "v")
                want.append(np_attend(Q[b, p[b], h * g:(h + 1) * g], keys, values))
            np.testing.assert_allclose(np.asarray(out[b, 0]), np.concatenate(want), atol=5e-5,
                                       rtol=5e-5, err_msg=f"step {step} row {b}")
    np.testing.assert_array_equal(np.asarray(state["count"]),
                                  [len(kept[b][0]) + steps for b in range(B)])


# ---------------------------------------------------------------------------
# through the tiny model
# ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=4)
def _run_jit(model, tokens, cache, n_new, steps):
    logits, cache = model(tokens[:, :-steps], cache=cache, n_new=n_new)
    rows = jnp.arange(tokens.shape[0])

    def body(cache, s):
        lg, cache = model(tokens[rows, n_new + s][:, None], cache=cache, n_new=jnp.ones_like(n_new))
        return cache, lg[:, 0]

    cache, outs = jax.lax.scan(body, cache, jnp.arange(steps))
    return logits, outs, cache


def _run(model, policy, steps=5, max_len=32):
    tokens = jax.random.randint(jax.random.key(3), (2, 14 + steps), 0, model.spec.vocab_size)
    n_new = jnp.array([14, 9], jnp.int32)
    m = ml.passes.kv_compress(policy)(model)
    cache = make_cache(m, 2, max_len)
    return _run_jit(m, tokens, cache, n_new, steps), n_new


def test_through_model(tiny):
    """(a) SnapKV keeping every prompt token + dense storage = the dense cache; (b) PyramidKV +
    GEAR under nn.scan: finite, each layer stores min(prompt, its budget) + decoded tokens, and
    the cache's bytes equal the pass's formula."""
    (d0, dense, _), n_new = _run(tiny, Dense())
    (g0, got, _), _ = _run(tiny, compose("snapkv:budget=16,window=4", "dense"))
    for b in range(2):
        chex.assert_trees_all_close(g0[b, :n_new[b]], d0[b, :n_new[b]], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got, dense, atol=1e-5, rtol=1e-5)

    pol = ml.kv.parse("pyramidkv:budget=8,window=3,beta=4+gear:bits=4,residual=8+room=8")
    assert pol == Compose(PyramidKV(budget=8, window=3, beta=4), GEAR(bits=4, residual=8), room=8)
    (_, outs, cache), _ = _run(tiny, pol)
    assert bool(jnp.isfinite(outs).all())
    budgets = pol.eviction.layer_budgets(cache.dims)
    assert budgets[0] > budgets[1]
    want = [[min(int(n), cap) + 5 for n in n_new] for cap in budgets]
    np.testing.assert_array_equal(np.asarray(cache.state["count"]), want)
    from memlab.passes.kv_compress import policy_bytes
    assert ml.kv.cache_bytes(cache) == policy_bytes(pol, tiny.spec, 2, 32)
    assert float(jnp.abs(outs - dense).max()) > 1e-3


# ---------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("pol", [
    Compose(SnapKV(budget=102), KIVI(bits=2, scale_dtype="bfloat16"), room=256),
    Compose(StreamingLLM(budget=64), Dense(dtype="bfloat16")),
    Compose(PyramidKV(budget=64, window=16), GEAR(bits=2), room=100),
    Compose(SnapKV(budget=40, window=8), KIVI(bits=4, group_size=16, residual=32, key_mode="token"),
            room=77),
], ids=["snapkv_kivi2", "streaming_dense", "pyramid_gear", "snapkv_kivi4_token"])
def test_nbytes_exact(pol):
    for dims in (Dims(1, 512, 9, 3, 64, "float32", 30), Dims(2, 999, 4, 2, 32, "bfloat16", 5)):
        sd = pol.storage_dims(dims)
        assert sd.max_len == pol.eviction.slots(dims) + (pol.room or dims.max_len - pol.eviction.slots(dims))
        want = pol.storage.nbytes(sd) + 4 * dims.batch + (4 * dims.n_layers if isinstance(
            pol.eviction, PyramidKV) else 0)
        assert pol.nbytes(dims) == want == tree_bytes(jax.eval_shape(lambda: pol.init(dims)))


def test_bytes_smaller_than_either_alone():
    """At the experiment's shapes (512-token cache, 256 decoded, budget 102): SnapKV + KIVI-2
    stores fewer bytes than KIVI-2 over the whole window and than SnapKV's float tokens."""
    dims = Dims(1, 512, 9, 3, 64, "float32", 30)
    both = compose(SnapKV(budget=102), KIVI(bits=2, scale_dtype="bfloat16"), room=256).nbytes(dims)
    kivi = KIVI(bits=2, scale_dtype="bfloat16").nbytes(dims)
    dense = Dense().nbytes(dims)
    assert both < kivi < dense
    assert both < Compose(SnapKV(budget=102), Dense(), room=256).nbytes(dims)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("make,err,match", [
    (lambda: compose(H2O(budget=16), KIVI()), ValueError, "h2o"),
    (lambda: compose(SnapKV(budget=64), KVQuant()), ValueError, "kvquant"),
    (lambda: compose(KIVI(), KIVI()), ValueError, "kivi"),
    (lambda: compose(SnapKV(budget=64, dtype="bfloat16"), KIVI()), ValueError, "dtype"),
    (lambda: compose(SnapKV(budget=64), KIVI(), room=0), ValueError, "room"),
    (lambda: compose(SnapKV(budget=64), "not a policy at all"), ValueError, "unknown kv policy"),
    (lambda: Compose(SnapKV(budget=64), 3), TypeError, "storage"),
    (lambda: ml.kv.parse("snapkv:budget=8+kivi2+room=x"), ValueError, "room"),
    (lambda: ml.kv.parse("snapkv:budget=8+kivi2+dense+dense"), ValueError, "eviction\\+storage"),
    (lambda: ml.kv.parse("h2o:budget=8+kivi2"), ValueError, "h2o"),
])
def test_bad_arguments(make, err, match):
    with pytest.raises(err, match=match):
        make()


# A budget (+ room) larger than the cache is capped at max_len, not an error: see
# tests/test_kv_short.py::test_composition_capacity_is_capped_at_the_cache.
