"""The memory planner: the fastest (or most accurate) composition of passes that fits a budget.

ProTrain (Yang et al. 2024, "ProTrain: Efficient LLM Training via Memory-Aware
Techniques") searches checkpointing, offloading and sharding settings with a
memory and runtime model, then runs the best; ZeRO (Rajbhandari et al. 2020),
Superpipeline (Abbasi et al. 2024) and HeadInfer (Luo et al. 2025) supply the
sharding, layer streaming and host-KV pieces.  Here::

    plan = ml.memory.plan("llama2-7b", "train", "24GB")
    model = plan.passes(ml.models.abstract("llama2-7b"))     # the chosen ml.compose(...)
    print(plan.table())

1. **Search space** (:func:`candidates`): weight format (``bf16`` / ``int8`` /
   ``nf4``), remat policy, optimizer (``ml.optim`` names), chunked or naive loss,
   layer streaming ``offload(k, p)`` (with the optimizer state and gradients in
   host memory when training), the fused backward-update (:mod:`memlab.fused`, LOMO:
   each layer updated inside the backward, no whole-model gradient; resident, or with
   the layers and their optimizer state in host memory and the update on the device),
   KV policy and budget for inference (dense, KIVI-4/2,
   SnapKV budgets, HeadInfer), FSDP / DP when ``devices > 1``.  ``task="train"``
   is *full* training: every parameter updates, so weights stay in the model's
   float dtype; ``task="finetune"`` is LoRA (rank 16 on every linear layer) over
   a bf16 / int8 / NF4 (QLoRA) base.  ``"decode"`` (alias ``"inference"``) is one
   token over a ``seq``-slot cache; ``"prefill"`` writes ``seq`` tokens.
2. **Score** (:func:`estimate`): exact bytes from each pass's ``estimate`` (quantize,
   LoRA, KV policy, offload) and :mod:`memlab.memory.activations` for XLA's
   temp; device bytes exclude what lives in host memory.  Step time
   (:func:`step_seconds`) from FLOPs and bytes at the constants below; expected
   quality loss (:data:`WEIGHT_LOSS`, :data:`KV_LOSS`, :data:`OPTIMIZER_LOSS`).
3. **Prune and rank**: keep candidates whose device bytes fit the budget; rank
   by step time (``objective="speed"``) or quality loss (``"quality"``).
4. **Verify** the first ``verify`` of the ranking by building the composed model
   on abstract shapes and compiling with :func:`memlab.memory.profile`; the plan
   is the best verified candidate whose *compiled* device bytes fit.  Compiled
   device bytes are ``argument + output - alias + temp - host``: XLA:CPU has one
   memory and drops host placements inside the program, so ``host`` (params,
   gradients, optimizer state and its update, KV cache and activations placed in
   ``pinned_host``) comes from the formulas, not from XLA.  ``target=``
   (:mod:`memlab.targets`) verifies by compiling for that GPU or TPU on this machine
   instead: the device bytes are XLA:GPU's / XLA:TPU's own buffer assignment, the host
   part XLA's ``host_*`` numbers, and the activation model is the target compiler's
   calibration (:func:`memlab.memory.activations.calibration`).  Tensor parallelism joins
   FSDP / DP for inference when the heads divide the devices.

Speed constants (an H100-class accelerator; documented, not measured here):
:data:`PEAK_FLOPS`, :data:`HBM_BYTES_PER_S`, :data:`HOST_LINK_BYTES_PER_S`,
:data:`HOST_MEM_BYTES_PER_S`, :data:`INTERCONNECT_BYTES_PER_S`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from memlab.memory import activations as act
from memlab.memory.bytes import tree_bytes

# --- step-time constants (H100-class accelerator, PCIe host link) -------------------
PEAK_FLOPS = 400e12              # sustained dense bf16 FLOP/s (about 40% of H100 SXM peak)
HBM_BYTES_PER_S = 2.0e12         # device memory bandwidth
HOST_LINK_BYTES_PER_S = 25e9     # host <-> device (PCIe 4.0 x16, effective)
HOST_MEM_BYTES_PER_S = 50e9      # host DRAM bandwidth for the host optimizer update
INTERCONNECT_BYTES_PER_S = 100e9  # device <-> device (collectives of FSDP / DP)
QUANT_COMPUTE_PENALTY = {"bf16": 1.0, "int8": 1.05, "nf4": 1.15}  # dequantization overhead

# --- expected quality loss (relative perplexity increase) ---------------------------
# memlab's own measurements on SmolLM2-135M (results/quantize.json: float 36.604;
# rtn-int8 36.555, rtn-nf4-b64-dq 45.284; results/kv_compress.json: dense-bf16 32.197,
# kivi4 32.286, kivi2 37.833, snapkv budget 102 of 512 -> 36.938).  Embedded here: the
# planner never reads results/ at run time.
# int8 measured -0.13% (noise): counted as +0.1% so that exact weights win ties
WEIGHT_LOSS = {"bf16": 0.0, "int8": 0.001, "nf4": (45.284 - 36.604) / 36.604}
KV_LOSS = {"dense": 0.0, "headinfer": 0.0, "kivi4": (32.286 - 32.197) / 32.197,
           "kivi2": (37.833 - 32.197) / 32.197}
SNAPKV_LOSS_AT_20PCT = (36.938 - 32.197) / 32.197  # SnapKV keeping 102 of 512 tokens
# Optimizers: not measured by memlab at scale -- an ordering prior from the papers
# (8-bit/4-bit Adam match AdamW; GaLore/APOLLO-Mini trail slightly; LoRA trails full
# training).  Used only to order plans, reported as a prior.
OPTIMIZER_LOSS = {"adamw": 0.0, "adam8bit": 0.001, "adamw8bit": 0.001, "adam4bit": 0.002,
                  "adamw4bit": 0.002, "came": 0.003, "apollo": 0.005, "galore": 0.01,
                  "apollo_mini": 0.01, "sgd": 0.05}
LORA_LOSS = 0.02

TASKS = ("train", "finetune", "prefill", "decode")
TASK_ALIASES = {"inference": "decode", "infer": "decode", "full": "train", "lora": "finetune",
                "qlora": "finetune"}
OBJECTIVES = ("speed", "quality")
TRAIN_OPTIMIZERS = ("adamw", "adamw8bit", "adam4bit", "came", "apollo", "galore", "apollo_mini")
REMAT_POLICIES = (None, "dots_with_no_batch_dims_saveable", "save:qkv,attn_out,mlp_hidden",
                  "nothing_saveable", "offload:qkv,attn_out,mlp_hidden")
WEIGHT_FORMATS = ("bf16", "int8", "nf4")
# Block-wise quantized states (8/4-bit Adam) quantize each leaf's flattened elements in
# blocks; under FSDP, GSPMD cannot keep that flattening sharded and every device holds the
# whole gradient in float32 (experiments/targets.py --part=checks), so FSDP plans use the
# optimizers whose state follows the params.
BLOCKWISE_OPTIMIZERS = ("adamw8bit", "adam8bit", "adam4bit", "adamw4bit")
LORA_RANK = 16
MAX_COMPILE_FAILURES = 12  # candidates that fail to compile are skipped, up to this many
MAX_OVER_BUDGET = 4  # more compiles when every verified candidate was over budget

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class NoPlanError(ValueError):
    """No composition of passes fits the budget (the message says the minimum and the
    nearest feasible option)."""

    def __init__(self, message: str, minimum_bytes: int, nearest: Optional[str]):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes
        self.nearest = nearest


def parse_budget(budget: Any) -> int:
    """Bytes from ``24e9``, ``"24GB"`` (10^9), ``"24GiB"`` (2^30), ``"12e9"``, ``"512MiB"``."""
    if isinstance(budget, bool):
        raise TypeError(f"plan: budget must be bytes (int/float) or a string like '24GB', "
                        f"got {budget!r}")
    if isinstance(budget, (int, float)):
        value = float(budget)
    elif isinstance(budget, str):
        m = _BUDGET.match(budget)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"plan: budget {budget!r} is not a size; write e.g. '24GB' (10^9 "
                             "bytes), '24GiB' (2^30), '512MiB' or '12e9' (bytes)")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise TypeError(f"plan: budget must be bytes (int/float) or a string like '24GB', got "
                        f"{type(budget).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"plan: budget must be a positive number of bytes, got {budget!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search space (``None`` = the knob is off)."""

    weights: str = "bf16"
    remat: Optional[str] = None
    optimizer: Optional[str] = None
    lora_rank: int = 0
    loss: str = "chunked"
    kv: Optional[str] = None
    offload: Optional[tuple] = None  # (layers_on_device k, prefetch p)
    shard: Optional[str] = None      # "fsdp" | "dp" over ``devices``
    devices: int = 1
    fused: bool = False              # memlab.fused: each layer updated inside the backward

    def label(self) -> str:
        parts = [self.weights]
        if self.lora_rank:
            parts.append(f"lora{self.lora_rank}")
        if self.optimizer:
            parts.append(self.optimizer)
        if self.remat is not None or self.optimizer:
            parts.append(f"remat={self.remat or 'none'}")
        if self.optimizer:
            parts.append(f"{self.loss} loss")
        if self.fused:
            parts.append("fused update")
        if self.kv:
            parts.append(f"kv={self.kv}")
        if self.offload:
            parts.append(f"offload(k={self.offload[0]},p={self.offload[1]})")
        if self.shard:
            parts.append(f"{self.shard}x{self.devices}")
        return " · ".join(parts)

    @property
    def mesh_axis(self) -> str:
        """The mesh axis a sharded candidate uses: ``"model"`` for tensor parallelism."""
        return "model" if self.shard == "tp" else "data"

    def format_passes(self) -> list:
        """The weight-format and adapter passes (quantize, LoRA), in order."""
        from memlab import passes as P, quant
        out = []
        if self.weights == "int8":
            out.append(P.quantize(quant.int8()))
        elif self.weights == "nf4":
            out.append(P.quantize(quant.nf4(64, double_quant=True)))
        if self.lora_rank:
            out.append(P.lora(self.lora_rank, rules=P.lora.ALL_LINEAR))
        return out

    def passes(self, task: str, mesh=None):
        """The composable passes (``ml.compose``) of this candidate."""
        from memlab import passes as P
        from memlab.model import compose
        out = self.format_passes()
        if self.remat is not None and not self.offload and not self.fused:
            # layer streaming recomputes each block in its own backward (custom_vjp saving
            # only the block inputs): that *is* nothing_saveable, so no remat pass on top
            out.append(P.remat(self.remat))
        if self.kv:
            out.append(P.kv_compress(self.kv))
        if self.offload:
            out.append(P.offload(self.offload[0], self.offload[1],
                                 optimizer_state=task in ("train", "finetune") and not self.fused))
        if self.shard:
            if mesh is None:
                raise ValueError(f"plan: {self.label()} needs a mesh of {self.devices} devices")
            from memlab import shard as sh
            strategy = {"fsdp": sh.fsdp, "dp": sh.dp, "tp": sh.tp}[self.shard](self.mesh_axis)
            out.append(P.shard(mesh, strategy, optimizer=self.optimizer))
        return compose(*out) if out else P.identity()


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The planner's analytic numbers for one candidate."""

    device_bytes: int
    host_bytes: int
    categories: dict
    step_seconds: float
    quality_loss: float
    # what XLA:CPU adds on top (bf16 upcasts, KIVI's float32 dequantized layer); negative for
    # layer streaming, where CPU's single memory holds once what an accelerator holds twice
    cpu_extra_bytes: int = 0


@dataclasses.dataclass
class Verification:
    """A candidate compiled on abstract shapes."""

    candidate: Candidate
    predicted_device_bytes: int
    compiled_peak_bytes: Optional[int] = None   # argument + output - alias + temp (XLA)
    host_bytes: int = 0                          # subtracted: lives in host memory (formulas)
    cpu_extra_bytes: int = 0                     # predicted XLA:CPU-only bytes (bf16 upcasts)
    temp_bytes: Optional[int] = None
    error: Optional[str] = None                  # why it was not compiled / failed
    target: Optional[str] = None                 # memlab.targets name compiled for (None: host)
    compiled_host_bytes: Optional[int] = None    # host peak XLA reports apart (GPU/TPU targets)

    @property
    def compiled_device_bytes(self) -> Optional[int]:
        if self.compiled_peak_bytes is None:
            return None
        return self.compiled_peak_bytes - self.host_bytes

    @property
    def relative_error(self) -> Optional[float]:
        """(predicted - compiled) / compiled, the prediction including the CPU-only bytes."""
        c = self.compiled_device_bytes
        pred = self.predicted_device_bytes + self.cpu_extra_bytes
        return None if c is None else (pred - c) / max(c, 1)

    @property
    def total_error(self) -> Optional[float]:
        """(predicted device + host - compiled peak) / compiled peak: the check that still
        means something when host buffers dominate XLA:CPU's single memory (offload)."""
        if self.compiled_peak_bytes is None:
            return None
        pred = self.predicted_device_bytes + self.host_bytes + self.cpu_extra_bytes
        return (pred - self.compiled_peak_bytes) / max(self.compiled_peak_bytes, 1)

    @property
    def accelerator_bytes(self) -> Optional[int]:
        """Compiled device bytes less the XLA:CPU-only bytes: what must fit the budget."""
        c = self.compiled_device_bytes
        return None if c is None else c - self.cpu_extra_bytes


@dataclasses.dataclass
class Plan:
    """What :func:`plan` found."""

    model: str
    task: str
    budget_bytes: int
    batch: int
    seq: int
    objective: str
    devices: int
    candidate: Candidate
    estimate: Estimate
    passes: Any                      # ml.compose(...) of the chosen candidate
    verified: list                   # [Verification], in ranking order
    front: list                      # [(Candidate, Estimate)] Pareto-optimal, feasible
    considered: int
    feasible: int
    target: Optional[str] = None     # verified by compiling for this memlab.targets device

    @property
    def verification(self) -> Optional[Verification]:
        for v in self.verified:
            if v.candidate == self.candidate:
                return v
        return None

    @property
    def compiled_device_bytes(self) -> Optional[int]:
        v = self.verification
        return None if v is None else v.compiled_device_bytes

    @property
    def confirmed(self) -> bool:
        """The chosen candidate compiled and its compiled device bytes fit the budget."""
        v = self.verification
        return bool(v is not None and v.accelerator_bytes is not None
                    and v.accelerator_bytes <= self.budget_bytes)

    def to_dict(self) -> dict:
        def cand(c):
            return dict(dataclasses.asdict(c), label=c.label())

        def estd(e):
            return dataclasses.asdict(e)

        return {"model": self.model, "task": self.task, "budget_bytes": self.budget_bytes,
                "batch": self.batch, "seq": self.seq, "objective": self.objective,
                "devices": self.devices, "target": self.target, "chosen": cand(self.candidate),
                "estimate": estd(self.estimate),
                "compiled_device_bytes": self.compiled_device_bytes,
                "confirmed_by_compile": self.confirmed,
                "verified": [dict(candidate=v.candidate.label(),
                                  predicted_device_bytes=v.predicted_device_bytes,
                                  cpu_extra_bytes=v.cpu_extra_bytes,
                                  accelerator_bytes=v.accelerator_bytes,
                                  compiled_peak_bytes=v.compiled_peak_bytes,
                                  host_bytes=v.host_bytes,
                                  compiled_device_bytes=v.compiled_device_bytes,
                                  relative_error=v.relative_error,
                                  total_error=v.total_error, error=v.error,
                                  target=v.target, compiled_host_bytes=v.compiled_host_bytes)
                             for v in self.verified],
                "front": [dict(candidate=c.label(), device_bytes=e.device_bytes,
                               step_seconds=e.step_seconds, quality_loss=e.quality_loss)
                          for c, e in self.front],
                "considered": self.considered, "feasible": self.feasible}

    def table(self) -> str:
        e = self.estimate
        lines = [f"plan · {self.model} · {self.task} · batch {self.batch} · seq {self.seq} · "
                 f"budget {gb(self.budget_bytes)} · objective {self.objective}"
                 + (f" · {self.devices} devices" if self.devices > 1 else "")
                 + (f" · verified for {self.target} (compile-only)" if self.target else ""),
                 f"chosen: {self.candidate.label()}"
                 + ("  [fits when compiled]" if self.confirmed else "  [analytic only: not "
                    "confirmed by a compile]"),
                 f"  predicted device {gb(e.device_bytes)} (host {gb(e.host_bytes)})"
                 f" · est. step {e.step_seconds * 1e3:.1f} ms · expected quality loss "
                 f"{e.quality_loss:.2%}"]
        if self.candidate.fused:
            lines.append(f"  train with memlab.fused.step_fn(plan.passes(model), "
                         f"ml.optim.get({self.candidate.optimizer!r})): the fused "
                         "backward-update, no whole-model gradient")
        v = self.verification
        if v is not None and v.compiled_device_bytes is not None and v.target:
            lines.append(f"  compiled for {v.target}: device {gb(v.compiled_device_bytes)}"
                         + (f", host {gb(v.compiled_host_bytes)}" if v.compiled_host_bytes
                            else "") + f" (XLA's own buffer assignment) · error "
                         f"{v.relative_error:+.1%}")
        elif v is not None and v.compiled_device_bytes is not None:
            lines.append(f"  compiled device {gb(v.compiled_device_bytes)} = XLA peak "
                         f"{gb(v.compiled_peak_bytes)} - host {gb(v.host_bytes)} "
                         f"(host part from the formulas) · error {v.relative_error:+.1%}"
                         + (f" · total (device + host) error {v.total_error:+.1%}"
                            if v.host_bytes else ""))
            if v.cpu_extra_bytes:
                lines.append(f"  of which XLA:CPU-only (bf16 upcast, formula) "
                             f"{gb(v.cpu_extra_bytes)}: on the accelerator "
                             f"{gb(v.accelerator_bytes)}")
        lines.append(f"{self.considered} candidates, {self.feasible} under budget; verified "
                     "(compiled on abstract shapes):")
        w = 80
        lines.append(f"  {'candidate':<{w}} {'predicted':>11} {'compiled':>11} {'error':>7}"
                     + (f"  (device bytes on {self.target})" if self.target
                        else "  (both on XLA:CPU terms)"))
        for v in self.verified:
            c = v.compiled_device_bytes
            lines.append(f"  {v.candidate.label()[:w]:<{w}} "
                         f"{gb(v.predicted_device_bytes + v.cpu_extra_bytes):>11} "
                         + (f"{gb(c):>11} {v.relative_error:>+7.1%}" if c is not None
                            else f"{'—':>11} {'—':>7}  ({v.error})"))
        lines.append("Pareto front (device bytes · est. step time · expected quality loss):")
        for c, est_ in self.front:
            lines.append(f"  {c.label()[:w]:<{w}} {gb(est_.device_bytes):>11} "
                         f"{est_.step_seconds * 1e3:>9.1f} ms {est_.quality_loss:>7.2%}")
        return "\n".join(lines)


# --- model and task ------------------------------------------------------------------

def _config(model):
    """(name, LlamaConfig) of a model name, a LlamaConfig or a memlab Llama Model."""
    from memlab import models
    from memlab.model import Model
    from memlab.models.llama import LlamaConfig
    if isinstance(model, str):
        return model, models.config(model, dtype="bfloat16", param_dtype="bfloat16")
    if isinstance(model, LlamaConfig):
        return model.name, model
    if isinstance(model, Model) and isinstance(getattr(model, "spec", None), LlamaConfig):
        if getattr(model, "history", ()):
            raise ValueError("plan: pass the base model (no passes applied yet); the planner "
                             "chooses the passes")
        return model.spec.name, model.spec
    raise TypeError(f"plan: model must be a name like 'llama2-7b', a LlamaConfig or a memlab "
                    f"Llama Model, got {type(model).__name__}")


def check_task(task: str) -> str:
    if not isinstance(task, str):
        raise TypeError(f"plan: task must be a string, got {task!r}")
    task = TASK_ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"plan: task={task!r} is not one of {TASKS} (or aliases "
                         f"{sorted(TASK_ALIASES)}); 'train' is full training, 'finetune' LoRA")
    return task


def _kv_options(seq: int) -> list:
    out = ["dense", "kivi4", "kivi2"]
    for frac in (8, 32):
        b = seq // frac
        if b >= 256:
            out.append(f"snapkv:budget={b}")
    out.append("headinfer:heads=1")
    return out


def candidates(cfg, task: str, batch: int, seq: int, devices: int = 1) -> list:
    """The search space for ``task`` (see the module docstring)."""
    task = check_task(task)
    shards = [(None, 1)]
    if devices > 1:
        if batch % devices == 0:  # the batch splits over the data axis
            shards += [("fsdp", devices), ("dp", devices)]
        if task in ("decode", "prefill") and cfg.n_heads % devices == 0 \
                and cfg.n_kv_heads % devices == 0:  # Megatron splits whole heads
            shards.append(("tp", devices))
    offloads = [None] + [(k, 1) for k in (1, 2, 4) if k + 1 <= cfg.n_layers]
    out = []
    if task in ("train", "finetune"):
        weights = ("bf16",) if task == "train" else WEIGHT_FORMATS
        rank = 0 if task == "train" else LORA_RANK
        opts = TRAIN_OPTIMIZERS if task == "train" else ("adamw", "adamw8bit")
        for w in weights:
            for o in opts:
                for r in REMAT_POLICIES:
                    for loss in ("chunked", "naive"):
                        for sh, n in shards:
                            for off in offloads:
                                if off is not None and (sh is not None or rank
                                                        or r != "nothing_saveable"):
                                    continue  # layer streaming: one device, full training,
                                    # its backward recomputes each block (= nothing_saveable)
                                if sh == "fsdp" and o in BLOCKWISE_OPTIMIZERS:
                                    continue  # see BLOCKWISE_OPTIMIZERS
                                out.append(Candidate(w, r, o, rank, loss, None, off, sh, n))
        if task == "train":  # the fused backward-update (LOMO), resident or with host state
            for o in opts:
                for loss in ("chunked", "naive"):
                    for off in (None, (1, 0)):
                        out.append(Candidate("bf16", "nothing_saveable", o, 0, loss, None, off,
                                             None, 1, fused=True))
    else:
        for w in WEIGHT_FORMATS:
            for kv in _kv_options(seq):
                for sh, n in shards:
                    for off in offloads:
                        if off is not None and (sh is not None or w != "bf16"):
                            continue  # streaming quantized layers is not supported
                        if kv.startswith("headinfer") and sh is not None:
                            continue  # HeadInfer is single-device
                        out.append(Candidate(w, None, None, 0, "chunked", kv, off, sh, n))
    return out


# --- the estimate ----------------------------------------------------------------------

def _workload(task: str, batch: int, seq: int):
    from memlab.model import Workload
    return Workload("train" if task in ("train", "finetune") else task, batch, seq)


def _layer_split(cfg, shapes) -> tuple:
    """(the layers' streamable bytes, the rest): what ``ml.passes.offload`` moves to host
    memory (the per-layer matrices, :func:`memlab.offload.streams_from_host`) and what
    stays on the device (non-layer params, the layers' per-layer vectors)."""
    from memlab.offload import LAYERS, streams_from_host
    layers = tree_bytes([x for x in jax.tree_util.tree_leaves(shapes[LAYERS])
                         if streams_from_host(x)])
    return layers, tree_bytes(shapes) - layers


def _count(tree) -> float:
    return float(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _kv_name(kv: str) -> str:
    return kv.split(":")[0]


def gb(n) -> str:
    """Bytes as decimal gigabytes (the unit budgets are usually given in)."""
    return f"{n / 1e9:.2f} GB"


def quality_loss(c: Candidate, seq: int) -> float:
    """Expected relative perplexity increase of a candidate (additive over knobs)."""
    q = WEIGHT_LOSS[c.weights]
    if c.optimizer:
        q += OPTIMIZER_LOSS.get(c.optimizer, 0.01)
    if c.lora_rank:
        q += LORA_LOSS
    if c.kv:
        name = _kv_name(c.kv)
        if name == "snapkv":
            kept = min(1.0, int(c.kv.split("budget=")[1]) / seq)
            q += SNAPKV_LOSS_AT_20PCT * max(0.0, 1 - kept) / 0.8
        else:
            q += KV_LOSS.get(c.kv if c.kv in KV_LOSS else name, 0.0)
    return float(q)


def _kivi_slots(pol, cfg, batch: int, seq: int, n_layers: int) -> int:
    """Key/value slots of one layer of a KIVI cache: quantized capacity + float residual."""
    from memlab.kv.base import Dims
    if not (hasattr(pol, "capacity") and hasattr(pol, "residual")):
        return seq
    dims = Dims(batch=batch, max_len=seq, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, dtype=jnp.dtype(cfg.dtype).name, n_layers=n_layers)
    return int(pol.capacity(dims)) + int(pol.residual)


def _policy(c: Candidate):
    from memlab.kv.compose import parse
    return parse(c.kv) if c.kv else None


def estimate(cfg, c: Candidate, task: str, batch: int, seq: int,
             platform: str = "cpu") -> Estimate:
    """Analytic device / host bytes, step time and quality loss of one candidate, with the
    activation model calibrated for ``platform``'s compiler (``"cpu"``, ``"gpu"``; see
    :func:`memlab.memory.activations.calibration`).  XLA:CPU-only bytes
    (``cpu_extra_bytes``) are predicted on ``"cpu"`` only."""
    from memlab.memory import estimate as est
    task = check_task(task)
    work = _workload(task, batch, seq)
    shapes = cfg.param_shapes()
    opt = c.optimizer if task in ("train", "finetune") else None
    cats = est.bytes_by_category(cfg, work.task, batch, seq, optimizer=opt)
    # pass estimates (exact): weight format, LoRA, KV policy
    from memlab import passes as P
    pas = c.format_passes()
    if c.kv:
        pas.append(P.kv_compress(c.kv))
    for p in pas:
        cats = p.estimate_bytes(cats, cfg, work)
    trainable_shapes = cats.get(est.TRAINABLE_SHAPES)
    cats = est.over_trainable(cats, opt) if opt else {k: v for k, v in cats.items()
                                                        if k != est.TRAINABLE_SHAPES}
    layer_bytes, other_bytes = _layer_split(cfg, shapes)
    n_layers = cfg.n_layers
    layer = layer_bytes / n_layers
    host = {}
    dev = dict(cats)
    training = task in ("train", "finetune")
    if c.fused:
        return _estimate_fused(cfg, c, task, batch, seq, cats, layer_bytes, other_bytes,
                               platform)
    # trainable counts (for the update temps)
    from memlab.offload import LAYERS
    if trainable_shapes is not None:
        tl = trainable_shapes.get(LAYERS, {}) if isinstance(trainable_shapes, dict) else {}
        p_layers = _count(tl)
        p_other = _count(trainable_shapes) - p_layers
    else:
        p_layers, p_other = _count(shapes[LAYERS]), _count(shapes) - _count(shapes[LAYERS])
    if c.offload:
        k, p = c.offload
        dev["params"] = int(other_bytes + (k + p) * layer)
        host["params"] = int(layer_bytes)
        if training:
            dev["gradients"] = int(other_bytes + k * layer)  # not live with the update: host
            host["gradients"] = int(layer_bytes)
            host["optimizer_state"] = int(cats.get("optimizer_state", 0))
            dev["optimizer_state"] = 0
            # the update runs on host (compute_on("device_host")): its temps are host memory
            # (a[opt] counts the gradient too: it is host["gradients"] here)
            grad_b = jnp.dtype(cfg.param_dtype).itemsize
            host["optimizer_update"] = int(
                max(act.OPT_BYTES_PER_PARAM.get(opt, 6.35) - grad_b, 0.0) * p_layers
                + act.A_OTHER * p_other)
    cpu_extra = 0
    cpu_total = None  # XLA:CPU's single-memory peak, where it differs from device + host
    n_dev = c.devices if c.shard else 1
    if c.shard == "fsdp":
        for key in ("params", "gradients", "optimizer_state"):
            if key in dev:
                dev[key] = int(math.ceil(dev[key] / n_dev))
    if c.shard == "tp":  # every layer's heads and MLP columns split; the cache by KV heads
        for key in ("params", "kv_cache"):
            if key in dev:
                dev[key] = int(math.ceil(dev[key] / n_dev))
    per_dev_batch = batch // n_dev if c.shard in ("fsdp", "dp") and batch % n_dev == 0 \
        else batch
    cs = jnp.dtype(cfg.dtype).itemsize
    if training:
        # a quantized base is dequantized one matmul at a time (compute dtype): the MLP's
        # gate and up projections are the largest pair live together
        dequant = 2.0 * cfg.d_model * cfg.d_ff * cs if c.weights != "bf16" else 0.0
        upd_layers = 0.0 if c.offload else p_layers
        upd_other = 0.0 if c.offload else p_other
        f = act.train_features(cfg, per_dev_batch, seq, c.remat, platform=platform,
                               p_layers=upd_layers,
                               p_other=upd_other, loss=c.loss, dequant_bytes=dequant)
        temp = act.train_temp(f, opt, platform)
        if c.offload:  # the streamed backward holds one block's weight gradients (dev["gradients"])
            # XLA:CPU has one memory, so its peak is not device + host: the streamed layers'
            # device copies and device gradients are the host buffers themselves, and the host
            # update's temporaries live only after the backward.  Its peak is the arguments
            # plus the larger of the backward (the device temp and every gradient) and the
            # host update (the gradients and the update's temporaries); the difference to
            # device + host is XLA:CPU's (negative: an accelerator holds those copies twice).
            # When more than one layer streams, XLA:CPU's bf16 normalization also holds a
            # float32 copy of the stacked bf16 weights the streamed blocks are sliced from
            # during the backward (seen at d=192, 3 layers, k=1; absent with one streamed layer).
            grads = other_bytes + layer_bytes
            f32_stack = 2 * layer_bytes if cs == 2 and n_layers - k >= 2 else 0
            cpu_total = (cats["params"] + cats.get("optimizer_state", 0) + cats.get("inputs", 0)
                         + max(temp + grads + f32_stack, grads + host["optimizer_update"]))
            temp += dev["gradients"]
        if c.shard == "fsdp":  # each device updates its shard; one layer gathered, per device
            cal = act.calibration(platform)
            a = cal.opt_bytes_per_param.get(opt, cal.opt_bytes_per_param["adamw"])
            temp = temp - (upd_layers * a + upd_other * cal.a_other) * (1 - 1 / n_dev) + 2 * layer
        if f.saved_host:
            host["activations"] = int(f.saved_host)
        dev.pop("gradients", None)  # gradients are part of the temp model
        dev["temp"] = int(temp)
    else:
        pol = _policy(c)
        kivi = pol is not None and _kv_name(c.kv).startswith("kivi")
        if pol is not None and _kv_name(c.kv) == "headinfer":
            from memlab.kv.base import Dims
            dims = Dims(batch=batch, max_len=seq, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                        head_dim=cfg.head_dim, dtype=jnp.dtype(cfg.dtype).name, n_layers=n_layers)
            host["kv_cache"] = int(pol.host_bytes(dims))
            tokens = 1 if task == "decode" else seq
            dev["kv_cache"] = int(pol.device_bytes(dims, tokens)) + batch * 4
        quantized = c.weights != "bf16"
        dequant = (_count(shapes[LAYERS]) / n_layers) * cs if quantized else 0.0
        if task == "decode":
            # quantized weights are dequantized one matmul at a time (the int8 d=448 step held
            # only q_proj's at its peak, llama3-8b the float32 LM head): the MLP's gate + up
            kw = dict(weights_dequant_bytes=2.0 * cfg.d_model * cfg.d_ff * cs if quantized else 0.0,
                      head_dequant_bytes=cfg.vocab_size * cfg.d_model * 4.0 if quantized else 0.0)
            kv_dq = 0.0
            if kivi:
                # the append writes the layer's slice of the stacked quantized cache into a new
                # buffer; KIVI's XLA path (the decode kernel's backend off GPU/TPU) dequantizes
                # the layer's S_q + R key and value slots to float32 -- the Triton / Mosaic
                # kernels keep no dequantized cache, so that part is XLA:CPU-only
                slots = _kivi_slots(pol, cfg, batch, seq, n_layers)
                kw.update(kv_layer_bytes=cats.get("kv_cache", 0) / n_layers, score_slots=slots)
                kv_dq = 2.0 * batch * slots * cfg.n_kv_heads * cfg.head_dim * 4
            temp = act.decode_temp(cfg, batch, seq, **kw)
            cpu_kv = act.decode_temp(cfg, batch, seq, kv_dequant_layer_bytes=kv_dq, **kw) - temp
        else:
            temp = act.prefill_temp(cfg, batch, seq, dequant_layer_bytes=dequant)
            cpu_kv = 0.0
        dev["temp"] = int(temp)
        # XLA:CPU only: its bf16 normalization runs the layer scan's dynamic slices and the
        # cache update in float32.  It holds a float32 copy of bf16 stacked weights (``w``)
        # and, for a bf16 dense cache, three float32 buffers of one layer's keys (or values)
        # -- the slice, its update and the attention's operand (``kv_f = 3 * kv / L``: d=320
        # L=2 23.0 MB, d=192 and d=448 L=3 4.6 MB, llama3-8b 128k 1.1-1.6 GB beside the
        # weights' copy); a GPU keeps bf16.  A KIVI cache's float32 dequantization comes on
        # top of ``w`` (live while a layer attends).
        w = 2 * layer_bytes if cs == 2 and c.weights == "bf16" else 0
        kv_f = 3 * cats.get("kv_cache", 0) / n_layers if cs == 2 and _kv_name(
            c.kv or "dense") in ("dense", "snapkv") else 0
        cpu_extra = int(w + kv_f + cpu_kv)
    device = int(sum(v for k, v in dev.items() if isinstance(v, (int, float))))
    host_total = int(sum(host.values()))
    if cpu_total is not None:
        cpu_extra = int(cpu_total - device - host_total)
    step = step_seconds(cfg, c, task, batch, seq, cats, host, layer_bytes)
    categories = {"device": dev, "host": host}
    return Estimate(device, host_total, categories, step, quality_loss(c, seq),
                    cpu_extra if platform == "cpu" else 0)


@functools.lru_cache(maxsize=64)
def _fused_state(cfg, optimizer: str) -> tuple:
    """(the layers' streamable state bytes, the rest) of ``memlab.fused.init`` (exact): what
    goes to host memory with ``offload`` (the ``[L, m, n, ...]`` stacks) and what stays."""
    from memlab import fused, models, optim
    from memlab.offload import streams_from_host
    state = fused.init(models.abstract(cfg), optim.get(optimizer))
    streamed = tree_bytes([x for x in jax.tree_util.tree_leaves(state.layers)
                           if streams_from_host(x)])
    return streamed, tree_bytes(state) - streamed


def _estimate_fused(cfg, c: Candidate, task: str, batch: int, seq: int, cats: dict,
                    layer_bytes: int, other_bytes: int, platform: str = "cpu") -> Estimate:
    """The fused backward-update step (:mod:`memlab.fused`): every param and the per-layer
    optimizer state resident (or, with ``offload``, the layers and their state in host
    memory and one layer of each on the device); no whole-model gradient."""
    from memlab import fused
    if task != "train" or c.shard or c.lora_rank or c.weights != "bf16":
        raise ValueError("plan: the fused update is full training of float weights on one "
                         "device")
    st_layers, st_other = _fused_state(cfg, c.optimizer)
    temp = fused.estimate_temp(cfg, c.optimizer, batch, seq, c.loss, platform)
    dev = {"inputs": cats.get("inputs", 0)}
    host = {}
    if c.offload:  # the fetched layer and its updated copy, of params and state
        per_layer = 2 * st_layers / cfg.n_layers
        dev.update(params=int(other_bytes + 2 * layer_bytes / cfg.n_layers),
                   optimizer_state=int(st_other + per_layer))
        host.update(params=int(layer_bytes), optimizer_state=int(st_layers))
    else:
        dev.update(params=int(cats["params"]), optimizer_state=int(st_layers + st_other))
    dev["temp"] = int(temp)
    device = int(sum(dev.values()))
    host_total = int(sum(host.values()))
    # XLA:CPU has one memory: the updated layer is written into the stack in place, so the
    # second device copy of one layer's params and state does not exist there
    cpu_extra = -int((layer_bytes + st_layers) / cfg.n_layers) \
        if c.offload and platform == "cpu" else 0
    step = step_seconds(cfg, c, task, batch, seq, cats, host, layer_bytes)
    return Estimate(device, host_total, {"device": dev, "host": host}, step,
                    quality_loss(c, seq), cpu_extra)


def step_seconds(cfg, c: Candidate, task: str, batch: int, seq: int, cats: dict, host: dict,
                 layer_bytes: float) -> float:
    """Estimated step time: compute or memory bound on the device, plus host traffic."""
    n = cfg.param_count()
    L, d = cfg.n_layers, cfg.d_model
    tokens = batch * seq
    penalty = QUANT_COMPUTE_PENALTY[c.weights]
    n_dev = c.devices if c.shard else 1
    if task in ("train", "finetune"):
        attn = 2 * L * batch * seq * seq * d  # causal QK^T and PV, forward (half the square x2)
        fwd = 2 * n * tokens + attn
        flops = fwd * (2 if c.lora_rank else 3)  # LoRA: no weight gradients for the base
        fam = act.policy_family(c.remat)
        if fam == "nothing_saveable":
            flops += fwd
        elif fam in ("dots_with_no_batch_dims_saveable", "dots_saveable", "save", "offload"):
            flops += attn
        compute = flops * penalty / PEAK_FLOPS / n_dev
        link = 0.0
        if c.offload:  # weights down twice (forward, backward), gradients up once
            link += 3 * layer_bytes / HOST_LINK_BYTES_PER_S
        if host.get("activations"):
            link += 2 * host["activations"] / HOST_LINK_BYTES_PER_S
        t = max(compute, link) if (c.offload and c.offload[1] > 0) else compute + link
        if c.offload and c.fused:  # each layer's state down and back up, updated on device
            t += 2 * host.get("optimizer_state", 0) / HOST_LINK_BYTES_PER_S
        elif c.offload:  # host optimizer: read grads + state + params, write state + params
            t += (2 * host.get("optimizer_state", 0) + 3 * cats["params"]) / HOST_MEM_BYTES_PER_S
        if c.shard == "fsdp":
            t = max(t, 3 * cats["params"] * (n_dev - 1) / n_dev / INTERCONNECT_BYTES_PER_S)
        elif c.shard == "dp":
            t = max(t, 2 * cats["params"] * (n_dev - 1) / n_dev / INTERCONNECT_BYTES_PER_S)
        return float(t)
    steps = 1 if task == "decode" else seq
    flops = 2 * n * batch * steps + 4 * L * batch * steps * seq * d / (1 if task == "decode" else 2)
    kv_dev = cats.get("kv_cache", 0) if "kv_cache" not in host else 0
    mem = (cats["params"] / n_dev + kv_dev) / HBM_BYTES_PER_S
    t = max(flops * penalty / PEAK_FLOPS / n_dev, mem)
    link = host.get("kv_cache", 0) / HOST_LINK_BYTES_PER_S if task == "decode" else 0.0
    if c.offload:
        link += layer_bytes / HOST_LINK_BYTES_PER_S
    return float(max(t, link))


# --- Pareto front, ranking, verification -------------------------------------------------

def pareto_front(items: Sequence[tuple]) -> list:
    """The ``(candidate, estimate)`` pairs no other pair dominates on (device bytes, step
    seconds, quality loss): another is at most as large on all three and smaller on one."""
    keys = [(e.device_bytes, e.step_seconds, e.quality_loss) for _, e in items]
    front = []
    for i, ki in enumerate(keys):
        dominated = any(all(a <= b for a, b in zip(kj, ki)) and kj != ki
                        for j, kj in enumerate(keys) if j != i)
        if not dominated and ki not in [(e.device_bytes, e.step_seconds, e.quality_loss)
                                        for _, e in front]:
            front.append(items[i])
    return sorted(front, key=lambda ce: ce[1].device_bytes)


def _rank_key(objective: str):
    if objective == "speed":
        return lambda ce: (round(ce[1].step_seconds, 6), ce[1].quality_loss, ce[1].device_bytes)
    return lambda ce: (round(ce[1].quality_loss, 6), ce[1].step_seconds, ce[1].device_bytes)


def build(cfg, c: Candidate, task: str, target=None):
    """The candidate's composed model on abstract shapes (chunked attention on the host;
    the dispatcher's choice for the device when compiled for a ``target``); sharded
    candidates get a mesh over the host's or the target's devices."""
    from memlab import models
    base = models.abstract(cfg if target is not None else
                           dataclasses.replace(cfg, attention="chunked"))
    mesh = None
    if c.shard:
        from memlab import shard as sh
        devices = None
        if target is not None:
            from memlab import targets
            devices = targets.get(target).devices()[:c.devices]
        mesh = sh.mesh((c.devices,), (c.mesh_axis,), devices=devices)
    return c.passes(task, mesh)(base)


def verify_candidate(cfg, c: Candidate, e: Estimate, task: str, batch: int,
                     seq: int, target: Optional[str] = None) -> Verification:
    """Compile the candidate with :func:`memlab.memory.profile` on abstract shapes, for
    this process's device or for a :mod:`memlab.targets` ``target``."""
    from memlab import nn
    from memlab.memory.profile import profile
    on_cpu = target is None and jax.default_backend() == "cpu"
    # XLA:CPU has one memory (its peak holds the host buffers: subtract the formulas'
    # host part); XLA:GPU/TPU report host buffers apart (host_*), so the peak is the device's
    v = Verification(c, e.device_bytes, host_bytes=e.host_bytes if on_cpu else 0,
                     cpu_extra_bytes=e.cpu_extra_bytes if on_cpu else 0, target=target)
    available = jax.device_count()
    if target is not None:
        from memlab import targets
        available = targets.get(target).num_devices
    if c.shard and available < c.devices:
        v.error = (f"needs {c.devices} devices, {target or 'this process'} has {available}"
                   + ("" if target is None else f"; use a target such as "
                      f"{targets.get(target).chip}x{c.devices}"))
        return v
    try:
        model = build(cfg, c, task, target)
        # the loss the candidate names; on a target "chunked" means the device's kernel
        loss = c.loss if target is None or c.loss == "naive" else "auto"
        if c.fused:
            r = _profile_fused(model, c, batch, seq, target, loss)
        else:
            with nn.use_cross_entropy(loss):
                r = profile(model, "train" if task in ("train", "finetune") else task,
                            batch=batch, seq=seq, optimizer=c.optimizer or "adamw",
                            target=target)
    except Exception as exc:  # noqa: BLE001 -- recorded; the next candidate is tried
        v.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"
        return v
    v.compiled_peak_bytes = int(r.peak_bytes)
    v.temp_bytes = int(r.temp_bytes)
    if target is not None:
        v.compiled_host_bytes = int(r.host_bytes)
    return v


def _profile_fused(model, c: Candidate, batch: int, seq: int, target=None, loss=None):
    """Compile :func:`memlab.fused.step_fn` (params and state donated) on abstract shapes."""
    from memlab import fused, nn, optim
    from memlab.memory.profile import _compile, _report
    tx = optim.get(c.optimizer)
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    with nn.use_cross_entropy(loss or c.loss):
        compiled, secs = _compile(fused.step_fn(model, tx), (model.params, fused.init(model, tx),
                                                            tokens), donate=(0, 1), target=target)
    device = jax.devices()[0].device_kind
    if target is not None:
        from memlab import targets
        device = targets.get(target).device_kind
    return _report(compiled, model.spec.name, "train", batch, seq, {}, {}, secs, device, target)


def _uses_host(c: Candidate) -> bool:
    """Whether a candidate keeps bytes in host memory (layer streaming, HeadInfer)."""
    return c.offload is not None or _kv_name(c.kv or "") == "headinfer"


def _scored(cfg, cands, task, batch, seq, platform: str = "cpu") -> list:
    """``(candidate, estimate)`` for each candidate whose passes apply to these shapes (a
    pass that cannot, e.g. a block size that does not divide a dimension, is skipped)."""
    out = []
    for c in cands:
        try:
            out.append((c, estimate(cfg, c, task, batch, seq, platform)))
        except ValueError:
            continue
    return out


def _family(c: Candidate) -> tuple:
    """What decides whether a candidate compiles: its optimizer (host-offloaded or not),
    weight format, adapters and KV policy; remat, loss and k do not."""
    return (c.optimizer, c.offload is not None, c.weights, c.lora_rank, _kv_name(c.kv or ""),
            c.shard, c.fused)


def _nearest(cfg, task, batch, seq, budget, devices) -> Optional[str]:
    """A feasible variation to name in the error: more devices, or LoRA instead of full training."""
    for n in (2, 4, 8, 16, 32, 64):
        if n <= devices:
            continue
        sharded = [ce for ce in _scored(cfg, candidates(cfg, task, batch, seq, n), task, batch, seq)
                   if ce[0].shard is not None and ce[1].device_bytes <= budget]
        if sharded:
            c, e = min(sharded, key=lambda ce: ce[1].device_bytes)
            return f"with {n} devices {c.shard.upper()} fits ({gb(e.device_bytes)} per device)"
    if task == "train":
        return "task='finetune' (LoRA/QLoRA) or a smaller model"
    return None


def plan(model, task: str, budget_bytes, *, batch: int = 1, seq: Optional[int] = None,
         objective: str = "speed", verify: int = 3, devices: int = 1,
         max_quality_loss: float = 0.05, target: Optional[str] = None) -> Plan:
    """Choose the passes that fit ``model``'s ``task`` into ``budget_bytes`` of device memory.

    ``budget_bytes``: bytes or a string (``"24GB"``, ``"24GiB"``, ``"12e9"``).
    ``seq``: tokens per row for train/finetune/prefill, cache slots for decode
    (default: 2048 for training, the model's max_seq_len for inference).
    ``verify``: how many of the best-ranked fitting candidates to compile (0: none).
    ``max_quality_loss``: with ``objective="speed"``, candidates whose expected quality
    loss exceeds this are ranked after all others (they stay on the Pareto front).
    ``target``: verify by compiling for that :mod:`memlab.targets` device (``"h100"``,
    ``"h100x8"``, ``"v5e"``, ...) on this machine, so "fits" is XLA:GPU's or XLA:TPU's
    own buffer assignment; ``devices`` defaults to the target's device count.  A target
    whose compile-only devices expose no host memory (jaxlib's CUDA devices) searches
    device-resident candidates only.
    Raises :class:`NoPlanError` when no candidate fits, naming the minimum bytes any
    candidate needs and the nearest feasible option.
    """
    name, cfg = _config(model)
    task = check_task(task)
    budget = parse_budget(budget_bytes)
    if target is not None:
        from memlab import targets
        target = targets.get(target).name
        if devices == 1:
            devices = targets.get(target).num_devices
    if objective not in OBJECTIVES:
        raise ValueError(f"plan: objective={objective!r} is not one of {OBJECTIVES}")
    if not isinstance(max_quality_loss, (int, float)) or max_quality_loss < 0:
        raise ValueError(f"plan: max_quality_loss must be a non-negative number, got "
                         f"{max_quality_loss!r}")
    for argname, v in (("batch", batch), ("devices", devices), ("verify", verify)):
        least = 0 if argname == "verify" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"plan: {argname} must be an int >= {least}, got {v!r}")
    if seq is None:
        seq = 2048 if task in ("train", "finetune") else cfg.max_seq_len
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"plan: seq must be a positive int, got {seq!r}")
    cands = candidates(cfg, task, batch, seq, devices)
    if target is not None and not any("host" in k for k in targets.get(target).memory_kinds()):
        # the compile-only device has no host memory space: host plans cannot be verified
        # there (memlab.targets says why), so the search keeps to device-resident plans
        cands = [c for c in cands if not _uses_host(c)]
    platform = "cpu" if target is None else targets.get(target).dispatch_platform
    scored = _scored(cfg, cands, task, batch, seq, platform)
    fits = [ce for ce in scored if ce[1].device_bytes <= budget]
    if not fits:
        best = min(scored, key=lambda ce: ce[1].device_bytes)
        nearest = _nearest(cfg, task, batch, seq, budget, devices)
        raise NoPlanError(
            f"plan: no plan fits {name} {task} (batch {batch}, seq {seq}) in "
            f"{gb(budget)}: it needs {gb(best[1].device_bytes)} at best "
            f"({best[0].label()})" + (f"; {nearest}" if nearest else ""),
            best[1].device_bytes, nearest)
    key = _rank_key(objective)
    ranked = sorted(fits, key=lambda ce: (ce[1].quality_loss > max_quality_loss, key(ce)))
    verified = []
    chosen = None
    compiled = 0
    failed = set()  # candidates' build families that failed to compile: skip their siblings
    for c, e in ranked if verify else ():  # compile down the ranking
        if (compiled >= verify and chosen is not None) or compiled >= verify + MAX_OVER_BUDGET \
                or len(verified) >= verify + MAX_COMPILE_FAILURES:
            break
        if _family(c) in failed:
            continue
        v = verify_candidate(cfg, c, e, task, batch, seq, target)
        verified.append(v)
        if v.compiled_device_bytes is None:
            failed.add(_family(c))
            continue
        compiled += 1
        if chosen is None and v.accelerator_bytes <= budget:
            chosen = (c, e)
    if chosen is None:
        # nothing verified (verify=0, or nothing compiled within budget): the analytic best
        # of the candidates not known to fail
        chosen = next((ce for ce in ranked if _family(ce[0]) not in failed), ranked[0])
    c, e = chosen
    return Plan(name, task, budget, batch, seq, objective, devices, c, e, c.passes(task)
                if not c.shard else None, verified, pareto_front(fits), len(cands), len(fits),
                target)
