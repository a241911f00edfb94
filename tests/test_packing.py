"""The one bit-packing layout (memlab_kernels._packing) against a per-bit numpy reference.

The reference writes every code's bits one by one into a little-endian bit
stream (stream bit ``8*j + t`` is bit ``t`` of byte ``j``), so it shares no
arithmetic with the implementation.  Every packer memlab exposes (weights, KV
caches, optimizer states, the kernels' own helpers) is checked against it, which
pins the stored layout byte for byte.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlab_kernels import _packing as pk

BITS_IN_USE = (2, 3, 4, 8)


def ref_pack(codes, bits, axis):
    """Per-element bit arithmetic: code ``i`` -> stream bits ``[i*bits, (i+1)*bits)``."""
    c = np.moveaxis(np.asarray(codes, np.int64), axis, -1)
    n = c.shape[-1]
    per = 8 // np.gcd(8, bits)
    n_pad = -(-n // per) * per
    out = np.zeros(c.shape[:-1] + (n_pad * bits // 8,), np.int64)
    for i in range(n):
        for t in range(bits):
            pos = i * bits + t
            out[..., pos // 8] |= ((c[..., i] >> t) & 1) << (pos % 8)
    return np.moveaxis(out.astype(np.uint8), -1, axis)


def ref_unpack(packed, bits, axis, n):
    p = np.moveaxis(np.asarray(packed, np.int64), axis, -1)
    out = np.zeros(p.shape[:-1] + (n,), np.int64)
    for i in range(n):
        for t in range(bits):
            pos = i * bits + t
            out[..., i] |= ((p[..., pos // 8] >> (pos % 8)) & 1) << t
    return np.moveaxis(out.astype(np.uint8), -1, axis)


def _codes(rng, shape, bits):
    return rng.integers(0, 2 ** bits, size=shape).astype(np.uint8)


def test_reference_golden_bytes():
    """The reference itself on hand-computed bytes (3-bit: 8 codes -> 3 bytes)."""
    word = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    want = [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]
    np.testing.assert_array_equal(ref_pack([[1, 2, 3, 4, 5, 6, 7, 0]], 3, -1)[0], want)
    np.testing.assert_array_equal(ref_pack([[0x3, 0xA]], 4, -1)[0], [0xA3])
    np.testing.assert_array_equal(ref_pack([[1, 2, 3, 0]], 2, -1)[0], [0b00111001])
    got = pk.pack_bits(jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 0]], jnp.uint8), 3)
    np.testing.assert_array_equal(np.asarray(got)[0], want)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_pack_matches_reference_and_round_trips(bits, axis):
    rng = np.random.default_rng(bits * 10 + axis)
    per = 8 // np.gcd(8, bits)
    shape = [3, 5, 2]
    shape[axis] = 2 * per
    codes = _codes(rng, shape, bits)
    packed = pk.pack_bits(jnp.asarray(codes), bits, axis)
    assert packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(packed), ref_pack(codes, bits, axis))
    back = pk.unpack_bits(packed, bits, axis)
    np.testing.assert_array_equal(np.asarray(back), codes)
    np.testing.assert_array_equal(np.asarray(back),
                                  ref_unpack(np.asarray(packed), bits, axis, codes.shape[axis]))


@pytest.mark.parametrize("bits", BITS_IN_USE)
@pytest.mark.parametrize("n", [1, 5, 7, 13])
def test_odd_lengths_pad_and_cut(bits, n):
    rng = np.random.default_rng(100 + bits * n)
    codes = _codes(rng, (2, n), bits)
    per = 8 // np.gcd(8, bits)
    if n % per:
        with pytest.raises(ValueError, match="pad=True"):
            pk.pack_bits(jnp.asarray(codes), bits)
    packed = jax.jit(lambda c: pk.pack_bits(c, bits, pad=True))(jnp.asarray(codes))
    assert packed.shape[-1] == pk.packed_length(n, bits)
    np.testing.assert_array_equal(np.asarray(packed), ref_pack(codes, bits, -1))
    back = pk.unpack_bits(packed, bits, n=n)
    np.testing.assert_array_equal(np.asarray(back), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernel_tile_helpers(bits):
    """code_planes / unpack_tile (inside kernel bodies) decode the same layout."""
    rng = np.random.default_rng(bits)
    per = 8 // bits
    rows = _codes(rng, (4 * per, 6), bits)            # packed along axis 0
    p0 = ref_pack(rows, bits, 0)
    np.testing.assert_array_equal(np.asarray(pk.unpack_tile(jnp.asarray(p0), bits, 0)), rows)
    for j, plane in enumerate(pk.code_planes(jnp.asarray(p0), bits)):
        assert plane.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(plane), rows[j::per])
    cols = _codes(rng, (5, 4 * per), bits)            # packed along axis 1
    p1 = ref_pack(cols, bits, 1)
    np.testing.assert_array_equal(np.asarray(pk.unpack_tile(jnp.asarray(p1), bits, 1)), cols)


def test_every_memlab_packer_is_this_layout():
    """Weights, KV caches, optimizer states and kernels all store the reference layout."""
    from memlab.kv import _quant_utils, kivi, kvquant
    from memlab.optim import _blockwise
    from memlab.quant import formats
    from memlab_kernels import dequant_matmul
    rng = np.random.default_rng(0)
    for bits in BITS_IN_USE:
        c = _codes(rng, (24, 5), bits)
        np.testing.assert_array_equal(np.asarray(formats.pack(jnp.asarray(c), bits)),
                                      ref_pack(c, bits, 0))
        np.testing.assert_array_equal(np.asarray(formats.unpack(jnp.asarray(ref_pack(c, bits, 0)),
                                                                bits)), c)
        np.testing.assert_array_equal(np.asarray(kivi.pack_bits(jnp.asarray(c.T), bits)),
                                      ref_pack(c.T, bits, -1))
        np.testing.assert_array_equal(np.asarray(kvquant.unpack_bits(
            jnp.asarray(ref_pack(c.T, bits, -1)), bits)), c.T)
    for bits in (2, 4, 8):
        c = _codes(rng, (2, 8, 4), bits)
        for axis in (1, 2):
            want = ref_pack(c, bits, axis)
            np.testing.assert_array_equal(np.asarray(_quant_utils.pack(jnp.asarray(c), axis, bits)),
                                          want)
            np.testing.assert_array_equal(
                np.asarray(_quant_utils.unpack(jnp.asarray(want), axis, bits)), c)
    c = _codes(rng, (3, 7), 4)                        # odd: padded by one zero code
    np.testing.assert_array_equal(np.asarray(_blockwise.pack_nibbles(jnp.asarray(c))),
                                  ref_pack(c, 4, -1))
    np.testing.assert_array_equal(
        np.asarray(_blockwise.unpack_nibbles(jnp.asarray(ref_pack(c, 4, -1)), 7)), c)
    c = _codes(rng, (6, 4), 4)
    np.testing.assert_array_equal(np.asarray(dequant_matmul.pack_int4(jnp.asarray(c))),
                                  ref_pack(c, 4, 0))
    np.testing.assert_array_equal(
        np.asarray(dequant_matmul.unpack_int4(jnp.asarray(ref_pack(c, 4, 0)))), c)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fill_byte_is_a_packed_run(bits):
    for code in {0, 1, 2 ** bits - 1}:
        run = np.full((1, 8 // bits), code, np.uint8)
        assert pk.fill_byte(code, bits) == int(ref_pack(run, bits, -1)[0, 0])


def test_bad_input_errors_name_the_argument():
    from memlab.quant import formats
    with pytest.raises(ValueError, match="bits=9"):
        pk.pack_bits(jnp.zeros((8,), jnp.uint8), 9)
    with pytest.raises(TypeError, match="astype"):
        pk.pack_bits(jnp.zeros((8,), jnp.float32), 4)
    with pytest.raises(TypeError, match="uint8"):
        pk.unpack_bits(jnp.zeros((4,), jnp.int32), 4)
    with pytest.raises(ValueError, match="axis=3"):
        pk.pack_bits(jnp.zeros((8, 2), jnp.uint8), 4, axis=3)
    with pytest.raises(ValueError, match="whole chunks"):
        pk.unpack_bits(jnp.zeros((4,), jnp.uint8), 3)
    with pytest.raises(ValueError, match="n=9"):
        pk.unpack_bits(jnp.zeros((4,), jnp.uint8), 4, n=9)
    with pytest.raises(ValueError, match="pack: bits=5"):
        formats.pack(jnp.zeros((8, 2), jnp.uint8), 5)
    with pytest.raises(ValueError, match="bits=3 does not divide 8"):
        pk.fill_byte(1, 3)
