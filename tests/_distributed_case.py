"""The model, batch and optimizer the two-process test and its reference share."""
import jax

import memlab as ml

CFG = ml.models.config("tiny", n_kv_heads=4)
SEED = 21
LR = 1e-2
BATCH, SEQ = 4, 16


def make_tokens():
    return jax.random.randint(jax.random.key(SEED + 1), (BATCH, SEQ + 1), 0, CFG.vocab_size)
