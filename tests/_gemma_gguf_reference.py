"""Gemma 3 text decoder in float64 numpy, straight from a GGUF file's raw tensors.

Independent of memlab's reader and model: it applies llama.cpp's stored convention
directly (every ``*norm.weight`` is the multiplier ``m`` of ``x / rms(x) * m``, i.e.
Gemma's ``1 + w`` already folded in; matrices are ``(out, in)``, so ``x @ W.T``; Q/K
rows in Hugging Face's half-split layout), and the architecture as Hugging Face's
``modeling_gemma3.py`` defines it:

    x = embed[tokens] * sqrt(d_model)
    per layer:  h = attn(rms(x) * m_attn);  x = x + rms(h) * m_post_attn
                h = mlp(rms(x) * m_ffn);    x = x + rms(h) * m_post_ffw
    attn: q, k = rms_head(q) * m_q, rms_head(k) * m_k, then RoPE (base 10,000 on
          sliding layers, the file's base on global ones; layer i is global when
          (i + 1) % 6 == 0), scores * head_dim ** -0.5, causal, sliding layers see keys
          in (p - window, p]; one KV head shared by all query heads (GQA)
    mlp:  down(gelu_tanh(gate(h)) * up(h))
    logits = (rms(x) * m_out) @ embed.T           (tied embeddings)

Used by ``tests/test_gguf_archs.py`` (a short greedy continuation) and meant for a
logits comparison against memlab's decoder.  Keep token counts small: numpy is slow.
"""
from __future__ import annotations

import math

import numpy as np

_CHUNK = 16384  # vocabulary rows per block of the tied head


class GemmaReference:
    """Weights of a ``gemma3`` GGUF file, dequantized lazily to float32 and used in float64."""

    def __init__(self, reader):
        import gguf

        self._gguf = gguf
        f = lambda k: reader.fields[k].contents()  # noqa: E731
        if f("general.architecture") != "gemma3":
            raise ValueError("GemmaReference reads gemma3 files only")
        self.d = int(f("gemma3.embedding_length"))
        self.n_layers = int(f("gemma3.block_count"))
        self.n_heads = int(f("gemma3.attention.head_count"))
        self.n_kv = int(f("gemma3.attention.head_count_kv"))
        self.hd = int(f("gemma3.attention.key_length"))
        self.eps = float(f("gemma3.attention.layer_norm_rms_epsilon"))
        self.theta_global = float(f("gemma3.rope.freq_base"))
        self.theta_local = 10000.0
        self.window = int(f("gemma3.attention.sliding_window"))
        self.tensors = {t.name: t for t in reader.tensors}
        self._cache: dict = {}

    def w(self, name: str) -> np.ndarray:
        """A tensor as float32 in (out, in) order, cached."""
        if name not in self._cache:
            t = self.tensors[name]
            a = self._gguf.quants.dequantize(t.data, t.tensor_type)
            self._cache[name] = np.asarray(a, np.float32).reshape(
                tuple(int(s) for s in reversed(t.shape)))
        return self._cache[name]

    def embed_rows(self, ids) -> np.ndarray:
        t = self.tensors["token_embd.weight"]
        rows = self._gguf.quants.dequantize(np.asarray(t.data)[np.asarray(ids)], t.tensor_type)
        return np.asarray(rows, np.float64).reshape(len(ids), self.d)

    def rms(self, x, m):
        x = np.asarray(x, np.float64)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * np.float64(1.0) * m

    def rope(self, x, theta):
        """x [T, H, D], positions 0..T-1, half-split (rotate_half) layout."""
        t, _, d = x.shape
        inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def hidden(self, tokens) -> np.ndarray:
        """Final-norm hidden states [T, d] for one sequence of token ids."""
        T = len(tokens)
        x = self.embed_rows(tokens) * math.sqrt(self.d)
        pos = np.arange(T)
        causal = pos[None, :] <= pos[:, None]
        local = causal & (pos[None, :] > pos[:, None] - self.window)
        group = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}."
            W = lambda n: self.w(p + n).astype(np.float64)  # noqa: E731
            sliding = (i + 1) % 6 != 0
            h = self.rms(x, W("attn_norm.weight"))
            q = (h @ W("attn_q.weight").T).reshape(T, self.n_heads, self.hd)
            k = (h @ W("attn_k.weight").T).reshape(T, self.n_kv, self.hd)
            v = (h @ W("attn_v.weight").T).reshape(T, self.n_kv, self.hd)
            q, k = self.rms(q, W("attn_q_norm.weight")), self.rms(k, W("attn_k_norm.weight"))
            theta = self.theta_local if sliding else self.theta_global
            q, k = self.rope(q, theta), self.rope(k, theta)
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) * self.hd ** -0.5
            s = np.where((local if sliding else causal)[None], s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            a = s / s.sum(-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", a, v).reshape(T, self.n_heads * self.hd)
            x = x + self.rms(o @ W("attn_output.weight").T, W("post_attention_norm.weight"))
            h = self.rms(x, W("ffn_norm.weight"))
            g = h @ W("ffn_gate.weight").T
            g = 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
            m = (g * (h @ W("ffn_up.weight").T)) @ W("ffn_down.weight").T
            x = x + self.rms(m, W("post_ffw_norm.weight"))
        return self.rms(x, self.w("output_norm.weight").astype(np.float64))

    def logits(self, tokens, last_only: bool = False) -> np.ndarray:
        """[T, vocab] float64 logits (``last_only``: [1, vocab]), the tied head in blocks."""
        x = self.hidden(tokens)
        if last_only:
            x = x[-1:]
        t = self.tensors["token_embd.weight"]
        data = np.asarray(t.data)
        out = []
        for s in range(0, data.shape[0], _CHUNK):
            e = self._gguf.quants.dequantize(data[s:s + _CHUNK], t.tensor_type)
            out.append(x @ np.asarray(e, np.float64).reshape(-1, self.d).T)
        return np.concatenate(out, axis=-1)

    def greedy(self, tokens, n: int) -> list:
        """``n`` greedy next tokens (a full forward per step)."""
        tokens = list(tokens)
        new = []
        for _ in range(n):
            nxt = int(np.argmax(self.logits(tokens, last_only=True)[0]))
            new.append(nxt)
            tokens.append(nxt)
        return new
