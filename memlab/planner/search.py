"""The planner's search: score the space, prune to the budget, rank, verify by compiling.

ProTrain (Yang et al. 2024, "ProTrain: Efficient LLM Training via Memory-Aware
Techniques") searches checkpointing, offloading and sharding settings with a
memory and runtime model, then runs the best; ZeRO (Rajbhandari et al. 2020),
Superpipeline (Abbasi et al. 2024) and HeadInfer (Luo et al. 2025) supply the
sharding, layer streaming and host-KV pieces.  Here::

    plan = ml.memory.plan("llama2-7b", "train", "24GB")
    model = plan.passes(ml.models.abstract("llama2-7b"))     # the chosen ml.compose(...)
    print(plan.table())

1. **Search space** (:mod:`memlab.planner.space`): the registered extensions that say
   they are planned, and the placements (offload, FSDP / DP / TP, the fused update).
2. **Score** (:mod:`memlab.planner.cost`): the candidate's passes' own estimates,
   the activation model, step time, and the extensions' registered quality facts.
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
   calibration (:func:`memlab.memory.activations.calibration`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Sequence

import jax

from memlab.planner.cost import Estimate, estimate, gb
from memlab.planner.space import (OBJECTIVES, Candidate, _config, candidates, check_task,
                                  uses_host)

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
        else:  # the step memlab.train runs (memlab.train_step)
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
    """Compile the fused step (:mod:`memlab.train_step` with ``fused=True``: params and
    state donated) on abstract shapes with :func:`memlab.memory.profile`."""
    from memlab import nn
    from memlab.memory.profile import profile
    from memlab.train_step import StepOptions
    with nn.use_cross_entropy(loss or c.loss):
        return profile(model, "train", batch=batch, seq=seq, optimizer=c.optimizer,
                       target=target, config=StepOptions(fused=True))


_uses_host = uses_host  # the name before the space held it


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
    return (c.optimizer, c.offload is not None, c.weights, c.lora_rank,
            (c.kv or "").split(":")[0], c.shard, c.fused)


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
