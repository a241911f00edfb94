"""Perplexity of a causal LM on token windows (teacher forcing, exact token counts)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memlab.model import Model


@jax.jit
def _window_nll(model: Model, windows):
    logits = model(windows[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
    return nll.sum(axis=-1)  # per window


def perplexity(model: Model, windows: np.ndarray, batch_size: int = 4,
               progress: bool = False) -> dict:
    """``exp(mean NLL)`` over every target token of ``windows`` ([n, T+1] int)."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"perplexity: windows must be [n, seq+1] with seq >= 1, got {windows.shape}")
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="perplexity", unit="batch", leave=False)
    total, count = 0.0, 0
    for s in starts:
        chunk = windows[s:s + batch_size]
        n = len(chunk)
        if n < batch_size:  # keep one compiled shape: pad with copies, score only real rows
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        sums = _window_nll(model, jnp.asarray(chunk, jnp.int32))
        total += float(np.asarray(sums[:n], np.float64).sum())
        chunk = chunk[:n]
        count += chunk.shape[0] * (chunk.shape[1] - 1)
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}


@jax.jit
def _decode_nll(model: Model, windows, prefix_len):
    """Prefill ``windows[:, :prefix]`` (static prefix via shapes), then feed the true
    tokens one at a time through the model's cache, scoring each next token."""
    from memlab.generate import make_cache
    b, n = windows.shape
    p = prefix_len.shape[0]
    cache = make_cache(model, b, n)
    prompt = windows[:, :p]
    logits, cache = model(prompt, cache=cache, n_new=jnp.full((b,), p, jnp.int32))
    first = optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], windows[:, p])

    def step(cache, t):
        tok = jax.lax.dynamic_index_in_dim(windows, t, 1, keepdims=True)
        nxt = jax.lax.dynamic_index_in_dim(windows, t + 1, 1, keepdims=False)
        lg, cache = model(tok, cache=cache, last_only=True)
        return cache, optax.softmax_cross_entropy_with_integer_labels(lg[:, 0], nxt)

    _, nll = jax.lax.scan(step, cache, jnp.arange(p, n - 1))
    return first + nll.sum(axis=0)     # per window: tokens p .. n-1 scored


def decode_perplexity(model: Model, windows: np.ndarray, prefix: int, batch_size: int = 4,
                      progress: bool = False) -> dict:
    """Perplexity of tokens ``prefix .. T`` of each window, predicted by teacher-forced
    *decoding*: the first ``prefix`` tokens are prefilled, every later token is fed
    through the model's KV cache one step at a time -- so a compressed cache (the
    ``kv_compress`` pass) is what the predictions read.  With the dense cache this
    equals :func:`perplexity` on the same targets."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or not 1 <= prefix < windows.shape[1] - 1:
        raise ValueError(f"decode_perplexity: need windows [n, T+1] and 1 <= prefix < T; got "
                         f"shape {windows.shape}, prefix={prefix}")
    starts = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="decode-perplexity", unit="batch", leave=False)
    total, count = 0.0, 0
    marker = jnp.zeros((prefix,), jnp.int8)          # carries the static prefix length
    for s in starts:
        chunk = windows[s:s + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        sums = _decode_nll(model, jnp.asarray(chunk, jnp.int32), marker)
        total += float(np.asarray(sums[:n], np.float64).sum())
        count += n * (windows.shape[1] - prefix)
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "prefix": prefix}
