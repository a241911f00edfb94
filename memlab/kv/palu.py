"""Palu: a low-rank latent KV cache (store ``h = x U``, rebuild ``K = h U^T`` on the fly).

Chang et al. 2024, "Palu: Compressing KV-Cache with Low-Rank Projection"
(arXiv:2407.21118).  Palu factors each KV projection weight ``W ~= W_down
W_up`` (an SVD of the weight, offline, with calibration data), caches the
rank-``r`` latent ``h = x W_down`` instead of ``K = x W``, and rebuilds the keys
``h W_up`` inside the attention kernel (values: ``W_up`` is folded into the
output projection).  Its "group-head" decomposition (G-LRD) shares one latent
among a group of heads, trading accuracy for reconstruction cost.

**This is the data-driven, online variant.**  A KV policy sees K and V, not the
layer input ``x`` or the weights, so instead of decomposing ``W_k`` offline this
policy decomposes the *prompt's own* keys and values at prefill: for every row
and group of ``head_group`` KV heads, ``X [n_prompt, head_group * D]`` (the
group's heads side by side) gets its top-``r`` right singular vectors
``U^T [r, head_group * D]`` (``eigh`` of ``X^T X``, jit-able, static shapes);
every token's latent is ``h = x U`` and its reconstruction ``h U^T``.  For a
fixed projection this is the least-squares optimum over the prompt (Palu's
offline SVD of ``W`` optimizes the weights instead, over calibration data, and
shares ``U`` across rows).  Decode tokens are projected with the same ``U``.

* ``rank_ratio``: ``r = max(1, round(rank_ratio * head_group * D))`` per group
  (``rank_ratio=1`` is lossless up to float error).
* ``head_group``: KV heads per latent; must divide ``n_kv_heads``.  1 is
  Palu's per-head M-LRD, ``n_kv_heads`` its joint J-LRD, in between its
  group-head G-LRD (the paper's default).
* ``pre_rope`` (default True): keys are decomposed **before** RoPE
  (``ctx.k_pre``, as Palu does: the projection weights act before RoPE and
  pre-RoPE keys are markedly lower-rank); decode rebuilds ``h U^T`` and applies
  RoPE at each slot's position.  ``pre_rope=False`` decomposes the rotated keys.

Layout (one layer; ``B`` rows, ``S = max_len`` slots (slot = position),
``Hg = n_kv_heads / head_group`` groups, ``E = head_group * D``)::

    k_lat, v_lat    cache dtype [B, S, Hg, r]
    k_proj, v_proj  cache dtype [B, Hg, r, E]   (U^T, orthonormal rows)

``nbytes = 2 * B * S * Hg * r * t + 2 * B * Hg * r * E * t`` (``t`` the cache
dtype's itemsize): ``rank_ratio`` of the dense cache plus ``r * E`` values per
row, group and K/V for the projections.

Attention: the prompt attends to itself uncompressed (as the paper's prefill
does); a decode step rebuilds ``[B, S, Hkv, D]`` keys and values from the
latents (plain XLA, no fused kernel; values are rebuilt too rather than folding
``U`` into the output projection) and calls :func:`memlab.kv.base.attend`.
Not done: an offline ``calibrate(model, batches)`` that computes per-layer
projections from calibration data through the model's k/v projections.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from memlab.kv.base import POLICIES
from memlab.kv._quant_utils import top_subspace
from memlab.kv.base import MAX_POS, Dims, KVPolicy, attend, prompt_positions, write_tokens

_HI = jax.lax.Precision.HIGHEST


@POLICIES.register("palu")
@dataclasses.dataclass(frozen=True)
class Palu(KVPolicy):
    """Low-rank latent K/V from an online SVD of the prompt (see the module docstring)."""

    name = "palu"
    rank_ratio: float = 0.5
    head_group: int = 1
    pre_rope: bool = True

    def __post_init__(self):
        r = self.rank_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ValueError(f"Palu: rank_ratio={r!r} must be in (0, 1] (the latent's share of "
                             "the head dims, e.g. 0.5).")
        g = self.head_group
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"Palu: head_group={g!r} must be a positive int (KV heads per latent).")
        if not isinstance(self.pre_rope, bool):
            raise ValueError(f"Palu: pre_rope={self.pre_rope!r} must be True or False.")

    def rank(self, head_dim: int) -> int:
        """Latent width ``r`` per group of ``head_group`` KV heads."""
        return max(1, round(self.rank_ratio * self.head_group * head_dim))

    def validate(self, dims: Dims) -> None:
        if dims.n_kv_heads % self.head_group:
            raise ValueError(f"Palu: head_group={self.head_group} must divide n_kv_heads="
                             f"{dims.n_kv_heads}; use one of "
                             f"{[x for x in range(1, dims.n_kv_heads + 1) if dims.n_kv_heads % x == 0]}.")

    def _shapes(self, dims: Dims):
        hg, e = dims.n_kv_heads // self.head_group, self.head_group * dims.head_dim
        r = self.rank(dims.head_dim)
        return (dims.batch, dims.max_len, hg, r), (dims.batch, hg, r, e)

    def init(self, dims: Dims):
        self.validate(dims)
        lat, proj = self._shapes(dims)
        z = lambda s: jnp.zeros(s, dims.dtype)  # noqa: E731
        return {"k_lat": z(lat), "v_lat": z(lat), "k_proj": z(proj), "v_proj": z(proj)}

    def nbytes(self, dims: Dims) -> int:
        (b, s, hg, r), (_, _, _, e) = self._shapes(dims)
        t = jnp.dtype(dims.dtype).itemsize
        return 2 * b * s * hg * r * t + 2 * b * hg * r * e * t

    # -- helpers -------------------------------------------------------------
    def _group(self, x):
        b, t, h, d = x.shape
        return x.astype(jnp.float32).reshape(b, t, h // self.head_group, self.head_group * d)

    def _fit(self, x, valid):
        """``x [B, T, Hkv, D]`` -> (projection ``U^T [B, Hg, r, E]``, latents ``[B, T, Hg, r]``)."""
        xg = jnp.where(valid[:, :, None, None], self._group(x), 0.0)
        proj = top_subspace(xg.transpose(0, 2, 1, 3), self.rank(x.shape[-1]))
        return proj, self._project(x, proj)

    def _project(self, x, proj):
        return jnp.einsum("bthe,bhre->bthr", self._group(x), proj.astype(jnp.float32), precision=_HI)

    def reconstruct(self, state):
        """``(k, v)`` float32 ``[B, S, Hkv, D]`` from one layer's latents; keys are *before* RoPE
        when ``pre_rope`` (slot ``i`` is position ``i``)."""
        def one(lat, proj):
            x = jnp.einsum("bshr,bhre->bshe", lat.astype(jnp.float32), proj.astype(jnp.float32),
                           precision=_HI)
            b, s, hg, e = x.shape
            return x.reshape(b, s, hg * self.head_group, e // self.head_group)
        return one(state["k_lat"], state["k_proj"]), one(state["v_lat"], state["v_proj"])

    # -- protocol -------------------------------------------------------------
    def prefill(self, state, q, k, v, ctx):
        slots = prompt_positions(ctx)
        valid = slots != MAX_POS
        kx = ctx.k_pre if self.pre_rope else k
        k_proj, k_lat = self._fit(kx, valid)
        v_proj, v_lat = self._fit(v, valid)
        dt = state["k_lat"].dtype
        new = {"k_lat": write_tokens(state["k_lat"], k_lat, slots),
               "v_lat": write_tokens(state["v_lat"], v_lat, slots),
               "k_proj": k_proj.astype(dt), "v_proj": v_proj.astype(dt)}
        return attend(q, k, v, ctx.positions, slots), new

    def decode(self, state, q, k, v, ctx):
        kx = ctx.k_pre if self.pre_rope else k
        new = dict(state)
        new["k_lat"] = write_tokens(state["k_lat"], self._project(kx, state["k_proj"]), ctx.positions)
        new["v_lat"] = write_tokens(state["v_lat"], self._project(v, state["v_proj"]), ctx.positions)
        keys, values = self.reconstruct(new)
        b, s = keys.shape[:2]
        slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
        if self.pre_rope:
            keys = ctx.rope(keys, slot)
        kv_pos = jnp.where(slot <= ctx.positions[:, -1:], slot, MAX_POS)
        return attend(q, keys.astype(q.dtype), values.astype(q.dtype), ctx.positions, kv_pos), new
