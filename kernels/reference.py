"""Reference half of the MXFP4 kernels: input checks and the torch twins every kernel is tested against.

* ``mxfp4_matmul_torch``: exact dequantize + fp32 matmul (twin of the Triton kernels).
* ``mxfp4_matmul_int_act_torch``: twin of the native CPU kernel (``cpu_ops.py``), which quantizes
  activations per 32-element block to int8 or int16 before an exact integer dot per block.
* ``mxfp4_matmul_bf16_act_torch``: twin of the AMX kernel (``cpu/amx_bf16.h``): activations rounded
  to bf16, weights decoded exactly, exact products summed in fp32.
* ``mxfp4_matmul_multirow_torch``: bit-exact twin of the multi-row kernel (``cpu/multirow.h``): int8
  activations per 32-block, exact integer block dots, the kernel's fp32 operations in its order.
* ``mxfp4_matmul_large_m_torch``: twin of its many-row path (exact dequantization + one GEMM).

The kernels live in ``triton_mxfp4.py`` and ``cpu/``; ``__init__.py`` dispatches. No vLLM here.

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
    >>> mxfp4_matmul(x, q.packed, q.scales)   # CUDA -> Triton; CPU -> native kernel (int16 activations)
    tensor([[-1., 13.]], dtype=torch.bfloat16)
"""

from __future__ import annotations

import torch

from vllm_specqd.mxfp4 import BLOCK_SIZE, dequantize_mxfp4, unpack_fp4

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


# 2 * E2M1 value of every code: integers, so a block's dot with integer activations is exact.
_TWICE_E2M1 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def quantize_activations_torch(
    x: torch.Tensor,  # [M, K] float32 | bfloat16
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # q [M, K_pad/32, 32] int64, scale [M, K_pad/32] float32
    """Symmetric per-32-block quantization, op for op as the native kernel does it.

    ``inv = qmax / amax`` and ``q = rint(x * inv)`` in fp32 (qmax 127 or 32767); ``scale = amax / qmax``;
    an all-zero block gets q = 0 and scale 0. K is padded with zeros to a multiple of 32.
    """
    qmax = 127.0 if bits == 8 else 32767.0
    m, k = x.shape
    k_pad = -(-k // BLOCK_SIZE) * BLOCK_SIZE
    xf = torch.nn.functional.pad(x.float(), (0, k_pad - k)).reshape(m, -1, BLOCK_SIZE)
    amax = xf.abs().amax(dim=-1)
    nonzero = amax > 0
    inv = torch.where(nonzero, torch.tensor(qmax) / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv.unsqueeze(-1)).to(torch.int64)
    scale = torch.where(nonzero, amax / torch.tensor(qmax), torch.zeros_like(amax))
    return q, scale


def mxfp4_matmul_int_act_torch(
    x: torch.Tensor,  # [..., K] float32 | bfloat16
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    bias: torch.Tensor | None = None,  # [N]
    act_bits: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:  # y [..., N] float64, sum |q w| s [..., N] float64
    """Torch twin of ``cpu_ops.mxfp4_linear_cpu`` in float64: the exact value the kernel rounds, and a scale.

    Per block b: an exact integer dot ``sum(q_x * 2w)``, times ``2^(e_b - 127) * scale_x / 2``, summed
    over blocks. One deliberate difference from ``dequantize_mxfp4``: E8M0 byte 0 (2^-127) reads as 0,
    as in the kernel's exponent-field trick; quantizers only emit it for all-zero blocks.
    The kernel sums the same terms in fp32 with one rounding per block and lane, so
    ``|kernel - twin| <= (K_pad/32 + 8) * 2^-24 * sum_b s_b sum_i |q_i w_i|`` (``mxfp4_int_act_error_bound``),
    plus the final rounding to x.dtype.
    """
    x2d, n, k = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_matmul_int_act_torch")
    q, sx = quantize_activations_torch(x2d, act_bits)  # [M, B, 32], [M, B]
    codes = unpack_fp4(packed).long().reshape(n, -1, BLOCK_SIZE)  # [N, B, 32]
    w2 = torch.tensor(_TWICE_E2M1, dtype=torch.int64)[codes]
    dots = torch.einsum("mbk,nbk->mnb", q, w2).double()  # exact: |dot| < 2^31
    sw = torch.where(scales == 0, 0.0, torch.exp2(scales.double() - 127.0))  # [N, B]
    block_scale = sw.unsqueeze(0) * (sx.double() * 0.5).unsqueeze(1)  # [M, N, B]
    y = (dots * block_scale).sum(-1)
    if bias is not None:
        y = y + bias.double()
    # The kernel rounds partial sums of a block (its vector lanes), so the error scales with the
    # absolute products, not with the block totals that may cancel.
    abs_products = torch.einsum("mbk,nbk->mnb", q.abs(), w2.abs()).double() * block_scale
    return y.reshape(*x.shape[:-1], n), abs_products.sum(-1).reshape(*x.shape[:-1], n)


def mxfp4_int_act_error_bound(abs_terms: torch.Tensor, k: int, out_dtype: torch.dtype, y: torch.Tensor) -> torch.Tensor:
    """Bound on |kernel - twin| from fp32 accumulation (see ``mxfp4_matmul_int_act_torch``)."""
    nblocks = -(-k // BLOCK_SIZE)
    bound = (nblocks + 8) * 2.0**-24 * abs_terms + 2.0**-23 * y.abs()  # + bias add and fp32 result
    if out_dtype == torch.bfloat16:
        bound = bound + y.abs() * 2.0**-8  # one bf16 rounding: half an ulp of 8 bits, with slack
    return bound


def mxfp4_matmul_bf16_act_torch(
    x: torch.Tensor,  # [..., K] float32 | bfloat16
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    bias: torch.Tensor | None = None,  # [N]
) -> tuple[torch.Tensor, torch.Tensor]:  # y [..., N] float64, sum |x w| [..., N] float64
    """Twin of ``cpu_ops.mxfp4_linear_amx_cpu`` in float64: the exact value the kernel rounds, and a scale.

    ``y = bf16(x) @ bf16(W).T + bias`` with ``W = dequantize_mxfp4(...)``: every MXFP4 value is a bf16
    number (except beyond bf16's range), and a bf16 x bf16 product is exact in fp32, so the kernel
    differs only by its fp32 accumulation: ``|kernel - twin| <= (K_pad/2 + 8) * 2^-24 * sum |x_k w_k|``
    (``mxfp4_bf16_act_error_bound``), plus the final rounding to x.dtype.
    """
    x2d, n, k = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_matmul_bf16_act_torch")
    w = dequantize_mxfp4(packed, scales, k=k, dtype=torch.float32).to(torch.bfloat16).double()
    xb = x2d.to(torch.bfloat16).double()
    y = xb @ w.T
    if bias is not None:
        y = y + bias.double()
    abs_terms = xb.abs() @ w.abs().T
    return y.reshape(*x.shape[:-1], n), abs_terms.reshape(*x.shape[:-1], n)


def mxfp4_bf16_act_error_bound(
    abs_terms: torch.Tensor, k: int, out_dtype: torch.dtype, y: torch.Tensor
) -> torch.Tensor:
    """Bound on |kernel - twin| for the AMX kernel (see ``mxfp4_matmul_bf16_act_torch``)."""
    k_pad = -(-k // BLOCK_SIZE) * BLOCK_SIZE
    bound = (k_pad // 2 + 8) * 2.0**-24 * abs_terms + 2.0**-23 * y.abs()
    if out_dtype == torch.bfloat16:
        bound = bound + y.abs() * 2.0**-8
    return bound


def _e8m0_exponent_field(scales: torch.Tensor) -> torch.Tensor:  # uint8 [...] -> float32 [...]
    """The kernels' ``byte << 23`` read as fp32: 2^(byte - 127), except byte 0 -> 0 and 255 -> inf."""
    return (scales.to(torch.int32) << 23).view(torch.float32)


def mxfp4_matmul_multirow_torch(
    x: torch.Tensor,  # [..., K] float32 | bfloat16
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    bias: torch.Tensor | None = None,  # [N] float32 | bfloat16
) -> torch.Tensor:  # [..., N] in x.dtype
    """Bit-exact twin of ``cpu_ops.mxfp4_linear_multirow_cpu`` (M up to its ``large_m``).

    Per row and 32-block b: int8 ``q`` and ``sx = amax / 127 / 2`` as ``quantize_activations_torch``;
    ``dot_b = sum q * 2 E2M1`` (exact); then in fp32, blocks in order from ``acc = 0``:
    ``acc = fma(dot_b * sx_b, sw_b, acc)`` with ``sw = 2^(e - 127)`` (byte 0 -> 0, 255 -> inf); then
    ``acc + bias`` rounded once to x.dtype. The fma is evaluated in float64 and rounded to fp32:
    the product of an fp32 value and a power of two is exact there, and rounding a float64 sum of two
    24-bit numbers to fp32 gives the fp32-rounded sum (53 >= 2 * 24 + 2). Example: ``x`` ``[3, 40]``
    with ``W`` ``[8, 40]`` (packed ``[8, 32]``, scales ``[8, 2]``) gives ``[3, 8]``, two fma steps per output.
    """
    x2d, n, k = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_matmul_multirow_torch")
    q, sx = quantize_activations_torch(x2d, 8)  # [M, B, 32] int64, [M, B] fp32 = amax / 127
    sx = sx * 0.5  # fp32, as the kernel: amax / 127 * 0.5f
    codes = unpack_fp4(packed).long().reshape(n, -1, BLOCK_SIZE)  # [N, B, 32]
    w2 = torch.tensor(_TWICE_E2M1, dtype=torch.int64)[codes]
    dots = torch.einsum("mbk,nbk->mnb", q, w2).float()  # exact: |dot| <= 32 * 127 * 12 < 2^24
    sw = _e8m0_exponent_field(scales).double()  # [N, B]
    acc = torch.zeros(x2d.shape[0], n, dtype=torch.float32)
    for b in range(dots.shape[-1]):
        t = dots[:, :, b] * sx[:, b : b + 1]  # fp32 product, rounded as the kernel's VMULPS
        acc = (acc.double() + t.double() * sw[:, b]).float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype).reshape(*x.shape[:-1], n)


def large_m_gemm_dtype(x_dtype: torch.dtype, cpu_has_avx512_bf16: bool) -> torch.dtype:
    """The many-row path's GEMM dtype: bf16 for bf16 x where the CPU has AVX-512 BF16, else fp32."""
    return torch.bfloat16 if x_dtype == torch.bfloat16 and cpu_has_avx512_bf16 else torch.float32


def mxfp4_matmul_large_m_torch(
    x: torch.Tensor,  # [..., K] float32 | bfloat16
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    bias: torch.Tensor | None = None,  # [N]
    gemm_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:  # y [..., N] float64, sum |x w| [..., N] float64
    """Twin of the multi-row kernel's many-row path in float64: the exact value its GEMM rounds, and a scale.

    The path computes ``linear(x.to(g), dequantize_mxfp4(W).to(g), bias.to(g))`` with ``g = gemm_dtype``;
    the dequantization is exact (an E2M1 value times a power of two is an fp32 and a bf16 number), so
    it differs from this only by the GEMM's fp32 accumulation, ``|path - twin| <= (K + 8) * 2^-24 *
    sum |x_k w_k|`` (``mxfp4_bf16_act_error_bound`` with K_pad/2 replaced by K), plus its roundings to g and x.dtype.
    """
    x2d, n, k = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_matmul_large_m_torch")
    w = dequantize_mxfp4(packed, scales, k=k, dtype=torch.float32).to(gemm_dtype).double()
    xg = x2d.to(gemm_dtype).double()
    y = xg @ w.T
    if bias is not None:
        y = y + bias.to(gemm_dtype).double()
    abs_terms = xg.abs() @ w.abs().T
    return y.reshape(*x.shape[:-1], n), abs_terms.reshape(*x.shape[:-1], n)


def bf16_linear_torch(
    x: torch.Tensor,  # [..., K] bfloat16
    weight: torch.Tensor,  # [N, K] bfloat16
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] bfloat16
    """Twin of ``cpu_ops.bf16_linear_cpu``: fp32 products and sums, bias in fp32, one bf16 rounding."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16)
