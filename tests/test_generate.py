"""The generation engine: sampling, streaming, policy caches, the kv_compress pass."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.generate import generate_ids, sample, stream


def test_top_p_sampling_matches_the_nucleus_distribution():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 12)) * 2.0
    temperature, top_p = 0.7, 0.8
    # float64 reference: softmax at temperature, the smallest prefix reaching top_p, renormalized
    z = logits[0] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    kept = order[before < top_p]
    ref = np.zeros_like(p)
    ref[kept] = p[kept] / p[kept].sum()

    n = 20000
    keys = jax.random.split(jax.random.key(1), n)
    draw = jax.jit(jax.vmap(lambda k: sample(jnp.asarray(logits, jnp.float32), k,
                                             jnp.float32(temperature), jnp.float32(top_p))[0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=12) / n
    assert set(np.flatnonzero(counts)) <= set(kept.tolist())      # nothing outside the nucleus
    np.testing.assert_allclose(counts, ref, atol=0.015)


def test_greedy_and_tiny_top_p_are_argmax():
    logits = jax.random.normal(jax.random.key(2), (5, 50))
    want = np.asarray(jnp.argmax(logits, -1))
    got0 = sample(logits, jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0))
    got1 = sample(logits, jax.random.key(0), jnp.float32(1.0), jnp.float32(1e-6))
    np.testing.assert_array_equal(np.asarray(got0), want)
    np.testing.assert_array_equal(np.asarray(got1), want)


def test_stream_yields_what_generate_collects_and_stops(tiny):
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    rows = list(stream(tiny, prompts, 6))
    collected = generate_ids(tiny, prompts, 6)
    assert [[r[i] for r in rows if r[i] is not None] for i in range(2)] == collected
    stop = collected[0][2]
    out = generate_ids(tiny, prompts, 6, stop_tokens=[stop])
    assert out[0] == collected[0][:collected[0].index(stop) + 1]


def test_dense_policy_cache_generates_like_the_plain_cache(tiny):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4, 4, 4, 4]]
    plain = generate_ids(tiny, prompts, 8)
    via_policy = generate_ids(ml.passes.kv_compress("dense")(tiny), prompts, 8)
    assert plain == via_policy


def test_kv_compress_pass_profile_bytes_are_exact(tiny):
    model = ml.passes.kv_compress(ml.kv.parse("dense:dtype=bfloat16"))(tiny)
    report = ml.memory.profile(model, "decode", batch=3, seq=40)
    spec = tiny.spec
    want = 2 * spec.n_layers * 3 * 40 * spec.n_kv_heads * spec.head_dim * 2 + 3 * 4
    assert report.by_category["kv_cache"] == want
    assert report.analytic["kv_cache"] == want


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(tiny, [[1, 2]], 4, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate_ids(tiny, [[1, 2]], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="non-empty"):
        generate_ids(tiny, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="cache_len"):
        generate_ids(tiny, [[1, 2, 3]], 4, cache_len=5)
    with pytest.raises(ValueError, match="unknown kv policy 'nope'"):
        ml.kv.parse("nope")
    with pytest.raises(ValueError, match="key=value"):
        ml.kv.parse("dense:bfloat16")
    with pytest.raises(TypeError, match="kv_compress"):
        ml.passes.kv_compress(3)


def test_parse_bits_suffix():
    chex.assert_equal(ml.kv.parse("dense:dtype=float16"), ml.kv.get("dense")(dtype="float16"))


def _reference_greedy(model, prompts, n, stop=()):
    """Greedy decoding written independently of the engine: each step re-runs the whole
    sequence through the model without a cache and takes the argmax of its last logits."""
    fwd = jax.jit(lambda m, t: m(t))
    out = []
    for p in prompts:
        seq, new = list(p), []
        for _ in range(n):
            tok = int(np.argmax(np.asarray(fwd(model, jnp.asarray([seq], jnp.int32)))[0, -1]))
            new.append(tok)
            seq.append(tok)
            if tok in stop:
                break
        out.append(new)
    return out


def test_device_loop_equals_uncached_greedy_across_chunks_and_stops(tiny):
    """The chunked device loop (ragged prompts, chunk boundaries inside the run, a stop
    token that ends one row early) against greedy decoding without any cache."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [200, 17, 90]]
    want = _reference_greedy(tiny, prompts, 7)
    for chunk in (1, 3, 16):
        assert generate_ids(tiny, prompts, 7, chunk=chunk) == want
    stop = want[1][2]                                  # row 1 stops at its third token
    got = generate_ids(tiny, prompts, 7, chunk=3, stop_tokens=[stop])
    assert got == [w[:w.index(stop) + 1] if stop in w else w for w in want]
    rows = list(stream(tiny, prompts, 7, chunk=3, stop_tokens=[stop]))
    assert len(rows) == 7 and rows[3][1] is None and rows[2][1] == stop


def test_prefill_and_decode_api(tiny):
    """prefill's next-token logits equal the uncached model's at each row's last real token
    (a right-padded batch); decode returns [B, steps] with -1 after a row's stop token."""
    from memlab.generate import decode, prefill
    prompts = [[9, 8, 7, 6, 5], [1, 2]]
    logits, cache = prefill(tiny, prompts, cache_len=12)
    for i, p in enumerate(prompts):
        full = np.asarray(tiny(jnp.asarray([p], jnp.int32)))[0, -1]
        np.testing.assert_allclose(np.asarray(logits[i]), full, atol=2e-5, rtol=0)
    want = _reference_greedy(tiny, prompts, 6)
    stop = want[0][1]
    toks = decode(tiny, logits, cache, 6, chunk=4, stop_tokens=[stop])
    expect = np.full((2, 6), -1, np.int32)
    for i, w in enumerate(want):
        w = w[:w.index(stop) + 1] if stop in w[:6] else w
        expect[i, :len(w)] = w
    np.testing.assert_array_equal(toks, expect)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        decode(tiny, *prefill(tiny, prompts, cache_len=12), 0)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        next(iter(ml.generate.decode_chunks(tiny, *prefill(tiny, prompts, cache_len=12), 3,
                                            chunk=0)))
    with pytest.raises(ValueError, match="integer token ids"):
        prefill(tiny, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="cache_len=2 is shorter"):
        prefill(tiny, prompts, cache_len=2)


def test_sampling_runs_only_the_chosen_branch_and_temperature_distribution():
    """temperature > 0 with top_p = 1 draws from softmax(logits / T) (no sort); the
    compiled step contains the sort only inside the nucleus branch of a conditional."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((1, 10)) * 1.5
    z = logits[0] / 0.5
    ref = np.exp(z - z.max())
    ref /= ref.sum()
    keys = jax.random.split(jax.random.key(4), 20000)
    draw = jax.jit(jax.vmap(lambda k: sample(jnp.asarray(logits, jnp.float32), k,
                                             jnp.float32(0.5), jnp.float32(1.0))[0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=10) / len(keys)
    np.testing.assert_allclose(counts, ref, atol=0.015)
    jaxpr = jax.make_jaxpr(sample)(jnp.zeros((2, 10)), jax.random.key(0), 0.0, 1.0)
    top = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert "sort" not in top and "cond" in top          # the sort is inside a branch
