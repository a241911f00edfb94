"""Layer streaming from host memory: k layers resident on the device, p prefetched.

Superpipeline (Abbasi et al. 2024, "Superpipeline: A Universal Approach for
Reducing GPU Memory Usage in Large Models") and Hermes / PIPELOAD (Hu et al.
2024) keep a model's layers in host (CPU) memory and move them to the
accelerator just before use: ``k`` layers are on the device at once and ``p``
more are loaded ahead while those run (the papers' two knobs), trading
transfer time for up to 60% less device memory with unchanged outputs.

Here the stacked layer weights ``params["layers"]`` (``[L, ...]`` leaves, the
model's ``nn.scan`` layout) live in ``memory_kind="pinned_host"`` and the
decoder runs them with :func:`stream_layers`.  Only the per-layer matrices
stream (:func:`streams_from_host`: leaves with a ``[L, m, n, ...]`` shape); the
per-layer vectors (``[L, d]``: RMSNorm scales, per-channel scales) stay on the
device, a negligible share of the bytes -- and XLA:TPU cannot move one row of a
host ``[L, d]`` stack (its tiled layout packs rows into sublanes):

* a ``lax.scan`` over ``S = (L - p) // k`` steps; step ``g`` runs layers
  ``[g k, g k + k)`` from a device block and, before them, moves layers
  ``[g k + p, g k + p + k)`` from host to device (``jax.device_put`` to
  ``jax.memory.Space.Device`` of a ``dynamic_slice`` of the host stack).  The
  scan carry holds the ``p`` layers fetched ahead (the prefetch window), so at
  most ``k + p`` layers are on the device;
* a prologue fetches layers ``[0, p)``; an epilogue runs the last
  ``R = L - S k`` layers (``p <= R < k + p``: the window plus the unfetched
  tail), so every ``1 <= k``, ``0 <= p``, ``k + p <= L`` works;
* inside a block the layers run under a ``lax.scan`` with the same per-layer
  body as the resident model, so outputs are bit-identical.

Training (no KV cache) goes through a ``custom_vjp``: the forward saves only
each step's input activations; the backward walks the steps in reverse,
fetches each block from host again, recomputes it and sends the block's
weight gradients to host memory (the gradients of the layers never exist on
the device as a whole).  The backward fetches one block per step without a
prefetch window (``k`` layers on the device, plus their gradients).

Bytes (exact, :func:`param_bytes`; ``layer`` = one layer's slice of every
streamed ``params["layers"]`` leaf; ``resident`` = the non-layer params and the
layers' per-layer vectors)::

    device = (k + p) * layer + resident               (the weights on the device at once)
    host   = L * layer                                (all streamed layers stay in host memory)

Limits:

* XLA:CPU has one memory: the host placement is real at the program boundary
  (the layer arguments carry memory space ``S(5)`` in ``compiled.as_text()``)
  but ``jax.device_put`` to a memory space inside ``jit`` lowers to nothing on
  CPU, so nothing is saved and no time is spent there.  The per-step
  transfers are checked by lowering for CUDA (``annotate_device_placement``
  custom calls, :func:`transfers`).  XLA:TPU compiles these programs for a
  compile-only v5e (:mod:`memlab.targets`) and reports the host part apart;
  jaxlib's compile-only CUDA devices expose no memory spaces, so a GPU
  compile of a host placement cannot be expressed (:mod:`memlab.targets`
  refuses it with that reason).
* ``device`` counts the live weights; the concatenation of the window with a
  fetched block is a transient copy of up to ``k + p`` layers that XLA may or
  may not elide.
* Single device only: the placement is a one-device ``NamedSharding`` with a
  host ``memory_kind`` (a ``SingleDeviceSharding`` would not give abstract
  ``ShapeDtypeStruct`` params a host memory space when traced, and their
  gradients would come back on the device).
* Float models: logits, KV-cache prefill/decode and gradients are bit-identical
  to the resident model (tested).  Quantized layers (``QArray`` leaves): logits
  bit-identical, gradients of their float leaves equal to float rounding (a
  per-layer scale's gradient is summed in another order, ~2e-7 relative).
  The backward re-enters the model's ``nn.Dense`` dispatch active at the forward
  (quantized kernels, LoRA: :func:`memlab.nn.dense_dispatch.keep_dispatch`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from memlab.memory.bytes import tree_bytes

__all__ = ["StreamConfig", "check_stream", "host_memory_kinds", "place", "place_layers",
           "streams_from_host", "param_bytes", "stream_layers", "schedule", "transfers",
           "memory_kinds_of", "host_optimizer"]

LAYERS = "layers"  # the params key of the scanned decoder layers
_TRACER = getattr(jax.core, "Tracer", None) or jax._src.core.Tracer


def host_memory_kinds(device=None) -> list:
    """Memory kinds the device can address, e.g. ``['device', 'pinned_host', 'unpinned_host']``."""
    device = device or jax.devices()[0]
    return [m.kind for m in device.addressable_memories()]


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """``k`` layers per step on the device, ``p`` layers prefetched ahead, weights in
    ``memory_kind`` (a host memory of the device)."""

    k: int = 1
    p: int = 1
    memory_kind: str = "pinned_host"


def check_stream(n_layers: int, k: Any, p: Any, memory_kind: str = "pinned_host",
                 device=None) -> StreamConfig:
    """Validate the knobs against a model of ``n_layers`` and the device's memories."""
    for name, v, lo in (("layers_on_device", k, 1), ("prefetch", p, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"offload: {name} must be an int, got {type(v).__name__} {v!r}")
        if v < lo:
            raise ValueError(f"offload: {name}={v} must be >= {lo}; the nearest feasible value "
                             f"is {name}={lo}")
    k, p = int(k), int(p)
    if k > n_layers:
        raise ValueError(f"offload: layers_on_device={k} exceeds the model's {n_layers} layers; "
                         f"the nearest feasible value is layers_on_device={n_layers} (every layer "
                         "resident: then skip the offload pass)")
    if k + p > n_layers:
        raise ValueError(f"offload: layers_on_device + prefetch = {k} + {p} exceeds the model's "
                         f"{n_layers} layers; the nearest feasible prefetch is {n_layers - k}")
    kinds = host_memory_kinds(device)
    hosts = [m for m in kinds if m != "device"]
    if not hosts:
        raise ValueError(f"offload: {jax.devices()[0]} has no host memory kind (it addresses "
                         f"only {kinds}), so weights cannot live in host memory on this backend; "
                         "the nearest feasible option is a smaller weight format "
                         "(ml.passes.quantize / cast) or sharding over more devices")
    if memory_kind not in hosts:
        raise ValueError(f"offload: memory_kind={memory_kind!r} is not a host memory of "
                         f"{jax.devices()[0]}; choose one of {hosts}")
    return StreamConfig(k, p, memory_kind)


def schedule(n_layers: int, k: int, p: int) -> tuple:
    """``(S, R)``: scan steps of ``k`` layers, then ``R`` layers in the epilogue."""
    steps = (n_layers - p) // k
    return steps, n_layers - steps * k


# ---------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------
def _sharding(kind: str):
    # a NamedSharding (not SingleDeviceSharding): only it gives a ShapeDtypeStruct's aval its
    # memory space, so abstract params trace as host arrays like concrete ones
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("offload",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(), memory_kind=kind)


def place(tree, kind: str):
    """Every leaf in memory ``kind`` of the first device; ``ShapeDtypeStruct`` leaves get
    the sharding (nothing is allocated)."""
    sharding = _sharding(kind)

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.device_put(x, sharding)
    return jax.tree_util.tree_map(one, tree)


def streams_from_host(x) -> bool:
    """Whether a stacked ``[L, ...]`` layer leaf streams from host memory: its per-layer
    slice is a matrix (or more).  Per-layer vectors stay on the device."""
    return len(getattr(x, "shape", ())) >= 3


def place_layers(layers, kind: str):
    """The streamed leaves of a layer stack (:func:`streams_from_host`) in memory ``kind``;
    the per-layer vectors where they are."""
    sharding = _sharding(kind)

    def one(x):
        if not streams_from_host(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.device_put(x, sharding)
    return jax.tree_util.tree_map(one, layers)


def layer_shardings(layers, kind: str):
    """Per-leaf shardings of :func:`place_layers` (for ``jit(..., out_shardings=)``)."""
    host, device = _sharding(kind), _sharding("device")
    return jax.tree_util.tree_map(lambda x: host if streams_from_host(x) else device, layers)


def memory_kinds_of(tree) -> set:
    """The memory kinds the leaves of ``tree`` live in (arrays or ShapeDtypeStructs)."""
    out = set()
    for x in jax.tree_util.tree_leaves(tree):
        sh = getattr(x, "sharding", None)
        out.add(getattr(sh, "memory_kind", None) or "device")
    return out


def param_bytes(params, n_layers: int, k: int, p: int) -> dict:
    """Exact ``{"device", "host", "layer", "resident"}`` bytes of streaming ``params``:
    ``layer`` one layer's streamed slice, ``resident`` what never leaves the device."""
    streamed = [x for x in jax.tree_util.tree_leaves(params[LAYERS]) if streams_from_host(x)]
    total = tree_bytes(streamed)
    if total % n_layers:
        raise ValueError(f"params['{LAYERS}'] ({total} bytes) is not {n_layers} equal layers")
    layer = total // n_layers
    resident = tree_bytes(params) - total
    return {"device": (k + p) * layer + resident, "host": n_layers * layer, "layer": layer,
            "resident": resident}


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------
def _to_device(x):
    return jax.device_put(x, jax.memory.Space.Device)


def _to_host(x):
    return jax.device_put(x, jax.memory.Space.Host)


def _fetch(host, start, n: int):
    """Layers ``[start, start + n)`` of the host stack, moved to the device."""
    start = jnp.asarray(start, jnp.int32)

    def one(a):
        block = jax.lax.dynamic_slice_in_dim(a, start, n, 0)
        return _to_device(block) if _in_host(a) else block   # resident vectors: a slice
    return jax.tree_util.tree_map(one, host)


def _cat(*blocks):
    blocks = [b for b in blocks if b is not None]
    if len(blocks) == 1:
        return blocks[0]
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, 0), *blocks)


def _split(block, n: int):
    head = jax.tree_util.tree_map(lambda a: a[:n], block)
    rest = jax.tree_util.tree_map(lambda a: a[n:], block)
    return head, rest


def _run_block(layer_fn, block, carry):
    """The block's layers in order (a scan with the resident model's per-layer body)."""
    return jax.lax.scan(lambda c, lp: (layer_fn(lp, c), None), carry, block)[0]


def _forward(layer_fn, host, carry, n_layers, k, p, save_inputs=False):
    steps, rest = schedule(n_layers, k, p)
    window = _fetch(host, 0, p) if p else None

    def step(c, g):
        carry, window = c
        fetched = _fetch(host, g * k + p, k)
        cur, window = _split(_cat(window, fetched), k) if p else (fetched, None)
        return (_run_block(layer_fn, cur, carry), window), (carry if save_inputs else None)

    (carry, window), saved = jax.lax.scan(step, (carry, window), jnp.arange(steps, dtype=jnp.int32))
    tail_in = carry
    if rest:
        tail = _fetch(host, steps * k + p, rest - p) if rest > p else None
        carry = _run_block(layer_fn, _cat(window, tail), carry)
    return carry, (saved, tail_in)


def _like(x, like):
    """``x`` in the memory space of ``like`` (host under jit; eval_shape may say device)."""
    want = jax.typeof(like).memory_space
    return x if jax.typeof(x).memory_space == want else jax.device_put(x, want)


def _in_host(x) -> bool:
    return jax.typeof(x).memory_space == jax.memory.Space.Host


def _float_leaf(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _trainable(layer_fn, treedef, is_float, n_layers, k, p):
    """``f(float_leaves, other_leaves, x)``: the streamed stack with a streaming backward
    (only the float leaves of the layers get gradients; codes of quantized weights do not)."""
    steps, rest = schedule(n_layers, k, p)

    def merge(fl, other):
        fl, other = iter(fl), iter(other)
        return treedef.unflatten([next(fl) if f else next(other) for f in is_float])

    def carry_of(x, layer):
        return (x, None, jnp.asarray(layer, jnp.int32))

    def run(block, x, layer):
        return _run_block(layer_fn, block, carry_of(x, layer))[0]

    @jax.custom_vjp
    def f(fl, other, x):
        out, _ = _forward(layer_fn, merge(fl, other), carry_of(x, 0), n_layers, k, p)
        return out[0]

    def fwd(fl, other, x):
        out, (saved, tail_in) = _forward(layer_fn, merge(fl, other), carry_of(x, 0), n_layers, k,
                                         p, save_inputs=True)
        return out[0], (fl, other, saved[0], tail_in[0])

    def grad_block(fl, other, start, n, x, ct):
        blk_f = _fetch(fl, start, n)
        blk_o = _fetch(other, start, n)
        _, vjp = jax.vjp(lambda b, xx: run(merge(b, blk_o), xx, start), blk_f, x)
        d_blk, ct = vjp(ct)
        return jax.tree_util.tree_map(
            lambda d, a: _to_host(d) if _in_host(a) else d, d_blk, fl), ct

    def bwd(res, ct):
        fl, other, xs, x_tail = res
        d_tail = None
        if rest:
            d_tail, ct = grad_block(fl, other, steps * k, rest, x_tail, ct)

        def step(ct, inp):
            g, x_g = inp
            d_blk, ct = grad_block(fl, other, g * k, k, x_g, ct)
            return ct, d_blk

        ct, d_main = jax.lax.scan(step, ct, (jnp.arange(steps, dtype=jnp.int32), xs), reverse=True)
        d_main = jax.tree_util.tree_map(lambda a: a.reshape((steps * k,) + a.shape[2:]), d_main)
        d_fl = d_main if d_tail is None else jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a, b], 0), d_main, d_tail)
        d_fl = jax.tree_util.tree_map(_like, d_fl, fl)  # the primal's memory space
        return d_fl, tuple(None for _ in other), ct

    f.defvjp(fwd, bwd)
    return f


def _keep_interceptors(fn):
    """``fn`` run under the model's nn.Dense dispatch (quantized kernels, LoRA) and its
    Dispatch: the custom_vjp backward is traced after the forward's contexts have exited
    (:func:`memlab.nn.dense_dispatch.keep_dispatch`)."""
    from memlab.nn.dense_dispatch import keep_dispatch
    return keep_dispatch(fn)


def stream_layers(layer_fn: Callable, host_layers, carry, n_layers: int, k: int, p: int):
    """Run ``n_layers`` stacked layers kept in host memory, ``k`` at a time on the device
    with ``p`` prefetched (see the module docstring).

    ``layer_fn(layer_params, carry) -> carry`` is one layer; ``carry`` is the decoder's
    ``(hidden, kv, layer_index)``.  Without a KV cache (``carry[1] is None``: training,
    scoring) the stack has a streaming ``custom_vjp``; with one it is forward only."""
    if carry[1] is not None:
        from memlab.cache import sliced_decode
        with sliced_decode():
            return _forward(layer_fn, host_layers, carry, n_layers, k, p)[0]
    leaves, treedef = jax.tree_util.tree_flatten(host_layers)
    is_float = tuple(_float_leaf(a) for a in leaves)
    fl = tuple(a for a, f in zip(leaves, is_float) if f)
    other = tuple(a for a, f in zip(leaves, is_float) if not f)
    x, _, layer = carry
    out = _trainable(_keep_interceptors(layer_fn), treedef, is_float, n_layers, k, p)(fl, other, x)
    return out, None, layer + n_layers


# ---------------------------------------------------------------------------
# Reading placements back from lowered / compiled programs
# ---------------------------------------------------------------------------
def transfers(lowered_text: str) -> list:
    """``[(placement, shape, dtype)]`` of every ``annotate_device_placement`` in a program
    lowered for CUDA or TPU (``jit(f).trace(...).lower(lowering_platforms=("cuda",))``)."""
    import re
    pat = (r'annotate_device_placement\(.*?_xla_buffer_placement = "(\w+)".*?: '
           r'\(tensor<((?:\d+x)*)(\w+)>\)')
    return [(p, tuple(int(v) for v in s.strip("x").split("x") if v), dt)
            for p, s, dt in re.findall(pat, lowered_text)]


# ---------------------------------------------------------------------------
# Optimizer state in host memory
# ---------------------------------------------------------------------------
def host_optimizer(tx, memory_kind: str = "pinned_host", compute: str = "host"):
    """``tx`` for params that live partly in host memory, with its state in ``memory_kind``.

    ``memory_kind="pinned_host"`` (ZeRO-Offload style): ``init`` places the state in host
    memory (``S(5)`` arguments and outputs of a compiled step).  ``compute="host"`` runs
    ``tx.update`` on the host (``compute_on("device_host")``; gradients and params go to
    host, the state never reaches the device; results equal the device update to float
    rounding, ~1e-10); ``compute="device"`` moves the state to the device, updates there
    and moves it back (bit-identical to the resident optimizer, but the whole state may be
    on the device during the update).  ``memory_kind="device"``: the state on the device
    and the update there (host gradients are moved over).

    Either way the updates come back in each param's memory space, so
    ``optax.apply_updates`` adds host updates to host params."""
    import optax
    from jax.experimental.compute_on import compute_on

    if compute not in ("host", "device"):
        raise ValueError(f"host_optimizer: compute={compute!r} must be 'host' (update on the "
                         "host, compute_on('device_host')) or 'device' (move the state over)")
    tmap = jax.tree_util.tree_map
    on_device = compute == "device" or memory_kind == "device"

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        if not all(isinstance(x, jax.Array) and not isinstance(x, _TRACER) for x in leaves):
            return place(tx.init(params), memory_kind)      # traced (jit, eval_shape)
        # eager zeros_like of a host array fails in jax 0.10: build the state in one program
        return jax.jit(tx.init, out_shardings=_sharding(memory_kind))(params)

    def update(grads, state, params=None):
        like = grads if params is None else params
        if on_device:
            updates, new = tx.update(tmap(_to_device, grads), tmap(_to_device, state),
                                     None if params is None else tmap(_to_device, params))
        else:
            with compute_on("device_host"):
                updates, new = jax.jit(tx.update)(
                    tmap(_to_host, grads), tmap(_to_host, state),
                    None if params is None else tmap(_to_host, params))
        new = new if memory_kind == "device" else tmap(_to_host, new)
        return tmap(_like, updates, like), new

    return optax.GradientTransformation(init, update)
