"""The Model/Pass contract.

A :class:`Model` is a pure function plus a pytree: ``model.apply(params, *inputs)``
with a small static ``spec``.  A :class:`Pass` turns a Model into a Model, and
passes compose in order with :func:`compose`, the way ``optax.chain`` composes
gradient transformations.

What a pass may change, and nothing else:

* ``params``   -- the weight pytree (cast, quantized, sharded, offloaded leaves);
* ``module``   -- a reconfigured Flax module (e.g. a remat policy on the scanned
                  layers), built with ``module.clone(...)``;
* ``wrappers`` -- functions ``apply -> apply`` layered over the module's apply
                  (sharding constraints, kernel dispatch);
* ``extras``   -- a static mapping for the cache spec and training-side settings;
* ``dispatch`` -- a :class:`memlab.dispatch.Dispatch`: which attention,
                  cross-entropy and quantized-matmul implementations (and which
                  attention hook) the model runs.  Static data, so part of the jit
                  cache key: ``model.with_dispatch(attention="chunked")`` is a
                  different compiled program, never a stale trace.

Every composed model stays a pytree whose only leaves are its params, so it is
``jax.jit``-able and ``jax.eval_shape``-able (a 7B model can be planned without
allocating it) and its params checkpoint with orbax.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax

from memlab.dispatch import Dispatch, applying

PyTree = Any
ApplyFn = Callable[..., Any]
Wrapper = Callable[[ApplyFn], ApplyFn]
# Bytes by category, e.g. {"params": 123, "optimizer_state": 456}.
Estimate = dict


class Workload(NamedTuple):
    """What a memory estimate is for: ``task`` in train|prefill|decode, batch, seq."""

    task: str
    batch: int
    seq: int


@dataclasses.dataclass(frozen=True)
class Model:
    """A pure apply function over a params pytree, with a static spec.

    Build one from a Flax Linen module (``Model(module=m, params=p)``) or from any
    pure function (``Model(fn=f, params=p)`` with ``f(params, *inputs)``).
    """

    params: PyTree
    module: Any = None
    fn: Optional[ApplyFn] = None
    spec: Any = None
    wrappers: tuple = ()
    extras: tuple = ()  # sorted (key, value) pairs; static and hashable
    history: tuple = ()  # ((Pass, spec before it), ...) for analytic estimates
    tokenizer: Any = dataclasses.field(default=None, compare=False)
    dispatch: Dispatch = Dispatch()  # static: which implementations run (memlab.dispatch)

    def __post_init__(self):
        if (self.module is None) == (self.fn is None):
            raise ValueError(
                "Model needs exactly one of `module` (a Flax Linen module) or `fn` "
                "(a pure function fn(params, *inputs)); got "
                f"module={type(self.module).__name__}, fn={self.fn!r}.")
        if not isinstance(self.dispatch, Dispatch):
            raise TypeError(f"Model: dispatch must be a memlab.dispatch.Dispatch, got "
                            f"{type(self.dispatch).__name__}; use model.with_dispatch("
                            "attention=..., cross_entropy=..., qmatmul=...).")

    def __repr__(self) -> str:
        from memlab.memory.bytes import fmt_bytes, tree_bytes
        leaves = jax.tree_util.tree_leaves(self.params)
        what = getattr(self.spec, "name", None) or type(self.module or self.fn).__name__
        passes = ", ".join(p.name for p, _ in self.history) or "none"
        return (f"Model({what}, {len(leaves)} param arrays, {fmt_bytes(tree_bytes(self.params))}"
                f"{', abstract' if self.abstract else ''}, passes: {passes})")

    # -- the pure function ------------------------------------------------
    @functools.cached_property
    def apply(self) -> ApplyFn:
        """``apply(params, *inputs, **kwargs)``: the module or fn with every wrapper, traced
        with the model's :attr:`dispatch` active (:func:`memlab.dispatch.applying`)."""
        if self.module is not None:
            module = self.module

            def base(params, *args, **kwargs):
                return module.apply({"params": params}, *args, **kwargs)
        else:
            base = self.fn
        for wrap in self.wrappers:
            base = wrap(base)
        inner, choice = base, self.dispatch

        def apply(params, *args, **kwargs):
            with applying(choice):
                return inner(params, *args, **kwargs)
        apply.__name__ = getattr(inner, "__name__", "apply")
        return apply

    def __call__(self, *args, **kwargs):
        return self.apply(self.params, *args, **kwargs)

    # -- functional updates -----------------------------------------------
    def replace(self, **changes) -> "Model":
        return dataclasses.replace(self, **changes)

    def wrap(self, wrapper: Wrapper) -> "Model":
        return self.replace(wrappers=self.wrappers + (wrapper,))

    def with_extras(self, **items) -> "Model":
        merged = dict(self.extras)
        merged.update(items)
        return self.replace(extras=tuple(sorted(merged.items())))

    def with_dispatch(self, **choices) -> "Model":
        """The model with some :class:`memlab.dispatch.Dispatch` fields changed, e.g.
        ``model.with_dispatch(attention="chunked", qmatmul="interpret")``."""
        return self.replace(dispatch=self.dispatch.replace(**choices))

    def extra(self, key: str, default=None):
        return dict(self.extras).get(key, default)

    @property
    def abstract(self) -> bool:
        """True when params are shapes only (``jax.ShapeDtypeStruct``)."""
        leaves = jax.tree_util.tree_leaves(self.params)
        return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def _model_flatten(m: Model):
    return (m.params,), (m.module, m.fn, m.spec, m.wrappers, m.extras, m.history, m.tokenizer,
                         m.dispatch)


def _model_unflatten(aux, children):
    module, fn, spec, wrappers, extras, history, tokenizer, dispatch = aux
    return Model(params=children[0], module=module, fn=fn, spec=spec, wrappers=wrappers,
                 extras=extras, history=history, tokenizer=tokenizer, dispatch=dispatch)


jax.tree_util.register_pytree_node(Model, _model_flatten, _model_unflatten)


# ---------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------
class Pass(NamedTuple):
    """A Model -> Model transformation with an analytic memory estimate.

    ``transform(model, calib)`` returns the new model (``calib`` is an iterable of
    input batches for passes that calibrate, else ignored).  ``estimate(bytes,
    spec, workload)`` maps a bytes-by-category dict to the dict after this pass,
    given the spec the pass saw and a :class:`Workload`, so a planner can reason
    before anything is compiled.  Applied passes are recorded on
    ``model.history`` so the profiler can replay their estimates.
    """

    name: str
    transform: Callable[[Model, Any], Model]
    estimate: Optional[Callable[[Estimate, Any, Workload], Estimate]] = None
    record: bool = True

    def __call__(self, model: Model, calib: Any = None) -> Model:
        if not isinstance(model, Model):
            raise TypeError(
                f"pass {self.name!r} expects a memlab.Model, got {type(model).__name__}; "
                "wrap a Flax module with memlab.Model(module=m, params=p) or a function "
                "with memlab.Model(fn=f, params=p).")
        out = self.transform(model, calib)
        if not isinstance(out, Model):
            raise TypeError(f"pass {self.name!r} returned {type(out).__name__}, not a Model")
        if self.record:
            out = out.replace(history=model.history + ((self, model.spec),))
        return out

    def estimate_bytes(self, current: Estimate, spec: Any, workload: Workload) -> Estimate:
        if self.estimate is None:
            return dict(current)
        return self.estimate(dict(current), spec, workload)


def compose(*passes: Pass) -> Pass:
    """Chain passes in order: ``compose(a, b)(m) == b(a(m))``."""
    flat = []
    for p in passes:
        if not isinstance(p, Pass):
            raise TypeError(f"compose() takes memlab Passes, got {type(p).__name__}: {p!r}")
        flat.append(p)

    def transform(model, calib):
        for p in flat:
            model = p(model, calib)
        return model

    def estimate(current, spec, workload):
        for p in flat:
            current = p.estimate_bytes(current, spec, workload)
        return current

    name = "compose(" + ", ".join(p.name for p in flat) + ")"
    # The inner passes record themselves on the model's history.
    return Pass(name, transform, estimate, record=False)


# ---------------------------------------------------------------------------
# Rules: module-path regex -> config, first match wins
# ---------------------------------------------------------------------------
_UNMATCHED = object()


def path_str(path: Sequence[Any]) -> str:
    """``('layers', 'attn', 'q_proj', 'kernel')`` keys -> ``'layers/attn/q_proj/kernel'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


class Rules:
    """Ordered ``{regex: config}`` rules over parameter paths; first match wins.

    A rule whose config is ``None`` excludes what it matches.  Paths look like
    ``layers/attn/q_proj/kernel``; regexes are searched (``re.search``).  After a
    pass, :meth:`unmatched` lists the rules that matched nothing, and
    :meth:`warn_unmatched` reports them, since a typo there silently does nothing.
    """

    def __init__(self, rules: Mapping[str, Any] | Iterable[tuple[str, Any]] | None,
                 default: Any = _UNMATCHED, *, argname: str = "rules"):
        items = list(rules.items() if isinstance(rules, Mapping) else (rules or []))
        self._compiled = []
        for pattern, config in items:
            if not isinstance(pattern, str):
                raise TypeError(f"{argname}: keys must be regex strings, got {pattern!r}")
            try:
                self._compiled.append((pattern, re.compile(pattern), config))
            except re.error as e:
                raise ValueError(
                    f"{argname}: the regex {pattern!r} does not compile ({e}); rules map "
                    "module-path regexes like r'.*attn/q_proj.*' to a config") from None
        self.default = default
        self.argname = argname
        self._hits = {p: 0 for p, _, _ in self._compiled}

    def lookup(self, path: str):
        """Config for ``path``: the first matching rule's, else the default.

        Returns the module-level sentinel ``Rules.NO_MATCH`` when nothing matches and
        no default was given.
        """
        for pattern, rx, config in self._compiled:
            if rx.search(path):
                self._hits[pattern] += 1
                return config
        return self.default if self.default is not _UNMATCHED else Rules.NO_MATCH

    NO_MATCH = _UNMATCHED

    def unmatched(self) -> list[str]:
        return [p for p, n in self._hits.items() if n == 0]

    def warn_unmatched(self, where: str) -> list[str]:
        missing = self.unmatched()
        if missing:
            warnings.warn(
                f"{where}: {self.argname} matched no parameter path: {missing}. "
                "Paths look like 'layers/attn/q_proj/kernel'; list them with "
                "memlab.param_paths(model).", UserWarning, stacklevel=3)
        return missing


def param_paths(model_or_params) -> list[str]:
    """Every parameter path, e.g. to write rules against."""
    params = model_or_params.params if isinstance(model_or_params, Model) else model_or_params
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def map_params(fn: Callable[[str, Any, Any], Any], params: PyTree, rules: Rules,
               where: str) -> PyTree:
    """Apply ``fn(path, leaf, config)`` to each leaf whose rule config is not None.

    Leaves that match no rule (and no default) or a ``None`` rule pass through.
    Rules that matched nothing are reported with a warning.
    """
    def visit(path, leaf):
        config = rules.lookup(path_str(path))
        if config is None or config is Rules.NO_MATCH:
            return leaf
        return fn(path_str(path), leaf, config)

    out = jax.tree_util.tree_map_with_path(visit, params)
    rules.warn_unmatched(where)
    return out


# ---------------------------------------------------------------------------
# Trainable / frozen split (LoRA-style passes mark what trains)
# ---------------------------------------------------------------------------
def trainable_patterns(model: Model) -> Optional[tuple]:
    """The regexes a pass set with ``model.with_extras(trainable=(...))``; None = all train."""
    pats = model.extra("trainable") if isinstance(model, Model) else None
    return None if pats is None else tuple(pats)


def split_trainable(model: Model, params: PyTree = None):
    """``(trainable, frozen)``: two trees shaped like ``params`` with ``None`` where a
    leaf belongs to the other side.

    A leaf trains when its path (``layers/attn/q_proj/lora_a``) matches one of the
    model's ``trainable`` regexes (``re.search``); with none set, everything trains.
    Non-float leaves (quantized codes, int metadata) never train.  Undo with
    :func:`merge_trainable`.  Gradients and optimizer state are taken over the
    trainable tree only, so frozen weights cost neither.
    """
    import jax.numpy as jnp

    params = model.params if params is None else params
    pats = trainable_patterns(model)
    rxs = None if pats is None else [re.compile(p) for p in pats]

    def trains(path, leaf):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            return False
        return rxs is None or any(rx.search(path_str(path)) for rx in rxs)

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    mask = [trains(p, x) for p, x in flat]
    leaves = [x for _, x in flat]
    trainable = treedef.unflatten([x if m else None for x, m in zip(leaves, mask)])
    frozen = treedef.unflatten([None if m else x for x, m in zip(leaves, mask)])
    return trainable, frozen


def merge_trainable(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of :func:`split_trainable`: take each leaf from whichever side has it."""
    return jax.tree_util.tree_map(lambda a, b: b if a is None else a, trainable, frozen,
                                  is_leaf=lambda x: x is None)
