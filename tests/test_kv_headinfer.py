"""HeadInfer (memlab.kv.headinfer): head-wise attention over a KV cache in host memory.

The policy against float64 numpy attention, the tiny model against the dense cache, the
placement read from the compiled HLO (``S(5)`` host memory space) and the per-group
transfers read from the program lowered for CUDA, the exact byte formulas, the errors."""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.generate import make_cache
from memlab.generate import _prefill as gen_prefill
from memlab.generate import _step as gen_step
from memlab.generate import generate_ids
from memlab.kv.base import Dims, StepCtx, init_cache
from memlab.kv.headinfer import HeadInfer, host_memory_kinds
from memlab.memory import tree_bytes

HOST = "pinned_host" if "pinned_host" in host_memory_kinds() else "unpinned_host"


def _np_attend(q, k, v):
    """q [H, D] over k, v [S, Hkv, D] (all visible), float64; head h reads KV head h // rep."""
    rep = q.shape[0] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("hd,shd->hs", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hs,shd->hd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("heads", [1, 3])
def test_policy_prefill_decode_match_float64(heads):
    """Ragged prompts then decode steps with odd shapes (3 KV heads, 6 query heads, max_len 13);
    the state stays in host memory and holds every token at its position."""
    rng = np.random.default_rng(heads)
    b, h, hkv, d, max_len, t = 3, 6, 3, 8, 13, 5
    dims = Dims(batch=b, max_len=max_len, n_heads=h, n_kv_heads=hkv, head_dim=d)
    pol = HeadInfer(heads=heads, memory_kind=HOST)
    pol.validate(dims)
    state = pol.init(dims)
    assert {a.sharding.memory_kind for a in state.values()} == {HOST}
    prefill, decode = jax.jit(pol.prefill), jax.jit(pol.decode)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    n_new = np.array([5, 2, 4])
    q, k, v = (rng.standard_normal((b, t, x, d)) for x in (h, hkv, hkv))
    pos = np.broadcast_to(np.arange(t), (b, t))
    ctx = StepCtx(jnp.asarray(pos, jnp.int32), jnp.asarray(n_new, jnp.int32),
                  jnp.zeros(b, jnp.int32), jnp.int32(0), f32(k), None)
    out, state = prefill(state, f32(q), f32(k), f32(v), ctx)
    keys = [list(k[i, :n_new[i]]) for i in range(b)]
    vals = [list(v[i, :n_new[i]]) for i in range(b)]
    for i in range(b):
        for j in range(n_new[i]):
            ref = _np_attend(q[i, j], np.array(keys[i][: j + 1]), np.array(vals[i][: j + 1]))
            np.testing.assert_allclose(np.asarray(out[i, j], np.float64), ref, atol=2e-5)
    lengths = n_new.copy()
    for _ in range(6):
        q1, k1, v1 = (rng.standard_normal((b, 1, x, d)) for x in (h, hkv, hkv))
        ctx = StepCtx(jnp.asarray(lengths[:, None], jnp.int32), jnp.ones(b, jnp.int32),
                      jnp.asarray(lengths, jnp.int32), jnp.int32(0), f32(k1), None)
        out, state = decode(state, f32(q1), f32(k1), f32(v1), ctx)
        for i in range(b):
            keys[i].append(k1[i, 0]), vals[i].append(v1[i, 0])
            ref = _np_attend(q1[i, 0], np.array(keys[i]), np.array(vals[i]))
            np.testing.assert_allclose(np.asarray(out[i, 0], np.float64), ref, atol=2e-5)
        lengths += 1
    assert {a.sharding.memory_kind for a in state.values()} == {HOST}
    kh = np.asarray(state["k"])
    for i in range(b):
        np.testing.assert_allclose(kh[i, :len(keys[i])], np.array(keys[i]), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    return ml.models.init("tiny", jax.random.key(11))


def _run(model, tokens, lengths, max_len, n_steps):
    """Prefill, then greedy decode steps through memlab.generate's jitted step; the logits."""
    cache = make_cache(model, tokens.shape[0], max_len)
    logits, cache = gen_prefill(model, tokens, lengths, cache)
    out = [logits]
    for _ in range(n_steps):
        _, logits, cache = gen_step(model, logits, cache, jax.random.key(0), jnp.float32(0),
                                    jnp.float32(1))
        out.append(logits)
    return jnp.stack(out), cache


def test_tiny_model_equals_dense_and_cache_stays_on_host(tiny_model):
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 256, n)) for n in (9, 3, 6)]
    tokens = np.zeros((3, 9), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    tokens, lengths = jnp.asarray(tokens), jnp.asarray([9, 3, 6], jnp.int32)
    # cache_len and steps as generate_ids(prompts, 6) uses: the jitted steps are shared
    ref, dense_cache = _run(tiny_model, tokens, lengths, 15, 6)
    model = ml.passes.kv_compress("headinfer:heads=1")(tiny_model)
    got, cache = _run(model, tokens, lengths, 15, 6)
    chex.assert_trees_all_close(got, ref, atol=1e-5, rtol=1e-5)
    assert {a.sharding.memory_kind for a in cache.state.values()} == {HOST}
    for i, n in enumerate([9 + 6, 3 + 6, 6 + 6]):      # every written position: the dense K, V
        np.testing.assert_allclose(np.asarray(cache.state["k"])[:, i, :n],
                                   np.asarray(dense_cache.state["k"])[:, i, :n], atol=1e-5)
        np.testing.assert_allclose(np.asarray(cache.state["v"])[:, i, :n],
                                   np.asarray(dense_cache.state["v"])[:, i, :n], atol=1e-5)
    assert generate_ids(model, prompts, 6) == generate_ids(tiny_model, prompts, 6)


def _entry_layout(compiled_text):
    """(parameter layouts, output layouts) of the entry computation, as shape strings."""
    layout = re.search(r"entry_computation_layout=\{(.*?)\}(?:, \w+=|\n)", compiled_text).group(1)
    params, outs = layout.split(")->(")
    split = lambda s: re.findall(r"\w+\[[\d,]*\]\{[^}]*\}", s)  # noqa: E731
    return split(params), split(outs)


def test_compiled_decode_step_keeps_the_cache_in_host_memory_space(tiny_model):
    """The compiled decode step's cache parameters and outputs are in memory space S(5) (host);
    the same program with the cache left on the device is not -- offload that silently does
    nothing would fail here."""
    logits = jax.random.normal(jax.random.key(4), (2, 256))
    for policy, host in (("headinfer:heads=1", True), ("headinfer:memory_kind=device", False)):
        model = ml.passes.kv_compress(policy)(tiny_model)
        cache = make_cache(model, 2, 11, lengths=3)
        compiled = gen_step.lower(model, logits, cache, jax.random.key(0), jnp.float32(0),
                                  jnp.float32(1)).compile()
        params, outs = _entry_layout(compiled.as_text())
        shape = "f32[2,2,11,2,16]"                  # [layers, B, max_len, Hkv, D]
        cache_in = [p for p in params if p.startswith(shape)]
        cache_out = [p for p in outs if p.startswith(shape)]
        assert len(cache_in) == len(cache_out) == 2, (policy, params, outs)
        assert all((":S(5)" in p) == host for p in cache_in + cache_out), (policy, cache_in, cache_out)
        assert not any(":S(5)" in p for p in params + outs if not p.startswith(shape))


def _placements(lowered_text):
    """[(placement, shape tuple)] of every annotate_device_placement in a lowered program."""
    pat = (r'annotate_device_placement\(.*?_xla_buffer_placement = "(\w+)".*?: '
           r'\(tensor<([\dx]+)x\w+>\)')
    return [(p, tuple(int(x) for x in s.split("x"))) for p, s in re.findall(pat, lowered_text)]


@pytest.mark.parametrize("heads", [1, 2])
def test_cuda_lowering_moves_one_head_group_to_device(tiny_model, heads):
    """Lowered for CUDA (where JAX emits the transfers; CPU lowers them to nothing), the decode
    step moves exactly one head group's K and V of one layer to the device per group step and
    the new token's K and V to host: the bytes of device_bytes()."""
    model = ml.passes.kv_compress(f"headinfer:heads={heads}")(tiny_model)
    b, max_len = 3, 13
    cache = make_cache(model, b, max_len, lengths=4)
    logits = jax.random.normal(jax.random.key(1), (b, 256))
    text = gen_step.trace(model, logits, cache, jax.random.key(0), jnp.float32(0),
                          jnp.float32(1)).lower(lowering_platforms=("cuda",)).as_text()
    moves = _placements(text)
    spec, pol = tiny_model.spec, model.extra("kv_policy")
    to_device = [s for p, s in moves if p == "device"]
    to_host = [s for p, s in moves if p == "pinned_host"]
    assert to_device == [(b, max_len, heads, spec.head_dim)] * 2      # K, V in the group scan body
    assert to_host == [(b, 1, spec.n_kv_heads, spec.head_dim)] * 2    # the new token's K, V
    dims = cache.dims
    nbytes = lambda shapes: sum(int(np.prod(s)) * 4 for s in shapes)  # noqa: E731
    assert nbytes(to_device) == pol.group_bytes(dims)
    assert nbytes(to_device) + nbytes(to_host) == pol.device_bytes(dims)
    assert pol.groups(dims) == spec.n_kv_heads // heads
    # the dense policy moves nothing
    dense = ml.passes.kv_compress("dense")(tiny_model)
    dcache = make_cache(dense, b, max_len, lengths=4)
    dtext = gen_step.trace(dense, logits, dcache, jax.random.key(0), jnp.float32(0),
                           jnp.float32(1)).lower(lowering_platforms=("cuda",)).as_text()
    assert _placements(dtext) == []


def test_byte_formulas_are_exact():
    for dims, pol in [
        (Dims(3, 37, 6, 3, 8, n_layers=2), HeadInfer(heads=1)),
        (Dims(2, 64, 9, 3, 64, dtype="bfloat16", n_layers=30), HeadInfer(heads=3)),
        (Dims(1, 5, 4, 2, 16), HeadInfer(heads=2, dtype="float16")),
    ]:
        itemsize = jnp.dtype(pol.dtype or dims.dtype).itemsize
        state = pol.init(dims)
        assert pol.nbytes(dims) == tree_bytes(state)
        assert pol.nbytes(dims) == 2 * dims.batch * dims.max_len * dims.n_kv_heads * dims.head_dim * itemsize
        assert pol.host_bytes(dims) == dims.n_layers * tree_bytes(state)
        group = 2 * dims.batch * dims.max_len * pol.heads * dims.head_dim * itemsize
        new = 2 * dims.batch * 1 * dims.n_kv_heads * dims.head_dim * itemsize
        assert pol.group_bytes(dims) == group and pol.device_bytes(dims) == group + new
        assert pol.device_bytes(dims, tokens=7) == group + 7 * new
    # SmolLM2-135M, bf16, B=1, 32k tokens: what the device holds vs the whole cache
    smol = Dims(1, 32768, 9, 3, 64, dtype="bfloat16", n_layers=30)
    pol = HeadInfer(heads=1)
    ratio = pol.host_bytes(smol) / pol.device_bytes(smol)
    assert 89 < ratio < 90                        # 30 layers x 3 heads, less the new token
    print(f"\nSmolLM2 bf16 32k: host {pol.host_bytes(smol) / 2**20:.1f} MiB, device "
          f"{pol.device_bytes(smol) / 2**20:.3f} MiB ({ratio:.1f}x less)")


def test_whole_cache_bytes_match_init_cache(tiny_model):
    pol = HeadInfer(heads=1)
    cache = init_cache(pol, tiny_model.spec, 3, 19)
    assert tree_bytes(cache.state) == pol.host_bytes(cache.dims)
    assert {a.sharding.memory_kind for a in cache.state.values()} == {"pinned_host"}


def test_registry_and_errors(tiny_model):
    assert ml.kv.get("headinfer") is HeadInfer
    assert ml.kv.parse("headinfer:heads=2,dtype=bfloat16") == HeadInfer(heads=2, dtype="bfloat16")
    dims = Dims(2, 16, 6, 3, 8)
    with pytest.raises(ValueError, match=r"heads=2 must divide the model's n_kv_heads=3"):
        HeadInfer(heads=2).validate(dims)
    with pytest.raises(ValueError, match=r"heads=0 must be a positive int"):
        HeadInfer(heads=0).validate(dims)
    with pytest.raises(ValueError, match=r"memory_kind='hbm' is not a memory of .*choose one of"):
        HeadInfer(memory_kind="hbm").validate(dims)
    with pytest.raises(ValueError, match="not a float dtype"):
        HeadInfer(dtype="int8").validate(dims)
    with pytest.raises(ValueError, match="must divide"):
        init_cache(HeadInfer(heads=3), tiny_model.spec, 1, 8)       # tiny has 2 KV heads
    pol = HeadInfer()
    state = pol.init(dims)
    x = jnp.ones((2, 20, 6, 8))
    kx = jnp.ones((2, 20, 3, 8))
    ctx = StepCtx(jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20)),
                  jnp.full((2,), 20, jnp.int32), jnp.zeros(2, jnp.int32), jnp.int32(0), kx, None)
    with pytest.raises(ValueError, match="20 prompt tokens do not fit a cache of max_len 16"):
        pol.prefill(state, x, kx, kx, ctx)
