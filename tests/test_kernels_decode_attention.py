"""Split-K decode attention and PagedAttention (``memlab_kernels.decode_attention``).

Every kernel result is checked against an independent float64 numpy softmax
written here (it slices each sequence's live keys, so nothing past
``lengths[b]`` can influence it), not against the module's own reference
alone.  The Pallas kernels run in the HLO interpreter (``backend="interpret"``,
the Triton kernel body) and, for two tiny cases, in TPU interpret mode (the
Mosaic kernel body).  Both kernels are also lowered for CUDA / TPU from this
CPU via ``jax.export``.
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
from memlab_kernels import decode_attention as da

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 2e-5, BF16: 2e-2}


# ---------------------------------------------------------------- numpy side
def np_decode(q, k, v, lengths, scale=None):
    """float64 decode attention: (out [B, H, Dv], lse [B, H]); empty rows give (0, -inf)."""
    q, k, v = (np.asarray(jnp.asarray(a).astype(F32), np.float64) for a in (q, k, v))
    b, h, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g = h // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b, h, dv))
    lse = np.full((b, h), -np.inf)
    for i in range(b):
        n = int(lengths[i])
        if n == 0:
            continue
        for j in range(h):
            s = scale * (k[i, :n, j // g] @ q[i, j])          # [n]
            mx = s.max()
            p = np.exp(s - mx)
            out[i, j] = p @ v[i, :n, j // g] / p.sum()
            lse[i, j] = mx + np.log(p.sum())
    return out, lse


def np_gather(pages, block_tables):
    """[Hkv, NP, ps, D] + [B, P] -> [B, P*ps, Hkv, D] (own gather, not the module's)."""
    pages = np.asarray(pages)
    hkv, _, ps, d = pages.shape
    b, p = block_tables.shape
    out = np.empty((b, p * ps, hkv, d), pages.dtype)
    for i in range(b):
        for j in range(p):
            out[i, j * ps:(j + 1) * ps] = pages[:, block_tables[i, j]].transpose(1, 0, 2)
    return out


def rand(rng, shape, dtype):
    """Standard normal values pushed away from zero (never exactly 0)."""
    x = rng.standard_normal(shape)
    x = np.where(np.abs(x) < 1e-3, 1e-3, x)
    return jnp.asarray(x, dtype)


def make_case(b, h, hkv, d, s, dtype, seed, dv=None):
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    return (rand(rng, (b, h, d), dtype), rand(rng, (b, s, hkv, d), dtype),
            rand(rng, (b, s, hkv, dv), dtype))


def make_paged_case(b, h, hkv, d, ps, max_pages, num_pages, lengths, dtype, seed, garbage=np.nan):
    """Random pool; a shuffled block table; dead pages, dead slots and dead table entries garbage.

    Returns (q, k_pages, v_pages, lengths, block_tables, k_clean, v_clean) where
    the *_clean contiguous caches hold the same live keys and zeros elsewhere.
    """
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    need = -(-lengths // ps)
    assert need.sum() <= num_pages
    q = rand(rng, (b, h, d), dtype)
    kp = np.full((hkv, num_pages, ps, d), garbage, np.float32)
    vp = np.full((hkv, num_pages, ps, d), garbage, np.float32)
    perm = rng.permutation(num_pages)
    bt = rng.integers(num_pages, 10 * num_pages, (b, max_pages)).astype(np.int32)  # invalid ids
    k_clean = np.zeros((b, max_pages * ps, hkv, d), np.float32)
    v_clean = np.zeros_like(k_clean)
    used = 0
    for i in range(b):
        for j in range(need[i]):
            page = perm[used]
            used += 1
            bt[i, j] = page
            n = min(ps, lengths[i] - j * ps)          # live slots of this page
            kk = np.asarray(rand(rng, (hkv, n, d), dtype).astype(F32))
            vv = np.asarray(rand(rng, (hkv, n, d), dtype).astype(F32))
            kp[:, page, :n], vp[:, page, :n] = kk, vv
            k_clean[i, j * ps:j * ps + n] = kk.transpose(1, 0, 2)
            v_clean[i, j * ps:j * ps + n] = vv.transpose(1, 0, 2)
    return (q, jnp.asarray(kp, dtype), jnp.asarray(vp, dtype), jnp.asarray(lengths),
            jnp.asarray(bt), k_clean, v_clean)


def assert_close(y, ref64, dtype, what="out"):
    tol = TOL[dtype]
    y = np.asarray(jnp.asarray(y).astype(F32), np.float64)
    assert np.isfinite(y).all(), f"{what} has non-finite values"
    scale = max(np.abs(ref64).max(), 1e-3)
    np.testing.assert_allclose(y, ref64, rtol=tol, atol=tol * scale, err_msg=what)


def assert_lse_close(lse, lse64, tol=2e-5):
    lse = np.asarray(lse, np.float64)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse64))
    fin = np.isfinite(lse64)
    np.testing.assert_allclose(lse[fin], lse64[fin], rtol=tol, atol=tol)


# ------------------------------------------------------------ contiguous
# (B, H, Hkv, D, Dv, S, lengths, dtype, block_k, num_splits): GQA / MQA / MHA,
# D in {64, 80, 128}; every case has lengths 1 and S and one off the block grid.
CASES = [
    (3, 8, 2, 64, 64, 100, (1, 100, 37), F32, 16, 3),
    (3, 8, 2, 80, 80, 64, (64, 1, 33), BF16, 16, 2),
    (2, 4, 1, 80, 64, 70, (70, 1), F32, 32, None),          # MQA, Dv != D
    (3, 4, 4, 128, 128, 50, (1, 50, 17), F32, 64, 1),       # MHA, one block
    (2, 8, 2, 128, 128, 200, (200, 1), BF16, 32, 4),
]


def _case_id(c):
    b, h, hkv, d, dv, s, _lens, dtype, bk, ns = c
    return f"B{b}-H{h}-Hkv{hkv}-D{d}-Dv{dv}-S{s}-{jnp.dtype(dtype).name}-bk{bk}-ns{ns}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_matches_float64(case):
    b, h, hkv, d, dv, s, lens, dtype, bk, ns = case
    q, k, v = make_case(b, h, hkv, d, s, dtype, seed=s + d + h, dv=dv)
    lengths = jnp.asarray(lens, jnp.int32)
    out64, lse64 = np_decode(q, k, v, lens)
    bs = da.BlockSizes(block_k=bk, num_splits=ns)
    out, lse = da.decode_attention_with_lse(q, k, v, lengths, block_sizes=bs, backend="interpret")
    out_x, lse_x = da.decode_attention_with_lse(q, k, v, lengths, backend="xla")
    for o, lse_ in ((out, lse), (out_x, lse_x)):
        chex.assert_shape(o, (b, h, dv))
        chex.assert_type(o, dtype)
        chex.assert_type(lse_, F32)
        assert_close(o, out64, dtype)
        assert_lse_close(lse_, lse64)
    chex.assert_trees_all_equal(da.decode_attention(q, k, v, lengths, block_sizes=bs,
                                                    backend="interpret"), out)


def test_num_splits_and_block_sizes_agree():
    # GQA, S=300 off every block grid; 1..19 blocks per split, splits clipped to the blocks.
    q, k, v = make_case(2, 8, 2, 64, 300, F32, seed=1)
    lens = (300, 129)
    out64, lse64 = np_decode(q, k, v, lens)
    lengths = jnp.asarray(lens, jnp.int32)
    for bk, ns in ((16, 1), (32, 7), (64, 100)):
        out, lse = da.decode_attention_with_lse(
            q, k, v, lengths, block_sizes=da.BlockSizes(block_k=bk, num_splits=ns),
            backend="interpret")
        assert_close(out, out64, F32, f"bk={bk} ns={ns}")
        assert_lse_close(lse, lse64)


def test_zero_length_rows_give_zeros_and_neg_inf_lse():
    q, k, v = make_case(3, 4, 2, 64, 40, F32, seed=2)
    lengths = jnp.asarray([0, 40, 0], jnp.int32)
    out64, _ = np_decode(q, k, v, lengths)
    for backend in ("interpret", "xla"):
        out, lse = da.decode_attention_with_lse(
            q, k, v, lengths, backend=backend, block_sizes=da.BlockSizes(16, 3))
        assert np.isfinite(np.asarray(out)).all()
        chex.assert_trees_all_equal(out[0], jnp.zeros_like(out[0]))
        chex.assert_trees_all_equal(out[2], jnp.zeros_like(out[2]))
        assert np.isneginf(np.asarray(lse)[[0, 2]]).all() and np.isfinite(np.asarray(lse)[1]).all()
        assert_close(out, out64, F32)


def test_jit_traced_lengths_scale_and_auto_backend():
    q, k, v = make_case(2, 4, 2, 64, 48, F32, seed=3)
    lengths = jnp.asarray([48, 5], jnp.int32)
    f = jax.jit(lambda q, k, v, n: da.decode_attention(q, k, v, n, scale=0.3, backend="interpret",
                                                       block_sizes=da.BlockSizes(16, 2)))
    assert_close(f(q, k, v, lengths), np_decode(q, k, v, lengths, scale=0.3)[0], F32)
    # Traced lengths cannot be validated: out-of-range values are clamped to [0, S].
    out = f(q, k, v, jnp.asarray([1000, -3], jnp.int32))
    ref = np_decode(q, k, v, [48, 0], scale=0.3)[0]
    assert_close(out, ref, F32)
    if jax.default_backend() == "cpu":   # "auto" is the XLA reference on CPU.
        chex.assert_trees_all_equal(da.decode_attention(q, k, v, lengths),
                                    da.decode_attention_reference(q, k, v, lengths))


def test_merge_attention_combines_disjoint_key_sets():
    # A cache part (keys < 32) and a "recent window" part (keys 32..63) merged
    # by their lse equal attention over everything.
    q, k, v = make_case(3, 8, 2, 64, 64, F32, seed=4)
    lens = np.array([64, 20, 45])
    split = 32
    main = da.decode_attention_with_lse(q, k[:, :split], v[:, :split],
                                        jnp.asarray(np.minimum(lens, split), jnp.int32),
                                        backend="interpret", block_sizes=da.BlockSizes(16, 2))
    win = da.decode_attention_with_lse(q, k[:, split:], v[:, split:],
                                       jnp.asarray(np.maximum(lens - split, 0), jnp.int32),
                                       backend="interpret", block_sizes=da.BlockSizes(16, 2))
    out, lse = da.merge_attention([main[0], win[0]], [main[1], win[1]])
    out64, lse64 = np_decode(q, k, v, lens)
    assert_close(out, out64, F32)
    assert_lse_close(lse, lse64)
    # Both parts empty: zeros and -inf, no NaN.
    empty = jnp.full((3, 8), -jnp.inf)
    o, l2 = da.merge_attention([main[0], win[0]], [empty, empty])
    chex.assert_trees_all_equal(o, jnp.zeros_like(o))
    assert np.isneginf(np.asarray(l2)).all()


# ------------------------------------------------------------------ paged
# (B, H, Hkv, D, page_size, max_pages, num_pages, lengths, dtype, ppb, ns)
PAGED = [
    (3, 8, 2, 64, 8, 6, 20, (1, 48, 21), F32, 2, 2),
    (2, 4, 1, 80, 16, 4, 9, (64, 17), BF16, 1, 3),             # MQA, D=80
]


@pytest.mark.parametrize("case", PAGED, ids=lambda c: f"ps{c[4]}-P{c[5]}-Hkv{c[2]}-D{c[3]}")
def test_paged_matches_float64_and_contiguous_exactly(case):
    b, h, hkv, d, ps, mp, npg, lens, dtype, ppb, ns = case
    q, kp, vp, lengths, bt, k_clean, v_clean = make_paged_case(
        b, h, hkv, d, ps, mp, npg, lens, dtype, seed=ps + mp + d)
    out64, lse64 = np_decode(q, k_clean, v_clean, lens)
    out, lse = da.paged_decode_attention_with_lse(q, kp, vp, lengths, bt, pages_per_block=ppb,
                                                  num_splits=ns, backend="interpret")
    chex.assert_shape(out, (b, h, d))
    chex.assert_type(out, dtype)
    assert_close(out, out64, dtype)           # NaN in dead pages/slots/entries never leaks
    assert_lse_close(lse, lse64)
    # Same pages gathered into a contiguous cache, same effective block size.
    k = da.gather_pages(kp, bt)
    v = da.gather_pages(vp, bt)
    np.testing.assert_array_equal(np.asarray(k.astype(F32))[:, :max(lens)],
                                  np_gather(np.asarray(kp.astype(F32)),
                                            np.clip(np.asarray(bt), 0, npg - 1))[:, :max(lens)])
    out_c, lse_c = da.decode_attention_with_lse(
        q, k, v, lengths, block_sizes=da.BlockSizes(block_k=ppb * ps, num_splits=ns),
        backend="interpret")
    np.testing.assert_allclose(np.asarray(out.astype(F32)), np.asarray(out_c.astype(F32)),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_c), rtol=0, atol=1e-6)


def test_paged_mha_small_pages_equals_contiguous_and_reference():
    # MHA, page_size 4 with 4 pages per block = block_k 16, default splits;
    # garbage is finite here so that the XLA reference (which reads whole
    # gathered pages, masked by where) stays finite.
    b, h, hkv, d, ps, mp, npg, lens = 3, 4, 4, 128, 4, 10, 24, (20, 1, 40)
    q, kp, vp, lengths, bt, k_clean, v_clean = make_paged_case(
        b, h, hkv, d, ps, mp, npg, lens, F32, seed=5, garbage=1e4)
    out64, _ = np_decode(q, k_clean, v_clean, lens)
    out = da.paged_decode_attention(q, kp, vp, lengths, bt, pages_per_block=4,
                                    backend="interpret")
    out_c = da.decode_attention(q, da.gather_pages(kp, bt), da.gather_pages(vp, bt), lengths,
                                block_sizes=da.BlockSizes(16), backend="interpret")
    out_x = da.paged_decode_attention(q, kp, vp, lengths, bt, backend="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_c), rtol=0, atol=1e-6)
    for o in (out, out_x):
        assert_close(o, out64, F32)


def test_paged_zero_length_and_default_blocking():
    q, kp, vp, lengths, bt, k_clean, v_clean = make_paged_case(
        3, 8, 2, 64, 16, 8, 12, (0, 100, 0), F32, seed=6)
    out, lse = da.paged_decode_attention_with_lse(q, kp, vp, lengths, bt, backend="interpret")
    chex.assert_trees_all_equal(out[0], jnp.zeros_like(out[0]))
    chex.assert_trees_all_equal(out[2], jnp.zeros_like(out[2]))
    assert np.isneginf(np.asarray(lse)[[0, 2]]).all()
    assert_close(out, np_decode(q, k_clean, v_clean, (0, 100, 0))[0], F32)


# -------------------------------------------------------- property test
@settings(max_examples=4, deadline=None)
@given(b=st.integers(1, 3), hkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 2, 4]),
       s=st.integers(1, 80), bk=st.sampled_from([16, 32]), ns=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_property_random_shapes(b, hkv, g, s, bk, ns, seed):
    q, k, v = make_case(b, hkv * g, hkv, 64, s, F32, seed)
    lens = np.random.default_rng(seed).integers(0, s + 1, b)
    lens[0] = s
    out, lse = da.decode_attention_with_lse(q, k, v, jnp.asarray(lens, jnp.int32),
                                            block_sizes=da.BlockSizes(bk, ns), backend="interpret")
    out64, lse64 = np_decode(q, k, v, lens)
    assert_close(out, out64, F32)
    assert_lse_close(lse, lse64)


# ------------------------------------------------------- TPU interpret mode
def test_tpu_interpret_contiguous_both_layouts():
    # D=128, Hkv=2: [B, S, Hkv*D] lane-block path; D=64, Hkv=2: head-major copy.
    # 2 splits x 2 blocks of 16 keys: ragged lengths, a dead split, an empty row.
    for d, lens in ((128, (0, 37)), (64, (64, 1))):
        q, k, v = make_case(2, 4, 2, d, 64, F32, seed=d)
        with pltpu.force_tpu_interpret_mode():
            out, lse = da.decode_attention_with_lse(
                q, k, v, jnp.asarray(lens, jnp.int32), backend="mosaic_tpu",
                block_sizes=da.BlockSizes(block_k=16, num_splits=2))
        out64, lse64 = np_decode(q, k, v, lens)
        assert_close(out, out64, F32, f"D={d}")
        assert_lse_close(lse, lse64)


def test_tpu_interpret_paged_scalar_prefetch():
    # Block table and lengths are scalar-prefetched; 2 pages of 8 per block.
    q, kp, vp, lengths, bt, k_clean, v_clean = make_paged_case(
        2, 4, 2, 128, 8, 5, 10, (33, 8), BF16, seed=7)
    out = da.paged_decode_attention(q, kp, vp, lengths, bt, pages_per_block=2, num_splits=2,
                                    backend="mosaic_tpu", interpret=True)
    assert_close(out, np_decode(q, k_clean, v_clean, (33, 8))[0], BF16)


# ----------------------------------------------------------------- lowering
def _abstract(paged, dtype=BF16, d=128):
    sds = jax.ShapeDtypeStruct
    b, h, hkv = 4, 32, 8
    q = sds((b, h, d), dtype)
    if paged:
        return (q, sds((hkv, 512, 16, d), dtype), sds((hkv, 512, 16, d), dtype),
                sds((b,), jnp.int32), sds((b, 128), jnp.int32))
    return q, sds((b, 2048, hkv, d), dtype), sds((b, 2048, hkv, d), dtype), sds((b,), jnp.int32)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic_tpu", "tpu")])
@pytest.mark.parametrize("dtype,d", [(BF16, 128), (F32, 80)], ids=["bf16-D128", "f32-D80"])
def test_kernels_lower_for_gpu_and_tpu(paged, backend, platform, dtype, d):
    # Cross-platform lowering from this host: Pallas emits Triton IR / Mosaic
    # MLIR for the real kernel (the final PTX / TPU compilation needs a device).
    fn = da.paged_decode_attention if paged else da.decode_attention
    f = jax.jit(lambda *a: fn(*a, backend=backend))
    exp = export.export(f, platforms=(platform,), disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*_abstract(paged, dtype, d))
    text = exp.mlir_module()
    assert ("xla.gpu.triton" if backend == "triton" else "tpu_custom_call") in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton backend)")
def test_triton_on_gpu():
    q, k, v = make_case(2, 8, 2, 128, 1000, BF16, seed=8)
    lens = (1000, 333)
    out = da.decode_attention(q, k, v, jnp.asarray(lens, jnp.int32), backend="triton")
    assert_close(out, np_decode(q, k, v, lens)[0], BF16)
    q, kp, vp, lengths, bt, kc, vc = make_paged_case(2, 8, 2, 128, 16, 40, 90, (600, 33),
                                                     BF16, seed=9)
    out = da.paged_decode_attention(q, kp, vp, lengths, bt, backend="triton")
    assert_close(out, np_decode(q, kc, vc, (600, 33))[0], BF16)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic backend)")
def test_mosaic_on_tpu():
    q, k, v = make_case(2, 8, 2, 128, 1000, BF16, seed=10)
    lens = (1000, 333)
    out = da.decode_attention(q, k, v, jnp.asarray(lens, jnp.int32), backend="mosaic_tpu")
    assert_close(out, np_decode(q, k, v, lens)[0], BF16)
    q, kp, vp, lengths, bt, kc, vc = make_paged_case(2, 8, 2, 128, 16, 40, 90, (600, 33),
                                                     BF16, seed=11)
    out = da.paged_decode_attention(q, kp, vp, lengths, bt, backend="mosaic_tpu")
    assert_close(out, np_decode(q, kc, vc, (600, 33))[0], BF16)


# ------------------------------------------------------------------ errors
Q, K, V = make_case(2, 8, 2, 64, 32, F32, seed=12)
L = jnp.asarray([32, 5], jnp.int32)
QP, KP, VP, LP, BT, _, _ = make_paged_case(2, 8, 2, 64, 8, 4, 8, (32, 5), F32, seed=13)


def _dec(**kw):
    args = {"q": Q, "k": K, "v": V, "lengths": L}
    args.update(kw)
    backend = args.pop("backend", "interpret")
    return da.decode_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("lengths"),
                               backend=backend, **args)


def _paged(**kw):
    args = {"q": QP, "k_pages": KP, "v_pages": VP, "lengths": LP, "block_tables": BT}
    args.update(kw)
    backend = args.pop("backend", "interpret")
    return da.paged_decode_attention(args.pop("q"), args.pop("k_pages"), args.pop("v_pages"),
                                     args.pop("lengths"), args.pop("block_tables"),
                                     backend=backend, **args)


ERRORS = [
    ("heads", lambda: _dec(q=jnp.ones((2, 9, 64))), ValueError,
     r"query heads H=9 must be a multiple of the KV heads Hkv=2 .*use Hkv in \[1, 3, 9\]"),
    ("dtype-mismatch", lambda: _dec(k=K.astype(BF16)), TypeError, r"dtypes differ .* cast them"),
    ("dtype-int", lambda: _dec(q=Q.astype(jnp.int32)), TypeError, r"q has dtype int32; use float32"),
    ("q-rank", lambda: _dec(q=Q[:, None]), ValueError, r"q must be \[batch, heads, head_dim\]"),
    ("head-dim", lambda: _dec(q=Q[..., :32]), ValueError, r"q head_dim 32 != k head_dim 64"),
    ("v-shape", lambda: _dec(v=V[:, :16]), ValueError, r"v shape .* must match k"),
    ("lengths-shape", lambda: _dec(lengths=L[None]), ValueError, r"lengths must have shape \[B\]=\(2,\)"),
    ("lengths-dtype", lambda: _dec(lengths=L.astype(F32)), TypeError, r"lengths must be an integer array"),
    ("lengths-range", lambda: _dec(lengths=jnp.asarray([33, 1], jnp.int32)), ValueError,
     r"lengths\[0\]=33 exceeds the cache length S"),
    ("lengths-negative", lambda: _dec(lengths=jnp.asarray([3, -1], jnp.int32)), ValueError,
     r"lengths must be >= 0"),
    ("block_k-pow2", lambda: _dec(block_sizes=da.BlockSizes(block_k=24)), ValueError,
     r"block_k=24 must be a power of two >= 16 .* block_k=32"),
    ("block_k-small", lambda: _dec(block_sizes=da.BlockSizes(block_k=8)), ValueError,
     r"block_k=8 must be a power of two >= 16 .* block_k=16"),
    ("block_k-mosaic", lambda: _dec(backend="mosaic_tpu", block_sizes=da.BlockSizes(block_k=12)),
     ValueError, r"block_k=12 must be a multiple of 8 on mosaic_tpu.*block_k=16"),
    ("block-positive", lambda: da.BlockSizes(block_k=0), ValueError, r"BlockSizes.block_k=0 must be a positive int"),
    ("splits-positive", lambda: da.BlockSizes(num_splits=0), ValueError, r"num_splits=0 must be a positive int"),
    ("block_sizes-type", lambda: _dec(block_sizes=(16, 2)), TypeError, r"block_sizes must be a BlockSizes"),
    ("backend", lambda: _dec(backend="cuda"), ValueError, r"backend='cuda' is not one of"),
    ("page-overflow", lambda: _paged(lengths=jnp.asarray([33, 5], jnp.int32)), ValueError,
     r"lengths\[0\]=33 exceeds the page table capacity .* = 4 \* 8 = 32; .* widen block_tables"),
    ("page-id", lambda: _paged(block_tables=BT.at[1, 0].set(99)), ValueError,
     r"block_tables\[1, 0\]=99 is not a page id in \[0, num_pages=8\)"),
    ("page-size-mosaic", lambda: _paged(k_pages=KP[:, :, :4], v_pages=VP[:, :, :4],
                                        lengths=jnp.asarray([16, 4], jnp.int32), backend="mosaic_tpu"),
     ValueError, r"page_size=4 .* must be a multiple of 8 on mosaic_tpu"),
    ("page-size-triton", lambda: _paged(k_pages=KP[:, :, :6], v_pages=VP[:, :, :6],
                                        lengths=jnp.asarray([16, 4], jnp.int32)),
     ValueError, r"page_size=6 .* must be a power of two on the triton"),
    ("ppb-triton", lambda: _paged(pages_per_block=1), ValueError,
     r"pages_per_block=1 must be a power of two with pages_per_block \* page_size >= 16 .* pages_per_block=2"),
    ("ppb-positive", lambda: _paged(pages_per_block=0), ValueError, r"pages_per_block=0 must be a positive int"),
    ("paged-heads", lambda: _paged(k_pages=jnp.concatenate([KP, KP[:1]]),
                                       v_pages=jnp.concatenate([VP, VP[:1]])), ValueError,
     r"H=8 must be a multiple of the KV heads Hkv=3"),
    ("paged-dtype", lambda: _paged(v_pages=VP.astype(BF16)), TypeError, r"q, k_pages, v_pages dtypes differ"),
    ("block-tables-shape", lambda: _paged(block_tables=BT[0]), ValueError,
     r"block_tables must be \[B, max_pages_per_seq\] with B=2"),
    ("block-tables-dtype", lambda: _paged(block_tables=BT.astype(F32)), TypeError,
     r"block_tables must be an integer array"),
    ("paged-lengths-shape", lambda: _paged(lengths=LP[:1]), ValueError, r"lengths must have shape \[B\]=\(2,\)"),
    ("merge", lambda: da.merge_attention([Q], []), ValueError, r"one lse per output"),
]


@pytest.mark.parametrize("call,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
