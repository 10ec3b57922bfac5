"""Level 1 through the real vLLM engine: the MXFP4 self-draft, offline.

One specqd engine (K=6, defaults: scale rule mse, probabilistic draft) runs
every workload once; the tests compare it with the same engine without
speculation (`reference_run`, conftest.py).
"""

import pytest
import torch
from conftest import LEVEL1_INSPECTED_LAYER, LEVEL1_SPEC
from engine_harness import K, assert_same_token_distribution, mean_acceptance_length

pytestmark = pytest.mark.engine

SPEC = LEVEL1_SPEC
INSPECTED_LAYER = LEVEL1_INSPECTED_LAYER
assert SPEC["num_speculative_tokens"] == K


@pytest.fixture(scope="module")
def spec_run(level1_run):
    return level1_run  # conftest.py: shared with test_engine_multilevel


def test_greedy_outputs_token_identical(spec_run, reference_run):
    ref, got = reference_run.outputs["greedy"], spec_run.outputs["greedy"]
    assert len(got) == len(ref) == 22
    mismatches = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    assert not mismatches, f"prompts {mismatches} differ from the engine without speculation"


def test_mixed_batch_token_identical(spec_run, reference_run):
    """Mixed prompt lengths, max_tokens, stop strings/ids, min_tokens and n=2 in one batch."""
    assert spec_run.outputs["mixed"] == reference_run.outputs["mixed"]
    assert spec_run.texts["mixed"] == reference_run.texts["mixed"]
    assert spec_run.finish_reasons["mixed"] == reference_run.finish_reasons["mixed"]
    assert len(spec_run.outputs["mixed"][5]) == 2  # n=2
    assert "stop" in {r for rs in spec_run.finish_reasons["mixed"] for r in rs}


def test_speculation_actually_happened(spec_run):
    metrics = spec_run.spec_metrics["greedy"]
    assert metrics["vllm:spec_decode_num_drafts"] > 0
    assert metrics["vllm:spec_decode_num_draft_tokens"] == K * metrics["vllm:spec_decode_num_drafts"]
    per_position = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert len(per_position) == K
    assert sum(per_position) == metrics["vllm:spec_decode_num_accepted_tokens"]
    assert all(a >= b for a, b in zip(per_position, per_position[1:])), per_position


def test_acceptance_is_in_the_expected_range(spec_run):
    # Sanity anchor from a transformers fake-quant simulation of this model on
    # HumanEval at K=6: ~4.0 (FLOOR) to ~4.4 (mse) tokens per target step. A
    # broken format or draft wiring lands near 1.
    mal = mean_acceptance_length(spec_run.spec_metrics["greedy"])
    assert 3.0 <= mal <= K + 1, mal


def test_draft_is_mxfp4_and_shares_target_weights(spec_run):
    draft = spec_run.draft
    assert draft["proposer"] == "SpecQDProposer"
    assert draft["shares_embed_tokens"] and draft["shares_final_norm"]
    # Default draft.lm_head "mxfp4": the draft has its own direct-cast head, run by the native kernel.
    assert draft["mxfp4_lm_head"] and not draft["shares_lm_head"]
    assert draft["cpu_kernels"] == ["multirow"]  # default draft.cpu_kernel
    # Every decoder linear is MXFP4 (4 per layer: qkv, o, gate_up, down).
    assert len(draft["mxfp4_layers"]) == 30 * 4
    assert draft["unshared_bf16_params"] == []
    packed, scales = draft["mxfp4_layers"]["model.layers.0.mlp.down_proj"].values()
    assert packed == (576, 1536 // 2) and scales == (576, 1536 // 32)


def test_draft_bytes_are_a_direct_cast_of_the_checkpoint(spec_run, model_dir):
    """The in-memory draft equals quantize_mxfp4 of the BF16 checkpoint (fused q|k|v)."""
    from safetensors.torch import load_file

    from vllm_specqd.mxfp4 import quantize_mxfp4

    weights = load_file(model_dir / "model.safetensors")
    prefix = "model.layers.0.self_attn."
    qkv = torch.cat([weights[prefix + f"{p}_proj.weight"] for p in "qkv"]).to(torch.float32)
    expected = quantize_mxfp4(qkv, scale_rule="mse")
    got = spec_run.draft["layer"]
    assert torch.equal(got["packed"], expected.packed)
    assert torch.equal(got["scales"], expected.scales)
    # The lm_head is tied to the embeddings in this model.
    head = quantize_mxfp4(weights["model.embed_tokens.weight"].to(torch.float32), scale_rule="mse")
    assert torch.equal(spec_run.draft["lm_head"]["packed"], head.packed)
    assert torch.equal(spec_run.draft["lm_head"]["scales"], head.scales)


def test_extra_weight_memory_is_mxfp4_sized(spec_run, model_dir):
    import json

    config = json.loads((model_dir / "config.json").read_text())
    linear_params = sum(p * s for p, s in _linear_shapes(config))
    head_params = config["vocab_size"] * config["hidden_size"]
    mxfp4_bytes = (linear_params + head_params) * 17 // 32  # 4 bits + one byte per 32: nothing else
    assert spec_run.draft["extra_weight_bytes"] == mxfp4_bytes


def _linear_shapes(config):
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    per_layer = [(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)]
    return per_layer * layers


@pytest.mark.parametrize("position", [1, 2])
def test_sampling_is_exact_in_distribution(spec_run, reference_run, position):
    """Tokens 2 and 3 come from speculative verification; compare their law with no speculation."""
    assert_same_token_distribution(reference_run, spec_run, position)
    assert spec_run.spec_metrics["sampled"]["vllm:spec_decode_num_accepted_tokens"] > 0
