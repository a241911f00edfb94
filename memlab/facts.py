"""Facts an extension registers for the planner, and the measured ones' results file.

An extension (an optimizer, a KV policy, a weight format) states what the planner
needs to know about it where it registers itself, as keyword arguments of its
registry's ``register``::

    @POLICIES.register("kivi", quality_loss=..., plan=...)
    @register("adamw8bit", state_bytes=..., quality_loss=measured(), update_bytes=measured())

A fact is a value, a function (the planner calls it with the arguments the fact's
contract names), or :func:`measured`: a number measured by an experiment, read from
``memlab/measured.json``.  That file is written by ``experiments/facts.py`` from the
experiments' own results (``results/quantize.json``, ``results/kv_compress.json``,
``results/plan.json``, ...): code holds no measured literals.  The file ships with the
package and is read on first use.

A fact the planner needs and the registration lacks raises :class:`MissingFact`,
which names the registration (kind, name, module) and the fact.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Optional

#: The measured facts, ``{kind: {name: {fact: value}}}`` (``experiments/facts.py``).
MEASURED_FILE = pathlib.Path(__file__).with_name("measured.json")


class MissingFact(LookupError):
    """A registered extension lacks a fact the planner needs."""

    def __init__(self, kind: str, name: str, fact: str, where: Optional[str] = None,
                 hint: str = ""):
        self.kind, self.name, self.fact = kind, name, fact
        at = f" (registered in {where})" if where else ""
        super().__init__(
            f"{kind} {name!r}{at} has no fact {fact!r}, which the planner needs: pass "
            f"{fact}=... to its registration" + (f" ({hint})" if hint else "")
            + "; measured numbers go in memlab/measured.json via experiments/facts.py and "
            f"are referenced as {fact}=memlab.facts.measured()")


@dataclasses.dataclass(frozen=True)
class Measured:
    """A reference to ``measured.json[kind][name][fact]``; ``name`` None = the
    registration's own name (``measured("adamw8bit")`` shares another's measurement)."""

    name: Optional[str] = None


def measured(name: Optional[str] = None) -> Measured:
    """The fact is measured: read it from :data:`MEASURED_FILE` when the planner asks."""
    return Measured(name)


@functools.lru_cache(maxsize=None)
def load(path: Optional[str] = None) -> dict:
    """The measured facts (cached); ``path`` defaults to :data:`MEASURED_FILE`."""
    p = pathlib.Path(path) if path else MEASURED_FILE
    if not p.exists():
        raise FileNotFoundError(f"memlab.facts: {p} is missing; regenerate it with "
                                "python experiments/facts.py")
    with open(p) as f:
        return json.load(f)


def value(kind: str, name: str, fact: str, where: Optional[str] = None) -> Any:
    """``measured.json[kind][name][fact]``, or :class:`MissingFact` naming what is absent."""
    entry = load().get(kind, {}).get(name, {})
    if fact not in entry:
        raise MissingFact(kind, name, fact, where,
                          f"{MEASURED_FILE.name} has no {kind}/{name}/{fact} entry")
    return entry[fact]


def resolve(kind: str, name: str, fact: str, raw: Any, where: Optional[str] = None) -> Any:
    """A registered fact's value: :class:`Measured` read from the results file."""
    if isinstance(raw, Measured):
        return value(kind, raw.name or name, fact, where)
    return raw
