"""The AMX MXFP4 kernel (kernels/cpu/amx_bf16.h) against its torch twin.

AMX cannot be emulated, so these tests run where the CPU has AMX-BF16 (this project's machines and
CI's do) and are skipped, saying so, elsewhere. Tolerance, derived (kernels/reference.py): the twin
is the exact float64 value of bf16(x) @ W.T, every product is exact in fp32, so the kernel differs
by its fp32 accumulation only: |kernel - twin| <= (K_pad/2 + 8) * 2^-24 * sum |x_k w_k| + 2^-23 |y|,
plus one bf16 rounding for bf16 outputs. Where every partial sum is exact, the test asks for equality.
"""

from __future__ import annotations

import pytest
import torch

from vllm_specqd.kernels import cpu_ops, mxfp4_bf16_act_error_bound, mxfp4_matmul_bf16_act_torch
from vllm_specqd.mxfp4 import pack_fp4, quantize_mxfp4

needs_amx = pytest.mark.skipif(not cpu_ops.amx_available(), reason="this CPU (or its kernel) has no AMX-BF16")

# (M, N, K): one row, a tile's worth, more than a group of 64 rows, N not a multiple of 16 or 64,
# K not a multiple of 32, odd K (rows not dword aligned).
SHAPES = [(1, 16, 32), (1, 7, 64), (2, 33, 96), (3, 17, 200), (16, 64, 576), (17, 40, 160)]
SHAPES += [(33, 70, 448), (64, 21, 1000), (65, 50, 96), (130, 19, 33), (5, 48, 4864)]


def _random_case(m: int, n: int, k: int, seed: int, dtype: torch.dtype, with_bias: bool):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :5] = 0.0
    if k >= 64:
        w[-1, 32:64] = 0.0  # an all-zero block (scale byte 0)
    q = quantize_mxfp4(w, scale_rule="mse")
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return x, q.packed, q.scales, bias


def _check(y, x, packed, scales, bias):
    ref, abs_terms = mxfp4_matmul_bf16_act_torch(x, packed, scales, bias)
    bound = mxfp4_bf16_act_error_bound(abs_terms, x.shape[-1], x.dtype, ref)
    err = (y.double() - ref).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max excess {float((err - bound).flatten()[worst]):.3g} at {worst.item()}: kernel {y.flatten()[worst].item()} "
        f"twin {ref.flatten()[worst].item()} bound {bound.flatten()[worst].item():.3g}"
    )


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_twin(shape, dtype, with_bias):
    m, n, k = shape
    x, packed, scales, bias = _random_case(m, n, k, seed=m * 1000 + n + k, dtype=dtype, with_bias=with_bias)
    y = cpu_ops.mxfp4_linear_amx_cpu(x, packed, scales, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    _check(y, x, packed, scales, bias)


@needs_amx
@pytest.mark.parametrize("m", [1, 5, 16, 17, 64, 70])
def test_exact_where_every_sum_is_exact(m):
    """Small-integer activations and every code with scales 2^-1..2^2: all partial sums are exact in fp32."""
    n, k = 35, 96
    g = torch.Generator().manual_seed(m)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = pack_fp4(codes)
    scales = torch.randint(126, 130, (n, k // 32), generator=g, dtype=torch.uint8)
    x = torch.randint(-8, 9, (m, k), generator=g).float()
    y = cpu_ops.mxfp4_linear_amx_cpu(x, packed, scales)
    ref, _ = mxfp4_matmul_bf16_act_torch(x, packed, scales)
    assert torch.equal(y.double(), ref)


@needs_amx
def test_every_scale_byte_including_nan():
    """Each E8M0 byte decodes as the format says: 2^(e-127) times the code, NaN for 255."""
    n, k = 256, 32
    codes = torch.zeros(n, k, dtype=torch.uint8)
    codes[:, 3] = 3  # 1.5; the other codes (zero) stay finite at every scale
    packed = pack_fp4(codes)
    scales = torch.arange(256, dtype=torch.uint8).reshape(n, 1)
    x = torch.zeros(1, k)
    x[0, 3] = 1.0
    y = cpu_ops.mxfp4_linear_amx_cpu(x, packed, scales)[0]
    expected = torch.tensor([1.5 * 2.0 ** (e - 127) for e in range(255)], dtype=torch.float64)
    expected_bf16 = expected.float().to(torch.bfloat16).double()  # bf16 flushes below its range like AMX does
    finite = y[:255].double()
    in_range = expected.abs() >= 2.0**-126
    assert torch.equal(finite[in_range], expected_bf16[in_range])
    assert (finite[~in_range] == 0).all()  # AMX reads bf16 denormals as zero
    assert torch.isnan(y[255])


@needs_amx
def test_rows_are_batch_invariant():
    """A row's result does not depend on the other rows of the call (the multi-level draft relies on it)."""
    x, packed, scales, bias = _random_case(70, 90, 576, seed=5, dtype=torch.bfloat16, with_bias=True)
    together = cpu_ops.mxfp4_linear_amx_cpu(x, packed, scales, bias)
    for rows in (slice(0, 1), slice(3, 4), slice(10, 27), slice(64, 70)):
        assert torch.equal(cpu_ops.mxfp4_linear_amx_cpu(x[rows], packed, scales, bias), together[rows])


@needs_amx
def test_leading_dims_and_errors():
    x, packed, scales, bias = _random_case(6, 40, 160, seed=4, dtype=torch.bfloat16, with_bias=True)
    y = cpu_ops.mxfp4_linear_amx_cpu(x.reshape(2, 3, 160), packed, scales, bias)
    assert y.shape == (2, 3, 40)
    assert torch.equal(y.reshape(6, 40), cpu_ops.mxfp4_linear_amx_cpu(x, packed, scales, bias))
    with pytest.raises(RuntimeError, match="repacked must be amx_repack's uint8"):
        cpu_ops.mxfp4_linear_amx_repacked(x, cpu_ops.amx_repack(packed, scales), 49)
    with pytest.raises(ValueError, match="packed must be uint8"):
        cpu_ops.mxfp4_linear_amx_cpu(x, packed[:, :-1], scales)
    with pytest.raises(ValueError, match="x must be float32 or bfloat16"):
        cpu_ops.mxfp4_linear_amx_cpu(x.half(), packed, scales)


def test_amx_is_found_where_the_cpu_lists_it():
    """A build failure must not pass as 'no AMX here' (which would skip this file)."""
    import ctypes

    flags = open("/proc/cpuinfo").read().split()
    if "amx_bf16" not in flags or "amx_tile" not in flags:
        pytest.skip("this CPU lists no AMX-BF16")
    sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18  # x86-64 Linux
    if ctypes.CDLL(None, use_errno=True).syscall(sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata) != 0:
        pytest.skip("the Linux kernel refuses AMX tile data to processes (arch_prctl ARCH_REQ_XCOMP_PERM)")
    assert cpu_ops.native_available() and cpu_ops.amx_available()


@needs_amx
def test_repacked_layout_unpacks_to_the_canonical_bytes():
    """The inspection path reads an AMX layer's canonical bytes back from its repacked ones."""
    _, packed, scales, _ = _random_case(1, 37, 200, seed=11, dtype=torch.float32, with_bias=False)
    repacked = cpu_ops.amx_repack(packed, scales)
    assert repacked.shape == (3, 7, 272) and repacked.numel() == 3 * 7 * 272
    back_packed, back_scales = cpu_ops.amx_unpack(repacked, 37)
    assert torch.equal(back_packed, packed) and torch.equal(back_scales, scales)
