"""The fused backward-update step (memlab.fused, LOMO): equal to the plain step, with host
state under the offload pass, and its memory against the unfused step."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memlab as ml
from memlab import fused, optim
from memlab.memory.bytes import tree_bytes
from memlab.memory.profile import train_step_fn
from memlab.nn.loss import model_loss


@pytest.fixture(scope="module")
def tiny():
    return ml.models.init("tiny", jax.random.key(3))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(11), (3, 18), 0, 256)  # 17 positions: odd


def _reference(model, tx, tokens, steps):
    """Plain training: whole-tree gradients, then ``tx`` over the whole tree."""
    loss = jax.jit(jax.value_and_grad(model_loss(model)))
    p, s, out = model.params, tx.init(model.params), []
    for _ in range(steps):
        value, g = loss(p, tokens)
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        out.append(float(value))
    return p, out


def _fused(model, tx, tokens, steps, **kw):
    step = jax.jit(fused.step_fn(model, tx, **kw))
    p, s, out = model.params, fused.init(model, tx), []
    for _ in range(steps):
        p, s, value = step(p, s, tokens)
        out.append(float(value))
    return p, s, out


def test_sgd_step_equals_plain_gradient(tiny, tokens):
    # SGD's update is -lr * g: the params after two steps check every layer's gradient
    tx = optax.sgd(0.3)
    p_ref, l_ref = _reference(tiny, tx, tokens, 2)
    p, _, losses = _fused(tiny, tx, tokens, 2)
    np.testing.assert_allclose(losses, l_ref, rtol=2e-6)
    chex.assert_trees_all_close(p, p_ref, rtol=1e-5, atol=1e-6)
    assert losses[1] < losses[0]


def test_adamw_state_per_layer_equals_whole_tree(tiny, tokens):
    tx = optax.adamw(1e-2, eps=1e-4, weight_decay=0.1)
    p_ref, l_ref = _reference(tiny, tx, tokens, 3)
    p, state, losses = _fused(tiny, tx, tokens, 3)
    np.testing.assert_allclose(losses, l_ref, rtol=2e-6)
    # Adam divides by sqrt(v) + eps: float32 reassociation of near-zero gradients moves an
    # element's update by ~1e-4 of the learning rate
    chex.assert_trees_all_close(p, p_ref, rtol=1e-5, atol=2e-5)
    # the state: [L, ...] moments of the layers, whole-size moments of the rest
    mu = state.layers[0].mu
    chex.assert_shape(mu["attn"]["q_proj"]["kernel"], tiny.params["layers"]["attn"]["q_proj"]
                      ["kernel"].shape)
    # the same moments, plus one step count per layer beside the non-layer params' count
    assert fused.state_bytes(state) == tree_bytes(tx.init(tiny.params)) + \
        tiny.spec.n_layers * tree_bytes(jnp.zeros((), jnp.int32))


def test_clip_norm_equals_clip_by_global_norm(tiny, tokens):
    tx = optax.sgd(0.3)
    g = jax.grad(model_loss(tiny))(tiny.params, tokens)
    clip = 0.25 * float(optax.global_norm(g))  # active: the norm is 4x the threshold
    ref = optax.chain(optax.clip_by_global_norm(clip), tx)
    u, _ = ref.update(g, ref.init(tiny.params), tiny.params)
    p, _, _ = _fused(tiny, tx, tokens, 1, clip_norm=clip)
    chex.assert_trees_all_close(p, optax.apply_updates(tiny.params, u), rtol=1e-5, atol=1e-7)


def test_tied_embeddings(tokens):
    model = ml.models.init(ml.models.config("tiny", tie_embeddings=True, n_layers=3),
                           jax.random.key(5))
    tx = optax.sgd(0.3)
    p_ref, l_ref = _reference(model, tx, tokens, 1)
    p, _, losses = _fused(model, tx, tokens, 1)
    np.testing.assert_allclose(losses, l_ref, rtol=2e-6)
    chex.assert_trees_all_close(p, p_ref, rtol=1e-5, atol=1e-6)  # embed: lookup + head grads


def test_memlab_optimizer_runs_per_layer(tiny, tokens):
    # CAME's factored moments are per matrix: per-layer state is the whole-tree state
    tx = optim.get("came", learning_rate=1e-2)
    p_ref, l_ref = _reference(tiny, tx, tokens, 2)
    p, _, losses = _fused(tiny, tx, tokens, 2)
    np.testing.assert_allclose(losses, l_ref, rtol=2e-6)
    chex.assert_trees_all_close(p, p_ref, rtol=1e-4, atol=2e-5)


def _host_stacks_and_device_vectors(layers):
    """As the offload pass places layers: [L, m, n, ...] stacks in host memory, per-layer
    vectors on the device."""
    leaves = jax.tree_util.tree_leaves(layers)
    kinds = lambda xs: ml.offload.memory_kinds_of(xs)  # noqa: E731
    return (kinds([x for x in leaves if ml.offload.streams_from_host(x)]) == {"pinned_host"}
            and kinds([x for x in leaves if not ml.offload.streams_from_host(x)]) <= {"device"})


def test_offload_state_in_host_memory_bit_identical(tokens):
    # 3 layers: no single layer's leaf shape can equal a stack's [3, ...] shape below
    tiny = ml.models.init(ml.models.config("tiny", n_layers=3), jax.random.key(8))
    tx = optim.get("adamw8bit", learning_rate=1e-2)
    p_ref, _, l_ref = _fused(tiny, tx, tokens, 2)
    streamed = ml.passes.offload(1, 1)(tiny)
    state = fused.init(streamed, tx)
    assert _host_stacks_and_device_vectors(state.layers)
    assert ml.offload.memory_kinds_of(state.other) == {"device"}
    step = jax.jit(fused.step_fn(streamed, tx), donate_argnums=(0, 1))
    p = jax.tree_util.tree_map(lambda a: a.copy(), streamed.params)
    losses = []
    for _ in range(2):
        p, state, value = step(p, state, tokens)
        losses.append(float(value))
    assert _host_stacks_and_device_vectors(p["layers"])
    assert _host_stacks_and_device_vectors(state.layers)
    assert losses == l_ref
    chex.assert_trees_all_equal(jax.device_get(p), jax.device_get(p_ref))
    # lowered for CUDA: every move to the device is one layer's slice (no [L, ...] stack)
    lowered = jax.jit(fused.step_fn(streamed, tx)).trace(streamed.params, state, tokens).lower(
        lowering_platforms=("cuda",))
    moves = ml.offload.transfers(lowered.as_text())
    stacks = {tuple(x.shape) for x in jax.tree_util.tree_leaves((streamed.params["layers"],
                                                                 state.layers))}
    to_device = [s for kind, s, _ in moves if kind == "device"]
    to_host = [s for kind, s, _ in moves if kind == "pinned_host"]
    assert to_device and to_host
    assert not set(to_device) & stacks
    singles = {s[1:] for s in stacks}
    assert set(to_host) <= singles  # stores: one layer's params / state


def test_fused_saves_gradient_memory():
    cfg = ml.models.config("tiny", d_model=128, d_ff=344, n_layers=4, vocab_size=500,
                           n_heads=4, n_kv_heads=2, head_dim=32, max_seq_len=512)
    model = ml.models.abstract(cfg)
    tokens = jax.ShapeDtypeStruct((2, 129), jnp.int32)
    tx = optim.get("apollo_mini")

    def peak(fn, *args):
        m = jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile().memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes)

    fused_peak = peak(fused.step_fn(model, tx), model.params, fused.init(model, tx), tokens)
    remat = ml.passes.remat("nothing_saveable")(model)  # the same saved activations
    plain_peak = peak(train_step_fn(remat, tx), remat.params,
                      jax.eval_shape(tx.init, remat.params), tokens)
    layer_grads = tree_bytes(model.params["layers"])
    # the whole-model gradient never exists; XLA:CPU still copies some [L, ...] stacks in the
    # update loop, so at least half of the layers' gradient bytes is saved
    assert fused_peak <= plain_peak - layer_grads // 2, (fused_peak, plain_peak, layer_grads)


def test_errors(tiny, tokens):
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="clip_norm"):
        fused.step_fn(tiny, tx, clip_norm=0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        fused.step_fn(tiny, tx, clip_norm=True)
    lora = ml.passes.lora(4)(tiny)
    with pytest.raises(ValueError, match="full training"):
        fused.init(lora, tx)
    quant = ml.passes.quantize(ml.quant.int8())(tiny)
    with pytest.raises(ValueError, match="float array"):
        fused.step_fn(quant, tx)
    plain = ml.Model(params={"w": jnp.ones((3,))}, fn=lambda p, x: x)
    with pytest.raises(TypeError, match="Llama"):
        fused.init(plain, tx)
    step = fused.step_fn(tiny, tx)
    with pytest.raises(ValueError, match="tokens"):
        step(tiny.params, fused.init(tiny, tx), tokens[:, :1])
    with pytest.raises(ValueError, match="hidden_in"):
        tiny.apply(tiny.params, tokens, hidden_in=jnp.ones((3, 18, 7)))


def test_clip_pass_skips_nonfinite_steps(tiny, tokens):
    tx = optax.adam(1e-2)
    state = fused.init(tiny, tx)
    step = jax.jit(fused.step_fn(tiny, tx, clip_norm=1.0))
    bad = jax.tree_util.tree_map(lambda a: a, tiny.params)
    bad["final_norm"] = {"scale": tiny.params["final_norm"]["scale"].at[3].set(jnp.inf)}
    p, s, loss = step(bad, state, tokens)
    assert not np.isfinite(float(loss))
    chex.assert_trees_all_equal(p, bad)          # nothing updated, state untouched
    chex.assert_trees_all_equal(s, state)
    p, s, loss = step(tiny.params, state, tokens)  # a finite step updates every layer
    assert np.isfinite(float(loss))
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), p["layers"],
                                   tiny.params["layers"])
    assert all(jax.tree_util.tree_leaves(moved))


def test_train_loop_fused_matches_the_step_and_resumes_bit_exact(tiny, tmp_path):
    from memlab.train import TrainConfig, train
    kw = dict(steps=4, batch=2, seq=16, optimizer="adamw", lr=1e-2, warmup=1, clip_norm=0.5,
              log_every=1, fused=True)
    whole = train(tiny, TrainConfig(**kw), progress=False)
    assert whole.skipped == [] and np.all(np.isfinite(whole.losses))
    assert np.all(whole.grad_norms > 0)  # the first pass's global norm, before clipping
    # the same steps by hand: ml.fused.step_fn with the trainer's optimizer and batches
    from memlab.train import make_optimizer, random_batches
    config = TrainConfig(**kw)
    tx = make_optimizer(config, tiny.params)
    step = jax.jit(fused.step_fn(tiny, tx, clip_norm=0.5))
    p, s = tiny.params, fused.init(tiny, tx)
    for i, batch in zip(range(4), random_batches(256, 2, 16, 0)(0)):
        p, s, loss = step(p, s, jnp.asarray(batch))
        np.testing.assert_allclose(float(loss), whole.losses[i], rtol=1e-6)
    # staged with a checkpoint: the fused state round-trips bit-exactly
    ck = str(tmp_path / "ck")
    train(tiny, TrainConfig(**kw, ckpt_dir=ck), stop_at=2, progress=False)
    resumed = train(tiny, TrainConfig(**kw, ckpt_dir=ck), resume=True, progress=False)
    np.testing.assert_array_equal(resumed.losses, whole.losses[2:])


def test_train_config_fused_errors(tiny):
    from memlab.train import TrainConfig, train
    with pytest.raises(ValueError, match="accum=1"):
        TrainConfig(steps=2, batch=4, accum=2, fused=True)
    with pytest.raises(ValueError, match="clip_norm"):
        TrainConfig(steps=2, clip_norm=None, fused=True)
    with pytest.raises(ValueError, match="full training"):
        train(ml.passes.lora(4)(tiny), TrainConfig(steps=2, batch=2, seq=8, fused=True),
              progress=False)
