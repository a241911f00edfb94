"""Batched generation: one jitted prefill, then a device-side decode loop.

Shapes are static: the cache (a :class:`memlab.cache.PolicyCache` under the model's
``kv_compress`` policy, the uncompressed ``Dense`` policy by default, built by
:func:`make_cache`) is allocated once for
``max(prompt) + max_new_tokens`` positions; prompts of different lengths are
right-padded and each row keeps its own length, so padding is never attended.

The engine has two jitted parts:

* :func:`prefill` runs the prompts into the cache and returns each row's next-token
  logits (only each row's last real token reaches the head: no ``[B, T, V]`` logits);
* :func:`decode_chunks` samples and feeds tokens in chunks: one call runs up to
  ``chunk`` steps in a ``lax.while_loop`` on the device (sample, model step, stop
  check) with the cache donated, so it is updated in place, and ends early once every
  row has stopped.  The host sees one transfer per chunk, not one per token.  Every
  KV policy that is not paged (dense, quantized, evicting, low-rank) runs this loop.

Sampling: greedy (``temperature=0``: an ``argmax``, no sort), temperature, and nucleus
(``top_p < 1``, Holtzman et al. 2019: only then is the vocabulary sorted) -- chosen
per call without recompiling (they are traced values; ``lax.cond`` runs one branch).
Decode step ``i`` draws with ``fold_in(key(seed), i)``.  Stop tokens end a row (its
later steps still run, the batch is static, but their tokens are discarded); all rows
stopping ends the loop.

``stream(...)`` yields each step's new tokens, a chunk at a time as each chunk ends;
``generate_ids`` and ``generate`` collect them.  ``progress=True`` shows a tqdm bar.

With the ``paged`` KV policy (PagedAttention, Kwon et al. 2023) the engine drives a
host :class:`memlab.kv.paged.BlockAllocator` between the jitted steps: prompts that
share a prefix with an earlier row share its pages (``share_prefix``), pages are
allocated as rows grow and freed when a row stops, a row writing into a shared,
partly filled page gets a copy first (copy-on-write).  It runs the same device loop,
a chunk at a time: before each chunk every live row gets pages for the chunk's tokens,
and the block tables ``[B, ceil(cache_len / page_size)]`` and copies ``[B, 2]`` go
with the loop (static shapes); a row that stops inside a chunk returns its pages when
the chunk ends.  ``chunk=1`` allocates token by token.  ``pages=PageLog()`` records
what it did.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memlab.cache import Dense, PolicyCache, init_cache
from memlab.model import Model

if TYPE_CHECKING:
    from memlab.kv.paged import PageStats

DEFAULT_CHUNK = 16   # decode steps per device loop: stream() yields after each


def make_cache(model, batch: int, max_len: int, lengths: int = 0) -> PolicyCache:
    """The empty cache ``model`` generates with: its ``kv_policy`` extra (set by the
    ``kv_compress`` pass), else :class:`memlab.cache.Dense`, for ``batch`` rows of
    ``max_len`` positions.  ``lengths`` pre-fills the per-row lengths (to profile a
    decode step at that cache length)."""
    policy = model.extra("kv_policy") if hasattr(model, "extra") else None
    cache = init_cache(policy or Dense(), model.spec, batch, max_len)
    return cache._replace(lengths=jnp.full((batch,), lengths, jnp.int32), fresh=not lengths)


@functools.partial(jax.jit, donate_argnums=3)
def _prefill(model: Model, tokens, lengths, cache):
    """Prompts into ``cache`` (donated): each row's next-token logits ``[B, V]`` and the cache."""
    logits, cache = model(tokens, cache=cache, n_new=lengths, last_only=True)
    return logits[:, 0], cache


def _nucleus(logits, key, temperature, top_p):
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of strictly better tokens
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample(logits, key, temperature, top_p):
    """Next tokens ``[B]`` from ``logits [B, V]``: greedy when ``temperature <= 0``,
    else softmax(logits / temperature) restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (the highest-probability token is always kept).
    Only the chosen method runs: greedy is an ``argmax``, ``top_p >= 1`` draws from the
    full softmax, and only ``top_p < 1`` sorts the vocabulary."""
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def full():
        scaled = logits / jnp.maximum(temperature, 1e-6)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def stochastic():
        return jax.lax.cond(top_p < 1, lambda: _nucleus(logits, key, temperature, top_p), full)
    return jax.lax.cond(temperature <= 0, greedy, stochastic)


@jax.jit
def _step(model: Model, logits, cache, key, temperature, top_p):
    """Sample from ``logits``, then run that token through the model: one decode step
    (what the device loop's body does), jitted alone for inspecting its compiled program."""
    nxt = sample(logits, key, temperature, top_p)
    new_logits, cache = model(nxt[:, None], cache=cache, last_only=True)
    return nxt, new_logits[:, 0], cache


def _loop(model: Model, logits, cache, key, step0, n, done, stops, temperature, top_p, chunk):
    """Up to ``n <= chunk`` decode steps in one ``while_loop``, ending once every row is
    done.  Returns ``(tokens [chunk, B], logits, cache, done, steps run)``; a token is
    ``-1`` where its row had stopped (or past the steps run)."""
    b = logits.shape[0]

    def cond(c):
        return (c[0] < n) & ~jnp.all(c[3])

    def body(c):
        i, logits, cache, done, toks = c
        nxt = sample(logits, jax.random.fold_in(key, step0 + i), temperature, top_p)
        toks = toks.at[i].set(jnp.where(done, -1, nxt))
        done = done | jnp.any(nxt[:, None] == stops[None, :], axis=-1)
        new_logits, cache = model(nxt[:, None], cache=cache, last_only=True)
        return i + 1, new_logits[:, 0].astype(logits.dtype), cache, done, toks

    init = (jnp.int32(0), logits, cache, done, jnp.full((chunk, b), -1, jnp.int32))
    i, logits, cache, done, toks = jax.lax.while_loop(cond, body, init)
    return toks, logits, cache, done, i


@functools.partial(jax.jit, static_argnames="chunk", donate_argnums=(1, 2))
def _decode_loop(model: Model, logits, cache, key, step0, n, done, stops, temperature, top_p,
                 *, chunk: int):
    """:func:`_loop` jitted, the logits and cache donated."""
    return _loop(model, logits, cache, key, step0, n, done, stops, temperature, top_p, chunk)


def prefill(model: Model, prompts, *, cache_len: Optional[int] = None, lengths=None):
    """Run ``prompts`` into a fresh cache: ``(logits [B, V], cache)``, each row's
    next-token logits and the cache holding the prompts.

    ``prompts``: a list of token lists (right-padded here) or an int array ``[B, T]``
    (``lengths``: each row's valid tokens, default ``T``).  ``cache_len``: the cache's
    positions (default ``T``), with room for the tokens :func:`decode` adds."""
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        tokens = np.asarray(prompts)
        if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype,
                                                                          np.integer):
            raise ValueError(f"prefill: prompts must be [batch, seq] integer token ids, got "
                             f"shape {tokens.shape} dtype {tokens.dtype}")
        tokens = tokens.astype(np.int32)
        lengths = (np.full((tokens.shape[0],), tokens.shape[1], np.int32) if lengths is None
                   else np.asarray(lengths, np.int32))
    else:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill: prompts must be a non-empty list of non-empty token lists")
        lengths = np.array([len(p) for p in prompts], np.int32)
        tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
    if lengths.shape != (tokens.shape[0],) or lengths.min() < 1 or \
            lengths.max() > tokens.shape[1]:
        raise ValueError(f"prefill: lengths must be [batch] ints in 1..{tokens.shape[1]}, got "
                         f"{lengths.tolist()}")
    cache_len = int(cache_len or tokens.shape[1])
    if cache_len < int(lengths.max()):
        raise ValueError(f"prefill: cache_len={cache_len} is shorter than the longest prompt "
                         f"({int(lengths.max())}); pass cache_len >= prompt + new tokens")
    batch = tokens.shape[0]
    shard = model.extra("shard")      # ml.passes.shard: the cache is allocated in its shards
    cache = (make_cache(model, batch, cache_len) if shard is None
             else shard.make_cache(model, batch, cache_len))
    return _prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), cache)


def decode_chunks(model: Model, logits, cache, steps: int, *, temperature: float = 0.0,
                  top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: int = 0,
                  chunk: int = DEFAULT_CHUNK) -> Iterator[np.ndarray]:
    """Decode up to ``steps`` tokens after :func:`prefill`, yielding ``[n, B]`` int arrays
    (``-1`` where a row had already stopped) as each device loop of up to ``chunk``
    steps ends; stops once every row has produced a stop token.  ``logits`` and
    ``cache`` are donated: use only what this returns afterwards."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"decode: steps must be a positive int, got {steps!r}")
    _check_chunk(chunk)
    stops = jnp.asarray(sorted({int(s) for s in stop_tokens}) or [-1], jnp.int32)
    key = jax.random.key(seed)
    temp, nucleus = jnp.float32(temperature), jnp.float32(top_p)
    done = jnp.zeros((logits.shape[0],), bool)
    chunk = int(min(chunk, steps))
    made = 0
    while made < steps:
        want = min(chunk, steps - made)
        toks, logits, cache, done, ran = _decode_loop(
            model, logits, cache, key, jnp.int32(made), jnp.int32(want), done, stops,
            temp, nucleus, chunk=chunk)
        ran = int(ran)
        made += ran
        if ran:
            yield np.asarray(toks[:ran])
        if ran < want:                                   # every row had stopped
            return


def _check_chunk(chunk) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"decode: chunk must be a positive int (steps per device loop), got "
                         f"{chunk!r}")


def decode(model: Model, logits, cache, steps: int, **kwargs) -> np.ndarray:
    """The ``[B, steps]`` tokens of :func:`decode_chunks` (same keywords), ``-1`` after a
    row's stop token and past the last step run."""
    out = np.full((logits.shape[0], steps), -1, np.int32)
    at = 0
    for block in decode_chunks(model, logits, cache, steps, **kwargs):
        out[:, at:at + len(block)] = block.T
        at += len(block)
    return out


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
           seed: int = 0, cache_len: Optional[int] = None, progress: bool = False,
           share_prefix: bool = True, chunk: int = DEFAULT_CHUNK,
           pages: Optional["PageLog"] = None) -> Iterator[list[Optional[int]]]:
    """Yield, per step, each row's new token (``None`` for rows already stopped).

    Tokens come from the device loop a ``chunk`` of steps at a time (:func:`decode_chunks`);
    ``chunk=1`` yields each token as soon as it exists.

    Paged KV policy only: ``share_prefix`` stores a prefix common with an earlier
    prompt once (see :func:`shared_prefixes`); ``pages``, a :class:`PageLog`, is
    filled with the allocator's pages, copies and waste.
    """
    lengths, cache_len = _check(model, prompts, max_new_tokens, temperature, top_p, cache_len)
    _check_chunk(chunk)
    batch = len(prompts)
    tokens = np.zeros((batch, int(lengths.max())), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    if _is_paged(model):
        yield from _stream_paged(model, prompts, tokens, lengths, cache_len, max_new_tokens,
                                 temperature=temperature, top_p=top_p, stop_tokens=stop_tokens,
                                 seed=seed, progress=progress, share_prefix=share_prefix,
                                 chunk=chunk, log=pages)
        return
    if pages is not None:
        raise ValueError("generate: pages=PageLog() records a paged KV cache, but this model's "
                         "cache is not paged; apply ml.passes.kv_compress('paged') first.")
    logits, cache = prefill(model, tokens, cache_len=cache_len, lengths=lengths)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", leave=False)
    try:
        for block in decode_chunks(model, logits, cache, max_new_tokens,
                                   temperature=temperature, top_p=top_p,
                                   stop_tokens=stop_tokens, seed=seed, chunk=chunk):
            for step in block:
                if bar is not None:
                    bar.update(1)
                yield [None if t < 0 else int(t) for t in step]
    finally:
        if bar is not None:
            bar.close()


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


def generate(model: Model, prompts: str | Sequence[str] | None = None, max_new_tokens: int = 32,
             *, messages: Optional[Sequence] = None, **kwargs) -> str | list[str]:
    """Text in, text out, with the model's own tokenizer.

    ``messages``: a conversation (``[{"role": ..., "content": ...}, ...]``) or a list of
    them, rendered with the checkpoint's chat template (``model.extra("chat_template")``,
    jinja2 as Hugging Face renders it: :func:`memlab.models.chat.render`) with the
    generation prompt appended, in place of ``prompts``.  Generation stops at the
    end-of-sequence token and, where the tokenizer names one, the end-of-turn token."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("generate: this model has no tokenizer; use generate_ids with token ids")
    special = dict(dict(model.extras).get("special_tokens", ()))
    stops = [special[k] for k in ("eos", "eot") if k in special]
    kwargs.setdefault("stop_tokens", stops)
    if messages is not None:
        if prompts is not None:
            raise ValueError("generate: pass prompts or messages=, not both")
        single = bool(messages) and isinstance(messages[0], dict)
        texts = [chat_prompt(model, m) for m in ([messages] if single else list(messages))]
        ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]  # the template's
    else:
        if prompts is None:
            raise ValueError("generate: pass prompts (text) or messages= (a conversation)")
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [tok.encode(t).ids for t in texts]
    new = generate_ids(model, ids, max_new_tokens, **kwargs)
    decoded = [tok.decode(n, skip_special_tokens=True) for n in new]
    return decoded[0] if single else decoded


def chat_prompt(model: Model, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation under ``model``'s chat template."""
    from memlab.models import chat
    template = model.extra("chat_template")
    name = getattr(model.spec, "name", "this model")
    if template is None:
        raise ValueError(f"generate: {name} carries no chat template (its GGUF or "
                         "tokenizer_config.json has none); pass the prompt text instead")
    tok = model.tokenizer
    special = dict(dict(model.extras).get("special_tokens", ()))
    names = {k: tok.id_to_token(special[k]) if k in special else "" for k in ("bos", "eos")}
    return chat.render(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=names["bos"] or "", eos_token=names["eos"] or "",
                       source=f"{name}'s chat template")


# ---------------------------------------------------------------------------
# The paged engine: a BlockAllocator driven between the jitted steps
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class PageLog:
    """What the paged engine did in one generation (pass ``pages=PageLog()``).

    ``shared[i] = (j, n)``: row ``i`` started with the first ``n`` prompt tokens of
    row ``j``, stored once in ``j``'s pages (``(None, 0)``: nothing shared).
    ``copies``: ``(step, row, src_page, dst_page)`` copy-on-write copies, done before
    the chunk that starts at decode step ``step``.
    ``freed``: ``(step, row, pages returned to the free list)`` when a row stopped.
    ``pages_in_use[k]``: pages allocated during the ``k``-th device loop (decode step
    ``k`` with ``chunk=1``; the null page excluded).  ``prefill`` / ``peak`` /
    ``final``: the allocator's :class:`memlab.kv.paged.PageStats` after the prompts
    were allocated, at the loop with the most pages, and after the last loop (before
    the engine frees everything), each against a dense ``[live rows, cache_len]``
    preallocation.
    ``free_after``: free pages once generation ended (== ``capacity``: all freed).
    ``tables``: the block tables ``[B, max_pages]`` after the prompts were allocated.
    """
    batch: int = 0
    cache_len: int = 0
    page_size: int = 0
    num_pages: int = 0
    max_pages: int = 0
    capacity: int = 0
    token_bytes: int = 0
    shared: list = dataclasses.field(default_factory=list)
    copies: list = dataclasses.field(default_factory=list)
    freed: list = dataclasses.field(default_factory=list)
    pages_in_use: list = dataclasses.field(default_factory=list)
    prefill: Optional["PageStats"] = None
    peak: Optional["PageStats"] = None
    final: Optional["PageStats"] = None
    free_after: int = 0
    tables: Optional[np.ndarray] = None

    @property
    def dense_slots(self) -> int:
        """Token slots of the dense cache generation preallocates: ``batch * cache_len``."""
        return self.batch * self.cache_len

    @property
    def dense_bytes(self) -> int:
        return self.dense_slots * self.token_bytes

    @property
    def peak_bytes(self) -> int:
        """Bytes of the most pages allocated at once (what a right-sized pool needs)."""
        return (self.peak.allocated_slots if self.peak else 0) * self.token_bytes


def _is_paged(model) -> bool:
    from memlab.kv.paged import Paged
    policy = model.extra("kv_policy") if hasattr(model, "extra") else None
    return isinstance(policy, Paged)


def shared_prefixes(prompts: Sequence[Sequence[int]], page_size: int) -> list:
    """For each prompt, ``(j, n)``: the earlier prompt ``j`` whose pages it can share and the
    ``n`` tokens they hold (``(None, 0)``: none).

    With a common prefix of ``c`` tokens, a prompt shares ``c`` tokens when it is all
    prefix (``c == len``: an identical prompt, or a prefix of ``j``; its last page is
    shared partly filled and copied on its first write), else the ``c // page_size``
    full pages only (the page where the prompts diverge holds different tokens).
    """
    out = []
    for i, p in enumerate(prompts):
        p = np.asarray(p)
        best = (None, 0)
        for j in range(i):
            q = np.asarray(prompts[j])
            n = min(len(p), len(q))
            diff = np.flatnonzero(p[:n] != q[:n])
            c = int(diff[0]) if diff.size else n
            share = c if c == len(p) else (c // page_size) * page_size
            if share > best[1]:
                best = (j, share)
        out.append(best)
    return out


@functools.partial(jax.jit, static_argnames="chunk", donate_argnums=(1, 2))
def _paged_loop(model: Model, logits, cache, tables, copies, key, step0, n, done, stops,
                temperature, top_p, *, chunk: int):
    """The chunk's copy-on-write copies and block tables, then :func:`_loop`."""
    from memlab.kv.paged import copy_pages, with_block_tables
    cache = with_block_tables(copy_pages(cache, copies), tables)
    return _loop(model, logits, cache, key, step0, n, done, stops, temperature, top_p, chunk)


def _pages_needed(alloc, rows, n: int) -> int:
    """Free pages that ``n`` more tokens for each of ``rows`` take (copies-on-write included)."""
    need = 0
    for i in rows:
        length, pages = alloc.length(i), alloc.pages(i)
        need += alloc.pages_for(length + n) - len(pages)
        need += bool(length % alloc.page_size and alloc.refcount(pages[-1]) > 1)
    return need


def _stream_paged(model, prompts, tokens, lengths, cache_len, max_new_tokens, *, temperature,
                  top_p, stop_tokens, seed, progress, share_prefix, chunk, log):
    from memlab.kv.paged import with_block_tables
    policy = model.extra("kv_policy")
    batch = len(prompts)
    max_pages = -(-cache_len // policy.page_size)
    if policy.num_pages is None:       # every row at full length, plus the null page
        policy = dataclasses.replace(policy, num_pages=batch * max_pages + 1)
    cache = init_cache(policy, model.spec, batch, cache_len)
    alloc = policy.allocator(cache.dims)
    fresh = PageLog(batch=batch, cache_len=cache_len, page_size=policy.page_size,
                    num_pages=alloc.num_pages, max_pages=max_pages, capacity=alloc.capacity,
                    token_bytes=alloc.token_bytes)
    log = fresh if log is None else log
    vars(log).update(vars(fresh))          # a PageLog passed in is reset, then filled

    # prompts: shared prefixes forked, the rest allocated
    plan = (shared_prefixes(prompts, policy.page_size) if share_prefix
            else [(None, 0)] * batch)
    need = sum(alloc.pages_for(int(n_i)) - alloc.pages_for(n) for n_i, (_, n) in zip(lengths, plan))
    if need > alloc.capacity:
        raise ValueError(f"generate: the prompts do not fit the page pool: they need {need} pages "
                         f"of {policy.page_size} tokens but num_pages={alloc.num_pages} holds "
                         f"{alloc.capacity} (one is the null page); build the policy with "
                         f"num_pages >= {need + 1}, or pass fewer prompts.")
    try:
        for i, (j, n) in enumerate(plan):
            if j is None:
                alloc.allocate(i, int(lengths[i]))
            else:
                alloc.fork_prefix(j, i, n)
                alloc.append_tokens(i, int(lengths[i]) - n)   # page-aligned n: never a copy
    except ValueError as e:
        raise ValueError(f"generate: the prompts do not fit the page pool: {e}") from None
    log.shared = list(plan)
    log.prefill = alloc.stats(max_len=cache_len)
    log.peak = log.prefill

    # prefill: each page is written by the first row that holds it; the other rows' writes
    # into shared pages go to the null page (their prompts attend to themselves, not the pages)
    rows = list(range(batch))
    tables = alloc.block_table(rows, max_pages)
    log.tables = tables
    write = tables.copy()
    seen: set = set()
    for i in rows:
        for k, page in enumerate(alloc.pages(i)):
            if page in seen:
                write[i, k] = alloc.null_page
            seen.add(page)
    cache = with_block_tables(cache, write)
    logits, cache = _prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), cache)

    stop = set(int(s) for s in stop_tokens)
    stops = jnp.asarray(sorted(stop) or [-1], jnp.int32)
    key = jax.random.key(seed)
    done = np.zeros(batch, bool)
    chunk = int(min(chunk, max_new_tokens))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", leave=False)
    temp, nucleus = jnp.float32(temperature), jnp.float32(top_p)
    null = alloc.null_page
    made = 0
    try:
        while made < max_new_tokens and not done.all():
            # the chunk's pages are allocated before it runs: each live row gets room for
            # `want` more tokens (at most one copy-on-write, of the page it writes first)
            live = [i for i in rows if not done[i]]
            want = min(chunk, max_new_tokens - made)
            while want > 1 and _pages_needed(alloc, live, want) > alloc.num_free:
                want -= 1          # a nearly full pool: shorter loops, down to one token
            copies = np.full((batch, 2), null, np.int32)   # (null, null): a no-op copy
            for i in rows:
                if done[i]:
                    continue
                try:
                    cow = alloc.append_tokens(i, want)
                except ValueError as e:
                    raise ValueError(f"generate: the page pool ran out at decode step {made} "
                                     f"(row {i}, {alloc.length(i)} tokens): {e}") from None
                for src, dst in cow:
                    copies[i] = (src, dst)
                    log.copies.append((made, i, src, dst))
            tables = alloc.block_table([None if done[i] else i for i in rows], max_pages)
            log.pages_in_use.append(alloc.num_allocated)
            st = alloc.stats(max_len=cache_len)
            if st.allocated_pages > log.peak.allocated_pages:
                log.peak = st
            toks, logits, cache, _, ran = _paged_loop(
                model, logits, cache, jnp.asarray(tables), jnp.asarray(copies), key,
                jnp.int32(made), jnp.int32(want), jnp.asarray(done), stops, temp, nucleus,
                chunk=chunk)
            toks = np.asarray(toks[:int(ran)])
            log.final = alloc.stats(max_len=cache_len)
            for k, host in enumerate(toks):
                row = [None if done[i] else int(host[i]) for i in rows]
                for i, t in enumerate(row):
                    if t is not None and t in stop:
                        done[i] = True
                        log.freed.append((made + k, i, len(alloc.free(i))))
                if bar is not None:
                    bar.update(1)
                yield row
            made += len(toks)
    finally:
        if bar is not None:
            bar.close()
        for i in list(alloc.seq_ids):
            alloc.free(i)
        log.free_after = alloc.num_free
