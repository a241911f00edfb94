"""The model calls attention in the forms the fast kernels need.

* No cache (train, scoring) and a fresh cache (prefill): ``causal=True`` with
  default positions, so the flash kernels skip the tiles above the diagonal and
  cuDNN can run the call.
* Decode: :func:`memlab.nn.decode_attention` (the split-K kernel on GPU/TPU).
* The flash kernels declare the FLOPs of the tiles they visit, checked against a
  brute-force count of the tiles the mask leaves any visible key in.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab import cache as cache_mod
from memlab.generate import make_cache
from memlab.nn.attention import attention_hook
from memlab.targets import kernels as K
from memlab_kernels import flash_attention as FA
from memlab_kernels.attention_reference import attention_reference


def _record(calls):
    def hook(q, k, v, scale=None, **mask):
        calls.append(dict(t=q.shape[1], s=k.shape[1], **mask))
        return attention_reference(q, k, v, scale=scale, **mask)
    return hook


def test_no_cache_and_fresh_prefill_use_default_positions(tiny):
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 256)
    train, prefill = [], []
    with attention_hook(_record(train)):
        jax.eval_shape(tiny, tokens)
    with attention_hook(_record(prefill)):
        jax.eval_shape(lambda c: tiny(tokens, cache=c), make_cache(tiny, 2, 16))
    assert train and prefill
    for c in train + prefill:
        assert c["causal"] and c["q_positions"] is None and c["kv_positions"] is None, c
        assert c["t"] == c["s"] == 9


def test_decode_runs_the_decode_attention_and_matches_a_full_forward(tiny, monkeypatch):
    seen = []
    real = cache_mod.decode_attention

    def spy(q, k, v, lengths, **kw):
        seen.append((q.shape, k.shape))
        return real(q, k, v, lengths, **kw)

    monkeypatch.setattr(cache_mod, "decode_attention", spy)
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, 256, (3, 8)), jnp.int32)
    cache = make_cache(tiny, 3, 12)
    _, cache = tiny(tokens[:, :7], cache=cache)
    assert not cache.fresh and not seen
    last, cache = tiny(tokens[:, 7:], cache=cache)
    assert seen and set(seen) == {((3, 4, 16), (3, 12, 2, 16))}
    chex.assert_trees_all_close(last, tiny(tokens)[:, 7:], atol=1e-5, rtol=1e-5)


def test_decode_follows_the_models_static_attention_choice(tiny, monkeypatch):
    seen = []
    real = cache_mod.decode_attention

    def spy(q, k, v, lengths, **kw):
        seen.append(kw.get("impl"))
        return real(q, k, v, lengths, **kw)

    monkeypatch.setattr(cache_mod, "decode_attention", spy)
    tokens = jnp.zeros((2, 1), jnp.int32)
    for choice, want in (("interpret", "interpret"), ("naive", "xla"), ("auto", "auto")):
        model = tiny.with_dispatch(attention=choice)
        seen.clear()
        jax.eval_shape(lambda m, c: m(tokens, cache=c), model, make_cache(model, 2, 8, lengths=3))
        assert seen and set(seen) == {want}, (choice, seen)


def _tiles_needed(t, s, causal, window, bq, bk):
    """Brute force: tiles holding at least one visible (query, key) pair, bottom-right
    aligned default positions (query i at s - t + i)."""
    qp = np.arange(t)[:, None] + (s - t)
    kp = np.arange(s)[None, :]
    vis = np.ones((t, s), bool)
    if causal:
        vis &= kp <= qp
    if window is not None:
        vis &= (qp - kp) < window
        if not causal:
            vis &= (kp - qp) < window
    nq, nk = -(-t // bq), -(-s // bk)
    return sum(vis[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()
               for i in range(nq) for j in range(nk)), nq * nk, nq


@pytest.mark.parametrize("t,s,causal,window,bq,bk", [
    (256, 256, True, None, 64, 32), (100, 300, True, None, 32, 64),
    (512, 512, True, 100, 64, 64), (200, 200, False, 50, 32, 32), (77, 77, True, None, 16, 16)])
def test_visited_tiles_cover_the_mask_and_skip_the_rest(t, s, causal, window, bq, bk):
    ms = FA._MaskSpec(t=t, s=s, causal=causal, window=window, q_pos=False, kv_pos=False,
                      segments=False)
    needed, total, nq = _tiles_needed(t, s, causal, window, bq, bk)
    visited = FA._visited(ms, bq, bk) * total
    # every tile with a visible key is computed; at most one extra per row of tiles
    assert needed <= round(visited) <= needed + nq, (needed, visited)
    pos = FA._MaskSpec(t=t, s=s, causal=causal, window=window, q_pos=True, kv_pos=True,
                       segments=False)
    assert FA._visited(pos, bq, bk) == 1.0       # explicit positions: nothing skipped


def test_causal_train_step_declares_about_half_the_attention_flops():
    """The tiny model's gradient with the Triton flash kernel: default positions (what
    the model passes) against explicit positions (every tile computed)."""
    cfg = ml.models.config("tiny", attention="pallas_triton", max_seq_len=1024)
    model = ml.models.abstract(cfg)
    tokens = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    after = K.train_attention_flops(model, tokens)
    before = K.train_attention_flops(model, tokens, explicit_positions=True)
    assert set(after) == set(before) == {"flash_attention_fwd", "flash_attention_bwd_dkv",
                                         "flash_attention_bwd_dq"}
    # T = S = 1024 in tiles of 128 queries: (8 + 1) / 16 of the tiles on the diagonal's side
    for name in after:
        assert after[name] == pytest.approx(before[name] * 9 / 16, rel=0.02), name
