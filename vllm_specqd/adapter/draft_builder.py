"""Build the MXFP4 self-draft from the target's weights in memory; the checkpoint is read once.

Two steps, because vLLM may free a linear layer's BF16 weight right after loading (on CPU,
``UnquantizedLinearMethod.process_weights_after_loading`` repacks it for oneDNN):

1. :func:`capture_mxfp4` runs inside that hook (``patches.py``) and stashes an MXFP4 copy of each
   linear weight some specqd level needs, with that level's scale rule.
2. :func:`build_mxfp4_draft` instantiates the draft architecture and moves those MXFP4 tensors in.
   Embeddings and norms (and the lm_head, with ``draft.lm_head: shared``) are the target's own
   modules: zero extra bytes. Any other parameter is copied.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
from torch.nn import Parameter
from vllm.config import CompilationMode, VllmConfig, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, LayerNorm, RMSNorm
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.utils.torch_utils import set_default_torch_dtype

from vllm_specqd.adapter import vllm_internals as internals
from vllm_specqd.adapter.draft_fastpath import POISON_KV_ENV, fused_cpu_ops_available, use_fused_cpu_modules
from vllm_specqd.adapter.mxfp4_linear import MXFP4LinearMethod, apply_mxfp4, finalize_mxfp4_layer
from vllm_specqd.config import ModelLevel, SpecQDConfig, from_dict
from vllm_specqd.kernels import quantize_mxfp4  # native on CPU, same bytes as vllm_specqd.mxfp4

# Under "vllm." so vLLM's logging config (handlers, level, process prefix) applies.
logger = init_logger("vllm." + __name__)

DRAFT_PREFIX = "draft_model"  # vLLM's DraftModelProposer prefix; its attention layers live under it
INNER_PREFIX = "specqd_inner"  # + level number, for small-model inner levels
_SHARED_MODULE_TYPES = (VocabParallelEmbedding, RMSNorm, GemmaRMSNorm, LayerNorm)


def inner_prefix(level: int) -> str:
    return f"{INNER_PREFIX}{level}"


@functools.lru_cache(maxsize=16)
def capture_rules(cfg: SpecQDConfig) -> tuple[tuple[str, str | None], ...]:
    """(model prefix, scale rule or None) in match order: which layers get an MXFP4 copy, and how.

    Example, an 8-layer MXFP4 level 2 under the default draft:
    (("draft_model", None), ("specqd_inner2", "mse"), ("", "mse")): the draft's own layers are
    MXFP4 already, level 2's get a copy, and everything else is the target, which level 1 is made of.
    """
    rules: list[tuple[str, str | None]] = [(DRAFT_PREFIX, None)]
    for level, spec in enumerate(cfg.levels(), start=2):
        if isinstance(spec, ModelLevel):
            rules.append((inner_prefix(level), spec.scale_rule if spec.quantization == "mxfp4" else None))
    rules.append(("", cfg.draft.scale_rule))
    return tuple(rules)


def scale_rule_for(prefix: str, rules: tuple[tuple[str, str | None], ...]) -> str | None:
    for model_prefix, rule in rules:
        if not model_prefix or prefix == model_prefix or prefix.startswith(model_prefix + "."):
            return rule
    return None


def capture_mxfp4(layer: nn.Module) -> None:
    """Stash an MXFP4 copy of ``layer.weight`` before vLLM may free it (specqd engines only)."""
    vllm_config = get_current_vllm_config_or_none()
    specqd = vllm_config.additional_config.get("specqd") if vllm_config is not None else None
    if not specqd or not isinstance(layer, LinearBase) or layer.weight.numel() == 0:
        return
    prefix = internals.linear_prefix(layer)
    rule = scale_rule_for(prefix, capture_rules(from_dict(specqd)))
    if rule is not None:
        internals.stash_mxfp4(layer, quantize_mxfp4(layer.weight.data, scale_rule=rule, name=f"{prefix}.weight"))


def _install_mxfp4(layer: nn.Module, stash, name: str) -> None:
    for attr, tensor in (("weight_packed", stash.packed), ("weight_scale", stash.scales)):
        placeholder = getattr(layer, attr, None)
        if placeholder is not None and placeholder.shape != tensor.shape:
            raise RuntimeError(f"specqd: '{name}.{attr}' expects {tuple(placeholder.shape)}, got {tuple(tensor.shape)}")
        setattr(layer, attr, Parameter(tensor, requires_grad=False))


class MXFP4LMHeadMethod:
    """``quant_method`` of :class:`MXFP4LMHead`: what vLLM's LogitsProcessor calls
    (vllm/model_executor/layers/logits_processor.py:144, ``lm_head.quant_method.apply``)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        logits = apply_mxfp4(layer, x, bias)  # [T, V]
        if layer.rescore_top_k:
            logits = rescore_top_candidates(logits, x, layer.exact_head.weight, bias, layer.rescore_top_k)
        return logits


def rescore_top_candidates(
    logits: torch.Tensor,  # [T, V] from the MXFP4 head
    x: torch.Tensor,  # [T, H]
    exact_weight: torch.Tensor,  # [V, H] the target's lm_head
    bias: torch.Tensor | None,  # [V]
    k: int,
) -> torch.Tensor:  # [T, V]
    """Exact logits for the MXFP4 head's top-k tokens; no other token may outrank them.

    The draft's greedy choice is then the target's own argmax whenever that token is among the
    MXFP4 top-k, at the cost of k rows of the full-precision head. Example (k=2): MXFP4 logits
    [1.0, 3.1, 2.9, 0.5] pick tokens 1 and 2; exact logits 2.7 and 3.0 replace them and every other
    logit is capped at 2.7: [1.0, 2.7, 3.0, 0.5], argmax 2.
    """
    top = logits.topk(k, dim=-1).indices  # [T, k]
    rows = exact_weight[top]  # [T, k, H]
    exact = torch.einsum("th,tkh->tk", x.to(rows.dtype), rows)
    if bias is not None:
        exact = exact + bias[top]
    exact = exact.to(logits.dtype)
    capped = torch.minimum(logits, exact.min(dim=-1, keepdim=True).values)
    return capped.scatter_(1, top, exact)


class MXFP4LMHead(nn.Module):
    """The draft's own MXFP4 copy of the target's (vocab-parallel shard of the) lm_head.

    With ``rescore_top_k`` > 0 its top-k tokens get the target head's exact logits
    (:func:`rescore_top_candidates`); the target's head is only referenced, never copied.
    """

    def __init__(self, target_head: nn.Module, scale_rule: str, cpu_kernel: str, rescore_top_k: int = 0):
        super().__init__()
        q = quantize_mxfp4(target_head.weight.data, scale_rule=scale_rule, name="lm_head.weight")
        self.weight_packed = Parameter(q.packed, requires_grad=False)
        self.weight_scale = Parameter(q.scales, requires_grad=False)
        self.specqd_in_features = q.k
        self.params_dtype = target_head.weight.dtype
        self.tp_size = internals.lm_head_tp_size(target_head)  # LogitsProcessor reads it
        self.quant_method = MXFP4LMHeadMethod()
        self.rescore_top_k = min(rescore_top_k, target_head.weight.shape[0])
        # Not a submodule: the draft must not own (or count, or save) the target's weight.
        self.__dict__["exact_head"] = target_head
        self.cpu_copy_bytes = finalize_mxfp4_layer(self, cpu_kernel)


def build_mxfp4_draft(
    vllm_config: VllmConfig,
    target: nn.Module,
    prefix: str = DRAFT_PREFIX,
    cpu_kernel: str = "w4a16",
    lm_head: str = "shared",
    scale_rule: str = "mse",
    lm_head_rescore_top_k: int = 0,
) -> nn.Module:
    """A new model of the target's architecture whose linears hold the captured MXFP4 weights.

    ``lm_head``: ``"shared"`` uses the target's lm_head module; ``"mxfp4"`` gives the draft its own
    direct-cast copy (the lm_head is the largest single weight read of a draft step).
    """
    model_config = vllm_config.model_config
    device = next(target.parameters()).device
    with set_default_torch_dtype(model_config.dtype), device:
        draft = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)

    target_modules = dict(target.named_modules(remove_duplicate=False))
    replacements = []
    cpu_copy_bytes = 0
    for name, module in draft.named_modules(remove_duplicate=False):
        twin = target_modules.get(name)
        if isinstance(getattr(module, "quant_method", None), MXFP4LinearMethod):
            if twin is None:
                raise RuntimeError(f"specqd: target has no layer '{name}' for the draft to copy")
            _install_mxfp4(module, internals.take_mxfp4_stash(twin, name), name)
            if getattr(module, "bias", None) is not None:
                module.bias = twin.bias
            cpu_copy_bytes += finalize_mxfp4_layer(module, cpu_kernel)
        elif isinstance(module, _SHARED_MODULE_TYPES) and twin is not None:
            replacements.append((name, twin))
        elif twin is not None:
            for pname, param in module.named_parameters(recurse=False):
                param.data.copy_(getattr(twin, pname).data)
    for name, twin in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(draft.get_submodule(parent_name) if parent_name else draft, child, twin)
    if lm_head == "mxfp4":
        if not isinstance(getattr(target, "lm_head", None), VocabParallelEmbedding):
            raise RuntimeError(
                f"specqd: draft.lm_head 'mxfp4' needs a vLLM lm_head on the target, found "
                f"{type(getattr(target, 'lm_head', None)).__name__}; use draft.lm_head 'shared'"
            )
        draft.lm_head = MXFP4LMHead(target.lm_head, scale_rule, cpu_kernel, lm_head_rescore_top_k)
        cpu_copy_bytes += draft.lm_head.cpu_copy_bytes
    if device.type == "cpu" and fused_cpu_ops_available():
        logger.info("specqd: the draft runs %d norms/activations as fused CPU kernels", use_fused_cpu_modules(draft))
    if device.type == "cpu" and vllm_config.compilation_config.mode == CompilationMode.NONE:
        internals.call_attention_directly(draft)
    if os.environ.get(POISON_KV_ENV) == "1":
        logger.warning("specqd: %s=1: the draft writes random KV (a test of the shared KV cache)", POISON_KV_ENV)
        internals.poison_kv_writes(draft)

    _log_extra_bytes(draft, target, cpu_copy_bytes)
    return draft.eval()


def mxfp4_layers(model: nn.Module) -> list[nn.Module]:
    """The model's MXFP4 linears and MXFP4 lm_head, in module order."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "quant_method", None), MXFP4LinearMethod) or isinstance(m, MXFP4LMHead)
    ]


def convert_to_mxfp4_in_place(model: nn.Module, cpu_kernel: str = "w4a16") -> tuple[int, int]:
    """Switch a loaded BF16 model's linears to its captured MXFP4 copies (inner levels).

    Returns (layers converted, bytes of CPU dequantized copies)."""
    converted = cpu_copy_bytes = 0
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and internals.has_mxfp4_stash(module):
            _install_mxfp4(module, internals.take_mxfp4_stash(module, name), name)
            internals.switch_linear_to_mxfp4(module, MXFP4LinearMethod())
            cpu_copy_bytes += finalize_mxfp4_layer(module, cpu_kernel)
            converted += 1
    return converted, cpu_copy_bytes


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _log_extra_bytes(draft: nn.Module, target: nn.Module, cpu_copy_bytes: int) -> int:
    target_ptrs = {p.data_ptr() for p in target.parameters()}
    extra = [p for p in draft.parameters() if p.data_ptr() not in target_ptrs and p.numel()]
    shared = [p for p in draft.parameters() if p.data_ptr() in target_ptrs]
    extra_bytes = _param_bytes(extra)
    logger.info(
        "specqd: MXFP4 draft adds %.2f MiB of weights; %.2f MiB (embeddings, norms%s) "
        "are shared with the target by reference.%s",
        extra_bytes / 2**20,
        _param_bytes(shared) / 2**20,
        "" if isinstance(getattr(draft, "lm_head", None), MXFP4LMHead) else ", lm_head",
        f" It also keeps a dequantized copy for vLLM's CPU GEMM: "
        f"{cpu_copy_bytes / 2**20:.2f} MiB (draft.cpu_kernel 'dequantized')."
        if cpu_copy_bytes
        else "",
    )
    draft.specqd_extra_weight_bytes = extra_bytes + cpu_copy_bytes
    draft.specqd_cpu_copy_bytes = cpu_copy_bytes
    return extra_bytes
