"""4-bit Adam (Li et al. 2023): DE and zero-free linear maps, nibble packing, rank-1
normalization, exact packed state bytes, float64 AdamW tracking, NaN skipping, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memlab import optim
from memlab.memory.bytes import tree_bytes
from memlab.memory.profile import train_step_fn
from memlab.optim import _blockwise as bw
from memlab.optim.adam4bit import LINEAR_MAP, SIGNED_MAP
from _optim_checks import SHAPES, adamw_f64, run_updates
from _optim_checks import random_grads as _grads, random_params as _params

@pytest.fixture(scope="module")
def opt():
    """The optimizer most tests use, with its jitted update (compiled once per module)."""
    tx = optim.get("adamw4bit", learning_rate=1e-2, weight_decay=1e-2)
    return tx, jax.jit(tx.update)


def _formula(shapes, block=128, min_size=4096):
    """Packed nibbles + f32 scales, written out independently of the codecs."""
    total = 8
    for s in shapes.values():
        n = math.prod(s)
        if n < min_size:
            total += 8 * n
            continue
        nb = -(-n // block)
        total += nb * block // 2 + 4 * nb  # m: B128/DE
        if len(s) >= 2 and min(s[-2:]) > 1:  # v: rank-1, per trailing matrix
            lead = math.prod(s[:-2])
            total += lead * -(-s[-2] * s[-1] // 2) + 4 * lead * (s[-2] + s[-1])
        else:
            total += nb * block // 2 + 4 * nb
    return total


# --- maps, packing, normalization ------------------------------------------------------

def test_four_bit_maps():
    assert SIGNED_MAP.shape == (16,) and np.all(np.diff(SIGNED_MAP) > 0)
    assert 0.0 in SIGNED_MAP and SIGNED_MAP.max() == 1.0
    pos = SIGNED_MAP[(SIGNED_MAP > 0) & (SIGNED_MAP < 1)].astype(np.float64)
    for e, count in enumerate((4, 2, 1)):  # 2 - e fraction bits after e zeros + indicator
        assert np.sum((pos >= 10.0 ** -(e + 1)) & (pos < 10.0 ** -e)) == count
    np.testing.assert_array_equal(LINEAR_MAP, (np.arange(16) + 1) / 16)
    assert LINEAR_MAP.min() > 0  # zero excluded


@pytest.mark.parametrize("n", [1, 2, 7, 128, 1001])
def test_nibble_packing_roundtrip_and_layout(n):
    rng = np.random.default_rng(n)
    codes = rng.integers(0, 16, (3, n)).astype(np.uint8)
    packed = np.asarray(bw.pack_nibbles(jnp.asarray(codes)))
    assert packed.shape == (3, -(-n // 2)) and packed.dtype == np.uint8
    padded = np.pad(codes, ((0, 0), (0, n % 2)))
    np.testing.assert_array_equal(packed, padded[:, 0::2] | (padded[:, 1::2] << 4))
    np.testing.assert_array_equal(np.asarray(bw.unpack_nibbles(jnp.asarray(packed), n)), codes)


def test_rank1_roundtrip_matches_float64_normalization():
    rng = np.random.default_rng(4)
    shape = (3, 37, 129)
    v = rng.standard_normal(shape) ** 2 * np.exp(rng.uniform(-3, 3, shape[:1] + (1, 129)))
    codec = bw.Rank1Codec(LINEAR_MAP, 37, 129, 4)
    state = jax.jit(codec.encode, static_argnums=1)(jnp.asarray(v, jnp.float32).reshape(-1), 3)
    assert state.codes.shape == (3, -(-37 * 129 // 2)) and state.codes.dtype == jnp.uint8
    np.testing.assert_allclose(state.row_max, v.max(axis=2), rtol=1e-6)
    np.testing.assert_allclose(state.col_max, v.max(axis=1), rtol=1e-6)
    scale = np.minimum(v.max(axis=2)[:, :, None], v.max(axis=1)[:, None, :])
    back = np.asarray(jax.jit(codec.decode, static_argnums=1)(state, 3), np.float64).reshape(shape)
    # nearest of (i+1)/16: within half a gap above 1/16, and at most 1/16 below it
    tol = np.where(v / scale >= 1 / 16, 1 / 32, 1 / 16) * scale
    assert np.all(np.abs(back - v) <= tol * (1 + 1e-4))
    assert np.all(back > 0)  # the zero-free map never quantizes v to 0
    ref_idx = np.argmin(np.abs(v[..., None] / scale[..., None] - LINEAR_MAP.astype(np.float64)), -1)
    assert np.mean(np.abs(back - LINEAR_MAP[ref_idx] * scale) > 1e-6 * scale) < 1e-3


def test_blockwise_de_roundtrip_within_half_gap():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(1001) * np.exp(rng.uniform(-3, 3, 1001))
    codec = bw.BlockwiseCodec(SIGNED_MAP, 128, 4)
    state = jax.jit(codec.encode, static_argnums=1)(jnp.asarray(x, jnp.float32), 8)
    assert state.codes.shape == (8, 64)
    back = np.asarray(jax.jit(codec.decode, static_argnums=1)(state, 8), np.float64)[:1001]
    absmax = np.abs(np.pad(x, (0, 23)).reshape(8, 128)).max(1)
    bound = np.repeat(absmax, 128)[:1001] * bw.max_gap(SIGNED_MAP) / 2
    assert np.all(np.abs(back - x) <= bound * (1 + 1e-4))


# --- exact bytes -----------------------------------------------------------------------

@pytest.mark.parametrize("shapes,kw", [
    (SHAPES, {}),
    ({"a": (3, 37, 129), "b": (1, 5000), "c": (4097,), "d": (4095,)}, {}),
    ({"a": (37, 129), "b": (6001,)}, {"block_size": 64}),
])
def test_state_bytes_equal_tree_bytes_and_formula(shapes, kw):
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    for name in ("adam4bit", "adamw4bit"):
        exact = tree_bytes(jax.eval_shape(optim.get(name, **kw).init, params))
        assert optim.state_bytes(name, params, **kw) == exact
        assert exact == _formula(shapes, kw.get("block_size", 128))
    real = {k: jnp.ones(s) for k, s in shapes.items()}
    assert tree_bytes(optim.get("adam4bit", **kw).init(real)) == exact


def test_1024_square_is_an_eighth_of_fp32_adam_plus_scales():
    params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    n = 1024 * 1024
    q = tree_bytes(jax.eval_shape(optim.get("adamw4bit").init, params))
    fp32 = tree_bytes(jax.eval_shape(optim.get("adamw").init, params))
    m_bytes = n // 2 + 4 * (n // 128)  # packed nibbles + one absmax per 128
    v_bytes = n // 2 + 4 * (1024 + 1024)  # packed nibbles + row and column maxima
    assert q == optim.state_bytes("adamw4bit", params) == m_bytes + v_bytes + 8
    ratio = q / fp32
    assert ratio == pytest.approx((1 + 4 / 128 + 4 * 2048 / n) / 8, rel=1e-5)
    assert 0.125 < ratio < 0.13
    q8 = optim.state_bytes("adamw8bit", params)
    assert q < 0.52 * q8


# --- optimization ----------------------------------------------------------------------

def test_tracks_float64_adamw_within_4bit_quantization_error(opt):
    """4-bit moments are coarse: the DE map's top gap is 0.225 of the block absmax, so a
    first-moment element can be off by up to 11% of its block max each step (the
    second moment's linear map errs by <= 1/32 of its row/column scale).  Measured over
    20 steps: 20% of the displacement, 2.5e-2 of the params; bounds leave 1.75-2x."""
    params, grads = _params(0), _grads(1, 20)
    p, state = run_updates(opt[0], params, grads, opt[1])
    ref = adamw_f64(params, grads, 1e-2, wd=1e-2)
    for k in ("w", "v"):
        err = np.linalg.norm(np.asarray(p[k], np.float64) - ref[k])
        moved = np.linalg.norm(ref[k] - np.asarray(params[k], np.float64))
        assert err < 0.35 * moved, k
        assert err < 5e-2 * np.linalg.norm(ref[k]), k
    np.testing.assert_allclose(p["s"], ref["s"], rtol=1e-5, atol=1e-6)
    assert isinstance(state.nu["w"], bw.QRank1) and isinstance(state.nu["v"], bw.QBlocks)


def test_chunked_matrices_match_single_pass():
    shapes = {"stack": (4, 64, 80), "w": (37, 129)}
    params, grads = _params(2, shapes), _grads(3, 2, shapes)
    p1, s1 = run_updates(optim.get("adam4bit", learning_rate=1e-2), params, grads)
    p2, s2 = run_updates(optim.get("adam4bit", learning_rate=1e-2, chunk_size=64 * 80), params, grads)
    for k in shapes:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        assert np.mean(np.asarray(a) != np.asarray(b)) < 1e-3


def test_non_finite_gradient_skips_step_and_keeps_state_bit_exact(opt):
    params, grads = _params(6), _grads(7, 2)
    tx, update = opt
    _, state = update(grads[0], tx.init(params), params)
    g = dict(grads[1])
    g["w"] = g["w"].at[3, 5].set(-np.inf)
    u, s2 = update(g, state, params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(u))
    for a, b in zip(jax.tree_util.tree_leaves((s2.count, s2.mu, s2.nu)),
                    jax.tree_util.tree_leaves((state.count, state.mu, state.nu))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s2.skipped) == 1


def test_least_squares_reaches_adam_loss():
    rng = np.random.default_rng(8)
    a = jnp.asarray(rng.standard_normal((256, 129)), jnp.float32)
    b = jnp.asarray(np.asarray(a) @ rng.standard_normal((129, 37))
                    + 0.1 * rng.standard_normal((256, 37)), jnp.float32)
    x_init = jnp.asarray(rng.standard_normal((129, 37)) * 0.1, jnp.float32)

    def loss(x):
        return jnp.mean((a @ x["x"] - b) ** 2)

    def fit(tx):
        x, state = {"x": x_init}, tx.init({"x": x_init})

        @jax.jit
        def step(x, state):
            g = jax.grad(loss)(x)
            u, state = tx.update(g, state, x)
            return optax.apply_updates(x, u), state

        for _ in range(300):
            x, state = step(x, state)
        return float(loss(x))

    l0 = float(loss({"x": x_init}))
    l4, lf = fit(optim.get("adam4bit", learning_rate=3e-2)), fit(optax.adam(3e-2))
    # Full-batch gradients are the hard case for a 4-bit first moment: Adam's late steps
    # need small m entries that B128/DE rounds coarsely or to zero, so 4-bit stalls
    # higher (measured 0.17 vs 0.011 from 121; v-only 4-bit reaches 0.015).  Both must
    # remove > 99% of the loss, and 4-bit's gap to Adam stays < 0.3% of the start.
    assert lf < 0.01 * l0 and l4 < 0.01 * l0
    assert l4 - lf < 3e-3 * l0, (l0, l4, lf)


# --- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [(0, "positive int"), (-128, "positive int"),
                                       (127, "must be even"), (64.0, "positive int"),
                                       ("128", "positive int")])
def test_bad_block_size_raises(bad, match):
    with pytest.raises(ValueError, match=f"block_size.*{match}"):
        optim.get("adam4bit", block_size=bad)


def test_bad_dtypes_raise():
    with pytest.raises(TypeError, match="needs floating-point params"):
        optim.state_bytes("adam4bit", {"w": jax.ShapeDtypeStruct((64, 64), jnp.int8)})
    with pytest.raises(TypeError, match="state_dtype"):
        optim.get("adam4bit", state_dtype="uint8")


# --- models ----------------------------------------------------------------------------

def test_trains_tiny_llama_with_exact_state_bytes(tiny):
    tx = optim.get("adamw4bit", learning_rate=3e-3)
    step = jax.jit(train_step_fn(tiny, tx))
    tokens = jax.random.randint(jax.random.key(6), (4, 33), 0, tiny.spec.vocab_size)
    params, state = tiny.params, tx.init(tiny.params)
    assert isinstance(state.nu["layers"]["attn"]["q_proj"]["kernel"], bw.QRank1)
    losses = []
    for _ in range(8):
        params, state, loss = step(params, state, tokens)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses
    # what the profiler's analytic column computes, from the spec's abstract shapes
    exact = tree_bytes(state)
    assert exact == optim.state_bytes("adamw4bit", tiny.spec.param_shapes())
    assert exact < 0.6 * optim.state_bytes("adamw8bit", tiny.params)
