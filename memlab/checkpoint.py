"""Training checkpoints: orbax ``CheckpointManager`` plus the metadata that makes resuming safe.

Each checkpoint is one orbax step directory holding two items written together:

* ``state`` -- the trainable params (frozen leaves are ``None``: a LoRA run saves its
  adapters, not the base model), the optimizer state, the step and the RNG key;
* ``meta``  -- JSON: format tag, step, data position, the run's config and its
  fingerprint, and a *signature*: path -> (shape, dtype) of the trainable params, the
  frozen params and the optimizer state, and the optimizer's name.

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
only after every item has been committed, so a crash during a save leaves an
unfinalized temporary directory that :meth:`Checkpointer.steps` never lists: the
previous step stays the latest good one.  Restoring compares signatures first and
raises :class:`CheckpointError` naming what differs (model shapes, optimizer,
trainable set) instead of orbax's shape errors, and wraps unreadable (corrupt) data
in the same error type with the path to delete.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from memlab.model import path_str

FORMAT = "memlab-train-v1"
_ITEMS = ("state", "meta")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: incompatible with this run, corrupt, or missing."""


# ---------------------------------------------------------------------------
# Signatures: what must match for a checkpoint to be restorable into a run
# ---------------------------------------------------------------------------
def tree_signature(tree) -> dict:
    """``{path: [shape, dtype]}`` for every array leaf (``None`` leaves are absent)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p) or "<root>": [list(getattr(x, "shape", ())),
                                      str(getattr(x, "dtype", type(x).__name__))]
            for p, x in flat}


def signature(trainable, frozen, opt_state, optimizer: str) -> dict:
    return {"optimizer": optimizer, "trainable": tree_signature(trainable),
            "frozen": tree_signature(frozen), "opt_state": tree_signature(opt_state)}


def fingerprint(config: dict) -> str:
    """A short sha256 of a JSON-serializable config dict (sorted keys)."""
    blob = json.dumps(config, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _diff_trees(what: str, saved: dict, current: dict, limit: int = 4) -> list[str]:
    lines = []
    only_saved = sorted(set(saved) - set(current))
    only_now = sorted(set(current) - set(saved))
    changed = sorted(p for p in set(saved) & set(current) if saved[p] != current[p])
    if only_saved:
        lines.append(f"{what}: {len(only_saved)} path(s) only in the checkpoint, e.g. "
                     f"{only_saved[:limit]}")
    if only_now:
        lines.append(f"{what}: {len(only_now)} path(s) only in this run, e.g. {only_now[:limit]}")
    for p in changed[:limit]:
        (s_shape, s_dtype), (c_shape, c_dtype) = saved[p], current[p]
        lines.append(f"{what} {p!r}: checkpoint has shape {tuple(s_shape)} {s_dtype}, this run "
                     f"{tuple(c_shape)} {c_dtype}")
    if len(changed) > limit:
        lines.append(f"{what}: {len(changed) - limit} more path(s) differ in shape or dtype")
    return lines


def incompatibilities(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two :func:`signature` dicts (empty: compatible)."""
    lines = []
    if saved.get("optimizer") != current.get("optimizer"):
        lines.append(f"optimizer: checkpoint was trained with {saved.get('optimizer')!r}, this "
                     f"run uses {current.get('optimizer')!r}")
    s_tr, c_tr = saved.get("trainable", {}), current.get("trainable", {})
    s_fr, c_fr = saved.get("frozen", {}), current.get("frozen", {})
    moved = sorted((set(s_tr) & set(c_fr)) | (set(s_fr) & set(c_tr)))
    if moved:
        lines.append(f"trainable set differs: {len(moved)} param(s) train in one and are frozen "
                     f"in the other, e.g. {moved[:4]} (the model's `trainable` patterns changed)")
        s_tr = {p: v for p, v in s_tr.items() if p not in moved}
        c_tr = {p: v for p, v in c_tr.items() if p not in moved}
        s_fr = {p: v for p, v in s_fr.items() if p not in moved}
        c_fr = {p: v for p, v in c_fr.items() if p not in moved}
    lines += _diff_trees("trainable param", s_tr, c_tr)
    lines += _diff_trees("frozen param", s_fr, c_fr)
    if not lines:  # same optimizer and params but a differently shaped state (other kwargs)
        lines += _diff_trees("optimizer state", saved.get("opt_state", {}),
                             current.get("opt_state", {}))
    return lines


def config_changes(saved: dict, current: dict) -> list[str]:
    """Config fields whose values differ (they change the trajectory, not compatibility)."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


# ---------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------
class Checkpointer:
    """Step checkpoints in ``directory`` (async orbax saves, ``keep`` most recent kept)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, create: bool = True):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep <= 0:
            raise ValueError(f"Checkpointer: keep must be a positive int, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    # -- listing --------------------------------------------------------
    def steps(self) -> list[int]:
        """Finalized steps, oldest first (unfinished temporary directories are not listed)."""
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # -- writing --------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an async save of ``state`` (arrays) and ``meta`` (JSON) as ``step``."""
        meta = dict(meta, format=FORMAT, step=int(step))
        self._mgr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading --------------------------------------------------------
    def _unreadable(self, step: int, err: BaseException) -> CheckpointError:
        prev = [s for s in self.steps() if s < step]
        hint = (f"delete {self.step_path(step)} to resume from step {prev[-1]}" if prev else
                f"delete {self.step_path(step)} (there is no earlier checkpoint) to start afresh")
        return CheckpointError(
            f"checkpoint step {step} in {self.directory} is corrupt or incomplete and cannot be "
            f"read ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
            f"{hint}")

    def read_meta(self, step: int) -> dict:
        if step not in self.steps():
            raise CheckpointError(f"no finalized checkpoint for step {step} in {self.directory}; "
                                  f"finalized steps: {self.steps()}")
        try:
            meta = self._mgr.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 -- any failure here means unreadable data
            raise self._unreadable(step, e) from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is not a memlab training checkpoint "
                f"(format {meta.get('format') if isinstance(meta, dict) else None!r}, expected "
                f"{FORMAT!r}); point ckpt_dir at a directory written by memlab.train")
        return meta

    def check(self, step: int, current_signature: dict) -> dict:
        """The step's metadata, after checking it matches ``current_signature``."""
        meta = self.read_meta(step)
        problems = incompatibilities(meta.get("signature", {}), current_signature)
        if problems:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit this run:\n  - "
                + "\n  - ".join(problems)
                + "\nResume with the same model, trainable set and optimizer, "
                "or use a new ckpt_dir.")
        return meta

    def restore(self, step: int, like: Any, current_signature: Optional[dict] = None):
        """``(state, meta)`` of ``step``, restored into the structure of ``like``."""
        meta = self.read_meta(step) if current_signature is None else \
            self.check(step, current_signature)
        try:
            restored = self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(like))))
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(step, e) from e
        return restored.state, meta
