"""The native x86 MXFP4 kernels (``kernels/cpu/``), JIT-built into the user cache and bound as torch ops.

``bf16_linear_cpu(x, weight, bias)`` is the library's second GEMM: plain bf16 weights, few rows,
for the target's verification pass on CPUs where vLLM's oneDNN declines bf16 (``bf16_gemm.h``).

``mxfp4_linear_amx_cpu(x, packed, scales, bias)`` is the same product on AMX tiles with bf16
activations (``amx_bf16.h``), for CPUs with AMX-BF16: its cost barely grows with the rows.

``mxfp4_linear_cpu(x, packed, scales, bias, act_bits)`` computes ``x @ W.T + bias`` on canonical MXFP4
bytes with activations quantized per 32-element block to int8 (``act_bits=8``, W4A8) or int16
(``act_bits=16``, W4A16); its torch twin is ``reference.mxfp4_matmul_int_act_torch``. The ISA
(AVX-512 VNNI, AVX-512 BW, AVX2) is chosen at run time; ``VLLM_SPECQD_CPU_ISA=avx2`` forces AVX2.

The library compiles on first use (about a minute, once per source version) into
``$VLLM_SPECQD_CACHE/kernels`` (default ``~/.cache/vllm_specqd/kernels``); ``python -m vllm_specqd
build-kernels`` does it ahead of time. Without a compiler, one warning names what is missing and
callers fall back to the torch twin.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from .reference import check_mxfp4_matmul_inputs

SOURCE_DIR = Path(__file__).parent / "cpu"
SOURCES = (
    "mxfp4_cpu.cpp",
    "gemm_body.h",
    "vec_avx2.h",
    "vec_avx512.h",
    "quantize.h",
    "bf16_gemm.h",
    "amx_bf16.h",
    "multirow.h",
    "multirow_layout.h",
)
ISA_ENV = "VLLM_SPECQD_CPU_ISA"
CACHE_ENV = "VLLM_SPECQD_CACHE"
# Extra compiler flags, for tuning the kernels' compile-time constants (e.g. "-DSPECQD_MR_ROWS=8").
CFLAGS_ENV = "VLLM_SPECQD_KERNEL_CFLAGS"
ACT_BITS = (8, 16)

logger = logging.getLogger("vllm.vllm_specqd.kernels")


class NativeKernelUnavailable(RuntimeError):
    """The native CPU kernel could not be built or loaded; the message says why."""


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vllm_specqd")
    return Path(root) / "kernels"


def _source_hash(extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def _missing_tools() -> list[str]:
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ('{cxx}' is not on PATH; install g++ or set CXX)")
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            missing.append("ninja (pip install ninja)")
    return missing


def _build(emulate_avx512: bool) -> str:
    """Compile and load the library; return its op namespace. Raises NativeKernelUnavailable."""
    if os.uname().machine not in ("x86_64", "AMD64"):
        raise NativeKernelUnavailable(f"the native MXFP4 kernel is x86-64 only (this is {os.uname().machine})")
    missing = _missing_tools()
    if missing:
        raise NativeKernelUnavailable("building it needs " + " and ".join(missing))
    from torch.utils import cpp_extension

    flags = ["-O3", "-std=c++17", "-fno-math-errno", "-Wno-psabi", *os.environ.get(CFLAGS_ENV, "").split()]
    name = "specqd_mxfp4_cpu"
    if emulate_avx512:
        flags += ["-DSPECQD_EMULATE_AVX512", "-mavx2", "-mfma"]
        name += "_emu"
    build_dir = _cache_dir() / f"{name}-{_source_hash(' '.join(flags))}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE_DIR / "mxfp4_cpu.cpp")],
            extra_cflags=flags,
            extra_include_paths=[str(SOURCE_DIR)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError with the log
        raise NativeKernelUnavailable(f"compiling {SOURCE_DIR / 'mxfp4_cpu.cpp'} failed: {str(e)[-2000:]}") from e
    return "specqd_emu" if emulate_avx512 else "specqd"


@functools.cache
def load_native(emulate_avx512: bool = False) -> str:
    """Op namespace of the native library (``"specqd"``), building it if needed. Raises if unavailable."""
    namespace = _build(emulate_avx512)
    if not emulate_avx512:
        _register_fake()
    return namespace


@functools.cache
def native_available() -> bool:
    """True when the native kernel loads; otherwise warns once, naming what is missing."""
    try:
        load_native()
    except NativeKernelUnavailable as e:
        message = f"specqd: the native CPU MXFP4 kernel is unavailable ({e}); MXFP4 linears on CPU use the torch reference, which is much slower."
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
        return False
    return True


def _register_fake() -> None:
    # Shape function for torch.compile / meta tensors: [M, K] -> [M, N].
    @torch.library.register_fake("specqd::mxfp4_linear")
    def _(x, packed, scales, bias, act_bits, isa):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("specqd::mxfp4_linear_amx")
    def _(x, repacked, n, bias):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("specqd::bf16_linear")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("specqd::mxfp4_linear_multirow")
    def _(x, codes, tile_scales, n, bias, isa, large_m):
        return x.new_empty(x.shape[0], n)


def cpu_isas(emulate_avx512: bool = False) -> list[str]:
    """ISA paths this CPU can run, best first, e.g. ``["avx512vnni", "avx512bw", "avx2"]``."""
    namespace = load_native(emulate_avx512)
    return [s for s in getattr(torch.ops, namespace).cpu_isas().split(",") if s]


def resolve_isa(isa: str = "auto", emulate_avx512: bool = False) -> str:
    """The ISA path a call with ``isa`` runs (``"auto"`` honours ``$VLLM_SPECQD_CPU_ISA``)."""
    return getattr(torch.ops, load_native(emulate_avx512)).resolve_isa(isa)


def mxfp4_linear_cpu(
    x: torch.Tensor,  # [..., K] float32 | bfloat16
    packed: torch.Tensor,  # [N, K_pad/2] uint8, canonical MXFP4
    scales: torch.Tensor,  # [N, K_pad/32] uint8, E8M0
    bias: torch.Tensor | None = None,  # [N]
    act_bits: int = 16,
    isa: str = "auto",
    emulate_avx512: bool = False,
) -> torch.Tensor:  # [..., N] in x.dtype
    """``x @ W.T + bias`` with the native kernel; activations quantized per 32-block to ``act_bits``.

    Example: ``x`` ``[3, 7, 896]`` bf16 with ``W`` ``[4864, 896]`` (packed ``[4864, 448]``, scales
    ``[4864, 28]``) gives ``[3, 7, 4864]`` bf16. ``isa`` is ``"auto"`` (``$VLLM_SPECQD_CPU_ISA``, else
    the best the CPU has), ``"avx2"``, ``"avx512"``, ``"avx512bw"`` or ``"avx512vnni"``.
    """
    if act_bits not in ACT_BITS:
        raise ValueError(f"mxfp4_linear_cpu: act_bits must be one of {ACT_BITS}, got {act_bits!r}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"mxfp4_linear_cpu: x must be float32 or bfloat16, got {x.dtype}")
    x2d, n, _ = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_linear_cpu")
    if x.device.type != "cpu":
        raise ValueError(f"mxfp4_linear_cpu: tensors must be on the CPU, got {x.device}")
    op = getattr(torch.ops, load_native(emulate_avx512)).mxfp4_linear
    y = op(x2d.contiguous(), packed, scales, bias, act_bits, isa)
    return y.reshape(*x.shape[:-1], n)


@functools.cache
def amx_available() -> bool:
    """True when this CPU has AMX-TILE + AMX-BF16 and the OS grants tile data to this process."""
    try:
        return bool(torch.ops.specqd.amx_available()) if load_native() else False
    except NativeKernelUnavailable:
        return False


def amx_repack(
    packed: torch.Tensor,  # [N, K_pad/2] uint8, canonical MXFP4
    scales: torch.Tensor,  # [N, K_pad/32] uint8, E8M0
) -> torch.Tensor:  # [ceil(N/16), K_pad/32, 272] uint8
    """The AMX kernel's weight layout: per 16 features and block, 256 code bytes then 16 scales (same bytes)."""
    return getattr(torch.ops, load_native()).amx_repack(packed.contiguous(), scales.contiguous())


def amx_unpack(repacked: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``amx_repack``: the canonical (packed [N, K_pad/2], scales [N, K_pad/32])."""
    tiles, nblocks, _ = repacked.shape
    codes = repacked[:, :, :256].reshape(tiles, nblocks, 16, 16)  # [tile, block, byte p, feature f]
    packed = codes.permute(0, 3, 1, 2).reshape(tiles * 16, nblocks * 16)[:n]
    scales = repacked[:, :, 256:].permute(0, 2, 1).reshape(tiles * 16, nblocks)[:n]
    return packed.contiguous(), scales.contiguous()


def mxfp4_linear_amx_repacked(
    x: torch.Tensor,  # [..., K] float32 | bfloat16
    repacked: torch.Tensor,  # amx_repack(packed, scales)
    n: int,  # output features N
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] in x.dtype
    """``x @ W.T + bias`` on AMX tiles: W decoded exactly to bf16 once per call, x rounded to bf16.

    Its cost barely grows with the rows (``amx_bf16.h``), unlike ``mxfp4_linear_cpu``'s. Example:
    ``x`` ``[16, 896]`` bf16 with ``W`` ``[4864, 896]`` repacked to ``[304, 28, 272]`` gives ``[16, 4864]``
    bf16. Each row's result is independent of the other rows. Raises RuntimeError where
    ``amx_available()`` is False.
    """
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"mxfp4_linear_amx: x must be float32 or bfloat16, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"mxfp4_linear_amx: tensors must be on the CPU, got {x.device}")
    y = getattr(torch.ops, load_native()).mxfp4_linear_amx(x.reshape(-1, x.shape[-1]).contiguous(), repacked, n, bias)
    return y.reshape(*x.shape[:-1], n)


def mxfp4_linear_amx_cpu(
    x: torch.Tensor,  # [..., K] float32 | bfloat16
    packed: torch.Tensor,  # [N, K_pad/2] uint8, canonical MXFP4
    scales: torch.Tensor,  # [N, K_pad/32] uint8, E8M0
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] in x.dtype
    """``mxfp4_linear_amx_repacked`` on canonical bytes (repacks every call: for tests, not hot paths).

    The twin is ``reference.mxfp4_matmul_bf16_act_torch``.
    """
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"mxfp4_linear_amx: x must be float32 or bfloat16, got {x.dtype}")
    x2d, n, _ = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_linear_amx")
    return mxfp4_linear_amx_repacked(x2d, amx_repack(packed, scales), n, bias).reshape(*x.shape[:-1], n)


# Rows above which the multi-row kernel hands over to exact dequantization + one GEMM (oneDNN/MKL);
# negative: never. By measurement (benchmarks/results/2026-12-07-zen4, "Large M"): on Zen 4 the
# kernel itself (64-row blocks) costs less per row than that path and than vLLM's bf16 GEMM at every
# M from 16 to 2048 (VPDPBUSD does 64 MACs per instruction, a bf16 dot product 32), so it keeps them.
LARGE_M_ROWS = -1


def multirow_repack(
    packed: torch.Tensor,  # [N, K_pad/2] uint8, canonical MXFP4
    scales: torch.Tensor,  # [N, K_pad/32] uint8, E8M0
) -> tuple[torch.Tensor, torch.Tensor]:  # codes [ceil(N/16), K_pad/32, 256], tile_scales [ceil(N/16), K_pad/32, 16]
    """The multi-row kernel's weight layout (``multirow.h``): same bytes, regrouped per 16 features and block.

    Example: packed ``[40, 48]`` and scales ``[40, 3]`` (N=40, K=96) give codes ``[3, 3, 256]`` and
    tile_scales ``[3, 3, 16]``; features 40..47 are padding (code 0, scale byte 0).
    """
    return getattr(torch.ops, load_native()).multirow_repack(packed.contiguous(), scales.contiguous())


def multirow_unpack(
    codes: torch.Tensor,  # [T, B, 256] uint8
    tile_scales: torch.Tensor,  # [T, B, 16] uint8
    n: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # packed [N, K_pad/2], scales [N, K_pad/32]
    """Inverse of ``multirow_repack``: the canonical bytes (chunk c byte 4f+i holds elements 8c+i | 8c+4+i << 4)."""
    tiles, nblocks, _ = codes.shape
    c = codes.reshape(tiles, nblocks, 4, 16, 4)  # [tile, block, chunk, feature, i]
    nibbles = torch.stack((c & 0x0F, c >> 4), dim=4)  # [tile, block, chunk, feature, low/high, i]
    elements = nibbles.permute(0, 3, 1, 2, 4, 5).reshape(tiles * 16, nblocks * 32)  # k = 32b + 8c + 4hi + i
    packed = (elements[:, 0::2] | (elements[:, 1::2] << 4))[:n]
    scales = tile_scales.permute(0, 2, 1).reshape(tiles * 16, nblocks)[:n]
    return packed.contiguous(), scales.contiguous()


def mxfp4_linear_multirow_repacked(
    x: torch.Tensor,  # [..., K] float32 | bfloat16
    codes: torch.Tensor,  # multirow_repack(packed, scales)[0]
    tile_scales: torch.Tensor,  # multirow_repack(packed, scales)[1]
    n: int,  # output features N
    bias: torch.Tensor | None = None,  # [N] float32 | bfloat16
    isa: str = "auto",
    large_m: int = LARGE_M_ROWS,
    emulate_avx512: bool = False,
) -> torch.Tensor:  # [..., N] in x.dtype
    """``x @ W.T + bias`` with W decoded once per call and reused by every row (``multirow.h``).

    Activations are quantized per 32-element block to int8 as in the w4a8 kernel; each row's result is
    bit-identical to ``reference.mxfp4_matmul_multirow_torch`` on every ISA, whatever the other rows
    of the call. More than ``large_m`` rows (negative, the default: never) run exact dequantization +
    one GEMM instead (twin: ``reference.mxfp4_matmul_large_m_torch``). Example: ``x`` ``[4, 1536]`` bf16 with
    ``W`` ``[8960, 1536]`` repacked to codes ``[560, 48, 256]`` gives ``[4, 8960]`` bf16.
    """
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"mxfp4_linear_multirow: x must be float32 or bfloat16, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"mxfp4_linear_multirow: tensors must be on the CPU, got {x.device}")
    op = getattr(torch.ops, load_native(emulate_avx512)).mxfp4_linear_multirow
    y = op(x.reshape(-1, x.shape[-1]).contiguous(), codes, tile_scales, n, bias, isa, large_m)
    return y.reshape(*x.shape[:-1], n)


def mxfp4_linear_multirow_cpu(
    x: torch.Tensor,  # [..., K] float32 | bfloat16
    packed: torch.Tensor,  # [N, K_pad/2] uint8, canonical MXFP4
    scales: torch.Tensor,  # [N, K_pad/32] uint8, E8M0
    bias: torch.Tensor | None = None,  # [N]
    isa: str = "auto",
    large_m: int = LARGE_M_ROWS,
    emulate_avx512: bool = False,
) -> torch.Tensor:  # [..., N] in x.dtype
    """``mxfp4_linear_multirow_repacked`` on canonical bytes (repacks every call: for tests, not hot paths)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"mxfp4_linear_multirow: x must be float32 or bfloat16, got {x.dtype}")
    x2d, n, _ = check_mxfp4_matmul_inputs(x, packed, scales, bias, who="mxfp4_linear_multirow")
    codes, tile_scales = multirow_repack(packed, scales)
    y = mxfp4_linear_multirow_repacked(x2d, codes, tile_scales, n, bias, isa, large_m, emulate_avx512)
    return y.reshape(*x.shape[:-1], n)


def multirow_dequant(
    codes: torch.Tensor,  # [T, B, 256] uint8
    tile_scales: torch.Tensor,  # [T, B, 16] uint8
    n: int,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [N, K] dtype
    """The large-M path's exact dequantization: equals ``dequantize_mxfp4`` of the canonical bytes (fp32 or bf16)."""
    return getattr(torch.ops, load_native()).multirow_dequant(codes, tile_scales, n, k, dtype)


def bf16_linear_cpu(
    x: torch.Tensor,  # [..., K] bfloat16
    weight: torch.Tensor,  # [N, K] bfloat16
    bias: torch.Tensor | None = None,  # [N] bfloat16 | float32
) -> torch.Tensor:  # [..., N] bfloat16
    """``x @ weight.T + bias`` in fp32 with one bf16 rounding (``bf16_gemm.h``), for few rows.

    Example: ``x`` ``[7, 896]`` with ``weight`` ``[4864, 896]`` gives ``[7, 4864]``. Each row's
    result is bit-identical whatever the other rows are (batch invariance). Its twin is
    ``reference.bf16_linear_torch`` (same math, another summation order).
    """
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise ValueError(f"bf16_linear_cpu: x and weight must be bfloat16, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"bf16_linear_cpu: x [..., K] and weight [N, K] disagree: {tuple(x.shape)} vs {tuple(weight.shape)}"
        )
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"bf16_linear_cpu: tensors must be on the CPU, got {x.device} and {weight.device}")
    op = getattr(torch.ops, load_native()).bf16_linear
    y = op(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def quantize_mxfp4_cpu(w: torch.Tensor, scale_rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Native twin of ``vllm_specqd.mxfp4.quantize_mxfp4`` for a finite 2-D CPU weight: (packed, scales).

    Bit-identical to the torch reference (tests check); about 30x faster, which is what keeps
    the engine's start-up short for large models.
    """
    return torch.ops.specqd.quantize_mxfp4(w.contiguous(), scale_rule)


def stream_read(buf: torch.Tensor) -> int:
    """Read every byte of a contiguous uint8 CPU tensor once with vector loads (a bandwidth probe)."""
    return torch.ops.specqd.stream_read(buf) if load_native() else 0
