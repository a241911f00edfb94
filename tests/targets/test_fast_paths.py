"""SmolLM2's own steps reach the fast attention kernels when compiled for an H100 and a v5e.

The model calls attention with ``causal=True`` and default positions when it has
no cache (train) or a fresh one (prefill), so cuDNN fused attention (or the flash
kernel with causal block skipping) can run; a decode step goes through the split-K
decode kernel.  Checked on the optimized HLO of the real steps (``profile``'s
``attention`` field is read from ``compiled.as_text()``), not on the dispatcher's
word.
"""
import pytest

import memlab as ml


@pytest.fixture(scope="module")
def smollm2_bf16():
    return ml.compose(ml.passes.cast("bfloat16", compute=True))(ml.models.abstract("smollm2-135m"))


@pytest.mark.parametrize("task,want", [
    ("train", {"cudnn"}), ("prefill", {"cudnn"}), ("decode", {"decode_pallas_triton"})])
def test_smollm2_steps_reach_cudnn_and_split_k_on_h100(smollm2_bf16, task, want):
    r = ml.memory.profile(smollm2_bf16, task, batch=2, seq=256, target="h100")
    assert set(r.attention) == want, (task, r.attention)


@pytest.mark.parametrize("task,want", [
    ("prefill", {"pallas_tpu"}), ("decode", {"decode_pallas_tpu"})])
def test_smollm2_steps_reach_mosaic_kernels_on_v5e(smollm2_bf16, task, want):
    r = ml.memory.profile(smollm2_bf16, task, batch=2, seq=256, target="v5e")
    assert set(r.attention) == want, (task, r.attention)
