"""MXFP4 weight-only GEMM kernels (installed as ``vllm_specqd.kernels``).

``mxfp4_matmul(x, packed, scales, bias=None)`` is the entry point on canonical MXFP4 bytes:

* CUDA tensors: the Triton kernels (``triton_mxfp4.py``) when Triton is installed;
* CPU tensors: the native x86 kernel (``cpu_ops.py``, W4A16: activations quantized per 32-block to
  int16), else the torch twin with one warning naming what is missing;
* anything else: the torch twin (``reference.py``).
"""

from __future__ import annotations

import torch

from .reference import (
    check_mxfp4_matmul_inputs,
    mxfp4_bf16_act_error_bound,
    mxfp4_int_act_error_bound,
    mxfp4_matmul_bf16_act_torch,
    mxfp4_matmul_int_act_torch,
    mxfp4_matmul_torch,
    quantize_activations_torch,
)

try:
    from .triton_mxfp4 import mxfp4_dequant_triton, mxfp4_matmul_triton
except ImportError:  # Triton is an optional extra
    HAS_TRITON = False
else:
    HAS_TRITON = True

CPU_DEFAULT_ACT_BITS = 16


def quantize_mxfp4(w: torch.Tensor, scale_rule: str = "floor", name: str = "weight"):
    """``vllm_specqd.mxfp4.quantize_mxfp4``, run natively for 2-D CPU weights (same bytes, ~10x faster)."""
    from vllm_specqd.mxfp4 import SCALE_RULES, MXFP4Tensor
    from vllm_specqd.mxfp4 import quantize_mxfp4 as quantize_reference

    if w.device.type != "cpu" or w.dim() != 2 or scale_rule not in SCALE_RULES or not w.is_floating_point():
        return quantize_reference(w, scale_rule=scale_rule, name=name)
    from .cpu_ops import native_available, quantize_mxfp4_cpu

    if not native_available():
        return quantize_reference(w, scale_rule=scale_rule, name=name)
    finite = torch.isfinite(w)
    if not finite.all():
        n_bad = int((~finite).sum())
        raise ValueError(f"{name}: cannot quantize to MXFP4, {n_bad} of {w.numel()} values are NaN or Inf")
    packed, scales = quantize_mxfp4_cpu(w.detach(), scale_rule)
    return MXFP4Tensor(packed, scales, w.shape[-1])


def mxfp4_matmul(
    x: torch.Tensor,  # [..., K] bf16/fp16/fp32
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] in x.dtype
    """``x @ W.T + bias`` for an MXFP4 weight ``W`` ``[N, K]``; callers never branch on the device.

    Shapes, dtypes and devices are checked first (ValueError naming the argument). On CPU the
    result differs from exact fp32 math by the int16 activation rounding (at most 2^-16 of each
    block's largest activation), well below bf16's own rounding.
    """
    if x.is_cuda and HAS_TRITON:
        return mxfp4_matmul_triton(x, packed, scales, bias)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        from .cpu_ops import mxfp4_linear_cpu, native_available

        if native_available():
            return mxfp4_linear_cpu(x, packed, scales, bias, act_bits=CPU_DEFAULT_ACT_BITS)
    return mxfp4_matmul_torch(x, packed, scales, bias)


__all__ = [
    "CPU_DEFAULT_ACT_BITS",
    "HAS_TRITON",
    "check_mxfp4_matmul_inputs",
    "mxfp4_bf16_act_error_bound",
    "mxfp4_int_act_error_bound",
    "mxfp4_matmul",
    "mxfp4_matmul_bf16_act_torch",
    "mxfp4_matmul_int_act_torch",
    "mxfp4_matmul_torch",
    "quantize_activations_torch",
    "quantize_mxfp4",
]
if HAS_TRITON:
    __all__ += ["mxfp4_dequant_triton", "mxfp4_matmul_triton"]
