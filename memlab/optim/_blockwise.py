"""Quantized optimizer state: code maps, block-wise and rank-1 (de)quantization,
nibble packing, and the quantized-Adam core shared by ``adam8bit`` and ``adam4bit``.

* Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise
  Quantization" (ICLR 2022): the dynamic tree code map and block-wise absmax
  normalization (one float32 absmax per block of the flattened tensor).
* Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States" (NeurIPS 2023):
  the 4-bit dynamic-exponent map for the first moment, the linear map without zero
  and rank-1 (row/column max) normalization for the second moment.

A moment of one tensor is stored by a *codec* (a frozen dataclass, see the Codecs
section): ``init(shape)`` gives zero state, ``encode``/``decode`` convert between a
flat float32 piece and its quantized state, and ``nbytes(shape)`` is the exact byte
count of that state (``memlab.memory.bytes.tree_bytes``), so optimizer state bytes
are known from shapes alone.  Quantization rounds to the nearest code (the count of
code midpoints below the value).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memlab.model import path_str
from memlab_kernels._packing import fill_byte, pack_bits, unpack_bits

# ---------------------------------------------------------------------------
# Code maps (sorted float32 numpy arrays with 2**bits entries)
# ---------------------------------------------------------------------------


def dynamic_map(bits: int = 8, signed: bool = True) -> np.ndarray:
    """Dynamic tree / dynamic exponent code map with ``2**bits`` sorted entries in [-1, 1].

    A code is ``[sign] 0…0 1 f…f``: ``e`` leading zeros give the decimal exponent,
    the indicator bit ends them, and the remaining ``F`` bits pick one of ``2**F``
    equal bins of [0.1, 1] (the value is the bin's midpoint), so the value is
    ``±10**-e * mid``.  Exponents run over ``e = 0 … bits-2``; the two patterns left
    over are 0 and 1 (exact, so each block's absmax is stored without error).
    """
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"dynamic_map: bits must be an int >= 2, got {bits!r}")
    mag_bits = bits - 1 if signed else bits
    values = [0.0, 1.0]
    for e in range(bits - 1):
        frac_bits = mag_bits - 1 - e
        edges = np.linspace(0.1, 1.0, 2 ** frac_bits + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (-e)
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    out = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    assert out.size == 2 ** bits and np.unique(out).size == out.size
    return out


def linear_map(bits: int = 4) -> np.ndarray:
    """Linear map without zero, ``(i + 1) / 2**bits`` (Li et al.'s second-moment map:
    excluding zero keeps a quantized ``v`` from vanishing under a nonzero ``m``)."""
    if not isinstance(bits, int) or bits < 1:
        raise ValueError(f"linear_map: bits must be a positive int, got {bits!r}")
    return ((np.arange(2 ** bits) + 1) / 2 ** bits).astype(np.float32)


def max_gap(code: np.ndarray) -> float:
    """Largest distance between neighbouring codes (nearest rounding errs by at most half)."""
    return float(np.max(np.diff(np.asarray(code, np.float64))))


def nearest_code(x: jax.Array, code: np.ndarray) -> jax.Array:
    """Index (uint8) of the code nearest to each element of ``x`` (ties to the lower code).

    The index is the count of code midpoints below ``x``: counted by comparison against
    every 16th midpoint (one fused compare-and-sum), then refined by a 4-step binary
    search inside that group of 16 (elementwise, so XLA fuses it with its producer).
    """
    c = np.asarray(code, np.float32)
    if c.size & (c.size - 1) or not 2 <= c.size <= 256:
        raise ValueError(f"nearest_code: the code map needs a power-of-two size in [2, 256], "
                         f"got {c.size}")
    mids = (c[1:] + c[:-1]) / 2
    if c.size <= 16:
        return jnp.sum(x[..., None] > jnp.asarray(mids), axis=-1, dtype=jnp.int32).astype(jnp.uint8)
    group = 16
    idx = group * jnp.sum(x[..., None] > jnp.asarray(mids[group - 1::group]), axis=-1,
                          dtype=jnp.int32)
    mids = jnp.asarray(mids)
    step = group // 2
    while step:
        idx = jnp.where(jnp.take(mids, idx + step - 1) < x, idx + step, idx)
        step //= 2
    return idx.astype(jnp.uint8)


def pack_nibbles(idx: jax.Array) -> jax.Array:
    """4-bit codes (uint8 < 16) two per byte along the last axis, low nibble first;
    an odd last axis is padded by one code (memlab's one packing layout,
    :func:`memlab_kernels._packing.pack_bits`)."""
    return pack_bits(idx, 4, axis=-1, pad=True)


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_nibbles`: the first ``n`` codes of the last axis."""
    return unpack_bits(packed, 4, axis=-1, n=n)


def check_block_size(block_size: Any, argname: str = "block_size", even: bool = False) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size <= 0:
        raise ValueError(f"{argname} must be a positive int (e.g. 2048), got {block_size!r}")
    if even and block_size % 2:
        raise ValueError(f"{argname}={block_size} must be even: 4-bit codes are packed two "
                         "per byte within a block")
    return int(block_size)


# ---------------------------------------------------------------------------
# Codecs: how one moment of one tensor is stored
#
# A quantized codec cuts the flattened tensor into independent *units* of
# ``unit(shape)`` elements (a block; one trailing matrix for rank-1) and stores
# every state array with a leading axis of ``n_units(shape)``, so an update can
# run over a few units at a time.  ``encode(flat, k)`` quantizes a flat float32
# vector (zero-padded to ``k`` units); ``decode(state, k)`` gives ``k * unit``
# float32 values back.
# ---------------------------------------------------------------------------


class QBlocks(NamedTuple):
    """Block-wise quantized tensor: ``codes[n_blocks, block * bits / 8]`` (uint8; two
    4-bit codes per byte) and one float32 ``absmax`` per block."""

    codes: jax.Array
    absmax: jax.Array


class QRank1(NamedTuple):
    """Rank-1 normalized tensor ``[*lead, R, C]`` seen as ``L = prod(lead)`` matrices:
    ``codes[L, ceil(R * C * bits / 8)]`` (uint8) and the float32 ``row_max[L, R]`` and
    ``col_max[L, C]`` of every matrix."""

    codes: jax.Array
    row_max: jax.Array
    col_max: jax.Array


@dataclasses.dataclass(frozen=True)
class FloatCodec:
    """Unquantized state in ``dtype``, shaped like the parameter."""

    dtype: str = "float32"

    def init(self, shape):
        return jnp.zeros(shape, self.dtype)

    def nbytes(self, shape) -> int:
        return math.prod(shape) * jnp.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class BlockwiseCodec:
    """Flatten, zero-pad to whole blocks, divide each block by its absmax, round to the
    nearest code.  The padding is stored (it is part of :meth:`nbytes`)."""

    code: np.ndarray
    block: int
    bits: int = 8

    def unit(self, shape) -> int:
        return self.block

    def n_units(self, shape) -> int:
        return -(-math.prod(shape) // self.block)

    def _row_bytes(self) -> int:
        return -(-self.block * self.bits // 8)

    def init(self, shape):
        nb = self.n_units(shape)
        zero = int(np.argmin(np.abs(self.code)))
        fill = fill_byte(zero, self.bits)
        return QBlocks(jnp.full((nb, self._row_bytes()), fill, jnp.uint8),
                       jnp.zeros((nb,), jnp.float32))

    def encode(self, flat, k: int):
        flat = flat.astype(jnp.float32)
        blocks = jnp.pad(flat, (0, k * self.block - flat.shape[0])).reshape(k, self.block)
        absmax = jnp.max(jnp.abs(blocks), axis=1)
        idx = nearest_code(blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None], self.code)
        return QBlocks(pack_nibbles(idx) if self.bits == 4 else idx, absmax)

    def decode(self, state, k: int):
        idx = state.codes
        if self.bits == 4:
            idx = unpack_nibbles(idx, self.block)
        vals = jnp.take(jnp.asarray(self.code), idx.astype(jnp.int32)) * state.absmax[:, None]
        return vals.reshape(k * self.block)

    def nbytes(self, shape) -> int:
        nb = self.n_units(shape)
        return nb * self._row_bytes() + 4 * nb


@dataclasses.dataclass(frozen=True, eq=False)
class Rank1Codec:
    """Rank-1 normalization (Li et al.) for non-negative tensors of rank >= 2: element
    ``(…, i, j)`` is divided by ``min(row_max[…, i], col_max[…, j])`` of its trailing
    matrix (leading axes, e.g. the stacked layers of a scanned model, index separate
    matrices), then rounded to the nearest code; 4-bit codes are packed two per byte
    within each matrix."""

    code: np.ndarray
    rows: int
    cols: int
    bits: int = 4

    def unit(self, shape) -> int:
        return self.rows * self.cols

    def n_units(self, shape) -> int:
        return math.prod(shape) // (self.rows * self.cols)

    def init(self, shape):
        L, R, C = self.n_units(shape), self.rows, self.cols
        top = len(self.code) - 1  # any code: the maxima start at 0, so all decode to 0
        fill = fill_byte(top, self.bits)
        return QRank1(jnp.full((L, -(-R * C * self.bits // 8)), fill, jnp.uint8),
                      jnp.zeros((L, R), jnp.float32), jnp.zeros((L, C), jnp.float32))

    def encode(self, flat, k: int):
        R, C = self.rows, self.cols
        x = flat.astype(jnp.float32).reshape(k, R, C)
        row = jnp.max(x, axis=2)
        col = jnp.max(x, axis=1)
        scale = jnp.minimum(row[:, :, None], col[:, None, :])
        idx = nearest_code(x / jnp.where(scale > 0, scale, 1.0), self.code).reshape(k, R * C)
        return QRank1(pack_nibbles(idx) if self.bits == 4 else idx, row, col)

    def decode(self, state, k: int):
        R, C = self.rows, self.cols
        idx = unpack_nibbles(state.codes, R * C) if self.bits == 4 else state.codes
        scale = jnp.minimum(state.row_max[:, :, None], state.col_max[:, None, :])
        vals = jnp.take(jnp.asarray(self.code), idx.astype(jnp.int32)).reshape(k, R, C) * scale
        return vals.reshape(k * R * C)

    def nbytes(self, shape) -> int:
        L, R, C = self.n_units(shape), self.rows, self.cols
        return L * (-(-R * C * self.bits // 8)) + 4 * L * (R + C)


# ---------------------------------------------------------------------------
# Which tensors keep float state
# ---------------------------------------------------------------------------


def compile_rules(rules: Any, argname: str = "fp32_state_rules") -> tuple:
    """Regexes (searched in paths like ``embed/embedding``) -> compiled patterns."""
    if isinstance(rules, str):
        rules = (rules,)
    out = []
    for r in rules or ():
        if not isinstance(r, str):
            raise TypeError(f"{argname}: expected regex strings, got {r!r}")
        try:
            out.append(re.compile(r))
        except re.error as e:
            raise ValueError(f"{argname}: the regex {r!r} does not compile ({e})") from None
    return tuple(out)


def check_min_size(value: Any, argname: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{argname} must be a non-negative int (element count), got {value!r}")
    return int(value)


def check_state_dtype(state_dtype: Any) -> str:
    try:
        dt = jnp.dtype(state_dtype)
    except TypeError:
        raise TypeError(f"state_dtype={state_dtype!r} is not a dtype; use 'float32' "
                        "(or 'bfloat16') for the unquantized small tensors") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"state_dtype={state_dtype!r} must be a floating dtype such as "
                        "'float32' (it stores the tensors kept unquantized)")
    return dt.name


# ---------------------------------------------------------------------------
# The quantized Adam core
# ---------------------------------------------------------------------------

Select = Callable[[str, tuple], tuple]  # (path, shape) -> (mu codec, nu codec)


class QuantizedAdamState(NamedTuple):
    """``count``: steps applied (int32); ``skipped``: steps skipped because a gradient
    was not finite (int32); ``mu``/``nu``: per-parameter codec states (params' tree)."""

    count: jax.Array
    skipped: jax.Array
    mu: Any
    nu: Any


def _leaves_with_paths(tree, who: str):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, x in flat:
        name = path_str(path)
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{who}: parameter {name!r} has dtype {dtype}; quantized Adam "
                            "needs floating-point params (train integer/quantized leaves "
                            "through memlab.passes.split_trainable or optax.masked)")
        out.append((name, tuple(x.shape), x))
    return out, treedef


def quantized_state_bytes(select: Select, params: Any, who: str) -> int:
    """Exact ``tree_bytes`` of :func:`quantized_adam`'s state, from shapes alone."""
    if isinstance(params, (int, np.integer)):
        raise TypeError(f"{who}: state bytes depend on each tensor's shape (blocks, padding, "
                        "small tensors kept in float); pass the params pytree "
                        "(arrays or jax.ShapeDtypeStruct), not a parameter count")
    leaves, _ = _leaves_with_paths(params, who)
    total = 8  # int32 count and skipped
    for name, shape, _ in leaves:
        mu_c, nu_c = select(name, shape)
        total += mu_c.nbytes(shape) + nu_c.nbytes(shape)
    return total


CHUNK_SIZE = 1 << 24  # elements updated at once (a few float32 temporaries of 64 MiB)


def _check_hparams(who, learning_rate, b1, b2, eps, weight_decay, chunk_size):
    for name, v in (("b1", b1), ("b2", b2)):
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
            raise ValueError(f"{who}: {name} must be a float in [0, 1), got {v!r}")
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"{who}: eps must be a non-negative float, got {eps!r}")
    if isinstance(weight_decay, bool) or not (isinstance(weight_decay, (int, float))
                                              and weight_decay >= 0):
        raise ValueError(f"{who}: weight_decay must be a non-negative float, got {weight_decay!r}")
    if not (callable(learning_rate) or (isinstance(learning_rate, (int, float))
                                        and not isinstance(learning_rate, bool))):
        raise TypeError(f"{who}: learning_rate must be a float or an optax schedule "
                        f"(count -> lr), got {learning_rate!r}")
    check_block_size(chunk_size, f"{who}: chunk_size")


def _units(tree, start, k):
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, k, 0), tree)


def _put_units(tree, piece, start):
    return jax.tree_util.tree_map(
        lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, start, 0), tree, piece)


def _chunk_units(n_units: int, max_units: int) -> int:
    """Units per chunk: the largest divisor of ``n_units`` up to ``max_units`` (the loop
    then has no remainder), or ``max_units`` when that divisor is under a quarter of it
    (a remainder chunk follows the loop)."""
    cap = min(n_units, max_units)
    best = max(d for k in range(1, math.isqrt(n_units) + 1) if n_units % k == 0
               for d in (k, n_units // k) if d <= cap)
    return best if 4 * best >= cap else cap


def _quantized_leaf(step, finite, mu_c, nu_c, shape, g, mu_s, nu_s, p, chunk_size):
    """One tensor's update over chunks of whole units, in a ``fori_loop`` that writes
    the moments and the update in place, so the float32 temporaries stay at a few
    chunks whatever the tensor size."""
    n = math.prod(shape)
    um, uv = mu_c.unit(shape), nu_c.unit(shape)
    unit = math.lcm(um, uv)
    n_units = n // unit  # whole units; a partial (padded) last block goes to the tail

    def piece(gf, pf, e0, length, mu_s, nu_s):
        km, kv = -(-length // um), -(-length // uv)
        mu_p = _units(mu_s, e0 // um, km)
        nu_p = _units(nu_s, e0 // uv, kv)
        g_p = jax.lax.dynamic_slice_in_dim(gf, e0, length)
        p_p = None if pf is None else jax.lax.dynamic_slice_in_dim(pf, e0, length)
        u, m, v = step(g_p, mu_c.decode(mu_p, km)[:length], nu_c.decode(nu_p, kv)[:length], p_p)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731  (bit-exact skip)
        return (u.astype(g.dtype), jax.tree_util.tree_map(keep, mu_c.encode(m, km), mu_p),
                jax.tree_util.tree_map(keep, nu_c.encode(v, kv), nu_p))

    gf = g.reshape(-1)
    pf = None if p is None else p.reshape(-1)
    if n <= chunk_size or n_units <= 1:
        u, mu_new, nu_new = piece(gf, pf, 0, n, mu_s, nu_s)
        return u.reshape(shape), mu_new, nu_new

    per = _chunk_units(n_units, max(1, chunk_size // unit))
    size = per * unit
    n_chunks = n_units // per
    tail = n - n_chunks * size

    def body(i, carry):
        u_buf, mu_s, nu_s, gf, pf = carry
        e0 = i * size
        u, mu_new, nu_new = piece(gf, pf, e0, size, mu_s, nu_s)
        u_buf = jax.lax.dynamic_update_slice_in_dim(u_buf, u, e0, 0)
        mu_s, nu_s = _put_units(mu_s, mu_new, e0 // um), _put_units(nu_s, nu_new, e0 // uv)
        # Carrying the inputs through a barrier makes them loop-variant, so XLA cannot
        # hoist a float32 cast of the whole gradient/param out of the loop.
        return jax.lax.optimization_barrier((u_buf, mu_s, nu_s, gf, pf))

    carry = (jnp.zeros((n,), g.dtype), mu_s, nu_s, gf, pf)
    u_buf, mu_s, nu_s, _, _ = jax.lax.fori_loop(0, n_chunks, body, carry)
    if tail:
        e0 = n_chunks * size
        u, mu_new, nu_new = piece(gf, pf, e0, tail, mu_s, nu_s)
        u_buf = jax.lax.dynamic_update_slice_in_dim(u_buf, u, e0, 0)
        mu_s, nu_s = _put_units(mu_s, mu_new, e0 // um), _put_units(nu_s, nu_new, e0 // uv)
    return u_buf.reshape(shape), mu_s, nu_s


def quantized_adam(select: Select, learning_rate: float | optax.Schedule, b1: float,
                   b2: float, eps: float, weight_decay: float, who: str,
                   chunk_size: int = CHUNK_SIZE) -> optax.GradientTransformation:
    """Adam(W) whose moments are stored by the codecs ``select(path, shape)`` picks.

    Each step dequantizes both moments to float32, applies the Adam update as
    ``optax.adamw`` does (bias correction, ``eps`` outside the square root, decoupled
    weight decay ``weight_decay * p``, then ``-learning_rate(count)``) and requantizes,
    ``chunk_size`` elements (rounded to whole quantization units) at a time.

    A step whose gradients contain NaN or Inf anywhere is skipped: every update is zero,
    the moments and ``count`` are left unchanged, and ``skipped`` counts it.
    """
    _check_hparams(who, learning_rate, b1, b2, eps, weight_decay, chunk_size)

    def init(params):
        leaves, treedef = _leaves_with_paths(params, who)
        mus, nus = [], []
        for name, shape, _ in leaves:
            mu_c, nu_c = select(name, shape)
            mus.append(mu_c.init(shape))
            nus.append(nu_c.init(shape))
        zero = jnp.zeros([], jnp.int32)
        return QuantizedAdamState(zero, zero, treedef.unflatten(mus), treedef.unflatten(nus))

    def update(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError(f"{who}: weight_decay={weight_decay} needs params: call "
                             "tx.update(grads, state, params)")
        leaves, treedef = _leaves_with_paths(updates, who)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        ps = treedef.flatten_up_to(params) if params is not None else [None] * len(leaves)
        finite = jnp.array(True)
        for _, _, g in leaves:  # g * 0 sums to NaN iff some entry is NaN/Inf; summed in
            zero = jnp.zeros((), g.dtype)  # g's own dtype (no full-size float32 copy)
            total = jax.lax.reduce(g * zero, zero, jax.lax.add, tuple(range(g.ndim)))
            finite = finite & jnp.isfinite(total)
        count_inc = optax.safe_increment(state.count)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        c1 = (1 - b1 ** count_inc).astype(jnp.float32)
        c2 = (1 - b2 ** count_inc).astype(jnp.float32)

        def step(g, m_old, v_old, p):
            """float32 Adam on one piece (zero update on a non-finite step)."""
            g = g.astype(jnp.float32)
            m = (1 - b1) * g + b1 * m_old
            v = (1 - b2) * (g * g) + b2 * v_old
            u = (m / c1) / (jnp.sqrt(v / c2) + eps)
            if weight_decay:
                u = u + weight_decay * p.astype(jnp.float32)
            return jnp.where(finite, -lr * u, 0.0), m, v

        new_u, new_mu, new_nu = [], [], []
        for (name, shape, g), mu_s, nu_s, p in zip(leaves, mus, nus, ps):
            mu_c, nu_c = select(name, shape)
            if isinstance(mu_c, FloatCodec):
                u, m, v = step(g, mu_s.astype(jnp.float32), nu_s.astype(jnp.float32), p)
                u = u.astype(g.dtype)
                m = jnp.where(finite, m.astype(mu_s.dtype), mu_s)
                v = jnp.where(finite, v.astype(nu_s.dtype), nu_s)
            else:
                u, m, v = _quantized_leaf(step, finite, mu_c, nu_c, shape, g, mu_s, nu_s, p,
                                          chunk_size)
            new_u.append(u)
            new_mu.append(m)
            new_nu.append(v)
        new_state = QuantizedAdamState(
            jnp.where(finite, count_inc, state.count),
            state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
            treedef.unflatten(new_mu), treedef.unflatten(new_nu))
        return treedef.unflatten(new_u), new_state

    return optax.GradientTransformation(init, update)


def float_rules_select(rules: Sequence[re.Pattern], min_size: int, state_dtype: str,
                       quantized: Callable[[tuple], tuple]) -> Select:
    """``select`` keeping float state for small tensors and rule matches, else
    ``quantized(shape)``."""
    fp = FloatCodec(state_dtype)

    def select(name: str, shape: tuple):
        if math.prod(shape) < min_size or any(r.search(name) for r in rules):
            return fp, fp
        return quantized(shape)

    return select
