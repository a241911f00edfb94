"""The gated linear unit's custom VJP (memlab.models.llama.gated) against plain autodiff of
``act(gate) * up`` in float64, for SwiGLU and GeGLU, on odd shapes."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlab.models.llama import gated

ACTS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


@pytest.mark.parametrize("act", sorted(ACTS))
def test_gated_vjp_equals_autodiff_of_the_product(act):
    rng = np.random.default_rng(5)
    g, u, dh = (jnp.asarray(rng.standard_normal((7, 13)) * 3, jnp.float32) for _ in range(3))
    out, vjp = jax.vjp(lambda a, b: gated(a, b, act), g, u)
    with jax.enable_x64():
        g64, u64, dh64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (g, u, dh))
        ref, ref_vjp = jax.vjp(lambda a, b: ACTS[act](a) * b, g64, u64)
        want = ref_vjp(dh64)
    chex.assert_trees_all_close(out, np.asarray(ref, np.float32), rtol=1e-5, atol=1e-5)
    got = vjp(dh)
    for x, w in zip(got, want):
        chex.assert_trees_all_close(x, np.asarray(w, np.float32), rtol=1e-4, atol=5e-5)
        assert float(jnp.abs(x).max()) > 1e-2


def test_gated_gradients_keep_bfloat16_inputs_bfloat16():
    rng = np.random.default_rng(6)
    g, u, dh = (jnp.asarray(rng.standard_normal((4, 6)), jnp.bfloat16) for _ in range(3))
    dg, du = jax.vjp(lambda a, b: gated(a, b, "silu"), g, u)[1](dh)
    assert dg.dtype == du.dtype == jnp.bfloat16
    want = jax.vjp(lambda a, b: jax.nn.silu(a) * b, *(x.astype(jnp.float32) for x in (g, u)))[1](
        dh.astype(jnp.float32))
    for x, w in zip((dg, du), want):
        chex.assert_trees_all_close(x.astype(jnp.float32), w, rtol=3e-2, atol=3e-2)
