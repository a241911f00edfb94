"""Six decoder families (Llama with three RoPE scalings, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3) against a float64 numpy forward written from the Hugging Face definitions
(tests/_hf_reference.py), on tiny random checkpoints in HF's on-disk format
(tests/_hf_checkpoints.py).

* the reference itself: sliding-window reach, layer-type derivation, RoPE scaling bands,
  and that each family's distinguishing feature moves the logits far beyond the
  tolerance (so ignoring it fails the comparisons below);
* memlab's ``Llama`` module, given a ``LlamaConfig`` and params mapped here from the HF
  tensors, matches the reference (relative max error <= 1e-4 in float32);
* ``memlab.models.load(directory)`` on a written checkpoint (sharded float32, single-file
  bfloat16) matches the reference the same way and carries the tokenizer.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import memlab as ml
from memlab.models.llama import Llama, LlamaConfig

import _hf_checkpoints as hc
import _hf_reference as ref
from _fast_compile import compiled

FAMILIES = ["llama", "llama3", "llama-linear", "llama-dynamic", "mistral", "qwen2", "qwen3",
            "gemma2", "gemma3", "gemma3-linear"]
T = 16  # longer than every tiny sliding window (5) and than llama-dynamic's context (8)
TOL = 1e-4


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite logits"
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _run(fn, params, tokens):
    """``fn(params, tokens)`` compiled with the cheap XLA:CPU pipeline."""
    return compiled(fn, params, jnp.asarray(tokens))


def _logits(model, tokens):
    return _run(model.apply, model.params, tokens)


def _tokens(config, seed, t=T, batch=2):
    return np.random.default_rng(seed).integers(0, config["vocab_size"], (batch, t)).astype(
        np.int32)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    fam = request.param
    cfg = hc.tiny_config(fam)
    weights = hc.random_weights(cfg, seed=FAMILIES.index(fam) + 11)
    tokens = _tokens(cfg, seed=FAMILIES.index(fam) + 101)
    return fam, cfg, weights, tokens, ref.forward(cfg, weights, tokens)


# ---------------------------------------------------------------------------
# The reference on its own
# ---------------------------------------------------------------------------
def test_reference_sliding_window_reach():
    """One sliding layer of window W: position p reads tokens p-W+1..p and nothing older."""
    cfg = hc.tiny_config("mistral", num_hidden_layers=1)
    w, tok = hc.random_weights(cfg, 3), _tokens(cfg, 4, batch=1)
    W, p = cfg["sliding_window"], T - 1
    base = ref.forward(cfg, w, tok)[0, p]
    for src, moves in ((p - W, False), (p - W + 1, True)):
        alt = tok.copy()
        alt[0, src] = (alt[0, src] + 1) % cfg["vocab_size"]
        delta = np.max(np.abs(ref.forward(cfg, w, alt)[0, p] - base))
        assert (delta > 1e-6) == moves, (src, delta)
    # a full-attention layer sees the oldest token
    full = dict(cfg, sliding_window=None)
    alt = tok.copy()
    alt[0, 0] = (alt[0, 0] + 1) % cfg["vocab_size"]
    assert np.max(np.abs(ref.forward(full, w, alt)[0, p] - ref.forward(full, w, tok)[0, p])) > 1e-6


def test_reference_layer_types():
    g2 = hc.tiny_config("gemma2", num_hidden_layers=4)
    assert ref.layer_types(g2) == ["sliding_attention", "full_attention"] * 2
    g3 = hc.tiny_config("gemma3", num_hidden_layers=12)
    del g3["sliding_window_pattern"]  # HF default 6: layers 5 and 11 global
    assert [i for i, t in enumerate(ref.layer_types(g3)) if t == "full_attention"] == [5, 11]
    q2 = hc.tiny_config("qwen2", num_hidden_layers=3, use_sliding_window=True, max_window_layers=1)
    assert ref.layer_types(q2) == ["full_attention"] + ["sliding_attention"] * 2
    assert set(ref.layer_types(hc.tiny_config("qwen2"))) == {"full_attention"}
    assert set(ref.layer_types(hc.tiny_config("mistral"))) == {"sliding_attention"}
    no_window = hc.tiny_config("mistral", sliding_window=None)
    assert set(ref.layer_types(no_window)) == {"full_attention"}
    explicit = hc.tiny_config("gemma3-linear")
    assert ref.layer_types(explicit) == explicit["layer_types"]


def test_reference_rope_scaling():
    plain = ref.inv_freq(hc.tiny_config("llama"), "full_attention", T)
    np.testing.assert_allclose(plain, 10000.0 ** -(np.arange(0, 16, 2) / 16), rtol=1e-15)
    lin = ref.inv_freq(hc.tiny_config("llama-linear"), "full_attention", T)
    np.testing.assert_allclose(lin, plain / 4.0, rtol=1e-15)
    # dynamic: unchanged up to max_position_embeddings (8), a larger base beyond it
    dyn_cfg = hc.tiny_config("llama-dynamic")
    np.testing.assert_allclose(ref.inv_freq(dyn_cfg, "full_attention", 8), plain, rtol=1e-15)
    grown = ref.inv_freq(dyn_cfg, "full_attention", 16)
    base = 10000.0 * (2.0 * 16 / 8 - 1.0) ** (16 / 14)
    np.testing.assert_allclose(grown, base ** -(np.arange(0, 16, 2) / 16), rtol=1e-12)
    # llama3: short wavelengths kept, long ones divided by factor, continuous in between
    cfg3 = hc.tiny_config("llama3")
    sc = cfg3["rope_scaling"]
    f3 = ref.inv_freq(cfg3, "full_attention", T)
    wave = 2 * np.pi / plain
    hi_w = sc["original_max_position_embeddings"] / sc["high_freq_factor"]
    lo_w = sc["original_max_position_embeddings"] / sc["low_freq_factor"]
    assert (wave < hi_w).any() and (wave > lo_w).any() and ((wave >= hi_w) & (wave <= lo_w)).any()
    np.testing.assert_allclose(f3[wave < hi_w], plain[wave < hi_w], rtol=1e-15)
    np.testing.assert_allclose(f3[wave > lo_w], plain[wave > lo_w] / sc["factor"], rtol=1e-15)
    ratio = f3 / plain  # 1 at the short edge, 1/factor at the long edge, monotone between
    assert np.all(np.diff(ratio) <= 1e-15) and ratio.min() >= 1 / sc["factor"] - 1e-15
    # Gemma 3: sliding layers use the local base and ignore rope_scaling
    g3 = hc.tiny_config("gemma3-linear")
    np.testing.assert_allclose(ref.inv_freq(g3, "sliding_attention", T),
                               1e4 ** -(np.arange(0, 16, 2) / 16), rtol=1e-15)
    np.testing.assert_allclose(ref.inv_freq(g3, "full_attention", T),
                               1e6 ** -(np.arange(0, 16, 2) / 16) / 8.0, rtol=1e-15)


# (family, config changes that remove one feature, zero the biases?, changes made to both
# sides first): each feature must matter
FEATURES = [
    ("llama", {"tie_word_embeddings": True}, False, {}),
    ("llama3", {"rope_scaling": None}, False, {}),
    ("llama-linear", {"rope_scaling": None}, False, {}),
    ("llama-dynamic", {"rope_scaling": None}, False, {}),
    ("mistral", {"sliding_window": None}, False, {}),
    ("qwen2", {}, True, {}),  # q/k/v biases
    ("qwen3", {"model_type": "llama"}, False, {}),  # q/k norms
    ("gemma2", {"attn_logit_softcapping": None}, False, {}),
    ("gemma2", {"final_logit_softcapping": None}, False, {}),
    ("gemma2", {"query_pre_attn_scalar": 16}, False, {}),
    ("gemma2", {"layer_types": ["full_attention"] * 3}, False, {}),
    ("gemma2", {"model_type": "llama", "hidden_act": "gelu_pytorch_tanh"}, False, {}),
    ("gemma3", {"rope_local_base_freq": 1e6}, False, {}),
    ("gemma3", {"sliding_window_pattern": 1}, False, {}),
    # q/k norms: a Gemma 2 with the same layer types and one RoPE base
    ("gemma3", {"model_type": "gemma2"}, False,
     {"rope_local_base_freq": 1e6, "layer_types": ["sliding_attention"] * 2
      + ["full_attention", "sliding_attention"]}),
    ("gemma3-linear", {"rope_scaling": None}, False, {}),
]


@pytest.mark.parametrize("fam,changes,zero_biases,both", FEATURES,
                         ids=[f"{f}-{'-'.join(c) or 'biases'}" for f, c, _, _ in FEATURES])
def test_reference_features_matter(fam, changes, zero_biases, both):
    """Each family's own features move the logits far beyond TOL: a forward that ignored
    one could not pass the comparisons below."""
    cfg = hc.tiny_config(fam, **both)
    weights = hc.random_weights(cfg, seed=FAMILIES.index(fam) + 11)
    tokens = _tokens(cfg, seed=FAMILIES.index(fam) + 101)
    w2 = {k: np.zeros_like(v) if zero_biases and k.endswith(".bias") else v
          for k, v in weights.items()}
    if "tie_word_embeddings" in changes or "model_type" in changes:
        w2.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    cfg2 = dict(cfg, **changes)
    assert _rel_err(ref.forward(cfg2, w2, tokens), ref.forward(cfg, weights, tokens)) > 100 * TOL


# ---------------------------------------------------------------------------
# memlab's module with params mapped here from the HF tensors
# ---------------------------------------------------------------------------
def memlab_config(cfg) -> LlamaConfig:
    """A LlamaConfig read from an HF config.json dict (fields of memlab.models.llama)."""
    fam = ref.family(cfg)
    gemma = fam in ref.GEMMA
    types = ref.layer_types(cfg)
    sliding = "sliding_attention" in types
    extra = {}
    if gemma:
        extra.update(norm_plus_one=True, embed_scale=True, post_norms=True, mlp_act="gelu_tanh",
                     query_scale=float(ref.get(cfg, "query_pre_attn_scalar")) ** -0.5,
                     attn_softcap=ref.get(cfg, "attn_logit_softcapping"),
                     final_softcap=ref.get(cfg, "final_logit_softcapping"))
    if fam == "gemma3":
        extra["rope_local_theta"] = float(ref.get(cfg, "rope_local_base_freq"))
    return LlamaConfig(
        name=f"hf-{fam}", vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=ref.kv_heads(cfg), head_dim=ref.head_dim(cfg), d_ff=cfg["intermediate_size"],
        rope_theta=float(ref.get(cfg, "rope_theta")), norm_eps=float(ref.get(cfg, "rms_norm_eps")),
        tie_embeddings=ref.tied(cfg), max_seq_len=int(ref.get(cfg, "max_position_embeddings")),
        arch=fam, qkv_bias=fam == "qwen2", qk_norm=fam in ("qwen3", "gemma3"),
        sliding_window=ref.get(cfg, "sliding_window") if sliding else None,
        layer_types=tuple(types) if sliding else (),
        rope_scaling=ref.rope_params(cfg, "full_attention")[1], **extra)


def memlab_params(cfg, weights) -> dict:
    """HF tensors -> memlab's params pytree (kernels transposed, layers stacked on axis 0)."""
    fam = ref.family(cfg)
    gemma = fam in ref.GEMMA
    n = cfg["num_hidden_layers"]

    def stack(suffix, transpose=False):
        ws = [np.asarray(weights[f"model.layers.{i}.{suffix}"], np.float32) for i in range(n)]
        return np.stack([w.T for w in ws] if transpose else ws)

    attn = {f"{p}_proj": {"kernel": stack(f"self_attn.{p}_proj.weight", True)}
            for p in ("q", "k", "v", "o")}
    if fam == "qwen2":
        for p in ("q", "k", "v"):
            attn[f"{p}_proj"]["bias"] = stack(f"self_attn.{p}_proj.bias")
    if fam in ("qwen3", "gemma3"):
        attn["q_norm"] = {"scale": stack("self_attn.q_norm.weight")}
        attn["k_norm"] = {"scale": stack("self_attn.k_norm.weight")}
    layers = {
        "attn_norm": {"scale": stack("input_layernorm.weight")},
        "attn": attn,
        "mlp_norm": {"scale": stack("pre_feedforward_layernorm.weight" if gemma
                                    else "post_attention_layernorm.weight")},
        "mlp": {f"{p}_proj": {"kernel": stack(f"mlp.{p}_proj.weight", True)}
                for p in ("gate", "up", "down")},
    }
    if gemma:
        layers["post_attn_norm"] = {"scale": stack("post_attention_layernorm.weight")}
        layers["post_mlp_norm"] = {"scale": stack("post_feedforward_layernorm.weight")}
    params = {"embed": {"embedding": np.asarray(weights["model.embed_tokens.weight"], np.float32)},
              "layers": layers,
              "final_norm": {"scale": np.asarray(weights["model.norm.weight"], np.float32)}}
    if not ref.tied(cfg):
        params["lm_head"] = {"kernel": np.asarray(weights["lm_head.weight"], np.float32).T}
    return jax.tree.map(jnp.asarray, params)


def test_module_matches_reference(case):
    fam, cfg, weights, tokens, logits = case
    mcfg = memlab_config(cfg)
    params = memlab_params(cfg, weights)
    want = jax.tree.map(lambda s: (s.shape, s.dtype), mcfg.param_shapes())
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert got == want, f"param tree mismatch for {fam}:\n{got}\nvs\n{want}"
    out = _run(lambda p, t: Llama(mcfg).apply({"params": p}, t), params, tokens)
    assert _rel_err(out, logits) <= TOL, fam


# ---------------------------------------------------------------------------
# memlab.models.load on HF checkpoint directories
# ---------------------------------------------------------------------------
def test_load_matches_reference(case, tmp_path):
    fam, cfg, weights, tokens, logits = case
    path = hc.write_checkpoint(tmp_path / fam, cfg, weights, shards=2, dtype="float32")
    model = ml.models.load(str(path), dtype="float32")
    assert isinstance(model, ml.Model)
    assert all(np.dtype(x.dtype) == np.float32 for x in jax.tree_util.tree_leaves(model.params))
    assert _rel_err(_logits(model, tokens), logits) <= TOL, fam


@pytest.mark.parametrize("fam", ["qwen2", "gemma3"])
def test_load_bfloat16_single_file(fam, tmp_path):
    """A one-file bfloat16 checkpoint, upcast to float32 on load, is the bf16-rounded model."""
    cfg = hc.tiny_config(fam)
    weights = hc.random_weights(cfg, seed=5)
    tokens = _tokens(cfg, seed=6)
    path = hc.write_checkpoint(tmp_path / fam, cfg, weights, shards=1, dtype="bfloat16")
    want = ref.forward(cfg, hc.as_stored(weights, "bfloat16"), tokens)
    assert _rel_err(ref.forward(cfg, weights, tokens), want) > 10 * TOL  # rounding is visible
    model = ml.models.load(str(path), dtype="float32")
    assert _rel_err(_logits(model, tokens), want) <= TOL


def test_load_reads_tokenizer(tmp_path):
    cfg = hc.tiny_config("llama")
    path = hc.write_checkpoint(tmp_path / "tok", cfg, hc.random_weights(cfg, 0), shards=2)
    model = ml.models.load(str(path))
    assert model.tokenizer is not None
    assert model.tokenizer.encode("w7 w42 w191", add_special_tokens=False).ids == [7, 42, 191]


# ---------------------------------------------------------------------------
# The checkpoint writer
# ---------------------------------------------------------------------------
def _json(path):
    with open(path) as fh:
        return json.load(fh)


def test_checkpoint_files(tmp_path):
    cfg = hc.tiny_config("gemma2")
    weights = hc.random_weights(cfg, 1)
    assert "lm_head.weight" not in weights  # Gemma ties by default
    assert all(not np.allclose(v, v.flat[0]) for v in weights.values())
    d = hc.write_checkpoint(tmp_path / "ck", cfg, weights, shards=3)
    index = _json(f"{d}/model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    read = {}
    for f in files:
        read.update(load_file(f"{d}/{f}"))
    assert set(read) == set(weights) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in weights.values())
    for k, v in weights.items():
        np.testing.assert_array_equal(read[k], v)
    assert _json(f"{d}/config.json")["torch_dtype"] == "float32"
    tok = Tokenizer.from_file(f"{d}/tokenizer.json")
    assert tok.get_vocab_size() == cfg["vocab_size"]
    assert tok.encode("w9 w10").ids == [hc.BOS, 9, 10]
    assert _json(f"{d}/tokenizer_config.json")["eos_token"] == "</s>"
    d1 = hc.write_checkpoint(tmp_path / "bf", cfg, weights, shards=1, dtype="bfloat16")
    one = load_file(f"{d1}/model.safetensors")
    assert str(one["model.norm.weight"].dtype) == "bfloat16"
    np.testing.assert_array_equal(one["model.norm.weight"].astype(np.float32),
                                  hc.as_stored(weights, "bfloat16")["model.norm.weight"]
                                  .astype(np.float32))
