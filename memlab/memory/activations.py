"""Activation (temp) bytes of a compiled step, per remat policy: a calibrated closed form.

Chen et al. 2016 ("Training Deep Nets with Sublinear Memory Cost") and Korthikanti
et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
what each checkpointing policy keeps per token and layer; this module does the same
for memlab's Llama (layers under ``nn.scan``, chunked attention, chunked loss) and
adds what XLA's memory-optimized scheduler keeps beside it.  The model of XLA's
``temp_size_in_bytes`` for a training step (B rows of T tokens, L layers)::

    temp = a[opt] * P_layers + A_OTHER * P_other               gradients + update temporaries
         + L * B * T * sigma[policy] * saved(policy) * cs      residuals kept across layers
         + max(backward, loss workspace) + c0[policy]
    backward = B * T * kappa[policy] * work * 4                one layer's recompute + backward
         + ATT_BLOCKS * B * H * min(T, 512) * min(T, 1024) * 4 chunked-attention score blocks
         + loss residual                                       (:func:`loss_bytes`)

with ``saved`` the activation elements per token the policy keeps (``d`` for the
layer input when nothing is saveable; q/k/v/o and the MLP projections for
``dots_with_no_batch_dims_saveable``; the named tensors for ``save:``), ``work =
10 d + 5 d_ff`` the elements a layer's backward touches per token, ``cs`` the compute
itemsize, ``P_layers``/``P_other`` the trainable parameters inside/outside the
scanned layers whose update runs on the device.  The peak is inside the layers'
backward; the loss has run before it, so only what the loss leaves behind (the
float32 hidden-state gradient; for the naive loss also the compute-dtype logits
gradient) adds to it, and its logit workspace counts only where it is larger than
the backward.

Fit (:func:`fit`, least squares per remat family with ``a[opt]`` and ``A_OTHER``
held at the values below): 24 XLA:CPU compiles (memory-optimized scheduler) of the
bf16 Llama with d=256, d_ff=688, 4 MHA heads of 64, V=1000, chunked loss, AdamW,
L in {2, 4} x (B, T) in {(2, 256), (2, 512), (4, 512)} for each of nothing_saveable,
dots_with_no_batch_dims_saveable, save:qkv,attn_out,mlp_hidden and no remat.
``experiments/plan.py`` validates on three held-out shapes and at 7B and writes the
errors to ``results/plan.json``.

Inference (decode of one token over a cache of S slots; :func:`decode_temp`)::

    temp = 2 * B * V * 4 (logits) + max(attention, dequantized gate + up, dequantized head)
    attention = B * H * min(S, 1024) * 4 * 2 (score chunk)
              + one layer's cache (a quantized cache's append copies the layer slice)
              + that layer's K, V dequantized to float32 (KIVI's XLA path: XLA:CPU only)

On the held-out decode shapes with KIVI the float32 dequantized K and V of one layer
(``2 * B * (S_q + R) * Hkv * D * 4``) and the rewritten layer slice are nearly all of the
temp; with int8 weights at long context the float32 copy of the int8 LM head
(``V * d * 4``) is the whole temp and the attention phase shares its memory.

The constants above are XLA:CPU's.  Each compiler gets its own :class:`Calibration`
(:func:`calibration`): XLA:GPU's constants were fitted the same way on compiles for an
H100 (:mod:`memlab.targets`), with the features its kernels imply (the flash and
cut-cross-entropy kernels keep no score or logit blocks; the saved inputs stay in the
compute dtype).  The planner scores with the calibration of the device it plans for and
verifies its winner by compiling for that device.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Iterable, Optional

import jax.numpy as jnp
import numpy as np



class UpdateBytes(Mapping):
    """``a[opt]`` of one compiler: bytes per trainable layer param of the gradient and the
    update's temporaries, read from each optimizer's registered ``update_bytes`` fact
    (``{platform: bytes}``, measured: memlab/measured.json, written by
    ``experiments/facts.py``; XLA:CPU's are slopes over 2 -> 4 layers at d=256, the
    blockwise 8/4-bit states' from the llama2-7b step, XLA:GPU's from ``experiments/plan.py
    --target=h100 --fit``).  An optimizer registered without it raises
    :class:`memlab.facts.MissingFact`."""

    def __init__(self, platform: str):
        self.platform = platform

    def __getitem__(self, optimizer: str) -> float:
        from memlab import facts
        from memlab.optim import OPTIMIZERS
        if optimizer not in OPTIMIZERS:
            raise KeyError(optimizer)
        by = OPTIMIZERS.fact(optimizer, "update_bytes")
        if self.platform not in by:
            raise facts.MissingFact("optimizer", optimizer, f"update_bytes[{self.platform!r}]",
                                    getattr(OPTIMIZERS.get(optimizer), "__module__", None),
                                    f"it has {sorted(by)}")
        return float(by[self.platform])

    def __iter__(self):
        from memlab.optim import OPTIMIZERS
        return iter([n for n in OPTIMIZERS.names() if OPTIMIZERS.has_fact(n, "update_bytes")])

    def __len__(self) -> int:
        return len(list(iter(self)))


# the fitted constants (see the module docstring; refit with ``fit``)
# a[opt]: XLA:CPU's bytes per trainable layer param (the optimizers' ``update_bytes`` facts)
OPT_BYTES_PER_PARAM = UpdateBytes("cpu")
A_OTHER = 0.57  # bytes per trainable embedding / head param (measured: V 1000 -> 8000)
# sigma, kappa, c0: fit(points, hold_a={"adamw": 6.35}) over the 24 d=256 compiles of the
# module docstring (the loss as the residual of loss_bytes); none, dots and save refit for
# the flattened projections and the gated unit's VJP, nothing_saveable kept from the earlier fit
SIGMA = {"none": 2.217, "nothing_saveable": 1.0, "dots_with_no_batch_dims_saveable": 1.793,
         "dots_saveable": 1.793, "save": 1.954, "offload": 1.0}
KAPPA = {"none": 0.751, "nothing_saveable": 0.893, "dots_with_no_batch_dims_saveable": 0.976,
         "dots_saveable": 0.976, "save": 0.925, "offload": 0.925}
C0 = {"none": 4.25e6, "nothing_saveable": 1.43e6, "dots_with_no_batch_dims_saveable": 4.11e6,
      "dots_saveable": 4.11e6, "save": 4.11e6, "offload": 4.11e6}
ATT_BLOCKS = 2  # float32 [B, H, q_chunk, kv_chunk] score blocks live at once (s and p or ds)
Q_CHUNK, KV_CHUNK = 512, 1024  # memlab_kernels.chunked_attention defaults
LOSS_CHUNK, LOSS_VOCAB_CHUNK = 1024, 2048  # memlab.nn.cross_entropy "chunked" defaults


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The training-temp model's constants for one backend's compiler (see :func:`fit`),
    and which of XLA:CPU's habits the features include.

    ``saved_float32``: XLA:CPU slices ``nothing_saveable``'s layer inputs from a float32
    copy of the stack; ``attention_blocks``: float32 score blocks of the chunked XLA
    attention live at once (0 where a fused attention kernel runs); ``loss_blocks``: the
    chunked loss's logit blocks (False where the cut-cross-entropy kernel runs)."""

    platform: str
    opt_bytes_per_param: dict
    a_other: float
    sigma: dict
    kappa: dict
    c0: dict
    attention_blocks: float
    saved_float32: bool
    loss_blocks: bool


CPU = Calibration("cpu", OPT_BYTES_PER_PARAM, A_OTHER, SIGMA, KAPPA, C0, ATT_BLOCKS, True, True)
# XLA:GPU (compiled for an H100 with memlab.targets): the flash and cut-cross-entropy
# kernels keep their tiles on chip and the saved inputs stay in the compute dtype.
# Fitted (``experiments/plan.py --target=h100 --fit``: the 54 d=256 compiles of the CPU fit
# and of the other optimizers under nothing_saveable; results/plan.json by_target.h100.fit).
# Families not fitted take their neighbour's values, as on CPU.
GPU_HABITS = dict(attention_blocks=0.0, saved_float32=False, loss_blocks=False)
_GPU_SIGMA = {"none": 1.561, "nothing_saveable": 1.0, "dots_with_no_batch_dims_saveable": 1.096,
              "dots_saveable": 1.096, "save": 1.064, "offload": 1.0}
_GPU_KAPPA = {"none": 0.387, "nothing_saveable": 0.502, "dots_with_no_batch_dims_saveable": 0.336,
              "dots_saveable": 0.336, "save": 0.491, "offload": 0.491}
_GPU_C0 = {"none": 5.13e6, "nothing_saveable": 4.41e6, "dots_with_no_batch_dims_saveable": 2.70e6,
           "dots_saveable": 2.70e6, "save": 3.68e6, "offload": 3.68e6}
GPU = Calibration("gpu", UpdateBytes("gpu"), A_OTHER, _GPU_SIGMA, _GPU_KAPPA, _GPU_C0, **GPU_HABITS)
# XLA:TPU is not fitted: at the d=256 fitting shapes its temp is not linear in the terms
# (0 bytes at several points, where on-chip memory holds the step's temporaries), so TPU
# plans are scored with XLA:CPU's constants and checked by compiling for the TPU.
CALIBRATIONS = {"cpu": CPU, "gpu": GPU}


def calibration(platform: str) -> Calibration:
    """The :class:`Calibration` of ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``): XLA:CPU's
    for a backend that has not been fitted."""
    return CALIBRATIONS.get(platform, CPU)


def policy_family(policy: Optional[str]) -> str:
    """The key of the fitted tables for a remat policy name (None = no remat)."""
    if policy is None:
        return "none"
    if policy.startswith("save:"):
        return "offload" if ";offload:" in policy else "save"
    if policy.startswith("offload"):
        return "offload"
    return policy


def _named(policy: str, cfg) -> float:
    """Elements per token of the activations a ``save:``/``offload:`` policy names."""
    from memlab.models.llama import remat_names
    kv = cfg.n_kv_heads * cfg.head_dim
    size = {"qkv": cfg.n_heads * cfg.head_dim + 2 * kv, "attn_out": cfg.n_heads * cfg.head_dim,
            "mlp_hidden": cfg.d_ff}
    names = remat_names(policy)
    return {k: float(sum(size[n] for n in v)) for k, v in names.items()}


def saved_elements(policy: Optional[str], cfg) -> tuple:
    """(device, host) activation elements per token and layer kept for the backward."""
    d, f = cfg.d_model, cfg.d_ff
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    fam = policy_family(policy)
    if fam == "nothing_saveable":
        return float(d), 0.0
    if fam == "dots_with_no_batch_dims_saveable":  # x + q, k, v, o, gate, up, down outputs
        return float(d + q + 2 * kv + d + 2 * f + d), 0.0
    if fam == "dots_saveable":
        return float(d + q + 2 * kv + d + 2 * f + d + q), 0.0
    if fam == "offload_dots_with_no_batch_dims":
        return float(d), float(q + 2 * kv + d + 2 * f + d)
    if fam == "none":  # everything the layer computes: norms, projections, gate, up, hidden
        return float(6 * d + q + 2 * kv + 3 * f), 0.0
    named = _named(policy, cfg)
    return float(d + named.get("save", 0.0)), named.get("offload", 0.0)


def work_elements(cfg) -> float:
    """Elements per token that one layer's recompute and backward touch."""
    return float(10 * cfg.d_model + 5 * cfg.d_ff)


def _itemsize(dtype) -> int:
    return jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class TrainFeatures:
    """The terms of the training-temp model for one configuration (bytes)."""

    p_layers: float      # trainable layer params updated on the device (count)
    p_other: float       # trainable non-layer params updated on the device (count)
    saved: float         # L * B * T * saved_elements * cs (4 bytes for nothing_saveable)
    saved_host: float    # bytes of offloaded activations (host memory)
    work: float          # B * T * work_elements * 4
    attention: float     # ATT_BLOCKS * score block bytes
    loss: float          # what the loss leaves live through the layers' backward
    family: str
    loss_phase: float = 0.0  # the loss's own workspace, live before the layers' backward


def loss_bytes(cfg, tokens: int, loss: str = "chunked", blocks: bool = True) -> tuple:
    """``(residual, workspace)`` bytes of the cross-entropy over ``tokens`` rows.

    The loss runs before the layers' backward, where the step's peak is: its logit
    blocks (``workspace``) are dead by then.  What stays live through the layers'
    backward (``residual``) is the float32 gradient of the final hidden states
    (``tokens * d * 4``) and, for the naive loss, the compute-dtype logits gradient
    ``[tokens, V]`` that the LM head's weight-gradient dot still reads (read off the
    compiled d=192/V=777 and d=320/V=3001 steps: ``bf16[768, V]`` beside the attention
    blocks at the peak).  The chunked loss holds ``2 * chunk * vocab_chunk`` float32
    logits while it runs; the naive one three ``[tokens, V]`` float32 arrays.
    """
    cs = _itemsize(cfg.dtype)
    hidden = tokens * cfg.d_model * 4.0
    if loss == "naive":
        return hidden + tokens * cfg.vocab_size * cs, 3.0 * tokens * cfg.vocab_size * 4 + hidden
    if not blocks:  # the cut-cross-entropy kernel keeps its logit tiles on chip
        return hidden, hidden
    block = 2.0 * min(tokens, LOSS_CHUNK) * min(cfg.vocab_size, LOSS_VOCAB_CHUNK) * 4
    return hidden, block + hidden


def train_features(cfg, batch: int, seq: int, policy: Optional[str], *, p_layers: float,
                   p_other: float, loss: str = "chunked", dequant_bytes: float = 0.0,
                   platform: str = "cpu") -> TrainFeatures:
    """The features of one training step.  ``dequant_bytes``: the dequantized base
    weights a quantized (QLoRA) layer holds at once -- one matmul's at a time, not the
    layer's (the NF4 d=448 and llama2-7b steps held only ``gate_proj``'s at their peak).

    Nothing saveable keeps only the layer inputs, ``[L, B*T, d]``: XLA:CPU's backward
    slices them from a float32 copy of that stack (``f32[L, B*T, d]`` at the peak of the
    d=448 and llama2-7b steps, the compute-dtype stack dead by then), so they count at 4
    bytes; the other policies' ``sigma`` (fitted, 1.8-2.7) holds their float32 copies.
    """
    cal = calibration(platform)
    cs = _itemsize(cfg.dtype)
    dev, host = saved_elements(policy, cfg)
    tokens = batch * seq
    saved_b = 4 if policy_family(policy) == "nothing_saveable" and cal.saved_float32 else cs
    saved = cfg.n_layers * tokens * dev * saved_b
    saved_host = cfg.n_layers * tokens * host * cs
    work = tokens * work_elements(cfg) * 4 + dequant_bytes
    # score blocks of the chunked attention; soft-capped attention (Gemma 2,
    # memlab.nn.attention.softcap_attention) materializes the whole [T, T] scores instead
    q_block, kv_block = (seq, seq) if getattr(cfg, "attn_softcap", None) is not None else (
        min(seq, Q_CHUNK), min(seq, KV_CHUNK))
    att = cal.attention_blocks * batch * cfg.n_heads * q_block * kv_block * 4
    resid, phase = loss_bytes(cfg, tokens, loss, blocks=cal.loss_blocks)
    return TrainFeatures(float(p_layers), float(p_other), float(saved), float(saved_host),
                         float(work), float(att), float(resid), policy_family(policy),
                         float(phase))


def train_temp(f: TrainFeatures, optimizer: Optional[str], platform: str = "cpu") -> float:
    """Predicted XLA temp bytes of a training step on the device: the state terms plus
    the larger of the layers' backward (recompute work, score blocks, the loss's residual)
    and the loss's own workspace (``platform``'s :class:`Calibration`)."""
    cal = calibration(platform)
    a = cal.opt_bytes_per_param[optimizer or "adamw"]
    fam = f.family if f.family in cal.sigma else "save"
    backward = cal.kappa[fam] * f.work + f.attention + f.loss
    return (a * f.p_layers + cal.a_other * f.p_other + cal.sigma[fam] * f.saved
            + max(backward, f.loss_phase) + cal.c0[fam])


def host_update_bytes(optimizer: Optional[str], p_layers: float, p_other: float,
                      grad_itemsize: int) -> float:
    """Host temporaries of an optimizer update that runs in host memory (layer streaming
    with the state on host, ``ml.passes.offload(optimizer_state=True)``): ``a[opt]`` per
    layer param less the gradient itself (already host memory), ``A_OTHER`` per other
    trainable param; the host's compiler is XLA:CPU."""
    a = OPT_BYTES_PER_PARAM[optimizer or "adamw"]
    return max(a - grad_itemsize, 0.0) * p_layers + A_OTHER * p_other


def fused_temp(cfg, update_bytes: float, batch: int, seq: int, loss: str = "chunked",
               platform: str = "cpu") -> float:
    """Predicted XLA temp bytes of the fused backward-update step (:mod:`memlab.fused`,
    LOMO): the layers' saved inputs (compute dtype) and the non-layer gradients, plus the
    larger of one layer's recompute and backward (the ``nothing_saveable`` terms, with the
    layer's float32 weight gradient at its end) and that layer's update,
    ``update_bytes`` per layer param (the optimizer's ``fused_update_bytes`` fact), which
    run one after the other."""
    p_layer = cfg.layer_param_count()
    p_other = cfg.param_count() - cfg.n_layers * p_layer
    cal = calibration(platform)
    f = train_features(cfg, batch, seq, "nothing_saveable", p_layers=p_layer,
                       p_other=p_other, loss=loss, platform=platform)
    saved = cfg.n_layers * batch * seq * cfg.d_model * _itemsize(cfg.dtype)
    backward = max(cal.kappa["nothing_saveable"] * f.work + f.attention + f.loss, f.loss_phase)
    update = float(update_bytes) * p_layer
    grad = 4.0 * p_layer  # the layer's float32 weight gradient, live at the end of its backward
    return float(saved + cal.a_other * p_other + max(backward + grad, update)
                 + cal.c0["nothing_saveable"])


def decode_temp(cfg, batch: int, seq: int, *, kv_layer_bytes: float = 0.0,
                kv_dequant_layer_bytes: float = 0.0, weights_dequant_bytes: float = 0.0,
                head_dequant_bytes: float = 0.0, score_slots: Optional[int] = None) -> float:
    """Predicted XLA temp bytes of one decode step (see the module docstring).

    The layers run one after another under the scan, so the phases of a layer do not
    add up: the temp is the logits plus the largest of

    * attention: ``kv_layer_bytes`` (a quantized cache's append rewrites the layer's
      slice of the stacked cache into a new buffer), ``kv_dequant_layer_bytes`` (the
      XLA path of a quantized cache dequantizes the layer's keys and values to
      float32 before attending) and the float32 scores over ``score_slots``;
    * the weights: quantized matrices are dequantized one matmul at a time
      (``weights_dequant_bytes``: the MLP's gate and up projections, which SwiGLU
      needs together);
    * the head: a quantized LM head dequantized (``head_dequant_bytes``; float32
      for the float32 logits).
    """
    logits = 2.0 * batch * cfg.vocab_size * 4
    slots = min(seq, KV_CHUNK) if score_slots is None else score_slots
    scores = 2.0 * batch * cfg.n_heads * slots * 4
    attention = scores + kv_layer_bytes + kv_dequant_layer_bytes
    return logits + max(attention, weights_dequant_bytes, head_dequant_bytes) + DECODE_C0


DECODE_C0 = 0.0


def prefill_temp(cfg, batch: int, seq: int, *, dequant_layer_bytes: float = 0.0) -> float:
    """Predicted XLA temp bytes of a prefill of ``seq`` tokens: one layer's forward
    working set, the score blocks and the last position's logits."""
    cs = _itemsize(cfg.dtype)
    tokens = batch * seq
    work = tokens * (4 * cfg.d_model + 3 * cfg.d_ff) * cs
    att = 2 * batch * cfg.n_heads * min(seq, Q_CHUNK) * min(seq, KV_CHUNK) * 4
    return work + att + batch * cfg.vocab_size * 4 + 2 * dequant_layer_bytes


def fit(points: Iterable[tuple], hold_a: Optional[dict] = None) -> dict:
    """Refit the training-temp constants from ``(features, optimizer, temp)`` points.

    Per remat family: ``c0`` and ``kappa`` by least squares over its points (sigma
    fixed at 1 for ``nothing_saveable``, else fitted too when the family has >= 3
    points); ``a[opt]`` from ``nothing_saveable`` points only, unless ``hold_a``
    (``{optimizer: bytes per param}``) holds it (how the tables above were fitted).
    Points are taken in the backward-bound regime (the loss workspace smaller than
    the backward), where the model is linear.  Returns the tables.
    """
    pts = list(points)
    out = {"a": dict(hold_a or {}), "sigma": {}, "kappa": {}, "c0": {}}
    ns = [(f, o, t) for f, o, t in pts if f.family == "nothing_saveable"]
    by_opt: dict = {}
    for f, o, t in ns:
        by_opt.setdefault(o, []).append((f, t))
    for o, rows in by_opt.items():  # unknowns: a[o], kappa, c0 (sigma = 1)
        held = hold_a is not None and o in hold_a
        X = np.array([([] if held else [f.p_layers]) + [f.work, 1.0] for f, _ in rows])
        y = np.array([t - A_OTHER * f.p_other - f.saved - f.attention - f.loss
                      - (hold_a[o] * f.p_layers if held else 0.0) for f, t in rows])
        if len(rows) >= 3 or (held and len(rows) >= 2):
            sol = np.linalg.lstsq(X, y, rcond=None)[0]
            if not held:
                out["a"][o] = float(sol[0])
            if o == "adamw":
                kappa, c0 = map(float, sol[-2:])
                out["kappa"]["nothing_saveable"], out["c0"]["nothing_saveable"] = kappa, c0
        elif len(rows) == 2 and not held:  # slope in the layer count: a only
            (f1, t1), (f2, t2) = rows
            out["a"][o] = float(((t2 - t1) - (f2.saved - f1.saved)) / (f2.p_layers - f1.p_layers))
    a = out["a"].get("adamw", OPT_BYTES_PER_PARAM["adamw"])
    fams = {f.family for f, _, _ in pts} - {"nothing_saveable"}
    for fam in fams:
        rows = [(f, t) for f, o, t in pts if f.family == fam and o == "adamw"]
        if len(rows) < 3:
            continue
        X = np.array([[f.saved, f.work, 1.0] for f, _ in rows])
        y = np.array([t - a * f.p_layers - A_OTHER * f.p_other - f.attention - f.loss
                      for f, t in rows])
        s, k, c = np.linalg.lstsq(X, y, rcond=None)[0]
        out["sigma"][fam], out["kappa"][fam], out["c0"][fam] = float(s), float(k), float(c)
    return out
