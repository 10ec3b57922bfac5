"""The multi-row MXFP4 CPU kernel (kernels/cpu/multirow.h) against its bit-exact torch twin.

ISA paths: the native ones this CPU supports and the AVX-512 BW and VNNI code compiled over SIMDe's
emulation of the 512-bit intrinsics (so the AVX-512 source runs on CPUs without AVX-512 too).

No tolerance for M up to the large-M threshold: every path computes the same exact int32 block dots
and the same fp32 operations per row in the same order (kernels/reference.py,
``mxfp4_matmul_multirow_torch``), so the twin and every ISA agree bit for bit, whatever M is and
wherever a row sits in the batch. Above the threshold the kernel runs exact dequantization + one GEMM
(``mxfp4_matmul_large_m_torch``), which differs from exact math only by the GEMM's summation order;
that bound is derived in reference.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_specqd.kernels import (
    CPU_KERNELS,
    CpuKernel,
    cpu_kernel,
    cpu_ops,
    mxfp4_bf16_act_error_bound,
    mxfp4_matmul,
    mxfp4_matmul_large_m_torch,
    mxfp4_matmul_multirow_torch,
    resolve_cpu_kernel,
)
from vllm_specqd.kernels.reference import large_m_gemm_dtype
from vllm_specqd.mxfp4 import dequantize_mxfp4, pack_fp4, quantize_mxfp4

SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")
NATIVE_ISAS = cpu_ops.cpu_isas()
NEVER = -1  # large_m: no row count takes the dequantize + GEMM path


def _isa_params():
    params = []
    for isa in ("avx2", "avx512bw", "avx512vnni"):
        mark = pytest.mark.skipif(isa not in NATIVE_ISAS, reason=f"this CPU has no {isa} (has {NATIVE_ISAS})")
        params.append(pytest.param((isa, False), id=f"native-{isa}", marks=mark))
    for isa in ("avx512bw", "avx512vnni"):
        mark = pytest.mark.skipif(not SIMDE_HEADER.exists(), reason="SIMDe headers missing (apt install libsimde-dev)")
        params.append(pytest.param((isa, True), id=f"simde-{isa}", marks=mark))
    return params


ISA_PARAMS = _isa_params()


def _run(x, packed, scales, bias, isa_case, large_m=NEVER):
    isa, emulated = isa_case
    return cpu_ops.mxfp4_linear_multirow_cpu(x, packed, scales, bias, isa, large_m, emulate_avx512=emulated)


def _random_case(m: int, n: int, k: int, seed: int, dtype: torch.dtype, bias_dtype: torch.dtype | None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :5] = 0.0  # a partly zero block
    if k >= 64:
        w[-1, 32:64] = 0.0  # an all-zero block (scale byte 0)
    q = quantize_mxfp4(w, scale_rule="mse")
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    if m > 1:
        x[1, : min(k, 32)] = 0.0  # an all-zero activation block
    bias = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return x, q.packed, q.scales, bias


def _assert_bitwise(y: torch.Tensor, want: torch.Tensor) -> None:
    assert y.dtype == want.dtype and y.shape == want.shape
    same = (y == want) | (torch.isnan(y) & torch.isnan(want))
    if not same.all():
        at = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{int((~same).sum())} of {y.numel()} differ; first at {at}: kernel {y[tuple(at)].item()!r} "
            f"twin {want[tuple(at)].item()!r}"
        )


# (N, K): N not a multiple of 16; K a multiple of 32 but not of 128, not a multiple of 32, one block, long.
NK = [(16, 32), (7, 96), (33, 200), (50, 1000), (21, 40), (64, 576)]


@pytest.mark.parametrize("isa_case", ISA_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nk", NK, ids=lambda s: "n{}k{}".format(*s))
def test_kernel_is_bit_exact_with_twin(isa_case, dtype, nk):
    n, k = nk
    for m in (1, 2, 3, 5, 8, 13, 16, 17):
        for bias_dtype in (None, torch.float32, torch.bfloat16):
            x, packed, scales, bias = _random_case(m, n, k, seed=m * 1000 + n + k, dtype=dtype, bias_dtype=bias_dtype)
            _assert_bitwise(
                _run(x, packed, scales, bias, isa_case), mxfp4_matmul_multirow_torch(x, packed, scales, bias)
            )


@pytest.mark.parametrize("isa_case", ISA_PARAMS)
def test_every_m_from_1_to_17_is_bit_exact(isa_case):
    """Every row-group size and remainder the kernel instantiates (up to 16 rows per pass)."""
    x, packed, scales, bias = _random_case(17, 40, 160, seed=3, dtype=torch.bfloat16, bias_dtype=torch.float32)
    for m in range(1, 18):
        _assert_bitwise(
            _run(x[:m], packed, scales, bias, isa_case), mxfp4_matmul_multirow_torch(x[:m], packed, scales, bias)
        )


@pytest.mark.parametrize("isa_case", ISA_PARAMS)
def test_rows_are_batch_invariant(isa_case):
    """Row i of a 13-row call is bit-identical to the same row alone, and wherever it sits in the batch."""
    x, packed, scales, bias = _random_case(13, 70, 448, seed=5, dtype=torch.bfloat16, bias_dtype=torch.bfloat16)
    together = _run(x, packed, scales, bias, isa_case)
    for i in range(13):
        assert torch.equal(_run(x[i : i + 1], packed, scales, bias, isa_case), together[i : i + 1]), f"row {i}"
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_run(x[perm], packed, scales, bias, isa_case), together[perm])
    for rows in (slice(2, 6), slice(5, 13), slice(0, 9)):
        assert torch.equal(_run(x[rows], packed, scales, bias, isa_case), together[rows])


def test_rows_past_one_row_block_stay_bit_exact():
    """More than one 64-row block (the kernel's large-M loop): still the twin's bits, row by row."""
    x, packed, scales, bias = _random_case(150, 40, 200, seed=6, dtype=torch.bfloat16, bias_dtype=torch.float32)
    y = _run(x, packed, scales, bias, ("auto", False))
    _assert_bitwise(y, mxfp4_matmul_multirow_torch(x, packed, scales, bias))
    assert torch.equal(_run(x[100:101], packed, scales, bias, ("auto", False)), y[100:101])


def test_every_isa_path_gives_the_same_bits():
    x, packed, scales, bias = _random_case(11, 50, 416, seed=7, dtype=torch.float32, bias_dtype=torch.float32)
    runs = {isa: _run(x, packed, scales, bias, (isa, False)) for isa in NATIVE_ISAS}
    if SIMDE_HEADER.exists():
        runs.update({f"simde-{isa}": _run(x, packed, scales, bias, (isa, True)) for isa in ("avx512bw", "avx512vnni")})
    first = next(iter(runs.values()))
    for name, y in runs.items():
        assert torch.equal(y, first), name


@pytest.mark.parametrize("isa_case", ISA_PARAMS)
def test_every_code_and_extreme_scales(isa_case):
    """All 16 codes in every position; E8M0 bytes 0 (reads as 0), 1, 2, 126..128, 253, 254 and 255 (inf)."""
    n, k = 48, 256
    codes = torch.arange(16, dtype=torch.uint8).repeat(n, k // 16)
    for row in range(n):
        codes[row] = torch.roll(codes[row], shifts=row + 3)
    packed = pack_fp4(codes)
    g = torch.Generator().manual_seed(1)
    extremes = torch.tensor([0, 1, 2, 126, 127, 128, 253, 254, 255], dtype=torch.uint8)
    scales = extremes[torch.randint(0, len(extremes), (n, k // 32), generator=g)]
    x = torch.randn(4, k, generator=g)
    x[1] *= 1e-38  # activations near the bottom of fp32's range: subnormal products
    x[2] *= 1e30
    x[3, 100:] = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        _assert_bitwise(_run(xd, packed, scales, None, isa_case), mxfp4_matmul_multirow_torch(xd, packed, scales))


def test_twin_tracks_exact_math():
    """The twin itself: W4A8 is the exact product up to int8 rounding of x (<= amax/254 per element)."""
    x, packed, scales, _ = _random_case(4, 96, 576, seed=8, dtype=torch.float32, bias_dtype=None)
    w = dequantize_mxfp4(packed, scales, k=576)
    exact = x.double() @ w.double().t()
    blocks = x.reshape(4, -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(4, 576)
    bound = (blocks.double() / 254) @ w.abs().double().t() + 1e-5 * (x.abs().double() @ w.abs().double().t())
    assert ((mxfp4_matmul_multirow_torch(x, packed, scales).double() - exact).abs() <= bound).all()


def test_repacked_layout_unpacks_to_the_canonical_bytes():
    _, packed, scales, _ = _random_case(1, 37, 200, seed=11, dtype=torch.float32, bias_dtype=None)
    codes, tile_scales = cpu_ops.multirow_repack(packed, scales)
    assert codes.shape == (3, 7, 256) and tile_scales.shape == (3, 7, 16)
    back_packed, back_scales = cpu_ops.multirow_unpack(codes, tile_scales, 37)
    assert torch.equal(back_packed, packed) and torch.equal(back_scales, scales)
    # Padding features (37..47): code 0 and scale byte 0, so they add nothing.
    pad_packed, pad_scales = cpu_ops.multirow_unpack(codes, tile_scales, 48)
    assert (pad_packed[37:] == 0).all() and (pad_scales[37:] == 0).all()
    # Chunk c byte 4f+i: element 8c+i (low nibble) and 8c+4+i (high) of feature f, as the kernel reads them.
    elements = torch.stack(((packed & 0x0F), (packed >> 4)), dim=-1).reshape(37, -1)  # [N, K_pad] codes
    f, b, c, i = 5, 2, 3, 1
    byte = codes[0, b, c * 64 + 4 * f + i]
    assert byte & 0x0F == elements[f, 32 * b + 8 * c + i] and byte >> 4 == elements[f, 32 * b + 8 * c + 4 + i]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantization_is_exact_for_every_code_and_scale_byte(dtype):
    """The large-M path's weights equal the format module's, NaN (byte 255) and byte 0 (2^-127) included."""
    n, k = 256, 72
    codes = (torch.arange(96)[None, :] + torch.arange(n)[:, None]) % 16
    packed = pack_fp4(codes.to(torch.uint8))
    scales = torch.arange(n, dtype=torch.uint8)[:, None].repeat(1, 3).contiguous()
    got = cpu_ops.multirow_dequant(*cpu_ops.multirow_repack(packed, scales), n, k, dtype)
    want = dequantize_mxfp4(packed, scales, k=k, dtype=torch.float32).to(dtype)
    assert got.shape == (n, k) and got.dtype == dtype
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[255]).all()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def _check_large_m(y, x, packed, scales, bias):
    gemm_dtype = large_m_gemm_dtype(x.dtype, "avx512_bf16" in open("/proc/cpuinfo").read())
    ref, abs_terms = mxfp4_matmul_large_m_torch(x, packed, scales, bias, gemm_dtype)
    # A bf16 GEMM also rounds its bias to bf16 and its fp32 result once more: within the bf16 term.
    bound = mxfp4_bf16_act_error_bound(
        abs_terms, 2 * x.shape[-1], x.dtype if gemm_dtype == torch.float32 else gemm_dtype, ref
    )
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {float((err - bound).max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nk", [(33, 200), (600, 96), (40, 1000)], ids=lambda s: "n{}k{}".format(*s))
def test_large_m_path_matches_its_twin(dtype, nk):
    n, k = nk  # N = 600: more than one 512-feature chunk
    for bias_dtype in (None, torch.float32, torch.bfloat16):
        x, packed, scales, bias = _random_case(70, n, k, seed=n + k, dtype=dtype, bias_dtype=bias_dtype)
        y = cpu_ops.mxfp4_linear_multirow_cpu(x, packed, scales, bias, large_m=64)
        assert y.shape == (70, n) and y.dtype == dtype
        _check_large_m(y, x, packed, scales, bias)


def test_threshold_picks_the_path_by_row_count():
    x, packed, scales, bias = _random_case(9, 40, 160, seed=9, dtype=torch.bfloat16, bias_dtype=torch.float32)
    twin = mxfp4_matmul_multirow_torch(x, packed, scales, bias)
    # M <= large_m: the multi-row kernel, bit-exact; M > large_m: the GEMM path (close, not bit-exact).
    assert torch.equal(cpu_ops.mxfp4_linear_multirow_cpu(x, packed, scales, bias, large_m=9), twin)
    y = cpu_ops.mxfp4_linear_multirow_cpu(x, packed, scales, bias, large_m=8)
    _check_large_m(y, x, packed, scales, bias)
    assert not torch.equal(y, twin)  # int8 activations vs bf16: the paths do differ
    # Drafting passes (<= 16 rows) never leave the multi-row kernel (negative: no row count does).
    assert cpu_ops.LARGE_M_ROWS < 0 or cpu_ops.LARGE_M_ROWS >= 16


def test_empty_and_leading_dims():
    x, packed, scales, bias = _random_case(6, 40, 160, seed=4, dtype=torch.bfloat16, bias_dtype=torch.bfloat16)
    y = cpu_ops.mxfp4_linear_multirow_cpu(x.reshape(2, 3, 160), packed, scales, bias)
    assert y.shape == (2, 3, 40) and torch.equal(y.reshape(6, 40), mxfp4_matmul_multirow_torch(x, packed, scales, bias))
    assert cpu_ops.mxfp4_linear_multirow_cpu(x[:0], packed, scales, bias).shape == (0, 40)


def test_launcher_and_op_errors_name_the_argument():
    x, packed, scales, bias = _random_case(2, 16, 64, seed=5, dtype=torch.float32, bias_dtype=torch.float32)
    codes, tile_scales = cpu_ops.multirow_repack(packed, scales)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_ops.mxfp4_linear_multirow_cpu(x.half(), packed, scales)
    with pytest.raises(ValueError, match="packed must be uint8"):
        cpu_ops.mxfp4_linear_multirow_cpu(x[:, :32], packed, scales)
    op = torch.ops.specqd.mxfp4_linear_multirow
    with pytest.raises(RuntimeError, match="codes must be multirow_repack's"):
        op(x, codes, tile_scales, 17, None, "auto", -1)  # N=17 needs 2 tiles
    with pytest.raises(RuntimeError, match="tile_scales must be multirow_repack's"):
        op(x, codes, tile_scales[:, :1].contiguous(), 16, None, "auto", -1)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        op(x.t(), codes, tile_scales, 16, None, "auto", -1)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, codes, tile_scales, 16, bias[:3], "auto", -1)
    with pytest.raises(RuntimeError, match="unknown ISA"):
        op(x, codes, tile_scales, 16, None, "sse2", -1)


# ----------------------------------------------------------------------------- dispatch (kernels/__init__.py)
def test_auto_resolves_to_amx_or_multirow_and_names_are_checked():
    assert resolve_cpu_kernel("auto") == ("amx" if cpu_ops.amx_available() else "multirow")
    with pytest.raises(ValueError, match="unknown CPU MXFP4 kernel"):
        resolve_cpu_kernel("w4a4")
    if not cpu_ops.amx_available():
        with pytest.raises(RuntimeError, match="needs a CPU with AMX-BF16"):
            resolve_cpu_kernel("amx")


@pytest.mark.parametrize("name", [k for k in CPU_KERNELS if k != "amx" or cpu_ops.amx_available()])
def test_each_cpu_kernel_prepares_runs_and_gives_the_bytes_back(name):
    x, packed, scales, bias = _random_case(5, 40, 160, seed=12, dtype=torch.bfloat16, bias_dtype=torch.bfloat16)
    kernel = cpu_kernel(name, 40, 160)
    assert isinstance(kernel, CpuKernel) and kernel.name == name
    a, b = kernel.prepare(packed, scales)
    assert all(torch.equal(got, want) for got, want in zip(kernel.canonical(a, b), (packed, scales)))
    y = mxfp4_matmul(x.reshape(5, 1, 160), a, b, bias, kernel=kernel)
    assert y.shape == (5, 1, 40)
    expected = {
        "multirow": lambda: cpu_ops.mxfp4_linear_multirow_cpu(x, packed, scales, bias),
        "amx": lambda: cpu_ops.mxfp4_linear_amx_cpu(x, packed, scales, bias),
        "w4a8": lambda: cpu_ops.mxfp4_linear_cpu(x, packed, scales, bias, act_bits=8),
        "w4a16": lambda: cpu_ops.mxfp4_linear_cpu(x, packed, scales, bias, act_bits=16),
    }[name]()
    assert torch.equal(y.reshape(5, 40), expected)
