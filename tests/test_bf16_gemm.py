"""specqd's few-row bf16 GEMM (kernels/cpu/bf16_gemm.h) and the hook that gives it to vLLM's linears.

Tolerance, derived: the kernel sums fp32 products in 8 lanes over K/8 steps, then 8 lanes, then the
K tail, so |fp32 sum - exact| <= (K/8 + 8 + K%8) * 2^-24 * sum|x w|; one bf16 rounding adds
2^-8 |y| (half an ulp is 2^-9; doubled for the rounded-sum's own error). Batch invariance is exact.
"""

from __future__ import annotations

import pytest
import torch

from vllm_specqd.kernels import cpu_ops
from vllm_specqd.kernels.reference import bf16_linear_torch

# (M, N, K): K % 8 != 0 tails, N odd (feature tail of the 2-row tiles), M across the 4-row tiles.
SHAPES = [(1, 1, 8), (1, 7, 13), (2, 33, 96), (3, 17, 200), (4, 64, 576), (5, 9, 1001), (8, 21, 896), (17, 40, 160)]


def _case(m, n, k, seed, bias_dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    bias = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return x, w, bias


def _bound(x, w, bias):
    k = x.shape[1]
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    abs_terms = x.double().abs() @ w.double().abs().T
    return exact, (k // 8 + 8 + k % 8) * 2.0**-24 * abs_terms + 2.0**-8 * exact.abs() + 1e-30


@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32], ids=["nobias", "bias-bf16", "bias-fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_is_within_the_derived_bound_of_exact_math(shape, bias_dtype):
    x, w, bias = _case(*shape, seed=sum(shape), bias_dtype=bias_dtype)
    y = cpu_ops.bf16_linear_cpu(x, w, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (shape[0], shape[1])
    exact, bound = _bound(x, w, bias)
    excess = ((y.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"kernel exceeds its error bound by {excess:.3g}"
    twin_exact, twin_bound = _bound(x, w, bias)
    assert ((bf16_linear_torch(x, w, bias).double() - twin_exact).abs() <= twin_bound).all()


@pytest.mark.parametrize("k", [896, 1001])
def test_each_row_is_bit_identical_whatever_the_batch(k):
    x, w, bias = _case(13, 37, k, seed=7, bias_dtype=torch.bfloat16)
    whole = cpu_ops.bf16_linear_cpu(x, w, bias)
    for start, stop in [(0, 1), (3, 4), (2, 9), (5, 13), (12, 13)]:
        part = cpu_ops.bf16_linear_cpu(x[start:stop].contiguous(), w, bias)
        assert torch.equal(part, whole[start:stop]), f"rows {start}:{stop} differ when run apart"


def test_leading_dims_and_non_contiguous_input():
    x, w, _ = _case(6, 24, 64, seed=3, bias_dtype=None)
    y = cpu_ops.bf16_linear_cpu(x.reshape(2, 3, 64), w)
    assert y.shape == (2, 3, 24) and torch.equal(y.reshape(6, 24), cpu_ops.bf16_linear_cpu(x, w))
    wide = torch.cat([x, x], dim=1)[:, :64]  # non-contiguous view
    assert torch.equal(cpu_ops.bf16_linear_cpu(wide, w), cpu_ops.bf16_linear_cpu(x, w))


def test_launcher_errors_name_the_argument():
    x, w, _ = _case(2, 8, 32, seed=1, bias_dtype=None)
    with pytest.raises(ValueError, match="must be bfloat16"):
        cpu_ops.bf16_linear_cpu(x.float(), w)
    with pytest.raises(ValueError, match="disagree"):
        cpu_ops.bf16_linear_cpu(x[:, :16], w)
    with pytest.raises(RuntimeError, match="bias must be"):
        cpu_ops.bf16_linear_cpu(x, w, torch.zeros(7))


class _Linear(torch.nn.Module):
    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(48, 64).to(dtype), requires_grad=False)


def _dispatch(layer, additional_config, monkeypatch, mode=None):
    """vLLM's real dispatch_cpu_unquantized_gemm (patched by the plugin) inside an engine's config."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import utils

    from vllm_specqd.adapter.plugin import register

    register()
    if mode is not None:
        monkeypatch.setenv("VLLM_SPECQD_BF16_GEMM", mode)
    config = VllmConfig()
    config.additional_config = additional_config
    with set_current_vllm_config(config):
        utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    return layer


def _gemm_name(layer) -> str:
    return getattr(layer.cpu_linear, "__name__", "?")


@pytest.fixture(scope="module")
def vllm_falls_back_for_bf16():
    from vllm.model_executor.layers import utils

    from vllm_specqd.adapter import vllm_internals

    layer = _Linear()
    dispatch = getattr(utils.dispatch_cpu_unquantized_gemm, "__specqd_original__", utils.dispatch_cpu_unquantized_gemm)
    dispatch(layer, remove_weight=True)
    if not vllm_internals.uses_torch_fallback_gemm(layer):
        pytest.skip("vLLM's oneDNN handles bf16 on this CPU: nothing to replace")


def test_specqd_engines_get_the_kernel_where_vllm_falls_back(vllm_falls_back_for_bf16, monkeypatch):
    from vllm.model_executor.layers.utils import cpu_unquantized_gemm

    layer = _dispatch(_Linear(), {"specqd": {"num_speculative_tokens": 4}}, monkeypatch)
    assert _gemm_name(layer) == "specqd_bf16_gemm"
    x = torch.randn(7, 64).bfloat16()
    assert torch.equal(cpu_unquantized_gemm(layer, x, layer.weight), cpu_ops.bf16_linear_cpu(x, layer.weight))


def test_other_engines_keep_vllms_gemm_unless_asked(vllm_falls_back_for_bf16, monkeypatch):
    assert _gemm_name(_dispatch(_Linear(), {}, monkeypatch)) == "<lambda>"
    assert _gemm_name(_dispatch(_Linear(), {}, monkeypatch, mode="all")) == "specqd_bf16_gemm"
    assert _gemm_name(_dispatch(_Linear(), {"specqd": {"k": 1}}, monkeypatch, mode="off")) == "<lambda>"
    fp32 = _dispatch(_Linear(torch.float32), {"specqd": {"k": 1}}, monkeypatch, mode="all")
    assert _gemm_name(fp32) != "specqd_bf16_gemm"  # oneDNN takes fp32


def test_a_bad_mode_is_a_clear_error(vllm_falls_back_for_bf16, monkeypatch):
    with pytest.raises(ValueError, match="VLLM_SPECQD_BF16_GEMM='fast': use one of auto, all, off"):
        _dispatch(_Linear(), {"specqd": {"k": 1}}, monkeypatch, mode="fast")
