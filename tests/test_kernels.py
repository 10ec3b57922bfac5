"""Tests for vllm_specqd.kernels: the MXFP4 GEMM twin, the public entry point, the Triton kernels.

How the Triton kernels are tested without a GPU
-----------------------------------------------
Triton 3.9 decides between compiling and interpreting when ``@triton.jit`` runs, i.e. when
``vllm_specqd.kernels.triton_mxfp4`` is first imported (``triton.knobs.runtime.interpret`` reads
``TRITON_INTERPRET`` then), not at launch. In a full pytest session another test module may import
the kernels (through the vLLM adapter) before this one runs, so setting the variable here would
be too late. Instead ``interp_results`` runs this file as a script in one fresh subprocess with
``TRITON_INTERPRET=1``; the script runs every case in ``CASES`` on CPU tensors and prints one JSON
line, and the parametrized tests assert on it case by case.

Tolerance (``gemm_tolerance``), derived rather than tuned
---------------------------------------------------------
Each product ``x_k * w_k`` is exact in fp32 for bf16/fp16 x (<= 8 or 11 significant bits times an
MXFP4 value with <= 2), and the kernels apply power-of-two scales exactly, so kernel and twin are
fp32 sums of the same terms in different orders. Each side's sum (bias included) is within
``(K + 4) * u * (sum_k |x_k w_k| + |bias|)`` of the exact value (u = 2^-24; the +4 also covers fp32
x, whose products round). Both are then rounded once to the output dtype: the twin to nearest, the
interpreter's cast truncates. Two fp32 values within ``delta`` of each other, one rounded and one
truncated, land at most one output ulp apart plus ``delta``. So

    |y_kernel - y_twin| <= 1 ulp_out(max(|y_kernel|, |y_twin|)) + 2 * (K + 4) * u * (|x| @ |W|.T + |bias|)

The dequant path adds one ulp (its bias is rounded to x's dtype before ``addmm``). On CUDA the
tensor-core path uses u = 2^-22 for the MMA accumulator. Where every partial sum is exactly
representable (small-integer data, fp16/fp32 output) the test asks for bit equality instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from vllm_specqd.kernels import HAS_TRITON, check_mxfp4_matmul_inputs, mxfp4_matmul, mxfp4_matmul_torch
from vllm_specqd.mxfp4 import dequantize_mxfp4, pack_fp4, quantize_mxfp4

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_MIN_NORMAL_EXP = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126}


# ----------------------------------------------------------------------------- helpers
def random_mxfp4(n: int, k: int, seed: int, scale_lo: int = 118, scale_hi: int = 130):
    """Random MXFP4 weight [n, k]: every code 0..15 (0x8 = -0 included), scales in [lo, hi].

    Returns ``(packed [n, K_pad/2], scales [n, K_pad/32])``; padding columns are code 0 (contract).
    """
    g = torch.Generator().manual_seed(seed)
    k_pad = -(-k // 32) * 32
    codes = torch.randint(0, 16, (n, k_pad), generator=g, dtype=torch.uint8)
    codes[:, k:] = 0
    scales = torch.randint(scale_lo, scale_hi + 1, (n, k_pad // 32), generator=g, dtype=torch.uint8)
    return pack_fp4(codes).contiguous(), scales


def ulp(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at ``|y|`` (fp32 tensor in, fp32 out); subnormal spacing near 0."""
    _, e = torch.frexp(y.abs())  # |y| = m * 2^e, m in [0.5, 1): binade exponent e - 1
    e = torch.clamp(e - 1, min=_MIN_NORMAL_EXP[dtype])
    return torch.ldexp(torch.ones_like(y), e - _MANTISSA_BITS[dtype])


def gemm_tolerance(x2d, w, bias, y_kernel, y_ref, out_dtype, u=2.0**-24, extra_ulps=0):
    """Bound on |y_kernel - y_ref| from the module docstring. x2d [M, K], w [N, K] fp32, y [M, N]."""
    k = x2d.shape[1]
    mag = x2d.float().abs() @ w.abs().t()
    if bias is not None:
        mag = mag + bias.float().abs()
    top = torch.maximum(y_kernel.float().abs(), y_ref.float().abs())
    return (1 + extra_ulps) * ulp(top, out_dtype) + 2 * (k + 4) * u * mag


def compare(y_kernel, y_ref, tol) -> dict:
    """NaNs must coincide; finite values must be within ``tol``. Returns a JSON-able verdict."""
    yk, yr = y_kernel.float(), y_ref.float()
    nan_ok = torch.equal(torch.isnan(yk), torch.isnan(yr))
    fin = ~torch.isnan(yr)
    diff = (yk[fin] - yr[fin]).abs()
    excess = (diff - tol[fin]).max().item() if diff.numel() else 0.0
    return {
        "ok": bool(nan_ok and excess <= 0),
        "nan_ok": nan_ok,
        "max_abs_diff": diff.max().item() if diff.numel() else 0.0,
        "max_excess": excess,
        "bit_equal": bool(torch.equal(yk.view(-1).nan_to_num(), yr.view(-1).nan_to_num()) and nan_ok),
    }


# ----------------------------------------------------------------------------- interpreter cases
@dataclass(frozen=True)
class Case:
    path: str  # "gemv" | "dequant" | None (launcher's choice)
    m: int
    n: int
    k: int
    dtype: str = "bfloat16"
    bias: bool = False
    split_k: int | None = None  # gemv only; None = heuristic
    kind: str = "random"  # random | exact | nan | lead | strided | determinism
    seed: int = 0

    @property
    def id(self) -> str:
        sk = "" if self.split_k is None else f"-sk{self.split_k}"
        b = "-bias" if self.bias else ""
        return f"{self.kind}-{self.path}-m{self.m}n{self.n}k{self.k}-{self.dtype}{b}{sk}"


def _build_cases() -> list[Case]:
    cases, i = [], 0
    for m in (1, 2, 3, 5, 8, 16):
        for n in (8, 40, 96):
            for k in (32, 64, 96, 160, 40):
                # Alternate dtype / bias / split so every value meets every other often.
                dtype = ("bfloat16", "float16")[i % 2]
                bias = (i // 2) % 2 == 1
                split_k = (1, None, 3, 8)[i % 4]  # 8 > #blocks for small K: empty splits
                cases.append(Case("gemv", m, n, k, dtype, bias, split_k, seed=i))
                i += 1
    for m in (17, 64):
        for n in (8, 96):
            for k in (32, 160, 40):
                cases.append(Case("dequant", m, n, k, ("bfloat16", "float16")[i % 2], i % 3 == 0, seed=i))
                i += 1
    cases += [
        Case("dequant", 20, 40, 40, "bfloat16", True, seed=1),
        Case("dequant", 3, 96, 160, "float16", False, seed=2),
        Case("gemv", 3, 40, 96, "float32", True, 2, seed=3),
        Case("dequant", 33, 40, 96, "float32", True, seed=4),
        Case(None, 1, 40, 64, seed=5),  # launcher picks gemv
        Case(None, 40, 40, 64, "float16", True, seed=6),  # launcher picks dequant (M > 16)
        Case("gemv", 6, 40, 96, "bfloat16", True, 3, kind="lead"),  # x [2, 3, K]
        Case("dequant", 24, 40, 96, "float16", False, kind="lead"),  # x [2, 12, K]
        Case("gemv", 4, 40, 96, "bfloat16", False, 2, kind="strided"),  # rows of a wider buffer
        Case("dequant", 20, 40, 96, "bfloat16", True, kind="strided"),
        Case("gemv", 5, 40, 96, "bfloat16", True, 3, kind="nan"),  # one scale byte 255
        Case("dequant", 20, 40, 96, "bfloat16", False, kind="nan"),
        Case("gemv", 5, 40, 64, "float16", True, 3, kind="exact"),
        Case("gemv", 16, 96, 160, "float16", False, 1, kind="exact"),
        Case("gemv", 8, 40, 64, "float32", False, None, kind="exact"),
        Case("gemv", 3, 96, 160, "bfloat16", True, 3, kind="determinism"),
    ]
    return cases


CASES = _build_cases()


def _case_inputs(c: Case):
    dtype = getattr(torch, c.dtype)
    g = torch.Generator().manual_seed(1000 + c.seed)
    if c.kind == "exact":
        # Sums of products in {0, +-0.25, ..., +-6} stay below 2^11 quarter-units: every partial
        # sum is exact in fp32 and the result exact in fp16, whatever the summation order.
        packed, scales = random_mxfp4(c.n, c.k, c.seed, scale_lo=126, scale_hi=127)
        x = torch.randint(-1, 2, (c.m, c.k), generator=g).to(dtype)
        bias = torch.randint(-4, 5, (c.n,), generator=g).to(dtype) if c.bias else None
        return x, packed, scales, bias
    packed, scales = random_mxfp4(c.n, c.k, c.seed)
    if c.kind == "nan":
        scales[c.n // 2, scales.shape[1] - 1] = 255
    x = torch.randn(c.m, c.k, generator=g).to(dtype)
    if c.kind == "lead":
        x = x.reshape(2, c.m // 2, c.k)
    elif c.kind == "strided":
        x = torch.randn(c.m, c.k + 24, generator=g).to(dtype)[:, 8 : 8 + c.k]  # row stride K + 24
    bias = torch.randn(c.n, generator=g).to(dtype) if c.bias else None
    return x, packed, scales, bias


def launcher_path(path: str | None, m: int) -> str:
    """The path ``mxfp4_matmul_triton`` runs: ``path`` if forced, else gemv up to 16 rows, dequant above."""
    return path or ("gemv" if m <= 16 else "dequant")


def _run_case(c: Case) -> dict:
    from vllm_specqd.kernels import mxfp4_matmul_triton

    x, packed, scales, bias = _case_inputs(c)
    y = mxfp4_matmul_triton(x, packed, scales, bias, force_path=c.path, split_k=c.split_k)
    y_ref = mxfp4_matmul_torch(x, packed, scales, bias)
    if y.shape != y_ref.shape or y.dtype != y_ref.dtype:
        return {"ok": False, "error": f"got {y.dtype} {list(y.shape)}, want {y_ref.dtype} {list(y_ref.shape)}"}
    x2d = x.reshape(-1, c.k)
    w = dequantize_mxfp4(packed, scales, k=c.k).nan_to_num()  # NaN positions are compared apart
    dequant = launcher_path(c.path, x2d.shape[0]) == "dequant"
    tol = gemm_tolerance(x2d, w, bias, y.reshape(-1, c.n), y_ref.reshape(-1, c.n), y.dtype, extra_ulps=int(dequant))
    verdict = compare(y.reshape(-1, c.n), y_ref.reshape(-1, c.n), tol)
    if c.kind == "exact":
        verdict["ok"] = verdict["bit_equal"]
    if c.kind == "nan":
        verdict["ok"] = verdict["ok"] and bool(torch.isnan(y).any())
    if c.kind == "determinism":
        again = mxfp4_matmul_triton(x, packed, scales, bias, force_path=c.path, split_k=c.split_k)
        verdict["ok"] = verdict["ok"] and torch.equal(again, y)
    return verdict


def _run_dequant_checks() -> dict:
    """Bit-exactness of the in-kernel decode against the format module (every code x every byte)."""
    from vllm_specqd.kernels import mxfp4_dequant_triton

    out = {}
    # Row r has scale byte r in every block and all 16 codes in each block, shifted per row.
    codes = (torch.arange(64)[None, :] + torch.arange(256)[:, None]) % 16  # [256, 64]
    packed = pack_fp4(codes.to(torch.uint8)).contiguous()  # [256, 32]
    scales = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 2).contiguous()  # [256, 2]
    got = mxfp4_dequant_triton(packed, scales)
    want = dequantize_mxfp4(packed, scales)
    same_nan = torch.equal(torch.isnan(got), torch.isnan(want))
    bits_equal = torch.equal(got.nan_to_num().view(torch.int32), want.nan_to_num().view(torch.int32))
    out["exhaustive_fp32"] = {"ok": bool(same_nan and bits_equal), "nan_rows": int(torch.isnan(got).any(1).sum())}
    # A full 32x32 tile with K not a multiple of 32, and bf16 output (exact in normal range).
    packed, scales = random_mxfp4(32, 40, seed=7)
    got = mxfp4_dequant_triton(packed, scales, k=40, dtype=torch.bfloat16)
    want = dequantize_mxfp4(packed, scales, k=40, dtype=torch.bfloat16)
    out["tile_bf16_k40"] = {"ok": bool(got.shape == (32, 40) and torch.equal(got, want))}
    return out


def _interp_worker() -> None:
    import triton

    results = {c.id: _run_case(c) for c in CASES}
    results.update(_run_dequant_checks())
    results["__meta__"] = {"triton": triton.__version__}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--interp-worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_interpreter_matches_twin(interp_results, case):
    verdict = interp_results[case.id]
    assert verdict["ok"], f"{case}: {verdict}"


@needs_triton
@pytest.mark.parametrize("check", ["exhaustive_fp32", "tile_bf16_k40"])
def test_triton_dequant_bit_exact(interp_results, check):
    verdict = interp_results[check]
    assert verdict["ok"], verdict
    if check == "exhaustive_fp32":
        assert verdict["nan_rows"] == 1  # scale byte 255 only


# ----------------------------------------------------------------------------- twin + public API (CPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [32, 40, 160])
def test_twin_is_fp32_matmul_of_format_dequant(dtype, k):
    packed, scales = random_mxfp4(24, k, seed=k)
    x = torch.randn(2, 3, k).to(dtype)
    bias = torch.randn(24).to(dtype)
    y = mxfp4_matmul_torch(x, packed, scales, bias)
    w = dequantize_mxfp4(packed, scales, k=k)
    want = (x.float().reshape(-1, k) @ w.t() + bias.float()).to(dtype).reshape(2, 3, 24)
    assert y.dtype == dtype and torch.equal(y, want)


def test_twin_matches_quantized_weight_and_worked_example():
    w = torch.tensor([[0.5, -2.0] + [0.0] * 30, [6.0, 1.0] + [0.0] * 30])
    q = quantize_mxfp4(w)
    x = torch.tensor([[2.0, 1.0] + [0.0] * 30], dtype=torch.bfloat16)
    assert mxfp4_matmul(x, q.packed, q.scales).tolist() == [[-1.0, 13.0]]
    # A real weight: close to the unquantized product (MXFP4 error, not a kernel bound).
    w = torch.randn(64, 96)
    q = quantize_mxfp4(w)
    x = torch.randn(5, 96)
    rel = (mxfp4_matmul_torch(x, q.packed, q.scales) - x @ w.t()).norm() / (x @ w.t()).norm()
    assert rel < 0.2


def test_public_entry_on_cpu_runs_the_native_kernel_else_the_twin():
    from vllm_specqd.kernels.cpu_ops import mxfp4_linear_cpu

    packed, scales = random_mxfp4(40, 96, seed=3)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    bias = torch.randn(40, dtype=torch.bfloat16)
    native = mxfp4_linear_cpu(x, packed, scales, bias, act_bits=16)
    assert torch.equal(mxfp4_matmul(x, packed, scales, bias), native)
    # fp16 activations have no native path: the torch twin, exactly.
    assert torch.equal(
        mxfp4_matmul(x.half(), packed, scales, bias.half()), mxfp4_matmul_torch(x.half(), packed, scales, bias.half())
    )


def test_empty_batch_and_noncontiguous_x():
    packed, scales = random_mxfp4(8, 64, seed=4)
    assert mxfp4_matmul(torch.empty(0, 64), packed, scales).shape == (0, 8)
    x = torch.randn(64, 5).t()  # [5, 64], stride along K is 5
    assert torch.equal(mxfp4_matmul(x, packed, scales), mxfp4_matmul(x.contiguous(), packed, scales))


def _bad_inputs():
    packed, scales = random_mxfp4(8, 64, seed=5)  # [8, 32], [8, 2]
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    return [
        ("x-int", dict(x=x.to(torch.int32)), "x must be a bf16/fp16/fp32"),
        ("x-fp64", dict(x=x.double()), "x must be a bf16/fp16/fp32"),
        ("packed-int8", dict(packed=packed.view(torch.int8)), "packed must be uint8 [N, K_pad/2]"),
        ("packed-1d", dict(packed=packed.reshape(-1)), "packed must be uint8 [N, K_pad/2]"),
        ("k-mismatch", dict(x=torch.randn(3, 96, dtype=torch.bfloat16)), "for x's K=96"),
        ("k-mismatch-pad", dict(x=torch.randn(3, 65, dtype=torch.bfloat16)), "(K_pad=96)"),
        ("scales-shape", dict(scales=scales[:, :1].contiguous()), "scales must be uint8 [N, K_pad/32] = [8, 2]"),
        ("scales-dtype", dict(scales=scales.float()), "scales must be uint8"),
        ("packed-noncontig", dict(packed=torch.zeros(32, 8, dtype=torch.uint8).t()), "packed must be contiguous"),
        ("scales-noncontig", dict(scales=torch.zeros(2, 8, dtype=torch.uint8).t()), "scales must be contiguous"),
        ("bias-shape", dict(bias=torch.zeros(9)), "bias must be a floating-point [N] = [8]"),
        ("bias-int", dict(bias=torch.zeros(8, dtype=torch.int32)), "bias must be a floating-point"),
        ("bias-noncontig", dict(bias=torch.zeros(8, 2)[:, 0]), "bias must be contiguous"),
        ("device", dict(packed=packed.to("meta")), "packed is on meta but x is on cpu"),
    ], dict(x=x, packed=packed, scales=scales, bias=None)


_BAD, _GOOD = _bad_inputs()


@pytest.mark.parametrize("fn", [mxfp4_matmul, mxfp4_matmul_torch, check_mxfp4_matmul_inputs])
@pytest.mark.parametrize("name,override,message", _BAD, ids=[b[0] for b in _BAD])
def test_input_errors_are_clear(fn, name, override, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        fn(**{**_GOOD, **override})


@needs_triton
def test_triton_launcher_argument_errors():
    from vllm_specqd.kernels import mxfp4_matmul_triton

    with pytest.raises(ValueError, match="force_path must be one of"):
        mxfp4_matmul_triton(**_GOOD, force_path="fast")
    with pytest.raises(ValueError, match="gemv path takes M <= 16"):
        mxfp4_matmul_triton(
            torch.randn(17, 64, dtype=torch.bfloat16), _GOOD["packed"], _GOOD["scales"], force_path="gemv"
        )
    with pytest.raises(ValueError, match="split_k"):
        mxfp4_matmul_triton(**_GOOD, force_path="dequant", split_k=2)
    with pytest.raises(ValueError, match="split_k"):
        mxfp4_matmul_triton(**_GOOD, split_k=0)
    with pytest.raises(ValueError, match="packed must be uint8"):
        mxfp4_matmul_triton(**{**_GOOD, "packed": _GOOD["packed"].view(torch.int8)})


@needs_triton
def test_triton_launcher_rejects_cpu_tensors_when_compiling():
    from vllm_specqd.kernels import triton_mxfp4 as mxfp4_triton

    if mxfp4_triton.INTERPRET:
        pytest.skip("this process imported the kernels in interpreter mode")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        mxfp4_triton.mxfp4_matmul_triton(**_GOOD)


@needs_triton
def test_split_k_heuristic_fills_an_h100():
    from vllm_specqd.kernels.triton_mxfp4 import gemv_block_n, gemv_split_k

    # More x rows -> wider tiles (x is re-read from L2 once per tile); 16 rows at least (MMA).
    assert 16 <= gemv_block_n(1) <= gemv_block_n(16)
    shapes = [
        (6144, 4096),
        (4096, 4096),
        (28672, 4096),
        (4096, 14336),
        (10240, 8192),
        (8192, 8192),
        (57344, 8192),
        (8192, 28672),
    ]
    for n, k in shapes:
        for block_n in (16, 32, 64):
            kb = k // 32
            s = gemv_split_k(n, kb, block_n, num_sms=132)
            tiles = -(-n // block_n)
            assert 1 <= s <= 32 and kb // s >= 8
            assert tiles * s >= 2 * 132 or s == min(kb // 8, 32)
            if tiles >= 2 * 132:
                assert s == 1  # no second launch when the row tiles fill the GPU
            else:  # programs spread evenly: within 90% of one full wave per SM
                programs = tiles * s
                assert programs / (132 * -(-programs // 132)) >= 0.85
    # 8B down at 32 rows per tile: 128 tiles x 3 = 384 programs; o at 64: 64 x 6; gate_up: no split.
    assert gemv_split_k(4096, 448, 32, 132) == 3 and gemv_split_k(4096, 128, 64, 132) == 6
    assert gemv_split_k(28672, 128, 32, 132) == 1 and gemv_split_k(28672, 128, 64, 132) == 1


# ----------------------------------------------------------------------------- CUDA (real kernels)
_CUDA_CASES = (
    [c for c in CASES if c.kind in ("random", "exact", "nan", "lead", "strided")][::3]
    + [Case(None, m, 4096, 4096, dt, True, seed=m) for m in (1, 4, 16, 64, 1024) for dt in ("bfloat16", "float16")]
    + [Case("gemv", 1, 4096, 14336, "bfloat16", False, None, seed=9)]
    # The decode kernel at real shapes and on every input kind (its bf16 math and MMA only run here).
    + [Case("gemv", m, 28672, 4096, "bfloat16", m == 16, None, seed=20 + m) for m in (1, 5, 16)]
    + [Case("gemv", 3, 4096, 14336, "bfloat16", True, None, seed=30)]  # split-K + bias
    + [
        Case("gemv", 5, 40, 96, "bfloat16", True, 3, kind="nan"),
        Case("gemv", 4, 96, 160, "float16", True, None, kind="nan", seed=7),
        Case("gemv", 16, 96, 160, "float16", False, 1, kind="exact"),
        Case("gemv", 16, 96, 160, "bfloat16", False, 1, kind="exact", seed=8),
        Case("gemv", 8, 40, 64, "float32", False, None, kind="exact"),
        Case("gemv", 3, 40, 96, "float32", True, 2, seed=3),
        Case("gemv", 6, 40, 96, "bfloat16", True, 3, kind="lead"),
        Case("gemv", 4, 40, 96, "bfloat16", False, 2, kind="strided"),
        Case("gemv", 2, 96, 40, "float16", True, None, seed=11),  # K not a multiple of 32
    ]
)


@pytest.mark.cuda
@cuda
@needs_triton
@pytest.mark.parametrize("case", _CUDA_CASES, ids=lambda c: c.id)
def test_triton_cuda_matches_twin(case):
    from vllm_specqd.kernels import mxfp4_matmul_triton

    x, packed, scales, bias = (t.cuda() if t is not None else None for t in _case_inputs(case))
    y = mxfp4_matmul_triton(x, packed, scales, bias, force_path=case.path, split_k=case.split_k)
    y_ref = mxfp4_matmul_torch(x, packed, scales, bias)
    # The public entry runs the Triton launcher's own path choice on CUDA (deterministic); NaN outputs
    # (the "nan" cases) must match as NaN, which torch.equal never says.
    torch.testing.assert_close(
        mxfp4_matmul(x, packed, scales, bias),
        mxfp4_matmul_triton(x, packed, scales, bias),
        rtol=0,
        atol=0,
        equal_nan=True,
    )
    w = dequantize_mxfp4(packed, scales, k=case.k).nan_to_num()
    x2d, n = x.reshape(-1, case.k), case.n
    tol = gemm_tolerance(
        x2d,
        w,
        bias,
        y.reshape(-1, n),
        y_ref.reshape(-1, n),
        y.dtype,
        u=2.0**-22,
        extra_ulps=1 if launcher_path(case.path, x2d.shape[0]) == "dequant" else 0,
    )
    verdict = compare(y.reshape(-1, n), y_ref.reshape(-1, n), tol)
    if case.kind == "exact":
        assert verdict["bit_equal"], verdict
    assert verdict["ok"], verdict
    again = mxfp4_matmul_triton(x, packed, scales, bias, force_path=case.path, split_k=case.split_k)
    assert torch.equal(again, y)  # deterministic split-K


@pytest.mark.cuda
@cuda
@needs_triton
def test_triton_cuda_dequant_bit_exact():
    from vllm_specqd.kernels import mxfp4_dequant_triton

    codes = (torch.arange(64)[None, :] + torch.arange(256)[:, None]) % 16
    packed = pack_fp4(codes.to(torch.uint8)).contiguous().cuda()
    scales = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 2).contiguous().cuda()
    got, want = mxfp4_dequant_triton(packed, scales), dequantize_mxfp4(packed, scales)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num().view(torch.int32), want.nan_to_num().view(torch.int32))


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    _interp_worker()
