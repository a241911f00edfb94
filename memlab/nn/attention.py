"""One attention call, many implementations: pick by backend and shape, override by name.

``memlab.nn.attention(q, k, v, ...)`` takes the arguments and mask semantics of
:mod:`memlab_kernels.attention_reference` (``[B, T, H, D]`` layout, GQA,
causal, sliding window, segment ids, explicit positions) and runs one of:

==================  ==========================================================
``"pallas_triton"``  memlab's FlashAttention-2 Pallas kernel, Triton backend (GPU)
``"pallas_tpu"``     the same kernel's Mosaic backend (TPU)
``"cudnn"``          ``jax.nn.dot_product_attention(implementation="cudnn")``
``"xla"``            ``jax.nn.dot_product_attention(implementation="xla")`` (T x S)
``"blocked"``        block-causal attention in plain XLA: only the blocks on and below
                     the diagonal (causal self-attention, default positions; other
                     calls run ``"naive"``)
``"chunked"``        Rabe & Staats chunked attention in plain JAX: O(T) memory anywhere
``"naive"``          the reference: materializes the ``[B, H, T, S]`` scores
``"interpret"``      the Pallas kernel in the HLO interpreter (tests, debugging)
==================  ==========================================================

``impl="auto"`` (the default) chooses, see :func:`choose`:

* GPU: cuDNN when it supports the call (16-bit dtypes, head dim a multiple of
  8 up to 128, no explicit positions or segment ids, causal only for T == S --
  cuDNN's causal mask is top-left aligned), else the Triton flash kernel.
* TPU: the Mosaic flash kernel.
* CPU and anything else: causal self-attention (``T == S``, default positions, no
  segment ids) runs ``"blocked"`` (O(T) memory, forward and gradient) while one block
  of its scores (``B*H*128*S*4`` bytes) stays under :data:`NAIVE_MAX_SCORE_BYTES`;
  other calls run ``"naive"`` while the whole score matrix (``B*H*T*S*4`` bytes) does
  (it is faster for short sequences); longer ones run ``"chunked"``, so memory stays
  O(T).

Which implementation runs (:func:`memlab.dispatch.resolve`): ``impl=`` if given
(a memlab Llama passes its ``LlamaConfig.attention``), else the model's static
choice (``model.with_dispatch(attention="chunked")``, part of the jit cache key),
else the trace-time override ``with memlab.nn.use_attention("chunked"): ...``,
else ``"auto"``.  The override is for direct calls of this function: it is not part
of any jit cache key (a function already jitted keeps the implementation it was
traced with), and a model whose Dispatch names an implementation ignores it with a
DeprecationWarning.  Kernel backend names (``"triton"``, ``"mosaic_tpu"``) are
accepted for the Pallas implementations (:func:`memlab.dispatch.layer_impl`).

:func:`attention_hook` (trace-time) and ``Dispatch.attention_hook`` (static: ring
attention under a sequence-parallel shard pass) replace every call by a function.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import jax
import jax.numpy as jnp

from memlab import dispatch
from memlab_kernels.attention_reference import attention_reference, check_attention_args
from memlab_kernels.blocked_attention import blocked_attention
from memlab_kernels.chunked_attention import chunked_attention

__all__ = ["IMPLS", "NAIVE_MAX_SCORE_BYTES", "attention", "attention_hook", "choose",
           "decode_attention", "use_attention"]

IMPLS = dispatch.ATTENTION_IMPLS
DECODE_IMPLS = dispatch.DECODE_IMPLS
#: Above this many bytes of float32 scores the CPU path switches from naive to chunked.
NAIVE_MAX_SCORE_BYTES = 64 * 2**20
#: Query rows per block of the ``"blocked"`` path.
BLOCKED_ROWS = 128

# Trace-time overrides (see the module doc); a model's static Dispatch wins over them.
_DEFAULT = contextvars.ContextVar("memlab_attention_impl", default="auto")
# A function that replaces every attention() call while set.
_HOOK = contextvars.ContextVar("memlab_attention_hook", default=None)


@contextlib.contextmanager
def attention_hook(fn):
    """Run the enclosed traces with ``fn(q, k, v, scale=, **mask)`` in place of attention().

    A trace-time override, not part of any jit cache key; a model whose
    ``Dispatch.attention_hook`` is set runs its own hook instead."""
    token = _HOOK.set(fn)
    try:
        yield
    finally:
        _HOOK.reset(token)


@contextlib.contextmanager
def use_attention(impl: str):
    """Run the enclosed traces with ``impl`` as the default attention implementation.

    A trace-time override for direct calls (see the module doc); set a model's choice
    as data with ``model.with_dispatch(attention=impl)``."""
    impl = _check_impl(impl, IMPLS)
    token = _DEFAULT.set(impl)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def _check_impl(impl, allowed):
    """``impl`` as one of ``allowed`` (kernel backend names mapped), or a ValueError."""
    return dispatch.layer_impl(impl, allowed, "attention impl")


def _platform() -> str:
    return dispatch.platform()


def choose(q, k, v, *, causal=False, window=None, segment_ids=None, q_positions=None,
           kv_positions=None, platform: Optional[str] = None) -> tuple[str, str]:
    """The implementation ``impl="auto"`` would run, and why (``(name, reason)``)."""
    b, t, h, d, s, hkv, dv = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions)
    platform = platform or _platform()
    if platform == "gpu":
        why_not = _cudnn_unsupported(q, t, s, d, dv, causal, segment_ids, q_positions, kv_positions)
        if why_not is None:
            return "cudnn", "GPU and cuDNN supports this call"
        return "pallas_triton", f"GPU; cuDNN does not fit ({why_not})"
    if platform == "tpu":
        return "pallas_tpu", "TPU"
    score_bytes = b * h * t * s * 4
    block_bytes = b * h * min(t, BLOCKED_ROWS) * s * 4
    if _blocked_fits(causal, t, s, segment_ids, q_positions, kv_positions) and \
            block_bytes <= NAIVE_MAX_SCORE_BYTES:
        return "blocked", (f"{platform}: causal self-attention; one block of scores "
                           f"{block_bytes / 2**20:.1f} MiB <= "
                           f"{NAIVE_MAX_SCORE_BYTES / 2**20:.0f} MiB, blocks above the "
                           "diagonal skipped")
    if score_bytes <= NAIVE_MAX_SCORE_BYTES:
        return "naive", (f"{platform}: scores {score_bytes / 2**20:.1f} MiB <= "
                         f"{NAIVE_MAX_SCORE_BYTES / 2**20:.0f} MiB")
    return "chunked", (f"{platform}: scores would take {score_bytes / 2**20:.0f} MiB > "
                       f"{NAIVE_MAX_SCORE_BYTES / 2**20:.0f} MiB; chunked keeps O(T)")


def _blocked_fits(causal, t, s, segment_ids, q_positions, kv_positions) -> bool:
    """Can ``"blocked"`` run the call: causal self-attention at default positions."""
    return bool(causal) and t == s and segment_ids is None and q_positions is None \
        and kv_positions is None


def _cudnn_unsupported(q, t, s, d, dv, causal, segment_ids, q_positions, kv_positions):
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {q.dtype}, cuDNN needs bfloat16/float16"
    if d != dv or d % 8 or d > 128:
        return f"head_dim {d}/{dv}"
    if segment_ids is not None or q_positions is not None or kv_positions is not None:
        return "explicit positions or segment ids"
    if causal and t != s:
        return "causal with T != S (cuDNN aligns the mask top-left)"
    return None


def attention(q, k, v, *, causal: bool = False, window: Optional[int] = None, segment_ids=None,
              q_positions=None, kv_positions=None, scale: Optional[float] = None,
              softcap: Optional[float] = None, impl: Optional[str] = None) -> jax.Array:
    """Scaled dot-product attention ``[B, T, H, Dv]``; ``impl`` None: the model's static
    choice, else the trace-time default (see the module doc).

    ``softcap=c`` caps the scaled scores at ``c * tanh(s / c)`` before the mask and the
    softmax (Gemma 2).  No kernel implements it: such a call runs :func:`softcap_attention`
    (materialized scores, XLA) whatever ``impl`` says."""
    impl = _check_impl(dispatch.resolve("attention", impl, _DEFAULT.get()), IMPLS)
    mask = dict(causal=causal, window=window, segment_ids=segment_ids, q_positions=q_positions,
                kv_positions=kv_positions)
    if softcap is not None:
        return softcap_attention(q, k, v, softcap=softcap, scale=scale, **mask)
    hook = dispatch.resolve_hook(_HOOK.get())
    if hook is not None:
        return hook(q, k, v, scale=scale, **mask)
    if impl == "auto":
        impl, _ = choose(q, k, v, **mask)
    if impl == "blocked":
        b, t, h, d, s, hkv, dv = check_attention_args(q, k, v, **mask)
        if _blocked_fits(causal, t, s, segment_ids, q_positions, kv_positions):
            return blocked_attention(q, k, v, window=window, scale=scale, block=BLOCKED_ROWS)
        impl = "naive"                  # a cache, explicit positions or segments
    if impl == "naive":
        return attention_reference(q, k, v, scale=scale, precision=None, **mask)
    if impl == "chunked":
        return chunked_attention(q, k, v, scale=scale, **mask)
    if impl in ("cudnn", "xla"):
        return _jax_nn(q, k, v, impl, scale=scale, **mask)
    from memlab_kernels.flash_attention import flash_attention
    return flash_attention(q, k, v, scale=scale, backend=dispatch.kernel_backend_of(impl), **mask)


def softcap_attention(q, k, v, *, softcap: float, scale: Optional[float] = None, causal=False,
                      window=None, segment_ids=None, q_positions=None, kv_positions=None):
    """Attention with soft-capped scores (Gemma 2): ``softmax(mask(c * tanh(s / c)))``
    with ``s = scale * q.k`` in float32, the mask semantics of
    :mod:`memlab_kernels.attention_reference`; a query that sees no key gets zeros."""
    from memlab_kernels.attention_reference import make_mask
    b, t, h, d, s, hkv, dv = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, name="softcap_attention")
    if not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap_attention: softcap={softcap!r} must be a positive number")
    scale = d ** -0.5 if scale is None else scale
    m = make_mask(b, t, s, causal=causal, window=window, segment_ids=segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions)
    g = h // hkv
    qg = q.reshape(b, t, hkv, g, d).astype(jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale
    scores = softcap * jnp.tanh(scores / softcap)
    vis = m.block(m.q_positions, m.kv_positions, m.q_segment_ids, m.kv_segment_ids)
    vis = vis[:, None, None]                                    # [B, 1, 1, T, S]
    scores = jnp.where(vis, scores, -jnp.inf)
    mx = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(scores - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, h, dv).astype(q.dtype)


def _jax_nn(q, k, v, impl, *, causal, window, segment_ids, q_positions, kv_positions, scale):
    t, s, d = q.shape[1], k.shape[1], q.shape[-1]
    if impl == "cudnn":
        why_not = _cudnn_unsupported(q, t, s, d, v.shape[-1], causal, segment_ids, q_positions,
                                     kv_positions)
        if why_not is not None:
            raise ValueError(f"attention impl='cudnn' cannot run this call: {why_not}; "
                             "use impl='auto' or 'pallas_triton'.")
    elif segment_ids is not None or q_positions is not None or kv_positions is not None or (
            causal and t != s):
        raise ValueError("attention impl='xla' (jax.nn.dot_product_attention) supports neither "
                         "explicit positions/segment ids nor causal with T != S; "
                         "use impl='naive' or 'chunked'.")
    local = None
    if window is not None:
        local = (window - 1, 0 if causal else window - 1)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        local_window_size=local, implementation=impl)


def decode_attention(q, k, v, lengths, *, scale: Optional[float] = None,
                     impl: Optional[str] = None) -> jax.Array:
    """One query token per row, ``q [B, H, D]``, over a cache ``k, v [B, S, Hkv, D]``.

    Keys ``0..lengths[b]-1`` are visible.  GPU/TPU run memlab's split-K
    (flash-decoding) Pallas kernel; elsewhere (``"xla"``) a plain masked
    softmax, which is O(S) memory already.
    """
    impl = _check_impl("auto" if impl is None else impl, DECODE_IMPLS)
    if impl == "auto":
        impl = {"gpu": "pallas_triton", "tpu": "pallas_tpu"}.get(_platform(), "xla")
    if q.ndim != 3:
        raise ValueError(f"decode_attention: q must be [batch, heads, head_dim], got {q.shape}.")
    if impl == "xla":
        return _decode_xla(q, k, v, jnp.asarray(lengths), scale)
    from memlab_kernels.decode_attention import decode_attention as kernel
    return kernel(q, k, v, lengths, scale=scale, backend=dispatch.kernel_backend_of(impl))


def _decode_xla(q, k, v, lengths, scale):
    """Decode attention as two batched GEMMs over the cache in its own ``[B, S, Hkv, D]``
    layout, seen as ``[B, S, Hkv * D]``: no transposed copy of K or V.  The query becomes
    a block-diagonal ``[Hkv * D, H]`` matrix (head ``h`` of KV head ``h // G`` in rows
    ``(h // G) * D ...``), so one product gives every head's scores; the values' product
    gives ``[H, Hkv * Dv]`` of which each head keeps its KV head's block.  That spends
    ``Hkv`` times the (small) decode FLOPs to read the cache once, as it is stored.  A row
    with ``lengths == 0`` gets zeros."""
    b, h, d = q.shape
    s, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    scale = d ** -0.5 if scale is None else scale
    own = (jnp.arange(hkv)[:, None] == (jnp.arange(h) // g)[None, :])        # [Hkv, H]
    qbd = jnp.where(own[None, :, None, :],                                  # [B, Hkv, D, H]
                    (q.astype(jnp.float32) * scale).transpose(0, 2, 1)[:, None], 0.0)
    qbd = qbd.reshape(b, hkv * d, h).astype(k.dtype)
    scores = jnp.einsum("bsc,bch->bsh", k.reshape(b, s, hkv * d), qbd,
                        preferred_element_type=jnp.float32)                 # [B, S, H]
    visible = (jnp.arange(s)[None, :] < lengths[:, None])[:, :, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    top = jnp.max(scores, axis=1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(p, axis=1)                                               # [B, H]
    full = jnp.einsum("bsh,bsc->bhc", p.astype(v.dtype), v.reshape(b, s, hkv * dv),
                      preferred_element_type=jnp.float32).reshape(b, h, hkv, dv)
    out = jnp.sum(jnp.where(own.T[None, :, :, None], full, 0.0), axis=2)    # [B, H, Dv]
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    return out.astype(q.dtype)
