"""Float64 numpy forward passes of six Hugging Face decoder families, for tests.

``forward(config, weights, tokens)`` takes a checkpoint's ``config.json`` dict and its
tensors under their Hugging Face names (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight`` stored ``[out, in]``, ..., ``lm_head.weight``)
and returns float64 logits ``[B, T, V]`` for integer tokens ``[B, T]`` (no cache, every
row starting at position 0, no padding).

Written from the published definitions: the ``transformers`` modeling files
``modeling_llama.py``, ``modeling_mistral.py``, ``modeling_qwen2.py``,
``modeling_qwen3.py``, ``modeling_gemma2.py``, ``modeling_gemma3.py`` (its text decoder,
``model_type`` ``gemma3_text``), ``modeling_rope_utils.py`` and the defaults of their
``configuration_*.py``; the Gemma 2 and Gemma 3 reports (Gemma Team 2024, 2025) and the
Qwen3 report (Qwen Team 2025).  Every family is a pre-norm decoder::

    h = embed(tokens)                      (Gemma: times sqrt(hidden_size))
    per layer:
        a = attention(norm(h))             (Gemma 2/3: a = post_attention_layernorm(a))
        h = h + a
        m = mlp(norm(h))                   (Gemma 2/3: the norm is pre_feedforward_layernorm,
        h = h + m                           then m = post_feedforward_layernorm(m))
    logits = head(norm(h))                 (Gemma: final_logit_softcapping c * tanh(logits / c))

* RMSNorm: ``x / sqrt(mean(x^2) + eps) * w``; Gemma multiplies by ``(1 + w)``.
* Attention: q/k/v projections (Qwen2: with biases; ``attention_bias``: q/k/v/o biases),
  Qwen3 and Gemma 3 RMSNorm each head's q and k over ``head_dim`` before RoPE; RoPE in
  the half-split ``rotate_half`` layout; grouped-query heads (query head ``h`` reads
  key/value head ``h // (n_heads / n_kv_heads)``); scores ``q.k * scale`` with
  ``scale = head_dim ** -0.5`` (Gemma: ``query_pre_attn_scalar ** -0.5``), Gemma 2's
  ``attn_logit_softcapping`` ``c * tanh(s / c)`` before the mask (Gemma 3 too when set);
  causal mask, and on sliding layers a query at position ``p`` sees keys at positions
  in ``(p - W, p]``.
* Sliding layers: ``layer_types`` when the config has it; else Mistral: every layer when
  ``sliding_window`` is set; Qwen2/3: layers ``i >= max_window_layers`` when
  ``use_sliding_window``; Gemma 2: even layer indices; Gemma 3: layer ``i`` is global when
  ``(i + 1) % sliding_window_pattern == 0`` (default 6).  Llama has none.
* RoPE frequencies ``inv_freq[j] = base ** (-2j / head_dim)``, ``base = rope_theta``
  (Gemma 3's sliding layers: ``rope_local_base_freq``, never scaled), rescaled by
  ``rope_scaling`` (key ``rope_type``, or the older ``type``): ``linear`` divides by
  ``factor``; ``dynamic`` (NTK-aware) grows the base to
  ``base * (factor * L / M - (factor - 1)) ** (d / (d - 2))`` when the call's length
  ``L = T`` exceeds ``M = max_position_embeddings``; ``llama3`` divides the frequencies
  of wavelength above ``original_max_position_embeddings / low_freq_factor`` by
  ``factor``, keeps those below ``original_max_position_embeddings / high_freq_factor``
  and interpolates in between with ``s = (original / wavelength - low) / (high - low)``:
  ``(1 - s) * f / factor + s * f``.
* MLP: ``down(act(gate(x)) * up(x))`` with ``act`` SiLU (``hidden_act="silu"``) or GELU
  with the tanh approximation (``gelu_pytorch_tanh``, Gemma's GeGLU).
* Head: ``lm_head.weight``, or the embedding matrix when ``tie_word_embeddings`` (family
  default when absent: True for Gemma 2/3, False for the others).

A config may also carry the newer ``rope_parameters`` (one dict with ``rope_theta`` and
``rope_type``, or one per layer type); it replaces ``rope_theta`` / ``rope_scaling`` /
``rope_local_base_freq`` when present.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

# model_type -> family
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma2": "gemma2", "gemma3_text": "gemma3"}

# The configuration_*.py defaults the forward reads, per family (a key present in
# config.json, even as null, wins).
DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=2048, hidden_act="silu", attention_bias=False,
                  mlp_bias=False),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                    max_position_embeddings=4096 * 32, hidden_act="silu", sliding_window=4096,
                    num_key_value_heads=8),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=32768, hidden_act="silu", sliding_window=4096,
                  use_sliding_window=False, max_window_layers=28, num_key_value_heads=32),
    "qwen3": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=32768, hidden_act="silu", sliding_window=4096,
                  use_sliding_window=False, max_window_layers=28, num_key_value_heads=32,
                  head_dim=128, attention_bias=False),
    "gemma2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                   max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh",
                   sliding_window=4096, num_key_value_heads=4, head_dim=256,
                   query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, attention_bias=False),
    "gemma3": dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                   tie_word_embeddings=True, max_position_embeddings=131072,
                   hidden_activation="gelu_pytorch_tanh", sliding_window=4096,
                   sliding_window_pattern=6, num_key_value_heads=4, head_dim=256,
                   query_pre_attn_scalar=256, attn_logit_softcapping=None,
                   final_logit_softcapping=None, attention_bias=False),
}
GEMMA = ("gemma2", "gemma3")


def family(config: Mapping) -> str:
    """The family of a config.json dict, from its ``model_type``."""
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"config model_type={mt!r} is not covered by the reference; choose one "
                         f"of {sorted(FAMILIES)}")
    return FAMILIES[mt]


def get(config: Mapping, key: str):
    """``config[key]``, or the family's configuration default when the key is absent."""
    if key in config:
        return config[key]
    defaults = DEFAULTS[family(config)]
    if key in defaults:
        return defaults[key]
    if key == "num_key_value_heads":
        return config["num_attention_heads"]
    raise KeyError(f"config has no {key!r} and family {family(config)!r} has no default for it")


def head_dim(config: Mapping) -> int:
    hd = config.get("head_dim", DEFAULTS[family(config)].get("head_dim"))
    return int(hd) if hd else config["hidden_size"] // config["num_attention_heads"]


def kv_heads(config: Mapping) -> int:
    n = get(config, "num_key_value_heads")
    return config["num_attention_heads"] if n is None else int(n)


def tied(config: Mapping) -> bool:
    return bool(get(config, "tie_word_embeddings"))


def activation(config: Mapping) -> str:
    fam = family(config)
    if fam in GEMMA:  # Gemma reads hidden_activation; hidden_act is the older key
        act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    else:
        act = get(config, "hidden_act")
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {act!r} is not covered by the reference (silu, "
                         "gelu_pytorch_tanh)")
    return act


def layer_types(config: Mapping) -> list:
    """Per layer ``"sliding_attention"`` or ``"full_attention"``, as the family's HF config
    derives them."""
    n, fam = config["num_hidden_layers"], family(config)
    if config.get("layer_types") is not None:
        types = list(config["layer_types"])
        if len(types) != n or any(t not in ("sliding_attention", "full_attention") for t in types):
            raise ValueError(f"config layer_types {types!r} must name each of the {n} layers "
                             "'sliding_attention' or 'full_attention'")
        return types
    if fam == "mistral":
        sliding = [get(config, "sliding_window") is not None] * n
    elif fam in ("qwen2", "qwen3"):
        on = bool(get(config, "use_sliding_window")) and get(config, "sliding_window") is not None
        sliding = [on and i >= get(config, "max_window_layers") for i in range(n)]
    elif fam == "gemma2":
        sliding = [bool((i + 1) % 2) for i in range(n)]
    elif fam == "gemma3":
        pattern = get(config, "sliding_window_pattern")
        sliding = [bool((i + 1) % pattern) for i in range(n)]
    else:
        sliding = [False] * n
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def rope_params(config: Mapping, layer_type: str) -> tuple:
    """``(base, scaling dict or None)`` of the RoPE used by a layer of ``layer_type``."""
    fam = family(config)
    rp = config.get("rope_parameters")
    if rp is not None:
        if layer_type in rp or "full_attention" in rp:
            rp = rp[layer_type]
        rp = dict(rp)
        base = float(rp.pop("rope_theta"))
        kind = rp.get("rope_type", rp.get("type", "default"))
        return base, (None if kind == "default" else rp)
    if fam == "gemma3" and layer_type == "sliding_attention":
        return float(get(config, "rope_local_base_freq")), None
    scaling = config.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(get(config, "rope_theta")), scaling


def inv_freq(config: Mapping, layer_type: str, seq_len: int) -> np.ndarray:
    """float64 RoPE inverse frequencies ``[head_dim / 2]`` for a call of length ``seq_len``."""
    base, scaling = rope_params(config, layer_type)
    dim = head_dim(config)
    exps = np.arange(0, dim, 2, dtype=np.float64) / dim
    if scaling is None:
        return base ** -exps
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return base ** -exps / factor
    if kind == "dynamic":
        max_pos = get(config, "max_position_embeddings")
        length = max(seq_len, max_pos)
        base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return base ** -exps
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        freq = base ** -exps
        wavelen = 2 * math.pi / freq
        smooth = (old / wavelen - low) / (high - low)
        out = np.where(wavelen > old / low, freq / factor, freq)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, (1 - smooth) * freq / factor + smooth * freq, out)
    raise ValueError(f"rope_scaling type {kind!r} is not covered by the reference "
                     "(linear, dynamic, llama3)")


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, plus_one: bool) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * ((1.0 + w) if plus_one else w)


def rope(x: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Half-split rotary embedding of ``x [B, T, H, D]`` at positions ``0..T-1``."""
    t = x.shape[1]
    ang = np.arange(t, dtype=np.float64)[:, None] * freq[None, :]  # [T, D/2]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[None, :, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[None, :, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softcap(x: np.ndarray, cap: Optional[float]) -> np.ndarray:
    return x if cap is None else cap * np.tanh(x / cap)


def attention_mask(t: int, window: Optional[int]) -> np.ndarray:
    """``[T, T]`` bool: query ``p`` may see key ``s`` (causal, and ``s > p - window``)."""
    p, s = np.arange(t)[:, None], np.arange(t)[None, :]
    ok = s <= p
    if window is not None:
        ok &= s > p - window
    return ok


def forward(config: Mapping, weights: Mapping[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """float64 logits ``[B, T, V]`` of the decoder ``config`` describes (module docstring)."""
    fam = family(config)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be an integer array [batch, seq], got shape "
                         f"{tokens.shape} dtype {tokens.dtype}")

    def w(name: str) -> np.ndarray:
        if name not in weights:
            raise KeyError(f"weights lack the tensor {name!r} that a {fam} checkpoint with this "
                           "config has")
        return np.asarray(weights[name], np.float64)

    def maybe(name: str):
        return w(name) if name in weights else None

    b, t = tokens.shape
    d, nh, nkv, hd = config["hidden_size"], config["num_attention_heads"], kv_heads(config), \
        head_dim(config)
    eps = float(get(config, "rms_norm_eps"))
    gemma = fam in GEMMA
    qk_norm = fam in ("qwen3", "gemma3")
    scale = float(get(config, "query_pre_attn_scalar")) ** -0.5 if gemma else hd ** -0.5
    attn_cap = get(config, "attn_logit_softcapping") if gemma else None
    final_cap = get(config, "final_logit_softcapping") if gemma else None
    act = gelu_tanh if activation(config) == "gelu_pytorch_tanh" else silu
    types = layer_types(config)
    norm = lambda x, g: rms_norm(x, g, eps, gemma)  # noqa: E731

    def linear(x, prefix, bias: bool):
        y = x @ w(prefix + ".weight").T
        return y + w(prefix + ".bias") if bias else y

    # attention_bias: q/k/v/o biases (llama, qwen3, gemma); Qwen2 always has q/k/v biases only
    o_bias = fam not in ("mistral", "qwen2") and bool(config.get("attention_bias", False))
    qkv_bias = fam == "qwen2" or o_bias
    mlp_bias = fam == "llama" and bool(config.get("mlp_bias", False))

    embed = w("model.embed_tokens.weight")
    if tokens.min() < 0 or tokens.max() >= embed.shape[0]:
        raise ValueError(f"token ids must lie in [0, {embed.shape[0]}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    x = embed[tokens]
    if gemma:
        x = x * math.sqrt(d)
    for i, kind in enumerate(types):
        pre = f"model.layers.{i}."
        h = norm(x, w(pre + "input_layernorm.weight"))
        q = linear(h, pre + "self_attn.q_proj", qkv_bias).reshape(b, t, nh, hd)
        k = linear(h, pre + "self_attn.k_proj", qkv_bias).reshape(b, t, nkv, hd)
        v = linear(h, pre + "self_attn.v_proj", qkv_bias).reshape(b, t, nkv, hd)
        if qk_norm:
            q = norm(q, w(pre + "self_attn.q_norm.weight"))
            k = norm(k, w(pre + "self_attn.k_norm.weight"))
        freq = inv_freq(config, kind, t)
        q, k = rope(q, freq), rope(k, freq)
        group = nh // nkv
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # head h -> kv h // group
        s = softcap(np.einsum("bthd,bshd->bhts", q, k) * scale, attn_cap)
        window = get(config, "sliding_window") if kind == "sliding_attention" else None
        s = np.where(attention_mask(t, window), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("bhts,bshd->bthd", p, v).reshape(b, t, nh * hd)
        a = linear(o, pre + "self_attn.o_proj", o_bias)
        if gemma:
            a = norm(a, w(pre + "post_attention_layernorm.weight"))
            x = x + a
            h = norm(x, w(pre + "pre_feedforward_layernorm.weight"))
        else:
            x = x + a
            h = norm(x, w(pre + "post_attention_layernorm.weight"))
        m = act(linear(h, pre + "mlp.gate_proj", mlp_bias)) * linear(h, pre + "mlp.up_proj",
                                                                      mlp_bias)
        m = linear(m, pre + "mlp.down_proj", mlp_bias)
        if gemma:
            m = norm(m, w(pre + "post_feedforward_layernorm.weight"))
        x = x + m
    x = norm(x, w("model.norm.weight"))
    head = embed if tied(config) else maybe("lm_head.weight")
    if head is None:
        raise KeyError("weights lack 'lm_head.weight' and the config does not tie the embeddings "
                       "(tie_word_embeddings)")
    return softcap(x @ head.T, final_cap)
