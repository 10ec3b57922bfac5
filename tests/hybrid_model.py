"""A tiny Gemma-3 text model with random weights: a hybrid-attention target for the engine tests.

Its layers alternate sliding-window attention (window :data:`SLIDING_WINDOW` tokens) and full
attention, so vLLM's hybrid KV cache manager puts them in two KV cache groups with their own block
tables (the sliding group drops blocks that fall out of the window). The vocabulary and tokenizer
are the bundled SmolLM2's. Random weights from transformers' own init (std 0.02), seeded: an
MXFP4 copy of this model agrees with it on about half the greedy tokens (measured with transformers,
teacher-forced, 2026-12-01), so drafts do get accepted, and a 60-token prompt already changes
the first greedy token when the window is lifted, so the window matters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SLIDING_WINDOW = 32
NUM_LAYERS = 4
LAYER_TYPES = ["sliding_attention", "full_attention"] * (NUM_LAYERS // 2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SEED = 0


def build_hybrid_model(out_dir: Path, tokenizer_dir: Path) -> Path:
    """Write the model (config, safetensors, the bundled tokenizer) to ``out_dir``; returns it."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # a CPU attention head size
        query_pre_attn_scalar=32,
        sliding_window=SLIDING_WINDOW,
        layer_types=LAYER_TYPES,
        max_position_embeddings=1024,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir
