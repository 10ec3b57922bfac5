"""MXFP4 weight-only GEMM kernels (installed as ``vllm_specqd.kernels``); every kernel choice is made here.

``mxfp4_matmul(x, packed, scales, bias=None, kernel=None)`` is the one entry point:

* ``kernel`` given (a :class:`CpuKernel`, or any callable ``kernel(x, packed, scales, bias)``):
  ``packed`` / ``scales`` are that kernel's weight layout (``kernel.prepare``) and it runs as it is.
  An engine's MXFP4 layers hold one, chosen once when the draft is built (:func:`cpu_kernel`).
* otherwise ``packed`` / ``scales`` are canonical MXFP4 bytes and the device decides: CUDA tensors
  run the Triton kernels (``triton_mxfp4.py``) when Triton is installed; CPU tensors the native
  W4A16 kernel (``cpu_ops.py``), else the torch twin with one warning naming what is missing;
  anything else the torch twin (``reference.py``).

The CPU kernels (``CPU_KERNELS``; the ISA inside each is picked by ``cpu_ops``):

* ``"multirow"``: int8 activations; each weight block decoded once per call for every row
  (``cpu/multirow.h``), any M (its exact-dequantization + GEMM path for many rows is off by
  measurement: ``cpu_ops.LARGE_M_ROWS``).
* ``"amx"``: bf16 activations on AMX tiles (``cpu/amx_bf16.h``), where the CPU has AMX-BF16.
* ``"w4a8"`` / ``"w4a16"``: int8 / int16 activations, vector work per row (``cpu/gemm_body.h``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .reference import (
    check_mxfp4_matmul_inputs,
    mxfp4_bf16_act_error_bound,
    mxfp4_int_act_error_bound,
    mxfp4_matmul_bf16_act_torch,
    mxfp4_matmul_int_act_torch,
    mxfp4_matmul_large_m_torch,
    mxfp4_matmul_multirow_torch,
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
CPU_KERNELS = ("multirow", "amx", "w4a8", "w4a16")
_ACT_BITS = {"w4a8": 8, "w4a16": 16}


def resolve_cpu_kernel(name: str) -> str:
    """``"auto"`` -> ``"amx"`` where this CPU has AMX-BF16, else ``"multirow"``; names are checked.

    Raises ValueError for an unknown name and RuntimeError for ``"amx"`` on a CPU without AMX-BF16.
    """
    from .cpu_ops import amx_available

    if name == "auto":
        # By measurement (benchmarks/README.md): without AMX the multi-row kernel is the faster one
        # at every M (Zen 4: 1 row too); with AMX, the AMX kernel from a few rows on.
        return "amx" if amx_available() else "multirow"
    if name not in CPU_KERNELS:
        raise ValueError(f"unknown CPU MXFP4 kernel {name!r}; use 'auto' or one of {CPU_KERNELS}")
    if name == "amx" and not amx_available():
        raise RuntimeError(
            "specqd: draft.cpu_kernel 'amx' needs a CPU with AMX-BF16 (Intel Xeon 4th generation, "
            "Sapphire Rapids, or newer) and a Linux kernel that grants AMX to processes (5.16+); this one "
            "does not. Use 'auto', 'multirow', 'w4a8' or 'w4a16'."
        )
    return name


@dataclass(frozen=True)
class CpuKernel:
    """A native CPU kernel bound to one weight's shape: ``kernel(x, a, b, bias)`` with ``(a, b) = kernel.prepare(packed, scales)``.

    The layout replaces the canonical bytes (same size but for tile padding), so a layer holds one
    copy; ``canonical(a, b)`` gives the bytes back. Example: ``k = cpu_kernel("multirow", 8960, 1536)``;
    ``a, b = k.prepare(packed, scales)`` (codes ``[560, 48, 256]``, tile scales ``[560, 48, 16]``);
    ``k(x, a, b)`` with ``x`` ``[4, 1536]`` bf16 gives ``[4, 8960]`` bf16.
    """

    name: str  # one of CPU_KERNELS
    n: int  # output features
    k: int  # input features

    def prepare(
        self,
        packed: torch.Tensor,  # [N, K_pad/2] uint8, canonical
        scales: torch.Tensor,  # [N, K_pad/32] uint8
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from . import cpu_ops

        if self.name == "multirow":
            return cpu_ops.multirow_repack(packed, scales)
        if self.name == "amx":
            return cpu_ops.amx_repack(packed, scales), torch.empty(0, dtype=torch.uint8)
        return packed, scales

    def canonical(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from . import cpu_ops

        if self.name == "multirow":
            return cpu_ops.multirow_unpack(a, b, self.n)
        if self.name == "amx":
            return cpu_ops.amx_unpack(a, self.n)
        return a, b

    def __call__(
        self,
        x: torch.Tensor,  # [..., K] float32 | bfloat16
        a: torch.Tensor,  # prepare(...)[0]
        b: torch.Tensor,  # prepare(...)[1]
        bias: torch.Tensor | None = None,  # [N]
    ) -> torch.Tensor:  # [..., N] in x.dtype
        from .cpu_ops import LARGE_M_ROWS

        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        ops = torch.ops.specqd  # the ops assert their inputs
        if self.name == "multirow":
            y = ops.mxfp4_linear_multirow(x2d, a, b, self.n, bias, "auto", LARGE_M_ROWS)
        elif self.name == "amx":
            y = ops.mxfp4_linear_amx(x2d, a, self.n, bias)
        else:
            y = ops.mxfp4_linear(x2d, a, b, bias, _ACT_BITS[self.name], "auto")
        return y.reshape(*x.shape[:-1], self.n)


def cpu_kernel(name: str, n: int, k: int) -> CpuKernel | None:
    """The CPU kernel ``name`` (``"auto"`` resolved, :func:`resolve_cpu_kernel`) for an ``[n, k]`` weight.

    None when the native library cannot be built (one warning says why; ``mxfp4_matmul`` then runs
    the torch twin on canonical bytes).
    """
    from .cpu_ops import native_available

    name = resolve_cpu_kernel(name)
    return CpuKernel(name, n, k) if native_available() else None


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
    packed: torch.Tensor,  # [N, K_pad/2] uint8 (or kernel's layout)
    scales: torch.Tensor,  # [N, K_pad/32] uint8 (or kernel's layout)
    bias: torch.Tensor | None = None,  # [N]
    kernel: Callable | None = None,  # CpuKernel, or any callable (x, packed, scales, bias) -> y
) -> torch.Tensor:  # [..., N] in x.dtype
    """``x @ W.T + bias`` for an MXFP4 weight ``W`` ``[N, K]``; callers never branch on the device.

    Without ``kernel``, shapes, dtypes and devices are checked first (ValueError naming the argument).
    On CPU the result then differs from exact fp32 math by the int16 activation rounding (at most
    2^-16 of each block's largest activation), well below bf16's own rounding. With ``kernel`` the
    kernel's op asserts its own inputs (the layout is not canonical).
    """
    if kernel is not None:
        return kernel(x, packed, scales, bias)
    if x.is_cuda and HAS_TRITON:
        return mxfp4_matmul_triton(x, packed, scales, bias)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        from .cpu_ops import mxfp4_linear_cpu, native_available

        if native_available():
            return mxfp4_linear_cpu(x, packed, scales, bias, act_bits=CPU_DEFAULT_ACT_BITS)
    return mxfp4_matmul_torch(x, packed, scales, bias)


__all__ = [
    "CPU_DEFAULT_ACT_BITS",
    "CPU_KERNELS",
    "CpuKernel",
    "HAS_TRITON",
    "check_mxfp4_matmul_inputs",
    "cpu_kernel",
    "mxfp4_bf16_act_error_bound",
    "mxfp4_int_act_error_bound",
    "mxfp4_matmul",
    "mxfp4_matmul_bf16_act_torch",
    "mxfp4_matmul_int_act_torch",
    "mxfp4_matmul_large_m_torch",
    "mxfp4_matmul_multirow_torch",
    "mxfp4_matmul_torch",
    "quantize_activations_torch",
    "quantize_mxfp4",
    "resolve_cpu_kernel",
]
if HAS_TRITON:
    __all__ += ["mxfp4_dequant_triton", "mxfp4_matmul_triton"]
