"""A specqd engine whose requests never draft costs no drafting work (issue: idle cost).

The adaptive policy "off" turns every request off in every round. Such a round must run no draft
pass, schedule no draft token and do no per-request drafting work: per request and round the
drafter builds one RequestSlot (its draft cap, read from the runner's request state) and nothing
else: no committed-context copy, no n-gram lookup, no draft row. Counted, not timed.
"""

import pytest
from conftest import greedy_workload
from engine_harness import K, Workload, ngram_level, run_engine

pytestmark = pytest.mark.engine

PROMPTS, MAX_TOKENS = 6, 24
SPEC_OFF = {
    "method": "specqd",
    "num_speculative_tokens": K,
    "adaptive": {"policy": "off"},
    "inner": ngram_level(K // 2),  # adaptive + n-gram level: proposals would go straight to the target
}


@pytest.fixture(scope="module")
def off_run(model_dir):
    from vllm import SamplingParams

    prompts = greedy_workload(model_dir).prompts[:PROMPTS]
    workload = Workload(prompts, [SamplingParams(temperature=0, max_tokens=MAX_TOKENS) for _ in prompts])
    return run_engine(model_dir, SPEC_OFF, {"greedy": workload})


def test_outputs_are_those_of_no_speculation(off_run, reference_run):
    ref = [[tokens[:MAX_TOKENS] for tokens in out] for out in reference_run.outputs["greedy"][:PROMPTS]]
    assert off_run.outputs["greedy"] == ref


def test_no_draft_token_is_scheduled(off_run):
    metrics = off_run.spec_metrics["greedy"]
    assert metrics.get("vllm:spec_decode_num_drafts", 0) == 0
    assert metrics.get("vllm:spec_decode_num_draft_tokens", 0) == 0


def test_every_round_runs_no_pass_and_no_per_request_work(off_run):
    work = off_run.draft["work"]
    # One round per target step of the run: at least one per generated token of the longest request.
    assert work["rounds"] >= MAX_TOKENS - 1
    assert work["rounds_without_passes"] == work["rounds"]
    assert work["ngram_lookups"] == 0
    assert off_run.level_stats.levels[1].forward_passes == 0


def test_the_policy_counts_every_request_off(off_run):
    adaptive = off_run.level_stats.adaptive
    assert adaptive.steps == off_run.draft["work"]["rounds"]
    assert adaptive.steps_off == adaptive.steps
    assert adaptive.requests > 0 and adaptive.requests_off == adaptive.requests
    assert adaptive.probes == 0 and adaptive.k_histogram[1:] == [0] * K
