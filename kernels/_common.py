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
