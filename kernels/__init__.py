"""MXFP4 weight-only GEMM kernels (installed as ``vllm_specqd.kernels``).

``mxfp4_matmul(x, packed, scales, bias=None)`` is the entry point: Triton on CUDA, the torch twin
``mxfp4_matmul_torch`` elsewhere. The Triton launchers (``mxfp4_matmul_triton``,
``mxfp4_dequant_triton``) are importable only when Triton is installed (``HAS_TRITON``).
"""

from .mxfp4_gemm import check_mxfp4_matmul_inputs, mxfp4_matmul, mxfp4_matmul_torch

try:
    from .mxfp4_triton import mxfp4_dequant_triton, mxfp4_matmul_triton
except ImportError:  # Triton is an optional extra
    HAS_TRITON = False
else:
    HAS_TRITON = True

__all__ = ["HAS_TRITON", "check_mxfp4_matmul_inputs", "mxfp4_matmul", "mxfp4_matmul_torch"]
if HAS_TRITON:
    __all__ += ["mxfp4_dequant_triton", "mxfp4_matmul_triton"]
