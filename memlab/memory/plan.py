"""The memory planner, re-exported: it lives in :mod:`memlab.planner`.

:mod:`memlab.planner.space` (the search space), :mod:`memlab.planner.cost` (bytes from
the candidates' passes, step time, quality from the extensions' registered facts) and
:mod:`memlab.planner.search` (ranking and verification by compiling).  Every name this
module had keeps working; the per-extension tables it held (quality losses, compute
penalties, the optimizers searched) are the extensions' registered facts now
(:mod:`memlab.facts`), and reading them here warns.
"""
from __future__ import annotations

import warnings

from memlab.planner.cost import (  # noqa: F401
    HBM_BYTES_PER_S, HOST_LINK_BYTES_PER_S, HOST_MEM_BYTES_PER_S, INTERCONNECT_BYTES_PER_S,
    PEAK_FLOPS, Estimate, _count, _estimate_fused, _fused_state, _kv_name, _layer_split,
    _workload, estimate, gb, pass_bytes, quality_loss, step_seconds,
)
from memlab.planner.search import (  # noqa: F401
    MAX_COMPILE_FAILURES, MAX_OVER_BUDGET, NoPlanError, Plan, Verification, _family, _nearest,
    _profile_fused, _rank_key, _scored, _uses_host, build, pareto_front, parse_budget, plan,
    verify_candidate,
)
from memlab.planner.space import (  # noqa: F401
    LORA_RANK, OBJECTIVES, REMAT_POLICIES, TASK_ALIASES, TASKS, Candidate, _config, _kv_options,
    candidates, check_task,
)


def _weight_facts(fact: str) -> dict:
    from memlab.quant.formats import WEIGHT_FORMATS
    facts = {n: WEIGHT_FORMATS.fact(n, fact, None) for n in WEIGHT_FORMATS.names()}
    return {n: v for n, v in facts.items() if v is not None}


def _deprecated_tables() -> dict:
    from memlab.kv.base import POLICIES
    from memlab.optim import OPTIMIZERS
    from memlab.passes import PASSES
    from memlab.planner import space
    return {
        "WEIGHT_LOSS": lambda: _weight_facts("quality_loss"),
        "QUANT_COMPUTE_PENALTY": lambda: _weight_facts("compute_penalty"),
        "WEIGHT_FORMATS": lambda: space.planned_formats("finetune"),
        "TRAIN_OPTIMIZERS": lambda: space.planned_optimizers("train"),
        "BLOCKWISE_OPTIMIZERS": lambda: tuple(n for n in OPTIMIZERS.names()
                                              if space.blockwise_state(n)),
        "OPTIMIZER_LOSS": lambda: {n: OPTIMIZERS.fact(n, "quality_loss") for n in OPTIMIZERS.names()
                                   if OPTIMIZERS.has_fact(n, "quality_loss")},
        "LORA_LOSS": lambda: PASSES.fact("lora", "quality_loss"),
        "KV_LOSS": lambda: {n: POLICIES.fact(n, "quality_loss") for n in POLICIES.names()
                            if POLICIES.has_fact(n, "quality_loss")},
    }


def __getattr__(name: str):
    tables = _deprecated_tables()
    if name in tables:
        warnings.warn(f"memlab.memory.plan.{name} is deprecated: the planner reads each "
                      "extension's registered facts (memlab.facts; memlab.planner.cost lists "
                      "them)", DeprecationWarning, stacklevel=2)
        return tables[name]()
    raise AttributeError(f"module 'memlab.memory.plan' has no attribute {name!r}")
