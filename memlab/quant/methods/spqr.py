"""SpQR-style dense-and-sparse quantization: small groups + exact sparse outliers.

Dettmers et al., "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM
Weight Compression" (seed list 000).  The weights whose rounding would cost the
most output error -- saliency (w - q(w))^2 * H_kk, H = E[xx^T] -- are kept
exactly (float16, flat int32 index) and removed from the group ranges; the rest
are quantized round-to-nearest in small groups.  SpQR's second-level 3-bit
quantization of the group statistics and its GPTQ base are not included: the
stored bits per parameter are reported as they are.
"""
import dataclasses

import jax
import jax.numpy as jnp

from memlab.quant.formats import IntN, WithOutliers
from memlab.quant.methods import METHODS, require_stats, per_matrix


@METHODS.register("spqr")
@dataclasses.dataclass(frozen=True)
class SpQR:
    bits: int = 3
    group: int = 16
    outlier_frac: float = 0.01
    needs_calibration = True

    def __post_init__(self):
        if not 0.0 <= self.outlier_frac < 0.5:
            raise ValueError(f"spqr: outlier_frac={self.outlier_frac} must be in [0, 0.5)")

    @property
    def format(self):
        return WithOutliers(IntN(self.bits, self.group, False))

    @property
    def name(self):
        return f"spqr-int{self.bits}-g{self.group}-o{self.outlier_frac:g}"

    def quantize(self, w, stats):
        require_stats("spqr", stats)
        fmt = IntN(self.bits, self.group, False)
        k, n = w.shape[-2:]
        count = max(1, int(round(self.outlier_frac * k * n)))

        def one(w2, st):
            w2 = w2.astype(jnp.float32)
            hdiag = jnp.diag(st["xtx"]) / jnp.maximum(st["count"], 1.0)
            err = (fmt.dequantize(fmt.quantize(w2)) - w2) ** 2 * hdiag[:, None]
            _, idx = jax.lax.top_k(err.reshape(-1), count)
            mask = jnp.zeros(k * n, bool).at[idx].set(True).reshape(k, n)
            # outliers leave the group ranges: replace them by their group's mean
            g = self.group
            wg = jnp.where(mask, jnp.nan, w2).reshape(k // g, g, n)
            fill = jnp.nan_to_num(jnp.nanmean(wg, axis=1, keepdims=True))
            base = jnp.where(jnp.isnan(wg), fill, wg).reshape(k, n)
            return WithOutliers(fmt).wrap(fmt.quantize(base), idx, w2.reshape(-1)[idx])

        return per_matrix(jax.jit(one), w, stats)
