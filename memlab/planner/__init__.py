"""The memory planner: the fastest (or most accurate) composition of passes that fits a budget.

    plan = ml.memory.plan("llama2-7b", "train", "24GB")      # memlab.planner.plan

* :mod:`memlab.planner.space` -- the search space (:class:`Candidate`,
  :func:`candidates`), drawn from the registered extensions that say they are planned;
* :mod:`memlab.planner.cost` -- the cost model (:func:`estimate`: the candidate's
  passes' own byte estimates and the activation model; :func:`step_seconds`;
  :func:`quality_loss` from the extensions' registered facts, :mod:`memlab.facts`);
* :mod:`memlab.planner.search` -- pruning, ranking, verification by compiling
  (:func:`plan`, :class:`Plan`, :class:`NoPlanError`).

:mod:`memlab.memory.plan` re-exports all of it (``ml.memory.plan`` is :func:`plan`).
"""
from memlab.planner.cost import Estimate, estimate, quality_loss, step_seconds  # noqa: F401
from memlab.planner.search import (  # noqa: F401
    NoPlanError, Plan, Verification, build, pareto_front, parse_budget, plan, verify_candidate,
)
from memlab.planner.space import Candidate, candidates, check_task  # noqa: F401
