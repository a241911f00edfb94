"""MiniCache (``memlab.kv.minicache``) against an independent float64 numpy model of the
method: SLERP-merged directions, per-layer magnitudes and retention (prompt: top fraction by
angular distance; decode: beyond the merged prompt tokens' largest distance, while capacity
lasts).  Driven layer by layer directly, and through a 4-layer tiny Llama under ``nn.scan``
against a reference policy that keeps every token and reconstructs with the numpy model;
equality with the dense cache when every token is retained; exact bytes; errors."""
import dataclasses
import functools
import math
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.generate import make_cache
from memlab.kv import MAX_POS, Dims, KVPolicy, StepCtx
from memlab.kv.minicache import MiniCache
from memlab.memory import tree_bytes


# ---------------------------------------------------------------------------
# the numpy model of the method (float64)
# ---------------------------------------------------------------------------
def np_slerp(xl, xr, t):
    """Directions of xl, xr [..., D] merged by SLERP; magnitudes; angular distance / pi."""
    nl, nr = np.linalg.norm(xl, axis=-1), np.linalg.norm(xr, axis=-1)
    el, er = xl / nl[..., None], xr / nr[..., None]
    w = np.arccos(np.clip((el * er).sum(-1), -1, 1))
    m = (np.sin((1 - t) * w) / np.sin(w))[..., None] * el + (np.sin(t * w) / np.sin(w))[..., None] * er
    return m, nl, nr, w / np.pi


def np_ceil(frac, n):
    f = Fraction(str(frac))
    return math.ceil(n * f)


def np_retained(d, n0, p, pol, max_len):
    """Retained token set of one (row, head): ``d [p]`` distances of tokens 0..p-1, n0 prompt."""
    order = sorted(range(n0), key=lambda i: (-d[i], i))
    kept = [i for i in order[:np_ceil(pol.retain, n0)]
            if pol.threshold is None or d[i] > pol.threshold]
    merged = [d[i] for i in range(n0) if i not in kept]
    bar = max(merged) if merged else -np.inf
    if pol.threshold is not None:
        bar = max(bar, pol.threshold)
    cap = np_ceil(pol.retain, max_len)
    kept = set(kept)
    for i in range(n0, p):
        if d[i] > bar and len(kept) < cap:
            kept.add(i)
    return kept


def np_layer_kv(pol, K, V, layer, n0, p, max_len):
    """Layer ``layer``'s reconstructed K, V of tokens 0..p-1 per row (lists of [p, Hkv, D]) and
    the retained sets, from the full histories ``K, V [L, B, N, Hkv, D]``."""
    n_layers = K.shape[0]
    start = n_layers // 2 if pol.start is None else pol.start
    pairs = (n_layers - start) // 2
    if not start <= layer < start + 2 * pairs:
        return [K[layer, b, :p] for b in range(K.shape[1])], [V[layer, b, :p] for b in range(K.shape[1])], None
    a = start + 2 * ((layer - start) // 2)
    role = layer - a
    outs, kept_all = [], []
    for X in (K, V):
        rows, kept_rows = [], []
        for b in range(X.shape[1]):
            m, nl, nr, d = np_slerp(X[a, b, :p], X[a + 1, b, :p], pol.t)
            mag = (nl, nr)[role]
            rec = mag[..., None] * m
            kept_h = []
            for h in range(X.shape[3]):
                kept = np_retained(d[:, h], n0[b], p, pol, max_len)
                for i in kept:
                    rec[i, h] = X[layer, b, i, h]
                kept_h.append(kept)
            rows.append(rec)
            kept_rows.append(kept_h)
        outs.append(rows)
        kept_all.append(kept_rows)
    return outs[0], outs[1], kept_all


def np_attend_one(q, keys, values):
    """q [H, D] over keys, values [n, Hkv, D] (float64)."""
    h, d = q.shape
    g = h // keys.shape[1]
    out = np.zeros((h, d))
    for hh in range(h):
        s = keys[:, hh // g] @ q[hh] / math.sqrt(d)
        e = np.exp(s - s.max())
        out[hh] = e @ values[:, hh // g] / e.sum()
    return out


def np_decode_out(pol, Q, K, V, layer, n0, p, max_len):
    """Decode output of ``layer`` for the token at p[b]: history reconstructed, own token exact."""
    out = []
    for b in range(Q.shape[1]):
        kr, vr, _ = np_layer_kv(pol, K[:, b:b + 1], V[:, b:b + 1], layer, n0[b:b + 1], p[b], max_len)
        keys = np.concatenate([kr[0], K[layer, b, p[b]][None]])
        values = np.concatenate([vr[0], V[layer, b, p[b]][None]])
        out.append(np_attend_one(Q[layer, b, p[b]], keys, values))
    return np.stack(out)


# ---------------------------------------------------------------------------
# driving the policy directly, layer by layer
# ---------------------------------------------------------------------------
B, H, HKV, D = 2, 4, 2, 10


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


def _histories(rng, n_layers, n):
    """Random Q, K, V [L, B, N, ., D]; partner layers differ by per-token noise of random size,
    so the angular distances spread over [0, ~0.5]."""
    Q = rng.standard_normal((n_layers, B, n, H, D))
    K = rng.standard_normal((n_layers, B, n, HKV, D)) * rng.uniform(0.5, 2.0, (n_layers, B, n, HKV, 1))
    V = rng.standard_normal((n_layers, B, n, HKV, D))
    for X in (K, V):
        for layer in range(1, n_layers, 2):
            X[layer] = X[layer - 1] + rng.uniform(0.05, 1.5, (B, n, HKV, 1)) * rng.standard_normal(
                (B, n, HKV, D))
    return Q, K, V


CASES = [
    ("odd_tail", MiniCache(retain=0.2), 5),                       # pair (2, 3), layer 4 dense
    ("start1_t_threshold", MiniCache(start=1, retain=0.4, t=0.3, threshold=0.15), 5),  # (1,2), (3,4)
    ("no_dense_no_retention", MiniCache(start=0, retain=0.0), 4),  # pairs (0,1), (2,3)
]


@pytest.mark.parametrize("name,pol,n_layers", CASES, ids=[c[0] for c in CASES])
def test_direct_matches_numpy(name, pol, n_layers):
    """Every decode output of every layer equals float64 attention over the numpy model's
    reconstruction (merged |x| m, retained exact vectors, own token exact); the stored state
    reconstructs to the same entries and retains exactly the reference's token sets."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    P, steps, max_len = 13, 6, 24
    n0 = np.array([13, 8])
    Q, K, V = _histories(rng, n_layers, P + steps)
    dims = Dims(batch=B, max_len=max_len, n_heads=H, n_kv_heads=HKV, head_dim=D, n_layers=n_layers)
    state = pol.init_stacked(dims)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    nn_ = jnp.asarray(n0, jnp.int32)
    for layer in range(n_layers):
        _, state = _prefill(pol, state, f32(Q[layer, :, :P]), f32(K[layer, :, :P]),
                            f32(V[layer, :, :P]), nn_, jnp.int32(layer))
    for step in range(steps):
        p = n0 + step
        for layer in range(n_layers):
            idx = p[:, None, None, None]
            qs, ks, vs = (np.take_along_axis(X[layer], idx, axis=1) for X in (Q, K, V))
            out, state = _decode(pol, state, f32(qs), f32(ks), f32(vs), jnp.asarray(p, jnp.int32),
                                 jnp.int32(layer))
            want = np_decode_out(pol, Q, K, V, layer, n0, p, max_len)
            np.testing.assert_allclose(np.asarray(out[:, 0]), want, atol=3e-5, rtol=3e-5,
                                       err_msg=f"step {step} layer {layer}")
    # the stored state: reconstruction and retained sets
    start, pairs, kind, index = pol.layout(n_layers)
    p_end = n0 + steps
    for layer in range(n_layers):
        if kind[layer] == 0:
            continue
        for which, X in (("k", K), ("v", V)):
            rec = np.asarray(pol.reconstruct(state[which], int(index[layer]), int(kind[layer]) - 1))
            rpos = np.asarray(state[which]["ret_pos"][index[layer]])          # [B, Hkv, R]
            for b in range(B):
                kr, vr, kept = np_layer_kv(pol, K[:, b:b + 1], V[:, b:b + 1], layer, n0[b:b + 1],
                                           p_end[b], max_len)
                want = (kr if which == "k" else vr)[0]
                np.testing.assert_allclose(rec[b, :p_end[b]], want, atol=2e-5, rtol=2e-5)
                sets = kept[0 if which == "k" else 1][0]
                for h in range(HKV):
                    got = {int(x) for x in rpos[b, h] if x != MAX_POS}
                    assert got == sets[h], (layer, which, b, h, got, sets[h])
    if pol.retain > 0:   # the cases do retain something, and do merge something
        assert (np.asarray(state["k"]["ret_pos"]) != MAX_POS).any()
        n_ret = (np.asarray(state["k"]["ret_pos"]) != MAX_POS).sum(-1)     # [P, B, Hkv]
        assert (n_ret < p_end[None, :, None]).all()


def test_slerp_merge_matches_numpy():
    from memlab.kv.minicache import slerp_merge
    rng = np.random.default_rng(3)
    xl = rng.standard_normal((5, 3, 11))
    xr = xl + rng.uniform(0.01, 3.0, (5, 3, 1)) * rng.standard_normal((5, 3, 11))
    for t in (0.5, 0.2):
        m, nl, nr, d = (np.asarray(a) for a in slerp_merge(jnp.asarray(xl, jnp.float32),
                                                           jnp.asarray(xr, jnp.float32), t))
        wm, wl, wr, wd = np_slerp(xl, xr, t)
        np.testing.assert_allclose(m, wm, atol=2e-6)
        np.testing.assert_allclose(nl, wl, rtol=1e-6)
        np.testing.assert_allclose(nr, wr, rtol=1e-6)
        np.testing.assert_allclose(d, wd, atol=2e-6)
    # t = 0.5 is the normalized sum of the directions; identical directions merge to themselves
    m = np.asarray(slerp_merge(jnp.asarray(xl, jnp.float32), jnp.asarray(2 * xl, jnp.float32))[0])
    np.testing.assert_allclose(m, xl / np.linalg.norm(xl, axis=-1, keepdims=True), atol=1e-6)


# ---------------------------------------------------------------------------
# through a 4-layer tiny Llama (nn.scan, kv_compress)
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Reference(KVPolicy):
    """Keeps every layer's exact K, V and reconstructs MiniCache's entries with the numpy model
    at every decode step (a host callback): an independent cross-layer policy."""

    mini: MiniCache
    name = "reference"
    cross_layer = True

    def init_stacked(self, dims):
        shape = (dims.n_layers, dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim)
        return {"k": jnp.zeros(shape), "v": jnp.zeros(shape), "n0": jnp.zeros((dims.batch,), jnp.int32)}

    def stacked_nbytes(self, dims):
        return tree_bytes(jax.eval_shape(lambda: self.init_stacked(dims)))

    def _write(self, state, k, v, ctx, slots):
        rows = jnp.arange(k.shape[0])[:, None]
        return {**state, "k": state["k"].at[ctx.layer, rows, slots].set(k, mode="drop"),
                "v": state["v"].at[ctx.layer, rows, slots].set(v, mode="drop")}

    def prefill(self, state, q, k, v, ctx):
        slots = ml.kv.base.prompt_positions(ctx)
        state = {**self._write(state, k, v, ctx, slots), "n0": ctx.n_new}
        return ml.kv.attend(q, k, v, ctx.positions, slots), state

    def decode(self, state, q, k, v, ctx):
        state = self._write(state, k, v, ctx, ctx.positions)
        max_len = state["k"].shape[2]

        def host(q, K, V, n0, p, layer):
            Q = np.zeros((K.shape[0],) + (K.shape[1], K.shape[2], q.shape[2], q.shape[3]))
            Q[int(layer), np.arange(K.shape[1]), p] = np.asarray(q[:, 0], np.float64)
            out = np_decode_out(self.mini, Q, np.asarray(K, np.float64), np.asarray(V, np.float64),
                                int(layer), np.asarray(n0), np.asarray(p), max_len)
            return out[:, None].astype(np.float32)

        out = jax.pure_callback(host, jax.ShapeDtypeStruct(q.shape, jnp.float32), q, state["k"],
                                state["v"], state["n0"], ctx.positions[:, 0], ctx.layer)
        return out.astype(q.dtype), state


@pytest.fixture(scope="module")
def tiny4():
    spec = dataclasses.replace(ml.models.config("tiny"), n_layers=4)
    return ml.models.init(spec, jax.random.key(11))


@functools.partial(jax.jit, static_argnums=4)
def _run_jit(model, tokens, cache, n_new, steps):
    logits, cache = model(tokens[:, :-steps], cache=cache, n_new=n_new)
    rows = jnp.arange(tokens.shape[0])

    def body(cache, s):
        lg, cache = model(tokens[rows, n_new + s][:, None], cache=cache, n_new=jnp.ones_like(n_new))
        return cache, lg[:, 0]

    cache, outs = jax.lax.scan(body, cache, jnp.arange(steps))
    return logits, outs, cache


P_LEN, STEPS, MAX_LEN = 12, 5, 20


def _run(model, policy):
    """Prefill ragged prompts, then STEPS teacher-forced decode steps: (prefill logits,
    decode logits [STEPS, B, V], cache)."""
    tokens = jax.random.randint(jax.random.key(5), (2, P_LEN + STEPS), 0, model.spec.vocab_size)
    m = ml.passes.kv_compress(policy)(model)
    cache = make_cache(m, tokens.shape[0], MAX_LEN)
    return _run_jit(m, tokens, cache, N_NEW, STEPS)


N_NEW = jnp.array([12, 7], jnp.int32)


@pytest.fixture(scope="module")
def dense_run(tiny4):
    return _run(tiny4, ml.kv.get("dense")())


def test_through_model_matches_reference(tiny4, dense_run):
    """MiniCache under nn.scan (4 layers, pair (2, 3), the kv_compress pass): every decode step's
    logits equal those of the reference policy that attends over the numpy reconstruction;
    bytes of the real cache equal the formula and the pass's estimate."""
    pol = MiniCache(retain=0.25)
    _, got, cache = _run(tiny4, pol)
    _, want, _ = _run(tiny4, _Reference(pol))
    chex.assert_trees_all_close(got, want, atol=2e-4, rtol=2e-4)
    assert float(jnp.abs(got - dense_run[1]).max()) > 1e-3        # it does compress
    assert tree_bytes(cache.state) == pol.stacked_nbytes(cache.dims)
    from memlab.passes.kv_compress import policy_bytes
    assert ml.kv.cache_bytes(cache) == policy_bytes(pol, tiny4.spec, 2, MAX_LEN)


def test_retain_all_equals_dense(tiny4, dense_run):
    """retain=1: every token is retained, so prefill and decode logits equal the dense cache's
    to float32 rounding (the dense prompt runs the blocked causal attention, this policy
    attention at positions), with ragged prompts (start=1: dense, pair, dense layers)."""
    first, outs, _ = _run(tiny4, MiniCache(start=1, retain=1.0))
    for b in range(2):
        chex.assert_trees_all_close(first[b, :N_NEW[b]], dense_run[0][b, :N_NEW[b]], atol=2e-5,
                                    rtol=0)
    chex.assert_trees_all_close(outs, dense_run[1], atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------
# bytes, parse, errors
# ---------------------------------------------------------------------------
def _formula(pol, dims):
    start, p, _, _ = pol.layout(dims.n_layers)
    ld = dims.n_layers - 2 * p
    b, s, h, d = dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim
    it = jnp.dtype(pol.dtype or dims.dtype).itemsize
    r = math.ceil(s * Fraction(str(pol.retain)))
    per = b * s * h * d * it + 2 * b * s * h * it + 2 * b * r * h * d * it + 4 * b * h * r + 4 * b * h
    return 2 * ld * b * s * h * d * it + 2 * p * per


@pytest.mark.parametrize("pol,dims", [
    (MiniCache(), Dims(2, 4096, 9, 3, 64, "float32", 30)),
    (MiniCache(start=15, retain=0.1, dtype="bfloat16"), Dims(1, 513, 9, 3, 64, "float32", 30)),
    (MiniCache(start=1, retain=0.0), Dims(3, 37, 4, 2, 10, "bfloat16", 6)),
    (MiniCache(start=0, retain=1.0), Dims(1, 19, 4, 1, 8, "float16", 3)),
], ids=["smol", "smol_bf16", "odd", "all"])
def test_bytes_exact_and_smaller_than_dense(pol, dims):
    got = tree_bytes(jax.eval_shape(lambda: pol.init_stacked(dims)))
    assert pol.stacked_nbytes(dims) == got == _formula(pol, dims)
    dense = ml.kv.get("dense")(dtype=pol.dtype).stacked_nbytes(dims)
    if pol.retain < 0.5:
        assert got < dense
    if pol.retain == 0.05 and dims.n_layers == 30:   # 7 pairs (15..28) + 16 dense layers
        assert got / dense == pytest.approx((16 + 7 * (1 + 2 / 64 + 2 * 205 / 4096)) / 30
                                            + 2 * 7 * 8 * 3 * (205 + 1) / dense, rel=1e-12)


def test_parse_and_registry():
    assert ml.kv.parse("minicache:start=15,retain=0.1") == MiniCache(start=15, retain=0.1)
    assert ml.kv.get("minicache") is MiniCache


@pytest.mark.parametrize("make,match", [
    (lambda: MiniCache(start=-1), "start"),
    (lambda: MiniCache(start=1.5), "start"),
    (lambda: MiniCache(retain=1.5), "retain"),
    (lambda: MiniCache(t=-0.1), "t=-0.1"),
    (lambda: MiniCache(threshold=2), "threshold"),
    (lambda: MiniCache(dtype="int8"), "dtype"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_dims_and_misuse(tiny):
    with pytest.raises(ValueError, match="no pair"):
        ml.kv.init_cache(MiniCache(start=1), tiny.spec, 1, 16)        # 2 layers: start 1 pairs nothing
    dims = Dims(1, 16, 4, 2, 16, n_layers=4)
    with pytest.raises(TypeError, match="stacked_nbytes"):
        MiniCache().nbytes(dims)
    with pytest.raises(TypeError, match="init_stacked"):
        MiniCache().init(dims)
