"""Adaptive speculation through the real vLLM engine (fp32): lossless whatever the policy decides.

One engine runs the adversarial policy ("random": every request's k drawn from 0..K each round),
which drives the adapter through every case the cost policy can produce: per-request lists of
different lengths in one batch, empty ones, whole rounds without a draft pass, and fewer passes
than K. The outputs are compared with the no-speculation engine (`reference_run`, conftest.py).
Its draft runs `cpu_kernel: "auto"`: the AMX kernel where the CPU has AMX-BF16 (then this is the
AMX kernel's engine test, with passes over 1..6 rows), else the multi-row kernel.

A second engine adds an n-gram inner level: the random policy then also sends n-gram proposals
straight to the target for about half the requests that have one, beside MXFP4 drafts in one batch.
"""

from collections import defaultdict

import pytest
from conftest import greedy_workload, sampled_workload
from engine_harness import K, Workload, assert_same_token_distribution, run_engine

pytestmark = pytest.mark.engine

PROMPTS, MAX_TOKENS = 6, 32
SPEC = {
    "method": "specqd",
    "num_speculative_tokens": K,
    "draft": {"cpu_kernel": "auto"},
    "adaptive": {"policy": "random", "seed": 0},
}


SPEC_NGRAM = {**SPEC, "inner": {"method": "ngram", "num_speculative_tokens": K // 2}}


def _run(model_dir, spec):
    from vllm import SamplingParams

    greedy = greedy_workload(model_dir)
    prompts = greedy.prompts[:PROMPTS]
    short = Workload(prompts, [SamplingParams(temperature=0, max_tokens=MAX_TOKENS) for _ in prompts])
    return run_engine(model_dir, spec, {"greedy": short, "sampled": sampled_workload(seed_offset=0)})


@pytest.fixture(scope="module")
def adaptive_run(model_dir):
    return _run(model_dir, SPEC)


@pytest.fixture(scope="module")
def ngram_direct_run(model_dir, adaptive_run):  # after adaptive_run: one engine at a time
    return _run(model_dir, SPEC_NGRAM)


@pytest.mark.parametrize("run_name", ["adaptive_run", "ngram_direct_run"])
def test_greedy_outputs_token_identical_whatever_k(run_name, reference_run, request):
    run = request.getfixturevalue(run_name)
    # The reference generated 48 tokens per prompt; greedy decoding makes the first 32 the same.
    ref = [[tokens[:MAX_TOKENS] for tokens in out] for out in reference_run.outputs["greedy"][:PROMPTS]]
    got = run.outputs["greedy"]
    mismatches = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    assert len(got) == PROMPTS and not mismatches, f"prompts {mismatches} differ from no speculation"


def test_ngram_proposals_and_mxfp4_drafts_go_to_the_target_side_by_side(ngram_direct_run):
    report = ngram_direct_run.level_stats_after["greedy"].adaptive
    assert 0 < report.ngram_requests < report.requests
    drafted = sum(k * n for k, n in enumerate(report.k_histogram))
    # Level-1 passes ran only for MXFP4 drafts: fewer than all the drafts the target got.
    assert 0 < ngram_direct_run.level_stats.levels[1].forward_passes < drafted
    # Level 2 (the n-gram) reports what the target verified of its proposals.
    level2 = ngram_direct_run.level_stats.levels[2]
    assert level2.proposer == "n-gram lookup, straight to the target"
    assert 0 < level2.accepted_tokens <= level2.proposed_tokens and 0 < level2.verify_windows <= report.ngram_requests


def test_auto_kernel_is_amx_where_the_cpu_has_it(adaptive_run):
    from vllm_specqd.kernels.cpu_ops import amx_available

    assert adaptive_run.draft["cpu_kernels"] == (["amx"] if amx_available() else ["multirow"])


def test_rounds_mixed_k_zero_and_k_positive_requests(adaptive_run):
    """Both happened, in one batch: the metrics and the per-round draft trace say so."""
    report = adaptive_run.level_stats_after["greedy"].adaptive
    assert report is not None and report.policy == "random"
    assert 0 < report.requests_off < report.requests
    assert report.k_histogram[0] > 0 and report.k_histogram[K] > 0 and sum(report.k_histogram[1:K]) > 0
    lengths = defaultdict(list)
    for entry in adaptive_run.trace:
        lengths[entry["round"]].append(len(entry["drafts"]))
    mixed = [r for r, ls in lengths.items() if 0 in ls and max(ls) > 0]
    assert mixed, "no round had a k = 0 request next to a drafting one"
    # vLLM verified per-request counts, not K for every request.
    metrics = adaptive_run.spec_metrics["greedy"]
    drafted = sum(k * n for k, n in enumerate(report.k_histogram))
    assert 0 < metrics["vllm:spec_decode_num_draft_tokens"] <= drafted
    assert metrics["vllm:spec_decode_num_draft_tokens"] < K * metrics["vllm:spec_decode_num_drafts"]


def test_rounds_run_only_the_passes_their_longest_draft_needs(adaptive_run):
    report = adaptive_run.level_stats_after["greedy"]
    lengths = defaultdict(int)
    for entry in adaptive_run.trace:
        lengths[entry["round"]] = max(lengths[entry["round"]], len(entry["drafts"]))
    # Level-1 passes over both workloads: exactly max(k) per round, fewer than K per round.
    final = adaptive_run.level_stats
    assert final.levels[1].forward_passes == sum(lengths.values())
    assert final.levels[1].forward_passes < K * final.adaptive.steps
    assert report.adaptive.estimates["target_step_s"] > 0 and report.adaptive.estimates["draft_pass_s"] > 0
    # One decision per drafting round (the trace numbers every round, also those it has no row of), each
    # timed beside the steps: the decision's share of step time, which benchmarks/bench_adaptive_decision.py
    # and the benchmark's report print (a wall-clock budget is no test on a shared machine).
    assert final.adaptive.steps == max(entry["round"] for entry in adaptive_run.trace)
    assert final.adaptive.decision_seconds > 0 and final.adaptive.step_seconds > 0


@pytest.mark.parametrize("run_name", ["adaptive_run", "ngram_direct_run"])
@pytest.mark.parametrize("position", [1, 2])
def test_sampling_is_exact_in_distribution(run_name, reference_run, position, request):
    """Tokens 2 and 3 come from verification with k in {0, 1} per request: cut draft probabilities
    (one-hot ones for greedy drafts and n-gram proposals)."""
    run = request.getfixturevalue(run_name)
    assert_same_token_distribution(reference_run, run, position)
    assert run.spec_metrics["sampled"]["vllm:spec_decode_num_accepted_tokens"] > 0
