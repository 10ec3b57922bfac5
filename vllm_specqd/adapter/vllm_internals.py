"""Every use of vLLM internals that is not a monkeypatch (those are in ``patches.py``), by name.

Each function cites the vLLM 0.32.0 file and line it depends on; a vLLM upgrade starts here.
"""

from __future__ import annotations

from contextlib import contextmanager

from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention.attention import Attention


def share_target_kv(vllm_config: VllmConfig, draft_layer_names: set[str], draft_prefix: str) -> dict[str, str]:
    """Make each draft attention layer use its target twin's KV cache; returns draft -> target names.

    vLLM's cross-layer KV sharing does the bookkeeping: a layer whose ``kv_sharing_target_layer_name``
    is set gets no KV cache spec of its own (vllm/v1/worker/gpu_model_runner.py:7161-7172), joins its
    target's KV cache group (vllm/v1/worker/utils.py:779 add_kv_sharing_layers_to_kv_cache_groups)
    and is bound to the target's KV tensor (gpu_model_runner.py:7008). Use it only while the specs
    are collected (:func:`sharing_target_kv_while`): the attribute also makes a layer skip its KV
    writes, and a graph compiled while it is set would keep skipping them.
    """
    layers = get_layers_from_vllm_config(vllm_config, Attention)
    targets = {}
    for name in sorted(draft_layer_names):
        target = name.removeprefix(draft_prefix + ".")
        if name == target or target not in layers or not isinstance(layers.get(name), Attention):
            raise RuntimeError(
                f"specqd: draft layer {name!r} has no target attention layer {target!r} to share KV with"
            )
        layers[name].kv_sharing_target_layer_name = target
        targets[name] = target
    return targets


@contextmanager
def sharing_target_kv_while(vllm_config: VllmConfig, draft_layer_names: set[str], draft_prefix: str):
    """Share the target's KV for the duration of the block (the runner collecting KV cache specs)."""
    share_target_kv(vllm_config, draft_layer_names, draft_prefix)
    try:
        yield
    finally:
        enable_shared_kv_writes(vllm_config, draft_layer_names)


def enable_shared_kv_writes(vllm_config: VllmConfig, draft_layer_names: set[str]) -> None:
    """Let shared-KV draft layers write their KV again (into the target's cache).

    vLLM's sharing layers only read (Attention.forward skips unified_kv_cache_update when
    kv_sharing_target_layer_name is set, vllm/model_executor/layers/attention/attention.py:541-547
    and :563-568); the draft must write the positions it drafts, which the target's next verify
    pass overwrites before attending to them. The attribute is read again only when specs are
    collected, which has happened by now.
    """
    layers = get_layers_from_vllm_config(vllm_config, Attention, sorted(draft_layer_names))
    for layer in layers.values():
        layer.kv_sharing_target_layer_name = None
        if hasattr(layer.impl, "kv_sharing_target_layer_name"):  # cpu_attn.py:301 and GPU backends
            layer.impl.kv_sharing_target_layer_name = None
