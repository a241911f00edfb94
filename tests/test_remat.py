"""The remat pass: every policy leaves loss and gradients unchanged, saves memory in
the order the policies promise, offloads to host memory where asked, and rejects
policies and names it does not know."""
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

import memlab as ml
from memlab.model import Workload
from memlab.models.llama import ACTIVATION_NAMES, REMAT_POLICIES
from memlab.passes.remat import tagged_names

POLICIES = sorted(REMAT_POLICIES) + ["save:qkv,attn_out", "save:mlp_hidden",
                                      "offload:qkv,mlp_hidden", "save:attn_out;offload:qkv"]


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(11), (3, 20), 0, 256)  # T = 19: odd


def _loss(model, tokens):
    def loss(params):
        return ml.memory.next_token_loss(model.apply(params, tokens[:, :-1]), tokens[:, 1:])
    return loss


@pytest.fixture(scope="module")
def results(tiny, tokens):
    """(loss, grads) of the plain model and of every policy, from one compiled program."""
    models = {p: ml.passes.remat(p)(tiny) for p in POLICIES}
    for policy, model in models.items():
        assert model.module.remat == policy
    models["none"] = tiny
    fn = jax.jit(lambda params: {p: jax.value_and_grad(_loss(m, tokens))(params)
                                 for p, m in models.items()})
    return fn(tiny.params)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_keeps_loss_and_gradients(results, policy):
    value, grads = results[policy]
    chex.assert_trees_all_close(value, results["none"][0], atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(grads, results["none"][1], atol=1e-6, rtol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # not all zero


def test_pass_is_recorded_and_estimate_unchanged(tiny):
    model = ml.compose(ml.passes.cast("bfloat16"), ml.passes.remat("nothing_saveable"))(tiny)
    assert [p.name for p, _ in model.history] == ["cast(bfloat16)", "remat(nothing_saveable)"]
    current = {"params": 123, "gradients": 456}
    assert model.history[-1][0].estimate_bytes(current, tiny.spec,
                                               Workload("train", 2, 8)) == current


# -- memory: compiled temp bytes of a scanned train step --------------------------
@pytest.fixture(scope="module")
def train_temps():
    """temp bytes of one SGD train step (4 scanned layers, B=4, T=256) per policy."""
    cfg = ml.models.config("tiny", n_layers=4, d_model=64, d_ff=256, n_heads=4, n_kv_heads=2,
                           head_dim=16)
    base = ml.models.abstract(cfg)
    temps = {}
    for policy in (None, "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable"):
        model = base if policy is None else ml.passes.remat(policy)(base)
        temps[policy] = ml.memory.profile(model, "train", batch=4, seq=256,
                                          optimizer="sgd").temp_bytes
    return temps


def test_nothing_saveable_cuts_train_temp_2x(train_temps):
    # measured 37.1 MiB -> 15.8 MiB (2.35x); the no-remat step saves gate and up only
    # (the gated unit's custom VJP) and no attention scores (blocked attention's VJP)
    assert train_temps[None] >= 2 * train_temps["nothing_saveable"], train_temps


def test_policies_save_in_order(train_temps):
    # measured 15.8 <= 28.5 <= 37.1 MiB, and dots_saveable 41.5 MiB
    t = train_temps
    assert t["nothing_saveable"] <= t["dots_with_no_batch_dims_saveable"] < t[None], t
    # dots_saveable also keeps the batched dots, the [B, H, T, T] attention scores, which
    # the step without remat never stores (its attention recomputes them from the lse)
    assert t["dots_with_no_batch_dims_saveable"] < t["dots_saveable"], t
    assert t["dots_saveable"] > t[None], t


# -- offload to host ---------------------------------------------------------------
def _host_transfers(jaxpr):
    """(to host, to device) counts of device_put equations anywhere in ``jaxpr``."""
    counts = [0, 0]

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "device_put":
                for v_in, v_out in zip(eqn.invars, eqn.outvars):
                    src = getattr(v_in.aval, "memory_space", None)
                    dst = getattr(v_out.aval, "memory_space", None)
                    counts[0] += "host" in str(dst).lower() and "host" not in str(src).lower()
                    counts[1] += "host" in str(src).lower() and "host" not in str(dst).lower()
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr)
    return tuple(counts)


@pytest.mark.parametrize("policy, n_offloaded", [
    ("offload:qkv,mlp_hidden", 4),  # q, k, v and the MLP hidden of the scanned layer
    ("offload_dots_with_no_batch_dims", None),
])
def test_offload_moves_residuals_to_pinned_host(tiny, tokens, policy, n_offloaded):
    model = ml.passes.remat(policy)(tiny)
    grad_fn = jax.grad(_loss(model, tokens))
    to_host, to_device = _host_transfers(jax.make_jaxpr(grad_fn)(tiny.params).jaxpr)
    assert to_host == to_device > 0
    if n_offloaded is not None:
        assert to_host == n_offloaded
    plain_to_host, _ = _host_transfers(jax.make_jaxpr(jax.grad(_loss(tiny, tokens)))(
        tiny.params).jaxpr)
    assert plain_to_host == 0
    # XLA:CPU drops placements (host memory is device memory there; the policy compiles
    # and is exact on CPU: see test_every_policy_keeps_loss_and_gradients); a GPU lowering
    # carries each move to host as annotate_device_placement(_xla_buffer_placement="pinned_host")
    gpu_text = jax.jit(grad_fn).trace(tiny.params).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r'_xla_buffer_placement = "pinned_host"', gpu_text)) == to_host


# -- plain models: jax.checkpoint over the whole apply ------------------------------
class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, square: bool = False):
        h = checkpoint_name(jnp.tanh(nn.Dense(37)(x)), "hidden")
        h = checkpoint_name(nn.gelu(nn.Dense(29)(h)), "hidden2")
        y = nn.Dense(5)(h)
        return y * y if square else y


@pytest.fixture(scope="module")
def plain():
    x = jax.random.normal(jax.random.key(3), (6, 13))
    net = _Net()
    params = jax.jit(net.init)(jax.random.key(4), x)["params"]
    return ml.Model(module=net, params=params), x


@pytest.mark.parametrize("policy", ["nothing_saveable", "save:hidden;offload:hidden2"])
def test_plain_flax_model_is_wrapped_in_checkpoint(plain, policy):
    base, x = plain
    model = ml.passes.remat(policy)(base)
    assert model.module is base.module and len(model.wrappers) == 1

    def loss(m):
        return lambda p, x: jnp.sum(jnp.sin(m.apply(p, x, True)))  # positional static flag

    ref = jax.jit(jax.value_and_grad(loss(base), argnums=(0, 1)))(base.params, x)
    got = jax.jit(jax.value_and_grad(loss(model), argnums=(0, 1)))(base.params, x)
    chex.assert_trees_all_close(got, ref, atol=1e-6, rtol=1e-5)
    def remats(m):  # jax.checkpoint equations (they carry the policy)
        return [e for e in jax.make_jaxpr(loss(m))(base.params, x).jaxpr.eqns
                if "policy" in e.params]

    assert len(remats(model)) == 1 and not remats(base)


def test_function_model_and_its_names():
    def fn(params, x):
        return jnp.sum(checkpoint_name(jnp.tanh(x @ params["w"]), "act") @ params["v"])

    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    params = {"w": jax.random.normal(k1, (7, 9)), "v": jax.random.normal(k2, (9,))}
    x = jax.random.normal(k3, (4, 7))
    base = ml.Model(fn=fn, params=params)
    ref = jax.jit(jax.grad(base.apply))(params, x)
    got = jax.jit(jax.grad(ml.passes.remat("save:act")(base).apply))(params, x)
    chex.assert_trees_all_close(got, ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"names \['hidden'\].*tags only \['act'\]"):
        jax.jit(jax.grad(ml.passes.remat("offload:hidden")(base).apply))(params, x)


def test_tagged_names_see_through_scan_and_custom_vjp(tiny):
    tokens = jnp.zeros((1, 3), jnp.int32)
    assert tagged_names(lambda p: tiny.apply(p, tokens), tiny.params) == set(ACTIVATION_NAMES)


# -- bad input ---------------------------------------------------------------------
def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"remat policy 'fastest' is unknown; choose one of "
                                         r"\['dots_saveable'.*'nothing_saveable'.*save:"):
        ml.passes.remat("fastest")
    for bad in ("save:", "offload:,", "save:qkv;save:attn_out", "keep:qkv"):
        with pytest.raises(ValueError, match="is unknown"):
            ml.passes.remat(bad)
    with pytest.raises(ValueError, match=r"both saves and offloads \['qkv'\]"):
        ml.passes.remat("save:qkv;offload:qkv")
    with pytest.raises(TypeError, match="remat policy must be a string"):
        ml.passes.remat(jax.checkpoint_policies.nothing_saveable)


def test_names_the_model_never_tags(tiny, plain):
    with pytest.raises(ValueError, match=r"names \['mlp_out'\], which the model never tags; "
                                         r"it tags only \['attn_out', 'mlp_hidden', 'qkv'\]"):
        ml.passes.remat("save:qkv,mlp_out")(tiny)
    base, x = plain
    with pytest.raises(ValueError, match=r"never tags; it tags only \['hidden', 'hidden2'\]"):
        ml.passes.remat("save:qkv")(base).apply(base.params, x)
    untagged = ml.Model(fn=lambda p, x: x * p, params=jnp.float32(2.0))
    with pytest.raises(ValueError, match="it tags none .*checkpoint_name"):
        ml.passes.remat("save:qkv")(untagged).apply(untagged.params, x)
