"""The one train step: what :func:`memlab.train.train` runs, what
``memlab.memory.profile(task="train")`` and the planner's verification compile.

    from memlab.train_step import StepOptions, build
    ts = build(model, tx, StepOptions(accum=2, precision="bf16"))
    trainable, frozen = ml.model.split_trainable(model)
    opt_state = ts.init_state(trainable, frozen)
    step = ts.jit()                                  # params and optimizer state donated
    trainable, opt_state, rng, metrics = step(trainable, opt_state, frozen, rng,
                                              ts.place_batch(tokens))

``step(trainable, opt_state, frozen, rng, tokens[batch, seq+1]) -> (trainable, opt_state,
rng, metrics)`` with ``metrics = {"loss", "grad_norm", "ok"}``:

* **gradient** of the next-token cross-entropy (:func:`memlab.nn.model_loss`) over the
  trainable params only (:func:`memlab.model.split_trainable`).  With ``accum > 1`` the
  batch is reshaped to ``[accum, batch/accum, seq+1]`` and a ``lax.scan`` sums each
  micro-batch's loss and gradient in float32 accumulators, then divides by ``accum``
  (micro-batches hold equal token counts: the full batch's mean).  With ``accum == 1``
  there is no scan and no accumulator: the gradient is the one backward's, in the params'
  dtype (the same values: adding it to float32 zeros and dividing by one is exact);
* **precision** ``"bf16"``: bfloat16 compute over the stored weights
  (:func:`compute_model`), gradients in the params' dtype;
* **non-finite skip**: ``ok = isfinite(loss) & isfinite(||g||)``; a bad step returns the
  params and the optimizer state bitwise unchanged (``optax.apply_if_finite``'s rule; the
  optimizer's own count does not advance).  Where it is done is the compiler's: XLA:CPU
  gets the update under ``lax.cond(ok, ...)`` (a select would hold a second copy of the
  params and state there), XLA:GPU/TPU a leaf-wise ``where(ok, new, old)`` that fuses into
  the update (a conditional copies its operands there);
* **ZeRO** (``ml.passes.shard``, ``model.extra("shard")``): the gradients (each
  micro-batch's, before accumulation) and the new optimizer state are constrained to the
  pass's param / state specs, so each device reduces and updates its own shard (Rajbhandari
  et al. 2020); :meth:`TrainStep.place_batch` splits the batch over the data axes and
  :meth:`TrainStep.init_state` creates the state in its shards;
* **offload** (``ml.passes.offload``, ``model.extra("offload")``): the layers stream from
  host memory inside the model; :func:`optimizer` wraps ``tx`` with
  :func:`memlab.offload.host_optimizer` (updates land in each param's memory, the state in
  host memory with ``optimizer_state=True``) and :meth:`TrainStep.init_state` places it;
* **fused** (``StepOptions(fused=True)``): LOMO's fused backward-update
  (:mod:`memlab.fused`): each layer updated inside the backward, ``clip_norm`` is its
  two-pass global-norm clip and gives the non-finite skip (without it ``ok`` is always
  true); needs ``accum == 1``.  The unfused step clips inside ``tx``
  (:func:`memlab.train.make_optimizer` chains ``optax.clip_by_global_norm``).

Contract: :func:`memlab.train.make_step`, :func:`memlab.memory.profile.train_step_fn` and
:func:`memlab.fused.step_fn` are adapters of :func:`step_fn`; for equal model, ``tx`` and
options they compute the same program.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memlab import dispatch
from memlab.model import Model, merge_trainable, split_trainable

__all__ = ["PRECISIONS", "StepOptions", "TrainStep", "build", "step_fn", "compute_model",
           "optimizer", "init_state", "place_batch", "next_rng", "global_norm",
           "clip_by_global_norm"]

PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the step does besides ``model`` and ``tx``.

    ``accum``: micro-batches per step (float32 accumulation; 1: none).  ``precision``:
    ``"fp32"`` (the model's own dtypes) or ``"bf16"`` (bfloat16 compute).  ``fused``: the
    fused backward-update (:mod:`memlab.fused`).  ``clip_norm``: the fused step's
    two-pass clip (fused only: an unfused ``tx`` clips itself).  ``loss_impl``: the
    cross-entropy implementation (:func:`memlab.nn.cross_entropy` names; None: the
    context default, ``memlab.nn.use_cross_entropy``).
    """

    accum: int = 1
    precision: str = "fp32"
    fused: bool = False
    clip_norm: Optional[float] = None
    loss_impl: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.accum, bool) or not isinstance(self.accum, (int, np.integer)) \
                or self.accum < 1:
            raise ValueError(f"StepOptions: accum must be a positive int, got {self.accum!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"StepOptions: precision must be one of {PRECISIONS}, "
                             f"got {self.precision!r}")
        if not isinstance(self.fused, bool):
            raise ValueError(f"StepOptions: fused must be True or False, got {self.fused!r}")
        if self.clip_norm is not None and (isinstance(self.clip_norm, bool) or not isinstance(
                self.clip_norm, (int, float)) or not self.clip_norm > 0
                or not math.isfinite(self.clip_norm)):
            raise ValueError(f"StepOptions: clip_norm must be a positive number or None, "
                             f"got {self.clip_norm!r}")
        if self.fused and self.accum != 1:
            raise ValueError(f"StepOptions: fused=True updates each layer inside its backward, "
                             f"so there is no gradient to accumulate; use accum=1 (got "
                             f"{self.accum}) or fused=False")
        if self.clip_norm is not None and not self.fused:
            raise ValueError("StepOptions: clip_norm is the fused step's two-pass clip; for the "
                             "unfused step chain optax.clip_by_global_norm into tx (as "
                             "memlab.train.make_optimizer does) and leave clip_norm=None")
        if self.loss_impl is not None:
            from memlab.nn.loss import _check_impl
            _check_impl(self.loss_impl)


def compute_model(model: Model, precision: str) -> Model:
    """The model the loss runs: ``bf16`` = bfloat16 compute over the stored (fp32) weights.

    A memlab Llama gets ``dtype="bfloat16"`` (every matmul casts weights and activations);
    other models see their float params cast to bfloat16 inside ``apply``."""
    if precision not in PRECISIONS:
        raise ValueError(f"compute_model: precision must be one of {PRECISIONS}, "
                         f"got {precision!r}")
    if precision == "fp32":
        return model
    spec = model.spec
    if model.module is not None and dataclasses.is_dataclass(spec) and hasattr(spec, "dtype") \
            and getattr(model.module, "config", None) == spec:
        spec = dataclasses.replace(spec, dtype="bfloat16")
        return model.replace(spec=spec, module=model.module.clone(config=spec))

    def cast_params(apply):
        def wrapped(params, *args, **kwargs):
            params = jax.tree_util.tree_map(
                lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                params)
            return apply(params, *args, **kwargs)
        return wrapped

    return model.wrap(cast_params)


def optimizer(model: Model, tx: optax.GradientTransformation,
              options: StepOptions = StepOptions()) -> optax.GradientTransformation:
    """``tx`` as the step must run it for ``model``: under ``ml.passes.offload`` (unfused)
    :func:`memlab.offload.host_optimizer` (state in host memory with
    ``optimizer_state=True``, else on the device; updates in each param's memory); else
    ``tx``.  The fused step moves one layer's state itself and takes ``tx`` as is."""
    offload = model.extra("offload")
    if offload is None or options.fused:
        return tx
    offload = dict(offload)
    from memlab.offload import host_optimizer
    return host_optimizer(tx, offload["memory_kind"] if offload["optimizer_state"] else "device")


def next_rng(rng):
    """The step's RNG update: ``split(key)[0]`` of uint32 key data."""
    return jax.random.key_data(jax.random.split(jax.random.wrap_key_data(rng))[0])


def _abstract(tree) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def init_state(model: Model, tx: optax.GradientTransformation, trainable, frozen=None,
               options: StepOptions = StepOptions()):
    """The optimizer state the step takes, placed: ``tx.init(trainable)`` (``tx`` from
    :func:`optimizer`), in host memory under ``offload(optimizer_state=True)``, in the
    shard pass's state shardings (created in its shards); :func:`memlab.fused.init` for the
    fused step.  ``ShapeDtypeStruct`` leaves give shapes with the placements attached."""
    if options.fused:
        from memlab import fused
        params = merge_trainable(trainable, frozen if frozen is not None
                                 else split_trainable(model, trainable)[1])
        return fused.init(model.replace(params=params), tx)
    shard = model.extra("shard")
    offload = dict(model.extra("offload") or ())
    if _abstract(trainable):
        state = jax.eval_shape(tx.init, trainable)
        if offload.get("optimizer_state"):  # eval_shape drops the placement
            from memlab.offload import place
            state = place(state, offload["memory_kind"])
        return state if shard is None else shard.put_state(state, trainable)
    if shard is None:
        return jax.jit(tx.init)(trainable)   # host_optimizer.init places its own state
    from memlab import shard as sh
    shapes = jax.eval_shape(tx.init, trainable)
    out = sh.shardings(shard.state_specs(shapes, trainable), shard.mesh)
    return jax.jit(tx.init, out_shardings=out)(trainable)


def place_batch(model: Model, tokens):
    """Tokens ``[batch, seq+1]`` as the step takes them: split over the shard pass's data
    axes (arrays are put, ``ShapeDtypeStruct`` get the sharding), else unchanged."""
    shard = model.extra("shard")
    return tokens if shard is None else shard.put_batch(tokens)


def _check_tokens(tokens, accum: int):
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"train step: tokens must be [batch, seq+1] with seq >= 1, got shape "
                         f"{tuple(tokens.shape)}")
    if tokens.shape[0] % accum:
        raise ValueError(f"train step: accum={accum} does not divide the batch of "
                         f"{tokens.shape[0]}; each micro-batch must hold batch/accum sequences "
                         "(choose a divisor)")


def step_fn(model: Model, tx: optax.GradientTransformation,
            options: StepOptions = StepOptions()) -> Callable:
    """``step(trainable, opt_state, frozen, rng, tokens) -> (trainable, opt_state, rng,
    metrics)`` (not jitted; see the module docstring).  ``tx`` is taken as given: pass it
    through :func:`optimizer` for an offloaded model (:func:`build` does)."""
    if not isinstance(model, Model):
        raise TypeError(f"train step: model must be a memlab.Model, got {type(model).__name__}")
    if not isinstance(options, StepOptions):
        raise TypeError(f"train step: options must be a StepOptions, got "
                        f"{type(options).__name__}")
    run = compute_model(model, options.precision)
    if options.fused:
        return _fused(model, run, tx, options)
    from memlab.nn.loss import model_loss
    loss = model_loss(run, impl=options.loss_impl)
    accum = options.accum
    shard = model.extra("shard")
    tmap = jax.tree_util.tree_map

    def zero(grads):  # ZeRO: each device reduces, then updates, its own shard
        return grads if shard is None else shard.constrain(grads, shard.param_specs(grads))

    grad_fn = jax.value_and_grad(lambda t, f, x: loss(merge_trainable(t, f), x))

    def step(trainable, opt_state, frozen, rng, tokens):
        _check_tokens(tokens, accum)
        if accum == 1:
            value, grads = grad_fn(trainable, frozen, tokens)
            value, grads = value.astype(jnp.float32), zero(grads)
        else:
            micro = tokens.reshape(accum, tokens.shape[0] // accum, tokens.shape[-1])
            if shard is not None:  # every micro-batch split over the data axes
                spec = shard.batch_spec(micro.shape[1:], seq_axis=False)
                micro = shard.constrain(micro, jax.sharding.PartitionSpec(None, *spec))

            def body(carry, mb):
                l_sum, g_sum = carry
                v, g = grad_fn(trainable, frozen, mb)
                g = zero(tmap(lambda x: x.astype(jnp.float32), g))
                return (l_sum + v.astype(jnp.float32), tmap(jnp.add, g_sum, g)), None

            zeros = zero(tmap(lambda x: _space_of(jnp.zeros(x.shape, jnp.float32), x),
                              trainable))
            (l_sum, g_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
            value = l_sum / accum
            grads = tmap(lambda g, p: (g / accum).astype(p.dtype), g_sum, trainable)
        gnorm = global_norm(grads)
        ok = jnp.isfinite(value) & jnp.isfinite(gnorm)

        def apply():
            updates, new_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), new_state

        if dispatch.platform() == "cpu":
            new_params, new_state = jax.lax.cond(ok, apply, lambda: (trainable, opt_state))
        else:
            new_params, new_state = apply()
            new_params, new_state = _keep(ok, new_params, trainable), _keep(ok, new_state, opt_state)
        if shard is not None:
            new_state = shard.constrain(new_state, shard.state_specs(new_state, trainable))
        return new_params, new_state, next_rng(rng), {"loss": value, "grad_norm": gnorm,
                                                      "ok": ok}

    return step


# Offloaded layers (ml.passes.offload): their gradients, params and host-memory state are
# arrays in host memory space under jit, and jax refuses operations that mix memory spaces:
# per-leaf reductions come to the device as scalars, the select goes to the leaf's memory.
def _in_host(x) -> bool:
    return jax.typeof(x).memory_space == jax.memory.Space.Host


def _space_of(x, like):
    """``x`` in the memory space of ``like`` (traced arrays)."""
    if jax.typeof(x).memory_space == jax.typeof(like).memory_space:
        return x
    return jax.device_put(x, jax.typeof(like).memory_space)


def global_norm(tree) -> jax.Array:
    """The global L2 norm of ``tree``: ``optax.tree.norm``'s sums in its order (per-leaf
    ``sum(x**2)``, added left to right from 0), without its ``x.imag`` zeros for real
    leaves, which jax creates in device memory beside a host leaf.  Over leaves in more than
    one memory space (offloaded layers' gradients) each host leaf is summed on the device;
    over host leaves only (a host-side update) it stays on the host."""
    leaves = jax.tree_util.tree_leaves(tree)
    if len({jax.typeof(x).memory_space for x in leaves}) > 1:
        # XLA:TPU's host offloader cannot return a reduction computed in host memory
        # beside device outputs: each host leaf is summed on the device
        leaves = [jax.device_put(x, jax.memory.Space.Device) if _in_host(x) else x
                  for x in leaves]
    sums = [jnp.sum(jnp.square(x.real) + jnp.square(x.imag) if jnp.iscomplexobj(x)
                    else jnp.square(x)) for x in leaves]
    total = 0
    for x in sums:
        total = total + x
    return jnp.sqrt(jnp.asarray(total))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (same rule, same empty state: updates scaled by
    ``max_norm / norm`` where the norm exceeds it) with :func:`global_norm`, so that it runs
    over host-memory gradients (``ml.passes.offload``'s layers, a host-side update)."""
    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        trigger = jnp.squeeze(norm < max_norm)
        return jax.tree_util.tree_map(
            lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm),
            updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _keep(ok, new, old):
    """``where(ok, new, old)`` leaf by leaf (the non-finite skip), in each leaf's memory
    (jax gives a select of host scalars a device result: it is put back, so that a donated
    host buffer aliases a host output)."""
    return jax.tree_util.tree_map(
        lambda n, o: _space_of(jnp.where(_space_of(ok, o), n, o), o), new, old)


def _fused(model: Model, run: Model, tx, options: StepOptions) -> Callable:
    from memlab import fused
    inner = fused._fused_update(run, tx, clip_norm=None if options.clip_norm is None
                                else float(options.clip_norm), impl=options.loss_impl)

    def step(trainable, opt_state, frozen, rng, tokens):
        params, opt_state, metrics = inner(merge_trainable(trainable, frozen), opt_state, tokens)
        trainable, _ = split_trainable(model, params)
        return trainable, opt_state, next_rng(rng), metrics

    return step


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A built step: ``step`` (:func:`step_fn`), the ``tx`` it runs (:func:`optimizer`),
    and the placements its arguments need."""

    model: Model
    tx: optax.GradientTransformation
    options: StepOptions
    step: Callable

    def init_state(self, trainable, frozen=None):
        """:func:`init_state` of the step's ``tx``."""
        return init_state(self.model, self.tx, trainable, frozen, self.options)

    def place_batch(self, tokens):
        """:func:`place_batch` for the step's model."""
        return place_batch(self.model, tokens)

    def jit(self, **kwargs):
        """``jax.jit(step, donate_argnums=(0, 1))``: trainable params and state donated."""
        return jax.jit(self.step, donate_argnums=(0, 1), **kwargs)

    def abstract_args(self, batch: int, seq: int, params=None) -> tuple:
        """``(trainable, opt_state, frozen, rng, tokens)`` as placed ``ShapeDtypeStruct``:
        what the profiler compiles the step on (nothing allocated)."""
        from memlab.memory.bytes import abstractify
        params = abstractify(self.model.params if params is None else params)
        trainable, frozen = split_trainable(self.model, params)
        tokens = self.place_batch(jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32))
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        shard = self.model.extra("shard")
        if shard is not None:  # replicated over the mesh, as the params' devices
            from jax.sharding import NamedSharding, PartitionSpec
            rng = jax.ShapeDtypeStruct((2,), jnp.uint32,
                                       sharding=NamedSharding(shard.mesh, PartitionSpec()))
        return trainable, self.init_state(trainable, frozen), frozen, rng, tokens


def build(model: Model, tx: optax.GradientTransformation,
          options: StepOptions = StepOptions()) -> TrainStep:
    """The step ``model`` trains with: ``tx`` wrapped for its passes (:func:`optimizer`),
    the step function (:func:`step_fn`) and its argument placements."""
    if not isinstance(options, StepOptions):
        raise TypeError(f"build: options must be a StepOptions, got {type(options).__name__}")
    if options.fused:
        from memlab import fused
        fused.check_model(model)
    tx = optimizer(model, tx, options)
    return TrainStep(model, tx, options, step_fn(model, tx, options))
