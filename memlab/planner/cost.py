"""The planner's cost model: device / host bytes, step time and quality loss of a candidate.

**Bytes** (:func:`estimate`) are the sum of what the candidate's passes estimate, in the
order they compose: :func:`memlab.memory.estimate.bytes_by_category` (params, gradients,
the optimizer's registered ``state_bytes``, KV cache, inputs), then each pass's own
``estimate`` -- ``quantize`` and ``lora`` (exact replays on the spec's shapes),
``kv_compress`` (the policy's exact bytes), and the placement: ``offload`` (device and
host parts of params, gradients, optimizer state) or ``shard`` (per-device bytes; an
estimate-only mesh, :func:`memlab.passes.shard.estimate_mesh`).  XLA's temporaries come
from :mod:`memlab.memory.activations` (calibrated per compiler: ``platform``), the
fused step's from :func:`memlab.memory.activations.fused_temp`.  A KV policy with the
``host_state`` fact (HeadInfer) places its state with its own ``host_bytes(dims)`` /
``device_bytes(dims, tokens)``.  Device bytes exclude what lives in host memory.

**Quality** (:func:`quality_loss`): the facts each extension registers
(:mod:`memlab.facts`): the weight format's, the optimizer's and the KV policy's
``quality_loss`` (a number, or ``fn(policy, seq)`` for a policy), LoRA's
(``PASSES`` ``lora``), added.  Measured ones live in ``memlab/measured.json``
(``experiments/facts.py``).

**Step time** (:func:`step_seconds`): FLOPs and bytes at the speed constants below
(an H100-class accelerator with a PCIe host link; documented, not measured here),
times the weight format's ``compute_penalty`` fact.

Facts read, by registry (a registered extension lacking one raises
:class:`memlab.facts.MissingFact` when a candidate needs it):

* ``memlab.optim.OPTIMIZERS``: ``state_bytes`` (registration argument),
  ``quality_loss``, ``update_bytes`` (``{platform: bytes per layer param}``),
  ``fused_update_bytes`` (for fused candidates), ``plan``, ``blockwise_state``;
* ``memlab.kv.base.POLICIES``: ``plan``, ``quality_loss``, ``host_state``,
  ``decode_slots(policy, dims)`` (a quantized store: the slots its XLA decode
  dequantizes), ``compute_dtype_store`` (cached in the compute dtype);
* ``memlab.quant.formats.WEIGHT_FORMATS``: ``plan``, ``quality_loss``,
  ``compute_penalty``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from memlab.memory import activations as act
from memlab.memory.bytes import tree_bytes
from memlab.planner.space import Candidate, check_task, kv_fact, kv_policy

# --- step-time constants (H100-class accelerator, PCIe host link) -------------------
PEAK_FLOPS = 400e12              # sustained dense bf16 FLOP/s (about 40% of H100 SXM peak)
HBM_BYTES_PER_S = 2.0e12         # device memory bandwidth
HOST_LINK_BYTES_PER_S = 25e9     # host <-> device (PCIe 4.0 x16, effective)
HOST_MEM_BYTES_PER_S = 50e9      # host DRAM bandwidth for the host optimizer update
INTERCONNECT_BYTES_PER_S = 100e9  # device <-> device (collectives of FSDP / DP)


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


def gb(n) -> str:
    """Bytes as decimal gigabytes (the unit budgets are usually given in)."""
    return f"{n / 1e9:.2f} GB"


def _count(tree) -> float:
    return float(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _kv_name(kv: str) -> str:
    return kv.split(":")[0]


def _workload(task: str, batch: int, seq: int):
    from memlab.model import Workload
    return Workload("train" if task in ("train", "finetune") else task, batch, seq)


def _dims(cfg, batch: int, seq: int):
    from memlab.cache import cache_dims
    return cache_dims(cfg, batch, seq)


# --- facts ------------------------------------------------------------------------------------

def _fact_value(value, *args) -> float:
    return float(value(*args) if callable(value) else value)


def weight_fact(weights: str, fact: str):
    from memlab.quant.formats import WEIGHT_FORMATS
    return WEIGHT_FORMATS.fact(weights, fact)


def optimizer_fact(optimizer: str, fact: str):
    from memlab.optim import OPTIMIZERS
    return OPTIMIZERS.fact(optimizer, fact)


def quality_loss(c: Candidate, seq: int) -> float:
    """Expected relative perplexity increase of a candidate: the registered
    ``quality_loss`` facts of its weight format, optimizer, LoRA and KV policy, added."""
    q = _fact_value(weight_fact(c.weights, "quality_loss"))
    if c.optimizer:
        q += _fact_value(optimizer_fact(c.optimizer, "quality_loss"))
    if c.lora_rank:
        from memlab.passes import PASSES
        q += _fact_value(PASSES.fact("lora", "quality_loss"))
    if c.kv:
        q += _fact_value(kv_fact(c.kv, "quality_loss"), kv_policy(c.kv), seq)
    return float(q)


# --- bytes: the passes' estimates ------------------------------------------------------------

def layer_split(cfg) -> tuple:
    """(the layers' streamable bytes, the rest): ``ml.passes.offload``'s split
    (:func:`memlab.passes.offload.layer_bytes`) over every layer."""
    from memlab.passes.offload import layer_bytes
    layer, resident = layer_bytes(cfg)
    return layer * cfg.n_layers, resident


_layer_split = layer_split  # the name before the passes owned the split


def estimate_mesh(n_devices: int, axis: str):
    """A mesh of ``n_devices`` along ``axis`` for the shard pass's estimate only (per-device
    bytes without ``n_devices`` devices): the estimate reads the mesh's shape, never its
    devices, so this mesh repeats the first local device.  Never apply a pass built on it
    to a model (its placements would all be on one device)."""
    import numpy as np
    from jax.sharding import AxisType, Mesh
    return Mesh(np.array([jax.devices()[0]] * int(n_devices)), (axis,),
                axis_types=(AxisType.Auto,))


@functools.lru_cache(maxsize=512)
def pass_bytes(cfg, c: Candidate, task: str, batch: int, seq: int) -> tuple:
    """``(totals, placed, trainable_shapes)``: the categories after the candidate's format,
    adapter and KV passes (whole-model bytes), after its placement pass (``offload``'s
    device/host parts; ``shard``'s per-device bytes), and the trainable params' shapes a
    LoRA pass recorded (None: every param trains)."""
    from memlab import passes as P
    from memlab.memory import estimate as est
    task = check_task(task)
    work = _workload(task, batch, seq)
    training = task in ("train", "finetune")
    opt = c.optimizer if training else None
    cats = est.bytes_by_category(cfg, work.task, batch, seq, optimizer=opt)
    pas = c.format_passes()
    if c.kv:
        pas.append(P.kv_compress(c.kv))
    for p in pas:
        cats = p.estimate_bytes(cats, cfg, work)
    trainable = cats.get(est.TRAINABLE_SHAPES)
    placed = dict(cats)
    mesh = None
    if c.shard:
        mesh = estimate_mesh(c.devices, c.mesh_axis)
    placement = None if c.fused else c.placement_pass(task, mesh)
    if placement is not None:
        placed = placement.estimate_bytes(placed, cfg, work)
    totals = est.over_trainable(cats, opt) if opt else {
        k: v for k, v in cats.items() if k != est.TRAINABLE_SHAPES}
    placed = est.over_trainable(placed, opt) if opt else {
        k: v for k, v in placed.items() if k != est.TRAINABLE_SHAPES}
    return totals, placed, trainable


def _trainable_counts(cfg, trainable_shapes) -> tuple:
    """(trainable params inside the scanned layers, outside)."""
    from memlab.offload import LAYERS
    if trainable_shapes is not None:
        tl = trainable_shapes.get(LAYERS, {}) if isinstance(trainable_shapes, dict) else {}
        p_layers = _count(tl)
        return p_layers, _count(trainable_shapes) - p_layers
    shapes = cfg.param_shapes()
    return _count(shapes[LAYERS]), _count(shapes) - _count(shapes[LAYERS])


def _placed(cats: dict, placed: dict, c: Candidate, training: bool) -> tuple:
    """(device, host) categories from the placement pass's estimate."""
    keep = ("params", "gradients", "optimizer_state", "inputs", "kv_cache")
    if not c.offload:
        return {k: int(placed[k]) for k in keep if k in placed}, {}
    dev = {k: int(cats[k]) for k in keep if k in cats}
    host = {"params": int(placed["params_host"])}
    dev["params"] = int(placed["params_device"])
    if training:
        dev["gradients"] = int(placed["gradients_device"])  # one block's, before they move
        host["gradients"] = int(placed["gradients_host"])
        host["optimizer_state"] = int(placed.get("optimizer_state_host", 0))
        dev["optimizer_state"] = int(placed.get("optimizer_state_device", 0))
    return dev, host


def estimate(cfg, c: Candidate, task: str, batch: int, seq: int,
             platform: str = "cpu") -> Estimate:
    """Analytic device / host bytes, step time and quality loss of one candidate, with the
    activation model calibrated for ``platform``'s compiler (``"cpu"``, ``"gpu"``; see
    :func:`memlab.memory.activations.calibration`).  XLA:CPU-only bytes
    (``cpu_extra_bytes``) are predicted on ``"cpu"`` only."""
    task = check_task(task)
    training = task in ("train", "finetune")
    opt = c.optimizer if training else None
    # remat and loss change no pass's bytes: one cached pass estimate serves them all
    key = dataclasses.replace(c, remat=None, loss="chunked")
    cats, placed, trainable_shapes = pass_bytes(cfg, key, task, batch, seq)
    layer_bytes, other_bytes = layer_split(cfg)
    if c.fused:
        return _estimate_fused(cfg, c, task, batch, seq, cats, layer_bytes, other_bytes,
                               platform)
    n_layers = cfg.n_layers
    layer = layer_bytes / n_layers
    dev, host = _placed(cats, placed, c, training)
    p_layers, p_other = _trainable_counts(cfg, trainable_shapes)
    if c.offload and training:
        # the update runs on host (compute_on("device_host")): its temps are host memory
        host["optimizer_update"] = int(act.host_update_bytes(
            opt, p_layers, p_other, jnp.dtype(cfg.param_dtype).itemsize))
    cpu_extra = 0
    cpu_total = None  # XLA:CPU's single-memory peak, where it differs from device + host
    n_dev = c.devices if c.shard else 1
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
            # during the backward (absent with one streamed layer).
            k = c.offload[0]
            grads = other_bytes + layer_bytes
            f32_stack = 2 * layer_bytes if cs == 2 and n_layers - k >= 2 else 0
            cpu_total = (cats["params"] + cats.get("optimizer_state", 0) + cats.get("inputs", 0)
                         + max(temp + grads + f32_stack, grads + host["optimizer_update"]))
            temp += dev["gradients"]
        if c.shard == "fsdp":  # each device updates its shard; one layer gathered, per device
            cal = act.calibration(platform)
            a = cal.opt_bytes_per_param[opt or "adamw"]
            temp = temp - (upd_layers * a + upd_other * cal.a_other) * (1 - 1 / n_dev) + 2 * layer
        if f.saved_host:
            host["activations"] = int(f.saved_host)
        dev.pop("gradients", None)  # gradients are part of the temp model
        dev["temp"] = int(temp)
    else:
        pol = kv_policy(c.kv)
        dims = _dims(cfg, batch, seq)
        decode_slots = kv_fact(c.kv, "decode_slots", None) if pol is not None else None
        if pol is not None and kv_fact(c.kv, "host_state", False):
            # the policy's state in host memory, one group of it on the device at a time
            host["kv_cache"] = int(pol.host_bytes(dims))
            tokens = 1 if task == "decode" else seq
            dev["kv_cache"] = int(pol.device_bytes(dims, tokens)) + batch * 4
        quantized = c.weights != "bf16"
        from memlab.offload import LAYERS
        dequant = (_count(cfg.param_shapes()[LAYERS]) / n_layers) * cs if quantized else 0.0
        if task == "decode":
            # quantized weights are dequantized one matmul at a time: the MLP's gate + up,
            # and a quantized LM head to float32
            kw = dict(weights_dequant_bytes=2.0 * cfg.d_model * cfg.d_ff * cs if quantized else 0.0,
                      head_dequant_bytes=cfg.vocab_size * cfg.d_model * 4.0 if quantized else 0.0)
            kv_dq = 0.0
            if decode_slots is not None:
                # a quantized store: the append writes the layer's slice of the stacked cache
                # into a new buffer; the XLA decode path (the kernel's backend off GPU/TPU)
                # dequantizes the layer's slots to float32 -- the Triton / Mosaic kernels keep
                # no dequantized cache, so that part is XLA:CPU-only
                slots = int(decode_slots(pol, dims))
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
        # and, for a cache stored in the bf16 compute dtype, three float32 buffers of one
        # layer's keys (or values) -- the slice, its update and the attention's operand
        # (``kv_f = 3 * kv / L``); a GPU keeps bf16.  A quantized cache's float32
        # dequantization comes on top of ``w`` (live while a layer attends).
        w = 2 * layer_bytes if cs == 2 and c.weights == "bf16" else 0
        kv_f = 3 * cats.get("kv_cache", 0) / n_layers if cs == 2 and kv_fact(
            c.kv, "compute_dtype_store", False) else 0
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
    if task != "train" or c.shard or c.lora_rank or c.weights != "bf16":
        raise ValueError("plan: the fused update is full training of float weights on one "
                         "device")
    st_layers, st_other = _fused_state(cfg, c.optimizer)
    temp = act.fused_temp(cfg, _fact_value(optimizer_fact(c.optimizer, "fused_update_bytes")),
                          batch, seq, c.loss, platform)
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
    """Estimated step time: compute or memory bound on the device, plus host traffic;
    compute scaled by the weight format's ``compute_penalty`` fact."""
    n = cfg.param_count()
    L, d = cfg.n_layers, cfg.d_model
    tokens = batch * seq
    penalty = _fact_value(weight_fact(c.weights, "compute_penalty"))
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
