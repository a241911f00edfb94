"""HeadInfer: the whole KV cache in host memory, attention one KV-head group at a time.

Luo et al. 2025, "HeadInfer: Memory-Efficient LLM Inference by Head-wise
Offloading".  A dense cache keeps every layer's K and V on the accelerator;
HeadInfer keeps all of it in host (CPU) memory and, for each layer, moves one
group of attention heads' K/V to the device at a time, attends with that
group's query heads, and writes the new token's K/V back to host.  The device
then holds one head group of one layer instead of the whole cache.

As a KV policy (``ml.passes.kv_compress("headinfer:heads=1")``):

* one layer's state is ``k, v [B, max_len, Hkv, D]`` like the dense policy,
  but :meth:`HeadInfer.init` places it in host memory
  (``memory_kind="pinned_host"`` by default; the stacked ``PolicyCache``
  inherits the placement, and the model's ``nn.scan`` carries it with its
  host memory space: the carry's aval is ``f32<host>[...]``);
* ``prefill`` attends head group by head group over the prompt (its K/V are
  fresh on the device) and moves the prompt's K/V to host, one
  ``dynamic_update_slice`` per row at the row's first position;
* ``decode`` moves the new token's K/V to host and writes them (one
  ``dynamic_update_slice`` per row, the pattern XLA's host offloader handles),
  then runs a ``lax.scan`` over the ``Hkv / heads`` head groups: each step
  slices the group's ``[B, max_len, heads, D]`` K and V out of the host cache,
  ``jax.device_put``\\ s them to ``jax.memory.Space.Device`` and attends the
  group's ``heads * H / Hkv`` query heads over them.

Bytes (exact; ``itemsize`` of the cache dtype, ``T`` tokens per step, 1 when
decoding)::

    host_bytes   = n_layers * 2 * B * max_len * Hkv * D * itemsize     (nbytes per layer)
    device_bytes = 2 * B * max_len * heads * D * itemsize               (one group's K, V of one layer)
                 + 2 * B * T * Hkv * D * itemsize                       (the new K, V before the move to host)

Limits (see the tests):

* On CPU ``jax.device_put`` to a memory space *inside* ``jit`` lowers to
  nothing (JAX registers the transfer only for GPU and TPU) and XLA:CPU has
  one memory: the host placement is real at the program boundary (the cache
  parameters and outputs carry the ``S(5)`` host memory space in
  ``compiled.as_text()``), but nothing is saved.  The transfers themselves
  are checked by lowering for ``cuda``
  (``lower(lowering_platforms=("cuda",))``): each group's slices are
  ``annotate_device_placement`` ``device`` and the new token's K/V are
  ``pinned_host``.  XLA:TPU compiles the step for a compile-only TPU
  (:mod:`memlab.targets`); compile-only CUDA devices expose no host memory
  space, so XLA:GPU's host offloader is exercised only on a real GPU.
* XLA:CPU's ``memory_analysis()`` reports ``host_*`` bytes of 0 and counts the
  host cache in ``argument_size_in_bytes``: on CPU a HeadInfer decode step's
  argument bytes equal the dense cache's.
* Positions past ``max_len`` are not dropped as in the dense cache: the
  row's ``dynamic_update_slice`` clamps into the last slots (the generation
  engine never writes past ``max_len``).  Prefill requires an empty cache
  (as the protocol says) so that a prompt fits from its first position; it
  writes a right-padded prompt whole, so slots past a row's prompt hold the
  padding's K/V until decode overwrites them (never attended: decode hides
  slots past the current position).
* Single-device only: the host placement uses ``jax.devices()[0]``.
* The head groups run one after another with no prefetch of the next group
  (the paper overlaps the transfer of group ``j + 1`` with the attention of
  group ``j``); XLA may schedule the scan's transfers as it likes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from memlab.kv.base import POLICIES
from memlab.kv.base import MAX_POS, Dims, KVPolicy, attend, prompt_positions

__all__ = ["HeadInfer", "host_memory_kinds", "to_memory_space"]

_TRACER = getattr(jax.core, "Tracer", None) or jax._src.core.Tracer


def host_memory_kinds(device=None) -> list:
    """Memory kinds the device can address, e.g. ``['device', 'pinned_host', 'unpinned_host']``."""
    device = device or jax.devices()[0]
    return [m.kind for m in device.addressable_memories()]


def to_memory_space(x, like):
    """``x`` moved to the memory space of ``like`` (host or device); a no-op when they agree."""
    want = jax.typeof(like).memory_space
    if jax.typeof(x).memory_space == want:
        return x
    return jax.device_put(x, want)


def _place(x, kind: str):
    """``x`` in memory ``kind`` of the first device (eagerly), or in its memory space (traced)."""
    if isinstance(x, _TRACER):
        space = jax.memory.Space.Device if kind == "device" else jax.memory.Space.Host
        return jax.device_put(x, space)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind)
    return jax.device_put(x, sharding)


def _write_rows(buf, new, start):
    """``buf [B, S, h, D]`` with ``new [B, T, h, D]`` written at ``start[b]`` in each row b
    (one ``dynamic_update_slice`` per row; the start is clamped so the block fits)."""
    new = to_memory_space(new.astype(buf.dtype), buf)
    zero = jnp.int32(0)
    for b in range(buf.shape[0]):
        buf = jax.lax.dynamic_update_slice(buf, new[b:b + 1], (jnp.int32(b), start[b], zero, zero))
    return buf


def _plan(seq: int) -> list:
    return ["headinfer:heads=1"]


# planner facts (memlab.facts): exact attention; the state in host memory
# (``host_bytes(dims)``, ``device_bytes(dims, tokens)``), on one device
@POLICIES.register("headinfer", plan=_plan, quality_loss=0.0, host_state=True)
@dataclasses.dataclass(frozen=True)
class HeadInfer(KVPolicy):
    """HeadInfer (Luo et al. 2025): the cache in host memory, attention per KV-head group.

    ``heads``: KV heads per group moved to the device at once (must divide the
    model's KV heads; ``heads = Hkv`` moves a whole layer, i.e. plain
    layer-wise offload).  ``dtype``: storage dtype (None: the model's compute
    dtype).  ``memory_kind``: where the cache lives, one of the device's
    memories (``pinned_host`` by default, ``unpinned_host``, or ``device`` to
    run the same head-wise program with no offload, for comparison).
    """

    name = "headinfer"
    heads: int = 1
    dtype: Optional[str] = None
    memory_kind: str = "pinned_host"

    # ---- shapes and bytes -------------------------------------------------
    def _dtype(self, dims: Dims):
        return jnp.dtype(self.dtype or dims.dtype)

    def groups(self, dims: Dims) -> int:
        """Head groups per layer: ``Hkv / heads``."""
        return dims.n_kv_heads // self.heads

    def nbytes(self, dims: Dims) -> int:
        return 2 * dims.batch * dims.max_len * dims.n_kv_heads * dims.head_dim * self._dtype(dims).itemsize

    def host_bytes(self, dims: Dims) -> int:
        """Bytes in host memory: every layer's K and V."""
        return dims.n_layers * self.nbytes(dims)

    def group_bytes(self, dims: Dims) -> int:
        """Bytes moved to the device per head group: its K and V slices of one layer."""
        return 2 * dims.batch * dims.max_len * self.heads * dims.head_dim * self._dtype(dims).itemsize

    def device_bytes(self, dims: Dims, tokens: int = 1) -> int:
        """Cache bytes on the device at once: one group's K, V of one layer plus the step's
        new K, V (``tokens`` per row) before they move to host."""
        new = 2 * dims.batch * int(tokens) * dims.n_kv_heads * dims.head_dim * self._dtype(dims).itemsize
        return self.group_bytes(dims) + new

    def validate(self, dims: Dims) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, (int, np.integer)) or self.heads <= 0:
            raise ValueError(f"HeadInfer: heads={self.heads!r} must be a positive int (KV heads per "
                             "group); pass e.g. HeadInfer(heads=1).")
        if dims.n_kv_heads % self.heads:
            raise ValueError(f"HeadInfer: heads={self.heads} must divide the model's "
                             f"n_kv_heads={dims.n_kv_heads}; pass a divisor, e.g. heads=1.")
        if not jnp.issubdtype(self._dtype(dims), jnp.floating):
            raise ValueError(f"HeadInfer: dtype={self._dtype(dims)} is not a float dtype; pass "
                             "dtype='bfloat16', 'float16' or 'float32' (or None).")
        kinds = host_memory_kinds()
        if self.memory_kind not in kinds:
            raise ValueError(f"HeadInfer: memory_kind={self.memory_kind!r} is not a memory of "
                             f"{jax.devices()[0]}; choose one of {kinds}.")

    # ---- protocol --------------------------------------------------------
    def init(self, dims: Dims):
        shape = (dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim)
        z = jnp.zeros(shape, self._dtype(dims))
        return {"k": _place(z, self.memory_kind), "v": _place(z, self.memory_kind)}

    def prefill(self, state, q, k, v, ctx):
        t, s = q.shape[1], state["k"].shape[1]
        if t > s:
            raise ValueError(f"HeadInfer.prefill: {t} prompt tokens do not fit a cache of max_len {s}; "
                             "build the cache with a larger max_len.")
        start = ctx.positions[:, 0]
        state = {"k": _write_rows(state["k"], k, start), "v": _write_rows(state["v"], v, start)}
        kv_pos = prompt_positions(ctx)
        return self._grouped(q, k, v, ctx.positions, kv_pos, on_host=False), state

    def decode(self, state, q, k, v, ctx):
        start = ctx.positions[:, 0]
        state = {"k": _write_rows(state["k"], k, start), "v": _write_rows(state["v"], v, start)}
        s = state["k"].shape[1]
        slot = jnp.arange(s, dtype=jnp.int32)[None, :]
        kv_pos = jnp.where(slot <= ctx.positions[:, -1:], slot, MAX_POS)
        return self._grouped(q, state["k"], state["v"], ctx.positions, kv_pos, on_host=True), state

    def _grouped(self, q, k, v, q_pos, kv_pos, *, on_host: bool):
        """Attention of ``q [B, T, H, D]`` over ``k, v [B, S, Hkv, D]``, one group of
        ``heads`` KV heads per scan step (its slices moved to the device when ``on_host``)."""
        b, t, h, d = q.shape
        hkv = k.shape[2]
        rep, g = h // hkv, self.heads
        qg = q.reshape(b, t, hkv, rep, d)

        def one(_, j):
            lo = j * g
            kj = jax.lax.dynamic_slice_in_dim(k, lo, g, axis=2)
            vj = jax.lax.dynamic_slice_in_dim(v, lo, g, axis=2)
            if on_host:
                kj = jax.device_put(kj, jax.memory.Space.Device)
                vj = jax.device_put(vj, jax.memory.Space.Device)
            qj = jax.lax.dynamic_slice_in_dim(qg, lo, g, axis=2).reshape(b, t, g * rep, d)
            return None, attend(qj, kj, vj, q_pos, kv_pos)

        _, out = jax.lax.scan(one, None, jnp.arange(hkv // g, dtype=jnp.int32))   # [G, B, T, g*rep, D]
        return jnp.moveaxis(out, 0, 2).reshape(b, t, h, d)
