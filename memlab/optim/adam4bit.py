"""4-bit Adam / AdamW: Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States"
(NeurIPS 2023).

* First moment: block-wise (``block_size`` 128) absmax normalization and the signed
  4-bit dynamic-exponent map (``B128/DE``).
* Second moment: the linear map without zero, ``(i + 1) / 16``, with rank-1
  normalization for tensors of rank >= 2 (each element divided by the smaller of
  its row max and column max; leading axes such as a scanned model's layer axis
  index separate matrices), and block-wise (``block_size``) for vectors and
  matrices with a dimension of 1 (``Rank-1/Linear``).
* Codes are packed two per byte in real uint8 storage.  Tensors with fewer than
  ``min_4bit_size`` elements (4096) or matching ``fp32_state_rules`` keep
  ``state_dtype`` state.

State bytes, per quantized tensor of n elements: ``m``: ``nb * block / 2 + 4 * nb``
with ``nb = ceil(n / block)``; ``v``: ``ceil(n / 2) + 4 * L * (R + C)`` for shape
``[*lead, R, C]`` (``L = prod(lead)``), block-wise like ``m`` for vectors; plus 8 bytes
of int32 ``count``/``skipped``.  A step with a NaN/Inf gradient is skipped (zero
updates, state unchanged, ``skipped`` incremented).
"""
from __future__ import annotations

from typing import Any, Sequence

import optax

from memlab.facts import measured
from memlab.optim import _blockwise as bw
from memlab.optim.base import register

SIGNED_MAP = bw.dynamic_map(4, signed=True)
LINEAR_MAP = bw.linear_map(4)


def layout(block_size: int = 128, min_4bit_size: int = 4096, rank1: bool = True,
           fp32_state_rules: Sequence[str] = (), state_dtype: Any = "float32") -> bw.Select:
    """``select(path, shape) -> (mu codec, nu codec)``: which tensors are quantized and how."""
    block = bw.check_block_size(block_size, "adam4bit: block_size", even=True)
    min_size = bw.check_min_size(min_4bit_size, "adam4bit: min_4bit_size")
    rules = bw.compile_rules(fp32_state_rules, "adam4bit: fp32_state_rules")
    mu = bw.BlockwiseCodec(SIGNED_MAP, block, 4)
    nu_blocks = bw.BlockwiseCodec(LINEAR_MAP, block, 4)

    def quantized(shape):
        if rank1 and len(shape) >= 2 and min(shape[-2:]) > 1:
            return mu, bw.Rank1Codec(LINEAR_MAP, shape[-2], shape[-1], 4)
        return mu, nu_blocks

    return bw.float_rules_select(rules, min_size, bw.check_state_dtype(state_dtype), quantized)


def adam4bit_state_bytes(params: Any, block_size: int = 128, min_4bit_size: int = 4096,
                         rank1: bool = True, fp32_state_rules: Sequence[str] = (),
                         state_dtype: Any = "float32", **_) -> int:
    """Exact ``tree_bytes(adam4bit(...).init(params))`` from shapes (other kwargs ignored)."""
    select = layout(block_size, min_4bit_size, rank1, fp32_state_rules, state_dtype)
    return bw.quantized_state_bytes(select, params, "adam4bit")


@register("adam4bit", state_bytes=adam4bit_state_bytes, blockwise_state=True,
          plan=("train",),
          quality_loss=measured(), update_bytes=measured(), fused_update_bytes=measured())
def adam4bit(learning_rate: float | optax.Schedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8, weight_decay: float = 0.0, *, block_size: int = 128,
             min_4bit_size: int = 4096, rank1: bool = True,
             fp32_state_rules: Sequence[str] = (), state_dtype: Any = "float32",
             chunk_size: int = bw.CHUNK_SIZE) -> optax.GradientTransformation:
    """Adam with 4-bit moments (B128/DE first moment, Rank-1/Linear second moment).

    ``weight_decay`` is decoupled (AdamW); ``learning_rate`` may be an optax schedule.
    ``rank1=False`` quantizes the second moment block-wise everywhere.
    """
    select = layout(block_size, min_4bit_size, rank1, fp32_state_rules, state_dtype)
    return bw.quantized_adam(select, learning_rate, b1, b2, eps, weight_decay, "adam4bit",
                             chunk_size)


@register("adamw4bit", state_bytes=adam4bit_state_bytes, blockwise_state=True,
          quality_loss=measured("adam4bit"), update_bytes=measured("adam4bit"),
          fused_update_bytes=measured("adam4bit"))
def adamw4bit(learning_rate: float | optax.Schedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 1e-2,
              **kwargs) -> optax.GradientTransformation:
    """:func:`adam4bit` with AdamW's default decoupled ``weight_decay=1e-2``."""
    return adam4bit(learning_rate, b1, b2, eps, weight_decay, **kwargs)
