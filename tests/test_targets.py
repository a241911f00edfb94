"""memlab.targets without the GPU/TPU compilers: names, facts, clear errors, HLO readers.

Compiling for a target needs the targets environment (``make targets-env``); those
tests live in ``tests/targets/`` and run with ``make test-targets``.  Here, in the
main environment (no CUDA plugin, no libtpu), every way of asking for a target
that cannot be had must say what to install.
"""
import importlib.metadata

import jax
import jax.numpy as jnp
import pytest

import memlab as ml
from memlab.targets import report


def test_target_names_and_facts_from_the_shipped_configs():
    h100 = ml.targets.get("h100")
    assert (h100.platform, h100.num_devices, h100.topology) == ("cuda", 1, "1x1x1")
    # the datasheet facts, read from memlab/targets/specs/h100.txtpb
    assert (h100.sm_count, h100.smem_per_block_optin, h100.smem_per_sm) == (132, 232448, 233472)
    assert h100.compute_capability == "9.0" and h100.memory_bytes == 84942979072
    a100 = ml.targets.get("a100")
    assert (a100.sm_count, a100.smem_per_block_optin, a100.compute_capability) == \
        (108, 166912, "8.0")
    assert ml.targets.get("h100x8").topology == "1x1x8"
    assert ml.targets.get("h100:1x2x8").num_devices == 16
    v5e = ml.targets.get("v5e")
    assert (v5e.platform, v5e.num_devices, v5e.topology) == ("tpu", 1, "v5e:1x1")
    assert ml.targets.get("v5e:4x4").num_devices == 16
    assert ml.targets.get("H100") == ml.targets.get("h100")   # names are case-insensitive
    for name in ml.targets.names():
        assert ml.targets.get(name).name == name


@pytest.mark.parametrize("bad", ["b200", "h100x", "v5e:", "tpu", "h100:8"])
def test_unknown_target_lists_the_known_ones(bad):
    with pytest.raises(ValueError, match=r"unknown target.*h100.*v5e"):
        ml.targets.get(bad)


def _missing(dist):
    raise importlib.metadata.PackageNotFoundError(dist)


def test_missing_compilers_name_the_install_command(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: _missing(d) if ("cuda" in d or "libtpu" in d) else real(d))
    with pytest.raises(ml.targets.TargetUnavailable, match=r"make targets-env.*jax-cuda12-plugin"):
        ml.targets.environment("cuda")
    with pytest.raises(ml.targets.TargetUnavailable, match=r"libtpu==0\.0\.\d+.*make targets-env"):
        ml.targets.environment("tpu")
    step = lambda x: x * 2  # noqa: E731
    with pytest.raises(ml.targets.TargetUnavailable, match="make targets-env"):
        ml.targets.compile(step, (jax.ShapeDtypeStruct((4,), jnp.float32),), "h100")
    with pytest.raises(ml.targets.TargetUnavailable, match="make targets-env"):
        ml.memory.profile(step, args=(jax.ShapeDtypeStruct((4,), jnp.float32),), target="v5e")


def test_plugin_that_does_not_match_jaxlib_is_explained(monkeypatch):
    import importlib.util

    import jaxlib
    real_version, real_spec = importlib.metadata.version, importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: "0.0.1" if d == "jax-cuda12-plugin" else real_version(d))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n.startswith("jax_plugins") else real_spec(n, *a))
    with pytest.raises(ml.targets.TargetUnavailable,
                       match=rf"0\.0\.1 does not match jaxlib {jaxlib.__version__}"):
        ml.targets.environment("cuda")


def test_cli_profile_with_a_target_reports_the_missing_compiler(capsys):
    from memlab import __main__ as cli
    from absl import flags
    flags.FLAGS(["memlab", "--target=h100", "--model=tiny", "--task=train", "--seq=16"])
    try:
        rc = cli.main(["memlab", "profile"])
    finally:
        flags.FLAGS.unparse_flags()
    assert rc == 2
    assert "make targets-env" in capsys.readouterr().err


# --- readers of what XLA produced (fixed excerpts of real XLA:GPU / XLA:TPU output) ----------

_HLO = """
  %pallas_call.0 = (bf16[1,4096,8,128]{3,2,1,0}) custom-call(%q.1, %k.1), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(f)/jit(_forward)/flash_attention_fwd/pallas_call" stack_frame_id=8}
  %custom-call.3 = (bf16[1,8,4096,128]{3,1,2,0}, u8[0]{0}) custom-call(%a, %b, %c), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(f)/dot_product_attention"}
  %cc = f32[8] custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="jit(step)/while/body/decode_attention/pallas_call"}
  %mm = f32[8] custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="jit(step)/dequant_matmul_nf4/pallas_call"}
"""


def test_custom_calls_and_attention_reached_are_read_from_hlo():
    calls = report.custom_calls(_HLO)
    assert [c["target"] for c in calls] == ["__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax",
                                            "tpu_custom_call", "tpu_custom_call"]
    assert [c["kernel"] for c in calls] == ["flash_attention_fwd", None, "decode_attention",
                                            "dequant_matmul_nf4"]
    assert report.attention_impls(_HLO) == ["cudnn", "decode_pallas_tpu", "pallas_triton"]
    assert report.attention_impls("%add = f32[] add(%a, %b)") == ["xla"]


_THUNKS = """001: kCustomKernel [source       | next=002 (1)] flash_attention_fwd grid: [32, 1, 8] threads: [256, 1, 1]  shared_memory: 98304 bytes
002: kCustomKernel [prev=001 (1) | next=004 (2)] input_reduce_fusion grid: [4096, 1, 1] threads: [256, 1, 1]  shared_memory: 0 bytes
"""


def test_kernel_launches_are_read_from_the_thunk_sequence(tmp_path):
    (tmp_path / "module_0001.jit_f.thunk_sequence.txt").write_text(_THUNKS)
    got = report.launches(str(tmp_path))
    assert got == [
        {"name": "flash_attention_fwd", "kind": "kCustomKernel", "grid": [32, 1, 8],
         "threads": [256, 1, 1], "shared_memory_bytes": 98304},
        {"name": "input_reduce_fusion", "kind": "kCustomKernel", "grid": [4096, 1, 1],
         "threads": [256, 1, 1], "shared_memory_bytes": 0}]
    rows = report.gpu_kernels(str(tmp_path), ptxas=None, names=("flash_attention",))
    assert [r["name"] for r in rows] == ["flash_attention_fwd"] and rows[0]["registers"] is None


def test_dispatch_platform_override_reaches_every_dispatcher():
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    assert ml.nn.choose(q, k, k, causal=True)[0] == "blocked"        # this CPU process
    with ml.dispatch.lowering_for("cuda"):
        assert ml.dispatch.platform() == "gpu"
        assert ml.nn.choose(q, k, k, causal=True)[0] == "cudnn"
        assert ml.nn.choose_cross_entropy(4096, 49152)[0] == "pallas_triton"
        assert ml.quant.matmul.kernel_backend() == "triton"
    with ml.dispatch.lowering_for("tpu"):
        assert ml.nn.choose(q, k, k, causal=True)[0] == "pallas_tpu"
        assert ml.quant.matmul.kernel_backend() == "mosaic_tpu"
    assert ml.dispatch.platform() == "cpu"
    with pytest.raises(ValueError, match="platform='metal'"):
        with ml.dispatch.lowering_for("metal"):
            pass


def test_block_sizes_beyond_on_chip_memory_fail_before_compiling():
    """Tiles that exceed a GPU's shared memory (or a TPU's VMEM) are refused while the
    kernel is planned -- at trace time, before XLA compiles anything -- naming the block
    size to lower; the defaults shrink to fit instead."""
    from memlab_kernels import cut_cross_entropy as cce
    from memlab_kernels import decode_attention as dec
    from memlab_kernels import flash_attention as fa
    s = jax.ShapeDtypeStruct
    q, kv = s((1, 512, 4, 256), jnp.float32), s((1, 512, 1, 256), jnp.float32)
    big = fa.BlockSizes(block_q=128, block_kv=128)
    with pytest.raises(ValueError, match=r"flash_attention \(fwd kernel\).*shared memory.*"
                                         r"lower block_sizes\.block_kv=128 to 64"):
        jax.eval_shape(lambda q, k, v: fa.flash_attention(q, k, v, causal=True, block_sizes=big,
                                                          backend="triton"), q, kv, kv)
    out = jax.eval_shape(lambda q, k, v: fa.flash_attention(q, k, v, causal=True,
                                                            backend="triton"), q, kv, kv)
    assert out.shape == q.shape                                   # defaults fit
    qd, cache = s((2, 4, 256), jnp.float32), s((2, 4096, 1, 256), jnp.float32)
    n = s((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"decode_attention.*lower block_sizes\.block_k=512"):
        jax.eval_shape(lambda q, k, v, n: dec.decode_attention(
            q, k, v, n, block_sizes=dec.BlockSizes(block_k=512), backend="triton"),
            qd, cache, cache, n)
    assert jax.eval_shape(lambda q, k, v, n: dec.decode_attention(q, k, v, n, backend="triton"),
                          qd, cache, cache, n).shape == qd.shape
    h, w, t = s((4096, 4096), jnp.bfloat16), s((32768, 4096), jnp.bfloat16), s((4096,), jnp.int32)
    with pytest.raises(ValueError, match=r"VMEM.*lower block_sizes\.block_v \(now 4096\)"):
        jax.eval_shape(lambda h, w, t: cce.cut_cross_entropy(
            h, w, t, tied=True, backend="mosaic_tpu",
            block_sizes=cce.BlockSizes(block_n=2048, block_v=4096)), h, w, t)


def test_estimates_are_calibrated_per_compiler():
    from memlab.memory import activations as act
    P = ml.memory.planner
    assert act.calibration("cpu") is act.CPU and act.calibration("tpu") is act.CPU
    gpu = act.calibration("gpu")
    assert gpu.attention_blocks == 0 and not gpu.saved_float32 and not gpu.loss_blocks
    cfg = ml.models.config("llama2-7b", dtype="bfloat16", param_dtype="bfloat16")
    c = P.Candidate("bf16", "nothing_saveable", "adamw8bit")
    cpu, on_gpu = (P.estimate(cfg, c, "train", 1, 2048, platform=p) for p in ("cpu", "gpu"))
    # the same exact bytes of params, gradients and state; only the fitted temp differs
    for k in ("params", "optimizer_state", "inputs"):
        assert cpu.categories["device"][k] == on_gpu.categories["device"][k]
    assert on_gpu.categories["device"]["temp"] < cpu.categories["device"]["temp"]
    assert on_gpu.cpu_extra_bytes == 0
