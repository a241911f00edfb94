"""Every pass on every decoder family: tiny random configs of Qwen2 (biases), Qwen3
(QK-norm), Mistral (sliding window), Llama 3 (RoPE scaling), Gemma 2 (soft-caps,
alternating windows, (1 + w) norms, post-norms, GeGLU) and Gemma 3 (QK-norm, local and
global layers with their own RoPE bases).  Exact passes (remat, Mini-Sequence, offload,
LoRA at init, FSDP, the fused update) equal the unmodified model; int8 weights stay
close; every KV policy decodes through the two-group cache layout, with exact bytes."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memlab as ml
from memlab import fused
from memlab.generate import make_cache
from memlab.memory.bytes import tree_bytes
from memlab.nn.loss import model_loss
from memlab.passes.kv_compress import policy_bytes

from _fast_compile import OPTIONS, compiled

_BASE = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
             d_ff=48, max_seq_len=64)
FAMILIES = {
    "qwen2": dict(arch="qwen2", qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "qwen3": dict(arch="qwen3", qk_norm=True, head_dim=16),
    "mistral": dict(arch="mistral", sliding_window=5),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8}),
    "gemma2": dict(arch="gemma2", norm_plus_one=True, embed_scale=True, post_norms=True,
                   mlp_act="gelu_tanh", sliding_window=4, head_dim=12, query_scale=0.2,
                   layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                   attn_softcap=3.0, final_softcap=5.0, tie_embeddings=True),
    "gemma3": dict(arch="gemma3", norm_plus_one=True, embed_scale=True, post_norms=True,
                   mlp_act="gelu_tanh", qk_norm=True, sliding_window=4, head_dim=12,
                   rope_theta=1e6, rope_local_theta=1e4, tie_embeddings=True,
                   layer_types=("sliding_attention", "sliding_attention", "full_attention")),
}
SEQ = 11  # longer than every window above
# ``make test`` runs the families that together hold every feature; ``make test-sweeps``
# (MEMLAB_SWEEPS=1) runs all of them
SWEEP = os.environ.get("MEMLAB_SWEEPS") == "1"
RUN = sorted(FAMILIES) if SWEEP else ["gemma2", "gemma3"]


def _config(name):
    return ml.models.config("tiny", **{**_BASE, **FAMILIES[name]})


def _perturbed(model, key):
    """Random init plus noise on every leaf (norm scales and biases are not at their
    neutral values, so a pass that dropped one would show)."""
    leaves, tree = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(key, len(leaves))
    return model.replace(params=tree.unflatten(
        [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))


@pytest.fixture(scope="module", params=RUN)
def family(request):
    model = _perturbed(ml.models.init(_config(request.param), jax.random.key(1)),
                       jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(3), (2, SEQ + 1), 0, _BASE["vocab_size"])
    logits = compiled(lambda m, t: m(t), model, tokens[:, :-1])
    return request.param, model, tokens, logits


def _loss_and_grads(model, tokens):
    return compiled(jax.value_and_grad(model_loss(model, impl="naive")), model.params, tokens)


def test_remat_and_minisequence_are_exact(family):
    name, model, tokens, _ = family
    value, grads = _loss_and_grads(model, tokens)
    for p in (ml.passes.remat("nothing_saveable"), ml.passes.minisequence(3)):
        v2, g2 = _loss_and_grads(p(model), tokens)
        np.testing.assert_allclose(v2, value, rtol=1e-6)
        chex.assert_trees_all_close(g2, grads, rtol=1e-4, atol=1e-6)


def test_offload_and_lora_at_init_are_exact(family):
    name, model, tokens, logits = family
    x = tokens[:, :-1]
    streamed = ml.passes.offload(1, 1)(model)
    np.testing.assert_allclose(compiled(lambda m: m(x), streamed), logits, rtol=1e-5,
                               atol=1e-5)
    lora = ml.passes.lora(rank=2)(model)
    np.testing.assert_allclose(compiled(lambda m: m(x), lora), logits, rtol=1e-5, atol=1e-5)


def test_int8_weights_stay_close(family):
    name, model, tokens, logits = family
    q = ml.passes.quantize(ml.quant.int8())(model)
    got = compiled(lambda m: m(tokens[:, :-1]), q)
    err = float(jnp.max(jnp.abs(got - logits)) / jnp.max(jnp.abs(logits)))
    assert 0 < err < 0.05, err
    assert tree_bytes(q.params) < tree_bytes(model.params)


@pytest.mark.skipif(len(jax.devices()) != 8, reason="needs 8 (simulated) devices")
def test_fsdp_is_exact(family):
    name, model, tokens, _ = family
    mesh = ml.shard.mesh((8,), ("data",))
    sharded = ml.passes.shard(mesh, ml.shard.fsdp("data"))(model)
    batch = jnp.concatenate([tokens, tokens[::-1]] * 4, 0)
    value, _ = _loss_and_grads(model, batch)
    v2, _ = _loss_and_grads(sharded, batch)
    np.testing.assert_allclose(v2, value, rtol=1e-5)


def test_fused_sgd_step_equals_plain_step(family):
    name, model, tokens, _ = family
    tx = optax.sgd(0.1)
    _, grads = _loss_and_grads(model, tokens)
    want = optax.apply_updates(model.params, tx.update(grads, tx.init(model.params))[0])
    params, _, _ = compiled(fused.step_fn(model, tx), model.params, fused.init(model, tx),
                             tokens)
    chex.assert_trees_all_close(params, want, rtol=1e-4, atol=1e-6)


POLICIES = ("dense", "kivi2:group_size=4,residual=4", "streaming:budget=6,sinks=2",
            "snapkv:budget=6,window=2", "h2o:budget=6", "gear:bits=4,rank=2,residual=4",
            "paged:page_size=4", "palu:rank_ratio=0.5", "think:keep_ratio=0.5,window=2",
            "kvquant:bits=4", "pyramidkv:budget=6,window=2", "headinfer:heads=1",
            "snapkv:budget=6,window=2+kivi2:group_size=4,residual=4")


def test_the_policy_list_covers_every_registered_policy():
    named = {ml.kv.parse(s).name for s in POLICIES}
    # MiniCache merges adjacent layers' caches: a cross-layer state (tested below)
    assert set(ml.kv.names()) - {"minicache"} <= named


@jax.jit
def _prompt_then_decode(model, tokens, cache):
    """A 6-token prompt, then three decode steps, in one program."""
    logits, cache = model(tokens[:, :6], cache=cache)
    for i in range(6, 9):
        logits, cache = model(tokens[:, i:i + 1], cache=cache)
    return logits, cache


@pytest.mark.parametrize("family_name,policies", [("gemma3", POLICIES),
                                                  ("mistral", POLICIES[:3])])
def test_every_kv_policy_decodes_with_exact_bytes(family_name, policies):
    """Sliding layers keep a ring of ``window`` positions under every policy (the policy's
    own, or the dense one); a prompt plus three decode steps run, and the cache's bytes
    equal the policy's formula."""
    cfg = _config(family_name)
    model = ml.models.init(cfg, jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, cfg.vocab_size)
    for spec in policies:
        pol = ml.kv.parse(spec)
        m = ml.passes.kv_compress(pol)(model)
        cache = make_cache(m, 2, 32)
        assert tree_bytes(cache) == policy_bytes(pol, cfg, 2, 32), spec
        ring = jax.tree_util.tree_leaves(cache.state["sliding"])[0]
        assert ring.shape[2] == cfg.sliding_window, spec
        run = _prompt_then_decode.trace(m, tokens, cache).lower().compile(OPTIONS)
        logits, cache = run(m, tokens, cache)
        assert bool(jnp.all(jnp.isfinite(logits))), spec
        assert tree_bytes(cache) == policy_bytes(pol, cfg, 2, 32), spec


@pytest.mark.parametrize("family_name", ["gemma2", "gemma3"] + (["mistral"] if SWEEP else []))
def test_dense_ring_cache_equals_full_forward(family_name):
    """Chunked prefill and decode through the ring of the sliding layers give the full
    forward's logits; the dense cache holds ``window`` positions per sliding layer."""
    cfg = _config(family_name)
    model = _perturbed(ml.models.init(cfg, jax.random.key(6)), jax.random.key(7))
    tokens = jax.random.randint(jax.random.key(8), (2, 14), 0, cfg.vocab_size)
    full = model(tokens)
    cache = make_cache(model, 2, 16)
    assert tree_bytes(cache.state) == cfg.kv_cache_bytes(2, 16)
    assert cfg.kv_cache_bytes(2, 16) < ml.models.config(
        "tiny", **{**_BASE, **FAMILIES[family_name], "sliding_window": None,
                   "layer_types": ()}).kv_cache_bytes(2, 16)
    outs = []
    for a, b in ((0, 3), (3, 9), (9, 10), (10, 11), (11, 14)):  # a chunk longer than W
        out, cache = model(tokens[:, a:b], cache=cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)


def test_cross_layer_policy_on_sliding_layers_is_a_clear_error():
    model = ml.passes.kv_compress("minicache:start=0")(ml.models.init(_config("gemma3"),
                                                                      jax.random.key(9)))
    with pytest.raises(NotImplementedError, match="sliding-window layers"):
        make_cache(model, 2, 32)


def test_policies_refuse_what_they_cannot_apply():
    """Gemma 2's soft-capped global layers need a policy that applies soft-caps."""
    model = ml.models.init(_config("gemma2"), jax.random.key(9))
    m = ml.passes.kv_compress("h2o:budget=6")(model)
    cache = make_cache(m, 2, 32)
    with pytest.raises(NotImplementedError, match="soft-cap"):
        m(jnp.ones((2, 5), jnp.int32), cache=cache)


def test_planner_searches_only_policies_a_family_can_run():
    """Gemma 2's soft-capped layers: dense KV only and no chunked loss; Gemma 3: every
    planned policy (its sliding layers keep their rings under any of them)."""
    from memlab.planner.space import candidates
    g2 = ml.models.config("gemma2-2b")
    assert {c.kv for c in candidates(g2, "decode", 1, 8192)} == {"dense"}
    assert {c.loss for c in candidates(g2, "train", 1, 2048)} == {"naive"}
    g3 = ml.models.config("gemma3-270m")
    assert len({c.kv for c in candidates(g3, "decode", 1, 8192)}) > 3
