"""GEAR, Palu and ThinK KV policies against float64 numpy references written here.

Each policy's decode output is compared with float64 attention over a
reconstruction computed in numpy from the stored state (GEAR: unpacked codes *
scale + zero + A @ Bm with the outliers written back, plus the float buffer;
Palu: latents @ projection, RoPE applied in numpy; ThinK: the kept key
channels with the queries gathered to them).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.kv import Dims, StepCtx
from memlab.kv.gear import GEAR
from memlab.kv.palu import Palu
from memlab.kv.think import ThinK
from memlab.memory import tree_bytes
from memlab.models.llama import rope as jrope

THETA = 10000.0
B, H, HKV, D, S = 2, 4, 2, 16, 40
PROMPT = 24
LENS = np.array([21, 13], np.int32)


# ---------------------------------------------------------------------------
# helpers: data, driver, numpy references
# ---------------------------------------------------------------------------
def structured(rng, shape, rank=3, outlier_rate=0.01, outlier_scale=12.0, channel_scale=True):
    """Low-rank + noise + a few large outliers (+ uneven channel magnitudes, as real keys)."""
    b, t, h, d = shape
    base = rng.standard_normal((b, h, t, rank)) @ rng.standard_normal((b, h, rank, d))
    x = base.transpose(0, 2, 1, 3) + 0.3 * rng.standard_normal(shape)
    if channel_scale:
        x = x * np.exp(rng.standard_normal(d) * 0.7)
    mask = rng.random(shape) < outlier_rate
    x = np.where(mask, outlier_scale * np.sign(rng.standard_normal(shape)) * (1 + rng.random(shape)), x)
    return x.astype(np.float32)


def np_rope(x, pos):
    d = x.shape[-1]
    inv = 1.0 / THETA ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos.astype(np.float64)[..., None] * inv
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = np.split(x.astype(np.float64), 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_attend(q, k, v, q_pos, kv_pos, scale):
    """float64 softmax attention: q [B,1,H,d], k [B,S,Hkv,d], v [B,S,Hkv,Dv]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, _, h, _ = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, 1, h, v.shape[-1]))
    for i in range(b):
        vis = kv_pos[i] <= q_pos[i, 0]
        for j in range(h):
            s = k[i, :, j // g] @ q[i, 0, j] * scale
            s = np.where(vis, s, -np.inf)
            p = np.exp(s - s.max())
            out[i, 0, j] = (p / p.sum()) @ v[i, :, j // g]
    return out


def ctx_for(positions, n_new, lengths, k_pre):
    return StepCtx(positions=positions, n_new=n_new, lengths=lengths, layer=jnp.int32(0),
                   k_pre=k_pre, rope=functools.partial(jrope, theta=THETA))


@functools.partial(jax.jit, static_argnums=0)
def _prefill(policy, state, q, k_pre, v, n_new):
    t = q.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (q.shape[0], t))
    k = jrope(k_pre, pos, THETA)
    return policy.prefill(state, q, k, v, ctx_for(pos, n_new, jnp.zeros_like(n_new), k_pre))


@functools.partial(jax.jit, static_argnums=0)
def _decode(policy, state, q, k_pre, v, lengths):
    pos = lengths[:, None]
    k = jrope(k_pre, pos, THETA)
    return policy.decode(state, q, k, v, ctx_for(pos, jnp.ones_like(lengths), lengths, k_pre))


def drive(policy, steps, seed=0, lens=LENS, max_len=S, d=D):
    """Prefill a padded prompt of lengths ``lens`` then ``steps`` decode steps.

    Returns the post-RoPE keys / values of every token per row (float32 numpy,
    [B, max_len, Hkv, d]), the pre-RoPE keys, the prompt queries and for each
    decode step ``(q, out, state, lengths_before)``.
    """
    rng = np.random.default_rng(seed)
    dims = Dims(batch=B, max_len=max_len, n_heads=H, n_kv_heads=HKV, head_dim=d)
    state = policy.init(dims)
    total = PROMPT + steps
    k_pre = structured(rng, (B, total, HKV, d))
    v = structured(rng, (B, total, HKV, d), channel_scale=False)
    q = rng.standard_normal((B, total, H, d)).astype(np.float32)
    # each row's decode tokens follow its own prompt: token i of row b sits at position lens[b] + i
    kp_tok = np.zeros((B, max_len, HKV, d), np.float32)
    v_tok = np.zeros((B, max_len, HKV, d), np.float32)
    for b in range(B):
        kp_tok[b, :lens[b] + steps] = k_pre[b, :lens[b] + steps]
        v_tok[b, :lens[b] + steps] = v[b, :lens[b] + steps]
    _, state = _prefill(policy, state, jnp.asarray(q[:, :PROMPT]), jnp.asarray(kp_tok[:, :PROMPT]),
                        jnp.asarray(v_tok[:, :PROMPT]), jnp.asarray(lens))
    lengths = np.array(lens)
    records = []
    for i in range(steps):
        rows = np.arange(B)
        qi = q[rows, PROMPT + i][:, None]
        out, state = _decode(policy, state, jnp.asarray(qi), jnp.asarray(kp_tok[rows, lengths][:, None]),
                             jnp.asarray(v_tok[rows, lengths][:, None]), jnp.asarray(lengths))
        records.append((qi, np.asarray(out), jax.tree.map(np.asarray, state), lengths.copy()))
        lengths = lengths + 1
    k_tok = np_rope(kp_tok, np.broadcast_to(np.arange(max_len), (B, max_len)))
    return k_tok, v_tok, kp_tok, q[:, :PROMPT], records


def np_unpack(packed, bits):
    p = 8 // bits
    shifts = (np.arange(p) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8(2 ** bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * p).astype(np.float64)


def np_gear_store(pol, part, kind):
    """Dequantized [B, S, Hkv, D] float64 from GEAR's stored codes, scales, factors, outliers."""
    x = np_unpack(part["codes"], pol.bits)
    sc, zr = part["scale"].astype(np.float64), part["zero"].astype(np.float64)
    if kind == "k":
        x = x * np.repeat(sc, pol.residual, 1) + np.repeat(zr, pol.residual, 1)
    else:
        x = x * sc[..., None] + zr[..., None]
    if pol.rank:
        x = x + np.einsum("bhsr,bhrd->bshd", part["a"].astype(np.float64), part["b"].astype(np.float64))
    if part["out_idx"].shape[-1]:
        np.put_along_axis(x, part["out_idx"].astype(np.int64), part["out_val"].astype(np.float64), -1)
    return x


def np_gear_cache(pol, state, length):
    """Keys, values and positions GEAR should attend over for a row total of ``length`` tokens."""
    g = pol.residual
    s = state["k"]["codes"].shape[1]
    ql = (length // g) * g
    rl = length - ql
    slot = np.arange(s)
    pos_q = np.where(slot[None] < ql[:, None], slot[None], np.iinfo(np.int32).max)
    j = np.arange(g)
    pos_b = np.where(j[None] < rl[:, None], ql[:, None] + j[None], np.iinfo(np.int32).max)
    k = np.concatenate([np_gear_store(pol, state["k"], "k"), state["k_buf"]], 1)
    v = np.concatenate([np_gear_store(pol, state["v"], "v"), state["v_buf"]], 1)
    return k, v, np.concatenate([pos_q, pos_b], 1)


def rel_err(x_hat, x, mask):
    return np.linalg.norm((x_hat - x)[mask]) / np.linalg.norm(x[mask])


# ---------------------------------------------------------------------------
# GEAR
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("pol", [GEAR(bits=4, rank=4, outlier_fraction=0.1, residual=8),
                                 GEAR(bits=2, rank=2, outlier_fraction=0.05, residual=8,
                                      aux_dtype="float32")])
def test_gear_decode_matches_numpy_reconstruction(pol):
    steps = 12      # row 0: 21 -> 33 tokens, row 1: 13 -> 25; both flush the buffer on the way
    k_tok, v_tok, _, _, records = drive(pol, steps)
    g = pol.residual
    for qi, out, state, lengths in records:
        new_len = lengths + 1
        k, v, kv_pos = np_gear_cache(pol, state, new_len)
        ref = np_attend(qi, k, v, lengths[:, None], kv_pos, 1 / np.sqrt(D))
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
        for b in range(B):   # the float buffer holds the tail tokens exactly
            ql = new_len[b] // g * g
            np.testing.assert_allclose(state["k_buf"][b, :new_len[b] - ql], k_tok[b, ql:new_len[b]],
                                       atol=2e-6)   # keys: float32 RoPE vs the float64 one here
            np.testing.assert_array_equal(state["v_buf"][b, :new_len[b] - ql], v_tok[b, ql:new_len[b]])
            assert not state["k_buf"][b, new_len[b] - ql:].any()
    # outliers: stored exactly (to aux precision) and the largest |x| of their token
    state, lengths = records[-1][2], records[-1][3] + 1
    for b in range(B):
        ql = lengths[b] // g * g
        x = k_tok[b, :ql]
        idx = state["k"]["out_idx"][b, :ql].astype(np.int64)
        got = state["k"]["out_val"][b, :ql].astype(np.float64)
        np.testing.assert_allclose(got, np.take_along_axis(x, idx, -1), rtol=1e-3)
        kth = -np.sort(-np.abs(x), -1)[..., idx.shape[-1] - 1]
        assert (np.abs(np.take_along_axis(x, idx, -1)) >= kth[..., None] - 1e-6).all()
        kq = np_gear_store(pol, state["k"], "k")[b, :ql]
        assert rel_err(kq, x, np.ones_like(x, bool)) < (0.05 if pol.bits == 4 else 0.3)


def test_gear_corrections_beat_plain_quantization():
    """Outliers and low rank each cut the error of plain quantization at the same bits."""
    rng = np.random.default_rng(3)
    n = 64
    k = structured(rng, (B, n, HKV, D), rank=3, outlier_rate=0.02)
    v = structured(rng, (B, n, HKV, D), rank=3, outlier_rate=0.02, channel_scale=False)
    valid = np.ones(k.shape, bool)
    errs = {}
    for bits, name, kw in ((4, "plain", dict(rank=0, outlier_fraction=0)),
                           (4, "sparse", dict(rank=0, outlier_fraction=0.1)),
                           (4, "lowrank", dict(rank=4, outlier_fraction=0)),
                           (4, "gear", dict(rank=4, outlier_fraction=0.1)),
                           (2, "plain", dict(rank=0, outlier_fraction=0)),
                           (2, "gear", dict(rank=4, outlier_fraction=0.1))):
        pol = GEAR(bits=bits, residual=16, aux_dtype="float32", **kw)
        e = []
        for kind, x in (("k", k), ("v", v)):   # what prefill stores for a full prompt (eager: no compiles)
            parts, basis = pol._compress(jnp.asarray(x), jnp.ones((B, n), bool), kind)
            part = jax.tree.map(np.asarray, dict(parts, b=basis))
            e.append(rel_err(np_gear_store(pol, part, kind), x, valid))
        errs[bits, name] = e
    for i in range(2):   # keys, values
        for name in ("sparse", "lowrank", "gear"):
            assert errs[4, name][i] < errs[4, "plain"][i], (name, i, errs)
        assert errs[4, "gear"][i] < 0.7 * errs[4, "plain"][i], errs
        assert errs[2, "gear"][i] < 0.7 * errs[2, "plain"][i], errs


# ---------------------------------------------------------------------------
# Palu
# ---------------------------------------------------------------------------
def np_palu_kv(pol, state):
    def one(lat, proj):
        x = np.einsum("bshr,bhre->bshe", lat.astype(np.float64), proj.astype(np.float64))
        b, s, hg, e = x.shape
        return x.reshape(b, s, hg * pol.head_group, e // pol.head_group)
    k, v = one(state["k_lat"], state["k_proj"]), one(state["v_lat"], state["v_proj"])
    if pol.pre_rope:
        k = np_rope(k, np.broadcast_to(np.arange(k.shape[1]), k.shape[:2]))
    return k, v


@pytest.mark.parametrize("pol", [Palu(rank_ratio=0.25, head_group=2), Palu(rank_ratio=0.5, pre_rope=False)])
def test_palu_decode_matches_numpy_reconstruction(pol):
    _, _, _, _, records = drive(pol, 4)
    r = pol.rank(D)
    for qi, out, state, lengths in records:
        k, v = np_palu_kv(pol, state)
        kv_pos = np.where(np.arange(S)[None] <= lengths[:, None], np.arange(S)[None], np.iinfo(np.int32).max)
        np.testing.assert_allclose(out, np_attend(qi, k, v, lengths[:, None], kv_pos, 1 / np.sqrt(D)),
                                   atol=2e-5, rtol=2e-5)
        proj = state["k_proj"].astype(np.float64)          # orthonormal rows
        np.testing.assert_allclose(proj @ proj.swapaxes(-1, -2), np.broadcast_to(np.eye(r), proj.shape[:2] + (r, r)),
                                   atol=1e-5)


@functools.lru_cache(maxsize=None)
def dense_run():
    return drive(ml.kv.get("dense")(), 3)


def test_palu_full_rank_is_dense():
    _, _, _, _, rec = drive(Palu(rank_ratio=1.0), 3)
    for (_, o1, _, _), (_, o2, _, _) in zip(dense_run()[4], rec):
        np.testing.assert_allclose(o2, o1, atol=2e-5, rtol=1e-4)


def test_palu_error_grows_as_rank_shrinks():
    rng = np.random.default_rng(5)
    k = structured(rng, (B, PROMPT, HKV, D), rank=6, outlier_rate=0)
    v = structured(rng, (B, PROMPT, HKV, D), rank=6, outlier_rate=0, channel_scale=False)
    q = jnp.asarray(rng.standard_normal((B, PROMPT, H, D)), jnp.float32)
    dims = Dims(batch=B, max_len=S, n_heads=H, n_kv_heads=HKV, head_dim=D)
    mask = np.arange(S)[None, :, None, None] < LENS[:, None, None, None]
    mask = np.broadcast_to(mask, (B, S, HKV, D))
    pad = ((0, 0), (0, S - PROMPT), (0, 0), (0, 0))
    k_rot = np_rope(np.pad(k, pad), np.broadcast_to(np.arange(S), (B, S)))
    errs = []
    for ratio in (1.0, 0.75, 0.5, 0.25):
        pol = Palu(rank_ratio=ratio)
        _, st = _prefill(pol, pol.init(dims), q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(LENS))
        kr, vr = np_palu_kv(pol, jax.tree.map(np.asarray, st))
        errs.append((rel_err(kr, k_rot, mask), rel_err(vr, np.pad(v, pad), mask)))
    assert errs[0][0] < 1e-5 and errs[0][1] < 1e-5
    for a, b in zip(errs, errs[1:]):
        assert a[0] < b[0] and a[1] < b[1], errs
    assert errs[-1][0] > 0.1


# ---------------------------------------------------------------------------
# ThinK
# ---------------------------------------------------------------------------
def test_think_decode_matches_numpy_and_channel_choice():
    pol = ThinK(keep_ratio=0.5, window=6)
    k_tok, v_tok, _, q, records = drive(pol, 4)
    m = pol.kept(D)
    q = q.astype(np.float64)
    for b in range(B):
        n = LENS[b]
        qw = q[b, n - pol.window:n].reshape(pol.window, HKV, H // HKV, D)
        score = np.sqrt((qw ** 2).sum((0, 2))) * np.sqrt((k_tok[b, :n].astype(np.float64) ** 2).sum(0))
        want = np.sort(np.argsort(-score, -1)[:, :m], -1)
        np.testing.assert_array_equal(records[0][2]["idx"][b], want)
    for qi, out, state, lengths in records:
        idx = state["idx"]
        kv_pos = np.where(np.arange(S)[None] <= lengths[:, None], np.arange(S)[None], np.iinfo(np.int32).max)
        for b in range(B):
            np.testing.assert_allclose(state["k"][b, :lengths[b] + 1],
                                       np.take_along_axis(k_tok[b, :lengths[b] + 1], idx[b][None], -1),
                                       atol=1e-5)
        q_kept = np.take_along_axis(qi, np.repeat(idx, H // HKV, 1)[:, None], -1)
        ref = np_attend(q_kept, state["k"], state["v"], lengths[:, None], kv_pos, 1 / np.sqrt(D))
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_think_keep_all_is_dense():
    _, _, _, _, rec = drive(ThinK(keep_ratio=1.0, window=4), 3)
    for (_, o1, _, _), (_, o2, _, _) in zip(dense_run()[4], rec):
        np.testing.assert_allclose(o2, o1, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# bytes, errors, registry
# ---------------------------------------------------------------------------
ALL = [GEAR(), GEAR(bits=2, rank=0, outlier_fraction=0.0), GEAR(bits=8, residual=20, aux_dtype="bfloat16"),
       Palu(), Palu(rank_ratio=0.3, head_group=3), ThinK(), ThinK(keep_ratio=0.3)]


@pytest.mark.parametrize("pol", ALL, ids=repr)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nbytes_is_tree_bytes(pol, dtype):
    dims = Dims(batch=3, max_len=100, n_heads=9, n_kv_heads=3, head_dim=64, dtype=dtype)
    assert pol.nbytes(dims) == tree_bytes(jax.eval_shape(lambda: pol.init(dims)))


def test_nbytes_after_prefill_and_documented_shrink():
    dims = Dims(B, S, H, HKV, D)
    for pol in (GEAR(bits=4, rank=4, outlier_fraction=0.1, residual=8), Palu(head_group=2), ThinK()):
        shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((B, PROMPT, H, D), (B, PROMPT, HKV, D),
                                                                  (B, PROMPT, HKV, D))]
        _, st = jax.eval_shape(lambda *a, pol=pol: _prefill(pol, pol.init(dims), *a, jnp.asarray(LENS)), *shapes)
        _, st = jax.eval_shape(lambda st, pol=pol: _decode(pol, st, jnp.ones((B, 1, H, D)), jnp.ones((B, 1, HKV, D)),
                                                           jnp.ones((B, 1, HKV, D)), jnp.asarray(LENS)), st)
        assert tree_bytes(st) == pol.nbytes(dims)
    dims = Dims(batch=1, max_len=4096, n_heads=9, n_kv_heads=3, head_dim=64, dtype="bfloat16")
    dense = ml.kv.get("dense")().nbytes(dims)
    per_tok = lambda p: p.nbytes(dims) / (dims.max_len * dims.n_kv_heads)  # noqa: E731
    assert per_tok(ml.kv.get("dense")()) == 256
    # GEAR 4-bit, D=64, r=4, c=2, G=32, f16 aux: K: 32 codes + 8 A + 6 outliers + 8 scales;
    # V: 32 + 8 + 6 + 4; buffer and Bm amortized
    assert 106 < per_tok(GEAR()) < 106.5   # + buffer and Bm amortized over 4096 slots
    assert GEAR(bits=2).nbytes(dims) < GEAR().nbytes(dims) < 0.45 * dense
    assert Palu(rank_ratio=0.5).nbytes(dims) == dense // 2 + 2 * 3 * 32 * 64 * 2
    assert ThinK(keep_ratio=0.5).nbytes(dims) == 3 * dense // 4 + 4 * 3 * 32


def test_bad_arguments():
    dims = Dims(batch=1, max_len=16, n_heads=4, n_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="rank=17 is larger than head_dim=16"):
        GEAR(rank=17).validate(dims)
    with pytest.raises(ValueError, match="rank"):
        ml.kv.init_cache(GEAR(rank=32), ml.models.config("tiny"), 1, 16)
    for bits in (3, 1, 16, True):
        with pytest.raises(ValueError, match="bits"):
            GEAR(bits=bits)
    with pytest.raises(ValueError, match="outlier_fraction"):
        GEAR(outlier_fraction=0.6)
    with pytest.raises(ValueError, match="residual"):
        GEAR(residual=0)
    for r in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            ThinK(keep_ratio=r)
        with pytest.raises(ValueError, match="rank_ratio"):
            Palu(rank_ratio=r)
    with pytest.raises(ValueError, match="window"):
        ThinK(window=0)
    with pytest.raises(ValueError, match="head_group=3 must divide n_kv_heads=2"):
        Palu(head_group=3).validate(dims)
    with pytest.raises(ValueError, match="does not fit"):
        pol = GEAR(residual=8)
        _prefill(pol, pol.init(dims), *(jnp.ones((1, 24, h, D)) for h in (H, HKV, HKV)),
                 jnp.array([24], jnp.int32))


def test_registered():
    assert {"gear", "palu", "think"} <= set(ml.kv.names())
    assert ml.kv.get("gear") is GEAR and ml.kv.get("palu") is Palu and ml.kv.get("think") is ThinK


# ---------------------------------------------------------------------------
# end to end on the tiny model
# ---------------------------------------------------------------------------
E2E_B, E2E_LEN, E2E_PROMPT, E2E_STEPS = 2, 48, 28, 6


@jax.jit
def _model_prefill(model, cache, toks, lens):
    return model(toks[:, :E2E_PROMPT], cache=cache, n_new=lens)


@jax.jit
def _model_step(model, cache, toks):
    tok = jnp.take_along_axis(toks, cache.lengths[:, None], 1)  # each row continues its own prompt
    logits, cache = model(tok, cache=cache)
    return logits[:, 0], cache


def test_tiny_model_close_to_dense(tiny):
    toks = jax.random.randint(jax.random.key(11), (E2E_B, E2E_PROMPT + E2E_STEPS), 0, 256)
    lens = jnp.array([E2E_PROMPT, 19], jnp.int32)

    def run(policy):
        cache = ml.kv.init_cache(policy, tiny.spec, E2E_B, E2E_LEN)
        first, cache = _model_prefill(tiny, cache, toks, lens)
        outs = []
        for _ in range(E2E_STEPS):
            logits, cache = _model_step(tiny, cache, toks)
            outs.append(logits)
        assert ml.kv.cache_bytes(cache) == tiny.spec.n_layers * policy.nbytes(cache.dims) + 4 * E2E_B
        return first, jnp.stack(outs, 1)

    p_dense, d_dense = run(ml.kv.get("dense")())
    scale = float(jnp.abs(d_dense).max())
    # The tiny model is random: its keys and values have no low-rank or channel structure,
    # so rank / channel cuts cost much more than on a trained model (see the report).
    for pol, lo, hi in ((GEAR(bits=4, rank=4, outlier_fraction=0.1, residual=8), 1e-3, 0.08),
                        (Palu(rank_ratio=1.0), 0.0, 1e-5),
                        (ThinK(keep_ratio=0.875, window=8), 0.05, 0.6)):
        p, d = run(pol)
        for row, n in enumerate(np.asarray(lens)):  # the prompt attends uncompressed (padding
            np.testing.assert_allclose(p[row, :n], p_dense[row, :n], atol=1e-5)  # rows: no output)
        err = float(jnp.abs(d - d_dense).max()) / scale
        assert lo <= err < hi, (pol, err)
        if hi < 0.1:
            np.testing.assert_array_equal(d.argmax(-1), d_dense.argmax(-1))
