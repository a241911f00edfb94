"""Checks every optimizer test runs: real training of the tiny Llama through the
profiler's own train step, and the profile's exact optimizer-state bytes."""
import jax
import jax.numpy as jnp

import memlab as ml
from memlab.memory.bytes import abstractify, tree_bytes
from memlab.memory.profile import train_step_fn


def train_tiny_and_profile(tiny, name):
    """Six steps of the profiler's own train step (compiled from the same abstract
    arguments, so ``profile`` below reuses the compilation), then the profile."""
    tx = ml.optim.get(name)  # the profiler's defaults
    abstract = abstractify(tiny.params)
    step = jax.jit(train_step_fn(tiny.replace(params=abstract), tx), donate_argnums=(0, 1)).lower(
        abstract, jax.eval_shape(tx.init, abstract), jax.ShapeDtypeStruct((1, 17), jnp.int32)
    ).compile()
    tokens = jax.random.randint(jax.random.key(13), (1, 17), 0, tiny.spec.vocab_size)
    params = jax.tree_util.tree_map(jnp.copy, tiny.params)  # donated
    state = tx.init(params)
    state_bytes = tree_bytes(state)
    losses = []
    for _ in range(6):
        params, state, loss = step(params, state, tokens)
        losses.append(float(loss))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
    r = ml.memory.profile(tiny, "train", batch=1, seq=16, optimizer=name)
    assert r.by_category["optimizer_state"] == r.analytic["optimizer_state"] == state_bytes
    return losses
