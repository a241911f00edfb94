"""The offload pass (memlab.passes.offload / memlab.offload): Superpipeline-style layer streaming.

The streamed model against the resident one (logits, KV-cache generation and gradients
bit-identical), the placement read from the compiled HLO (``S(5)`` host memory space on
the layer arguments) and the per-step transfers read from the program lowered for CUDA
(CPU lowers in-jit transfers to nothing), the exact byte formulas against ``tree_bytes``,
optimizer state in host memory, the combination with the remat pass's activation
offload, and the errors."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import memlab as ml
from memlab.generate import make_cache
import memlab.offload as off
from memlab.memory import tree_bytes
from memlab.memory.bytes import abstractify
from memlab.memory.estimate import bytes_by_category
from memlab.memory.profile import loss_fn
from memlab.model import Workload

N_LAYERS = 5  # odd: most (k, p) leave an epilogue


@pytest.fixture(scope="module")
def model():
    return ml.models.init(ml.models.config("tiny", n_layers=N_LAYERS), jax.random.key(5))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(6), (3, 7), 0, 256)


_forward = jax.jit(lambda m, t: m(t))


def _entry_params(compiled_text):
    """The entry computation's parameter layouts, e.g. ``f32[5,64,32]{2,1,0:S(5)}``."""
    layout = re.search(r"entry_computation_layout=\{(.*?)\}(?:, \w+=|\n)", compiled_text).group(1)
    return re.findall(r"\w+\[[\d,]*\]\{[^}]*\}", layout.split(")->")[0])


def _placed_like_the_pass(layers):
    """The streamed leaves (per-layer matrices) in host memory, the per-layer vectors on
    the device (:func:`memlab.offload.streams_from_host`)."""
    leaves = jax.tree_util.tree_leaves(layers)
    host = [x for x in leaves if off.streams_from_host(x)]
    assert host and len(host) < len(leaves)          # the tiny Llama has both kinds
    return (off.memory_kinds_of(host) == {"pinned_host"} and
            off.memory_kinds_of([x for x in leaves if not off.streams_from_host(x)]) == {"device"})


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)  # host and device arrays compare as numpy


@pytest.mark.parametrize("k,p", [(1, 0), (2, 1), (2, 3)])
def test_logits_bit_identical_and_layers_in_host_memory(model, tokens, k, p):
    streamed = ml.passes.offload(layers_on_device=k, prefetch=p)(model)
    assert _placed_like_the_pass(streamed.params["layers"])
    assert off.memory_kinds_of({n: v for n, v in streamed.params.items() if n != "layers"}) == {"device"}
    ref = _forward(model, tokens)
    chex.assert_trees_all_equal(_forward(streamed, tokens), ref)
    # the compiled program's layer arguments are in host memory space S(5), nothing else is
    streamed_leaves = [x for x in jax.tree_util.tree_leaves(model.params["layers"])
                       if off.streams_from_host(x)]
    layer_shapes = {f"f32[{','.join(map(str, x.shape))}]" for x in streamed_leaves}
    params = _entry_params(_forward.lower(streamed, tokens).compile().as_text())
    host = [s for s in params if ":S(5)" in s]
    assert len(host) == len(streamed_leaves)
    assert {s.split("{")[0] for s in host} <= layer_shapes
    # the resident model has none: a pass that dropped the placement would fail above
    assert not any(":S(5)" in s for s in _entry_params(_forward.lower(model, tokens).compile().as_text()))


def _expected_fetches(k, p, n_layers=N_LAYERS):
    """Layers per fetch: prologue p, the scan body's k, the tail's R - p (0s dropped)."""
    steps, rest = off.schedule(n_layers, k, p)
    assert steps >= 1 and p <= rest < k + p and steps * k + rest == n_layers
    return [n for n in (p, k, rest - p) if n]


@pytest.mark.parametrize("k,p", [(2, 1), (1, 3), (2, 0)])
def test_cuda_lowering_moves_k_layers_per_step_to_device(model, tokens, k, p):
    """Lowered for CUDA the forward moves, per layer leaf, the p prefetched layers, then k
    layers per scan step, then the tail: every transfer is a slice of the layer stack of
    that many layers, and a step's device weights are (k + p) layers = param_bytes."""
    streamed = ml.passes.offload(k, p)(model)
    text = _forward.trace(streamed, tokens).lower(lowering_platforms=("cuda",)).as_text()
    moves = off.transfers(text)
    assert moves and all(where == "device" for where, _, _ in moves)
    layer_leaves = [x.shape for x in jax.tree_util.tree_leaves(model.params["layers"])
                    if off.streams_from_host(x)]
    want = [(n,) + s[1:] for n in _expected_fetches(k, p) for s in layer_leaves]
    assert sorted(shape for _, shape, _ in moves) == sorted(want)  # text order != run order
    nb = off.param_bytes(streamed.params, N_LAYERS, k, p)
    body = sum(int(np.prod(s)) * 4 for s in want if s[0] == k)  # the scan step's fetch
    if p != k:
        assert body == k * nb["layer"]
    assert (k + p) * nb["layer"] + nb["resident"] == nb["device"]
    # the resident model moves nothing
    plain = _forward.trace(model, tokens).lower(lowering_platforms=("cuda",)).as_text()
    assert off.transfers(plain) == []


@pytest.fixture(scope="module")
def train_tokens():
    return jax.random.randint(jax.random.key(8), (2, 10), 0, 256)


@pytest.fixture(scope="module")
def resident_grads(model, train_tokens):
    return jax.jit(jax.value_and_grad(lambda prm: loss_fn(model)(prm, train_tokens)))(model.params)


@pytest.mark.parametrize("k,p", [(2, 1)])
def test_gradients_bit_identical_and_layer_grads_in_host_memory(model, train_tokens,
                                                                resident_grads, k, p):
    t = train_tokens
    streamed = ml.passes.offload(k, p)(model)
    vg = jax.value_and_grad(lambda params, m: loss_fn(m)(params, t))
    loss0, g0 = resident_grads
    loss1, g1 = jax.jit(lambda prm: vg(prm, streamed))(streamed.params)
    assert float(loss0) == float(loss1)
    chex.assert_trees_all_equal(_np(g1), _np(g0))
    assert _placed_like_the_pass(g1["layers"])
    assert off.memory_kinds_of(g1["embed"]) == {"device"}
    # compiled from abstract shapes (as the profiler does) the layer gradients are outputs in
    # host memory space S(5) too
    step = jax.jit(lambda prm: vg(prm, streamed))
    out_layout = re.search(r"entry_computation_layout=\{(.*?)\}(?:, \w+=|\n)", step.lower(
        abstractify(streamed.params)).compile().as_text()).group(1).split(")->")[1]
    n_leaves = len([x for x in jax.tree_util.tree_leaves(model.params["layers"])
                    if off.streams_from_host(x)])
    assert out_layout.count(":S(5)") == n_leaves
    # the backward fetches each block from host again and sends its gradients to host
    text = step.trace(streamed.params).lower(lowering_platforms=("cuda",)).as_text()
    moves = off.transfers(text)
    steps, rest = off.schedule(N_LAYERS, k, p)
    to_host = [s[0] for w, s, _ in moves if w == "pinned_host" and len(s) >= 2]
    assert sorted(to_host) == sorted([k] * n_leaves + ([rest] * n_leaves if rest else []))


def test_quantized_layers_stream_with_equal_gradients(model, train_tokens):
    """NF4 weights (QArray leaves: packed codes + float scales) stream like float ones: same
    logits, and the trainable float leaves get the resident model's gradients (the backward
    runs the quantized nn.Dense dispatch again, outside the forward's interceptor context)."""
    from memlab.model import merge_trainable, split_trainable
    q = ml.passes.quantize(ml.quant.nf4(block=32))(model)
    qs = ml.passes.offload(2, 1)(q)
    x = train_tokens[:, :-1]
    chex.assert_trees_all_equal(_forward(qs, x), _forward(q, x))

    def grads(m):
        tr, fr = split_trainable(m)
        return jax.jit(jax.grad(lambda t: loss_fn(m)(merge_trainable(t, fr), train_tokens)))(tr)
    # equal to float rounding: a per-layer scale's gradient sums in another order (2e-7 rel.)
    chex.assert_trees_all_close(_np(grads(qs)), _np(grads(q)), rtol=2e-6, atol=1e-9)


def test_remat_activation_offload_composes(model):
    """remat('offload:mlp_hidden') then offload: same gradients as the resident model under the
    same remat policy, and the lowered program also moves the MLP hidden to host."""
    t = jax.random.randint(jax.random.key(9), (2, 9), 0, 256)
    remat = ml.passes.remat("offload:mlp_hidden")(model)
    both = ml.compose(ml.passes.remat("offload:mlp_hidden"), ml.passes.offload(1, 0))(model)
    vg = jax.value_and_grad(lambda params, m: loss_fn(m)(params, t))
    _, g0 = jax.jit(lambda prm: vg(prm, remat))(remat.params)
    _, g1 = jax.jit(lambda prm: vg(prm, both))(both.params)
    chex.assert_trees_all_close(_np(g1), _np(g0), rtol=1e-6, atol=1e-7)
    text = jax.jit(lambda prm: vg(prm, both)).trace(both.params).lower(
        lowering_platforms=("cuda",)).as_text()
    hidden = (2 * 8, model.spec.d_ff)    # [B * T, d_ff]: the MLP runs on the flattened tokens
    assert any(w == "pinned_host" and s == hidden for w, s, _ in off.transfers(text))


@jax.jit
def _prefill_then_decode(m, prompt, nxt):
    cache = make_cache(m, prompt.shape[0], 11)
    first, cache = m(prompt, cache=cache, last_only=True)
    second, cache = m(nxt, cache=cache, last_only=True)
    return first, second, cache


def test_kv_cache_prefill_and_decode_unchanged(model, tokens):
    """With a KV cache (the forward-only streaming path): prefill then a decode step give the
    resident model's logits and cache, bit for bit."""
    nxt = jax.random.randint(jax.random.key(3), (3, 1), 0, 256)
    streamed = ml.passes.offload(2, 1)(model)
    chex.assert_trees_all_equal(_prefill_then_decode(streamed, tokens, nxt),
                                _prefill_then_decode(model, tokens, nxt))


def test_byte_formulas_exact(model):
    for k, p in [(1, 0), (2, 1), (2, 3), (5, 0)]:
        streamed = ml.passes.offload(k, p)(model)
        nb = off.param_bytes(streamed.params, N_LAYERS, k, p)
        leaves = jax.tree_util.tree_leaves(model.params["layers"])
        layers = [a for a in leaves if off.streams_from_host(a)]       # the streamed matrices
        window = [a[:k + p] for a in layers]                            # what a step holds
        # the non-layer params and the layers' per-layer vectors stay on the device
        non_layer = tree_bytes({n: v for n, v in model.params.items() if n != "layers"}) + \
            tree_bytes([a for a in leaves if not off.streams_from_host(a)])
        assert nb["device"] == tree_bytes(window) + non_layer
        assert nb["host"] == tree_bytes(layers)
        assert nb["layer"] * N_LAYERS == tree_bytes(layers)
        # the pass's analytic estimate says the same
        spec = model.spec
        base = bytes_by_category(spec, "train", 2, 16)
        est = ml.passes.offload(k, p, optimizer_state=True).estimate_bytes(
            base, spec, Workload("train", 2, 16))
        assert est["params"] == base["params"] == tree_bytes(model.params)
        assert est["params_device"] == nb["device"] and est["params_host"] == nb["host"]
        assert est["gradients_device"] == non_layer + k * nb["layer"]
        assert est["optimizer_state_host"] == base["optimizer_state"]
        assert est["optimizer_state_device"] == 0
    # llama2-7b bf16 shapes (abstract): device bytes fall with k
    big = ml.models.load("llama2-7b", dtype="bfloat16")
    shapes = big.params
    matrices = [a for a in jax.tree_util.tree_leaves(shapes["layers"]) if off.streams_from_host(a)]
    layer = tree_bytes(matrices) // 32
    non_layer = tree_bytes(shapes) - tree_bytes(matrices)
    for k, p in [(1, 1), (4, 4), (16, 0)]:
        streamed = ml.passes.offload(k, p)(big)
        assert off.memory_kinds_of([a for a in jax.tree_util.tree_leaves(
            streamed.params["layers"]) if off.streams_from_host(a)]) == {"pinned_host"}
        assert off.param_bytes(streamed.params, 32, k, p)["device"] == (k + p) * layer + non_layer
    frac = off.param_bytes(shapes, 32, 1, 1)["device"] / tree_bytes(shapes)
    assert frac < 0.4                             # >= 60% less device memory for the weights


def test_profile_reports_host_bytes(model):
    streamed = ml.passes.offload(2, 1)(model)
    r = ml.memory.profile(streamed, task="decode", batch=2, seq=12)
    nb = off.param_bytes(streamed.params, N_LAYERS, 2, 1)
    assert r.by_category["params_host"] == r.analytic["params_host"] == nb["host"]
    assert r.by_category["params"] == tree_bytes(model.params)


def test_train_step_equals_resident_and_profile_reports_host_state(model, train_tokens):
    """One AdamW step through memlab's train step: the streamed model (state on the device,
    host gradients moved over, updates back to host) gives the resident step's new params bit
    for bit, keeping the layers in host memory; the profile of the optimizer-offloaded model
    counts params and optimizer state in host memory exactly as the estimate says."""
    from memlab.memory.profile import train_step_fn
    tx = optax.adamw(1e-2)
    streamed = ml.passes.offload(2, 1)(model)
    stx = ml.passes.offload.optimizer(streamed, tx)
    new0, _, loss0 = jax.jit(train_step_fn(model, tx))(model.params, tx.init(model.params),
                                                       train_tokens)
    new1, state1, loss1 = jax.jit(train_step_fn(streamed, stx))(
        streamed.params, stx.init(streamed.params), train_tokens)
    assert float(loss0) == float(loss1)
    chex.assert_trees_all_equal(_np(new1), _np(new0))
    assert _placed_like_the_pass(new1["layers"])
    assert off.memory_kinds_of(state1) == {"device"}
    r = ml.memory.profile(ml.passes.offload(1, 1, optimizer_state=True)(model), task="train",
                          batch=2, seq=9)
    for cat in ("params_host", "optimizer_state_host"):
        assert r.by_category[cat] == r.analytic[cat]
    assert r.by_category["optimizer_state_host"] == r.by_category["optimizer_state"]


def test_optimizer_state_in_host_memory(model):
    """host_optimizer: state in pinned_host, arguments S(5) in the compiled step; the device
    mode is bit-identical to plain AdamW, the host mode (compute_on) equal to rounding."""
    streamed = ml.passes.offload(1, 1, optimizer_state=True)(model)
    tx = optax.adamw(1e-2)
    grads = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.key(x.size % 97), x.shape), model.params)
    grads2 = jax.tree_util.tree_map(lambda g: 0.5 * g - 0.1, grads)
    ref_state, ref_update = tx.init(model.params), jax.jit(tx.update)
    ref = []
    for g in (grads, grads2):
        u, ref_state = ref_update(g, ref_state, model.params)
        ref.append(u)
    for compute, exact in (("device", True), ("host", False)):
        htx = ml.passes.offload.optimizer(streamed, tx, compute=compute)
        state = htx.init(model.params)
        assert off.memory_kinds_of(state) == {"pinned_host"}
        update = jax.jit(htx.update).lower(grads, state, model.params).compile()
        n_state = len(jax.tree_util.tree_leaves(state))
        assert sum(":S(5)" in s for s in _entry_params(update.as_text())) == n_state
        for g, want in zip((grads, grads2), ref):
            u, state = update(g, state, model.params)
            assert off.memory_kinds_of(state) == {"pinned_host"}
            if exact:
                chex.assert_trees_all_equal(_np(u), _np(want))
            else:
                chex.assert_trees_all_close(_np(u), _np(want), rtol=1e-5, atol=1e-9)
    # a model without the pass keeps the transformation as it is
    assert ml.passes.offload.optimizer(model, tx) is tx


def test_bad_input(model, monkeypatch):
    with pytest.raises(ValueError, match="layers_on_device=0 must be >= 1.*layers_on_device=1"):
        ml.passes.offload(layers_on_device=0)
    with pytest.raises(ValueError, match="prefetch=-1 must be >= 0"):
        ml.passes.offload(1, prefetch=-1)
    with pytest.raises(TypeError, match="layers_on_device must be an int"):
        ml.passes.offload(layers_on_device=1.5)
    with pytest.raises(TypeError, match="optimizer_state must be True or False"):
        ml.passes.offload(1, 0, optimizer_state="yes")
    with pytest.raises(ValueError, match="exceeds the model's 5 layers.*layers_on_device=5"):
        ml.passes.offload(layers_on_device=6, prefetch=0)(model)
    with pytest.raises(ValueError, match="nearest feasible prefetch is 2"):
        ml.passes.offload(layers_on_device=3, prefetch=3)(model)
    with pytest.raises(ValueError, match="memory_kind='hbm' is not a host memory"):
        ml.passes.offload(1, 0, memory_kind="hbm")
    with pytest.raises(ValueError, match="apply the pass once"):
        ml.passes.offload(1, 0)(ml.passes.offload(1, 0)(model))
    with pytest.raises(TypeError, match="needs memlab's Llama"):
        ml.passes.offload(1, 0)(ml.Model(fn=lambda p, x: x @ p["w"], params={"w": jnp.ones((2, 2))}))
    monkeypatch.setattr(off, "host_memory_kinds", lambda device=None: ["device"])
    with pytest.raises(ValueError, match="no host memory kind.*nearest feasible option"):
        ml.passes.offload(1, 0)
