"""Fused CPU modules for the MXFP4 draft only; the target keeps vLLM's own.

On x86 CPUs vLLM runs RMSNorm and SiLU-and-mul as chains of native torch ops (its IR picks the
``native`` RMSNorm there, vllm/kernels/vllm_c.py:24, and SiluAndMul.forward_cpu calls
forward_native, vllm/model_executor/layers/activation.py:156), which in eager mode costs more than
the draft's MXFP4 linears. vLLM's CPU build ships fused kernels for both (``rms_norm``,
``fused_add_rms_norm``, ``silu_and_mul`` in ``torch.ops._C``, reached through vllm_internals); the draft uses them. Its numerics are free (the target
verifies every token) and the target's modules stay untouched, so no output of the engine changes.
The norm weights stay the target's tensors (no extra bytes).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vllm_specqd.adapter import vllm_internals as internals

POISON_KV_ENV = "VLLM_SPECQD_POISON_DRAFT_KV"  # test hook: the draft writes random KV


fused_cpu_ops_available = internals.fused_cpu_ops_available


class FusedRMSNorm(nn.Module):
    """RMSNorm through ``torch.ops._C`` for 2-D contiguous inputs; anything else goes to ``fallback``."""

    def __init__(self, fallback: nn.Module, eps: float):
        super().__init__()
        self.fallback = fallback  # the target's module: its weight, and the path for odd inputs
        self.eps = eps

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        residual: torch.Tensor | None = None,  # [T, H]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weight = self.fallback.weight
        if x.dim() != 2 or not x.is_contiguous() or weight.dtype != x.dtype:
            return self.fallback(x, residual)
        if residual is None:
            out = torch.empty_like(x)
            internals.cpu_rms_norm(out, x, weight, self.eps)
            return out
        if not residual.is_contiguous():
            return self.fallback(x, residual)
        # In place, as vLLM's fused op: x <- norm(x + residual), residual <- x + residual.
        internals.cpu_fused_add_rms_norm(x, residual, weight, self.eps)
        return x, residual


class FusedSiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` in one kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., 2d] -> [..., d]
        out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
        internals.cpu_silu_and_mul(out, x.contiguous())
        return out


def use_fused_cpu_modules(draft: nn.Module) -> int:
    """Swap the draft's plain RMSNorm / SiluAndMul modules for the fused ones; returns how many."""
    swaps = []
    for name, module in draft.named_modules():
        eps = internals.plain_rms_norm_eps(module)
        if eps is not None:
            swaps.append((name, FusedRMSNorm(module, eps)))
        elif internals.is_silu_and_mul(module):
            swaps.append((name, FusedSiluAndMul()))
    for name, replacement in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(draft.get_submodule(parent_name) if parent_name else draft, child, replacement)
    return len(swaps)


class PlatformCustomOp(nn.Module):
    """Calls a vLLM CustomOp's CPU kernel, whatever the engine's custom-op setting.

    A compiled engine disables vLLM's custom ops (inductor fuses their torch-native forms), so a
    draft kept eager in it would run rotary embeddings as a dozen small torch ops per layer. The op
    may be the target's own object (vLLM caches rotary embeddings), so it is wrapped, not changed.
    """

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, *args, **kwargs):
        return self.op.forward_cpu(*args, **kwargs)


def use_platform_custom_ops(draft: nn.Module, target: nn.Module) -> int:
    """Wrap the draft's remaining CustomOps (not already fused) in PlatformCustomOp; returns how many.

    Modules the draft shares with ``target`` (embeddings, norms, lm_head) are left as they are."""
    target_modules = {id(m) for m in target.modules()}
    swaps = []
    for module in draft.modules():
        if id(module) in target_modules or isinstance(module, (FusedRMSNorm, FusedSiluAndMul, PlatformCustomOp)):
            continue
        for child_name, child in module.named_children():
            if internals.is_custom_op(child):
                swaps.append((module, child_name, PlatformCustomOp(child)))
    for parent, child_name, replacement in swaps:
        setattr(parent, child_name, replacement)
    return len(swaps)
