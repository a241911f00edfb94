"""The shard pass on the KV cache (8 simulated CPU devices, tests/conftest.py): rows over the
data axes, KV heads over the tensor axis (Megatron: each device keeps its own heads' cache),
for the dense cache and memlab's compressed policies.  Prefill + greedy decode under dp, tp
and dp x tp equal the unsharded model; per-device bytes read from the arrays' addressable
shards equal the policies' own byte formulas at the per-device batch and head counts; a
compiled decode step's argument bytes are the per-device params + cache + tokens."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.generate import generate_ids
from memlab.generate import make_cache
from memlab.kv.base import Dims
from memlab.memory.bytes import tree_bytes

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

# 8 query heads over 4 KV heads (GQA): the 'model' axis (2 or 4) divides both
CFG = ml.models.config("tiny", n_heads=8, n_kv_heads=4, vocab_size=256)
B, S, T, STEPS = 8, 32, 11, 4          # rows, cache length, prompt (odd), decode steps
KIVI = "kivi:bits=2,group_size=8,residual=16"
POLICIES = {"dense": None, "kivi2": KIVI, "paged": "paged:page_size=8",
            "snapkv": "snapkv:budget=20,window=4", "palu": "palu:head_group=2"}
MESHES = {  # name: (mesh shape, axis names, strategy, data factor, tensor factor)
    "dp": ((8,), ("data",), ml.shard.dp("data"), 8, 1),
    "tp": ((2, 4), ("data", "model"), ml.shard.tp("model"), 1, 4),
    "dp_tp": ((2, 4), ("data", "model"), ml.shard.tp("model", data="data"), 2, 4),
}


@pytest.fixture(scope="module")
def base():
    return ml.models.init(CFG, jax.random.key(3))


@pytest.fixture(scope="module")
def prompt():
    tokens = jax.random.randint(jax.random.key(5), (B, T), 0, CFG.vocab_size)
    lengths = jax.random.randint(jax.random.key(6), (B,), 3, T + 1).astype(jnp.int32)
    return tokens, lengths


def _with_policy(model, policy):
    return model if policy is None else ml.passes.kv_compress(policy)(model)


@jax.jit
def _run(model, tokens, lengths, cache):
    """Prefill right-padded prompts, then STEPS greedy decode steps (one scanned body):
    logits [B, 1 + STEPS, V] and the final cache."""
    from memlab.generate import _prefill  # the engine's own prefill
    last, cache = _prefill(model, tokens, lengths, cache)

    def step(carry, _):
        prev, cache = carry
        nxt = jnp.argmax(prev, axis=-1).astype(jnp.int32)[:, None]
        out, cache = model(nxt, cache=cache, last_only=True)
        return (out[:, 0], cache), out[:, 0]
    (_, cache), outs = jax.lax.scan(step, (last, cache), None, length=STEPS)
    return jnp.concatenate([last[:, None], outs.swapaxes(0, 1)], 1), cache


@pytest.fixture(scope="module")
def reference(base, prompt):
    return {name: _run(_with_policy(base, pol), *prompt,
                       make_cache(_with_policy(base, pol), B, S))
            for name, pol in POLICIES.items() if name in ("dense", "kivi2")}


CASES = [("dp", "dense"), ("tp", "dense"), ("dp_tp", "dense"), ("dp_tp", "kivi2"),
         ("dp_tp", "paged")]


def _device_bytes(tree) -> dict:
    """Bytes each device really holds, from the arrays' addressable shards."""
    out: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        for s in x.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def _local_dims(dims: Dims, n_b: int, n_t: int) -> Dims:
    return dataclasses.replace(dims, batch=dims.batch // n_b, n_kv_heads=dims.n_kv_heads // n_t,
                               n_heads=dims.n_heads // n_t)


@pytest.mark.parametrize("mesh_name,policy", CASES)
def test_sharded_prefill_decode_equals_unsharded(mesh_name, policy, base, prompt, reference):
    shape, names, strategy, n_b, n_t = MESHES[mesh_name]
    mesh = ml.shard.mesh(shape, names)
    model = ml.passes.shard(mesh, strategy)(_with_policy(base, POLICIES[policy]))
    shard = model.extra("shard")
    cache = shard.make_cache(model, B, S)
    logits, out = _run(model, *prompt, cache)
    # paged attention is lossless: it must give the dense cache's logits
    ref_logits, ref_cache = reference["dense" if policy == "paged" else policy]
    # the same math; only float32 sums are reassociated (the row-parallel o/down/lm_head
    # all-reduces add 4 partial sums in another order, XLA:CPU tiles other shapes), so
    # logits of size O(1) agree to a few float32 ulps accumulated over 2 layers
    chex.assert_trees_all_close(logits, ref_logits, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(jnp.argmax(logits, -1), jnp.argmax(ref_logits, -1))
    # the cache contents equal the unsharded cache (quantized codes included)
    same = policy != "paged"
    for a, b in zip(*(jax.tree_util.tree_leaves(c) for c in (out, ref_cache) if same)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
        else:
            assert np.mean(np.asarray(a) == np.asarray(b)) > 0.999   # a code may flip at a tie
    # the cache really is split, and decode keeps it split (no device gathers it whole)
    k = jax.tree_util.tree_leaves(out.state if policy != "dense" else out)[0]
    per = _device_bytes(out)
    assert len(per) == 8 and len(set(per.values())) == 1
    dev = next(iter(per.values()))
    assert dev == shard.cache_bytes(out) == shard.cache_bytes(cache)
    if policy == "dense":   # 2 L B S Hkv D floats + B int32 lengths, rows / n_b, heads / n_t
        expect = 2 * CFG.n_layers * (B // n_b) * S * (CFG.n_kv_heads // n_t) * CFG.head_dim * 4 \
            + 4 * (B // n_b)
        assert k.sharding.shard_shape(k.shape) == (CFG.n_layers, B // n_b, S,
                                                   CFG.n_kv_heads // n_t, CFG.head_dim)
    elif policy == "kivi2":  # KIVI's own formula for the device's rows and heads
        expect = out.policy.stacked_nbytes(_local_dims(out.dims, n_b, n_t)) + 4 * (B // n_b)
    else:   # page pools [Hkv, pages, page, D] split by heads only; block tables by row
        pol, d = out.policy, out.dims
        pages = pol.pool_pages(d)
        expect = CFG.n_layers * (2 * (CFG.n_kv_heads // n_t) * pages * pol.page_size
                                 * CFG.head_dim * 4 + 4 * (B // n_b) * pol.max_pages(d)) \
            + 4 * (B // n_b)
    assert dev == expect
    total = tree_bytes(out)
    if policy == "dense":   # everything but the row lengths shrinks by the mesh factors
        assert total - 4 * B == n_b * n_t * (dev - 4 * (B // n_b))
    elif policy == "kivi2":  # all but the per-row fill counts [L, B] (split by rows only)
        assert total / (n_b * n_t) <= dev < 1.01 * total / (n_b * n_t)
    else:                   # the page pools hold the bytes and split over the heads only
        assert 0.99 * total / n_t < dev < 1.01 * total / n_t


def test_generate_on_dp_tp_mesh_equals_unsharded(base, prompt, reference):
    """The generation engine allocates the cache in shards and decodes the unsharded
    model's greedy tokens (the argmax of the reference logits)."""
    mesh = ml.shard.mesh((2, 4), ("data", "model"))
    model = ml.passes.shard(mesh, ml.shard.tp("model", data="data"))(base)
    tokens, lengths = (np.asarray(a) for a in prompt)
    prompts = [list(tokens[i, :lengths[i]]) for i in range(B)]
    expect = np.asarray(jnp.argmax(reference["dense"][0], -1)).tolist()
    assert generate_ids(model, prompts, STEPS + 1) == expect


@pytest.mark.parametrize("policy", ["dense", "kivi2", "snapkv", "palu", "kvquant:levels=kmeans",
                                    "gear:rank=2", "think", "minicache", "streaming:budget=20",
                                    "h2o:budget=20", "pyramidkv:budget=12,window=4",
                                    "headinfer:memory_kind=device",
                                    "snapkv:budget=16,window=4+kivi:bits=4,group_size=8,"
                                    "residual=8"])
def test_each_device_holds_its_rows_and_heads(policy):
    """Every policy's per-device bytes (specs on abstract shapes) equal the policy's own
    byte formula at B / 4 rows and Hkv / 2 heads: nothing is split along another axis and
    nothing that could be split is left whole (shared leaves such as KVQuant's per-row
    codebooks count in both)."""
    mesh = ml.shard.mesh((4, 2), ("data", "model"))
    spec = dataclasses.replace(CFG, n_layers=4)            # MiniCache needs layer pairs
    model = ml.passes.shard(mesh, ml.shard.tp("model", data="data"))(
        _with_policy(ml.models.abstract(spec), POLICIES.get(policy, policy)))
    shard = model.extra("shard")
    cache = jax.eval_shape(lambda: make_cache(model, B, S))
    per = shard.cache_bytes(cache)
    if policy == "dense":
        assert per == spec.kv_cache_bytes(B // 4, S) // 2 + 4 * (B // 4)
        return
    local = _local_dims(cache.dims, 4, 2)
    assert per == cache.policy.stacked_nbytes(local) + 4 * local.batch
    assert tree_bytes(cache) == cache.policy.stacked_nbytes(cache.dims) + 4 * B
    assert tree_bytes(cache) > 7 * per


@dataclasses.dataclass(frozen=True)
class _FlatHeads(ml.kv.KVPolicy):
    """A layout the probe must not split by heads: K and V flattened to [B, S, Hkv * D]
    (a split there would cut across heads), plus a step counter shared by all rows."""
    name = "flat"

    def init(self, dims):
        flat = (dims.batch, dims.max_len, dims.n_kv_heads * dims.head_dim)
        return {"kv": jnp.zeros(flat, jnp.float32), "step": jnp.zeros((3,), jnp.int32)}


def test_layouts_without_a_head_axis_stay_whole_over_heads():
    mesh = ml.shard.mesh((4, 2), ("data", "model"))
    cache = jax.eval_shape(lambda: ml.kv.init_cache(_FlatHeads(), CFG, B, S))
    roles = ml.shard.cache_roles(cache)
    assert roles.state == {"kv": (None, "batch", None, None), "step": (None, None)}
    specs = ml.shard.cache_specs(cache, mesh, ml.shard.tp("model", data="data"))
    assert specs.state["kv"] == jax.sharding.PartitionSpec(None, "data")
    assert specs.state["step"] == jax.sharding.PartitionSpec()
    per = ml.shard.per_device_bytes(cache, specs, mesh)
    kv = CFG.n_layers * B * S * CFG.n_kv_heads * CFG.head_dim * 4
    assert per == kv // 4 + CFG.n_layers * 3 * 4 + 4 * B // 4   # rows / 4, heads whole


def test_decode_profile_argument_bytes_are_per_device(base):
    """The compiled decode step's argument bytes are the per-device params + cache + token,
    the shard pass's analytic kv_cache replays to the exact per-device bytes, and the cache
    part of the arguments shrinks 8-fold on a 2 x 4 mesh (dense) / as KIVI's formula says."""
    mesh = ml.shard.mesh((2, 4), ("data", "model"))
    strategy = ml.shard.tp("model", data="data")
    for policy in ("dense", "kivi2"):
        plain = _with_policy(base, POLICIES[policy])
        rep = ml.memory.profile(ml.passes.shard(mesh, strategy)(plain), "decode", batch=B, seq=S)
        cats, full = rep.by_category, rep.global_by_category["kv_cache"]
        assert rep.argument_bytes == cats["params"] + cats["kv_cache"] + cats["inputs"]
        assert rep.analytic["kv_cache"] == cats["kv_cache"]
        # unsharded, the arguments would be the global params + cache + tokens
        whole = sum(rep.global_by_category[k] for k in ("params", "kv_cache", "inputs"))
        if policy == "dense":  # all but the 4-byte row lengths split 2 (rows) x 4 (heads) ways
            assert full == CFG.kv_cache_bytes(B, S) + 4 * B
            assert full - 4 * B == 8 * (cats["kv_cache"] - 4 * (B // 2))
            assert whole - rep.argument_bytes > 0.8 * full
        else:
            dims = jax.eval_shape(lambda: make_cache(plain, B, S)).dims
            assert cats["kv_cache"] == (plain.extra("kv_policy").stacked_nbytes(
                _local_dims(dims, 2, 4)) + 4 * (B // 2)) < full / 7.9


def test_bad_caches_raise_clear_errors(base):
    mesh = ml.shard.mesh((2, 4), ("data", "model"))
    model = ml.passes.shard(mesh, ml.shard.tp("model", data="data"))(base)
    shard = model.extra("shard")
    with pytest.raises(ValueError, match=r"dense KV cache has batch 3 .*data axes \('data',\) "
                                         r"of size 2.*multiple of 2"):
        shard.put_cache(make_cache(base, 3, S))
    two = ml.models.config("tiny")                           # 4 query / 2 KV heads
    with pytest.raises(ValueError, match=r"n_kv_heads=2 is not divisible .*'model' of size 4.*"
                                         r"nearest feasible 'model' size is 2"):
        ml.passes.shard(mesh, ml.shard.tp("model"))(ml.models.abstract(two))
    cache = jax.eval_shape(lambda: ml.cache.init_cache(ml.cache.Dense(), two, 4, S))
    with pytest.raises(ValueError, match=r"2 KV heads .*'model' of size 4 \(Megatron splits "
                                         r"whole heads.*nearest feasible 'model' size is 2"):
        ml.shard.cache_specs(cache, mesh, ml.shard.tp("model"))
    palu = ml.passes.kv_compress("palu:head_group=2")(base)   # 2 latent groups of 2 heads
    sharded = ml.passes.shard(mesh, ml.shard.tp("model"))(palu)
    with pytest.raises(ValueError, match=r"palu KV cache has 2 KV head groups \(of 4 KV heads\)"
                                         r".*'state/k_lat'.*nearest feasible 'model' size is 2"):
        sharded.extra("shard").make_cache(sharded, 4, S)
    with pytest.raises(ValueError, match=r"headinfer KV policy keeps the cache in host memory"
                                         r".*memory_kind='device'"):
        ml.passes.shard(mesh, ml.shard.tp("model"))(ml.passes.kv_compress("headinfer")(base))
    with pytest.raises(TypeError, match=r"cache must be a memlab.cache.PolicyCache"):
        shard.cache_specs({"k": jnp.ones((2, 8))})
