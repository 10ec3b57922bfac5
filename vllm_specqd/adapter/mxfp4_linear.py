"""vLLM linear method for the MXFP4 self-draft (quantization name ``specqd_mxfp4``).

The draft never loads a checkpoint: its MXFP4 bytes are made from the target's
weights in memory (``draft_builder.py``), so ``create_weights`` only allocates
the packed buffers and refuses checkpoint loading. On CUDA ``apply`` runs the
Triton kernels; on CPU the native kernel (``draft.cpu_kernel``: W4A16 or W4A8),
the AMX kernel (``amx``: the same bytes repacked once, bf16 activations), or, as a
debugging aid, a once-dequantized copy through vLLM's CPU GEMM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.model_executor.utils import set_weight_attrs

from vllm_specqd.adapter import vllm_internals
from vllm_specqd.kernels import mxfp4_matmul
from vllm_specqd.mxfp4 import BLOCK_SIZE, dequantize_mxfp4

ACT_BITS = {"w4a16": 16, "w4a8": 8}
AMX = "amx"

QUANT_NAME = "specqd_mxfp4"


def _refuse_checkpoint_load(param: torch.Tensor, loaded_weight: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        "specqd_mxfp4 weights are made from the target's weights in memory and cannot be "
        "loaded from a checkpoint; use it through the 'specqd' speculative method."
    )


class MXFP4LinearMethod(LinearMethodBase):
    """Weight-only MXFP4: ``weight_packed`` [N, K_pad/2] uint8, ``weight_scale`` [N, K_pad/32] uint8."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        n = sum(output_partition_sizes)
        k_pad = -(-input_size_per_partition // BLOCK_SIZE) * BLOCK_SIZE
        # Placeholders: draft_builder swaps in the tensors quantized from the target.
        packed = Parameter(torch.empty(n, k_pad // 2, dtype=torch.uint8), requires_grad=False)
        scales = Parameter(torch.empty(n, k_pad // BLOCK_SIZE, dtype=torch.uint8), requires_grad=False)
        for name, param in (("weight_packed", packed), ("weight_scale", scales)):
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"weight_loader": _refuse_checkpoint_load})
        layer.specqd_in_features = input_size_per_partition

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_mxfp4(layer, x, bias)


def apply_mxfp4(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a layer finalized by :func:`finalize_mxfp4_layer`."""
    amx_n = getattr(layer, "specqd_amx_n", None)
    if amx_n is not None:  # weight_packed holds the AMX layout; the op asserts its inputs
        y = torch.ops.specqd.mxfp4_linear_amx(x.reshape(-1, x.shape[-1]).contiguous(), layer.weight_packed, amx_n, bias)
        return y.reshape(*x.shape[:-1], amx_n)
    act_bits = getattr(layer, "specqd_act_bits", None)
    if act_bits is not None:  # CPU native kernel; the op asserts its inputs
        x2d = x.reshape(-1, x.shape[-1])
        y = torch.ops.specqd.mxfp4_linear(
            x2d.contiguous(), layer.weight_packed, layer.weight_scale, bias, act_bits, "auto"
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])
    cpu_gemm = vllm_internals.cpu_gemm(layer)
    if cpu_gemm is not None:  # cpu_kernel "dequantized"
        return cpu_gemm(x, layer.weight, bias)
    return mxfp4_matmul(x, layer.weight_packed, layer.weight_scale, bias)


def resolve_cpu_kernel(cpu_kernel: str) -> str:
    """``"auto"``: ``"amx"`` where this CPU has AMX-BF16, else ``"w4a8"``; ``"amx"`` without AMX is an error."""
    from vllm_specqd.kernels.cpu_ops import amx_available

    if cpu_kernel == "auto":
        return AMX if amx_available() else "w4a8"
    if cpu_kernel == AMX and not amx_available():
        raise RuntimeError(
            "specqd: draft.cpu_kernel 'amx' needs a CPU with AMX-BF16 (Intel Xeon 4th generation, "
            "Sapphire Rapids, or newer) and a Linux kernel that grants AMX to processes (5.16+); this one "
            "does not. Use 'auto', 'w4a8' or 'w4a16'."
        )
    return cpu_kernel


def canonical_mxfp4(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's canonical MXFP4 bytes (packed [N, K_pad/2], scales [N, K_pad/32]) whatever its kernel."""
    amx_n = getattr(layer, "specqd_amx_n", None)
    if amx_n is None:
        return layer.weight_packed, layer.weight_scale
    from vllm_specqd.kernels.cpu_ops import amx_unpack

    return amx_unpack(layer.weight_packed, amx_n)


def finalize_mxfp4_layer(layer: torch.nn.Module, cpu_kernel: str) -> int:
    """Make an MXFP4 layer ready to run; returns the bytes of any CPU dequantized copy."""
    if layer.weight_packed.device.type != "cpu":
        return 0
    cpu_kernel = resolve_cpu_kernel(cpu_kernel)
    if cpu_kernel == AMX:
        from vllm_specqd.kernels.cpu_ops import amx_repack

        # The AMX layout replaces the canonical bytes (same size), so the draft holds one copy.
        layer.specqd_amx_n = layer.weight_packed.shape[0]
        repacked = amx_repack(layer.weight_packed.data, layer.weight_scale.data)
        layer.weight_packed = Parameter(repacked, requires_grad=False)
        layer.weight_scale = Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        return 0
    if cpu_kernel in ACT_BITS:
        from vllm_specqd.kernels.cpu_ops import native_available

        if native_available():  # else one warning, and the torch reference runs
            layer.specqd_act_bits = ACT_BITS[cpu_kernel]
        return 0
    weight = dequantize_mxfp4(
        layer.weight_packed, layer.weight_scale, k=layer.specqd_in_features, dtype=layer.params_dtype
    )
    layer.weight = Parameter(weight, requires_grad=False)
    # vLLM's CPU GEMM dispatch repacks `weight` (oneDNN / sgl kernels) and frees it.
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    return weight.numel() * weight.element_size()


@register_quantization_config(QUANT_NAME)
class SpecQDMXFP4Config(QuantizationConfig):
    """Weight-only MXFP4 for every linear layer; embeddings and lm_head stay BF16."""

    def get_name(self) -> str:
        return QUANT_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # nothing to read: the draft is made in memory

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SpecQDMXFP4Config:
        return cls()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            return MXFP4LinearMethod()
        return None
