"""Bit packing of unsigned integer codes into uint8: the one layout memlab stores.

Every packed array in memlab -- quantized weights (``memlab.quant``), quantized
KV caches (``memlab.kv``: KIVI, KVQuant, GEAR, Palu), 4-bit optimizer states
(``memlab.optim``) and the Pallas kernels that read them (``dequant_matmul``,
``quantized_kv_decode``) -- uses this layout, so checkpoints and kernels agree:

**a little-endian bit stream along one axis.**  Code ``i`` (``0 <= code < 2**bits``)
along the packed axis occupies stream bits ``[i*bits, (i+1)*bits)``, and stream
bit ``8*j + t`` is bit ``t`` of byte ``j``.  For ``bits`` dividing 8 byte ``j``
holds codes ``j*P .. j*P+P-1`` (``P = 8 // bits``), the first in the low bits;
for 3 bits every 8 codes fill 3 bytes.  In general a *chunk* of
``8 // gcd(8, bits)`` codes fills ``bits // gcd(8, bits)`` whole bytes, so the
packed axis must be a multiple of the chunk (or is padded with zero codes,
``pad=True``).

Array-level functions (:func:`pack_bits`, :func:`unpack_bits`) build each output
byte from the (at most two) codes overlapping it with uint8 shifts, so no wider
temporaries are created.  The in-kernel helpers (:func:`code_planes`,
:func:`unpack_tile`) decode a packed tile inside a Pallas kernel body with
int32 shifts and broadcasts, which Triton and Mosaic both lower.

Nothing here knows about memlab: ``memlab`` imports this module, never the
other way round.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["chunk", "check_bits", "packed_length", "fill_byte", "pack_bits", "unpack_bits",
           "code_plane", "code_planes", "unpack_tile"]


def check_bits(bits, allowed=tuple(range(1, 9)), name: str = "bits") -> int:
    """``bits`` as an int, or a ValueError naming ``name`` and the allowed widths."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in allowed:
        raise ValueError(f"{name}={bits!r} is not one of {tuple(allowed)}; pass one of those "
                         "code widths.")
    return int(bits)


def chunk(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of one packing chunk: ``8 // gcd(8, bits)`` codes fill
    ``bits // gcd(8, bits)`` bytes (1 code / 1 byte for 8 bits, 2 / 1 for 4, 8 / 3 for 3)."""
    g = math.gcd(8, bits)
    return 8 // g, bits // g


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take along the packed axis (padded to a chunk)."""
    per, nb = chunk(bits)
    return -(-n // per) * nb


def fill_byte(code: int, bits: int) -> int:
    """The byte a run of equal ``bits``-bit codes packs to (``bits`` dividing 8), e.g.
    for filling a packed array with one code: ``jnp.full(shape, fill_byte(c, 4), jnp.uint8)``."""
    if 8 % bits:
        raise ValueError(f"fill_byte: bits={bits} does not divide 8; a run of {bits}-bit codes "
                         "does not repeat every byte.")
    if not 0 <= code < 2 ** bits:
        raise ValueError(f"fill_byte: code={code} does not fit in {bits} bits.")
    return sum(int(code) << (i * bits) for i in range(8 // bits))


def _byte_sources(bits: int):
    """For each byte ``b`` of a chunk, ``(code index, left shift)`` of every code overlapping it.

    Code ``i`` starts at stream bit ``i*bits``; relative to byte ``b`` it is shifted
    left by ``i*bits - 8*b`` (a negative shift is a right shift)."""
    per, nb = chunk(bits)
    return [[(i, i * bits - 8 * b) for i in range(per)
             if i * bits < 8 * (b + 1) and (i + 1) * bits > 8 * b] for b in range(nb)]


def _shift(x, s: int):
    """``x << s`` for ``s >= 0``, ``x >> -s`` otherwise (uint8; bits above 8 drop)."""
    if s > 0:
        return x << np.uint8(s)
    if s < 0:
        return x >> np.uint8(-s)
    return x


def _axis(a, axis: int, fn: str) -> int:
    if not -a.ndim <= axis < max(a.ndim, 1):
        raise ValueError(f"{fn}: axis={axis} is out of range for an array of shape "
                         f"{tuple(a.shape)}; pass an axis in [-{a.ndim}, {a.ndim}).")
    return axis % a.ndim


def _split(a, axis: int, parts: int):
    """``[..., n, ...]`` -> ``[..., n // parts, parts, ...]`` at ``axis``."""
    return a.reshape(*a.shape[:axis], a.shape[axis] // parts, parts, *a.shape[axis + 1:])


def _merge(parts, axis: int):
    """Interleave ``parts`` (each ``[..., m, ...]``) along ``axis``: ``[..., m * len, ...]``."""
    if len(parts) == 1:
        return parts[0]
    st = jnp.stack(parts, axis=axis + 1)
    return st.reshape(*st.shape[:axis], st.shape[axis] * len(parts), *st.shape[axis + 2:])


def pack_bits(codes, bits: int, axis: int = -1, *, pad: bool = False) -> jax.Array:
    """Pack unsigned codes (each ``< 2**bits``) into uint8 along ``axis`` (see the module doc).

    ``codes [..., n, ...]`` -> uint8 ``[..., n * bits / 8, ...]``.  ``n`` must be a
    multiple of the chunk ``8 // gcd(8, bits)``; with ``pad=True`` the axis is first
    padded with zero codes to the next multiple (:func:`unpack_bits` with ``n=`` cuts
    them off).  Codes are not range-checked: bits above ``bits`` are undefined.
    """
    bits = check_bits(bits)
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer) and codes.dtype != jnp.bool_:
        raise TypeError(f"pack_bits: codes must be an unsigned integer array, got {codes.dtype}; "
                        "round and cast with .astype(jnp.uint8) first.")
    if codes.ndim == 0:
        raise ValueError("pack_bits: codes is a scalar; pass an array with the axis to pack.")
    axis = _axis(codes, axis, "pack_bits")
    per, _ = chunk(bits)
    codes = codes.astype(jnp.uint8)
    n = codes.shape[axis]
    if n % per:
        if not pad:
            raise ValueError(
                f"pack_bits: {n} codes of {bits} bits along axis {axis} do not fill whole "
                f"bytes; the axis must be a multiple of {per} (or pass pad=True).")
        widths = [(0, 0)] * codes.ndim
        widths[axis] = (0, per - n % per)
        codes = jnp.pad(codes, widths)
    if per == 1:
        return codes
    c = _split(codes, axis, per)
    code = [lax.index_in_dim(c, i, axis + 1, keepdims=False) for i in range(per)]
    out = []
    for sources in _byte_sources(bits):
        byte = None
        for i, s in sources:
            v = _shift(code[i], s)
            byte = v if byte is None else byte | v
        out.append(byte)
    return _merge(out, axis)


def unpack_bits(packed, bits: int, axis: int = -1, *, n: int | None = None) -> jax.Array:
    """Inverse of :func:`pack_bits`: uint8 ``[..., m, ...]`` -> codes ``[..., m * 8 / bits, ...]``.

    ``n``: keep only the first ``n`` codes along ``axis`` (drops :func:`pack_bits`'s
    ``pad=True`` padding).
    """
    bits = check_bits(bits)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack_bits: packed must be uint8 (from pack_bits), got {packed.dtype}.")
    if packed.ndim == 0:
        raise ValueError("unpack_bits: packed is a scalar; pass an array with the packed axis.")
    axis = _axis(packed, axis, "unpack_bits")
    per, nb = chunk(bits)
    m = packed.shape[axis]
    if m % nb:
        raise ValueError(f"unpack_bits: {m} bytes along axis {axis} are not whole chunks of "
                         f"{nb} bytes for {bits}-bit codes; was it packed with {bits} bits?")
    if per == 1:
        out = packed
    else:
        if nb == 1:
            byte = [packed]
        else:
            p = _split(packed, axis, nb)
            byte = [lax.index_in_dim(p, b, axis + 1, keepdims=False) for b in range(nb)]
        mask = np.uint8(2 ** bits - 1)
        sources = _byte_sources(bits)
        codes = []
        for i in range(per):
            code = None
            for b in range(nb):
                for j, s in sources[b]:
                    if j == i:
                        v = _shift(byte[b], -s)
                        code = v if code is None else code | v
            codes.append(code & mask)
        out = _merge(codes, axis)
    if n is not None:
        if not 0 <= n <= out.shape[axis]:
            raise ValueError(f"unpack_bits: n={n} is outside [0, {out.shape[axis]}], the codes "
                             "this packed array holds.")
        out = lax.slice_in_dim(out, 0, n, axis=axis)
    return out


# ---- inside kernel bodies ----------------------------------------------------------------
def code_plane(packed, bits: int, j: int):
    """Plane ``j`` of a packed tile as int32 (``bits`` dividing 8): every byte's ``j``-th
    code, ``(byte >> j*bits) & mask`` -- the codes at positions ``j, j+P, j+2P, ...``
    of the packed axis (``P = 8 // bits``)."""
    p = packed.astype(jnp.int32)
    mask = 2 ** bits - 1
    return p & mask if j == 0 else (p >> (j * bits)) & mask


def code_planes(packed, bits: int) -> tuple:
    """The ``8 // bits`` code planes of a packed tile, as int32 (``bits`` dividing 8).

    Plane ``j`` holds, for every byte, its ``j``-th code (``(byte >> j*bits) & mask``):
    the codes at positions ``j, j+P, j+2P, ...`` of the packed axis.  For use inside a
    kernel, where keeping the planes apart avoids interleaving them in registers.
    """
    p = packed.astype(jnp.int32)
    return tuple(code_plane(p, bits, j) for j in range(8 // bits))


def unpack_tile(packed, bits: int, axis: int) -> jax.Array:
    """A packed 2-D tile -> its int32 codes in order along ``axis`` (0 or 1; ``bits`` dividing 8).

    ``axis=0``: ``[n, D]`` -> ``[n*P, D]``; ``axis=1``: ``[n, D/P]`` -> ``[n, D]``.
    Written as a broadcast, a shift by ``arange(P) * bits`` and a reshape, which Triton
    and Mosaic lower inside a kernel body.
    """
    per = 8 // bits
    c = packed.astype(jnp.int32)
    if per == 1:
        return c
    n, m = c.shape
    if axis == 0:
        shifts = jnp.arange(per, dtype=jnp.int32)[None, :, None] * bits
        codes = (jnp.broadcast_to(c[:, None, :], (n, per, m)) >> shifts) & (2 ** bits - 1)
        return codes.reshape(n * per, m)
    shifts = jnp.arange(per, dtype=jnp.int32)[None, None, :] * bits
    codes = (jnp.broadcast_to(c[:, :, None], (n, m, per)) >> shifts) & (2 ** bits - 1)
    return codes.reshape(n, m * per)
