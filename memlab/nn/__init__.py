"""Neural-network building blocks that pick a memory-efficient implementation per backend."""
from memlab.nn.attention import (  # noqa: F401
    IMPLS,
    NAIVE_MAX_SCORE_BYTES,
    attention,
    attention_hook,
    choose,
    decode_attention,
    use_attention,
)
from memlab.nn.loss import (  # noqa: F401
    LOSS_IMPLS,
    NAIVE_MAX_LOGITS_BYTES,
    choose_cross_entropy,
    cross_entropy,
    loss_impl,
    model_loss,
    use_cross_entropy,
)

__all__ = ["IMPLS", "NAIVE_MAX_SCORE_BYTES", "attention", "attention_hook", "choose",
           "decode_attention", "use_attention", "LOSS_IMPLS", "NAIVE_MAX_LOGITS_BYTES",
           "choose_cross_entropy", "cross_entropy", "loss_impl", "model_loss",
           "use_cross_entropy"]
