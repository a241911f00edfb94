"""LoRA / QLoRA pass: forward against float64 numpy references, adapter-only
gradients and optimizer state, training, merge, and measured memory."""
import math
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memlab as ml
from memlab.memory import estimate as est
from memlab.memory.bytes import tree_bytes
from memlab.memory.profile import loss_fn, train_step_fn
from memlab.model import merge_trainable, path_str, split_trainable
from memlab.nn.dense_dispatch import DenseDispatch
from memlab.passes.lora import ALL_LINEAR, merge_lora
from memlab.quant.qarray import QArray

ALPHA = 7.0
# odd ranks, one per-path override
RULES = {r"lm_head": None, r"mlp/down_proj/kernel$": 5, r"kernel$": True}
RANK = 3


def _randomize_adapters(model, seed):
    """Fresh random A and B (B is zero at init, so the adapters would be a no-op)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(model.params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    leaves = [jax.random.normal(k, x.shape, x.dtype) * 0.2
              if path_str(p).endswith(("lora_a", "lora_b")) else x
              for k, (p, x) in zip(keys, flat)]
    return model.replace(params=jax.tree_util.tree_unflatten(treedef, leaves))


def _np64(tree):
    def one(x):
        if isinstance(x, QArray):
            return np.asarray(x.dequantize(jnp.float32), np.float64)
        return np.asarray(x, np.float64)
    return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, QArray))


def _dense64(p, x, alpha):
    """x W (+ b) + (alpha / r) (x A) B in float64; QA-LoRA (A [in/g, r]): x group-averaged."""
    y = x @ p["kernel"]
    if "bias" in p:
        y = y + p["bias"]
    if "lora_a" in p:
        xa = x
        if p["lora_a"].shape[-2] != x.shape[-1]:
            g = x.shape[-1] // p["lora_a"].shape[-2]
            xa = x.reshape(x.shape[:-1] + (-1, g)).mean(-1)
        y = y + alpha / p["lora_a"].shape[-1] * ((xa @ p["lora_a"]) @ p["lora_b"])
    return y


def _llama_ref(params, c, tokens, alpha):
    """Float64 numpy Llama forward (half-split RoPE, GQA, SwiGLU) with LoRA layers."""
    p = _np64(params)
    t, hd = len(tokens), c.head_dim
    ang = np.arange(t)[:, None] * c.rope_theta ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * g

    causal = np.tril(np.ones((t, t), bool))
    x = p["embed"]["embedding"][tokens]
    for layer in range(c.n_layers):
        lp = jax.tree_util.tree_map(lambda a: a[layer], p["layers"])
        at, mlp = lp["attn"], lp["mlp"]
        h = rms(x, lp["attn_norm"]["scale"])
        q = rope(_dense64(at["q_proj"], h, alpha).reshape(t, c.n_heads, hd))
        k = rope(_dense64(at["k_proj"], h, alpha).reshape(t, c.n_kv_heads, hd))
        v = _dense64(at["v_proj"], h, alpha).reshape(t, c.n_kv_heads, hd)
        rep = c.n_heads // c.n_kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.where(causal, np.einsum("thd,shd->hts", q, k) / np.sqrt(hd), -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(t, -1)
        x = x + _dense64(at["o_proj"], o, alpha)
        h = rms(x, lp["mlp_norm"]["scale"])
        g = _dense64(mlp["gate_proj"], h, alpha)
        x = x + _dense64(mlp["down_proj"], g / (1 + np.exp(-g)) * _dense64(mlp["up_proj"], h, alpha),
                         alpha)
    return _dense64(p["lm_head"], rms(x, p["final_norm"]["scale"]), alpha)


def _adapter_param_count(c, rank, down_rank):
    """Adapters of every linear layer but the head, from the config alone."""
    d, q, kv, f = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.d_ff
    per_layer = rank * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f)) + down_rank * (f + d)
    return c.n_layers * per_layer


@pytest.fixture(scope="module")
def call():
    return jax.jit(lambda m, t: m(t))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(11), (2, 13), 0, 256, jnp.int32)


@pytest.fixture(scope="module")
def adapted(tiny):
    return ml.passes.lora(rank=RANK, alpha=ALPHA, rules=RULES)(tiny)


@pytest.fixture(scope="module")
def qlora(tiny):
    # the head stays float, as bitsandbytes' QLoRA keeps it
    plan = ml.compose(ml.passes.quantize(ml.quant.nf4(64, double_quant=True), rules={r"lm_head": None}),
                      ml.passes.lora(rank=RANK, alpha=ALPHA, rules=RULES))
    return plan(tiny)


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------
def test_adapters_sit_beside_stacked_kernels_and_start_as_the_base(tiny, adapted, call, tokens):
    c = tiny.spec
    a = adapted.params["layers"]["mlp"]["down_proj"]
    assert a["lora_a"].shape == (c.n_layers, c.d_ff, 5) and a["lora_b"].shape == (c.n_layers, 5, c.d_model)
    q = adapted.params["layers"]["attn"]["q_proj"]
    assert q["lora_a"].shape == (c.n_layers, c.d_model, RANK) and q["lora_a"].dtype == jnp.float32
    assert float(jnp.std(q["lora_a"])) > 0 and not np.any(np.asarray(q["lora_b"]))
    assert "lora_a" not in adapted.params["lm_head"]
    np.testing.assert_array_equal(np.asarray(call(adapted, tokens)), np.asarray(call(tiny, tokens)))


def test_random_adapters_match_float64_reference_on_tiny_llama(tiny, adapted, call, tokens):
    model = _randomize_adapters(adapted, 3)
    got = np.asarray(call(model, tokens), np.float64)
    for row in range(tokens.shape[0]):
        ref = _llama_ref(model.params, tiny.spec, np.asarray(tokens[row]), ALPHA)
        chex.assert_trees_all_close(got[row], ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    # and the adapters matter: the base alone is far from this
    base = np.asarray(call(tiny, tokens), np.float64)
    assert np.abs(base - got).max() > 100 * 2e-4 * np.abs(got).max()


class MLP(nn.Module):
    """A plain user Flax model: nothing memlab-specific in it."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(53)(x))
        x = nn.tanh(nn.Dense(29)(x))
        return nn.Dense(11)(x)


def test_plain_flax_mlp_matches_float64_reference():
    x = jax.random.normal(jax.random.key(5), (6, 37))
    module = MLP()
    base = ml.Model(module=module, params=module.init(jax.random.key(0), x)["params"])
    m = ml.passes.lora(rank=4, alpha=5.0, rules={r"Dense_[02]": True})(base)
    assert "lora_a" not in m.params["Dense_1"] and m.params["Dense_2"]["lora_a"].shape == (29, 4)
    np.testing.assert_array_equal(np.asarray(m(x)), np.asarray(base(x)))
    m = _randomize_adapters(m, 8)
    p, x64 = _np64(m.params), np.asarray(x, np.float64)
    h = np.maximum(_dense64(p["Dense_0"], x64, 5.0), 0)
    ref = _dense64(p["Dense_2"], np.tanh(_dense64(p["Dense_1"], h, 5.0)), 5.0)
    chex.assert_trees_all_close(np.asarray(jax.jit(lambda m, x: m(x))(m, x), np.float64), ref,
                                atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_inits_and_rslora_scale():
    x = jax.random.normal(jax.random.key(15), (3, 41))
    module = MLP()
    base = ml.Model(module=module, params=module.init(jax.random.key(1), x)["params"])
    kai = ml.passes.lora(rank=6, rules={r"Dense_1/kernel": True}, seed=3)(base)
    a = np.asarray(kai.params["Dense_1"]["lora_a"])  # [53, 6]: U(-1/sqrt(53), 1/sqrt(53))
    assert np.abs(a).max() <= 1 / np.sqrt(53) and abs(a.std() * np.sqrt(3 * 53) - 1) < 0.15
    gau = ml.passes.lora(rank=6, rules={r"Dense_1/kernel": True}, init="gaussian", seed=3)(base)
    g = np.asarray(gau.params["Dense_1"]["lora_a"])  # N(0, 1/r^2)
    assert abs(g.std() * 6 - 1) < 0.15 and not np.array_equal(a, g)
    rs = _randomize_adapters(ml.passes.lora(rank=6, alpha=3.0, rslora=True,
                                            rules={r"Dense_1/kernel": True})(base), 2)
    p, x64 = _np64(rs.params), np.asarray(x, np.float64)
    h = np.maximum(_dense64(p["Dense_0"], x64, 0), 0)
    h1 = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    h1 = h1 + 3.0 / np.sqrt(6) * (h @ p["Dense_1"]["lora_a"]) @ p["Dense_1"]["lora_b"]
    ref = _dense64(p["Dense_2"], np.tanh(h1), 0)
    chex.assert_trees_all_close(np.asarray(rs(x), np.float64), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_qlora_matches_dequantized_base_plus_adapters(tiny, qlora, call, tokens):
    kernel = qlora.params["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, QArray) and "nf4" in kernel.format.name
    model = _randomize_adapters(qlora, 4)
    got = np.asarray(call(model, tokens), np.float64)
    for row in range(tokens.shape[0]):
        ref = _llama_ref(model.params, tiny.spec, np.asarray(tokens[row]), ALPHA)
        chex.assert_trees_all_close(got[row], ref, atol=2e-4 * np.abs(ref).max(), rtol=0)


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------
def test_gradients_only_for_adapters_with_exact_bytes(tiny, adapted, tokens):
    model = _randomize_adapters(adapted, 6)
    trainable, frozen = split_trainable(model)
    paths = ml.param_paths(trainable)
    assert paths and all(p.endswith(("lora_a", "lora_b")) for p in paths)
    n = _adapter_param_count(tiny.spec, RANK, 5)
    assert ml.optim.param_count(trainable) == n
    batch = jnp.concatenate([tokens, tokens[:, :1]], axis=1)
    grads = jax.jit(jax.grad(lambda t: loss_fn(model)(merge_trainable(t, frozen), batch)))(trainable)
    assert tree_bytes(grads) == 4 * n
    assert tree_bytes(ml.optim.get("adamw").init(trainable)) == 2 * 4 * n + 4

    # naive reference: fold W + s A B into the kernels in jnp, differentiate through that
    def merged_loss(t):
        p = merge_trainable(t, frozen)

        def fold(node):
            if isinstance(node, dict) and "lora_a" in node:
                s = ALPHA / node["lora_a"].shape[-1]
                w = node["kernel"] + s * jnp.einsum("lir,lro->lio", node["lora_a"], node["lora_b"])
                return {"kernel": w}
            return {k: fold(v) for k, v in node.items()} if isinstance(node, dict) else node
        return loss_fn(tiny)(fold(p), batch)

    ref = jax.jit(jax.grad(merged_loss))(trainable)
    chex.assert_trees_all_close(grads, ref, atol=1e-6, rtol=2e-4)


def test_training_steps_reduce_loss_and_keep_base_bit_identical(tiny, adapted):
    tx = ml.optim.get("adamw", learning_rate=3e-2)
    step = jax.jit(train_step_fn(adapted, tx))
    params = adapted.params
    opt_state = tx.init(split_trainable(adapted, params)[0])
    batch = jax.random.randint(jax.random.key(21), (4, 17), 0, 256, jnp.int32)
    losses = []
    for _ in range(8):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    before, after = jax.tree_util.tree_leaves_with_path(adapted.params), jax.tree_util.tree_leaves_with_path(params)
    changed = 0
    for (p, x0), (_, x1) in zip(before, after):
        if path_str(p).endswith(("lora_a", "lora_b")):
            changed += not np.array_equal(np.asarray(x0), np.asarray(x1))
        else:
            np.testing.assert_array_equal(np.asarray(x0), np.asarray(x1), err_msg=path_str(p))
    assert changed == 2 * 7  # every adapter moved


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------
def _check_exact(report):
    for cat in ("params", "gradients", "optimizer_state"):
        assert report.by_category[cat] == report.analytic[cat], (cat, report.table())


def test_profile_train_counts_adapters_only_exact_equals_analytic(tiny, adapted, qlora):
    n = _adapter_param_count(tiny.spec, RANK, 5)
    lora_r = ml.memory.profile(adapted, "train", batch=2, seq=16)
    _check_exact(lora_r)
    assert lora_r.by_category["gradients"] == 4 * n
    assert lora_r.by_category["optimizer_state"] == 8 * n + 4
    assert lora_r.by_category["params"] == tree_bytes(tiny.params) + 4 * n

    q_r = ml.memory.profile(qlora, "train", batch=2, seq=16)
    _check_exact(q_r)
    assert q_r.by_category["gradients"] == 4 * n
    full = ml.memory.profile(tiny, "train", batch=2, seq=16)
    _check_exact(full)
    # the compiled step's arguments (params + optimizer state + tokens): measured 5.06x on
    # tiny, whose float embedding and head are 31% of its parameters (llama2-7b: 16x)
    ratio = full.argument_bytes / q_r.argument_bytes
    assert ratio > 5.0, ratio
    assert q_r.argument_bytes < lora_r.argument_bytes < full.argument_bytes


def test_llama2_7b_qlora_bytes_are_exact_on_abstract_params():
    big = ml.models.load("llama2-7b", dtype="bfloat16")
    assert big.abstract
    qlora = ml.compose(ml.passes.quantize(ml.quant.nf4(64, double_quant=True), rules={r"lm_head": None}),
                       ml.passes.lora(rank=16, alpha=32, rules=ALL_LINEAR))(big)
    assert qlora.abstract
    c = big.spec
    n = _adapter_param_count(c, 16, 16)
    trainable, _ = split_trainable(qlora)
    assert ml.optim.param_count(trainable) == n
    assert n / c.param_count() < 0.006  # 0.59% of the parameters train
    analytic = est.bytes_by_category(c, "train", 1, 2048)
    analytic = est.over_trainable(est.apply_passes(analytic, qlora, ml.model.Workload("train", 1, 2048)))
    assert analytic["params"] == tree_bytes(qlora.params)
    assert analytic["gradients"] == 4 * n
    assert analytic["optimizer_state"] == tree_bytes(jax.eval_shape(ml.optim.get("adamw").init, trainable))


# ---------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------
def test_merge_folds_adapters_into_float_kernels(tiny, adapted, call, tokens):
    model = _randomize_adapters(adapted, 9)
    merged = merge_lora(model)
    assert not any("lora" in p for p in ml.param_paths(merged))
    assert ml.param_paths(merged) == ml.param_paths(tiny)
    assert not any(isinstance(w, DenseDispatch) for w in merged.wrappers)
    assert merged.extra("trainable") is None and not merged.history
    assert tree_bytes(merged.params) == tree_bytes(tiny.params)
    want = np.asarray(call(model, tokens))
    chex.assert_trees_all_close(np.asarray(call(merged, tokens)), want, atol=2e-5 * np.abs(want).max(), rtol=0)
    assert ml.passes.lora.merge is merge_lora


def test_merge_of_qlora_dequantizes_or_requantizes(tiny, qlora, call, tokens):
    model = _randomize_adapters(qlora, 10)
    want = np.asarray(call(model, tokens))
    deq = merge_lora(model)
    assert not any("lora" in p for p in ml.param_paths(deq))
    assert not isinstance(deq.params["layers"]["attn"]["q_proj"]["kernel"], QArray)
    chex.assert_trees_all_close(np.asarray(call(deq, tokens)), want, atol=2e-5 * np.abs(want).max(), rtol=0)
    # the recorded merge keeps the params estimate exact
    analytic = est.apply_passes(est.bytes_by_category(tiny.spec, "prefill", 1, 8), deq,
                                ml.model.Workload("prefill", 1, 8))
    assert analytic["params"] == tree_bytes(deq.params)

    req = merge_lora(model, requantize=True)
    k = req.params["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(k, QArray) and k.format == qlora.params["layers"]["attn"]["q_proj"]["kernel"].format
    base_q = ml.passes.quantize(ml.quant.nf4(64, double_quant=True), rules={r"lm_head": None})(tiny)
    assert tree_bytes(req.params) == tree_bytes(base_q.params)
    # a fresh NF4 rounding of the merged weights: as large as NF4's error on the base
    # (measured 0.092 relative Frobenius error for both)
    for name in ("q_proj", "v_proj", "o_proj"):
        merged = np.asarray(deq.params["layers"]["attn"][name]["kernel"], np.float64)
        requant = np.asarray(req.params["layers"]["attn"][name]["kernel"].dequantize(), np.float64)
        w0 = np.asarray(tiny.params["layers"]["attn"][name]["kernel"], np.float64)
        q0 = np.asarray(qlora.params["layers"]["attn"][name]["kernel"].dequantize(), np.float64)
        err = np.linalg.norm(requant - merged) / np.linalg.norm(merged)
        base_err = np.linalg.norm(q0 - w0) / np.linalg.norm(w0)
        assert 0.5 * base_err < err < 1.2 * base_err, (name, err, base_err)


@pytest.mark.parametrize("symmetric", [False, True])
def test_qa_lora_merges_into_zero_points_keeping_the_codes(tiny, call, tokens, symmetric):
    fmt = ml.quant.intn(4, 16, symmetric=symmetric)
    base = ml.passes.quantize(fmt)(tiny)
    model = ml.passes.lora(rank=RANK, alpha=ALPHA, qa_group=16, rules=ALL_LINEAR)(base)
    c = tiny.spec
    assert model.params["layers"]["mlp"]["down_proj"]["lora_a"].shape == (c.n_layers, c.d_ff // 16, RANK)
    np.testing.assert_array_equal(np.asarray(call(model, tokens)), np.asarray(call(base, tokens)))
    model = _randomize_adapters(model, 12)
    got = np.asarray(call(model, tokens), np.float64)
    ref = _llama_ref(model.params, c, np.asarray(tokens[0]), ALPHA)
    chex.assert_trees_all_close(got[0], ref, atol=2e-4 * np.abs(ref).max(), rtol=0)

    merged = merge_lora(model)
    for name in ("q_proj", "o_proj"):
        k0, k1 = base.params["layers"]["attn"][name]["kernel"], merged.params["layers"]["attn"][name]["kernel"]
        assert isinstance(k1, QArray) and k1.format == ml.quant.intn(4, 16, symmetric=False)
        np.testing.assert_array_equal(np.asarray(k1["data"]), np.asarray(k0["data"]))  # codes kept
        np.testing.assert_array_equal(np.asarray(k1["scale"]), np.asarray(k0["scale"]))
        assert k1["zero"].dtype == jnp.float32
    assert not any("lora" in p for p in ml.param_paths(merged))
    chex.assert_trees_all_close(np.asarray(call(merged, tokens)), got, atol=2e-5 * np.abs(got).max(), rtol=0)
    analytic = est.apply_passes(est.bytes_by_category(c, "prefill", 1, 8), merged,
                                ml.model.Workload("prefill", 1, 8))
    assert analytic["params"] == tree_bytes(merged.params)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_bad_arguments_are_clear_errors(tiny, adapted):
    with pytest.raises(ValueError, match="rank must be a positive int"):
        ml.passes.lora(rank=0)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        ml.passes.lora(alpha=-1)
    with pytest.raises(ValueError, match="init='xavier'"):
        ml.passes.lora(init="xavier")
    with pytest.raises(ValueError, match="must be floating point"):
        ml.passes.lora(dtype="int8")
    with pytest.raises(ValueError, match="does not compile"):
        ml.passes.lora(rules={"(": True})
    with pytest.raises(ValueError, match=r"'layers/mlp/gate_proj/kernel'.*1\.\.64"):
        ml.passes.lora(rank=65, rules={r"gate_proj": True})(tiny)
    with pytest.raises(ValueError, match=r"qa_group=48 does not divide.*'layers/attn/q_proj/kernel'"):
        ml.passes.lora(qa_group=48)(tiny)
    with pytest.raises(ValueError, match="qa_group must be"):
        ml.passes.lora(qa_group=0)
    with pytest.raises(TypeError, match="use True"):
        ml.passes.lora(rules={r"q_proj/kernel": "yes"})(tiny)


def test_bad_rules_and_misuse_are_clear_errors(tiny, adapted, tokens):
    with pytest.warns(UserWarning, match="matched no parameter path"):
        with pytest.raises(ValueError, match="selected no dense kernel"):
            ml.passes.lora(rules={r"qproj": True})(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="'layers/attn_norm/scale'.*not a dense layer kernel"):
            ml.passes.lora(rules={r"attn_norm": True})(tiny)
        with pytest.raises(ValueError, match="embed/embedding"):
            ml.passes.lora(rules={r"embed": True})(tiny)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        ml.passes.lora()(adapted)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(tiny)
    # an adapter no nn.Dense call used is an error, never a silent no-op
    headless = ml.passes.lora(rules={r"lm_head/kernel": True})(tiny)
    with pytest.raises(ValueError, match=r"lm_head.*never applied"):
        jax.eval_shape(lambda m: m.apply(m.params, tokens, hidden_only=True), headless)
    assert math.isfinite(float(adapted(tokens).sum()))
