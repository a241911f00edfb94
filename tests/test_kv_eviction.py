"""Token-eviction KV policies (StreamingLLM, H2O, SnapKV, PyramidKV) against an independent
float64 numpy simulation: which positions are kept after prefill and after each decode step,
the attention outputs over exactly those entries, equality with the dense policy when nothing
is evicted, exact bytes, PyramidKV's budgets, and the argument errors."""
import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.kv import MAX_POS, Dims, StepCtx
from memlab.kv.h2o import H2O
from memlab.kv.pyramidkv import PyramidKV, pyramid_budgets
from memlab.kv.snapkv import SnapKV
from memlab.kv.streaming import StreamingLLM
from memlab.memory import tree_bytes


# ---------------------------------------------------------------------------
# the independent reference: one row, one KV head at a time, float64, sets of positions
# ---------------------------------------------------------------------------
def _np_probs(q, ks):
    """q [G, D] (the query heads of one KV group), ks [S, D] -> softmax probs [G, S]."""
    s = q @ ks.T / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


class RefRow:
    """One row of one layer: ``Q [N, H, D]``, ``K, V [N, Hkv, D]`` are the row's tokens in order."""

    def __init__(self, policy, Q, K, V, layer_budget):
        self.pol, self.Q, self.K, self.V = policy, Q, K, V
        self.hkv = K.shape[1]
        self.g = Q.shape[1] // self.hkv
        self.cap = layer_budget
        self.kept = [set() for _ in range(self.hkv)]
        self.score = [dict() for _ in range(self.hkv)]
        self.pin = 0

    def _group(self, i, h):
        return self.Q[i, h * self.g:(h + 1) * self.g]

    def attend(self, i, h, keys):
        """Query ``i`` on KV head ``h`` over the positions ``keys``: (out [G, D], mean probs [S])."""
        keys = sorted(keys)
        p = _np_probs(self._group(i, h), self.K[keys, h])
        return p @ self.V[keys, h], dict(zip(keys, p.mean(0)))

    def prefill(self, n):
        pol, cap = self.pol, self.cap
        for h in range(self.hkv):
            if isinstance(pol, StreamingLLM):
                keep = {j for j in range(n) if j < pol.sinks or j >= n - (pol.budget - pol.sinks)}
            elif isinstance(pol, H2O):
                sc = np.zeros(n)
                for i in range(n):
                    for j, pj in self.attend(i, h, range(i + 1))[1].items():
                        sc[j] += pj
                recent = set(range(max(n - pol.recent, 0), n))
                rest = sorted((j for j in range(n) if j not in recent), key=lambda j: (-sc[j], j))
                keep = set(range(n)) if n <= cap else recent | set(rest[:cap - len(recent)])
                self.score[h] = {j: sc[j] for j in keep}
            else:   # SnapKV / PyramidKV
                w, half = pol.window, pol.kernel // 2
                sc = np.zeros(n)
                for i in range(max(n - w, 0), n):
                    for j, pj in self.attend(i, h, range(i + 1))[1].items():
                        sc[j] += pj
                L = max(n - w, 0)
                self.pin = L
                if pol.pooling == "max":
                    pooled = [max(sc[max(j - half, 0):min(j + half + 1, L)]) for j in range(L)]
                else:
                    pooled = [sum(sc[max(j - half, 0):min(j + half + 1, L)]) / pol.kernel
                              for j in range(L)]
                best = sorted(range(L), key=lambda j: (-pooled[j], j))
                keep = set(range(n)) if n <= cap else set(range(L, n)) | set(best[:cap - w])
            self.kept[h] = keep

    def decode(self, p):
        """Token ``p`` arrives: evict if full, store it, attend; returns out [H, D]."""
        pol, outs = self.pol, []
        for h in range(self.hkv):
            kept = self.kept[h]
            if len(kept) >= self.cap:
                if isinstance(pol, StreamingLLM):
                    victim = min(j for j in kept if j >= pol.sinks)
                elif isinstance(pol, H2O):   # the window = the new token + recent - 1 newest kept
                    protected = set(sorted(kept)[len(kept) - (pol.recent - 1):]) if pol.recent > 1 else set()
                    victim = min(kept - protected, key=lambda j: (self.score[h][j], j))
                    del self.score[h][victim]
                else:
                    victim = min(j for j in kept if j >= self.pin)
                kept.remove(victim)
            kept.add(p)
            out, probs = self.attend(p, h, kept)
            if isinstance(pol, H2O):
                self.score[h][p] = 0.0
                for j, pj in probs.items():
                    self.score[h][j] += pj
            outs.append(out)
        return np.concatenate(outs, 0)


def _np_causal(q, k, v, n):
    """Full causal float64 attention over the first ``n`` tokens: [n, H, D]."""
    h, g = q.shape[1], q.shape[1] // k.shape[1]
    out = np.zeros((n, h, q.shape[2]))
    for i in range(n):
        for hh in range(h):
            p = _np_probs(q[i, hh][None], k[:i + 1, hh // g])[0]
            out[i, hh] = p @ v[:i + 1, hh // g]
    return out


# ---------------------------------------------------------------------------
# driving a policy directly (one layer)
# ---------------------------------------------------------------------------
B, H, HKV, D = 3, 4, 2, 8


def _ctx(positions, n_new, lengths, layer, k):
    return StepCtx(positions=positions, n_new=n_new, lengths=lengths, layer=jnp.int32(layer),
                   k_pre=k, rope=None)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _prefill(policy, state, q, k, v, n_new, layer):
    t = q.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (q.shape[0], t))
    return policy.prefill(state, q, k, v, _ctx(pos, n_new, jnp.zeros_like(n_new), layer, k))


@functools.partial(jax.jit, static_argnums=(0, 6))
def _decode(policy, state, q, k, v, p, layer):
    return policy.decode(state, q, k, v, _ctx(p[:, None], jnp.ones_like(p), p, layer, k))


def _kept_sets(policy, state):
    pos = np.asarray(state["pos"])
    if pos.ndim == 2:
        pos = np.repeat(pos[:, None], HKV, axis=1)
    return [[set(int(x) for x in pos[b, h] if x != MAX_POS) for h in range(HKV)] for b in range(B)]


def _check_stored_tokens(state, K, V):
    """Each occupied slot holds exactly the key/value of the position it records."""
    pos = np.asarray(state["pos"])
    if pos.ndim == 2:
        pos = np.repeat(pos[:, None], HKV, axis=1)
    k, v = np.asarray(state["k"], np.float64), np.asarray(state["v"], np.float64)
    for b in range(B):
        for h in range(HKV):
            for s, p in enumerate(pos[b, h]):
                if p != MAX_POS:
                    np.testing.assert_allclose(k[b, s, h], K[b, p, h], rtol=1e-6, atol=1e-6)
                    np.testing.assert_allclose(v[b, s, h], V[b, p, h], rtol=1e-6, atol=1e-6)


CASES = [
    ("streaming", StreamingLLM(budget=8, sinks=2), 0, 1),
    ("streaming_nosink", StreamingLLM(budget=7, sinks=0), 0, 1),
    ("h2o", H2O(budget=8, recent=3, chunk=5), 0, 1),
    ("h2o_recent0", H2O(budget=7, recent=0, chunk=64), 0, 1),
    ("snapkv_max", SnapKV(budget=8, window=3, kernel=3), 0, 1),
    ("snapkv_avg", SnapKV(budget=9, window=2, kernel=5, pooling="avg"), 0, 1),
    ("pyramid_l0", PyramidKV(budget=8, window=3, kernel=3, beta=3), 0, 3),
    ("pyramid_l2", PyramidKV(budget=8, window=3, kernel=3, beta=3), 2, 3),
]


@pytest.mark.parametrize("name,policy,layer,n_layers", CASES, ids=[c[0] for c in CASES])
def test_selection_and_outputs_match_numpy(name, policy, layer, n_layers):
    """(a) kept positions after prefill and after every decode step, per row and KV head, equal
    the numpy simulation (ragged prompts, one row shorter than the budget); (b) every output
    equals float64 attention over exactly the kept entries, and the stored k/v are those tokens'."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    P, steps = 19, 6
    n_new = np.array([19, 13, 5])                       # full, ragged, shorter than the budget
    N = P + steps
    Q = 1.5 * rng.standard_normal((B, N, H, D))
    K = rng.standard_normal((B, N, HKV, D))
    V = rng.standard_normal((B, N, HKV, D))
    dims = Dims(batch=B, max_len=40, n_heads=H, n_kv_heads=HKV, head_dim=D, n_layers=n_layers)
    policy.validate(dims)
    cap = (policy.layer_budgets(dims)[layer] if isinstance(policy, PyramidKV) else policy.budget)
    refs = [RefRow(policy, Q[b], K[b], V[b], cap) for b in range(B)]

    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    state = policy.init(dims)
    out, state = _prefill(policy, state, f32(Q[:, :P]), f32(K[:, :P]), f32(V[:, :P]),
                          jnp.asarray(n_new, jnp.int32), layer)
    for b in range(B):
        refs[b].prefill(int(n_new[b]))
        want = _np_causal(Q[b], K[b], V[b], int(n_new[b]))
        np.testing.assert_allclose(np.asarray(out[b, :n_new[b]]), want, atol=2e-5, rtol=2e-5)
    got = _kept_sets(policy, state)
    for b in range(B):
        assert got[b] == refs[b].kept, f"prefill row {b}: {got[b]} != {refs[b].kept}"
        if n_new[b] <= cap:
            assert all(s == set(range(n_new[b])) for s in got[b])      # nothing evicted
    _check_stored_tokens(state, K, V)
    if isinstance(policy, H2O):    # accumulated scores of the kept tokens
        sc, pos = np.asarray(state["score"]), np.asarray(state["pos"])
        for b in range(B):
            for h in range(HKV):
                for s, p in enumerate(pos[b, h]):
                    if p != MAX_POS:
                        assert abs(sc[b, h, s] - refs[b].score[h][p]) < 1e-4

    for step in range(steps):
        p = n_new + step
        idx = p[:, None, None, None]
        qs, ks, vs = (np.take_along_axis(A, idx, axis=1) for A in (Q, K, V))
        out, state = _decode(policy, state, f32(qs), f32(ks), f32(vs), jnp.asarray(p, jnp.int32), layer)
        want = np.stack([refs[b].decode(int(p[b])) for b in range(B)])
        got = _kept_sets(policy, state)
        for b in range(B):
            assert got[b] == refs[b].kept, f"step {step} row {b}: {got[b]} != {refs[b].kept}"
            assert all(len(s) == min(n_new[b] + step + 1, cap) for s in got[b])
        np.testing.assert_allclose(np.asarray(out[:, 0]), want, atol=2e-5, rtol=2e-5)
    _check_stored_tokens(state, K, V)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_pool1d_matches_numpy(pooling):
    from memlab.kv._budget import pool1d
    rng = np.random.default_rng(11)
    x = rng.random((2, 3, 12)).astype(np.float32)
    lens = np.array([12, 7])
    valid = np.arange(12)[None, None, :] < lens[:, None, None]
    got = np.asarray(pool1d(jnp.asarray(x), jnp.asarray(valid), 5, pooling))
    for b in range(2):
        for j in range(lens[b]):
            win = x[b, :, max(j - 2, 0):min(j + 3, lens[b])]
            want = win.max(-1) if pooling == "max" else win.sum(-1) / 5
            np.testing.assert_allclose(got[b, :, j], want, rtol=1e-6)


# ---------------------------------------------------------------------------
# through the tiny model
# ---------------------------------------------------------------------------
@jax.jit
def _model_step(model, tokens, cache, n_new):
    return model(tokens, cache=cache, n_new=n_new)


def _run(model, policy, tokens, n_new, steps, max_len):
    cache = ml.kv.init_cache(policy, model.spec, tokens.shape[0], max_len)
    logits, cache = _model_step(model, tokens[:, :-steps], cache, n_new)
    outs = [logits]
    rows = jnp.arange(tokens.shape[0])
    for s in range(steps):
        tok = tokens[rows, n_new + s][:, None]
        logits, cache = _model_step(model, tok, cache, jnp.ones_like(n_new))
        outs.append(logits)
    return outs, cache


def test_no_eviction_equals_dense(tiny):
    """(c) budget >= sequence length: every policy's logits equal the dense policy's, prefill and
    decode, with ragged prompts (PyramidKV with different per-layer budgets, all large enough)."""
    P, steps = 10, 5
    tokens = jax.random.randint(jax.random.key(3), (2, P + steps), 0, tiny.spec.vocab_size)
    n_new = jnp.array([10, 6], jnp.int32)
    dense, _ = _run(tiny, ml.kv.get("dense")(), tokens, n_new, steps, 64)
    pols = [StreamingLLM(budget=15, sinks=4), H2O(budget=16, chunk=4), SnapKV(budget=15, window=4),
            PyramidKV(budget=40, window=4, beta=2)]
    for pol in pols:
        got, cache = _run(tiny, pol, tokens, n_new, steps, 64)
        for b in range(2):
            chex.assert_trees_all_close(got[0][b, :n_new[b]], dense[0][b, :n_new[b]], atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(got[1:], dense[1:], atol=1e-5, rtol=1e-5)
        assert tree_bytes(cache.state) == tiny.spec.n_layers * pol.nbytes(cache.dims)


def test_evicting_through_the_model(tiny):
    """Under nn.scan with budgets below the sequence: finite logits, each layer keeps exactly
    min(tokens, its budget) per head, and PyramidKV's layers differ."""
    P, steps = 14, 4
    tokens = jax.random.randint(jax.random.key(4), (2, P + steps), 0, tiny.spec.vocab_size)
    n_new = jnp.array([14, 9], jnp.int32)
    for pol in [StreamingLLM(budget=8, sinks=2), H2O(budget=8), SnapKV(budget=8, window=3),
                PyramidKV(budget=8, window=3, beta=4)]:
        outs, cache = _run(tiny, pol, tokens, n_new, steps, 32)
        assert all(bool(jnp.isfinite(o).all()) for o in outs)
        pos = np.asarray(cache.state["pos"])                       # [L, B, (Hkv,) S]
        budgets = (pol.layer_budgets(cache.dims) if isinstance(pol, PyramidKV)
                   else (pol.budget,) * tiny.spec.n_layers)
        for layer, cap in enumerate(budgets):
            for b in range(2):
                kept = (pos[layer, b] != MAX_POS).sum(-1)
                assert np.all(kept == min(int(n_new[b]) + steps, cap)), (pol, layer, b, kept)
        if isinstance(pol, PyramidKV):
            assert budgets[0] > budgets[1]


# ---------------------------------------------------------------------------
# bytes and budgets
# ---------------------------------------------------------------------------
SMOL = Dims(batch=2, max_len=4096, n_heads=9, n_kv_heads=3, head_dim=64, dtype="float32", n_layers=30)


@pytest.mark.parametrize("policy", [StreamingLLM(budget=64), H2O(budget=64, dtype="bfloat16"),
                                    SnapKV(budget=64, window=16), PyramidKV(budget=64, window=16),
                                    PyramidKV(budget=100, dtype="float16")], ids=str)
def test_nbytes_is_tree_bytes(policy):
    """(d) nbytes equals the real pytree's bytes, before and after a prefill; formulas."""
    for dims in (SMOL, Dims(batch=3, max_len=256, n_heads=4, n_kv_heads=2, head_dim=8, n_layers=2)):
        state = policy.init(dims)
        assert tree_bytes(state) == policy.nbytes(dims)
        item = jnp.dtype(policy.dtype or dims.dtype).itemsize
        b, hkv, d = dims.batch, dims.n_kv_heads, dims.head_dim
        s = policy.slots(dims)
        kv = 2 * b * s * hkv * d * item
        want = {StreamingLLM: kv + 4 * b * s, H2O: kv + 8 * b * hkv * s,
                SnapKV: kv + 4 * b * hkv * s + 4 * b,
                PyramidKV: kv + 4 * b * hkv * s + 4 * b + 4 * dims.n_layers}[type(policy)]
        assert policy.nbytes(dims) == want
    dims = Dims(batch=2, max_len=256, n_heads=4, n_kv_heads=2, head_dim=8, n_layers=2)
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 70, h, 8)), jnp.float32) for h in (4, 2, 2))
    _, st = _prefill(policy, policy.init(dims), q, k, v, jnp.array([70, 33], jnp.int32), 1)
    assert tree_bytes(st) == policy.nbytes(dims)
    assert jax.tree.map(lambda a: a.dtype, st) == jax.tree.map(lambda a: a.dtype, policy.init(dims))


@pytest.mark.parametrize("budget,window,beta,n_layers",
                         [(64, 16, 20.0, 30), (128, 32, 20, 32), (10, 3, 2.5, 7), (512, 32, 7, 24),
                          (9, 8, 20, 5), (50, 4, 1, 6), (33, 1, 1.5, 1)])
def test_pyramid_budgets(budget, window, beta, n_layers):
    """(d) per-layer budgets sum to budget * n_layers, never grow with depth, shrink when beta > 1,
    follow the paper's line within 1 token, and logical bytes = n_layers * SnapKV bytes."""
    b = pyramid_budgets(budget, window, beta, n_layers)
    assert len(b) == n_layers and sum(b) == budget * n_layers
    assert all(x >= y for x, y in zip(b, b[1:])) and min(b) >= window
    a = budget - window
    if n_layers > 1:
        top, bottom = a / beta, 2 * a - a / beta
        line = [window + bottom - (bottom - top) * i / (n_layers - 1) for i in range(n_layers)]
        assert max(abs(x - y) for x, y in zip(b, line)) < 1
        if beta > 1 and a >= n_layers:
            assert b[0] > b[-1]
        if beta == 1:
            assert set(b) == {budget}
    dims = Dims(batch=2, max_len=4 * budget, n_heads=4, n_kv_heads=2, head_dim=8, n_layers=n_layers)
    pol = PyramidKV(budget=budget, window=window, beta=beta)
    pol.validate(dims)
    assert pol.layer_budgets(dims) == b and pol.slots(dims) == max(b)
    assert pol.logical_bytes(dims) == n_layers * SnapKV(budget=budget, window=window).nbytes(dims)
    assert n_layers * pol.nbytes(dims) >= pol.logical_bytes(dims)


def test_registry_and_parse():
    assert ml.kv.parse("snapkv:budget=64,window=8") == SnapKV(budget=64, window=8)
    assert ml.kv.parse("h2o:budget=32") == H2O(budget=32, recent=16)
    assert ml.kv.parse("streaming:budget=32,sinks=2") == StreamingLLM(budget=32, sinks=2)
    assert ml.kv.parse("pyramidkv:budget=64,beta=10") == PyramidKV(budget=64, beta=10)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: StreamingLLM(budget=4, sinks=4), "sinks"),
    (lambda: StreamingLLM(budget=0), "budget"),
    (lambda: StreamingLLM(budget=8, sinks=-1), "sinks"),
    (lambda: H2O(budget=8, recent=9), "recent"),
    (lambda: H2O(budget=8.0), "budget"),
    (lambda: H2O(budget=8, chunk=0), "chunk"),
    (lambda: SnapKV(budget=8, window=8), "window"),
    (lambda: SnapKV(budget=8, window=0), "window"),
    (lambda: SnapKV(budget=64, kernel=6), "kernel"),
    (lambda: SnapKV(budget=64, pooling="mean"), "pooling"),
    (lambda: SnapKV(budget=64, dtype="int8"), "dtype"),
    (lambda: PyramidKV(budget=64, beta=0.5), "beta"),
    (lambda: PyramidKV(budget=16), "window"),
    (lambda: ml.kv.parse("snapkv:window=4"), "budget"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_dims():
    # a budget larger than the cache is capped at max_len (tests/test_kv_short.py)
    with pytest.raises(ValueError, match="layer_budget"):
        PyramidKV(budget=8, window=4).validate(Dims(1, 32, 4, 2, 16, n_layers=2, layer_budget=(3, 13)))
