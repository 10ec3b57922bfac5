"""Fused CPU modules for the MXFP4 draft only; the target keeps vLLM's own.

On x86 CPUs vLLM runs RMSNorm and SiLU-and-mul as chains of native torch ops (its IR picks the
``native`` RMSNorm there, vllm/kernels/vllm_c.py:23-24, and SiluAndMul.forward_cpu calls
forward_native, vllm/model_executor/layers/activation.py:156-159), which in eager mode costs more
than the draft's MXFP4 linears. vLLM's CPU build ships fused kernels for both
(``torch.ops._C.rms_norm``, ``fused_add_rms_norm``, ``silu_and_mul``); the draft uses them. Its
numerics are free (the target verifies every token), and the target's modules stay untouched, so
no output of the engine changes. The norm weights stay the target's tensors (no extra bytes).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def fused_cpu_ops_available() -> bool:
    return all(hasattr(torch.ops._C, op) for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul"))


class FusedRMSNorm(nn.Module):
    """``RMSNorm`` through ``torch.ops._C`` for 2-D contiguous inputs; anything else goes to ``fallback``."""

    def __init__(self, fallback: nn.Module):
        super().__init__()
        self.fallback = fallback  # the target's module: its weight, and the path for odd inputs
        self.eps = fallback.variance_epsilon

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
            torch.ops._C.rms_norm(out, x, weight, self.eps)
            return out
        if not residual.is_contiguous():
            return self.fallback(x, residual)
        # In place, as vLLM's fused op: x <- norm(x + residual), residual <- x + residual.
        torch.ops._C.fused_add_rms_norm(x, residual, weight, self.eps)
        return x, residual


class FusedSiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` in one kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., 2d] -> [..., d]
        out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
        torch.ops._C.silu_and_mul(out, x.contiguous())
        return out


def call_attention_directly(draft: nn.Module) -> int:
    """Eager engines only: the draft's attention layers call vLLM's attention functions directly.

    On CPU vLLM routes every attention through two opaque torch custom ops
    (CpuPlatform.opaque_attention_op, vllm/platforms/cpu.py:619), which only torch.compile needs;
    in eager mode the dispatcher round trip costs more than the attention kernel itself. The
    functions are the same (``Attention.use_direct_call``, vllm/model_executor/layers/attention/
    attention.py:440 and :540-558).
    """
    from vllm.model_executor.layers.attention.attention import Attention

    layers = [m for m in draft.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.use_direct_call = True
    return len(layers)


POISON_KV_ENV = "VLLM_SPECQD_POISON_DRAFT_KV"


def poison_kv_writes(draft: nn.Module) -> int:
    """Test hook: every KV write of the draft stores large random values instead of its keys/values.

    With a shared KV cache the target must overwrite every slot the draft wrote before attending
    to it; if one draft write leaked into a committed or prefix-cached slot, greedy outputs would
    change. Drafts made from poisoned KV are poor, never wrong: the target verifies them.
    """
    from vllm.model_executor.layers.attention.attention import Attention

    layers = [m for m in draft.modules() if isinstance(m, Attention)]
    for layer in layers:
        write = layer.impl.do_kv_cache_update

        def poisoned(attn_layer, key, value, kv_cache, slot_mapping, write=write):
            write(attn_layer, torch.randn_like(key) * 100, torch.randn_like(value) * 100, kv_cache, slot_mapping)

        layer.impl.do_kv_cache_update = poisoned
    return len(layers)


def use_fused_cpu_modules(draft: nn.Module) -> int:
    """Swap the draft's plain RMSNorm / SiluAndMul modules for the fused ones; returns how many."""
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.layernorm import RMSNorm

    swaps = []
    for name, module in draft.named_modules():
        plain_norm = type(module) is RMSNorm and module.variance_size_override is None and module.has_weight
        if plain_norm:
            swaps.append((name, FusedRMSNorm(module)))
        elif type(module) is SiluAndMul:
            swaps.append((name, FusedSiluAndMul()))
    for name, replacement in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(draft.get_submodule(parent_name) if parent_name else draft, child, replacement)
    return len(swaps)
