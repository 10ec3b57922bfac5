"""Memory speculation adds: draft weights (from checkpoint headers) and KV cache per token (from the engine).

Weights are computed, not measured: the adapter logs the MXFP4 draft's size
but does not export it to the front-end process. The rules follow the adapter:

* specqd level 1 (``draft_builder.py``): every linear weight of the decoder
  layers becomes MXFP4 (0.5 byte per element + 1 scale byte per 32 elements,
  K padded to 32); embeddings, lm_head and norms are shared with the target.
  Off CUDA each MXFP4 layer also keeps a once-dequantized copy in the run's
  dtype for the CPU GEMM (``draft.cpu_dequantize_once``), reported apart.
* a small-model level with ``quantization: mxfp4``: its decoder linears as
  above, everything else (its own embeddings, norms) in the run's dtype.
* vLLM ``draft_model`` with the target's checkpoint: a full second copy.

KV: every draft model level has its own KV layers in the engine's one KV
budget; per token, a model holds 2 * layers * kv_heads * head_dim * element
size. The engine's reported capacity is checked against that count
(capacity = budget // (bytes per token * block size) * block size).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vllm_specqd.mxfp4 import BLOCK_SIZE


def checkpoint_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape for every ``*.safetensors`` file in ``model_dir`` (headers only)."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = list(f.get_slice(name).get_shape())
    if not shapes:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}: cannot size its weights")
    return shapes


def _is_layer_linear(name: str, shape: list[int]) -> bool:
    return ".layers." in name and name.endswith(".weight") and len(shape) == 2


def mxfp4_bytes(shape: list[int]) -> int:
    """Packed codes + E8M0 scales of a ``[N, K]`` weight (see docs/CONTRACTS.md)."""
    n, k = math.prod(shape[:-1]), shape[-1]
    k_pad = -(-k // BLOCK_SIZE) * BLOCK_SIZE
    return n * k_pad // 2 + n * k_pad // BLOCK_SIZE


def mxfp4_model_bytes(shapes: dict[str, list[int]], elem_bytes: int, share_non_linear: bool) -> tuple[int, int]:
    """(MXFP4 weight bytes added, CPU dequantized-copy bytes) of an MXFP4 copy of a checkpoint."""
    added = copy = 0
    for name, shape in shapes.items():
        if _is_layer_linear(name, shape):
            added += mxfp4_bytes(shape)
            copy += math.prod(shape) * elem_bytes
        elif not share_non_linear:
            added += math.prod(shape) * elem_bytes
    return added, copy


def added_weight_bytes(
    method_name: str, target_dir: str | Path, small_dir: str | Path | None, elem_bytes: int, cpu_copy: bool
) -> dict[str, int]:
    """Weight bytes a method adds over the target alone; ``cpu_copy``: the engine runs off CUDA."""
    added = copy = 0
    if method_name == "draft_model":
        added = sum(math.prod(s) for s in checkpoint_shapes(target_dir).values()) * elem_bytes
    elif method_name.startswith("specqd"):
        added, copy = mxfp4_model_bytes(checkpoint_shapes(target_dir), elem_bytes, share_non_linear=True)
        if method_name == "specqd-small":
            small_added, small_copy = mxfp4_model_bytes(checkpoint_shapes(small_dir), elem_bytes, False)
            added, copy = added + small_added, copy + small_copy
    return {"added_weight_bytes": added, "cpu_dequantized_copy_bytes": copy if cpu_copy else 0}


def kv_bytes_per_token(model_dir: str | Path, elem_bytes: int) -> int:
    """KV-cache bytes one token takes in every layer of the model in ``model_dir``."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * elem_bytes


def added_kv_bytes_per_token(
    method_name: str, target_dir: str | Path, small_dir: str | Path | None, elem_bytes: int
) -> int:
    """KV bytes per token of the draft models' own KV layers (n-gram levels hold none)."""
    if method_name in ("none", "ngram", "suffix"):
        return 0
    added = kv_bytes_per_token(target_dir, elem_bytes)  # draft_model and the MXFP4 self-draft: target's shape
    if method_name == "specqd-small":
        added += kv_bytes_per_token(small_dir, elem_bytes)
    return added


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
