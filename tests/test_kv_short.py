"""Every registered KV policy on a cache shorter than its window, buffer or budget.

A cache shorter than a policy's float window (KIVI's residual, GEAR's buffer, ThinK's
window), or an eviction budget larger than the whole sequence, is not an error: the cache
holds every token until the sequence outgrows the window, which it never does here.  Each
policy generates 3 tokens after a 5-token (and a 3-token, right-padded) prompt on the tiny
random Llama, so the cache has 8 slots; policies whose window covers all 8 tokens must give
the dense policy's greedy tokens, and every policy's ``nbytes`` must equal its real pytree at
that length."""
import jax
import pytest

import memlab as ml
from memlab.generate import generate_ids
from memlab.kv import Dims
from memlab.kv.kivi import KIVI
from memlab.memory import tree_bytes
from memlab.passes.kv_compress import policy_bytes

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6]]
NEW = 3

# Each policy with its defaults, except required arguments (a budget far above the 8 tokens)
# and what the tiny model's shapes rule out (head_dim 16: KIVI groups of <= 16 channels;
# 2 layers: MiniCache must merge from layer 0).  True: the window covers every token, so the
# tokens equal the dense policy's; False: lossy at any length (quantized / low-rank / merged /
# channel-pruned).
POLICIES = {
    "compose": ("streaming:budget=64+kivi:group_size=16", True),
    "dense": ("dense", True),
    "gear": ("gear", True),                       # residual=32 float buffer
    "h2o": ("h2o:budget=64", True),
    "headinfer": ("headinfer", True),
    "kivi": ("kivi:group_size=16", True),         # residual=128 float slots
    "kvquant": ("kvquant", False),
    "minicache": ("minicache:start=0", False),
    "paged": ("paged", True),
    "palu": ("palu", False),
    "pyramidkv": ("pyramidkv:budget=64", True),   # every layer's budget > 8
    "snapkv": ("snapkv:budget=64", True),
    "streaming": ("streaming:budget=64", True),
    "think": ("think", False),                    # prunes half the key channels of every token
}


def test_the_table_covers_every_registered_policy():
    assert sorted(POLICIES) == sorted(ml.kv.names())


@pytest.fixture(scope="module")
def dense_tokens(tiny):
    return generate_ids(tiny, PROMPTS, NEW)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_short_generation(tiny, dense_tokens, name):
    text, exact = POLICIES[name]
    policy = ml.kv.parse(text)
    assert policy.name == name
    out = generate_ids(ml.passes.kv_compress(policy)(tiny), PROMPTS, NEW)
    assert [len(row) for row in out] == [NEW] * len(PROMPTS)
    assert all(0 <= t < tiny.spec.vocab_size for row in out for t in row)
    if exact:
        assert out == dense_tokens, (name, out, dense_tokens)
    # the short cache's bytes are exact: the formula against the real pytree
    cache_len = max(map(len, PROMPTS)) + NEW
    cache = jax.eval_shape(lambda: ml.kv.init_cache(policy, tiny.spec, len(PROMPTS), cache_len))
    assert tree_bytes(cache) == policy_bytes(policy, tiny.spec, len(PROMPTS), cache_len)


def test_kivi_defaults_on_the_cli_cache_length():
    """The reported case: KIVI's defaults (G=32, R=128) on a 29-token cache, head_dim 64."""
    pol = KIVI(bits=2)
    for max_len, want in ((29, 32), (160, 32), (161, 64), (4096, 3968)):
        dims = Dims(2, max_len, 9, 3, 64)
        pol.validate(dims)
        assert pol.capacity(dims) == want
        assert pol.capacity(dims) + pol.residual >= max_len
        assert pol.nbytes(dims) == tree_bytes(jax.eval_shape(lambda: pol.init(dims)))


@pytest.mark.parametrize("text", ["snapkv:budget=64,window=8", "h2o:budget=33",
                                  "pyramidkv:budget=32,window=4", "streaming:budget=40"])
def test_eviction_budget_above_the_cache_allocates_the_cache(tiny, text):
    pol = ml.kv.parse(text)
    cache = jax.eval_shape(lambda: ml.kv.init_cache(pol, tiny.spec, 1, 32))
    assert cache.state["k"].shape[2] == 32          # [L, B, S, Hkv, D]: min(budget, max_len)


@pytest.mark.parametrize("text, want", [
    ("snapkv:budget=64,window=8+dense", 32),                    # budget above the cache
    ("snapkv:budget=16,window=8+dense+room=20", 32),            # budget + room above the cache
    ("snapkv:budget=16,window=8+dense+room=4", 20),             # fits: budget + room
    ("snapkv:budget=16,window=4+kivi:group_size=16,residual=16+room=8", 24),
])
def test_composition_capacity_is_capped_at_the_cache(tiny, text, want):
    pol = ml.kv.parse(text)
    dims = Dims(1, 32, 4, 2, 16, n_layers=2)
    assert pol.capacity(dims) == want
    cache = jax.eval_shape(lambda: ml.kv.init_cache(pol, tiny.spec, 1, 32))
    assert tree_bytes(cache) == policy_bytes(pol, tiny.spec, 1, 32)
