"""8-bit Adam (Dettmers et al. 2022): code maps, block-wise quantization, exact state
bytes, tracking a float64 AdamW reference, NaN skipping, errors, training."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memlab as ml
from memlab import optim
from memlab.memory.bytes import tree_bytes
from memlab.memory.profile import train_step_fn
from memlab.optim import _blockwise as bw
from memlab.optim.adam8bit import SIGNED_MAP, UNSIGNED_MAP
from _optim_checks import SHAPES, adamw_f64, run_updates
from _optim_checks import random_grads as _grads, random_params as _params

@pytest.fixture(scope="module")
def opt():
    """The optimizer most tests use, with its jitted update (compiled once per module)."""
    tx = optim.get("adamw8bit", learning_rate=1e-2, weight_decay=1e-2)
    return tx, jax.jit(tx.update)


def _formula(shapes, block=2048, min_size=4096, fp32=(), itemsize=4):
    """Exact bytes written out independently: padded blocks + one f32 absmax per block."""
    total = 8
    for name, s in shapes.items():
        n = math.prod(s)
        if n < min_size or any(r in name for r in fp32):
            total += 2 * n * itemsize
        else:
            nb = -(-n // block)
            total += 2 * (nb * block + 4 * nb)
    return total


# --- code maps -----------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_tree_map_structure(signed):
    code = bw.dynamic_map(8, signed=signed)
    assert code.shape == (256,) and code.dtype == np.float32
    assert np.all(np.diff(code) > 0)
    assert 0.0 in code and 1.0 in code and code.max() == 1.0
    assert code.min() == (-code[code < 1].max() if signed else 0.0)
    # dynamic tree: exponent e (leading zeros) leaves 6-e (signed) or 7-e (unsigned)
    # fraction bits, so decade [10^-e / 10, 10^-e) holds 2^(6-e) or 2^(7-e) codes per sign
    pos = code[(code > 0) & (code < 1)].astype(np.float64)
    for e in range(7):
        in_decade = np.sum((pos >= 10.0 ** -(e + 1)) & (pos < 10.0 ** -e))
        assert in_decade == 2 ** ((6 if signed else 7) - e), e


@pytest.mark.parametrize("code", [SIGNED_MAP, UNSIGNED_MAP], ids=["signed", "unsigned"])
def test_nearest_code_matches_float64_argmin_within_half_gap(code):
    rng = np.random.default_rng(11)
    lo = -1.0 if code.min() < 0 else 0.0
    x = rng.uniform(lo, 1.0, 20_001)
    x[:50] = rng.choice(code, 50)  # exact codes decode exactly
    idx = np.asarray(jax.jit(lambda x: bw.nearest_code(x, code))(jnp.asarray(x, jnp.float32)))
    deq = code.astype(np.float64)[idx]
    best = np.min(np.abs(code.astype(np.float64)[None, :] - x[:, None]), axis=1)
    err = np.abs(deq - x)
    np.testing.assert_allclose(err, best, atol=1e-7)  # the nearest code, up to f32 ties
    assert err.max() <= bw.max_gap(code) / 2 + 1e-7
    assert np.all(err[:50] == 0)


def test_blockwise_roundtrip_error_bounded_by_block_absmax_times_half_gap():
    rng = np.random.default_rng(3)
    shape, block = (37, 129), 256  # 4773 elements: 19 blocks, last one padded
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-4, 4, shape))
    codec = bw.BlockwiseCodec(SIGNED_MAP, block, 8)
    k = codec.n_units(shape)
    state = jax.jit(codec.encode, static_argnums=1)(jnp.asarray(x, jnp.float32).reshape(-1), k)
    assert state.codes.shape == (k, block) and state.codes.dtype == jnp.uint8
    back = np.asarray(jax.jit(codec.decode, static_argnums=1)(state, k), np.float64)
    back = back[:x.size].reshape(shape)
    flat = np.pad(x.reshape(-1), (0, k * block - x.size)).reshape(k, block)
    absmax = np.abs(flat).max(axis=1)
    np.testing.assert_allclose(np.asarray(state.absmax), absmax, rtol=1e-6)
    bound = np.repeat(absmax, block)[:x.size].reshape(shape) * (bw.max_gap(SIGNED_MAP) / 2)
    assert np.all(np.abs(back - x) <= bound * (1 + 1e-4))  # float32 normalization rounding


# --- exact bytes -----------------------------------------------------------------------

@pytest.mark.parametrize("shapes,kw", [
    (SHAPES, {}),
    (SHAPES, {"block_size": 256}),
    ({"a": (4095,), "b": (4096,), "c": (3, 1367), "d": (2049, 3)}, {}),
    ({"embed": {"embedding": (300, 64)}, "dense": {"kernel": (64, 301)}},
     {"stable_embedding": True, "block_size": 100}),
    ({"x": (7, 11, 13), "y": (1000,)}, {"min_8bit_size": 0, "block_size": 64}),
])
def test_state_bytes_equal_tree_bytes_and_formula(shapes, kw):
    flat = {"/".join(k): v for k, v in _flatten(shapes)}
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                                    is_leaf=lambda s: isinstance(s, tuple))
    for name in ("adam8bit", "adamw8bit"):
        tx = optim.get(name, **kw)
        exact = tree_bytes(jax.eval_shape(tx.init, params))
        assert optim.state_bytes(name, params, **kw) == exact
        assert exact == _formula(flat, kw.get("block_size", 2048), kw.get("min_8bit_size", 4096),
                                 ("embed",) if kw.get("stable_embedding") else ())
    real = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params)
    assert tree_bytes(optim.get("adam8bit", **kw).init(real)) == exact


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_bf16_params_and_state_dtype_bytes():
    params = {"w": jax.ShapeDtypeStruct((64, 65), jnp.bfloat16),
              "s": jax.ShapeDtypeStruct((33,), jnp.bfloat16)}
    tx = optim.get("adam8bit", state_dtype="bfloat16")
    exact = tree_bytes(jax.eval_shape(tx.init, params))
    assert exact == optim.state_bytes("adam8bit", params, state_dtype="bfloat16") \
        == _formula({"w": (64, 65), "s": (33,)}, itemsize=2)


def test_1024_square_is_a_quarter_of_fp32_adam_plus_one_absmax_per_block():
    params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    n = 1024 * 1024
    q = tree_bytes(jax.eval_shape(optim.get("adamw8bit").init, params))
    fp32 = tree_bytes(jax.eval_shape(optim.get("adamw").init, params))
    assert fp32 == 8 * n + 4
    assert q == optim.state_bytes("adamw8bit", params) == 2 * (n + 4 * (n // 2048)) + 8
    ratio = q / fp32
    assert 0.25 < ratio < 0.25 + 4 / 2048 / 4 + 1e-6  # 2 bytes/param + 2 f32 per 2048 params
    assert ratio == pytest.approx((2 + 8 / 2048) / 8, rel=1e-5)


# --- optimization ----------------------------------------------------------------------

def test_tracks_float64_adamw_within_quantization_error(opt):
    """20 steps at lr 1e-2.  Each step requantizes m and v; the dynamic map rounds an
    element within the top decade of its block (|x| >= absmax/10) to <= 7% of itself
    (half the 0.014 gap over 0.1), unbiased, and Adam's decay averages those errors
    over steps: measured 1.6% of the displacement, 2e-3 of the params.  Bounds leave
    3-5x headroom; a wrong map, scale or bias correction gives errors of order 1."""
    params, grads = _params(0), _grads(1, 20)
    p, state = run_updates(opt[0], params, grads, opt[1])
    ref = adamw_f64(params, grads, 1e-2, wd=1e-2)
    for k in ("w", "v"):
        err = np.linalg.norm(np.asarray(p[k], np.float64) - ref[k])
        moved = np.linalg.norm(ref[k] - np.asarray(params[k], np.float64))
        assert err < 5e-2 * moved, k
        assert err < 1e-2 * np.linalg.norm(ref[k]), k
        assert moved > 0.1 * np.linalg.norm(ref[k])  # the params did move
    # the 100-element tensor keeps float32 state: float rounding only
    np.testing.assert_allclose(p["s"], ref["s"], rtol=1e-5, atol=1e-6)
    assert int(state.count) == 20 and int(state.skipped) == 0
    assert isinstance(state.mu["w"], bw.QBlocks) and state.mu["w"].codes.dtype == jnp.uint8
    assert state.mu["s"].dtype == jnp.float32


def test_float_path_with_schedule_equals_float64_adamw():
    """All tensors under min_8bit_size: the core is plain AdamW (incl. an optax schedule)."""
    params, grads = _params(2), _grads(3, 12)
    sched = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 4, 12)
    tx = optim.get("adamw8bit", learning_rate=sched, weight_decay=0.1, min_8bit_size=10**9)
    p, _ = run_updates(tx, params, grads)
    ref = adamw_f64(params, grads, lambda t: float(sched(t)), wd=0.1)
    for k in params:
        np.testing.assert_allclose(p[k], ref[k], rtol=2e-5, atol=2e-6)


def test_chunked_loop_matches_single_pass():
    params, grads = _params(4, {"w": (37, 129), "t": (6, 2048)}), \
        _grads(5, 3, {"w": (37, 129), "t": (6, 2048)})
    kw = dict(learning_rate=1e-2, block_size=256)
    p1, s1 = run_updates(optim.get("adam8bit", **kw), params, grads)
    p2, s2 = run_updates(optim.get("adam8bit", chunk_size=512, **kw), params, grads)  # loop + tail
    for k in params:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-6, atol=1e-7)
        for a, b in zip(s1.mu[k], s2.mu[k]):
            assert np.mean(np.asarray(a) != np.asarray(b)) < 1e-3


def test_non_finite_gradient_skips_step_and_keeps_state_bit_exact(opt):
    params, grads = _params(6), _grads(7, 3)
    tx, update = opt
    state = tx.init(params)
    u, state = update(grads[0], state, params)
    for bad in (np.nan, np.inf):
        g = dict(grads[1])
        g["v"] = g["v"].at[17].set(bad)
        u_bad, s_bad = update(g, state, params)
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(u_bad))
        for a, b in zip(jax.tree_util.tree_leaves(s_bad.mu) + jax.tree_util.tree_leaves(s_bad.nu),
                        jax.tree_util.tree_leaves(state.mu) + jax.tree_util.tree_leaves(state.nu)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(s_bad.count) == int(state.count) == 1
        assert int(s_bad.skipped) == int(state.skipped) + 1
        state = s_bad
    u, state = update(grads[2], state, params)
    assert int(state.count) == 2 and int(state.skipped) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(u))


def test_stable_embedding_keeps_32bit_state_for_embeddings():
    params = {"embed": {"embedding": jnp.ones((300, 64))}, "dense": {"kernel": jnp.ones((64, 300))}}
    st = optim.get("adam8bit", stable_embedding=True).init(params)
    assert st.mu["embed"]["embedding"].dtype == jnp.float32
    assert st.mu["embed"]["embedding"].shape == (300, 64)
    assert isinstance(st.mu["dense"]["kernel"], bw.QBlocks)
    st = optim.get("adam8bit", fp32_state_rules=[r"dense/"]).init(params)
    assert isinstance(st.mu["embed"]["embedding"], bw.QBlocks)
    assert st.nu["dense"]["kernel"].dtype == jnp.float32


def test_least_squares_reaches_adamw_loss():
    rng = np.random.default_rng(8)
    a = jnp.asarray(rng.standard_normal((256, 129)), jnp.float32)
    x_true = rng.standard_normal((129, 37))
    b = jnp.asarray(np.asarray(a) @ x_true + 0.1 * rng.standard_normal((256, 37)), jnp.float32)

    def loss(x):
        return jnp.mean((a @ x["x"] - b) ** 2)

    def fit(tx):
        x = {"x": jnp.asarray(rng.standard_normal((129, 37)) * 0.1, jnp.float32)}
        state = tx.init(x)

        @jax.jit
        def step(x, state):
            l, g = jax.value_and_grad(loss)(x)
            u, state = tx.update(g, state, x)
            return optax.apply_updates(x, u), state, l

        l0 = float(loss(x))
        for _ in range(300):
            x, state, _ = step(x, state)
        return l0, float(loss(x))

    l0, l8 = fit(optim.get("adam8bit", learning_rate=3e-2))
    _, lf = fit(optax.adam(3e-2))
    noise = 0.01 * (1 - 129 / 256)  # the least-squares optimum's loss, about
    assert lf < 0.05 * l0 and l8 < 0.05 * l0
    assert l8 <= lf * 1.2 + 0.2 * noise, (l0, l8, lf)


# --- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -5, 2.5, "2048", True, None])
def test_bad_block_size_raises(bad):
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        optim.get("adam8bit", block_size=bad)
    with pytest.raises(ValueError, match="block_size"):
        optim.state_bytes("adam8bit", {"w": jnp.ones(10)}, block_size=bad)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="needs floating-point params"):
        optim.get("adam8bit").init({"w": jnp.ones((3,), jnp.int32)})
    with pytest.raises(TypeError, match="state_dtype"):
        optim.get("adam8bit", state_dtype="int8")
    with pytest.raises(TypeError, match="state_dtype"):
        optim.get("adam8bit", state_dtype="not-a-dtype")
    with pytest.raises(ValueError, match="b1 must be"):
        optim.get("adam8bit", b1=1.0)
    with pytest.raises(ValueError, match="min_8bit_size"):
        optim.get("adam8bit", min_8bit_size=-1)
    with pytest.raises(ValueError, match="does not compile"):
        optim.get("adam8bit", fp32_state_rules=["("])
    with pytest.raises(TypeError, match="learning_rate"):
        optim.get("adam8bit", learning_rate="fast")
    with pytest.raises(TypeError, match="pass the params pytree"):
        optim.state_bytes("adam8bit", 10_000)
    tx = optim.get("adamw8bit")
    p = {"w": jnp.ones((5,))}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))


# --- models ----------------------------------------------------------------------------

def test_trains_tiny_llama_and_profile_is_exact(tiny):
    tx = optim.get("adamw8bit", learning_rate=3e-3)
    step = jax.jit(train_step_fn(tiny, tx))
    tokens = jax.random.randint(jax.random.key(5), (4, 33), 0, tiny.spec.vocab_size)
    params, state = tiny.params, tx.init(tiny.params)
    assert isinstance(state.mu["layers"]["mlp"]["up_proj"]["kernel"], bw.QBlocks)
    losses = []
    for _ in range(8):
        params, state, loss = step(params, state, tokens)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses
    assert int(state.count) == 8

    r = ml.memory.profile(tiny, "train", batch=1, seq=16, optimizer="adamw8bit")
    exact = r.by_category["optimizer_state"]
    assert exact == r.analytic["optimizer_state"] == optim.state_bytes("adamw8bit", tiny.params)
    assert exact < 0.5 * optim.state_bytes("adamw", tiny.params)
