"""SmoothQuant: migrate activation outliers into the weights, then W8A8.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models" (and SmoothQuant+, seed list 000).  Per input channel j,
s_j = max|X_j|^α / max|W_j|^(1-α); the weight becomes diag(s) W (int8 per output
channel) and the activation x / s is quantized per token at run time.  The
factors are stored with the weight rather than folded into the previous norm.
"""
import dataclasses

import jax
import jax.numpy as jnp

from memlab.quant.formats import W8A8
from memlab.quant.methods import METHODS, require_stats, per_matrix


@METHODS.register("smoothquant")
@dataclasses.dataclass(frozen=True)
class SmoothQuant:
    alpha: float = 0.5
    needs_calibration = True

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant: alpha={self.alpha} must be in [0, 1]")

    @property
    def format(self):
        return W8A8()

    @property
    def name(self):
        return f"smoothquant-a{self.alpha:g}"

    def quantize(self, w, stats):
        require_stats("smoothquant", stats)

        def one(w2, st):
            w2 = w2.astype(jnp.float32)
            act = jnp.maximum(st["absmax"], 1e-5)
            wmax = jnp.maximum(jnp.max(jnp.abs(w2), axis=1), 1e-5)
            s = act ** self.alpha / wmax ** (1 - self.alpha)
            return W8A8().quantize(w2, in_scale=s)

        return per_matrix(jax.jit(one), w, stats)
