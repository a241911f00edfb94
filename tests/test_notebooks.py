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
          "plan.ipynb": ["Pareto front", "offload(k=", "headinfer", "no plan fits",
                         "compiled device"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name):
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
