"""memlab.nn.attention: the dispatcher's choices, overrides, and a whole model in O(T) attention memory."""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.models.llama import Llama


def np_causal(q, k, v, lengths=None):
    q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    s, g = k.shape[1], h // k.shape[2]
    k, v = np.repeat(k, g, 2), np.repeat(v, g, 2)
    sc = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    vis = np.arange(s)[None, :] <= (np.arange(t) + s - t)[:, None]
    vis = np.broadcast_to(vis, (b, t, s))
    if lengths is not None:
        vis = vis & (np.arange(s)[None, None, :] < np.asarray(lengths)[:, None, None])
    sc = np.where(vis[:, None], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def qkv(b, t, s, h, hkv, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, sh, jnp.float32).astype(dtype) for kk, sh in
                 zip(ks, ((b, t, h, d), (b, s, hkv, d), (b, s, hkv, d))))


def test_choices_by_platform_and_shape():
    small = qkv(1, 64, 64, 4, 2, 64)
    big = [jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.float32),
           jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.float32)] * 1
    big = (big[0], big[1], big[1])
    assert ml.nn.choose(*small, causal=True, platform="cpu")[0] == "blocked"
    assert ml.nn.choose(*small, platform="cpu")[0] == "naive"          # not causal
    pos = jnp.arange(64)[None]
    assert ml.nn.choose(*small, causal=True, q_positions=pos, kv_positions=pos,
                        platform="cpu")[0] == "naive"                  # explicit positions
    name, why = ml.nn.choose(*big, causal=True, platform="cpu")
    assert name == "blocked" and "MiB" in why    # one 128-row block of scores: 16 MiB
    name, why = ml.nn.choose(*big, platform="cpu")
    assert name == "chunked" and "MiB" in why    # not causal: 512 MiB of scores
    huge = tuple(jax.ShapeDtypeStruct((1, 32768) + a.shape[2:], a.dtype) for a in big)
    assert ml.nn.choose(*huge, causal=True, platform="cpu")[0] == "chunked"  # 128 MiB blocks
    assert ml.nn.choose(*small, platform="tpu")[0] == "pallas_tpu"
    bf = tuple(a.astype(jnp.bfloat16) for a in small)
    assert ml.nn.choose(*bf, causal=True, platform="gpu")[0] == "cudnn"
    # cuDNN cannot: float32, explicit positions, causal with T != S
    assert ml.nn.choose(*small, causal=True, platform="gpu")[0] == "pallas_triton"
    pos = jnp.zeros((1, 64), jnp.int32)
    assert ml.nn.choose(*bf, causal=True, q_positions=pos, platform="gpu")[0] == "pallas_triton"
    short_q = (bf[0][:, :5],) + bf[1:]
    name, why = ml.nn.choose(*short_q, causal=True, platform="gpu")
    assert name == "pallas_triton" and "top-left" in why


@pytest.mark.parametrize("impl", ["naive", "blocked", "chunked", "xla", "auto"])
def test_every_cpu_impl_matches_float64(impl):
    q, k, v = qkv(2, 33, 33, 4, 2, 16, seed=1)
    got = ml.nn.attention(q, k, v, causal=True, impl=impl)
    chex.assert_trees_all_close(np.asarray(got, np.float64), np_causal(q, k, v), atol=3e-5)


def np_windowed(q, k, v, window):
    """float64 causal sliding-window self-attention (a query at p sees (p - window, p])."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    k, v = np.repeat(k, g, 2), np.repeat(v, g, 2)
    sc = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    sc = np.where((j <= i) & (j > i - window), sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("t,block,window", [(45, 16, None), (45, 16, 7), (37, 128, None),
                                            (50, 8, 20)])
def test_blocked_matches_float64_with_gradient(t, block, window):
    """Block-causal attention at odd lengths (a ragged last block), with and without a
    window, against float64 numpy; its gradient against the reference's."""
    from memlab_kernels.attention_reference import attention_reference
    from memlab_kernels.blocked_attention import blocked_attention
    q, k, v = qkv(2, t, t, 6, 2, 16, seed=t + block)
    got = blocked_attention(q, k, v, window=window, block=block)
    chex.assert_trees_all_close(np.asarray(got, np.float64), np_windowed(q, k, v, window or t),
                                atol=3e-5)
    ct = jax.random.normal(jax.random.key(5), got.shape)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * ct), argnums=(0, 1, 2))(q, k, v)
             for f in (lambda *a: blocked_attention(*a, window=window, block=block),
                       lambda *a: attention_reference(*a, causal=True, window=window))]
    chex.assert_trees_all_close(grads[0], grads[1], atol=5e-5)


def test_blocked_errors_and_fallback():
    from memlab_kernels.blocked_attention import blocked_attention
    q, k, v = qkv(1, 8, 12, 2, 1, 8, seed=6)
    with pytest.raises(ValueError, match="T == S"):
        blocked_attention(q, k, v)
    with pytest.raises(ValueError, match="block must be a positive int"):
        blocked_attention(q, k[:, :8], v[:, :8], block=0)
    # impl="blocked" on a call it cannot run (keys beyond the queries) runs the reference
    got = ml.nn.attention(q, k, v, causal=True, impl="blocked")
    chex.assert_trees_all_close(np.asarray(got, np.float64), np_causal(q, k, v), atol=3e-5)


def test_context_override_and_errors():
    q, k, v = qkv(1, 8, 8, 2, 1, 8, seed=2)
    with ml.nn.use_attention("chunked"):
        jaxpr = str(jax.make_jaxpr(lambda *a: ml.nn.attention(*a, causal=True))(q, k, v))
    assert "name=_attend" in jaxpr and "_blocked" not in jaxpr   # the chunked path
    jaxpr = str(jax.make_jaxpr(lambda *a: ml.nn.attention(*a, causal=True))(q, k, v))
    assert "name=_blocked" in jaxpr              # back to auto: blocked at this size
    with pytest.raises(ValueError, match="impl='flash' is not one of"):
        ml.nn.attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="cuDNN|cudnn"):
        ml.nn.attention(q, k, v, impl="cudnn")   # float32 is not a cuDNN dtype
    with pytest.raises(ValueError, match="use impl='naive' or 'chunked'"):
        ml.nn.attention(q, k, v, impl="xla", segment_ids=jnp.zeros((1, 8), jnp.int32))


def test_decode_xla_matches_float64():
    q, k, v = qkv(3, 1, 20, 6, 2, 16, seed=4)
    lengths = jnp.array([20, 7, 1])
    got = ml.nn.decode_attention(q[:, 0], k, v, lengths)
    ref = np.stack([np_causal(q[i:i + 1], k[i:i + 1, :int(n)], v[i:i + 1, :int(n)])[0, 0]
                    for i, n in enumerate(lengths)])
    chex.assert_trees_all_close(np.asarray(got, np.float64), ref, atol=3e-5)


def test_model_outputs_agree_across_impls(tiny):
    tokens = jax.random.randint(jax.random.key(3), (2, 40), 0, 256)
    logits = {}
    for impl in ("naive", "chunked"):
        cfg = dataclasses.replace(tiny.spec, attention=impl)
        logits[impl] = Llama(cfg).apply({"params": tiny.params}, tokens)[0]
    chex.assert_trees_all_close(logits["naive"], logits["chunked"], atol=2e-4, rtol=2e-4)


def test_whole_model_trains_in_linear_attention_memory(tiny):
    """A train step at T=4096: naive attention's temp grows with T^2; the auto path's
    (blocked forward, chunked gradient at this length) grows with T."""
    def temp(impl, seq):
        cfg = dataclasses.replace(tiny.spec, attention=impl, max_seq_len=seq)
        model = tiny.replace(spec=cfg, module=Llama(cfg))
        return ml.memory.profile(model, task="train", batch=1, seq=seq).temp_bytes

    naive, auto, half = temp("naive", 4096), temp("auto", 4096), temp("auto", 2048)
    # tiny: 4 heads x 4096^2 float32 scores = 256 MiB per layer in the naive path
    assert naive >= 4 * 4096 * 4096 * 4
    assert naive >= 10 * auto, (naive, auto)
    assert auto <= 2.5 * half, (auto, half)     # twice the tokens, about twice the bytes


def test_interpret_impl_runs_the_pallas_flash_kernel_with_gradients():
    q, k, v = qkv(2, 45, 45, 4, 2, 16, seed=9)
    got = ml.nn.attention(q, k, v, causal=True, impl="interpret")
    chex.assert_trees_all_close(np.asarray(got, np.float64), np_causal(q, k, v), atol=3e-5)
    ct = jax.random.normal(jax.random.key(10), q.shape)
    loss = lambda impl: lambda *a: jnp.sum(ml.nn.attention(*a, causal=True, impl=impl) * ct)  # noqa: E731
    g_kernel = jax.grad(loss("interpret"), (0, 1, 2))(q, k, v)
    g_naive = jax.grad(loss("naive"), (0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(g_kernel, g_naive, atol=5e-5, rtol=5e-5)


def test_decode_interpret_runs_the_split_k_kernel():
    q, k, v = qkv(3, 1, 40, 8, 2, 16, seed=12)
    lengths = jnp.array([40, 17, 3])
    got = ml.nn.decode_attention(q[:, 0], k, v, lengths, impl="interpret")
    want = ml.nn.decode_attention(q[:, 0], k, v, lengths, impl="xla")
    chex.assert_trees_all_close(got, want, atol=3e-5)


def test_model_runs_through_the_flash_kernel(tiny):
    tokens = jax.random.randint(jax.random.key(4), (2, 24), 0, 256)
    out = {}
    for impl in ("naive", "interpret"):
        cfg = dataclasses.replace(tiny.spec, attention=impl)
        out[impl] = Llama(cfg).apply({"params": tiny.params}, tokens)
    chex.assert_trees_all_close(out["naive"], out["interpret"], atol=2e-4, rtol=2e-4)
