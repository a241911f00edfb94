"""memlab_kernels: Pallas kernels, installed from the top-level ``kernels/`` folder.

Installed as ``memlab_kernels`` (not ``kernels``, a different PyPI project).  This
package knows nothing of memlab: each kernel is one module holding the
``pallas_call``, its block sizes as a small frozen dataclass, a pure-JAX
reference beside it, and a ``custom_vjp`` where it must be differentiated.
The plumbing they share lives in two private modules: ``_common`` (the backend
vocabulary and ``pallas_lowering``, argument checks, tile helpers, block
arithmetic) and ``_packing`` (memlab's one bit-packing layout).
Tests run every kernel with ``interpret=True`` on CPU.
"""
