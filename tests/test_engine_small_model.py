"""A small-model inner level whose shape is not the target's, through the real vLLM engine.

Real pairs differ in exactly this way (Qwen2.5-Coder-1.5B and 0.5B: head_dim 128 and 64). Here
both models are tiny random Llamas with the bundled tokenizer, built at test time: the target has
head_dim 64, 2 KV heads, 3 layers, hidden 256; the small model head_dim 32, 1 KV head, 2 layers,
hidden 128, so its KV pages are a quarter of the target's. vLLM keeps full-attention layers with
different page sizes in one KV cache group with one spec per layer, and the shared-KV MXFP4
draft's layers join that group by name only: the engine died at start with
``KeyError: 'draft_model.model.layers.0.self_attn.attn'`` (issue 27) before patches.py #12.

The engines run with prefix caching, chunked prefill and a KV cache small enough to force
preemption. Checks: greedy outputs token-identical to no speculation, level-1 drafts identical
round by round to a one-level engine, sampling exact in distribution (chi-square).

The same small model below a hybrid-attention target (tests/hybrid_model.py: sliding-window and
full-attention layers, head_dim 32, 2 KV heads) gets a KV cache group of its own, with twice the
target's block size (its pages are half the target's, and vLLM equalises pages across groups). Its
KV is caught up each round in that group's block table, not in the one vLLM's first-pass metadata
is built for; on CPU the groups' tensors alias each other (one block pool), so a slot computed in
the wrong table would overwrite the target's own KV, and the greedy outputs would show it.

Weights: the target's std 0.045 mixes runs and switches (greedy outputs are not all one token);
the small model's std 0.02 makes it mostly repeat its input token (tied embeddings dominate), which
the target does often enough that the small level's guesses do get accepted.
"""

import pytest
from conftest import sampled_workload
from engine_harness import (
    K,
    Workload,
    assert_same_token_distribution,
    drafts_by_prompt,
    mean_acceptance_length,
    run_engine,
    specqd_spec,
)
from hybrid_model import SLIDING_WINDOW, build_hybrid_model

from vllm_specqd.model_prep import TinyModelShape, prepare_tiny_model

pytestmark = pytest.mark.engine

TARGET = TinyModelShape(hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=512, seed=0)
SMALL = TinyModelShape(
    hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_size=256, std=0.02, seed=1
)
INNER_K = 3
# 12 blocks of 32 tokens: 6 requests of ~130-190 tokens (+ K lookahead) cannot all stay resident.
ENGINE = dict(
    enable_prefix_caching=True,
    max_num_batched_tokens=64,  # the ~130-token prompts prefill in chunks
    max_num_seqs=6,
    block_size=32,
    num_gpu_blocks_override=12,
    max_model_len=320,
)
SHARED_PREFIX = (
    "You are a careful assistant. Answer briefly and precisely. Use plain words, no lists unless "
    "asked, and never repeat the question. Code is Python 3 with type hints.\n\n"
) * 2
QUESTIONS = [
    "What is the capital of France?",
    "def fibonacci(n: int) -> int:",
    "Name three primary colours.",
    "Write a function that reverses a string.",
    "class Stack:\n    def __init__(self):",
    "Explain recursion in one sentence.",
]
MAX_TOKENS = [48, 40, 7, 29, K + 1, 45]  # some stop inside a drafting round


def small_level(small_dir) -> dict:
    """The small model, MXFP4, as the innermost level (nothing below it)."""
    return {
        "method": "draft_model",
        "model": str(small_dir),
        "quantization": "mxfp4",
        "num_speculative_tokens": INNER_K,
    }


def workloads(sampled_seed_offset: int | None) -> dict[str, Workload]:
    from vllm import SamplingParams

    prompts = [SHARED_PREFIX + q for q in QUESTIONS]
    greedy = Workload(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS])
    loads = {"prefix": greedy, "prefix_again": greedy}  # the second finds the prefix cached
    if sampled_seed_offset is not None:
        loads["sampled"] = sampled_workload(sampled_seed_offset)
    return loads


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return prepare_tiny_model(TARGET, tmp_path_factory.mktemp("target") / "tiny-target", quiet=True)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return prepare_tiny_model(SMALL, tmp_path_factory.mktemp("small") / "tiny-small", quiet=True)


@pytest.fixture(scope="module")
def reference(target_dir):
    return run_engine(target_dir, None, workloads(sampled_seed_offset=1_000_000), **ENGINE)


@pytest.fixture(scope="module")
def one_level(target_dir):
    return run_engine(target_dir, specqd_spec(K, draft_sample_method="greedy"), workloads(None), **ENGINE)


@pytest.fixture(scope="module")
def with_small(target_dir, small_dir):
    spec = specqd_spec(K, small_level(small_dir), draft_sample_method="greedy")
    return run_engine(target_dir, spec, workloads(sampled_seed_offset=0), **ENGINE)


@pytest.mark.parametrize("workload", ["prefix", "prefix_again"])
def test_outputs_token_identical_to_no_speculation(reference, with_small, workload):
    ref, got = reference.outputs[workload], with_small.outputs[workload]
    mismatches = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    assert len(got) == len(ref) and not mismatches, f"prompts {mismatches} differ"
    assert all(len(out[0]) == n for out, n in zip(got, MAX_TOKENS))


@pytest.mark.parametrize("workload", ["prefix", "prefix_again"])
def test_level1_drafts_identical_to_one_level(one_level, with_small, workload):
    alone = drafts_by_prompt(one_level, workload)
    with_inner = drafts_by_prompt(with_small, workload)
    assert len(alone) > 20
    assert alone.keys() == with_inner.keys()
    differing = [key for key in alone if alone[key] != with_inner[key]]
    assert not differing, f"level-1 drafts differ at (prompt, position) {differing[:5]}"


@pytest.mark.parametrize("position", [1, 2])
def test_sampling_is_exact_in_distribution(reference, with_small, position):
    assert_same_token_distribution(reference, with_small, position, "small-model level")


def test_the_small_level_ran_and_was_accepted(with_small):
    level2 = with_small.level_stats.levels[2]
    assert level2.forward_passes > 0 and level2.kv_cache == "separate"
    assert level2.proposed_tokens > 0 and level2.accepted_tokens > 0, level2
    # K and V x 2 layers x 1 KV head x head_dim 32, float32: the small model's own shape.
    assert level2.kv_bytes_per_token == 2 * 2 * 1 * 32 * 4
    assert with_small.draft["inner_models"]["level2"] == {"mxfp4_layers": 2 * 4, "kv_layers": 2}
    mal = mean_acceptance_length(with_small.spec_metrics["prefix"])
    print(f"[small] level 2: {level2.accepted_tokens}/{level2.proposed_tokens} accepted; level 1 MAL {mal:.2f}")
    assert mal > 1.2


def test_the_small_models_kv_group(with_small):
    """vLLM 0.32 keeps the small model's layers in the target's KV cache group (one block table,
    one spec per layer): allocated, cached and freed with the target's blocks."""
    groups = with_small.draft["kv_cache_groups"]
    (group,) = [g for g in groups if "specqd_inner2.model.layers.0.self_attn.attn" in g["layer_names"]]
    assert "model.layers.0.self_attn.attn" in group["layer_names"]
    assert "draft_model.model.layers.0.self_attn.attn" in group["layer_names"]  # shared KV, joined by name
    assert group["spec"] == "UniformTypeKVCacheSpecs"


def test_the_cases_really_happened(with_small):
    preemptions = sum(with_small.spec_metrics[w].get("vllm:num_preemptions", 0) for w in with_small.spec_metrics)
    assert preemptions > 0, "the small KV cache forced no preemption"
    assert min(with_small.prompt_lens["prefix"]) > ENGINE["max_num_batched_tokens"], "prompts must prefill in chunks"


# ------------------------------------------------------------------ below a hybrid-attention target

HYBRID_ENGINE = dict(
    block_size=32,
    max_model_len=256,
    max_num_seqs=4,
    max_num_batched_tokens=64,  # the long prompts prefill in chunks
    enable_prefix_caching=True,
)
HYBRID_PREFIX = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest. " * 3
HYBRID_PROMPTS = [HYBRID_PREFIX + "What did the fox do next?", HYBRID_PREFIX + "def fibonacci(n: int) -> int:", "Hello"]
HYBRID_MAX_TOKENS = [96, 61, 70]  # past the 32-token window


def hybrid_workloads() -> dict[str, Workload]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in HYBRID_MAX_TOKENS]
    return {"greedy": Workload(HYBRID_PROMPTS, params)}


@pytest.fixture(scope="module")
def hybrid_dir(model_dir, tmp_path_factory):
    return build_hybrid_model(tmp_path_factory.mktemp("hybrid") / "gemma3-hybrid-tiny", model_dir)


@pytest.fixture(scope="module")
def hybrid_reference(hybrid_dir):
    return run_engine(hybrid_dir, None, hybrid_workloads(), **HYBRID_ENGINE)


@pytest.fixture(scope="module")
def hybrid_with_small(hybrid_dir, small_dir):
    spec = specqd_spec(4, {**small_level(small_dir), "num_speculative_tokens": 2}, draft_sample_method="greedy")
    return run_engine(hybrid_dir, spec, hybrid_workloads(), **HYBRID_ENGINE)


def test_hybrid_target_outputs_token_identical(hybrid_reference, hybrid_with_small):
    assert hybrid_with_small.outputs["greedy"] == hybrid_reference.outputs["greedy"]


def test_hybrid_target_small_model_has_its_own_kv_group(hybrid_with_small):
    groups = hybrid_with_small.draft["kv_cache_groups"]
    inner = [g for g in groups if any(name.startswith("specqd_inner2.") for name in g["layer_names"])]
    assert len(inner) == 1 and all(name.startswith("specqd_inner2.") for name in inner[0]["layer_names"]), groups
    assert inner[0]["block_size"] == 2 * HYBRID_ENGINE["block_size"]  # half the page per token: twice the tokens
    assert sorted(str(g["sliding_window"]) for g in groups) == sorted([str(SLIDING_WINDOW), "None", "None"])
    level2 = hybrid_with_small.level_stats.levels[2]
    assert level2.accepted_tokens > 0, level2
