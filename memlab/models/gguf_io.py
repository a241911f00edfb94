"""Read Llama-family GGUF files (config, weights, tokenizer, chat template) with ``gguf``.

Architectures (``general.architecture``): ``llama``, ``qwen2``, ``qwen3``, ``gemma2`` and
``gemma3``, each mapped onto :class:`memlab.models.llama.LlamaConfig` and memlab's
param paths.  The conventions of llama.cpp's converter (``convert_hf_to_gguf.py``), the
writer of these files, that matter here:

* Quantized tensors are dequantized to float32 (``gguf.quants.dequantize``): the result
  is the float baseline of the file.
* Q and K projections are permuted for llama.cpp's interleaved-pair rotary embedding
  only in ``llama`` files; :func:`unpermute_rope` restores the half-split
  (``rotate_half``) layout memlab's :func:`memlab.models.llama.rope` uses.  Qwen and
  Gemma files keep Hugging Face's layout.
* Every norm weight in a GGUF file is the multiplier llama.cpp applies, ``x / rms(x) * m``.
  Gemma's RMSNorm applies ``1 + w``, so the converter stores ``m = 1 + w``; with
  ``config.norm_plus_one`` memlab stores ``w = m - 1`` (the value Hugging Face stores),
  otherwise ``m`` itself.
* Gemma's per-layer attention kinds, local RoPE base and query scale are not all in the
  metadata: llama.cpp fixes them per architecture (Gemma 2: every second layer global;
  Gemma 3: every sixth layer global, local RoPE base 10,000; the query scale is
  ``head_dim ** -0.5`` except for the 27B models, ``(d_model / n_heads) ** -0.5``, as in
  Google's reference ``gemma_pytorch`` configs).  An explicit
  ``{arch}.attention.sliding_window_pattern`` (a per-layer bool array, or a period ``P``:
  layer ``i`` slides when ``i % P < P - 1``) or ``{arch}.rope.freq_base_swa`` wins.

Tokenizers: ``gpt2`` (byte-level BPE with merges) and ``llama`` (SentencePiece-style:
tokens, scores and token types, encoded as llama.cpp's ``llm_tokenizer_spm`` does;
see :func:`read_tokenizer`).
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from memlab.models.llama import LlamaConfig

ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
_PERMUTED_QK = ("llama",)          # llama.cpp permutes Q/K rows only for these
_GEMMA = ("gemma2", "gemma3")
_GEMMA_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # query scale (d_model / n_heads) ** -0.5
_GEMMA3_LOCAL_THETA = 10000.0

# token types of GGUF's tokenizer.ggml.token_type (SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF (out, in) Q/K weight (or (out,) bias), rows interleaved per head -> half-split.

    Within each head GGUF orders output rows as pairs (x0, x1), (x2, x3), ...;
    the half-split layout wants (x0, x2, ..., x1, x3, ...).
    """
    if w.ndim == 1:
        return unpermute_rope(w[:, None], n_heads)[:, 0]
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _field(reader, key: str, default: Any = None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not
    9.99999997e-07), so configs read from files compare equal to hand-written ones."""
    return float(str(np.float32(v)))


def _arch(reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; memlab reads {ARCHS}")
    return arch


def _layer_types(reader, arch: str, n_layers: int, window: Optional[int]) -> tuple:
    if window is None:
        return ()
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layers:
            raise ValueError(f"GGUF {arch}.attention.sliding_window_pattern has {len(pattern)} "
                             f"entries for {n_layers} layers")
        sliding = [bool(p) for p in pattern]
    elif isinstance(pattern, bool):
        sliding = [pattern] * n_layers
    else:
        period = int(pattern) if pattern is not None else _GEMMA_SWA_PERIOD.get(arch, 0)
        if period <= 0:
            return ()  # every layer sliding (LlamaConfig's default for a set window)
        sliding = [i % period < period - 1 for i in range(n_layers)]
    return tuple("sliding_attention" if s else "full_attention" for s in sliding)


def _rope_scaling(reader, arch: str) -> Optional[tuple]:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") and factor in (None, 1.0):
        return None
    if kind not in (None, "linear"):
        raise ValueError(f"GGUF {arch}.rope.scaling.type={kind!r} is not supported; memlab "
                         "reads linear RoPE scaling from GGUF files")
    return (("factor", _f32(factor)), ("rope_type", "linear"))


def config_fields(reader, name: str) -> dict:
    """The keyword arguments of :func:`read_config` (every :class:`LlamaConfig` field it
    sets), read from the file's metadata and tensor names."""
    arch = _arch(reader)
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("this GGUF file carries per-frequency RoPE factors (rope_freqs.weight, "
                         "Llama 3.1 style); memlab does not read them from GGUF: build the "
                         "LlamaConfig with rope_scaling from the model's Hugging Face config")
    d_model = int(g("embedding_length"))
    n_layers = int(g("block_count"))
    n_heads = int(g("attention.head_count"))
    n_kv = g("attention.head_count_kv", n_heads)
    if isinstance(n_kv, (list, tuple)):
        if len(set(n_kv)) != 1:
            raise ValueError(f"GGUF {arch}.attention.head_count_kv varies per layer ({n_kv}); "
                             "memlab needs one KV head count")
        n_kv = n_kv[0]
    head_dim = int(g("attention.key_length", 0) or g("rope.dimension_count", 0)
                   or d_model // n_heads)
    v_dim = int(g("attention.value_length", head_dim))
    if v_dim != head_dim:
        raise ValueError(f"GGUF {arch}: value length {v_dim} differs from key length "
                         f"{head_dim}; memlab needs one head_dim")
    vocab = int(g("vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens")))
    window = g("attention.sliding_window")
    window = int(window) if window else None
    if arch not in _GEMMA:
        window = None  # llama.cpp reads a window only for the Gemma archs here; so does memlab
    f = dict(
        name=name,
        arch=arch,
        vocab_size=vocab,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=head_dim,
        d_ff=int(g("feed_forward_length")),
        rope_theta=_f32(g("rope.freq_base", 10000.0)),
        norm_eps=_f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(g("context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        sliding_window=window,
        layer_types=_layer_types(reader, arch, n_layers, window),
        rope_scaling=_rope_scaling(reader, arch),
    )
    if arch in _GEMMA:
        scalar = g("attention.query_pre_attn_scalar")
        if scalar is None:
            scalar = d_model / n_heads if n_layers == _GEMMA_27B_LAYERS[arch] else head_dim
        attn_cap, final_cap = g("attn_logit_softcapping"), g("final_logit_softcapping")
        local = g("rope.freq_base_swa")
        f.update(
            norm_plus_one=True,
            embed_scale=True,
            post_norms="blk.0.post_ffw_norm.weight" in names,
            mlp_act="gelu_tanh",
            query_scale=float(scalar) ** -0.5,
            attn_softcap=_f32(attn_cap) if attn_cap else None,
            final_softcap=_f32(final_cap) if final_cap else None,
            rope_local_theta=(_f32(local) if local else _GEMMA3_LOCAL_THETA)
            if arch == "gemma3" and window is not None else None,
        )
    return f


def read_config(reader, name: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of a GGUF file (module doc for the per-arch rules)."""
    return LlamaConfig(**config_fields(reader, name))


_LAYER_MAP = {  # GGUF name under blk.N. -> (memlab path under layers/, kind)
    "attn_norm.weight": (("attn_norm", "scale"), "norm"),
    "ffn_norm.weight": (("mlp_norm", "scale"), "norm"),
    "post_attention_norm.weight": (("post_attn_norm", "scale"), "norm"),
    "post_ffw_norm.weight": (("post_mlp_norm", "scale"), "norm"),
    "attn_q_norm.weight": (("attn", "q_norm", "scale"), "norm"),
    "attn_k_norm.weight": (("attn", "k_norm", "scale"), "norm"),
    "attn_q.weight": (("attn", "q_proj", "kernel"), "matrix"),
    "attn_k.weight": (("attn", "k_proj", "kernel"), "matrix"),
    "attn_v.weight": (("attn", "v_proj", "kernel"), "matrix"),
    "attn_output.weight": (("attn", "o_proj", "kernel"), "matrix"),
    "attn_q.bias": (("attn", "q_proj", "bias"), "bias"),
    "attn_k.bias": (("attn", "k_proj", "bias"), "bias"),
    "attn_v.bias": (("attn", "v_proj", "bias"), "bias"),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), "matrix"),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), "matrix"),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), "matrix"),
}


def dequantized(reader, tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy's (row-major) order: matrices are (out, in)."""
    import gguf

    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        kind = getattr(tensor.tensor_type, "name", tensor.tensor_type)
        path = getattr(reader, "path", "the GGUF file")
        raise ValueError(f"{path}: tensor {tensor.name!r} is stored as {kind}, which the gguf "
                         f"package cannot dequantize ({e}); convert the file to a type it "
                         "reads (F32, F16, BF16, Q8_0, Q4_K, Q6_K, ...), e.g. with llama.cpp's "
                         "llama-quantize") from None
    return np.asarray(w, np.float32).reshape(tuple(int(s) for s in reversed(tensor.shape)))


def convert_tensor(arch: str, name: str, w: np.ndarray, config: LlamaConfig):
    """One GGUF tensor in memlab's convention: ``(path tuple, float32 array)``.

    ``name`` is the GGUF tensor name and ``w`` its :func:`dequantized` value; layer
    tensors get paths under ``layers/`` without the layer axis.  Matrices become
    ``[in, out]``, ``llama`` files' Q/K rows are un-permuted, and norms become ``m - 1``
    under ``config.norm_plus_one`` (module doc).  Unknown names raise ``ValueError``.
    """
    if name == "token_embd.weight":
        return ("embed", "embedding"), w
    if name == "output_norm.weight":
        return ("final_norm", "scale"), _norm(w, config)
    if name == "output.weight":
        return ("lm_head", "kernel"), np.ascontiguousarray(w.T)
    if name.startswith("blk.") and name.count(".") >= 2:
        _, idx, rest = name.split(".", 2)
        if rest in _LAYER_MAP:
            path, kind = _LAYER_MAP[rest]
            if arch in _PERMUTED_QK and rest.startswith(("attn_q.", "attn_k.")):
                w = unpermute_rope(w, config.n_heads if rest.startswith("attn_q.")
                                   else config.n_kv_heads)
            if kind == "matrix":
                w = np.ascontiguousarray(w.T)
            elif kind == "norm":
                w = _norm(w, config)
            return ("layers",) + path, w
    raise ValueError(f"unexpected GGUF tensor {name!r} for a {arch!r} model; memlab maps "
                     f"token_embd, output_norm, output and blk.N.{{{', '.join(_LAYER_MAP)}}}")


def _norm(w: np.ndarray, config: LlamaConfig) -> np.ndarray:
    return (w - np.float32(1.0)) if config.norm_plus_one else w


def _expected_shapes(config: LlamaConfig) -> dict:
    """memlab path tuple -> shape of one layer's (or the global) param."""
    import jax

    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(config.param_shapes())[0]:
        path = tuple(k.key for k in kp)
        out[path] = tuple(leaf.shape[1:] if path[0] == "layers" else leaf.shape)
    return out


def read_params(reader, config: LlamaConfig, convert: Optional[Callable] = None) -> dict:
    """memlab's params pytree from a GGUF reader, one tensor at a time.

    ``convert(path, w)`` turns each float32 numpy tensor (already in memlab's
    convention, :func:`convert_tensor`) into what is stored -- by default a float32
    ``jax.Array``; the loader passes a quantizer here so the float model is never held
    whole.  Every tensor is checked against the shape ``config`` gives its path, and
    every path ``config`` needs must be in the file.  Layer tensors are stacked along a
    leading layer axis afterwards.
    """
    import jax
    import jax.numpy as jnp

    arch = _arch(reader)
    convert = convert or (lambda path, w: jnp.asarray(w))
    expected = _expected_shapes(config)
    layers: dict = {}
    params: dict = {}

    def put(path, value):
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value

    for t in reader.tensors:
        path, w = convert_tensor(arch, t.name, dequantized(reader, t), config)
        if path not in expected:
            raise ValueError(f"GGUF tensor {t.name!r} maps to {'/'.join(path)}, which the "
                             f"config {config.name!r} does not have (check its family fields)")
        if tuple(w.shape) != expected[path]:
            raise ValueError(f"GGUF tensor {t.name!r} has shape {tuple(w.shape)} as "
                             f"{'/'.join(path)}; the config expects {expected[path]}")
        if path[0] == "layers":
            idx = int(t.name.split(".")[1])
            if not 0 <= idx < config.n_layers:
                raise ValueError(f"GGUF tensor {t.name!r}: layer {idx} outside the config's "
                                 f"{config.n_layers} layers")
            layers.setdefault(path[1:], [None] * config.n_layers)[idx] = \
                convert("/".join(path), w)
        else:
            put(path, convert("/".join(path), w))
        del w

    missing = [p for p in expected
               if (p[1:] not in layers if p[0] == "layers" else p not in _paths(params))]
    if missing:
        raise ValueError(f"GGUF file lacks {['/'.join(p) for p in missing]}, which the config "
                         f"{config.name!r} needs")
    for path, ws in layers.items():
        absent = [i for i, w in enumerate(ws) if w is None]
        if absent:
            raise ValueError(f"GGUF file lacks layers {absent} of layers/{'/'.join(path)}")
        put(("layers",) + path, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ws))
        ws.clear()
    return params


def _paths(tree, prefix=()) -> set:
    out = set()
    for k, v in tree.items():
        out |= _paths(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,)}
    return out


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------
def read_tokenizer(reader):
    """Rebuild the tokenizer stored in GGUF metadata as a ``tokenizers.Tokenizer``.

    ``gpt2``: byte-level BPE from the vocabulary and merges, with SmolLM's pre-tokenizer
    (each digit its own piece, then GPT-2's byte-level split).

    ``llama`` (SentencePiece-style; llama.cpp's ``llm_tokenizer_spm``): spaces become
    ``"▁"`` (one is prepended when ``tokenizer.ggml.add_space_prefix``); the text is split
    into UTF-8 characters and the adjacent pair whose concatenation is the
    highest-scoring vocabulary piece is merged until none is left; characters outside
    the vocabulary become their UTF-8 bytes' ``<0xNN>`` tokens.  This is BPE whose
    merge list is every split of every normal piece into two normal pieces, ranked by
    the merged piece's score -- what is built here, with ``byte_fallback``.
    Control tokens (type 3) are special added tokens, matched in the raw text;
    user-defined tokens (type 4: newline, tab and space runs, HTML tags in Gemma) are
    matched in the raw text too, before any other step, as llama.cpp does.

    With ``tokenizer.ggml.add_bos_token`` the BOS token is prepended by
    ``encode(..., add_special_tokens=True)`` (the default); ``add_special_tokens=False``
    encodes the text alone.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model_kind = _field(reader, "tokenizer.ggml.model")
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens; it carries no tokenizer")
    types = list(_field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    if model_kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        # SmolLM's pre-tokenizer ("smollm" in GGUF): every digit is its own piece, then
        # GPT-2 byte-level.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == CONTROL])
    elif model_kind == "llama":
        tok = _spm_tokenizer(reader, tokens, types)
    else:
        raise ValueError(f"GGUF tokenizer model {model_kind!r} is not supported; memlab reads "
                         "'gpt2' (byte-level BPE) and 'llama' (SentencePiece-style)")
    _add_bos_post_processor(reader, tok, tokens)
    return tok


def _spm_tokenizer(reader, tokens: list, types: list):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("GGUF tokenizer model 'llama' needs tokenizer.ggml.scores, one per "
                         "token; the file's are missing or of the wrong length")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == NORMAL}
    merges = []
    for t, i in normal.items():
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in normal and right in normal:
                merges.append((-float(scores[i]), normal[left], normal[right], left, right))
    merges.sort()
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Replace(" ", "\u2581")]
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        norm.insert(0, normalizers.Prepend(" "))
        dec.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(dec)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    return tok


def _add_bos_post_processor(reader, tok, tokens: list) -> None:
    from tokenizers import processors

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if not _field(reader, "tokenizer.ggml.add_bos_token", False) or bos is None:
        return
    b = tokens[int(bos)]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, int(bos))])


def special_ids(reader) -> dict:
    """Ids of the file's special tokens: ``bos``, ``eos``, ``unknown``, ``padding`` and,
    where the file names them, ``eot`` (end of turn) and ``eom`` (end of message)."""
    out = {}
    for key in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        v = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if v is not None:
            out[key] = int(v)
    return out


def chat_template(reader) -> Optional[str]:
    """The file's Jinja chat template (``tokenizer.chat_template``), or None (base models).
    Render it with :func:`memlab.models.chat.render`."""
    t = _field(reader, "tokenizer.chat_template")
    return None if t is None else str(t)


class _Field:
    """One metadata value; ``contents()`` as ``gguf.ReaderField.contents()`` gives it
    (a Python scalar, a str, or a list of them)."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value):
        self.name, self.value = name, value

    def contents(self):
        return list(self.value) if isinstance(self.value, list) else self.value


class _Tensor(NamedTuple):
    """A tensor's header entry and its bytes, as ``gguf.ReaderTensor`` has them: ``shape``
    in GGUF order (fastest-varying first); ``data`` a read-only memory map in numpy order
    (quantized types as ``uint8`` rows of blocks, what ``gguf.quants.dequantize`` takes)."""

    name: str
    tensor_type: Any
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # GGUF value type -> struct format
_STRING, _ARRAY = 8, 9
_PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64}


class GGUFFile:
    """A little-endian GGUF v2/v3 file's metadata and tensor table, parsed in one pass.

    The same interface as ``gguf.GGUFReader`` for what memlab reads (``fields[key]
    .contents()``, ``tensors`` with ``name``, ``tensor_type``, ``shape``, ``data``), built
    with ``struct`` on a memory map rather than one numpy view per array element (a
    vocabulary of hundreds of thousands of tokens is parsed in one pass over its bytes).
    Layout (the GGUF spec, ggml's ``docs/gguf.md``): magic ``GGUF``, version, tensor
    count, key/value count; the key/value pairs (key string, value type, value; strings
    are a uint64 length and UTF-8 bytes, arrays an element type, a uint64 count and the
    elements); the tensor infos (name, rank, dims, ggml type, offset); then the tensor
    data, aligned to ``general.alignment`` (default 32).
    """

    def __init__(self, path: str):
        import mmap
        import struct

        import gguf

        self.path = path
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
            if magic != b"GGUF" or version not in (2, 3):
                raise _Unsupported(f"magic {magic!r}, version {version}")
            off = 24
            unpack = struct.unpack_from

            def string(off):
                (n,) = unpack("<Q", buf, off)
                end = off + 8 + n
                if end > len(buf):
                    raise ValueError(f"a string of {n} bytes runs past the end of the file")
                return buf[off + 8:end].decode("utf-8"), end

            def value(vtype, off):
                if vtype == _STRING:
                    return string(off)
                fmt = _SCALARS.get(vtype)
                if fmt is not None:
                    return unpack(fmt, buf, off)[0], off + struct.calcsize(fmt)
                if vtype != _ARRAY:
                    raise ValueError(f"unknown GGUF value type {vtype}")
                etype, count = unpack("<IQ", buf, off)
                off += 12
                if etype == _STRING:
                    out = []
                    for _ in range(count):
                        s, off = string(off)
                        out.append(s)
                    return out, off
                fmt = _SCALARS.get(etype)
                if fmt is None:  # nested arrays: element by element
                    out = []
                    for _ in range(count):
                        v, off = value(etype, off)
                        out.append(v)
                    return out, off
                dt = np.dtype(fmt)
                arr = np.frombuffer(buf, dt, count, off)
                return arr.tolist(), off + dt.itemsize * count

            self.fields: dict = {}
            for key, v in (("GGUF.version", version), ("GGUF.tensor_count", n_tensors),
                           ("GGUF.kv_count", n_kv)):
                self.fields[key] = _Field(key, v)
            for _ in range(n_kv):
                key, off = string(off)
                (vtype,) = unpack("<I", buf, off)
                v, off = value(vtype, off + 4)
                if key in self.fields:
                    raise ValueError(f"duplicate metadata key {key!r}")
                self.fields[key] = _Field(key, v)
            infos = []
            for _ in range(n_tensors):
                name, off = string(off)
                (rank,) = unpack("<I", buf, off)
                dims = np.frombuffer(buf, "<u8", rank, off + 4).copy()
                ttype, toff = unpack("<IQ", buf, off + 4 + 8 * rank)
                off += 4 + 8 * rank + 12
                infos.append((name, dims, ttype, toff))
            align = int(self.fields["general.alignment"].value) \
                if "general.alignment" in self.fields else 32
            if align <= 0 or align & (align - 1):
                raise ValueError(f"general.alignment={align} is not a power of two")
            self.alignment = align
            self.data_offset = off + (-off) % align
        finally:
            buf.close()
        mm = np.memmap(path, mode="r")
        self.tensors: list = []
        seen = set()
        for name, dims, ttype, toff in infos:
            if name in seen:
                raise ValueError(f"duplicate tensor {name!r}")
            seen.add(name)
            qtype = gguf.GGMLQuantizationType(ttype)
            n = int(np.prod(dims)) if len(dims) else 1
            block, tsize = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = n * tsize // block
            start = self.data_offset + int(toff)
            if start + nbytes > mm.size:
                raise ValueError(f"tensor {name!r} runs past the end of the file "
                                 f"(truncated download?)")
            np_dims = tuple(int(d) for d in reversed(dims.tolist()))
            plain = _PLAIN.get(qtype.name)
            if plain is not None:
                data = mm[start:start + nbytes].view(plain).reshape(np_dims)
            else:
                data = mm[start:start + nbytes].reshape(
                    np_dims[:-1] + (np_dims[-1] // block * tsize,))
            self.tensors.append(_Tensor(name, qtype, dims, n, nbytes, start, data))


class _Unsupported(Exception):
    """A valid GGUF file this parser does not handle (big-endian, version 1)."""


def open_reader(path: str | os.PathLike):
    """The file's metadata and tensor table (:class:`GGUFFile`; ``gguf.GGUFReader`` for
    the big-endian and version-1 files it does not parse).  A missing file raises
    ``FileNotFoundError``, a corrupt one ``ValueError``."""
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        try:
            return GGUFFile(os.fspath(path))
        except _Unsupported:
            return gguf.GGUFReader(os.fspath(path))
    except Exception as e:  # corrupt or truncated file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         "re-download or re-install the package that ships it") from e
