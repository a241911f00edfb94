"""Memory profile of a compiled step: XLA's numbers beside exact pytree bytes and
the analytic estimate.

Everything runs on abstract shapes (``jax.ShapeDtypeStruct``): a llama2-7b
training step is lowered and compiled, never allocated.  Numbers come from
``compiled.memory_analysis()``; on CPU ``temp`` is the trustworthy peak
indicator and ``peak = argument + output - alias + temp``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from memlab.memory import estimate as est
from memlab.memory.bytes import abstractify, fmt_bytes, tree_bytes
from memlab.model import Model, Workload


@dataclasses.dataclass
class MemoryReport:
    """What one compiled step costs, by XLA and by category."""

    name: str
    task: str
    batch: int
    seq: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    by_category: dict  # exact pytree bytes
    analytic: dict  # closed-form estimate (None where no formula applies)
    compile_seconds: float
    device: str
    gpu_peak_bytes: Optional[int] = None
    # sharded models (ml.passes.shard): by_category and analytic are per device (XLA's
    # memory_analysis is per device too); the whole-model bytes are kept here
    global_by_category: Optional[dict] = None
    # compiled for a memlab.targets target (None: this process's device)
    target: Optional[str] = None
    # host memory XLA:GPU / XLA:TPU report apart (XLA:CPU has one memory: always 0 there)
    host_argument_bytes: int = 0
    host_output_bytes: int = 0
    host_alias_bytes: int = 0
    host_temp_bytes: int = 0
    # attention implementation(s) the compiled program reached (memlab.nn names)
    attention: Optional[list] = None

    @property
    def peak_bytes(self) -> int:
        """Device peak: argument + output - alias + temp (host buffers excluded where the
        backend reports them apart)."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def host_bytes(self) -> int:
        """Host-memory peak the backend reports (arguments + outputs - aliases + temp)."""
        return (self.host_argument_bytes + self.host_output_bytes - self.host_alias_bytes
                + self.host_temp_bytes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peak_bytes"] = self.peak_bytes
        d["host_bytes"] = self.host_bytes
        return d

    def table(self) -> str:
        rows = [("argument", self.argument_bytes), ("output", self.output_bytes),
                ("alias (donated)", self.alias_bytes), ("temp", self.temp_bytes),
                ("peak ≈ arg+out−alias+temp", self.peak_bytes)]
        if self.host_bytes:
            rows += [("host argument", self.host_argument_bytes),
                     ("host temp", self.host_temp_bytes), ("host peak", self.host_bytes)]
        if self.gpu_peak_bytes is not None:
            rows.append(("device peak (memory_stats)", self.gpu_peak_bytes))
        w = 28
        where = f"{self.device} (target {self.target}, compile-only)" if self.target else \
            self.device
        lines = [f"{self.name} · {self.task} · batch {self.batch} · seq {self.seq} · "
                 f"{where} · compiled in {self.compile_seconds:.1f}s",
                 f"{'XLA memory_analysis':<{w}} {'bytes':>14}"]
        lines += [f"  {k:<{w - 2}} {fmt_bytes(v):>14}" for k, v in rows]
        if self.attention:
            lines.append(f"  {'attention (from HLO)':<{w - 2}} {', '.join(self.attention):>14}")
        per = " (per device)" if self.global_by_category is not None else ""
        lines.append(f"{'category' + per:<{w}} {'exact':>14} {'analytic':>14} {'match':>6}")
        for cat, exact in self.by_category.items():
            ana = self.analytic.get(cat)
            ok = "—" if ana is None else ("yes" if ana == exact else f"{(exact - ana) / max(ana, 1):+.1%}")
            lines.append(f"  {cat:<{w - 2}} {fmt_bytes(exact):>14} {fmt_bytes(ana):>14} {ok:>6}")
        return "\n".join(lines)


def _compile(fn: Callable, args: Sequence[Any], donate: Sequence[int] = (), target=None):
    """Compile ``fn`` on ``args`` for this process's device, or for ``target``
    (:mod:`memlab.targets`: a compile-only GPU/TPU)."""
    t0 = time.perf_counter()
    if target is not None:
        from memlab import targets
        compiled = targets.compile(fn, args, target, donate_argnums=donate)
    else:
        compiled = jax.jit(fn, donate_argnums=tuple(donate)).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()


def loss_fn(model: Model) -> Callable:
    """``loss(params, tokens[B, T+1])``: next-token cross-entropy of ``model``.

    :func:`memlab.nn.model_loss` with ``impl="auto"``: on CPU the model's logits
    and :func:`next_token_loss` (as before) while the float32 ``[B*T, V]`` logits
    fit ``memlab.nn.NAIVE_MAX_LOGITS_BYTES``, else chunked cut cross-entropy from
    the final hidden states (no logits materialized; the Triton kernels on GPU).
    ``with memlab.nn.use_cross_entropy("naive"):`` around tracing restores the
    logits path everywhere.
    """
    from memlab.nn.loss import model_loss
    return model_loss(model)


def train_step_fn(model: Model, tx: optax.GradientTransformation) -> Callable:
    """``step(params, opt_state, tokens[B, T+1]) -> (params, opt_state, loss)``.

    Gradients and updates cover the trainable part of ``params`` only
    (:func:`memlab.model.split_trainable`: what a pass such as LoRA marked, else
    every float leaf); frozen leaves come back unchanged.  ``opt_state`` is
    ``tx.init(split_trainable(model, params)[0])``.  An adapter of the one train step
    (:func:`memlab.train_step.step_fn`, default options: no accumulation, a non-finite
    step leaves params and state unchanged, ZeRO constraints under ``ml.passes.shard``)
    to whole params; ``tx`` as given (wrap it for an offloaded model:
    ``ml.passes.offload.optimizer``).
    """
    from memlab import train_step
    from memlab.model import merge_trainable, split_trainable
    inner = train_step.step_fn(model, tx)

    def step(params, opt_state, tokens):
        trainable, frozen = split_trainable(model, params)
        rng = jnp.zeros((2,), jnp.uint32)  # the adapter has no RNG to carry
        trainable, opt_state, _, metrics = inner(trainable, opt_state, frozen, rng, tokens)
        return merge_trainable(trainable, frozen), opt_state, metrics["loss"]

    return step


def _train_setup(optimizer, config, batch: int, seq: int, trainable):
    """``(tx, optimizer name or None, StepOptions)`` of a train profile: ``config`` a
    :class:`memlab.train.TrainConfig` (its optimizer with clip and schedule, its step
    options), a :class:`memlab.train_step.StepOptions`, or None (defaults)."""
    from memlab import optim, train_step
    if config is None or isinstance(config, train_step.StepOptions):
        opts = config or train_step.StepOptions()
        name = "adamw" if optimizer is None else optimizer
        tx = optim.get(name) if isinstance(name, str) else name
        return tx, name if isinstance(name, str) else None, opts
    from memlab.train import TrainConfig, make_optimizer
    if not isinstance(config, TrainConfig):
        raise TypeError(f"profile: config must be a memlab.train.TrainConfig or a "
                        f"memlab.train_step.StepOptions, got {type(config).__name__}")
    if (batch, seq) != (config.batch, config.seq):
        raise ValueError(f"profile: batch={batch}, seq={seq} differ from the TrainConfig's "
                         f"batch={config.batch}, seq={config.seq}; pass the config's")
    if optimizer is not None:
        raise ValueError(f"profile: optimizer={optimizer!r} with a TrainConfig; the config "
                         f"names its optimizer ({config.optimizer!r}): drop optimizer=")
    return make_optimizer(config, trainable), config.optimizer, config.step_options


def _kv_cache(model: Model, batch: int, max_len: int, lengths: int):
    """The cache's shapes, with the host placement a policy gives its state (HeadInfer)
    kept: ``eval_shape`` drops memory spaces, the traced program's output avals keep them."""
    from memlab.generate import make_cache
    from memlab.offload import _sharding
    traced = jax.jit(lambda: make_cache(model, batch, max_len, lengths)).trace()
    shapes = jax.eval_shape(lambda: make_cache(model, batch, max_len, lengths))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    avals = traced.jaxpr.out_avals
    host = _sharding("pinned_host")
    placed = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host)
              if getattr(a, "memory_space", None) == jax.memory.Space.Host else x
              for x, a in zip(leaves, avals)]
    return jax.tree_util.tree_unflatten(treedef, placed)


def profile(model_or_fn: Model | Callable, task: str = "train", batch: int = 1, seq: int = 128,
            *, optimizer: str | optax.GradientTransformation | None = None,
            args: Optional[Sequence[Any]] = None, donate: Sequence[int] = (),
            categories: Optional[dict] = None, name: Optional[str] = None,
            target: Optional[str] = None, config: Any = None) -> MemoryReport:
    """Compile one step on abstract shapes and report its memory.

    * ``Model``: ``task="train"`` compiles the step :func:`memlab.train.train` runs
      (:mod:`memlab.train_step`: loss + gradient + optimizer update with the non-finite
      skip, trainable params and optimizer state donated; the shard and offload passes'
      placements and constraints); ``"prefill"`` writes ``seq`` tokens into an empty
      KV cache of length ``seq``; ``"decode"`` writes one token into a cache of
      length ``seq`` holding ``seq - 1`` (cache donated).
    * ``optimizer``: a ``memlab.optim`` name (default ``"adamw"``) or a transform.
      ``config``: a :class:`memlab.train.TrainConfig` (exactly the step ``train(model,
      config)`` runs: its optimizer with clip and schedule, accumulation, precision, the
      fused variant; ``batch``/``seq`` must be the config's, ``optimizer`` left out) or a
      :class:`memlab.train_step.StepOptions` (with ``optimizer``).
    * a plain function: pass ``args`` (arrays or ShapeDtypeStructs) and optionally
      ``donate`` and ``categories={"params": 0, ...}`` naming argument positions.

    ``target`` (``"h100"``, ``"v5e"``, ...; :mod:`memlab.targets`) compiles for that
    device on this machine, with memlab's kernels chosen for it: the report is that
    backend's ``memory_analysis()`` (device and host parts apart) and names the
    attention implementation the compiled program reached.
    """
    est.check_task(task)
    for argname, v in (("batch", batch), ("seq", seq)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"profile: {argname} must be a positive int, got {v!r}")
    device = jax.devices()[0].device_kind
    if target is not None:
        from memlab import targets
        target = targets.get(target).name
        device = targets.get(target).device_kind
    if not isinstance(model_or_fn, Model):
        if args is None:
            raise ValueError("profile(fn, ...) needs args=(...) (arrays or jax.ShapeDtypeStruct)")
        abstract_args = abstractify(tuple(args))
        compiled, secs = _compile(model_or_fn, abstract_args, donate, target)
        cats = {k: tree_bytes(abstract_args[i]) for k, i in (categories or {}).items()}
        return _report(compiled, name or getattr(model_or_fn, "__name__", "fn"), task, batch, seq,
                       cats, {}, secs, device, target)

    model = model_or_fn
    spec = model.spec
    if task != "train" and not hasattr(spec, "kv_cache_bytes"):
        raise ValueError("profile: prefill/decode need a memlab decoder model (with a KV cache "
                         "spec); for other models pass a function and args=")
    params = abstractify(model.params)
    abstract_model = model.replace(params=params)
    workload = Workload(task, batch, seq)
    base = est.base_spec(model)
    if task != "train":
        if config is not None:
            raise ValueError(f"profile: config= describes a train step; task={task!r} has none")
        analytic = est.bytes_by_category(base, task, batch, seq, optimizer=None) \
            if base is not None and hasattr(base, "param_count") else {}
        analytic = est.apply_passes(analytic, model, workload) if analytic else {}

    if task == "train":
        from memlab import train_step
        from memlab.model import merge_trainable, split_trainable
        trainable, frozen = split_trainable(abstract_model, params)  # LoRA: adapters only
        tx, opt_name, opts = _train_setup(optimizer, config, batch, seq, trainable)
        built = train_step.build(abstract_model, tx, opts)
        step_args = built.abstract_args(batch, seq, params)
        trainable, opt_state, frozen, _, tokens = step_args
        compiled, secs = _compile(built.step, step_args, donate=(0, 1), target=target)
        analytic = est.bytes_by_category(base, task, batch, seq, optimizer=opt_name) \
            if base is not None and hasattr(base, "param_count") else {}
        analytic = est.apply_passes(analytic, model, workload) if analytic else {}
        analytic = est.over_trainable(analytic, opt_name)
        cats = {"params": tree_bytes(params)}
        grads = None
        if not opts.fused:  # the fused step never holds the whole-model gradient
            grads = jax.eval_shape(jax.grad(lambda t, f, x: loss_fn(abstract_model)(
                merge_trainable(t, f), x)), trainable, frozen, tokens)
            cats["gradients"] = tree_bytes(grads)
        cats.update({"optimizer_state": tree_bytes(opt_state), "inputs": tree_bytes(tokens)})
        cats.update(_host_bytes(params=params, optimizer_state=opt_state))
        shard = model.extra("shard")
        if shard is not None:
            per_device = {"params": shard.param_bytes(params),
                          "optimizer_state": shard.state_bytes(opt_state, trainable),
                          "inputs": shard.batch_bytes(tokens)}
            if grads is not None:
                per_device["gradients"] = shard.param_bytes(grads)
            per_device = {k: per_device[k] for k in cats if k in per_device}
    else:
        apply = abstract_model.apply
        if task == "prefill":
            tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
            cache = _kv_cache(model, batch, seq, 0)
        else:
            tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
            cache = _kv_cache(model, batch, seq, seq - 1)
        if model.extra("shard") is not None:  # rows over the batch axes, KV heads over tensor
            tokens = model.extra("shard").put_batch(tokens)
            cache = model.extra("shard").put_cache(cache)

        def step(params, tokens, cache):
            logits, cache = apply(params, tokens, cache=cache, last_only=True)
            return logits, cache

        compiled, secs = _compile(step, (params, tokens, cache), donate=(2,), target=target)
        cats = {"params": tree_bytes(params), "kv_cache": tree_bytes(cache),
                "inputs": tree_bytes(tokens)}
        cats.update(_host_bytes(params=params, kv_cache=cache))
        shard = model.extra("shard")
        if shard is not None:  # tokens and cache rows over the batch axes, KV heads over tensor
            per_device = dict(cats, params=shard.param_bytes(params),
                              inputs=shard.batch_bytes(tokens), kv_cache=shard.cache_bytes(cache))
    report = _report(compiled, name or getattr(spec, "name", "model"), task, batch, seq, cats,
                     {k: analytic.get(k) for k in cats}, secs, device, target)
    if model.extra("shard") is not None:
        report.global_by_category, report.by_category = cats, per_device
    return report


def _host_bytes(**trees) -> dict:
    """``{"<name>_host": bytes}`` of the leaves placed in a host memory kind (ml.passes.offload),
    for the trees that have any."""
    out = {}
    for name, tree in trees.items():
        host = [x for x in jax.tree_util.tree_leaves(tree)
                if "host" in (getattr(getattr(x, "sharding", None), "memory_kind", None) or "")]
        if host:
            out[f"{name}_host"] = tree_bytes(host)
    return out


def _report(compiled, name, task, batch, seq, cats, analytic, secs, device,
            target=None) -> MemoryReport:
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("this backend gives no memory_analysis() for compiled code")
    attention = None
    if target is not None:
        from memlab.targets.report import attention_impls
        attention = attention_impls(compiled.as_text())
    host = lambda f: int(getattr(ma, f, 0) or 0)  # noqa: E731
    return MemoryReport(
        name=name, task=task, batch=batch, seq=seq,
        argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
        alias_bytes=int(ma.alias_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes),
        generated_code_bytes=int(ma.generated_code_size_in_bytes),
        by_category=cats, analytic=analytic, compile_seconds=secs, device=device,
        target=target, host_argument_bytes=host("host_argument_size_in_bytes"),
        host_output_bytes=host("host_output_size_in_bytes"),
        host_alias_bytes=host("host_alias_size_in_bytes"),
        host_temp_bytes=host("host_temp_size_in_bytes"), attention=attention)
