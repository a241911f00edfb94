"""PagedAttention: a KV cache cut into fixed-size pages, with a host-side block allocator.

Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving
with PagedAttention" (vLLM).  A dense cache preallocates ``[B, max_len]`` token
slots per layer, so every sequence shorter than ``max_len`` wastes the rest of
its row (external + internal fragmentation; the paper measures 20-40% of the
cache holding tokens in earlier systems).  PagedAttention stores the K/V of all
sequences in one pool of ``num_pages`` pages of ``page_size`` tokens; a
sequence owns a list of pages (its *block table*) that grows one page at a time,
so at most ``page_size - 1`` slots per sequence are unused (its last page), and
sequences that share a prefix (parallel sampling, beam search, a common system
prompt) share the prefix's pages, copying a page only when one of them writes
into a shared, partly-filled last page (*copy-on-write*).

Two halves, as in vLLM:

* :class:`BlockAllocator` -- plain Python on the host, called by the generation
  engine between jitted steps.  It owns the free list, the per-sequence block
  tables, the reference counts of the pages, copy-on-write and the waste
  accounting (:meth:`BlockAllocator.stats`).  It never touches device memory:
  it *returns* the page copies the device must perform.
* :class:`Paged` -- the KV policy (``@POLICIES.register("paged")``).  One
  layer's state is the page pools and the block table::

      k_pages, v_pages  [Hkv, num_pages, page_size, D]   (cache dtype)
      block_tables      [B, max_pages] int32,  max_pages = ceil(max_len / page_size)

  the layout of :func:`memlab_kernels.decode_attention.paged_decode_attention`
  (head-major, one pool of pages shared by the batch).  Token ``t`` of row
  ``b`` lives in page ``block_tables[b, t // page_size]`` at slot
  ``t % page_size``, i.e. flat slot
  ``block_tables[b, t // page_size] * page_size + t % page_size`` of the pool
  viewed as ``[Hkv, num_pages * page_size, D]``.

  Prefill scatters the prompt's K/V into their pages (padding is dropped) and
  attends dense over the prompt, like :class:`memlab.kv.dense.Dense`.  Decode
  scatters the new token into its page, then runs
  ``paged_decode_attention(q, k_pages, v_pages, lengths + 1, block_tables)``
  (``backend="auto"``: the XLA reference -- gather the pages, masked softmax
  -- on CPU, the Pallas kernel on GPU (Triton) and TPU (Mosaic)).

Bytes of one layer's state (``nbytes``, equal to ``tree_bytes(init(dims))``)::

    2 * Hkv * num_pages * page_size * D * itemsize      # K and V pages
  + 4 * B * max_pages                                     # the int32 block table

The block table is the same in every layer, but the model stacks the state of
each layer, so a whole cache holds ``n_layers`` copies of it
(``n_layers * 4 * B * max_pages`` bytes: 30 * 4 * 16 * 128 = 240 KiB for
SmolLM2 at B=16, max_len=2048, page_size=16, against 0.7 GiB of bf16 pages).
It is counted in ``nbytes``; :func:`with_block_tables` writes all copies.

The default ``num_pages = B * ceil(max_len / page_size)`` holds every row at
full length (the same bytes as the dense cache, plus the tables) and the
initial block table is the identity (row ``b`` owns pages
``b * max_pages ...``), so the policy works without an allocator.  With fewer
pages (the point of paging) the engine must run a :class:`BlockAllocator` and
install its tables with :func:`with_block_tables` before the first step (the
initial table then points every entry at page 0).

The engine's loop (see :meth:`Paged.allocator`; :func:`memlab.generate.stream` runs
it for a model whose KV policy is paged, sharing common prompt prefixes through
:meth:`BlockAllocator.fork_prefix`, and records it in a ``PageLog``)::

    alloc = policy.allocator(cache.dims)               # BlockAllocator(num_pages, page_size)
    for i, p in enumerate(prompts):                    # prefill
        alloc.allocate(i, len(p))
    cache = with_block_tables(cache, alloc.block_table(range(B), max_pages))
    logits, cache = model(tokens, cache=cache, n_new=lengths)
    while ...:                                         # one decode step
        copies = [c for i in live for c in alloc.append_token(i)]
        cache = copy_pages(cache, copies)              # copy-on-write, on device
        cache = with_block_tables(cache, alloc.block_table(rows, max_pages))
        logits, cache = model(tok[:, None], cache=cache)

``append_token`` is called *before* the step that writes the token.  Rows with
no live sequence (``None`` in ``block_table``) point at the allocator's *null
page* (page 0, reserved by default, as vLLM's null block): such a row still
writes its decode token somewhere, and the null page is where it cannot hurt.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memlab.kv.base import POLICIES
from memlab.kv.base import Dims, KVPolicy, PolicyCache, attend, prompt_positions

__all__ = ["BlockAllocator", "PageStats", "Paged", "copy_pages", "with_block_tables"]


_TRACER = getattr(jax.core, "Tracer", None) or jax._src.core.Tracer


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_pos_int(name: str, v, fix: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name}={v!r} must be a positive int; pass e.g. {fix}.")
    return int(v)


# --------------------------------------------------------------------------
# Host side: the block allocator
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PageStats:
    """Occupancy and waste of a :class:`BlockAllocator` at one moment.

    Token counts are *slots* (one token's K and V in every layer).  ``used_tokens``
    counts each sequence's tokens (a shared prefix once per sequence: what the
    sequences see); ``stored_tokens`` counts the distinct slots that hold data
    (a shared prefix once: what memory holds).  A page's fill is the most tokens
    any of its sequences keeps in it.

    ``wasted_slots = allocated_slots - stored_tokens`` is the internal
    fragmentation: the unused tail of each last page (< ``page_size`` per
    distinct last page).  The dense comparison is a ``[sequences, dense_max_len]``
    preallocation (``dense_max_len``: the ``max_len`` passed to :meth:`stats`,
    else the longest sequence, the tightest dense cache), which stores every
    sequence separately and wastes ``dense_slots - used_tokens`` slots.
    Bytes are slots times ``token_bytes`` (``None`` when the allocator was not
    told the bytes of a slot; see :meth:`Paged.token_bytes`).
    """
    page_size: int
    num_pages: int              # pool size, the null page included
    free_pages: int
    sequences: int
    used_tokens: int
    stored_tokens: int
    allocated_pages: int        # distinct pages holding data (refcount > 0)
    allocated_slots: int        # allocated_pages * page_size
    wasted_slots: int           # allocated_slots - stored_tokens
    shared_pages: int           # pages with refcount > 1
    pages_saved_by_sharing: int  # sum of (refcount - 1): pages a copy per sequence would add
    peak_pages: int             # most pages ever allocated at once
    dense_max_len: int
    dense_slots: int            # sequences * dense_max_len
    dense_wasted_slots: int     # dense_slots - used_tokens
    token_bytes: Optional[int] = None

    @property
    def waste_fraction(self) -> float:
        """Unused share of the allocated slots (internal fragmentation)."""
        return self.wasted_slots / self.allocated_slots if self.allocated_slots else 0.0

    @property
    def dense_waste_fraction(self) -> float:
        """Unused share of the dense ``[sequences, dense_max_len]`` preallocation."""
        return self.dense_wasted_slots / self.dense_slots if self.dense_slots else 0.0

    @property
    def waste_vs_dense(self) -> float:
        """Paged wasted slots as a fraction of the dense preallocation's wasted slots."""
        return self.wasted_slots / self.dense_wasted_slots if self.dense_wasted_slots else 0.0

    @property
    def slots_vs_dense(self) -> float:
        """Allocated slots (hence bytes) relative to the dense preallocation."""
        return self.allocated_slots / self.dense_slots if self.dense_slots else 0.0

    @property
    def allocated_bytes(self) -> Optional[int]:
        return None if self.token_bytes is None else self.allocated_slots * self.token_bytes

    @property
    def dense_bytes(self) -> Optional[int]:
        return None if self.token_bytes is None else self.dense_slots * self.token_bytes

    @property
    def pool_bytes(self) -> Optional[int]:
        """Bytes of the whole page pool (what the device holds, used or not)."""
        return None if self.token_bytes is None else self.num_pages * self.page_size * self.token_bytes

    def to_dict(self) -> dict:
        """The fields and the derived numbers, for a results table."""
        d = dataclasses.asdict(self)
        for k in ("waste_fraction", "dense_waste_fraction", "waste_vs_dense", "slots_vs_dense",
                  "allocated_bytes", "dense_bytes", "pool_bytes"):
            d[k] = getattr(self, k)
        return d


class BlockAllocator:
    """Pages of a paged KV cache: free list, block tables, refcounts, copy-on-write.

    Plain Python (host side), used between jitted steps.  ``num_pages`` is the
    size of the device pool and ``page_size`` its tokens per page (both as in
    :class:`Paged`).  With ``null_page=True`` (default, as vLLM's null block)
    page 0 is never handed out: it fills the unused entries of
    :meth:`block_table` and absorbs the writes of rows without a live
    sequence, so ``num_pages - 1`` pages hold data.  ``token_bytes`` (bytes of
    one token slot over all layers, :meth:`Paged.token_bytes`) lets
    :meth:`stats` report bytes.

    Sequences are identified by any hashable ``seq_id``.  Freed pages are
    reused last-freed-first.  Every operation checks its arguments before it
    changes anything, so a failed call leaves the allocator as it was.
    """

    def __init__(self, num_pages: int, page_size: int, *, null_page: bool = True,
                 token_bytes: Optional[int] = None):
        self.num_pages = _check_pos_int("BlockAllocator num_pages", num_pages, "num_pages=1024")
        self.page_size = _check_pos_int("BlockAllocator page_size", page_size, "page_size=16")
        self.null_page: Optional[int] = 0 if null_page else None
        if null_page and self.num_pages < 2:
            raise ValueError(f"BlockAllocator: num_pages={num_pages} leaves no page besides the "
                             "null page; pass num_pages >= 2 or null_page=False.")
        if token_bytes is not None:
            token_bytes = _check_pos_int("BlockAllocator token_bytes", token_bytes,
                                         "token_bytes=policy.token_bytes(dims)")
        self.token_bytes = token_bytes
        first = 1 if null_page else 0
        self._free = list(range(self.num_pages - 1, first - 1, -1))   # pop() -> lowest id first
        self._ref = np.zeros(self.num_pages, np.int64)
        self._tables: dict = {}
        self._lengths: dict = {}
        self._peak = 0

    # ---- queries ---------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Pages that can hold data (the null page excluded)."""
        return self.num_pages - (self.null_page is not None)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return self.capacity - len(self._free)

    @property
    def seq_ids(self) -> list:
        return list(self._tables)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._tables

    def length(self, seq_id) -> int:
        """Tokens of ``seq_id`` (what its pages hold, the token being decoded included)."""
        return self._lengths[self._known(seq_id, "length")]

    def pages(self, seq_id) -> tuple:
        """The block table of ``seq_id``: its page ids in token order."""
        return tuple(self._tables[self._known(seq_id, "pages")])

    def refcount(self, page: int) -> int:
        return int(self._ref[page])

    def pages_for(self, n_tokens: int) -> int:
        """Pages that ``n_tokens`` tokens occupy."""
        return _cdiv(int(n_tokens), self.page_size)

    def can_allocate(self, n_tokens: int) -> bool:
        return self.pages_for(n_tokens) <= self.num_free

    # ---- mutations -------------------------------------------------------
    def allocate(self, seq_id: Hashable, n_tokens: int) -> list:
        """A new sequence of ``n_tokens`` tokens (e.g. its prompt): returns its pages."""
        if seq_id in self._tables:
            raise ValueError(f"BlockAllocator.allocate: sequence {seq_id!r} already exists; "
                             "extend it with append_token/append_tokens, or free it first.")
        n = self._check_count("allocate", "n_tokens", n_tokens)
        need = self.pages_for(n)
        self._reserve(need, f"allocate({seq_id!r}, {n})")
        pages = [self._pop() for _ in range(need)]
        self._tables[seq_id] = pages
        self._lengths[seq_id] = n
        self._note_peak()
        return list(pages)

    def append_token(self, seq_id: Hashable) -> list:
        """One more token for ``seq_id``: returns the ``(src, dst)`` page copies to do first.

        A new page is allocated when the last one is full.  If the token goes
        into a last page that other sequences share (refcount > 1, after
        :meth:`fork`), the page is copied to a fresh one first (copy-on-write):
        ``[(shared_page, new_page)]`` is returned and the device must copy it
        (:func:`copy_pages`) before the step writes the token.
        """
        return self.append_tokens(seq_id, 1)

    def append_tokens(self, seq_id: Hashable, n: int) -> list:
        """``n`` more tokens for ``seq_id`` (e.g. a chunk); the copies to do first (see
        :meth:`append_token`)."""
        self._known(seq_id, "append_tokens")
        n = self._check_count("append_tokens", "n", n)
        pages, length = self._tables[seq_id], self._lengths[seq_id]
        if n == 0:
            return []
        ps = self.page_size
        cow = length % ps != 0 and self._ref[pages[-1]] > 1
        new_pages = self.pages_for(length + n) - len(pages)
        self._reserve(new_pages + cow, f"append_tokens({seq_id!r}, {n})")
        copies = []
        if cow:
            src = pages[-1]
            dst = self._pop()
            self._ref[src] -= 1
            pages[-1] = dst
            copies.append((int(src), int(dst)))
        pages.extend(self._pop() for _ in range(new_pages))
        self._lengths[seq_id] = length + n
        self._note_peak()
        return copies

    def fork(self, src_seq_id: Hashable, new_seq_id: Hashable) -> None:
        """``new_seq_id`` starts as a copy of ``src_seq_id`` sharing all its pages
        (refcount + 1 each): prefix sharing, no device copy."""
        self._known(src_seq_id, "fork")
        if new_seq_id in self._tables:
            raise ValueError(f"BlockAllocator.fork: sequence {new_seq_id!r} already exists; "
                             "fork into a new id, or free it first.")
        pages = list(self._tables[src_seq_id])
        for p in pages:
            self._ref[p] += 1
        self._tables[new_seq_id] = pages
        self._lengths[new_seq_id] = self._lengths[src_seq_id]

    def fork_prefix(self, src_seq_id: Hashable, new_seq_id: Hashable, n_tokens: int) -> None:
        """``new_seq_id`` starts with the first ``n_tokens`` tokens of ``src_seq_id``, sharing
        the ``ceil(n_tokens / page_size)`` pages that hold them (refcount + 1 each).

        A common prefix (a system prompt) stored once.  When ``n_tokens`` ends inside a
        page, that page is shared partly filled, and the first of its sequences to write
        into it gets a copy (:meth:`append_tokens`).
        """
        self._known(src_seq_id, "fork_prefix")
        if new_seq_id in self._tables:
            raise ValueError(f"BlockAllocator.fork_prefix: sequence {new_seq_id!r} already exists; "
                             "fork into a new id, or free it first.")
        n = self._check_count("fork_prefix", "n_tokens", n_tokens)
        if n > self._lengths[src_seq_id]:
            raise ValueError(f"BlockAllocator.fork_prefix: n_tokens={n} exceeds the "
                             f"{self._lengths[src_seq_id]} tokens of sequence {src_seq_id!r}; "
                             "share at most its length.")
        pages = list(self._tables[src_seq_id][:self.pages_for(n)])
        for p in pages:
            self._ref[p] += 1
        self._tables[new_seq_id] = pages
        self._lengths[new_seq_id] = n

    def free(self, seq_id: Hashable) -> list:
        """Release ``seq_id``; returns the pages that became free (refcount 0)."""
        self._known(seq_id, "free")
        freed = []
        for p in reversed(self._tables.pop(seq_id)):
            self._ref[p] -= 1
            if self._ref[p] == 0:
                self._free.append(p)
                freed.append(p)
        del self._lengths[seq_id]
        return freed

    # ---- to the device ---------------------------------------------------
    def block_table(self, seq_ids: Sequence, max_pages: int) -> np.ndarray:
        """int32 ``[len(seq_ids), max_pages]``: row ``i`` is the pages of ``seq_ids[i]``.

        Entries past a sequence's pages, and rows whose id is ``None`` (no live
        sequence), hold the null page (page 0 when ``null_page=False``): a
        valid id that attention never reads.  ``max_pages`` is the width of the
        policy's table, ``ceil(max_len / page_size)``.
        """
        max_pages = _check_pos_int("BlockAllocator.block_table max_pages", max_pages,
                                   "max_pages=ceil(max_len / page_size)")
        seq_ids = list(seq_ids)
        fill = self.null_page if self.null_page is not None else 0
        out = np.full((len(seq_ids), max_pages), fill, np.int32)
        for i, s in enumerate(seq_ids):
            if s is None:
                continue
            pages = self._tables[self._known(s, "block_table")]
            if len(pages) > max_pages:
                raise ValueError(
                    f"BlockAllocator.block_table: sequence {s!r} has {self._lengths[s]} tokens in "
                    f"{len(pages)} pages but the block table holds max_pages={max_pages} "
                    f"({max_pages * self.page_size} tokens): the page table overflows; build the "
                    "cache with a larger max_len, or stop the sequence earlier.")
            out[i, :len(pages)] = pages
        return out

    # ---- accounting ------------------------------------------------------
    def stats(self, max_len: Optional[int] = None) -> PageStats:
        """Occupancy and waste now, against a dense ``[sequences, max_len]`` cache
        (``max_len=None``: the longest sequence).  See :class:`PageStats`."""
        ps = self.page_size
        fill = np.zeros(self.num_pages, np.int64)
        for s, pages in self._tables.items():
            n = self._lengths[s]
            for j, p in enumerate(pages):
                fill[p] = max(fill[p], min(ps, n - j * ps))
        live = self._ref > 0
        n_seq = len(self._tables)
        used = int(sum(self._lengths.values()))
        longest = max(self._lengths.values(), default=0)
        dense_len = longest if max_len is None else int(max_len)
        if dense_len < longest:
            raise ValueError(f"BlockAllocator.stats: max_len={max_len} is shorter than the longest "
                             f"sequence ({longest} tokens); pass the dense cache's max_len, or None.")
        alloc_pages = int(live.sum())
        stored = int(fill[live].sum())
        return PageStats(
            page_size=ps, num_pages=self.num_pages, free_pages=self.num_free, sequences=n_seq,
            used_tokens=used, stored_tokens=stored, allocated_pages=alloc_pages,
            allocated_slots=alloc_pages * ps, wasted_slots=alloc_pages * ps - stored,
            shared_pages=int((self._ref > 1).sum()),
            pages_saved_by_sharing=int(np.maximum(self._ref - 1, 0).sum()),
            peak_pages=self._peak, dense_max_len=dense_len, dense_slots=n_seq * dense_len,
            dense_wasted_slots=n_seq * dense_len - used, token_bytes=self.token_bytes)

    # ---- internals -------------------------------------------------------
    def _known(self, seq_id, fn):
        if seq_id not in self._tables:
            known = list(self._tables)[:8]
            raise ValueError(f"BlockAllocator.{fn}: unknown sequence id {seq_id!r} (live ids: "
                             f"{known}{' ...' if len(self._tables) > 8 else ''}); allocate or "
                             "fork it first (or it was already freed).")
        return seq_id

    @staticmethod
    def _check_count(fn, name, v) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"BlockAllocator.{fn}: {name}={v!r} must be an int >= 0.")
        return int(v)

    def _reserve(self, need: int, what: str) -> None:
        if need > len(self._free):
            in_use = self.capacity - len(self._free)
            raise ValueError(
                f"BlockAllocator: out of pages: {what} needs {need} more page(s) of "
                f"{self.page_size} tokens but only {len(self._free)} of {self.num_pages} are free "
                f"({in_use} in use by {len(self._tables)} sequence(s)"
                f"{', 1 reserved as the null page' if self.null_page is not None else ''}); "
                f"build the cache with a larger num_pages (>= {self.num_pages + need - len(self._free)}), "
                "or free finished sequences first.")

    def _pop(self) -> int:
        p = self._free.pop()
        self._ref[p] = 1
        return p

    def _note_peak(self) -> None:
        self._peak = max(self._peak, self.num_allocated)


# --------------------------------------------------------------------------
# Device side: the policy
# --------------------------------------------------------------------------
@POLICIES.register("paged")
@dataclasses.dataclass(frozen=True)
class Paged(KVPolicy):
    """PagedAttention KV cache (Kwon et al. 2023): page pools + block table per layer.

    ``page_size`` tokens per page (a power of two on GPU/Triton, a multiple of
    8 on TPU; 16 is vLLM's default).  ``num_pages`` pages in the pool (None:
    ``B * ceil(max_len / page_size)``, every row at full length).  ``dtype``:
    storage dtype (None: the model's compute dtype; at decode the query is cast
    to it, as the kernel needs one dtype).  ``backend`` of
    ``paged_decode_attention`` ("auto": XLA on CPU, Triton on GPU, Mosaic on
    TPU).  See the module docstring for the layout and the engine's loop.
    """

    name = "paged"
    page_size: int = 16
    num_pages: Optional[int] = None
    dtype: Optional[str] = None
    backend: str = "auto"

    # ---- shapes ----------------------------------------------------------
    def _dtype(self, dims: Dims):
        return jnp.dtype(self.dtype or dims.dtype)

    def max_pages(self, dims: Dims) -> int:
        """Width of the block table: pages of a ``max_len`` sequence."""
        return _cdiv(dims.max_len, self.page_size)

    def pool_pages(self, dims: Dims) -> int:
        """``num_pages``, or its default ``B * max_pages``."""
        return self.num_pages if self.num_pages is not None else dims.batch * self.max_pages(dims)

    def token_bytes(self, dims: Dims) -> int:
        """Bytes of one token slot, K and V, in all ``dims.n_layers`` layers."""
        return 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim * self._dtype(dims).itemsize

    def allocator(self, dims: Dims, *, null_page: bool = True) -> BlockAllocator:
        """A :class:`BlockAllocator` for this policy's pool (bytes per slot included).

        With ``null_page=True`` one page of the pool is the null page: the
        default ``num_pages = B * max_pages`` then holds every row at full
        length but one page; pass ``num_pages=B * max_pages + 1`` for that.
        """
        return BlockAllocator(self.pool_pages(dims), self.page_size, null_page=null_page,
                              token_bytes=self.token_bytes(dims))

    def validate(self, dims: Dims) -> None:
        _check_pos_int("Paged page_size", self.page_size, "Paged(page_size=16)")
        if self.num_pages is not None:
            _check_pos_int("Paged num_pages", self.num_pages,
                           "Paged(num_pages=1024), or None for batch * ceil(max_len / page_size)")
        if self._dtype(dims) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                     jnp.dtype(jnp.float16)):
            raise ValueError(f"Paged: dtype={self._dtype(dims)} is not a float cache dtype; pass "
                             "dtype='bfloat16', 'float16' or 'float32' (or None).")
        from memlab_kernels._common import is_power_of_2, resolve_backend
        backend = resolve_backend(self.backend)
        if backend in ("triton", "interpret") and not is_power_of_2(self.page_size):
            raise ValueError(f"Paged: page_size={self.page_size} must be a power of two for the "
                             f"{backend} paged kernel; pass Paged(page_size=16).")
        if backend == "mosaic_tpu" and self.page_size % 8:
            raise ValueError(f"Paged: page_size={self.page_size} must be a multiple of 8 on TPU; "
                             "pass Paged(page_size=16).")

    # ---- protocol --------------------------------------------------------
    def init(self, dims: Dims):
        n, mp = self.pool_pages(dims), self.max_pages(dims)
        shape = (dims.n_kv_heads, n, self.page_size, dims.head_dim)
        if n >= dims.batch * mp:      # every row fits at full length: row b owns b*mp ...
            tables = jnp.arange(dims.batch * mp, dtype=jnp.int32).reshape(dims.batch, mp)
        else:                         # the engine installs an allocator's tables
            tables = jnp.zeros((dims.batch, mp), jnp.int32)
        return {"k_pages": jnp.zeros(shape, self._dtype(dims)),
                "v_pages": jnp.zeros(shape, self._dtype(dims)),
                "block_tables": tables}

    def nbytes(self, dims: Dims) -> int:
        pages = 2 * dims.n_kv_heads * self.pool_pages(dims) * self.page_size * dims.head_dim
        return pages * self._dtype(dims).itemsize + 4 * dims.batch * self.max_pages(dims)

    def prefill(self, state, q, k, v, ctx):
        pos = prompt_positions(ctx)                    # padding -> MAX_POS -> dropped
        state = _write(state, k, v, pos)
        return attend(q, k, v, ctx.positions, pos), state

    def decode(self, state, q, k, v, ctx):
        from memlab_kernels.decode_attention import paged_decode_attention
        state = _write(state, k, v, ctx.positions)
        kp, vp = state["k_pages"], state["v_pages"]
        out = paged_decode_attention(q[:, 0].astype(kp.dtype), kp, vp,
                                     (ctx.lengths + 1).astype(jnp.int32), state["block_tables"],
                                     backend=self.backend)
        return out[:, None].astype(q.dtype), state


def _write(state, k, v, pos):
    """Scatter ``k, v [B, T, Hkv, D]`` at positions ``pos [B, T]`` into their pages.

    Flat slot ``table[b, pos // ps] * ps + pos % ps`` of the pool viewed as
    ``[Hkv, num_pages * ps, D]``; positions past the table (MAX_POS padding)
    and page ids outside the pool are dropped.
    """
    tables = state["block_tables"]
    hkv, n, ps, d = state["k_pages"].shape
    b, t = pos.shape
    mp = tables.shape[1]
    pos = pos.astype(jnp.int32)
    idx = jnp.clip(pos // ps, 0, mp - 1)
    page = jnp.take_along_axis(tables, idx, axis=1)
    ok = (pos >= 0) & (pos < mp * ps) & (page >= 0) & (page < n)
    slot = jnp.where(ok, page * ps + pos % ps, n * ps).reshape(-1)   # n * ps: dropped

    def put(pages, x):
        flat = pages.reshape(hkv, n * ps, d)
        x = x.reshape(b * t, hkv, d).transpose(1, 0, 2).astype(pages.dtype)
        return flat.at[:, slot].set(x, mode="drop").reshape(hkv, n, ps, d)

    return {**state, "k_pages": put(state["k_pages"], k), "v_pages": put(state["v_pages"], v)}


# --------------------------------------------------------------------------
# Engine helpers on a whole PolicyCache (stacked over layers)
# --------------------------------------------------------------------------
def _check_paged_cache(cache, fn):
    if not isinstance(cache, PolicyCache) or not isinstance(cache.policy, Paged):
        pol = type(getattr(cache, "policy", cache)).__name__
        raise TypeError(f"{fn}: cache must be a PolicyCache of the Paged policy, got {pol}; "
                        "build it with ml.kv.init_cache(Paged(...), spec, batch, max_len).")


def with_block_tables(cache: PolicyCache, tables: Any) -> PolicyCache:
    """``cache`` with block table ``tables [B, max_pages]`` in every layer.

    Call it after the allocator changed the tables (``alloc.block_table(rows,
    max_pages)``).  Works under ``jit``; concrete tables are checked (shape,
    page ids in ``[0, num_pages)``).
    """
    _check_paged_cache(cache, "with_block_tables")
    st = cache.state
    n_layers, b, mp = st["block_tables"].shape
    n = st["k_pages"].shape[2]
    if not hasattr(tables, "shape"):
        tables = np.asarray(tables)
    if tuple(tables.shape) != (b, mp):
        raise ValueError(f"with_block_tables: tables must be [B, max_pages] = ({b}, {mp}), got "
                         f"{tuple(tables.shape)}; pass alloc.block_table(seq_ids, max_pages={mp}) "
                         "with one id (or None) per batch row.")
    if not jnp.issubdtype(tables.dtype, jnp.integer):
        raise TypeError(f"with_block_tables: tables must be int32 page ids, got {tables.dtype}.")
    if not isinstance(tables, _TRACER):
        host = np.asarray(tables)
        if host.size and (host.min() < 0 or host.max() >= n):
            raise ValueError(f"with_block_tables: page ids must be in [0, num_pages={n}), got "
                             f"[{host.min()}, {host.max()}]; the allocator's num_pages must "
                             "match the policy's.")
    full = jnp.broadcast_to(jnp.asarray(tables, jnp.int32)[None], (n_layers, b, mp))
    return cache._replace(state={**st, "block_tables": full})


def copy_pages(cache: PolicyCache, copies: Iterable) -> PolicyCache:
    """Perform the allocator's copy-on-write copies ``[(src, dst), ...]`` in every layer.

    ``copies`` is a list of pairs or an int ``[n, 2]`` array (``(p, p)`` is a
    no-op, so a fixed-size padded array keeps one compilation under ``jit``).
    The destinations are fresh pages, so the copies are independent.
    """
    _check_paged_cache(cache, "copy_pages")
    if not hasattr(copies, "shape"):
        copies = np.asarray(list(copies), np.int32).reshape(-1, 2)
    if copies.ndim != 2 or copies.shape[1] != 2:
        raise ValueError(f"copy_pages: copies must be [n, 2] (src, dst) page pairs, got shape "
                         f"{tuple(copies.shape)}.")
    if copies.shape[0] == 0:
        return cache
    copies = jnp.asarray(copies, jnp.int32)
    src, dst = copies[:, 0], copies[:, 1]
    st = cache.state
    new = {key: st[key].at[:, :, dst].set(st[key][:, :, src]) for key in ("k_pages", "v_pages")}
    return cache._replace(state={**st, **new})
