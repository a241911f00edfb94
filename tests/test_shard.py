"""The shard pass on 8 simulated CPU devices (tests/conftest.py sets jax_num_cpu_devices):
sharded loss / grads / train steps equal the unsharded run, per-device bytes follow the
formulas and XLA's memory_analysis, ring attention equals float64 attention, bad meshes
raise clear errors."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import memlab as ml
from memlab.memory.bytes import array_bytes, tree_bytes
from memlab.memory.profile import loss_fn, train_step_fn
from memlab.nn.ring_attention import ring_attention

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

# tiny Llama with head counts the 'model' axis (2) divides; odd vocab for the row tests below
CFG = ml.models.config("tiny", n_kv_heads=4, n_heads=4, vocab_size=256)
BATCH, SEQ = 8, 12
STRATEGIES = {"dp": ml.shard.dp("data"), "fsdp": ml.shard.fsdp("data"),
              "tp": ml.shard.tp("model"), "fsdp_tp": ml.shard.fsdp_tp("data", "model")}


@pytest.fixture(scope="module")
def base():
    return ml.models.init(CFG, jax.random.key(3))


@pytest.fixture(scope="module")
def mesh42():
    return ml.shard.mesh((4, 2), ("data", "model"))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(11), (BATCH, SEQ + 1), 0, CFG.vocab_size)


def _step(model, tx):
    """loss, grads and one optimizer step in one jit."""
    loss = loss_fn(model)
    step = train_step_fn(model, tx)

    def f(params, state, tokens):
        grads = jax.grad(loss)(params, tokens)
        new_params, new_state, value = step(params, state, tokens)
        return value, grads, new_params, new_state
    return jax.jit(f)


@pytest.fixture(scope="module")
def reference(base, tokens):
    tx = optax.adamw(1e-2, eps=1e-4)
    return _step(base, tx)(base.params, tx.init(base.params), tokens)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_sharded_loss_grads_and_adamw_step_equal_unsharded(name, base, mesh42, tokens, reference):
    strategy = STRATEGIES[name]
    model = ml.passes.shard(mesh42, strategy)(base)
    shard = model.extra("shard")
    tx = optax.adamw(1e-2, eps=1e-4)
    state = shard.put_state(tx.init(model.params), model.params)
    out = _step(model, tx)(model.params, state, shard.put_batch(tokens))
    loss, grads, new_params, new_state = out
    chex.assert_trees_all_close(loss, reference[0], rtol=1e-5)
    chex.assert_trees_all_close(grads, reference[1], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(new_params, reference[2], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(new_state, reference[3], rtol=1e-4, atol=1e-7)
    # the params really are split as the strategy says (not silently replicated)
    q = model.params["layers"]["attn"]["q_proj"]["kernel"]  # [L, d, H*hd]
    o = model.params["layers"]["attn"]["o_proj"]["kernel"]
    n_data = 4 if strategy.fsdp else 1
    n_model = 2 if strategy.tensor else 1
    assert q.sharding.shard_shape(q.shape) == (CFG.n_layers, CFG.d_model // n_data,
                                               CFG.n_heads * CFG.head_dim // n_model)
    assert o.sharding.shard_shape(o.shape)[0] == CFG.n_layers  # the layer axis is never split
    assert math.prod(o.sharding.shard_shape(o.shape)) * n_data * n_model == math.prod(o.shape)
    # gradients and the new optimizer state come out sharded like the params
    gq = grads["layers"]["attn"]["q_proj"]["kernel"]
    assert gq.sharding.shard_shape(gq.shape) == q.sharding.shard_shape(q.shape)
    mu_q = new_state[0].mu["layers"]["attn"]["q_proj"]["kernel"]
    assert mu_q.sharding.shard_shape(mu_q.shape) == q.sharding.shard_shape(q.shape)


def _expected_device_bytes(params, n, min_size):
    """Independent count: leaves of >= min_size elements divided by n, others whole."""
    total = 0
    for x in jax.tree_util.tree_leaves(params):
        b = x.size * x.dtype.itemsize
        total += b // n if x.size >= min_size else b
    return total


@pytest.mark.parametrize("opt", ["adamw", "adamw8bit"])
def test_fsdp8_per_device_bytes_formula_vs_xla(opt, base):
    mesh = ml.shard.mesh((8,), ("data",))
    # adamw by name: the profile's analytic column replays the pass's per-device estimate
    tx = ml.optim.get(opt, block_size=256) if opt == "adamw8bit" else "adamw"
    model = ml.passes.shard(mesh, ml.shard.fsdp("data"))(base)
    sh = ml.memory.profile(model, "train", batch=8, seq=16, optimizer=tx)
    tx = ml.optim.get(tx) if isinstance(tx, str) else tx
    full = tree_bytes(base.params)
    per = _expected_device_bytes(base.params, 8, 1024)
    assert sh.by_category["params"] == per == sh.by_category["gradients"]
    assert sh.global_by_category["params"] == full
    assert full / sh.by_category["params"] > 7.5  # ~1/8: small leaves stay whole
    state = jax.eval_shape(tx.init, base.params)
    if opt == "adamw":  # mu and nu shaped like params, one int32 count
        assert sh.by_category["optimizer_state"] == 2 * per + 4
    else:  # 8-bit blocks [n_blocks, 256] + absmax split over their block axis
        expect = 8
        for x in jax.tree_util.tree_leaves(state):
            if x.ndim == 0:
                continue
            whole = x.size * x.dtype.itemsize
            expect += whole // 8 if x.size >= 1024 and x.shape[0] % 8 == 0 else whole
        assert sh.by_category["optimizer_state"] == expect
        assert expect < tree_bytes(state) / 6
    # XLA's argument bytes are per device: params + optimizer state + tokens + the train
    # step's uint32[2] RNG key (memlab.train_step: the step train() runs)
    cats = sh.by_category
    assert sh.argument_bytes == cats["params"] + cats["optimizer_state"] + cats["inputs"] + 8
    if opt == "adamw":
        rep = ml.memory.profile(base, "train", batch=8, seq=16, optimizer=tx)  # unsharded
        assert rep.argument_bytes == sum(rep.by_category[k] for k in ("params", "optimizer_state",
                                                                      "inputs")) + 8
        assert rep.argument_bytes > 7.5 * sh.argument_bytes
        # the pass's analytic estimate replays to the exact per-device bytes
        for k in ("params", "gradients", "optimizer_state", "inputs"):
            assert sh.analytic[k] == cats[k], k


def test_adamw8bit_step_sharded_equals_unsharded(base, tokens):
    mesh = ml.shard.mesh((4, 2), ("data", "model"))
    tx = ml.optim.get("adamw8bit", learning_rate=1e-2, eps=1e-4, block_size=256)
    ref_state = tx.init(base.params)
    ref = jax.jit(train_step_fn(base, tx))(base.params, ref_state, tokens)
    model = ml.passes.shard(mesh, ml.shard.fsdp_tp("data", "model"))(base)
    shard = model.extra("shard")
    state = shard.put_state(tx.init(model.params), model.params)
    codes = state.mu["layers"]["mlp"]["up_proj"]["kernel"].codes  # [n_blocks, 256] uint8
    assert codes.sharding.shard_shape(codes.shape)[0] == codes.shape[0] // 8
    new_params, new_state, loss = jax.jit(train_step_fn(model, tx))(
        model.params, state, shard.put_batch(tokens))
    chex.assert_trees_all_close(loss, ref[2], rtol=1e-5)
    chex.assert_trees_all_close(new_params, ref[0], rtol=1e-5, atol=1e-5)
    # quantized moments: identical codes except where float rounding flips a code boundary
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(new_state.mu)
                        if x.dtype == np.uint8])
    b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(ref[1].mu)
                        if x.dtype == np.uint8])
    assert a.size > 0 and np.mean(a == b) > 0.999


def test_quantized_params_shard_and_match(base, mesh42, tokens):
    q = ml.passes.quantize(ml.quant.nf4(block=32))(base)  # packed 4-bit codes + block scales
    ref = jax.jit(lambda m, t: m(t))(q, tokens[:, :-1])
    model = ml.passes.shard(mesh42, ml.shard.fsdp_tp("data", "model"))(q)
    out = jax.jit(lambda m, t: m(t))(model, tokens[:, :-1])
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
    kernel = model.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, ml.quant.qarray.QArray)
    codes = max(kernel.arrays.values(), key=lambda a: a.size)
    assert math.prod(codes.sharding.shard_shape(codes.shape)) * 8 == codes.size
    per = model.extra("shard").param_bytes(model.params)
    assert per < tree_bytes(q.params) / 4


def _attention_f64(q, k, v, causal, qpos, kpos):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    if causal:
        mask = np.asarray(qpos)[:, None, :, None] >= np.asarray(kpos)[:, None, None, :]
        s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("t,s,causal", [(28, 28, True), (30, 30, True), (12, 20, False),
                                        (10, 26, True)])
def test_ring_attention_equals_float64_attention(t, s, causal):
    """Per-device blocks of 7 (odd), lengths the ring does not divide (padded), T != S."""
    mesh = ml.shard.mesh((2, 4), ("data", "context"))
    ks = jax.random.split(jax.random.key(t * 100 + s), 3)
    q = jax.random.normal(ks[0], (2, t, 4, 16))
    k = jax.random.normal(ks[1], (2, s, 2, 16))
    v = jax.random.normal(ks[2], (2, s, 2, 16))
    out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, axis="context",
                                                 causal=causal, batch_axes=("data",)))(q, k, v)
    qpos = np.broadcast_to(np.arange(t) + s - t, (2, t))
    kpos = np.broadcast_to(np.arange(s), (2, s))
    np.testing.assert_allclose(out, _attention_f64(q, k, v, causal, qpos, kpos),
                               rtol=2e-5, atol=2e-5)


def test_ring_attention_gradients_and_explicit_positions():
    mesh = ml.shard.mesh((8,), ("context",))
    ks = jax.random.split(jax.random.key(5), 4)
    q, k, v = (jax.random.normal(kk, (1, 24, 2, 8)) for kk in ks[:3])
    perm = jax.random.permutation(ks[3], 24)[None].astype(jnp.int32)  # shuffled global positions
    ref = lambda q, k, v: ml.nn.attention(q, k, v, causal=True, q_positions=perm,  # noqa: E731
                                          kv_positions=perm, impl="naive").sum()
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, axis="context", causal=True,  # noqa
                                          q_positions=perm, kv_positions=perm).sum()
    np.testing.assert_allclose(jax.jit(ring)(q, k, v), ref(q, k, v), rtol=1e-5)
    chex.assert_trees_all_close(jax.jit(jax.grad(ring, (0, 1, 2)))(q, k, v),
                                jax.grad(ref, (0, 1, 2))(q, k, v), rtol=1e-4, atol=1e-5)


def test_sequence_parallel_model_equals_unsharded(base, tokens):
    mesh = ml.shard.mesh((2, 4), ("data", "context"))
    # batch over 'data', sequence over 'context', params ZeRO-3 over both (8-way)
    model = ml.passes.shard(mesh, ml.shard.sp("context", data="data", fsdp=True))(base)
    q = model.params["layers"]["attn"]["q_proj"]["kernel"]
    assert math.prod(q.sharding.shard_shape(q.shape)) * 8 == q.size
    loss = loss_fn
    ref = jax.jit(jax.value_and_grad(loss(base)))(base.params, tokens)
    out = jax.jit(jax.value_and_grad(loss(model)))(model.params, tokens)
    chex.assert_trees_all_close(out, ref, rtol=1e-4, atol=1e-6)
    # the ring really runs: its collective-permutes are in the compiled HLO
    hlo = jax.jit(loss(model)).lower(model.params, tokens).compile().as_text()
    assert "collective-permute" in hlo


def test_bad_meshes_and_strategies_raise_clear_errors(base, mesh42):
    with pytest.raises(ValueError, match=r"uses mesh axis 'model'.*\('data',\)"):
        ml.passes.shard(ml.shard.mesh((8,), ("data",)), ml.shard.tp("model"))
    explicit = jax.make_mesh((8,), ("data",))  # jax's default: Explicit axes
    with pytest.raises(ValueError, match=r"needs AxisType.Auto axes.*ml.shard.mesh"):
        ml.passes.shard(explicit, ml.shard.fsdp("data"))
    with pytest.raises(TypeError, match="strategy must be a memlab.shard.Strategy"):
        ml.passes.shard(mesh42, "fsdp")
    odd = ml.models.abstract(CFG, d_model=60, d_ff=90, vocab_size=250)
    with pytest.raises(ValueError, match=r"FSDP cannot split parameter 'embed/embedding'.*"
                                         r"'data',\) of size 8.*nearest feasible size is 6"):
        ml.passes.shard(ml.shard.mesh((8,), ("data",)), ml.shard.fsdp("data"))(odd)
    with pytest.raises(ValueError, match=r"'layers/mlp/down_proj/kernel. has dimension 90.*"
                                         r"'model' of size 4.*nearest feasible 'model' size "
                                         r"is 3 or 5"):
        ml.passes.shard(ml.shard.mesh((2, 4), ("data", "model")),
                        ml.shard.tp("model"))(ml.models.abstract(CFG, d_model=60, d_ff=90))
    with pytest.raises(ValueError, match=r"n_heads=4 is not divisible .*'model' of size 8"):
        ml.passes.shard(ml.shard.mesh((1, 8), ("data", "model")), ml.shard.tp("model"))(base)
    model = ml.passes.shard(mesh42, ml.shard.dp("data"))(base)
    with pytest.raises(ValueError, match=r"batch 6 is not divisible by the data axes.*size 4"):
        model(jnp.zeros((6, 8), jnp.int32) + 1)
    with pytest.raises(ValueError, match="sequence parallelism its own axis"):
        ml.shard.Strategy("bad", batch="data", context="data")
    with pytest.raises(ValueError, match="axis='ctx' is not a mesh axis"):
        ring_attention(*(jnp.ones((1, 8, 2, 4)),) * 3, mesh=mesh42, axis="ctx")


def test_specs_follow_megatron_and_fsdp_rules(mesh42):
    shapes = ml.models.abstract(CFG).params
    specs = ml.shard.param_specs(shapes, mesh42, ml.shard.fsdp_tp("data", "model"))
    layer = specs["layers"]
    assert layer["attn"]["q_proj"]["kernel"] == P(None, "data", "model")  # column: out on model
    assert layer["mlp"]["down_proj"]["kernel"] == P(None, "model", "data")  # row: in on model
    assert specs["embed"]["embedding"] == P("model", "data")  # vocab-parallel
    assert layer["attn_norm"]["scale"] == P()  # 128 elements < min_size: replicated
    by_device = ml.shard.per_device_bytes(shapes, specs, mesh42)
    expect = sum(array_bytes(x) // (8 if x.size >= 1024 else 1)
                 for x in jax.tree_util.tree_leaves(shapes))
    assert by_device == expect


def test_sharded_decode_profile_and_logits(base, mesh42, tokens):
    model = ml.passes.shard(mesh42, ml.shard.fsdp_tp("data", "model"))(base)
    rep = ml.memory.profile(model, "decode", batch=4, seq=32)
    specs = ml.shard.param_specs(base.params, mesh42, model.extra("shard").strategy)
    assert rep.by_category["params"] == rep.analytic["params"] == \
        ml.shard.per_device_bytes(base.params, specs, mesh42) < tree_bytes(base.params) / 7
    assert rep.by_category["inputs"] == 4 * 4 // 4  # [4, 1] int32 tokens over 'data' (4)
    assert rep.global_by_category["params"] == tree_bytes(base.params)
    assert "per device" in rep.table()
    out = jax.jit(lambda m, t: m(t))(model, tokens[:4, :-1])
    chex.assert_trees_all_close(out, base(tokens[:4, :-1]), rtol=1e-5, atol=1e-5)


def test_estimate_exact_after_quantize_and_lora(base, mesh42):
    """The pass's per-device estimate replays exactly behind passes that change storage
    (NF4 codes) or what trains (LoRA adapters: gradients and state of adapters only)."""
    strategy = ml.shard.fsdp_tp("data", "model")
    q = ml.compose(ml.passes.quantize(ml.quant.nf4(block=32)), ml.passes.shard(mesh42, strategy))
    rep = ml.memory.profile(q(base), "decode", batch=4, seq=32)
    assert rep.analytic["params"] == rep.by_category["params"] < rep.global_by_category["params"]
    lora = ml.compose(ml.passes.lora(rank=4), ml.passes.shard(mesh42, strategy))
    rep = ml.memory.profile(lora(base), "train", batch=8, seq=16)
    for k in ("params", "gradients", "optimizer_state", "inputs"):
        assert rep.analytic[k] == rep.by_category[k], k
    cats = rep.by_category  # + the train step's uint32[2] RNG key
    assert rep.argument_bytes == cats["params"] + cats["optimizer_state"] + cats["inputs"] + 8
