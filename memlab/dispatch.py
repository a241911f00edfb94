"""The platform memlab's dispatchers pick kernels for: the process's backend, or a target.

Attention (:func:`memlab.nn.choose`), the cross-entropy (:func:`memlab.nn.
choose_cross_entropy`), decode attention and quantized matmuls
(:func:`memlab.quant.matmul.kernel_backend`) choose an implementation per
platform: cuDNN or the Triton kernels on ``"gpu"``, the Mosaic kernels on
``"tpu"``, XLA paths on ``"cpu"``.  :func:`platform` is that platform, in one
vocabulary (``"gpu"``, ``"tpu"``, ``"cpu"``, or another backend's own name).

While a program is compiled for a device this process does not have
(:mod:`memlab.targets`: an H100 or a TPU on a CPU-only machine),
:func:`lowering_for` makes the dispatchers choose for that device instead,
so the compiled program is the one that device would run.  It clears JAX's
trace caches on entry and exit: a function traced for one platform is never
reused for another.

**Dispatch is data.**  Which implementation a model runs is a static field of the
model, :class:`Dispatch` (``memlab.Model.dispatch``): the attention and
cross-entropy implementations, the quantized-matmul kernel backend and an
attention hook (ring attention under a sequence-parallel ``ml.passes.shard``).
A Model is a pytree whose static part holds its Dispatch, so two models that
differ only there are two jit cache entries: ``jax.jit(lambda m, x: m(x))``
traces each once.  ``Model.apply`` makes its Dispatch :func:`active` for the
trace; the dispatchers resolve every choice with :func:`resolve`:

1. an explicit argument (``impl=`` of :func:`memlab.nn.attention`, a Llama's
   ``LlamaConfig.attention``, ``model_loss(impl=)``);
2. the model's static choice, unless it is ``"auto"``;
3. the trace-time override (``memlab.nn.use_attention``, ``use_cross_entropy``,
   ``memlab.quant.kernel_mode``, ``attention_hook``): kept for direct calls of the
   ``memlab.nn`` functions; it is not part of any jit cache key, and inside a model
   whose static choice differs it is ignored with a DeprecationWarning;
4. ``"auto"``: by platform and shape.

One backend vocabulary: the layer names (``"pallas_triton"``, ``"pallas_tpu"``,
``"pallas_interpret"``/``"interpret"``) and the kernels' names
(:data:`memlab_kernels._common.BACKENDS`: ``"triton"``, ``"mosaic_tpu"``,
``"interpret"``, ``"xla"``) are accepted everywhere; :func:`layer_impl` maps a
name onto a layer's implementations and :func:`kernel_backend_of` onto a kernel's
``backend=``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from typing import Any, Optional

import jax

from memlab_kernels._common import IMPL_NAMES, canonical_backend

__all__ = ["PLATFORMS", "platform", "lowering_for", "canonical", "ATTENTION_IMPLS",
           "DECODE_IMPLS", "LOSS_IMPLS", "Dispatch", "active", "applying", "resolve",
           "resolve_hook", "layer_impl", "kernel_backend_of"]

#: The dispatch vocabulary (other backends keep their own name and get the XLA paths).
PLATFORMS = ("gpu", "tpu", "cpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}

_LOWERING = contextvars.ContextVar("memlab_lowering_platform", default=None)


def canonical(name: str) -> str:
    """``"cuda"``/``"rocm"`` -> ``"gpu"``; other names unchanged."""
    return _ALIASES.get(name, name)


def platform() -> str:
    """The platform the dispatchers choose for now (see the module doc)."""
    override = _LOWERING.get()
    return override if override is not None else canonical(jax.default_backend())


@contextlib.contextmanager
def lowering_for(name: str):
    """Trace the enclosed code as if it ran on ``name`` (``"gpu"``, ``"cuda"``, ``"tpu"``)."""
    target = canonical(name)
    if target not in PLATFORMS:
        raise ValueError(f"lowering_for: platform={name!r} is not one of {PLATFORMS} "
                         "(or 'cuda')")
    jax.clear_caches()
    token = _LOWERING.set(target)
    try:
        yield target
    finally:
        _LOWERING.reset(token)
        jax.clear_caches()


# ---------------------------------------------------------------------------
# The vocabulary of each dispatcher
# ---------------------------------------------------------------------------
#: :func:`memlab.nn.attention` implementations.
ATTENTION_IMPLS = ("auto", "pallas_triton", "pallas_tpu", "cudnn", "xla", "blocked", "chunked",
                   "naive", "interpret")
#: :func:`memlab.nn.decode_attention` implementations.
DECODE_IMPLS = ("auto", "pallas_triton", "pallas_tpu", "interpret", "xla")
#: :func:`memlab.nn.cross_entropy` implementations.
LOSS_IMPLS = ("auto", "naive", "chunked", "pallas_triton", "pallas_tpu", "pallas_interpret")


def layer_impl(name: str, allowed: tuple, what: str) -> str:
    """``name`` as one of a layer's implementations ``allowed``: a layer name as is, or a
    kernel backend name (``"triton"``, ``"mosaic_tpu"``, ``"interpret"``, ...) mapped onto
    the layer's name for it.  A ValueError naming ``what`` and the choices otherwise."""
    if isinstance(name, str) and name in allowed:
        return name
    try:
        backend = canonical_backend(name, what)
    except ValueError:
        backend = None
    if backend is not None:
        candidates = (backend, IMPL_NAMES.get(backend))
        if backend == "interpret":
            candidates += ("pallas_interpret",)
        for c in candidates:
            if c in allowed:
                return c
    raise ValueError(f"{what}={name!r} is not one of {allowed} (kernel backend names such as "
                     "'triton', 'mosaic_tpu', 'interpret' are accepted too); use 'auto' to pick "
                     "by backend and shape.")


def kernel_backend_of(impl: str) -> str:
    """A layer's Pallas implementation name -> the kernels' ``backend=`` (``"pallas_triton"``
    -> ``"triton"``, ``"pallas_tpu"`` -> ``"mosaic_tpu"``, ``"pallas_interpret"`` ->
    ``"interpret"``)."""
    return canonical_backend(impl, "impl")


# ---------------------------------------------------------------------------
# Dispatch: the model's static choices
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Which implementations a model runs: static, hashable, part of the jit cache key.

    ``attention``: a :data:`ATTENTION_IMPLS` name; ``cross_entropy``: a
    :data:`LOSS_IMPLS` name (the training loss, :func:`memlab.nn.model_loss`);
    ``qmatmul``: the quantized-matmul kernel backend (:data:`memlab_kernels._common.
    BACKENDS` or an alias); ``attention_hook``: a hashable callable ``hook(q, k, v,
    scale=, **mask)`` run in place of every attention call of the model's training
    forward (:class:`memlab.nn.ring_attention.RingAttention`, set by the shard pass), or
    None.  ``"auto"`` leaves the choice to the trace-time override, then the platform.
    """

    attention: str = "auto"
    cross_entropy: str = "auto"
    qmatmul: str = "auto"
    attention_hook: Any = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("attention", layer_impl(self.attention, ATTENTION_IMPLS, "Dispatch.attention"))
        set_("cross_entropy", layer_impl(self.cross_entropy, LOSS_IMPLS,
                                         "Dispatch.cross_entropy"))
        set_("qmatmul", canonical_backend(self.qmatmul, "Dispatch.qmatmul"))
        hook = self.attention_hook
        if hook is not None:
            if not callable(hook):
                raise TypeError(f"Dispatch.attention_hook must be a callable hook(q, k, v, "
                                f"scale=, **mask) or None, got {type(hook).__name__}")
            try:
                hash(hook)
            except TypeError:
                raise TypeError("Dispatch.attention_hook must be hashable (it is part of the "
                                "jit cache key); use a frozen dataclass such as "
                                "memlab.nn.ring_attention.RingAttention") from None

    def replace(self, **changes) -> "Dispatch":
        return dataclasses.replace(self, **changes)


_ACTIVE = contextvars.ContextVar("memlab_active_dispatch", default=None)


def active() -> Optional[Dispatch]:
    """The Dispatch of the model being traced now (``Model.apply``), or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def applying(d: Optional[Dispatch]):
    """Trace the enclosed code with ``d`` as the model's Dispatch (``Model.apply`` does)."""
    if d is not None and not isinstance(d, Dispatch):
        raise TypeError(f"applying: expects a memlab.dispatch.Dispatch, got {type(d).__name__}")
    token = _ACTIVE.set(d)
    try:
        yield d
    finally:
        _ACTIVE.reset(token)


_OVERRIDE_NAMES = {"attention": "memlab.nn.use_attention",
                   "cross_entropy": "memlab.nn.use_cross_entropy",
                   "qmatmul": "memlab.quant.kernel_mode"}


def resolve(field: str, explicit: Optional[str] = None, override: str = "auto",
            model: Optional[Dispatch] = None) -> str:
    """One choice (``field`` of :class:`Dispatch`): ``explicit`` if given, else the model's
    static choice (``model``, default the :func:`active` one) unless ``"auto"``, else the
    trace-time ``override``.  An override the model's choice beats is reported with a
    DeprecationWarning.  Names are not validated here (the callers do)."""
    if explicit is not None:
        return explicit
    model = active() if model is None else model
    static = "auto" if model is None else getattr(model, field)
    if static == "auto":
        return override
    if override not in ("auto", static):
        warnings.warn(f"{_OVERRIDE_NAMES[field]}({override!r}) is ignored inside a model whose "
                      f"Dispatch sets {field}={static!r}: a model's choice is static data (part "
                      f"of the jit cache key); change it with model.with_dispatch({field}=...).",
                      DeprecationWarning, stacklevel=3)
    return static


def resolve_hook(override=None):
    """The attention hook to run: the active model's static one, else ``override``."""
    model = active()
    static = None if model is None else model.attention_hook
    if static is None:
        return override
    if override is not None and override != static:
        warnings.warn("memlab.nn.attention_hook is ignored inside a model whose Dispatch sets "
                      "attention_hook (e.g. ring attention from the shard pass).",
                      DeprecationWarning, stacklevel=3)
    return static
