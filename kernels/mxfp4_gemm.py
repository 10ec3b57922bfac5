"""MXFP4 weight-only GEMM: ``y = x @ W.T (+ bias)`` with ``W`` stored as MXFP4 (docs/CONTRACTS.md).

This file holds the device-independent half: input checks, the torch twin (the reference every
Triton kernel is tested against) and the public entry point that picks the implementation.
The Triton kernels live in ``mxfp4_triton.py``.

Weight layout: exactly the contract's, no pre-shuffle. ``packed`` is ``[N, K_pad/2]`` uint8 (element
``2i`` in the low nibble of byte ``i``), ``scales`` is ``[N, K_pad/32]`` uint8 E8M0. Row-major along
K already gives the decode kernel what it needs: each 32-element block is 16 contiguous bytes, one
vector load per thread, and its scale is one byte beside it.

Worked example::

    >>> import torch
    >>> from vllm_specqd.mxfp4 import quantize_mxfp4
    >>> from vllm_specqd.kernels import mxfp4_matmul
    >>> w = torch.tensor([[0.5, -2.0] + [0.0] * 30, [6.0, 1.0] + [0.0] * 30])   # [N=2, K=32]
    >>> q = quantize_mxfp4(w)            # every value is an E2M1 code times its block scale: exact
    >>> x = torch.tensor([[2.0, 1.0] + [0.0] * 30], dtype=torch.bfloat16)      # [M=1, K=32]
    >>> mxfp4_matmul(x, q.packed, q.scales)   # CPU tensors -> torch twin; CUDA -> Triton
    tensor([[-1., 13.]], dtype=torch.bfloat16)
"""

from __future__ import annotations

import torch

from vllm_specqd.mxfp4 import BLOCK_SIZE, dequantize_mxfp4

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _shape(t: torch.Tensor) -> str:
    return f"{t.dtype} {list(t.shape)}" + ("" if t.is_contiguous() else " (non-contiguous)")


def check_mxfp4_matmul_inputs(
    x: torch.Tensor,  # [..., K] activations
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    bias: torch.Tensor | None = None,  # [N]
    who: str = "mxfp4_matmul",
) -> tuple[torch.Tensor, int, int]:
    """Validate the GEMM operands; return ``(x2d [M, K] with unit stride along K, N, K)``.

    Raises ValueError naming the offending argument, its expected and its actual shape/dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in ACT_DTYPES:
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}: x must be a bf16/fp16/fp32 tensor [..., K], got {got}")
    k = x.shape[-1]
    if k < 1:
        raise ValueError(f"{who}: x must have K >= 1 columns, got {_shape(x)}")
    k_pad = -(-k // BLOCK_SIZE) * BLOCK_SIZE
    if (
        not isinstance(packed, torch.Tensor)
        or packed.dtype != torch.uint8
        or packed.dim() != 2
        or packed.shape[1] != k_pad // 2
    ):
        got = _shape(packed) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(
            f"{who}: packed must be uint8 [N, K_pad/2] = [N, {k_pad // 2}] for x's K={k} (K_pad={k_pad}), got {got}"
        )
    n = packed.shape[0]
    if (
        not isinstance(scales, torch.Tensor)
        or scales.dtype != torch.uint8
        or tuple(scales.shape) != (n, k_pad // BLOCK_SIZE)
    ):
        got = _shape(scales) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"{who}: scales must be uint8 [N, K_pad/32] = [{n}, {k_pad // BLOCK_SIZE}], got {got}")
    # The kernels address weights with row stride K_pad/2 and K_pad/32; a view with other
    # strides would be read wrongly rather than slowly, so refuse it instead of copying MBs.
    for name, t in (("packed", packed), ("scales", scales)):
        if not t.is_contiguous():
            raise ValueError(f"{who}: {name} must be contiguous, got {_shape(t)} with strides {t.stride()}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (n,):
            got = _shape(bias) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{who}: bias must be a floating-point [N] = [{n}] tensor or None, got {got}")
        if not bias.is_contiguous():
            raise ValueError(f"{who}: bias must be contiguous, got strides {bias.stride()}")
    for name, t in (("packed", packed), ("scales", scales), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{who}: {name} is on {t.device} but x is on {x.device}")
    x2d = x.reshape(-1, k)
    if x2d.shape[0] > 0 and x2d.stride(1) != 1:  # activations are small: a copy is cheap
        x2d = x2d.contiguous()
    return x2d, n, k


def mxfp4_matmul_torch(
    x: torch.Tensor,  # [..., K] bf16/fp16/fp32
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] in x.dtype
    """Torch twin of the Triton GEMM: dequantize with the format module, fp32 matmul, one rounding.

    Runs on any device. ``y = (x.float() @ dequantize_mxfp4(packed, scales, K).T + bias.float())``
    rounded once to ``x.dtype``. Example: x ``[2, 3, 40]`` bf16 with an MXFP4 weight ``[96, 40]``
    (packed ``[96, 32]``, scales ``[96, 2]``) gives ``[2, 3, 96]`` bf16.
    """
    x2d, n, k = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_matmul_torch")
    w = dequantize_mxfp4(packed, scales, k=k, dtype=torch.float32)  # [N, K]
    y = x2d.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _triton_module():
    # Triton is an optional extra: CPU-only installs must still import this package.
    try:
        from . import mxfp4_triton
    except ImportError:
        return None
    return mxfp4_triton


def mxfp4_matmul(
    x: torch.Tensor,  # [..., K] bf16/fp16/fp32
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] in x.dtype
    """``x @ W.T + bias`` for an MXFP4 weight ``W`` ``[N, K]``; the one entry point callers use.

    CUDA tensors (with Triton installed) run the Triton kernels: a split-K decode kernel for
    M <= 16 rows, a tiled ``tl.dot`` kernel above that. Anything else runs the torch twin, so callers
    never branch on the device. Shapes/dtypes/devices are checked first (ValueError on mismatch).
    See the module docstring for a worked example.
    """
    if x.is_cuda:
        triton_impl = _triton_module()
        if triton_impl is not None:
            return triton_impl.mxfp4_matmul_triton(x, packed, scales, bias)
    return mxfp4_matmul_torch(x, packed, scales, bias)
