"""Batched generation with a static-shape KV cache: prefill, then one jitted
decode step per token (greedy or temperature sampling), with stop tokens.

Prompts of different lengths are right-padded; each row keeps its own length in
the cache, so padding is overwritten by that row's next token and never attended.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memlab.model import Model
from memlab.models.llama import KVCache


@jax.jit
def _prefill(model: Model, tokens, lengths, cache):
    logits, cache = model(tokens, cache=cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, cache._replace(lengths=lengths)


@jax.jit
def _decode(model: Model, token, cache):
    logits, cache = model(token[:, None], cache=cache, last_only=True)
    return logits[:, 0], cache


def _choose(logits, key, temperature: float):
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def generate_ids(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 *, temperature: float = 0.0, stop_tokens: Iterable[int] = (),
                 seed: int = 0, cache_len: Optional[int] = None,
                 progress: bool = False) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` after each prompt (lists of token ids).

    Returns the new tokens per row, cut after the first stop token (included).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    spec = model.spec
    lengths = np.array([len(p) for p in prompts], np.int32)
    need = int(lengths.max()) + max_new_tokens
    cache_len = cache_len or need
    if cache_len < need:
        raise ValueError(f"generate: cache_len={cache_len} is shorter than the longest prompt "
                         f"({lengths.max()}) plus max_new_tokens ({max_new_tokens}) = {need}")
    if need > spec.max_seq_len:
        raise ValueError(f"generate: {need} tokens exceed the model's context of "
                         f"{spec.max_seq_len}; shorten the prompt or max_new_tokens")
    batch = len(prompts)
    tokens = np.zeros((batch, int(lengths.max())), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache = KVCache.zeros(spec, batch, cache_len)
    logits, cache = _prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    stop = set(int(s) for s in stop_tokens)
    key = jax.random.key(seed)
    out = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    steps = range(max_new_tokens)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="generate", unit="tok", leave=False)
    for _ in steps:
        key, sub = jax.random.split(key)
        nxt = _choose(logits, sub, temperature)
        host = np.asarray(nxt)
        for i in range(batch):
            if not done[i]:
                out[i].append(int(host[i]))
                done[i] = host[i] in stop
        if done.all():
            break
        logits, cache = _decode(model, nxt, cache)
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
