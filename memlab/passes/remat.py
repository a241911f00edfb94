"""The remat pass: gradient checkpointing (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost") with JAX checkpoint policies chosen by name.

    model = ml.passes.remat("nothing_saveable")(model)           # keep only each layer's input
    model = ml.passes.remat("save:qkv,attn_out")(model)          # keep these named activations
    model = ml.passes.remat("offload:qkv,mlp_hidden")(model)     # move them to pinned host memory

Policies (``memlab.models.llama.REMAT_POLICIES``): ``nothing_saveable``,
``dots_with_no_batch_dims_saveable``, ``dots_saveable``, ``everything_saveable``,
``offload_dots_with_no_batch_dims``; plus ``save:<names>``, ``offload:<names>`` and
``save:<names>;offload:<names>`` over the activations the model tags with
``jax.ad_checkpoint.checkpoint_name`` (memlab's Llama tags ``qkv``, ``attn_out``,
``mlp_hidden``).  A name the model never tags is an error listing the names it does.

* memlab's Llama gets the policy on its scanned layer (``module.clone(remat=policy)``):
  one layer's activations are live at a time in the backward, the rest recomputed.
* any other model (a plain Flax module or ``Model(fn=...)``) gets its whole apply
  wrapped in ``jax.checkpoint(policy=...)``: the forward keeps only what the policy
  saves and the backward recomputes the rest in one go, so the peak is only lower
  when the forward's outputs are what dominates; per-layer savings need the model
  to remat its own layers (``nn.remat`` under ``nn.scan``).  Non-array positional
  arguments and all keyword arguments are closed over (static).

Offload moves the named residuals to ``pinned_host`` and back (device memory saved on
GPU/TPU).  On CPU the host *is* the device: it compiles and gives the same gradients,
but XLA:CPU drops the placement annotations and saves nothing.

The estimate is unchanged: activations are not a category of memlab's analytic
estimate (their size is what XLA's scheduler decides; read it from
``memory.profile(...).temp_bytes``).  The pass is recorded on ``model.history``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from memlab.memory.bytes import abstractify
from memlab.model import Model, Pass
from memlab.models.llama import Llama, remat_names, remat_policy
from memlab.passes import PASSES


def _walk(jaxpr, found: set) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "name":  # jax.ad_checkpoint.checkpoint_name
            found.add(eqn.params["name"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    _walk(inner, found)


def tagged_names(fn: Callable, *args) -> set:
    """Every ``checkpoint_name`` that ``fn(*args)`` tags, through scans, remats and
    custom derivatives (args may be ``jax.ShapeDtypeStruct``: nothing runs)."""
    found: set = set()
    _walk(jax.make_jaxpr(fn)(*args).jaxpr, found)
    return found


def check_names(policy: str, tagged: Iterable[str]) -> None:
    """Raise if ``policy`` refers to an activation name not in ``tagged``."""
    wanted = [n for names in remat_names(policy).values() for n in names]
    tagged = set(tagged)
    missing = [n for n in wanted if n not in tagged]
    if missing:
        have = (f"it tags only {sorted(tagged)}" if tagged else
                "it tags none (mark activations with jax.ad_checkpoint.checkpoint_name)")
        raise ValueError(f"remat: policy {policy!r} names {missing}, which the model never "
                         f"tags; {have}")


def _is_dynamic(arg: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(arg)
    return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves)


def checkpoint_wrapper(policy: str) -> Callable:
    """``apply -> apply`` running ``apply`` under ``jax.checkpoint`` with ``policy``."""
    jax_policy = remat_policy(policy)

    def wrap(apply):
        def wrapped(params, *args, **kwargs):
            static = {i: a for i, a in enumerate(args) if not _is_dynamic(a)}
            dynamic = [a for i, a in enumerate(args) if i not in static]

            def inner(params, dynamic):
                it = iter(dynamic)
                full = [static[i] if i in static else next(it) for i in range(len(args))]
                return apply(params, *full, **kwargs)

            if remat_names(policy):
                check_names(policy, tagged_names(inner, params, dynamic))
            return jax.checkpoint(inner, policy=jax_policy)(params, dynamic)

        wrapped.__name__ = f"remat({policy})"
        return wrapped

    return wrap


@PASSES.register("remat")
def remat(policy: str = "nothing_saveable") -> Pass:
    remat_policy(policy)  # unknown names raise here, listing the valid ones

    def transform(model: Model, calib) -> Model:
        if isinstance(model.module, Llama):
            if remat_names(policy):
                tokens = jnp.zeros((1, 2), jnp.int32)
                check_names(policy, tagged_names(lambda p: model.apply(p, tokens),
                                                 abstractify(model.params)))
            return model.replace(module=model.module.clone(remat=policy))
        return model.wrap(checkpoint_wrapper(policy))

    def estimate(current, spec, workload):
        return current  # activations are not an estimate category (see the module doc)

    return Pass(f"remat({policy})", transform, estimate)
