"""Load a small-model inner level (``inner.method: draft_model``) next to the target, in a worker.

The model gets the target's tokenizer, dtype and context length, its own attention layers under
``specqd_inner<level>`` (hence its own KV cache, allocated by vLLM with the target's) and, with
``quantization: mxfp4``, the MXFP4 copies ``draft_builder.capture_mxfp4`` stashed while it loaded,
and an MXFP4 lm_head as level 1's (``draft_builder.MXFP4LMHead``, exact logits for its top
``DEFAULT_LM_HEAD_RESCORE_TOP_K`` tokens): a small vocabulary-heavy model's largest weight read per
pass (Qwen2.5-0.5B: 272 MB of bf16 tied embeddings, 68 MB in MXFP4). Whatever an inner level
proposes, the level above checks, so its head changes how often it is right, never the output.
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
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader import get_model

from vllm_specqd.adapter import vllm_internals as internals
from vllm_specqd.adapter.draft_builder import MXFP4LMHead, convert_to_mxfp4_in_place, inner_prefix
from vllm_specqd.adapter.draft_fastpath import fused_cpu_ops_available, use_fused_cpu_modules, use_platform_custom_ops
from vllm_specqd.adapter.window_model import VllmWindowModel
from vllm_specqd.config import DEFAULT_LM_HEAD_RESCORE_TOP_K, ModelLevel, from_dict

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
        # Level 1's CPU kernel unless the level names its own.
        cpu_kernel = spec.cpu_kernel or from_dict(vllm_config.additional_config["specqd"]).draft.cpu_kernel
        converted, cpu_copy_bytes = convert_to_mxfp4_in_place(model, cpu_kernel=cpu_kernel)
        cpu_copy_bytes += _mxfp4_lm_head(model, spec, cpu_kernel)
        logger.info(
            "specqd: level %d (%s) converted %d linear layers to MXFP4 (CPU kernel %s), lm_head %s",
            level,
            spec.model,
            converted,
            cpu_kernel,
            "MXFP4" if isinstance(model.lm_head, MXFP4LMHead) else "kept",
        )
    weight_bytes = _weight_bytes(model) + cpu_copy_bytes
    if device.type == "cpu":
        _cpu_fast_path(model, level)
    window_model = VllmWindowModel(f"level{level}", model, vllm_config, device)
    after = get_layers_from_vllm_config(vllm_config, AttentionLayerBase)
    window_model.layer_names = sorted(
        name for name in set(after) - before if after[name].get_kv_cache_spec(vllm_config) is not None
    )
    return InnerModel(level, window_model, weight_bytes, cpu_copy_bytes)


def _cpu_fast_path(model: torch.nn.Module, level: int) -> None:
    """Level 1's CPU fast path (docs/design.md, "Compiled engines"): eager, attention called directly,
    fused norms and activations, vLLM's CPU kernels for the other CustomOps (rotary embedding).

    A small model's numerics change nothing of the output: the level above checks every proposal."""
    internals.run_eagerly(model)
    internals.call_attention_directly(model)
    fused = use_fused_cpu_modules(model) if fused_cpu_ops_available() else 0
    wrapped = use_platform_custom_ops(model, torch.nn.Module())
    logger.info(
        "specqd: level %d runs eagerly, %d fused CPU modules, %d vLLM ops on CPU kernels", level, fused, wrapped
    )


def _mxfp4_lm_head(model: torch.nn.Module, spec: ModelLevel, cpu_kernel: str) -> int:
    """Give an MXFP4 small model an MXFP4 lm_head (level 1's kind: draft_builder.MXFP4LMHead).

    The bf16 head stays referenced, for the rescore of the top candidates (a tied head is the
    embedding table, which the model keeps anyway). Returns the bytes of any CPU dequantized copy."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, VocabParallelEmbedding):
        return 0
    model.lm_head = MXFP4LMHead(head, spec.scale_rule, cpu_kernel, DEFAULT_LM_HEAD_RESCORE_TOP_K)
    return model.lm_head.cpu_copy_bytes


def _weight_bytes(model: torch.nn.Module) -> int:
    """The model's parameters, plus an untied bf16 lm_head an MXFP4 head only references."""
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    exact = getattr(getattr(model, "lm_head", None), "exact_head", None)
    if exact is not None and exact.weight.data_ptr() not in params:
        params[exact.weight.data_ptr()] = exact.weight.numel() * exact.weight.element_size()
    return sum(params.values())
