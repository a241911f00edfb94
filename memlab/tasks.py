"""Long-context probes on real text.

Passkey retrieval (Mohtashami & Jaggi 2023, used by the KV-compression papers):
a random number is hidden at a chosen depth inside Austen prose and the model is
asked for it at the end.  ``passkey_prompts`` builds token-exact prompts from a
tokenized corpus; ``passkey_accuracy`` runs greedy generation (through whatever
KV cache the model carries) and scores exact recovery of the digits.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from memlab.model import Model

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def passkey_prompts(tokens: np.ndarray, tokenizer, length: int, depths: Sequence[float],
                    seed: int = 0) -> list[dict]:
    """One prompt of exactly ``length`` tokens per depth (0 = start, 1 = just before the question).

    ``tokens`` is filler text (e.g. ``data.tokenize(corpus, "test", tok)``); each prompt
    uses a different random 5-digit key and a different stretch of filler.
    """
    from memlab.data import bos_id
    rng = np.random.default_rng(seed)
    tokens = np.asarray(tokens)
    bos = bos_id(tokenizer)        # a tokenizer that adds one (Gemma): once, at the start
    head = [] if bos is None else [bos]
    if bos is not None and len(tokens) and tokens[0] == bos:
        tokens = tokens[1:]
    q = tokenizer.encode(QUESTION, add_special_tokens=False).ids
    out = []
    for i, depth in enumerate(depths):
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey_prompts: depth {depth} must be in [0, 1]")
        key = int(rng.integers(10000, 100000))
        needle = tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False).ids
        n_fill = length - len(head) - len(needle) - len(q)
        if n_fill < 1:
            raise ValueError(f"passkey_prompts: length={length} is too short for the needle and "
                             f"question ({len(needle) + len(q)} tokens)")
        if n_fill > len(tokens):
            raise ValueError(f"passkey_prompts: need {n_fill} filler tokens, corpus has {len(tokens)}")
        start = int(rng.integers(0, len(tokens) - n_fill + 1))
        fill = tokens[start:start + n_fill].tolist()
        at = int(round(depth * n_fill))
        ids = head + fill[:at] + needle + fill[at:] + q
        assert len(ids) == length
        out.append({"ids": ids, "key": key, "depth": float(depth), "length": length})
    return out


def passkey_accuracy(model: Model, prompts: list[dict], batch_size: int = 4,
                     max_new_tokens: int = 8) -> dict:
    """Greedy answers; a prompt counts as correct when its key's digits come back first."""
    from memlab.generate import generate_ids
    tok = model.tokenizer
    rows = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        new = generate_ids(model, [p["ids"] for p in chunk], max_new_tokens)
        for p, ids in zip(chunk, new):
            text = tok.decode(ids, skip_special_tokens=True)
            found = re.findall(r"\d+", text)
            rows.append({"depth": p["depth"], "length": p["length"], "key": p["key"],
                         "answer": text.strip(), "correct": bool(found) and found[0] == str(p["key"])})
    return {"accuracy": float(np.mean([r["correct"] for r in rows])), "rows": rows}
