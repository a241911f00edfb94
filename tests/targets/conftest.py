"""Tests that compile for an H100 and a TPU v5e on this CPU-only machine (``make test-targets``).

They need the targets environment (``make targets-env``: the CUDA plugin matching
jaxlib, cuDNN, ptxas and libtpu).  Run anywhere else they fail at collection with
the install command: a compile check that silently skips proves nothing.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # register the compilers, start no GPU runtime

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")
# compile-only executables cannot be stored or read back by the persistent cache
jax.config.update("jax_enable_compilation_cache", False)

import memlab as ml  # noqa: E402

for _platform in ("cuda", "tpu"):
    try:
        ml.targets.environment(_platform)
    except ml.targets.TargetUnavailable as e:
        raise pytest.UsageError(f"tests/targets needs the targets environment: {e}") from e


@pytest.fixture(scope="session")
def h100():
    return ml.targets.get("h100")


@pytest.fixture(scope="session")
def v5e():
    return ml.targets.get("v5e")
