"""vLLM linear method for the MXFP4 self-draft (quantization name ``specqd_mxfp4``).

The draft never loads a checkpoint: its MXFP4 bytes are produced from the
target's BF16 weights in memory (``draft_builder.py``), so ``create_weights``
only allocates the packed buffers and refuses checkpoint loading. ``apply``
calls :func:`vllm_specqd.kernels.mxfp4_matmul`, which runs the Triton kernels
on CUDA and the torch reference elsewhere.

CPU exception (``finalize_mxfp4_layer``): dequantizing 100M weights per
forward pass in torch costs ~30x a BF16 GEMM on this class of machine, so off
CUDA a layer by default dequantizes once (the exact MXFP4 values, which BF16
holds exactly) and runs vLLM's own CPU GEMM on them. The draft then computes
exactly the MXFP4 model, at the memory cost of a BF16 copy; set
``draft.cpu_dequantize_once: false`` to keep only the MXFP4 bytes.
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

from vllm_specqd.kernels import mxfp4_matmul
from vllm_specqd.mxfp4 import BLOCK_SIZE, dequantize_mxfp4

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
        cpu_linear = getattr(layer, "cpu_linear", None)
        if cpu_linear is not None:  # set by finalize_mxfp4_layer(dequantize_once=True)
            return cpu_linear(x, layer.weight, bias)
        return mxfp4_matmul(x, layer.weight_packed, layer.weight_scale, bias)


def finalize_mxfp4_layer(layer: torch.nn.Module, dequantize_once: bool) -> int:
    """Make an MXFP4 layer ready to run; returns the bytes of any CPU dequantized copy."""
    if layer.weight_packed.device.type == "cuda" or not dequantize_once:
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
