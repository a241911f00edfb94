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
