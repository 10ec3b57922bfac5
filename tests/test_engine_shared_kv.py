"""The shared KV cache (draft.kv_cache "shared") where it can break, with a poisoned draft.

Every KV write of the level-1 draft stores random values (VLLM_SPECQD_POISON_DRAFT_KV=1). The
draft may only write slots the target's next verification rewrites before attending to them, so
outputs must stay token-identical to no speculation even so; a draft write that leaked into a
committed or prefix-cached slot would change them. The engines run with prefix caching, chunked
prefill and a KV cache small enough to force preemption, over requests that share a long prefix,
end mid-round (small max_tokens) and use n > 1.
"""

import pytest
from engine_harness import K, Workload, environment, mean_acceptance_length, ngram_level, run_engine, specqd_spec

pytestmark = pytest.mark.engine

POISON = {"VLLM_SPECQD_POISON_DRAFT_KV": "1"}
# 12 blocks of 32 tokens (CPU attention wants multiples of 32): 8 requests of up to ~210 tokens
# (+ K lookahead), ~5 blocks each beyond the shared prefix, cannot all stay resident.
ENGINE = dict(
    enable_prefix_caching=True,
    max_num_batched_tokens=64,  # prompts of ~200 tokens prefill in chunks
    max_num_seqs=8,
    block_size=32,
    num_gpu_blocks_override=12,
    max_model_len=320,  # vLLM keeps one of the 12 blocks back (the null block)
)
SHARED_PREFIX = (
    "You are a careful assistant. Answer briefly and precisely. The following rules apply to every "
    "answer: use plain words, no lists unless asked, and never repeat the question. Numbers are "
    "written as digits. Code is Python 3 with type hints. If a question is ambiguous, say which "
    "reading you answer. Keep a friendly tone and finish every answer with a full stop.\n\n"
) * 2
QUESTIONS = [
    "What is the capital of France?",
    "def fibonacci(n: int) -> int:",
    "Name three primary colours.",
    "Write a function that reverses a string.",
    "Why is the sky blue?",
    "How many days are in a leap year?",
    "class Stack:\n    def __init__(self):",
    "Explain recursion in one sentence.",
]


def workloads() -> dict[str, Workload]:
    from vllm import SamplingParams

    prompts = [SHARED_PREFIX + q for q in QUESTIONS]
    lengths = [1, 2, 7, 13, 40, 48, K + 1, 29]  # many stop inside a drafting round
    greedy = Workload(prompts, [SamplingParams(temperature=0, max_tokens=n) for n in lengths])
    # n > 1 needs temperature > 0; top_k=1 keeps it deterministic.
    forks = Workload(prompts[:3], [SamplingParams(temperature=1.0, top_k=1, n=2, max_tokens=24) for _ in range(3)])
    return {"prefix": greedy, "forks": forks, "prefix_again": greedy}


def _run(model_dir, spec, env=None):
    with environment(env):
        return run_engine(model_dir, spec, workloads(), **ENGINE)


@pytest.fixture(scope="module")
def reference(model_dir):
    return _run(model_dir, None)


@pytest.fixture(scope="module")
def poisoned_one_level(model_dir):
    return _run(model_dir, specqd_spec(K), POISON)


@pytest.fixture(scope="module")
def poisoned_ngram(model_dir):
    return _run(model_dir, specqd_spec(K, ngram_level(3)), POISON)


@pytest.mark.parametrize("workload", ["prefix", "forks", "prefix_again"])
def test_poisoned_one_level_is_token_identical(reference, poisoned_one_level, workload):
    assert poisoned_one_level.outputs[workload] == reference.outputs[workload]


@pytest.mark.parametrize("workload", ["prefix", "forks", "prefix_again"])
def test_poisoned_ngram_levels_are_token_identical(reference, poisoned_ngram, workload):
    assert poisoned_ngram.outputs[workload] == reference.outputs[workload]


def test_the_cases_really_happened(poisoned_one_level, poisoned_ngram):
    for run in (poisoned_one_level, poisoned_ngram):
        level1 = run.level_stats.levels[1]
        assert (level1.kv_cache, level1.kv_bytes_per_token) == ("shared", 0)  # no draft KV layers
        preemptions = sum(run.spec_metrics[w].get("vllm:num_preemptions", 0) for w in run.spec_metrics)
        assert preemptions > 0, "the small KV cache forced no preemption"
        assert min(run.prompt_lens["prefix"]) > ENGINE["max_num_batched_tokens"], "prompts must prefill in chunks"


def test_the_poison_reaches_the_draft(poisoned_one_level):
    """Random KV makes poor drafts (the model attends to its own garbage); proof the hook is live."""
    mal = mean_acceptance_length(poisoned_one_level.spec_metrics["prefix"])
    assert mal < 2.0, mal
