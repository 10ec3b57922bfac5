"""vLLM linear method for the MXFP4 self-draft (quantization name ``specqd_mxfp4``).

The draft never loads a checkpoint: its MXFP4 bytes are made from the target's
weights in memory (``draft_builder.py``), so ``create_weights`` only allocates
the packed buffers and refuses checkpoint loading. ``apply`` always runs
``kernels.mxfp4_matmul`` with the layer's ``specqd_kernel``, chosen once by
:func:`finalize_mxfp4_layer`: None on CUDA (the Triton kernels), on CPU the native
kernel ``draft.cpu_kernel`` names (``kernels.cpu_kernel``: its weight layout replaces
the canonical bytes), or, as a debugging aid, a once-dequantized copy through vLLM's
CPU GEMM (:class:`DequantizedGemm`).
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
from vllm_specqd.kernels import cpu_kernel, mxfp4_matmul
from vllm_specqd.mxfp4 import BLOCK_SIZE, dequantize_mxfp4

DEQUANTIZED = "dequantized"

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
        layer.specqd_kernel = None  # finalize_mxfp4_layer sets the CPU kernel

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_mxfp4(layer, x, bias)


def apply_mxfp4(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a layer finalized by :func:`finalize_mxfp4_layer`."""
    return mxfp4_matmul(x, layer.weight_packed, layer.weight_scale, bias, kernel=layer.specqd_kernel)


class DequantizedGemm:
    """``draft.cpu_kernel: "dequantized"``: vLLM's CPU GEMM on a once-dequantized copy (``layer.weight``).

    A kernel for ``mxfp4_matmul`` like ``CpuKernel``; the canonical bytes stay in the layer.
    """

    name = DEQUANTIZED

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        return vllm_internals.cpu_gemm(self.layer)(x, self.layer.weight, bias)

    def canonical(self, packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return packed, scales


def canonical_mxfp4(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's canonical MXFP4 bytes (packed [N, K_pad/2], scales [N, K_pad/32]) whatever its kernel."""
    kernel = getattr(layer, "specqd_kernel", None)
    if kernel is None:
        return layer.weight_packed, layer.weight_scale
    return kernel.canonical(layer.weight_packed, layer.weight_scale)


def kernel_label(layer: torch.nn.Module) -> str | None:
    """The layer's CPU kernel ("multirow", "amx", "w4a8", "w4a16", "dequantized"), None for the torch twin."""
    kernel = getattr(layer, "specqd_kernel", None)
    return None if kernel is None else kernel.name


def finalize_mxfp4_layer(layer: torch.nn.Module, cpu_kernel_name: str) -> int:
    """Choose the layer's kernel, once; returns the bytes of any CPU dequantized copy.

    CPU layers get ``kernels.cpu_kernel(cpu_kernel_name)`` and their weights in its layout (the
    canonical bytes are replaced, so the draft holds one copy); without the native library they
    keep the canonical bytes and ``mxfp4_matmul`` runs the torch twin.
    """
    layer.specqd_kernel = None
    if layer.weight_packed.device.type != "cpu":
        return 0
    if cpu_kernel_name != DEQUANTIZED:
        n, k = layer.weight_packed.shape[0], layer.specqd_in_features
        kernel = cpu_kernel(cpu_kernel_name, n, k)
        if kernel is not None:
            a, b = kernel.prepare(layer.weight_packed.data, layer.weight_scale.data)
            layer.weight_packed = Parameter(a, requires_grad=False)
            layer.weight_scale = Parameter(b, requires_grad=False)
            layer.specqd_kernel = kernel
        return 0
    weight = dequantize_mxfp4(
        layer.weight_packed, layer.weight_scale, k=layer.specqd_in_features, dtype=layer.params_dtype
    )
    layer.weight = Parameter(weight, requires_grad=False)
    # vLLM's CPU GEMM dispatch repacks `weight` (oneDNN / sgl kernels) and frees it.
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    layer.specqd_kernel = DequantizedGemm(layer)
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
