"""Translate a user's ``method: specqd`` config into vLLM's draft_model machinery.

Example: with target ``/models/llama`` and::

    {"method": "specqd", "num_speculative_tokens": 6, "draft": {"scale_rule": "mse"}}

vLLM receives ``{"method": "draft_model", "model": "/models/llama",
"num_speculative_tokens": 6, "quantization": "specqd_mxfp4", ...}`` (the draft
has the target's architecture; vLLM reserves its K lookahead KV slots and
gives it its own KV layers), and ``additional_config["specqd"]`` carries the
validated specqd settings to every worker.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import vllm.envs as envs
from vllm.logger import init_logger

from vllm_specqd.adapter.mxfp4_linear import QUANT_NAME
from vllm_specqd.config import ModelLevel, SpecQDConfig, SpecQDConfigError, parse_config

logger = init_logger("vllm." + __name__)


def _tokenizer_vocab(model_dir: Path) -> dict | None:
    tok = model_dir / "tokenizer.json"
    if not tok.is_file():
        return None
    data = json.loads(tok.read_text())
    vocab = dict(data.get("model", {}).get("vocab", {}))
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return vocab


def _check_inner_vocabularies(cfg: SpecQDConfig, target_model_config: Any) -> None:
    target_vocab_size = target_model_config.get_vocab_size()
    target_dir = Path(target_model_config.tokenizer or target_model_config.model)
    target_vocab = _tokenizer_vocab(target_dir) if target_dir.is_dir() else None
    for level, spec in enumerate(cfg.levels(), start=2):
        if not isinstance(spec, ModelLevel):
            continue
        path = f"inner{'.inner' * (level - 2)}.model"
        config = json.loads((Path(spec.model) / "config.json").read_text())
        size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
        if size != target_vocab_size:
            raise SpecQDConfigError(
                f"specqd config: '{path}' = {spec.model!r} has vocab_size {size}, the target has "
                f"{target_vocab_size}; inner levels must share the target's tokenizer"
            )
        inner_vocab = _tokenizer_vocab(Path(spec.model))
        if target_vocab is not None and inner_vocab is not None and inner_vocab != target_vocab:
            raise SpecQDConfigError(
                f"specqd config: '{path}' = {spec.model!r} has a different tokenizer vocabulary "
                "than the target; inner levels must share the target's tokenizer"
            )


def attention_kinds(target_model_config: Any) -> list[str]:
    """The distinct ``layer_types`` of the target's text config, e.g. ["full_attention",
    "sliding_attention"] for Gemma 2/3; [] when the config lists none (one kind)."""
    layer_types = getattr(target_model_config.hf_text_config, "layer_types", None) or []
    return sorted(set(layer_types))


def separate_kv_on_hybrid_target_error(what: str) -> str:
    return (
        f"specqd config: 'draft.kv_cache' = 'separate' does not work on this target: its layers mix "
        f"attention kinds ({what}), and vLLM's draft_model machinery keeps every draft layer in one "
        "KV cache group. Use 'draft.kv_cache': 'shared' (the default): each draft layer then uses "
        "its target layer's KV cache group."
    )


def _check_hybrid_attention(cfg: SpecQDConfig, target_model_config: Any) -> None:
    kinds = attention_kinds(target_model_config)
    if len(kinds) < 2:
        return
    what = "layer_types " + ", ".join(kinds)
    if cfg.draft.kv_cache == "separate":
        raise SpecQDConfigError(separate_kv_on_hybrid_target_error(what))
    # Small-model levels are fine: vLLM gives their layers KV cache group(s) of their own where their
    # attention kind or page layout differs, and each level binds one attention group per group.


def translate_engine_args(engine_args: Any, target_model_config: Any, target_parallel_config: Any) -> None:
    """Rewrite ``engine_args.speculative_config`` in place when it asks for specqd."""
    raw = engine_args.speculative_config
    if not isinstance(raw, dict) or raw.get("method") != "specqd":
        return
    cfg = parse_config(raw, target_model=target_model_config.model)
    if target_model_config.quantization is not None:
        raise SpecQDConfigError(
            f"specqd: the target is already quantized ({target_model_config.quantization!r}). "
            "The MXFP4 draft is direct-cast from BF16/FP16 weights; quantized targets are not "
            "supported yet. Serve the unquantized checkpoint."
        )
    if target_parallel_config.pipeline_parallel_size > 1:
        # vllm/v1/worker/gpu_model_runner.py:590 builds the drafter on the last stage only, and
        # that stage holds only its own layers: the MXFP4 copies of the others never exist there.
        raise SpecQDConfigError(
            f"specqd: 'pipeline_parallel_size' = {target_parallel_config.pipeline_parallel_size} is not "
            "supported: the MXFP4 draft is cast from the target's loaded layers, and under pipeline "
            "parallelism vLLM runs the drafter on the last stage, which holds only its own layers. "
            "Use tensor parallelism ('tensor_parallel_size') instead; each rank drafts with its own shards."
        )
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise SpecQDConfigError("specqd runs on vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER=1 to use it.")
    _check_inner_vocabularies(cfg, target_model_config)
    _check_hybrid_attention(cfg, target_model_config)
    if cfg.inner is not None:
        # Inner levels read each request's committed tokens on the host while
        # drafting; async scheduling would leave the newest ones unbooked.
        if engine_args.async_scheduling:
            raise SpecQDConfigError("specqd: 'inner' levels need async_scheduling off; drop --async-scheduling.")
        engine_args.async_scheduling = False
    if cfg.adaptive.enabled:
        # Per-request draft lengths go to the scheduler as lists; async scheduling schedules K
        # placeholder drafts per request before they exist (gpu_model_runner.py:1854-1872).
        if engine_args.async_scheduling and "adaptive" in raw:
            raise SpecQDConfigError("specqd: 'adaptive' needs async_scheduling off; drop --async-scheduling.")
        if engine_args.async_scheduling:  # adaptive by default only: the user's async scheduling wins
            logger.warning(
                "specqd: async scheduling is on, so adaptive speculation (on by default) is off: every "
                "request drafts num_speculative_tokens each step. Drop --async-scheduling to keep it, "
                'or set "adaptive": false to silence this.'
            )
            cfg = replace(cfg, adaptive=replace(cfg.adaptive, enabled=False))
        else:
            engine_args.async_scheduling = False
    engine_args.speculative_config = {
        "method": "draft_model",
        "model": target_model_config.model,
        "revision": target_model_config.revision,
        "num_speculative_tokens": cfg.num_speculative_tokens,
        "quantization": QUANT_NAME,
        "draft_tensor_parallel_size": target_parallel_config.tensor_parallel_size,
        "draft_sample_method": cfg.draft_sample_method,
    }
    engine_args.additional_config = {**(engine_args.additional_config or {}), "specqd": cfg.to_dict()}
