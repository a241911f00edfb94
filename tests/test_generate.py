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
