"""What a compiled program holds: its kernels, the attention it reached, and GPU resources.

Read from what XLA itself produces, never guessed from Python:

* :func:`custom_calls` parses the optimized HLO (``compiled.as_text()``): each
  custom call's target (``__cudnn$fmha...`` for cuDNN fused attention,
  ``__gpu$xla.gpu.triton`` for a Pallas Triton kernel, ``tpu_custom_call`` for a
  Mosaic kernel) and, for Pallas kernels, the kernel's name from the op's
  metadata (``.../flash_attention_fwd/pallas_call``).
* :func:`attention_impls` maps those onto :data:`memlab.nn.IMPLS`' names: the
  attention implementation(s) a step reached.
* :func:`gpu_kernels` reads an XLA:GPU dump (``compile(..., dump_to=dir)``):
  the launch sequence (``*.thunk_sequence.txt``: every kernel's grid, threads and
  shared memory) and the PTX, assembled by ``ptxas -v`` for registers per thread,
  spill stores/loads and stack frame.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
from typing import Optional

__all__ = ["custom_calls", "attention_impls", "gpu_kernels", "ptxas_info", "launches"]

_CALL = re.compile(r'custom_call_target="([^"]+)"')
_OPNAME = re.compile(r'op_name="([^"]*)"')


def custom_calls(hlo_text: str) -> list:
    """``[{"target": ..., "kernel": name or None}]`` for every custom call in ``hlo_text``."""
    out = []
    for line in hlo_text.splitlines():
        m = _CALL.search(line)
        if not m:
            continue
        op = _OPNAME.search(line)
        kernel = None
        if op and "pallas_call" in op.group(1):
            parts = op.group(1).split("/")
            i = max(j for j, p in enumerate(parts) if p.startswith("pallas_call"))
            kernel = parts[i - 1] if i > 0 else None
        out.append({"target": m.group(1), "kernel": kernel})
    return out


_ATTENTION_KERNELS = ("flash_attention", "decode_attention", "paged_decode_attention",
                      "kivi_decode", "lightning_attention")


def attention_impls(hlo_text: str) -> list:
    """The attention implementations a compiled program reached, in ``memlab.nn``'s names.

    ``"cudnn"`` (cuDNN fused attention), ``"pallas_triton"`` / ``"pallas_tpu"``
    (memlab's flash kernel), ``"decode_pallas_triton"`` / ``"decode_pallas_tpu"``
    (the split-K, paged or KIVI decode kernels); ``["xla"]`` when no attention
    kernel was reached (naive, chunked or ``jax.nn``'s XLA path).
    """
    found = set()
    for c in custom_calls(hlo_text):
        t, k = c["target"], c["kernel"] or ""
        if t.startswith("__cudnn$fmha"):
            found.add("cudnn")
            continue
        backend = {"__gpu$xla.gpu.triton": "pallas_triton",
                   "tpu_custom_call": "pallas_tpu"}.get(t)
        if backend is None or not k.startswith(_ATTENTION_KERNELS):
            continue
        found.add(backend if k.startswith("flash_attention") else f"decode_{backend}"
                  if "decode" in k else f"lightning_{backend}")
    return sorted(found) or ["xla"]


_LAUNCH = re.compile(r"^\d+:\s+(\w+)\s+\[[^\]]*\]\s+(\S+)\s+grid:\s*\[([^\]]*)\]\s+threads:\s*"
                     r"\[([^\]]*)\]\s+shared_memory:\s*(\d+)\s*bytes")


def _newest(dump_dir: str, pattern: str) -> list:
    files = sorted(glob.glob(os.path.join(dump_dir, pattern)), key=os.path.getmtime)
    return files


def launches(dump_dir: str) -> list:
    """Every kernel launch of the dumped modules: name, grid, threads, dynamic shared memory."""
    out = []
    for path in _newest(dump_dir, "*.thunk_sequence.txt"):
        for line in open(path):
            m = _LAUNCH.match(line.strip())
            if m:
                out.append({"name": m.group(2), "kind": m.group(1),
                            "grid": [int(x) for x in m.group(3).split(",")],
                            "threads": [int(x) for x in m.group(4).split(",")],
                            "shared_memory_bytes": int(m.group(5))})
    return out


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_info(ptx_path: str, ptxas: str, arch: str = "sm_90a") -> dict:
    """``ptxas -v`` of one PTX file: ``{entry: {registers, spill_stores, spill_loads,
    stack_frame_bytes, static_smem_bytes, notes}}``."""
    proc = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx_path, "-o", os.devnull],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on {os.path.basename(ptx_path)}: "
                           f"{proc.stderr.strip().splitlines()[-1][:300]}")
    out, cur, notes = {}, None, []
    for line in proc.stderr.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"registers": None, "spill_stores": 0,
                                              "spill_loads": 0, "stack_frame_bytes": 0,
                                              "static_smem_bytes": 0, "notes": []})
            cur["notes"].extend(n for n in notes if m.group(1) in n)
            notes = []
            continue
        if "Potential Performance Loss" in line:
            notes.append(line.split("ptxas info    :")[-1].strip())
        if cur is None:
            continue
        if (m := _FRAME.search(line)):
            cur.update(stack_frame_bytes=int(m.group(1)), spill_stores=int(m.group(2)),
                       spill_loads=int(m.group(3)))
        if (m := _REGS.search(line)):
            cur["registers"] = int(m.group(1))
        if (m := _SMEM.search(line)):
            cur["static_smem_bytes"] = int(m.group(1))
    return out


def gpu_kernels(dump_dir: str, ptxas: Optional[str], arch: str = "sm_90a",
                names: Optional[tuple] = None) -> list:
    """Kernel launches of an XLA:GPU dump joined with ``ptxas -v`` of its PTX.

    ``names``: keep only launches whose name starts with one of these (Pallas kernel
    names); all launches otherwise.  Without ``ptxas`` the register fields are None.
    """
    regs = {}
    if ptxas:
        for ptx in _newest(dump_dir, "*.ptx"):
            if os.path.getsize(ptx) == 0:
                continue
            regs.update(ptxas_info(ptx, ptxas, arch))
    rows = []
    for launch in launches(dump_dir):
        if names and not launch["name"].startswith(tuple(names)):
            continue
        info = regs.get(launch["name"], {})
        rows.append(dict(launch, registers=info.get("registers"),
                         spill_stores=info.get("spill_stores"),
                         spill_loads=info.get("spill_loads"),
                         stack_frame_bytes=info.get("stack_frame_bytes"),
                         static_smem_bytes=info.get("static_smem_bytes"),
                         notes=info.get("notes", [])))
    return rows
