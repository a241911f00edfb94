"""The minisequence pass: Mini-Sequence Transformer chunking of the MLP (Luo et al.
2024, "MINI-SEQUENCE TRANSFORMER: Optimizing Intermediate Memory for Long Sequences
Training").

    model = ml.passes.minisequence(chunks=4)(model)

Sets ``LlamaConfig.mlp_chunks``: every layer's SwiGLU runs over ``chunks`` sequence
chunks under a scan with a rematerialized body, so its ``[B, T, d_ff]`` intermediates
exist one chunk at a time, in the forward and in the backward (see
``memlab.models.llama.MLP``).  Outputs and gradients equal the unchunked model's up to
float summation order.  A sequence length that ``chunks`` does not divide is padded to
chunks of ``ceil(T / chunks)`` rows; ``T < chunks`` uses ``T`` chunks of one row.
The LM head / loss is chunked separately (the chunked cross-entropy); composes with
``remat``.

The estimate is unchanged: activations are not a category of memlab's analytic
estimate; measure them with ``memory.profile(model, "train", ...).temp_bytes``.
"""
from __future__ import annotations

import dataclasses

from memlab.model import Model, Pass
from memlab.passes import PASSES


@PASSES.register("minisequence")
def minisequence(chunks: int = 4) -> Pass:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"minisequence: chunks must be a positive int (sequence chunks of the "
                         f"MLP; 1 turns chunking off), got {chunks!r}")

    def transform(model: Model, calib) -> Model:
        spec = model.spec
        if model.module is None or not dataclasses.is_dataclass(spec) or \
                not hasattr(spec, "mlp_chunks") or getattr(model.module, "config", None) != spec:
            raise ValueError("minisequence needs a memlab Llama model (a LlamaConfig spec with "
                             "mlp_chunks, e.g. ml.models.init('tiny')); for other models chunk "
                             "the MLP inside the model")
        spec = dataclasses.replace(spec, mlp_chunks=chunks)
        return model.replace(spec=spec, module=model.module.clone(config=spec))

    def estimate(current, spec, workload):
        return current  # activations are not an estimate category (see the module doc)

    return Pass(f"minisequence(chunks={chunks})", transform, estimate)
