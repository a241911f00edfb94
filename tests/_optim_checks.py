"""Shared by the optimizer tests: an independent float64 AdamW reference, a loop that
applies an optimizer over a gradient sequence, and real training of the tiny Llama
through the profiler's own train step with its exact optimizer-state bytes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


SHAPES = {"w": (37, 129), "v": (5000,), "s": (100,)}  # 4773 and 5000 quantized; 100 in fp32


def random_params(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def random_grads(seed, steps, shapes=SHAPES):
    """A persistent direction plus fresh noise each step (like minibatch gradients)."""
    rng = np.random.default_rng(seed)
    signal = {k: rng.standard_normal(s) for k, s in shapes.items()}
    return [{k: jnp.asarray(signal[k] + rng.standard_normal(s), jnp.float32)
             for k, s in shapes.items()} for _ in range(steps)]


def adamw_f64(params, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """Independent float64 numpy AdamW (decoupled weight decay, eps outside the sqrt)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, 1):
        lr_t = lr(t - 1) if callable(lr) else lr
        for k in p:
            gk = np.asarray(g[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            u = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            p[k] = p[k] - lr_t * (u + wd * p[k])
    return p


def run_updates(tx, params, grads, update=None):
    update = update or jax.jit(tx.update)
    state = tx.init(params)
    p = params
    for g in grads:
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
    return p, state
