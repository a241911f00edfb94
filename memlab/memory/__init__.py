"""Memory: exact pytree bytes, analytic estimates, and XLA-compiled profiles."""
from memlab.memory.bytes import abstractify, array_bytes, fmt_bytes, tree_bytes  # noqa: F401
from memlab.memory.estimate import bytes_by_category  # noqa: F401
from memlab.memory.profile import MemoryReport, loss_fn, next_token_loss, profile, train_step_fn  # noqa: F401
from memlab.memory import plan as planner  # noqa: E402,F401  (the module; `plan` is the function)
from memlab.memory.plan import NoPlanError, Plan, parse_budget, plan  # noqa: E402,F401
