"""One config-driven decoder in Flax Linen for the Llama, Mistral, Qwen and Gemma families:
RMSNorm, RoPE, GQA, a gated MLP, tied or untied embeddings, with the layers run under
``nn.scan`` (one compiled body, params stacked on a leading layer axis) so that per-layer
remat, sharding and offload apply to every layer at once.

The families differ only in :class:`LlamaConfig` fields (each follows the family's
published definition, the Hugging Face ``modeling_*.py`` of the same name):

* Llama 1/2/3/3.1 (Touvron et al. 2023; Dubey et al. 2024): ``rope_scaling`` of type
  ``linear`` (positions divided by ``factor``), ``dynamic`` (NTK-aware: the base grows
  with the sequence beyond the original context) or ``llama3`` (frequencies rescaled by
  wavelength band);
* Mistral (Jiang et al. 2023): ``sliding_window`` on every layer;
* Qwen2/2.5: ``qkv_bias``; Qwen3: ``qk_norm`` (RMSNorm of each head's q and k);
* Gemma 2/3 (Gemma Team 2024, 2025): ``norm_plus_one`` (norms apply ``1 + w``),
  ``embed_scale`` (embeddings times sqrt(d_model)), ``post_norms`` (a norm on the attention
  and MLP outputs before each residual add), ``mlp_act="gelu_tanh"`` (GeGLU),
  ``layer_types`` (interleaved sliding-window and global layers), ``rope_local_theta``
  (Gemma 3's base for sliding layers), ``query_scale`` (``query_pre_attn_scalar ** -0.5``),
  ``attn_softcap`` / ``final_softcap`` (Gemma 2's ``c * tanh(x / c)`` on scores / logits)
  and ``qk_norm`` (Gemma 3).

Layers of two kinds (sliding and global) share one scanned body: the body branches on
the traced layer index with ``lax.cond``, each branch with its own static window and
RoPE base, so attention keeps its static masks (and the kernels their block skipping).

Parameter paths (the names rules match against)::

    embed/embedding                       [vocab, d_model]
    layers/attn_norm/scale                [L, d_model]
    layers/attn/{q,k,v,o}_proj/kernel     [L, in, out]
    layers/attn/{q,k,v}_proj/bias         [L, out]           (qkv_bias)
    layers/attn/{q,k}_norm/scale          [L, head_dim]      (qk_norm)
    layers/post_attn_norm/scale           [L, d_model]       (post_norms)
    layers/mlp_norm/scale                 [L, d_model]
    layers/post_mlp_norm/scale            [L, d_model]       (post_norms)
    layers/mlp/{gate,up,down}_proj/kernel [L, in, out]
    final_norm/scale                      [d_model]
    lm_head/kernel                        [d_model, vocab]   (untied only)

Named activations for remat policies (``jax.ad_checkpoint.checkpoint_name``):
``qkv``, ``attn_out``, ``mlp_hidden``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from memlab.cache import (Dense, PolicyCache, StepCtx, group_index, in_place_decode, init_cache,
                          layer_groups)
from memlab.nn.attention import attention as nn_attention


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder (the model's ``spec``)."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; softmax and norms always run in float32
    attention: str = "auto"  # memlab.nn.attention impl: auto, chunked, naive, pallas_triton, ...
    mlp_chunks: int = 1  # Mini-Sequence (MsT): run the MLP over this many sequence chunks; 1 = off
    # -- family features (module doc); the defaults are plain Llama ----------------------
    arch: str = "llama"                    # family name: llama, mistral, qwen2, qwen3, gemma2, gemma3
    qkv_bias: bool = False                 # q/k/v projections carry biases
    qk_norm: bool = False                  # RMSNorm over head_dim on q and k, before RoPE
    norm_plus_one: bool = False            # every RMSNorm applies (1 + w)
    embed_scale: bool = False              # embeddings times sqrt(d_model), in the compute dtype
    post_norms: bool = False               # norms on the attention / MLP outputs
    mlp_act: str = "silu"                  # gated MLP activation: silu (SwiGLU), gelu_tanh (GeGLU)
    sliding_window: Optional[int] = None   # a query at p sees keys in (p - W, p] on sliding layers
    layer_types: tuple = ()                # per layer "sliding_attention" / "full_attention"
    rope_local_theta: Optional[float] = None  # RoPE base of sliding layers (no scaling there)
    rope_scaling: Optional[tuple] = None   # sorted (key, value) pairs of HF's rope_scaling
    query_scale: Optional[float] = None    # softmax scale; None: head_dim ** -0.5
    attn_softcap: Optional[float] = None   # scores -> c * tanh(scores / c)
    final_softcap: Optional[float] = None  # logits -> c * tanh(logits / c)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _scaling_tuple(self.rope_scaling))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.query_scale is not None and math.isclose(self.query_scale, self.head_dim ** -0.5,
                                                         rel_tol=1e-12):
            object.__setattr__(self, "query_scale", None)  # the default scale
        sc = dict(self.rope_scaling or ())
        if sc.get("rope_type") == "dynamic" and \
                sc.get("original_max_position_embeddings") != self.max_seq_len:
            # HF's dynamic NTK grows the base past the config's max_position_embeddings
            sc["original_max_position_embeddings"] = self.max_seq_len
            object.__setattr__(self, "rope_scaling", _scaling_tuple(sc))
        _check_family(self)
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"LlamaConfig.{f} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={self.n_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
        for f in ("param_dtype", "dtype"):
            jnp.dtype(getattr(self, f))  # raises on an unknown dtype name
        if isinstance(self.mlp_chunks, bool) or not isinstance(self.mlp_chunks, int) \
                or self.mlp_chunks < 1:
            raise ValueError(f"LlamaConfig.mlp_chunks must be a positive int (1 = no Mini-Sequence "
                             f"chunking), got {self.mlp_chunks!r}")

    # -- exact counts used by the analytic memory estimate ------------------
    def layer_param_count(self) -> int:
        d, hd = self.d_model, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        if self.qkv_bias:
            attn += (self.n_heads + 2 * self.n_kv_heads) * hd
        if self.qk_norm:
            attn += 2 * hd
        norms = (4 if self.post_norms else 2) * d
        return norms + attn + 3 * d * self.d_ff

    def sliding_layers(self) -> tuple:
        """One bool per layer: does it attend over a sliding window."""
        if self.layer_types:
            return tuple(t == "sliding_attention" for t in self.layer_types)
        return (self.sliding_window is not None,) * self.n_layers

    def layer_attention(self, sliding: bool) -> tuple:
        """``(window, rope_theta, rope_scaling)`` of a sliding or a global layer."""
        if not sliding:
            return None, self.rope_theta, self.rope_scaling
        if self.rope_local_theta is not None:  # Gemma 3: its own base, unscaled
            return self.sliding_window, self.rope_local_theta, None
        return self.sliding_window, self.rope_theta, self.rope_scaling

    def param_count(self) -> int:
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else self.d_model * self.vocab_size
        return embed + head + self.d_model + self.n_layers * self.layer_param_count()

    def param_shapes(self):
        """The params pytree as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
        return jax.tree_util.tree_map(lambda x: x, _param_shapes(self))  # a fresh tree

    def kv_cache_bytes(self, batch: int, seq: int, dtype: Any = None) -> int:
        """The dense cache's bytes: sliding layers keep ``min(window, seq)`` positions."""
        itemsize = jnp.dtype(dtype or self.dtype).itemsize
        kinds = self.sliding_layers()
        w = self.sliding_window if any(kinds) else None
        slots = sum(min(w, seq) if sl else seq for sl in kinds)
        return 2 * slots * batch * self.n_kv_heads * self.head_dim * itemsize

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


ROPE_TYPES = ("linear", "dynamic", "llama3")
# the gated MLP activations by name (memlab.models.llama.gated)
_GATE_ACTS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}
MLP_ACTS = tuple(_GATE_ACTS)
LAYER_TYPES = ("sliding_attention", "full_attention")


def _scaling_tuple(scaling) -> Optional[tuple]:
    """HF's ``rope_scaling`` dict as a hashable sorted tuple (None for the default rope)."""
    if scaling is None:
        return None
    items = dict(scaling)
    kind = items.get("rope_type", items.get("type"))
    if kind in (None, "default"):
        return None
    items["rope_type"] = kind
    items.pop("type", None)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items.items()))


def _check_family(c) -> None:
    if c.mlp_act not in MLP_ACTS:
        raise ValueError(f"LlamaConfig.mlp_act={c.mlp_act!r}; choose one of {MLP_ACTS}")
    if c.sliding_window is not None and (isinstance(c.sliding_window, bool) or not isinstance(
            c.sliding_window, int) or c.sliding_window < 1):
        raise ValueError(f"LlamaConfig.sliding_window must be a positive int or None, got "
                         f"{c.sliding_window!r}")
    if c.layer_types:
        if len(c.layer_types) != c.n_layers or any(t not in LAYER_TYPES for t in c.layer_types):
            raise ValueError(f"LlamaConfig.layer_types must name each of the {c.n_layers} layers "
                             f"with one of {LAYER_TYPES}, got {c.layer_types!r}")
        if "sliding_attention" in c.layer_types and c.sliding_window is None:
            raise ValueError("LlamaConfig.layer_types has sliding layers but sliding_window is "
                             "None; set the window size")
    if c.rope_scaling is not None:
        kind = dict(c.rope_scaling).get("rope_type")
        if kind not in ROPE_TYPES:
            raise ValueError(f"LlamaConfig.rope_scaling type {kind!r} is not supported; "
                             f"choose one of {ROPE_TYPES} (or None)")
        if "factor" not in dict(c.rope_scaling):
            raise ValueError(f"LlamaConfig.rope_scaling {dict(c.rope_scaling)} lacks 'factor'")
    for f in ("query_scale", "attn_softcap", "final_softcap", "rope_local_theta"):
        v = getattr(c, f)
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"LlamaConfig.{f} must be a positive number or None, got {v!r}")


@functools.lru_cache(maxsize=64)
def _param_shapes(config: "LlamaConfig"):
    module = Llama(config)
    return jax.eval_shape(lambda k: module.init(k, jnp.zeros((1, 1), jnp.int32)),
                          jax.random.key(0))["params"]


class _DenseCacheFactory:
    """Deprecated spelling of the dense cache: ``KVCache.zeros(config, batch, max_len)``
    now builds the :class:`memlab.cache.Dense` policy's ``PolicyCache``."""

    @staticmethod
    def zeros(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> PolicyCache:
        warnings.warn("memlab.models.llama.KVCache is deprecated: the dense cache is the "
                      "Dense policy; use memlab.generate.make_cache(model, batch, max_len) or "
                      "memlab.cache.init_cache(memlab.cache.Dense(), config, batch, max_len)",
                      DeprecationWarning, stacklevel=2)
        policy = Dense(None if dtype is None else jnp.dtype(dtype).name)
        return init_cache(policy, config, batch, max_len)


def __getattr__(name):
    if name == "KVCache":
        return _DenseCacheFactory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x / rms(x) * w`` over the last axis, in float32; ``plus_one``: ``* (1 + w)``
    (Gemma), with ``w`` initialised to zeros so that both start as the identity."""
    eps: float
    dtype: Any
    param_dtype: Any
    plus_one: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = scale.astype(jnp.float32)
        return (y * (1.0 + w if self.plus_one else w)).astype(self.dtype)


def rope_frequencies(d: int, theta, scaling: Optional[tuple] = None, positions=None):
    """RoPE's inverse frequencies ``[D/2]`` (float32) for base ``theta`` and HF's
    ``rope_scaling`` (sorted pairs): ``linear`` divides them by ``factor``; ``llama3``
    divides the low-frequency band (wavelength above ``original / low_freq_factor``) by
    ``factor``, keeps the high band and interpolates between; ``dynamic`` (NTK-aware)
    raises the base to ``theta * (factor * n / original - (factor - 1)) ** (d / (d - 2))``
    once the sequence length ``n = max(positions) + 1`` exceeds the original context."""
    exps = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    if scaling is None:
        return 1.0 / (theta ** exps)
    sc = dict(scaling)
    kind, factor = sc["rope_type"], float(sc["factor"])
    original = sc.get("original_max_position_embeddings")
    if kind == "linear":
        return 1.0 / (theta ** exps) / factor
    if kind == "dynamic":
        n = jnp.max(positions).astype(jnp.float32) + 1.0
        orig = float(original)
        grown = theta * (factor * n / orig - (factor - 1.0)) ** (d / (d - 2))
        return 1.0 / (jnp.where(n > orig, grown, theta) ** exps)
    inv = 1.0 / (theta ** exps)                          # llama3
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    orig = float(original)
    wavelen = 2 * jnp.pi / inv
    scaled = jnp.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return jnp.where(medium, mid, scaled)


def rope(x: jax.Array, positions: jax.Array, theta: float,
         scaling: Optional[tuple] = None) -> jax.Array:
    """Rotary embedding, half-split layout.  x: [B, T, H, D], positions: [B, T];
    ``scaling``: HF's ``rope_scaling`` as sorted pairs (:func:`rope_frequencies`)."""
    d = x.shape[-1]
    inv_freq = rope_frequencies(d, theta, scaling, positions)
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def softcap(x, cap: Optional[float]):
    """Gemma 2's soft-cap ``cap * tanh(x / cap)`` (identity for ``cap=None``)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, kv, layer, lengths, n_new):
        c = self.config
        dense = lambda n, name, bias=False: nn.Dense(  # noqa: E731
            n, use_bias=bias, dtype=c.compute_dtype, param_dtype=c.weight_dtype, name=name)
        b, t, _ = x.shape
        x = x.reshape(b * t, -1)  # [B*T, D]: weight gradients contract one token axis
        q = dense(c.n_heads * c.head_dim, "q_proj", c.qkv_bias)(x).reshape(b, t, c.n_heads, c.head_dim)
        k = dense(c.n_kv_heads * c.head_dim, "k_proj", c.qkv_bias)(x).reshape(
            b, t, c.n_kv_heads, c.head_dim)
        v = dense(c.n_kv_heads * c.head_dim, "v_proj", c.qkv_bias)(x).reshape(
            b, t, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            norm = lambda name: RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype,  # noqa: E731
                                        c.norm_plus_one, name=name)
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        impl = None if c.attention == "auto" else c.attention
        kinds = c.sliding_layers()

        def core(sliding: bool, q, k, v, kv):
            window, theta, scaling = c.layer_attention(sliding)
            k_pre = k
            q, k = rope(q, positions, theta, scaling), rope(k, positions, theta, scaling)
            q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
            opts = _AttnOpts(window, c.query_scale, c.attn_softcap)
            if kv is None:  # training / scoring: causal over the sequence itself
                return opts.attend_causal(q, k, v, impl), None
            return _policy_step(kv, layer, q, k, v, positions, lengths, n_new, k_pre,
                                theta, scaling, impl, opts)

        if len(set(kinds)) == 1:
            out, kv = core(kinds[0], q, k, v, kv)
        else:  # sliding and global layers in one scanned body: branch on the layer index
            is_sliding = jnp.asarray(kinds)[layer]
            out, kv = jax.lax.cond(is_sliding, functools.partial(core, True),
                                   functools.partial(core, False), q, k, v, kv)
        out = checkpoint_name(out.reshape(b * t, c.n_heads * c.head_dim), "attn_out")
        return dense(c.d_model, "o_proj")(out).reshape(b, t, c.d_model), kv


@dataclasses.dataclass(frozen=True)
class _AttnOpts:
    """A layer's static attention options: window, softmax scale, score soft-cap."""
    window: Optional[int] = None
    scale: Optional[float] = None
    softcap: Optional[float] = None

    def attend_causal(self, q, k, v, impl):
        s = k.shape[1]
        window = self.window if self.window is not None and self.window < s else None
        return nn_attention(q, k, v, causal=True, window=window, scale=self.scale,
                            softcap=self.softcap, impl=impl)


def _policy_step(cache, layer, q, k, v, positions, lengths, n_new, k_pre, theta, scaling=None,
                 impl=None, opts: Optional[_AttnOpts] = None):
    """One layer through a KV policy: slice its state, prefill or decode, write it back.
    A ``cross_layer`` policy (MiniCache) gets the whole state and indexes it by ``ctx.layer``.
    With the two-group layout (:func:`memlab.cache.layer_groups`) the layer's slot is in
    its group's stack, and a sliding layer's ring is kept by the group's policy.  A window,
    a non-default scale or a soft-cap reach the policy in the ``StepCtx``; a policy that
    does not declare ``attention_options`` cannot honour them (a clear error)."""
    opts = opts or _AttnOpts()
    if opts.window is not None and opts.window >= cache.dims.max_len:
        opts = dataclasses.replace(opts, window=None)   # no key is ever out of the window
    groups = layer_groups(cache.policy, cache.dims)
    policy, state, index = cache.policy, cache.state, layer
    if groups is not None:  # this layer's slot in its own group's stack (memlab.cache)
        group, table = group_index(cache.dims, opts.window is not None)
        policy, index = groups[group][0], jnp.asarray(table)[layer]
        state = cache.state[group]
    if opts != _AttnOpts() and not getattr(policy, "attention_options", False):
        raise NotImplementedError(
            f"KV policy {type(policy).__name__} does not apply a non-default attention scale "
            f"or a score soft-cap ({opts}), which this model's layers need; use the dense "
            "cache (memlab.cache.Dense) for this model")
    ctx = StepCtx(positions=positions, n_new=n_new, lengths=lengths, layer=layer, k_pre=k_pre,
                  rope=functools.partial(rope, theta=theta, scaling=scaling), impl=impl,
                  fresh=cache.fresh, window=opts.window, scale=opts.scale, softcap=opts.softcap,
                  ring=groups is not None and opts.window is not None)
    step = policy.prefill if q.shape[1] > 1 else policy.decode
    if getattr(policy, "cross_layer", False):
        out, state = step(cache.state, q, k, v, ctx)
        return out, cache._replace(state=state)
    in_place = getattr(policy, "decode_stacked", None) if in_place_decode() else None
    if q.shape[1] == 1 and in_place is not None and not ctx.ring and ctx.window is None \
            and ctx.softcap is None:
        out, state = in_place(state, index, q, k, v, ctx)   # the token written into the stack
    else:
        out, state = _step_slice(step, state, index, q, k, v, ctx)
    if groups is not None:
        state = {**cache.state, group: state}
    return out, cache._replace(state=state)


def _step_slice(step, stacked, index, q, k, v, ctx):
    st = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False), stacked)
    out, st = step(st, q, k, v, ctx)
    return out, jax.tree.map(lambda full, new: jax.lax.dynamic_update_index_in_dim(
        full, new.astype(full.dtype), index, 0), stacked, st)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated(gate: jax.Array, up: jax.Array, act: str = "silu") -> jax.Array:
    """``act(gate) * up``, the gated linear unit of SwiGLU / GeGLU (Shazeer 2020).

    Its custom VJP keeps only the two inputs as residuals and recomputes the activation
    and its derivative elementwise in the backward, so a training step without remat
    saves ``gate`` and ``up`` per layer rather than every intermediate of the activation.
    """
    return _GATE_ACTS[act](gate) * up


def _gated_fwd(gate, up, act):
    return gated(gate, up, act), (gate, up)


def _gated_bwd(act, res, dh):
    gate, up = res
    a, act_vjp = jax.vjp(_GATE_ACTS[act], gate)
    (dgate,) = act_vjp(dh * up)
    return dgate, (dh * a).astype(up.dtype)


gated.defvjp(_gated_fwd, _gated_bwd)


class MLP(nn.Module):
    """The gated MLP: SwiGLU (``mlp_act="silu"``) or GeGLU (``"gelu_tanh"``).  With
    ``config.mlp_chunks > 1`` (Mini-Sequence Transformer, Luo et al.
    2024) the sequence is cut into that many chunks, run one at a time under a
    lifted scan whose body is rematerialized: the ``[B, T, d_ff]`` hidden exists one
    chunk at a time in the forward and again in the backward.  A ragged T is padded
    up to chunks of ``ceil(T / mlp_chunks)`` rows (rows are independent; the padding
    is sliced off).  Init, T = 1 and sown intermediates (calibration) run unchunked.

    The projections see the tokens flattened to ``[B*T, D]``, so each weight gradient
    is one GEMM contracting a single token axis, with no transposed copy of the
    ``[B, T, d_ff]`` gradients (the attention projections do the same).
    """

    config: LlamaConfig

    def setup(self):
        c = self.config
        dense = lambda n: nn.Dense(  # noqa: E731
            n, use_bias=False, dtype=c.compute_dtype, param_dtype=c.weight_dtype)
        self.gate_proj, self.up_proj, self.down_proj = dense(c.d_ff), dense(c.d_ff), dense(c.d_model)

    def ffn(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [B*T, D]: weight gradients contract one token axis
        h = gated(self.gate_proj(x), self.up_proj(x), self.config.mlp_act)
        h = checkpoint_name(h, "mlp_hidden")
        return self.down_proj(h).reshape(shape)

    def __call__(self, x):
        b, t, d = x.shape
        size = -(-t // self.config.mlp_chunks)  # rows per chunk
        n = -(-t // size)  # chunks actually needed (<= mlp_chunks)
        if n == 1 or self.is_initializing() or self.is_mutable_collection("intermediates"):
            return self.ffn(x)
        xs = jnp.pad(x, ((0, 0), (0, n * size - t), (0, 0))).reshape(b, n, size, d).swapaxes(0, 1)
        body = nn.remat(lambda mdl, carry, xc: (carry, mdl.ffn(xc)), prevent_cse=False)
        chunked = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, length=n)
        _, ys = chunked(self, None, xs)  # [n, B, size, D]
        return ys.swapaxes(0, 1).reshape(b, n * size, d)[:, :t]


class Block(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, positions, lengths, n_new):
        """carry = (hidden [B, T, D], the PolicyCache or None, layer index)."""
        x, kv, layer = carry
        c = self.config
        norm = lambda name: RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype,  # noqa: E731
                                    c.norm_plus_one, name=name)
        h, kv = Attention(c, name="attn")(norm("attn_norm")(x), positions, kv, layer, lengths, n_new)
        if c.post_norms:
            h = norm("post_attn_norm")(h)
        x = x + h
        h = MLP(c, name="mlp")(norm("mlp_norm")(x))
        if c.post_norms:
            h = norm("post_mlp_norm")(h)
        x = x + h
        return (x, kv, layer + 1), None


REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # copies every dot without batch dims to pinned host memory and back for the backward
    # (saves device memory on GPU/TPU; on CPU host and device are the same memory)
    "offload_dots_with_no_batch_dims": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        offload_src="device", offload_dst="pinned_host"),
}
ACTIVATION_NAMES = ("qkv", "attn_out", "mlp_hidden")  # what the layers tag with checkpoint_name


def remat_names(name: str) -> dict:
    """The activation names a policy string refers to: ``'save:qkv;offload:mlp_hidden'`` ->
    ``{'save': ('qkv',), 'offload': ('mlp_hidden',)}``; ``{}`` for a named JAX policy."""
    if not isinstance(name, str):
        raise TypeError(f"remat policy must be a string such as 'nothing_saveable', got "
                        f"{type(name).__name__}")
    if name in REMAT_POLICIES:
        return {}
    out: dict = {}
    for part in name.split(";"):
        kind, sep, rest = (s.strip() for s in part.partition(":"))
        names = tuple(n.strip() for n in rest.split(",") if n.strip())
        if not sep or kind not in ("save", "offload") or kind in out or not names:
            raise ValueError(
                f"remat policy {name!r} is unknown; choose one of {sorted(REMAT_POLICIES)}, "
                "'save:<name>,<name>' (keep only these), 'offload:<name>,<name>' (to pinned "
                "host) or 'save:<name>;offload:<name>'")
        out[kind] = names
    both = sorted(set(out.get("save", ())) & set(out.get("offload", ())))
    if both:
        raise ValueError(f"remat policy {name!r} both saves and offloads {both}; name each once")
    return out


def remat_policy(name: Optional[str]):
    """A JAX checkpoint policy by name (``REMAT_POLICIES``); ``save:qkv,attn_out`` saves only
    those names, ``offload:qkv,mlp_hidden`` moves them to pinned host memory for the
    backward, ``save:qkv;offload:mlp_hidden`` does both; everything else is recomputed."""
    if name is None:
        return None
    named = remat_names(name)
    if not named:
        return REMAT_POLICIES[name]
    if "offload" not in named:
        return jax.checkpoint_policies.save_only_these_names(*named["save"])
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=list(named.get("save", ())),
        names_which_can_be_offloaded=list(named["offload"]),
        offload_src="device", offload_dst="pinned_host")


def layer_apply(config: "LlamaConfig", layer_params, x, layer, positions, lengths, n_new):
    """One decoder layer (the body the model scans), no cache: ``x [B, T, D] -> x``."""
    carry = (x, None, jnp.asarray(layer, jnp.int32))
    return Block(config, parent=None).apply({"params": layer_params}, carry, positions, lengths,
                                            n_new)[0][0]


class Llama(nn.Module):
    """``apply(params, tokens[B, T], cache=None) -> logits`` or ``(logits, cache)``.

    ``last_only=True`` returns logits for the last position only ([B, 1, V]); with a
    cache, each row's last new token (position ``n_new - 1`` of the call).
    ``hidden_only=True`` (no cache) returns the final-norm hidden states [B, T, D]
    in the compute dtype instead of logits: the caller applies the head
    (``memlab.nn.model_loss``, cut cross-entropy without [B, T, V] logits).

    With a cache, tokens are written at each row's ``cache.lengths`` and attend
    over everything written so far; positions are ``lengths + arange(T)``.
    ``remat``: None (no rematerialization) or a policy name (see ``remat_policy``).

    The pieces of a training forward, for steps that run the layers themselves
    (:mod:`memlab.fused`; no cache): ``embed_only=True`` returns the embedded tokens
    [B, T, D]; ``hidden_in=x`` skips the embedding and the layers and runs the final
    norm and head on the layer stack's output ``x`` (params need no ``layers``).
    One layer is :func:`layer_apply`.
    """

    config: LlamaConfig
    remat: Optional[str] = None
    stream: Optional[tuple] = None  # (k, p): layer streaming from host memory (memlab.offload)
    # one NamedSharding per leaf of one layer's params (ml.passes.shard): each scanned layer's
    # weights are constrained inside the layer body, so FSDP gathers one layer at a time and
    # its gradient is reduce-scattered inside the backward loop, never the whole stack
    layer_shardings: Optional[tuple] = None

    def _constrain_layer(self, variables):
        """One layer's params with their ``layer_shardings`` (inside the scanned body)."""
        if "params" not in variables:
            return variables
        leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
        if len(leaves) != len(self.layer_shardings):
            raise ValueError(f"layer_shardings has {len(self.layer_shardings)} entries for "
                             f"{len(leaves)} layer params")
        params = treedef.unflatten([jax.lax.with_sharding_constraint(x, s)
                                    for x, s in zip(leaves, self.layer_shardings)])
        return dict(variables, params=params)

    @nn.compact
    def __call__(self, tokens, cache: Optional[PolicyCache] = None, last_only: bool = False,
                 n_new: Optional[jax.Array] = None, hidden_only: bool = False,
                 embed_only: bool = False, hidden_in: Optional[jax.Array] = None):
        c = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an integer array [batch, seq]; got shape {tokens.shape} "
                f"dtype {tokens.dtype}. Tokenize first (model.tokenizer.encode(text).ids).")
        b, t = tokens.shape
        n_new = jnp.full((b,), t, jnp.int32) if n_new is None else jnp.asarray(n_new, jnp.int32)
        if isinstance(cache, PolicyCache):
            if cache.dims.batch != b or cache.dims.n_layers != c.n_layers:
                raise ValueError(f"cache is for batch {cache.dims.batch}, {cache.dims.n_layers} layers; "
                                 f"tokens have batch {b} and the model {c.n_layers} layers")
            if isinstance(cache.policy, Dense) and t > cache.max_len:
                raise ValueError(f"{t} tokens do not fit a cache of max_len {cache.max_len}")
            lengths, kv = cache.lengths, cache
        elif cache is not None:
            raise TypeError(f"cache must be a memlab.cache.PolicyCache (memlab.generate.make_cache"
                            f"(model, batch, max_len)), got {type(cache).__name__}")
        else:
            lengths = jnp.zeros((b,), jnp.int32)
            kv = None
        positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

        embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype,
                         param_dtype=c.weight_dtype, name="embed")
        if (embed_only or hidden_in is not None) and cache is not None:
            raise ValueError("embed_only / hidden_in are pieces of a training forward; call "
                             "them without a cache")
        if hidden_in is not None and embed_only:
            raise ValueError("pass either embed_only=True or hidden_in=, not both")
        if hidden_in is not None and hidden_in.shape != (b, t, c.d_model):
            raise ValueError(f"hidden_in must be [batch, seq, d_model] = {(b, t, c.d_model)}, got "
                             f"{tuple(hidden_in.shape)}")
        if c.tie_embeddings or hidden_in is None:
            x = embed(tokens)  # tied: the head's weight; unused output is dropped by XLA
            if c.embed_scale:  # Gemma: the normalizer sqrt(d_model) in the compute dtype
                x = x * jnp.asarray(c.d_model ** 0.5, c.compute_dtype)
        if embed_only:
            return x
        block = Block
        if self.remat is not None:
            block = nn.remat(Block, policy=remat_policy(self.remat), prevent_cse=False)
        if self.layer_shardings is not None and not self.is_initializing():
            block = nn.map_variables(block, "params", trans_in_fn=self._constrain_layer)
        layers = nn.scan(block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.n_layers)
        if hidden_in is not None:
            x = hidden_in
        elif self.stream is not None and not self.is_initializing() \
                and not self.is_mutable_collection("intermediates"):
            from memlab.offload import stream_layers  # the offload pass: weights in host memory

            def layer_fn(lp, carry):
                return block(c, parent=None).apply({"params": lp}, carry, positions, lengths, n_new)[0]
            x, kv, _ = stream_layers(layer_fn, self.variables["params"]["layers"],
                                     (x, kv, jnp.int32(0)), c.n_layers, *self.stream)
        else:
            (x, kv, _), _ = layers(c, name="layers")((x, kv, jnp.int32(0)), positions, lengths, n_new)
        x = RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype, c.norm_plus_one,
                    name="final_norm")(x)
        if last_only:  # only the next-token logits (prefill/decode): skip the [B, T, V] matmul
            if cache is None or t == 1:
                x = x[:, -1:]
            else:  # each row's last new token (a right-padded prompt ends before T)
                x = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)
        if hidden_only:
            if cache is not None:
                raise ValueError("hidden_only=True returns hidden states for a loss; call it "
                                 "without a cache")
            return x
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                              param_dtype=c.weight_dtype, name="lm_head")(x)
        logits = softcap(logits.astype(jnp.float32), c.final_softcap)
        if cache is None:
            return logits
        return logits, kv._replace(lengths=lengths + n_new, fresh=False)
