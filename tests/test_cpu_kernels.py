"""The native x86 MXFP4 kernel (kernels/cpu/) against its torch twin, on every ISA path this machine can run.

ISA paths: the native ones this CPU supports (AVX2 everywhere; AVX-512 where present) and the
AVX-512 BW and VNNI code compiled over SIMDe's emulation of the 512-bit intrinsics, so the
AVX-512 source is exercised on CPUs without AVX-512 too.

Tolerance, derived (kernels/reference.py): the twin computes the exact value of the kernel's sum in
float64 (same activation quantization, exact integer block dots), and the kernel rounds once per
block and lane in fp32, so |kernel - twin| <= (K_pad/32 + 8) * 2^-24 * sum_b s_b sum_i |q_i w_i| + 2^-23 |y|,
plus one bf16 rounding for bf16 outputs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vllm_specqd.kernels import cpu_ops, mxfp4_int_act_error_bound, mxfp4_matmul, mxfp4_matmul_int_act_torch

from vllm_specqd.mxfp4 import dequantize_mxfp4, quantize_mxfp4

SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")
NATIVE_ISAS = cpu_ops.cpu_isas()
ALL_ISAS = ["avx2", "avx512bw", "avx512vnni"]


def _isa_params():
    params = []
    for isa in ALL_ISAS:
        mark = pytest.mark.skipif(isa not in NATIVE_ISAS, reason=f"this CPU has no {isa} (has {NATIVE_ISAS})")
        params.append(pytest.param((isa, False), id=f"native-{isa}", marks=mark))
    for isa in ("avx512bw", "avx512vnni"):
        mark = pytest.mark.skipif(not SIMDE_HEADER.exists(), reason="SIMDe headers missing (apt install libsimde-dev)")
        params.append(pytest.param((isa, True), id=f"simde-{isa}", marks=mark))
    return params


ISA_PARAMS = _isa_params()

# (M, N, K): K not a multiple of 64 (odd block counts, AVX-512 tails of 1..3 blocks), N not a multiple of 16.
SHAPES = [(1, 16, 64), (1, 7, 32), (2, 33, 96), (3, 17, 200), (5, 64, 576), (8, 21, 1000), (16, 40, 160), (17, 9, 448)]


def _random_case(m: int, n: int, k: int, seed: int, dtype: torch.dtype, with_bias: bool):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :5] = 0.0  # a partly zero block
    if k >= 64:
        w[-1, 32:64] = 0.0  # an all-zero block (scale byte 0)
    q = quantize_mxfp4(w, scale_rule="mse")
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    if m > 1:
        x[1, : min(k, 32)] = 0.0  # an all-zero activation block
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return x, q.packed, q.scales, bias


def _check(y: torch.Tensor, x, packed, scales, bias, act_bits: int) -> None:
    ref, abs_terms = mxfp4_matmul_int_act_torch(x, packed, scales, bias, act_bits=act_bits)
    bound = mxfp4_int_act_error_bound(abs_terms, x.shape[-1], x.dtype, ref)
    err = (y.double() - ref).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max excess {float((err - bound).flatten()[worst]):.3g} at {worst.item()}: kernel {y.flatten()[worst].item()} "
        f"twin {ref.flatten()[worst].item()} bound {bound.flatten()[worst].item():.3g}"
    )


@pytest.mark.parametrize("isa_case", ISA_PARAMS)
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_twin(isa_case, act_bits, dtype, shape):
    isa, emulated = isa_case
    m, n, k = shape
    for with_bias in (False, True):
        x, packed, scales, bias = _random_case(m, n, k, seed=m * 1000 + n * 10 + k, dtype=dtype, with_bias=with_bias)
        y = cpu_ops.mxfp4_linear_cpu(x, packed, scales, bias, act_bits=act_bits, isa=isa, emulate_avx512=emulated)
        assert y.dtype == dtype and y.shape == (m, n)
        _check(y, x, packed, scales, bias, act_bits)


@pytest.mark.parametrize("isa_case", ISA_PARAMS)
def test_every_code_and_scale_edge(isa_case):
    """All 16 codes in every position, scales spanning 2^-20..2^20, in one weight."""
    isa, emulated = isa_case
    n, k = 24, 256
    codes = torch.arange(16, dtype=torch.uint8).repeat(n, k // 16)
    codes = torch.roll(codes, shifts=3, dims=1)
    for row in range(n):
        codes[row] = torch.roll(codes[row], shifts=row)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scales = torch.randint(107, 148, (n, k // 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    for act_bits in (8, 16):
        y = cpu_ops.mxfp4_linear_cpu(x, packed, scales, None, act_bits=act_bits, isa=isa, emulate_avx512=emulated)
        _check(y, x, packed, scales, None, act_bits)


def test_int16_activations_track_exact_fp32_math():
    """W4A16 differs from exact dequantize + fp32 matmul only by the int16 rounding of x (<= 2^-16 amax)."""
    x, packed, scales, _ = _random_case(4, 96, 576, seed=7, dtype=torch.float32, with_bias=False)
    w = dequantize_mxfp4(packed, scales, k=576)
    exact = x @ w.t()
    y = cpu_ops.mxfp4_linear_cpu(x, packed, scales, act_bits=16)
    # Per block, |x - x_q| <= amax_block / 65534 elementwise; summed against |w|.
    blocks = x.reshape(4, -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(4, 576)
    bound = (blocks / 65534) @ w.abs().t() + 1e-5 * (x.abs() @ w.abs().t())
    assert ((y - exact).abs() <= bound).all()


def test_isas_agree_on_the_same_input():
    """Every ISA path computes the same sum up to fp32 accumulation order."""
    x, packed, scales, bias = _random_case(6, 50, 416, seed=3, dtype=torch.float32, with_bias=True)
    runs = [cpu_ops.mxfp4_linear_cpu(x, packed, scales, bias, isa=isa) for isa in NATIVE_ISAS]
    if SIMDE_HEADER.exists():
        runs += [cpu_ops.mxfp4_linear_cpu(x, packed, scales, bias, isa=i, emulate_avx512=True) for i in ALL_ISAS[1:]]
    for y in runs[1:]:
        torch.testing.assert_close(y, runs[0], rtol=1e-5, atol=1e-5)


def test_leading_dims_and_public_entry_use_the_native_kernel():
    x, packed, scales, bias = _random_case(6, 40, 160, seed=4, dtype=torch.bfloat16, with_bias=True)
    x3 = x.reshape(2, 3, 160)
    y = cpu_ops.mxfp4_linear_cpu(x3, packed, scales, bias)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y.reshape(6, 40), cpu_ops.mxfp4_linear_cpu(x, packed, scales, bias), rtol=0, atol=0)
    assert torch.equal(mxfp4_matmul(x3, packed, scales, bias), y)  # CPU entry point = native W4A16


def test_launcher_errors_name_the_argument():
    x, packed, scales, bias = _random_case(2, 16, 64, seed=5, dtype=torch.float32, with_bias=True)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_ops.mxfp4_linear_cpu(x.half(), packed, scales)
    with pytest.raises(ValueError, match="packed must be uint8"):
        cpu_ops.mxfp4_linear_cpu(x, packed.int(), scales)
    with pytest.raises(ValueError, match="packed must be uint8"):
        cpu_ops.mxfp4_linear_cpu(x[:, :32], packed, scales)
    with pytest.raises(ValueError, match="scales must be uint8"):
        cpu_ops.mxfp4_linear_cpu(x, packed, scales[:, :1])
    with pytest.raises(ValueError, match="packed must be contiguous"):
        cpu_ops.mxfp4_linear_cpu(x, packed.t().contiguous().t(), scales)
    with pytest.raises(ValueError, match="bias must be"):
        cpu_ops.mxfp4_linear_cpu(x, packed, scales, bias[:3])
    with pytest.raises(ValueError, match="act_bits"):
        cpu_ops.mxfp4_linear_cpu(x, packed, scales, act_bits=4)
    with pytest.raises(RuntimeError, match="unknown ISA"):
        cpu_ops.mxfp4_linear_cpu(x, packed, scales, isa="sse2")
    # The op itself asserts its inputs too (callers may bypass the Python checks).
    op = torch.ops.specqd.mxfp4_linear
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.t(), packed, scales, None, 8, "auto")
    with pytest.raises(RuntimeError, match="act_bits"):
        op(x, packed, scales, None, 4, "auto")


@pytest.mark.skipif("avx512bw" in NATIVE_ISAS, reason="this CPU has AVX-512: nothing to refuse")
def test_unsupported_isa_is_refused():
    x, packed, scales, _ = _random_case(1, 16, 64, seed=6, dtype=torch.float32, with_bias=False)
    with pytest.raises(RuntimeError, match="not supported by this CPU"):
        cpu_ops.mxfp4_linear_cpu(x, packed, scales, isa="avx512")


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )


def test_env_var_forces_the_avx2_path():
    code = "from vllm_specqd.kernels import cpu_ops; print(cpu_ops.resolve_isa('auto'))"
    forced = _run_python(code, {"VLLM_SPECQD_CPU_ISA": "avx2"})
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert forced.stdout.strip() == "avx2"
    free = _run_python(code, {"VLLM_SPECQD_CPU_ISA": ""})
    assert free.stdout.strip() == NATIVE_ISAS[0]


def test_without_a_compiler_one_warning_then_the_torch_path(tmp_path):
    code = (
        "import warnings, torch\n"
        "from vllm_specqd.kernels import mxfp4_matmul, mxfp4_matmul_torch\n"
        "from vllm_specqd.mxfp4 import quantize_mxfp4\n"
        "q = quantize_mxfp4(torch.randn(8, 64)); x = torch.randn(2, 64)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    y = mxfp4_matmul(x, q.packed, q.scales); y2 = mxfp4_matmul(x, q.packed, q.scales)\n"
        "print(len([w for w in caught if 'native CPU MXFP4 kernel' in str(w.message)]))\n"
        "print([str(w.message) for w in caught][0])\n"
        "print(torch.equal(y, mxfp4_matmul_torch(x, q.packed, q.scales)))\n"
    )
    out = _run_python(code, {"CXX": "/nonexistent/c++", "VLLM_SPECQD_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    count, message, same = out.stdout.strip().splitlines()
    assert count == "1"
    assert "C++ compiler" in message and "/nonexistent/c++" in message
    assert same == "True"


def test_stream_read_touches_every_byte():
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    assert cpu_ops.stream_read(buf) == 0
    buf[12345] = 7
    assert cpu_ops.stream_read(buf) != 0


def test_build_is_cached(tmp_path):
    """A second process finds the compiled library instead of rebuilding (the cache dir holds one build)."""
    assert shutil.which(os.environ.get("CXX", "c++")) is not None
    code = "import time; t = time.time(); from vllm_specqd.kernels import cpu_ops; cpu_ops.load_native(); print(time.time() - t)"
    out = _run_python(code, {})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) < 15.0, "the cached build should load in seconds, not recompile"
