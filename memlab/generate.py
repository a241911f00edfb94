"""Batched generation: one jitted prefill, then one jitted decode-and-sample step per token.

Shapes are static: the cache (dense ``KVCache`` or, after the ``kv_compress``
pass, a :class:`memlab.kv.PolicyCache`) is allocated once for
``max(prompt) + max_new_tokens`` positions; prompts of different lengths are
right-padded and each row keeps its own length, so padding is never attended.

Sampling: greedy (``temperature=0``), temperature, and nucleus (``top_p < 1``,
Holtzman et al. 2019) -- chosen per call without recompiling (they are traced
values).  Stop tokens end a row (its later steps still run, the batch is
static, but their tokens are discarded); all rows stopping ends the loop.

``stream(...)`` yields each step's new tokens as they are produced;
``generate_ids`` and ``generate`` collect them.  ``progress=True`` shows a tqdm bar.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memlab.kv.base import PolicyCache, make_cache
from memlab.model import Model


@jax.jit
def _prefill(model: Model, tokens, lengths, cache):
    if isinstance(cache, PolicyCache):
        logits, cache = model(tokens, cache=cache, n_new=lengths)
    else:
        logits, cache = model(tokens, cache=cache)
        cache = cache._replace(lengths=lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, cache


def sample(logits, key, temperature, top_p):
    """Next tokens ``[B]`` from ``logits [B, V]``: greedy when ``temperature <= 0``,
    else softmax(logits / temperature) restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (the highest-probability token is always kept)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of strictly better tokens
    keep = before < top_p
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature <= 0, greedy, sampled)


@jax.jit
def _step(model: Model, logits, cache, key, temperature, top_p):
    """Sample from ``logits``, then run that token through the model."""
    nxt = sample(logits, key, temperature, top_p)
    new_logits, cache = model(nxt[:, None], cache=cache, last_only=True)
    return nxt, new_logits[:, 0], cache


def _check(model, prompts, max_new_tokens, temperature, top_p, cache_len):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    need = int(lengths.max()) + max_new_tokens
    cache_len = cache_len or need
    if cache_len < need:
        raise ValueError(f"generate: cache_len={cache_len} is shorter than the longest prompt "
                         f"({lengths.max()}) plus max_new_tokens ({max_new_tokens}) = {need}")
    if need > model.spec.max_seq_len:
        raise ValueError(f"generate: {need} tokens exceed the model's context of "
                         f"{model.spec.max_seq_len}; shorten the prompt or max_new_tokens")
    return lengths, cache_len


def stream(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
           temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Iterable[int] = (),
           seed: int = 0, cache_len: Optional[int] = None,
           progress: bool = False) -> Iterator[list[Optional[int]]]:
    """Yield, per step, each row's new token (``None`` for rows already stopped)."""
    lengths, cache_len = _check(model, prompts, max_new_tokens, temperature, top_p, cache_len)
    batch = len(prompts)
    tokens = np.zeros((batch, int(lengths.max())), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache = make_cache(model, batch, cache_len)
    logits, cache = _prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    stop = set(int(s) for s in stop_tokens)
    key = jax.random.key(seed)
    done = np.zeros(batch, bool)
    steps = range(max_new_tokens)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="generate", unit="tok", leave=False)
    temp, nucleus = jnp.float32(temperature), jnp.float32(top_p)
    for _ in steps:
        key, sub = jax.random.split(key)
        nxt, logits, cache = _step(model, logits, cache, sub, temp, nucleus)
        host = np.asarray(nxt)
        row = [None if done[i] else int(host[i]) for i in range(batch)]
        done |= np.array([t is not None and t in stop for t in row])
        yield row
        if done.all():
            break


def generate_ids(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 **kwargs) -> list[list[int]]:
    """Up to ``max_new_tokens`` new tokens per prompt, cut after the first stop token (kept).

    Keyword arguments as :func:`stream`.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for row in stream(model, prompts, max_new_tokens, **kwargs):
        for i, t in enumerate(row):
            if t is not None:
                out[i].append(t)
    return out


def generate(model: Model, prompts: str | Sequence[str], max_new_tokens: int = 32,
             **kwargs) -> str | list[str]:
    """Text in, text out, with the model's own tokenizer."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("generate: this model has no tokenizer; use generate_ids with token ids")
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    special = dict(dict(model.extras).get("special_tokens", ()))
    kwargs.setdefault("stop_tokens", [special["eos"]] if "eos" in special else [])
    ids = [tok.encode(t).ids for t in texts]
    new = generate_ids(model, ids, max_new_tokens, **kwargs)
    decoded = [tok.decode(n, skip_special_tokens=True) for n in new]
    return decoded[0] if single else decoded
