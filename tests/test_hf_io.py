"""Hugging Face checkpoints (memlab.models.hf): config mapping, streaming load, save.

Checkpoints are written here with ``safetensors.numpy`` from random numpy tensors under
their HF names and ``[out, in]`` layout; loaded params are compared with those tensors
(transposed, stacked), and saved checkpoints with them again, bit for bit.
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import memlab as ml
from memlab.models import hf
from memlab.models.llama import LlamaConfig
from memlab.quant.qarray import QArray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- a tiny checkpoint writer ---------------------------------------------------------
BASE = {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def hf_config(model_type="llama", drop=(), **over):
    c = dict(BASE, model_type=model_type)
    c.update(over)
    for k in drop:  # keys left to the family's default
        del c[k]
    return c


def hf_tensors(c: dict, seed: int = 0) -> dict:
    """Random float32 tensors with the HF names and shapes of config ``c``."""
    cfg = hf.config_from_hf(c, "t")
    rng = np.random.default_rng(seed)
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.d_ff
    mat = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)  # noqa: E731
    vec = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": mat(cfg.vocab_size, d), "model.norm.weight": vec(d)}
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = mat(cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(d)
        w[p + "post_attention_layernorm.weight"] = vec(d)
        w[p + "self_attn.q_proj.weight"] = mat(cfg.n_heads * hd, d)
        w[p + "self_attn.k_proj.weight"] = mat(cfg.n_kv_heads * hd, d)
        w[p + "self_attn.v_proj.weight"] = mat(cfg.n_kv_heads * hd, d)
        w[p + "self_attn.o_proj.weight"] = mat(d, cfg.n_heads * hd)
        w[p + "mlp.gate_proj.weight"] = mat(f, d)
        w[p + "mlp.up_proj.weight"] = mat(f, d)
        w[p + "mlp.down_proj.weight"] = mat(d, f)
        if cfg.qkv_bias:
            for x, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
                w[p + f"self_attn.{x}_proj.bias"] = (0.1 * rng.standard_normal(n * hd)).astype(
                    np.float32)
        if cfg.qk_norm:
            w[p + "self_attn.q_norm.weight"] = vec(hd)
            w[p + "self_attn.k_norm.weight"] = vec(hd)
        if cfg.post_norms:
            w[p + "pre_feedforward_layernorm.weight"] = vec(d)
            w[p + "post_feedforward_layernorm.weight"] = vec(d)
    return w


VOCAB = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(37)]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def write_tokenizer(directory: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>",
                   "chat_template": TEMPLATE}, f)


def write_checkpoint(directory, c: dict, w: dict, shards: int = 1, dtype=np.float32,
                     tokenizer: bool = True) -> str:
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(c, f)
    w = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in w.items()}
    names = list(w)
    if shards == 1:
        save_file(w, os.path.join(directory, "model.safetensors"))
    else:
        wmap = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: w[k] for k in part}, os.path.join(directory, fname))
            wmap.update({k: fname for k in part})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wmap}, f)
    if tokenizer:
        write_tokenizer(directory)
    return directory


def memlab_view(c: dict, w: dict) -> dict:
    """The memlab params the HF tensors ``w`` should load as: ``{path: numpy}``, built
    from the name table of the module docstring (kernels transposed, layers stacked)."""
    cfg = hf.config_from_hf(c, "t")
    gemma = cfg.post_norms
    layer = {"input_layernorm.weight": "attn_norm/scale",
             "post_attention_layernorm.weight": "post_attn_norm/scale" if gemma
             else "mlp_norm/scale",
             "pre_feedforward_layernorm.weight": "mlp_norm/scale",
             "post_feedforward_layernorm.weight": "post_mlp_norm/scale",
             "self_attn.q_norm.weight": "attn/q_norm/scale",
             "self_attn.k_norm.weight": "attn/k_norm/scale"}
    for x in "qkvo":
        layer[f"self_attn.{x}_proj.weight"] = f"attn/{x}_proj/kernel"
        layer[f"self_attn.{x}_proj.bias"] = f"attn/{x}_proj/bias"
    for x in ("gate", "up", "down"):
        layer[f"mlp.{x}_proj.weight"] = f"mlp/{x}_proj/kernel"
    out, stacks = {}, {}
    for name, a in w.items():
        t = a.T if a.ndim == 2 and name != "model.embed_tokens.weight" else a
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            stacks.setdefault("layers/" + layer[rest], {})[int(i)] = t
        else:
            out[{"model.embed_tokens.weight": "embed/embedding", "model.norm.weight":
                 "final_norm/scale", "lm_head.weight": "lm_head/kernel"}[name]] = t
    for path, by_layer in stacks.items():
        out[path] = np.stack([by_layer[i] for i in range(cfg.n_layers)])
    return out


def flat(params) -> dict:
    from memlab.model import path_str
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))
    return {path_str(p): x for p, x in leaves[0]}


def assert_bitwise(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        la = jax.tree.leaves(fa[k])
        lb = jax.tree.leaves(fb[k])
        assert len(la) == len(lb), k
        for x, y in zip(la, lb):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype)
            assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)), k


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    c = hf_config()
    w = hf_tensors(c, seed=1)
    d = write_checkpoint(tmp_path_factory.mktemp("llama"), c, w, shards=3)
    return d, c, w


@pytest.fixture(scope="module")
def llama(llama_dir):
    return ml.models.load(llama_dir[0])


# -- configs ---------------------------------------------------------------------------
OLD_CONFIGS = {  # the literals CONFIGS held before the JSON files (their fields must not move)
    "smollm2-135m": LlamaConfig(
        name="smollm2-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
        n_kv_heads=3, head_dim=64, d_ff=1536, rope_theta=100000.0, norm_eps=1e-5,
        tie_embeddings=True, max_seq_len=8192),
    "llama2-7b": LlamaConfig(
        name="llama2-7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
        n_kv_heads=32, head_dim=128, d_ff=11008, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, max_seq_len=4096),
    "llama3-8b": LlamaConfig(
        name="llama3-8b", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
        n_kv_heads=8, head_dim=128, d_ff=14336, rope_theta=500000.0, norm_eps=1e-5,
        tie_embeddings=False, max_seq_len=8192),
    "llama3-70b": LlamaConfig(
        name="llama3-70b", vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
        n_kv_heads=8, head_dim=128, d_ff=28672, rope_theta=500000.0, norm_eps=1e-5,
        tie_embeddings=False, max_seq_len=131072),
    "qwen2.5-0.5b": LlamaConfig(
        name="qwen2.5-0.5b", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
        n_kv_heads=2, head_dim=64, d_ff=4864, rope_theta=1000000.0, norm_eps=1e-6,
        tie_embeddings=True, max_seq_len=32768),
    "tiny": LlamaConfig(
        name="tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, d_ff=128, rope_theta=10000.0, tie_embeddings=False, max_seq_len=512),
}
OLD_FIELDS = ("name", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
              "d_ff", "rope_theta", "norm_eps", "tie_embeddings", "max_seq_len", "param_dtype",
              "dtype", "attention", "mlp_chunks")


def test_named_configs_from_json_keep_the_old_values():
    assert list(ml.models.CONFIGS)[:len(OLD_CONFIGS)] == list(OLD_CONFIGS)
    for name, old in OLD_CONFIGS.items():
        new = ml.models.CONFIGS[name]
        for f in OLD_FIELDS:
            assert getattr(new, f) == getattr(old, f), (name, f)
            assert type(getattr(new, f)) is type(getattr(old, f)), (name, f)
        assert new.param_count() >= old.param_count()
    q = ml.models.CONFIGS["qwen2.5-0.5b"]
    assert (q.arch, q.qkv_bias) == ("qwen2", True)  # Qwen2's q/k/v biases are modelled
    assert q.param_count() - OLD_CONFIGS["qwen2.5-0.5b"].param_count() == 24 * (14 + 2 * 2) * 64
    assert dict(ml.models.CONFIGS["llama3-70b"].rope_scaling)["rope_type"] == "llama3"
    for name in ("smollm2-135m", "llama2-7b", "llama3-8b", "tiny"):  # plain Llama: all equal
        assert ml.models.CONFIGS[name] == OLD_CONFIGS[name], name
    assert ml.models.config("tiny", dtype="bfloat16").dtype == "bfloat16"


def test_named_config_files_are_package_data():
    import configparser
    cp = configparser.ConfigParser()
    cp.read(os.path.join(REPO, "setup.cfg"))
    patterns = cp["options.package_data"]["memlab.models"].split()
    import fnmatch
    files = sorted(os.listdir(ml.models.CONFIG_DIR))
    assert files and all(any(fnmatch.fnmatch(f"configs/{f}", p) for p in patterns) for f in files)
    assert {f[:-5] for f in files} == set(ml.models.CONFIGS)


FAMILIES = {
    "llama3": hf_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 32}),
    "llama-linear": hf_config("llama", rope_scaling={"type": "linear", "factor": 2.0}),
    "llama-dynamic": hf_config("llama", rope_scaling={"type": "dynamic", "factor": 2.0}),
    "mistral": hf_config("mistral", sliding_window=8),
    "mistral-nowindow": hf_config("mistral", sliding_window=None),
    "qwen2": hf_config("qwen2", tie_word_embeddings=True, use_sliding_window=False,
                       sliding_window=32),
    "qwen2-sliding": hf_config("qwen2", num_hidden_layers=4, use_sliding_window=True,
                               sliding_window=8, max_window_layers=3),
    "qwen3": hf_config("qwen3", head_dim=16),
    "gemma2": hf_config("gemma2", num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
                        sliding_window=8, hidden_activation="gelu_pytorch_tanh"),
    "gemma3": hf_config("gemma3_text", drop=("rope_theta",), num_hidden_layers=4, head_dim=16,
                        sliding_window=8, sliding_window_pattern=3, rope_local_base_freq=100.0,
                        query_pre_attn_scalar=20),
}


def test_config_from_hf_families():
    c = {k: hf.config_from_hf(v, k) for k, v in FAMILIES.items()}
    assert c["llama3"].rope_scaling == (("factor", 8.0), ("high_freq_factor", 4.0),
                                        ("low_freq_factor", 1.0),
                                        ("original_max_position_embeddings", 32),
                                        ("rope_type", "llama3"))
    assert dict(c["llama-linear"].rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    assert dict(c["llama-dynamic"].rope_scaling)["rope_type"] == "dynamic"
    assert c["llama3"].head_dim == 8 and not c["llama3"].tie_embeddings  # 32 / 4; HF: untied
    assert (c["mistral"].sliding_window, c["mistral"].layer_types) == (8, ())
    assert c["mistral-nowindow"].sliding_window is None
    q2 = c["qwen2"]
    assert (q2.arch, q2.qkv_bias, q2.qk_norm, q2.sliding_window, q2.tie_embeddings) == \
        ("qwen2", True, False, None, True)  # use_sliding_window false: no window
    assert c["qwen2-sliding"].layer_types == ("full_attention",) * 3 + ("sliding_attention",)
    q3 = c["qwen3"]
    assert (q3.qk_norm, q3.qkv_bias, q3.head_dim) == (True, False, 16)
    assert hf.config_from_hf(hf_config("qwen3"), "q").head_dim == 128  # Qwen3's default
    g2 = c["gemma2"]
    assert (g2.norm_plus_one, g2.embed_scale, g2.post_norms, g2.mlp_act, g2.qk_norm) == \
        (True, True, True, "gelu_tanh", False)
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (g2.attn_softcap, g2.final_softcap, g2.tie_embeddings) == (50.0, 30.0, True)
    assert g2.query_scale == 24 ** -0.5
    g3 = c["gemma3"]
    assert g3.layer_types == ("sliding_attention", "sliding_attention", "full_attention",
                              "sliding_attention")
    assert (g3.qk_norm, g3.rope_local_theta, g3.attn_softcap, g3.final_softcap) == \
        (True, 100.0, None, None)
    assert g3.rope_theta == 1e6 and g3.tie_embeddings  # Gemma 3 defaults
    assert g3.query_scale == 20 ** -0.5
    default6 = hf.config_from_hf(hf_config("gemma3_text", num_hidden_layers=7, head_dim=16), "g")
    assert [i for i, t in enumerate(default6.layer_types) if t == "full_attention"] == [5]
    explicit = hf.config_from_hf(hf_config("gemma2", num_hidden_layers=2, head_dim=16,
                                           layer_types=["full_attention"] * 2), "g")
    assert explicit.layer_types == ("full_attention",) * 2


def test_config_from_hf_multimodal_gemma3_and_rope_parameters():
    text = dict(FAMILIES["gemma3"])
    mm = {"model_type": "gemma3", "text_config": text, "vision_config": {"hidden_size": 8}}
    assert hf.config_from_hf(mm, "g") == hf.config_from_hf(FAMILIES["gemma3"], "g")
    v5 = dict(FAMILIES["gemma3"])
    del v5["rope_local_base_freq"]
    v5["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                "rope_theta": 5e5},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}
    c = hf.config_from_hf(v5, "g")
    assert (c.rope_theta, c.rope_local_theta) == (5e5, 1e3)
    assert dict(c.rope_scaling) == {"rope_type": "linear", "factor": 8.0}
    flat_v5 = hf_config("llama", rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    c = hf.config_from_hf(flat_v5, "l")
    assert (c.rope_theta, c.rope_scaling) == (123.0, None)


def test_config_to_hf_round_trips():
    configs = [hf.config_from_hf(v, k) for k, v in FAMILIES.items()]
    configs += list(ml.models.CONFIGS.values())
    configs.append(dataclasses.replace(configs[0], param_dtype="bfloat16", mlp_chunks=2))
    for c in configs:
        d = json.loads(json.dumps(hf.config_to_hf(c)))
        assert hf.config_from_hf(d, c.name) == c, c.name
    with pytest.raises(ValueError, match="qk_norm"):
        hf.config_to_hf(dataclasses.replace(configs[0], qk_norm=True))


@pytest.mark.parametrize("bad, match", [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported; memlab reads llama, mistral, "
                             r"qwen2, qwen3, gemma2, gemma3_text, gemma3"),
    (hf_config("llama", attention_bias=True), "attention_bias"),
    (hf_config("llama", hidden_act="relu"), "activation 'relu'"),
    (hf_config("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (hf_config("llama", num_key_value_heads=3), "n_kv_heads=3"),
    ({"model_type": "gemma3"}, "text_config"),
])
def test_config_from_hf_errors(bad, match):
    with pytest.raises(ValueError, match=match) as e:
        hf.config_from_hf(bad, "x", source="some/config.json")
    assert "some/config.json" in str(e.value)


# -- loading ---------------------------------------------------------------------------
def test_load_places_every_tensor(llama_dir, llama):
    d, c, w = llama_dir
    want = memlab_view(c, w)
    got = flat(llama.params)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)
        assert got[k].dtype == jnp.float32
    assert llama.spec.name == os.path.basename(d) and llama.spec.n_layers == 2
    assert not llama.abstract and isinstance(llama.module, ml.models.Llama)
    # tokenizer, special ids from tokenizer_config.json's strings, the chat template
    assert llama.tokenizer.encode("w3 w5").ids == [VOCAB.index("w3"), VOCAB.index("w5")]
    assert dict(llama.extra("special_tokens")) == {"bos": 0, "eos": 1, "unknown": 2}
    assert llama.extra("chat_template") == TEMPLATE
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 40, (2, 5)), jnp.int32)
    ref = ml.Model(params=jax.tree.map(jnp.asarray, llama.params), module=llama.module)
    np.testing.assert_array_equal(np.asarray(llama(tokens)), np.asarray(ref(tokens)))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2", "gemma3"])
def test_load_family_tensor_names(tmp_path, family):
    c = FAMILIES[family]
    w = hf_tensors(c, seed=3)
    m = ml.models.load(write_checkpoint(tmp_path / family, c, w), tokenizer=False)
    assert m.tokenizer is None
    want = memlab_view(c, w)
    got = flat(m.params)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)


def test_load_casts_as_it_reads(tmp_path, llama_dir):
    _, c, w = llama_dir
    d = write_checkpoint(tmp_path / "bf16", c, w, dtype=ml_dtypes.bfloat16, tokenizer=False)
    m32 = ml.models.load(d, tokenizer=False)  # bf16 file -> float32: exact
    mbf = ml.models.load(llama_dir[0], dtype="bfloat16", tokenizer=False)  # f32 file -> bf16
    assert mbf.spec.param_dtype == mbf.spec.dtype == "bfloat16"
    for k, v in memlab_view(c, w).items():
        v16 = v.astype(ml_dtypes.bfloat16)  # round to nearest even, as numpy's cast does
        np.testing.assert_array_equal(np.asarray(flat(m32.params)[k]), v16.astype(np.float32))
        got = np.asarray(flat(mbf.params)[k])
        assert got.dtype == ml_dtypes.bfloat16
        assert np.array_equal(got.view(np.uint16), v16.view(np.uint16)), k


QUANT = {"int8": ml.quant.int8(), "nf4": ml.quant.nf4(16), "fp8": ml.quant.fp8()}


@pytest.fixture(scope="module")
def quantized(llama_dir):
    """The checkpoint quantized as it is read, per format (int8 by its name)."""
    return {k: ml.models.load(llama_dir[0], quantize=k if k == "int8" else fmt, tokenizer=False)
            for k, fmt in QUANT.items()}


def test_load_quantized_as_read_equals_the_quantize_pass(llama_dir, llama, quantized):
    for k in ("int8",):
        q, fmt = quantized[k], QUANT[k]
        ref = ml.passes.quantize(fmt)(llama)
        assert_bitwise(q.params, ref.params)
        assert [p.name for p, _ in q.history] == [f"quantize(rtn-{fmt.name})"]
        assert q.wrappers == ref.wrappers
        assert isinstance(q.params["lm_head"]["kernel"], QArray)
        assert isinstance(q.params["layers"]["mlp"]["up_proj"]["kernel"], QArray)
        assert not isinstance(q.params["embed"]["embedding"], QArray)
    with pytest.raises(ValueError, match="cannot calibrate"):
        ml.models.load(llama_dir[0], tokenizer=False,
                       quantize=ml.quant.methods.get("gptq")(ml.quant.int4(16)))
    with pytest.raises(ValueError, match="quantize='int3'"):
        ml.models.load(llama_dir[0], quantize="int3", tokenizer=False)


def test_load_into_a_mesh(llama_dir, llama, quantized):
    mesh = ml.shard.mesh((4, 2), ("data", "model"))
    sp = ml.passes.shard(mesh, ml.shard.fsdp_tp("data", "model", min_size=16))
    abstract = ml.models.abstract(llama_dir[0])
    for q, ref in ((None, llama), ("int8", quantized["int8"])):
        m = ml.models.load(llama_dir[0], shard=sp, quantize=q, tokenizer=False)
        shapes = abstract if q is None else ml.passes.quantize(ml.quant.int8())(abstract)
        want = jax.tree.leaves(sp(shapes).params)  # the pass's shardings, as shapes
        for a, b, s in zip(jax.tree.leaves(m.params), jax.tree.leaves(ref.params), want):
            assert a.sharding == s.sharding
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert m.extra("shard") is not None and m.module.layer_shardings is not None
        assert [p.name for p, _ in m.history][-1].startswith("shard(")
    assert tuple(m.params["layers"]["mlp"]["up_proj"]["kernel"]["data"].sharding.spec) == \
        (None, "data", "model")
    with pytest.raises(TypeError, match=r"shard= takes ml.passes.shard\(mesh, strategy\)"):
        ml.models.load(llama_dir[0], shard=ml.passes.cast("bfloat16"), tokenizer=False)


def test_abstract_and_config_from_a_path(llama_dir, llama):
    d = llama_dir[0]
    a = ml.models.abstract(d)
    assert a.abstract and a.spec == dataclasses.replace(llama.spec)
    b = ml.models.abstract(os.path.join(d, "config.json"), dtype="bfloat16")
    assert b.spec.name == os.path.basename(d) and b.spec.dtype == "bfloat16"
    assert jax.tree.map(lambda x: (x.shape, x.dtype), a.params) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), llama.params)
    assert ml.models.config(d) == llama.spec
    with pytest.raises(ValueError, match="no file or directory"):
        ml.models.load(os.path.join(d, "nothere"))
    with pytest.raises(ValueError, match="a config.json alone has no weights"):
        ml.models.load(os.path.join(d, "config.json"))


# -- saving ----------------------------------------------------------------------------
def read_dir(d) -> dict:
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="numpy") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_save_writes_the_hf_checkpoint_back(tmp_path, llama_dir, llama):
    d, c, w = llama_dir
    out = ml.models.save(llama, tmp_path / "out", max_shard_size="30KB")
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert all(os.path.getsize(os.path.join(out, f)) < 30_000 + 10_000 for f in shards)
    written = read_dir(out)
    assert sorted(written) == sorted(w)
    for k, v in w.items():  # the original tensors, names, layout and bits
        assert written[k].dtype == v.dtype and np.array_equal(written[k], v), k
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(w)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in w.values())
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert hf.config_from_hf(cfg, llama.spec.name) == llama.spec
    tc = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert (tc["bos_token"], tc["eos_token"], tc["chat_template"]) == ("<s>", "</s>", TEMPLATE)
    back = ml.models.load(out)
    assert_bitwise(back.params, llama.params)
    assert back.tokenizer.encode("w1 w9").ids == llama.tokenizer.encode("w1 w9").ids
    assert back.extras == llama.extras
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ml.models.save(llama, out)
    ml.models.save(llama, out, overwrite=True)  # one file now: stale shards are gone
    assert sorted(f for f in os.listdir(out) if f.startswith("model")) == ["model.safetensors"]


def estimated_params(model) -> int:
    from memlab.memory import estimate as est
    from memlab.model import Workload
    base = est.bytes_by_category(est.base_spec(model), "decode", 1, 8)
    return est.apply_passes(base, model, Workload("decode", 1, 8))["params"]


def test_save_load_bitwise_bfloat16_and_quantized(tmp_path, llama_dir, quantized):
    d = llama_dir[0]
    bf = ml.models.load(d, dtype="bfloat16", tokenizer=False)
    back = ml.models.load(ml.models.save(bf, tmp_path / "bf"), dtype="bfloat16", tokenizer=False)
    assert_bitwise(back.params, bf.params)
    assert read_dir(tmp_path / "bf")["lm_head.weight"].dtype == ml_dtypes.bfloat16
    for k, q in quantized.items():  # int8; nf4 (0-d arrays per layer); fp8 (stored as bytes)
        out = ml.models.save(q, tmp_path / k, keep_quantized=True)
        side = json.load(open(os.path.join(out, "memlab_quantization.json")))
        assert set(side["kernels"]) == {p for p in flat(q.params) if p.endswith("kernel")}
        back = ml.models.load(out, tokenizer=False)
        assert_bitwise(back.params, q.params)
        assert back.wrappers == q.wrappers
        # the recorded pass makes the analytic estimate count the stored bytes
        assert estimated_params(back) == ml.memory.tree_bytes(back.params) == \
            ml.memory.tree_bytes(q.params)


def test_save_dequantizes_and_merges_lora_by_default(tmp_path, llama, quantized):
    q = quantized["int8"]
    back = ml.models.load(ml.models.save(q, tmp_path / "deq"), tokenizer=False)
    for k, v in flat(q.params).items():
        want = v.dequantize() if isinstance(v, QArray) else v
        np.testing.assert_array_equal(np.asarray(flat(back.params)[k]), np.asarray(want))
    lora = ml.passes.lora(rank=2, rules=ml.passes.lora.ALL_LINEAR)(llama)
    b = jax.tree.map(lambda x: x, lora.params)
    key = jax.random.key(3)
    for name in ("q_proj", "v_proj"):  # nonzero B, so the merge changes the kernels
        node = b["layers"]["attn"][name]
        node["lora_b"] = 0.1 * jax.random.normal(key, node["lora_b"].shape)
    lora = lora.replace(params=b)
    merged = ml.passes.lora.merge(lora)
    back = ml.models.load(ml.models.save(lora, tmp_path / "lora"), tokenizer=False)
    assert_bitwise(back.params, merged.params)
    assert not np.array_equal(np.asarray(back.params["layers"]["attn"]["q_proj"]["kernel"]),
                              np.asarray(llama.params["layers"]["attn"]["q_proj"]["kernel"]))
    with pytest.raises(ValueError, match="abstract"):
        ml.models.save(ml.models.abstract("tiny"), tmp_path / "abs")


# -- bad input -------------------------------------------------------------------------
@pytest.fixture()
def broken(tmp_path, llama_dir):
    """A fresh sharded copy of the llama checkpoint to damage."""
    _, c, w = llama_dir
    return write_checkpoint(tmp_path / "ck", c, dict(w), shards=2), c, w


def test_error_no_config(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty/config.json not found.*download"):
        ml.models.load(str(tmp_path / "empty"))


def test_error_unsupported_model_type(broken):
    d, c, _ = broken
    json.dump(dict(c, model_type="falcon"), open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"config.json: model_type 'falcon' is not supported; "
                                         r"memlab reads llama, mistral"):
        ml.models.load(d)


def test_error_missing_shard(broken):
    d = broken[0]
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"shard model-00002-of-00002.safetensors named "
                                                r"in .*index.json .* is missing.*fetch"):
        ml.models.load(d)


def test_error_truncated_file(broken):
    d = broken[0]
    path = os.path.join(d, "model-00001-of-00002.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    with pytest.raises(ValueError, match=r"model-00001-of-00002.safetensors is not a readable "
                                         r"safetensors file .*truncated or corrupt"):
        ml.models.load(d)


def test_error_wrong_shape(tmp_path, llama_dir):
    _, c, w = llama_dir
    bad = dict(w)
    bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((63, 32), np.float32)
    d = write_checkpoint(tmp_path / "shape", c, bad)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' in "
                                         r"model.safetensors has shape \[63, 32\], but the config "
                                         r"implies \[64, 32\]"):
        ml.models.load(d)


def test_error_missing_and_unexpected_tensors(tmp_path, llama_dir):
    _, c, w = llama_dir
    less = {k: v for k, v in w.items() if k != "model.layers.0.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"1 tensors the config needs are missing, e.g. "
                                         r"\['model.layers.0.self_attn.k_proj.weight'\]"):
        ml.models.load(write_checkpoint(tmp_path / "less", c, less))
    more = dict(w, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)})
    with pytest.raises(ValueError, match=r"1 tensors are not part of a llama decoder.*"
                                         r"o_proj.bias.*attention_bias"):
        ml.models.load(write_checkpoint(tmp_path / "more", c, more))
    extra_layer = dict(w, **{"model.layers.2.input_layernorm.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match="layer 2 is beyond the config's 2 layers"):
        ml.models.load(write_checkpoint(tmp_path / "deeper", c, extra_layer))
    # skipped, as transformers skips them: rotary buffers, a tied model's stray head
    ok = dict(w, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    ml.models.load(write_checkpoint(tmp_path / "ok", c, ok), tokenizer=False)


def test_error_tokenizer_missing(broken, llama):
    d = broken[0]
    os.remove(os.path.join(d, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json not found.*tokenizer=False"):
        ml.models.load(d)
    m = ml.models.load(d, tokenizer=False)
    assert m.tokenizer is None and m.extras == ()
    assert_bitwise(m.params, llama.params)


def test_error_bad_dtype_and_index(tmp_path, llama_dir):
    _, c, w = llama_dir
    ints = dict(w, **{"model.norm.weight": np.ones(32, np.int32)})
    with pytest.raises(ValueError, match=r"'model.norm.weight' in model.safetensors has dtype "
                                         r"I32; memlab reads float"):
        ml.models.load(write_checkpoint(tmp_path / "int", c, ints))
    d = write_checkpoint(tmp_path / "idx", c, w, shards=2)
    idx = os.path.join(d, "model.safetensors.index.json")
    data = json.load(open(idx))
    name = next(iter(data["weight_map"]))
    other = [f for f in set(data["weight_map"].values()) if f != data["weight_map"][name]][0]
    data["weight_map"][name] = other
    json.dump(data, open(idx, "w"))
    with pytest.raises(ValueError, match=f"in files that lack them, e.g. '{name}'"):
        ml.models.load(d)


# -- GGUF paths -------------------------------------------------------------------------
def test_load_gguf_path(tmp_path):
    import gguf
    c = hf_config(num_key_value_heads=4)
    w = hf_tensors(c, seed=5)
    path = str(tmp_path / "tiny-llama.gguf")
    g = gguf.GGUFWriter(path, "llama")
    g.add_block_count(2)
    g.add_embedding_length(32)
    g.add_feed_forward_length(64)
    g.add_head_count(4)
    g.add_head_count_kv(4)
    g.add_context_length(64)
    g.add_rope_freq_base(10000.0)
    g.add_layer_norm_rms_eps(1e-5)
    g.add_vocab_size(40)
    vocab = ["<s>", "</s>", "<unk>", "a", "b", "ab"] + [f"t{i}" for i in range(34)]
    g.add_tokenizer_model("gpt2")
    g.add_token_list(vocab)
    g.add_token_merges(["a b"])
    g.add_token_types([3, 3, 3] + [1] * 37)
    g.add_bos_token_id(0)
    g.add_eos_token_id(1)

    def permute(x, n):  # llama.cpp's Q/K row order (interleaved pairs per head)
        o, i = x.shape
        return x.reshape(n, 2, o // n // 2, i).swapaxes(1, 2).reshape(o, i)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight":
                 "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight":
                 "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    for k, v in w.items():
        if k.startswith("model.layers."):
            _, _, i, rest = k.split(".", 3)
            if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                v = permute(v, 4)
            g.add_tensor(f"blk.{i}.{per_layer[rest]}", v)
        else:
            g.add_tensor(names[k], v)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    m = ml.models.load(path, quantize=None)
    assert m.spec.name == "tiny-llama" and m.spec.n_layers == 2
    got = flat(m.params)
    for k, v in memlab_view(c, w).items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)
    assert dict(m.extra("special_tokens")) == {"bos": 0, "eos": 1}
    assert m.tokenizer.encode("ab").ids == [5]
    a = ml.models.abstract(path)
    assert a.abstract and a.spec == m.spec


# -- memory ----------------------------------------------------------------------------
MEMORY_CHILD = textwrap.dedent("""
    import json, re, resource, sys
    import jax, jax.numpy as jnp
    import memlab as ml
    jnp.zeros(1).block_until_ready()  # the runtime is up before the baseline

    def status(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\\s+(\\d+)", text).group(1)) * 1024

    before = status("VmRSS")
    try:  # reset the peak (VmHWM) to now; else ru_maxrss over-counts, never under-counts
        open("/proc/self/clear_refs", "w").write("5")
        peak = lambda: status("VmHWM")  # noqa: E731
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    q = None if sys.argv[2] == "none" else sys.argv[2]
    m = ml.models.load(sys.argv[1], quantize=q, tokenizer=False)
    jax.block_until_ready(m.params)
    print(json.dumps({"peak": peak() - before, "final": ml.memory.tree_bytes(m.params)}))
""")
OVERHEAD = 128 << 20  # runtime, compiled programs, tracing: independent of the weights' size


def test_load_peak_memory_is_final_plus_one_tensor(tmp_path):
    """Peak RSS while loading <= final params + the largest tensor + a fixed overhead, for
    a ~200 MB float32 checkpoint, float and int8 (a whole-state-dict load would need the
    whole checkpoint again on top)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the peak RSS is read from Linux's /proc/self/status")
    c = hf_config(vocab_size=4096, hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=4)
    rng = np.random.default_rng(0)
    cfg = hf.config_from_hf(c, "m")
    w = {}
    for path, (name, layered, transposed) in hf.tensor_names(cfg).items():
        leaf = hf._leaf(cfg, path)
        s = tuple(leaf.shape[1:] if layered else leaf.shape)
        s = tuple(reversed(s)) if transposed else s
        for i in range(cfg.n_layers if layered else 1):
            w[name.format(i=i)] = rng.standard_normal(s, dtype=np.float32)
    d = write_checkpoint(tmp_path / "big", c, w, shards=2, tokenizer=False)
    total = sum(v.nbytes for v in w.values())
    largest = max(v.nbytes for v in w.values())
    del w
    assert total > largest + OVERHEAD + (48 << 20)  # the bound can tell the two loads apart
    script = tmp_path / "child.py"
    script.write_text(MEMORY_CHILD)
    children = {q: subprocess.Popen([sys.executable, str(script), d, q], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=dict(os.environ, JAX_PLATFORMS="cpu"))
                for q in ("none", "int8")}  # separate processes: separate peaks
    for q, child in children.items():
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-3000:]
        r = json.loads(stdout.strip().splitlines()[-1])
        if q == "none":
            assert r["final"] == total
        else:
            assert r["final"] < total / 3
        assert r["peak"] <= r["final"] + largest + OVERHEAD, (q, r, largest)
