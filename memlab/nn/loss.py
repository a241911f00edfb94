"""Cross-entropy of a linear head without the ``[N, V]`` logits: pick by backend and shape.

Wijmans et al. (2025), "Cut Your Losses in Large-Vocabulary Language Models":
the loss and both gradients of ``softmax(hidden @ W)`` are computed block by
block (an online log-sum-exp over vocabulary blocks; the backward recomputes
each block), so a 49k-token vocabulary costs megabytes instead of gigabytes.

``memlab.nn.cross_entropy(hidden, classifier, targets, ...)`` runs one of:

=====================  =======================================================
``"naive"``            ``optax.softmax_cross_entropy_with_integer_labels(hidden @ W)``:
                       materializes the float32 ``[N, V]`` logits (and their gradient)
``"chunked"``          :func:`memlab_kernels.cut_cross_entropy.chunked_cross_entropy`:
                       ``lax`` loops over token chunks x vocabulary chunks with a
                       recomputing ``custom_vjp`` (Liger-kernel style fused linear
                       cross-entropy), any backend
``"pallas_triton"``    the CCE Pallas kernels, Triton backend (GPU)
``"pallas_tpu"``       the same kernels' Mosaic backend (TPU)
``"pallas_interpret"`` the Triton kernels in the HLO interpreter (tests, debugging)
=====================  =======================================================

``impl="auto"`` (the default; :func:`choose_cross_entropy`): GPU -> the Triton
kernels; TPU -> the Mosaic kernels; CPU and anything else ->
naive while the float32 logits (``N * V * 4`` bytes) stay under
:data:`NAIVE_MAX_LOGITS_BYTES` (64 MiB; faster for small heads), else chunked.
Which implementation runs (:func:`memlab.dispatch.resolve`): ``impl=`` if given,
else (for :func:`model_loss`) the model's static ``Dispatch.cross_entropy``
(``model.with_dispatch(cross_entropy="chunked")``, part of the jit cache key),
else the trace-time override ``with memlab.nn.use_cross_entropy("chunked"): ...``
(not part of any jit cache key), else ``"auto"``.  Kernel backend names
(``"triton"``, ``"mosaic_tpu"``, ``"interpret"``) are accepted for the kernels.

:func:`model_loss` is the next-token loss of a memlab Llama through this
dispatcher: the model returns its final-norm hidden states
(``hidden_only=True``) and the head weight is read from the params (tied:
``embed/embedding`` ``[V, D]``; untied: ``lm_head/kernel`` ``[D, V]``), cast to
the model's compute dtype as the model's own head would.  It falls back to the
model's logits path (with a warning saying why) for a quantized head (a
``QArray``), a head carrying adapters (LoRA ``lora_a``/``lora_b``), or a model
that is not a memlab Llama.  ``memlab.memory.profile.loss_fn`` (used by
``ml.memory.profile(model, "train")`` and :mod:`memlab.train`) is
``model_loss(model)``: with "auto" on CPU, small vocabularies keep the exact
previous (naive, logits) computation, and large ones switch to chunked.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memlab import dispatch
from memlab_kernels import cut_cross_entropy as _cce

__all__ = ["LOSS_IMPLS", "NAIVE_MAX_LOGITS_BYTES", "REDUCTIONS", "choose_cross_entropy",
           "cross_entropy", "head_weight", "loss_impl", "model_loss", "use_cross_entropy"]

LOSS_IMPLS = dispatch.LOSS_IMPLS
REDUCTIONS = ("mean", "sum", "none")
#: Above this many bytes of float32 logits the CPU path switches from naive to chunked.
NAIVE_MAX_LOGITS_BYTES = 64 * 2**20

# The trace-time override (see the module doc); a model's static Dispatch wins over it.
_DEFAULT = contextvars.ContextVar("memlab_cross_entropy_impl", default="auto")


@contextlib.contextmanager
def use_cross_entropy(impl: str):
    """Run the enclosed traces with ``impl`` as the default cross-entropy implementation.

    A trace-time override (see the module doc); set a model's choice as data with
    ``model.with_dispatch(cross_entropy=impl)``."""
    impl = _check_impl(impl)
    token = _DEFAULT.set(impl)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def _check_impl(impl):
    """``impl`` as one of :data:`LOSS_IMPLS` (kernel backend names mapped), or a ValueError."""
    return dispatch.layer_impl(impl, LOSS_IMPLS, "cross_entropy impl")


def loss_impl(model=None, impl: Optional[str] = None) -> str:
    """The cross-entropy implementation for ``model``'s loss: ``impl`` if given, else the
    model's static ``Dispatch.cross_entropy`` unless "auto", else the trace-time
    :func:`use_cross_entropy` default (possibly "auto")."""
    return _check_impl(dispatch.resolve("cross_entropy", impl, _DEFAULT.get(),
                                        model=getattr(model, "dispatch", None)))


def _platform() -> str:
    return dispatch.platform()


def choose_cross_entropy(n: int, v: int, platform: Optional[str] = None) -> tuple[str, str]:
    """The implementation ``impl="auto"`` runs for ``n`` rows and ``v`` classes, and why."""
    platform = platform or _platform()
    if platform == "gpu":
        return "pallas_triton", "GPU: the cut-cross-entropy Triton kernels"
    if platform == "tpu":
        return "pallas_tpu", "TPU: the cut-cross-entropy Mosaic kernels"
    nbytes = int(n) * int(v) * 4
    if nbytes <= NAIVE_MAX_LOGITS_BYTES:
        return "naive", (f"{platform}: logits {nbytes / 2**20:.1f} MiB <= "
                         f"{NAIVE_MAX_LOGITS_BYTES / 2**20:.0f} MiB")
    return "chunked", (f"{platform}: logits would take {nbytes / 2**20:.0f} MiB > "
                       f"{NAIVE_MAX_LOGITS_BYTES / 2**20:.0f} MiB; chunked never materializes them")


def _naive_rows(h, w, t, tied, ignore_index, softcap):
    """Per-row loss through the float32 ``[N, V]`` logits and optax."""
    logits = (h @ (w.T if tied else w)).astype(jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    valid = t != ignore_index
    rows = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, t, 0))
    return jnp.where(valid, rows, 0.0)


def _check_concrete_targets(targets, v, ignore_index):
    """Out-of-range targets are an error when they can be seen (not under jit)."""
    if isinstance(targets, jax.core.Tracer):
        return
    t = np.asarray(targets)
    bad = (t != ignore_index) & ((t < 0) | (t >= v))
    if bad.any():
        raise ValueError(f"cross_entropy: targets hold {t[bad][:4].tolist()} outside [0, V={v}); "
                         f"mark rows to skip with ignore_index={ignore_index}.")


def cross_entropy(hidden, classifier, targets, *, tied: bool = False,
                  impl: Optional[str] = None, chunk: int = 1024, vocab_chunk: int = 2048,
                  ignore_index: int = -100, reduction: str = "mean",
                  softcap: Optional[float] = None, filter_eps: Optional[float] = None,
                  block_sizes: Optional[_cce.BlockSizes] = None) -> jax.Array:
    """Softmax cross-entropy of ``hidden @ classifier`` against integer ``targets``.

    Args:
      hidden: ``[N, D]`` or ``[B, T, D]`` float.
      classifier: ``[D, V]`` (a Dense kernel), or ``[V, D]`` with ``tied=True``
        (an embedding table used as the head).
      targets: int, ``hidden``'s leading shape (``[N]`` or ``[B, T]``); rows equal
        to ``ignore_index`` count neither in the loss nor in the mean.
      impl: see the module doc; None means the context default (``"auto"``).
      chunk, vocab_chunk: token and vocabulary chunk of ``"chunked"``.
      reduction: ``"mean"`` over the kept rows (0 when none is kept), ``"sum"``,
        or ``"none"`` (per-row float32 losses shaped like ``targets``, 0 where ignored).
      softcap: logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).
      filter_eps: gradient filtering (CCE section 4.3; ``"chunked"`` and the
        kernels): backward blocks whose ``|softmax - onehot|`` is all below it
        are skipped.  None keeps the gradient exact.
      block_sizes: tiles of the Pallas kernels (``memlab_kernels.cut_cross_entropy.BlockSizes``).

    Returns a float32 scalar (or ``targets``-shaped losses), differentiable
    w.r.t. ``hidden`` and ``classifier``.
    """
    impl = _check_impl(dispatch.resolve("cross_entropy", impl, _DEFAULT.get()))
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction={reduction!r} is not one of {REDUCTIONS}.")
    for arg, x in (("hidden", hidden), ("classifier", classifier), ("targets", targets)):
        if not hasattr(x, "shape"):
            raise TypeError(f"cross_entropy: {arg} must be an array, got {type(x).__name__}.")
    if hidden.ndim < 2:
        raise ValueError(f"cross_entropy: hidden must be [N, D] or [B, T, D], got shape "
                         f"{tuple(hidden.shape)}.")
    lead = tuple(hidden.shape[:-1])
    if tuple(targets.shape) != lead:
        raise ValueError(f"cross_entropy: targets shape {tuple(targets.shape)} must equal "
                         f"hidden's leading shape {lead} (one target per hidden row).")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    n, _, v = _cce.check_args(h, classifier, t, tied=tied, name="cross_entropy")
    _check_concrete_targets(targets, v, ignore_index)
    if impl == "auto":
        impl, _ = choose_cross_entropy(n, v)
    common = dict(tied=tied, ignore_index=ignore_index, softcap=softcap)
    if impl == "naive":
        _cce._check_ignore("cross_entropy", ignore_index)
        cap = _cce._check_softcap("cross_entropy", softcap)
        _cce._check_eps("cross_entropy", filter_eps)
        rows = _naive_rows(h, classifier, t, tied, ignore_index, cap)
    elif impl == "chunked":
        rows = _cce.chunked_cross_entropy(h, classifier, t, chunk=chunk, vocab_chunk=vocab_chunk,
                                          filter_eps=filter_eps, **common)
    else:
        rows = _cce.cut_cross_entropy(h, classifier, t, block_sizes=block_sizes,
                                      backend=dispatch.kernel_backend_of(impl),
                                      filter_eps=filter_eps, **common)
    if reduction == "none":
        return rows.reshape(lead)
    total = jnp.sum(rows)
    if reduction == "sum":
        return total
    count = jnp.sum(t != ignore_index)
    return total / jnp.maximum(count, 1).astype(jnp.float32)


# ---------------------------------------------------------------------------
# The model's training loss
# ---------------------------------------------------------------------------
def _is_float_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) and \
        jnp.issubdtype(x.dtype, jnp.floating)


def head_weight(model, params) -> tuple[Optional[Any], bool, Optional[str]]:
    """``(weight, tied, why_not)``: the head weight for :func:`cross_entropy`, or
    ``why_not`` saying why the model's own logits path must be used."""
    from memlab.models.llama import Llama
    if not isinstance(getattr(model, "module", None), Llama):
        return None, False, "the model is not a memlab Llama (no hidden_only path)"
    spec = model.module.config
    if getattr(spec, "final_softcap", None) is not None:
        return None, False, "the model soft-caps its logits (final_softcap)"
    key, leaf = ("embed", "embedding") if spec.tie_embeddings else ("lm_head", "kernel")
    group = params.get(key) if hasattr(params, "get") else None
    w = group.get(leaf) if hasattr(group, "get") else None
    if w is None:
        return None, False, f"params have no {key}/{leaf}"
    if not _is_float_array(w):
        return None, False, (f"the head {key}/{leaf} is a {type(w).__name__} (quantized?), "
                             "not a float array")
    extra = sorted(set(group) - {leaf})
    if extra:
        return None, False, f"the head {key} carries {extra} (adapters run inside the model)"
    return w, bool(spec.tie_embeddings), None


def model_loss(model, *, impl: Optional[str] = None, chunk: int = 1024,
               vocab_chunk: int = 2048, filter_eps: Optional[float] = None,
               block_sizes: Optional[_cce.BlockSizes] = None) -> Callable:
    """``loss(params, tokens[B, T+1])``: mean next-token cross-entropy of ``model``.

    The hidden states come from ``model.apply(params, tokens[:, :-1],
    hidden_only=True)`` and the head weight from ``params``; see the module doc
    for the fallback to the model's logits.  ``impl`` as in :func:`cross_entropy`
    ("naive" runs the model's own logits, exactly the previous loss); None: the
    model's static ``model.dispatch.cross_entropy``, else the trace-time default
    (:func:`loss_impl`).
    """
    if impl is not None:
        impl = _check_impl(impl)

    def loss(params, tokens):
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"model_loss: tokens must be [batch, seq+1] with seq >= 1, got "
                             f"shape {tuple(tokens.shape)}.")
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        chosen = loss_impl(model, impl)
        w, tied, why = head_weight(model, params)
        vocab = getattr(getattr(getattr(model, "module", None), "config", None), "vocab_size", None)
        if chosen == "auto":
            # Not a memlab Llama: nothing else is possible, so no warning either.
            chosen = "naive" if vocab is None else \
                choose_cross_entropy(inputs.shape[0] * inputs.shape[1], vocab)[0]
        if why is not None or chosen == "naive":
            if why is not None and chosen != "naive":
                warnings.warn(f"memlab.nn.model_loss: {why}; computing the loss from the "
                              f"model's [B, T, V] logits instead of impl={chosen!r}.",
                              stacklevel=2)
            logits = model.apply(params, inputs)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), targets).mean()
        hidden = model.apply(params, inputs, hidden_only=True)
        w = w.astype(model.module.config.compute_dtype)
        return cross_entropy(hidden, w, targets, tied=tied, impl=chosen, chunk=chunk,
                             vocab_chunk=vocab_chunk, filter_eps=filter_eps,
                             block_sizes=block_sizes)

    return loss
