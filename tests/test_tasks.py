"""Teacher-forced decoding perplexity and the passkey task."""
import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memlab as ml
from memlab.evaluate import decode_perplexity
from memlab.tasks import passkey_accuracy, passkey_prompts


def test_decode_perplexity_equals_the_full_forward_on_the_same_targets(tiny):
    w = np.random.default_rng(0).integers(0, 256, (3, 29))
    got = decode_perplexity(tiny, w, prefix=9, batch_size=2)
    logits = tiny(jnp.asarray(w[:, :-1]))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(w[:, 1:]))
    want = float(np.asarray(nll[:, 8:], np.float64).mean())      # targets 9..28
    assert got["tokens"] == 3 * 20
    chex.assert_trees_all_close(got["nll"], want, rtol=1e-5)
    # through a policy cache the numbers are read from that cache
    via = decode_perplexity(ml.passes.kv_compress("dense")(tiny), w, prefix=9, batch_size=2)
    chex.assert_trees_all_close(via["nll"], want, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        decode_perplexity(tiny, w, prefix=28)


def test_passkey_prompts_are_token_exact_and_hide_the_key(smollm2):
    from memlab import data
    tok = smollm2.tokenizer
    filler = data.tokenize(data.load_corpus("austen"), "test", tok)
    prompts = passkey_prompts(filler, tok, 300, [0.0, 0.5, 1.0], seed=3)
    keys = [p["key"] for p in prompts]
    assert len(set(keys)) == 3
    for p in prompts:
        assert len(p["ids"]) == 300
        text = tok.decode(p["ids"])
        assert str(p["key"]) in text and text.endswith("The pass key is")
    first = tok.decode(prompts[0]["ids"])
    assert first.lstrip().startswith("The pass key is")               # depth 0: at the start
    with pytest.raises(ValueError, match="too short"):
        passkey_prompts(filler, tok, 10, [0.5])
    with pytest.raises(ValueError, match="depth"):
        passkey_prompts(filler, tok, 300, [1.5])


def test_passkey_is_found_in_a_short_prompt(smollm2):
    from memlab import data
    tok = smollm2.tokenizer
    filler = data.tokenize(data.load_corpus("austen"), "test", tok)
    prompts = passkey_prompts(filler, tok, 128, [0.2, 0.8], seed=5)
    res = passkey_accuracy(smollm2, prompts, batch_size=2)
    assert res["accuracy"] >= 0.5, res["rows"]
