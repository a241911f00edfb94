"""Named compile targets: compile for an H100, an A100, an H200 or a TPU this machine lacks.

XLA compiles for a device it cannot see.  The CUDA PJRT plugin builds
*compile-only* GPU devices from a ``GpuTargetConfigProto`` (the device facts:
SMs, shared memory per block and per SM, registers, memory size, compute
capability), and ``libtpu`` builds compile-only TPU devices from a topology
name.  A program lowered for them with ``lowering_platforms=("cuda",)`` (or
``"tpu"``) and compiled goes through the real backend compiler -- XLA:GPU's
fusion, buffer assignment and Triton/PTX code generation, or XLA:TPU with
Mosaic -- and reports that device's ``memory_analysis()``::

    import memlab as ml
    h100 = ml.targets.get("h100")
    compiled = ml.targets.compile(step, args, "h100", donate_argnums=(0, 1))
    compiled.memory_analysis()              # XLA:GPU's buffer assignment
    ml.memory.profile(model, "train", target="h100")

Targets (:func:`names`):

* GPUs ``h100``, ``a100``, ``h200`` (target configs shipped in
  ``memlab/targets/specs/``); ``h100x8`` is one host of eight (topology
  ``1x1x8``), ``h100:1x2x8`` two hosts of eight (``<partitions>x<hosts>x<devices>``).
* TPUs ``v5e``, ``v6e``, ``v5p`` (one chip) and slices such as
  ``v5e:2x2``, ``v5e:4x4`` (any topology ``libtpu`` knows).

While compiling, :func:`memlab.dispatch.lowering_for` makes memlab's
dispatchers choose the target's kernels (cuDNN / Triton on a GPU, Mosaic on a
TPU).  Abstract arguments are placed on the target's devices by :func:`place`.

The GPU and TPU compilers come from packages kept out of memlab's main
environment (the CUDA plugin tries to initialise CUDA at every JAX start):
``make targets-env`` builds ``.venv-targets`` with ``jax-cuda12-plugin`` and
``jax-cuda12-pjrt`` matching jaxlib, cuDNN (for cuDNN fused attention),
``libtpu`` and ``ptxas``.  A missing or mismatched package is a
:class:`TargetUnavailable` error naming the install command.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from memlab import dispatch

__all__ = ["Target", "TargetUnavailable", "names", "get", "place", "lower", "compile",
           "environment", "INSTALL_HINT"]

_SPECS = Path(__file__).parent / "specs"

#: What to run when a target's compiler is missing.
INSTALL_HINT = ("make targets-env   (a separate virtualenv, .venv-targets; then run memlab from "
                ".venv-targets/bin/python)")

# GPU chips: the shipped target config and the dense bf16 tensor-core peak (datasheets).
_GPUS = {
    "h100": ("h100.txtpb", 989e12),
    "h200": ("h200.txtpb", 989e12),
    "a100": ("a100.txtpb", 312e12),
}
# TPU chips (one TensorCore-chip each; Google Cloud TPU datasheets): HBM bytes, HBM
# bytes/s, dense bf16 FLOP/s, and the libtpu topology of one chip.
_TPUS = {
    "v5e": (16 * 2**30, 819e9, 197e12, "v5e:1x1"),
    "v6e": (32 * 2**30, 1640e9, 918e12, "v6e:1x1"),
    "v5p": (95 * 2**30, 2765e9, 459e12, "v5p:1x1x1"),
}
_EXAMPLES = ("h100", "a100", "h200", "h100x8", "h100:1x2x8", "v5e", "v6e", "v5p",
             "v5e:2x2", "v5e:4x4")


class TargetUnavailable(RuntimeError):
    """The compiler for a target is not installed here (or does not match jaxlib)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A device (or group of devices) to compile for.

    ``platform`` is the lowering platform (``"cuda"`` or ``"tpu"``); ``topology``
    what the plugin is given (``"1x1x8"`` for eight GPUs on one host, ``"v5e:4x4"``).
    GPU facts (``sm_count`` ... ``compute_capability``) come from the shipped target
    config; ``memory_bytes`` is per device.
    """

    name: str
    chip: str
    platform: str
    topology: str
    num_devices: int
    device_kind: str
    memory_bytes: int
    hbm_bytes_per_s: float
    peak_bf16_flops: float
    sm_count: Optional[int] = None
    smem_per_block: Optional[int] = None
    smem_per_block_optin: Optional[int] = None
    smem_per_sm: Optional[int] = None
    registers_per_sm: Optional[int] = None
    registers_per_block: Optional[int] = None
    compute_capability: Optional[str] = None
    config_file: Optional[str] = None

    @property
    def is_gpu(self) -> bool:
        return self.platform == "cuda"

    @property
    def dispatch_platform(self) -> str:
        """The platform memlab's dispatchers choose kernels for (``"gpu"`` / ``"tpu"``)."""
        return dispatch.canonical(self.platform)

    def config_text(self) -> Optional[str]:
        """The GPU target config (text ``GpuTargetConfigProto``), None for a TPU."""
        return (_SPECS / self.config_file).read_text() if self.config_file else None

    def devices(self) -> list:
        """The compile-only devices (created once per process)."""
        return list(_devices(self))

    def mesh(self, shape: Sequence[int], axis_names: Sequence[str]) -> jax.sharding.Mesh:
        """A GSPMD mesh (``AxisType.Auto`` axes) over this target's devices."""
        from memlab import shard
        return shard.mesh(tuple(shape), tuple(axis_names), devices=self.devices())

    def memory_kinds(self) -> tuple:
        """The memory kinds the compile-only device exposes (``()`` when it exposes none)."""
        try:
            return tuple(m.kind for m in self.devices()[0].addressable_memories())
        except Exception:  # noqa: BLE001 -- a device without memory spaces
            return ()

    def facts(self) -> dict:
        """Every device fact, for results files."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "config_file"}


def names() -> tuple:
    """Example target names (any ``<gpu>x<n>``, ``<gpu>:<p>x<h>x<d>`` or TPU topology works)."""
    return _EXAMPLES


def _gpu_facts(config_file: str) -> dict:
    text = (_SPECS / config_file).read_text()

    def field(name, cast=int):
        m = re.search(rf"^\s*{name}:\s*([0-9.e+]+)", text, re.M)
        return cast(m.group(1)) if m else None

    cc = re.search(r"cuda_compute_capability\s*{\s*major:\s*(\d+)(?:\s*minor:\s*(\d+))?", text)
    kind = re.search(r'device_description_str:\s*"([^"]+)"', text).group(1)
    return dict(device_kind=kind, memory_bytes=field("device_memory_size"),
                hbm_bytes_per_s=float(field("memory_bandwidth")),
                sm_count=field("core_count"), smem_per_block=field("shared_memory_per_block"),
                smem_per_block_optin=field("shared_memory_per_block_optin"),
                smem_per_sm=field("shared_memory_per_core"),
                registers_per_sm=field("registers_per_core_limit"),
                registers_per_block=field("registers_per_block_limit"),
                compute_capability=f"{cc.group(1)}.{cc.group(2) or 0}")


_GPU_NAME = re.compile(r"^(?P<chip>[a-z0-9]+?)(?:x(?P<n>\d+)|:(?P<topo>\d+x\d+x\d+))?$")
_TPU_NAME = re.compile(r"^(?P<chip>v[0-9][a-z]?)(?::(?P<topo>[0-9x]+))?$")


def _unknown(name) -> ValueError:
    return ValueError(f"unknown target {name!r}; known: {', '.join(_EXAMPLES)} (GPUs "
                      f"{sorted(_GPUS)} as '<gpu>', '<gpu>x<devices>' or "
                      f"'<gpu>:<partitions>x<hosts>x<devices>'; TPUs {sorted(_TPUS)} as "
                      "'<tpu>' or '<tpu>:<topology>', e.g. 'v5e:4x4')")


@functools.lru_cache(maxsize=None)
def get(name: str | Target) -> Target:
    """The :class:`Target` called ``name`` (see the module doc); unknown names list the known."""
    if isinstance(name, Target):
        return name
    if not isinstance(name, str):
        raise TypeError(f"target must be a name such as 'h100' or 'v5e', got {name!r}")
    key = name.strip().lower()
    m = _GPU_NAME.match(key)
    if m and m.group("chip") in _GPUS:
        chip = m.group("chip")
        config, peak = _GPUS[chip]
        topo = m.group("topo") or f"1x1x{int(m.group('n') or 1)}"
        n = math.prod(int(x) for x in topo.split("x"))
        if n < 1:
            raise _unknown(name)
        return Target(name=key, chip=chip, platform="cuda", topology=topo, num_devices=n,
                      peak_bf16_flops=peak, config_file=config, **_gpu_facts(config))
    m = _TPU_NAME.match(key)
    if m and m.group("chip") in _TPUS:
        chip = m.group("chip")
        mem, bw, peak, one = _TPUS[chip]
        topo = f"{chip}:{m.group('topo')}" if m.group("topo") else one
        n = math.prod(int(x) for x in topo.split(":")[1].split("x"))
        kind = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v5p": "TPU v5"}[chip]
        return Target(name=key, chip=chip, platform="tpu", topology=topo, num_devices=n,
                      device_kind=kind, memory_bytes=mem, hbm_bytes_per_s=bw,
                      peak_bf16_flops=peak)
    raise _unknown(name)


# --- the compilers ------------------------------------------------------------------------

def _dist_version(*dists: str) -> Optional[tuple]:
    for d in dists:
        try:
            return d, importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _libtpu_pin() -> str:
    """The libtpu requirement jax declares for its ``tpu`` extra (e.g. ``libtpu==0.0.42.*``)."""
    for req in importlib.metadata.requires("jax") or ():
        if req.startswith("libtpu") and "tpu" in req.split(";")[-1]:
            return req.split(";")[0].replace(" ", "")
    return "libtpu"


def environment(platform: str) -> dict:
    """What compiles for ``platform`` (``"cuda"``/``"tpu"``) here; raises
    :class:`TargetUnavailable` naming the install command when it cannot."""
    import jaxlib
    jaxlib_version = jaxlib.__version__
    if platform == "cuda":
        found = _dist_version("jax-cuda12-plugin", "jax-cuda13-plugin")
        has_module = any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
                         for v in (12, 13)) if importlib.util.find_spec("jax_plugins") else False
        if found is None or not has_module:
            raise TargetUnavailable(
                f"compiling for a GPU target needs the CUDA PJRT plugin matching jaxlib "
                f"{jaxlib_version}, which is not installed in this environment. Run: "
                f"{INSTALL_HINT}; or, in an environment of its own, pip install "
                f"jax-cuda12-plugin=={jaxlib_version} jax-cuda12-pjrt=={jaxlib_version} "
                f"'nvidia-cudnn-cu12>=9.8,<10'")
        dist, version = found
        if version != jaxlib_version:
            raise TargetUnavailable(
                f"{dist} {version} does not match jaxlib {jaxlib_version}: a PJRT plugin is "
                f"built against one jaxlib and refuses (or crashes on) any other. Install "
                f"{dist}=={jaxlib_version} and {dist.replace('plugin', 'pjrt')}=="
                f"{jaxlib_version}, or rebuild with: {INSTALL_HINT}")
        return {"platform": "cuda", "plugin": f"{dist}=={version}", "jaxlib": jaxlib_version,
                "cudnn": _dist_version("nvidia-cudnn-cu12", "nvidia-cudnn-cu13"),
                "ptxas": ptxas_path()}
    if platform == "tpu":
        found = _dist_version("libtpu", "libtpu-nightly")
        if found is None or importlib.util.find_spec("libtpu") is None:
            raise TargetUnavailable(
                f"compiling for a TPU target needs libtpu ({_libtpu_pin()}, the version jax "
                f"{jax.__version__} pins), which is not installed in this environment. Run: "
                f"{INSTALL_HINT}; or pip install '{_libtpu_pin()}'")
        pin = _libtpu_pin()
        want = pin.split("==")[-1] if "==" in pin else None
        if want and not re.fullmatch(want.replace(".", r"\.").replace("*", ".*"), found[1]):
            raise TargetUnavailable(
                f"libtpu {found[1]} does not match jax {jax.__version__}, which pins {pin}: "
                f"pip install '{pin}', or rebuild with: {INSTALL_HINT}")
        return {"platform": "tpu", "libtpu": found[1], "jaxlib": jaxlib_version}
    raise ValueError(f"environment: platform={platform!r} is not 'cuda' or 'tpu'")


def ptxas_path() -> Optional[str]:
    """``ptxas`` from the ``nvidia-cuda-nvcc-cu12`` wheel (or on PATH), None if absent."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else ()) or ():
        p = Path(root) / "cuda_nvcc" / "bin" / "ptxas"
        if p.exists():
            return str(p)
    import shutil
    return shutil.which("ptxas")


@functools.lru_cache(maxsize=None)
def _devices(target: Target) -> tuple:
    environment(target.platform)
    from jax.experimental import topologies
    if target.platform == "tpu":
        # libtpu looks for a TPU VM's metadata; a compile-only topology needs none of it
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        # libtpu locks the (absent) chips per process; compile-only work may run in several
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        # one chip: libtpu's default host is 2x2 chips, which a 1x1 slice does not divide
        kw = {"chips_per_host_bounds": [1, 1, 1]} if target.num_devices == 1 else {}
        desc = topologies.get_topology_desc(target.topology, platform="tpu", **kw)
    else:
        try:
            desc = topologies.get_topology_desc("", platform="cuda",
                                                target_config=target.config_text(),
                                                topology=target.topology)
        except Exception as exc:  # noqa: BLE001 -- explained below
            raise TargetUnavailable(
                f"the CUDA plugin is installed but made no compile-only devices for "
                f"{target.name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                "On a machine without a GPU the plugin fails to start CUDA and JAX drops it: "
                "set JAX_PLATFORMS=cpu before JAX starts (or jax.config.update("
                "'jax_platforms', 'cpu') before the first jax.devices()), which registers the "
                "plugin for compiling without starting it") from exc
    devices = tuple(desc.devices)
    if len(devices) != target.num_devices:
        raise TargetUnavailable(f"{target.name}: the topology {target.topology!r} gave "
                                f"{len(devices)} devices, expected {target.num_devices}")
    return devices


# --- placing arguments and compiling --------------------------------------------------------

def _host_kind(kind) -> bool:
    return kind is not None and "host" in kind


def _target_sharding(target: Target, sharding, devices):
    """``sharding`` moved onto the target: one-device shardings to device 0 (keeping the
    memory kind); meshes already over the target's devices kept; others refused."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
    kind = getattr(sharding, "memory_kind", None) if sharding is not None else None
    if _host_kind(kind) and kind not in target.memory_kinds():
        raise TargetUnavailable(
            f"target {target.name}: an argument lives in memory_kind={kind!r}, but the "
            f"compile-only {target.device_kind} device exposes the memory kinds "
            f"{list(target.memory_kinds()) or 'none'} -- jaxlib's compile-only CUDA devices "
            "report no memory spaces, so JAX cannot express a host placement for them and "
            "XLA:GPU would count host buffers as device buffers. Compile host-offload plans "
            "for a TPU target (e.g. 'v5e'), whose compile-only devices expose pinned_host.")
    if sharding is None or len(sharding.device_set) == 1:
        if isinstance(sharding, NamedSharding):
            mesh = Mesh(np.array(devices[:1]).reshape((1,) * len(sharding.mesh.axis_names)),
                        sharding.mesh.axis_names)
            return NamedSharding(mesh, sharding.spec, memory_kind=kind)
        if kind is not None and kind != "device":
            mesh = Mesh(np.array(devices[:1]), ("offload",))
            return NamedSharding(mesh, PartitionSpec(), memory_kind=kind)
        return SingleDeviceSharding(devices[0])
    if set(sharding.device_set) <= set(devices):
        return sharding
    raise ValueError(
        f"target {target.name}: an argument is sharded over {len(sharding.device_set)} devices "
        f"of another backend; build its mesh over the target's devices "
        f"(ml.targets.get({target.name!r}).mesh(shape, names), or "
        f"ml.shard.mesh(shape, names, devices=target.devices()))")


def place(tree: Any, target: str | Target) -> Any:
    """``tree`` as ``jax.ShapeDtypeStruct``\\ s on ``target``'s compile-only devices."""
    target = get(target)
    devices = target.devices()

    def one(x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=_target_sharding(target, sharding, devices))

    return jax.tree_util.tree_map(one, tree)


def lower(fn: Callable, args: Sequence[Any], target: str | Target, *,
          donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = ()):
    """``jax.jit(fn)`` traced on ``args`` (placed on ``target``) and lowered for its platform,
    with memlab's dispatchers choosing the target's kernels."""
    target = get(target)
    placed = [a if i in static_argnums else place(a, target) for i, a in enumerate(args)]
    with dispatch.lowering_for(target.platform):
        jitted = jax.jit(fn, donate_argnums=tuple(donate_argnums),
                         static_argnums=tuple(static_argnums))
        return jitted.trace(*placed).lower(lowering_platforms=(target.platform,))


def compile(fn: Callable, args: Sequence[Any], target: str | Target, *,  # noqa: A001
            donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = (),
            dump_to: Optional[str] = None):
    """:func:`lower`, then compile with the target's backend compiler.

    ``dump_to``: a directory for XLA's dump of the compiled module (optimized HLO,
    buffer assignment, and on a GPU the PTX and the kernel launch sequence that
    :mod:`memlab.targets.report` reads).
    """
    lowered = lower(fn, args, target, donate_argnums=donate_argnums,
                    static_argnums=static_argnums)
    opts = {"xla_dump_to": dump_to} if dump_to else None
    return lowered.compile(opts) if opts else lowered.compile()
