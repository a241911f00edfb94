"""FlashAttention-2 kernels (``memlab_kernels.flash_attention``).

Every kernel result (output, log-sum-exp, dq, dk, dv) is checked against an
independent float64 numpy attention written here (its own mask, its own
softmax, its own gradient derivation), not against the module's reference
alone; ``attention_reference`` is cross-checked against the same numpy code.
The Triton kernels run in the HLO interpreter (``backend="interpret"``); the
Mosaic kernels run in TPU interpret mode for two tiny cases; both are lowered
for CUDA / TPU from this CPU via ``jax.export``.

Interpret-mode programs are compiled with ``xla_backend_optimization_level=0``
(they run once; LLVM optimization would cost ~4x more compile time than the
run saves).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from jax import export
from jax.experimental.pallas import tpu as pltpu
from memlab_kernels import flash_attention as fa
from memlab_kernels.attention_reference import attention_reference

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 2e-5, BF16: 2e-2}
INT32_MAX = int(np.iinfo(np.int32).max)
O0 = {"xla_backend_optimization_level": 0}
SMALL = fa.BlockSizes(block_q=32, block_kv=16, block_q_dkv=16, block_kv_dkv=32,
                      block_q_dq=32, block_kv_dq=16)


# ---------------------------------------------------------------- numpy side
def np_visible(b, t, s, *, causal=False, window=None, segment_ids=None,
               q_positions=None, kv_positions=None):
    """``[B, T, S]`` visibility, straight from the spec (int64 positions)."""
    qp = (np.arange(t) + (s - t))[None].repeat(b, 0) if q_positions is None \
        else np.asarray(q_positions, np.int64)
    kp = np.arange(s)[None].repeat(b, 0) if kv_positions is None \
        else np.asarray(kv_positions, np.int64)
    diff = qp[:, :, None] - kp[:, None, :]            # q_pos - kv_pos
    vis = np.ones((b, t, s), bool)
    if causal:
        vis &= diff >= 0
    if window is not None:
        vis &= diff < window
        if not causal:
            vis &= -diff < window
    if segment_ids is not None:
        qs, ks = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        vis &= np.asarray(qs)[:, :, None] == np.asarray(ks)[:, None, :]
    return vis


def np_attention(q, k, v, vis, scale, dout=None):
    """float64 attention; returns ``out, lse`` and, given ``dout``, ``(dq, dk, dv)``."""
    h, hkv = q.shape[2], k.shape[2]
    g = h // hkv
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)   # head h reads h // g
    sc = np.einsum("bthd,bshd->bhts", q, kk) * scale
    vis4 = vis[:, None]
    sc = np.where(vis4, sc, -np.inf)
    m = sc.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(vis4, np.exp(sc - m), 0.0)
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)
    out = np.einsum("bhts,bshd->bthd", p, vv)
    lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + m[..., 0], -np.inf)
    if dout is None:
        return out, lse
    # dP = dO V^T; dS = P * (dP - rowsum(P * dP)); dQ = scale dS K; dK = scale dS^T Q; dV = P^T dO.
    dp = np.einsum("bthd,bshd->bhts", dout, vv)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq = np.einsum("bhts,bshd->bthd", ds, kk) * scale
    b, s = k.shape[:2]
    dk = (np.einsum("bhts,bthd->bshd", ds, q) * scale).reshape(b, s, hkv, g, -1).sum(3)
    dv = np.einsum("bhts,bthd->bshd", p, dout).reshape(b, s, hkv, g, -1).sum(3)
    return out, lse, (dq, dk, dv)


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def make_case(seed, b, t, s, h, hkv, d, dv=None, dtype=F32, *, causal=False, window=None,
              segments=None, positions=False):
    """Random (never zero) inputs, the kernel kwargs and the float64 inputs they encode.

    segments: None, "packed" (T == S, one id array of contiguous runs) or "pair"
    (independent random q / kv ids).  positions: explicit positions for a KV
    cache with ~20% empty slots at INT32_MAX and queries at random sorted
    positions.
    """
    rng = np.random.default_rng(seed)
    dv = dv or d
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, hkv, dv)), dtype)
    kw = {"causal": causal, "window": window}
    if segments == "packed":
        assert t == s
        kw["segment_ids"] = np.cumsum(rng.random((b, t)) < 0.08, axis=1).astype(np.int32)
    elif segments == "pair":
        kw["segment_ids"] = (rng.integers(0, 3, (b, t)).astype(np.int32),
                             rng.integers(0, 3, (b, s)).astype(np.int32))
    if positions:
        kp = np.arange(s)[None].repeat(b, 0).astype(np.int64)
        kp[rng.random((b, s)) < 0.2] = INT32_MAX
        kw["kv_positions"] = kp.astype(np.int32)
        kw["q_positions"] = np.sort(rng.integers(0, s + 4, (b, t)), axis=1).astype(np.int32)
    vis = np_visible(b, t, s, **kw)
    jkw = {key: (tuple(jnp.asarray(x) for x in val) if isinstance(val, tuple)
                 else jnp.asarray(val) if isinstance(val, np.ndarray) else val)
           for key, val in kw.items()}
    return (q, k, v), jkw, (f64(q), f64(k), f64(v)), vis


def assert_close(x, ref64, tol, what=""):
    # Inputs and cotangents are O(1) normals, so outputs and gradients are
    # O(1): errors are measured against max(|ref|, 1) (an exactly-zero
    # reference, e.g. dq with a single visible key, still has O(1) terms).
    x = f64(x)
    scale = max(float(np.abs(ref64).max()), 1.0)
    np.testing.assert_allclose(x, ref64, rtol=tol, atol=tol * scale, err_msg=what)


def assert_lse(lse, ref64, tol):
    lse = np.asarray(lse, np.float64)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref64))
    fin = np.isfinite(ref64)
    np.testing.assert_allclose(lse[fin], ref64[fin], rtol=tol, atol=tol * 4)


@functools.lru_cache(maxsize=None)
def fwd_fn(backend="interpret", block_sizes=SMALL, interpret=None, **static):
    """A jitted ``(q, k, v, **arrays) -> (out, lse)`` for one static configuration."""
    def f(q, k, v, arrays):
        return fa.flash_attention_with_lse(q, k, v, **static, **arrays, block_sizes=block_sizes,
                                           backend=backend, interpret=interpret)
    return jax.jit(f, compiler_options=O0)


@functools.lru_cache(maxsize=None)
def vjp_fn(backend="interpret", block_sizes=SMALL, interpret=None, **static):
    """A jitted ``(q, k, v, cot, arrays) -> (out, (dq, dk, dv))``."""
    def f(q, k, v, cot, arrays):
        out, pull = jax.vjp(lambda q, k, v: fa.flash_attention(
            q, k, v, **static, **arrays, block_sizes=block_sizes, backend=backend,
            interpret=interpret), q, k, v)
        return out, pull(cot)
    return jax.jit(f, compiler_options=O0)


def split_kw(jkw):
    """Static (hashable) kwargs vs array kwargs."""
    static = {k: v for k, v in jkw.items() if k in ("causal", "window")}
    arrays = {k: v for k, v in jkw.items() if k not in static}
    return static, arrays


def check_forward(case_args, dtype, backend="interpret", block_sizes=SMALL, interpret=None):
    (q, k, v), jkw, (q64, k64, v64), vis = case_args
    static, arrays = split_kw(jkw)
    out, lse = fwd_fn(backend, block_sizes, interpret, **static)(q, k, v, arrays)
    out64, lse64 = np_attention(q64, k64, v64, vis, 1.0 / np.sqrt(q.shape[-1]))
    chex.assert_shape(out, q.shape[:3] + v.shape[3:])
    chex.assert_type(out, dtype)
    chex.assert_shape(lse, (q.shape[0], q.shape[2], q.shape[1]))
    chex.assert_type(lse, jnp.float32)
    assert_close(out, out64, TOL[dtype], "out")
    assert_lse(lse, lse64, TOL[dtype])
    return out64, lse64


def check_grads(case_args, dtype, seed=0, backend="interpret", block_sizes=SMALL, interpret=None):
    (q, k, v), jkw, (q64, k64, v64), vis = case_args
    static, arrays = split_kw(jkw)
    cot = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape[:3] + v.shape[3:]), dtype)
    out, grads = vjp_fn(backend, block_sizes, interpret, **static)(q, k, v, cot, arrays)
    out64, _, grads64 = np_attention(q64, k64, v64, vis, 1.0 / np.sqrt(q.shape[-1]), f64(cot))
    assert_close(out, out64, TOL[dtype], "out")
    for name, g, g64, x in zip(("dq", "dk", "dv"), grads, grads64, (q, k, v)):
        chex.assert_type(g, dtype)
        chex.assert_shape(g, x.shape)
        assert np.isfinite(f64(g)).all(), name
        assert_close(g, g64, TOL[dtype], name)
    return grads, grads64


# ------------------------------------------------------- reference cross-check
@pytest.mark.parametrize("kw", [
    dict(causal=True), dict(window=9), dict(causal=True, window=5, segments="packed"),
    dict(causal=True, positions=True), dict(segments="pair")])
def test_attention_reference_matches_numpy(kw):
    t = s = 24
    (q, k, v), jkw, (q64, k64, v64), vis = make_case(1, 2, t, s, 4, 2, 16, **kw)
    static, arrays = split_kw(jkw)
    ref = jax.jit(functools.partial(attention_reference, return_lse=True, **static))
    out, lse = ref(q, k, v, **arrays)
    out64, lse64 = np_attention(q64, k64, v64, vis, 0.25)
    assert_close(out, out64, 1e-5)
    assert_lse(lse, lse64, 1e-5)


# ----------------------------------------------------------------- forward
# (name, B, T, S, H, Hkv, D, Dv, dtype, mask kwargs); the seed derives from the
# name.  SMALL blocks make
# every case multi-block; ragged T / S (100, 77, 33, 129, ...) hit the edges.
FWD_CASES = [
    ("mha-causal", 2, 128, 128, 2, 2, 64, None, F32, dict(causal=True)),
    ("gqa-full", 2, 64, 96, 4, 2, 64, None, BF16, dict()),
    ("mqa-causal-decode", 2, 7, 150, 4, 1, 64, None, F32, dict(causal=True)),
    ("causal-t-gt-s", 1, 129, 33, 2, 1, 64, 32, F32, dict(causal=True)),
    ("window-causal", 1, 160, 160, 2, 1, 64, None, BF16, dict(causal=True, window=40)),
    ("window-bidir-offgrid", 1, 100, 77, 2, 2, 64, None, F32, dict(window=24)),
    ("packed-segments", 2, 128, 128, 4, 2, 64, None, BF16, dict(causal=True, segments="packed")),
    ("segment-pair-offgrid", 2, 33, 129, 2, 1, 64, None, F32, dict(segments="pair")),
    ("kv-cache-positions", 2, 16, 200, 4, 2, 64, None, F32, dict(causal=True, positions=True)),
    ("positions-window", 1, 100, 77, 4, 4, 64, None, BF16,
     dict(causal=True, window=30, positions=True)),
]


@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_forward_matches_float64(case):
    name, b, t, s, h, hkv, d, dv, dtype, kw = case
    check_forward(make_case(sum(map(ord, name)), b, t, s, h, hkv, d, dv, dtype, **kw), dtype)


@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_head_dims(d):
    # 80 and 96 are zero-padded to 128 for Triton and sliced back.
    check_forward(make_case(d, 1, 40, 56, 2, 1, d, causal=True), F32)


# ---------------------------------------------------------------- gradients
# (name, B, T, S, H, Hkv, D, dtype, mask kwargs): vs the numpy float64 derivation.
GRAD_CASES = [
    ("gqa-causal-t-gt-s", 1, 100, 77, 4, 2, 64, F32, dict(causal=True)),
    ("window-packed-d80", 1, 96, 96, 2, 1, 80, F32, dict(causal=True, window=20, segments="packed")),
    ("cache-positions-d96", 2, 16, 130, 2, 2, 96, BF16, dict(causal=True, positions=True)),
    ("mqa-full-offgrid", 2, 33, 129, 4, 1, 64, BF16, dict()),
    ("window-bidir-d128", 1, 64, 100, 2, 2, 128, F32, dict(window=30, segments="pair")),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_float64(case):
    name, b, t, s, h, hkv, d, dtype, kw = case
    check_grads(make_case(len(name), b, t, s, h, hkv, d, None, dtype, **kw), dtype)


def test_fully_masked_rows_give_zero_and_finite_grads():
    # q segment 7 appears in no kv segment, and causal with T > S leaves the
    # first T - S queries without keys: output 0, lse -inf, zero gradient.
    case = make_case(5, 2, 48, 40, 2, 1, 64, causal=True, segments="pair")
    (q, k, v), jkw, _, vis = case
    qs, ks = jkw["segment_ids"]
    qs = qs.at[:, 20:24].set(7)
    jkw["segment_ids"] = (qs, ks)
    vis = np_visible(2, 48, 40, causal=True, segment_ids=(np.asarray(qs), np.asarray(ks)))
    case = ((q, k, v), jkw, case[2], vis)
    dead = ~vis.any(-1)                                           # [B, T]
    assert dead[:, :8].all() and dead[:, 20:24].all()
    check_forward(case, F32)
    (dq, _, _), _ = check_grads(case, F32)
    out, lse = fwd_fn(**split_kw(jkw)[0])(q, k, v, split_kw(jkw)[1])
    np.testing.assert_array_equal(np.asarray(out)[dead], 0.0)
    assert np.isneginf(np.asarray(lse).transpose(0, 2, 1)[dead]).all()
    np.testing.assert_array_equal(np.asarray(dq)[dead], 0.0)
    # The XLA reference agrees and is NaN-free under jax.grad too.
    g_ref = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fa.flash_attention(
        q, k, v, **jkw, backend="xla")), argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in g_ref)


# ---------------------------------------------------------------- properties
# No shrinking: every example compiles a kernel, and shrinking a failure can
# take minutes; the printed draws reproduce it.
@settings(max_examples=10, deadline=None,
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data())
def test_property_random_shapes_masks_and_blocks(data):
    t = data.draw(st.integers(1, 80), label="T")
    s = data.draw(st.integers(1, 80), label="S")
    h, hkv = data.draw(st.sampled_from([(1, 1), (2, 1), (2, 2), (3, 1), (4, 2)]), label="H/Hkv")
    causal = data.draw(st.booleans(), label="causal")
    window = data.draw(st.one_of(st.none(), st.integers(1, s)), label="window")
    segments = data.draw(st.sampled_from([None, "pair"] + (["packed"] if t == s else [])),
                         label="segments")
    positions = data.draw(st.booleans(), label="positions") and (causal or window is not None)
    blocks = [data.draw(st.sampled_from([16, 32, 64]), label=f"block{i}") for i in range(6)]
    seed = data.draw(st.integers(0, 2**16), label="seed")
    bs = fa.BlockSizes(*blocks)
    case = make_case(seed, 1, t, s, h, hkv, 16, None, F32, causal=causal, window=window,
                     segments=segments, positions=positions)
    check_forward(case, F32, block_sizes=bs)
    check_grads(case, F32, seed=seed, block_sizes=bs)


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 300), s=st.integers(1, 300), bq=st.sampled_from([16, 32, 128]),
       bk=st.sampled_from([16, 64, 128]), causal=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 300)), segments=st.booleans(),
       which=st.sampled_from(["kv", "q"]), block=st.integers(0, 50))
def test_block_ranges_are_sound_and_tight(t, s, bq, bk, causal, window, segments, which, block):
    """The loop bounds of every kernel (and the Mosaic index-map clamp), default positions.

    Sound: a skipped block holds no visible (in-bounds) pair, and a block run
    without a mask is fully visible and in bounds.  Tight: for a block that is
    not ragged, the range is exactly the blocks holding a visible pair.
    """
    window = None if window is None else min(window, s)
    ms = fa._MaskSpec(t=t, s=s, causal=causal, window=window, q_pos=False, kv_pos=False,
                      segments=segments)
    vis = np_visible(1, t, s, causal=causal, window=window)[0]
    nq, nkv = -(-t // bq), -(-s // bk)
    if which == "kv":       # forward / dQ: the KV blocks of query block i
        i = block % nq
        bounds = fa._kv_blocks(ms, jnp.int32(i * bq), bq, bk, nkv)
        tiles = [vis[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] for j in range(nkv)]
        # Rows past T are dropped by these kernels; keys past S must be masked.
        full = [x.all() and x.shape[1] == bk for x in tiles]
        complete = (i + 1) * bq <= t
    else:                   # dK/dV: the query blocks of KV block j
        j = block % nkv
        bounds = fa._q_blocks(ms, jnp.int32(j * bk), bk, bq, nq)
        tiles = [vis[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] for i in range(nq)]
        full = [x.all() and x.shape == (bq, bk) for x in tiles]
        complete = (j + 1) * bk <= s
    lo, a, b, hi = (int(x) for x in bounds)
    n = len(tiles)
    assert 0 <= lo <= a <= b <= hi <= n
    for blk, x in enumerate(tiles):
        if not lo <= blk < hi:
            assert not x.any(), ("skipped a visible block", blk, (lo, a, b, hi))
        if a <= blk < b:
            assert full[blk] and not segments, ("unmasked a partial block", blk, (lo, a, b, hi))
    if complete:
        live = [blk for blk, x in enumerate(tiles) if x.any()]
        assert (lo, hi) == ((live[0], live[-1] + 1) if live else (hi, hi)), (live, lo, hi)


# ------------------------------------------------------- TPU interpret mode
def test_tpu_interpret_causal_window_segments_ragged():
    # Grid (1, 2, 2, 2) forward: T = 200 and S = 160 leave ragged edge blocks,
    # causal with T > S leaves 40 dead rows, window and segment ids mask by value.
    bs = fa.BlockSizes(128, 128)
    case = make_case(11, 1, 200, 160, 2, 1, 64, causal=True, window=100, segments="pair")
    check_forward(case, F32, backend="mosaic_tpu", block_sizes=bs, interpret=True)
    check_grads(case, F32, backend="mosaic_tpu", block_sizes=bs, interpret=True)


def test_tpu_interpret_causal_full_and_skipped_blocks():
    # Default positions, T = S = 256 with 128-blocks: block (1, 0) runs the
    # unmasked step, the diagonal the masked one, and (0, 1) is skipped (its
    # index map is clamped).  (Ragged edges: the test above.)
    bs = fa.BlockSizes(128, 128)
    case = make_case(17, 1, 256, 256, 1, 1, 64, causal=True)
    check_forward(case, F32, backend="mosaic_tpu", block_sizes=bs, interpret=True)
    check_grads(case, F32, backend="mosaic_tpu", block_sizes=bs, interpret=True)


def test_tpu_interpret_mode_context_positions_bf16():
    (q, k, v), jkw, (q64, k64, v64), vis = make_case(12, 2, 24, 40, 2, 2, 64, dtype=BF16,
                                                      causal=True, positions=True)
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, **jkw, backend="mosaic_tpu"),
                      compiler_options=O0)(q, k, v)
    assert_close(out, np_attention(q64, k64, v64, vis, 1 / 8)[0], TOL[BF16])


# ----------------------------------------------------------------- lowering
def _abstract(b, t, s, h, hkv, d, dtype, with_masks):
    sds = jax.ShapeDtypeStruct
    args = [sds((b, t, h, d), dtype), sds((b, s, hkv, d), dtype), sds((b, s, hkv, d), dtype)]
    if with_masks:
        args += [sds((b, t), jnp.int32), sds((b, s), jnp.int32)] * 2
    return args


@pytest.mark.parametrize("backend,platform,marker", [
    ("triton", "cuda", "xla.gpu.triton"), ("mosaic_tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("shape,dtype,with_masks,static", [
    ((2, 1024, 1024, 8, 2, 80), BF16, False, dict(causal=True)),
    ((2, 300, 200, 4, 4, 128), F32, True, dict(causal=True, window=64)),
], ids=["causal-gqa-bf16-d80", "masks-ragged-f32"])
def test_kernels_lower_for_gpu_and_tpu(backend, platform, marker, shape, dtype, with_masks, static):
    # Cross-platform lowering from this host: Pallas emits Triton IR / Mosaic
    # MLIR for all three kernels (final PTX / TPU compilation needs a device).
    args = _abstract(*shape, dtype, with_masks)

    def fwd(q, k, v, *m):
        extra = dict(segment_ids=(m[0], m[1]), q_positions=m[2], kv_positions=m[3]) if m else {}
        return fa.flash_attention(q, k, v, **static, **extra, backend=backend)

    def grad(q, k, v, *m):
        loss = lambda q, k, v: jnp.sum(fwd(q, k, v, *m).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for fn, n_kernels in ((fwd, 1), (grad, 3)):   # forward; forward + dK/dV + dQ
        exp = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
        assert exp.mlir_module().count(marker) >= n_kernels


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton backend)")
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_triton_on_gpu(dtype):
    bs = fa.BlockSizes()                                # the real default tiles
    case = make_case(13, 2, 300, 260, 8, 2, 80, None, dtype, causal=True, window=200,
                     segments="pair")
    check_forward(case, dtype, backend="triton", block_sizes=bs)
    check_grads(case, dtype, backend="triton", block_sizes=bs)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic backend)")
def test_mosaic_on_tpu():
    case = make_case(14, 2, 640, 520, 4, 2, 128, None, BF16, causal=True, segments="pair")
    check_forward(case, BF16, backend="mosaic_tpu", block_sizes=None)
    check_grads(case, BF16, backend="mosaic_tpu", block_sizes=None)


# ---------------------------------------------------------------- misc API
def test_backends_agree_and_auto_is_xla_on_cpu():
    (q, k, v), jkw, _, _ = make_case(15, 1, 40, 40, 2, 1, 64, causal=True)
    a = fwd_fn("interpret", SMALL, None, causal=True)(q, k, v, {})
    b = fwd_fn("triton", SMALL, True, causal=True)(q, k, v, {})     # same kernels, same plan
    chex.assert_trees_all_equal(a, b)
    if jax.default_backend() == "cpu":
        auto = jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, causal=True))
        ref = jax.jit(lambda q, k, v: attention_reference(q, k, v, causal=True))
        chex.assert_trees_all_equal(auto(q, k, v), ref(q, k, v))
    out, lse = fwd_fn("xla", None, None, causal=True)(q, k, v, {})
    chex.assert_trees_all_close((out, lse), a, rtol=1e-5, atol=1e-5)


def test_scale_argument_and_default_blocks():
    (q, k, v), _, (q64, k64, v64), vis = make_case(16, 1, 20, 20, 1, 1, 64)
    out = fwd_fn("interpret", None, None)(q, k, v, {})[0]          # default BlockSizes
    assert_close(out, np_attention(q64, k64, v64, vis, 1 / 8)[0], TOL[F32])
    out = fwd_fn("interpret", None, None, scale=0.3)(q, k, v, {})[0]
    assert_close(out, np_attention(q64, k64, v64, vis, 0.3)[0], TOL[F32])
    assert fa.BlockSizes.get_default(backend="triton", head_dim=256).block_q <= 64
    assert fa.BlockSizes.get_default(backend="mosaic_tpu").block_kv % 128 == 0
    assert fa.BlockSizes(64, 32).resolved()["block_kv_dq"] == 32


# ------------------------------------------------------------------ errors
def _with_x64(fn):
    enable = getattr(jax, "enable_x64", None)
    if enable is None:                          # older JAX
        from jax.experimental import enable_x64 as enable
    with enable(True):
        return fn()


Q, K, V = (jnp.ones((1, 256, 4, 64)), jnp.ones((1, 256, 2, 64)), jnp.ones((1, 256, 2, 64)))

ERRORS = [
    ("heads-divide", lambda: fa.flash_attention(jnp.ones((1, 8, 3, 16)), K[:, :8, :, :16],
                                                V[:, :8, :, :16], backend="interpret"),
     ValueError, r"H=3 must be a multiple of KV heads Hkv=2"),
    ("dtype-mismatch", lambda: fa.flash_attention(Q, K.astype(BF16), V, backend="interpret"),
     TypeError, r"dtypes differ"),
    ("float64", lambda: _with_x64(lambda: fa.flash_attention(
        *[jnp.ones((1, 4, 1, 16), jnp.float64)] * 3, backend="interpret")),
     TypeError, r"float64 inputs are not supported by backend='interpret'"),
    ("window-too-big", lambda: fa.flash_attention(Q, K, V, window=300, backend="interpret"),
     ValueError, r"window=300 is larger than the key sequence S=256"),
    ("block-pow2", lambda: fa.flash_attention(Q, K, V, backend="interpret",
                                              block_sizes=fa.BlockSizes(block_q=48)),
     ValueError, r"block_q=48 must be a power of two >= 16 .* block_q=64"),
    ("block-min16", lambda: fa.flash_attention(Q, K, V, backend="interpret",
                                               block_sizes=fa.BlockSizes(block_kv_dq=8)),
     ValueError, r"block_kv_dq=8 must be a power of two >= 16"),
    ("mosaic-block", lambda: fa.flash_attention(Q, K, V, backend="mosaic_tpu", interpret=True,
                                                block_sizes=fa.BlockSizes(block_q=64)),
     ValueError, r"block_q=64 must be a multiple of 128 on mosaic_tpu .*\(T=256\)"),
    ("block-positive", lambda: fa.BlockSizes(block_q_dkv=0), ValueError,
     r"BlockSizes.block_q_dkv=0 must be a positive int"),
    ("block-type", lambda: fa.flash_attention(Q, K, V, block_sizes=(64, 64)), TypeError,
     r"block_sizes must be a BlockSizes"),
    ("backend", lambda: fa.flash_attention(Q, K, V, backend="cuda"), ValueError,
     r"backend='cuda' is not one of"),
    ("segments-single-t-ne-s", lambda: fa.flash_attention(
        Q[:, :8], K, V, segment_ids=jnp.zeros((1, 8), jnp.int32), backend="interpret"),
     ValueError, r"single segment_ids array needs T == S"),
    ("positions-shape", lambda: fa.flash_attention(
        Q, K, V, causal=True, kv_positions=jnp.zeros((1, 8), jnp.int32), backend="interpret"),
     ValueError, r"kv_positions shape \(1, 8\) must be \(1, 256\)"),
    ("traced-scale", lambda: jax.jit(lambda s: fa.flash_attention(Q, K, V, scale=s,
                                                                  backend="interpret"))(0.1),
     TypeError, r"scale=.* must be a Python float"),
    ("rank", lambda: fa.flash_attention(Q[0], K, V), ValueError,
     r"q must be \[batch, seq, heads, head_dim\]"),
]


@pytest.mark.parametrize("call,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
