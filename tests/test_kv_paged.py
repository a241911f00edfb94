"""PagedAttention KV cache (memlab.kv.paged): the host block allocator against a Python model
of pages and tokens, the policy against float64 numpy attention and the dense policy, and the
waste / prefix-sharing numbers the generation experiment reports."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.kv.base import Dims, StepCtx, init_cache
from memlab.kv.paged import BlockAllocator, Paged, copy_pages, with_block_tables
from memlab.memory import tree_bytes


# --------------------------------------------------------------------------
# Allocator
# --------------------------------------------------------------------------
def test_allocate_append_free_and_free_list_reuse():
    a = BlockAllocator(9, 4)                       # page 0 is the null page: 8 usable
    assert (a.capacity, a.num_free) == (8, 8)
    pa = a.allocate("a", 10)                       # 3 pages, last holds 2 tokens
    pb = a.allocate("b", 4)                        # exactly one full page
    assert len(pa) == 3 and len(pb) == 1 and 0 not in pa + pb
    assert len(set(pa + pb)) == 4 and a.num_free == 4
    assert a.append_token("a") == [] and a.pages("a") == tuple(pa)      # fills slot 2 of page 3
    assert a.append_token("b") == [] and len(a.pages("b")) == 2          # b's page was full
    assert (a.length("a"), a.length("b")) == (11, 5)
    freed = a.free("a")
    assert sorted(freed) == sorted(pa) and a.num_free == 6
    pc = a.allocate("c", 9)                        # the freed pages come back first
    assert sorted(pc) == sorted(pa)
    t = a.block_table(["c", None, "b"], max_pages=5)
    assert t.dtype == np.int32 and t.shape == (3, 5)
    np.testing.assert_array_equal(t[0], list(pc) + [0, 0])
    np.testing.assert_array_equal(t[1], 0)
    np.testing.assert_array_equal(t[2], list(a.pages("b")) + [0, 0, 0])
    a.free("b"), a.free("c")
    assert a.num_free == a.capacity and a.stats().allocated_pages == 0


def test_fork_and_copy_on_write_semantics():
    a = BlockAllocator(16, 4)
    p = a.allocate(0, 10)                          # pages p0 p1 full, p2 holds 2 tokens
    a.fork(0, 1)
    assert a.pages(1) == tuple(p) and [a.refcount(x) for x in p] == [2, 2, 2]
    s = a.stats()
    assert (s.allocated_pages, s.shared_pages, s.stored_tokens, s.used_tokens) == (3, 3, 10, 20)
    # the first writer into the shared partial page gets a copy of it ...
    copies = a.append_token(1)
    assert len(copies) == 1 and copies[0][0] == p[2]
    new = copies[0][1]
    assert a.pages(1) == (p[0], p[1], new) and a.pages(0) == tuple(p)
    assert (a.refcount(p[2]), a.refcount(new), a.refcount(p[0])) == (1, 1, 2)
    # ... and the last owner writes in place
    assert a.append_token(0) == []
    # a fork at a page boundary shares full pages only: appending needs no copy
    a.append_tokens(0, 1)                          # 12 tokens: 3 full pages
    a.fork(0, 2)
    assert a.append_token(2) == [] and a.pages(2)[:3] == tuple(p)
    assert a.refcount(p[2]) == 2 and a.refcount(a.pages(2)[3]) == 1
    # freeing a sharer only drops refcounts
    own = a.pages(2)[3]
    assert a.free(2) == [own]
    assert [a.refcount(x) for x in p] == [2, 2, 1]
    a.free(0), a.free(1)
    assert a.num_free == a.capacity


def _check_against_model(a, seqs, mem, ps, null_page=0):
    """Every sequence reads its tokens through its table; refcounts = references."""
    refs = np.zeros(a.num_pages, int)
    for s, toks in seqs.items():
        pages = a.pages(s)
        assert len(pages) == math.ceil(len(toks) / ps) and a.length(s) == len(toks)
        assert null_page not in pages
        got = [mem[pages[t // ps], t % ps] for t in range(len(toks))]
        assert got == toks, f"sequence {s} reads {got}, wrote {toks}"
        for p in pages:
            refs[p] += 1
    for p in range(a.num_pages):
        assert a.refcount(p) == refs[p]
    assert a.num_free == a.capacity - int((refs > 0).sum())
    st = a.stats()
    slots = {(p, t % ps) for s, toks in seqs.items() for t, p in
             ((t, a.pages(s)[t // ps]) for t in range(len(toks)))}
    assert st.stored_tokens == len(slots) and st.used_tokens == sum(map(len, seqs.values()))
    assert st.wasted_slots == st.allocated_slots - len(slots)
    assert st.pages_saved_by_sharing == int(np.maximum(refs - 1, 0).sum())


def test_random_operations_against_a_python_model():
    """Allocate / append / fork / free at random; a simulated device memory applies the
    returned copies and the writes, and every sequence must read back what it wrote."""
    rng = np.random.default_rng(0)
    ps, n_pages = 4, 24
    a = BlockAllocator(n_pages, ps)
    mem = np.full((n_pages, ps), -1)
    seqs, next_id, next_tok, n_cow, n_oom = {}, 0, 0, 0, 0
    for _ in range(400):
        op = rng.choice(["alloc", "append", "append", "append", "fork", "free"])
        live = list(seqs)
        before = {s: a.pages(s) for s in live}, a.num_free
        try:
            if op == "alloc" or not live:
                n = int(rng.integers(0, 11))
                pages = a.allocate(next_id, n)
                toks = list(range(next_tok, next_tok + n))
                for t, x in enumerate(toks):
                    mem[pages[t // ps], t % ps] = x
                seqs[next_id], next_id, next_tok = toks, next_id + 1, next_tok + n
            elif op == "append":
                s = live[rng.integers(len(live))]
                copies = a.append_token(s)
                for src, dst in copies:
                    mem[dst] = mem[src]
                    assert before[0][s][-1] == src        # only ever the sequence's last page
                n_cow += len(copies)
                t = len(seqs[s])
                mem[a.pages(s)[t // ps], t % ps] = next_tok
                seqs[s] = seqs[s] + [next_tok]
                next_tok += 1
            elif op == "fork":
                s = live[rng.integers(len(live))]
                a.fork(s, next_id)
                seqs[next_id], next_id = list(seqs[s]), next_id + 1
            else:
                s = live[rng.integers(len(live))]
                a.free(s)
                del seqs[s]
        except ValueError as e:
            assert "out of pages" in str(e)
            n_oom += 1
            assert ({s: a.pages(s) for s in seqs}, a.num_free) == before   # nothing changed
        _check_against_model(a, seqs, mem, ps)
    assert n_cow > 5 and n_oom > 0                 # both paths were exercised


def test_out_of_pages_error_says_how_many():
    a = BlockAllocator(5, 16)                      # 4 usable pages
    a.allocate("x", 40)                            # 3 pages
    with pytest.raises(ValueError, match=r"out of pages.*needs 2 more page.*only 1 of 5 are free"
                                         r".*larger num_pages \(>= 6\)"):
        a.allocate("y", 17)
    assert "y" not in a and a.num_free == 1
    a.append_tokens("x", 8)                        # fills page 3 exactly
    with pytest.raises(ValueError, match="out of pages"):
        a.append_tokens("x", 17)
    assert a.length("x") == 48


def test_allocator_argument_errors():
    a = BlockAllocator(8, 4)
    a.allocate("s", 9)
    for call in (lambda: a.free("nope"), lambda: a.append_token("nope"),
                 lambda: a.fork("nope", "t"), lambda: a.block_table(["nope"], 4),
                 lambda: a.length("nope")):
        with pytest.raises(ValueError, match="unknown sequence id 'nope'"):
            call()
    with pytest.raises(ValueError, match="already exists"):
        a.allocate("s", 1)
    with pytest.raises(ValueError, match="already exists"):
        a.fork("s", "s")
    with pytest.raises(ValueError, match=r"page table overflows"):
        a.block_table(["s"], max_pages=2)
    with pytest.raises(ValueError, match="shorter than the longest"):
        a.stats(max_len=8)
    with pytest.raises(ValueError, match="must be an int >= 0"):
        a.allocate("t", -1)
    with pytest.raises(ValueError, match="page_size"):
        BlockAllocator(8, 0)
    with pytest.raises(ValueError, match="no page besides the null page"):
        BlockAllocator(1, 4)
    a.free("s")
    with pytest.raises(ValueError, match="already freed"):
        a.free("s")


def test_waste_mixed_length_batch_vs_dense_preallocation():
    """16 sequences of 100..2000 tokens in 16-token pages: < 4% of the allocated slots are
    unused (the last pages' tails), against ~half of a dense [16, 2000] cache.  Bytes for
    SmolLM2-135M in bfloat16 (30 layers, 3 KV heads of 64)."""
    rng = np.random.default_rng(2023)
    lengths = rng.integers(100, 2001, 16)
    ps, max_len = 16, 2000
    smol = Dims(batch=16, max_len=max_len, n_heads=9, n_kv_heads=3, head_dim=64,
                dtype="bfloat16", n_layers=30)
    policy = Paged(page_size=ps)
    alloc = policy.allocator(smol)
    for i, n in enumerate(lengths):
        alloc.allocate(i, int(n))
    s = alloc.stats(max_len=max_len)
    # independent arithmetic
    pages = -(-lengths // ps)
    assert s.allocated_pages == pages.sum() and s.used_tokens == lengths.sum()
    assert s.wasted_slots == (pages * ps - lengths).sum()
    assert s.dense_slots == 16 * max_len and s.dense_wasted_slots == 16 * max_len - lengths.sum()
    token_bytes = 2 * 30 * 3 * 64 * 2
    assert policy.token_bytes(smol) == token_bytes == s.token_bytes
    assert s.allocated_bytes == pages.sum() * ps * token_bytes
    assert s.dense_bytes == 16 * max_len * token_bytes
    assert s.pool_bytes == 16 * 125 * ps * token_bytes
    # the claims
    assert s.waste_fraction < 0.04
    assert s.waste_vs_dense < 0.04
    assert s.dense_waste_fraction > 0.3
    d = s.to_dict()
    print(f"\npaged waste: {s.wasted_slots} of {s.allocated_slots} slots "
          f"({100 * s.waste_fraction:.2f}%), dense [16, {max_len}] waste: "
          f"{s.dense_wasted_slots} of {s.dense_slots} ({100 * s.dense_waste_fraction:.1f}%); "
          f"paged/dense waste {100 * s.waste_vs_dense:.2f}%; bytes {d['allocated_bytes'] / 2**20:.1f}"
          f" MiB vs {d['dense_bytes'] / 2**20:.1f} MiB ({100 * s.slots_vs_dense:.1f}%)")


# --------------------------------------------------------------------------
# The policy on random tensors, against float64 numpy
# --------------------------------------------------------------------------
def _np_attend(q, k, v):
    """q [H, D] over k, v [S, Hkv, D] (all visible), float64."""
    rep = q.shape[0] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("hd,shd->hs", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hs,shd->hd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("backend", ["auto", "interpret"])
def test_policy_prefill_decode_match_float64(backend):
    """Ragged prompts and decode steps through a shuffled block table: the pages hold each
    token at table[b, t // ps] * ps + t % ps, and attention equals float64 numpy."""
    rng = np.random.default_rng(1)
    b, h, hkv, d, ps, max_len = 2, 4, 2, 16, 4, 20
    dims = Dims(batch=b, max_len=max_len, n_heads=h, n_kv_heads=hkv, head_dim=d)
    pol = Paged(page_size=ps, num_pages=13, backend=backend)
    pol.validate(dims)
    mp = pol.max_pages(dims)
    table = rng.permutation(13)[: b * mp].reshape(b, mp).astype(np.int32)
    state = {**pol.init(dims), "block_tables": jnp.asarray(table)}
    t, n_new = 7, np.array([7, 3])
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    q, k, v = (rng.standard_normal((b, t, x, d)) for x in (h, hkv, hkv))
    pos = np.broadcast_to(np.arange(t), (b, t))
    ctx = StepCtx(jnp.asarray(pos, jnp.int32), jnp.asarray(n_new, jnp.int32),
                  jnp.zeros(b, jnp.int32), jnp.int32(0), f32(k), None)
    out, state = pol.prefill(state, f32(q), f32(k), f32(v), ctx)
    keys = [list(k[i, :n_new[i]]) for i in range(b)]
    vals = [list(v[i, :n_new[i]]) for i in range(b)]
    for i in range(b):
        for j in range(n_new[i]):
            ref = _np_attend(q[i, j], np.array(keys[i][: j + 1]), np.array(vals[i][: j + 1]))
            np.testing.assert_allclose(np.asarray(out[i, j], np.float64), ref, atol=2e-5)
    lengths = n_new.copy()
    for _ in range(6):                             # crosses page boundaries in both rows
        q1, k1, v1 = (rng.standard_normal((b, 1, x, d)) for x in (h, hkv, hkv))
        ctx = StepCtx(jnp.asarray(lengths[:, None], jnp.int32), jnp.ones(b, jnp.int32),
                      jnp.asarray(lengths, jnp.int32), jnp.int32(0), f32(k1), None)
        out, state = pol.decode(state, f32(q1), f32(k1), f32(v1), ctx)
        for i in range(b):
            keys[i].append(k1[i, 0]), vals[i].append(v1[i, 0])
            ref = _np_attend(q1[i, 0], np.array(keys[i]), np.array(vals[i]))
            np.testing.assert_allclose(np.asarray(out[i, 0], np.float64), ref, atol=2e-5)
        lengths += 1
    # storage: every token sits in its page slot
    kp = np.asarray(state["k_pages"])
    for i in range(b):
        for tt, key in enumerate(keys[i]):
            np.testing.assert_allclose(kp[:, table[i, tt // ps], tt % ps], key, atol=1e-6)


def test_nbytes_equals_tree_bytes():
    for dims, pol in [
        (Dims(3, 37, 4, 2, 16), Paged(page_size=8)),
        (Dims(2, 64, 9, 3, 64, dtype="bfloat16"), Paged(page_size=16, num_pages=5)),
        (Dims(1, 5, 2, 1, 8), Paged(page_size=16, dtype="float16")),
    ]:
        state = pol.init(dims)
        assert pol.nbytes(dims) == tree_bytes(state)
        mp = -(-dims.max_len // pol.page_size)
        n = pol.num_pages or dims.batch * mp
        itemsize = jnp.dtype(pol.dtype or dims.dtype).itemsize
        assert pol.nbytes(dims) == (2 * dims.n_kv_heads * n * pol.page_size * dims.head_dim
                                    * itemsize + 4 * dims.batch * mp)
        assert state["block_tables"].shape == (dims.batch, mp)


def test_registry_parse_and_validation():
    assert ml.kv.get("paged") is Paged
    assert ml.kv.parse("paged:page_size=8,num_pages=40") == Paged(page_size=8, num_pages=40)
    dims = Dims(2, 16, 4, 2, 16)
    with pytest.raises(ValueError, match="page_size"):
        Paged(page_size=0).validate(dims)
    with pytest.raises(ValueError, match="num_pages"):
        Paged(num_pages=-3).validate(dims)
    with pytest.raises(ValueError, match="power of two"):
        Paged(page_size=12, backend="interpret").validate(dims)
    with pytest.raises(ValueError, match="backend"):
        Paged(backend="cuda").validate(dims)


# --------------------------------------------------------------------------
# The tiny model: paged == dense
# --------------------------------------------------------------------------
@jax.jit
def _prefill(model, tokens, cache, n_new):
    return model(tokens, cache=cache, n_new=n_new)


@jax.jit
def _decode(model, tok, cache):
    return model(tok[:, None], cache=cache)


def _dense_run(model, tokens, n_new, steps, max_len):
    """Prefill logits at the valid positions and the decode logits of forced tokens."""
    cache = init_cache(ml.kv.get("dense")(), model.spec, tokens.shape[0], max_len)
    lg, cache = _prefill(model, tokens, cache, n_new)
    out = []
    for tok in steps:
        lg1, cache = _decode(model, tok, cache)
        out.append(lg1[:, 0])
    return lg, out


@pytest.fixture(scope="module")
def tiny_model():
    return ml.models.init("tiny", jax.random.key(0))


def test_tiny_model_shuffled_table_equals_dense(tiny_model):
    """Ragged prompts, a non-contiguous block table over a larger pool, six decode steps
    (page boundaries crossed): the logits equal the dense policy's."""
    m = tiny_model
    rng = np.random.default_rng(5)
    b, p, max_len, ps = 3, 11, 20, 4
    tokens = jnp.asarray(rng.integers(0, 256, (b, p)), jnp.int32)
    n_new = jnp.asarray([11, 6, 3], jnp.int32)
    steps = [jnp.asarray(rng.integers(0, 256, b), jnp.int32) for _ in range(6)]
    ref_pre, ref_dec = _dense_run(m, tokens, n_new, steps, max_len)

    pol = Paged(page_size=ps, num_pages=23)
    cache = init_cache(pol, m.spec, b, max_len)
    mp = pol.max_pages(cache.dims)
    table = rng.permutation(23)[: b * mp].reshape(b, mp).astype(np.int32)
    cache = with_block_tables(cache, table)
    lg, cache = _prefill(m, tokens, cache, n_new)
    valid = np.arange(p)[None] < np.asarray(n_new)[:, None]
    np.testing.assert_allclose(np.asarray(lg)[valid], np.asarray(ref_pre)[valid], atol=2e-5, rtol=0)
    for tok, ref in zip(steps, ref_dec):
        lg1, cache = _decode(m, tok, cache)
        chex.assert_trees_all_close(lg1[:, 0], ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(cache.state["block_tables"]),
                                  np.broadcast_to(table, (m.spec.n_layers,) + table.shape))
    assert tree_bytes(cache.state) == m.spec.n_layers * pol.nbytes(cache.dims)


def test_prefix_sharing_with_allocator_and_copy_on_write(tiny_model):
    """Rows 0 and 1 fork from one prompt (stored once: prefilled by row 0 only), row 2 has its
    own.  A pool smaller than the dense cache, the allocator's tables and copy-on-write copies
    through six diverging decode steps equal three independent dense runs."""
    m = tiny_model
    rng = np.random.default_rng(9)
    b, max_len, ps, p0, p2, n_steps = 3, 20, 4, 10, 7, 6
    prompt0 = rng.integers(0, 256, p0)
    prompt2 = rng.integers(0, 256, p2)
    steps = [jnp.asarray(rng.integers(0, 256, b), jnp.int32) for _ in range(n_steps)]
    dense_tokens = np.zeros((b, p0), np.int32)
    dense_tokens[0], dense_tokens[1], dense_tokens[2, :p2] = prompt0, prompt0, prompt2
    _, ref_dec = _dense_run(m, jnp.asarray(dense_tokens), jnp.asarray([p0, p0, p2]), steps,
                            max_len)

    # distinct pages at the end: row 0 16 tokens (4), row 1 its 2 shared + 2 own, row 2 13 (4)
    pol = Paged(page_size=ps, num_pages=1 + 4 + 2 + 4)
    cache = init_cache(pol, m.spec, b, max_len)
    assert pol.pool_pages(cache.dims) < b * pol.max_pages(cache.dims)   # fewer than dense
    alloc = pol.allocator(cache.dims)
    mp = pol.max_pages(cache.dims)
    alloc.allocate(0, p0)
    alloc.fork(0, 1)
    alloc.allocate(2, p2)
    s = alloc.stats()
    tb = pol.token_bytes(cache.dims)
    assert s.allocated_pages == 3 + 2 and s.shared_pages == 3
    assert s.allocated_bytes == 5 * ps * tb                        # prompt 0 stored once
    assert s.allocated_bytes + 3 * ps * tb == (3 + 3 + 2) * ps * tb   # vs a copy per sequence
    assert s.pages_saved_by_sharing == 3 and s.stored_tokens == p0 + p2

    cache = with_block_tables(cache, alloc.block_table([0, 1, 2], mp))
    _, cache = _prefill(m, jnp.asarray(dense_tokens), cache, jnp.asarray([p0, 0, p2]))
    cache = cache._replace(lengths=jnp.asarray([p0, p0, p2], jnp.int32))
    all_copies = []
    for tok, ref in zip(steps, ref_dec):
        copies = [c for i in range(b) for c in alloc.append_token(i)]
        all_copies += copies
        cache = copy_pages(cache, copies)
        cache = with_block_tables(cache, alloc.block_table([0, 1, 2], mp))
        lg1, cache = _decode(m, tok, cache)
        chex.assert_trees_all_close(lg1[:, 0], ref, atol=2e-5, rtol=2e-5)
    # one copy: row 0's first token went into the shared, partly filled page 3
    assert all_copies == [(alloc.pages(1)[2], alloc.pages(0)[2])]
    assert alloc.pages(0)[:2] == alloc.pages(1)[:2] and alloc.num_free == 0
    s = alloc.stats()
    assert (s.shared_pages, s.allocated_pages, s.used_tokens) == (2, 10, 16 + 16 + 13)
    for i in range(b):
        alloc.free(i)
    assert alloc.num_free == alloc.capacity


def test_helpers_check_their_arguments(tiny_model):
    pol = Paged(page_size=4)
    cache = init_cache(pol, tiny_model.spec, 2, 8)
    with pytest.raises(ValueError, match=r"\[B, max_pages\] = \(2, 2\)"):
        with_block_tables(cache, np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"page ids must be in \[0, num_pages=4\)"):
        with_block_tables(cache, np.full((2, 2), 4, np.int32))
    with pytest.raises(TypeError, match="Paged policy"):
        with_block_tables(init_cache(ml.kv.get("dense")(), tiny_model.spec, 2, 8),
                          np.zeros((2, 2), np.int32))
    assert copy_pages(cache, []) is cache
    key = jax.random.key(3)
    cache = cache._replace(state={**cache.state, "k_pages": jax.random.normal(
        key, cache.state["k_pages"].shape)})
    out = copy_pages(cache, [(1, 3)])
    np.testing.assert_array_equal(out.state["k_pages"][:, :, 3], cache.state["k_pages"][:, :, 1])
    np.testing.assert_array_equal(out.state["k_pages"][:, :, :3], cache.state["k_pages"][:, :, :3])
