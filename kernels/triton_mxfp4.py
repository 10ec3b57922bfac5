"""Triton kernels for the MXFP4 weight-only GEMM ``y = x @ W.T + bias`` (W: docs/CONTRACTS.md layout).

Three paths, picked by the number of activation rows M (``force_path`` overrides):

* ``"gemv"`` (M <= 16: decode and speculative verification). Memory bound: the weight bytes
  are the whole cost, so the kernel streams ``packed`` once with 16-byte loads (one 32-element
  block = 16 contiguous bytes), decodes nibbles with integer ops (below) into fp32, reduces each block
  before applying its E8M0 scale (one multiply per 32 elements), and accumulates in fp32 on the
  CUDA cores. Split-K over program axis 1 keeps every SM busy when N alone gives too few
  tiles (down 14336->4096: 64 tiles of 64 rows for 132 SMs). The split-K reduction is
  deterministic and two-pass: each split writes fp32 partials ``[SPLIT_K, M, N]`` and a small
  kernel sums them in fixed order, adds the bias and casts. We chose that over ``atomic_add``
  because it needs no zero-fill launch, gives bit-identical results run to run (greedy
  speculative decoding compares draft and target tokens, so run-to-run noise is a real cost),
  and the partials are tiny (SPLIT_K * M * N * 4 bytes vs N * K / 2 weight bytes).
* ``"tiled"`` (16 < M < 1024: prefill chunks). Dequantizes a ``[BLOCK_N, BLOCK_K]`` weight tile
  to the activation dtype in registers (exact: every MXFP4 value has <= 2 significant bits)
  and feeds ``tl.dot``. It computes ``W @ x.T`` so the dequantized tile is the dot's A operand,
  which Hopper's wgmma may take from registers (B must come from shared memory).
* ``"dequant"`` (M >= 1024). At that size the GEMM is compute bound and cuBLAS beats a Triton
  mixed-input GEMM; dequantizing W once (writing 2 bytes per weight) costs a few percent of
  the GEMM. Reasoned crossover, not measured on a GPU in this repo's session: see
  benchmarks/README.md. Uses ``mxfp4_dequant_triton`` + ``torch.addmm``.

Nibble decode: moving a nibble's sign to bit 15 and its 3 exponent/mantissa bits to bits 11..9
gives an fp16 equal to the E2M1 value times 2^-14 (2 shifts, 2 masks, 1 or, one widening cast);
the 2^14 goes back in with the block scale. No lookup table, no inline asm (the interpreter has
none). The scale's fp32 is its byte shifted into the exponent field (``_e8m0_to_f32``).

Numerics (all paths): products are exact in fp32 (bf16/fp16 activation x MXFP4 value), sums are
fp32 in an order that differs from the twin's, the output is rounded once to x's dtype. The tiled
path rounds the dequantized tile to x's dtype before ``tl.dot``: exact for bf16 in the normal
range and for fp16 when 2^-24 <= |w| <= 65504, which holds for the weights of any model that runs
in fp16. The decode path never rounds weights (fp32 throughout).

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): Triton 3.9 reads the variable through
``triton.knobs.runtime.interpret`` when ``@triton.jit`` runs, i.e. when *this module is
imported*, not when triton is imported or a kernel launches. So set it before the first import
of ``vllm_specqd.kernels.mxfp4_triton`` (tests do this in a subprocess). In that mode the
launchers accept CPU tensors; each kernel then runs in numpy, where bf16 math is unreliable, so
kernels convert to fp32 right after loading and the tiled kernel dots in fp32.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .reference import check_mxfp4_matmul_inputs

# Read once, at import, because that is when triton decided between JIT and interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

GEMV_MAX_M = 16  # decode path up to here (decode + speculative verification batches)
DEQUANT_MIN_M = 1024  # dequantize + cuBLAS from here (reasoned, see module docstring)
PATHS = ("gemv", "tiled", "dequant")

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# ----------------------------------------------------------------------------- format helpers
@triton.jit
def _e2m1_times_2m14(nibble):
    """``nibble``: int32 tensor of E2M1 codes 0..15 -> fp32 tensor equal to ``value * 2**-14``."""
    # Sign to bit 15 and the 3 exponent/mantissa bits to bits 11..9 form an fp16 whose exponent
    # bias (15) exceeds E2M1's (1) by 14. E2M1's subnormal (0.5) lands on an fp16 subnormal,
    # which the widening cast keeps exactly -- the same trick on fp32 bits would give an fp32
    # subnormal that flush-to-zero hardware could drop. Callers multiply 2**14 back in.
    bits = ((nibble & 0x8) << 12) | ((nibble & 0x7) << 9)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e8m0_to_f32(scale_byte):
    """``scale_byte``: uint8 tensor -> fp32 ``2**(byte - 127)``, NaN for 255 (as ``e8m0_to_float``)."""
    e = scale_byte.to(tl.int32)
    # The exponent field is the byte itself, except byte 0 (2**-127 is an fp32 subnormal:
    # mantissa bit 22) and 255 (its bits would read as +inf, the format says NaN).
    bits = tl.where(e == 0, 0x00400000, e << 23)
    return tl.where(e == 255, float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _dequant_tile(
    wq_ptr,  # [N, K_pad/2] uint8
    ws_ptr,  # [N, K_pad/32] uint8
    offs_n,  # [BLOCK_N] row indices
    kb,  # [BLOCK_KB] 32-element block indices
    N,
    KB,
    stride_wn,
    stride_sn,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    """Return the fp32 weights ``W[offs_n, 32*kb[0] : 32*(kb[-1]+1)]`` as ``[BLOCK_N, BLOCK_KB*32]``."""
    row_mask = offs_n < N
    kb_mask = kb < KB
    offs_byte = tl.arange(0, 16)
    w_bytes = tl.load(
        wq_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn + kb[None, :, None] * 16 + offs_byte[None, None, :],
        mask=row_mask[:, None, None] & kb_mask[None, :, None],
        other=0,
    ).to(tl.int32)  # [BLOCK_N, BLOCK_KB, 16]
    # Masked blocks read scale 127 (1.0): their weights are 0 and 0 * 1.0 stays 0, never NaN.
    scale = _e8m0_to_f32(
        tl.load(
            ws_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + kb[None, :],
            mask=row_mask[:, None] & kb_mask[None, :],
            other=127,
        )
    )  # [BLOCK_N, BLOCK_KB]
    # Low nibble = even element: join puts it first, the reshape interleaves (contract order).
    w = tl.join(_e2m1_times_2m14(w_bytes & 0xF), _e2m1_times_2m14(w_bytes >> 4))  # [BN, BKB, 16, 2]
    w = tl.reshape(w, [BLOCK_N, BLOCK_KB, 32]) * 16384.0  # exact; separate from *scale so no overflow
    return tl.reshape(w * scale[:, :, None], [BLOCK_N, BLOCK_KB * 32])


# ----------------------------------------------------------------------------- dequant kernel
@triton.jit
def _mxfp4_dequant_kernel(
    wq_ptr,  # [N, K_pad/2] uint8
    ws_ptr,  # [N, K_pad/32] uint8
    out_ptr,  # [N, K_out] out dtype
    N,
    K_out,
    KB,
    stride_wn,
    stride_sn,
    stride_on,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kb = tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)
    w = _dequant_tile(wq_ptr, ws_ptr, offs_n, kb, N, KB, stride_wn, stride_sn, BLOCK_N, BLOCK_KB)
    offs_k = tl.program_id(1) * BLOCK_KB * 32 + tl.arange(0, BLOCK_KB * 32)
    tl.store(
        out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_k[None, :],
        w.to(out_ptr.dtype.element_ty),
        mask=(offs_n < N)[:, None] & (offs_k < K_out)[None, :],
    )


# ----------------------------------------------------------------------------- gemv (M <= 16)
@triton.jit
def _mxfp4_gemv_kernel(
    x_ptr,  # [M, K] activations, unit stride along K
    wq_ptr,  # [N, K_pad/2] uint8
    ws_ptr,  # [N, K_pad/32] uint8
    bias_ptr,  # [N] (read only if HAS_BIAS)
    out_ptr,  # [M, N] x dtype (written when not WRITE_PARTIAL)
    part_ptr,  # [SPLIT_K, M, N] fp32 (written when WRITE_PARTIAL)
    M,
    N,
    K,
    KB,  # K_pad / 32
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,  # 32-element blocks per loop step
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Split s owns blocks [KB*s/S, KB*(s+1)/S): sizes differ by at most one block, so no split
    # idles; one with no blocks (S > KB) still writes its zeros, as the reduction reads them all.
    split_k = tl.num_programs(1)
    kb_begin = (pid_k * KB) // split_k
    kb_end = ((pid_k + 1) * KB) // split_k

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_byte = tl.arange(0, 16)
    offs_elem = tl.arange(0, 32)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_row = wq_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn  # [BN, 1, 1]
    s_row = ws_ptr + offs_n.to(tl.int64)[:, None] * stride_sn  # [BN, 1]

    # Per-block partials stay apart until the end: within a step every reduction is then over
    # the 16 bytes one thread loaded (no cross-thread shuffles in the loop).
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_KB], dtype=tl.float32)
    for kb_start in range(kb_begin, kb_end, BLOCK_KB):
        kb = kb_start + tl.arange(0, BLOCK_KB)  # [BKB]
        kb_mask = kb < kb_end
        w_bytes = tl.load(
            w_row + kb[None, :, None] * 16 + offs_byte[None, None, :],
            mask=n_mask[:, None, None] & kb_mask[None, :, None],
            other=0,
        ).to(tl.int32)  # [BN, BKB, 16]
        w_even = _e2m1_times_2m14(w_bytes & 0xF)[None, :, :, :]  # [1, BN, BKB, 16]
        w_odd = _e2m1_times_2m14(w_bytes >> 4)[None, :, :, :]
        offs_k = kb[:, None] * 32 + offs_elem[None, :]  # [BKB, 32]
        x = tl.load(
            x_ptr + offs_m[:, None, None] * stride_xm + offs_k[None, :, :],
            mask=m_mask[:, None, None] & (offs_k < K)[None, :, :] & kb_mask[None, :, None],
            other=0.0,
        ).to(tl.float32)  # [BM, BKB, 32]; K..K_pad-1 read as 0 (x is only K wide)
        x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_KB, 16, 2]))  # [BM, BKB, 16] each
        block_sums = tl.sum(x_even[:, None, :, :] * w_even + x_odd[:, None, :, :] * w_odd, axis=3)  # [BM, BN, BKB]
        scale = _e8m0_to_f32(tl.load(s_row + kb[None, :], mask=n_mask[:, None] & kb_mask[None, :], other=127))
        # Scaling whole blocks costs 2 multiplies per 32 weights instead of 1 per weight.
        acc += (block_sums * 16384.0) * scale[None, :, :]
    acc = tl.sum(acc, axis=2)  # [BM, BN]

    mn_mask = m_mask[:, None] & n_mask[None, :]
    if WRITE_PARTIAL:
        part = part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(part, acc, mask=mn_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mn_mask)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr,  # [SPLIT_K, M, N] fp32
    bias_ptr,  # [N]
    out_ptr,  # [M, N] x dtype
    M,
    N,
    SPLIT_K,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):  # fixed order: deterministic
        acc += tl.load(part_ptr + (s * M + pid_m).to(tl.int64) * N + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


# ----------------------------------------------------------------------------- tiled (M > 16)
@triton.jit
def _mxfp4_tiled_kernel(
    x_ptr,  # [M, K] activations, unit stride along K
    wq_ptr,  # [N, K_pad/2] uint8
    ws_ptr,  # [N, K_pad/32] uint8
    bias_ptr,  # [N] (read only if HAS_BIAS)
    out_ptr,  # [M, N] x dtype
    M,
    N,
    K,
    KB,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    M_BUCKET,  # next_power_of_2(M): autotune key only, so every prefill length is not re-tuned
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # x's dtype on GPU; fp32 in the interpreter
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Consecutive programs walk GROUP_N weight tiles for one activation band, so both stay in L2.
    pid_n, pid_m = tl.swizzle2d(pid // grid_m, pid % grid_m, grid_n, grid_m, GROUP_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y.T tile: W @ x.T
    for step in range(tl.cdiv(KB, BLOCK_KB)):
        kb = step * BLOCK_KB + tl.arange(0, BLOCK_KB)
        w = _dequant_tile(wq_ptr, ws_ptr, offs_n, kb, N, KB, stride_wn, stride_sn, BLOCK_N, BLOCK_KB)
        offs_k = step * BLOCK_KB * 32 + tl.arange(0, BLOCK_KB * 32)
        x_t = tl.load(
            x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
            mask=(offs_k < K)[:, None] & m_mask[None, :],
            other=0.0,
        )  # [BK, BM]
        if DOT_DTYPE == tl.float32:
            acc = tl.dot(w, x_t.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(DOT_DTYPE), x_t.to(DOT_DTYPE), acc)

    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


# ----------------------------------------------------------------------------- configs
# Only the interpreter-safe single configs are used without a GPU: @triton.autotune with more
# than one config benchmarks with do_bench, which needs CUDA. The GPU lists are starting points
# for H100 (not tuned on hardware in this repo yet; see benchmarks/README.md).
_GEMV_INTERP = dict(BLOCK_KB=2)
_TILED_INTERP = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_KB=2, GROUP_N=4)


def _gemv_gpu_configs():
    return [
        triton.Config({"BLOCK_KB": kb}, num_warps=w, num_stages=s) for kb in (4, 8, 16) for w in (4, 8) for s in (2, 4)
    ]


def _tiled_gpu_configs():
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_KB, warps, stages
        (32, 64, 4, 4, 4),
        (32, 128, 4, 4, 4),
        (64, 128, 2, 4, 4),
        (64, 128, 4, 8, 3),
        (128, 128, 2, 8, 3),
        (128, 256, 2, 8, 3),
        (64, 256, 2, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KB": bkb, "GROUP_N": 8}, num_warps=w, num_stages=s)
        for bm, bn, bkb, w, s in shapes
    ]


def _prune_tiled(configs, named_args, **kwargs):
    # A 128-row tile for a 32-row prefill chunk only multiplies padding.
    m_bucket = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, m_bucket)]
    return kept or configs[:1]


if INTERPRET:
    _gemv_launch = _mxfp4_gemv_kernel
    _tiled_launch = _mxfp4_tiled_kernel
else:
    _gemv_launch = triton.autotune(_gemv_gpu_configs(), key=["N", "KB", "BLOCK_M", "BLOCK_N", "WRITE_PARTIAL"])(
        _mxfp4_gemv_kernel
    )
    _tiled_launch = triton.autotune(
        _tiled_gpu_configs(),
        key=["M_BUCKET", "N", "KB", "DOT_DTYPE"],
        prune_configs_by={"early_config_prune": _prune_tiled},
    )(_mxfp4_tiled_kernel)


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if device_index is None:  # interpreter on CPU: small, so tests exercise the split heuristic
        return 2
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_block_n(m: int) -> int:
    """Rows per program for the decode kernel (BLOCK_M = next_power_of_2(m) activations)."""
    if INTERPRET:
        return 32
    # The [BLOCK_M, BLOCK_N, BLOCK_KB, 16] product tile lives in registers: fewer rows per
    # program as more activation rows share each decoded weight.
    return 64 if m <= 2 else (32 if m <= 4 else 16)


def gemv_split_k(n: int, kb: int, block_n: int, num_sms: int) -> int:
    """Splits of K so that tiles * splits >= 4 programs per SM, each split >= 8 blocks (256 K).

    E.g. H100 (132 SMs), down 14336->4096 at BLOCK_N 64: 64 tiles -> 9 splits of ~50 blocks;
    gate_up 4096->28672: 448 tiles -> 2 splits. Fewer than 4 programs per SM leaves too few
    bytes in flight to cover HBM latency; the cap of 32 bounds the partial-sum traffic.
    """
    tiles = triton.cdiv(n, block_n)
    want = triton.cdiv(4 * num_sms, tiles)
    return max(1, min(want, kb // 8, 32))


def _check_device(x: torch.Tensor, who: str) -> None:
    if not INTERPRET and not x.is_cuda:
        raise ValueError(
            f"{who}: Triton kernels need CUDA tensors, got x on {x.device}; use mxfp4_matmul (which "
            "falls back to the torch twin) or set TRITON_INTERPRET=1 before importing this module"
        )


# ----------------------------------------------------------------------------- launchers
def mxfp4_dequant_triton(
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    k: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [N, k] dtype
    """Triton twin of ``dequantize_mxfp4`` for 2-D weights; bit-exact in fp32.

    Example: packed ``[96, 32]`` and scales ``[96, 2]`` with ``k=40`` give ``[96, 40]`` fp32.
    Lower-precision ``dtype`` is exact whenever the value is representable (always for bf16
    inside the normal range).
    """
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8 or packed.dim() != 2 or scales.dim() != 2:
        raise ValueError(
            f"mxfp4_dequant_triton: need 2-D uint8 packed/scales, got {packed.dtype} "
            f"{list(packed.shape)} and {scales.dtype} {list(scales.shape)}"
        )
    n, k_pad = packed.shape[0], packed.shape[1] * 2
    if tuple(scales.shape) != (n, k_pad // 32) or k_pad % 32:
        raise ValueError(
            f"mxfp4_dequant_triton: packed {list(packed.shape)} and scales {list(scales.shape)} "
            "are not [N, K_pad/2] and [N, K_pad/32]"
        )
    if not (packed.is_contiguous() and scales.is_contiguous()):
        raise ValueError("mxfp4_dequant_triton: packed and scales must be contiguous")
    k = k_pad if k is None else k
    if -(-k // 32) * 32 != k_pad:
        raise ValueError(f"mxfp4_dequant_triton: k={k} does not pad to K_pad={k_pad}")
    _check_device(packed, "mxfp4_dequant_triton")
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    if out.numel() == 0:
        return out
    block_n, block_kb = (16, 2) if INTERPRET else (32, 8)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k_pad // 32, block_kb))
    _mxfp4_dequant_kernel[grid](
        packed,
        scales,
        out,
        n,
        k,
        k_pad // 32,
        packed.stride(0),
        scales.stride(0),
        out.stride(0),
        BLOCK_N=block_n,
        BLOCK_KB=block_kb,
    )
    return out


def mxfp4_matmul_triton(
    x: torch.Tensor,  # [..., K] bf16/fp16/fp32
    packed: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/32] uint8
    bias: torch.Tensor | None = None,  # [N]
    force_path: str | None = None,
    split_k: int | None = None,
) -> torch.Tensor:  # [..., N] x.dtype
    """Triton ``x @ W.T + bias``; same contract as ``mxfp4_matmul_torch``, CUDA (or interpreter) only.

    ``force_path`` in ``("gemv", "tiled", "dequant")`` overrides the M-based choice; ``split_k``
    overrides the decode kernel's split heuristic (1 = no split, fused epilogue).
    Example: x ``[4, 4096]`` bf16, packed ``[14336, 2048]``, scales ``[14336, 128]`` -> ``[4, 14336]``
    bf16 through the gemv path: BLOCK_M 4, BLOCK_N 32, so on an H100 (132 SMs) 448 row tiles x 2
    K-splits (``gemv_split_k``), then the split reduction.
    """
    x2d, n, k = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_matmul_triton")
    m = x2d.shape[0]
    if force_path is not None and force_path not in PATHS:
        raise ValueError(f"mxfp4_matmul_triton: force_path must be one of {PATHS} or None, got {force_path!r}")
    path = force_path or ("gemv" if m <= GEMV_MAX_M else "tiled" if m < DEQUANT_MIN_M else "dequant")
    if path == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"mxfp4_matmul_triton: the gemv path takes M <= {GEMV_MAX_M} rows, got M={m}")
    if split_k is not None and (path != "gemv" or int(split_k) < 1):
        raise ValueError(f"mxfp4_matmul_triton: split_k={split_k!r} needs split_k >= 1 and the gemv path")
    _check_device(x, "mxfp4_matmul_triton")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    kb = packed.shape[1] // 16
    dev = x.device.index if x.is_cuda else None
    if x.is_cuda:
        # Launch on x's GPU, not the current one.
        with torch.cuda.device(x.device):
            _run(path, x2d, packed, scales, bias, out, m, n, k, kb, split_k, dev)
    else:
        _run(path, x2d, packed, scales, bias, out, m, n, k, kb, split_k, dev)
    return out.reshape(*x.shape[:-1], n)


def _run(path, x2d, packed, scales, bias, out, m, n, k, kb, split_k, dev):
    has_bias = bias is not None
    bias_arg = bias if has_bias else out  # never read when HAS_BIAS is False
    if path == "dequant":
        w = mxfp4_dequant_triton(packed, scales, k=k, dtype=x2d.dtype)  # [N, K]
        if has_bias:
            torch.addmm(bias.to(x2d.dtype), x2d, w.t(), out=out)
        else:
            torch.mm(x2d, w.t(), out=out)
        return
    if path == "tiled":
        dot_dtype = tl.float32 if INTERPRET else _TL_DTYPE[x2d.dtype]
        meta = dict(_TILED_INTERP) if INTERPRET else {}

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _tiled_launch[grid](
            x2d,
            packed,
            scales,
            bias_arg,
            out,
            m,
            n,
            k,
            kb,
            x2d.stride(0),
            packed.stride(0),
            scales.stride(0),
            out.stride(0),
            triton.next_power_of_2(m),
            HAS_BIAS=has_bias,
            DOT_DTYPE=dot_dtype,
            **meta,
        )
        return
    block_m = triton.next_power_of_2(m)
    block_n = gemv_block_n(m)
    splits = int(split_k) if split_k is not None else gemv_split_k(n, kb, block_n, _num_sms(dev))
    write_partial = splits > 1
    part = torch.empty(splits, m, n, dtype=torch.float32, device=out.device) if write_partial else out
    meta = dict(_GEMV_INTERP) if INTERPRET else {}
    _gemv_launch[(triton.cdiv(n, block_n), splits)](
        x2d,
        packed,
        scales,
        bias_arg,
        out,
        part,
        m,
        n,
        k,
        kb,
        x2d.stride(0),
        packed.stride(0),
        scales.stride(0),
        out.stride(0),
        HAS_BIAS=has_bias,
        WRITE_PARTIAL=write_partial,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **meta,
    )
    if write_partial:
        block = 128 if INTERPRET else 1024
        _splitk_reduce_kernel[(m, triton.cdiv(n, block))](
            part,
            bias_arg,
            out,
            m,
            n,
            splits,
            out.stride(0),
            HAS_BIAS=has_bias,
            BLOCK_N=block,
        )
