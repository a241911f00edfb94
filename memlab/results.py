"""Experiment and benchmark results: JSON with the environment recorded.

Every result file carries the device, platform and versions it was measured
with; ``key=`` merges one part into an existing file (e.g. one model of a sweep).
"""
from __future__ import annotations

import json
import os
import platform


def environment() -> dict:
    import jax
    dev = jax.devices()[0]
    return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def write(path: str, payload: dict, key: str | None = None) -> None:
    """Write ``payload`` (plus ``environment``) to ``path`` atomically; with ``key``,
    store it under that key of the existing JSON object."""
    payload = dict(payload, environment=environment())
    out = payload
    if key is not None:
        out = {}
        if os.path.exists(path):
            with open(path) as f:
                out = json.load(f)
        out[key] = payload
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2, default=str)
    os.replace(tmp, path)
    print(f"wrote {path}" + (f" [{key}]" if key else ""))
