"""Plumbing shared by the Pallas kernels in ``memlab_kernels``.

Nothing here knows about any caller or any one kernel's algorithm:

* **backends** -- the one backend vocabulary (:data:`BACKENDS`, the names callers
  use for them in :data:`BACKEND_ALIASES`), :func:`resolve_backend` ("auto" ->
  the platform's Pallas backend) and :func:`pallas_lowering` (a backend and the
  ``interpret=`` argument -> the kernel body to trace and the ``interpret``
  value of ``pl.pallas_call``);
* **argument checks** -- :func:`is_concrete` / :func:`host_value` (values are
  checked only outside ``jit``), :func:`check_positive_int`, :func:`check_float`
  and the float dtypes every kernel takes (:data:`KERNEL_FLOAT_DTYPES`);
* **kernel-body helpers** -- :func:`acc_dtype`, :func:`precision_for`, :func:`dot` (float32
  accumulation, optionally transposed operands), the Triton masked
  :func:`load` / :func:`store`, :func:`col_vec` and :func:`nbytes` for cost
  estimates;
* integer arithmetic for block planning and the on-chip memory budgets.

Bit packing lives in :mod:`memlab_kernels._packing`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# --- backends -----------------------------------------------------------------------------
#: The kernel backends: "triton" (GPU), "mosaic_tpu" (TPU), "interpret" (the Triton kernel
#: body in the HLO interpreter, any device), "xla" (the pure-JAX reference), and "auto".
BACKENDS = ("auto", "triton", "mosaic_tpu", "interpret", "xla")
#: Other names for the same backends, as memlab's layers spell them (``memlab.nn`` impl
#: names, ``memlab.quant.kernel_mode``); :func:`canonical_backend` maps them.
BACKEND_ALIASES = {
    "pallas_triton": "triton",
    "pallas_tpu": "mosaic_tpu",
    "pallas_interpret": "interpret",
}
#: The memlab layer name (``impl=``) of each Pallas backend, the inverse of the aliases.
IMPL_NAMES = {"triton": "pallas_triton", "mosaic_tpu": "pallas_tpu",
              "interpret": "interpret", "xla": "xla"}
#: ``jax.default_backend()`` / ``memlab.dispatch.platform()`` -> its Pallas backend.
PLATFORM_BACKENDS = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic_tpu"}


def canonical_backend(backend: str, name: str = "backend") -> str:
    """``backend`` or one of its :data:`BACKEND_ALIASES` -> one of :data:`BACKENDS`."""
    b = BACKEND_ALIASES.get(backend, backend) if isinstance(backend, str) else backend
    if b not in BACKENDS:
        raise ValueError(
            f"{name}={backend!r} is not one of {BACKENDS} (or an alias: "
            f"{sorted(BACKEND_ALIASES)}); pass 'auto' to pick triton on GPU, mosaic_tpu "
            "on TPU and xla on CPU.")
    return b


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """Map ``backend`` ("auto" and aliases included) to one of triton/mosaic_tpu/interpret/xla.

    "auto" picks "triton" on GPU, "mosaic_tpu" on TPU and "xla" anywhere else, for
    ``platform`` (default: ``jax.default_backend()``; memlab passes its dispatch platform).
    """
    backend = canonical_backend(backend)
    if backend != "auto":
        return backend
    platform = jax.default_backend() if platform is None else platform
    return PLATFORM_BACKENDS.get(platform, "xla")


def pallas_lowering(backend: str, interpret: Any = None) -> tuple[str, Any]:
    """``(kernel, interpret)``: which kernel body to trace and ``pl.pallas_call``'s ``interpret``.

    ``kernel`` is "triton", "mosaic" or "xla" (no Pallas kernel).  "interpret" is the
    Triton body with ``interpret=True``; with "triton", ``interpret`` is a bool (True: the
    HLO interpreter); with "mosaic_tpu", True becomes ``pltpu.InterpretParams()`` (TPU
    interpret mode) and an ``InterpretParams`` is passed through.  ``interpret`` is
    ignored by "interpret" and "xla".
    """
    backend = resolve_backend(backend)
    if backend == "xla":
        return "xla", False
    if backend == "interpret":
        return "triton", True
    if backend == "triton":
        return "triton", bool(interpret)
    if interpret is True:
        from jax.experimental.pallas import tpu as pltpu
        return "mosaic", pltpu.InterpretParams()
    return "mosaic", interpret or False


# --- argument checks ----------------------------------------------------------------------
#: The float dtypes every Pallas kernel takes (other dtypes: backend="xla" or a cast).
KERNEL_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_concrete(a) -> bool:
    """True outside tracing: ``a`` holds values a check may read."""
    return not isinstance(a, jax.core.Tracer)


def host_value(a):
    """``a`` as a numpy array, or None while tracing."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_positive_int(name: str, v, fix: str | None = None) -> int:
    """``v`` as an int, or a ValueError naming ``name`` (``fix``: an example value to pass)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name}={v!r} must be a positive int; pass e.g. "
                         f"{fix if fix is not None else name + '=32'}.")
    return int(v)


def check_float(name: str, a, fn: str, dtypes=KERNEL_FLOAT_DTYPES) -> None:
    """A TypeError naming ``fn`` and ``name`` unless ``a`` has one of ``dtypes``."""
    if not hasattr(a, "dtype") or jnp.dtype(a.dtype) not in dtypes:
        raise TypeError(f"{fn}: {name} has dtype {getattr(a, 'dtype', type(a))}; "
                        f"use float32, bfloat16 or float16 (e.g. {name}.astype(jnp.bfloat16)).")


# --- kernel-body helpers ------------------------------------------------------------------
#: TPU vector lanes: the last dimension of a lane-dense block.
LANES = 128


def acc_dtype(dtype):
    """Accumulation dtype of a reference or XLA path: float64 for float64 inputs, else float32."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def precision_for(dtype):
    """``Precision.HIGHEST`` for 32/64-bit floats (IEEE fp32 on Triton, not TF32), else None."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) in (jnp.float32, jnp.float64) else None


def dot(a, b, precision, *, trans_a: bool = False, trans_b: bool = False):
    """``a @ b`` of 2-D tiles (optionally transposed operands) with float32 accumulation."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def load(ref, mask=None, other=0):
    """Triton: load a (possibly partial) tile; lanes where ``mask`` is False read ``other``."""
    if mask is None:
        return ref[...]
    from jax.experimental.pallas import triton as plgpu
    if mask.shape != ref.shape:
        mask = jnp.broadcast_to(mask, ref.shape)
    return plgpu.load(ref, mask=mask, other=other)


def store(ref, val, mask=None):
    """Triton: store a (possibly partial) tile; lanes where ``mask`` is False are left alone."""
    if mask is None:
        ref[...] = val
        return
    from jax.experimental.pallas import triton as plgpu
    if mask.shape != val.shape:
        mask = jnp.broadcast_to(mask, val.shape)
    plgpu.store(ref, val, mask=mask)


def col_vec(ref, shape):
    """Mosaic: a lane-dense ``(1, n)`` per-row block as an ``(n, 1)`` column, broadcast to
    ``shape``."""
    return jnp.broadcast_to(jnp.expand_dims(ref[0], -1), shape)


def nbytes(*arrays) -> int:
    """Bytes of ``arrays`` (None entries skipped), for ``pl.CostEstimate``."""
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in arrays if a is not None)


# --- integer arithmetic -------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """Smallest multiple of ``b`` that is >= ``a``."""
    return cdiv(a, b) * b


def is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def lowest_power_of_2_factor(n: int) -> int:
    """Largest power of two dividing ``n`` (``n`` > 0)."""
    return n & -n


# --- on-chip memory budgets ---------------------------------------------------------------
#: Shared memory one Triton program may use: the smallest per-block opt-in limit of the
#: GPUs the kernels are planned for (A100: 163 KiB; H100 / H200: 227 KiB).
TRITON_SMEM_BYTES = 163 * 1024
#: Scoped VMEM Mosaic grants a kernel unless asked for more (the TPU v5e default).
MOSAIC_DEFAULT_VMEM_BYTES = 16 * 2**20
#: The most scoped VMEM a planner asks for (TPU v5e, v6e and v5p have 128 / 128 / 95 MiB).
MOSAIC_MAX_VMEM_BYTES = 64 * 2**20


def check_on_chip(kernel: str, need: int, limit: int, what: str, fix: str) -> None:
    """A clear error, raised while planning (before any compile), when a kernel's tiles
    need more on-chip memory (``what``: "shared memory" / "VMEM") than ``limit``."""
    if need > limit:
        raise ValueError(
            f"{kernel}: these block sizes need about {need / 1024:.0f} KiB of {what} per "
            f"program, more than the {limit / 1024:.0f} KiB available; {fix}.")


def mosaic_compiler_params(dimension_semantics, vmem_bytes: int = 0):
    """``pltpu.CompilerParams`` with the scoped VMEM limit raised when the tiles need it."""
    from jax.experimental.pallas import tpu as pltpu
    kw = {}
    if vmem_bytes > MOSAIC_DEFAULT_VMEM_BYTES * 3 // 4:
        kw["vmem_limit_bytes"] = int(min(MOSAIC_MAX_VMEM_BYTES,
                                         round_up(vmem_bytes * 5 // 4 + 2**21, 2**20)))
    return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics), **kw)
