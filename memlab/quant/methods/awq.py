"""AWQ: activation-aware per-input-channel scaling before quantization.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (seed list 000).  Salient input channels (large mean |x|) are
scaled up before quantization, which protects them; the scale s = m^α, with m
the mean |x| per channel, is searched over α ∈ [0, 1] to minimise the layer's
output error on calibration data, measured exactly with E[xx^T] (so the search
needs no stored activations).  The inverse scale is stored with the weight
(``Scaled`` format) instead of being folded into the previous norm, so every
matrix gets its own optimum.  AWQ's weight-clipping search is not included.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from memlab.quant.formats import Scaled
from memlab.quant.methods import METHODS, require_stats, hessian, output_error, per_matrix


@METHODS.register("awq")
@dataclasses.dataclass(frozen=True)
class AWQ:
    format: Any
    grid: int = 20
    max_columns: int = 256  # output columns used to score each alpha (groups run along K)
    needs_calibration = True

    @property
    def name(self):
        return f"awq-{self.format.name}"

    def quantize(self, w, stats):
        require_stats("awq", stats)
        fmt = self.format
        wrapper = Scaled(fmt)

        def one(w2, st):
            w2 = w2.astype(jnp.float32)
            h = hessian(st)
            mean_abs = st["abssum"] / jnp.maximum(st["count"], 1.0)
            mean_abs = jnp.maximum(mean_abs, 1e-8)

            # Groups run along K, so quantizing a subset of output columns is exact for
            # those columns: score alphas on evenly spaced columns to bound the cost.
            n = w2.shape[1]
            cols = jnp.linspace(0, n - 1, min(n, self.max_columns)).astype(jnp.int32)
            w_sub = w2[:, cols]

            def trial(alpha):
                s = mean_abs ** alpha
                s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))  # keep scales around 1
                w_hat = fmt.dequantize(fmt.quantize(w_sub * s[:, None])) / s[:, None]
                return output_error(w_sub, w_hat, h), s

            alphas = jnp.linspace(0.0, 1.0, self.grid + 1)
            errs, scales = jax.lax.map(trial, alphas)
            best = scales[jnp.argmin(errs)]
            return wrapper.wrap(fmt.quantize(w2 * best[:, None]), best)

        return per_matrix(jax.jit(one), w, stats)
