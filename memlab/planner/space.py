"""The planner's search space: candidates, and the composable passes each one names.

A candidate is one point of the space (:class:`Candidate`): weight format, remat
policy, optimizer, LoRA rank, loss, KV policy, layer streaming ``offload(k, p)``, the
fused backward-update, FSDP / DP / TP over ``devices``.  The extensions the space
draws from are the registered ones that say they are planned (:mod:`memlab.facts`):

* weight formats: :data:`memlab.quant.formats.WEIGHT_FORMATS` entries whose ``plan``
  fact names the task (``bf16`` = the model's own float weights);
* optimizers: :data:`memlab.optim.OPTIMIZERS` entries whose ``plan`` fact names the
  task (``"train"`` full training, ``"finetune"`` LoRA); ``blockwise_state=True``
  leaves them out of FSDP (GSPMD cannot keep a block-wise flattening sharded);
* KV policies: :data:`memlab.kv.base.POLICIES` entries with a ``plan(seq)`` fact, the
  policy strings to try at ``seq`` cache slots; ``host_state=True`` keeps them on one
  device.

So a new optimizer, KV policy or format joins the search by registering its facts in
its own module.  ``task="train"`` is *full* training (every parameter updates, weights
stay float); ``"finetune"`` is LoRA (rank :data:`LORA_RANK` on every linear layer) over
a planned weight format; ``"decode"`` (alias ``"inference"``) is one token over a
``seq``-slot cache; ``"prefill"`` writes ``seq`` tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

TASKS = ("train", "finetune", "prefill", "decode")
TASK_ALIASES = {"inference": "decode", "infer": "decode", "full": "train", "lora": "finetune",
                "qlora": "finetune"}
OBJECTIVES = ("speed", "quality")
REMAT_POLICIES = (None, "dots_with_no_batch_dims_saveable", "save:qkv,attn_out,mlp_hidden",
                  "nothing_saveable", "offload:qkv,attn_out,mlp_hidden")
LORA_RANK = 16


# --- the registries the space reads ------------------------------------------------------

def _optimizers():
    from memlab.optim import OPTIMIZERS
    return OPTIMIZERS


def _policies():
    import memlab.kv  # noqa: F401  (discovers and registers every policy)
    from memlab.kv.base import POLICIES
    return POLICIES


def _formats():
    from memlab.quant.formats import WEIGHT_FORMATS
    return WEIGHT_FORMATS


def planned_optimizers(task: str) -> tuple:
    """Registered optimizers whose ``plan`` fact names ``task``."""
    reg = _optimizers()
    return tuple(n for n in reg.names() if task in reg.fact(n, "plan", ()))


def planned_formats(task: str) -> tuple:
    """Registered weight formats whose ``plan`` fact names ``task``."""
    reg = _formats()
    return tuple(n for n in reg.names() if task in reg.fact(n, "plan", ()))


def blockwise_state(optimizer: Optional[str]) -> bool:
    """The optimizer's ``blockwise_state`` fact (False when not registered as such)."""
    return bool(optimizer) and bool(_optimizers().fact(optimizer, "blockwise_state", False))


def kv_policy(kv: Optional[str]):
    """The policy a candidate's KV string names (None: the dense default)."""
    if not kv:
        return None
    from memlab.kv.compose import parse
    return parse(kv)


def kv_fact(kv: Optional[str], fact: str, *default):
    """A fact registered with the KV policy ``kv`` names (``default`` when absent)."""
    pol = kv_policy(kv or "dense")
    return _policies().fact(pol.name, fact, *default)


def kv_options(seq: int) -> list:
    """The KV policy strings searched at ``seq`` slots: each planned policy's ``plan(seq)``."""
    reg = _policies()
    out = []
    for name in reg.names():
        plan = reg.fact(name, "plan", None)
        if plan is not None:
            out.extend(plan(seq))
    return out


def _kv_options(seq: int) -> list:  # the name before the registries held it
    return kv_options(seq)


# --- candidates -----------------------------------------------------------------------------

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
    shard: Optional[str] = None      # "fsdp" | "dp" | "tp" over ``devices``
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
        from memlab import passes as P
        out = []
        method = _formats().get(self.weights)()
        if method is not None:
            out.append(P.quantize(method))
        if self.lora_rank:
            out.append(P.lora(self.lora_rank, rules=P.lora.ALL_LINEAR))
        return out

    def placement_pass(self, task: str, mesh=None):
        """The pass that places bytes (``offload`` or ``shard``), or None."""
        from memlab import passes as P
        if self.offload:
            return P.offload(self.offload[0], self.offload[1],
                             optimizer_state=task in ("train", "finetune") and not self.fused)
        if self.shard:
            if mesh is None:
                raise ValueError(f"plan: {self.label()} needs a mesh of {self.devices} devices")
            from memlab import shard as sh
            strategy = {"fsdp": sh.fsdp, "dp": sh.dp, "tp": sh.tp}[self.shard](self.mesh_axis)
            return P.shard(mesh, strategy, optimizer=self.optimizer)
        return None

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
        placement = self.placement_pass(task, mesh)
        if placement is not None:
            out.append(placement)
        return compose(*out) if out else P.identity()


def check_task(task: str) -> str:
    if not isinstance(task, str):
        raise TypeError(f"plan: task must be a string, got {task!r}")
    task = TASK_ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"plan: task={task!r} is not one of {TASKS} (or aliases "
                         f"{sorted(TASK_ALIASES)}); 'train' is full training, 'finetune' LoRA")
    return task


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
    # soft-capped logits (Gemma 2) have no chunked cross-entropy: the [B, T, V] logits exist
    losses = ("naive",) if getattr(cfg, "final_softcap", None) is not None else ("chunked", "naive")
    out = []
    if task in ("train", "finetune"):
        weights = planned_formats(task)
        rank = 0 if task == "train" else LORA_RANK
        opts = planned_optimizers(task)
        for w in weights:
            for o in opts:
                for r in REMAT_POLICIES:
                    for loss in losses:
                        for sh, n in shards:
                            for off in offloads:
                                if off is not None and (sh is not None or rank
                                                        or r != "nothing_saveable"):
                                    continue  # layer streaming: one device, full training,
                                    # its backward recomputes each block (= nothing_saveable)
                                if sh == "fsdp" and blockwise_state(o):
                                    continue  # see blockwise_state
                                out.append(Candidate(w, r, o, rank, loss, None, off, sh, n))
        if task == "train":  # the fused backward-update (LOMO), resident or with host state
            for o in opts:
                for loss in losses:
                    for off in (None, (1, 0)):
                        out.append(Candidate("bf16", "nothing_saveable", o, 0, loss, None, off,
                                             None, 1, fused=True))
    else:
        kvs = kv_options(seq)
        if getattr(cfg, "attn_softcap", None) is not None or \
                getattr(cfg, "query_scale", None) is not None:
            # layers with a soft-cap or their own softmax scale: only policies that apply them
            kvs = [kv for kv in kvs if getattr(kv_policy(kv), "attention_options", False)]
        for w in planned_formats(task):
            for kv in kvs:
                host_state = kv_fact(kv, "host_state", False)
                for sh, n in shards:
                    for off in offloads:
                        if off is not None and (sh is not None or w != "bf16"):
                            continue  # streaming quantized layers is not supported
                        if host_state and sh is not None:
                            continue  # a host-memory cache is single-device
                        out.append(Candidate(w, None, None, 0, "chunked", kv, off, sh, n))
    return out


def uses_host(c: Candidate) -> bool:
    """Whether a candidate keeps bytes in host memory (layer streaming, a host KV cache)."""
    return c.offload is not None or bool(c.kv and kv_fact(c.kv, "host_state", False))
