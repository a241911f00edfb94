"""The offload pass: Superpipeline-style layer streaming from host memory.

Superpipeline (Abbasi et al. 2024) and Hermes / PIPELOAD (Hu et al. 2024): the
decoder's layer weights live in host memory and move to the accelerator just
before use, ``layers_on_device`` (k) at a time with ``prefetch`` (p) more loaded
ahead, for inference and training, with outputs and gradients bit-identical to
the resident model.  The mechanism is :mod:`memlab.offload`::

    model = ml.passes.offload(layers_on_device=2, prefetch=1)(model)
    model = ml.compose(ml.passes.remat("offload:mlp_hidden"),          # activations to host
                       ml.passes.offload(1, 1, optimizer_state=True))(model)
    tx = ml.passes.offload.optimizer(model, ml.optim.get("adamw"))    # state in host memory

* ``params["layers"]`` (every stacked ``[L, m, n, ...]`` leaf: the per-layer
  matrices) is placed in ``memory_kind`` (``pinned_host``); the other params
  (embedding, final norm, head, the layers' per-layer vectors) stay on the device; the module runs its layers through
  :func:`memlab.offload.stream_layers` (``Llama.stream = (k, p)``).
* training: the layer gradients come back in host memory, so the optimizer must be
  wrapped: :func:`optimizer` (``ml.passes.offload.optimizer(model, tx)``) returns
  :func:`memlab.offload.host_optimizer`, whose updates land in each param's memory
  space; the state is on the device, or in host memory with ``optimizer_state=True``
  (update under ``compute_on("device_host")``, or ``compute="device"``: moved over and
  back).  :func:`memlab.memory.profile` wraps its train step's optimizer the same way.
* activations: compose with ``ml.passes.remat("offload:<names>")``.

Estimate (exact, checked against ``tree_bytes`` in the tests): ``params`` and
``gradients`` keep their total storage; ``params_device = resident + (k + p) *
layer`` and ``params_host = L * layer`` are added (``gradients_device = resident +
k * layer``, ``gradients_host = L * layer`` for training: the backward holds one
block's weight gradients before they move to host); with ``optimizer_state=True``
``optimizer_state_host`` is the whole state and ``optimizer_state_device`` is 0.
Here ``layer`` is one layer's bytes of the streamed ``params["layers"]`` leaves (the
per-layer matrices, :func:`memlab.offload.streams_from_host`) and ``resident`` the
rest: non-layer params and the layers' per-layer vectors, which stay on the device.

Limits: memlab's Llama only (its layers under ``nn.scan``); one device; on CPU the
placement is real at the program boundary but saves nothing (see
:mod:`memlab.offload`).  The estimate takes layer bytes from the spec's weight
format: a cast or quantize pass applied *before* offload is not reflected in the
``*_device`` / ``*_host`` entries (``param_bytes(params, ...)`` of the real pytree is).
"""
from __future__ import annotations

from memlab.model import Model, Pass
from memlab.models.llama import Llama
from memlab.offload import LAYERS, check_stream, host_optimizer, place_layers
from memlab.passes import PASSES


def layer_bytes(spec) -> tuple:
    """(one layer's streamed bytes, resident bytes) of the spec's abstract params: what
    the pass moves to host memory per layer (the per-layer matrices,
    :func:`memlab.offload.streams_from_host`) and what stays on the device."""
    from memlab.offload import param_bytes
    nb = param_bytes(spec.param_shapes(), spec.n_layers, 0, 0)
    return nb["layer"], nb["resident"]


_layer_bytes = layer_bytes


def optimizer(model: Model, tx, compute: str = "host"):
    """``tx`` for ``model``: unchanged for a model without the offload pass; else
    :func:`memlab.offload.host_optimizer` with the state in host memory
    (``offload(optimizer_state=True)``) or on the device, and the updates returned in
    each param's memory space (host for the streamed layers)."""
    cfg = model.extra("offload")
    if cfg is None:
        return tx
    cfg = dict(cfg)
    if not cfg["optimizer_state"]:
        return host_optimizer(tx, "device")
    return host_optimizer(tx, cfg["memory_kind"], compute=compute)


@PASSES.register("offload")
def offload(layers_on_device: int = 1, prefetch: int = 1, optimizer_state: bool = False,
            memory_kind: str = "pinned_host") -> Pass:
    k, p = layers_on_device, prefetch
    check_stream(2**62, k, p, memory_kind)  # types, k >= 1, p >= 0, host memory; k + p <= L later
    if not isinstance(optimizer_state, bool):
        raise TypeError(f"offload: optimizer_state must be True or False, got {optimizer_state!r}")

    def transform(model: Model, calib) -> Model:
        if not isinstance(model.module, Llama):
            raise TypeError(
                f"offload: layer streaming needs memlab's Llama (layers under nn.scan), got "
                f"{type(model.module or model.fn).__name__}; for another model keep the weights "
                "resident and offload activations with ml.passes.remat('offload:<names>')")
        if model.module.stream is not None:
            raise ValueError(f"offload: the model already streams its layers "
                             f"(k, p = {model.module.stream}); apply the pass once")
        if LAYERS not in model.params:
            raise ValueError(f"offload: params have no '{LAYERS}' entry (the scanned layers); "
                             f"got {sorted(model.params)}")
        cfg = check_stream(model.spec.n_layers, k, p, memory_kind)
        params = dict(model.params)
        params[LAYERS] = place_layers(params[LAYERS], cfg.memory_kind)
        out = model.replace(params=params, module=model.module.clone(stream=(cfg.k, cfg.p)))
        return out.with_extras(offload=(("layers_on_device", cfg.k), ("memory_kind", cfg.memory_kind),
                                        ("optimizer_state", optimizer_state), ("prefetch", cfg.p)))

    def estimate(current, spec, workload):
        out = dict(current)
        layer, resident = _layer_bytes(spec)
        out["params_device"] = resident + (k + p) * layer
        out["params_host"] = spec.n_layers * layer
        if "gradients" in out:
            out["gradients_device"] = resident + k * layer
            out["gradients_host"] = spec.n_layers * layer
        if optimizer_state and "optimizer_state" in out:
            out["optimizer_state_host"] = out["optimizer_state"]
            out["optimizer_state_device"] = 0
        return out

    return Pass(f"offload(k={k}, p={p}{', optimizer_state' if optimizer_state else ''})",
                transform, estimate)


offload.optimizer = optimizer
