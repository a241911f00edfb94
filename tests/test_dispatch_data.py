"""Dispatch is data: a model's implementation choices are static fields of the Model
(part of the jit cache key), one nn.Dense interceptor runs quantized kernels then
LoRA in either pass order, and one backend vocabulary is spoken everywhere."""
import pathlib
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab import dispatch
from memlab.model import path_str
from memlab.nn.dense_dispatch import DenseDispatch
from memlab.quant.qarray import QArray

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)


def _counting_jit(fn):
    """A jitted ``fn`` and the list it appends the model's Dispatch to at each trace."""
    traces = []

    @jax.jit
    def f(model, *args):
        traces.append(model.dispatch)
        return fn(model, *args)
    return f, traces


# ---------------------------------------------------------------------------
# 1. the choice is part of the jit cache key
# ---------------------------------------------------------------------------
def test_attention_choice_is_part_of_the_jit_cache_key(tiny):
    chunked = tiny.with_dispatch(attention="chunked")
    assert chunked.dispatch != tiny.dispatch and chunked.params is tiny.params
    f, traces = _counting_jit(lambda m, t: m(t))
    auto = f(tiny, TOKENS)
    with ml.nn.use_attention("chunked"):  # a trace-time override: not in the cache key
        f(tiny, TOKENS)
    assert len(traces) == 1
    out = f(chunked, TOKENS)  # the same function, the other model: a second trace
    assert [d.attention for d in traces] == ["auto", "chunked"]
    f(chunked, TOKENS)
    assert len(traces) == 2
    # two compiled programs (naive scores vs. chunked loops), the same attention values
    assert f.lower(tiny, TOKENS).as_text() != f.lower(chunked, TOKENS).as_text()
    chex.assert_trees_all_close(np.asarray(out), np.asarray(auto),
                                atol=1e-4 * float(np.abs(auto).max()), rtol=0)


def test_the_models_choice_beats_the_trace_time_override(tiny):
    chunked = tiny.with_dispatch(attention="chunked")
    want = jax.jit(lambda m, t: m(t)).lower(chunked, TOKENS).as_text()
    with pytest.warns(DeprecationWarning, match=r"use_attention\('naive'\) is ignored"):
        with ml.nn.use_attention("naive"):
            got = jax.jit(lambda m, t: m(t)).lower(chunked, TOKENS).as_text()
    assert got == want
    # outside a model the override still drives direct calls
    q = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
    with ml.nn.use_attention("chunked"):
        text = jax.jit(lambda q: ml.nn.attention(q, q, q, causal=True)).lower(q).as_text()
    assert text != jax.jit(lambda q: ml.nn.attention(q, q, q, causal=True)).lower(q).as_text()


def test_quantized_matmul_backend_is_part_of_the_jit_cache_key(tiny):
    q = ml.passes.quantize(ml.quant.int8())(tiny)
    kern = q.with_dispatch(qmatmul="pallas_interpret")  # an alias: one vocabulary
    assert kern.dispatch.qmatmul == "interpret" and q.dispatch.qmatmul == "auto"
    seen = []
    real = ml.quant.matmul.kernel_backend

    def spy(mode=None):
        seen.append(real(mode))
        return seen[-1]
    f, traces = _counting_jit(lambda m, t: m(t))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ml.quant.matmul, "kernel_backend", spy)
        a = f.lower(q, TOKENS).as_text()
        b = f.lower(kern, TOKENS).as_text()
    assert len(traces) == 2 and a != b
    assert set(seen) == {None, "interpret"} and seen.index("interpret") > seen.index(None)


def test_cross_entropy_choice_is_part_of_the_jit_cache_key(tiny):
    chunked = tiny.with_dispatch(cross_entropy="chunked")
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 9)), jnp.int32)
    f, traces = _counting_jit(lambda m, p, t: ml.nn.model_loss(m)(p, t))
    naive_loss, chunked_loss = f(tiny, tiny.params, batch), f(chunked, tiny.params, batch)
    assert [d.cross_entropy for d in traces] == ["auto", "chunked"]
    assert f.lower(tiny, tiny.params, batch).as_text() != \
        f.lower(chunked, tiny.params, batch).as_text()
    # float64 reference: the model's logits and a log-softmax in numpy
    logits = np.asarray(tiny(batch[:, :-1]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, np.asarray(batch[:, 1:])[..., None], -1).mean()
    np.testing.assert_allclose([float(naive_loss), float(chunked_loss)], [ref, ref], rtol=1e-5)
    assert ml.nn.loss.loss_impl(chunked) == "chunked"
    with pytest.warns(DeprecationWarning, match="ignored"):
        with ml.nn.use_cross_entropy("naive"):
            assert ml.nn.loss.loss_impl(chunked) == "chunked"
    with ml.nn.use_cross_entropy("naive"):
        assert ml.nn.loss.loss_impl(tiny) == "naive"  # "auto" models defer to the override
    assert ml.nn.loss.loss_impl(chunked, "naive") == "naive"  # an explicit impl wins


def test_ring_attention_hook_is_static_data_of_the_sharded_model(tiny):
    from memlab.nn.ring_attention import RingAttention
    mesh = ml.shard.mesh((2, 4), ("data", "context"))
    one = ml.passes.shard(mesh, ml.shard.sp("context", data="data"))(tiny)
    two = ml.passes.shard(mesh, ml.shard.sp("context", data="data"))(tiny)
    hook = one.dispatch.attention_hook
    assert isinstance(hook, RingAttention) and hook.axis == "context"
    assert hook.batch_axes == ("data",) and hash(hook) == hash(two.dispatch.attention_hook)
    assert one.dispatch == two.dispatch
    assert ml.passes.shard(mesh, ml.shard.fsdp("data"))(tiny).dispatch.attention_hook is None
    calls = []

    def record(q, k, v, scale=None, **mask):
        calls.append(q.shape)
        return hook(q, k, v, scale=scale, **mask)
    ringed = one.with_dispatch(attention_hook=RingAttention(mesh, "context", ("data",)))
    assert ringed.dispatch == one.dispatch
    # the training forward runs the model's hook; a context hook is ignored (and said so)
    with pytest.warns(DeprecationWarning, match="attention_hook is ignored"):
        with ml.nn.attention_hook(record):
            jax.eval_shape(one, TOKENS)
    assert not calls
    # a call with a KV cache runs without the ring: the same logits as the unsharded model
    from memlab.generate import make_cache
    ring_calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RingAttention, "__call__", lambda *a, **k: ring_calls.append(1))
        got, _ = one(TOKENS, cache=make_cache(one, 2, 16))
    want, _ = tiny(TOKENS, cache=make_cache(tiny, 2, 16))
    assert not ring_calls
    chex.assert_trees_all_close(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_dispatch_fields_are_checked_and_speak_one_vocabulary():
    d = dispatch.Dispatch(attention="triton", cross_entropy="interpret", qmatmul="pallas_tpu")
    assert (d.attention, d.cross_entropy, d.qmatmul) == ("pallas_triton", "pallas_interpret",
                                                          "mosaic_tpu")
    assert dispatch.layer_impl("pallas_interpret", ml.nn.IMPLS, "impl") == "interpret"
    assert dispatch.layer_impl("mosaic_tpu", ml.nn.LOSS_IMPLS, "impl") == "pallas_tpu"
    for impl, backend in [("pallas_triton", "triton"), ("pallas_tpu", "mosaic_tpu"),
                          ("pallas_interpret", "interpret"), ("interpret", "interpret")]:
        assert dispatch.kernel_backend_of(impl) == backend
    with pytest.raises(ValueError, match="Dispatch.attention='fast' is not one of"):
        dispatch.Dispatch(attention="fast")
    with pytest.raises(ValueError, match="Dispatch.qmatmul='cudnn'"):
        dispatch.Dispatch(qmatmul="cudnn")
    with pytest.raises(ValueError, match="cross_entropy impl='xla'"):
        ml.nn.use_cross_entropy("xla").__enter__()
    with pytest.raises(TypeError, match="must be hashable"):
        dispatch.Dispatch(attention_hook=type("H", (), {"__call__": lambda s: 0,
                                                        "__hash__": None})())
    with pytest.raises(TypeError, match="dispatch must be a memlab.dispatch.Dispatch"):
        ml.Model(fn=lambda p: p, params={}, dispatch="chunked")
    # the direct call with a kernel backend name runs that kernel (interpret: any device)
    q = jax.random.normal(jax.random.key(2), (1, 16, 2, 16))
    want = ml.nn.attention(q, q, q, causal=True, impl="naive")
    got = ml.nn.attention(q, q, q, causal=True, impl="pallas_interpret")
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------
# 2. one Dense interceptor: quantized kernel, then LoRA, in either pass order
# ---------------------------------------------------------------------------
class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(48)(x))
        return nn.Dense(24, use_bias=False)(x)


def _randomize_adapters(model, seed):
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        model.params, is_leaf=lambda x: isinstance(x, QArray))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    leaves = [jax.random.normal(k, x.shape, x.dtype) * 0.3
              if path_str(p).endswith(("lora_a", "lora_b")) else x for k, (p, x) in zip(keys, flat)]
    return model.replace(params=jax.tree_util.tree_unflatten(treedef, leaves))


def _reference(params, x, alpha, rank):
    """float64 numpy: relu(x W0' + b0) W1' with W' = dequant(W) + (alpha / r) A B."""
    def kernel(p):
        w = np.asarray(p["kernel"].dequantize(jnp.float32), np.float64)
        return w + alpha / rank * (np.asarray(p["lora_a"], np.float64)
                                   @ np.asarray(p["lora_b"], np.float64))
    h = np.maximum(x @ kernel(params["Dense_0"]) + np.asarray(params["Dense_0"]["bias"],
                                                               np.float64), 0)
    return h @ kernel(params["Dense_1"])


@pytest.mark.parametrize("fmt", [ml.quant.int8, lambda: ml.quant.intn(4, 16)])
def test_quantize_and_lora_compose_in_either_order(fmt):
    x = jax.random.normal(jax.random.key(3), (5, 32))
    module = _MLP()
    base = ml.Model(module=module, params=module.init(jax.random.key(0), x)["params"])
    quant = ml.passes.quantize(fmt())
    lora = ml.passes.lora(rank=3, alpha=6.0, rules={r"kernel$": True})
    ql = _randomize_adapters(ml.compose(quant, lora)(base), 4)
    lq = _randomize_adapters(ml.compose(lora, quant)(base), 4)
    for m in (ql, lq):
        dense = [w for w in m.wrappers if isinstance(w, DenseDispatch)]
        assert len(dense) == 1 and dense[0].lora is not None
        assert isinstance(m.params["Dense_1"]["kernel"], QArray)
    assert ql.wrappers == lq.wrappers
    chex.assert_trees_all_equal(ql.params, lq.params)
    y_ql = np.asarray(jax.jit(lambda m, x: m(x))(ql, x))
    y_lq = np.asarray(jax.jit(lambda m, x: m(x))(lq, x))
    np.testing.assert_array_equal(y_ql, y_lq)
    ref = _reference(ql.params, np.asarray(x, np.float64), 6.0, 3)
    np.testing.assert_allclose(y_ql, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    # merging keeps the interceptor only while kernels stay quantized
    merged = ml.passes.lora.merge(ql, requantize=True)
    assert [w.lora for w in merged.wrappers if isinstance(w, DenseDispatch)] == [None]
    assert not any(isinstance(w, DenseDispatch) for w in ml.passes.lora.merge(ql).wrappers)


def test_no_flax_private_internals_are_read():
    root = pathlib.Path(ml.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "_global_interceptor_stack" not in text, path
        assert "from flax.linen.module import _" not in text, path


def test_deprecated_lora_dispatch_still_builds_the_one_interceptor():
    from memlab.passes.lora import LoraConfig, LoraDispatch
    with pytest.warns(DeprecationWarning, match="DenseDispatch"):
        w = LoraDispatch(LoraConfig(rank=2))
    assert isinstance(w, DenseDispatch) and w.config.rank == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from memlab.passes.quantize import dispatch_quantized
        assert dispatch_quantized == DenseDispatch()


def test_streamed_layers_backward_reenters_the_dense_dispatch(tiny):
    """Layer streaming (memlab.offload) traces its custom_vjp backward after the model's
    call returned: the Dense interceptor (quantized kernel + LoRA) must run there too."""
    from memlab.model import merge_trainable, split_trainable
    qlora = ml.compose(ml.passes.quantize(ml.quant.int8()),
                       ml.passes.lora(rank=2, rules={r"^layers/.*kernel$": True}))(tiny)
    qlora = _randomize_adapters(qlora, 6)
    streamed = ml.passes.offload(1, 0)(qlora)
    batch = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 7)), jnp.int32)

    def grads(m):
        tr, fr = split_trainable(m)
        loss = ml.nn.model_loss(m, impl="naive")
        return jax.jit(jax.grad(lambda t: loss(merge_trainable(t, fr), batch)))(tr)
    got, want = grads(streamed), grads(qlora)
    assert jax.tree_util.tree_leaves(want)
    chex.assert_trees_all_close(jax.tree_util.tree_map(np.asarray, got),
                                jax.tree_util.tree_map(np.asarray, want), rtol=2e-5, atol=1e-7)
