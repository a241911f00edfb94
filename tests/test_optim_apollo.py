"""APOLLO / APOLLO-Mini (memlab.optim.apollo) against a float64 numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memlab as ml
from _optim_checks import train_tiny_and_profile
from memlab.memory.bytes import tree_bytes
from memlab.optim.apollo import apollo, apollo_mini, random_projections
from memlab.optim.galore import matrix_plan

LR, GAP, RANK = 1e-2, 3, 4
B1, B2, EPS, GAMMA = 0.9, 0.999, 1e-8, 1.01


def _params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"layers": {"kernel": jax.random.normal(k1, (2, 13, 29))},   # stacked, m <= n
            "proj": {"kernel": jax.random.normal(k2, (31, 11))},        # m > n
            "norm": {"scale": jax.random.normal(k3, (2, 29))}}          # not a kernel: AdamW


def _grads(key, params, mult=1.0):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [mult * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


_projections = jax.jit(random_projections, static_argnums=2)


def _np_apollo(params, grads_seq, tx_state0, rank, scale, channel):
    """Float64 APOLLO over the same projections; returns the updates of every step."""
    plan = matrix_plan(params, rank, 256, "kernel", "embed|lm_head", "test")
    key = tx_state0.inner.key
    mu = [np.zeros(lf.low_shape if lf.projected else lf.shape) for lf in plan]
    nu = [np.zeros_like(m) for m in mu]
    prev = [np.zeros(lf.batch) for lf in plan]
    out = []
    for step, grads in enumerate(grads_seq):
        t = step + 1
        upd = []
        projections = _projections(key, step // GAP, plan)
        for i, (g, lf) in enumerate(zip(jax.tree_util.tree_leaves(grads), plan)):
            g = np.asarray(g, np.float64)
            if not lf.projected:
                mu[i] = B1 * mu[i] + (1 - B1) * g
                nu[i] = B2 * nu[i] + (1 - B2) * g * g
                upd.append(-LR * (mu[i] / (1 - B1 ** t)) / (np.sqrt(nu[i] / (1 - B2 ** t)) + EPS))
                continue
            p = np.asarray(projections[i], np.float64)
            g3, p3 = g.reshape((-1,) + g.shape[-2:]), p.reshape((-1,) + p.shape[-2:])
            r = np.stack([pb @ gb if lf.left else gb @ pb.T for pb, gb in zip(p3, g3)])
            r = r.reshape(lf.low_shape)
            mu[i] = B1 * mu[i] + (1 - B1) * r
            nu[i] = B2 * nu[i] + (1 - B2) * r * r
            d = (mu[i] / (1 - B1 ** t)) / (np.sqrt(nu[i] / (1 - B2 ** t)) + EPS)
            if channel:
                ax = -2 if lf.left else -1
                s = (np.sqrt((d ** 2).sum(ax, keepdims=True))
                     / (np.sqrt((r ** 2).sum(ax, keepdims=True)) + 1e-8))
            else:
                s = (np.sqrt((d ** 2).sum((-2, -1), keepdims=True))
                     / (np.sqrt((r ** 2).sum((-2, -1), keepdims=True)) + 1e-8))
            gt = g * s
            n = np.sqrt((gt ** 2).sum((-2, -1)))
            if step > 0:
                lim = np.maximum(n / (prev[i] + 1e-8), GAMMA) / GAMMA
                gt, n = gt / lim[..., None, None], n / lim
            prev[i] = n
            upd.append(-LR * scale * gt)
        out.append(upd)
    return out


@pytest.mark.parametrize("mini", [False, True])
def test_matches_float64_numpy_reference(mini):
    params = _params(jax.random.key(0))
    tx = (apollo_mini(LR, update_proj_gap=GAP, scale=2.0) if mini
          else apollo(LR, rank=RANK, update_proj_gap=GAP, scale=1.5))
    state = tx.init(params)
    # step 4 has 10x larger gradients: the norm-growth limiter must act
    grads_seq = [_grads(jax.random.key(10 + s), params, 10.0 if s == 4 else 1.0) for s in range(7)]
    ref = _np_apollo(params, grads_seq, state, 1 if mini else RANK, 2.0 if mini else 1.5,
                     channel=not mini)
    update = jax.jit(tx.update)
    norms = []
    for step, grads in enumerate(grads_seq):
        upd, state = update(grads, state, params)
        for got, want in zip(jax.tree_util.tree_leaves(upd), ref[step]):
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4,
                                       atol=2e-5 * np.abs(want).max())
        norms.append(np.asarray(jnp.linalg.norm(upd["proj"]["kernel"])))
    assert norms[4] <= GAMMA * norms[3] * (1 + 1e-5)   # limited
    assert int(state.inner.count) == len(grads_seq)


def test_scaling_factors_channel_and_tensor():
    # first step: update = -lr * G * s, so s is read off the update and checked vs numpy
    params = {"w": {"kernel": jax.random.normal(jax.random.key(1), (9, 21))}}
    g = jax.random.normal(jax.random.key(2), (9, 21))
    for tx, channel in ((apollo(1.0, rank=3), True), (apollo_mini(1.0, scale=1.0), False)):
        state = tx.init(params)
        upd, _ = jax.jit(tx.update)({"w": {"kernel": g}}, state, params)
        s_got = -np.asarray(upd["w"]["kernel"], np.float64) / np.asarray(g, np.float64)
        lf = matrix_plan(params, 3 if channel else 1, 256, "kernel", None, "test")[0]
        p = np.asarray(random_projections(state.inner.key, 0, [lf])[0], np.float64)
        r = p @ np.asarray(g, np.float64)  # 9 <= 21: left projection [r, 21]
        d = r / (np.abs(r) + EPS)          # Adam's first bias-corrected step
        if channel:
            s = np.linalg.norm(d, axis=0) / (np.linalg.norm(r, axis=0) + 1e-8)
            np.testing.assert_allclose(s_got, np.broadcast_to(s, (9, 21)), rtol=1e-4)
        else:
            s = np.linalg.norm(d) / (np.linalg.norm(r) + 1e-8)
            np.testing.assert_allclose(s_got, np.full((9, 21), s), rtol=1e-4)
        assert np.ptp(s_got) > 0 if channel else np.ptp(s_got) < 1e-4 * s


def test_projection_is_regenerated_every_gap_and_not_stored():
    params = {"a": {"kernel": jnp.ones((80, 300))}, "b": {"kernel": jnp.ones((3, 90, 70))}}
    plan = matrix_plan(params, 64, 256, "kernel", None, "test")
    key = apollo(rank=64).init(params).inner.key
    p0, p0b, p1 = (random_projections(key, period, plan) for period in (0, 0, 1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, p0, p0b)
    assert [p.shape for p in p0] == [(64, 80), (3, 64, 70)]
    assert float(jnp.abs(p0[0] - p1[0]).max()) > 0.1 and float(jnp.abs(p0[1] - p1[1]).max()) > 0.1
    assert float(jnp.abs(p0[1][0] - p0[1][1]).max()) > 0.1  # each stacked layer its own draw
    # Gaussian with variance 1/r (JL scaling): 5,120 and 13,440 samples
    for p in p0:
        assert abs(float(jnp.var(p)) * 64 - 1) < 0.1 and abs(float(jnp.mean(p))) < 0.02
    st = apollo(rank=64).init(params).inner
    assert [x.shape for x in st.mu] == [(64, 300), (3, 90, 64)]
    assert [n.shape for n in st.norm] == [(), (3,)]
    assert st.key.dtype == jnp.uint32 and st.key.size == 2  # a key, not the projections


def test_apollo_mini_state_is_rank_one():
    params = _params(jax.random.key(3))
    st = apollo_mini().init(params).inner
    shapes = dict(zip(["layers", "norm", "proj"], [x.shape for x in st.mu]))
    assert shapes == {"layers": (2, 1, 29), "norm": (2, 29), "proj": (31, 1)}
    assert [None if n is None else n.shape for n in st.norm] == [(2,), None, ()]


def test_rank_and_argument_errors():
    params = _params(jax.random.key(4))
    with pytest.raises(ValueError, match=r"'proj/kernel'.*max rank min\(m, n\) = 11"):
        apollo(rank=12).init(params)
    with pytest.raises(ValueError, match=r"'layers/kernel'.*max rank min\(m, n\) = 13"):
        ml.optim.state_bytes("apollo", params, rank=14)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        apollo(rank=-2)
    with pytest.raises(ValueError, match="scale_type must be one of"):
        apollo(scale_type="row")
    with pytest.raises(ValueError, match="limiter"):
        apollo(limiter=0.5)
    with pytest.raises(ValueError, match="update_proj_gap must be a positive int"):
        apollo_mini(update_proj_gap=0)
    with pytest.raises(ValueError, match="include=.*not a valid regex"):
        apollo(include="[")
    with pytest.warns(UserWarning, match="apollo_mini: no parameter is projected"):
        apollo_mini(exclude="kernel").init(params)
    tx = apollo(rank=2, weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay needs params"):
        tx.update(_grads(jax.random.key(5), params), tx.init(params))


@pytest.mark.parametrize("name,kwargs", [
    ("apollo", {}), ("apollo", {"rank": 5}), ("apollo", {"rank": 2, "state_dtype": "bfloat16"}),
    ("apollo", {"rank": 3, "exclude": "proj", "scale_type": "tensor"}),
    ("apollo_mini", {}), ("apollo_mini", {"include": None, "state_dtype": "bfloat16"}),
])
def test_state_bytes_exact(name, kwargs):
    params = _params(jax.random.key(6))
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    expect = tree_bytes(ml.optim.get(name, **kwargs).init(params))
    assert ml.optim.state_bytes(name, params, **kwargs) == expect
    assert ml.optim.state_bytes(name, shapes, **kwargs) == expect


def test_llama2_7b_abstract_bytes():
    big = ml.models.load("llama2-7b", dtype="bfloat16")   # abstract, nothing allocated
    adamw = ml.optim.state_bytes("adamw", big.params)
    for name, kw in (("apollo", {"rank": 256}), ("apollo_mini", {})):
        exact = tree_bytes(jax.eval_shape(ml.optim.get(name, **kw).init, big.params))
        assert exact == ml.optim.state_bytes(name, big.params, **kw) < adamw
        print(f"llama2-7b {name} {kw}: {exact / 2**30:.2f} GiB = {exact / adamw:.2%} of fp32 AdamW")


def test_nonfinite_gradient_skips_step_and_jit_matches_eager():
    params = _params(jax.random.key(7))
    del params["layers"]  # keep the eager (op-by-op) run short
    tx = apollo(rank=RANK, update_proj_gap=GAP)
    state = tx.init(params)
    grads = _grads(jax.random.key(8), params)
    update = jax.jit(tx.update)
    u_eager, s_eager = tx.update(grads, state, params)
    u_jit, s_jit = update(grads, state, params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)  # noqa: E731
    jax.tree_util.tree_map(close, (u_eager, s_eager), (u_jit, s_jit))
    bad = _grads(jax.random.key(9), params)
    bad["norm"]["scale"] = bad["norm"]["scale"].at[1, 2].set(jnp.inf)
    u, s2 = update(bad, s_jit, params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(u))
    jax.tree_util.tree_map(np.testing.assert_array_equal, s2, s_jit)


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_minimizes_least_squares(name):
    kx, kw = jax.random.split(jax.random.key(10))
    x = jax.random.normal(kx, (96, 30))
    y = x @ jax.random.normal(kw, (30, 50))

    def loss(p):
        return jnp.mean(jnp.square(x @ p["dense"]["kernel"] - y))

    kw = {"rank": 8, "learning_rate": 0.03} if name == "apollo" else {"learning_rate": 0.01}
    tx = ml.optim.get(name, update_proj_gap=25, **kw)
    params = {"dense": {"kernel": jnp.full((30, 50), 0.01)}}

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
    print(f"{name} least squares: {float(losses[0]):.3f} -> {float(final):.4f}")
    assert float(final) < 0.01 * float(losses[0])


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_trains_tiny_llama_and_profile_matches(tiny, name):  # conftest's session tiny Llama
    losses = train_tiny_and_profile(tiny, name)
    print(f"tiny Llama, {name}:", [round(x, 3) for x in losses])
