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
"""
from __future__ import annotations

import contextlib
import contextvars

import jax

__all__ = ["PLATFORMS", "platform", "lowering_for", "canonical"]

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
