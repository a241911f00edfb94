"""Memory profiler: XLA memory_analysis beside exact pytree bytes and the formulas."""
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.memory import array_bytes, tree_bytes


def test_tree_bytes_counts_sub_byte_dtypes_packed():
    rng = np.random.default_rng(0)
    shape = tuple(int(s) for s in rng.integers(1, 9, 3))
    n = int(np.prod(shape))
    tree = {"f32": jnp.ones(shape, jnp.float32), "bf16": jax.ShapeDtypeStruct(shape, jnp.bfloat16),
            "i4": jnp.ones(shape, jnp.int4), "u2": jax.ShapeDtypeStruct(shape, jnp.uint2),
            "fp4": jax.ShapeDtypeStruct(shape, jnp.float4_e2m1fn), "none": None}
    expect = 4 * n + 2 * n + -(-n * 4 // 8) + -(-n * 2 // 8) + -(-n * 4 // 8)
    assert tree_bytes(tree) == expect
    assert array_bytes(jnp.ones((7, 3), jnp.int4)) == 11  # 21 nibbles -> 11 bytes


def test_train_profile_categories_match_formula_and_peak_identity(tiny):
    r = ml.memory.profile(tiny, "train", batch=2, seq=24)
    n = tiny.spec.param_count()
    assert r.by_category["params"] == r.analytic["params"] == 4 * n
    assert r.by_category["optimizer_state"] == r.analytic["optimizer_state"] == 8 * n + 4
    assert r.by_category["inputs"] == 2 * 25 * 4
    # params and optimizer state are donated: XLA aliases exactly those bytes
    assert r.alias_bytes == r.by_category["params"] + r.by_category["optimizer_state"]
    # ... and the arguments add the tokens and the train step's uint32[2] RNG key
    assert r.argument_bytes == r.alias_bytes + r.by_category["inputs"] + 8
    assert r.peak_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes
    assert r.temp_bytes > r.by_category["gradients"]  # gradients live in temp
    table = r.table()
    assert "temp" in table and "optimizer_state" in table and "yes" in table


@pytest.mark.parametrize("task", ["prefill", "decode"])
def test_inference_profile_kv_cache_is_exact(tiny, task):
    batch, seq = 3, 40
    r = ml.memory.profile(tiny, task, batch=batch, seq=seq)
    c = tiny.spec
    kv = 2 * c.n_layers * batch * seq * c.n_kv_heads * c.head_dim * 4 + 4 * batch
    assert r.by_category["kv_cache"] == r.analytic["kv_cache"] == kv
    assert r.alias_bytes == kv  # the cache is updated in place (donated)


def test_cast_compute_bf16_estimate_follows_the_pass(tiny):
    bf = ml.passes.cast("bfloat16", compute=True)(tiny)
    r = ml.memory.profile(bf, "decode", batch=2, seq=32)
    assert r.by_category["params"] == r.analytic["params"] == 2 * tiny.spec.param_count()
    assert r.by_category["kv_cache"] == r.analytic["kv_cache"]


def test_llama2_7b_bf16_train_profile_is_abstract_and_exact():
    model = ml.models.load("llama2-7b", dtype="bfloat16")
    assert model.abstract
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r = ml.memory.profile(model, "train", batch=1, seq=2048)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = 6_738_415_616  # Llama-2-7B parameter count
    assert model.spec.param_count() == n
    assert r.by_category["params"] == r.analytic["params"] == 2 * n
    assert r.by_category["optimizer_state"] == r.analytic["optimizer_state"] == 8 * n + 4
    assert r.argument_bytes >= 10 * n  # XLA sees the real 7B arguments...
    assert rss_after - rss_before < 4 * 2**30  # ...which were never allocated (13.5 GB bf16)


def test_remat_cuts_activation_temp_on_the_scanned_model():
    """Direction check: saving nothing recomputes activations instead of storing them."""
    cfg = ml.models.config("tiny", n_layers=4, d_model=128, d_ff=512, n_heads=4, n_kv_heads=2,
                           head_dim=32)
    base = ml.models.abstract(cfg)
    temps = {}
    for policy in (None, "dots_saveable", "nothing_saveable"):
        m = base.replace(module=base.module.clone(remat=policy))
        temps[policy] = ml.memory.profile(m, "train", batch=4, seq=256, optimizer="sgd").temp_bytes
    assert temps["nothing_saveable"] < temps["dots_saveable"] < temps[None]
    assert temps[None] > 2 * temps["nothing_saveable"], temps


def test_profile_plain_function():
    def f(w, x):
        return jnp.tanh(x @ w).sum()

    w = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    r = ml.memory.profile(f, args=(w, x), categories={"params": 0})
    assert r.argument_bytes == (256 * 512 + 64 * 256) * 4
    assert r.by_category == {"params": 256 * 512 * 4}
    assert r.output_bytes == 4


def test_profile_bad_input(tiny):
    with pytest.raises(ValueError, match="task='inference' is not one of"):
        ml.memory.profile(tiny, "inference")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        ml.memory.profile(tiny, "train", batch=0)
    with pytest.raises(ValueError, match="needs args="):
        ml.memory.profile(lambda x: x)
