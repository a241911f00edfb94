"""Tests of the memory planner (memlab.memory.plan): budgets, errors, the Pareto front,
the analytic 7B plans, and compiled verification on small abstract Llamas."""
import math

import numpy as np
import pytest

import memlab as ml
from memlab.memory import planner as P

GB = 10**9


def _small(**kw):
    base = dict(d_model=96, d_ff=272, n_layers=2, vocab_size=331, n_heads=3, n_kv_heads=1,
                head_dim=32, dtype="bfloat16", param_dtype="bfloat16", max_seq_len=4096)
    base.update(kw)
    return ml.models.config("tiny", **base)


# --- budgets and argument errors ------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30),
                                           ("12e9", 12 * 10**9), (" 512 MiB ", 512 * 2**20),
                                           ("1.5gb", 15 * 10**8), ("3TB", 3 * 10**12)])
def test_parse_budget_strings(text, expected):
    assert P.parse_budget(text) == expected


def test_parse_budget_numbers():
    assert P.parse_budget(7_000_000_123) == 7_000_000_123
    assert P.parse_budget(2.5e9) == 2_500_000_000


@pytest.mark.parametrize("bad", ["24 parsecs", "GB", "abc", "", "-3GB", "1e", "24 G B"])
def test_parse_budget_bad_strings(bad):
    with pytest.raises(ValueError, match="budget"):
        P.parse_budget(bad)


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf")])
def test_parse_budget_bad_numbers(bad):
    with pytest.raises(ValueError, match="positive"):
        P.parse_budget(bad)


@pytest.mark.parametrize("bad", [None, True, [24]])
def test_parse_budget_bad_types(bad):
    with pytest.raises(TypeError, match="budget"):
        P.parse_budget(bad)


def test_plan_argument_errors():
    with pytest.raises(ValueError, match="task="):
        ml.memory.plan("llama2-7b", "pretrain", "24GB", verify=0)
    with pytest.raises(ValueError, match="objective"):
        ml.memory.plan("llama2-7b", "train", "24GB", objective="cheap", verify=0)
    with pytest.raises(ValueError, match="unknown model"):
        ml.memory.plan("llama9-1t", "train", "24GB", verify=0)
    with pytest.raises(ValueError, match="batch"):
        ml.memory.plan("llama2-7b", "train", "24GB", batch=0, verify=0)
    with pytest.raises(ValueError, match="seq"):
        ml.memory.plan("llama2-7b", "train", "24GB", seq=-1, verify=0)
    with pytest.raises(TypeError, match="model must be"):
        ml.memory.plan(3.5, "train", "24GB", verify=0)
    with pytest.raises(ValueError, match="budget"):
        ml.memory.plan("llama2-7b", "train", "lots", verify=0)


# --- infeasible budgets ---------------------------------------------------------------

def test_impossible_budget_error_names_minimum_and_nearest():
    cfg = ml.models.config("llama2-7b", dtype="bfloat16", param_dtype="bfloat16")
    with pytest.raises(P.NoPlanError, match=r"no plan fits llama2-7b train .* needs [0-9.]+ GB "
                                            r"at best") as info:
        ml.memory.plan("llama2-7b", "train", "2GB", verify=0)
    # the minimum is the smallest estimate over the whole search space (recomputed here)
    smallest = min(P.estimate(cfg, c, "train", 1, 2048).device_bytes
                   for c in P.candidates(cfg, "train", 1, 2048))
    assert info.value.minimum_bytes == smallest > 2 * GB
    assert f"{smallest / 1e9:.2f} GB" in str(info.value)


def test_nearest_feasible_option_is_feasible():
    """When the error says "with N devices FSDP fits", planning with N devices fits."""
    cfg = _small(n_layers=4, d_model=256, d_ff=688, n_heads=4, n_kv_heads=2, head_dim=64)
    smallest = min(P.estimate(cfg, c, "train", 4, 512).device_bytes
                   for c in P.candidates(cfg, "train", 4, 512))
    budget = int(smallest * 0.8)
    with pytest.raises(P.NoPlanError, match="devices (FSDP|DP) fits") as info:
        ml.memory.plan(cfg, "train", budget, batch=4, seq=512, verify=0)
    n = int(info.value.nearest.split("with ")[1].split(" devices")[0])
    plan = ml.memory.plan(cfg, "train", budget, batch=4, seq=512, verify=0, devices=n)
    assert plan.candidate.shard in ("fsdp", "dp") and plan.estimate.device_bytes <= budget


# --- analytic plans at 7B / 8B shapes (no compile) ---------------------------------------

@pytest.mark.parametrize("budget", ["24GB", "12GB"])
def test_llama2_7b_full_training_plans(budget):
    plan = ml.memory.plan("llama2-7b", "train", budget, seq=2048, verify=0)
    c = plan.candidate
    assert c.weights == "bf16" and c.lora_rank == 0 and c.optimizer in ml.optim.names()
    assert plan.estimate.device_bytes <= P.parse_budget(budget)
    # params + gradients alone exceed the budget on the device: no whole-model gradient
    # may exist (the fused update), and at 12 GB the bf16 weights alone do not fit either
    n = ml.models.config("llama2-7b").param_count()
    assert 2 * n * 2 > P.parse_budget(budget)
    if 2 * n > P.parse_budget(budget):  # the decoder layers stream from host memory
        cfg = ml.models.config("llama2-7b", dtype="bfloat16", param_dtype="bfloat16")
        # the streamed per-layer matrices (the layers' vectors stay on the device)
        layers = ml.offload.param_bytes(cfg.param_shapes(), cfg.n_layers, 1, 0)["host"]
        assert c.offload is not None and plan.estimate.categories["host"]["params"] == layers
    else:
        assert c.fused and c.offload is None and plan.estimate.host_bytes == 0
        assert plan.estimate.categories["device"]["params"] == 2 * n


def test_headinfer_anchor_llama3_8b_1m_tokens():
    seq = 2**20
    plan = ml.memory.plan("llama3-8b", "decode", "24GB", seq=seq, objective="quality", verify=0)
    assert plan.candidate.kv.startswith("headinfer") and plan.candidate.weights == "bf16"
    cfg = ml.models.config("llama3-8b")
    # independent formula: bf16 weights + one head group's K, V of one layer + the new token
    params = cfg.param_count() * 2
    group = 2 * seq * 1 * cfg.head_dim * 2
    new = 2 * cfg.n_kv_heads * cfg.head_dim * 2
    cats = plan.estimate.categories
    assert cats["device"]["params"] == params
    assert cats["device"]["kv_cache"] == group + new + 4
    assert cats["host"]["kv_cache"] == cfg.n_layers * 2 * seq * cfg.n_kv_heads * cfg.head_dim * 2
    assert 16 * GB < plan.estimate.device_bytes < 18 * GB  # the paper: 17 GB


@pytest.mark.parametrize("objective", ["speed", "quality"])
def test_llama3_8b_128k_inference_fits(objective):
    plan = ml.memory.plan("llama3-8b", "inference", "24GB", seq=131072, objective=objective,
                          verify=0)
    assert plan.task == "decode" and plan.estimate.device_bytes <= 24 * GB
    dense = ml.models.config("llama3-8b").kv_cache_bytes(1, 131072, "bfloat16")
    assert dense > 16 * GB  # a dense cache next to bf16 weights would not fit
    assert plan.estimate.quality_loss <= 0.05


def test_quality_objective_never_worse_quality():
    speed = ml.memory.plan("llama3-8b", "decode", "24GB", seq=131072, verify=0)
    quality = ml.memory.plan("llama3-8b", "decode", "24GB", seq=131072, objective="quality",
                             verify=0)
    assert quality.estimate.quality_loss <= speed.estimate.quality_loss
    assert speed.estimate.step_seconds <= quality.estimate.step_seconds


def test_pareto_front_is_non_dominated_and_complete():
    plan = ml.memory.plan("llama3-8b", "decode", "24GB", seq=131072, verify=0)
    cfg = ml.models.config("llama3-8b", dtype="bfloat16", param_dtype="bfloat16")
    pts = [P.estimate(cfg, c, "decode", 1, 131072) for c in P.candidates(cfg, "decode", 1, 131072)]
    pts = np.array([(e.device_bytes, e.step_seconds, e.quality_loss) for e in pts
                    if e.device_bytes <= 24 * GB])
    front = np.array([(e.device_bytes, e.step_seconds, e.quality_loss) for _, e in plan.front])
    assert len(front) >= 2

    def dominates(a, b):
        return bool(np.all(a <= b) and np.any(a < b))

    for f in front:  # nothing feasible dominates a front point
        assert not any(dominates(p, f) for p in pts)
    for p in pts:  # every feasible point is on the front or dominated by it
        assert any(np.array_equal(p, f) or dominates(f, p) for f in front)


@pytest.mark.parametrize("budget", ["24GB", "12GB"])
def test_plan_passes_compose_and_table(budget):
    plan = ml.memory.plan("llama2-7b", "train", budget, verify=0)
    model = plan.passes(ml.models.abstract("llama2-7b", dtype="bfloat16", param_dtype="bfloat16"))
    names = " ".join(p.name for p, _ in model.history)
    if plan.candidate.offload:
        assert "offload" in names and model.module.stream == plan.candidate.offload
    # streaming and the fused step recompute each layer in its own backward: no remat pass
    assert "remat" not in names and plan.candidate.remat == "nothing_saveable"
    text = plan.table()
    assert "Pareto front" in text and plan.candidate.label() in text
    assert plan.to_dict()["chosen"]["label"] == plan.candidate.label()
    if plan.candidate.fused:  # the step to train with is named
        assert "memlab.fused.step_fn" in text and plan.to_dict()["chosen"]["fused"]


# --- compiled verification on small configs ---------------------------------------------

# held-out shapes (the constants were fitted at d=256, d_ff=688, MHA, V=1000, T=256/512)
CASES = [
    ("train", P.Candidate("bf16", "nothing_saveable", "adamw"), 2, 384),
    ("train", P.Candidate("bf16", "dots_with_no_batch_dims_saveable", "adamw"), 2, 384),
    pytest.param(
        "train", P.Candidate("bf16", "nothing_saveable", "adamw", offload=(1, 1)), 2, 384,
        marks=pytest.mark.xfail(strict=True, reason=(
            "known gap: the step train() runs holds more temp over streamed layers than the "
            "offload estimate counts (its non-finite skip and gradient norm over host-resident "
            "gradients and state); within 3% at 7B, -14% at this shape"))),
    ("decode", P.Candidate("bf16", kv="dense"), 2, 3000),
    # the loss workspace is dead by the layers' backward (the peak); KIVI's XLA path
    # dequantizes a layer's cache to float32 (XLA:CPU-only bytes)
    ("train", P.Candidate("bf16", "nothing_saveable", "adamw", loss="naive"), 2, 384),
    ("decode", P.Candidate("bf16", kv="kivi4"), 2, 3000),
]


def _held_out():
    return _small(d_model=192, d_ff=512, n_layers=3, vocab_size=777, n_heads=6, n_kv_heads=2,
                  head_dim=32)


def _case_id(case):
    t, c = (case.values if hasattr(case, "values") else case)[:2]
    return f"{t}-{c.label()}"


@pytest.mark.parametrize("task,cand,batch,seq", CASES, ids=[_case_id(c) for c in CASES])
def test_estimate_within_10pct_of_compiled(task, cand, batch, seq):
    cfg = _held_out()
    e = P.estimate(cfg, cand, task, batch, seq)
    v = P.verify_candidate(cfg, cand, e, task, batch, seq)
    assert v.error is None, v.error
    # independent: XLA's own numbers, recompiled through the public profiler
    model = P.build(cfg, cand, task)
    with ml.nn.use_cross_entropy(cand.loss):
        r = ml.memory.profile(model, "train" if task == "train" else task, batch=batch, seq=seq,
                              optimizer=cand.optimizer or "adamw")
    assert v.compiled_peak_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes
    pred = e.device_bytes + e.cpu_extra_bytes
    if cand.offload:
        # XLA:CPU has one memory: the device part of a streamed step is a small residual of
        # two large numbers, so the check is on device + host against XLA's whole peak
        # (the host part is subtracted: params, gradients, optimizer state)
        assert v.host_bytes >= r.by_category["params_host"] + r.by_category["optimizer_state_host"]
        assert abs(pred + v.host_bytes - v.compiled_peak_bytes) <= 0.10 * v.compiled_peak_bytes, \
            (pred + v.host_bytes, v.compiled_peak_bytes)
    else:
        assert abs(pred - v.compiled_device_bytes) <= 0.10 * v.compiled_device_bytes, \
            (pred, v.compiled_device_bytes)


def test_chosen_plan_fits_when_compiled():
    cfg = _held_out()
    plain = P.estimate(cfg, P.Candidate("bf16", None, "adamw"), "train", 2, 512).device_bytes
    budget = int(plain * 0.8)  # full training without remat does not fit
    plan = ml.memory.plan(cfg, "train", budget, batch=2, seq=512, verify=1)
    v = plan.verification
    assert v is not None and v.compiled_device_bytes is not None, plan.verified
    assert v.compiled_device_bytes <= budget and plan.confirmed
    assert plan.candidate.remat is not None or plan.candidate.offload is not None
    assert math.isfinite(v.relative_error) and abs(v.relative_error) < 0.10


def test_activation_fit_recovers_known_constants():
    """fit() solves the temp model's least squares: synthetic temps from known constants."""
    from memlab.memory import activations as act
    rng = np.random.default_rng(7)
    truth = {"a": 5.3, "nothing_saveable": (0.71, 2.5e6), "save": (1.6, 0.45, -1.2e6)}
    pts = []
    for policy in ("nothing_saveable", "save:qkv,mlp_hidden"):
        for _ in range(5):
            cfg = _small(n_layers=int(rng.integers(2, 6)), d_model=int(rng.choice([96, 160])))
            b, t = int(rng.integers(1, 4)), int(rng.integers(100, 700))
            n = cfg.param_count()
            f = act.train_features(cfg, b, t, policy, p_layers=n * 0.9, p_other=n * 0.1)
            if policy == "nothing_saveable":
                k, c0 = truth[policy]
                temp = truth["a"] * f.p_layers + f.saved + k * f.work + c0
            else:
                s, k, c0 = truth["save"]
                temp = truth["a"] * f.p_layers + s * f.saved + k * f.work + c0
            temp += act.A_OTHER * f.p_other + f.attention + f.loss
            pts.append((f, "adamw", temp))
    out = act.fit(pts)
    np.testing.assert_allclose(out["a"]["adamw"], truth["a"], rtol=1e-6)
    np.testing.assert_allclose([out["kappa"]["nothing_saveable"], out["c0"]["nothing_saveable"]],
                               truth["nothing_saveable"], rtol=1e-5)
    np.testing.assert_allclose([out["sigma"]["save"], out["kappa"]["save"], out["c0"]["save"]],
                               truth["save"], rtol=1e-5)
    held = act.fit(pts, hold_a={"adamw": truth["a"]})  # a held: kappa, c0 still recovered
    assert held["a"]["adamw"] == truth["a"]
    np.testing.assert_allclose([held["kappa"]["nothing_saveable"], held["c0"]["nothing_saveable"]],
                               truth["nothing_saveable"], rtol=1e-5)


def test_passes_that_cannot_apply_are_skipped():
    """NF4's 64-blocks do not divide d_model=96 / d_ff=272: no nf4 candidate, no crash."""
    cfg = _small()
    plan = ml.memory.plan(cfg, "finetune", "1GB", batch=2, seq=128, verify=0)
    assert plan.candidate.lora_rank == P.LORA_RANK
    assert all(c.weights != "nf4" for c, _ in plan.front)
    assert plan.considered > plan.feasible  # the nf4 candidates were enumerated, then dropped


def test_fused_estimate_within_10pct_of_compiled():
    # the fused backward-update (memlab.fused): every byte resident, so XLA's peak is the check
    cfg = _held_out()
    cand = P.Candidate("bf16", "nothing_saveable", "apollo_mini", fused=True)
    assert cand in P.candidates(cfg, "train", 2, 384)
    e = P.estimate(cfg, cand, "train", 2, 384)
    v = P.verify_candidate(cfg, cand, e, "train", 2, 384)
    assert v.error is None, v.error
    # independent: the exact state bytes of ml.fused.init, and XLA's arguments
    model = P.build(cfg, cand, "train")
    tx = ml.optim.get("apollo_mini")
    state = ml.fused.init(model, tx)
    assert e.categories["device"]["optimizer_state"] == ml.memory.bytes.tree_bytes(state)
    assert e.categories["device"]["params"] == ml.memory.bytes.tree_bytes(model.params)
    assert abs(v.relative_error) <= 0.10, (e.device_bytes, v.compiled_device_bytes)
    with pytest.raises(ValueError, match="fused"):
        P.estimate(cfg, P.Candidate("nf4", "nothing_saveable", "adamw", lora_rank=16,
                                    fused=True), "finetune", 2, 384)
