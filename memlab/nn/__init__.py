"""Neural-network building blocks that pick a memory-efficient implementation per backend."""
from memlab.nn.attention import (  # noqa: F401
    IMPLS,
    NAIVE_MAX_SCORE_BYTES,
    attention,
    choose,
    decode_attention,
    use_attention,
)

__all__ = ["IMPLS", "NAIVE_MAX_SCORE_BYTES", "attention", "choose", "decode_attention",
           "use_attention"]
