"""Chat templates: render a conversation into a model's prompt text.

A chat template is a Jinja2 program shipped with a model (GGUF's
``tokenizer.chat_template``, :func:`memlab.models.gguf_io.chat_template`; Hugging Face's
``tokenizer_config.json``).  It is rendered the way Hugging Face ``transformers``
renders them (``apply_chat_template``), so that templates written for it give the same
text here:

* an ``ImmutableSandboxedEnvironment`` (templates are data from a file: no access to
  Python internals, no mutation of the arguments), with ``trim_blocks=True`` (the first
  newline after a block tag is dropped) and ``lstrip_blocks=True`` (whitespace before a
  block tag on its line is dropped) and the ``loopcontrols`` extension
  (``{% break %}``, ``{% continue %}``);
* globals ``raise_exception(message)`` (a template's way to reject a conversation) and
  ``strftime_now(format)``; the ``tojson`` filter writes non-ASCII text as is
  (``json.dumps(..., ensure_ascii=False)``), with optional ``indent``;
* variables ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and any
  extra keyword (``tools``, ``documents``, ``date_string``, ...).

The rendered text usually begins with the BOS token when the template writes
``bos_token``: encode it with ``add_special_tokens=False`` so it is not added twice.
"""
from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Optional


class ChatTemplateError(ValueError):
    """A template failed to compile or render, or rejected the conversation."""


class _Rejected(Exception):
    """Raised by a template's ``raise_exception``."""


def _raise_exception(message):
    raise _Rejected(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment():
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is an install requirement
        raise ImportError("memlab.models.chat needs jinja2: pip install 'jinja2>=3.1'") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    return _environment().from_string(template)


def check_messages(messages) -> list:
    """``messages`` as a list of dicts, each with a non-empty string ``role`` and a
    ``content`` that is a string, a list (structured parts) or None; a ``ValueError``
    naming the first bad entry otherwise."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got "
                             f"{type(m).__name__}: {m!r:.80}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise ValueError(f"messages[{i}] lacks {missing}; each message needs 'role' "
                             f"(e.g. 'user') and 'content' (the text), got keys {sorted(m)}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty string such as 'user', "
                             f"got {m['role']!r}")
        if m["content"] is not None and not isinstance(m["content"], (str, list)):
            raise ValueError(f"messages[{i}]['content'] must be a string (or a list of content "
                             f"parts), got {type(m['content']).__name__}")
        out.append(m)
    return out


def render(template: str, messages: list, *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", source: str = "chat template",
           **extra: Any) -> str:
    """The prompt text for ``messages`` under ``template`` (module doc for the rules).

    ``source`` names the template in errors (e.g. ``"smollm2-135m GGUF
    tokenizer.chat_template"``).  Raises :class:`ChatTemplateError` (a ``ValueError``)
    with the source and Jinja's message when the template does not compile, fails while
    rendering or calls ``raise_exception``; ``ValueError`` for malformed ``messages``.
    """
    if not isinstance(template, str) or not template:
        raise ValueError(f"{source}: template must be a non-empty Jinja string, got "
                         f"{type(template).__name__}; base models ship none (GGUF "
                         "tokenizer.chat_template absent)")
    messages = check_messages(messages)
    import jinja2

    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source} does not compile: {e.message} (template line "
                                f"{e.lineno})") from e
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except _Rejected as e:
        raise ChatTemplateError(f"{source} rejected the conversation: {e}") from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{source} failed to render: {type(e).__name__}: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"{source} failed to render: {type(e).__name__}: {e}") from e
