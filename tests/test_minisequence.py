"""Mini-Sequence MLP chunking (LlamaConfig.mlp_chunks, ml.passes.minisequence): the same
numbers as the unchunked MLP (float64 numpy reference, ragged sequence lengths), the
same model gradients, and a smaller compiled train step."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.models.llama import MLP


def _silu(x):
    return x / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def mlp_case():
    cfg = ml.models.config("tiny", d_model=48, d_ff=136)
    x = jax.random.normal(jax.random.key(1), (2, 11, 48))  # T = 11: no chunk count divides it
    params = MLP(cfg).init(jax.random.key(2), x)["params"]
    return cfg, params, x


@pytest.mark.parametrize("chunks", [1, 3, 4, 11, 20])
def test_chunked_mlp_matches_float64_reference(mlp_case, chunks):
    cfg, params, x = mlp_case
    mlp = MLP(dataclasses.replace(cfg, mlp_chunks=chunks))
    p64 = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
    x64 = np.asarray(x, np.float64)
    ref = (_silu(x64 @ p64["gate_proj"]) * (x64 @ p64["up_proj"])) @ p64["down_proj"]
    got = jax.jit(lambda p, x: mlp.apply({"params": p}, x))(params, x)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-5)


def test_chunked_mlp_gradients_match_unchunked(mlp_case):
    cfg, params, x = mlp_case
    w = jax.random.normal(jax.random.key(3), x.shape)

    def grads(chunks):
        mlp = MLP(dataclasses.replace(cfg, mlp_chunks=chunks))
        return jax.grad(lambda p, x: jnp.sum(w * mlp.apply({"params": p}, x)), argnums=(0, 1))

    fn = jax.jit(lambda p, x: {c: grads(c)(p, x) for c in (1, 3, 4)})
    out = fn(params, x)
    for c in (3, 4):
        chex.assert_trees_all_close(out[c], out[1], atol=1e-5, rtol=1e-5)


# -- whole model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model_results(tiny):
    tokens = jax.random.randint(jax.random.key(4), (3, 20), 0, 256)  # T = 19
    models = {"none": tiny, **{f"chunks={c}": ml.passes.minisequence(c)(tiny) for c in (4,)}}
    models["chunks=4+remat"] = ml.passes.remat("nothing_saveable")(models["chunks=4"])

    def run(model, params):  # every model shares the tiny model's params
        def loss(p):
            return ml.memory.next_token_loss(model.apply(p, tokens[:, :-1]), tokens[:, 1:])
        return model.apply(params, tokens), jax.value_and_grad(loss)(params)

    return jax.jit(lambda p: {k: run(m, p) for k, m in models.items()})(tiny.params)


@pytest.mark.parametrize("name", ["chunks=4", "chunks=4+remat"])
def test_model_logits_loss_and_gradients_unchanged(model_results, name):
    logits, (value, grads) = model_results[name]
    ref_logits, (ref_value, ref_grads) = model_results["none"]
    chex.assert_trees_all_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(value, ref_value, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-6, rtol=1e-5)


def test_pass_sets_the_config_only(tiny):
    model = ml.passes.minisequence(chunks=5)(tiny)
    assert model.spec == dataclasses.replace(tiny.spec, mlp_chunks=5) == model.module.config
    assert tiny.spec.mlp_chunks == 1 and model.params is tiny.params
    assert model.history[-1][0].name == "minisequence(chunks=5)"
    assert ml.param_paths(model) == ml.param_paths(tiny)


def test_calibration_statistics_unchanged(tiny):
    """Sown intermediates (quant calibration) run the MLP unchunked: same statistics."""
    from memlab.quant.calibrate import collect

    batch = [jax.random.randint(jax.random.key(6), (2, 13), 0, 256)]
    ref = collect(tiny, batch)
    got = collect(ml.passes.minisequence(4)(tiny), batch)
    chex.assert_trees_all_close(got, ref, atol=1e-5, rtol=1e-5)


# -- memory --------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_temps():
    """temp bytes of an SGD train step of an MLP-heavy model (d=32, d_ff=2048, B=2, T=128)."""
    cfg = ml.models.config("tiny", n_layers=2, d_model=32, d_ff=2048, n_heads=2, n_kv_heads=1,
                           head_dim=16)
    base = ml.models.abstract(cfg)
    return {c: ml.memory.profile(ml.passes.minisequence(c)(base), "train", batch=2, seq=128,
                                 optimizer="sgd").temp_bytes for c in (1, 8)}


def test_chunking_shrinks_train_temp(train_temps):
    # measured 34.8 MiB (1 chunk) -> 9.6 MiB (2) -> 5.8 MiB (8)
    t = train_temps
    assert t[1] >= 3 * t[8], t


# -- bad input -----------------------------------------------------------------
@pytest.mark.parametrize("chunks", [0, -2, 2.5, True, "4"])
def test_bad_chunks(chunks):
    with pytest.raises(ValueError, match="minisequence: chunks must be a positive int"):
        ml.passes.minisequence(chunks)


def test_bad_config_and_model():
    with pytest.raises(ValueError, match="LlamaConfig.mlp_chunks must be a positive int"):
        ml.models.config("tiny", mlp_chunks=0)
    plain = ml.Model(fn=lambda p, x: x * p, params=jnp.float32(2.0))
    with pytest.raises(ValueError, match="minisequence needs a memlab Llama model"):
        ml.passes.minisequence(4)(plain)
