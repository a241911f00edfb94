"""Compile tiny test programs with XLA:CPU's cheap pipeline: LLVM optimization off.  Buffer
assignment (every byte number) does not depend on it; ``make test`` sets the same options
for its compile-bound tests through XLA_FLAGS, this keeps a file run alone as fast."""
import jax

OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiled(fn, *args):
    """``fn(*args)``, jitted and compiled with :data:`OPTIONS`."""
    return jax.jit(fn).trace(*args).lower().compile(OPTIONS)(*args)
