"""Hugging Face checkpoints: ``config.json`` <-> :class:`LlamaConfig`, safetensors <-> params.

**Configs.** :func:`config_from_hf` maps the ``config.json`` of the decoder families
memlab models (``model_type`` llama, mistral, qwen2, qwen3, gemma2, gemma3_text, and
the text part of a multimodal gemma3) to a :class:`LlamaConfig`, filling every key
the file leaves out with that family's default in ``transformers`` (its
``configuration_<family>.py``: Gemma ties its embeddings by default, Llama does not;
Qwen3 and Gemma default ``head_dim`` to 128 / 256, the others to
``hidden_size // num_attention_heads``).  Per-layer attention follows ``layer_types``
when the file has it, else the family's rule: Mistral slides every layer, Qwen2/3
layers ``i >= max_window_layers`` when ``use_sliding_window``, Gemma 2 the even
layers, Gemma 3 every layer but those with ``(i + 1) % sliding_window_pattern == 0``.
RoPE comes from ``rope_theta`` / ``rope_scaling`` or from transformers 5's
``rope_parameters`` (also per layer type, as Gemma 3 writes it).
:func:`config_to_hf` is the inverse: ``config_from_hf(config_to_hf(c), c.name) == c``
for every config :func:`config_from_hf` returns (memlab's runtime fields, dtypes,
attention implementation and MLP chunks, travel in a ``"memlab"`` entry that
transformers ignores).

**Tensors.**  HF stores a linear layer as the torch weight ``[out, in]``; memlab's
kernels are ``[in, out]`` and its layers are stacked on a leading axis.  The names
(:func:`tensor_names`)::

    model.embed_tokens.weight                          embed/embedding
    model.layers.{i}.input_layernorm.weight            layers/attn_norm/scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers/attn/{q,k,v,o}_proj/kernel (T)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias       layers/attn/{q,k,v}_proj/bias
    model.layers.{i}.self_attn.{q,k}_norm.weight       layers/attn/{q,k}_norm/scale
    model.layers.{i}.post_attention_layernorm.weight   layers/mlp_norm/scale
                                          (Gemma: layers/post_attn_norm/scale)
    model.layers.{i}.pre_feedforward_layernorm.weight  layers/mlp_norm/scale        (Gemma)
    model.layers.{i}.post_feedforward_layernorm.weight layers/post_mlp_norm/scale   (Gemma)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    layers/mlp/{gate,up,down}_proj/kernel (T)
    model.norm.weight                                  final_norm/scale
    lm_head.weight                                     lm_head/kernel (T; absent when tied)

HF's q/k rows are in the half-split (``rotate_half``) RoPE layout memlab uses, so
nothing is permuted.  Gemma's norm weights are stored as HF stores them (``w``,
applied as ``1 + w``).  A multimodal Gemma 3 checkpoint's language model
(``model.language_model.*`` or ``language_model.model.*``) is read and its vision
tower skipped; rotary ``inv_freq`` buffers of old checkpoints are skipped; a tied
model's stray ``lm_head.weight`` is skipped (transformers ties it too).

**Loading** (:func:`load`) first reads every safetensors header (a truncated or
corrupt file, a shard the index names but the directory lacks, a missing, extra or
misshapen tensor is an error before any data is read), then allocates the final
params (in their shardings when a shard pass is given) and reads one tensor at a
time with ``safetensors.safe_open(..., backend="pread")`` (no memory map, so the
page cache is not counted against the process), copying it into its place in row
chunks with a donated in-place update (the cast to ``dtype`` and the transpose
happen there).  Host memory peaks at the final params plus one tensor plus a few
chunks, plus the runtime's compiled programs (a fixed amount).  ``quantize=``
quantizes each kernel as it is read: the tensor read from the file and its float copy
on the device exist together until the file's copy is freed, never the float model.

**Saving** (:func:`save`) writes ``config.json``, ``model.safetensors`` (or
``model-0000k-of-0000n.safetensors`` shards no larger than ``max_shard_size`` and
``model.safetensors.index.json``), and ``tokenizer.json`` / ``tokenizer_config.json``
when the model has a tokenizer.  LoRA adapters are merged
(:func:`memlab.passes.lora.merge_lora`) and quantized kernels dequantized one layer at
a time, so transformers can read the result; ``keep_quantized=True`` instead stores
each quantized kernel's arrays (``<hf name>.<array>``, e.g.
``model.layers.0.mlp.up_proj.weight.data``) with their formats in
``memlab_quantization.json``, which :func:`load` reads back bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from memlab.models.llama import Llama, LlamaConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
QUANT_FILE = "memlab_quantization.json"
QUANT_FORMAT_VERSION = 1
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_CHUNK_BYTES = 2 << 20  # bytes of one row chunk copied into place

# transformers' defaults per model_type (configuration_<family>.py), for keys a file omits
_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                  head_dim=None, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu"),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=None, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6,
                    rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  head_dim=None, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                   rope_theta=10000.0, tie_word_embeddings=True,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, max_position_embeddings=131072, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, tie_word_embeddings=True,
                        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=None,
                        attn_logit_softcapping=None, rope_local_base_freq=10000.0,
                        sliding_window_pattern=6),
}
_ARCH = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
         "gemma2": "gemma2", "gemma3_text": "gemma3"}
_MODEL_TYPE = {v: k for k, v in _ARCH.items()}
_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# memlab-only LlamaConfig fields, kept under config.json's "memlab" key when not default
_RUNTIME_FIELDS = ("param_dtype", "dtype", "attention", "mlp_chunks")


def _family_flags(model_type: str) -> dict:
    """The LlamaConfig structure flags a model_type implies."""
    gemma = model_type in ("gemma2", "gemma3_text")
    return dict(qkv_bias=model_type == "qwen2", qk_norm=model_type in ("qwen3", "gemma3_text"),
                norm_plus_one=gemma, embed_scale=gemma, post_norms=gemma,
                mlp_act="gelu_tanh" if gemma else "silu")


# ---------------------------------------------------------------------------
# config.json <-> LlamaConfig
# ---------------------------------------------------------------------------
def _rope(c: dict, model_type: str, defaults: dict, where: str):
    """(rope_theta, rope_scaling dict or None, local theta or None) from transformers 5's
    ``rope_parameters`` when the file has it, else from the ``rope_theta`` /
    ``rope_scaling`` keys of transformers 4."""
    local = c.get("rope_local_base_freq", defaults.get("rope_local_base_freq"))
    params = c.get("rope_parameters")
    if not isinstance(params, dict):  # transformers 4's keys
        return (float(c.get("rope_theta", defaults["rope_theta"])), c.get("rope_scaling"),
                local)
    if "full_attention" in params or "sliding_attention" in params:  # per layer type
        full = dict(params.get("full_attention") or {})
        sliding = params.get("sliding_attention") or {}
        if "rope_theta" in sliding:
            local = sliding["rope_theta"]
    else:
        full = dict(params)
    theta = full.pop("rope_theta", defaults["rope_theta"])
    kind = full.get("rope_type", full.get("type", "default"))
    return float(theta), (None if kind == "default" else full), local


def _activation(c: dict, model_type: str, defaults: dict, where: str) -> str:
    if model_type.startswith("gemma"):  # Gemma's MLP reads hidden_activation
        act = c.get("hidden_activation") or c.get("hidden_act") or defaults["hidden_activation"]
    else:
        act = c.get("hidden_act", defaults["hidden_act"])
    if act not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation {act!r} is not supported; memlab's gated MLP "
                         f"runs {sorted(set(_ACTIVATIONS))} (SwiGLU or tanh-approximated GeGLU)")
    return _ACTIVATIONS[act]


def _layer_types(c: dict, model_type: str, defaults: dict, n_layers: int,
                 window: Optional[int], where: str) -> tuple:
    if window is None or model_type in ("llama", "mistral"):
        return ()  # no window, or (Mistral) the window on every layer
    given = c.get("layer_types")
    if given is not None:
        if not isinstance(given, (list, tuple)) or len(given) != n_layers:
            raise ValueError(f"{where}: layer_types must list one type per layer "
                             f"({n_layers}), got {given!r}")
        return tuple(given)
    if model_type in ("qwen2", "qwen3"):
        first = int(c.get("max_window_layers", defaults["max_window_layers"]))
        return tuple("sliding_attention" if i >= first else "full_attention"
                     for i in range(n_layers))
    if model_type == "gemma2":
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                     for i in range(n_layers))
    pattern = c.get("sliding_window_pattern", c.get("_sliding_window_pattern"))
    pattern = int(pattern if pattern is not None else defaults["sliding_window_pattern"])
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(n_layers))


def config_from_hf(cfg: dict, name: str, *, source: str = CONFIG_FILE) -> LlamaConfig:
    """A Hugging Face ``config.json`` dict as a :class:`LlamaConfig` named ``name``.

    Keys the dict lacks take the family's transformers default.  ``source`` names the
    file in error messages.  Raises ``ValueError`` for an unsupported ``model_type`` or
    a feature memlab's decoder does not model (an output-projection or MLP bias, an
    activation other than SiLU / tanh-GELU, a RoPE type other than linear, dynamic,
    llama3).
    """
    if not isinstance(cfg, dict):
        raise TypeError(f"{source}: config_from_hf expects the parsed config.json dict, got "
                        f"{type(cfg).__name__}")
    model_type = cfg.get("model_type")
    where = source
    if model_type == "gemma3":  # multimodal: the language model's config
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{source}: a 'gemma3' config needs a 'text_config' dict (the "
                             "language model's settings)")
        text = dict(text)
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in cfg:
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        text["model_type"] = "gemma3_text"
        cfg, model_type, where = text, "gemma3_text", f"{source} (text_config)"
    if model_type not in _DEFAULTS:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; memlab reads "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    d = _DEFAULTS[model_type]
    get = lambda k: cfg[k] if cfg.get(k) is not None else d.get(k)  # noqa: E731
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{where}: attention_bias / mlp_bias put biases on the output or MLP "
                         "projections, which memlab's decoder does not model (it has q/k/v "
                         "biases, as Qwen2 uses, only)")
    n_heads = int(get("num_attention_heads"))
    n_kv = cfg.get("num_key_value_heads")
    n_kv = int(n_kv if n_kv is not None else (d["num_key_value_heads"] or n_heads))
    d_model = int(get("hidden_size"))
    head_dim = get("head_dim")
    head_dim = int(head_dim) if head_dim is not None else d_model // n_heads
    n_layers = int(get("num_hidden_layers"))
    theta, scaling, local = _rope(cfg, model_type, d, where)
    if model_type in ("qwen2", "qwen3"):
        window = get("sliding_window") if cfg.get("use_sliding_window",
                                                  d["use_sliding_window"]) else None
    elif model_type == "llama":
        window = None
    else:  # sliding_window: null in the file means no window
        window = cfg.get("sliding_window", d.get("sliding_window"))
    window = None if window is None else int(window)
    fields = dict(
        name=name, arch=_ARCH[model_type], vocab_size=int(get("vocab_size")), d_model=d_model,
        n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        d_ff=int(get("intermediate_size")), rope_theta=theta,
        norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", d["tie_word_embeddings"])),
        max_seq_len=int(get("max_position_embeddings")),
        mlp_act=_activation(cfg, model_type, d, where), sliding_window=window,
        layer_types=_layer_types(cfg, model_type, d, n_layers, window, where),
        rope_scaling=scaling)
    flags = _family_flags(model_type)
    del flags["mlp_act"]
    fields.update(flags)
    if model_type.startswith("gemma"):
        fields["query_scale"] = float(get("query_pre_attn_scalar")) ** -0.5
        fields["attn_softcap"] = _opt_float(cfg.get("attn_logit_softcapping",
                                                    d["attn_logit_softcapping"]))
        fields["final_softcap"] = _opt_float(cfg.get("final_logit_softcapping",
                                                     d["final_logit_softcapping"]))
    if model_type == "gemma3_text":
        fields["rope_local_theta"] = _opt_float(local)
    runtime = cfg.get("memlab") or {}
    fields.update({k: runtime[k] for k in _RUNTIME_FIELDS if k in runtime})
    try:
        return LlamaConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def _opt_float(v):
    return None if v is None else float(v)


def _scalar(x: float):
    """An int when ``x`` is one up to rounding (query_pre_attn_scalar is an int in HF)."""
    r = round(x)
    return int(r) if abs(x - r) <= 1e-9 * max(1.0, abs(x)) else x


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The Hugging Face ``config.json`` dict of ``cfg`` (legacy ``rope_theta`` /
    ``rope_scaling`` keys, which transformers 4 and 5 both read).

    Raises ``ValueError`` when ``cfg`` combines features no HF family of its ``arch``
    has (e.g. ``qk_norm`` on a llama).
    """
    if not isinstance(cfg, LlamaConfig):
        raise TypeError(f"config_to_hf expects a LlamaConfig, got {type(cfg).__name__}")
    model_type = _MODEL_TYPE.get(cfg.arch)
    if model_type is None:
        raise ValueError(f"config_to_hf: arch {cfg.arch!r} has no Hugging Face model_type; "
                         f"memlab writes {sorted(_MODEL_TYPE)}")
    for field, want in _family_flags(model_type).items():
        if getattr(cfg, field) != want:
            raise ValueError(f"config_to_hf: {cfg.name}: {field}={getattr(cfg, field)!r} but "
                             f"HF {model_type} models have {field}={want!r}; set arch to the "
                             "family that has it")
    if model_type == "llama" and cfg.sliding_window is not None:
        raise ValueError(f"config_to_hf: {cfg.name}: HF llama has no sliding window; use "
                         "arch='mistral' (every layer) or 'qwen2'")
    if model_type == "mistral" and cfg.layer_types:
        raise ValueError(f"config_to_hf: {cfg.name}: HF mistral slides every layer; set "
                         "layer_types=() or use arch='qwen2' for per-layer types")
    out = {
        "architectures": [_CLASSES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else {
            k: list(v) if isinstance(v, tuple) else v for k, v in cfg.rope_scaling},
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.param_dtype,
    }
    if model_type.startswith("gemma"):
        out["hidden_activation"] = out["hidden_act"] = "gelu_pytorch_tanh"
        scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim ** -0.5
        out["query_pre_attn_scalar"] = _scalar(scale ** -2)
        out["attn_logit_softcapping"] = cfg.attn_softcap
        out["final_logit_softcapping"] = cfg.final_softcap
        out["sliding_window"] = cfg.sliding_window
        out["layer_types"] = ["sliding_attention" if s else "full_attention"
                              for s in cfg.sliding_layers()]
        if model_type == "gemma3_text":
            out["rope_local_base_freq"] = (cfg.rope_local_theta if cfg.rope_local_theta
                                           is not None else cfg.rope_theta)
        out["attention_bias"] = False
    else:
        out["hidden_act"] = "silu"
    if model_type == "llama":
        out["attention_bias"] = out["mlp_bias"] = False
    elif model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif model_type in ("qwen2", "qwen3"):
        sliding = cfg.sliding_layers()
        out["use_sliding_window"] = cfg.sliding_window is not None
        out["sliding_window"] = cfg.sliding_window
        out["max_window_layers"] = next((i for i, s in enumerate(sliding) if s), cfg.n_layers)
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        if model_type == "qwen3":
            out["attention_bias"] = False
    defaults = LlamaConfig(name="_", vocab_size=1, d_model=2, n_layers=1, n_heads=1,
                           n_kv_heads=1, head_dim=2, d_ff=1)
    runtime = {k: getattr(cfg, k) for k in _RUNTIME_FIELDS
               if getattr(cfg, k) != getattr(defaults, k)}
    if runtime:
        out["memlab"] = runtime
    return out


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; {what}")
    return data


def read_config(path: str | os.PathLike, name: Optional[str] = None) -> LlamaConfig:
    """The config of a ``config.json`` file or of a checkpoint directory holding one;
    ``name`` defaults to the directory's name."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file} not found: a Hugging Face checkpoint directory holds config.json (the "
            "model's settings) beside its safetensors; download the whole repository "
            "(e.g. `huggingface-cli download <repo> --local-dir DIR`)")
    if name is None:
        name = os.path.basename(os.path.dirname(os.path.abspath(file)))
    return config_from_hf(read_json(file, "re-download config.json"), name, source=file)


# ---------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------
_LAYER_TENSORS = {  # memlab path under layers/ -> HF name under model.layers.{i}.
    "attn_norm/scale": "input_layernorm.weight",
    "attn/q_proj/kernel": "self_attn.q_proj.weight",
    "attn/k_proj/kernel": "self_attn.k_proj.weight",
    "attn/v_proj/kernel": "self_attn.v_proj.weight",
    "attn/o_proj/kernel": "self_attn.o_proj.weight",
    "attn/q_proj/bias": "self_attn.q_proj.bias",
    "attn/k_proj/bias": "self_attn.k_proj.bias",
    "attn/v_proj/bias": "self_attn.v_proj.bias",
    "attn/q_norm/scale": "self_attn.q_norm.weight",
    "attn/k_norm/scale": "self_attn.k_norm.weight",
    "post_attn_norm/scale": "post_attention_layernorm.weight",
    "post_mlp_norm/scale": "post_feedforward_layernorm.weight",
    "mlp/gate_proj/kernel": "mlp.gate_proj.weight",
    "mlp/up_proj/kernel": "mlp.up_proj.weight",
    "mlp/down_proj/kernel": "mlp.down_proj.weight",
}
_TOP_TENSORS = {"embed/embedding": "model.embed_tokens.weight",
                "final_norm/scale": "model.norm.weight", "lm_head/kernel": "lm_head.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_SKIPPED_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                     "model.multi_modal_projector.")


def _path_str(path) -> str:
    from memlab.model import path_str
    return path_str(path)


def tensor_names(cfg: LlamaConfig) -> dict:
    """``memlab path -> (HF name, layered, transposed)`` for every param of ``cfg``'s
    decoder; a layered name holds ``{i}`` for the layer index."""
    out = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(cfg.param_shapes())[0]:
        path = _path_str(p)
        if path.startswith("layers/"):
            rest = path[len("layers/"):]
            hf = _LAYER_TENSORS.get(rest)
            if rest == "mlp_norm/scale":  # Gemma's layout has a norm before and after the MLP
                hf = "pre_feedforward_layernorm.weight" if cfg.post_norms \
                    else "post_attention_layernorm.weight"
            if hf is None:
                raise ValueError(f"memlab param {path!r} has no Hugging Face tensor name")
            out[path] = ("model.layers.{i}." + hf, True, path.endswith("/kernel"))
        elif path in _TOP_TENSORS:
            out[path] = (_TOP_TENSORS[path], False, path.endswith("/kernel"))
        else:
            raise ValueError(f"memlab param {path!r} has no Hugging Face tensor name")
    return out


def _normalize(name: str) -> Optional[str]:
    """The text decoder's tensor name (prefixes of multimodal checkpoints removed), or
    None for tensors that are not the decoder's weights (vision tower, rotary buffers)."""
    if name.startswith(_SKIPPED_PREFIXES) or name.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


# ---------------------------------------------------------------------------
# Formats of quantized arrays (the keep_quantized sidecar)
# ---------------------------------------------------------------------------
def format_to_json(fmt) -> dict:
    """A memlab.quant format (a frozen dataclass, possibly wrapping another) as JSON."""
    from memlab.quant import formats
    if not isinstance(fmt, formats.Format) or not dataclasses.is_dataclass(fmt):
        raise ValueError(f"save(keep_quantized=True): cannot record format {fmt!r}; memlab "
                         "writes the dataclass formats of memlab.quant.formats")
    if getattr(formats, type(fmt).__name__, None) is not type(fmt):
        raise ValueError(f"save(keep_quantized=True): format class {type(fmt).__name__} is not "
                         "in memlab.quant.formats, so load could not rebuild it; save with "
                         "keep_quantized=False (dequantized)")
    out = {"class": type(fmt).__name__}
    for f in dataclasses.fields(fmt):
        v = getattr(fmt, f.name)
        out[f.name] = format_to_json(v) if isinstance(v, formats.Format) else v
    return out


def format_from_json(data: dict, where: str):
    from memlab.quant import formats
    cls = getattr(formats, str(data.get("class")), None) if isinstance(data, dict) else None
    if not (isinstance(cls, type) and issubclass(cls, formats.Format)
            and dataclasses.is_dataclass(cls)):
        raise ValueError(f"{where}: unknown quantization format {data!r}; the file was written "
                         "by a memlab with other formats")
    kwargs = {k: (format_from_json(v, where) if isinstance(v, dict) else v)
              for k, v in data.items() if k != "class"}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: format {data!r} does not match {cls.__name__} ({e})") from None


# ---------------------------------------------------------------------------
# Reading a checkpoint directory
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class _Header:
    file: str
    shape: tuple
    dtype: str  # safetensors dtype code, e.g. "BF16"


def _checkpoint_files(directory: str) -> tuple[list, Optional[dict]]:
    """The safetensors files to read (in order) and the index's weight map, if any."""
    index = os.path.join(directory, INDEX_FILE)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index):
        data = read_json(index, f"re-download {INDEX_FILE}")
        wmap = data.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise ValueError(f"{index} has no 'weight_map' (tensor name -> shard file); "
                             "re-download it")
        files = list(dict.fromkeys(wmap.values()))
        for f in files:
            if not os.path.isfile(os.path.join(directory, f)):
                n = sum(1 for v in wmap.values() if v == f)
                raise FileNotFoundError(
                    f"shard {f} named in {index} ({n} tensors) is missing from {directory}; "
                    "the download is incomplete: fetch that file again")
        return files, wmap
    if os.path.isfile(single):
        return [SINGLE_FILE], None
    present = sorted(os.listdir(directory))
    hint = ""
    if any(p.endswith((".bin", ".pt", ".pth")) for p in present):
        hint = (" It holds PyTorch pickle weights, which memlab does not read: convert them "
                "to safetensors (e.g. with transformers: model.save_pretrained(dir, "
                "safe_serialization=True)).")
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (found "
                            f"{present[:10]}).{hint}")


def _headers(directory: str, files: list, wmap: Optional[dict]) -> dict:
    """name -> _Header for every tensor, reading headers only (safetensors checks that
    the data section covers every tensor, so a truncated file fails here)."""
    from safetensors import safe_open

    out: dict = {}
    for f in files:
        path = os.path.join(directory, f)
        try:
            with safe_open(path, framework="numpy", backend="pread") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    if wmap is None or wmap.get(k) == f:
                        out.setdefault(k, _Header(f, tuple(sl.get_shape()), sl.get_dtype()))
        except Exception as e:  # safetensors raises SafetensorError for bad files
            raise ValueError(f"{path} is not a readable safetensors file ({e}); it is "
                             "truncated or corrupt: download it again") from None
    if wmap is not None:
        lost = [k for k in wmap if k not in out]
        if lost:
            raise ValueError(f"{os.path.join(directory, INDEX_FILE)} places {len(lost)} tensors "
                             f"in files that lack them, e.g. {lost[0]!r} in {wmap[lost[0]]}; "
                             "the shard is stale or corrupt: download it again")
    return out


def _to_numpy_dtype(code: str, where: str):
    if code not in FLOAT_DTYPES:
        raise ValueError(f"{where} has dtype {code}; memlab reads float checkpoints "
                         f"({', '.join(FLOAT_DTYPES)})")
    return FLOAT_DTYPES[code]


@dataclasses.dataclass
class _Slot:
    """One memlab param and the checkpoint tensors that fill it."""
    path: str
    hf: str             # HF name (layered: with {i})
    layered: bool
    transposed: bool
    shape: tuple        # memlab shape of the whole leaf (with the layer axis)
    quant: Optional[dict] = None  # from the sidecar: format, dtype, array dtypes

    def names(self, n_layers: int) -> list:
        return [self.hf.format(i=i) for i in range(n_layers)] if self.layered else [self.hf]

    def slice_shape(self) -> tuple:
        return self.shape[1:] if self.layered else self.shape

    def hf_shape(self) -> tuple:
        s = self.slice_shape()
        return tuple(reversed(s)) if self.transposed else s


def _quant_sidecar(directory: str) -> dict:
    path = os.path.join(directory, QUANT_FILE)
    if not os.path.isfile(path):
        return {}
    data = read_json(path, f"re-save the model or delete {QUANT_FILE} with the arrays it lists")
    if data.get("format_version") != QUANT_FORMAT_VERSION or not isinstance(
            data.get("kernels"), dict):
        raise ValueError(f"{path}: format_version {data.get('format_version')!r} / 'kernels' "
                         f"not understood; this memlab writes version {QUANT_FORMAT_VERSION}")
    return data["kernels"]


def _plan(directory: str, cfg: LlamaConfig, headers: dict, sidecar: dict) -> tuple[list, dict]:
    """Slots for every param, and ``hf name -> (slot, layer, array or None)`` for every
    tensor to read; raises on missing, unexpected or misshapen tensors."""
    slots = []
    for path, (hf, layered, transposed) in tensor_names(cfg).items():
        leaf = _leaf(cfg, path)
        slots.append(_Slot(path, hf, layered, transposed, tuple(leaf.shape), sidecar.get(path)))
    unknown = sorted(set(sidecar) - {s.path for s in slots})
    if unknown:
        raise ValueError(f"{os.path.join(directory, QUANT_FILE)} lists {unknown[:3]}, which "
                         f"{cfg.name}'s config has no param for")
    wanted: dict = {}
    for s in slots:
        for layer, name in enumerate(s.names(cfg.n_layers)):
            if s.quant is None:
                wanted[name] = (s, layer if s.layered else None, None)
            else:
                for arr in s.quant.get("arrays", {}):
                    wanted[f"{name}.{arr}"] = (s, layer if s.layered else None, arr)
    found: dict = {}
    unexpected = []
    for raw, h in headers.items():
        name = _normalize(raw)
        if name is None:
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: the head is the embedding (transformers ignores it too)
        if name in wanted:
            found[name] = (raw, h)
        else:
            unexpected.append(raw)
    if unexpected:
        m = _LAYER_RE.match(_normalize(unexpected[0]) or "")
        why = (f"layer {m.group(1)} is beyond the config's {cfg.n_layers} layers; "
               if m and int(m.group(1)) >= cfg.n_layers else "")
        raise ValueError(
            f"{directory}: {len(unexpected)} tensors are not part of a {cfg.arch} decoder with "
            f"this config.json, e.g. {unexpected[:3]} ({why}check model_type and the "
            "structure flags in config.json, e.g. attention_bias, tie_word_embeddings)")
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(
            f"{directory}: {len(missing)} tensors the config needs are missing, e.g. "
            f"{missing[:3]}; the checkpoint is incomplete or config.json does not describe "
            "it (download it again, or fix config.json)")
    reads: dict = {}
    for name, (raw, h) in found.items():
        s, layer, arr = wanted[name]
        where = f"tensor {raw!r} in {h.file}"
        if arr is None:
            _to_numpy_dtype(h.dtype, where)
            if h.shape != s.hf_shape():
                raise ValueError(f"{where} has shape {list(h.shape)}, but the config implies "
                                 f"{list(s.hf_shape())} (memlab {s.path}); config.json does not "
                                 "match the weights")
        reads[raw] = (s, layer, arr, h)
    _check_quantized(directory, slots, reads, cfg)
    return slots, reads


def _check_quantized(directory: str, slots: list, reads: dict, cfg: LlamaConfig) -> None:
    """Every layer's stored arrays of a quantized kernel agree in shape and dtype and
    describe the kernel's logical shape."""
    from memlab.quant.qarray import QArray

    by_slot: dict = {}
    for raw, (s, layer, arr, h) in reads.items():
        if arr is not None:
            by_slot.setdefault(s.path, {}).setdefault(arr, set()).add((h.shape, h.dtype))
    for s in slots:
        if s.quant is None:
            continue
        where = f"{os.path.join(directory, QUANT_FILE)} entry {s.path!r}"
        fmt = format_from_json(s.quant.get("format"), where)
        arrays = {}
        for arr, seen in by_slot.get(s.path, {}).items():
            if len(seen) != 1:
                raise ValueError(f"{where}: array {arr!r} differs between layers {sorted(seen)}")
            shape, code = next(iter(seen))
            dt = s.quant["arrays"][arr]
            arrays[arr] = jax.ShapeDtypeStruct(shape, jnp.dtype(dt))
        try:
            logical = tuple(QArray(arrays, fmt, s.quant.get("dtype", "float32")).shape)
        except Exception as e:  # noqa: BLE001 - a format reading arrays it lacks
            raise ValueError(f"{where}: its arrays {sorted(arrays)} do not form a {fmt.name} "
                             f"kernel ({type(e).__name__}: {e})") from None
        if logical != s.slice_shape():
            raise ValueError(f"{where}: the stored kernel is {list(logical)}, the config implies "
                             f"{list(s.slice_shape())}; config.json does not match the weights")


def _leaf(cfg: LlamaConfig, path: str):
    node = cfg.param_shapes()
    for k in path.split("/"):
        node = node[k]
    return node


# -- device-side writes --------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _writer(sharding, transposed: bool, layered: bool, vector: bool):
    """``buf <- chunk`` at rows (or, transposed, columns) ``r0`` of layer ``layer``, cast
    to the buffer's dtype, in place (the buffer is donated)."""
    def write(buf, chunk, layer, r0):
        x = chunk.astype(buf.dtype)
        zero = jnp.zeros((), jnp.int32)
        if vector:
            idx = (r0,)
        elif transposed:
            x, idx = x.T, (zero, r0)
        else:
            idx = (r0, zero)
        if layered:
            x, idx = x[None], (layer,) + idx
        return jax.lax.dynamic_update_slice(buf, x, idx)
    return _jit_donating(write, sharding)


@functools.lru_cache(maxsize=None)
def _layer_writer(sharding):
    """``buf[layer] <- x`` in place."""
    def write(buf, x, layer):
        return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), layer, 0)
    return _jit_donating(write, sharding)


def _jit_donating(fn, sharding):
    if sharding is None:
        return jax.jit(fn, donate_argnums=0)
    return jax.jit(fn, donate_argnums=0, out_shardings=sharding)


def _sharding_of(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, jax.sharding.Sharding) else None


def _zeros(sds):
    s = _sharding_of(sds)
    return jnp.zeros(sds.shape, sds.dtype, device=s)


def _zeros_all(sdss: list) -> list:
    """Zero buffers for every ``ShapeDtypeStruct`` (in its sharding), made by one
    compiled program rather than one per shape."""
    if not sdss:
        return []
    shardings = [_sharding_of(x) for x in sdss]
    make = lambda: [jnp.zeros(x.shape, x.dtype) for x in sdss]  # noqa: E731
    if all(s is None for s in shardings):
        return jax.jit(make)()
    if any(s is None for s in shardings):
        return [_zeros(x) for x in sdss]
    return jax.jit(make, out_shardings=shardings)()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere): freed tensor-sized blocks go back to the
    OS instead of staying in the heap, so each tensor read reuses memory, not adds to it."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _release() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _copy_rows(buf, w: np.ndarray, layer, transposed: bool, layered: bool, sharding):
    """Copy the numpy tensor ``w`` (HF layout) into ``buf`` a few rows at a time."""
    vector = w.ndim == 1
    write = _writer(sharding, transposed and not vector, layered, vector)
    layer = np.int32(layer or 0)
    if vector:
        buf = write(buf, w, layer, np.int32(0))
        return buf.block_until_ready()
    row = max(1, w[0].nbytes)
    step = _row_step(w.shape[0], max(1, _CHUNK_BYTES // row))
    for r0 in range(0, w.shape[0], step):
        buf = write(buf, w[r0:r0 + step], layer, np.int32(r0))
        buf.block_until_ready()  # one chunk in flight: the queue would hold them all
    return buf


def _row_step(rows: int, most: int) -> int:
    """Rows per chunk: the largest divisor of ``rows`` up to ``most`` (one compiled
    shape), unless that is much smaller than ``most``."""
    if rows <= most:
        return rows
    for d in range(most, 0, -1):
        if rows % d == 0:
            return d if d * 4 >= most else most
    return most


def quantize_pass(quantize, streaming: bool = True):
    """The quantize pass of ``quantize`` (a format, a method, or a format's name);
    ``streaming``: it quantizes tensors as they are read, so it cannot calibrate."""
    from memlab import passes
    if isinstance(quantize, str):  # a registered weight format's name
        from memlab.quant.formats import WEIGHT_FORMATS
        names = [n for n in WEIGHT_FORMATS.names() if WEIGHT_FORMATS.get(n)() is not None]
        if quantize not in names:
            raise ValueError(f"quantize={quantize!r}: name one of {sorted(names)} or pass a "
                             "format / calibration-free method (e.g. ml.quant.nf4(64))")
        quantize = WEIGHT_FORMATS.get(quantize)()
    qpass = passes.quantize(quantize)
    if streaming and qpass.method.needs_calibration:
        raise ValueError(f"load(quantize=...) streams one tensor at a time and cannot "
                         f"calibrate; {qpass.method.name} needs data: load the float model and "
                         "apply ml.passes.quantize(method)(model, calib=batches)")
    return qpass


def _shard_target(shard, abstract):
    """The shard pass applied to the abstract model: its params carry each leaf's
    sharding (nothing is allocated)."""
    from memlab.model import Model, Pass
    if not isinstance(shard, Pass):
        raise TypeError(f"shard= takes a shard pass, ml.passes.shard(mesh, strategy); got "
                        f"{type(shard).__name__}")
    placed = shard(abstract)
    if placed.extra("shard") is None:
        raise TypeError(f"shard= takes ml.passes.shard(mesh, strategy); {shard.name} is "
                        "another pass")
    return placed.params


def special_ids(tokenizer, tok_config: dict, config: dict) -> dict:
    """``{"bos": id, "eos": id, "unknown": id, "padding": id}`` from tokenizer_config.json's
    token strings (as transformers reads them), else config.json's ids."""
    out = {}
    keys = (("bos", "bos_token", "bos_token_id"), ("eos", "eos_token", "eos_token_id"),
            ("unknown", "unk_token", None), ("padding", "pad_token", "pad_token_id"))
    for key, tok_key, id_key in keys:
        tok = tok_config.get(tok_key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        tid = tokenizer.token_to_id(tok) if isinstance(tok, str) and tokenizer else None
        if tid is None and id_key is not None:
            v = config.get(id_key)
            tid = v[0] if isinstance(v, list) and v else v
        if isinstance(tid, int) and not isinstance(tid, bool):
            out[key] = tid
    return out


def _chat_template(directory: str, tok_config: dict) -> Optional[str]:
    """tokenizer_config.json's chat_template (the default of a named list), else the
    ``chat_template.jinja`` file newer transformers write beside it."""
    t = tok_config.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default", next(iter(named.values()), None))
    if isinstance(t, str):
        return t
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    return None


def load(directory: str | os.PathLike, dtype: str = "float32", quantize=None, shard=None,
         tokenizer: bool = True, name: Optional[str] = None):
    """The :class:`memlab.Model` of a Hugging Face checkpoint directory.

    ``dtype``: the params' (and compute) dtype; tensors are cast as they are read.
    ``quantize``: a format, a calibration-free method, or a format name (``"int8"``,
    ``"nf4"``, ...): every kernel (``.../kernel``, the head included) is quantized as it
    is read, by one compiled step per kernel shape.  The result is the quantize pass's
    on the float model, bit for bit for the layer kernels; the unstacked head can differ
    in the last bit of constants the format reduces over the whole matrix (NF4's
    double-quantized absmax mean), where the pass's op-by-op run rounds differently.
    ``shard``: ``ml.passes.shard(mesh, strategy)``; every param is allocated in its
    sharding and each tensor copied into its shards as it is read, then the pass is
    applied (constraints, layer shardings).
    ``tokenizer=False`` loads without ``tokenizer.json`` (``model.tokenizer`` None);
    by default a missing tokenizer is an error.  A directory written with
    ``save(keep_quantized=True)`` comes back with its quantized kernels as stored.
    """
    from memlab.model import Model
    from memlab.quant.qarray import QArray

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    name = name or os.path.basename(os.path.normpath(os.path.abspath(directory)))
    jnp.dtype(dtype)
    cfg = read_config(directory, name)
    cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)
    tok, tok_config = None, {}
    if tokenizer:
        tok_path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(
                f"{tok_path} not found: memlab reads the fast-tokenizer file tokenizer.json; "
                "download it with the weights, or pass tokenizer=False to load the weights "
                "without a tokenizer")
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(tok_path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise ValueError(f"{tok_path} is not a readable tokenizers file ({e}); download "
                             "it again, or pass tokenizer=False") from None
        tc_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        if os.path.isfile(tc_path):
            tok_config = read_json(tc_path, f"re-download {TOKENIZER_CONFIG_FILE}")

    files, wmap = _checkpoint_files(directory)
    headers = _headers(directory, files, wmap)
    sidecar = _quant_sidecar(directory)
    if sidecar and quantize is not None:
        raise ValueError(f"{directory} is already quantized ({QUANT_FILE}); load it without "
                         "quantize=")
    slots, reads = _plan(directory, cfg, headers, sidecar)

    # -- the final params, as shapes: float, quantized as read, or as stored ---------------
    abstract_float = cfg.param_shapes()
    module = Llama(cfg)
    qpass = method = None
    target = abstract_float
    if quantize is not None:
        qpass = quantize_pass(quantize)
        method = qpass.method
        target = qpass(Model(params=abstract_float, module=module, spec=cfg)).params
    elif sidecar:
        target = _stored_abstract(abstract_float, slots, headers, reads, cfg, dtype)
    if shard is not None:
        target = _shard_target(shard, Model(params=target, module=module, spec=cfg))
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        target, is_leaf=lambda x: isinstance(x, QArray))
    by_path = {_path_str(p): x for p, x in flat}

    # -- allocate (the final model's bytes), then fill tensor by tensor --------------------
    wanted_bufs = []  # (path, array name or None, shapes)
    for s in slots:
        t = by_path[s.path]
        if isinstance(t, QArray):  # unlayered quantized kernels are placed whole
            wanted_bufs += [(s.path, k, a) for k, a in t.arrays.items() if s.layered]
        else:
            wanted_bufs.append((s.path, None, t))
    values: dict = {s.path: {} for s in slots if isinstance(by_path[s.path], QArray)}
    for (path, key, _), buf in zip(wanted_bufs, _zeros_all([b[2] for b in wanted_bufs])):
        if key is None:
            values[path] = buf
        else:
            values[path][key] = buf
    quantizers: dict = {}

    from safetensors import safe_open
    by_file: dict = {}
    for raw, (s, layer, arr, h) in reads.items():
        by_file.setdefault(h.file, []).append(raw)
    for f in files:
        if f not in by_file:
            continue
        with safe_open(os.path.join(directory, f), framework="numpy", backend="pread") as fh:
            for raw in by_file[f]:
                s, layer, arr, h = reads[raw]
                t = by_path[s.path]
                w = fh.get_tensor(raw)
                if arr is not None:  # a stored quantized array
                    w = _stored_view(w, s.quant["arrays"][arr])
                    _put_array(values[s.path], arr, w, layer, t.arrays[arr], s.layered)
                    del w
                elif isinstance(t, QArray):  # quantize as read
                    # the float kernel on the device (chunk by chunk), then the file's
                    # copy is freed before quantizing: two tensors at once, never three
                    scratch = _zeros(jax.ShapeDtypeStruct(s.slice_shape(), jnp.dtype(dtype)))
                    scratch = _copy_rows(scratch, w, None, s.transposed, False, None)
                    del w
                    _release()
                    if s.layered:
                        outs = {k: _sharding_of(a) for k, a in t.arrays.items()}
                        key = (True, tuple(sorted(outs.items())) if shard is not None else None)
                        if key not in quantizers:
                            quantizers[key] = _quantizer(method, True, key[1] and outs)
                        values[s.path], finite = quantizers[key](values[s.path], scratch,
                                                                 np.int32(layer))
                    else:
                        if (False, None) not in quantizers:
                            quantizers[(False, None)] = _quantizer(method, False)
                        arrays, finite = quantizers[(False, None)](scratch)
                        values[s.path] = {k: _placed(a, t.arrays[k]) for k, a in arrays.items()}
                    del scratch
                    if not bool(finite):
                        raise ValueError(f"tensor {raw!r} in {h.file} holds NaN or Inf; it "
                                         "cannot be quantized (the file is corrupt?)")
                else:
                    values[s.path] = _copy_rows(values[s.path], w, layer, s.transposed,
                                                s.layered, _sharding_of(t))
                    del w
                _release()
    leaves = []
    for p, t in flat:
        v = values[_path_str(p)]
        leaves.append(QArray(v, t.format, t.dtype) if isinstance(t, QArray) else v)
    params = jax.tree_util.tree_unflatten(treedef, leaves)

    extras = []
    if tok is not None:
        extras.append(("special_tokens", tuple(sorted(
            special_ids(tok, tok_config, read_json(os.path.join(directory, CONFIG_FILE),
                                                   "")).items()))))
        template = _chat_template(directory, tok_config)
        if template is not None:
            extras.append(("chat_template", template))
    model = Model(params=params, module=module, spec=cfg, tokenizer=tok,
                  extras=tuple(sorted(extras)))
    if qpass is not None or sidecar:
        from memlab.passes.quantize import dispatch_quantized
        history = ((qpass if qpass is not None else _stored_pass(slots, by_path), cfg),)
        model = model.replace(wrappers=(dispatch_quantized,), history=history)
    if shard is not None:
        model = shard(model)
    return model


def _quantizer(method, layered: bool, shardings: Optional[dict] = None):
    """One compiled step per kernel shape (compiled, its temporaries fuse instead of
    each op holding a tensor): a float kernel ``[in, out]`` checked finite and quantized
    by ``method``; ``layered``: written into layer ``layer`` of the stacked arrays, which
    are donated (and kept in ``shardings``, name -> sharding).  Returns (arrays, finite)."""
    def quantize(x):
        return method.quantize(x).arrays, jnp.all(jnp.isfinite(x))

    if not layered:
        return jax.jit(quantize)

    def write(bufs, x, layer):
        arrays, finite = quantize(x)
        return {k: jax.lax.dynamic_update_index_in_dim(b, arrays[k].astype(b.dtype), layer, 0)
                for k, b in bufs.items()}, finite
    if not shardings:
        return jax.jit(write, donate_argnums=0)
    mesh = next(iter(shardings.values())).mesh
    scalar = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(write, donate_argnums=0, out_shardings=(shardings, scalar))


def _placed(a, target):
    s = _sharding_of(target)
    return jax.device_put(a, s) if s is not None else a


def _put_array(store: dict, key: str, a, layer, target, layered: bool) -> None:
    """One layer's (or, unlayered, the whole) array of a quantized kernel into place."""
    s = _sharding_of(target)
    if layered:
        store[key] = _layer_writer(s)(store[key], a, np.int32(layer))
        store[key].block_until_ready()
    else:
        a = jnp.asarray(a, target.dtype)
        store[key] = jax.device_put(a, s) if s is not None else a


def _stored_view(w: np.ndarray, dtype_name: str) -> np.ndarray:
    """A stored quantized array in its dtype (float8 arrays are stored as uint8 bytes)."""
    dt = np.dtype(jnp.dtype(dtype_name))
    return w.view(dt) if w.dtype != dt and w.dtype.itemsize == dt.itemsize else w


def _stored_abstract(abstract, slots, headers, reads, cfg, dtype):
    """The abstract params of a keep_quantized checkpoint: QArrays of stored arrays."""
    from memlab.quant.qarray import QArray
    shapes: dict = {}
    for raw, (s, layer, arr, h) in reads.items():
        if arr is not None:
            shapes.setdefault(s.path, {})[arr] = h.shape
    out = {}
    for s in slots:
        if s.quant is None:
            continue
        fmt = format_from_json(s.quant["format"], QUANT_FILE)
        arrays = {k: jax.ShapeDtypeStruct(((cfg.n_layers,) if s.layered else ()) + tuple(v),
                                          jnp.dtype(s.quant["arrays"][k]))
                  for k, v in shapes[s.path].items()}
        out[s.path] = QArray(arrays, fmt, dtype)

    def swap(p, x):
        return out.get(_path_str(p), x)
    return jax.tree_util.tree_map_with_path(swap, abstract)


def _stored_pass(slots, by_path):
    """The quantize pass that produces what a keep_quantized checkpoint stores (for the
    model's history, which memory estimates replay): one rule per kernel."""
    from memlab import passes
    from memlab.quant.qarray import QArray
    rules, first = {}, None
    for s in slots:
        if not s.path.endswith("/kernel"):
            continue
        t = by_path[s.path]
        fmt = t.format if isinstance(t, QArray) else None
        first = first or fmt
        rules["^" + re.escape(s.path) + "$"] = fmt
    return passes.quantize(first, rules=rules)


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------
def _parse_size(size) -> int:
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a byte count or a string like '2GB', "
                         f"got {size!r}")
    if isinstance(size, int):
        n = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size={size!r}: write a byte count like '500MB', '2GB' "
                             "or '1GiB'")
        unit = (m.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
        n = int(float(m.group(1)) * base ** power)
    else:
        raise ValueError(f"max_shard_size must be a byte count or a string like '2GB', "
                         f"got {size!r}")
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _host(x) -> np.ndarray:
    a = np.asarray(jax.device_get(x))
    return a if a.flags.c_contiguous else a.copy()  # (ascontiguousarray makes 0-d 1-d)


def _save_tensors(model, keep_quantized: bool) -> Iterator[tuple]:
    """(HF name, numpy array) in checkpoint order, one layer slice at a time, and the
    sidecar entries of the quantized kernels kept as such."""
    from memlab.quant.qarray import QArray

    cfg = model.spec
    names = tensor_names(cfg)
    flat = jax.tree_util.tree_flatten_with_path(model.params,
                                                is_leaf=lambda x: isinstance(x, QArray))[0]
    leaves = {_path_str(p): x for p, x in flat}
    extra = sorted(set(leaves) - set(names))
    lacking = sorted(set(names) - set(leaves))
    if extra or lacking:
        raise ValueError(f"save: the model's params do not match its config {cfg.name}: "
                         f"unexpected {extra[:3]}, missing {lacking[:3]}")
    sidecar = {}

    def emit(path, layer):
        hf, layered, transposed = names[path]
        name = hf.format(i=layer) if layered else hf
        x = leaves[path]
        if isinstance(x, QArray):
            arrays = {k: (v[layer] if layered else v) for k, v in x.arrays.items()}
            if keep_quantized:
                for k in sorted(arrays):
                    a = _host(arrays[k])
                    if a.dtype not in (np.float32, np.float16, ml_dtypes.bfloat16, np.float64,
                                       np.int8, np.uint8, np.int16, np.int32, np.int64):
                        a = a.view(np.uint8)  # float8 and friends: their bytes
                    yield f"{name}.{k}", a
                return
            x = QArray(arrays, x.format, x.dtype).dequantize()
        elif layered:
            x = x[layer]
        a = _host(x)
        yield name, (a.T.copy() if transposed and a.ndim == 2 else a)

    for path, x in leaves.items():
        if isinstance(x, QArray) and keep_quantized:
            sidecar[path] = {"format": format_to_json(x.format), "dtype": x.dtype.name,
                             "arrays": {k: jnp.dtype(v.dtype).name
                                        for k, v in sorted(x.arrays.items())}}
    order = [p for p in names if not names[p][1] and p.startswith("embed")]
    layer_paths = [p for p in names if names[p][1]]
    tail = [p for p in names if not names[p][1] and not p.startswith("embed")]

    def gen():
        for p in order:
            yield from emit(p, None)
        for i in range(cfg.n_layers):
            for p in layer_paths:
                yield from emit(p, i)
        for p in tail:
            yield from emit(p, None)
    return gen(), sidecar


_OWN_FILES = re.compile(r"^(model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|"
                        r"model\.safetensors\.index\.json|config\.json|memlab_quantization\.json|"
                        r"tokenizer\.json|tokenizer_config\.json|\.memlab-shard-\d+\.tmp)$")


def save(model, directory: str | os.PathLike, max_shard_size="5GB",
         keep_quantized: bool = False, overwrite: bool = False) -> str:
    """Write ``model`` as a Hugging Face checkpoint directory; returns its path.

    ``max_shard_size`` (bytes, or ``"500MB"`` / ``"2GiB"``): above it the tensors are
    split into ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``
    (a tensor larger than the limit gets a shard of its own).  LoRA adapters are merged;
    quantized kernels are dequantized, or with ``keep_quantized=True`` stored as their
    arrays plus ``memlab_quantization.json`` (adapters are then merged into the base and
    requantized in its format).  An existing checkpoint in ``directory`` is an error
    unless ``overwrite=True``, which first removes the files a checkpoint consists of.
    """
    from safetensors.numpy import save_file

    from memlab.model import Model
    if not isinstance(model, Model) or not isinstance(model.spec, LlamaConfig):
        raise TypeError(f"save expects a memlab.Model of the Llama-family decoder (spec a "
                        f"LlamaConfig), got {type(model).__name__} with spec "
                        f"{type(getattr(model, 'spec', None)).__name__}")
    if model.abstract:
        raise ValueError("save: the model is abstract (shapes only, no weights); load or init "
                         "real weights first")
    limit = _parse_size(max_shard_size)
    if model.extra("lora") is not None:
        from memlab.passes.lora import merge_lora
        model = merge_lora(model, requantize=keep_quantized)
    hf_config = config_to_hf(model.spec)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    existing = [f for f in os.listdir(directory) if _OWN_FILES.match(f)]
    if existing and not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint ({sorted(existing)[:4]}); "
                              "pass overwrite=True to replace it, or choose an empty directory")
    for f in existing:
        os.remove(os.path.join(directory, f))

    tensors, sidecar = _save_tensors(model, keep_quantized)
    shards, current, size, total = [], {}, 0, 0
    weight_map: dict = {}

    def flush():
        nonlocal current, size
        if current:
            tmp = os.path.join(directory, f".memlab-shard-{len(shards)}.tmp")
            save_file(current, tmp, metadata={"format": "pt"})
            shards.append((tmp, list(current)))
            current, size = {}, 0

    for name, a in tensors:
        if current and size + a.nbytes > limit:
            flush()
        current[name] = a
        size += a.nbytes
        total += a.nbytes
    flush()
    n = len(shards)
    for k, (tmp, names) in enumerate(shards):
        final = SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, os.path.join(directory, final))
        weight_map.update({t: final for t in names})
    if n > 1:
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if sidecar:
        with open(os.path.join(directory, QUANT_FILE), "w") as f:
            json.dump({"format_version": QUANT_FORMAT_VERSION, "kernels": sidecar}, f, indent=2)
    if model.tokenizer is not None:
        _save_tokenizer(model, directory, hf_config)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)
    return directory


def _save_tokenizer(model, directory: str, hf_config: dict) -> None:
    tok = model.tokenizer
    if not hasattr(tok, "save") or not hasattr(tok, "id_to_token"):
        raise TypeError(f"save: model.tokenizer is a {type(tok).__name__}; memlab writes "
                        "tokenizers.Tokenizer objects (tokenizer.json)")
    tok.save(os.path.join(directory, TOKENIZER_FILE))
    special = dict(model.extra("special_tokens", ()))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast",
          "model_max_length": model.spec.max_seq_len}
    for key, tok_key, id_key in (("bos", "bos_token", "bos_token_id"),
                                 ("eos", "eos_token", "eos_token_id"),
                                 ("unknown", "unk_token", None),
                                 ("padding", "pad_token", "pad_token_id")):
        if key in special:
            tc[tok_key] = tok.id_to_token(special[key])
            if id_key is not None:
                hf_config[id_key] = special[key]
    template = model.extra("chat_template")
    if template is not None:
        tc["chat_template"] = template
    with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w") as f:
        json.dump(tc, f, indent=2)
