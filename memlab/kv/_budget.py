"""Shared machinery of the token-eviction policies: a cache of a fixed ``budget`` of tokens.

Used by :mod:`memlab.kv.streaming` (StreamingLLM), :mod:`memlab.kv.h2o` (H2O),
:mod:`memlab.kv.snapkv` (SnapKV) and :mod:`memlab.kv.pyramidkv` (PyramidKV).
Each keeps, per row and layer, at most ``S`` tokens (``S = budget``, or the
largest per-layer budget for PyramidKV) and forgets the rest for good.  A cache
shorter than the budget (``max_len < budget``) allocates ``S = max_len`` slots:
the sequence never outgrows them, so every token is kept and nothing is
evicted, exactly as in a cache of ``budget`` slots over the same tokens.

State layout (one layer; the model stacks ``n_layers`` copies)
--------------------------------------------------------------
``k, v``   ``[B, S, Hkv, D]`` in the storage dtype (the model's, or the
           policy's ``dtype`` field).  Keys are stored **after RoPE at their
           original positions**; queries keep their true positions (what the
           H2O / SnapKV / PyramidKV implementations do).
``pos``    int32 absolute position of each stored token, ``MAX_POS`` for an
           empty slot (the causal mask hides it).  ``[B, S]`` when one
           selection serves all KV heads (StreamingLLM), ``[B, Hkv, S]`` when
           every KV head keeps its own tokens (H2O, SnapKV, PyramidKV): slot
           ``j`` of head ``h`` then holds the token at ``pos[b, h, j]`` and
           ``k[b, j, h]`` is *its* key.  Slots are unordered.
``score``  float32 ``[B, Hkv, S]``: accumulated attention (H2O only).
``pin``    int32 ``[B]``: SnapKV/PyramidKV -- tokens below this position were
           chosen by the prefill selection and are never evicted in decode.
``layer_budgets`` int32 ``[n_layers]`` (PyramidKV only; the protocol hands
           ``prefill``/``decode`` no ``Dims``, so the per-layer budgets travel
           in the state and are indexed by the traced ``ctx.layer``).

Steps
-----
Prefill (the cache is empty, as the protocol says; a prefill *replaces* the
state, so chunked prefill into a non-empty cache is not supported): the
output is full causal attention over the uncompressed prompt (:func:`memlab.kv.base.attend`, as the papers do); the
policy then gives every prompt token a *priority* (``+inf`` = must keep,
``-inf`` = never keep, else a score) and the top ``S`` by priority are kept
(ties: lower position first, ``lax.top_k`` order); padding gets ``-inf``, so
a row with at most ``S`` valid tokens keeps all of them.

Decode: if the row (and head) has a free slot the new token goes there,
otherwise the policy names one slot to evict (per row, or per row and KV
head) and the new token overwrites it; then the new query attends over the
kept entries, itself included.  The eviction therefore uses the scores
accumulated *before* the new query (static shapes: the cache never holds
``S + 1`` tokens, unlike the reference H2O code which evicts after
attending).

Per-head attention (``pos [B, Hkv, S]``) is a masked softmax written here
(:func:`attend_per_head`, float32, O(S) per query); per-row policies call
:func:`memlab.kv.base.attend` with ``kv_positions = pos``.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from memlab.kv.base import MAX_POS, Dims, KVPolicy, attend, prompt_positions

NEG_INF = -np.inf


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
def check_int(owner: str, name: str, value, minimum: int) -> int:
    """``value`` as an int ``>= minimum`` or a ValueError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}: {name}={value!r} must be an int >= {minimum}.")
    if value < minimum:
        raise ValueError(f"{owner}: {name}={value} must be >= {minimum}.")
    return int(value)


def check_dtype(owner: str, dtype) -> None:
    if dtype is None:
        return
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{owner}: dtype={dtype!r} is not a dtype; use e.g. 'bfloat16' or None "
                         "(the model's compute dtype).") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{owner}: dtype={dtype!r} must be a float dtype (float32, bfloat16, "
                         "float16); for quantized storage use a quantizing policy.")


def check_fits(owner: str, slots: int, dims: Dims, what: str = "budget") -> None:
    """Raise if ``slots > dims.max_len``.  The policies no longer call it: a budget larger
    than the cache is served by :meth:`BudgetPolicy.slots` (``min(budget, max_len)``)."""
    if slots > dims.max_len:
        raise ValueError(
            f"{owner}: {what}={slots} is larger than the cache's max_len={dims.max_len}, so it "
            f"would never fill; use {what} <= {dims.max_len} (or the 'dense' policy to keep "
            "every token).")


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------
class BudgetPolicy(KVPolicy):
    """A fixed-budget token cache; subclasses say what to keep and what to evict.

    Subclasses are frozen dataclasses with ``budget`` and ``dtype`` fields and
    override :meth:`prefill_priority` and :meth:`evict_slot` (and, for
    per-layer budgets, :meth:`slots` / :meth:`extra_state` / :meth:`layer_limit`).
    """

    per_head = True       # pos [B, Hkv, S] (own selection per KV head) vs [B, S]
    keeps_score = False   # score [B, Hkv, S] float32
    keeps_pin = False     # pin [B] int32

    # -- shapes --------------------------------------------------------------
    def slots(self, dims: Dims) -> int:
        """Token slots per (row, layer[, head]) actually allocated: ``min(budget, max_len)``
        (a sequence never outgrows ``max_len``, so a larger budget never evicts)."""
        return min(self.budget, dims.max_len)

    def storage_dtype(self, dims: Dims):
        return jnp.dtype(self.dtype or dims.dtype)

    def extra_state(self, dims: Dims) -> dict:
        return {}

    def init(self, dims: Dims):
        self.validate(dims)
        b, s, hkv = dims.batch, self.slots(dims), dims.n_kv_heads
        dt = self.storage_dtype(dims)
        state = {"k": jnp.zeros((b, s, hkv, dims.head_dim), dt),
                 "v": jnp.zeros((b, s, hkv, dims.head_dim), dt),
                 "pos": jnp.full((b, hkv, s) if self.per_head else (b, s), MAX_POS, jnp.int32)}
        if self.keeps_score:
            state["score"] = jnp.zeros((b, hkv, s), jnp.float32)
        if self.keeps_pin:
            state["pin"] = jnp.zeros((b,), jnp.int32)
        state.update(self.extra_state(dims))
        return state

    def nbytes(self, dims: Dims) -> int:
        return self.bytes_for_slots(dims, self.slots(dims)) + self.extra_bytes(dims)

    def bytes_for_slots(self, dims: Dims, s: int) -> int:
        """Bytes of ``k, v, pos[, score][, pin]`` for ``s`` slots (one layer)."""
        b, hkv = dims.batch, dims.n_kv_heads
        kv = 2 * b * s * hkv * dims.head_dim * self.storage_dtype(dims).itemsize
        pos = 4 * b * s * (hkv if self.per_head else 1)
        score = 4 * b * hkv * s if self.keeps_score else 0
        pin = 4 * b if self.keeps_pin else 0
        return kv + pos + score + pin

    def extra_bytes(self, dims: Dims) -> int:
        return 0

    # -- policy hooks ----------------------------------------------------------
    def prefill_priority(self, q, k, ctx, limit):
        """``(priority [B, G, T] float32, score [B, Hkv, T] | None, pin [B] | None)``."""
        raise NotImplementedError

    def evict_slot(self, state, pos, occupied, p, limit):
        """Slot to overwrite when full: int32 ``[B, G]`` (``pos [B, G, S]``, ``p [B]``)."""
        raise NotImplementedError

    def layer_limit(self, state, ctx):
        """Traced number of usable slots of this layer, or None (all ``S``)."""
        return None

    # -- protocol ------------------------------------------------------------
    def prefill(self, state, q, k, v, ctx):
        out = attend(q, k, v, ctx.positions, prompt_positions(ctx))
        limit = self.layer_limit(state, ctx)
        priority, score, pin = self.prefill_priority(q, k, ctx, limit)
        s = state["k"].shape[1]
        idx, keep = select_top(priority, s, limit)                  # [B, G, S]
        new = {"k": gather_tokens(k, idx, keep, state["k"].dtype),
               "v": gather_tokens(v, idx, keep, state["v"].dtype)}
        positions = jnp.broadcast_to(ctx.positions[:, None, :], priority.shape)
        pos = jnp.where(keep, jnp.take_along_axis(positions, idx, axis=-1), MAX_POS)
        new["pos"] = pos.astype(jnp.int32) if self.per_head else pos[:, 0].astype(jnp.int32)
        if self.keeps_score:
            new["score"] = jnp.where(keep, jnp.take_along_axis(score, idx, axis=-1), 0.0)
        if self.keeps_pin:
            new["pin"] = pin.astype(jnp.int32)
        return out, {**state, **new}

    def decode(self, state, q, k, v, ctx):
        if q.shape[1] != 1:
            raise ValueError(f"{type(self).__name__}.decode takes one token per row, got T={q.shape[1]}.")
        b, s = state["k"].shape[:2]
        hkv = state["k"].shape[2]
        p = ctx.positions[:, 0].astype(jnp.int32)                       # [B]
        pos = state["pos"] if self.per_head else state["pos"][:, None]  # [B, G, S]
        limit = self.layer_limit(state, ctx)
        usable = jnp.ones((s,), bool) if limit is None else jnp.arange(s) < limit
        occupied = (pos != MAX_POS) & usable
        free = (pos == MAX_POS) & usable
        slot = jnp.where(jnp.any(free, axis=-1), jnp.argmax(free, axis=-1),
                         self.evict_slot(state, pos, occupied, p, limit)).astype(jnp.int32)  # [B, G]
        slot_h = jnp.broadcast_to(slot, (b, hkv))
        rows = jnp.arange(b)[:, None]
        heads = jnp.arange(hkv)[None, :]
        new = {"k": state["k"].at[rows, slot_h, heads].set(k[:, 0].astype(state["k"].dtype)),
               "v": state["v"].at[rows, slot_h, heads].set(v[:, 0].astype(state["v"].dtype))}
        g = pos.shape[1]
        pos = pos.at[rows, jnp.arange(g)[None, :], slot].set(jnp.broadcast_to(p[:, None], (b, g)))
        new["pos"] = pos if self.per_head else pos[:, 0]
        if self.per_head:
            out, probs = attend_per_head(q, new["k"], new["v"], ctx.positions, pos)
        else:
            out, probs = attend(q, new["k"], new["v"], ctx.positions, new["pos"]), None
        if self.keeps_score:
            written = jnp.arange(s)[None, None, :] == slot_h[:, :, None]
            new["score"] = jnp.where(written, 0.0, state["score"]) + probs
        return out, {**state, **new}


# ---------------------------------------------------------------------------
# selection / gather helpers
# ---------------------------------------------------------------------------
def select_top(priority, s: int, limit=None):
    """Indices ``[B, G, s]`` of the ``s`` highest-priority tokens and whether each slot keeps one.

    A slot keeps its token iff the priority is ``> -inf`` and (with ``limit``,
    a traced int) the slot index is ``< limit``: ``top_k`` sorts descending,
    so the first ``limit`` slots hold the ``limit`` best tokens.  ``T < s`` is
    padded with ``-inf``.
    """
    t = priority.shape[-1]
    if t < s:
        priority = jnp.pad(priority, ((0, 0), (0, 0), (0, s - t)), constant_values=NEG_INF)
    vals, idx = jax.lax.top_k(priority, s)
    keep = vals > NEG_INF
    if limit is not None:
        keep &= jnp.arange(s)[None, None, :] < limit
    idx = jnp.where(keep, idx, 0)        # a padded index may point past T: make it safe
    return idx.astype(jnp.int32), keep


def gather_tokens(x, idx, keep, dtype):
    """``x [B, T, Hkv, D]`` at per-head indices ``idx [B, G, S]`` -> ``[B, S, Hkv, D]`` (dropped: 0)."""
    b, _, hkv, d = x.shape
    idx = jnp.broadcast_to(idx, (b, hkv, idx.shape[-1]))
    keep = jnp.broadcast_to(keep, idx.shape)
    xt = jnp.swapaxes(x, 1, 2)                                        # [B, Hkv, T, D]
    got = jnp.take_along_axis(xt, idx[..., None], axis=2)            # [B, Hkv, S, D]
    got = jnp.where(keep[..., None], got, jnp.zeros((), got.dtype))
    return jnp.swapaxes(got, 1, 2).astype(dtype)


def valid_prompt(ctx):
    """``[B, T]`` bool: token ``j`` of the right-padded prompt is real."""
    return jnp.arange(ctx.positions.shape[1])[None, :] < ctx.n_new[:, None]


def last_tokens(ctx, n: int):
    """``[B, T]`` bool: the last ``n`` real tokens of each row."""
    j = jnp.arange(ctx.positions.shape[1])[None, :]
    return valid_prompt(ctx) & (j >= ctx.n_new[:, None] - n)


# ---------------------------------------------------------------------------
# attention helpers
# ---------------------------------------------------------------------------
def masked_probs(logits, visible):
    """Softmax over the last axis restricted to ``visible`` (rows with nothing visible: 0)."""
    logits = jnp.where(visible, logits, NEG_INF)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.where(visible, jnp.exp(logits - mx), 0.0)
    tot = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(tot > 0, tot, 1.0)


def attend_per_head(q, k, v, q_positions, kv_positions):
    """Causal GQA attention where every KV head has its own key positions.

    ``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]``, ``q_positions [B, T]``,
    ``kv_positions [B, Hkv, S]`` (``MAX_POS`` hidden).  Float32 softmax, output
    in ``q.dtype``.  Returns ``(out [B, T, H, D], probs [B, Hkv, S])`` where
    ``probs`` is the attention summed over the ``T`` queries and averaged over
    the query heads of each KV group (H2O's per-step score increment).
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qg = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) / math.sqrt(d)
    vis = kv_positions[:, :, None, None, :] <= q_positions[:, None, None, :, None]
    p = masked_probs(logits, vis)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32)).reshape(b, t, h, d)
    return out.astype(q.dtype), jnp.sum(p, axis=3).mean(axis=2)


def query_scores(q, k, q_positions, q_valid, ctx):
    """Attention of the given queries to all prompt keys, summed over the queries and averaged
    over each KV group's query heads: ``[B, Hkv, T]`` float32.

    ``q [B, C, H, D]`` with positions ``[B, C]`` and a validity mask ``[B, C]``;
    keys are the prompt ``k [B, T, Hkv, D]`` at ``ctx.positions`` (padding hidden).
    """
    b, c, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    kpos = prompt_positions(ctx)                                     # [B, T]
    qg = q.astype(jnp.float32).reshape(b, c, hkv, g, d)
    logits = jnp.einsum("bckgd,btkd->bkgct", qg, k.astype(jnp.float32)) / math.sqrt(d)
    vis = (kpos[:, None, :] <= q_positions[:, :, None]) & q_valid[:, :, None]   # [B, C, T]
    p = masked_probs(logits, vis[:, None, None])
    return jnp.sum(p, axis=3).mean(axis=2)


def accumulated_scores(q, k, ctx, chunk: int):
    """H2O prefill scores: every real prompt query's attention to every prompt key, summed
    over queries, averaged over each KV group -- ``[B, Hkv, T]`` float32.

    Loops over query chunks of ``chunk`` with ``lax.scan`` so only a
    ``[B, H, chunk, T]`` block of probabilities exists at a time (never T x T).
    """
    b, t, h, d = q.shape
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    pos = jnp.pad(ctx.positions, ((0, 0), (0, pad)))
    valid = jnp.pad(valid_prompt(ctx), ((0, 0), (0, pad)))
    xs = (jnp.moveaxis(qp.reshape(b, n, c, h, d), 1, 0), jnp.moveaxis(pos.reshape(b, n, c), 1, 0),
          jnp.moveaxis(valid.reshape(b, n, c), 1, 0))

    def body(acc, x):
        qc, pc, vc = x
        return acc + query_scores(qc, k, pc, vc, ctx), None

    acc0 = jnp.zeros((b, k.shape[2], t), jnp.float32)
    if n == 1:
        return body(acc0, jax.tree.map(lambda a: a[0], xs))[0]
    return jax.lax.scan(body, acc0, xs)[0]


def window_scores(q, k, ctx, window: int):
    """SnapKV's observation: the last ``window`` real queries of each row to all prompt keys,
    summed over those queries, averaged over each KV group -- ``[B, Hkv, T]`` float32."""
    t = q.shape[1]
    qi = ctx.n_new[:, None] - window + jnp.arange(window)[None, :]            # [B, W]
    ok = qi >= 0
    qi = jnp.clip(qi, 0, t - 1)
    qw = jnp.take_along_axis(q, qi[:, :, None, None], axis=1)
    pw = jnp.take_along_axis(ctx.positions, qi, axis=1)
    return query_scores(qw, k, pw, ok, ctx)


def pool1d(x, valid, kernel: int, pooling: str):
    """SnapKV's 1-D pooling along the key axis (stride 1, ``kernel // 2`` padding each side).

    Entries outside ``valid`` count as padding: ``-inf`` for ``max`` (PyTorch's
    ``max_pool1d``) and 0 for ``avg`` (``avg_pool1d`` with
    ``count_include_pad=True``: the sum over the window divided by ``kernel``).
    """
    if kernel == 1:
        return jnp.where(valid, x, NEG_INF if pooling == "max" else 0.0)
    half = kernel // 2
    pad = ((0, 0),) * (x.ndim - 1) + ((half, half),)
    dims = (1,) * (x.ndim - 1) + (kernel,)
    if pooling == "max":
        x = jnp.where(valid, x, NEG_INF)
        return jax.lax.reduce_window(x, NEG_INF, jax.lax.max, dims, (1,) * x.ndim, pad)
    x = jnp.where(valid, x, 0.0)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, (1,) * x.ndim, pad) / kernel


class SnapKVBase(BudgetPolicy):
    """SnapKV's prefill selection and decode rule; PyramidKV only changes the per-layer budget."""

    per_head = True
    keeps_pin = True

    def _check_snap(self, owner):
        check_int(owner, "budget", self.budget, 2)
        check_int(owner, "window", self.window, 1)
        if self.window >= self.budget:
            raise ValueError(
                f"{owner}: window={self.window} must be smaller than budget={self.budget} (the "
                f"observation window is kept on top of the selected tokens); use window <= "
                f"{self.budget - 1} or a larger budget.")
        check_int(owner, "kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"{owner}: kernel={self.kernel} must be odd (a centred pooling "
                             f"window); use kernel={self.kernel - 1} or {self.kernel + 1}.")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"{owner}: pooling={self.pooling!r} must be 'max' or 'avg'.")
        check_dtype(owner, self.dtype)

    def prefill_priority(self, q, k, ctx, limit):
        scores = window_scores(q, k, ctx, self.window)                     # [B, Hkv, T]
        j = jnp.arange(q.shape[1])[None, :]
        pin = jnp.maximum(ctx.n_new - self.window, 0)
        prefix = (j < pin[:, None])[:, None, :]                            # [B, 1, T]
        pooled = pool1d(scores, prefix, self.kernel, self.pooling)
        win = last_tokens(ctx, self.window)[:, None, :]
        prio = jnp.where(win, jnp.inf, jnp.where(prefix, pooled, NEG_INF))
        return prio.astype(jnp.float32), None, pin

    def evict_slot(self, state, pos, occupied, p, limit):
        # the oldest token not chosen by the prefill selection (position >= pin)
        cand = occupied & (pos >= state["pin"][:, None, None])
        return jnp.argmin(jnp.where(cand, pos, MAX_POS), axis=-1)


__all__ = ["BudgetPolicy", "SnapKVBase", "accumulated_scores", "attend_per_head", "check_dtype",
           "check_fits", "check_int", "gather_tokens", "masked_probs", "pool1d", "select_top",
           "window_scores"]
