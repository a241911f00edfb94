"""Quantization: weight formats as QArray pytrees, and methods that choose codes.

Formats (``int8``, ``intn``/``int4``, ``nf4``, ``fp8``, ``fp4``) say how a weight is
stored; methods (``rtn`` ...; registered by name in ``memlab.quant.METHODS``)
say how codes are chosen, possibly from calibration data.  ``qmatmul`` is the
matmul the quantized layers dispatch to.
"""
from memlab.quant.qarray import QArray, is_qarray  # noqa: F401
from memlab.quant.formats import (FP4, FP8, NF4, W8A8, Int8, IntN, LLMInt8, Format, Scaled,  # noqa: F401
                                  fp4, fp8, int4, int8, intn, llm_int8, nf4, pack, unpack, w8a8)
from memlab.quant.matmul import kernel_backend, kernel_mode, qmatmul  # noqa: F401
from memlab.quant import calibrate, checkpoint, methods  # noqa: F401,E402
