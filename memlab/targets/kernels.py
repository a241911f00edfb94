"""Every Pallas kernel of ``memlab_kernels`` as a compile case at a model's shapes.

:func:`cases` gives, for a model's attention/MLP/vocabulary shapes and a dtype,
one :class:`KernelCase` per kernel and direction -- flash attention forward and
backward, split-K / paged / KIVI decode, lightning attention forward and
backward, the int8 / int4 / NF4 dequant-matmuls, and cut cross-entropy's
forward, dH and dW -- each a function of abstract arguments that calls the
kernel with an explicit ``backend`` (``"triton"`` or ``"mosaic_tpu"``), at its
default block sizes.  :func:`declared_cost` reads the FLOPs and bytes each
``pallas_call`` declares (its ``CostEstimate``) from the traced program, so a
timing on a real device turns into TFLOP/s and GB/s directly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["MODEL_SHAPES", "KernelCase", "cases", "families", "declared_cost"]

#: Attention, MLP and vocabulary shapes of the models the report covers (their configs).
MODEL_SHAPES = {
    "smollm2-135m": dict(heads=9, kv_heads=3, head_dim=64, d_model=576, d_ff=1536, vocab=49152),
    "llama3-8b": dict(heads=32, kv_heads=8, head_dim=128, d_model=4096, d_ff=14336,
                      vocab=128256),
    "gemma3-270m": dict(heads=4, kv_heads=1, head_dim=256, d_model=640, d_ff=2048,
                        vocab=262144),
}

#: Workload sizes: prefill / training tokens, decode rows and cache length, matmul rows.
PREFILL_T = 4096
DECODE_B, DECODE_S, PAGE = 8, 4096, 16
MATMUL_M = 512
CE_TOKENS = 4096
QUANT_GROUP = 64


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One kernel call: ``fn(*args)`` with ``args`` abstract (``jax.ShapeDtypeStruct``)."""

    family: str      # flash, decode, paged_decode, kivi_decode, lightning, dequant_matmul, cce
    name: str        # e.g. "flash_attention.bwd"
    fn: Callable
    args: tuple
    kernels: tuple   # the pallas_call names it launches
    shape: dict


def _s(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _grad(f, argnums):
    def g(*args):
        return jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=argnums)(*args)
    return g


def families() -> tuple:
    return ("flash", "decode", "paged_decode", "kivi_decode", "lightning", "dequant_matmul",
            "cce")


def cases(model: str, dtype: Any, backend: str) -> list:
    """The compile cases of every kernel at ``model``'s shapes (see :data:`MODEL_SHAPES`)."""
    from memlab_kernels import cut_cross_entropy as cce
    from memlab_kernels import decode_attention as dec
    from memlab_kernels import dequant_matmul as dq
    from memlab_kernels import flash_attention as fa
    from memlab_kernels import lightning_attention as la
    from memlab_kernels import quantized_kv_decode as qkv

    if model not in MODEL_SHAPES:
        raise ValueError(f"cases: model={model!r} is not one of {sorted(MODEL_SHAPES)}")
    m = MODEL_SHAPES[model]
    h, hkv, d = m["heads"], m["kv_heads"], m["head_dim"]
    dt = jnp.dtype(dtype)
    out = []

    def add(family, name, fn, args, kernels, **shape):
        out.append(KernelCase(family, name, fn, tuple(args), tuple(kernels), shape))

    # flash attention (causal prefill / training)
    t = PREFILL_T
    qkv_args = (_s((1, t, h, d), dt), _s((1, t, hkv, d), dt), _s((1, t, hkv, d), dt))

    def flash(q, k, v):
        return fa.flash_attention(q, k, v, causal=True, backend=backend)
    add("flash", "flash_attention.fwd", flash, qkv_args, ("flash_attention_fwd",),
        B=1, T=t, H=h, Hkv=hkv, D=d)
    add("flash", "flash_attention.bwd", _grad(flash, (0, 1, 2)), qkv_args,
        ("flash_attention_fwd", "flash_attention_bwd_dkv", "flash_attention_bwd_dq"),
        B=1, T=t, H=h, Hkv=hkv, D=d)

    # split-K decode over a contiguous cache
    b, s = DECODE_B, DECODE_S
    lengths = _s((b,), jnp.int32)
    add("decode", "decode_attention", lambda q, k, v, n: dec.decode_attention(
        q, k, v, n, backend=backend),
        (_s((b, h, d), dt), _s((b, s, hkv, d), dt), _s((b, s, hkv, d), dt), lengths),
        ("decode_attention",), B=b, S=s, H=h, Hkv=hkv, D=d)

    # paged decode: a pool of exactly the pages the rows need
    pages = b * s // PAGE
    add("paged_decode", "paged_decode_attention", lambda q, kp, vp, n, bt:
        dec.paged_decode_attention(q, kp, vp, n, bt, backend=backend),
        (_s((b, h, d), dt), _s((hkv, pages, PAGE, d), dt), _s((hkv, pages, PAGE, d), dt),
         lengths, _s((b, s // PAGE), jnp.int32)),
        ("paged_decode_attention",), B=b, S=s, H=h, Hkv=hkv, D=d, page=PAGE)

    # KIVI decode, 4 and 2 bits (group 32, residual 128)
    for bits in (4, 2):
        cache = jax.eval_shape(lambda bits=bits: qkv.kivi_empty(
            b, s, hkv, d, bits=bits, group_size=32, residual=128, dtype=dt))
        add("kivi_decode", f"kivi_decode.{bits}bit", lambda q, c: qkv.quantized_decode_attention(
            q, c, backend=backend), (_s((b, h, d), dt), cache), (f"kivi_decode_{bits}bit",),
            B=b, S=s, H=h, Hkv=hkv, D=d, bits=bits)

    # lightning attention (linear attention with per-head decay): forward and backward
    lq = (_s((1, t, h, d), dt), _s((1, t, h, d), dt), _s((1, t, h, d), dt), _s((h,), jnp.float32))

    def lightning(q, k, v, decay):
        return la.lightning_attention(q, k, v, decay=decay, backend=backend)
    add("lightning", "lightning_attention.fwd", lightning, lq, ("lightning_attention",),
        B=1, T=t, H=h, D=d)
    add("lightning", "lightning_attention.bwd", _grad(lightning, (0, 1, 2)), lq,
        ("lightning_attention", "lightning_attention_rev"), B=1, T=t, H=h, D=d)

    # dequant-matmuls at the MLP up-projection [d_model, d_ff]
    mk, nn_ = m["d_model"], m["d_ff"]
    x = _s((MATMUL_M, mk), dt)
    add("dequant_matmul", "dequant_matmul.int8", lambda x, q, sc: dq.int8_matmul(
        x, q, sc, backend=backend), (x, _s((mk, nn_), jnp.int8), _s((nn_,), jnp.float32)),
        ("dequant_matmul_int8",), M=MATMUL_M, K=mk, N=nn_)
    g = QUANT_GROUP
    add("dequant_matmul", "dequant_matmul.int4", lambda x, p, sc, z: dq.int4_matmul(
        x, p, sc, z, group_size=g, backend=backend),
        (x, _s((mk // 2, nn_), jnp.uint8), _s((mk // g, nn_), jnp.float32),
         _s((mk // g, nn_), jnp.float32)), ("dequant_matmul_int4",), M=MATMUL_M, K=mk, N=nn_,
        group=g)
    add("dequant_matmul", "dequant_matmul.nf4", lambda x, p, am: dq.nf4_matmul(
        x, p, am, block_size=g, backend=backend),
        (x, _s((mk // 2, nn_), jnp.uint8), _s((mk // g, nn_), jnp.float32)),
        ("dequant_matmul_nf4",), M=MATMUL_M, K=mk, N=nn_, block=g)

    # cut cross-entropy with a tied head [V, D]: forward, and the dH / dW backward kernels
    n, v = CE_TOKENS, m["vocab"]
    ce_args = (_s((n, m["d_model"]), dt), _s((v, m["d_model"]), dt), _s((n,), jnp.int32))

    def ce(hid, w, tg):
        return cce.cut_cross_entropy(hid, w, tg, tied=True, backend=backend)
    add("cce", "cut_cross_entropy.fwd", ce, ce_args, ("cut_cross_entropy_fwd",),
        N=n, D=m["d_model"], V=v)
    add("cce", "cut_cross_entropy.bwd", _grad(ce, (0, 1)), ce_args,
        ("cut_cross_entropy_fwd", "cut_cross_entropy_bwd_dh", "cut_cross_entropy_bwd_dw"),
        N=n, D=m["d_model"], V=v)
    return out


def declared_cost(fn: Callable, args) -> dict:
    """``{kernel name: {flops, bytes_accessed, transcendentals, grid}}`` as each
    ``pallas_call`` in ``fn``'s traced program declares it (summed over repeated calls)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    out = {}

    def visit(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "pallas_call":
                name = eqn.params.get("name")
                name = getattr(name, "name", name) or "pallas_call"
                ce = eqn.params.get("cost_estimate")
                grid = tuple(getattr(eqn.params.get("grid_mapping"), "grid", ()) or ())
                row = out.setdefault(name, {"flops": 0, "bytes_accessed": 0,
                                            "transcendentals": 0, "calls": 0,
                                            "grid": list(grid)})
                row["calls"] += 1
                if ce is not None:
                    row["flops"] += int(ce.flops)
                    row["bytes_accessed"] += int(ce.bytes_accessed)
                    row["transcendentals"] += int(ce.transcendentals)
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        visit(inner)
                    elif hasattr(sub, "eqns"):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return out


def _explicit_positions_attention(q, k, v, scale=None, causal=False, **mask):
    """The Triton flash kernel with ``arange`` positions passed explicitly (no tile skipped)."""
    from memlab_kernels import flash_attention as fa
    pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32)[None], q.shape[:2])
    return fa.flash_attention(q, k, v, causal=causal, q_positions=pos, kv_positions=pos,
                              scale=scale, backend="triton")


def train_attention_flops(model, tokens, explicit_positions: bool = False) -> dict:
    """``{kernel: flops}`` the flash kernels of ``model``'s gradient declare (per traced
    call: a scanned layer body counts once), for ``tokens`` (arrays or shapes).

    ``explicit_positions=True`` traces the same gradient with every attention call given
    ``arange`` positions (the model's static attention hook, so a separate trace), so no
    tile is skipped: the cost of a caller that passes positions.  The model should force
    a Pallas flash backend (``attention="pallas_triton"``).
    """
    if explicit_positions:
        model = model.with_dispatch(attention_hook=_explicit_positions_attention)

    def grad(p, t):
        return jax.grad(lambda p: model.apply(p, t).astype(jnp.float32).mean())(p)

    cost = declared_cost(grad, (model.params, tokens))
    return {n: r["flops"] for n, r in cost.items() if n.startswith("flash_attention")}
