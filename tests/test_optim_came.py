"""CAME (memlab.optim.came) against a float64 numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memlab as ml
from _optim_checks import train_tiny_and_profile
from memlab.memory.bytes import tree_bytes
from memlab.optim.came import FactoredState, FullState, came

LR, B1, B2, B3, E1, E2, D = 1e-2, 0.9, 0.999, 0.9999, 1e-30, 1e-16, 1.0


def _params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"layers": {"kernel": jax.random.normal(k1, (3, 17, 26))},   # stacked, factored
            "head": {"kernel": jax.random.normal(k2, (33, 7))},         # factored
            "norm": {"scale": jax.random.normal(k3, (3, 26))}}          # full second moment


def _grads(key, params, mult=1.0):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [mult * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _np_came_matrix(st, g, wd, w):
    """One CAME step on one [m, n] matrix (Luo et al., Algorithm 1, mean-normalized)."""
    sq = g * g + E1
    st["r"] = B2 * st["r"] + (1 - B2) * sq.mean(1)
    st["c"] = B2 * st["c"] + (1 - B2) * sq.mean(0)
    v = np.outer(st["r"], st["c"]) / st["r"].mean()
    u = g / np.sqrt(v)
    u = u / max(1.0, np.sqrt((u * u).mean()) / D)
    st["m"] = B1 * st["m"] + (1 - B1) * u
    inst = (u - st["m"]) ** 2 + E2
    st["R"] = B3 * st["R"] + (1 - B3) * inst.mean(1)
    st["C"] = B3 * st["C"] + (1 - B3) * inst.mean(0)
    s = np.outer(st["R"], st["C"]) / st["R"].mean()
    return -LR * (st["m"] / np.sqrt(s) + wd * w)


def _np_came_full(st, g, wd, w):
    st["v"] = B2 * st["v"] + (1 - B2) * (g * g + E1)
    u = g / np.sqrt(st["v"])
    u = u / max(1.0, np.sqrt((u * u).mean()) / D)
    st["m"] = B1 * st["m"] + (1 - B1) * u
    return -LR * (st["m"] + wd * w)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_float64_numpy_reference(wd):
    params = _params(jax.random.key(0))
    tx = came(LR, weight_decay=wd)
    state = tx.init(params)
    update = jax.jit(tx.update)
    p64 = {k: np.asarray(jax.tree_util.tree_leaves(v)[0], np.float64) for k, v in params.items()}
    ref = {("layers", b): dict(m=np.zeros((17, 26)), r=np.zeros(17), c=np.zeros(26),
                               R=np.zeros(17), C=np.zeros(26)) for b in range(3)}
    ref["head", None] = dict(m=np.zeros((33, 7)), r=np.zeros(33), c=np.zeros(7), R=np.zeros(33),
                             C=np.zeros(7))
    ref["norm", None] = dict(m=np.zeros((3, 26)), v=np.zeros((3, 26)))
    for step in range(5):
        # step 2 has tiny gradients (the clip is inactive), the others large (clip active)
        grads = _grads(jax.random.key(10 + step), params, 1e-3 if step == 2 else 3.0)
        upd, state = update(grads, state, params)
        g64 = {k: np.asarray(jax.tree_util.tree_leaves(v)[0], np.float64) for k, v in grads.items()}
        for (name, b), st in ref.items():
            got = jax.tree_util.tree_leaves(upd[name])[0]
            if name == "norm":
                want = _np_came_full(st, g64[name], wd, p64[name])
            elif b is None:
                want = _np_came_matrix(st, g64[name], wd, p64[name])
            else:
                want, got = _np_came_matrix(st, g64[name][b], wd, p64[name][b]), got[b]
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4,
                                       atol=1e-5 * np.abs(want).max())


def test_state_layout_and_bytes_exact():
    params = _params(jax.random.key(1))
    st = came().init(params).inner.leaves
    by_name = dict(zip(["head", "layers", "norm"], st))
    assert isinstance(by_name["layers"], FactoredState) and isinstance(by_name["norm"], FullState)
    assert by_name["layers"].row.shape == (3, 17) and by_name["layers"].res_col.shape == (3, 26)
    assert by_name["head"].col.shape == (7,)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    for kw in ({}, {"state_dtype": "bfloat16"}, {"factored": None}, {"factored": "head"}):
        expect = tree_bytes(came(**kw).init(params))
        assert ml.optim.state_bytes("came", params, **kw) == expect
        assert ml.optim.state_bytes("came", shapes, **kw) == expect
    # factored moments: m*n first moment + 2(m+n) per matrix, vs Adam's 2mn
    n_adam = tree_bytes(optax.adam(1e-3).init({"w": jnp.ones((512, 512))})) - 4
    n_came = tree_bytes(came().init({"w": {"kernel": jnp.ones((512, 512))}}))
    assert n_came == 4 * (512 * 512 + 4 * 512) and n_came < 0.51 * n_adam


def test_llama2_7b_abstract_bytes():
    big = ml.models.load("llama2-7b", dtype="bfloat16")   # abstract, nothing allocated
    adamw = ml.optim.state_bytes("adamw", big.params)
    exact = tree_bytes(jax.eval_shape(came().init, big.params))
    assert exact == ml.optim.state_bytes("came", big.params) < adamw
    print(f"llama2-7b came: {exact / 2**30:.2f} GiB = {exact / adamw:.2%} of fp32 AdamW")


def test_argument_errors():
    for kw, match in (({"b3": 1.0}, "b3 must be in"), ({"eps1": 0.0}, "eps1 must be a positive"),
                      ({"clip_threshold": -1.0}, "clip_threshold must be a positive"),
                      ({"factored": "("}, "factored=.*not a valid regex")):
        with pytest.raises(ValueError, match=match):
            came(**kw)
    params = _params(jax.random.key(2))
    tx = came(weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay needs params"):
        tx.update(_grads(jax.random.key(3), params), tx.init(params))


def test_nonfinite_gradient_skips_step_and_jit_matches_eager():
    params = _params(jax.random.key(4))
    del params["layers"]  # keep the eager run short
    tx = came(LR)
    state = tx.init(params)
    grads = _grads(jax.random.key(5), params)
    update = jax.jit(tx.update)
    u_eager, s_eager = tx.update(grads, state, params)
    u_jit, s_jit = update(grads, state, params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)  # noqa: E731
    jax.tree_util.tree_map(close, (u_eager, s_eager), (u_jit, s_jit))
    bad = _grads(jax.random.key(6), params)
    bad["head"]["kernel"] = bad["head"]["kernel"].at[0, 0].set(jnp.nan)
    u, s2 = update(bad, s_jit, params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(u))
    jax.tree_util.tree_map(np.testing.assert_array_equal, s2, s_jit)


def test_minimizes_small_mlp_regression():
    kx, k1, k2, kt = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(kx, (128, 12))
    y = jnp.sin(x @ jax.random.normal(kt, (12, 3)))
    params = {"l1": {"kernel": 0.3 * jax.random.normal(k1, (12, 48))},
              "l2": {"kernel": 0.3 * jax.random.normal(k2, (48, 3))}}

    def loss(p):
        return jnp.mean(jnp.square(jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"] - y))

    tx = came(learning_rate=1e-2)

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
    print(f"CAME MLP regression: {float(losses[0]):.3f} -> {float(final):.4f}")
    assert float(final) < 0.2 * float(losses[0])


def test_trains_tiny_llama_and_profile_matches(tiny):   # conftest's session-scoped tiny Llama
    losses = train_tiny_and_profile(tiny, "came")
    print("tiny Llama, came:", [round(x, 3) for x in losses])
