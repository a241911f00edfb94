"""Shared fixtures; the persistent compilation cache keeps reruns fast."""
import os

import jax
import pytest

# 8 simulated CPU devices for the sharding tests (tests/test_shard.py); must be set before
# JAX initializes its backend.  Unsharded code still runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)

import memlab as ml  # noqa: F401  (sets the CPU memory-optimized scheduler flag first)

_CACHE = os.environ.get("MEMLAB_TEST_JAX_CACHE",
                        os.path.join(os.path.dirname(__file__), "..", ".cache", "jax"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in float32 (loaded once per worker)."""
    return ml.models.load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny():
    return ml.models.init("tiny", jax.random.key(7))
