"""The quantize pass on memlab models and plain Flax models."""
import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

import memlab as ml
from memlab.quant import QArray


class UserNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="fc1")(x))
        return nn.Dense(16, name="fc2")(x)


def test_quantized_plain_flax_model_matches_dequantized_reference():
    x = jax.random.normal(jax.random.key(0), (5, 32))
    params = UserNet().init(jax.random.key(1), x)["params"]
    model = ml.Model(module=UserNet(), params=params)
    q = ml.passes.quantize(ml.quant.int4(16))(model)
    assert isinstance(q.params["fc1"]["kernel"], QArray)
    assert not isinstance(q.params["fc1"]["bias"], QArray)  # 1-D params are never targets
    # reference: the same net run on dequantized float weights
    deq = jax.tree_util.tree_map(lambda a: a.dequantize() if isinstance(a, QArray) else a,
                                 q.params, is_leaf=lambda a: isinstance(a, QArray))
    chex.assert_trees_all_close(q(x), model.apply(deq, x), atol=1e-5, rtol=1e-5)
    assert not np.allclose(np.asarray(q(x)), np.asarray(model(x)), atol=1e-6)  # really quantized


def test_quantized_llama_bytes_profile_and_jit(tiny):
    fmt = ml.quant.nf4(block=32, double_quant=False)
    q = ml.passes.quantize(fmt, rules={r"lm_head": None})(tiny)
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, 256)
    got = np.asarray(jax.jit(lambda m, t: m(t))(q, tokens))
    deq = jax.tree_util.tree_map(lambda a: a.dequantize() if isinstance(a, QArray) else a,
                                 q.params, is_leaf=lambda a: isinstance(a, QArray))
    np.testing.assert_allclose(got, np.asarray(tiny.apply(deq, tokens)), atol=1e-4, rtol=1e-4)
    assert not np.allclose(got, np.asarray(tiny(tokens)), atol=1e-3)
    # exact storage: layer kernels at 4 + 32/32 bits, the rest untouched
    c = tiny.spec
    layer_kernels = c.n_layers * (c.layer_param_count() - 2 * c.d_model)
    other = c.param_count() - layer_kernels
    assert ml.memory.tree_bytes(q.params) == layer_kernels * 5 // 8 + other * 4
    r = ml.memory.profile(q, "decode", batch=2, seq=16)
    assert r.by_category["params"] == r.analytic["params"] == ml.memory.tree_bytes(q.params)


def test_quantize_abstract_7b_shapes_only():
    big = ml.passes.quantize(ml.quant.nf4(64), rules={r"lm_head": None})(
        ml.models.abstract("llama2-7b", param_dtype="bfloat16"))
    assert big.abstract
    c = big.spec
    layer_kernels = c.n_layers * (c.layer_param_count() - 2 * c.d_model)
    # layer kernels at QLoRA's 4.127 bits, embeddings + head + norms in bf16
    expect = layer_kernels * (4 + 8 / 64 + 32 / (64 * 256)) + (c.param_count() - layer_kernels) * 16
    assert abs(8 * ml.memory.tree_bytes(big.params) - expect) / expect < 1e-4


def test_quantize_rules_and_errors(tiny):
    with pytest.warns(UserWarning, match="matched no parameter path"):
        ml.passes.quantize(ml.quant.int8(), rules={"no_such_module": None})(tiny)
    with pytest.raises(ValueError, match="is not a format"):
        ml.passes.quantize("int5")
    with pytest.raises(ValueError, match="group size 48 does not divide"):
        ml.passes.quantize(ml.quant.int4(48))(tiny)


def test_donate_frees_float_leaves(tiny):
    model = ml.models.init("tiny", jax.random.key(5))
    leaf = model.params["layers"]["mlp"]["up_proj"]["kernel"]
    q = ml.passes.quantize(ml.quant.int8(), donate=True)(model)
    assert leaf.is_deleted()
    assert isinstance(q.params["layers"]["mlp"]["up_proj"]["kernel"], QArray)


@pytest.mark.slow
def test_streaming_quantized_load_equals_the_pass_and_never_holds_the_float_model(smollm2):
    import subprocess
    import sys

    streamed = ml.models.load("smollm2-135m", quantize=ml.quant.int4(64))
    passed = ml.passes.quantize(ml.quant.int4(64))(smollm2)
    chex.assert_trees_all_equal(streamed.params, passed.params)  # bit-exact, same tree
    assert [p.name for p, _ in streamed.history] == [p.name for p, _ in passed.history]

    def peak_rss_mib(expr):
        # VmHWM: this process's own peak RSS (ru_maxrss would inherit the parent's)
        code = ("import jax, memlab as ml\n"
                f"m = ml.models.load('smollm2-135m', quantize={expr})\n"
                "jax.block_until_ready(m.params)\n"
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
                "print(int(hwm.split()[1]) / 1024)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    float_peak, nf4_peak = peak_rss_mib("None"), peak_rss_mib("ml.quant.nf4(64)")
    # float32 weights are 513 MiB, NF4 160 MiB: streaming saves most of the difference
    assert float_peak - nf4_peak > 250, (float_peak, nf4_peak)
    with pytest.raises(ValueError, match="cannot calibrate"):
        ml.models.load("smollm2-135m", quantize=ml.quant.methods.get("gptq")(ml.quant.int4(64)))


@pytest.mark.parametrize("fmt", [ml.quant.int8(), ml.quant.int4(32), ml.quant.int4(32, True),
                                 ml.quant.nf4(32)], ids=lambda f: f.name)
def test_pallas_kernel_dispatch_matches_the_xla_path(tiny, fmt):
    """The quantized model routed through the Pallas dequant-matmul kernels
    (interpret mode here; Triton/Mosaic on GPU/TPU) equals the XLA path."""
    q = ml.passes.quantize(fmt)(tiny)
    tokens = jax.random.randint(jax.random.key(11), (2, 7), 0, 256)
    with ml.quant.kernel_mode("interpret"):
        assert ml.quant.kernel_backend() == "interpret"
        fused = q(tokens)
    assert ml.quant.kernel_backend() is None  # CPU default: XLA path
    chex.assert_trees_all_close(fused, q(tokens), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="kernel_mode: 'fast'"):
        with ml.quant.kernel_mode("fast"):
            pass
