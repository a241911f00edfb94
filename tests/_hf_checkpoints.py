"""Tiny random Hugging Face-format checkpoints of the six decoder families, for tests.

``tiny_config(family, **overrides)`` is a complete ``config.json`` dict with tiny sizes;
``random_weights(config, seed)`` the tensors under their exact HF names and shapes
(``[out, in]`` Linear weights; norm weights random around their neutral value: 1 for
``w``-scaled norms, 0 for Gemma's ``(1 + w)`` norms; biases nonzero);
``write_checkpoint(directory, config, weights, shards, dtype)`` lays them out as a
``save_pretrained`` directory: ``config.json``, safetensors shards
``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json`` (or one
``model.safetensors``), a word-level ``tokenizer.json`` over the whole vocabulary and a
``tokenizer_config.json``.

Shards are written with ``safetensors.numpy`` (``__metadata__`` ``{"format": "pt"}`` as
``save_pretrained`` writes it); ``BF16`` tensors come from ``ml_dtypes.bfloat16`` arrays.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Mapping

import numpy as np

import _hf_reference as ref

# Token ids of the specials in every tiny tokenizer (config.json repeats them).
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}

_LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=192, hidden_size=64,
    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
    attention_bias=False, mlp_bias=False, bos_token_id=BOS, eos_token_id=EOS)

TINY = {
    # Llama 2 style: untied (family default: tie_word_embeddings absent), plain RoPE
    "llama": dict(_LLAMA),
    # Llama 3.1/3.2 style: llama3 frequency bands, tied; with head_dim 16 and base 1e4 the
    # three bands (kept, interpolated, divided by factor) all hold frequencies
    "llama3": dict(_LLAMA, rope_theta=10000.0, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}),
    # linear position interpolation, in the older spelling {"type": ...}
    "llama-linear": dict(_LLAMA, max_position_embeddings=1024,
                         rope_scaling={"type": "linear", "factor": 4.0}),
    # dynamic NTK: max_position_embeddings is below the test length, so the base grows
    "llama-dynamic": dict(_LLAMA, max_position_embeddings=8,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    # every layer sliding, window shorter than the test sequence
    "mistral": dict(_LLAMA, architectures=["MistralForCausalLM"], model_type="mistral",
                    sliding_window=5, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                    max_position_embeddings=512),
    # q/k/v biases, tied, sliding window present but off (as in the released models)
    "qwen2": dict(_LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  use_sliding_window=False, sliding_window=64, max_window_layers=2),
    # q/k norms, head_dim 32 != hidden / heads = 16
    "qwen3": dict(_LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  use_sliding_window=False, sliding_window=None, max_window_layers=2),
    # 3 layers: sliding, global, sliding; both soft-caps in their nonlinear range;
    # query_pre_attn_scalar != head_dim; tie_word_embeddings absent (Gemma default: tied)
    "gemma2": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=160,
                   hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                   max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                   query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=2.0,
                   final_logit_softcapping=6.0, attention_bias=False, bos_token_id=BOS,
                   eos_token_id=EOS, pad_token_id=PAD),
    # 4 layers with sliding_window_pattern 3: sliding, sliding, global, sliding; q/k norms;
    # local RoPE base 1e4 on sliding layers, 1e6 on global ones
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                   vocab_size=160, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   hidden_activation="gelu_pytorch_tanh", max_position_embeddings=512,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                   query_pre_attn_scalar=16, sliding_window=5, sliding_window_pattern=3,
                   final_logit_softcapping=None, attn_logit_softcapping=None, rope_scaling=None,
                   attention_bias=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD),
}
# Gemma 3 4B+ style: linear RoPE scaling on the global layers only, explicit layer_types
TINY["gemma3-linear"] = dict(
    TINY["gemma3"], rope_scaling={"rope_type": "linear", "factor": 8.0},
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"])

ARCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def tiny_config(family: str, **overrides) -> dict:
    """A complete tiny ``config.json`` dict of ``family`` (one of ``TINY``), with overrides
    (an override of ``None`` writes an explicit null)."""
    if family not in TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(TINY)}")
    cfg = copy.deepcopy(TINY[family])
    cfg.update(copy.deepcopy(overrides))
    ref.family(cfg)  # a clear error for a bad model_type override
    return cfg


def weight_shapes(config: Mapping) -> dict:
    """HF tensor name -> shape, in the order ``save_pretrained`` lists a causal LM."""
    fam = ref.family(config)
    d, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    nh, nkv, hd = config["num_attention_heads"], ref.kv_heads(config), ref.head_dim(config)
    gemma = fam in ref.GEMMA
    o_bias = fam not in ("mistral", "qwen2") and bool(config.get("attention_bias", False))
    qkv_bias = fam == "qwen2" or o_bias
    mlp_bias = fam == "llama" and bool(config.get("mlp_bias", False))
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        for name, out in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (out, d)
            if qkv_bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (d, nh * hd)
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if fam in ("qwen3", "gemma3"):
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if gemma:
            shapes[p + "pre_feedforward_layernorm.weight"] = (d,)
            shapes[p + "post_feedforward_layernorm.weight"] = (d,)
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            shapes[p + f"mlp.{name}_proj.weight"] = shape
            if mlp_bias:
                shapes[p + f"mlp.{name}_proj.bias"] = (shape[0],)
    shapes["model.norm.weight"] = (d,)
    if not ref.tied(config):
        shapes["lm_head.weight"] = (v, d)
    return shapes


def random_weights(config: Mapping, seed: int) -> dict:
    """float32 random tensors for every HF name of ``config`` (``weight_shapes``).

    Linear weights ~ N(0, 1/in) so activations stay O(1); embeddings ~ N(0, 1); norm
    weights 1 + N(0, 0.2) (Gemma: N(0, 0.2), applied as 1 + w); biases ~ N(0, 0.2).
    """
    rng = np.random.default_rng(seed)
    gemma = ref.family(config) in ref.GEMMA
    out = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight"):
            w = rng.normal(0.0, 0.2, shape) + (0.0 if gemma else 1.0)
        elif name.endswith(".bias"):
            w = rng.normal(0.0, 0.2, shape)
        elif name == "model.embed_tokens.weight":
            w = rng.normal(0.0, 1.0, shape)
        else:
            w = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        out[name] = w.astype(np.float32)
    return out


def as_stored(weights: Mapping, dtype: str) -> dict:
    """The tensors as ``write_checkpoint`` stores them (bf16-rounded for ``bfloat16``)."""
    if dtype == "float32":
        return {k: np.asarray(v, np.float32) for k, v in weights.items()}
    if dtype == "bfloat16":
        import ml_dtypes

        return {k: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")


def _save_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(dict(tensors), path, metadata={"format": "pt"})


def _tokenizer_files(directory: str, config: Mapping) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for tok, i in SPECIALS.items()}
    for i in range(len(SPECIALS), config["vocab_size"]):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    tok.save(os.path.join(directory, "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": config.get("max_position_embeddings", 2048),
        "chat_template": ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"),
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump(tok_cfg, fh, indent=2)


def write_checkpoint(directory, config: Mapping, weights: Mapping[str, np.ndarray],
                     shards: int = 2, dtype: str = "float32") -> str:
    """Write a ``save_pretrained``-style directory and return its path.

    ``shards`` > 1 splits the tensors (in order, balanced by bytes) over
    ``model-{k:05d}-of-{shards:05d}.safetensors`` with ``model.safetensors.index.json``;
    ``shards=1`` writes one ``model.safetensors``.  ``dtype`` is ``float32`` or
    ``bfloat16`` (config.json's ``torch_dtype`` says which).
    """
    directory = os.fspath(directory)
    stored = as_stored(weights, dtype)
    if not isinstance(shards, int) or not 1 <= shards <= len(stored):
        raise ValueError(f"shards must be an int in [1, {len(stored)}], got {shards!r}")
    os.makedirs(directory, exist_ok=True)
    cfg = dict(config, torch_dtype=dtype)
    cfg.setdefault("architectures", [ARCH_CLASSES[ref.family(config)]])
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    _tokenizer_files(directory, config)
    if shards == 1:
        _save_safetensors(os.path.join(directory, "model.safetensors"), stored)
        return directory
    names = list(stored)
    sizes = np.cumsum([stored[n].nbytes for n in names])
    total = int(sizes[-1])
    # contiguous groups balanced by bytes, each holding at least one tensor
    bounds = [0]
    for k in range(1, shards):
        cut = int(np.searchsorted(sizes, total * k / shards)) + 1
        bounds.append(min(max(cut, bounds[-1] + 1), len(names) - (shards - k)))
    bounds.append(len(names))
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: stored[n] for n in names[bounds[k]:bounds[k + 1]]}
        _save_safetensors(os.path.join(directory, fname), part)
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return directory
