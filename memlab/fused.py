"""Fused backward and update: each layer is updated as soon as its gradient exists.

LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with
Limited Resources") fuses gradient computation and parameter update, so the
gradients of the whole model never exist at once; GaLore (Zhao et al. 2024) uses
the same per-layer weight update to pre-train a 7B model in 24 GB.  For memlab's
Llama (decoder layers stacked under ``nn.scan``)::

    state = ml.fused.init(model, tx)                       # tx: any optax transform
    step = jax.jit(ml.fused.step_fn(model, tx), donate_argnums=(0, 1))
    params, state, loss = step(params, state, tokens)      # tokens [B, T + 1]

One step:

1. the embedding (``Llama(embed_only=True)``) with its VJP kept;
2. a ``lax.scan`` over the layers keeping only each layer's input (what
   ``remat("nothing_saveable")`` keeps);
3. the final norm, head and loss (``Llama(hidden_in=x)``) and their VJP: the
   head's gradient and the cotangent of the last layer's output;
4. a reverse ``lax.scan``: layer ``l`` is recomputed from its saved input, its VJP
   gives its weight gradient, ``tx`` updates that layer's params and state at once
   and the new values are written into the stacks (the carry); only the cotangent
   flows on;
5. the embedding's gradient, and ``tx`` over the non-layer params.

**Optimizer semantics.**  ``tx`` runs once per layer: the layers' state is
``jax.vmap(tx.init)`` over the layer axis (its leaves are ``[L, ...]``) and the
non-layer params have their own state (:class:`FusedState`).  For transforms that
act leaf by leaf and element by element (AdamW, Adam, SGD, CAME's factored moments
per matrix, GaLore / APOLLO projections per matrix) the result is the same as ``tx``
over the whole tree (tested against it).  Block-wise 8/4-bit states quantize each
layer's slice separately, so their blocks start at layer boundaries (an exact
``tx`` per layer, but not bit-equal to a whole-tree ``tx`` unless a layer's size is
a multiple of the block).  A transform that reads *all* gradients (a global norm:
``optax.clip_by_global_norm``) would see one layer only: pass ``clip_norm=``
instead, which runs LOMO's two passes (the first backward accumulates the global
squared norm without keeping any gradient, the second updates with every
gradient scaled by ``min(1, clip_norm / norm)``: equal to
``optax.chain(optax.clip_by_global_norm(clip_norm), tx)`` for one more backward).  With
``clip_norm`` a step whose loss or gradient norm is not finite is skipped (params and
state unchanged: the norm is known before the first layer updates); without it the
layers are updated before that is known, so there is no skip.

**Host memory.**  With ``ml.passes.offload`` applied (``params["layers"]`` in
``pinned_host``), :func:`init` puts the layers' optimizer state in the same host
memory (its ``[L, m, n, ...]`` stacks; per-layer vectors stay on the device, as the
pass keeps the layers' vectors: :func:`memlab.offload.streams_from_host`) and the
step moves one layer's params and state to the device, updates it there and moves
it back: any optimizer (8-bit, GaLore, APOLLO) with its state in host memory, one
layer of it on the device at a time.  (The step does not use the pass's ``k, p``: it
moves one layer per scan step.)  On XLA:CPU the placements exist at the program
boundary only; XLA:TPU (compiled for a v5e with :mod:`memlab.targets`) reports the
host part apart.

**Device bytes** (resident): params + optimizer state (both updated in place when
donated) + ``L B T d`` saved inputs (compute dtype) + one layer's recompute and
backward + one layer's gradient and update temporaries + the non-layer gradients
and their update.  :func:`estimate_temp` is the planner's form of it.

Limits: full training of float params (no LoRA / quantized base: their trainable
set is small, use :mod:`memlab.train`); no KV cache; no NaN-skip without
``clip_norm``; one device.  On XLA:CPU some ``[L, ...]`` optimizer-state stacks
(8-bit codes, float32 moments) are copied inside the update loop instead of being
updated in place; the bf16 weights and APOLLO/GaLore states update in place.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from memlab.model import Model
from memlab.offload import (LAYERS, _in_host, _to_device, _to_host, layer_shardings,
                            memory_kinds_of, place_layers)

__all__ = ["FusedState", "init", "step_fn", "check_model", "state_bytes"]


class FusedState(NamedTuple):
    """``tx`` state of one layer stacked over the layer axis, and of the other params."""

    layers: Any
    other: Any


def check_model(model: Model) -> None:
    """Raise unless ``model`` is a full-training memlab Llama the fused step can run."""
    from memlab.models.llama import Llama
    if not isinstance(model, Model) or not isinstance(model.module, Llama):
        raise TypeError("fused: the fused backward-update runs memlab's Llama (layers under "
                        f"nn.scan), got {type(getattr(model, 'module', model)).__name__}; for "
                        "other models use memlab.train")
    if LAYERS not in model.params:
        raise ValueError(f"fused: params have no '{LAYERS}' entry (the stacked layers); got "
                         f"{sorted(model.params)}")
    names = [p.name for p, _ in model.history]
    if model.extra("trainable") is not None or model.extra("shard") is not None:
        raise ValueError(f"fused: the model's passes ({', '.join(names)}) narrow or shard the "
                         "trainable params; the fused step is for full training on one device "
                         "(LoRA/QLoRA: use memlab.train, whose gradients are already small)")
    bad = [x for x in jax.tree_util.tree_leaves(model.params)
           if not jnp.issubdtype(x.dtype, jnp.floating)]
    if bad:
        raise ValueError(f"fused: every param must be a float array for full training; "
                         f"{len(bad)} leaves are not (a quantized base?): use memlab.train "
                         "with LoRA for quantized models")


def _split(params) -> tuple:
    return params[LAYERS], {k: v for k, v in params.items() if k != LAYERS}


def _streamed(layers) -> Optional[str]:
    """The host memory kind the layers live in (``ml.passes.offload``), else None."""
    kinds = memory_kinds_of(layers) - {"device"}
    return next(iter(kinds)) if kinds else None


def _on_host(tree) -> bool:
    """Whether traced ``tree``'s leaves are in host memory space."""
    return any(jax.typeof(x).memory_space == jax.memory.Space.Host
               for x in jax.tree_util.tree_leaves(tree))


def init(model: Model, tx: optax.GradientTransformation, params=None) -> FusedState:
    """The fused step's optimizer state: ``vmap(tx.init)`` over the layers (in the layers'
    memory kind: host memory under ``ml.passes.offload``) and ``tx.init`` of the rest."""
    check_model(model)
    params = model.params if params is None else params
    layers, other = _split(params)
    kind = _streamed(layers)

    def init_other(o):
        with warnings.catch_warnings():  # embedding / head / norms: nothing to project
            warnings.filterwarnings("ignore", message=".*no parameter is projected.*")
            return tx.init(o)

    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(params)):
        state = FusedState(jax.eval_shape(jax.vmap(tx.init), layers),
                           jax.eval_shape(init_other, other))
        return state._replace(layers=place_layers(state.layers, kind)) if kind else state
    if kind is None:
        return FusedState(_unshare(jax.vmap(tx.init)(layers)), _unshare(init_other(other)))
    # one program writing the state into host memory (eager host copies fail in jax 0.10)
    out_shardings = layer_shardings(jax.eval_shape(jax.vmap(tx.init), layers), kind)
    return FusedState(jax.jit(jax.vmap(tx.init), out_shardings=out_shardings)(layers),
                      _unshare(init_other(other)))


def _unshare(tree):
    """Leaves that are the same array (a shared codebook) copied apart, so that the step
    can donate the whole state."""
    seen = set()

    def one(x):
        if isinstance(x, jax.Array) and id(x) in seen:
            return x.copy()
        seen.add(id(x))
        return x
    return jax.tree_util.tree_map(one, tree)


def state_bytes(state: FusedState) -> int:
    """Exact bytes of a fused optimizer state."""
    from memlab.memory.bytes import tree_bytes
    return tree_bytes(state)


def _index(tree, i):
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), tree)


def _set(tree, value, i):
    return jax.tree_util.tree_map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0),
                                  tree, value)


def _resolve_impl(model: Model, impl: Optional[str], n_tokens: int) -> str:
    from memlab.nn.loss import choose_cross_entropy, loss_impl
    chosen = loss_impl(model, impl)  # impl, else the model's static choice, else the context
    if chosen == "auto":
        chosen = choose_cross_entropy(n_tokens, model.module.config.vocab_size)[0]
    return chosen


def _sumsq(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))


def _check_clip(clip_norm) -> None:
    if clip_norm is not None and (isinstance(clip_norm, bool) or
                                  not isinstance(clip_norm, (int, float)) or not clip_norm > 0):
        raise ValueError(f"fused: clip_norm must be a positive number or None, got {clip_norm!r}")


def step_fn(model: Model, tx: optax.GradientTransformation, *, clip_norm: Optional[float] = None,
            impl: Optional[str] = None, return_metrics: bool = False) -> Callable:
    """``step(params, state, tokens[B, T + 1]) -> (params, state, loss)``: one fused
    backward-update step of next-token cross-entropy (see the module docstring).

    ``state`` is :func:`init`'s.  ``clip_norm``: global gradient-norm clipping by LOMO's
    two passes.  ``impl``: the loss implementation (``memlab.nn.cross_entropy``'s; None:
    the context default, as ``memlab.nn.model_loss``).  Jit it with
    ``donate_argnums=(0, 1)`` so the params and state are updated in place.
    ``return_metrics=True`` returns ``{"loss", "grad_norm", "ok"}`` in place of the loss
    (``grad_norm``: the global norm before clipping, NaN without ``clip_norm``, which is
    when it is computed; ``ok``: the step was applied -- always, without ``clip_norm``).

    The fused update that the one train step runs for ``StepOptions(fused=True)``
    (:mod:`memlab.train_step`, which adds the trainable/frozen split, the RNG and the
    shard and offload placements), on whole params."""
    check_model(model)
    _check_clip(clip_norm)
    inner = _fused_update(model, tx, clip_norm=None if clip_norm is None else float(clip_norm),
                          impl=impl)

    def step(params, state: FusedState, tokens):
        params, state, metrics = inner(params, state, tokens)
        return params, state, metrics if return_metrics else metrics["loss"]

    return step


def _fused_update(model: Model, tx: optax.GradientTransformation, *,
                  clip_norm: Optional[float] = None, impl: Optional[str] = None) -> Callable:
    """``step(params, state, tokens) -> (params, state, {"loss", "grad_norm", "ok"})``: the
    fused backward-update itself (the module docstring's five parts); the one train step
    (:mod:`memlab.train_step`) runs it for ``StepOptions(fused=True)``."""
    check_model(model)
    _check_clip(clip_norm)
    from memlab.models.llama import layer_apply
    from memlab.nn.loss import cross_entropy, head_weight
    apply = model.apply
    cfg = model.module.config
    n_layers = cfg.n_layers

    def step(params, state: FusedState, tokens):
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"fused: tokens must be [batch, seq+1] with seq >= 1, got shape "
                             f"{tuple(tokens.shape)}")
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        b, t = inputs.shape
        chosen = _resolve_impl(model, impl, b * t)
        layers, other = _split(params)
        kind = _on_host(layers)
        lengths = jnp.zeros((b,), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
        n_new = jnp.full((b,), t, jnp.int32)

        def layer(lp, x, i):
            return layer_apply(cfg, lp, x, i, positions, lengths, n_new)

        def fetch(tree, i):
            out = _index(tree, i)
            if not kind:
                return out
            return jax.tree_util.tree_map(lambda o, a: _to_device(o) if _in_host(a) else o,
                                          out, tree)

        def store(tree, value, i):
            if kind:  # back to the stack's memory: host for the streamed leaves
                value = jax.tree_util.tree_map(
                    lambda v, a: _to_host(v) if _in_host(a) else v, value, tree)
            return _set(tree, value, i)

        # 1. embedding
        x0, embed_vjp = jax.vjp(lambda o: apply(o, inputs, embed_only=True), other)

        # 2. forward over the layers, keeping each layer's input
        # The stacks ride in the carry through a barrier: read as loop invariants, XLA:CPU
        # hoists the float32 upcast of the bf16 slices out of the loop -- a float32 copy of
        # every [L, ...] stack (2x the layers' bytes)
        def fwd(carry, i):
            x, stack = carry
            stack = jax.lax.optimization_barrier(stack)
            return (layer(fetch(stack, i), x, i), stack), x
        idx = jnp.arange(n_layers, dtype=jnp.int32)
        (x_last, _), xs = jax.lax.scan(fwd, (x0, layers), idx)

        # 3. head and loss
        def head_loss(o, h):
            if chosen == "naive":
                logits = apply(o, inputs, hidden_in=h)
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits.astype(jnp.float32), targets).mean()
            hidden = apply(o, inputs, hidden_in=h, hidden_only=True)
            w, tied, why = head_weight(model, o)
            if why is not None:
                raise ValueError(f"fused: {why}")
            return cross_entropy(hidden, w.astype(cfg.compute_dtype), targets, tied=tied,
                                 impl=chosen)
        loss, head_vjp = jax.vjp(head_loss, other, x_last)
        d_head, ct_last = head_vjp(jnp.ones_like(loss))

        def layer_grad(lp, x, i, ct):
            _, vjp = jax.vjp(lambda p, xx: layer(p, xx, i), lp, x)
            return vjp(ct)

        # optional first pass: the global gradient norm (LOMO's clipping), nothing kept
        scale = None
        if clip_norm is not None:
            def norm_pass(carry, i):
                ct, acc, stack, saved = carry
                stack, saved = jax.lax.optimization_barrier((stack, saved))  # as in the forward
                x = jax.lax.dynamic_index_in_dim(saved, i, 0, False)
                g, ct = layer_grad(fetch(stack, i), x, i, ct)
                return (ct, acc + _sumsq(g), stack, saved), None
            (ct0, acc, _, _), _ = jax.lax.scan(
                norm_pass, (ct_last, jnp.float32(0.0), layers, xs), idx, reverse=True)
            d_other_pre = jax.tree_util.tree_map(jnp.add, d_head, embed_vjp(ct0)[0])
            norm = jnp.sqrt(acc + _sumsq(d_other_pre))
            scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))  # optax's rule
            ok = jnp.isfinite(norm) & jnp.isfinite(loss)  # known before any layer updates
        else:
            ok, norm = None, jnp.float32(jnp.nan)

        def keep(new, old):
            if ok is None:
                return new
            return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)

        def scaled(g):
            if scale is None:
                return g
            return jax.tree_util.tree_map(lambda a: (a * scale).astype(a.dtype), g)

        # 4. reverse over the layers: gradient and update of each layer at once
        def bwd(carry, i):
            ct, stack, st, saved = carry
            saved = jax.lax.optimization_barrier(saved)  # as the stacks in the forward
            x = jax.lax.dynamic_index_in_dim(saved, i, 0, False)
            lp = fetch(stack, i)
            g, ct = layer_grad(lp, x, i, ct)
            s = fetch(st, i)
            updates, s_new = tx.update(scaled(g), s, lp)
            lp, s = keep((optax.apply_updates(lp, updates), s_new), (lp, s))
            return (ct, store(stack, lp, i), store(st, s, i), saved), None
        (ct0, layers, layer_state, _), _ = jax.lax.scan(
            bwd, (ct_last, layers, state.layers, xs), idx, reverse=True)

        # 5. the embedding's gradient, and the non-layer update
        d_other = jax.tree_util.tree_map(jnp.add, d_head, embed_vjp(ct0)[0])
        updates, other_state = tx.update(scaled(d_other), state.other, other)
        other, other_state = keep((optax.apply_updates(other, updates), other_state),
                                  (other, state.other))
        new_params = dict(other, **{LAYERS: layers})
        return new_params, FusedState(layer_state, other_state), {
            "loss": loss, "grad_norm": norm, "ok": jnp.bool_(True) if ok is None else ok}

    return step


# --- the planner's estimate ------------------------------------------------------------


def estimate_temp(cfg, optimizer: str, batch: int, seq: int, loss: str = "chunked",
                  platform: str = "cpu") -> float:
    """Predicted XLA temp bytes of the fused step: the layers' saved inputs (compute
    dtype) and the non-layer gradients, plus the larger of one layer's recompute and
    backward (the remat model's ``nothing_saveable`` terms, with the layer's float32 weight
    gradient at its end) and that layer's update (the optimizer's registered
    ``fused_update_bytes`` per layer parameter, measured by ``experiments/fused.py``), which
    run one after the other."""
    from memlab.optim.base import OPTIMIZERS
    from memlab.memory import activations as act
    p_layer = cfg.layer_param_count()
    p_other = cfg.param_count() - cfg.n_layers * p_layer
    cal = act.calibration(platform)
    f = act.train_features(cfg, batch, seq, "nothing_saveable", p_layers=p_layer,
                           p_other=p_other, loss=loss, platform=platform)
    saved = cfg.n_layers * batch * seq * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
    backward = max(cal.kappa["nothing_saveable"] * f.work + f.attention + f.loss, f.loss_phase)
    update = OPTIMIZERS.fact(optimizer, "fused_update_bytes") * p_layer
    grad = 4.0 * p_layer  # the layer's float32 weight gradient, live at the end of its backward
    return float(saved + cal.a_other * p_other + max(backward + grad, update)
                 + cal.c0["nothing_saveable"])
