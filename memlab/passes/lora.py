"""The LoRA pass: trainable low-rank adapters beside frozen, possibly quantized, kernels.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021): a frozen
``W [in, out]`` gets ``A [in, r]`` and ``B [r, out]`` and the layer computes
``x W + (alpha / r) (x A) B``, with ``B = 0`` at init so the adapted model starts
equal to the base.  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized
LLMs" (2023): the frozen base is stored in NF4 with double quantization and the
adapters stay in a float dtype::

    qlora = ml.compose(ml.passes.quantize(ml.quant.nf4(64, double_quant=True)),
                       ml.passes.lora(rank=8, alpha=16, rules=ml.passes.lora.ALL_LINEAR))

Adapters live in the params pytree next to the kernel they adapt
(``layers/attn/q_proj/lora_a [L, in, r]`` and ``lora_b [L, r, out]``, stacked like
the kernel for layers under ``nn.scan``).  Only they train: the pass sets the
model's ``trainable`` extra, so :func:`memlab.model.split_trainable` (and the
profiler's train step) take gradients and optimizer state over them alone.
The forward runs through the model's one ``nn.Dense`` interceptor
(:class:`memlab.nn.dense_dispatch.DenseDispatch`, shared with the quantize pass):
every ``nn.Dense`` call whose scope holds ``lora_a`` returns ``base(x) + scale *
(x @ A) @ B``, the base computed first on whatever the kernel is (a float array, or
a QArray through the quantized matmul), so plain user Flax models work unchanged
and lora and quantize compose in either order.  An adapter that no ``nn.Dense``
call picked up is an error, never a silent no-op.

``merge_lora(model)`` (also ``ml.passes.lora.merge``) folds ``W + scale * A B``
back for export.  A quantized base is dequantized and merged in float (exact:
the merged model computes what the adapted one did); ``requantize=True`` stores
the merged kernel in the base's format again (smaller, with a new rounding error).

``qa_group=g`` is QA-LoRA (Xu et al., "QA-LoRA: Quantization-Aware Low-Rank
Adaptation of Large Language Models", 2023): A sees the input average-pooled over
groups of ``g`` input features (``A [in/g, r]``), so ``A B`` is constant within each
quantization group and merges into a group-wise integer base (``ml.quant.intn``
with the same group) as a shift of its zero points: the integer codes are kept
bit for bit and nothing is re-rounded.  The shifted zero points are stored in
float32 (the base's uint8 zero points cannot hold them).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from memlab.facts import measured
from memlab.memory.bytes import tree_bytes
from memlab.model import Model, Pass, Rules, path_str
from memlab.nn.dense_dispatch import DenseDispatch, adapted_modules, install, lora_delta  # noqa: F401
from memlab.passes import PASSES
from memlab.quant.qarray import QArray

ADAPTERS = ("lora_a", "lora_b")
TRAINABLE = (r"(^|/)lora_[ab]$",)  # the regexes the pass puts in the trainable extra
# Hu et al.: adapt the query and value projections.
ATTENTION_QV = {r"attn/(q|v)_proj/kernel$": True}
# QLoRA: adapt every linear layer of the decoder blocks (not the output head).
ALL_LINEAR = {r"^layers/.*kernel$": True}
_INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Static settings of a LoRA pass (kept on ``model.extra("lora")``)."""

    rank: int = 8
    alpha: float = 16.0
    init: str = "kaiming"
    dtype: str = "float32"
    seed: int = 0
    rslora: bool = False
    qa_group: Optional[int] = None  # QA-LoRA: pool the adapter input over groups of this size

    def scale(self, rank: int) -> float:
        """``alpha / r`` (Hu et al.) or ``alpha / sqrt(r)`` (rsLoRA)."""
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)


# ---------------------------------------------------------------------------
# The adapted matmul: memlab.nn.dense_dispatch (one interceptor with the quantize pass)
# ---------------------------------------------------------------------------
_adapted_modules = adapted_modules


class LoraDispatch(DenseDispatch):
    """Deprecated: the adapters run in the model's one Dense interceptor,
    ``memlab.nn.dense_dispatch.DenseDispatch(lora=config)``."""

    def __init__(self, config: LoraConfig):
        warnings.warn("memlab.passes.lora.LoraDispatch is deprecated: use "
                      "memlab.nn.dense_dispatch.DenseDispatch(lora=config) (one nn.Dense "
                      "interceptor for quantized kernels and adapters)", DeprecationWarning,
                      stacklevel=2)
        super().__init__(lora=config)

    @property
    def config(self) -> LoraConfig:
        return self.lora


# ---------------------------------------------------------------------------
# Building adapters
# ---------------------------------------------------------------------------
def _kernel_shape(leaf) -> tuple:
    return tuple(leaf.shape)


def _plan(params, rules: Rules, config: LoraConfig) -> list:
    """``[(keys, kernel, rank)]`` for every kernel the rules select; validates everything."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))
    plan, kernel_parents = [], set()
    for p, leaf in flat:
        keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in p)
        if keys and keys[-1] == "kernel":
            kernel_parents.add(keys[:-1])
    for p, leaf in flat:
        path = path_str(p)
        keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in p)
        cfg = rules.lookup(path)
        if cfg is None or cfg is Rules.NO_MATCH:
            continue
        if cfg is True:
            rank = config.rank
        elif isinstance(cfg, int) and not isinstance(cfg, bool):
            rank = cfg
        else:
            raise TypeError(f"lora rules: the config for {path!r} is {cfg!r}; use True (rank="
                            f"{config.rank}), an int rank, or None to exclude the path")
        name = keys[-1] if keys else ""
        if name in ADAPTERS:
            raise ValueError(f"lora: {path!r} is already a LoRA adapter; the model was adapted "
                             "once already (merge it with ml.passes.lora.merge first)")
        if name == "bias" and keys[:-1] in kernel_parents:
            continue  # the bias of a Dense layer whose kernel the same rule adapts
        shape = _kernel_shape(leaf)
        if name != "kernel" or len(shape) < 2:
            raise ValueError(
                f"lora: rules select {path!r} (shape {list(shape)}), which is not a dense "
                "layer kernel '.../kernel' [..., in, out]; LoRA adapts nn.Dense kernels only. "
                "Narrow the regex (e.g. r'attn/q_proj/kernel$') or add a None rule for it.")
        d_in, d_out = shape[-2], shape[-1]
        g = config.qa_group
        if g is not None:
            if d_in % g:
                raise ValueError(f"lora: qa_group={g} does not divide the input dimension {d_in} "
                                 f"of {path!r}; choose a group that divides it (the base's "
                                 "quantization group)")
            d_in //= g
        if rank <= 0 or rank > min(d_in, d_out):
            what = "min(in/qa_group, out)" if g is not None else "min(in, out)"
            raise ValueError(f"lora: rank {rank} for {path!r} (kernel {list(shape)}) must be "
                             f"in 1..{what} = 1..{min(d_in, d_out)}; lower the rank")
        parent = params
        for k in keys[:-1]:
            parent = parent[k]
        if "lora_a" in parent:
            raise ValueError(f"lora: {path!r} already has adapters; merge them first")
        plan.append((keys, leaf, rank))
    rules.warn_unmatched("lora")
    if not plan:
        raise ValueError("lora: the rules selected no dense kernel, so nothing would train. "
                         "Paths look like 'layers/attn/q_proj/kernel'; list them with "
                         "memlab.param_paths(model) and pass rules={regex: True}.")
    return plan


def _path_key(seed: int, path: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def adapter_init(kernel, rank: int, config: LoraConfig, path: str):
    """``(A, B)`` for a kernel [..., in, out]: A random (see ``init``), B zeros.

    ``kaiming``: A ~ U(-1/sqrt(in), 1/sqrt(in)), the reference implementation's
    kaiming-uniform with a=sqrt(5); ``gaussian``: A ~ N(0, 1/r^2).  Abstract
    kernels give ``ShapeDtypeStruct`` adapters.  QA-LoRA: A is [..., in/g, r]."""
    *lead, d_in, d_out = _kernel_shape(kernel)
    if config.qa_group is not None:
        d_in //= config.qa_group
    dt = jnp.dtype(config.dtype)
    a_shape, b_shape = tuple(lead) + (d_in, rank), tuple(lead) + (rank, d_out)
    abstract = isinstance(kernel, jax.ShapeDtypeStruct) or (
        isinstance(kernel, QArray)
        and any(isinstance(v, jax.ShapeDtypeStruct) for v in kernel.arrays.values()))
    if abstract:
        return jax.ShapeDtypeStruct(a_shape, dt), jax.ShapeDtypeStruct(b_shape, dt)
    key = _path_key(config.seed, path)
    if config.init == "kaiming":
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    else:
        a = jax.random.normal(key, a_shape, jnp.float32) / rank
    return a.astype(dt), jnp.zeros(b_shape, dt)


def _copy_set(tree, keys: tuple, items: dict):
    """A copy of nested dict ``tree`` with ``items`` set in the dict at ``keys``."""
    if not keys:
        out = dict(tree)
        out.update(items)
        return out
    out = dict(tree)
    out[keys[0]] = _copy_set(tree[keys[0]], keys[1:], items)
    return out


def _copy_drop(tree, keys: tuple, names: tuple):
    if not keys:
        return {k: v for k, v in tree.items() if k not in names}
    out = dict(tree)
    out[keys[0]] = _copy_drop(tree[keys[0]], keys[1:], names)
    return out


def add_adapters(params, rules_map, config: LoraConfig, quiet: bool = False):
    """``params`` with ``lora_a``/``lora_b`` beside every kernel the rules select."""
    rules = Rules(rules_map, argname="lora rules")
    if quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = _plan(params, rules, config)
    else:
        plan = _plan(params, rules, config)
    for keys, kernel, rank in plan:
        path = "/".join(str(k) for k in keys[:-1])
        a, b = adapter_init(kernel, rank, config, path)
        params = _copy_set(params, keys[:-1], {"lora_a": a, "lora_b": b})
    return params


def adapter_tree(params):
    """Only the adapter leaves of ``params`` (a tree of the same structure, None elsewhere)."""
    def pick(path, leaf):
        return leaf if path_str(path).rsplit("/", 1)[-1] in ADAPTERS else None
    return jax.tree_util.tree_map_with_path(pick, params)


class _LoraPass(Pass):
    """The lora Pass, also exposing its config."""

    def __new__(cls, *fields, config=None):
        self = super().__new__(cls, *fields)
        self.config = config
        return self


# planner fact (memlab.facts): LoRA fine-tuning against full training
@PASSES.register("lora", quality_loss=measured())
def lora(rank: int = 8, alpha: float = 16.0, rules: Optional[Mapping[str, Any]] = None,
         init: str = "kaiming", dtype: Any = "float32", seed: int = 0,
         rslora: bool = False, qa_group: Optional[int] = None) -> Pass:
    """LoRA adapters on the kernels ``rules`` select (default :data:`ATTENTION_QV`).

    ``rules``: ``{regex: True | rank | None}`` over param paths, first match wins
    (:data:`ALL_LINEAR` adapts every linear layer but the head, as QLoRA does).
    ``init``: how A starts (``kaiming`` or ``gaussian``); B starts at zero.
    ``dtype``: adapter storage (float32 by default, also for a bf16/NF4 base).
    ``rslora``: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    ``qa_group``: QA-LoRA's group-pooled adapter input (use the base's ``intn`` group).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora: rank must be a positive int, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"lora: alpha must be a positive number, got {alpha!r}")
    if init not in _INITS:
        raise ValueError(f"lora: init={init!r} is not one of {_INITS} (B always starts at zero)")
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"lora: dtype {dtype!r} is not a dtype; use e.g. 'float32'") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"lora: adapters train, so dtype must be floating point, got {dt.name}")
    if qa_group is not None and (isinstance(qa_group, bool) or not isinstance(qa_group, int)
                                 or qa_group <= 0):
        raise ValueError(f"lora: qa_group must be None or a positive int (the quantization "
                         f"group size), got {qa_group!r}")
    config = LoraConfig(rank=rank, alpha=float(alpha), init=init, dtype=dt.name, seed=seed,
                        rslora=rslora, qa_group=qa_group)
    rules_map = dict(ATTENTION_QV if rules is None else rules)
    Rules(rules_map, argname="lora rules")  # validate the regexes now

    def transform(model: Model, calib) -> Model:
        if model.extra("lora") is not None:
            raise ValueError("lora: the model already has LoRA adapters; merge them first "
                             "(ml.passes.lora.merge(model))")
        params = add_adapters(model.params, rules_map, config)
        # the one Dense interceptor (the quantize pass's, if it ran first) now adds adapters
        out = model.replace(params=params, wrappers=install(model.wrappers, lora=config))
        return out.with_extras(trainable=TRAINABLE, lora=config)

    def estimate(current, spec, workload):
        from memlab.memory.estimate import TRAINABLE_SHAPES
        shapes = getattr(spec, "param_shapes", None)
        if shapes is None:
            return current
        adapters = adapter_tree(add_adapters(shapes(), rules_map, config, quiet=True))
        n = tree_bytes(adapters)
        out = dict(current)
        out["params"] = out.get("params", 0) + n
        if "gradients" in out:
            out["gradients"] = n
            out[TRAINABLE_SHAPES] = adapters
        return out

    p = Pass(f"lora(r={rank}, alpha={alpha:g})", transform, estimate)
    return _LoraPass(*p, config=config)


# ---------------------------------------------------------------------------
# Merge for export
# ---------------------------------------------------------------------------
def _full_delta(a, b, scale: float, qa_group: Optional[int]):
    """``scale * A @ B`` as a [..., in, out] float32 kernel update."""
    delta = scale * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    if qa_group is not None:  # every input of a group sees the group mean
        delta = jnp.repeat(delta, qa_group, axis=-2) / qa_group
    return delta


def _shift_zero_points(kernel: QArray, a, b, scale: float, group: int) -> QArray:
    """QA-LoRA merge into a group-wise integer kernel: w = (c - z) s, so w + d = (c - z') s
    with z' = z - d / s; the codes stay as they are."""
    from memlab.quant.formats import IntN

    fmt = kernel.format
    d = scale * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    d = d / group  # [..., in/g, out]: the update of each weight in the group
    s = kernel["scale"].astype(jnp.float32)
    zero = (jnp.full(s.shape, 1 << (fmt.bits - 1), jnp.float32) if fmt.symmetric
            else kernel["zero"].astype(jnp.float32))
    arrays = {"data": kernel["data"], "scale": kernel["scale"], "zero": zero - d / s}
    return QArray(arrays, IntN(fmt.bits, fmt.group, symmetric=False), kernel.dtype)


def _merged_kernel(kernel, a, b, scale: float, requantize: bool, qa_group: Optional[int] = None):
    from memlab.quant.formats import IntN

    if (qa_group is not None and isinstance(kernel, QArray) and isinstance(kernel.format, IntN)
            and kernel.format.group == qa_group):
        return _shift_zero_points(kernel, a, b, scale, qa_group)
    delta = _full_delta(a, b, scale, qa_group)
    if isinstance(kernel, QArray):
        merged = (kernel.dequantize(jnp.float32) + delta).astype(kernel.dtype)
        return kernel.format.quantize(merged) if requantize else merged
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merge_lora(model: Model, requantize: bool = False) -> Model:
    """The model with ``W + scale * A @ B`` folded into each adapted kernel, no adapters.

    A float kernel keeps its dtype.  A quantized (QArray) kernel is dequantized
    and merged in its logical dtype by default, which keeps the adapted model's
    function exactly; ``requantize=True`` quantizes the merged kernel again with
    the base's format instead (the base's size, plus a new rounding error).
    QA-LoRA adapters (``qa_group``) on an ``intn`` base of that group merge into
    its zero points instead: codes unchanged, zero points stored in float32.
    """
    if not isinstance(model, Model):
        raise TypeError(f"merge_lora expects a memlab.Model, got {type(model).__name__}")
    config = model.extra("lora")
    modules = sorted(_adapted_modules(model.params))
    if config is None or not modules:
        raise ValueError("merge_lora: the model has no LoRA adapters (apply ml.passes.lora first)")
    params, grown = model.params, 0
    for keys in modules:
        node = params
        for k in keys:
            node = node[k]
        kernel, a, b = node["kernel"], node["lora_a"], node["lora_b"]
        scale = config.scale(a.shape[-1])
        fn = lambda w, a, b: _merged_kernel(w, a, b, scale, requantize, config.qa_group)  # noqa: E731
        abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(kernel))
        new = jax.eval_shape(fn, kernel, a, b) if abstract else fn(kernel, a, b)
        grown += tree_bytes(new) - tree_bytes(kernel)
        params = _copy_drop(params, keys, ADAPTERS)
        params = _copy_set(params, keys, {"kernel": new})
    extras = tuple((k, v) for k, v in model.extras if k not in ("lora", "trainable"))
    wrappers = tuple(w for w in model.wrappers if not isinstance(w, DenseDispatch))
    if any(isinstance(x, QArray) for x in jax.tree_util.tree_leaves(
            params, is_leaf=lambda x: isinstance(x, QArray))):  # kernels left quantized
        wrappers = install(model.wrappers, lora=None)
    history = tuple((p, s) for p, s in model.history if not isinstance(p, _LoraPass))
    out = model.replace(params=params, extras=extras, wrappers=wrappers, history=history)
    if grown:
        # dequantized kernels (or float32 zero points) replace the quantized storage
        def estimate(current, spec, workload, delta=grown):
            out_ = dict(current)
            out_["params"] = out_.get("params", 0) + delta
            return out_
        merge_pass = Pass("lora_merge", lambda m, c: m, estimate)
        out = out.replace(history=history + ((merge_pass, model.spec),))
    return out


lora.merge = merge_lora
lora.ATTENTION_QV = ATTENTION_QV
lora.ALL_LINEAR = ALL_LINEAR
