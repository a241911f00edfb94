"""Model / Pass / compose / Rules: the contract every pass relies on."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml


class UserMLP(nn.Module):
    """An ordinary Flax model a user wrote: memlab passes address it by path."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(48, name="encoder")(x))
        return nn.Dense(10, name="head")(x)


@pytest.fixture
def user_model():
    m = UserMLP()
    x = jax.random.normal(jax.random.key(0), (3, 20))
    params = m.init(jax.random.key(1), x)["params"]
    return ml.Model(module=m, params=params), x


def test_identity_keeps_outputs_and_records_history(tiny):
    out = ml.compose(ml.passes.identity())(tiny)
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 256)
    chex.assert_trees_all_equal(out(tokens), tiny(tokens))
    assert [p.name for p, _ in out.history] == ["identity"]


def test_cast_halves_exact_bytes_and_stays_close(tiny):
    bf = ml.passes.cast("bfloat16")(tiny)
    assert ml.memory.tree_bytes(bf.params) * 2 == ml.memory.tree_bytes(tiny.params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf.params))
    tokens = jax.random.randint(jax.random.key(3), (2, 11), 0, 256)
    ref = np.asarray(tiny(tokens), np.float64)
    got = np.asarray(bf(tokens), np.float64)
    assert not np.array_equal(ref, got)  # the cast really happened
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())


def test_cast_rules_first_match_wins(tiny):
    rules = {r"embed": None, r"mlp/.*kernel": "yes", r"mlp": None}
    out = ml.passes.cast("bfloat16", rules=rules)(tiny)
    flat = {ml.path_str(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(out.params)[0]}
    assert flat["embed/embedding"] == jnp.float32  # excluded by None
    assert flat["layers/mlp/up_proj/kernel"] == jnp.bfloat16  # first rule that matches
    assert flat["layers/attn/q_proj/kernel"] == jnp.bfloat16  # no rule: default applies


def test_unmatched_rule_is_reported(tiny):
    with pytest.warns(UserWarning, match=r"matched no parameter path: \['nonexistent_layer'\]"):
        ml.passes.cast("bfloat16", rules={"nonexistent_layer": None})(tiny)


def test_bad_regex_and_bad_dtype_are_clear_errors():
    with pytest.raises(ValueError, match=r"regex '\(unclosed' does not compile"):
        ml.passes.cast("bfloat16", rules={"(unclosed": None})
    with pytest.raises(ValueError, match="cast: dtype 'int8' is not supported"):
        ml.passes.cast("int8")
    with pytest.raises(ValueError, match="not a dtype"):
        ml.passes.cast("bfloat17")


def test_composed_model_is_jittable_and_eval_shapeable(tiny):
    plan = ml.compose(ml.passes.identity(), ml.passes.cast("bfloat16", compute=True))
    small = plan(tiny)
    tokens = jax.random.randint(jax.random.key(4), (2, 7), 0, 256)
    jitted = jax.jit(lambda m, t: m(t))(small, tokens)
    chex.assert_trees_all_close(jitted, small(tokens), atol=1e-2)
    shape = jax.eval_shape(lambda m, t: m(t), small, tokens)
    assert shape.shape == (2, 7, 256)
    # The pass itself runs on abstract params: plan a model without allocating it.
    big = plan(ml.models.abstract("llama2-7b"))
    assert big.abstract and big.spec.dtype == "bfloat16"
    leaves = jax.tree_util.tree_leaves(big.params)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    assert ml.memory.tree_bytes(big.params) == 2 * big.spec.param_count()


def test_passes_work_on_a_plain_flax_model(user_model):
    model, x = user_model
    assert ml.param_paths(model) == ["encoder/bias", "encoder/kernel", "head/bias", "head/kernel"]
    out = ml.passes.cast("bfloat16", rules={r"head": None})(model)
    assert out.params["encoder"]["kernel"].dtype == jnp.bfloat16
    assert out.params["head"]["kernel"].dtype == jnp.float32
    chex.assert_trees_all_close(out(x), model(x), atol=0.05, rtol=0.05)


def test_model_from_pure_function():
    def fn(params, x):
        return x @ params["w"]

    w = jax.random.normal(jax.random.key(5), (5, 3))
    model = ml.Model(fn=fn, params={"w": w})
    x = jax.random.normal(jax.random.key(6), (2, 5))
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(x) @ np.asarray(w), rtol=1e-5)
    out = ml.passes.cast("float16")(model)
    assert out.params["w"].dtype == jnp.float16


def test_wrappers_apply_in_order(tiny):
    calls = []

    def tag(name):
        def wrapper(apply):
            def wrapped(params, *a, **k):
                calls.append(name)
                return apply(params, *a, **k)
            return wrapped
        return wrapper

    m = tiny.wrap(tag("inner")).wrap(tag("outer"))
    m(jnp.zeros((1, 3), jnp.int32))
    assert calls == ["outer", "inner"]


def test_contract_errors():
    with pytest.raises(ValueError, match="exactly one of `module`"):
        ml.Model(params={})
    with pytest.raises(TypeError, match="expects a memlab.Model"):
        ml.passes.identity()({"w": 1})
    with pytest.raises(TypeError, match="takes memlab Passes"):
        ml.compose(ml.passes.identity(), lambda m: m)
    with pytest.raises(AttributeError, match="no pass 'quantise'"):
        ml.passes.quantise  # noqa: B018


def test_cast_estimate_matches_real_bytes():
    spec = ml.models.config("tiny")
    p = ml.passes.cast("bfloat16", rules={"embed": None})
    base = {"params": spec.param_count() * 4, "gradients": spec.param_count() * 4}
    est = p.estimate_bytes(base, spec, ml.model.Workload("train", 1, 8))
    real = ml.memory.tree_bytes(p(ml.models.abstract("tiny")).params)
    assert est["params"] == real == est["gradients"]
    assert real < base["params"]
