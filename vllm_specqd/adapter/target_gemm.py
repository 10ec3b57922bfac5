"""specqd's few-row bf16 GEMM for linears where vLLM falls back to torch (CPUs without AVX-512 BF16).

There, torch's bf16 GEMM costs about one decode step per row, so verifying K draft tokens costs
about K+1 decode steps and no speculation can pay. ``kernels/cpu/bf16_gemm.h`` reads each weight
once for up to 4 rows and is batch invariant (numbers: benchmarks/README.md).

``VLLM_SPECQD_BF16_GEMM``: ``auto`` (default; engines with ``method: specqd``), ``all`` (every
engine in this environment, e.g. a no-speculation baseline that gets the same GEMM), ``off``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
from vllm.config import get_current_vllm_config_or_none

from vllm_specqd.adapter import vllm_internals as internals

BF16_GEMM_ENV = "VLLM_SPECQD_BF16_GEMM"
BF16_GEMM_MODES = ("auto", "all", "off")

logger = logging.getLogger("vllm.vllm_specqd.target_gemm")
_installed = 0


def bf16_gemm_mode() -> str:
    mode = os.environ.get(BF16_GEMM_ENV, "auto").strip().lower() or "auto"
    if mode not in BF16_GEMM_MODES:
        raise ValueError(f"{BF16_GEMM_ENV}={mode!r}: use one of {', '.join(BF16_GEMM_MODES)}")
    return mode


def _specqd_engine() -> bool:
    vllm_config = get_current_vllm_config_or_none()
    extra = getattr(vllm_config, "additional_config", None)
    return isinstance(extra, dict) and bool(extra.get("specqd"))


def maybe_use_specqd_bf16_gemm(layer: nn.Module) -> bool:
    """Give ``layer`` specqd's bf16 GEMM if vLLM just gave it the torch fallback; True if it did."""
    global _installed
    mode = bf16_gemm_mode()
    if mode == "off" or (mode == "auto" and not _specqd_engine()):
        return False
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return False
    if weight.numel() == 0 or weight.device.type != "cpu" or not internals.uses_torch_fallback_gemm(layer):
        return False
    from vllm_specqd.kernels.cpu_ops import load_native, native_available

    if not native_available():
        return False
    fallback = internals.cpu_gemm(layer)
    op = getattr(torch.ops, load_native()).bf16_linear  # cpu_ops.bf16_linear_cpu without its per-call checks

    def specqd_bf16_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
            return fallback(x, weight, bias)
        y = op(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)  # [T, N]
        return y.view(*x.shape[:-1], y.shape[-1])

    internals.set_cpu_gemm(layer, specqd_bf16_gemm)
    if _installed == 0:
        logger.info("specqd: bf16 linears use specqd's bf16 GEMM (vLLM's oneDNN declined bf16 on this CPU)")
    _installed += 1
    return True


def installed_count() -> int:
    """Layers of this process that got specqd's bf16 GEMM."""
    return _installed
