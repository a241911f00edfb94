"""Lightning Attention-2: causal linear attention with per-head exponential decay.

Qin et al., "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence
Lengths in Large Language Models" (2024).  For every batch ``b`` and head ``h``
(layout ``[B, T, H, D]`` as everywhere in memlab)::

    o[t] = scale * sum_{s <= t} lambda_h ** (t - s) * (q[t] . k[s]) * v[s]

with no softmax.  ``decay=None`` means ``lambda_h = 1`` (plain causal linear
attention); otherwise ``decay`` is a per-head array ``[H]`` of ``lambda_h`` in
``(0, 1]``.  ``scale`` defaults to 1.

Decay convention.  TransNormerLLM / Lightning Attention (and MiniMax-01) store a
per-head *slope* ``s_h >= 0`` and decay by ``lambda_h = exp(-s_h)``; the slopes
are the ALiBi ones of Press et al. (2022): for ``H`` a power of two,
``s_h = 2 ** (-8 (h + 1) / H)``, otherwise the slopes of the nearest lower power
of two followed by every other slope of the next higher one.  TransNormerLLM
further scales layer ``l`` of ``L`` by ``1 - l / (L - 1) + 1e-5`` (strong decay
in the first layer, almost none in the last).  :func:`alibi_slopes` and
:func:`lightning_decay` build these; pass ``decay=lightning_decay(H)``.

Algorithm (the paper's tiling).  ``T`` is split into blocks of ``Bt`` rows.  For
block ``i`` with local row ``r`` (``0 <= r < Bt``) and a float32 state
``KV_{i-1} = sum_{s before block i} lambda ** (iBt - 1 - s) k[s]^T v[s]``
(``[D, Dv]``)::

    O_i  = [(Q_i K_i^T) * M] V_i  +  lambda ** (r + 1) * (Q_i KV_{i-1})      (intra + inter)
    KV_i = lambda ** Bt * KV_{i-1} + (lambda ** (Bt - 1 - r) * K_i)^T V_i

where ``M[r, c] = lambda ** (r - c)`` for ``r >= c`` and 0 above the diagonal.
The intra-block part is quadratic attention on a ``Bt x Bt`` tile, the
inter-block part a ``[Bt, D] x [D, Dv]`` product with the carried state, so the
work is ``O(T (Bt + Dv) D)`` and nothing of size ``T x T`` ever exists.

Backward (``jax.custom_vjp``; the residuals are just ``q, k, v``).  Writing
``LA(a, b, c)[t] = sum_{s <= t} lambda ** (t - s) (a[t] . b[s]) c[s]`` and
``RLA`` for the anti-causal sum over ``s >= t`` (``lambda ** (s - t)``)::

    o  = scale * LA(q, k, v)
    dq = scale * LA(do, v, k)      forward sweep,  state sum v^T k  [Dv, D]
    dk = scale * RLA(v, do, q)     reverse sweep,  state sum do^T q [Dv, D]
    dv = scale * RLA(k, q, do)     reverse sweep,  state sum q^T do [D, Dv]

so the three gradient passes are the forward kernel again (the reverse ones
walk the blocks from the last to the first with the mask transposed; no array
is flipped).  Each pass is parallel over (batch, head, output-feature tile),
which a fused dK/dV sweep could not tile.  Memory is flat in ``T`` apart from
the inputs, outputs and cotangents.  ``decay`` is treated as a constant: its
cotangent is **zero** on every backend except the naive
:func:`lightning_attention_reference` (plain autodiff).

Backends (``backend=``):

* ``"triton"`` (GPU): grid (B, H, Dv tiles); each program walks the blocks with
  ``lax.fori_loop`` carrying the ``[D, block_dv]`` float32 state in registers.
  Triton tiles are powers of two: the wrapper zero-pads ``D`` and ``Dv`` to the
  next power of two (>= 16) and ``T`` to a multiple of ``block_t`` (zero ``k``/
  ``v`` rows add nothing to any sum, zero ``q`` rows give outputs that are
  sliced off, zero head-dim columns add nothing to ``q . k``), only when needed.
* ``"mosaic_tpu"`` (TPU): the wrapper transposes to ``[B, H, T, D]`` (so that
  blocks ``[block_t, D]`` are on the tiled minor dims); grid
  (B, H, Dv tiles, T blocks) with the block axis last and ``"arbitrary"``, the
  state in a float32 VMEM scratch zeroed on the first block, the per-head
  ``log(lambda)`` scalar-prefetched into SMEM.  The key-side operand of each
  pass (``k``; ``v``, ``do``, ``q`` in the backward) is also handed over
  transposed, ``[B, H, D, T]`` (one XLA transpose per pass), so that both of
  its products, ``a b^T`` and ``b^T c``, are plain NN matmuls and the kernel
  transposes no tile; this puts ``block_t`` on lanes, so it must be a
  multiple of 128 unless one block covers ``T``.  ``T`` is zero-padded to a
  multiple of ``block_t``; ``D`` and ``Dv`` need no padding.
* ``"interpret"``: the Triton kernel body run with ``interpret=True`` (HLO
  interpreter) on any device; this is what the CPU tests exercise.
* ``"xla"``: the same chunked algorithm in pure JAX, ``lax.scan`` over blocks
  (batched over B and H) with the same ``custom_vjp``: O(T) memory forward and
  backward, usable on CPU.  (The quadratic reference is
  :func:`lightning_attention_reference`, which materializes the ``T x T`` mask.)
* ``"auto"``: triton on GPU, mosaic_tpu on TPU, xla elsewhere.

``interpret=True`` with ``backend="triton"`` runs the Triton body in the HLO
interpreter; with ``backend="mosaic_tpu"`` it runs the Mosaic body in TPU
interpret mode (``pltpu.InterpretParams()``; pass an ``InterpretParams`` to
configure it).  A Mosaic kernel traced under ``pltpu.force_tpu_interpret_mode()``
is also interpreted.

Numerics: every product accumulates in float32 and the state is float32.  For
float32 inputs the products use ``Precision.HIGHEST`` (IEEE fp32 on Triton, not
TF32).  For bfloat16 / float16 inputs the operands of every product are in the
input dtype (bf16 x bf16 -> f32 MMAs): the decayed intra-block scores, the
state (before ``Q KV``) and the decayed ``K`` rows (before ``K^T V``) are cast
to the input dtype, as in FlashAttention's ``P @ V``.  Decay factors are
``exp(log(lambda) * n)`` in float32; for strong decay and long blocks they
underflow to 0, which is the correct limit (no inf, no NaN).  The output has
``q.dtype``.

Checked without accelerators: the kernels run interpreted on CPU against float64
references, and are compiled to machine code for an H100 (XLA:GPU, Triton, ptxas) and a
TPU v5e (XLA:TPU, Mosaic) on a CPU-only machine (``benchmarks/compile_report.py``,
``tests/targets``; :mod:`memlab.targets`).  Speed is only measured on a real device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ._common import (KERNEL_FLOAT_DTYPES, TRITON_SMEM_BYTES, acc_dtype, cdiv, check_on_chip,
                      dot, is_concrete, is_power_of_2, next_power_of_2, pallas_lowering,
                      precision_for, round_up)

__all__ = [
    "BlockSizes",
    "alibi_slopes",
    "decay_from_slopes",
    "lightning_attention",
    "lightning_attention_reference",
    "lightning_decay",
]

_F32 = jnp.float32


# --------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Lightning Attention kernels.

    ``block_t`` sequence rows per block (the intra-block tile is
    ``block_t x block_t``; the state is carried across blocks).  ``block_dv``
    is the tile of the *output* feature dim: ``Dv`` in the forward pass and
    for ``dv``, ``D`` for ``dq`` and ``dk`` (each program keeps a float32
    ``[D, block_dv]`` state).  triton/interpret need powers of two >= 16;
    mosaic_tpu needs ``block_t % 128 == 0`` when ``T > block_t`` and
    ``block_dv % 128 == 0`` whenever a feature dim is larger than it; xla
    ignores ``block_dv``.  Blocks larger than the problem are shrunk.
    """
    block_t: int = 64
    block_dv: int = 64

    def __post_init__(self):
        for name in ("block_t", "block_dv"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(
                    f"BlockSizes.{name}={v!r} must be a positive int; "
                    f"pass e.g. BlockSizes({name}=64).")

    @classmethod
    def get_default(cls, backend: str = "triton") -> BlockSizes:
        """Defaults per backend.

        triton: 64-row blocks (the paper's choice) and 64-wide output tiles, so
        that a ``[128, 64]`` float32 state plus the ``64 x 64`` score tile fit
        in registers.  mosaic_tpu: 128 x 128 MXU-sized tiles.  xla: 128-row
        blocks (fewer scan steps; the per-step ``[B, H, 128, 128]`` tile is
        small) and whole feature dims.
        """
        if backend == "mosaic_tpu":
            return cls(block_t=128, block_dv=128)
        if backend == "xla":
            return cls(block_t=128, block_dv=1 << 30)
        return cls(block_t=64, block_dv=64)


# --------------------------------------------------------------------------
# Decay helpers
# --------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes (Press et al. 2022), as used by TransNormerLLM / Lightning.

    For ``H`` a power of two: ``2 ** (-8 (h + 1) / H)``, ``h = 0..H-1``; for
    other ``H`` the ``2 ** floor(log2 H)`` slopes followed by every other slope
    of ``2 * 2 ** floor(log2 H)`` heads.  Returns float32 ``[H]``, all in (0, 1).
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r} must be a positive int.")

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    def slopes(n):
        if is_power_of_2(n):
            return pow2(n)
        closest = 1 << (n.bit_length() - 1)
        return pow2(closest) + slopes(2 * closest)[0::2][: n - closest]

    return np.asarray(slopes(int(num_heads)), np.float32)


def decay_from_slopes(slopes) -> jax.Array:
    """``lambda = exp(-slope)``: the Lightning/TransNormer slope -> decay map."""
    return jnp.exp(-jnp.asarray(slopes, _F32))


def lightning_decay(num_heads: int, *, layer_idx: int | None = None,
                    num_layers: int | None = None) -> jax.Array:
    """Per-head decay ``[H]`` of Lightning Attention / TransNormerLLM.

    ``exp(-alibi_slopes(H))``; with ``layer_idx`` and ``num_layers`` the slopes
    are scaled by ``1 - layer_idx / (num_layers - 1) + 1e-5`` first (the
    TransNormerLLM / MiniMax-01 per-layer schedule).
    """
    s = alibi_slopes(num_heads).astype(np.float64)
    if (layer_idx is None) != (num_layers is None):
        raise ValueError("pass both layer_idx and num_layers, or neither.")
    if layer_idx is not None:
        if num_layers < 1 or not 0 <= layer_idx < num_layers:
            raise ValueError(
                f"need 0 <= layer_idx < num_layers, got layer_idx={layer_idx}, "
                f"num_layers={num_layers}.")
        s = s * ((1.0 - layer_idx / (num_layers - 1) if num_layers > 1 else 1.0) + 1e-5)
    return decay_from_slopes(s.astype(np.float32))


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------
def _check_qkv(q, k, v, dtypes=KERNEL_FLOAT_DTYPES):
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not hasattr(a, "dtype") or not hasattr(a, "shape"):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}.")
        if a.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D [B, T, H, D], got shape {tuple(a.shape)}; "
                "add the batch / head axes with a reshape.")
        if jnp.dtype(a.dtype) not in dtypes:
            raise TypeError(
                f"{name} must be one of {[d.name for d in dtypes]}, got {a.dtype}; "
                f"cast with {name}.astype(jnp.float32).")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(
            f"shape mismatch: k.shape={tuple(k.shape)} must equal q.shape={tuple(q.shape)} "
            "([B, T, H, D]; no GQA, no separate key length in causal linear attention).")
    if tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(
            f"shape mismatch: v.shape={tuple(v.shape)} must be [B, T, H, Dv] with "
            f"[B, T, H] = {tuple(q.shape[:3])} as in q.shape={tuple(q.shape)}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"dtype mismatch: q is {q.dtype}, k is {k.dtype}, v is {v.dtype}; cast all "
            "three to one dtype (float32, bfloat16 or float16).")


def _check_decay(decay, num_heads):
    """``decay`` -> (float32 log(lambda) [H], has_decay)."""
    if decay is None:
        return jnp.zeros((num_heads,), _F32), False
    decay = jnp.asarray(decay) if not isinstance(decay, jax.Array) else decay
    if not jnp.issubdtype(decay.dtype, jnp.floating):
        raise TypeError(
            f"decay must be a float array of per-head lambda in (0, 1], got {decay.dtype}; "
            "e.g. decay=lightning_decay(H).")
    if tuple(decay.shape) != (num_heads,):
        raise ValueError(
            f"decay must have shape (H,) = ({num_heads},), one lambda per head, got "
            f"{tuple(decay.shape)}; for one lambda shared by all heads use "
            f"jnp.full(({num_heads},), lam).")
    if is_concrete(decay) and decay.size:
        host = np.asarray(decay, np.float64)
        if not np.all(np.isfinite(host)) or host.min() <= 0 or host.max() > 1:
            raise ValueError(
                f"decay must lie in (0, 1] (lambda = exp(-slope), slope >= 0), got values in "
                f"[{host.min()}, {host.max()}]; use decay_from_slopes(slopes).")
    return jnp.log(decay.astype(_F32)), True


def _check_scale(scale) -> float:
    if scale is None:
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"scale must be a Python float (a static constant), got {type(scale).__name__}; "
            "multiply q by a traced scale yourself instead.")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}.")
    return scale


# --------------------------------------------------------------------------
# Naive reference
# --------------------------------------------------------------------------
def _decay_mask(ld, t):
    """``[H, T, T]``: ``lambda ** (i - j)`` for ``i >= j``, else 0 (float32)."""
    pos = jnp.arange(t)
    dist = pos[:, None] - pos[None, :]
    w = jnp.exp(ld[:, None, None] * jnp.maximum(dist, 0).astype(ld.dtype))
    return jnp.where(dist >= 0, w, 0)


def lightning_attention_reference(q, k, v, *, decay=None, scale=None) -> jax.Array:
    """Naive quadratic Lightning Attention: materializes the ``[H, T, T]`` decay mask.

    ``o[t] = scale * sum_{s <= t} lambda ** (t - s) (q[t] . k[s]) v[s]`` in
    float32 (float64 for float64 inputs) with ``Precision.HIGHEST``; returns
    ``q.dtype``.  Plain JAX autodiff (``decay`` gets a true gradient here).
    Memory ``O(B H T^2)``: a correctness reference, not a kernel.
    """
    _check_qkv(q, k, v, KERNEL_FLOAT_DTYPES + (jnp.dtype(jnp.float64),))
    scale = _check_scale(scale)
    acc = acc_dtype(q.dtype)
    if decay is None:
        ld = jnp.zeros((q.shape[2],), acc)
    else:
        ld, _ = _check_decay(decay, q.shape[2])
        ld = jnp.log(jnp.asarray(decay, acc)) if acc == jnp.float64 else ld
    mask = _decay_mask(ld.astype(acc), q.shape[1])
    hi = lax.Precision.HIGHEST
    s = jnp.einsum("bthd,bshd->bhts", q.astype(acc), k.astype(acc), precision=hi)
    o = jnp.einsum("bhts,bshe->bthe", s * mask[None], v.astype(acc), precision=hi)
    return (o * scale).astype(q.dtype)


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static (hashable) configuration of one public call."""
    kernel: str            # "triton" | "mosaic" | "xla"
    interpret: Any         # False | True | pltpu.InterpretParams
    bt: int                # rows per block (T is padded to a multiple)
    bf: int                # output-feature tile (per pass: min(bf, F) or F)
    scale: float
    has_decay: bool


def _sublanes(dtype) -> int:
    return 8 if jnp.dtype(dtype).itemsize == 4 else 16


def triton_smem_bytes(block_t: int, d: int, block_dv: int, itemsize: int) -> int:
    """Shared memory of a Triton program (an upper bound of Triton's allocation): two
    pipeline stages of its ``[block_t, D]`` A and B tiles and ``[block_t, block_dv]`` C tile."""
    return 2 * (2 * block_t * d + block_t * block_dv) * itemsize


def _plan(kernel: str, bs: BlockSizes | None, t: int, d: int, dv: int, dtype) -> tuple[int, int]:
    """Validate the block sizes for ``kernel``; return (block_t, block_dv) resolved."""
    backend = {"triton": "triton", "mosaic": "mosaic_tpu", "xla": "xla"}[kernel]
    user = bs
    bs = bs or BlockSizes.get_default(backend)
    if kernel == "triton":
        for name in ("block_t", "block_dv"):
            v = getattr(bs, name)
            if not is_power_of_2(v) or v < 16:
                raise ValueError(
                    f"block_sizes.{name}={v} must be a power of two >= 16 on the "
                    f"triton/interpret backends (Triton tiles; tl.dot needs >= 16); "
                    f"use {name}={max(16, next_power_of_2(v))}.")
        bt = min(bs.block_t, max(16, next_power_of_2(t)))
        itemsize = jnp.dtype(dtype).itemsize
        while user is None and bt > 16 and \
                triton_smem_bytes(bt, d, bs.block_dv, itemsize) > TRITON_SMEM_BYTES:
            bt //= 2   # default blocks shrink to fit; chosen ones are refused below
        check_on_chip("lightning_attention", triton_smem_bytes(bt, d, bs.block_dv, itemsize),
                      TRITON_SMEM_BYTES, "shared memory",
                      f"lower block_sizes.block_t={bt} to {max(16, bt // 2)}")
        return bt, bs.block_dv
    if kernel == "mosaic":
        sub = _sublanes(dtype)
        if t > bs.block_t and bs.block_t % 128:
            raise ValueError(
                f"block_sizes.block_t={bs.block_t} must be a multiple of 128 on "
                f"mosaic_tpu when T={t} is longer (T is the lane dim of the "
                f"transposed [D, block_t] tile); use block_t={round_up(bs.block_t, 128)} "
                f"or block_t >= {t}.")
        if max(d, dv) > bs.block_dv and bs.block_dv % 128:
            raise ValueError(
                f"block_sizes.block_dv={bs.block_dv} must be a multiple of 128 on "
                f"mosaic_tpu when a head dim (D={d}, Dv={dv}) is larger (the feature "
                f"dim is the lane dim); use block_dv={round_up(bs.block_dv, 128)} or "
                f"block_dv >= {max(d, dv)}.")
        return min(bs.block_t, round_up(t, sub)), bs.block_dv
    return min(bs.block_t, t), bs.block_dv


# --------------------------------------------------------------------------
# Shared tile math
# --------------------------------------------------------------------------
def _decay_factors(ld, rows, cols, pos_a, pos_b, bt, reverse):
    """float32 factors of one block (``ld = log(lambda)``, None for no decay).

    ``rows`` / ``cols``: int32 ``[bt, bt]`` local positions; ``pos_a`` /
    ``pos_b``: float32 local positions shaped like the decay vector wanted
    (``[bt, 1]`` for rows of a tile, ``[1, bt]`` for columns of a transposed
    tile).  Returns causal ``[bt, bt]`` bool (anti-causal when reversed);
    intra: ``lambda ** |r - c|`` on the causal side, 0 elsewhere; ``a_dec``:
    decay of the carried state as seen by row ``r`` of ``a``; ``b_dec``: decay
    of row ``r`` of ``b`` when folded into the state; ``blk``: ``lambda ** bt``.
    """
    causal = (rows <= cols) if reverse else (rows >= cols)
    if ld is None:
        return causal, None, None, None, None
    dist = jnp.maximum((cols - rows) if reverse else (rows - cols), 0).astype(_F32)
    intra = jnp.where(causal, jnp.exp(ld * dist), 0.0)
    if reverse:     # state holds rows after this block; its first row is bt - r away.
        a_dec, b_dec = jnp.exp(ld * (bt - pos_a)), jnp.exp(ld * pos_b)
    else:           # state holds rows before this block; its last row is r + 1 away.
        a_dec, b_dec = jnp.exp(ld * (pos_a + 1.0)), jnp.exp(ld * (bt - 1.0 - pos_b))
    return causal, intra, a_dec, b_dec, jnp.exp(ld * float(bt))


def _block_step(a, b, c, state, fac, *, b_transposed, has_decay, precision):
    """One block: (output block in float32, new state).

    ``a`` ``[bt, Dk]``, ``c`` ``[bt, F]``, ``state`` float32 ``[Dk, F]``;
    ``b`` is ``[bt, Dk]``, or ``[Dk, bt]`` when ``b_transposed`` (then every
    product is a plain NN matmul, no in-kernel transpose).
    """
    causal, intra, a_dec, b_dec, blk = fac
    s = dot(a, b if b_transposed else b.T, precision)      # [bt, bt]
    s = s * intra if has_decay else jnp.where(causal, s, 0.0)
    inter = dot(a, state.astype(a.dtype), precision)        # [bt, F]
    if has_decay:
        inter = inter * a_dec
        b = (b.astype(_F32) * b_dec).astype(b.dtype)
    o = dot(s.astype(c.dtype), c, precision) + inter
    new = dot(b if b_transposed else b.T, c, precision)     # [Dk, F]
    state = state * blk + new if has_decay else state + new
    return o, state


# --------------------------------------------------------------------------
# Triton kernel (also the "interpret" backend)
# --------------------------------------------------------------------------
def _triton_kernel(ld_ref, a_ref, b_ref, c_ref, o_ref, *, bt, n, reverse, scale,
                   has_decay, precision):
    pos = jnp.arange(bt, dtype=jnp.int32)
    rows, cols = pos[:, None], pos[None, :]
    ld = ld_ref[...].astype(_F32) if has_decay else None
    posf = pos.astype(_F32)[:, None]
    fac = _decay_factors(ld, rows, cols, posf, posf, bt, reverse)

    def body(it, state):
        i = n - 1 - it if reverse else it
        sl = pl.ds(pl.multiple_of(i * bt, bt), bt)
        o, state = _block_step(a_ref[sl, :], b_ref[sl, :], c_ref[sl, :], state, fac,
                               b_transposed=False, has_decay=has_decay,
                               precision=precision)
        o_ref[sl, :] = (o * scale if scale != 1.0 else o).astype(o_ref.dtype)
        return state

    lax.fori_loop(0, n, body, jnp.zeros((a_ref.shape[-1], c_ref.shape[-1]), _F32))


def _triton_call(spec: _Spec, a, b, c, ld, reverse):
    bsz, tp, h, dk = a.shape
    f = c.shape[-1]
    bt, bf = spec.bt, min(spec.bf, f)
    n = tp // bt
    kernel = functools.partial(
        _triton_kernel, bt=bt, n=n, reverse=reverse, scale=spec.scale,
        has_decay=spec.has_decay, precision=precision_for(a.dtype))
    full = pl.BlockSpec((None, tp, None, dk), lambda i, j, m: (i, 0, j, 0))
    tile = pl.BlockSpec((None, tp, None, bf), lambda i, j, m: (i, 0, j, m))
    num_warps = 4 if bt * max(dk, bf) <= 64 * 64 else 8
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bsz, tp, h, f), a.dtype),
        grid=(bsz, h, f // bf),
        in_specs=[pl.BlockSpec((None,), lambda i, j, m: (j,)), full, full, tile],
        out_specs=tile,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=spec.interpret,
        cost_estimate=_cost(a, b, c, bt),
        name="lightning_attention_rev" if reverse else "lightning_attention",
    )(ld, a, b, c)


# --------------------------------------------------------------------------
# Mosaic TPU kernel (layout [B, H, T, D]; b as [B, H, Dk, T])
# --------------------------------------------------------------------------
def _mosaic_kernel(ld_ref, a_ref, bt_ref, c_ref, o_ref, state_ref, *, bt, reverse, scale,
                   has_decay, precision):
    @pl.when(pl.program_id(3) == 0)
    def _init():
        state_ref[...] = jnp.zeros_like(state_ref)

    rows = lax.broadcasted_iota(jnp.int32, (bt, bt), 0)
    cols = lax.broadcasted_iota(jnp.int32, (bt, bt), 1)
    pos_col = lax.broadcasted_iota(jnp.int32, (bt, 1), 0).astype(_F32)
    pos_row = lax.broadcasted_iota(jnp.int32, (1, bt), 1).astype(_F32)
    # A [1, 1] vector, so that exp runs on the VPU (not the scalar core).
    ld = jnp.full((1, 1), ld_ref[pl.program_id(1)], _F32) if has_decay else None
    fac = _decay_factors(ld, rows, cols, pos_col, pos_row, bt, reverse)
    o, state = _block_step(a_ref[...], bt_ref[...], c_ref[...], state_ref[...], fac,
                           b_transposed=True, has_decay=has_decay, precision=precision)
    state_ref[...] = state
    o_ref[...] = (o * scale if scale != 1.0 else o).astype(o_ref.dtype)


def _mosaic_call(spec: _Spec, a, b, c, ld, reverse):
    bsz, h, tp, dk = a.shape
    f = c.shape[-1]
    bt = spec.bt
    bf = min(f, spec.bf)   # the whole dim, or a multiple of 128 (checked)
    n = tp // bt
    # b^T by XLA (one HBM copy of b per pass): both in-kernel products with b
    # (a b^T and b^T c) become NN matmuls, no in-kernel transpose of a tile.
    b_t = b.swapaxes(2, 3)

    def blk(i):
        return n - 1 - i if reverse else i

    a_spec = pl.BlockSpec((None, None, bt, dk), lambda i, j, m, t, ld: (i, j, blk(t), 0))
    b_spec = pl.BlockSpec((None, None, dk, bt), lambda i, j, m, t, ld: (i, j, 0, blk(t)))
    c_spec = pl.BlockSpec((None, None, bt, bf), lambda i, j, m, t, ld: (i, j, blk(t), m))
    kernel = functools.partial(
        _mosaic_kernel, bt=bt, reverse=reverse, scale=spec.scale,
        has_decay=spec.has_decay, precision=precision_for(a.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bsz, h, tp, f), a.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(bsz, h, cdiv(f, bf), n),
            in_specs=[a_spec, b_spec, c_spec],
            out_specs=c_spec,
            scratch_shapes=[pltpu.VMEM((dk, bf), _F32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=spec.interpret,
        cost_estimate=_cost(a, b, c, bt),
        name="lightning_attention_rev" if reverse else "lightning_attention",
    )(ld, a, b_t, c)


# --------------------------------------------------------------------------
# XLA: the chunked algorithm under lax.scan (layout [B, T, H, D])
# --------------------------------------------------------------------------
def _xla_call(spec: _Spec, a, b, c, ld, reverse):
    bsz, tp, h, dk = a.shape
    f = c.shape[-1]
    bt = spec.bt
    n = tp // bt
    precision = precision_for(a.dtype)

    def chunks(x):   # [B, Tp, H, F] -> [n, B, H, bt, F]
        return x.reshape(bsz, n, bt, h, x.shape[-1]).transpose(1, 0, 3, 2, 4)

    pos = jnp.arange(bt, dtype=jnp.int32)
    ldh = ld[:, None, None] if spec.has_decay else None      # [H, 1, 1]
    posf = pos.astype(_F32)[:, None]
    causal, intra, a_dec, b_dec, blk = _decay_factors(
        ldh, pos[:, None], pos[None, :], posf, posf, bt, reverse)

    def ein(spec_, x, y):
        return jnp.einsum(spec_, x, y, precision=precision, preferred_element_type=_F32)

    def step(state, xs):
        ab, bb, cb = xs                                     # [B, H, bt, *]
        s = ein("bhrd,bhcd->bhrc", ab, bb)
        s = s * intra if spec.has_decay else jnp.where(causal, s, 0.0)
        inter = ein("bhrd,bhdf->bhrf", ab, state.astype(ab.dtype))
        if spec.has_decay:
            inter = inter * a_dec
            bb = (bb.astype(_F32) * b_dec).astype(bb.dtype)
        o = ein("bhrc,bhcf->bhrf", s.astype(cb.dtype), cb) + inter
        new = ein("bhcd,bhcf->bhdf", bb, cb)
        state = state * blk + new if spec.has_decay else state + new
        o = o * spec.scale if spec.scale != 1.0 else o
        return state, o.astype(a.dtype)

    state0 = jnp.zeros((bsz, h, dk, f), _F32)
    _, o = lax.scan(step, state0, (chunks(a), chunks(b), chunks(c)), reverse=reverse)
    return o.transpose(1, 0, 3, 2, 4).reshape(bsz, tp, h, f)


# --------------------------------------------------------------------------
# Forward / custom VJP
# --------------------------------------------------------------------------
def _cost(a, b, c, bt):
    shape = a.shape
    dk, f = a.shape[-1], c.shape[-1]
    rows = math.prod(shape[:-1])      # B * T * H
    flops = 2 * rows * (bt * dk + bt * f + 2 * dk * f)
    nbytes = sum(int(x.size) * x.dtype.itemsize for x in (a, b, c)) + rows * f * a.dtype.itemsize
    return pl.CostEstimate(flops=int(flops), transcendentals=0, bytes_accessed=int(nbytes))


def _la(spec: _Spec, a, b, c, ld, reverse):
    """``scale * LA(a, b, c)`` (``RLA`` when ``reverse``) on padded arrays."""
    if spec.kernel == "triton":
        return _triton_call(spec, a, b, c, ld, reverse)
    if spec.kernel == "mosaic":
        return _mosaic_call(spec, a, b, c, ld, reverse)
    return _xla_call(spec, a, b, c, ld, reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(spec: _Spec, q, k, v, ld):
    return _la(spec, q, k, v, ld, reverse=False)


def _lightning_fwd(spec, q, k, v, ld):
    return _la(spec, q, k, v, ld, reverse=False), (q, k, v, ld)


def _lightning_bwd(spec, res, do):
    q, k, v, ld = res
    do = do.astype(q.dtype)
    dq = _la(spec, do, v, k, ld, reverse=False)
    dk = _la(spec, v, do, q, ld, reverse=True)
    dv = _la(spec, k, q, do, ld, reverse=True)
    return dq, dk, dv, jnp.zeros_like(ld)      # decay: treated as a constant.


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def _pad_to(x, axis, size):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnums=0)
def _run(spec: _Spec, q, k, v, ld):
    t, d = q.shape[1], q.shape[3]
    dv = v.shape[-1]
    tp = round_up(t, spec.bt)
    if spec.kernel == "triton":   # power-of-two tiles: zero-pad the head dims.
        dp, dvp = max(16, next_power_of_2(d)), max(16, next_power_of_2(dv))
    else:
        dp, dvp = d, dv
    q, k = (_pad_to(_pad_to(x, 1, tp), 3, dp) for x in (q, k))
    v = _pad_to(_pad_to(v, 1, tp), 3, dvp)
    if spec.kernel == "mosaic":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        o = _lightning(spec, q, k, v, ld).transpose(0, 2, 1, 3)
    else:
        o = _lightning(spec, q, k, v, ld)
    return o[:, :t, :, :dv]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def _make_spec(block_sizes, backend, interpret, t, d, dv, dtype, scale, has_decay) -> _Spec:
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}; "
            "pass block_sizes=BlockSizes(block_t=..., block_dv=...).")
    kernel, interp = pallas_lowering(backend, interpret)
    bt, bf = _plan(kernel, block_sizes, t, d, dv, dtype)
    return _Spec(kernel, interp, bt, bf, scale, has_decay)


def lightning_attention(q, k, v, *, decay=None, scale=None,
                        block_sizes: BlockSizes | None = None, backend: str = "auto",
                        interpret: Any = None) -> jax.Array:
    """Causal linear attention with per-head exponential decay (Lightning Attention-2).

    ``o[b, t, h] = scale * sum_{s <= t} decay[h] ** (t - s) * (q[b, t, h] . k[b, s, h]) * v[b, s, h]``

    Args:
      q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; one dtype among float32,
        bfloat16, float16.  Any ``T`` (padded internally), any ``D`` / ``Dv``.
      decay: None (``lambda = 1``) or per-head ``lambda`` ``[H]`` in ``(0, 1]``
        (``exp(-slope)``; see :func:`lightning_decay`).  Gets a zero gradient.
      scale: a Python float multiplying the output (default 1; no softmax).
      block_sizes: a :class:`BlockSizes`, or None for
        ``BlockSizes.get_default(backend)``.
      backend: "auto" (triton on GPU, mosaic_tpu on TPU, xla on CPU), "triton",
        "mosaic_tpu", "interpret" (the Triton kernel in the HLO interpreter,
        any device) or "xla" (the chunked algorithm under ``lax.scan``).
      interpret: with "triton", True runs the kernel in the HLO interpreter;
        with "mosaic_tpu", True (or a ``pltpu.InterpretParams``) runs it in TPU
        interpret mode.  Ignored by "interpret" and "xla".

    Returns ``[B, T, H, Dv]`` in ``q.dtype``.  Differentiable w.r.t. ``q``,
    ``k``, ``v`` (custom VJP, memory flat in ``T`` per block).
    """
    _check_qkv(q, k, v)
    bsz, t, h, d = q.shape
    dv = v.shape[-1]
    ld, has_decay = _check_decay(decay, h)
    scale = _check_scale(scale)
    spec = _make_spec(block_sizes, backend, interpret, max(t, 1), d, dv, q.dtype,
                      scale, has_decay)
    if 0 in (bsz, t, h, d, dv):
        return jnp.zeros((bsz, t, h, dv), q.dtype)
    return _run(spec, q, k, v, ld)
