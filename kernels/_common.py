"""Small helpers shared by the Pallas kernels in ``memlab_kernels``.

Nothing here knows about any caller: integer arithmetic for block planning and
the choice of a Pallas backend from the default JAX platform.
"""
from __future__ import annotations

import jax

BACKENDS = ("auto", "triton", "mosaic_tpu", "interpret", "xla")


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


def resolve_backend(backend: str) -> str:
    """Map ``backend`` ("auto" included) to one of triton/mosaic_tpu/interpret/xla.

    "auto" picks "triton" on GPU, "mosaic_tpu" on TPU and "xla" anywhere else.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not one of {BACKENDS}; pass 'auto' to pick "
            "triton on GPU, mosaic_tpu on TPU and xla on CPU.")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "triton"
    if platform == "tpu":
        return "mosaic_tpu"
    return "xla"


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
