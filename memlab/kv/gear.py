"""GEAR: quantized KV cache plus a low-rank and a sparse correction of the quantization error.

Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe for
Near-Lossless Generative Inference of LLM" (arXiv:2403.05527).  GEAR writes a
KV matrix ``X`` as three parts, ``X ~= D + L + S``:

1. ``S``: a **sparse** matrix of the few largest-magnitude entries (outliers),
   taken out *before* quantization so that they do not stretch the
   quantization range;
2. ``D``: a **uniform low-bit quantization** of what remains;
3. ``L = A @ Bm``: a **rank-r approximation of the quantization residual**
   ``X - D - S``, which is coherent across tokens (not white noise) and so
   compresses well.

This policy, per layer and per KV head, separately for K and V:

* **Outliers** (``S``): for every token and KV head, the
  ``c = ceil(outlier_fraction * head_dim)`` entries of largest ``|x|`` (a fixed
  count per token, so static shapes): channel indices ``out_idx`` (uint8 for
  ``head_dim <= 256``) and their exact values ``out_val`` (``aux_dtype``).
  Reconstruction *overwrites* those entries with the stored values; that is
  the additive ``S`` of the paper with ``S_ij = x_ij - (D + L)_ij`` at the
  outlier positions.
* **Quantization** (``D``), KIVI-style asymmetric min/max with the outliers
  excluded from the range: **keys per channel** (one scale and zero per
  channel per group of ``residual`` tokens -- keys have outlier *channels*),
  **values per token** (one scale and zero per token per KV head).  ``bits``
  in {2, 4, 8}; codes packed ``8 // bits`` to a byte along the channel axis;
  scales and zeros in ``aux_dtype``; ``code = clip(round((x - zero) / scale))``
  against the *stored* (rounded) scale and zero.
* **Low rank** (``L``): at prefill, the residual ``E = X - D`` (zero at outlier
  and padding entries) of the prompt's quantized tokens, ``E [S, D]`` per row
  and KV head, is factored as ``A @ Bm`` with ``Bm [r, D]`` its top-``r``
  right singular vectors (orthonormal rows, from ``eigh`` of ``E^T E`` --
  jit-able with static shapes) and ``A = E @ Bm^T`` ``[S, r]``.  Tokens that are
  quantized later (decode tokens, see below) are projected onto the **same**
  basis, ``A_new = E_new @ Bm^T`` -- the least-squares optimum for a fixed
  ``Bm``; ``Bm`` is fitted once, on the prompt.
* **Streaming buffer**: GEAR compresses the prompt and keeps the most recent
  tokens in a small float buffer, compressing every ``n_b`` new tokens.  Here
  the buffer holds ``residual = G`` tokens; a row's first
  ``floor(len / G) * G`` tokens are compressed and the remaining
  ``len mod G`` sit in the buffer in the cache dtype; when the buffer fills
  (on a decode step) its ``G`` tokens are compressed as one new key group
  (codes + outliers + projection on the prompt's ``Bm``) and it empties.  The
  prompt's tail that does not fill a group starts the buffer.  Which tokens
  are where follows from ``lengths`` alone, so the state stores no counters.

Layout (one layer; ``B`` rows, ``Hkv`` KV heads, ``D`` head dim,
``S = ceil(max_len / G) * G`` compressed slots (slot = position), ``n = S / G``
key groups, ``P = 8 // bits``, ``c`` outliers per token, ``r = rank``)::

    k/codes  uint8 [B, S, Hkv, D/P]      v/codes  uint8 [B, S, Hkv, D/P]
    k/scale, k/zero  aux [B, n, Hkv, D]  v/scale, v/zero  aux [B, S, Hkv]
    k/a, v/a         aux [B, Hkv, S, r]  k/b, v/b         aux [B, Hkv, r, D]
    k/out_idx, v/out_idx  uint8 [B, S, Hkv, c]   k/out_val, v/out_val  aux [B, S, Hkv, c]
    k_buf, v_buf     cache dtype [B, G, Hkv, D]

``nbytes`` = ``2 * B * S * Hkv * (D/P + r*a + c*(i + a)) + 2 * B * Hkv * r * D * a``
``+ 2 * B * n * Hkv * D * a + 2 * B * S * Hkv * a + 2 * B * G * Hkv * D * t``
with ``a`` the ``aux_dtype`` itemsize, ``i`` the index itemsize and ``t`` the
cache dtype's.  Per token and KV head (``D = 64``, 4 bits, ``r = 4``, ``c = 2``,
``G = 32``, float16 aux) that is 104 bytes for K+V (K: 32 codes + 8 scales
+ 8 ``A`` + 6 outliers; V: 32 + 4 + 8 + 6) plus the buffer and ``Bm``
(2.25 bytes amortized over 4096 slots), against 256 for a bfloat16 cache.

Dequantized keys: ``codes * scale + zero + A @ Bm``, then the outliers
written back.  Attention (decode) runs :func:`memlab.kv.base.attend` (XLA) over
the dequantized store followed by the float buffer; the prompt attends to
itself uncompressed, as in the paper.  ``rank=0`` and ``outlier_fraction=0``
switch the corrections off (``GEAR(rank=0, outlier_fraction=0)`` is plain
KIVI-style quantization with a ``G``-token float buffer).

Simplifications, stated: one basis ``Bm`` per (row, layer, KV head) fitted on
the prompt (the paper refits per compressed chunk); fixed ``c`` outliers per
token and head (the paper filters a fraction of each key channel / value
token); attention dequantizes the whole store each step (no fused kernel).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from memlab.kv.base import POLICIES
from memlab.kv._quant_utils import (QUANT_BITS, channel_onehot, dequantize, index_dtype,
                                    minmax_quantize, pack, top_subspace, unpack)
from memlab.kv.base import MAX_POS, Dims, KVPolicy, attend, prompt_positions, write_tokens

_HI = jax.lax.Precision.HIGHEST
_FLOAT_AUX = ("float32", "float16", "bfloat16")


@POLICIES.register("gear")
@dataclasses.dataclass(frozen=True)
class GEAR(KVPolicy):
    """Quantized K/V + rank-``rank`` residual factors + ``outlier_fraction`` sparse outliers.

    Args:
      bits: code width, 2, 4 or 8.
      rank: ``r``, rank of the residual approximation per KV head (0 = none);
        at most ``head_dim``.
      outlier_fraction: fraction of each token's ``head_dim`` entries (per KV
        head) kept exactly, rounded up to a whole count (0 = none); < 0.5.
      residual: ``G``, the float streaming buffer in tokens, also the key
        quantization group (tokens per per-channel scale).
      aux_dtype: dtype of scales, zeros, low-rank factors and outlier values.
    """

    name = "gear"
    bits: int = 4
    rank: int = 4
    outlier_fraction: float = 0.02
    residual: int = 32
    aux_dtype: str = "float16"

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in QUANT_BITS:
            raise ValueError(f"GEAR: bits={self.bits!r} is not supported; use one of {QUANT_BITS}.")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"GEAR: rank={self.rank!r} must be an int >= 0 (0 = no low-rank part).")
        f = self.outlier_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 0.5:
            raise ValueError(f"GEAR: outlier_fraction={f!r} must be a number in [0, 0.5) "
                             "(GEAR uses 0.01-0.05; 0 = no sparse part).")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 1:
            raise ValueError(f"GEAR: residual={self.residual!r} must be a positive int "
                             "(buffer tokens, e.g. 32).")
        if self.aux_dtype not in _FLOAT_AUX:
            raise ValueError(f"GEAR: aux_dtype={self.aux_dtype!r}; use one of {_FLOAT_AUX}.")

    # -- sizes ---------------------------------------------------------------
    def n_outliers(self, head_dim: int) -> int:
        """Outliers kept per token and KV head: ``ceil(outlier_fraction * head_dim)``."""
        return math.ceil(round(self.outlier_fraction * head_dim, 9))

    def capacity(self, max_len: int) -> int:
        """Compressed slots ``S``: ``max_len`` rounded up to whole groups of ``residual``."""
        return -(-max_len // self.residual) * self.residual

    def _aux(self):
        return jnp.dtype(self.aux_dtype)

    def validate(self, dims: Dims) -> None:
        d = dims.head_dim
        if self.rank > d:
            raise ValueError(f"GEAR: rank={self.rank} is larger than head_dim={d}; the residual of "
                             f"a head is [tokens, {d}], use rank <= {d}.")
        p = 8 // self.bits
        if d % p:
            raise ValueError(f"GEAR: head_dim={d} must be a multiple of {p} to pack {self.bits}-bit "
                             f"codes {p} to a byte; use bits=8.")
        if d > 2**15:
            raise ValueError(f"GEAR: head_dim={d} is too large for int16 outlier indices.")

    def init(self, dims: Dims):
        self.validate(dims)
        b, h, d, g, r = dims.batch, dims.n_kv_heads, dims.head_dim, self.residual, self.rank
        s, c, p, aux = self.capacity(dims.max_len), self.n_outliers(d), 8 // self.bits, self._aux()
        z = jnp.zeros

        def part(stat_shape):
            return {"codes": z((b, s, h, d // p), jnp.uint8),
                    "scale": z(stat_shape, aux), "zero": z(stat_shape, aux),
                    "a": z((b, h, s, r), aux), "b": z((b, h, r, d), aux),
                    "out_idx": z((b, s, h, c), index_dtype(d)), "out_val": z((b, s, h, c), aux)}
        buf = (b, g, h, d)
        return {"k": part((b, s // g, h, d)), "v": part((b, s, h)),
                "k_buf": z(buf, dims.dtype), "v_buf": z(buf, dims.dtype)}

    def nbytes(self, dims: Dims) -> int:
        b, h, d, g, r = dims.batch, dims.n_kv_heads, dims.head_dim, self.residual, self.rank
        s, c, p = self.capacity(dims.max_len), self.n_outliers(d), 8 // self.bits
        a, i, t = self._aux().itemsize, jnp.dtype(index_dtype(d)).itemsize, jnp.dtype(dims.dtype).itemsize
        per_kind = b * s * h * (d // p + r * a + c * (i + a)) + b * h * r * d * a
        return (2 * per_kind + 2 * b * (s // g) * h * d * a + 2 * b * s * h * a
                + 2 * b * g * h * d * t)

    # -- compression of a block of whole groups --------------------------------
    def _compress(self, x, valid, kind, basis=None):
        """Compress ``x [B, N, Hkv, D]`` (``N`` a multiple of ``G``); ``valid [B, N]`` whole groups.

        Returns the stored parts for these ``N`` tokens (zeros where invalid) and
        the low-rank basis (fitted here when ``basis`` is None).
        """
        bsz, n, h, d = x.shape
        g, r, aux = self.residual, self.rank, self._aux()
        c = self.n_outliers(d)
        x = x.astype(jnp.float32)
        vmask = valid[:, :, None, None]
        if c:
            _, idx = jax.lax.top_k(jnp.abs(x), c)                     # [B, N, Hkv, c]
            is_out = channel_onehot(idx, d).any(-2)
            val = jnp.take_along_axis(x, idx, axis=-1)
        else:
            idx = jnp.zeros((bsz, n, h, 0), jnp.int32)
            val = jnp.zeros((bsz, n, h, 0), jnp.float32)
            is_out = jnp.zeros(x.shape, bool)
        excl = is_out | ~vmask
        if kind == "k":       # per channel over groups of G tokens
            code, scale, zero = minmax_quantize(x.reshape(bsz, n // g, g, h, d), 2, self.bits, aux,
                                                excl.reshape(bsz, n // g, g, h, d))
            code = code.reshape(bsz, n, h, d)
            deq = dequantize(code, jnp.repeat(scale, g, 1), jnp.repeat(zero, g, 1))
        else:                 # per token over the head's D channels
            code, scale, zero = minmax_quantize(x, 3, self.bits, aux, excl)
            deq = dequantize(code, scale[..., None], zero[..., None])
        err = jnp.where(excl, 0.0, x - deq).transpose(0, 2, 1, 3)      # [B, Hkv, N, D]
        if r and basis is None:
            basis = top_subspace(err, r).astype(aux)
        elif basis is None:
            basis = jnp.zeros((bsz, h, 0, d), aux)
        a = jnp.einsum("bhnd,bhrd->bhnr", err, basis.astype(jnp.float32), precision=_HI)
        parts = {"codes": pack(jnp.where(vmask, code, 0), 3, self.bits),
                 "scale": scale, "zero": zero,
                 "a": a.astype(aux),
                 "out_idx": jnp.where(vmask, idx, 0).astype(index_dtype(d)),
                 "out_val": jnp.where(vmask, val, 0.0).astype(aux)}
        return parts, basis

    def _reconstruct(self, part, kind):
        """Float32 ``[B, S, Hkv, D]`` of the compressed store (every slot, valid or not)."""
        g = self.residual
        code = unpack(part["codes"], 3, self.bits)
        if kind == "k":
            x = dequantize(code, jnp.repeat(part["scale"], g, 1), jnp.repeat(part["zero"], g, 1))
        else:
            x = dequantize(code, part["scale"][..., None], part["zero"][..., None])
        if self.rank:
            x = x + jnp.einsum("bhsr,bhrd->bshd", part["a"].astype(jnp.float32),
                               part["b"].astype(jnp.float32), precision=_HI)
        if part["out_idx"].shape[-1]:
            oh = channel_onehot(part["out_idx"], x.shape[-1])            # [B, S, Hkv, c, D]
            vals = jnp.sum(jnp.where(oh, part["out_val"].astype(jnp.float32)[..., None], 0.0), -2)
            x = jnp.where(oh.any(-2), vals, x)
        return x

    def dequantize(self, state):
        """``(k, v)`` float32 ``[B, S, Hkv, D]``: the compressed store of one layer's state, every
        slot (slots at or past ``floor(len / residual) * residual`` are meaningless)."""
        return self._reconstruct(state["k"], "k"), self._reconstruct(state["v"], "v")

    # -- protocol -------------------------------------------------------------
    def prefill(self, state, q, k, v, ctx):
        g = self.residual
        t = k.shape[1]
        s = state["k"]["codes"].shape[1]
        n = -(-t // g) * g
        if n > s:
            raise ValueError(f"GEAR: a prompt of {t} tokens does not fit the cache's {s} slots; "
                             "build the cache with a larger max_len.")
        pad = ((0, 0), (0, n - t), (0, 0), (0, 0))
        nq = (ctx.n_new // g) * g                                          # compressed per row
        valid = jnp.arange(n)[None, :] < nq[:, None]
        new = dict(state)
        for kind, x in (("k", k), ("v", v)):
            xp = jnp.pad(x, pad)
            parts, basis = self._compress(xp, valid, kind)
            old = state[kind]
            stat_n = n // g if kind == "k" else n
            new[kind] = {
                "codes": old["codes"].at[:, :n].set(parts["codes"]),
                "scale": old["scale"].at[:, :stat_n].set(parts["scale"]),
                "zero": old["zero"].at[:, :stat_n].set(parts["zero"]),
                "a": old["a"].at[:, :, :n].set(parts["a"]),
                "b": basis.astype(old["b"].dtype),
                "out_idx": old["out_idx"].at[:, :n].set(parts["out_idx"]),
                "out_val": old["out_val"].at[:, :n].set(parts["out_val"]),
            }
            # the tail (len mod G tokens) starts the float buffer
            j = jnp.arange(g)[None, :]
            src = jnp.clip(nq[:, None] + j, 0, n - 1)
            tail = jnp.take_along_axis(xp, src[:, :, None, None], axis=1)
            keep = (j < (ctx.n_new - nq)[:, None])[:, :, None, None]
            new[kind + "_buf"] = jnp.where(keep, tail, 0).astype(state[kind + "_buf"].dtype)
        return attend(q, k, v, ctx.positions, prompt_positions(ctx)), new

    def decode(self, state, q, k, v, ctx):
        g = self.residual
        s = state["k"]["codes"].shape[1]
        bsz = k.shape[0]
        ql = (ctx.lengths // g) * g
        rl = ctx.lengths - ql
        flush = rl + 1 == g                                                # the buffer fills now
        j = jnp.arange(g, dtype=jnp.int32)[None, :]
        tok_slots = jnp.where(flush[:, None], ql[:, None] + j, s)          # s: dropped
        grp_slot = jnp.where(flush, ql // g, s // g)[:, None]
        rows = jnp.broadcast_to(jnp.arange(bsz)[:, None], (bsz, g))
        new = dict(state)
        for kind, x in (("k", k), ("v", v)):
            buf = write_tokens(state[kind + "_buf"], x, rl[:, None])
            old = state[kind]
            parts, _ = self._compress(buf, jnp.ones((bsz, g), bool), kind, basis=old["b"])
            stat_slots = grp_slot if kind == "k" else tok_slots
            new[kind] = {
                "codes": write_tokens(old["codes"], parts["codes"], tok_slots),
                "scale": write_tokens(old["scale"], parts["scale"], stat_slots),
                "zero": write_tokens(old["zero"], parts["zero"], stat_slots),
                "a": old["a"].at[rows, :, tok_slots].set(parts["a"].transpose(0, 2, 1, 3),
                                                         mode="drop"),
                "b": old["b"],
                "out_idx": write_tokens(old["out_idx"], parts["out_idx"], tok_slots),
                "out_val": write_tokens(old["out_val"], parts["out_val"], tok_slots),
            }
            new[kind + "_buf"] = jnp.where(flush[:, None, None, None], 0, buf).astype(buf.dtype)
            if kind == "k":
                kbuf = buf
            else:
                vbuf = buf
        ql2 = ql + g * flush
        rl2 = jnp.where(flush, 0, rl + 1)
        slot = jnp.arange(s, dtype=jnp.int32)[None, :]
        pos_q = jnp.where(slot < ql2[:, None], slot, MAX_POS)
        pos_b = jnp.where(j < rl2[:, None], ql2[:, None] + j, MAX_POS)
        kq, vq = self.dequantize(new)
        keys = jnp.concatenate([kq.astype(kbuf.dtype), kbuf], axis=1)
        values = jnp.concatenate([vq.astype(vbuf.dtype), vbuf], axis=1)
        return attend(q, keys, values, ctx.positions, jnp.concatenate([pos_q, pos_b], 1)), new
