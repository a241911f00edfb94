"""A new KV policy or optimizer joins the planner by registering its facts in its own module
(memlab.facts): throwaway ones are searched and scored; a missing fact is a clear error;
the measured facts are what the experiments measured."""
import dataclasses
import json
import pathlib

import numpy as np
import optax
import pytest

import memlab as ml
from memlab import facts
from memlab.cache import Dense
from memlab.kv.base import POLICIES
from memlab.memory import planner as P
from memlab.optim import _STATE_BYTES, OPTIMIZERS, register

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _small(**kw):
    base = dict(d_model=96, d_ff=272, n_layers=2, vocab_size=331, n_heads=3, n_kv_heads=1,
                head_dim=32, dtype="bfloat16", param_dtype="bfloat16", max_seq_len=4096)
    base.update(kw)
    return ml.models.config("tiny", **base)


@dataclasses.dataclass(frozen=True)
class ToyKV(Dense):
    """A float32 dense store under its own name: one module's worth of policy."""

    name = "toykv"
    dtype: str = "float32"


@pytest.fixture
def registered():
    """Register throwaway extensions; unregister them afterwards."""
    names = []

    def add(registry, name, obj, **fact_kw):
        if registry is OPTIMIZERS:  # with its exact state-bytes formula (SGD: none)
            register(name, state_bytes=lambda params, **_: 0, **fact_kw)(obj)
        else:
            registry.register(name, **fact_kw)(obj)
        names.append((registry, name))
        return obj

    yield add
    for registry, name in names:
        registry.unregister(name)
        _STATE_BYTES.pop(name, None)


def test_registered_kv_policy_is_searched_and_scored(registered):
    loss = float(np.random.default_rng(0).uniform(0.01, 0.09))
    registered(POLICIES, "toykv", ToyKV, plan=lambda seq: ["toykv"], quality_loss=loss)
    cfg, batch, seq = _small(), 2, 1024
    cands = P.candidates(cfg, "decode", batch, seq)
    toy = [c for c in cands if c.kv == "toykv"]
    assert {c.weights for c in toy} >= {"bf16"}, [c.label() for c in cands][:8]
    c = next(c for c in toy if c.weights == "bf16" and c.offload is None)
    e = P.estimate(cfg, c, "decode", batch, seq)
    # independent: float32 K and V of every layer, plus the int32 lengths
    ref = 2 * batch * seq * cfg.n_kv_heads * cfg.head_dim * 4 * cfg.n_layers + 4 * batch
    assert e.categories["device"]["kv_cache"] == ref
    assert e.quality_loss == pytest.approx(loss)          # bf16 weights lose nothing
    plan = ml.memory.plan(cfg, "decode", "1GB", seq=seq, batch=batch, verify=0,
                          objective="quality")
    assert plan.considered == len(cands)


def test_registered_optimizer_is_searched_and_scored(registered):
    update = float(np.random.default_rng(1).uniform(3.0, 9.0))
    registered(OPTIMIZERS, "toyopt", lambda learning_rate=1e-2: optax.sgd(learning_rate),
               plan=("train",), quality_loss=0.25, update_bytes={"cpu": update},
               fused_update_bytes=6.0)
    cfg = _small()
    cands = [c for c in P.candidates(cfg, "train", 2, 256) if c.optimizer == "toyopt"]
    assert cands and any(c.fused for c in cands)
    c = P.Candidate("bf16", "nothing_saveable", "toyopt")
    assert c in cands
    e = P.estimate(cfg, c, "train", 2, 256)
    base = P.estimate(cfg, dataclasses.replace(c, optimizer="sgd"), "train", 2, 256)
    assert e.quality_loss == pytest.approx(0.25)
    # the update temps scale with the registered bytes per layer param
    n_layer = cfg.n_layers * cfg.layer_param_count()
    sgd = OPTIMIZERS.fact("sgd", "update_bytes")["cpu"]
    assert e.device_bytes - base.device_bytes == pytest.approx((update - sgd) * n_layer, abs=2)


def test_missing_fact_names_the_registration_and_the_fact(registered):
    registered(POLICIES, "toykv", ToyKV, plan=lambda seq: ["toykv"])   # no quality_loss
    cfg = _small()
    with pytest.raises(facts.MissingFact, match=r"kv policy 'toykv' \(registered in [\w.]*"
                                               r"test_planner_facts\) has no fact "
                                               r"'quality_loss'"):
        ml.memory.plan(cfg, "decode", "1GB", seq=1024, verify=0)
    registered(OPTIMIZERS, "toyopt2", lambda: optax.sgd(1e-2), plan=("train",),
               quality_loss=0.1)                                       # no update_bytes
    with pytest.raises(facts.MissingFact, match="optimizer 'toyopt2'.*'update_bytes'"):
        P.estimate(cfg, P.Candidate("bf16", "nothing_saveable", "toyopt2"), "train", 2, 256)


def test_measured_facts_are_the_experiments_numbers():
    """memlab/measured.json (experiments/facts.py) against the experiments' result files."""
    q = json.loads((ROOT / "results/quantize.json").read_text())["smollm2"]["rows"]
    ppl = {r.get("method", r["config"]): r["perplexity"] for r in q}
    base = next(r["perplexity"] for r in q if r["config"].startswith("float"))
    nf4 = ml.quant.formats.WEIGHT_FORMATS.fact("nf4", "quality_loss")
    assert nf4 == pytest.approx((ppl["rtn-nf4-b64-dq"] - base) / base)
    kv = json.loads((ROOT / "results/kv_compress.json").read_text())
    kppl = {r["policy"]: r["perplexity"] for r in kv["perplexity"]}
    kivi = ml.kv.parse("kivi2")
    got = POLICIES.fact("kivi", "quality_loss")(kivi, 512)
    assert got == pytest.approx((kppl["kivi2"] - kppl["dense-bf16"]) / kppl["dense-bf16"])
    snap = ml.kv.parse(f"snapkv:budget={kv['settings']['budget']}")
    got = POLICIES.fact("snapkv", "quality_loss")(snap, kv["settings"]["window"])
    ref = kppl[f"snapkv-{kv['settings']['budget']}"]
    assert got == pytest.approx((ref - kppl["dense-bf16"]) / kppl["dense-bf16"])
    # every planned extension's facts resolve
    for task in ("train", "finetune", "decode"):
        for c in P.candidates(_small(d_model=128, d_ff=256), task, 2, 2048)[::7]:
            assert np.isfinite(P.quality_loss(c, 2048))


def test_old_tables_warn_and_read_the_facts():
    with pytest.warns(DeprecationWarning, match="registered facts"):
        table = P.WEIGHT_LOSS
    assert table["bf16"] == 0.0 and table["nf4"] > table["int8"] > 0
    with pytest.warns(DeprecationWarning):
        assert "adamw" in P.TRAIN_OPTIMIZERS
