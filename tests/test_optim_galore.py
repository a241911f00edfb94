"""GaLore (memlab.optim.galore) against a float64 numpy reimplementation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memlab as ml
from _optim_checks import train_tiny_and_profile
from memlab.memory.bytes import tree_bytes
from memlab.optim.galore import galore

LR, SCALE, RANK, GAP = 1e-2, 0.3, 5, 3


def _params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"layers": {"kernel": jax.random.normal(k1, (2, 23, 41))},   # stacked, m <= n: left
            "proj": {"kernel": jax.random.normal(k2, (37, 19))},        # m > n: right
            "bias": jax.random.normal(k3, (41,))}                       # full size


def _grads(key, params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape) * (1 + i)
                  for i, (k, x) in enumerate(zip(keys, leaves))])


def _inner(state):
    return state.inner  # with_state_dtype wrapper


def _np_adam(mv, g, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    m, v = mv
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return -lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps), (m, v)


def _np_projector(g, r, left):
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    return u[:, :r] if left else vh[:r].T


def test_matches_float64_numpy_across_refreshes():
    params = _params(jax.random.key(0))
    tx = ml.optim.get("galore", learning_rate=LR, rank=RANK, update_proj_gap=GAP, scale=SCALE)
    state = tx.init(params)
    update = jax.jit(tx.update)
    names = ["bias", "layers", "proj"]  # tree_flatten order of the dict
    mats = {"layers": [(b, True) for b in range(2)], "proj": [(None, False)]}
    ref_p, ref_mv = {}, {}
    for step in range(2 * GAP + 1):   # refreshes at steps 0, 3, 6
        grads = _grads(jax.random.key(100 + step), params)
        upd, state = update(grads, state, params)
        jp = dict(zip(names, _inner(state).projectors))
        g64 = {k: np.asarray(v["kernel"] if k != "bias" else v, np.float64)
               for k, v in grads.items()}
        t = step + 1
        for name, blocks in mats.items():
            for b, left in blocks:
                g = g64[name] if b is None else g64[name][b]
                pj = np.asarray(jp[name] if b is None else jp[name][b], np.float64)
                if step % GAP == 0:
                    p = _np_projector(g, RANK, left)
                    # same subspace (sign-free), then align column signs to the jax projector
                    np.testing.assert_allclose(pj @ pj.T, p @ p.T, atol=2e-5)
                    ref_p[name, b] = p * np.sign(np.sum(p * pj, axis=0))
                p = ref_p[name, b]
                low = p.T @ g if left else g @ p
                mv = ref_mv.get((name, b), (np.zeros_like(low), np.zeros_like(low)))
                u, ref_mv[name, b] = _np_adam(mv, low, t, LR)
                full = SCALE * (p @ u if left else u @ p.T)
                got = np.asarray(upd[name]["kernel"] if b is None else upd[name]["kernel"][b])
                np.testing.assert_allclose(got, full, atol=1e-4 * np.abs(full).max(), rtol=1e-4)
        mv = ref_mv.get("bias", (np.zeros(41), np.zeros(41)))
        u, ref_mv["bias"] = _np_adam(mv, g64["bias"], t, LR)
        np.testing.assert_allclose(np.asarray(upd["bias"]), u, rtol=1e-4, atol=1e-9)
    assert int(_inner(state).count) == 2 * GAP + 1


def test_sgd_base_is_scaled_projection_onto_top_singular_subspace():
    # with SGD as base the update is -lr * scale * P Pᵀ G: sign-free, checked against numpy
    params = _params(jax.random.key(1))
    tx = galore(rank=RANK, update_proj_gap=GAP, scale=SCALE, base=optax.sgd(LR))
    state = tx.init(params)
    grads = _grads(jax.random.key(2), params)
    upd, state = jax.jit(tx.update)(grads, state, params)
    for b in range(2):
        g = np.asarray(grads["layers"]["kernel"][b], np.float64)
        p = _np_projector(g, RANK, True)
        np.testing.assert_allclose(np.asarray(upd["layers"]["kernel"][b]),
                                   -LR * SCALE * p @ p.T @ g, rtol=1e-4, atol=1e-5)
    g = np.asarray(grads["proj"]["kernel"], np.float64)
    p = _np_projector(g, RANK, False)
    np.testing.assert_allclose(np.asarray(upd["proj"]["kernel"]), -LR * SCALE * g @ p @ p.T,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(upd["bias"]), -LR * np.asarray(grads["bias"]), rtol=1e-6)


def test_rank_and_argument_errors():
    params = _params(jax.random.key(3))
    with pytest.raises(ValueError, match=r"'layers/kernel'.*max rank min\(m, n\) = 23"):
        galore(rank=24).init(params)
    with pytest.raises(ValueError, match=r"'proj/kernel'.*max rank min\(m, n\) = 19"):
        ml.optim.state_bytes("galore", params, rank=20, exclude="layers")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        galore(rank=0)
    with pytest.raises(ValueError, match="update_proj_gap must be a positive int"):
        galore(update_proj_gap=0)
    with pytest.raises(ValueError, match="scale must be a positive"):
        galore(scale=-1.0)
    with pytest.raises(ValueError, match="exclude=.*not a valid regex"):
        galore(exclude="(")
    with pytest.raises(TypeError, match="base must be"):
        galore(base=3)
    with pytest.raises(ValueError, match="unknown optimizer"):
        galore(base="no-such-optimizer")
    tx = galore(rank=4, weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay needs params"):
        tx.update(_grads(jax.random.key(4), params), tx.init(params))
    with pytest.warns(UserWarning, match="no parameter is projected"):
        galore(include="attn").init(params)
    # rank 19 is allowed once the 23-row stack is excluded; rank = min(m, n) is allowed
    assert ml.optim.state_bytes("galore", params, rank=19, exclude="layers") > 0


@pytest.mark.parametrize("kwargs", [
    {}, {"rank": 7}, {"rank": 3, "state_dtype": "bfloat16"}, {"rank": 2, "exclude": None},
    {"rank": 4, "base": "adamw"}, {"rank": 4, "base": optax.adafactor(1e-3)},
    {"rank": 6, "include": "layers"},
])
def test_state_bytes_exact(kwargs):
    params = _params(jax.random.key(5))
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = ml.optim.get("galore", **kwargs)
    expect = tree_bytes(tx.init(params))
    assert ml.optim.state_bytes("galore", params, **kwargs) == expect
    assert ml.optim.state_bytes("galore", shapes, **kwargs) == expect
    assert tree_bytes(jax.eval_shape(tx.init, shapes)) == expect


def test_rank_quarter_saves_over_60_percent_of_adam_moments():
    d = 96
    params = {"mlp": {"kernel": jax.random.normal(jax.random.key(6), (d, d))}}
    adam = tree_bytes(optax.adam(1e-3).init(params))
    low = tree_bytes(galore(rank=d // 4).init(params))
    saved = 1 - low / adam
    print(f"GaLore r=d/4 on {d}x{d}: {low} B vs Adam {adam} B, saves {saved:.2%}")
    assert saved >= 0.60


def test_llama2_7b_abstract_bytes():
    big = ml.models.load("llama2-7b", dtype="bfloat16")   # ShapeDtypeStructs, nothing allocated
    adamw = ml.optim.state_bytes("adamw", big.params)
    for rank in (128, 1024):
        tx = galore(rank=rank)
        exact = tree_bytes(jax.eval_shape(tx.init, big.params))
        assert exact == ml.optim.state_bytes("galore", big.params, rank=rank)
        print(f"llama2-7b GaLore r={rank}: {exact / 2**30:.2f} GiB = {exact / adamw:.2%} "
              f"of fp32 AdamW ({adamw / 2**30:.2f} GiB)")
        assert exact < adamw


def test_eight_bit_galore_by_composition():
    if "adamw8bit" not in ml.optim.names():
        pytest.skip("adamw8bit optimizer not registered")
    params = _params(jax.random.key(7))
    kw = {"block_size": 64, "min_8bit_size": 64}
    tx = galore(rank=RANK, base="adamw8bit", base_kwargs=kw, learning_rate=LR)
    ref = galore(rank=RANK, learning_rate=LR)
    state, rstate = tx.init(params), ref.init(params)
    bytes8 = ml.optim.state_bytes("galore", params, rank=RANK, base="adamw8bit", base_kwargs=kw)
    assert tree_bytes(state) == bytes8 < tree_bytes(rstate)
    update, rupdate = jax.jit(tx.update), jax.jit(ref.update)
    for step in range(3):
        grads = _grads(jax.random.key(20 + step), params)
        upd, state = update(grads, state, params)
        rupd, rstate = rupdate(grads, rstate, params)
    for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(rupd)):
        err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        print(f"8-bit vs fp32 GaLore update, relative error {err:.4f}")
        assert err < 0.05


def test_nonfinite_gradient_skips_step_and_jit_matches_eager():
    params = _params(jax.random.key(9))
    del params["layers"]  # keep the eager (op-by-op) run short
    tx = galore(rank=RANK, update_proj_gap=GAP)
    state = tx.init(params)
    grads = _grads(jax.random.key(10), params)
    u_eager, s_eager = tx.update(grads, state, params)
    u_jit, s_jit = jax.jit(tx.update)(grads, state, params)
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # noqa: E731
    jax.tree_util.tree_map(chex_close, u_eager, u_jit)
    jax.tree_util.tree_map(chex_close, s_eager, s_jit)
    bad = jax.tree_util.tree_map(lambda g: g, grads)
    bad["proj"]["kernel"] = bad["proj"]["kernel"].at[3, 4].set(jnp.nan)
    u, s2 = jax.jit(tx.update)(bad, s_jit, params)
    for x in jax.tree_util.tree_leaves(u):
        assert not np.any(np.asarray(x))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), s2, s_jit)


def test_minimizes_least_squares():
    kx, kw = jax.random.split(jax.random.key(11))
    x = jax.random.normal(kx, (96, 30))
    target = jax.random.normal(kw, (30, 50))
    y = x @ target

    def loss(p):
        return jnp.mean(jnp.square(x @ p["dense"]["kernel"] - y))

    tx = galore(learning_rate=0.05, rank=8, update_proj_gap=25, scale=1.0)
    params = {"dense": {"kernel": jnp.zeros((30, 50)) + 0.01}}

    @jax.jit
    def run(params):
        def body(carry, _):
            p, s = carry
            value, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), value
        (p, _), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=300)
        return losses, loss(p)

    losses, final = run(params)
    print(f"least squares: {float(losses[0]):.3f} -> {float(final):.4f}")
    assert float(final) < 0.05 * float(losses[0])


def test_trains_tiny_llama_and_profile_matches(tiny):  # conftest's session-scoped tiny Llama
    losses = train_tiny_and_profile(tiny, "galore")
    print("tiny Llama, galore:", [round(x, 3) for x in losses])
