"""Decode attention: one query token per sequence against a KV cache (split-K).

Flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference";
FlashDecoding++, Hong et al. 2023) for the generation step, over either a
contiguous cache or a paged one (PagedAttention, Kwon et al. 2023, vLLM).

Layout (as in :mod:`memlab_kernels.attention_reference`):

* ``q``: ``[B, H, D]``, the single new token of each sequence.
* Contiguous cache: ``k``: ``[B, S, Hkv, D]``, ``v``: ``[B, S, Hkv, Dv]``.
* Paged cache: ``k_pages``: ``[Hkv, num_pages, page_size, D]``, ``v_pages``:
  ``[Hkv, num_pages, page_size, Dv]`` (head-major, one pool of pages shared by
  all sequences) and ``block_tables`` int32 ``[B, max_pages_per_seq]``:
  token ``t`` of sequence ``b`` lives in page ``block_tables[b, t // page_size]``
  at slot ``t % page_size``.  :func:`gather_pages` turns a paged cache back into
  the contiguous layout.
* ``lengths`` int32 ``[B]``: sequence ``b`` attends keys ``0 .. lengths[b]-1``
  (its query is the token at position ``lengths[b] - 1`` when the new key was
  appended first).  Keys at or beyond ``lengths[b]``, and block-table entries
  past ``cdiv(lengths[b], page_size)``, are never used, whatever they hold.
* Grouped-query attention: ``H % Hkv == 0`` and query head ``h`` reads KV head
  ``h // (H // Hkv)``; MQA is ``Hkv == 1``, MHA ``Hkv == H``.
* ``scale`` defaults to ``1 / sqrt(D)``.  Output ``[B, H, Dv]`` in ``q.dtype``;
  the ``*_with_lse`` variants also return the float32 log-sum-exp ``[B, H]``,
  ``lse = log(sum_j exp(scale * q.k_j))`` over the visible keys.
* ``lengths[b] == 0`` gives output 0 and lse ``-inf`` (never NaN).

Algorithm.  The cache axis is cut into blocks of ``block_k`` keys (paged:
``pages_per_block * page_size``), and the blocks into ``num_splits``
contiguous splits of ``blocks_per_split`` blocks each.

* Phase 1 (Pallas): one program per ``(batch, kv_head, split)``.  It loads the
  ``G = H // Hkv`` query heads that share the KV head as one ``[G, D]`` tile
  (so K/V are read once per group, not once per query head) and runs the
  online softmax of FlashAttention over its blocks: per block
  ``s = scale * q k^T`` ``[G, block_k]`` in float32, keys at positions
  ``>= lengths[b]`` set to ``-inf``, ``m' = max(m, rowmax s)``,
  ``l' = e^(m-m') l + rowsum e^(s-m')``, ``acc' = e^(m-m') acc + e^(s-m') v``.
  Blocks that start at or beyond ``lengths[b]`` are skipped entirely (the loop
  bound, or on TPU a ``pl.when`` plus an index map that re-points at the last
  live block so no DMA is issued); only the last live block is masked.  It
  writes the unnormalized partials ``acc [G, Dv]``, ``m [G, 1]``, ``l [G, 1]``
  (float32) of its split.  A split with no live block writes ``m=-inf, l=0,
  acc=0``.
* Phase 2 (plain JAX): log-sum-exp combination of the splits,
  ``M = max_s m_s``, ``out = sum_s e^(m_s-M) acc_s / sum_s e^(m_s-M) l_s``,
  ``lse = M + log(sum_s e^(m_s-M) l_s)``.

Splits buy parallelism when ``B * Hkv`` is too small to fill the machine (the
usual decode case on GPU); ``num_splits`` is an upper bound (it is clipped so
that no split is empty by construction).  The paged kernels use exactly the
same block/split decomposition and the same per-block arithmetic as the
contiguous ones, so ``paged_decode_attention(..., pages_per_block=p,
num_splits=n)`` equals ``decode_attention(gather_pages(k_pages, bt), ...,
block_sizes=BlockSizes(block_k=p * page_size, num_splits=n))``.

Backends (``backend=``):

* ``"triton"`` (GPU): grid ``(B, Hkv, num_splits)``; each program loops over
  its blocks with ``lax.fori_loop`` bounded by ``lengths[b]``.  Triton needs
  power-of-two tiles and ``tl.dot`` needs dimensions ``>= 16``: the query group
  is padded to ``max(16, next_pow2(G))`` rows and ``D``/``Dv`` to the next
  power of two (>= 16) *inside the kernel* with masked loads (nothing is
  copied); ``block_k`` (paged: ``page_size`` and ``pages_per_block``) must be
  powers of two and ``block_k >= 16``.  K/V rows at or beyond ``lengths[b]``
  are masked in the load itself (``other=0``), so garbage there never enters
  the arithmetic.  Paged: there is no scalar prefetch on Triton, so the block
  table is an ordinary input; each program gets its split's slice of the
  table, reads ``pages_per_block`` page ids per step and gathers those pages
  with a pointer-indexed load ``k_pages_ref[page_ids]`` (the whole page pool
  of one KV head is the kernel's block; only the addressed pages are read).
* ``"mosaic_tpu"`` (TPU): grid ``(B, Hkv, num_splits, blocks_per_split)`` with
  the last axis ``"arbitrary"``: the block loop is a grid axis so that Pallas
  double-buffers the K/V DMAs; the partials live in VMEM scratch, zeroed at the
  first block of a split and written out at its last.  ``lengths`` (and, for
  the paged kernel, the flattened block table) are scalar-prefetch operands
  (``pltpu.PrefetchScalarGridSpec``): the index maps clamp the block index to
  the last live block of the sequence (so dead blocks repeat the previous
  block index and Pallas skips their DMA) and the paged index map reads the
  physical page from the block table.  The paged kernel passes the page pool
  ``pages_per_block`` times, one BlockSpec per page slot of a block, and
  concatenates the ``[page_size, D]`` tiles in VMEM.  TPU tiles are
  ``(8, 128)``: ``block_k`` and ``page_size`` must be multiples of 8 (16 is
  better for 16-bit caches); a cache shorter than ``block_k`` is one
  full-length block.  The contiguous cache ``[B, S, Hkv, D]`` is read as
  ``[B, S, Hkv*D]`` with a ``[block_k, D]`` block at lane offset ``h*D`` when
  ``D % 128 == 0`` or ``Hkv == 1`` (free reshape); otherwise Mosaic cannot
  window the head axis and the wrapper transposes K/V to ``[B, Hkv, S, D]``
  first (one extra pass over the cache; prefer the paged layout, which is
  head-major, or ``D % 128 == 0`` for this backend).  Rows of a ragged last
  block (and of the partial edge block past ``S``) are masked in the scores
  and zeroed in V before the PV product.
* ``"interpret"``: the Triton kernel body in the HLO interpreter on any
  device; this is what the CPU tests exercise.
* ``"xla"``: the pure-JAX references (:func:`decode_attention_reference`,
  :func:`paged_decode_attention_reference`), which materialize the scores
  (and, paged, gather the pages).
* ``"auto"``: triton on GPU, mosaic_tpu on TPU, xla elsewhere.

``interpret=True`` with ``backend="triton"`` runs the Triton body in the HLO
interpreter; with ``backend="mosaic_tpu"`` it runs the Mosaic body in TPU
interpret mode (``pltpu.InterpretParams()``; pass an ``InterpretParams`` to
configure it).  A Mosaic kernel traced under ``pltpu.force_tpu_interpret_mode()``
is also interpreted.

Numerics: scores, softmax statistics and accumulators are float32.
``q.k`` runs in the cache dtype with float32 accumulation (float32 caches use
``Precision.HIGHEST``: IEEE fp32 on Triton, not TF32); the probabilities are
cast to ``v.dtype`` for the ``p @ v`` product (the FlashAttention convention),
so bfloat16 caches see a bf16 x bf16 -> f32 MMA.  ``q``, K and V must share one
dtype (float32, bfloat16 or float16).  Inference only: no gradients are
defined for the Pallas backends.

Validation: shapes, dtypes and block sizes are checked eagerly with errors that
name the argument and the fix.  When ``lengths`` / ``block_tables`` are
concrete (not traced) they are checked too: ``0 <= lengths[b] <= S`` (paged:
``<= max_pages_per_seq * page_size``, else the page table overflows) and the
live block-table entries must be valid page ids.  Under ``jit`` they cannot be
checked: lengths are then clamped to the cache and page ids clipped into
``[0, num_pages)`` so the kernels never read outside the cache.

Checked without accelerators: the kernels run interpreted on CPU against float64
references, and are compiled to machine code for an H100 (XLA:GPU, Triton, ptxas) and a
TPU v5e (XLA:TPU, Mosaic) on a CPU-only machine (``benchmarks/compile_report.py``,
``tests/targets``; :mod:`memlab.targets`).  Triton key blocks are planned to fit
``TRITON_SMEM_BYTES`` of shared memory (:func:`triton_smem_bytes`); speed is only
measured on a real device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ._common import (TRITON_SMEM_BYTES, cdiv, check_float, check_on_chip, check_positive_int,
                      is_concrete, is_power_of_2, load, next_power_of_2, pallas_lowering,
                      precision_for, round_up)
from .attention_reference import attention_reference

__all__ = [
    "BlockSizes",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_with_lse",
    "gather_pages",
    "merge_attention",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_decode_attention_with_lse",
]

_MIN_DOT = 16          # tl.dot needs every dimension >= 16.
_TRITON_TARGET_PROGRAMS = 256   # ~2 waves of an H100's 132 SMs.


# --------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the contiguous decode kernel.

    ``block_k`` keys per online-softmax step and at most ``num_splits`` splits
    of the cache (``None``: a heuristic, see :meth:`get_default`).  triton
    needs a power-of-two ``block_k >= 16``; mosaic_tpu a multiple of 8 (16 for
    16-bit caches is better).  A ``block_k`` larger than the cache is shrunk
    automatically (triton: to ``max(16, next_pow2(S))``; mosaic_tpu: to ``S``).
    """
    block_k: int = 128
    num_splits: Optional[int] = None

    def __post_init__(self):
        check_positive_int("BlockSizes.block_k", self.block_k, "BlockSizes(block_k=128)")
        if self.num_splits is not None:
            check_positive_int("BlockSizes.num_splits", self.num_splits,
                                "BlockSizes(num_splits=8), or None for the heuristic")

    @classmethod
    def get_default(cls, *, backend: str = "triton") -> BlockSizes:
        """128-key blocks on GPU (enough loads in flight per step, small
        register tile); 512 on TPU (amortizes the ~0.35 us per grid step)."""
        return cls(block_k=512 if backend == "mosaic_tpu" else 128)


def _default_num_splits(kernel: str, programs: int, num_blocks: int) -> int:
    """Splits so that ``programs * splits`` fills the device.

    GPU: about ``_TRITON_TARGET_PROGRAMS`` programs, at least 2 blocks per split
    (at most 32 splits).  TPU runs the grid serially per core: split only when
    a single (batch, kv head) pair would leave the second TensorCore of a
    megacore chip idle.
    """
    if kernel == "mosaic":
        return 2 if programs == 1 else 1
    return max(1, min(cdiv(_TRITON_TARGET_PROGRAMS, programs), num_blocks // 2, 32))


# --------------------------------------------------------------------------
# References (pure JAX)
# --------------------------------------------------------------------------
def decode_attention_reference(q, k, v, lengths, *, scale: Optional[float] = None,
                               return_lse: bool = False):
    """Pure-JAX decode attention (materializes the ``[B, H, S]`` scores).

    Query ``b`` attends keys ``0..lengths[b]-1``: it is
    :func:`~memlab_kernels.attention_reference.attention_reference` with one
    query at position ``lengths[b] - 1`` and ``causal=True``.  Returns
    ``[B, H, Dv]`` in ``q.dtype`` (and, with ``return_lse``, the float32
    ``[B, H]`` log-sum-exp).
    """
    _check_decode_args(q, k, v, lengths, "decode_attention_reference")
    scale = None if scale is None else float(scale)
    out, lse = _decode_reference(q, k, v, lengths, scale)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnums=4)
def _decode_reference(q, k, v, lengths, scale):
    b, s = k.shape[:2]
    q_pos = (lengths.astype(jnp.int32) - 1)[:, None]
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    out, lse = attention_reference(q[:, None], k, v, causal=True, q_positions=q_pos,
                                   kv_positions=kv_pos, scale=scale, return_lse=True)
    return out[:, 0], lse[..., 0]


def gather_pages(pages, block_tables) -> jax.Array:
    """Paged cache ``[Hkv, num_pages, page_size, D]`` -> contiguous ``[B, P*page_size, Hkv, D]``.

    ``P = block_tables.shape[1]``; row ``b`` concatenates pages
    ``block_tables[b, 0], block_tables[b, 1], ...`` (out-of-range ids are
    clamped, as in any XLA gather).  This copies the cache: it is for
    references and tests, not for the decode step.
    """
    hkv, _, ps, d = pages.shape
    bsz, p = block_tables.shape
    g = pages[:, jnp.asarray(block_tables, jnp.int32)]          # [Hkv, B, P, ps, D]
    return g.transpose(1, 2, 3, 0, 4).reshape(bsz, p * ps, hkv, d)


def paged_decode_attention_reference(q, k_pages, v_pages, lengths, block_tables, *,
                                     scale: Optional[float] = None, return_lse: bool = False):
    """Pure-JAX paged decode attention: :func:`gather_pages`, then
    :func:`decode_attention_reference`."""
    _check_paged_args(q, k_pages, v_pages, lengths, block_tables,
                      "paged_decode_attention_reference")
    k = gather_pages(k_pages, block_tables)
    v = gather_pages(v_pages, block_tables)
    return decode_attention_reference(q, k, v, lengths, scale=scale, return_lse=return_lse)


def merge_attention(outs: Sequence[jax.Array], lses: Sequence[jax.Array], *, out_dtype=None):
    """Combine attention results over disjoint key sets by their log-sum-exps.

    ``outs[i]`` ``[..., Dv]`` is softmax attention over key set ``i`` and
    ``lses[i]`` ``[...]`` its log-sum-exp (``-inf`` for an empty set, e.g. from
    :func:`decode_attention_with_lse` with ``lengths == 0``).  Returns
    ``(out, lse)`` of attention over the union: ``out`` in ``out_dtype``
    (default ``outs[0].dtype``), ``lse`` float32.  A position empty in every
    part gets ``out = 0`` and ``lse = -inf``.  Use it to add, e.g., a window of
    recent float keys to a decode over a (quantized) cache.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_attention: got {len(outs)} outputs and {len(lses)} lses; "
                         "pass one lse per output (at least one).")
    out_dtype = outs[0].dtype if out_dtype is None else out_dtype
    lse = jnp.stack([jnp.asarray(x, jnp.float32) for x in lses])        # [n, ...]
    o = jnp.stack([jnp.asarray(x, jnp.float32) for x in outs])          # [n, ..., Dv]
    mx = jnp.max(lse, axis=0)
    mx_safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
    w = jnp.exp(lse - mx_safe)                                          # 0 for -inf
    tot = jnp.sum(w, axis=0)
    ok = tot > 0
    out = jnp.sum(w[..., None] * o, axis=0) / jnp.where(ok, tot, 1.0)[..., None]
    lse_out = jnp.where(ok, mx_safe + jnp.log(jnp.where(ok, tot, 1.0)), -jnp.inf)
    return out.astype(out_dtype), lse_out


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------
def _check_q(q, fn):
    check_float("q", q, fn)
    if q.ndim != 3:
        raise ValueError(f"{fn}: q must be [batch, heads, head_dim] (one decode token per "
                         f"sequence), got shape {tuple(q.shape)}; for q of shape [B, 1, H, D] "
                         "pass q[:, 0].")


def _check_heads(h, hkv, fn, kv_name):
    if hkv == 0 or h % hkv:
        raise ValueError(
            f"{fn}: query heads H={h} must be a multiple of the KV heads Hkv={hkv} of "
            f"{kv_name} (grouped-query attention); use Hkv in "
            f"{[x for x in range(1, h + 1) if h % x == 0]}.")


def _check_same_dtype(q, k, v, fn, names=("k", "v")):
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, {names[0]}, {names[1]} dtypes differ ({q.dtype}, {k.dtype}, "
                        f"{v.dtype}); cast them to one dtype first (e.g. q.astype({names[0]}.dtype)).")


def _check_lengths(lengths, b, fn):
    if not hasattr(lengths, "shape") or not hasattr(lengths, "dtype"):
        raise TypeError(f"{fn}: lengths must be an int32 array of shape [B]=({b},), "
                        f"got {type(lengths).__name__}; pass jnp.asarray(lengths, jnp.int32).")
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"{fn}: lengths must have shape [B]=({b},) (one valid-key count per "
                         f"sequence), got {tuple(lengths.shape)}.")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{fn}: lengths must be an integer array (int32), got {lengths.dtype}; "
                        "pass lengths.astype(jnp.int32).")


def _check_lengths_values(lengths, limit, fn, what, fix):
    if not is_concrete(lengths) or lengths.size == 0:
        return
    host = np.asarray(lengths)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0:
        raise ValueError(f"{fn}: lengths must be >= 0, got min {lo}.")
    if hi > limit:
        bad = int(np.argmax(host))
        raise ValueError(f"{fn}: lengths[{bad}]={hi} exceeds {what} = {limit}; {fix}.")


def _check_decode_args(q, k, v, lengths, fn):
    _check_q(q, fn)
    for name, a in (("k", k), ("v", v)):
        check_float(name, a, fn)
        if a.ndim != 4:
            raise ValueError(f"{fn}: {name} must be [batch, seq, kv_heads, head_dim], "
                             f"got shape {tuple(a.shape)}.")
    b, h, d = q.shape
    bk, s, hkv, dk = k.shape
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{fn}: v shape {tuple(v.shape)} must match k {tuple(k.shape)} in "
                         "batch, seq and kv_heads.")
    if bk != b:
        raise ValueError(f"{fn}: q batch {b} != k batch {bk}.")
    if dk != d:
        raise ValueError(f"{fn}: q head_dim {d} != k head_dim {dk}.")
    _check_heads(h, hkv, fn, f"k (shape {tuple(k.shape)})")
    _check_lengths(lengths, b, fn)
    return b, h, d, s, hkv, v.shape[-1]


def _check_paged_args(q, k_pages, v_pages, lengths, block_tables, fn):
    _check_q(q, fn)
    for name, a in (("k_pages", k_pages), ("v_pages", v_pages)):
        check_float(name, a, fn)
        if a.ndim != 4:
            raise ValueError(f"{fn}: {name} must be [kv_heads, num_pages, page_size, head_dim], "
                             f"got shape {tuple(a.shape)}.")
    b, h, d = q.shape
    hkv, num_pages, ps, dk = k_pages.shape
    if v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(f"{fn}: v_pages shape {tuple(v_pages.shape)} must match k_pages "
                         f"{tuple(k_pages.shape)} in kv_heads, num_pages and page_size.")
    if dk != d:
        raise ValueError(f"{fn}: q head_dim {d} != k_pages head_dim {dk}.")
    _check_heads(h, hkv, fn, f"k_pages (shape {tuple(k_pages.shape)}, axis 0)")
    _check_lengths(lengths, b, fn)
    if not hasattr(block_tables, "shape") or block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise ValueError(f"{fn}: block_tables must be [B, max_pages_per_seq] with B={b}, got "
                         f"shape {tuple(getattr(block_tables, 'shape', ()))}.")
    if not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise TypeError(f"{fn}: block_tables must be an integer array (int32 page ids), got "
                        f"{block_tables.dtype}; pass block_tables.astype(jnp.int32).")
    return b, h, d, hkv, num_pages, ps, block_tables.shape[1], v_pages.shape[-1]


def _check_block_table_values(lengths, block_tables, num_pages, ps, fn):
    if not (is_concrete(lengths) and is_concrete(block_tables)) or block_tables.size == 0:
        return
    bt = np.asarray(block_tables)
    used = np.arange(bt.shape[1])[None, :] < (-(-np.asarray(lengths) // ps))[:, None]
    bad = used & ((bt < 0) | (bt >= num_pages))
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{fn}: block_tables[{i}, {j}]={int(bt[i, j])} is not a page id in "
                         f"[0, num_pages={num_pages}) but page {j} of sequence {i} is live "
                         f"(lengths[{i}]={int(np.asarray(lengths)[i])}); fix the block table.")


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static (hashable) configuration of one kernel launch."""
    kernel: str          # "triton" | "mosaic"
    interpret: Any       # False | True | pltpu.InterpretParams
    paged: bool
    scale: float
    g: int               # query heads per KV head
    d: int
    dv: int
    bk: int              # keys per block
    bps: int             # blocks per split
    ns: int              # splits
    ppb: int = 1         # pages per block (paged)
    page_size: int = 0   # (paged)
    head_major: bool = False   # mosaic contiguous: K/V transposed to [B, Hkv, S, D]


def _splits(kernel, requested, programs, nb):
    ns = requested if requested is not None else _default_num_splits(kernel, programs, nb)
    ns = max(1, min(ns, nb))
    bps = cdiv(nb, ns)
    return cdiv(nb, bps), bps


def triton_smem_bytes(keys: int, d: int, dv: int, itemsize: int) -> int:
    """Shared memory a Triton decode program needs for ``keys`` keys per block (an upper
    bound of what Triton allocates: the K and V tiles, padded to powers of two, plus 10%
    and 8 KiB for layout conversions)."""
    dp, dvp = max(_MIN_DOT, next_power_of_2(d)), max(_MIN_DOT, next_power_of_2(dv))
    return int(1.1 * keys * (dp + dvp) * itemsize) + 8192


def _fit_smem(bk, d, dv, itemsize, chosen: bool, what: str, fix) -> int:
    """Default blocks halve (down to 16 keys) until the tiles fit
    :data:`TRITON_SMEM_BYTES`; blocks the caller chose are refused if they do not."""
    while not chosen and bk > _MIN_DOT and triton_smem_bytes(bk, d, dv, itemsize) > \
            TRITON_SMEM_BYTES:
        bk //= 2
    check_on_chip(what, triton_smem_bytes(bk, d, dv, itemsize), TRITON_SMEM_BYTES,
                  "shared memory", fix(bk))
    return bk


def _plan_contiguous(kernel, interpret, block_sizes, scale, b, h, d, s, hkv, dv,
                     itemsize=4):
    bs = block_sizes or BlockSizes.get_default(backend="mosaic_tpu" if kernel == "mosaic" else "triton")
    block_k = bs.block_k
    head_major = False
    if kernel == "triton":
        if not is_power_of_2(block_k) or block_k < _MIN_DOT:
            raise ValueError(
                f"block_sizes.block_k={block_k} must be a power of two >= {_MIN_DOT} on the "
                "triton/interpret backends (Triton tiles are powers of two, tl.dot needs >= 16); "
                f"use block_k={max(_MIN_DOT, next_power_of_2(block_k))}.")
        bk = min(block_k, max(_MIN_DOT, next_power_of_2(s)))
        bk = _fit_smem(bk, d, dv, itemsize, block_sizes is not None, "decode_attention",
                       lambda bk: f"lower block_sizes.block_k={bk} to {max(_MIN_DOT, bk // 2)}")
    else:
        if s <= block_k:
            bk = s
        elif block_k % 8:
            raise ValueError(
                f"block_sizes.block_k={block_k} must be a multiple of 8 on mosaic_tpu (keys "
                f"lie on sublanes; 16 is better for 16-bit caches); use block_k={round_up(block_k, 8)}.")
        else:
            bk = block_k
        head_major = not (hkv == 1 or (d % 128 == 0 and dv % 128 == 0))
    nb = cdiv(s, bk)
    ns, bps = _splits(kernel, bs.num_splits, b * hkv, nb)
    return _Cfg(kernel, interpret, False, float(scale), h // hkv, d, dv, bk, bps, ns,
                head_major=head_major)


def _plan_paged(kernel, interpret, pages_per_block, num_splits, scale, b, h, d, hkv, ps,
                max_pages, dv, fn, itemsize=4):
    if num_splits is not None:
        check_positive_int("num_splits", num_splits, "num_splits=8, or None for the heuristic")
    if kernel == "triton":
        if not is_power_of_2(ps):
            raise ValueError(
                f"{fn}: page_size={ps} (k_pages.shape[2]) must be a power of two on the "
                "triton/interpret backends (Triton tiles are powers of two); allocate pages of "
                f"{next_power_of_2(ps)} tokens, or use backend='mosaic_tpu'/'xla'.")
        if pages_per_block is None:
            ppb = max(1, 128 // ps)
        else:
            check_positive_int("pages_per_block", pages_per_block, "pages_per_block=8")
            ppb = int(pages_per_block)
            if not is_power_of_2(ppb) or ppb * ps < _MIN_DOT:
                good = max(next_power_of_2(ppb), _MIN_DOT // ps if ps < _MIN_DOT else 1)
                raise ValueError(
                    f"{fn}: pages_per_block={ppb} must be a power of two with pages_per_block * "
                    f"page_size >= {_MIN_DOT} on the triton/interpret backends (page_size={ps}); "
                    f"use pages_per_block={good}.")
        ppb = min(ppb, max(next_power_of_2(max_pages), cdiv(_MIN_DOT, ps)))
        keys = _fit_smem(ppb * ps, d, dv, itemsize, pages_per_block is not None, fn,
                         lambda keys: f"lower pages_per_block={keys // ps} to "
                                      f"{max(1, keys // ps // 2)}")
        ppb = max(1, keys // ps)
    else:
        if ps % 8:
            raise ValueError(
                f"{fn}: page_size={ps} (k_pages.shape[2]) must be a multiple of 8 on mosaic_tpu "
                f"(a page is a [page_size, head_dim] VMEM tile of 8-row sublane groups); allocate "
                f"pages of {round_up(ps, 8)} tokens, or use backend='triton'/'xla'.")
        if pages_per_block is None:
            ppb = max(1, min(16, 512 // ps))
        else:
            check_positive_int("pages_per_block", pages_per_block, "pages_per_block=8")
            ppb = int(pages_per_block)
        ppb = min(ppb, max_pages)
    nb = cdiv(max_pages, ppb)
    ns, bps = _splits(kernel, num_splits, b * hkv, nb)
    return _Cfg(kernel, interpret, True, float(scale), h // hkv, d, dv, ppb * ps, bps, ns,
                ppb=ppb, page_size=ps)


# --------------------------------------------------------------------------
# Kernel bodies (shared tile math)
# --------------------------------------------------------------------------
def _online_softmax_step(q, k, v, valid, carry, *, scale):
    """One block of the online softmax.

    q ``[G, D]``, k ``[bk, D]``, v ``[bk, Dv]`` (rows not ``valid`` must hold
    finite values, e.g. zeros), valid bool ``[1, bk]``; carry float32
    ``(acc [G, Dv], m [G, 1], l [G, 1])``.  At least one key of the block is
    valid, so ``m`` is finite afterwards and no ``-inf - -inf`` arises.
    """
    acc, m, l = carry
    prec = precision_for(q.dtype)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                        precision=prec) * scale
    s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
    return alpha * acc + pv, m_new, l_new


def _and_masks(*masks):
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


# ---- Triton (also the "interpret" backend) -------------------------------
def _triton_kernel(len_ref, *refs, cfg: _Cfg, gp: int, dp: int, dvp: int):
    if cfg.paged:
        bt_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref = refs
    else:
        q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref = refs
    s_idx = pl.program_id(2)
    length = len_ref[0]
    bk = cfg.bk
    d_ok = (jnp.arange(dp) < cfg.d)[None, :] if dp != cfg.d else None
    dv_ok = (jnp.arange(dvp) < cfg.dv)[None, :] if dvp != cfg.dv else None
    g_ok = (jnp.arange(gp) < cfg.g)[:, None] if gp != cfg.g else None
    q_mask = _and_masks(g_ok, d_ok)
    if q_mask is not None:
        q_mask = jnp.broadcast_to(q_mask, (gp, dp))
    q = load(q_ref, q_mask)
    first = s_idx * cfg.bps
    n_live = jnp.clip(lax.div(length + (bk - 1), bk) - first, 0, cfg.bps)

    def load_block(ref, j, col_ok, width):
        start = (first + j) * bk
        if not cfg.paged:
            valid = (start + jnp.arange(bk) < length)[:, None]
            mask = jnp.broadcast_to(_and_masks(valid, col_ok), (bk, width))
            return load(ref.at[pl.ds(j * bk, bk), :], mask)
        ppb, ps = cfg.ppb, cfg.page_size
        pages = bt_ref[pl.ds(j * ppb, ppb)]                       # [ppb] page ids
        # Rows of the [num_pages * page_size, D] pool holding this block's keys.
        rows = (pages[:, None] * ps + jnp.arange(ps)[None, :]).reshape(bk)
        mask = (start + jnp.arange(bk) < length)[:, None]
        mask = jnp.broadcast_to(_and_masks(mask, col_ok), (bk, width))
        return load(ref.at[rows[:, None], jnp.arange(width)[None, :]], mask)

    def body(j, carry):
        k = load_block(k_ref, j, d_ok, dp)
        v = load_block(v_ref, j, dv_ok, dvp)
        valid = ((first + j) * bk + jnp.arange(bk) < length)[None, :]
        return _online_softmax_step(q, k, v, valid, carry, scale=cfg.scale)

    init = (jnp.zeros((gp, dvp), jnp.float32), jnp.full((gp, 1), -jnp.inf, jnp.float32),
            jnp.zeros((gp, 1), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_live, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _triton_call(cfg: _Cfg, q4, k, v, lengths, block_tables):
    """Phase 1 on Triton.  Returns padded partials ``[B, Hkv, ns, Gp, Dvp]``, ``[.., Gp, 1]`` x2."""
    b, hkv, g, d = q4.shape
    gp = max(_MIN_DOT, next_power_of_2(g))
    dp = max(_MIN_DOT, next_power_of_2(d))
    dvp = max(_MIN_DOT, next_power_of_2(cfg.dv))
    ns, sq = cfg.ns, pl.squeezed
    split = cfg.bps * cfg.bk
    in_specs = [pl.BlockSpec((1,), lambda b_, h_, s_: (b_,))]
    args = [lengths]
    if cfg.paged:
        pps = cfg.bps * cfg.ppb          # block-table entries per split
        hkv_, num_pages, ps, _ = k.shape
        rows = num_pages * ps            # the pool of one KV head, as [rows, D]
        in_specs += [
            pl.BlockSpec((sq, pps), lambda b_, h_, s_: (b_, s_)),
            pl.BlockSpec((sq, sq, gp, dp), lambda b_, h_, s_: (b_, h_, 0, 0)),
            pl.BlockSpec((sq, rows, dp), lambda b_, h_, s_: (h_, 0, 0)),
            pl.BlockSpec((sq, rows, dvp), lambda b_, h_, s_: (h_, 0, 0)),
        ]
        args += [block_tables, q4, k.reshape(hkv_, rows, d), v.reshape(hkv_, rows, cfg.dv)]
    else:
        in_specs += [
            pl.BlockSpec((sq, sq, gp, dp), lambda b_, h_, s_: (b_, h_, 0, 0)),
            pl.BlockSpec((sq, split, sq, dp), lambda b_, h_, s_: (b_, s_, h_, 0)),
            pl.BlockSpec((sq, split, sq, dvp), lambda b_, h_, s_: (b_, s_, h_, 0)),
        ]
        args += [q4, k, v]
    kernel = functools.partial(_triton_kernel, cfg=cfg, gp=gp, dp=dp, dvp=dvp)
    out_index = lambda b_, h_, s_: (b_, h_, s_, 0, 0)   # noqa: E731
    num_warps = 4 if cfg.bk * max(dp, dvp) <= 64 * 128 else 8
    return pl.pallas_call(
        kernel,
        out_shape=_partials_shapes(b, hkv, ns, gp, dvp),
        grid=(b, hkv, ns),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((sq, sq, sq, gp, dvp), out_index),
                   pl.BlockSpec((sq, sq, sq, gp, 1), out_index),
                   pl.BlockSpec((sq, sq, sq, gp, 1), out_index)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, q4, k, v),
        name="paged_decode_attention" if cfg.paged else "decode_attention",
    )(*args)


# ---- Mosaic TPU ------------------------------------------------------------
def _mosaic_kernel(*refs, cfg: _Cfg):
    n_pre = 2 if cfg.paged else 1
    n_kv = cfg.ppb if cfg.paged else 1
    len_ref = refs[0]
    q_ref = refs[n_pre]
    k_refs = refs[n_pre + 1:n_pre + 1 + n_kv]
    v_refs = refs[n_pre + 1 + n_kv:n_pre + 1 + 2 * n_kv]
    acc_out, m_out, l_out, acc_sc, m_sc, l_sc = refs[n_pre + 1 + 2 * n_kv:]
    b, s_idx, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = len_ref[b]
    bk = cfg.bk
    start = (s_idx * cfg.bps + j) * bk

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros_like(acc_sc)
        m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
        l_sc[...] = jnp.zeros_like(l_sc)

    @pl.when(start < length)
    def _compute():
        def cat(rs):
            return rs[0][...] if len(rs) == 1 else jnp.concatenate([r[...] for r in rs], axis=0)
        k, v = cat(k_refs), cat(v_refs)
        valid = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1) < length
        valid_rows = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < length
        v = jnp.where(valid_rows, v, jnp.zeros_like(v))    # stale VMEM / garbage slots
        acc, m, l = _online_softmax_step(q_ref[...], k, v, valid,
                                         (acc_sc[...], m_sc[...], l_sc[...]), scale=cfg.scale)
        acc_sc[...] = acc
        m_sc[...] = m
        l_sc[...] = l

    @pl.when(j == cfg.bps - 1)
    def _finish():
        acc_out[...] = acc_sc[...]
        m_out[...] = m_sc[...]
        l_out[...] = l_sc[...]


def _last_live(length, unit):
    """Index of the last ``unit``-sized chunk holding a live key (0 if none)."""
    return jnp.maximum(lax.div(length + (unit - 1), unit) - 1, 0)


def _mosaic_call(cfg: _Cfg, q4, k, v, lengths, block_tables):
    b, hkv, g, d = q4.shape
    dv, bk, bps, sq = cfg.dv, cfg.bk, cfg.bps, pl.squeezed
    q_spec = pl.BlockSpec((sq, sq, g, d), lambda b_, h_, s_, j_, *_: (b_, h_, 0, 0))
    if cfg.paged:
        ppb, ps = cfg.ppb, cfg.page_size
        pps = block_tables.shape[1]

        def page_map(i):
            def index_map(b_, h_, s_, j_, len_ref, bt_ref):
                logical = jnp.minimum((s_ * bps + j_) * ppb + i, _last_live(len_ref[b_], ps))
                return (h_, bt_ref[b_ * pps + logical], 0, 0)
            return index_map

        k_specs = [pl.BlockSpec((sq, sq, ps, d), page_map(i)) for i in range(ppb)]
        v_specs = [pl.BlockSpec((sq, sq, ps, dv), page_map(i)) for i in range(ppb)]
        prefetch = (lengths, block_tables.reshape(-1))
        kv_args = [k] * ppb + [v] * ppb
    else:
        def blk(s_, j_, len_ref, b_):
            return jnp.minimum(s_ * bps + j_, _last_live(len_ref[b_], bk))

        s = k.shape[1]
        if cfg.head_major:      # [B, Hkv, S, D]: Mosaic cannot window the head axis.
            k = k.transpose(0, 2, 1, 3)
            v = v.transpose(0, 2, 1, 3)
            k_specs = [pl.BlockSpec((sq, sq, bk, d), lambda b_, h_, s_, j_, lr: (b_, h_, blk(s_, j_, lr, b_), 0))]
            v_specs = [pl.BlockSpec((sq, sq, bk, dv), lambda b_, h_, s_, j_, lr: (b_, h_, blk(s_, j_, lr, b_), 0))]
        else:                   # [B, S, Hkv*D]: a [bk, D] block at lane block h.
            k = k.reshape(b, s, hkv * d)
            v = v.reshape(b, s, hkv * dv)
            k_specs = [pl.BlockSpec((sq, bk, d), lambda b_, h_, s_, j_, lr: (b_, blk(s_, j_, lr, b_), h_))]
            v_specs = [pl.BlockSpec((sq, bk, dv), lambda b_, h_, s_, j_, lr: (b_, blk(s_, j_, lr, b_), h_))]
        prefetch = (lengths,)
        kv_args = [k, v]
    out_index = lambda b_, h_, s_, j_, *_: (b_, h_, s_, 0, 0)   # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(b, hkv, cfg.ns, bps),
        in_specs=[q_spec, *k_specs, *v_specs],
        out_specs=[pl.BlockSpec((sq, sq, sq, g, dv), out_index),
                   pl.BlockSpec((sq, sq, sq, g, 1), out_index),
                   pl.BlockSpec((sq, sq, sq, g, 1), out_index)],
        scratch_shapes=[pltpu.VMEM((g, dv), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                        pltpu.VMEM((g, 1), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_mosaic_kernel, cfg=cfg),
        out_shape=_partials_shapes(b, hkv, cfg.ns, g, dv),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, q4, k, v),
        name="paged_decode_attention" if cfg.paged else "decode_attention",
    )(*prefetch, q4, *kv_args)


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------
def _partials_shapes(b, hkv, ns, g, dv):
    sds = jax.ShapeDtypeStruct
    return [sds((b, hkv, ns, g, dv), jnp.float32), sds((b, hkv, ns, g, 1), jnp.float32),
            sds((b, hkv, ns, g, 1), jnp.float32)]


def _cost(cfg: _Cfg, q4, k, v):
    b, hkv, g, d = q4.shape
    keys = cfg.ns * cfg.bps * cfg.bk         # upper bound; dead blocks are skipped
    nbytes = (int(q4.size) * q4.dtype.itemsize
              + b * hkv * keys * (d + cfg.dv) * k.dtype.itemsize
              + b * hkv * cfg.ns * g * (cfg.dv + 2) * 4)
    return pl.CostEstimate(flops=2 * b * hkv * g * keys * (d + cfg.dv),
                           transcendentals=b * hkv * g * keys, bytes_accessed=nbytes)


def _combine_splits(acc, m, l):
    """Phase 2: log-sum-exp reduction over the split axis (2) of the partials."""
    m_max = jnp.max(m, axis=2)                                   # [B, Hkv, G, 1]
    m_safe = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
    w = jnp.exp(m - m_safe[:, :, None])                          # 0 for empty splits
    l_tot = jnp.sum(w * l, axis=2)
    acc_tot = jnp.sum(w * acc, axis=2)
    ok = l_tot > 0
    l_div = jnp.where(ok, l_tot, 1.0)
    out = acc_tot / l_div
    lse = jnp.where(ok, m_safe + jnp.log(l_div), -jnp.inf)
    return out, lse[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: _Cfg, q, k, v, lengths, block_tables):
    b, h, d = q.shape
    g = cfg.g
    hkv = h // g
    if cfg.paged:
        _, num_pages, ps, _ = k.shape
        max_pages = block_tables.shape[1]
        lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_pages * ps)
        # Dead entries -> page 0, live ones clipped into the pool: no read can
        # leave the cache even when the (traced) table holds garbage.
        live = jnp.arange(max_pages)[None, :] < lax.div(lengths + (ps - 1), ps)[:, None]
        bt = jnp.where(live, jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1), 0)
        width = cfg.ns * cfg.bps * cfg.ppb
        block_tables = jnp.pad(bt, ((0, 0), (0, width - max_pages)))
    else:
        lengths = jnp.clip(lengths.astype(jnp.int32), 0, k.shape[1])
    q4 = q.reshape(b, hkv, g, d)
    call = _triton_call if cfg.kernel == "triton" else _mosaic_call
    acc, m, l = call(cfg, q4, k, v, lengths, block_tables)
    acc, m, l = acc[..., :g, :cfg.dv], m[..., :g, :], l[..., :g, :]
    out, lse = _combine_splits(acc, m, l)
    return out.reshape(b, h, cfg.dv).astype(q.dtype), lse.reshape(b, h)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def decode_attention_with_lse(q, k, v, lengths, *, scale: Optional[float] = None,
                              block_sizes: Optional[BlockSizes] = None, backend: str = "auto",
                              interpret: Any = None):
    """Split-K decode attention over a contiguous cache; returns ``(out, lse)``.

    Args:
      q: ``[B, H, D]`` float32 / bfloat16 / float16, one query token per sequence.
      k: ``[B, S, Hkv, D]``, v: ``[B, S, Hkv, Dv]``, same dtype as ``q``;
        ``H % Hkv == 0`` (query head ``h`` reads KV head ``h // (H // Hkv)``).
      lengths: int32 ``[B]``; sequence ``b`` attends keys ``0..lengths[b]-1``
        (``0 <= lengths[b] <= S``).
      scale: softmax scale, default ``1 / sqrt(D)``.
      block_sizes: :class:`BlockSizes` (``block_k``, ``num_splits``), or None
        for ``BlockSizes.get_default(backend=...)`` and the split heuristic.
      backend: "auto" (triton on GPU, mosaic_tpu on TPU, xla on CPU), "triton",
        "mosaic_tpu", "interpret" (the Triton kernel in the HLO interpreter) or
        "xla" (:func:`decode_attention_reference`).
      interpret: with "triton", True runs the kernel in the HLO interpreter;
        with "mosaic_tpu", True (or a ``pltpu.InterpretParams``) runs it in TPU
        interpret mode.  Ignored by "interpret" and "xla".

    Returns:
      ``out`` ``[B, H, Dv]`` in ``q.dtype`` and ``lse`` float32 ``[B, H]``
      (``-inf`` where ``lengths == 0``, with ``out`` 0 there).  Combine with
      attention over other keys via :func:`merge_attention`.
    """
    fn = "decode_attention"
    b, h, d, s, hkv, dv = _check_decode_args(q, k, v, lengths, fn)
    _check_same_dtype(q, k, v, fn)
    _check_lengths_values(lengths, s, fn, "the cache length S (k.shape[1])",
                          "lengths count valid keys, so they must not exceed the cache")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kernel, interp = pallas_lowering(backend, interpret)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}; "
            "pass block_sizes=BlockSizes(block_k=..., num_splits=...).")
    if kernel == "xla":
        return decode_attention_reference(q, k, v, lengths, scale=scale, return_lse=True)
    if b == 0 or s == 0 or h == 0:
        return jnp.zeros((b, h, dv), q.dtype), jnp.full((b, h), -jnp.inf, jnp.float32)
    cfg = _plan_contiguous(kernel, interp, block_sizes, scale, b, h, d, s, hkv, dv,
                           jnp.dtype(k.dtype).itemsize)
    return _forward(cfg, q, k, v, jnp.asarray(lengths), None)


def decode_attention(q, k, v, lengths, *, scale: Optional[float] = None,
                     block_sizes: Optional[BlockSizes] = None, backend: str = "auto",
                     interpret: Any = None) -> jax.Array:
    """Split-K decode attention over a contiguous cache: ``[B, H, Dv]`` in ``q.dtype``.

    See :func:`decode_attention_with_lse` for the arguments.
    """
    return decode_attention_with_lse(q, k, v, lengths, scale=scale, block_sizes=block_sizes,
                                     backend=backend, interpret=interpret)[0]


def paged_decode_attention_with_lse(q, k_pages, v_pages, lengths, block_tables, *,
                                    scale: Optional[float] = None,
                                    pages_per_block: Optional[int] = None,
                                    num_splits: Optional[int] = None, backend: str = "auto",
                                    interpret: Any = None):
    """Split-K PagedAttention decode; returns ``(out, lse)``.

    Args:
      q: ``[B, H, D]`` float32 / bfloat16 / float16.
      k_pages: ``[Hkv, num_pages, page_size, D]``, v_pages:
        ``[Hkv, num_pages, page_size, Dv]``, same dtype as ``q``.
      lengths: int32 ``[B]``, ``0 <= lengths[b] <= max_pages_per_seq * page_size``.
      block_tables: int32 ``[B, max_pages_per_seq]``; token ``t`` of sequence
        ``b`` is slot ``t % page_size`` of page ``block_tables[b, t // page_size]``.
        Entries past ``cdiv(lengths[b], page_size)`` are ignored.
      scale: softmax scale, default ``1 / sqrt(D)``.
      pages_per_block: pages per online-softmax step (``block_k =
        pages_per_block * page_size``).  Default: 128 keys per block on triton
        (at least 16), 512 (at most 16 pages) on mosaic_tpu; shrunk to the
        table width.  triton: a power of two; ``page_size`` must be a power of
        two too.  mosaic_tpu: ``page_size % 8 == 0``.
      num_splits: at most this many splits of the page sequence (None: heuristic).
      backend, interpret: as in :func:`decode_attention_with_lse`; "xla" is
        :func:`paged_decode_attention_reference`.

    Returns:
      ``out`` ``[B, H, Dv]`` in ``q.dtype`` and ``lse`` float32 ``[B, H]``.
      Equal to :func:`decode_attention_with_lse` on ``gather_pages(...)`` with
      ``BlockSizes(block_k=pages_per_block * page_size, num_splits=num_splits)``.
    """
    fn = "paged_decode_attention"
    b, h, d, hkv, num_pages, ps, max_pages, dv = _check_paged_args(
        q, k_pages, v_pages, lengths, block_tables, fn)
    _check_same_dtype(q, k_pages, v_pages, fn, names=("k_pages", "v_pages"))
    _check_lengths_values(
        lengths, max_pages * ps, fn,
        f"the page table capacity max_pages_per_seq * page_size = {max_pages} * {ps}",
        "the block table overflows: widen block_tables (more pages per sequence) or "
        "shorten the sequence")
    _check_block_table_values(lengths, block_tables, num_pages, ps, fn)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kernel, interp = pallas_lowering(backend, interpret)
    if pages_per_block is not None:
        check_positive_int("pages_per_block", pages_per_block, "pages_per_block=8")
    if kernel == "xla":
        return paged_decode_attention_reference(q, k_pages, v_pages, lengths, block_tables,
                                                scale=scale, return_lse=True)
    if b == 0 or h == 0 or max_pages == 0:
        return jnp.zeros((b, h, dv), q.dtype), jnp.full((b, h), -jnp.inf, jnp.float32)
    cfg = _plan_paged(kernel, interp, pages_per_block, num_splits, scale, b, h, d, hkv, ps,
                      max_pages, dv, fn, jnp.dtype(k_pages.dtype).itemsize)
    return _forward(cfg, q, k_pages, v_pages, jnp.asarray(lengths), jnp.asarray(block_tables))


def paged_decode_attention(q, k_pages, v_pages, lengths, block_tables, *,
                           scale: Optional[float] = None, pages_per_block: Optional[int] = None,
                           num_splits: Optional[int] = None, backend: str = "auto",
                           interpret: Any = None) -> jax.Array:
    """Split-K PagedAttention decode: ``[B, H, Dv]`` in ``q.dtype``.

    See :func:`paged_decode_attention_with_lse` for the arguments.
    """
    return paged_decode_attention_with_lse(
        q, k_pages, v_pages, lengths, block_tables, scale=scale,
        pages_per_block=pages_per_block, num_splits=num_splits, backend=backend,
        interpret=interpret)[0]
