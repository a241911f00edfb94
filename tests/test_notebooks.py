"""Notebooks execute top to bottom (nbclient), so the tour never rots."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))
# what each notebook must print, so a silently broken cell cannot pass
EXPECT = {"tour.ipynb": ["Paris", "kv_cache"], "quantize.ipynb": ["4.127", "Paris", "llm.int8()"],
          "kv_cache.ipynb": ["B/token", "Paris", "paged waste", "decoded tokens"],
          "training_memory.ipynb": ["resume bit-exact: True True", "exact==analytic True",
                                    "cuts activation temp", "x less"],
          "bring_your_own_model.ipynb": ["model.safetensors.index.json", "llama 30 layers",
                                         "Paris", "-> int8", "same logits on reload: True"],
          "plan.ipynb": ["Pareto front", "fused update", "offload(k=", "headinfer", "no plan fits",
                         "compiled device"]}
# compile-bound notebooks (tiny models; what they print is compiled memory_analysis() and exact
# bytes): the kernel skips LLVM's optimization of the generated code, which XLA's buffer
# assignment (every byte number) does not depend on; ~45% less time, outputs identical
COMPILE_BOUND = {"training_memory.ipynb"}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, monkeypatch):
    # the kernel shares the suite's persistent compilation cache (tests/conftest.py): a program
    # compiled twice (the notebooks' repeated train steps, the same SmolLM2 generate in several
    # notebooks, what other tests compiled) is compiled once; the notebook itself is unchanged
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if name in COMPILE_BOUND:
        flags = os.environ.get("XLA_FLAGS", "")
        monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_backend_optimization_level=0".strip())
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    for needle in EXPECT.get(name, []):
        assert needle in text, (name, needle)
