"""XLA flags memlab sets before JAX starts, unless the user opted out.

On CPU the default (concurrency-optimized) scheduler keeps every activation
alive, so rematerialization shows no effect in ``memory_analysis()``.  The
memory-optimized scheduler makes CPU byte counts reflect what remat, chunking
and scanning really save.  Set ``MEMLAB_KEEP_XLA_FLAGS=1`` to leave XLA_FLAGS alone.
"""
import os
import sys

CPU_MEMORY_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def apply() -> bool:
    """Add the CPU memory-optimized scheduler flag if JAX has no backend yet."""
    if os.environ.get("MEMLAB_KEEP_XLA_FLAGS"):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_scheduler_type" in flags:
        return False
    jax_mod = sys.modules.get("jax")
    if jax_mod is not None:
        try:
            from jax._src import xla_bridge
            if xla_bridge._backends:  # a backend exists: too late for flags to matter
                return False
        except Exception:
            pass
    os.environ["XLA_FLAGS"] = (flags + " " + CPU_MEMORY_SCHEDULER).strip()
    return True
