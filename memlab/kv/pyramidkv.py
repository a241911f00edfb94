"""PyramidKV: SnapKV selection with per-layer budgets that shrink with depth (Cai et al. 2024,
"PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv:2406.02069).

``PyramidKV(budget, window=32, kernel=7, pooling="max", beta=20)``: the
scoring, prefill selection and decode rule are SnapKV's (see
:mod:`memlab.kv.snapkv`), but layer ``l`` keeps ``b_l`` tokens instead of
``budget``.  With ``a = budget - window`` (the selected, non-window part of the
average layer) and ``L`` layers, the non-window budgets form the paper's
arithmetic sequence from ``2a - a/beta`` at the bottom layer to ``a/beta`` at the
top layer, so they average ``a``; each layer also keeps its ``window``::

    b_l = window + n_l,   n_l ~ (2a - a/beta) - (2a - 2a/beta) * l / (L - 1)

rounded to integers by largest remainder so that ``sum_l b_l == budget * L``
exactly and ``b_l`` never increases with ``l`` (:meth:`PyramidKV.layer_budgets`;
``beta = 1`` gives SnapKV's uniform budget).  The reference code rounds each
step down (its sum falls short of ``budget * L``) and shrinks the bottom layers
for prompts shorter than ``2a``; the budgets here are static.  An explicit
``Dims.layer_budget`` tuple overrides the formula.

Storage (honestly): layers run under ``nn.scan`` with identical shapes, so
**every layer allocates the largest budget** ``S = b_0`` slots and layer ``l``
only uses the first ``b_l`` (the rest stay empty, ``pos = MAX_POS``; the traced
``ctx.layer`` indexes the budget array).  A cache shorter than ``b_0`` allocates
``S = max_len`` slots: layers with ``b_l >= max_len`` then keep every token
(the sequence never outgrows the cache) and the others evict as usual::

    k, v           [B, S, Hkv, D]   storage dtype
    pos            [B, Hkv, S]      int32, MAX_POS = empty
    pin            [B]              int32 = max(n_new - window, 0)
    layer_budgets  [L]              int32 (the protocol gives prefill/decode no Dims)

so :meth:`nbytes` (one layer, what is allocated) is SnapKV's formula at ``S``
plus ``4 L``, i.e. *more* than a uniform SnapKV of the same total budget.
:meth:`logical_bytes` is what a ragged per-layer layout would store for all
``L`` layers (the paper's number): ``sum_l (2 B b_l Hkv D itemsize + 4 B Hkv b_l
+ 4 B)`` with ``b_l`` capped at ``max_len``, equal to ``L * SnapKV(budget).nbytes``
when ``max_len >= b_0`` -- compare policies at equal total budget with it, and
report ``L * nbytes`` as the memory actually used.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Optional

import jax.numpy as jnp

from memlab.kv.base import POLICIES
from memlab.kv._budget import SnapKVBase
from memlab.kv.base import Dims


def pyramid_budgets(budget: int, window: int, beta: float, n_layers: int) -> tuple:
    """Per-layer token budgets (bottom layer first): see the module docstring."""
    a = budget - window
    if n_layers == 1:
        return (budget,)
    top = Fraction(a) / Fraction(beta)
    bottom = 2 * a - top
    exact = [bottom - (bottom - top) * Fraction(i, n_layers - 1) for i in range(n_layers)]
    n = [int(x) for x in exact]                       # floor (all >= 0)
    short = a * n_layers - sum(n)                      # exact sum is a * L
    order = sorted(range(n_layers), key=lambda i: (-(exact[i] - n[i]), i))
    for i in order[:short]:
        n[i] += 1
    return tuple(window + x for x in n)


@POLICIES.register("pyramidkv")
@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKVBase):
    """SnapKV with budgets decreasing linearly over layers (padded to the largest, see module doc)."""

    name = "pyramidkv"
    budget: int                    # average tokens per layer; the layers sum to budget * n_layers
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    beta: float = 20.0             # top layer keeps window + (budget - window) / beta
    dtype: Optional[str] = None    # storage dtype; None = the model's compute dtype

    def __post_init__(self):
        self._check_snap("PyramidKV")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 1:
            raise ValueError(f"PyramidKV: beta={self.beta!r} must be a number >= 1 (the top layer "
                             "keeps (budget - window) / beta selected tokens; beta=1 is uniform).")

    def layer_budgets(self, dims: Dims) -> tuple:
        """Token budget of each layer, bottom first (``dims.layer_budget`` if set)."""
        if dims.layer_budget is not None:
            return tuple(int(x) for x in dims.layer_budget)
        return pyramid_budgets(self.budget, self.window, self.beta, dims.n_layers)

    def validate(self, dims: Dims) -> None:
        b = self.layer_budgets(dims)
        if dims.layer_budget is not None:
            if len(b) != dims.n_layers or any(x < self.window for x in b):
                raise ValueError(
                    f"PyramidKV: Dims.layer_budget={dims.layer_budget} must hold n_layers="
                    f"{dims.n_layers} ints >= window={self.window}; fix it or leave it None.")

    def slots(self, dims: Dims) -> int:
        """The bottom layer's budget, capped at ``max_len`` (a shorter cache never evicts there)."""
        return min(max(self.layer_budgets(dims)), dims.max_len)

    def extra_state(self, dims: Dims) -> dict:
        return {"layer_budgets": jnp.asarray(self.layer_budgets(dims), jnp.int32)}

    def extra_bytes(self, dims: Dims) -> int:
        return 4 * dims.n_layers

    def layer_limit(self, state, ctx):
        return state["layer_budgets"][ctx.layer]

    def logical_bytes(self, dims: Dims) -> int:
        """Bytes of all ``n_layers`` layers if each stored only its own ``b_l`` slots."""
        return sum(self.bytes_for_slots(dims, min(b, dims.max_len)) for b in self.layer_budgets(dims))
