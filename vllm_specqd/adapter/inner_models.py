"""Load a small-model inner level (``inner.method: draft_model``) next to the target, in a worker.

The model gets the target's tokenizer, dtype and context length, its own attention layers under
``specqd_inner<level>`` (hence its own KV cache, allocated by vLLM with the target's) and, with
``quantization: mxfp4``, the MXFP4 copies ``draft_builder.capture_mxfp4`` stashed while it loaded.
Its shape may differ from the target's (head_dim, KV heads, layers, hidden size, sliding window):
vLLM keeps full-attention layers with other page sizes in the target's KV cache group, one spec per
layer, and gives layers of another attention kind group(s) of their own; the proposer binds one
attention group per KV cache group (docs/design.md, "KV bookkeeping").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.compilation.backends import set_model_tag
from vllm.config import ModelConfig, VllmConfig, get_layers_from_vllm_config
from vllm.config.utils import replace
from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.model_loader import get_model

from vllm_specqd.adapter.draft_builder import convert_to_mxfp4_in_place, inner_prefix
from vllm_specqd.adapter.window_model import VllmWindowModel
from vllm_specqd.config import ModelLevel

# Under "vllm." so vLLM's logging config (handlers, level, process prefix) applies.
logger = init_logger("vllm." + __name__)


@dataclass
class InnerModel:
    level: int
    window_model: VllmWindowModel  # its layer_names are the model's own KV layers
    weight_bytes: int  # parameters, plus any CPU dequantized copies
    cpu_copy_bytes: int


def load_inner_model(vllm_config: VllmConfig, spec: ModelLevel, level: int, device: torch.device) -> InnerModel:
    target = vllm_config.model_config
    model_config = ModelConfig(
        model=spec.model,
        runner="draft",
        tokenizer=target.tokenizer,
        tokenizer_mode=target.tokenizer_mode,
        trust_remote_code=target.trust_remote_code,
        dtype=target.dtype,
        seed=target.seed,
        max_model_len=target.max_model_len,
        enforce_eager=True,  # ragged windows run eagerly anyway
        max_logprobs=target.max_logprobs,
    )
    inner_config = replace(vllm_config, model_config=model_config, quant_config=None)
    before = set(get_layers_from_vllm_config(vllm_config, AttentionLayerBase))
    prefix = inner_prefix(level)
    with set_model_tag(prefix):
        try:
            model = get_model(vllm_config=inner_config, model_config=model_config, prefix=prefix)
        except Exception as e:  # a corrupt or truncated checkpoint: say which level and files
            raise RuntimeError(
                f"specqd: level {level} model {spec.model!r} failed to load: {type(e).__name__}: {e}"
            ) from e
    cpu_copy_bytes = 0
    if spec.quantization == "mxfp4":
        converted, cpu_copy_bytes = convert_to_mxfp4_in_place(model, cpu_kernel=spec.cpu_kernel)
        logger.info("specqd: level %d (%s) converted %d linear layers to MXFP4", level, spec.model, converted)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + cpu_copy_bytes
    window_model = VllmWindowModel(f"level{level}", model, vllm_config, device)
    after = get_layers_from_vllm_config(vllm_config, AttentionLayerBase)
    window_model.layer_names = sorted(
        name for name in set(after) - before if after[name].get_kv_cache_spec(vllm_config) is not None
    )
    return InnerModel(level, window_model, weight_bytes, cpu_copy_bytes)
