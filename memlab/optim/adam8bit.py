"""8-bit Adam / AdamW: Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization" (ICLR 2022).

Both moments are stored as uint8 indices into a 256-entry dynamic tree code map
(signed for ``m``, unsigned for ``v``), block-wise: each tensor is flattened,
zero-padded to whole blocks of ``block_size`` (2048, as in the paper) and every block
keeps one float32 absmax.  A step dequantizes, applies Adam in float32 and
requantizes to the nearest code.  Tensors with fewer than ``min_8bit_size`` elements
(4096, as in the paper/bitsandbytes) keep ``state_dtype`` (float32) state, and so do
tensors whose path matches ``fp32_state_rules``; ``stable_embedding=True`` adds
``r"embed"`` there, the optimizer half of the paper's stable embedding layer (its
layer norm and Xavier init are a model change, not done here).

State bytes, per quantized tensor of n elements: ``2 * (ceil(n / block) * block +
4 * ceil(n / block))``; per float tensor ``2 * n * itemsize``; plus 8 bytes for the
int32 ``count`` and ``skipped`` counters.  A step with a NaN/Inf gradient anywhere is
skipped (zero updates, state unchanged, ``skipped`` incremented).
"""
from __future__ import annotations

from typing import Any, Sequence

import optax

from memlab.facts import measured
from memlab.optim import _blockwise as bw
from memlab.optim.base import register

SIGNED_MAP = bw.dynamic_map(8, signed=True)
UNSIGNED_MAP = bw.dynamic_map(8, signed=False)
STABLE_EMBEDDING_RULE = r"embed"


def layout(block_size: int = 2048, min_8bit_size: int = 4096, stable_embedding: bool = False,
           fp32_state_rules: Sequence[str] = (), state_dtype: Any = "float32") -> bw.Select:
    """``select(path, shape) -> (mu codec, nu codec)``: which tensors are quantized and how."""
    block = bw.check_block_size(block_size, "adam8bit: block_size")
    min_size = bw.check_min_size(min_8bit_size, "adam8bit: min_8bit_size")
    rules = bw.compile_rules(fp32_state_rules, "adam8bit: fp32_state_rules")
    if stable_embedding:
        rules += bw.compile_rules((STABLE_EMBEDDING_RULE,))
    mu = bw.BlockwiseCodec(SIGNED_MAP, block, 8)
    nu = bw.BlockwiseCodec(UNSIGNED_MAP, block, 8)
    return bw.float_rules_select(rules, min_size, bw.check_state_dtype(state_dtype),
                                 lambda shape: (mu, nu))


def adam8bit_state_bytes(params: Any, block_size: int = 2048, min_8bit_size: int = 4096,
                         stable_embedding: bool = False, fp32_state_rules: Sequence[str] = (),
                         state_dtype: Any = "float32", **_) -> int:
    """Exact ``tree_bytes(adam8bit(...).init(params))`` from shapes (other kwargs ignored)."""
    select = layout(block_size, min_8bit_size, stable_embedding, fp32_state_rules, state_dtype)
    return bw.quantized_state_bytes(select, params, "adam8bit")


@register("adam8bit", state_bytes=adam8bit_state_bytes, blockwise_state=True,
          quality_loss=measured("adamw8bit"), update_bytes=measured("adamw8bit"),
          fused_update_bytes=measured("adamw8bit"))
def adam8bit(learning_rate: float | optax.Schedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8, weight_decay: float = 0.0, *, block_size: int = 2048,
             min_8bit_size: int = 4096, stable_embedding: bool = False,
             fp32_state_rules: Sequence[str] = (), state_dtype: Any = "float32",
             chunk_size: int = bw.CHUNK_SIZE) -> optax.GradientTransformation:
    """Adam with block-wise 8-bit dynamic-tree quantized moments.

    ``weight_decay`` is decoupled (AdamW: ``update += weight_decay * param``, scaled
    by the learning rate).  ``learning_rate`` may be an optax schedule of the step.
    ``chunk_size`` elements are updated at a time (it bounds the temporaries; the
    result does not depend on it).
    """
    select = layout(block_size, min_8bit_size, stable_embedding, fp32_state_rules, state_dtype)
    return bw.quantized_adam(select, learning_rate, b1, b2, eps, weight_decay, "adam8bit",
                             chunk_size)


@register("adamw8bit", state_bytes=adam8bit_state_bytes, blockwise_state=True,
          plan=("train", "finetune"), quality_loss=measured(), update_bytes=measured(),
          fused_update_bytes=measured())
def adamw8bit(learning_rate: float | optax.Schedule = 1e-3, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 1e-2,
              **kwargs) -> optax.GradientTransformation:
    """:func:`adam8bit` with AdamW's default decoupled ``weight_decay=1e-2``."""
    return adam8bit(learning_rate, b1, b2, eps, weight_decay, **kwargs)
