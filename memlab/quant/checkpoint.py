"""Save and restore quantized params with orbax, checking formats on the way back.

Orbax stores the arrays of every QArray bit-exactly; the formats (static pytree
metadata) are written beside them as ``memlab_formats.json``.  Restoring into a
target quantized differently is an error naming the path and both formats,
instead of a silent reinterpretation of the bytes.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from memlab.model import path_str
from memlab.quant.qarray import QArray

_META = "memlab_formats.json"


def formats_of(params) -> dict:
    """path -> format name for every QArray leaf."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]
    return {path_str(p): x.format.name for p, x in flat if isinstance(x, QArray)}


def save(path: str | os.PathLike, params) -> None:
    """Write ``params`` (QArrays included) to a new checkpoint directory ``path``."""
    path = os.path.abspath(os.fspath(path))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, params)
    ckpt.wait_until_finished()
    tmp = os.path.join(path, _META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(formats_of(params), f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, _META))


def restore(path: str | os.PathLike, like):
    """Restore into the structure of ``like`` (arrays or ShapeDtypeStructs)."""
    path = os.path.abspath(os.fspath(path))
    meta = os.path.join(path, _META)
    if not os.path.exists(meta):
        raise ValueError(f"{path} is not a memlab quantized checkpoint (no {_META}); it may be "
                         "incomplete or written by plain orbax: restore it with orbax directly")
    with open(meta) as f:
        saved = json.load(f)
    wanted = formats_of(like)
    diff = {p: (saved.get(p), wanted.get(p)) for p in set(saved) | set(wanted)
            if saved.get(p) != wanted.get(p)}
    if diff:
        p, (s, w) = sorted(diff.items())[0]
        raise ValueError(f"checkpoint {path} stores {p!r} as {s or 'float'} but the target expects "
                         f"{w or 'float'} ({len(diff)} paths differ); quantize the target the same "
                         "way before restoring")
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    return ocp.StandardCheckpointer().restore(path, target)
