"""``memlab.nn.cross_entropy`` / ``model_loss``: the cut-cross-entropy dispatcher and the
model's training loss through it.

Reductions and ignore_index are checked against a float64 numpy loss written
here; whole-model losses and gradients against the model's own logits path
(``next_token_loss`` of ``model.apply``); the profiler's train-step memory is
compiled on abstract shapes.
"""
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.memory.profile import loss_fn, next_token_loss

IGNORE = -100
O0 = {"xla_backend_optimization_level": 0}   # numerics checks: compile fast (not for memory)


def np_rows(h, w, t, tied=False):
    """float64 per-row loss (0 where ignored) and its gradient w.r.t. the logits."""
    h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
    w = np.asarray(w, np.float64)
    t = np.asarray(t).reshape(-1)
    z = h @ (w.T if tied else w)
    mx = z.max(1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(1))
    valid = t != IGNORE
    tz = z[np.arange(len(t)), np.where(valid, t, 0)]
    return np.where(valid, lse - tz, 0.0), valid


def case(seed, lead, d, v, n_ignored=4, tied=False):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k1, lead + (d,))
    w = jax.random.normal(k2, (v, d) if tied else (d, v)) / np.sqrt(d)
    t = jax.random.randint(k3, lead, 0, v).reshape(-1)
    t = t.at[jax.random.choice(k4, t.size, (n_ignored,), replace=False)].set(IGNORE)
    return h, w, t.reshape(lead)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignore_index_match_numpy(impl, reduction):
    h, w, t = case(0, (3, 13), 24, 1000)                    # [B, T, D] hidden
    got = ml.nn.cross_entropy(h, w, t, impl=impl, reduction=reduction, chunk=16,
                              vocab_chunk=300)
    rows, valid = np_rows(h, w, t)
    want = {"mean": rows.sum() / valid.sum(), "sum": rows.sum(), "none": rows.reshape(3, 13)}
    chex.assert_trees_all_close(np.asarray(got, np.float64), want[reduction], rtol=2e-5,
                                atol=2e-5)


def test_impls_agree_on_loss_and_grads_including_the_interpreted_kernel():
    h, w, t = case(1, (37,), 40, 1003, tied=True)

    def grads(impl):
        f = lambda h, w: ml.nn.cross_entropy(h, w, t, tied=True, impl=impl, chunk=16,  # noqa: E731
                                             vocab_chunk=256)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)), compiler_options=O0)(h, w)

    ref = grads("naive")
    for impl in ("chunked", "pallas_interpret"):
        chex.assert_trees_all_close(grads(impl), ref, atol=3e-5, rtol=3e-5)


def test_all_rows_ignored_gives_zero_mean_and_zero_grads():
    h, w, _ = case(2, (9,), 24, 100)
    t = jnp.full((9,), IGNORE)
    for impl in ("naive", "chunked"):
        v, (dh, dw) = jax.jit(jax.value_and_grad(
            lambda h, w: ml.nn.cross_entropy(h, w, t, impl=impl), argnums=(0, 1)),
            compiler_options=O0)(h, w)
        assert float(v) == 0.0 and not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))


def test_softcap_is_applied_by_every_impl():
    h, w, t = case(3, (20,), 24, 300)
    cap = 2.0
    rows, valid = np_rows(h, w, t)          # uncapped
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    zc = cap * np.tanh(z / cap)
    tt = np.asarray(t)
    lse = np.log(np.exp(zc).sum(1))
    want = np.where(valid, lse - zc[np.arange(20), np.where(valid, tt, 0)], 0).sum() / valid.sum()
    for impl in ("naive", "chunked"):
        got = ml.nn.cross_entropy(h, w, t, impl=impl, softcap=cap, chunk=8, vocab_chunk=64)
        chex.assert_trees_all_close(float(got), want, rtol=1e-5)
    assert abs(want - rows.sum() / valid.sum()) > 1e-2     # the cap changed the loss


def test_auto_choice_and_context_default():
    assert ml.nn.choose_cross_entropy(1024, 1000, platform="cpu")[0] == "naive"
    impl, why = ml.nn.choose_cross_entropy(8192, 49152, platform="cpu")
    assert impl == "chunked" and "MiB" in why
    assert ml.nn.choose_cross_entropy(8, 8, platform="gpu")[0] == "pallas_triton"
    assert ml.nn.choose_cross_entropy(8, 8, platform="tpu")[0] == "pallas_tpu"
    # The threshold is on float32 logits bytes.
    n = ml.nn.NAIVE_MAX_LOGITS_BYTES // (4 * 1000)
    assert ml.nn.choose_cross_entropy(n, 1000, platform="cpu")[0] == "naive"
    assert ml.nn.choose_cross_entropy(n + 1, 1000, platform="cpu")[0] == "chunked"
    # The context default is read at trace time: a chunked trace has the custom VJP.
    h, w, t = case(4, (8,), 16, 64, n_ignored=1)
    f = lambda: lambda h: ml.nn.cross_entropy(h, w, t)  # noqa: E731  (fresh: traces are cached)
    assert "custom_vjp" not in str(jax.make_jaxpr(f())(h))
    with ml.nn.use_cross_entropy("chunked"):
        assert "custom_vjp" in str(jax.make_jaxpr(f())(h))
    with pytest.raises(ValueError, match="is not one of"):
        with ml.nn.use_cross_entropy("fast"):
            pass


def test_bad_arguments_raise_clear_errors():
    h, w, t = case(5, (2, 5), 16, 64, n_ignored=1)
    with pytest.raises(ValueError, match="impl='fused' is not one of"):
        ml.nn.cross_entropy(h, w, t, impl="fused")
    with pytest.raises(ValueError, match="reduction='avg' is not one of"):
        ml.nn.cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="must equal hidden's leading shape"):
        ml.nn.cross_entropy(h, w, t.reshape(-1))
    with pytest.raises(ValueError, match=r"outside \[0, V=64\)"):
        ml.nn.cross_entropy(h, w, t.at[0, 0].set(64))
    with pytest.raises(ValueError, match="pass tied=True"):
        ml.nn.cross_entropy(h, w.T, t)
    with pytest.raises(ValueError, match="softcap"):
        ml.nn.cross_entropy(h, w, t, impl="naive", softcap=0.0)
    with pytest.raises(ValueError, match="tokens must be"):
        ml.nn.model_loss(ml.models.abstract("tiny"))(None, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match="is not one of"):
        ml.nn.model_loss(ml.models.abstract("tiny"), impl="fast")


# ---------------------------------------------------------------- the model's loss
def _naive_value_and_grad(model, tokens):
    loss = lambda p: next_token_loss(model.apply(p, tokens[:, :-1]), tokens[:, 1:])  # noqa: E731
    return jax.jit(jax.value_and_grad(loss), compiler_options=O0)(model.params)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(11), (2, 41), 0, 256)


def test_tied_model_loss_equals_the_logits_path(tokens):
    """Tied head: the [V, D] embedding table (the untied head: the train-step test below)."""
    model = ml.models.init("tiny", jax.random.key(3), tie_embeddings=True)
    ref = _naive_value_and_grad(model, tokens)
    f = ml.nn.model_loss(model, impl="chunked", chunk=32, vocab_chunk=100)
    got = jax.jit(jax.value_and_grad(f), compiler_options=O0)(model.params, tokens)
    chex.assert_trees_all_close(got, ref, atol=2e-6, rtol=2e-5)
    hidden = jax.eval_shape(lambda p: model.apply(p, tokens[:, :-1], hidden_only=True),
                            model.params)
    assert hidden.shape == (2, 40, 64)


def test_train_step_through_loss_fn_matches_naive(tokens):
    """``profile.train_step_fn`` (and ``memlab.train``) use ``loss_fn``, i.e. ``model_loss``."""
    model = ml.models.init("tiny", jax.random.key(4))
    jaxpr = str(jax.make_jaxpr(lambda p: loss_fn(model)(p, tokens))(model.params))
    assert "name=_chunked" not in jaxpr   # CPU auto: 80 x 256 logits are small -> logits path
    tx = ml.optim.get("adamw")
    state = tx.init(model.params)
    outs = {}
    for impl in ("naive", "chunked"):
        with ml.nn.use_cross_entropy(impl):
            step = jax.jit(ml.memory.train_step_fn(model, tx), compiler_options=O0)
            outs[impl] = step(model.params, state, tokens)
    chex.assert_trees_all_close(outs["chunked"], outs["naive"], atol=2e-5, rtol=2e-5)


def test_quantized_head_falls_back_to_logits_with_a_warning(tokens):
    tiny = ml.models.init("tiny", jax.random.key(5))
    def logits_loss(model):
        return jax.jit(lambda p, x: next_token_loss(model.apply(p, x[:, :-1]), x[:, 1:]),
                       compiler_options=O0)

    quant_head = ml.passes.quantize(ml.quant.int8())(tiny)            # lm_head/kernel too
    ref = logits_loss(quant_head)(quant_head.params, tokens)
    with pytest.warns(UserWarning, match="quantized"):
        got = jax.jit(ml.nn.model_loss(quant_head, impl="chunked"),
                      compiler_options=O0)(quant_head.params, tokens)
    chex.assert_trees_all_close(got, ref)
    with warnings.catch_warnings():      # auto with small logits: the logits path, silently
        warnings.simplefilter("error")
        jax.eval_shape(loss_fn(quant_head), quant_head.params, tokens)
    # A float head over quantized layers: hidden_only passes through the pass's wrapper.
    float_head = ml.passes.quantize(ml.quant.int8(), rules={r"lm_head": None})(tiny)
    ref = logits_loss(float_head)(float_head.params, tokens)
    got = jax.jit(ml.nn.model_loss(float_head, impl="chunked", chunk=16),
                  compiler_options=O0)(float_head.params, tokens)
    chex.assert_trees_all_close(got, ref, atol=2e-6, rtol=2e-5)


def test_profile_train_step_temp_drops_for_a_large_vocab():
    """tiny layers with SmolLM2's 49,152-token vocabulary, 512 tokens: abstract shapes."""
    model = ml.models.abstract("tiny", vocab_size=49152)
    n_logits_bytes = 512 * 49152 * 4
    with ml.nn.use_cross_entropy("naive"):
        naive = ml.memory.profile(model, "train", batch=1, seq=512)
    auto = ml.memory.profile(model, "train", batch=1, seq=512)     # CPU auto: chunked here
    assert naive.by_category == auto.by_category
    # The naive step holds the float32 logits and their gradient; the chunked one neither.
    assert naive.temp_bytes - auto.temp_bytes >= 1.5 * n_logits_bytes, (naive.temp_bytes,
                                                                         auto.temp_bytes)
    assert auto.temp_bytes < n_logits_bytes
