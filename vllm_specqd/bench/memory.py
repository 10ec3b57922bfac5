"""Memory a method adds to the target: the specqd level report's bytes, and what no report can know.

specqd levels report the bytes they really added (``LevelReport``: weights, CPU copies, KV bytes per
token, 0 for a level-1 draft that shares the target's KV). Computed here: vLLM's own ``draft_model``
(a full copy of the target: checkpoint bytes, and the target's KV per token again), the target's KV
per token, and a check that the engine's KV capacity agrees with the per-token count:
capacity = budget // ((target + added) bytes per token * block size) * block size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vllm_specqd.level_report import LevelReport


def checkpoint_bytes(model_dir: str | Path, elem_bytes: int) -> int:
    """Bytes of every tensor in ``model_dir``'s ``*.safetensors`` files at ``elem_bytes`` each (headers only)."""
    from safetensors import safe_open

    numel = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            numel += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    if not numel:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}: cannot size its weights")
    return numel * elem_bytes


def kv_bytes_per_token(model_dir: str | Path, elem_bytes: int) -> int:
    """KV-cache bytes one token takes in every layer of the model in ``model_dir``."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * elem_bytes


def added_memory(method_name: str, report: LevelReport | None, target_dir: str | Path, elem_bytes: int) -> dict:
    """Weights, CPU copies and KV bytes per token a method adds; the KV mode of each specqd level."""
    if report is not None:
        levels = report.levels.values()
        return {
            "added_weight_bytes": sum(e.weight_bytes - e.cpu_copy_bytes for e in levels),
            "cpu_dequantized_copy_bytes": sum(e.cpu_copy_bytes for e in levels),
            "added_kv_bytes_per_token": sum(e.kv_bytes_per_token for e in levels),
            "kv_cache": {str(n): e.kv_cache for n, e in sorted(report.levels.items())},
        }
    if method_name == "draft_model":
        return {
            "added_weight_bytes": checkpoint_bytes(target_dir, elem_bytes),
            "cpu_dequantized_copy_bytes": 0,
            "added_kv_bytes_per_token": kv_bytes_per_token(target_dir, elem_bytes),
            "kv_cache": {"1": "separate"},
        }
    return {"added_weight_bytes": 0, "cpu_dequantized_copy_bytes": 0, "added_kv_bytes_per_token": 0, "kv_cache": {}}


def kv_report(
    budget_bytes: int | None, capacity_tokens: int | None, block_size: int, target_per_token: int, added_per_token: int
) -> dict:
    """KV capacity and per-token bytes, with a check that the engine's capacity agrees with the count."""
    out = {
        "kv_capacity_tokens": capacity_tokens,
        "target_kv_bytes_per_token": target_per_token,
        "added_kv_bytes_per_token": added_per_token,
        "kv_capacity_check": "no KV budget reported",
    }
    if budget_bytes and capacity_tokens:
        block_bytes = (target_per_token + added_per_token) * block_size
        expected = budget_bytes // block_bytes * block_size
        out["kv_capacity_check"] = (
            "matches the engine"
            if expected == capacity_tokens
            else f"MISMATCH: the engine holds {capacity_tokens} tokens, the layer count predicts {expected}"
        )
    return out
