"""GPTQ: Hessian-aware rounding, one input row at a time, errors pushed forward.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers".  With H = E[xx^T] (+ 1% dampening) and the upper
Cholesky factor U of H^-1, input row k of the kernel W[K, N] is rounded, and
its error (w_k - q_k) / U_kk is propagated to the not-yet-quantized rows via
U_k,k+1: — the optimal brain surgeon update.  ``act_order`` visits rows by
decreasing H_kk; group scales are then fixed up front from the original
weights ("static groups") so the stored format keeps contiguous groups.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from memlab.quant.formats import IntN
from memlab.quant.methods import METHODS, require_stats, hessian, per_matrix


@METHODS.register("gptq")
@dataclasses.dataclass(frozen=True)
class GPTQ:
    format: Any
    damp: float = 0.01
    act_order: bool = True
    needs_calibration = True

    def __post_init__(self):
        if not isinstance(self.format, IntN):
            raise ValueError(f"gptq: format must be an integer format (ml.quant.intn/int4), "
                             f"got {getattr(self.format, 'name', self.format)!r}")

    @property
    def name(self):
        return f"gptq-{self.format.name}{'-act' if self.act_order else ''}"

    def quantize(self, w, stats):
        require_stats("gptq", stats)
        return per_matrix(jax.jit(self._one), w, stats)

    def _one(self, w, st):
        fmt = self.format
        g = fmt.group
        k, n = w.shape
        w = w.astype(jnp.float32)
        h = hessian(st).astype(jnp.float32)
        dead = jnp.diag(h) == 0
        h = h + jnp.diag(dead.astype(jnp.float32))
        w = jnp.where(dead[:, None], 0.0, w)
        h = h + self.damp * jnp.mean(jnp.diag(h)) * jnp.eye(k)
        # static group parameters from the original weights
        scale, zero = fmt.group_params(w)
        row_scale, row_zero = jnp.repeat(scale, g, 0), jnp.repeat(zero, g, 0)
        perm = jnp.argsort(-jnp.diag(h)) if self.act_order else jnp.arange(k)
        inv = jnp.argsort(perm)
        wp, hp = w[perm], h[perm][:, perm]
        sp, zp = row_scale[perm], row_zero[perm]
        hinv = jnp.linalg.inv(hp)
        u = jnp.linalg.cholesky(hinv).T  # upper: H^-1 = U^T U
        rows = jnp.arange(k)

        def body(i, carry):
            wq, codes = carry
            wi = wq[i]
            c = fmt.quantize_with(wi[None], sp[i][None], zp[i][None])[0]
            qi = (c - zp[i]) * sp[i]
            err = (wi - qi) / u[i, i]
            upd = jnp.where((rows > i)[:, None], u[i][:, None] * err[None, :], 0.0)
            return wq - upd, codes.at[i].set(c)

        _, codes = jax.lax.fori_loop(0, k, body, (wp, jnp.zeros((k, n), jnp.float32)))
        return fmt.from_codes(codes[inv], scale, zero)
