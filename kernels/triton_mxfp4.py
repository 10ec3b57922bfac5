"""Triton kernels for the MXFP4 weight-only GEMM ``y = x @ W.T + bias`` (W: docs/CONTRACTS.md layout).

Two paths, picked by the number of activation rows M (``force_path`` overrides):

* ``"gemv"`` (M <= 16: decode and speculative verification; the name stays from the first kernel).
  Memory bound: the ~N*K/2 code bytes are the whole cost, so each program owns BLOCK_N output
  features and one K-split, streams its rows with 16-byte loads (one 32-element block = 16
  contiguous bytes = 4 int32 words), decodes them to exact bf16/fp16 weights in registers
  (below) and feeds the tensor cores: ``tl.dot(x_tile [16, BK], W_tile.T)`` with x padded to 16
  rows. Each weight is decoded once whatever M is, so the cost is flat in M up to 16 (the first
  kernel re-decoded per row on the CUDA cores and grew linearly: 0.08x-0.8x of bf16 on the H200).
  Split-K over program axis 1 only when the row tiles give fewer than 2 programs per SM
  (``gemv_split_k``). The split-K reduction is deterministic and two-pass: each split writes fp32
  partials ``[SPLIT_K, M, N]`` and a small kernel sums them in fixed order, adds the bias and
  casts. We chose that over ``atomic_add`` because it needs no zero-fill launch, gives
  bit-identical results run to run (greedy speculative decoding compares draft and target
  tokens, so run-to-run noise is a real cost), and the partials are tiny.
* ``"dequant"`` (M > 16, prefill). ``mxfp4_dequant_triton`` writes W in x's dtype, then
  ``torch.addmm`` (cuBLAS). Measured on the H200: reaching bf16 speed from M = 1024.

Decode (``_e2m1_lanes``): a little-endian int32 word holds codes 0..7 of 8 consecutive elements
(element 2i in the low nibble of byte i). Codes i and i+4 are 16 bits apart, so one shift and one
mask move both magnitudes (3 exponent/mantissa bits) under a 16-bit lane's exponent LSB, and one
more shift and mask both signs to bits 15 and 31: 4 shifts + 8 mask/or ops give 8 lanes, about 2
integer ops per weight. As bf16 (bits 8..6) a lane is the E2M1 value times 2^-126; as fp16 (bits
11..9) times 2^-14; E2M1's subnormal 0.5 lands on the target's subnormal, exactly. Weights then
take two power-of-two multiplies: by 2^126 (or 2^14) and by the block scale 2^(e-127). For bf16
x both run in bf16, exact for every E8M0 byte (bf16 has fp32's exponent range); for fp16 and fp32
x in fp32, then cast to x's dtype. No lookup table, no inline asm (the interpreter has none).
E8M0 255 (NaN) is tracked as the largest scale byte seen per column and turns the column NaN,
as in the twin.

Numerics (all paths): products are exact in fp32 (bf16/fp16 activation x MXFP4 value), sums are
fp32 in an order that differs from the twin's (the tensor cores' fp32 accumulation included), the
output is rounded once to x's dtype. Weights are exact in bf16 always; in fp16 when representable
(2^-24 <= |w| <= 65504 on the fp16 grid), which holds for the weights of any model that runs in
fp16. fp32 x: the decode kernel dots in fp32 (``input_precision="ieee"``: exact products, no TF32).

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): Triton 3.9 reads the variable through
``triton.knobs.runtime.interpret`` when ``@triton.jit`` runs, i.e. when *this module is
imported*, not when triton is imported or a kernel launches. So set it before the first import
of ``vllm_specqd.kernels.triton_mxfp4`` (tests do this in a subprocess). In that mode the
launchers accept CPU tensors; each kernel then runs in numpy, where bf16 math is unreliable, so
kernels convert to fp32 right after loading or decoding and dot in fp32. The decode kernel builds
the same lanes there (bf16 lanes for bf16/fp32 x, fp16 for fp16) and scales them in fp32; only the
GPU's two bf16 multiplies and its MMA are left to the CUDA tests.
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

GEMV_MAX_M = 16  # decode path up to here (decode + speculative verification batches); dequant above
PATHS = ("gemv", "dequant")

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


# ----------------------------------------------------------------------------- decode (M <= 16)
@triton.jit
def _shl(x, S: tl.constexpr):
    """``x << S`` for S >= 0, ``x >> -S`` otherwise (x unsigned: logical shifts)."""
    if S >= 0:
        return x << S
    else:
        return x >> (-S)


@triton.jit
def _e2m1_lanes(words, LANE_SHIFT: tl.constexpr):
    """uint32 ``[R, W]`` words of 8 E2M1 codes -> uint16 ``[R, W, 8]`` float bit patterns, pair order.

    Code i of a word (bits 4i..4i+3; element i, contract order) becomes a 16-bit float with the
    code's sign at bit 15 and its 3 exponent/mantissa bits at ``LANE_SHIFT + 2 .. LANE_SHIFT``, the
    bits just below the target's exponent LSB: LANE_SHIFT 6 gives a bf16 equal to the E2M1 value
    times 2^-126, LANE_SHIFT 9 an fp16 equal to it times 2^-14 (E2M1's subnormal 0.5 lands on the
    target's subnormal, exactly). Codes i and i+4 sit 16 bits apart in the word and in a 32-bit pair
    of lanes, so one shift and two masks place two codes at once: 7 shifts and 8 mask/or per word.
    Output position 2i + h holds code i + 4h (``WORD_ORDER``): each 32-bit pair stays one register,
    which is what the MMA operand wants; the caller reads x in the same order.
    """
    MAG: tl.constexpr = (0x7 << LANE_SHIFT) | (0x7 << (LANE_SHIFT + 16))
    SGN: tl.constexpr = 0x80008000
    # Lanes (code i, code i + 4) for i = 0..3: magnitude shifted by LANE_SHIFT - 4i, sign by 12 - 4i.
    p0 = (_shl(words, LANE_SHIFT) & MAG) | ((words << 12) & SGN)
    p1 = (_shl(words, LANE_SHIFT - 4) & MAG) | ((words << 8) & SGN)
    p2 = (_shl(words, LANE_SHIFT - 8) & MAG) | ((words << 4) & SGN)
    p3 = (_shl(words, LANE_SHIFT - 12) & MAG) | (words & SGN)
    lo = tl.join(tl.join(p0, p2), tl.join(p1, p3))  # [R, W, 2, 2]: [j, g] -> pair 2j + g
    lanes = tl.join((lo & 0xFFFF).to(tl.uint16), (lo >> 16).to(tl.uint16))  # [R, W, 2, 2, 2]
    return tl.reshape(lanes, [words.shape[0], words.shape[1], 8])


@triton.jit
def _decode_words_tile(
    words,  # [BLOCK_N, BLOCK_KB * 4] int32: 4 words (32 codes) per 32-element block
    scale_bytes,  # [BLOCK_N, BLOCK_KB] uint8 E8M0
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    LANE_SHIFT: tl.constexpr,  # 6: bf16 lanes, 9: fp16 lanes (see _e2m1_lanes)
    BF16_MATH: tl.constexpr,  # scale in bf16 (GPU, bf16 dot); else in fp32, then cast to DOT_DTYPE
    DOT_DTYPE: tl.constexpr,
):
    """Exact weights ``[BLOCK_N, BLOCK_KB * 32]`` in DOT_DTYPE, K in ``WORD_ORDER`` within each word.

    E8M0 255 (NaN) decodes to inf/NaN weights; the kernel turns such columns NaN (``scale_max``).
    """
    lanes = _e2m1_lanes(words.to(tl.uint32, bitcast=True), LANE_SHIFT)  # [BN, BKB*4, 8]
    lanes = tl.reshape(lanes, [BLOCK_N, BLOCK_KB, 32])
    if BF16_MATH:
        # E8M0 -> bf16 2^(e-127): the byte is bf16's exponent field (bf16 has fp32's exponent range),
        # and max(e << 7, 0x40) turns byte 0 into the subnormal 2^-127 (mantissa bit 6) in one op;
        # 255 reads as inf (the caller turns its column NaN). lane * 2^126 is the exact E2M1 value,
        # times 2^(e-127) the exact weight: two power-of-two bf16 multiplies (packed 2-wide).
        bits = tl.maximum(scale_bytes.to(tl.uint16) << 7, 0x40).to(tl.uint16)
        scale = bits.to(tl.bfloat16, bitcast=True)
        two126 = tl.full([1, 1, 1], 2.0**126, tl.bfloat16)
        w = (lanes.to(tl.bfloat16, bitcast=True) * two126) * scale[:, :, None]
    else:
        if LANE_SHIFT == 9:  # fp16 lane: its subnormal (code 0.5) widens to a normal fp32, exactly
            v = lanes.to(tl.float16, bitcast=True).to(tl.float32) * 16384.0
        else:  # bf16 lane (interpreter only): widened by a shift, as the interpreter's bf16 cast drops subnormals
            v = (lanes.to(tl.uint32) << 16).to(tl.float32, bitcast=True) * 2.0**126
        w = (v * _e8m0_to_f32(scale_bytes)[:, :, None]).to(DOT_DTYPE)
    return tl.reshape(w, [BLOCK_N, BLOCK_KB * 32])


@triton.jit
def _mxfp4_gemv_kernel(
    x_ptr,  # [M, K] activations, unit stride along K
    wq_ptr,  # [N, K_pad/8] int32: the packed bytes viewed as little-endian words
    ws_ptr,  # [N, K_pad/32] uint8
    bias_ptr,  # [N] (read only if HAS_BIAS)
    out_ptr,  # [M, N] x dtype (written when not WRITE_PARTIAL)
    part_ptr,  # [SPLIT_K, M, N] fp32 (written when WRITE_PARTIAL)
    M,
    N,
    K,
    KB,  # K_pad / 32
    stride_xm,
    stride_wn,  # in words
    stride_sn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    LANE_SHIFT: tl.constexpr,
    BF16_MATH: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # x's dtype on GPU; fp32 in the interpreter
    BLOCK_M: tl.constexpr,  # next_power_of_2(M): the MMA pads it, x is read only for real rows
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
    k_end = tl.minimum(kb_end * 32, K)  # x is only K wide; never read another split's columns

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_word = tl.arange(0, BLOCK_KB * 4)
    offs_blk = tl.arange(0, BLOCK_KB)
    offs_k = tl.arange(0, BLOCK_KB * 32)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_row = wq_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    s_row = ws_ptr + offs_n.to(tl.int64)[:, None] * stride_sn  # [BN, 1]
    x_row = x_ptr + offs_m[:, None] * stride_xm  # [BM, 1]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    scale_max = tl.zeros([BLOCK_N, BLOCK_KB], dtype=tl.uint8)  # 255 anywhere -> NaN column
    for kb_start in range(kb_begin, kb_end, BLOCK_KB):
        word = kb_start * 4 + offs_word
        words = tl.load(
            w_row + word[None, :], mask=n_mask[:, None] & (word < kb_end * 4)[None, :], other=0
        )  # [BN, BKB*4]: 16 contiguous bytes per block and row
        kb = kb_start + offs_blk
        # Masked blocks read scale 127 (1.0): their codes are 0 and 0 * 1.0 stays 0, never NaN.
        scale_bytes = tl.load(s_row + kb[None, :], mask=n_mask[:, None] & (kb < kb_end)[None, :], other=127)
        k = kb_start * 32 + offs_k
        x = tl.load(x_row + k[None, :], mask=m_mask[:, None] & (k < k_end)[None, :], other=0.0)  # [BM, BK]
        # The weights come in WORD_ORDER (position 2i + h of a word = element i + 4h): x likewise.
        x = tl.permute(tl.reshape(x, [BLOCK_M, BLOCK_KB * 4, 2, 4]), (0, 1, 3, 2))
        x = tl.reshape(x, [BLOCK_M, BLOCK_KB * 32])
        w = _decode_words_tile(words, scale_bytes, BLOCK_N, BLOCK_KB, LANE_SHIFT, BF16_MATH, DOT_DTYPE)
        if DOT_DTYPE == tl.float32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w), acc)
        scale_max = tl.maximum(scale_max, scale_bytes)
    # E8M0 255 is NaN: the twin's whole column is NaN (NaN * 0 included), whatever x is.
    nan_col = tl.max(scale_max, axis=1) == 255
    acc = tl.where(nan_col[None, :], float("nan"), acc)

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


# ----------------------------------------------------------------------------- configs
# Only the interpreter-safe single configs are used without a GPU: @triton.autotune with more
# than one config benchmarks with do_bench, which needs CUDA.
_GEMV_INTERP = dict(BLOCK_KB=2)


def _gemv_gpu_configs():
    """Three candidates per warp count, reasoned for H100/H200 (132 SMs); the tuner keeps the fastest.

    One warp per 32 output features (``gemv_block_n`` / 32, see ``_prune_gemv``): each warp's MMA
    tile then spans 4 n8 tiles, so the activation fragment it reads (and reorders, WORD_ORDER) serves
    32 weight rows; compiled for sm_90 that is ~4.9 instructions per weight in the loop against ~5.5
    at 16 features per warp, and 110-140 registers without spills. A step loads BLOCK_N * BLOCK_KB *
    16 bytes of codes; with num_stages - 1 steps in flight and the many small programs per SM this
    leaves 40-60 KB of weights in flight per SM, more than HBM3e needs (4.8 TB/s x ~1 us / 132 SMs).
    """
    per_warps = {1: ((4, 3), (4, 4), (8, 3)), 2: ((4, 3), (4, 4), (8, 3)), 4: ((4, 3), (4, 4), (2, 4))}
    return [
        triton.Config({"BLOCK_KB": kb}, num_warps=w, num_stages=s) for w, cfgs in per_warps.items() for kb, s in cfgs
    ]


def _prune_gemv(configs, named_args, **kwargs):
    """Keep the configs with one warp per 32 output features (BLOCK_N is chosen by the launcher)."""
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    kept = [c for c in configs if block_n is None or c.num_warps == max(1, block_n // 32)]
    return kept or configs[:1]


if INTERPRET:
    _gemv_launch = _mxfp4_gemv_kernel
else:
    # The autotuner adds every tensor argument's dtype to the key (x: bf16/fp16/fp32).
    _gemv_launch = triton.autotune(
        _gemv_gpu_configs(),
        key=["N", "KB", "BLOCK_M", "BLOCK_N", "WRITE_PARTIAL"],
        prune_configs_by={"early_config_prune": _prune_gemv},
    )(_mxfp4_gemv_kernel)


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if device_index is None:  # interpreter on CPU: small, so tests exercise the split heuristic
        return 2
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_block_n(m: int) -> int:
    """Output features per program of the decode kernel: 32 per 4 activation rows, 32..128.

    Every program reads its M rows of x for the whole K range from L2, (N / BLOCK_N) * M * K * 2
    bytes in all against N * K / 2 of codes: 32 features per 4 rows keeps that at <= 1/2 of the weight
    bytes, and small M gets small programs (even load per SM, fewer K-splits). One warp per 32.
    """
    if INTERPRET:
        return 32
    return 32 if m <= 4 else 64 if m <= 8 else 128


def gemv_split_k(n: int, kb: int, block_n: int, num_sms: int) -> int:
    """K-splits so that tiles * splits >= 2 programs per SM, spread evenly; each split >= 8 blocks.

    Splitting costs a second launch (the fixed-order reduction), so none when the row tiles alone
    give 2 programs per SM (8B gate_up at BLOCK_N 32: 896 tiles). Otherwise the split count with
    the most even load per SM, counted as programs / (SMs * ceil(programs / SMs)), smallest first
    among those within 10% of the best. E.g. 132 SMs, down 14336->4096 at BLOCK_N 32: 128 tiles ->
    3 splits (384 programs, 2.9 per SM); o 4096->4096 at BLOCK_N 64: 64 tiles -> 6 splits.
    """
    tiles = triton.cdiv(n, block_n)
    most = max(1, min(kb // 8, 32))
    if tiles >= 2 * num_sms or most == 1:
        return 1

    def evenness(s: int) -> float:
        programs = tiles * s
        return programs / (num_sms * triton.cdiv(programs, num_sms))

    candidates = [s for s in range(1, most + 1) if tiles * s >= 2 * num_sms] or [most]
    best = max(evenness(s) for s in candidates)
    return min(s for s in candidates if evenness(s) >= 0.9 * best)


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

    ``force_path`` in ``("gemv", "dequant")`` overrides the M-based choice (``gemv`` up to 16 rows,
    ``dequant`` above); ``split_k`` overrides the decode kernel's split heuristic (1 = no split,
    fused epilogue).
    Example: x ``[4, 14336]`` bf16, packed ``[4096, 7168]``, scales ``[4096, 448]`` -> ``[4, 4096]``
    bf16 through the gemv path: BLOCK_N 32, so on an H200 (132 SMs) 128 row tiles x 3 K-splits
    (``gemv_split_k``), then the split reduction.
    """
    x2d, n, k = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_matmul_triton")
    m = x2d.shape[0]
    if force_path is not None and force_path not in PATHS:
        raise ValueError(f"mxfp4_matmul_triton: force_path must be one of {PATHS} or None, got {force_path!r}")
    path = force_path or ("gemv" if m <= GEMV_MAX_M else "dequant")
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


def _as_words(packed: torch.Tensor) -> torch.Tensor:
    """``packed`` [N, K_pad/2] uint8 as int32 [N, K_pad/8] (no copy): 4 codes-bytes per load lane.

    K_pad/2 is a multiple of 16, so rows stay whole words; a view whose storage offset is not a
    multiple of 4 bytes cannot be reinterpreted and is copied (rare: slices of a larger buffer).
    """
    try:
        return packed.view(torch.int32)
    except RuntimeError:
        return packed.clone().view(torch.int32)


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
    block_n = gemv_block_n(m)
    splits = int(split_k) if split_k is not None else gemv_split_k(n, kb, block_n, _num_sms(dev))
    write_partial = splits > 1
    part = torch.empty(splits, m, n, dtype=torch.float32, device=out.device) if write_partial else out
    meta = dict(_GEMV_INTERP) if INTERPRET else {}
    dtype = x2d.dtype
    _gemv_launch[(triton.cdiv(n, block_n), splits)](
        x2d,
        _as_words(packed),
        scales,
        bias_arg,
        out,
        part,
        m,
        n,
        k,
        kb,
        x2d.stride(0),
        packed.stride(0) // 4,
        scales.stride(0),
        out.stride(0),
        HAS_BIAS=has_bias,
        WRITE_PARTIAL=write_partial,
        LANE_SHIFT=6 if dtype == torch.bfloat16 else 9,  # fp16 lanes for fp16/fp32 x: no fp32 subnormals
        BF16_MATH=dtype == torch.bfloat16 and not INTERPRET,
        DOT_DTYPE=tl.float32 if INTERPRET else _TL_DTYPE[dtype],
        BLOCK_M=triton.next_power_of_2(m),
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
