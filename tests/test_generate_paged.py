"""The generation engine driving the paged block allocator (memlab.generate + memlab.kv.paged):
greedy tokens equal the dense cache's, shared prefixes are stored once, copy-on-write happens
exactly when a row writes into a shared partly filled page, pages are allocated on demand and
freed at stop, an exhausted pool is an error, never a wrong token."""
import math

import jax
import numpy as np
import pytest

import memlab as ml
from memlab.generate import PageLog, generate_ids, shared_prefixes, stream
from memlab.kv.paged import BlockAllocator

PS = 4          # tokens per page: prompts below are not multiples of it
NEW = 6         # new tokens per row
LEN = 22        # cache_len of every run (the longest prompt, 16, + NEW): the jitted steps are shared


def _ids(model, prompts, **kw):
    return generate_ids(model, prompts, NEW, cache_len=LEN, **kw)


@pytest.fixture(scope="module")
def models():
    m = ml.models.init("tiny", jax.random.key(21))
    return m, ml.passes.kv_compress(f"paged:page_size={PS}")(m)


def _prompts(seed, sys_len=10):
    """Four ragged prompts: three share a system prompt of ``sys_len`` tokens, one does not."""
    rng = np.random.default_rng(seed)
    sys_prompt = list(rng.integers(0, 256, sys_len))
    qs = [list(rng.integers(0, 256, n)) for n in (3, 1, 6)]
    other = list(rng.integers(0, 256, 7))
    return sys_prompt, [sys_prompt + qs[0], sys_prompt + qs[1], other, sys_prompt + qs[2]]


def test_prefix_sharing_greedy_equals_dense_and_stores_the_prefix_once(models):
    dense, paged = models
    sys_prompt, prompts = _prompts(0)
    log = PageLog()
    assert _ids(paged, prompts, pages=log) == _ids(dense, prompts)
    full = len(sys_prompt) // PS                  # the pages holding only system-prompt tokens
    assert log.shared == [(None, 0), (0, full * PS), (None, 0), (0, full * PS)]
    t = log.tables
    for i in (1, 3):
        np.testing.assert_array_equal(t[i, :full], t[0, :full])
    assert not set(t[2, :math.ceil(7 / PS)]) & set(t[0]) and 0 not in t[0, :math.ceil(13 / PS)]
    lengths = np.array([len(p) for p in prompts])
    s = log.prefill
    own = np.ceil(lengths / PS).astype(int)
    assert s.allocated_pages == own.sum() - 2 * full          # the prefix pages once
    assert s.shared_pages == full and s.pages_saved_by_sharing == 2 * full
    assert s.stored_tokens == lengths.sum() - 2 * full * PS
    assert log.copies == []                    # prompts diverge inside a page: nothing shared there
    # without sharing: every prompt in its own pages, the same tokens
    log2 = PageLog()
    assert _ids(paged, prompts, pages=log2, share_prefix=False) == \
        _ids(dense, prompts)
    assert log2.prefill.allocated_pages == own.sum() and log2.prefill.shared_pages == 0


def test_n_samples_of_one_prompt_share_ceil_pages_then_copy_on_write(models):
    """Four copies of one 10-token prompt: ceil(10 / 4) = 3 pages stored once; the first decode
    step copies the shared partly filled third page for every row but the last."""
    dense, paged = models
    prompt = list(np.random.default_rng(1).integers(0, 256, 10))
    prompts = [prompt] * 3 + [prompt[:9]]         # the last is a prefix of the others
    log = PageLog()
    assert _ids(paged, prompts, pages=log) == _ids(dense, prompts)
    pages = math.ceil(10 / PS)
    assert log.shared == [(None, 0), (0, 10), (0, 10), (0, 9)]
    assert log.prefill.allocated_pages == pages and log.prefill.stored_tokens == 10
    assert log.prefill.used_tokens == 3 * 10 + 9
    np.testing.assert_array_equal(log.tables[:, :pages], np.broadcast_to(log.tables[0, :pages],
                                                                          (4, pages)))
    shared_last = log.tables[0, pages - 1]
    # rows 0, 1, 2 write token 10 (slot 2 of page 3), row 3 token 9 (slot 1): all four into the
    # shared page; the first three get copies, the last owner writes in place
    assert [(st, r, src) for st, r, src, _ in log.copies] == [(0, r, shared_last) for r in range(3)]
    assert len({dst for *_, dst in log.copies} | {shared_last}) == 4


def _expected_pages(lengths, group, full, step, live):
    """Distinct pages in use at decode step ``step`` (token ``step`` of each live row written):
    the ``full`` prefix pages once while any row of ``group`` lives, plus each live row's own."""
    own = sum(math.ceil((n + step + 1) / PS) - (full if i in group else 0)
              for i, (n, ok) in enumerate(zip(lengths, live)) if ok)
    return own + (full if any(live[i] for i in group) else 0)


def test_pages_grow_on_demand_are_freed_at_stop_and_waste_is_exact(models):
    dense, paged = models
    sys_prompt, prompts = _prompts(2)
    free_run = _ids(dense, prompts)
    stop_at = 2
    stop = free_run[1][stop_at]                   # row 1 stops at its third token
    first = {i: (r.index(stop) if stop in r else None) for i, r in enumerate(free_run)}
    log = PageLog()
    got = _ids(paged, prompts, stop_tokens=[stop], pages=log, chunk=1)   # token by token
    assert got == _ids(dense, prompts, stop_tokens=[stop])
    lengths = [len(p) for p in prompts]
    full = len(sys_prompt) // PS
    group = (0, 1, 3)                             # rows 1, 3 share row 0's full prefix pages
    steps = len(log.pages_in_use)
    for k in range(steps):
        live = [first[i] is None or first[i] >= k for i in range(4)]
        assert log.pages_in_use[k] == _expected_pages(lengths, group, full, k, live), k
    stopped = [(first[i], i) for i in range(4) if first[i] is not None]
    assert [(st, r) for st, r, _ in log.freed] == sorted(stopped)
    for st, r, n in log.freed:                    # shared pages stay while a sharer lives
        live_after = [first[i] is None or first[i] > st for i in range(4)]
        keeps = r in group and any(live_after[i] for i in group)
        assert n == math.ceil((lengths[r] + st + 1) / PS) - (full if keeps else 0)
    assert log.free_after == log.capacity         # everything returned after generation
    # waste after the last step: the tails of the live rows' last pages, nothing else
    live_len = [n + steps for i, n in enumerate(lengths) if first[i] is None or first[i] >= steps - 1]
    assert log.final.wasted_slots == sum(math.ceil(n / PS) * PS - n for n in live_len)
    assert log.dense_slots == 4 * log.cache_len == 4 * (max(lengths) + NEW)
    assert log.peak.allocated_pages == max(log.pages_in_use)
    assert log.peak_bytes == log.peak.allocated_pages * PS * log.token_bytes
    print(f"\npaged engine: peak {log.peak.allocated_pages} pages = {log.peak.allocated_slots} slots "
          f"({log.peak_bytes} B) vs dense {log.dense_slots} slots ({log.dense_bytes} B); final waste "
          f"{log.final.wasted_slots} / {log.final.allocated_slots} slots "
          f"({100 * log.final.waste_fraction:.1f}%), dense waste {log.final.dense_wasted_slots} / "
          f"{log.final.dense_slots} ({100 * log.final.dense_waste_fraction:.1f}%)")


def test_exhausted_pool_is_an_error_after_correct_tokens(models):
    dense, _ = models
    sys_prompt, prompts = _prompts(3)
    lengths = [len(p) for p in prompts]
    need = sum(math.ceil(n / PS) for n in lengths) - 2 * (len(sys_prompt) // PS)
    want = _ids(dense, prompts)
    # one page to spare after the prompts (plus the null page): decode runs out within 2 steps
    small = ml.passes.kv_compress(f"paged:page_size={PS},num_pages={need + 2}")(dense)
    got = [[] for _ in prompts]
    with pytest.raises(ValueError, match=r"page pool ran out at decode step \d+ .*out of pages"):
        for row in stream(small, prompts, NEW, cache_len=LEN):
            for i, t in enumerate(row):
                got[i].append(t)
    assert 0 < len(got[0]) < NEW
    assert got == [w[:len(got[0])] for w in want]     # every token before the error is right
    tiny_pool = ml.passes.kv_compress(f"paged:page_size={PS},num_pages={need}")(dense)
    with pytest.raises(ValueError, match=rf"prompts do not fit the page pool: they need {need} "
                                         rf"pages.*num_pages >= {need + 1}"):
        _ids(tiny_pool, prompts)
    with pytest.raises(ValueError, match="not paged"):
        generate_ids(dense, prompts, 2, pages=PageLog())


def test_shared_prefixes_rule():
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    got = shared_prefixes([a, a[:6] + [0, 0], a, a[:7], [9] + a, a[:3] + [7]], 4)
    assert got == [(None, 0),        # first
                   (0, 4),           # diverges at token 6: one full page
                   (0, 10),          # identical: everything, the partial page too
                   (0, 7),           # a prefix of row 0: all of it
                   (None, 0),        # nothing in common
                   (None, 0)]        # diverges inside the first page


def test_fork_prefix_allocator():
    a = BlockAllocator(12, 4)
    src = a.allocate("s", 10)
    a.fork_prefix("s", "t", 6)                    # pages 0 and 1 of s, the second partly used
    assert a.pages("t") == tuple(src[:2]) and a.length("t") == 6
    assert [a.refcount(p) for p in src] == [2, 2, 1]
    copies = a.append_token("t")                  # writes slot 2 of a shared page: a copy
    assert len(copies) == 1 and copies[0][0] == src[1] and a.refcount(src[1]) == 1
    a.fork_prefix("s", "u", 8)                    # two full pages: appending needs no copy
    assert a.append_token("u") == [] and len(a.pages("u")) == 3
    a.fork_prefix("s", "e", 0)
    assert a.pages("e") == () and a.length("e") == 0
    with pytest.raises(ValueError, match=r"n_tokens=11 exceeds the 10 tokens"):
        a.fork_prefix("s", "v", 11)
    with pytest.raises(ValueError, match="already exists"):
        a.fork_prefix("s", "t", 2)
    with pytest.raises(ValueError, match="unknown sequence id 'x'"):
        a.fork_prefix("x", "w", 1)
    for s in ("s", "t", "u", "e"):
        a.free(s)
    assert a.num_free == a.capacity


def test_chunked_loop_allocates_a_chunk_ahead_and_frees_at_the_chunk_end(models):
    """chunk=4 over NEW=6 tokens: two device loops (4 then 2 steps).  Each live row gets the
    pages for the loop's tokens before it runs; a row stopping inside a loop gives back all
    of them (its unused tail included) when that loop ends; tokens equal the dense cache's."""
    dense, paged = models
    sys_prompt, prompts = _prompts(2)
    free_run = _ids(dense, prompts)
    stop = free_run[1][2]                          # row 1 stops inside the first loop
    first = {i: (r.index(stop) if stop in r else None) for i, r in enumerate(free_run)}
    log = PageLog()
    got = _ids(paged, prompts, stop_tokens=[stop], pages=log, chunk=4)
    assert got == _ids(dense, prompts, stop_tokens=[stop])
    lengths = [len(p) for p in prompts]
    full, group = len(sys_prompt) // PS, (0, 1, 3)
    ends = [4, 6]                                  # tokens per row once each loop ran
    assert len(log.pages_in_use) == len(ends)
    for k, (start, end) in enumerate(zip([0] + ends, ends)):
        live = [first[i] is None or first[i] >= start for i in range(4)]
        assert log.pages_in_use[k] == _expected_pages(lengths, group, full, end - 1, live), k
    for st, r, n in log.freed:
        end = next(e for e in ends if st < e)      # the loop the stop happened in
        live_after = [first[i] is None or first[i] > st for i in range(4)]
        keeps = r in group and any(live_after[i] for i in group)
        assert (st, n) == (first[r], math.ceil((lengths[r] + end) / PS) - (full if keeps else 0))
    assert sorted(r for _, r, _ in log.freed) == sorted(i for i in range(4) if first[i] is not None)
    assert log.free_after == log.capacity
