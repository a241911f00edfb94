"""The shard pass: params onto a device mesh by rules, activations constrained.

    mesh = ml.shard.mesh((4, 2), ("data", "model"))
    model = ml.passes.shard(mesh, ml.shard.fsdp_tp("data", "model"))(model)

ZeRO-3 / FSDP (Rajbhandari et al. 2020), Megatron tensor parallelism (Shoeybi
et al. 2019) and sequence parallelism with ring attention (Li et al. 2021; Liu
et al. 2023) on JAX's own engine: each parameter gets a ``NamedSharding`` from
:func:`memlab.shard.param_spec` (column-parallel q/k/v/gate/up/lm_head,
row-parallel o/down, vocab-parallel embedding, FSDP on the largest divisible
axis, never the stacked layer axis of ``nn.scan`` params), the model's apply is
wrapped so params, the token batch and the output carry
``with_sharding_constraint`` (batch over the data axes, sequence over the
context axis), and with a context axis the training forward's attention runs as
ring attention (:mod:`memlab.nn.ring_attention`): the pass sets the model's static
``dispatch.attention_hook`` to a ``RingAttention`` (calls with a KV cache run
without it).  GSPMD inserts the collectives, so results
equal the unsharded model's.

Gradients follow the params' shardings; optimizer states (optax's, memlab's
8-bit and 4-bit block states) are sharded with ``model.extra("shard").put_state``.
KV caches (inference): the wrapper constrains the cache going in and coming out
of every prefill / decode call with :func:`memlab.shard.cache_specs`: rows over
the batch axes, KV heads over the tensor axis (Megatron splits whole heads, so each
device keeps the cache of its own heads), for the dense cache and the
``kv_compress`` policies (codes, scales, positions, low-rank factors: every leaf's
row and head axes are found from its shapes).  ``model.extra("shard").make_cache``
allocates a cache in its shards (``memlab.generate`` uses it), ``put_cache`` places
one.  Paged pools have no row axis (any page serves any row) and split over heads
only; HeadInfer's host-memory cache is refused with an error.

The estimate gives **per-device** bytes: params, gradients and optimizer state
divided leaf by leaf as the specs say (small replicated leaves counted whole),
inputs divided over the batch axes, the ``kv_cache`` as the cache specs say (apply
``kv_compress`` before ``shard`` so the replay sees the policy).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
from jax.sharding import NamedSharding

from memlab import dispatch
from memlab import shard as sh
from memlab.model import Model, Pass
from memlab.passes import PASSES


def _check_heads(spec, mesh, strategy) -> None:
    """Tensor parallelism splits attention heads: the axis must divide both head counts."""
    if strategy.tensor is None or not hasattr(spec, "n_kv_heads"):
        return
    n = mesh.shape[strategy.tensor]
    for f in ("n_heads", "n_kv_heads"):
        h = getattr(spec, f)
        if h % n:
            raise ValueError(
                f"shard: {f}={h} is not divisible by the tensor-parallel mesh axis "
                f"{strategy.tensor!r} of size {n} (Megatron splits whole heads); the nearest "
                f"feasible {strategy.tensor!r} size is {sh._feasible([h], n)}")


def _wrapper(sharded: sh.Sharded):
    mesh, strategy = sharded.mesh, sharded.strategy

    def wrap(apply):
        def wrapped(params, tokens, *args, **kwargs):
            params = sharded.constrain(params, sharded.param_specs(params))
            cache = kwargs.get("cache", args[0] if args else None)
            training = cache is None
            if cache is not None:  # rows over the batch axes, KV heads over the tensor axis
                cache = sharded.constrain(cache, sharded.cache_specs(cache))
                if "cache" in kwargs:
                    kwargs = dict(kwargs, cache=cache)
                else:
                    args = (cache,) + tuple(args[1:])
            spec = sharded.batch_spec(tokens.shape, seq_axis=training)
            tokens = jax.lax.with_sharding_constraint(tokens, NamedSharding(mesh, spec))
            current = dispatch.active()
            if not training and current is not None and current.attention_hook is not None:
                # the ring (the model's static hook) is for the sequence-sharded training forward
                with dispatch.applying(current.replace(attention_hook=None)):
                    out = apply(params, tokens, *args, **kwargs)
            else:
                out = apply(params, tokens, *args, **kwargs)
            if isinstance(out, jax.Array) and out.shape[:2] == tokens.shape[:2]:
                out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, spec))
            elif cache is not None and isinstance(out, tuple) and len(out) == 2:
                logits, new_cache = out  # the updated cache keeps the input's sharding
                out = (logits, sharded.constrain(new_cache, sharded.cache_specs(new_cache)))
            return out
        wrapped.__name__ = "shard_constraints"
        return wrapped
    return wrap


def _layer_shardings(model: Model, sharded: sh.Sharded):
    """One layer's shardings for memlab's Llama (its ``[L, ...]`` specs without the layer
    axis, which is never sharded), or None for other models."""
    from memlab.models.llama import Llama
    from memlab.offload import LAYERS
    if not isinstance(model.module, Llama) or LAYERS not in model.params \
            or model.module.stream is not None:
        return None
    specs = sharded.param_specs(model.params)[LAYERS]
    flat = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, sh.P))
    return tuple(NamedSharding(sharded.mesh, sh.P(*tuple(s)[1:])) for s in flat)


def _scaled(value: int, exact_global: int, exact_device: int) -> int:
    """Per-device bytes: exact when the category is what the shapes say, else scaled."""
    if value == exact_global:
        return exact_device
    return int(round(value * exact_device / max(exact_global, 1)))


def _abstract_cache(spec, policy, batch: int, max_len: int):
    """The cache a profile of ``batch`` rows and ``max_len`` positions builds, as shapes."""
    from memlab.cache import Dense, init_cache
    return jax.eval_shape(lambda: init_cache(policy or Dense(), spec, batch, max_len))


@PASSES.register("shard")
def shard(mesh, strategy, optimizer: Optional[str] = "adamw") -> Pass:
    """Shard a model's params over ``mesh`` by ``strategy`` (``memlab.shard.dp/fsdp/tp/
    fsdp_tp/sp``).  ``optimizer`` names the optimizer the estimate divides the state of."""
    sh.check_strategy(mesh, strategy)
    sharded = sh.Sharded(mesh, strategy)

    # The abstract params (and trainable part) of each model this pass sharded, by spec:
    # what earlier passes stored (quantized codes, LoRA adapters), for an exact estimate.
    seen: dict = {}
    policies: dict = {}   # the KV policy (kv_compress) of each model this pass sharded, by spec

    def transform(model: Model, calib) -> Model:
        _check_heads(model.spec, mesh, strategy)
        policy = model.extra("kv_policy")
        if policy is not None:  # a policy the pass cannot place fails here, not at decode
            sh.check_cache_policy(policy)
        params = sharded.put_params(model.params)  # raises on a mesh that does not divide
        from memlab.memory.bytes import abstractify
        from memlab.model import split_trainable
        try:
            seen[model.spec] = (abstractify(model.params),
                                abstractify(split_trainable(model)[0]))
            policies[model.spec] = policy
        except TypeError:  # an unhashable spec: the estimate works from spec shapes
            pass
        out = model.replace(params=params)
        layer_shardings = _layer_shardings(model, sharded)
        if layer_shardings is not None:
            out = out.replace(module=model.module.clone(layer_shardings=layer_shardings))
        if strategy.context is not None:  # static data: part of the jit cache key
            from memlab.nn.ring_attention import RingAttention
            out = out.with_dispatch(attention_hook=RingAttention(
                mesh, strategy.context, tuple(strategy.batch or ())))
        wrap = _wrapper(sharded)
        return out.wrap(wrap).with_extras(shard=sharded)

    def estimate(current, spec, workload):
        shapes_fn = getattr(spec, "param_shapes", None)
        if shapes_fn is None:
            return current
        from memlab.memory.bytes import tree_bytes
        from memlab.model import Model as _M, split_trainable
        from memlab.memory.estimate import TRAINABLE_SHAPES
        try:
            record = seen.get(spec)
        except TypeError:
            record = None
        if record is not None:
            shapes, trainable = record
        else:
            shapes = shapes_fn()
            trainable, _ = split_trainable(_M(params=shapes, fn=lambda p: p), shapes)
        out = dict(current)
        narrowed = out.get(TRAINABLE_SHAPES) is not None
        if narrowed:  # LoRA before us: only the adapters have gradients and state
            trainable = out.pop(TRAINABLE_SHAPES)
        g_params, d_params = tree_bytes(shapes), sharded.param_bytes(shapes)
        if "params" in out:
            out["params"] = _scaled(out["params"], g_params, d_params)
        if "gradients" in out:
            out["gradients"] = _scaled(tree_bytes(trainable) if narrowed else out["gradients"],
                                       tree_bytes(trainable), sharded.param_bytes(trainable))
        if "optimizer_state" in out and optimizer is not None:
            from memlab import optim
            state = jax.eval_shape(optim.get(optimizer).init, trainable)
            out["optimizer_state"] = _scaled(
                tree_bytes(state) if narrowed else out["optimizer_state"], tree_bytes(state),
                sharded.state_bytes(state, trainable))
        if "kv_cache" in out and workload.task in ("prefill", "decode"):
            try:
                policy = policies.get(spec)
            except TypeError:
                policy = None
            cache = _abstract_cache(spec, policy, workload.batch, workload.seq)
            out["kv_cache"] = _scaled(out["kv_cache"], tree_bytes(cache),
                                      sharded.cache_bytes(cache))
        if "inputs" in out and strategy.batch:
            n = math.prod(mesh.shape[a] for a in strategy.batch)
            if workload.batch % n == 0:
                out["inputs"] = out["inputs"] // n
        return out

    return Pass(f"shard({strategy.name}, {dict(mesh.shape)})", transform, estimate)
