"""Kernels and model steps compiled for an H100 (XLA:GPU, Triton, ptxas) and a TPU v5e
(XLA:TPU, Mosaic) on a machine with neither.

Each check compares two sources that do not derive from each other: the grid a
``pallas_call`` declares in the traced program against the launch XLA:GPU scheduled,
the kernel the dispatcher says it picks against the custom call in the compiled
HLO, the host bytes memlab placed against the host bytes XLA:TPU reports, the
per-device bytes of the shard formulas against XLA's per-device arguments.
"""
import shutil

import jax
import jax.numpy as jnp
import pytest

import memlab as ml
from memlab.nn.attention import attention_hook
from memlab_kernels.attention_reference import attention_reference
from memlab.targets import kernels as K
from memlab.targets import report as R

# one kernel of each family, at SmolLM2's shapes in bf16
FAMILY_CASES = ["flash_attention.bwd", "decode_attention", "paged_decode_attention",
                "kivi_decode.4bit", "lightning_attention.fwd", "dequant_matmul.nf4",
                "cut_cross_entropy.bwd"]


@pytest.fixture(scope="module")
def smollm2_cases():
    return {c.name: c for c in K.cases("smollm2-135m", "bfloat16", "triton")}


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_each_kernel_family_compiles_to_sm90_machine_code(name, smollm2_cases, h100, tmp_path):
    case = smollm2_cases[name]
    ml.targets.compile(case.fn, case.args, h100, dump_to=str(tmp_path))
    rows = R.gpu_kernels(str(tmp_path), ml.targets.ptxas_path(), "sm_90a", names=case.kernels)
    assert sorted({r["name"] for r in rows}) == sorted(set(case.kernels))
    declared = K.declared_cost(case.fn, case.args)
    for r in rows:
        # registers and spills from ptxas on XLA's PTX; the launch from XLA's thunk sequence
        assert 16 <= r["registers"] <= 255 and r["spill_stores"] >= 0
        assert 0 < r["shared_memory_bytes"] <= h100.smem_per_block_optin
        assert r["threads"][0] in (32, 64, 128, 256, 512) and r["threads"][1:] == [1, 1]
        grid = [g for g in declared[r["name"]]["grid"]]
        # Triton launches the pallas grid as (x, y, z), padded with ones
        assert r["grid"] == grid + [1] * (3 - len(grid)), (r["name"], r["grid"], grid)
        assert declared[r["name"]]["flops"] > 0 and declared[r["name"]]["bytes_accessed"] > 0


def test_mosaic_kernels_compile_for_v5e(v5e):
    """The Mosaic bodies that first failed XLA:TPU's compiler: KIVI decode (strided loads
    of 8-bit codes) and cut cross-entropy at a 4096-wide hidden dim (scoped VMEM)."""
    smol = {c.name: c for c in K.cases("smollm2-135m", "bfloat16", "mosaic_tpu")}
    llama = {c.name: c for c in K.cases("llama3-8b", "bfloat16", "mosaic_tpu")}
    for case in (smol["flash_attention.fwd"], smol["kivi_decode.2bit"],
                 llama["cut_cross_entropy.bwd"]):
        compiled = ml.targets.compile(case.fn, case.args, v5e)
        kernels = {c["kernel"] for c in R.custom_calls(compiled.as_text())
                   if c["target"] == "tpu_custom_call"}
        assert kernels == set(case.kernels), (case.name, kernels)


@pytest.mark.parametrize("target,dtype,positions", [
    ("h100", "bfloat16", False), ("h100", "bfloat16", True), ("h100", "float32", False),
    ("v5e", "bfloat16", False)])
def test_attention_reached_in_hlo_is_what_the_dispatcher_chooses(target, dtype, positions):
    s = jax.ShapeDtypeStruct
    q, k = s((2, 256, 8, 64), dtype), s((2, 256, 2, 64), dtype)
    pos = s((2, 256), jnp.int32) if positions else None

    def f(q, k, v, pos):
        return ml.nn.attention(q, k, v, causal=True, q_positions=pos, kv_positions=pos)

    compiled = ml.targets.compile(f, (q, k, k, pos), target)
    platform = ml.targets.get(target).dispatch_platform
    want, _ = ml.nn.choose(q, k, k, causal=True, q_positions=pos, kv_positions=pos,
                           platform=platform)
    assert R.attention_impls(compiled.as_text()) == [want]


def test_model_train_step_for_h100_reaches_the_kernels_the_model_asks_for(h100):
    """The tiny Llama's train step, compiled for an H100: the attention in the compiled
    HLO is the dispatcher's choice for the exact arguments the model passes (recorded
    by tracing the model with an attention hook), and the memory table is XLA:GPU's."""
    model = ml.compose(ml.passes.cast("bfloat16", compute=True))(ml.models.abstract("tiny"))
    calls = []

    def record(q, k, v, scale=None, **mask):
        calls.append((q, k, v, mask))
        return attention_reference(q, k, v, scale=scale, **mask)

    with attention_hook(record):
        jax.eval_shape(lambda p, t: model.apply(p, t), model.params,
                       jax.ShapeDtypeStruct((2, 64), jnp.int32))
    q, k, v, mask = calls[0]
    want, _ = ml.nn.choose(q, k, v, platform="gpu", **mask)
    r = ml.memory.profile(model, "train", batch=2, seq=64, target="h100")
    assert r.target == "h100" and r.device == h100.device_kind
    assert r.attention == [want]
    # XLA:GPU's arguments are exactly the params + AdamW state + tokens memlab counts,
    # and the train step's uint32[2] RNG key
    assert r.argument_bytes == sum(r.by_category[c] for c in
                                   ("params", "optimizer_state", "inputs")) + 8
    assert r.alias_bytes == r.by_category["params"] + r.by_category["optimizer_state"]
    assert r.temp_bytes > 0 and r.host_bytes == 0


def test_host_placements_are_reported_apart_on_v5e_and_refused_on_h100(v5e):
    # dims that fill whole TPU tiles (128 lanes x 16 bf16 sublanes): XLA:TPU pads other
    # shapes in its tiled layouts, so its buffer bytes would exceed the array bytes
    cfg = ml.models.config("tiny", d_model=256, d_ff=512, n_heads=2, n_kv_heads=2,
                           head_dim=128, dtype="bfloat16", param_dtype="bfloat16")
    model = ml.passes.offload(1, 1)(ml.models.abstract(cfg))
    r = ml.memory.profile(model, "train", batch=2, seq=64, target="v5e")
    # XLA:TPU's host arguments are the layers memlab placed in pinned_host, to the byte
    assert r.host_argument_bytes == r.by_category["params_host"] > 0
    # the same buffers as the resident model's, split between the two memories
    resident = ml.memory.profile(ml.models.abstract(cfg), "train", batch=2, seq=64,
                                 target="v5e")
    assert resident.host_bytes == 0
    assert r.argument_bytes + r.host_argument_bytes == resident.argument_bytes
    with pytest.raises(ml.targets.TargetUnavailable, match=r"pinned_host.*TPU target"):
        ml.memory.profile(model, "train", batch=2, seq=64, target="h100")


def test_fsdp_over_eight_compile_only_h100s():
    target = ml.targets.get("h100x8")
    mesh = target.mesh((8,), ("data",))
    model = ml.passes.shard(mesh, ml.shard.fsdp("data", min_size=256))(
        ml.models.abstract("tiny", dtype="bfloat16", param_dtype="bfloat16"))
    r = ml.memory.profile(model, "train", batch=8, seq=64, target=target)
    # per-device params + state + tokens, by memlab's shard formulas, are XLA's arguments
    assert r.argument_bytes == (r.by_category["params"] + r.by_category["optimizer_state"]
                                + r.by_category["inputs"] + 8)           # + the RNG key
    assert r.by_category["params"] < r.global_by_category["params"] / 4


def test_planner_verifies_on_the_target():
    cfg = ml.models.config("tiny", dtype="bfloat16", param_dtype="bfloat16", max_seq_len=512)
    plan = ml.memory.plan(cfg, "train", "1GB", seq=256, batch=2, verify=1, target="h100")
    v = plan.verification
    assert plan.target == "h100" and v is not None and v.target == "h100"
    assert v.cpu_extra_bytes == 0 and v.host_bytes == 0     # no XLA:CPU corrections
    assert 0 < v.compiled_device_bytes < 2**30 and plan.confirmed
    assert "verified for h100" in plan.table()


def test_ptxas_is_present():
    assert shutil.which(ml.targets.ptxas_path())


def test_gpu_calibrated_estimate_predicts_xla_gpu_on_a_held_out_shape():
    """The activation model's GPU constants (fitted on d=256 compiles for an H100) predict
    XLA:GPU's device bytes of a training step at a shape they were not fitted on."""
    P = ml.memory.planner
    cfg = ml.models.config("tiny", d_model=384, d_ff=1024, n_layers=4, n_heads=6, n_kv_heads=3,
                           head_dim=64, vocab_size=2503, dtype="bfloat16",
                           param_dtype="bfloat16", max_seq_len=4096)
    for remat in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):
        c = P.Candidate("bf16", remat, "adamw")
        e = P.estimate(cfg, c, "train", 2, 384, platform="gpu")
        v = P.verify_candidate(cfg, c, e, "train", 2, 384, "h100")
        assert v.error is None, v.error
        assert abs(v.relative_error) <= 0.10, (remat, e.device_bytes, v.compiled_device_bytes)
        # XLA:CPU's constants, kept for a CPU process, miss the GPU by far more
        cpu = P.estimate(cfg, c, "train", 2, 384)
        assert cpu.device_bytes > 1.2 * v.compiled_device_bytes
