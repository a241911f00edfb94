"""The kernels' shared plumbing (memlab_kernels._common): one backend vocabulary and
the helpers every kernel uses, checked against hand-written expectations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from memlab_kernels import _common as C


@pytest.mark.parametrize("name,want", [
    ("triton", "triton"), ("mosaic_tpu", "mosaic_tpu"), ("interpret", "interpret"),
    ("xla", "xla"), ("pallas_triton", "triton"), ("pallas_tpu", "mosaic_tpu"),
    ("pallas_interpret", "interpret")])
def test_aliases_resolve_to_one_vocabulary(name, want):
    assert C.canonical_backend(name) == want
    assert C.resolve_backend(name, platform="gpu") == want
    assert C.canonical_backend(C.IMPL_NAMES[want]) == want     # memlab's layer name round-trips


@pytest.mark.parametrize("platform,want", [("gpu", "triton"), ("cuda", "triton"),
                                           ("tpu", "mosaic_tpu"), ("cpu", "xla"),
                                           ("metal", "xla")])
def test_auto_follows_the_platform(platform, want):
    assert C.resolve_backend("auto", platform=platform) == want
    assert C.resolve_backend("pallas_interpret", platform=platform) == "interpret"


def test_auto_defaults_to_this_process():
    assert C.resolve_backend("auto") == C.PLATFORM_BACKENDS.get(jax.default_backend(), "xla")


def test_pallas_lowering():
    assert C.pallas_lowering("xla") == ("xla", False)
    assert C.pallas_lowering("interpret", False) == ("triton", True)
    assert C.pallas_lowering("triton") == ("triton", False)
    assert C.pallas_lowering("pallas_triton", 1) == ("triton", True)
    assert C.pallas_lowering("mosaic_tpu", None) == ("mosaic", False)
    kernel, interp = C.pallas_lowering("pallas_tpu", True)
    assert kernel == "mosaic" and isinstance(interp, pltpu.InterpretParams)
    params = pltpu.InterpretParams(detect_races=True)
    assert C.pallas_lowering("mosaic_tpu", params) == ("mosaic", params)


def test_unknown_backend_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of .*pallas_triton"):
        C.resolve_backend("cuda")
    with pytest.raises(ValueError, match="kernel_mode='fast'"):
        C.canonical_backend("fast", "kernel_mode")


def test_kernel_mode_speaks_the_same_vocabulary():
    import memlab as ml
    for mode, want in [("pallas_interpret", "interpret"), ("interpret", "interpret"),
                       ("xla", None), ("pallas_triton", "triton")]:
        with ml.quant.kernel_mode(mode):
            assert ml.quant.kernel_backend() == want
    with ml.dispatch.lowering_for("tpu"):
        assert ml.quant.kernel_backend() == "mosaic_tpu"


def test_checks_and_helpers():
    assert C.is_concrete(jnp.ones(2))

    @jax.jit
    def traced(x):
        assert not C.is_concrete(x) and C.host_value(x) is None
        return x
    traced(jnp.ones(2))
    np.testing.assert_array_equal(C.host_value(jnp.arange(3)), [0, 1, 2])
    assert C.check_positive_int("block_k", np.int32(4)) == 4
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="block_k=.* must be a positive int; pass e.g. "
                                             "BlockSizes"):
            C.check_positive_int("block_k", bad, "BlockSizes(block_k=128)")
    C.check_float("q", jnp.ones(2, jnp.bfloat16), "fn")
    with pytest.raises(TypeError, match="fn: q has dtype int32"):
        C.check_float("q", jnp.ones(2, jnp.int32), "fn")
    assert C.precision_for(jnp.float32) == jax.lax.Precision.HIGHEST
    assert C.precision_for(jnp.bfloat16) is None
    assert C.acc_dtype(jnp.float16) == jnp.float32
    assert C.nbytes(jnp.ones((3, 4), jnp.bfloat16), None, jnp.ones(2)) == 3 * 4 * 2 + 2 * 4


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_dot_against_float64(trans_a, trans_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 3) if trans_a else (3, 5)).astype(np.float32)
    b = rng.standard_normal((4, 5) if trans_b else (5, 4)).astype(np.float32)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    got = C.dot(jnp.asarray(a), jnp.asarray(b), C.precision_for(jnp.float32),
                trans_a=trans_a, trans_b=trans_b)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
