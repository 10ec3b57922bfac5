"""Look inside a running specqd engine (for tests and debugging).

    from vllm_specqd.adapter.inspection import describe_draft
    info = llm.collective_rpc(describe_draft, kwargs={"layer": "model.layers.0.mlp.down_proj"})[0]

(the engine must be started with VLLM_ALLOW_INSECURE_SERIALIZATION=1, which
vLLM requires to ship a function to its workers) runs in each worker and
returns plain data: the worker's tensor-parallel rank, which proposer drafts, the engine's KV cache
groups, whether the
draft shares the target's embeddings/lm_head/norms, every MXFP4 layer's
shapes, the draft's extra weight bytes, and optionally one layer's MXFP4
bytes (``layers``: several; to compare with a quantization of the checkpoint, or under tensor
parallelism of the rank's shard), the rank's level-report counters and what its drafter did (``work``).
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_specqd.adapter import vllm_internals as internals
from vllm_specqd.adapter.draft_builder import MXFP4LMHead
from vllm_specqd.adapter.mxfp4_linear import MXFP4LinearMethod, canonical_mxfp4, kernel_label


def describe_draft(worker, layer: str | None = None, layers: tuple[str, ...] = ()) -> dict:
    from vllm.distributed import get_tensor_model_parallel_rank

    runner = worker.model_runner
    drafter = getattr(runner, "drafter", None)
    info: dict = {
        "proposer": type(drafter).__name__ if drafter is not None else None,
        "tp_rank": get_tensor_model_parallel_rank(),
        "kv_cache_groups": internals.kv_cache_groups(runner),
    }
    draft = getattr(drafter, "model", None)
    if draft is None:
        return info
    target = runner.model
    target_params = {p.data_ptr() for p in target.parameters()}
    mxfp4_layers = {
        name: {"packed": tuple(canonical_mxfp4(m)[0].shape), "scales": tuple(canonical_mxfp4(m)[1].shape)}
        for name, m in draft.named_modules()
        if isinstance(getattr(m, "quant_method", None), MXFP4LinearMethod)
    }
    info.update(
        mxfp4_layers=mxfp4_layers,
        shares_embed_tokens=draft.model.embed_tokens is target.model.embed_tokens,
        shares_lm_head=draft.lm_head is target.lm_head,
        mxfp4_lm_head=isinstance(draft.lm_head, MXFP4LMHead),
        # The native CPU kernels of the MXFP4 layers and head (None: the torch twin).
        cpu_kernels=sorted(
            {
                kernel_label(m)
                for m in draft.modules()
                if isinstance(getattr(m, "quant_method", None), MXFP4LinearMethod) or isinstance(m, MXFP4LMHead)
            },
            key=str,
        ),
        shares_final_norm=getattr(draft.model.norm, "fallback", draft.model.norm) is target.model.norm,
        unshared_bf16_params=sorted(
            name
            for name, p in draft.named_parameters()
            if p.data_ptr() not in target_params and p.dtype != torch.uint8 and p.numel() > 0
        ),
        extra_weight_bytes=getattr(draft, "specqd_extra_weight_bytes", None),
        levels=[level.name for level in drafter.chain.chain()] if getattr(drafter, "chain", None) else ["level1"],
        inner_models={
            wm.name: {
                "mxfp4_layers": sum(
                    isinstance(getattr(m, "quant_method", None), MXFP4LinearMethod) for m in wm.model.modules()
                ),
                "kv_layers": len(wm.layer_names),
            }
            for wm in getattr(drafter, "inner_window_models", [])
        },
    )
    if isinstance(draft.lm_head, MXFP4LMHead):
        packed, scales = canonical_mxfp4(draft.lm_head)
        info["lm_head"] = {"packed": packed.detach().cpu(), "scales": scales.detach().cpu()}
    stats = getattr(drafter, "stats", None)
    if stats is not None:
        # This rank's own counters, and whether it is the one rank that publishes them.
        info["level_report"] = stats.snapshot().to_json()
        info["publishes_report"] = stats.writer.path is not None
    if getattr(drafter, "work", None) is not None:
        info["work"] = dataclasses.asdict(drafter.work)
    named = {name: draft.get_submodule(name) for name in (*([layer] if layer else []), *layers)}
    info["layers"] = {
        name: dict(zip(("packed", "scales"), (t.detach().cpu() for t in canonical_mxfp4(m))))
        for name, m in named.items()
    }
    if layer is not None:
        info["layer"] = info["layers"][layer]
    return info
