"""FlashAttention-2: exact softmax attention without a ``T x S`` matrix in memory.

``flash_attention(q, k, v)`` computes the same function as
:func:`memlab_kernels.attention_reference.attention_reference` (read its
docstring for the mask semantics; they are followed exactly):

* layout ``[batch, seq, heads, head_dim]``: ``q`` ``[B, T, H, D]``, ``k``
  ``[B, S, Hkv, D]``, ``v`` ``[B, S, Hkv, Dv]``; grouped-query attention with
  query head ``h`` reading KV head ``h // (H // Hkv)`` (MQA: ``Hkv == 1``);
* default positions are bottom-right aligned (queries at ``S-T..S-1``, keys at
  ``0..S-1``); ``causal``, sliding ``window``, ``segment_ids`` (one ``[B, T]``
  array when ``T == S`` or a ``(q_ids, kv_ids)`` pair) and explicit
  ``q_positions`` / ``kv_positions`` combine by logical and;
* a query that sees no key gets output ``0`` and log-sum-exp ``-inf``, and
  contributes nothing (never NaN) to the gradients.

Algorithm (Dao 2023, "FlashAttention-2"):

* **Forward**: each program owns ``block_q`` query rows of one (batch, head) and
  walks the KV blocks with an online softmax: running row max ``m``, running
  denominator ``l`` and an unnormalized float32 accumulator ``acc``; per block
  ``s = scale * q k^T``, ``m' = max(m, rowmax(s))``, ``p = exp(s - m')``,
  ``l' = exp(m - m') l + rowsum(p)``, ``acc' = exp(m - m') acc + p v``.  At the
  end ``out = acc / l`` and ``lse = m + log(l)`` (saved for the backward).
  Masked scores are ``-inf``; while a row has seen nothing, ``m = -inf`` and
  the exponentials are taken against 0 instead, so fully masked rows end with
  ``l = 0``, which is turned into output 0 and ``lse = -inf``.
* **Backward** (``jax.custom_vjp`` on :func:`flash_attention`): ``delta =
  rowsum(dO * O)`` is computed in plain JAX (float32); ``P = exp(scale q k^T -
  lse)`` is recomputed blockwise from ``q``, ``k`` and the saved ``lse``, and
  ``dS = P * (dO v^T - delta)``.  Two kernels: **dK/dV** (a program per KV
  block, looping over the query heads of its GQA group and over the query
  blocks: ``dV += P^T dO``, ``dK += scale dS^T q``; no per-query-head dK/dV is
  ever materialized) and **dQ** (a program per query block looping over the KV
  blocks: ``dQ += scale dS k``).  Positions and segment ids get no gradient.
  Residuals are ``q, k, v, out`` and the float32 ``lse`` (``O(T)`` extra);
  ``dq, dk, dv`` come back in the input dtypes.
* **Block skipping**: with default positions, each program computes from its
  block index which blocks can hold a visible key (causal and sliding window
  bound the loop), and which of those are *fully* visible; only the partial
  blocks (the causal diagonal, the window's lower edge, a ragged last block)
  build a mask.  With explicit positions or segment ids every block is loaded
  and masked by value (nothing is known about the values).  Explicit
  positions are ignored when neither ``causal`` nor ``window`` is set (they
  cannot change the result).

Backends (``backend=``):

* ``"triton"`` (GPU): the three kernels above with ``lax.fori_loop`` over the
  inner blocks; ``q``, ``k``, ``v`` are read in place in the ``[B, T, H, D]``
  layout (no transpose; a copy only when a head dim needs padding).  Ragged sequence tails (``T % block_q``, ``S %
  block_kv``) use masked loads (``other=0``) and masked stores.  Triton tiles
  have power-of-two sizes, so ``D`` and ``Dv`` are zero-padded to the next power
  of two (at least 16) in the wrapper and the results sliced back: zero columns
  of ``q``/``k`` do not change ``q k^T`` and zero columns of ``v`` only produce
  output columns that are dropped.  Block sizes must be powers of two, at
  least 16 (``tl.dot``).  Blocks larger than the sequence shrink to its next
  power of two.
* ``"mosaic_tpu"`` (TPU): grid ``(B, H, q_blocks, kv_blocks)`` with the KV axis
  last and "arbitrary", ``m``/``l`` (lane-replicated ``[block_q, 128]``) and
  ``acc`` in VMEM scratch; skipped KV blocks are neither computed (``pl.when``)
  nor fetched (the index map clamps the block index into the needed range, so
  the pipeline sees an unchanged block).  Backward: dQ on the same grid with a
  VMEM ``dq`` accumulator, dK/dV on ``(B, Hkv, kv_blocks, group, q_blocks)``
  with the last two axes "arbitrary" accumulating into VMEM ``dk``/``dv``.
  Operands are transposed to ``[B, H, T, D]`` in the wrapper (a copy; head
  dims are not padded, blocks span the full ``D`` / ``Dv``); per-token vectors (``lse``, ``delta``, positions, segment ids) travel
  lane-dense as ``[B, ., 1, T]``.  The forward writes ``lse`` lane-replicated
  ``[B, H, T, 128]`` (a transient; only ``[..., 0]`` is kept).  Ragged tails
  are masked by value (edge blocks hold garbage, which is zeroed before it can
  reach a matmul).  A block that is smaller than its sequence must be a
  multiple of 128 (it is the lane dimension of the per-token vectors).
* ``"interpret"``: the Triton kernels in the HLO interpreter (any device); this
  is what the CPU tests exercise.
* ``"xla"``: :func:`attention_reference` (materializes ``[B, H, T, S]``),
  differentiated by JAX.
* ``"auto"``: triton on GPU, mosaic_tpu on TPU, xla elsewhere.

``interpret=True`` with ``backend="triton"`` runs the Triton kernels in the HLO
interpreter; with ``backend="mosaic_tpu"`` it runs the Mosaic kernels in TPU
interpret mode (``pltpu.InterpretParams()``; an ``InterpretParams`` may be
passed instead).  Mosaic kernels traced under ``pltpu.force_tpu_interpret_mode()``
are interpreted too.

Numerics: all softmax statistics and accumulators are float32.  float32 inputs
use ``Precision.HIGHEST`` for every dot (IEEE fp32 on Triton, not TF32);
bfloat16/float16 inputs run 16-bit MMAs with float32 accumulation, ``P`` and
``dS`` being cast to the input dtype before their dots (as in FlashAttention).
The Triton kernels work in base 2 (``exp2`` with ``log2(e)`` folded into the
score scale); ``lse`` is returned in natural log.  float64 is only supported by
``backend="xla"``.

Checked without accelerators: the kernels run interpreted on CPU against float64
references, and are compiled to machine code for an H100 (XLA:GPU, Triton, ptxas) and a
TPU v5e (XLA:TPU, Mosaic) on a CPU-only machine (``benchmarks/compile_report.py``,
``tests/targets``; :mod:`memlab.targets`).  Default Triton blocks shrink to fit
``TRITON_SMEM_BYTES`` of shared memory per program (:func:`triton_smem_bytes`); blocks
a caller chose that do not fit are an error.  Speed is only measured on a real device.

:func:`flash_attention_with_lse` returns ``(out, lse)`` and is forward only
(it has no VJP on the Pallas backends).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ._common import (KERNEL_FLOAT_DTYPES, LANES, TRITON_SMEM_BYTES, cdiv, check_on_chip, col_vec,
                      dot, is_power_of_2, load, nbytes, next_power_of_2, pallas_lowering,
                      precision_for, resolve_backend, round_up, store)
from .attention_reference import attention_reference, check_attention_args

__all__ = ["BlockSizes", "flash_attention", "flash_attention_with_lse"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_NEG_INF = float("-inf")
_SQ = pl.squeezed        # a size-1 block dim squeezed out of the kernel ref


# --------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the flash-attention kernels.

    ``block_q`` query rows and ``block_kv`` keys per step in the forward;
    ``block_q_dkv`` / ``block_kv_dkv`` for the dK/dV kernel (a program owns
    ``block_kv_dkv`` keys and steps over ``block_q_dkv`` queries) and
    ``block_q_dq`` / ``block_kv_dq`` for the dQ kernel (a program owns
    ``block_q_dq`` queries and steps over ``block_kv_dq`` keys).  A backward
    field left ``None`` takes the forward's ``block_q`` / ``block_kv``.

    triton/interpret: powers of two, at least 16.  mosaic_tpu: a block smaller
    than its sequence must be a multiple of 128.  Blocks larger than the
    sequence are shrunk automatically.
    """
    block_q: int = 128
    block_kv: int = 64
    block_q_dkv: Optional[int] = None
    block_kv_dkv: Optional[int] = None
    block_q_dq: Optional[int] = None
    block_kv_dq: Optional[int] = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name not in ("block_q", "block_kv"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(
                    f"BlockSizes.{f.name}={v!r} must be a positive int; "
                    f"pass e.g. BlockSizes({f.name}=128).")

    def resolved(self) -> dict:
        """All six fields, backward ``None`` replaced by the forward sizes."""
        pick = lambda v, d: d if v is None else v
        return {"block_q": self.block_q, "block_kv": self.block_kv,
                "block_q_dkv": pick(self.block_q_dkv, self.block_q),
                "block_kv_dkv": pick(self.block_kv_dkv, self.block_kv),
                "block_q_dq": pick(self.block_q_dq, self.block_q),
                "block_kv_dq": pick(self.block_kv_dq, self.block_kv)}

    @classmethod
    def get_default(cls, *, backend: str = "triton", head_dim: int = 128) -> BlockSizes:
        """Untuned defaults.

        triton: the FlashAttention-2 Triton tutorial's shapes (forward 128 x 64;
        dK/dV programs own 128 keys and step 32 queries; dQ programs own 128
        queries and step 32 keys), halved for head dims above 128 to stay in
        registers.  mosaic_tpu: 128-multiples (lane-aligned score tiles).
        """
        if backend == "mosaic_tpu":
            return cls(block_q=256, block_kv=512, block_q_dkv=256, block_kv_dkv=256,
                       block_q_dq=256, block_kv_dq=256)
        if head_dim > 128:
            return cls(block_q=64, block_kv=32, block_q_dkv=32, block_kv_dkv=64,
                       block_q_dq=64, block_kv_dq=32)
        return cls(block_q=128, block_kv=64, block_q_dkv=32, block_kv_dkv=128,
                   block_q_dq=128, block_kv_dq=32)


# --------------------------------------------------------------------------
# Static configuration
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _MaskSpec:
    """What the kernels need to know about the mask, all static."""
    t: int
    s: int
    causal: bool
    window: Optional[int]
    q_pos: bool        # explicit q positions are passed (and used)
    kv_pos: bool       # explicit kv positions are passed (and used)
    segments: bool

    @property
    def off(self) -> int:               # default q position = row + off
        return self.s - self.t

    @property
    def use_pos(self) -> bool:          # do positions matter at all?
        return self.causal or self.window is not None

    @property
    def default_pos(self) -> bool:
        return not (self.q_pos or self.kv_pos)

    @property
    def by_value(self) -> bool:         # every block is masked by loaded values
        return self.segments or (self.use_pos and not self.default_pos)


@dataclasses.dataclass(frozen=True)
class _Plan:
    bq: int
    bk: int
    bq_dkv: int
    bk_dkv: int
    bq_dq: int
    bk_dq: int
    dp: int           # padded q/k head dim (triton) or D
    dvp: int          # padded v head dim (triton) or Dv


@dataclasses.dataclass(frozen=True)
class _Config:
    kernel: str       # "triton" | "mosaic"
    interpret: Any    # False | True | pltpu.InterpretParams
    mask: _MaskSpec
    scale: float
    plan: _Plan


# --------------------------------------------------------------------------
# Planning and validation
# --------------------------------------------------------------------------
_FIELD_SEQ = {"block_q": "T", "block_kv": "S", "block_q_dkv": "T", "block_kv_dkv": "S",
              "block_q_dq": "T", "block_kv_dq": "S"}


def triton_smem_bytes(plan: _Plan, itemsize: int) -> dict:
    """Shared memory each Triton program needs (an upper bound of Triton's allocation):
    the tiles a program keeps, plus two pipeline stages of the tiles it streams."""
    dp, dvp = plan.dp, plan.dvp
    return {
        "fwd": (plan.bq * dp + 2 * plan.bk * (dp + dvp)) * itemsize,
        "dkv": (plan.bk_dkv * (dp + dvp) + 2 * plan.bq_dkv * (dp + dvp)) * itemsize,
        "dq": (plan.bq_dq * (dp + dvp) + 2 * plan.bk_dq * (dp + dvp)) * itemsize,
    }


# (kernel, the field it keeps, the field it streams) of each Triton program
_SMEM_FIELDS = {"fwd": ("bq", "bk"), "dkv": ("bk_dkv", "bq_dkv"), "dq": ("bq_dq", "bk_dq")}
_PLAN_FIELD = {"bq": "block_q", "bk": "block_kv", "bq_dkv": "block_q_dkv",
               "bk_dkv": "block_kv_dkv", "bq_dq": "block_q_dq", "bk_dq": "block_kv_dq"}


def _fit_triton_smem(plan: _Plan, itemsize: int, chosen: bool) -> _Plan:
    """Default blocks halve (the streamed block first, down to 16) until each program's
    tiles fit :data:`TRITON_SMEM_BYTES`; blocks the caller chose are refused if they
    do not."""
    for prog, (keep, stream) in _SMEM_FIELDS.items():
        while not chosen and triton_smem_bytes(plan, itemsize)[prog] > TRITON_SMEM_BYTES:
            f = stream if getattr(plan, stream) > 16 else keep
            if getattr(plan, f) <= 16:
                break
            plan = dataclasses.replace(plan, **{f: getattr(plan, f) // 2})
        # name the block whose tiles take the most: the streamed one counts twice (stages)
        big = stream if 2 * getattr(plan, stream) >= getattr(plan, keep) else keep
        check_on_chip(f"flash_attention ({prog} kernel)", triton_smem_bytes(plan, itemsize)[prog],
                      TRITON_SMEM_BYTES, "shared memory",
                      f"lower block_sizes.{_PLAN_FIELD[big]}={getattr(plan, big)} to "
                      f"{max(16, getattr(plan, big) // 2)}")
    return plan


def _plan_triton(bs: BlockSizes, t: int, s: int, d: int, dv: int) -> _Plan:
    r = bs.resolved()
    for name, v in r.items():
        if not is_power_of_2(v) or v < 16:
            raise ValueError(
                f"block_sizes.{name}={v} must be a power of two >= 16 on the triton/"
                f"interpret backends (Triton tiles; tl.dot needs 16); use "
                f"{name}={max(16, next_power_of_2(v))}.")
    fit = lambda b, n: min(b, max(16, next_power_of_2(n)))
    return _Plan(
        bq=fit(r["block_q"], t), bk=fit(r["block_kv"], s),
        bq_dkv=fit(r["block_q_dkv"], t), bk_dkv=fit(r["block_kv_dkv"], s),
        bq_dq=fit(r["block_q_dq"], t), bk_dq=fit(r["block_kv_dq"], s),
        dp=max(16, next_power_of_2(d)), dvp=max(16, next_power_of_2(dv)))


def _plan_mosaic(bs: BlockSizes, t: int, s: int, d: int, dv: int) -> _Plan:
    r = bs.resolved()
    out = {}
    for name, v in r.items():
        n = t if _FIELD_SEQ[name] == "T" else s
        if n <= v:
            out[name] = n
        elif v % LANES:
            raise ValueError(
                f"block_sizes.{name}={v} must be a multiple of {LANES} on mosaic_tpu "
                f"when it is smaller than the sequence ({_FIELD_SEQ[name]}={n}): it is "
                f"the lane dimension of the per-token vectors; use "
                f"{name}={round_up(v, LANES)} (or >= {n}).")
        else:
            out[name] = v
    return _Plan(bq=out["block_q"], bk=out["block_kv"], bq_dkv=out["block_q_dkv"],
                 bk_dkv=out["block_kv_dkv"], bq_dq=out["block_q_dq"],
                 bk_dq=out["block_kv_dq"], dp=d, dvp=dv)


def _split_segments(segment_ids):
    if isinstance(segment_ids, (tuple, list)):
        return segment_ids[0], segment_ids[1]
    return segment_ids, segment_ids


def _prepare(name, q, k, v, causal, window, segment_ids, q_positions, kv_positions,
             scale, block_sizes, backend, interpret):
    """Validate everything; return ``(cfg, args)`` or ``(None, None)`` for xla."""
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"{name}: block_sizes must be a BlockSizes or None, got "
            f"{type(block_sizes).__name__}; pass block_sizes=BlockSizes(block_q=..., block_kv=...).")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{name}: causal={causal!r} must be a Python bool.")
    backend = resolve_backend(backend)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    b, t, h, d, s, hkv, dv = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions,
        same_dtype=backend != "xla", name=name)
    if backend == "xla":          # the reference takes any scale, traced included
        return None, None
    if scale is not None:
        try:       # a tracer raises ConcretizationTypeError (a TypeError) here
            if isinstance(scale, bool):
                raise TypeError
            scale = float(scale)
        except TypeError:
            raise TypeError(
                f"{name}: scale={scale!r} must be a Python float on the Pallas backends "
                "(it is baked into the kernel); multiply q by a traced scale instead, "
                "or use backend='xla'.") from None
    if jnp.dtype(q.dtype) not in KERNEL_FLOAT_DTYPES:
        raise TypeError(
            f"{name}: {q.dtype} inputs are not supported by backend={backend!r}; "
            "use float32, bfloat16 or float16, or backend='xla'.")
    kernel, interp = pallas_lowering(backend, interpret)
    bs = block_sizes or BlockSizes.get_default(
        backend="mosaic_tpu" if kernel == "mosaic" else "triton", head_dim=max(d, dv))
    plan = (_plan_triton if kernel == "triton" else _plan_mosaic)(bs, t, s, d, dv)
    if kernel == "triton":
        plan = _fit_triton_smem(plan, jnp.dtype(q.dtype).itemsize, block_sizes is not None)
    use_pos = causal or window is not None
    qp = kp = qs = ks = None
    if use_pos and q_positions is not None:
        qp = jnp.asarray(q_positions, jnp.int32)
    if use_pos and kv_positions is not None:
        kp = jnp.asarray(kv_positions, jnp.int32)
    if segment_ids is not None:
        qs, ks = _split_segments(segment_ids)
        qs, ks = jnp.asarray(qs, jnp.int32), jnp.asarray(ks, jnp.int32)
    ms = _MaskSpec(t=t, s=s, causal=bool(causal), window=None if window is None else int(window),
                   q_pos=qp is not None, kv_pos=kp is not None, segments=qs is not None)
    cfg = _Config(kernel=kernel, interpret=interp, mask=ms,
                  scale=1.0 / math.sqrt(d) if scale is None else scale, plan=plan)
    return cfg, (q, k, v, qp, kp, qs, ks)


# --------------------------------------------------------------------------
# Mask and block-range helpers (shared by all kernels and index maps)
# --------------------------------------------------------------------------
def _i32(x):
    return jnp.asarray(x, jnp.int32)


def _fdiv(x, d: int):
    """floor(max(x, 0) / d) for int32 scalars (lax.div truncates: clamp first)."""
    return lax.div(jnp.maximum(_i32(x), 0), _i32(d))


def _cdiv0(x, d: int):
    """ceil(max(x, 0) / d)."""
    return lax.div(jnp.maximum(_i32(x), 0) + (d - 1), _i32(d))


def _clip(x, lo, hi):
    return jnp.minimum(jnp.maximum(_i32(x), lo), hi)


def _kv_blocks(ms: _MaskSpec, i0, bq: int, bk: int, nkv: int):
    """KV blocks for query rows ``i0 .. i0+bq-1``: ``(lo, a, b, hi)``.

    Blocks ``[lo, hi)`` can hold a visible key; ``[a, b)`` of them are fully
    visible to every row (and in bounds), so need no mask.
    """
    if not ms.use_pos or not ms.default_pos:
        lo, hi = _i32(0), _i32(nkv)
        if ms.use_pos or ms.segments:
            return lo, lo, lo, hi
        return lo, lo, _i32(ms.s // bk), hi
    w = ms.window
    qmin = i0 + ms.off                      # position of the block's first row
    qmax = i0 + (bq - 1) + ms.off           # ... and of its last row
    jlo = qmin - w + 1 if w is not None else 0
    if ms.causal:
        jhi = qmax + 1
    elif w is not None:
        jhi = qmax + w
    else:
        jhi = ms.s
    hi = jnp.minimum(_cdiv0(jhi, bk), nkv)
    lo = jnp.minimum(_fdiv(jlo, bk), hi)
    a = _cdiv0(qmax - w + 1, bk) if w is not None else _i32(0)
    a = _clip(a, lo, hi)
    if ms.segments:
        return lo, a, a, hi
    b = _i32(ms.s // bk)
    if ms.causal:
        b = jnp.minimum(b, _fdiv(qmin + 1, bk))
    elif w is not None:
        b = jnp.minimum(b, _fdiv(qmin + w, bk))
    return lo, a, _clip(b, a, hi), hi


def _q_blocks(ms: _MaskSpec, j0, bk: int, bq: int, nq: int):
    """Query blocks for keys ``j0 .. j0+bk-1``: ``(lo, a, b, hi)`` as in :func:`_kv_blocks`."""
    ragged_kv = (j0 + bk > ms.s) if ms.s % bk else None
    if not ms.use_pos or not ms.default_pos:
        lo, hi = _i32(0), _i32(nq)
        if ms.use_pos or ms.segments:
            return lo, lo, lo, hi
        b = _i32(ms.t // bq)
        if ragged_kv is not None:
            b = jnp.where(ragged_kv, lo, b)
        return lo, lo, b, hi
    w, off = ms.window, ms.off
    j1 = j0 + (bk - 1)
    if ms.causal:
        ilo = j0 - off
    elif w is not None:
        ilo = j0 - w + 1 - off
    else:
        ilo = 0
    ihi = j1 + w - off if w is not None else ms.t
    hi = jnp.minimum(_cdiv0(ihi, bq), nq)
    lo = jnp.minimum(_fdiv(ilo, bq), hi)
    a = _i32(0)
    if ms.causal:
        a = jnp.maximum(a, _cdiv0(j1 - off, bq))
    elif w is not None:
        a = jnp.maximum(a, _cdiv0(j1 - off - w + 1, bq))
    a = _clip(a, lo, hi)
    if ms.segments:
        return lo, a, a, hi
    b = _i32(ms.t // bq)
    if w is not None:
        b = jnp.minimum(b, _fdiv(j0 + w - off, bq))
    if ragged_kv is not None:
        b = jnp.where(ragged_kv, a, b)
    return lo, a, _clip(b, a, hi), hi


def _visible(ms: _MaskSpec, q_pos, kv_pos, q_seg, kv_seg, extra=()):
    """Boolean visibility of a score tile, or None when nothing is masked.

    ``q_*`` broadcast along keys, ``kv_*`` along queries; ``extra`` are further
    masks (bounds) to and in.
    """
    vis = None

    def conj(mask):
        nonlocal vis
        vis = mask if vis is None else jnp.logical_and(vis, mask)

    if ms.causal:
        conj(kv_pos <= q_pos)
    if ms.window is not None:
        conj(q_pos - kv_pos < ms.window)
        if not ms.causal:
            conj(kv_pos - q_pos < ms.window)
    if ms.segments:
        conj(q_seg == kv_seg)
    for e in extra:
        if e is not None:
            conj(e)
    return vis


def _three_loops(lo, a, b, hi, step, carry, any_full: bool = True):
    """Masked blocks ``[lo, a)``, unmasked ``[a, b)``, masked ``[b, hi)``.

    ``any_full=False`` (statically no full block, e.g. a sequence shorter than
    its block) emits a single masked loop: an unmasked body would not even
    trace (its unmasked loads would be larger than the sequence).
    """
    if not any_full:
        return lax.fori_loop(lo, hi, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(lo, a, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(a, b, functools.partial(step, masked=False), carry)
    return lax.fori_loop(b, hi, functools.partial(step, masked=True), carry)


# --------------------------------------------------------------------------
# Triton kernels (also the "interpret" backend)
# --------------------------------------------------------------------------
def _split_refs(refs, ms: _MaskSpec, n_main: int):
    """``(main refs, qp, kp, qs, ks, outputs)`` from a flat kernel ref list."""
    refs = list(refs)
    main, rest = refs[:n_main], refs[n_main:]
    take = lambda flag: rest.pop(0) if flag else None
    qp, kp = take(ms.q_pos), take(ms.kv_pos)
    qs, ks = take(ms.segments), take(ms.segments)
    return main, qp, kp, qs, ks, rest


def _triton_fwd_kernel(*refs, ms: _MaskSpec, scale, bq, bk, precision):
    (q_ref, k_ref, v_ref), qp_ref, kp_ref, qs_ref, ks_ref, (o_ref, lse_ref) = \
        _split_refs(refs, ms, 3)
    t, s = ms.t, ms.s
    nkv = cdiv(s, bk)
    i0 = pl.program_id(0) * bq
    rows = i0 + jnp.arange(bq, dtype=jnp.int32)
    row_ok = rows < t if t % bq else None
    q = load(q_ref.at[pl.ds(i0, bq), :], None if row_ok is None else row_ok[:, None])
    q_pos = q_seg = None
    if ms.use_pos:
        q_pos = (load(qp_ref.at[pl.ds(i0, bq)], row_ok) if ms.q_pos else rows + ms.off)[:, None]
    if ms.segments:
        q_seg = load(qs_ref.at[pl.ds(i0, bq)], row_ok)[:, None]
    qk_scale = scale * _LOG2E

    def step(j, carry, masked):
        acc, m_i, l_i = carry
        j0 = j * bk
        cols = j0 + jnp.arange(bk, dtype=jnp.int32)
        col_ok = cols < s if (masked and s % bk) else None
        kv_mask = None if col_ok is None else col_ok[:, None]
        k = load(k_ref.at[pl.ds(j0, bk), :], kv_mask)
        v = load(v_ref.at[pl.ds(j0, bk), :], kv_mask)
        sc = dot(q, k, precision, trans_b=True) * qk_scale
        if masked:
            kv_pos = kv_seg = None
            if ms.use_pos:
                kv_pos = (load(kp_ref.at[pl.ds(j0, bk)], col_ok) if ms.kv_pos else cols)[None, :]
            if ms.segments:
                kv_seg = load(ks_ref.at[pl.ds(j0, bk)], col_ok)[None, :]
            vis = _visible(ms, q_pos, kv_pos, q_seg, kv_seg,
                           (None if col_ok is None else col_ok[None, :],))
            if vis is not None:
                sc = jnp.where(vis, sc, _NEG_INF)
        m_new = jnp.maximum(m_i, jnp.max(sc, axis=1))
        m_use = jnp.where(m_new == _NEG_INF, 0.0, m_new) if masked else m_new
        p = jnp.exp2(sc - m_use[:, None])
        alpha = jnp.exp2(m_i - m_use)
        l_new = alpha * l_i + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision)
        return acc, m_new, l_new

    carry = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
             jnp.full((bq,), _NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32))
    lo, a, b, hi = _kv_blocks(ms, i0, bq, bk, nkv)
    acc, m_i, l_i = _three_loops(lo, a, b, hi, step, carry, any_full=s >= bk and not ms.by_value)
    seen = l_i > 0.0
    l_safe = jnp.where(seen, l_i, 1.0)
    out = acc * (1.0 / l_safe)[:, None]
    lse = jnp.where(seen, (m_i + jnp.log2(l_safe)) * _LN2, _NEG_INF)
    store(o_ref.at[pl.ds(i0, bq), :], out.astype(o_ref.dtype),
            None if row_ok is None else row_ok[:, None])
    store(lse_ref.at[pl.ds(i0, bq)], lse, row_ok)


def _triton_dkv_kernel(*refs, ms: _MaskSpec, scale, g, bq, bk, precision):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qp_ref, kp_ref, qs_ref, ks_ref, \
        (dk_ref, dv_ref) = _split_refs(refs, ms, 6)
    t, s = ms.t, ms.s
    nq = cdiv(t, bq)
    j0 = pl.program_id(0) * bk
    cols = j0 + jnp.arange(bk, dtype=jnp.int32)
    col_ok = cols < s if s % bk else None
    kv_mask = None if col_ok is None else col_ok[:, None]
    k = load(k_ref.at[pl.ds(j0, bk), :], kv_mask)
    v = load(v_ref.at[pl.ds(j0, bk), :], kv_mask)
    kv_pos = kv_seg = None
    if ms.use_pos:
        kv_pos = (load(kp_ref.at[pl.ds(j0, bk)], col_ok) if ms.kv_pos else cols)[None, :]
    if ms.segments:
        kv_seg = load(ks_ref.at[pl.ds(j0, bk)], col_ok)[None, :]
    qk_scale = scale * _LOG2E
    lo, a, b, hi = _q_blocks(ms, j0, bk, bq, nq)

    def head(gi, carry):
        def step(qi, carry, masked):
            dk, dv = carry
            i0 = qi * bq
            rows = i0 + jnp.arange(bq, dtype=jnp.int32)
            row_ok = rows < t if (masked and t % bq) else None
            q_mask = None if row_ok is None else row_ok[:, None]
            q = load(q_ref.at[pl.ds(i0, bq), gi, :], q_mask)
            do = load(do_ref.at[pl.ds(i0, bq), gi, :], q_mask)
            lse = load(lse_ref.at[gi, pl.ds(i0, bq)], row_ok)
            delta = load(delta_ref.at[gi, pl.ds(i0, bq)], row_ok)
            sc = dot(q, k, precision, trans_b=True) * qk_scale
            p = jnp.exp2(sc - (lse * _LOG2E)[:, None])
            if masked:
                q_pos = q_seg = None
                if ms.use_pos:
                    q_pos = (load(qp_ref.at[pl.ds(i0, bq)], row_ok)
                             if ms.q_pos else rows + ms.off)[:, None]
                if ms.segments:
                    q_seg = load(qs_ref.at[pl.ds(i0, bq)], row_ok)[:, None]
                vis = _visible(ms, q_pos, kv_pos, q_seg, kv_seg,
                               (q_mask, None if col_ok is None else col_ok[None, :]))
                if vis is not None:
                    p = jnp.where(vis, p, 0.0)
            dv = dv + dot(p.astype(do.dtype), do, precision, trans_a=True)
            dp = dot(do, v, precision, trans_b=True)
            ds = p * (dp - delta[:, None])
            dk = dk + dot(ds.astype(q.dtype), q, precision, trans_a=True)
            return dk, dv

        return _three_loops(lo, a, b, hi, step, carry, any_full=t >= bq and not ms.by_value)

    carry = (jnp.zeros((bk, k_ref.shape[-1]), jnp.float32),
             jnp.zeros((bk, v_ref.shape[-1]), jnp.float32))
    dk, dv = lax.fori_loop(0, g, head, carry)
    store(dk_ref.at[pl.ds(j0, bk), :], (dk * scale).astype(dk_ref.dtype), kv_mask)
    store(dv_ref.at[pl.ds(j0, bk), :], dv.astype(dv_ref.dtype), kv_mask)


def _triton_dq_kernel(*refs, ms: _MaskSpec, scale, bq, bk, precision):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qp_ref, kp_ref, qs_ref, ks_ref, \
        (dq_ref,) = _split_refs(refs, ms, 6)
    t, s = ms.t, ms.s
    nkv = cdiv(s, bk)
    i0 = pl.program_id(0) * bq
    rows = i0 + jnp.arange(bq, dtype=jnp.int32)
    row_ok = rows < t if t % bq else None
    q_mask = None if row_ok is None else row_ok[:, None]
    q = load(q_ref.at[pl.ds(i0, bq), :], q_mask)
    do = load(do_ref.at[pl.ds(i0, bq), :], q_mask)
    lse2 = load(lse_ref.at[pl.ds(i0, bq)], row_ok) * _LOG2E
    delta = load(delta_ref.at[pl.ds(i0, bq)], row_ok)
    q_pos = q_seg = None
    if ms.use_pos:
        q_pos = (load(qp_ref.at[pl.ds(i0, bq)], row_ok) if ms.q_pos else rows + ms.off)[:, None]
    if ms.segments:
        q_seg = load(qs_ref.at[pl.ds(i0, bq)], row_ok)[:, None]
    qk_scale = scale * _LOG2E

    def step(j, dq, masked):
        j0 = j * bk
        cols = j0 + jnp.arange(bk, dtype=jnp.int32)
        col_ok = cols < s if (masked and s % bk) else None
        kv_mask = None if col_ok is None else col_ok[:, None]
        k = load(k_ref.at[pl.ds(j0, bk), :], kv_mask)
        v = load(v_ref.at[pl.ds(j0, bk), :], kv_mask)
        sc = dot(q, k, precision, trans_b=True) * qk_scale
        p = jnp.exp2(sc - lse2[:, None])
        if masked:
            kv_pos = kv_seg = None
            if ms.use_pos:
                kv_pos = (load(kp_ref.at[pl.ds(j0, bk)], col_ok) if ms.kv_pos else cols)[None, :]
            if ms.segments:
                kv_seg = load(ks_ref.at[pl.ds(j0, bk)], col_ok)[None, :]
            vis = _visible(ms, q_pos, kv_pos, q_seg, kv_seg,
                           (None if col_ok is None else col_ok[None, :],))
            if vis is not None:
                p = jnp.where(vis, p, 0.0)
        dp = dot(do, v, precision, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k, precision)

    lo, a, b, hi = _kv_blocks(ms, i0, bq, bk, nkv)
    dq = _three_loops(lo, a, b, hi, step, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32),
                      any_full=s >= bk and not ms.by_value)
    store(dq_ref.at[pl.ds(i0, bq), :], (dq * scale).astype(dq_ref.dtype), q_mask)


def _vec_specs(ms: _MaskSpec, q_map, kv_map, t: int, s: int):
    """BlockSpecs for the optional per-token int32 vectors ``[B, T]`` / ``[B, S]``."""
    specs = []
    if ms.q_pos:
        specs.append(pl.BlockSpec((_SQ, t), q_map))
    if ms.kv_pos:
        specs.append(pl.BlockSpec((_SQ, s), kv_map))
    if ms.segments:
        specs += [pl.BlockSpec((_SQ, t), q_map), pl.BlockSpec((_SQ, s), kv_map)]
    return specs


def _vec_args(qp, kp, qs, ks):
    return [a for a in (qp, kp, qs, ks) if a is not None]


def _visited(ms: _MaskSpec, bq: int, bk: int) -> float:
    """The fraction of (query block, key block) tiles a kernel computes.

    With default positions the kernels skip tiles that the causal or window mask
    hides entirely (:func:`_kv_blocks`); with explicit positions or segment ids
    every tile is visited (visibility is only known from the loaded values).
    """
    nq, nkv = -(-ms.t // bq), -(-ms.s // bk)
    if not ms.use_pos or not ms.default_pos:
        return 1.0
    i0 = np.arange(nq) * bq
    qmin, qmax = i0 + ms.off, i0 + (bq - 1) + ms.off
    w = ms.window
    jlo = qmin - w + 1 if w is not None else np.zeros_like(qmin)
    jhi = qmax + 1 if ms.causal else (qmax + w if w is not None else np.full_like(qmax, ms.s))
    hi = np.minimum(-(-np.maximum(jhi, 0) // bk), nkv)
    lo = np.minimum(np.maximum(jlo, 0) // bk, hi)
    return float((hi - lo).sum()) / (nq * nkv)


def _cost(b, h, t, s, d, dv, bytes_accessed, frac: float = 1.0):
    """The visited tiles' cost: ``d`` / ``dv`` are the summed contraction widths and
    ``frac`` the fraction of tiles computed (:func:`_visited`)."""
    return pl.CostEstimate(flops=int(2 * b * h * t * s * (d + dv) * frac),
                           transcendentals=int(b * h * t * s * frac),
                           bytes_accessed=int(bytes_accessed))


def _triton_forward(cfg: _Config, q, k, v, qp, kp, qs, ks):
    ms, plan = cfg.mask, cfg.plan
    b, t, h, dp = q.shape
    s, hkv, dvp = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    bq, bk = plan.bq, plan.bk
    precision = precision_for(q.dtype)
    kernel = functools.partial(_triton_fwd_kernel, ms=ms, scale=cfg.scale, bq=bq, bk=bk,
                               precision=precision)
    in_specs = [
        pl.BlockSpec((_SQ, t, _SQ, dp), lambda i, bi, hi: (bi, 0, hi, 0)),
        pl.BlockSpec((_SQ, s, _SQ, dp), lambda i, bi, hi: (bi, 0, lax.div(hi, g), 0)),
        pl.BlockSpec((_SQ, s, _SQ, dvp), lambda i, bi, hi: (bi, 0, lax.div(hi, g), 0)),
        *_vec_specs(ms, lambda i, bi, hi: (bi, 0), lambda i, bi, hi: (bi, 0), t, s),
    ]
    out_specs = [pl.BlockSpec((_SQ, t, _SQ, dvp), lambda i, bi, hi: (bi, 0, hi, 0)),
                 pl.BlockSpec((_SQ, _SQ, t), lambda i, bi, hi: (bi, hi, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, t, h, dvp), q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)]
    # float32 tiles (IEEE dots, no tensor cores) need twice the registers of 16-bit ones
    num_warps = 4 if max(dp, dvp) <= 64 and q.dtype.itemsize == 2 else 8
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(cdiv(t, bq), b, h),
        in_specs=in_specs, out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=cfg.interpret, name="flash_attention_fwd",
        cost_estimate=_cost(b, h, t, s, dp, dvp, nbytes(q, k, v) + b * t * h * dvp * 2,
                      _visited(cfg.mask, bq, bk)),
    )(q, k, v, *_vec_args(qp, kp, qs, ks))


def _triton_backward(cfg: _Config, q, k, v, qp, kp, qs, ks, do, lse, delta):
    ms, plan = cfg.mask, cfg.plan
    b, t, h, dp = q.shape
    s, hkv, dvp = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    precision = precision_for(q.dtype)
    vec = _vec_args(qp, kp, qs, ks)
    # a program accumulates [b_own, dp + dvp] float32 gradients in registers: 8 warps once
    # that is 128 x 128 floats keep them under 128 registers a thread (4 warps spill there)
    warps = lambda b_own, b_step: 8 if b_own * (dp + dvp) >= 128 * 128 or (
        b_own * b_step >= 128 * 64 and max(dp, dvp) > 64) else 4

    bq, bk = plan.bq_dkv, plan.bk_dkv
    dkv_specs = [
        pl.BlockSpec((_SQ, t, g, dp), lambda j, bi, hk: (bi, 0, hk, 0)),
        pl.BlockSpec((_SQ, s, _SQ, dp), lambda j, bi, hk: (bi, 0, hk, 0)),
        pl.BlockSpec((_SQ, s, _SQ, dvp), lambda j, bi, hk: (bi, 0, hk, 0)),
        pl.BlockSpec((_SQ, t, g, dvp), lambda j, bi, hk: (bi, 0, hk, 0)),
        pl.BlockSpec((_SQ, g, t), lambda j, bi, hk: (bi, hk, 0)),
        pl.BlockSpec((_SQ, g, t), lambda j, bi, hk: (bi, hk, 0)),
        *_vec_specs(ms, lambda j, bi, hk: (bi, 0), lambda j, bi, hk: (bi, 0), t, s),
    ]
    dk, dv = pl.pallas_call(
        functools.partial(_triton_dkv_kernel, ms=ms, scale=cfg.scale, g=g, bq=bq, bk=bk,
                          precision=precision),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(cdiv(s, bk), b, hkv),
        in_specs=dkv_specs,
        out_specs=[pl.BlockSpec((_SQ, s, _SQ, dp), lambda j, bi, hk: (bi, 0, hk, 0)),
                   pl.BlockSpec((_SQ, s, _SQ, dvp), lambda j, bi, hk: (bi, 0, hk, 0))],
        compiler_params=plgpu.CompilerParams(num_warps=warps(bk, bq), num_stages=2),
        interpret=cfg.interpret, name="flash_attention_bwd_dkv",
        cost_estimate=_cost(b, h, t, s, 2 * dp, 2 * dvp, nbytes(q, k, v, do, k, v),
                      _visited(cfg.mask, bq, bk)),
    )(q, k, v, do, lse, delta, *vec)

    bq, bk = plan.bq_dq, plan.bk_dq
    dq_specs = [
        pl.BlockSpec((_SQ, t, _SQ, dp), lambda i, bi, hi: (bi, 0, hi, 0)),
        pl.BlockSpec((_SQ, s, _SQ, dp), lambda i, bi, hi: (bi, 0, lax.div(hi, g), 0)),
        pl.BlockSpec((_SQ, s, _SQ, dvp), lambda i, bi, hi: (bi, 0, lax.div(hi, g), 0)),
        pl.BlockSpec((_SQ, t, _SQ, dvp), lambda i, bi, hi: (bi, 0, hi, 0)),
        pl.BlockSpec((_SQ, _SQ, t), lambda i, bi, hi: (bi, hi, 0)),
        pl.BlockSpec((_SQ, _SQ, t), lambda i, bi, hi: (bi, hi, 0)),
        *_vec_specs(ms, lambda i, bi, hi: (bi, 0), lambda i, bi, hi: (bi, 0), t, s),
    ]
    dq = pl.pallas_call(
        functools.partial(_triton_dq_kernel, ms=ms, scale=cfg.scale, bq=bq, bk=bk,
                          precision=precision),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(cdiv(t, bq), b, h),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((_SQ, t, _SQ, dp), lambda i, bi, hi: (bi, 0, hi, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=warps(bq, bk), num_stages=2),
        interpret=cfg.interpret, name="flash_attention_bwd_dq",
        cost_estimate=_cost(b, h, t, s, dp, 2 * dvp, nbytes(q, k, v, do, q),
                      _visited(cfg.mask, bq, bk)),
    )(q, k, v, do, lse, delta, *vec)
    return dq, dk, dv


# --------------------------------------------------------------------------
# Mosaic TPU kernels
# --------------------------------------------------------------------------
def _zero_rows(x, start, n_valid: int):
    """Zero the rows of a tile past ``n_valid`` (edge blocks hold garbage)."""
    rows = start + lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where(rows < n_valid, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _mosaic_vis(ms: _MaskSpec, i0, j0, bq, bk, qp_ref, kp_ref, qs_ref, ks_ref,
                check_rows: bool, check_cols: bool):
    shape = (bq, bk)
    r = i0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    c = j0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    extra = (r < ms.t if check_rows else None, c < ms.s if check_cols else None)
    q_pos = kv_pos = q_seg = kv_seg = None
    if ms.use_pos:
        q_pos = col_vec(qp_ref, shape) if ms.q_pos else r + ms.off
        kv_pos = jnp.broadcast_to(kp_ref[...], shape) if ms.kv_pos else c
    if ms.segments:
        q_seg = col_vec(qs_ref, shape)
        kv_seg = jnp.broadcast_to(ks_ref[...], shape)
    return _visible(ms, q_pos, kv_pos, q_seg, kv_seg, extra)


def _run_steps(run, full, step):
    """Run ``step(masked)`` on this grid step if it is needed, masked or not."""
    @pl.when(jnp.logical_and(run, full))
    def _unmasked():
        step(False)

    @pl.when(jnp.logical_and(run, jnp.logical_not(full)))
    def _masked():
        step(True)


def _in_range(x, lo, hi):
    return jnp.logical_and(x >= lo, x < hi)


def _mosaic_fwd_kernel(*refs, ms: _MaskSpec, scale, bq, bk, nkv, precision):
    (q_ref, k_ref, v_ref), qp_ref, kp_ref, qs_ref, ks_ref, rest = _split_refs(refs, ms, 3)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    i, j = pl.program_id(2), pl.program_id(3)
    i0, j0 = i * bq, j * bk

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        if masked and ms.s % bk:
            v = _zero_rows(v, j0, ms.s)
        sc = dot(q, k, precision, trans_b=True) * scale
        if masked:
            vis = _mosaic_vis(ms, i0, j0, bq, bk, qp_ref, kp_ref, qs_ref, ks_ref,
                              False, bool(ms.s % bk))
            if vis is not None:
                sc = jnp.where(vis, sc, _NEG_INF)
        m_prev, l_prev = m_sc[...], l_sc[...]                      # [bq, 128]
        m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
        m_use = jnp.where(m_next == _NEG_INF, 0.0, m_next) if masked else m_next
        p = jnp.exp(sc - m_use[:, :1])
        alpha = jnp.exp(m_prev - m_use)
        m_sc[...] = m_next
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * alpha[:, :1] + dot(p.astype(v.dtype), v, precision)

    lo, a, b, hi = _kv_blocks(ms, i0, bq, bk, nkv)
    _run_steps(_in_range(j, lo, hi), _in_range(j, a, b), step)

    @pl.when(j == nkv - 1)
    def _finish():
        l, m = l_sc[...], m_sc[...]
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] * (1.0 / l_safe)[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), _NEG_INF)


def _mosaic_dq_kernel(*refs, ms: _MaskSpec, scale, bq, bk, nkv, precision):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qp_ref, kp_ref, qs_ref, ks_ref, rest = \
        _split_refs(refs, ms, 6)
    dq_ref, dq_sc = rest
    i, j = pl.program_id(2), pl.program_id(3)
    i0, j0 = i * bq, j * bk

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        if masked and ms.s % bk:
            k, v = _zero_rows(k, j0, ms.s), _zero_rows(v, j0, ms.s)
        lse = jnp.expand_dims(lse_ref[0], -1)                      # [bq, 1]
        delta = jnp.expand_dims(delta_ref[0], -1)
        sc = dot(q, k, precision, trans_b=True) * scale
        p = jnp.exp(sc - lse)
        if masked:
            vis = _mosaic_vis(ms, i0, j0, bq, bk, qp_ref, kp_ref, qs_ref, ks_ref,
                              False, bool(ms.s % bk))
            if vis is not None:
                p = jnp.where(vis, p, 0.0)
        ds = p * (dot(do, v, precision, trans_b=True) - delta)
        dq_sc[...] += dot(ds.astype(k.dtype), k, precision)

    lo, a, b, hi = _kv_blocks(ms, i0, bq, bk, nkv)
    _run_steps(_in_range(j, lo, hi), _in_range(j, a, b), step)

    @pl.when(j == nkv - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _mosaic_dkv_kernel(*refs, ms: _MaskSpec, scale, g, bq, bk, nq, precision):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qp_ref, kp_ref, qs_ref, ks_ref, rest = \
        _split_refs(refs, ms, 6)
    dk_ref, dv_ref, dk_sc, dv_sc = rest
    kb, gi, qi = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    i0, j0 = qi * bq, kb * bk

    @pl.when(jnp.logical_and(gi == 0, qi == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        if masked and ms.t % bq:
            q, do = _zero_rows(q, i0, ms.t), _zero_rows(do, i0, ms.t)
        lse = jnp.expand_dims(lse_ref[0], -1)                      # [bq, 1]
        delta = jnp.expand_dims(delta_ref[0], -1)
        sc = dot(q, k, precision, trans_b=True) * scale
        p = jnp.exp(sc - lse)
        vis = None
        if masked:
            vis = _mosaic_vis(ms, i0, j0, bq, bk, qp_ref, kp_ref, qs_ref, ks_ref,
                              bool(ms.t % bq), bool(ms.s % bk))
            if vis is not None:
                p = jnp.where(vis, p, 0.0)
        dv_sc[...] += dot(p.astype(do.dtype).T, do, precision)
        ds = p * (dot(do, v, precision, trans_b=True) - delta)
        if vis is not None:
            ds = jnp.where(vis, ds, 0.0)
        dk_sc[...] += dot(ds.astype(q.dtype).T, q, precision)

    lo, a, b, hi = _q_blocks(ms, j0, bk, bq, nq)
    _run_steps(_in_range(qi, lo, hi), _in_range(qi, a, b), step)

    @pl.when(jnp.logical_and(gi == g - 1, qi == nq - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _clamped(x, lo, hi, n: int):
    """Block index ``x`` clamped into the needed ``[lo, hi)`` (and ``[0, n)``):
    a skipped grid step re-uses a neighbouring block, so nothing is fetched."""
    return _clip(_clip(x, lo, hi - 1), 0, n - 1)


def _mosaic_vec_inputs(ms: _MaskSpec, qp, kp, qs, ks, q_map, kv_map, bq, bk):
    """Lane-dense ``[B, 1, n]`` per-token vectors and their ``(1, block)`` specs."""
    specs, args = [], []
    for arr, flag, is_q in ((qp, ms.q_pos, True), (kp, ms.kv_pos, False),
                            (qs, ms.segments, True), (ks, ms.segments, False)):
        if flag:
            args.append(arr[:, None, :])
            specs.append(pl.BlockSpec((_SQ, 1, bq if is_q else bk), q_map if is_q else kv_map))
    return specs, args


def _mosaic_forward(cfg: _Config, q, k, v, qp, kp, qs, ks):
    ms, plan = cfg.mask, cfg.plan
    b, t, h, d = q.shape
    s, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    bq, bk = plan.bq, plan.bk
    nq, nkv = cdiv(t, bq), cdiv(s, bk)
    precision = precision_for(q.dtype)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))

    def kv_block(i, j):
        lo, _, _, hi = _kv_blocks(ms, i * bq, bq, bk, nkv)
        return _clamped(j, lo, hi, nkv)

    vec_specs, vec_args = _mosaic_vec_inputs(
        ms, qp, kp, qs, ks, lambda bi, hi, i, j: (bi, 0, i),
        lambda bi, hi, i, j: (bi, 0, kv_block(i, j)), bq, bk)
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
        pl.BlockSpec((_SQ, _SQ, bk, d), lambda bi, hi, i, j: (bi, lax.div(hi, g), kv_block(i, j), 0)),
        pl.BlockSpec((_SQ, _SQ, bk, dv), lambda bi, hi, i, j: (bi, lax.div(hi, g), kv_block(i, j), 0)),
        *vec_specs,
    ]
    out_specs = [pl.BlockSpec((_SQ, _SQ, bq, dv), lambda bi, hi, i, j: (bi, hi, i, 0)),
                 pl.BlockSpec((_SQ, _SQ, bq, LANES), lambda bi, hi, i, j: (bi, hi, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, h, t, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, t, LANES), jnp.float32)]
    kernel = functools.partial(_mosaic_fwd_kernel, ms=ms, scale=cfg.scale, bq=bq, bk=bk,
                               nkv=nkv, precision=precision)
    o, lse = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, h, nq, nkv),
        in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, dv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret, name="flash_attention_fwd",
        cost_estimate=_cost(b, h, t, s, d, dv, nbytes(q, k, v) + b * t * h * dv * 2,
                      _visited(cfg.mask, bq, bk)),
    )(qt, kt, vt, *vec_args)
    return o.transpose(0, 2, 1, 3), lse[..., 0]


def _mosaic_backward(cfg: _Config, q, k, v, qp, kp, qs, ks, do, lse, delta):
    ms, plan = cfg.mask, cfg.plan
    b, t, h, d = q.shape
    s, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    precision = precision_for(q.dtype)
    qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
    lse4, delta4 = lse[:, :, None, :], delta[:, :, None, :]          # [B, H, 1, T]

    # dK / dV: grid (B, Hkv, kv blocks, group, q blocks).
    bq, bk = plan.bq_dkv, plan.bk_dkv
    nq, nkv = cdiv(t, bq), cdiv(s, bk)

    def q_block(kb, qi):
        lo, _, _, hi = _q_blocks(ms, kb * bk, bk, bq, nq)
        return _clamped(qi, lo, hi, nq)

    qh = lambda hk, gi: hk * g + gi
    vec_specs, vec_args = _mosaic_vec_inputs(
        ms, qp, kp, qs, ks, lambda bi, hk, kb, gi, qi: (bi, 0, q_block(kb, qi)),
        lambda bi, hk, kb, gi, qi: (bi, 0, kb), bq, bk)
    q_spec = lambda dd: pl.BlockSpec(
        (_SQ, _SQ, bq, dd), lambda bi, hk, kb, gi, qi: (bi, qh(hk, gi), q_block(kb, qi), 0))
    kv_spec = lambda dd: pl.BlockSpec((_SQ, _SQ, bk, dd), lambda bi, hk, kb, gi, qi: (bi, hk, kb, 0))
    vec_q_spec = pl.BlockSpec(
        (_SQ, _SQ, 1, bq), lambda bi, hk, kb, gi, qi: (bi, qh(hk, gi), 0, q_block(kb, qi)))
    dk, dv_ = pl.pallas_call(
        functools.partial(_mosaic_dkv_kernel, ms=ms, scale=cfg.scale, g=g, bq=bq, bk=bk,
                          nq=nq, precision=precision),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        grid=(b, hkv, nkv, g, nq),
        in_specs=[q_spec(d), kv_spec(d), kv_spec(dv), q_spec(dv), vec_q_spec, vec_q_spec,
                  *vec_specs],
        out_specs=[kv_spec(d), kv_spec(dv)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=(
            "parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret, name="flash_attention_bwd_dkv",
        cost_estimate=_cost(b, h, t, s, 2 * d, 2 * dv, nbytes(q, k, v, do, k, v),
                      _visited(cfg.mask, bq, bk)),
    )(qt, kt, vt, dot_, lse4, delta4, *vec_args)

    # dQ: grid (B, H, q blocks, kv blocks).
    bq, bk = plan.bq_dq, plan.bk_dq
    nq, nkv = cdiv(t, bq), cdiv(s, bk)

    def kv_block(i, j):
        lo, _, _, hi = _kv_blocks(ms, i * bq, bq, bk, nkv)
        return _clamped(j, lo, hi, nkv)

    vec_specs, vec_args = _mosaic_vec_inputs(
        ms, qp, kp, qs, ks, lambda bi, hi, i, j: (bi, 0, i),
        lambda bi, hi, i, j: (bi, 0, kv_block(i, j)), bq, bk)
    q_spec = lambda dd: pl.BlockSpec((_SQ, _SQ, bq, dd), lambda bi, hi, i, j: (bi, hi, i, 0))
    kv_spec = lambda dd: pl.BlockSpec(
        (_SQ, _SQ, bk, dd), lambda bi, hi, i, j: (bi, lax.div(hi, g), kv_block(i, j), 0))
    vec_q_spec = pl.BlockSpec((_SQ, _SQ, 1, bq), lambda bi, hi, i, j: (bi, hi, 0, i))
    dq = pl.pallas_call(
        functools.partial(_mosaic_dq_kernel, ms=ms, scale=cfg.scale, bq=bq, bk=bk, nkv=nkv,
                          precision=precision),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        grid=(b, h, nq, nkv),
        in_specs=[q_spec(d), kv_spec(d), kv_spec(dv), q_spec(dv), vec_q_spec, vec_q_spec,
                  *vec_specs],
        out_specs=q_spec(d),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret, name="flash_attention_bwd_dq",
        cost_estimate=_cost(b, h, t, s, d, 2 * dv, nbytes(q, k, v, do, q),
                      _visited(cfg.mask, bq, bk)),
    )(qt, kt, vt, dot_, lse4, delta4, *vec_args)
    return (dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3), dv_.transpose(0, 2, 1, 3))


# --------------------------------------------------------------------------
# Forward / backward wrappers and the custom VJP
# --------------------------------------------------------------------------
def _pad_last(x, n: int):
    extra = n - x.shape[-1]
    return x if not extra else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: _Config, q, k, v, qp, kp, qs, ks):
    """``(out [B, T, H, Dv] in q.dtype, lse [B, H, T] float32)``."""
    b, t, h, d = q.shape
    s, dv = k.shape[1], v.shape[-1]
    if b * t * h == 0 or s == 0:      # nothing to attend to: out 0, lse -inf.
        return (jnp.zeros((b, t, h, dv), q.dtype),
                jnp.full((b, h, t), _NEG_INF, jnp.float32))
    if cfg.kernel == "mosaic":
        return _mosaic_forward(cfg, q, k, v, qp, kp, qs, ks)
    plan = cfg.plan
    out, lse = _triton_forward(cfg, _pad_last(q, plan.dp), _pad_last(k, plan.dp),
                               _pad_last(v, plan.dvp), qp, kp, qs, ks)
    return out[..., :dv], lse


@functools.partial(jax.jit, static_argnums=0)
def _backward(cfg: _Config, q, k, v, qp, kp, qs, ks, out, lse, do):
    b, t, h, d = q.shape
    s, dv = k.shape[1], v.shape[-1]
    if b * t * h == 0 or s == 0:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O), float32 [B, H, T].
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    do = do.astype(q.dtype)
    if cfg.kernel == "mosaic":
        return _mosaic_backward(cfg, q, k, v, qp, kp, qs, ks, do, lse, delta)
    plan = cfg.plan
    dq, dk, dv_ = _triton_backward(
        cfg, _pad_last(q, plan.dp), _pad_last(k, plan.dp), _pad_last(v, plan.dvp),
        qp, kp, qs, ks, _pad_last(do, plan.dvp), lse, delta)
    return dq[..., :d], dk[..., :d], dv_[..., :dv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, qp, kp, qs, ks):
    return _forward(cfg, q, k, v, qp, kp, qs, ks)[0]


def _flash_fwd(cfg, q, k, v, qp, kp, qs, ks):
    out, lse = _forward(cfg, q, k, v, qp, kp, qs, ks)
    return out, (q, k, v, qp, kp, qs, ks, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, qp, kp, qs, ks, out, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, qp, kp, qs, ks, out, lse, do)
    # Positions and segment ids are integer data: no cotangent.
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
_API_DOC = """
    Args:
      q: ``[B, T, H, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; one
        dtype (float32, bfloat16 or float16; float64 only with "xla");
        ``H % Hkv == 0``.
      causal: key ``j`` visible to query ``i`` iff ``kv_pos[j] <= q_pos[i]``.
      window: sliding window ``1 <= window <= S`` (see attention_reference).
      segment_ids: ``[B, T]`` (needs ``T == S``) or ``(q_ids [B, T], kv_ids [B, S])``.
      q_positions, kv_positions: int ``[B, T]`` / ``[B, S]``; default
        bottom-right aligned (queries at ``S-T..S-1``, keys at ``0..S-1``).
      scale: Python float, default ``1 / sqrt(D)``.
      block_sizes: a :class:`BlockSizes`, or None for
        ``BlockSizes.get_default(backend=..., head_dim=...)``.
      backend: "auto" (triton on GPU, mosaic_tpu on TPU, xla on CPU),
        "triton", "mosaic_tpu", "interpret" (the Triton kernels in the HLO
        interpreter, any device) or "xla" (the materializing reference).
      interpret: with "triton", True runs the kernels in the HLO interpreter;
        with "mosaic_tpu", True (or a ``pltpu.InterpretParams``) runs them in
        TPU interpret mode.  Ignored by "interpret" and "xla".
"""


def flash_attention(q, k, v, *, causal: bool = False, window: Optional[int] = None,
                    segment_ids=None, q_positions=None, kv_positions=None,
                    scale: Optional[float] = None, block_sizes: BlockSizes | None = None,
                    backend: str = "auto", interpret: Any = None) -> jax.Array:
    """Memory-efficient exact attention; returns ``[B, T, H, Dv]`` in ``q.dtype``.

    Differentiable w.r.t. ``q``, ``k`` and ``v`` (custom VJP running the
    FlashAttention-2 backward kernels on the Pallas backends).
    """
    cfg, args = _prepare("flash_attention", q, k, v, causal, window, segment_ids,
                         q_positions, kv_positions, scale, block_sizes, backend, interpret)
    if cfg is None:
        return attention_reference(q, k, v, causal=causal, window=window,
                                   segment_ids=segment_ids, q_positions=q_positions,
                                   kv_positions=kv_positions, scale=scale)
    return _flash(cfg, *args)


def flash_attention_with_lse(q, k, v, *, causal: bool = False, window: Optional[int] = None,
                             segment_ids=None, q_positions=None, kv_positions=None,
                             scale: Optional[float] = None,
                             block_sizes: BlockSizes | None = None, backend: str = "auto",
                             interpret: Any = None) -> tuple[jax.Array, jax.Array]:
    """``(out [B, T, H, Dv] in q.dtype, lse [B, H, T] float32)``; forward only.

    ``lse`` is the natural log-sum-exp of the scaled visible scores (``-inf``
    for a query that sees no key), e.g. to merge partial attentions.
    """
    cfg, args = _prepare("flash_attention_with_lse", q, k, v, causal, window, segment_ids,
                         q_positions, kv_positions, scale, block_sizes, backend, interpret)
    if cfg is None:
        return attention_reference(q, k, v, causal=causal, window=window,
                                   segment_ids=segment_ids, q_positions=q_positions,
                                   kv_positions=kv_positions, scale=scale, return_lse=True)
    return _forward(cfg, *args)


for _f in (flash_attention, flash_attention_with_lse):
    _f.__doc__ = _f.__doc__.rstrip() + "\n" + _API_DOC
del _f
