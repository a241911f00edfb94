"""memlab: fit models that do not fit, with composable passes measured by XLA.

    import memlab as ml
    model = ml.models.load("smollm2-135m")
    small = ml.compose(ml.passes.cast("bfloat16"))(model)
    print(ml.memory.profile(small, task="decode", batch=1, seq=2048).table())
"""
from memlab import _xla_flags

_xla_flags.apply()

from memlab.model import Model, Pass, Rules, compose, map_params, param_paths, path_str  # noqa: E402
from memlab import memory, models, nn, passes  # noqa: E402
from memlab import shard  # noqa: E402
from memlab import fused  # noqa: E402
from memlab import cache, dispatch, targets  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Model", "Pass", "Rules", "compose", "map_params", "param_paths", "path_str",
           "memory", "models", "nn", "passes", "shard", "fused", "cache", "dispatch", "targets"]
