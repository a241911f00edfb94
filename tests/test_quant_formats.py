"""Weight formats: packing, dequantization vs independent numpy code, exact bits."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memlab as ml
from memlab.quant import formats as F


def _w(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _np_unpack(packed, bits):
    """Independent unpacking: walk the bit stream element by element."""
    packed = np.asarray(packed, np.uint8)
    rows, n = packed.shape
    if bits == 3:
        k = rows // 3 * 8
        out = np.zeros((k, n), np.uint8)
        for r in range(k):
            bit = (r // 8) * 24 + (r % 8) * 3
            for j in range(3):
                b = bit + j
                out[r] |= ((packed[b // 8] >> (b % 8)) & 1) << j
        return out
    per = 8 // bits
    out = np.zeros((rows * per, n), np.uint8)
    for r in range(rows * per):
        out[r] = (packed[r // per] >> (bits * (r % per))) & ((1 << bits) - 1)
    return out


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), groups=st.integers(1, 4), n=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_pack_roundtrip_and_layout(bits, groups, n, seed):
    k = groups * 8
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (k, n)).astype(np.uint8)
    packed = F.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (k * bits // 8, n)  # real storage
    np.testing.assert_array_equal(np.asarray(F.unpack(packed, bits)), codes)
    np.testing.assert_array_equal(_np_unpack(packed, bits), codes)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 64, True), (3, 64, False),
                                            (2, 32, False), (8, 64, False)])
def test_intn_matches_float64_reference(bits, group, sym):
    w = _w(bits * 10 + group, (2, 192, 40))
    q = F.IntN(bits, group, sym).quantize(jnp.asarray(w))
    codes = np.stack([_np_unpack(q["data"][i], bits) for i in range(2)]).astype(np.float64)
    scale = np.asarray(q["scale"], np.float64)
    zero = (1 << (bits - 1)) if sym else np.asarray(q["zero"], np.float64)[:, :, None, :]
    ref = ((codes.reshape(2, 192 // group, group, 40) - zero) * scale[:, :, None, :]).reshape(w.shape)
    got = np.asarray(q.dequantize(), np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # round to nearest: error at most half a step (plus clipping at the symmetric edge)
    step = np.repeat(scale, group, axis=1)
    assert np.all(np.abs(got - w) <= 0.5 * step + 1e-5) or sym
    assert q.nbytes == w.size * bits // 8 + scale.size * 4 + (0 if sym else scale.size)


def test_int8_per_channel():
    w = _w(1, (96, 33))
    q = ml.quant.int8().quantize(jnp.asarray(w))
    scale = np.abs(w).max(0) / 127
    ref = np.clip(np.round(w / scale), -127, 127) * scale
    np.testing.assert_allclose(np.asarray(q.dequantize(), np.float64), ref, rtol=1e-5, atol=1e-6)
    assert q["data"].dtype == jnp.int8


def test_nf4_levels_lookup_and_qlora_bits():
    w = _w(2, (1024, 1024))
    fmt = ml.quant.nf4(block=64, double_quant=True)
    q = fmt.quantize(jnp.asarray(w))
    # bits per parameter: 4 + 8/64 + 32/(64*256) = 4.127 (QLoRA), plus one fp32 mean per tensor
    assert round(q.bits_per_param(), 3) == 4.127
    assert q.nbytes == 1024 * 1024 // 2 + 1024 * 1024 // 64 + 4 * (1024 * 1024 // 64 // 256) + 4
    no_dq = ml.quant.nf4(block=64, double_quant=False).quantize(jnp.asarray(w))
    assert round(no_dq.bits_per_param(), 3) == 4.5
    # dequantize independently: nearest NF4 level of w / block absmax
    levels = np.asarray(F.NF4_LEVELS)
    wb = w.reshape(16, 64, 1024)
    absmax = np.abs(wb).max(1, keepdims=True)
    ref = levels[np.abs(wb / absmax - levels[:, None, None, None]).argmin(0)] * absmax
    np.testing.assert_allclose(np.asarray(no_dq.dequantize()), ref.reshape(w.shape), atol=1e-6)
    # double quantization of the absmax costs almost nothing
    got = np.asarray(q.dequantize())
    assert np.abs(got - ref.reshape(w.shape)).max() < 0.01 * np.abs(w).max()


def test_nf4_beats_absmax_int4_on_normal_weights():
    """QLoRA's claim in direction: NF4 is information-theoretically suited to normal weights."""
    w = jnp.asarray(_w(3, (512, 256)))
    err = lambda fmt: float(jnp.mean((fmt.quantize(w).dequantize() - w) ** 2))  # noqa: E731
    assert err(ml.quant.nf4(64, False)) < err(ml.quant.int4(64, symmetric=True))


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
def test_fp8_matches_ml_dtypes_rounding(variant):
    import ml_dtypes
    w = _w(4, (64, 24))
    q = ml.quant.fp8(variant).quantize(jnp.asarray(w))
    dt, fmax = {"e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "e5m2": (ml_dtypes.float8_e5m2, 57344.0)}[variant]
    scale = (np.abs(w).max(0) / fmax).astype(np.float32)
    ref = (w / scale).astype(dt).astype(np.float64) * scale
    np.testing.assert_allclose(np.asarray(q.dequantize(), np.float64), ref, rtol=1e-6)
    assert q.nbytes == w.size + 24 * 4


def test_fp4_e2m1_levels_and_packing():
    assert F.fp4_levels_match_ml_dtypes()
    w = _w(5, (64, 10))
    q = ml.quant.fp4(group=32).quantize(jnp.asarray(w))
    levels = np.asarray(F.FP4_E2M1_LEVELS[:8])
    wg = w.reshape(2, 32, 10)
    scale = np.abs(wg).max(1, keepdims=True) / 6
    mag = levels[np.abs(np.abs(wg) / scale - levels[:, None, None, None]).argmin(0)]
    ref = (np.sign(wg) * mag * scale).reshape(w.shape)
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref, atol=1e-6)
    assert q.nbytes == w.size // 2 + 2 * 10 * 4


def test_bad_format_arguments():
    with pytest.raises(ValueError, match="group size 48 does not divide the input dimension K=64"):
        ml.quant.int4(48).quantize(jnp.ones((64, 8)))
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        ml.quant.intn(5)
    with pytest.raises(ValueError, match="needs a \\[..., K, N\\] kernel"):
        ml.quant.int8().quantize(jnp.ones((8,)))
    with pytest.raises(ValueError, match="must be floating point"):
        ml.quant.int8().quantize(jnp.ones((8, 8), jnp.int32))
    with pytest.raises(ValueError, match="variant 'e3m4'"):
        ml.quant.fp8("e3m4")


def test_orbax_roundtrip_is_bit_exact(tmp_path, tiny):
    q = ml.passes.quantize(ml.quant.nf4(block=16), rules={"lm_head": ml.quant.int4(32)})(tiny)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "q", q.params)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "q", jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), q.params))
    chex.assert_trees_all_equal(restored, q.params)
    chex.assert_trees_all_equal_dtypes(restored, q.params)


def test_all_zero_groups_and_non_finite_weights():
    w = _w(8, (128, 16))
    w[:64, 3] = 0.0  # an all-zero group for every group size <= 64
    for fmt in (ml.quant.int4(64), ml.quant.int4(64, True), ml.quant.nf4(64), ml.quant.int8(),
                ml.quant.fp8(), ml.quant.fp4(32), ml.quant.intn(3, 64)):
        q = fmt.quantize(jnp.asarray(w))
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(q)
                   if jnp.issubdtype(a.dtype, jnp.floating)), fmt.name
        np.testing.assert_array_equal(np.asarray(q.dequantize())[:64, 3], 0.0)
    w[5, 5] = np.nan
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        ml.quant.int4(64).quantize(jnp.asarray(w))


def test_checkpoint_restore_checks_formats(tmp_path, tiny):
    q = ml.passes.quantize(ml.quant.nf4(block=16))(tiny)
    ml.quant.checkpoint.save(tmp_path / "ck", q.params)
    restored = ml.quant.checkpoint.restore(tmp_path / "ck", q.params)
    chex.assert_trees_all_equal(restored, q.params)
    other = ml.passes.quantize(ml.quant.int4(16))(tiny)
    with pytest.raises(ValueError, match="stores 'embed/embedding'|stores 'layers/.*' as nf4-b16-dq "
                                         "but the target expects int4-g16-asym"):
        ml.quant.checkpoint.restore(tmp_path / "ck", other.params)
    with pytest.raises(ValueError, match="not a memlab quantized checkpoint"):
        ml.quant.checkpoint.restore(tmp_path, q.params)


ALL_FORMATS = [ml.quant.int8(), ml.quant.intn(2, 32), ml.quant.intn(3, 32, True), ml.quant.int4(32),
               ml.quant.int4(32, True), ml.quant.intn(8, 32), ml.quant.nf4(32), ml.quant.nf4(32, False),
               ml.quant.fp8("e4m3"), ml.quant.fp8("e5m2"), ml.quant.fp4(32), ml.quant.w8a8(),
               ml.quant.llm_int8()]


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_every_format_roundtrips_bit_exactly_through_orbax(tmp_path, fmt):
    q = fmt.quantize(jnp.asarray(_w(13, (2, 64, 24))))
    ml.quant.checkpoint.save(tmp_path / "ck", {"w": q})
    back = ml.quant.checkpoint.restore(tmp_path / "ck", {"w": q})["w"]
    chex.assert_trees_all_equal(back, q)
    chex.assert_trees_all_equal_dtypes(back, q)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))
