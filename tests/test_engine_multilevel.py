"""Multi-level speculation through the real vLLM engine, offline.

Three engines share one level-1 setup (MXFP4 self-draft, K=6, greedy drafts on these greedy workloads):
one level (conftest's level1_run, shared with test_engine_level1), two levels (n-gram inner) and three levels (an 8-layer MXFP4 copy
of the bundled model, itself sped up by n-gram). Inner levels must be lossless
with respect to the level above: the level-1 draft tokens are compared round
by round, not just the final outputs.
"""

import pytest
from conftest import LEVEL1_SPEC, greedy_workload, long_workload, sampled_workload
from engine_harness import (
    K,
    assert_same_token_distribution,
    drafts_by_prompt,
    level_stats_delta,
    mean_acceptance_length,
    ngram_level,
    run_engine,
    specqd_spec,
    three_levels,
)

from vllm_specqd.bench.methods import NGRAM_LOOKUP

pytestmark = pytest.mark.engine


def configs(small_model_dir) -> dict[str, dict]:
    greedy_drafts = {"draft_sample_method": "greedy"}
    return {
        "one": LEVEL1_SPEC,  # run once, as conftest's level1_run
        "two": specqd_spec(K, ngram_level(3, **NGRAM_LOOKUP), **greedy_drafts),
        "three": three_levels(small_model_dir, **greedy_drafts),  # <- small MXFP4 model (k=3) <- n-gram (k=2)
    }


@pytest.fixture(scope="module")
def runs(model_dir, small_model_dir, level1_run):
    """One level is conftest's level1_run (the same engine test_engine_level1 checks)."""
    results = {"one": level1_run}
    for name, spec in configs(small_model_dir).items():
        if name != "one":
            workloads = {"greedy": greedy_workload(model_dir), "long": long_workload()}
            workloads["sampled"] = sampled_workload(seed_offset=0)
            results[name] = run_engine(model_dir, spec, workloads)
    return results


@pytest.mark.parametrize("levels", ["one", "two", "three"])
@pytest.mark.parametrize("workload", ["greedy", "long"])
def test_outputs_token_identical_to_no_speculation(runs, reference_run, levels, workload):
    ref, got = reference_run.outputs[workload], runs[levels].outputs[workload]
    mismatches = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    assert len(got) == len(ref) and not mismatches, f"{levels} levels: prompts {mismatches} differ"


@pytest.mark.parametrize("levels", ["two", "three"])
@pytest.mark.parametrize("workload", ["greedy", "long"])
def test_level1_drafts_identical_with_and_without_inner_levels(runs, levels, workload):
    alone = drafts_by_prompt(runs["one"], workload)
    with_inner = drafts_by_prompt(runs[levels], workload)
    assert len(alone) > 20
    assert alone.keys() == with_inner.keys()
    differing = [key for key in alone if alone[key] != with_inner[key]]
    assert not differing, f"level-1 drafts differ at (prompt, position) {differing[:5]}"


def test_vllm_level1_metrics_agree_across_levels(runs):
    """Same rounds, same drafts. Only acceptance counted past max_tokens may differ:
    there a multi-level drafter pads instead of drafting tokens nobody can keep."""
    one = runs["one"].spec_metrics["greedy"]
    for levels in ("two", "three"):
        other = runs[levels].spec_metrics["greedy"]
        for key in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens"):
            assert other[key] == one[key], key
        per_pos = "vllm:spec_decode_num_accepted_tokens_per_pos"
        assert other[per_pos][0] == one[per_pos][0]  # d1 is never padded
    assert mean_acceptance_length(one) > 2.0


def test_ngram_inner_level_cuts_mxfp4_passes(runs):
    workloads = ["greedy", "long"]
    delta = level_stats_delta(runs["two"], workloads)
    level1, level2 = delta.levels[1], delta.levels[2]
    assert level2.accepted_tokens > 0, level2
    metrics = [runs["two"].spec_metrics[w] for w in workloads]
    draft_tokens = sum(m["vllm:spec_decode_num_draft_tokens"] for m in metrics)
    # Shared KV: level 1 runs one pass per window, d1 included (no first pass), and every window
    # checks level 2's proposals; one level needs K passes for K tokens (1.0 per draft token).
    assert level1.windows == level2.verify_windows > 0, (level1, level2)
    passes_per_draft_token = level1.windows / draft_tokens
    assert passes_per_draft_token < 0.95, passes_per_draft_token


@pytest.mark.parametrize("levels, expected", [("two", [1, 2]), ("three", [1, 2, 3])])
def test_per_level_metrics_are_reported(runs, levels, expected):
    report = runs[levels].level_stats
    assert sorted(report.levels) == expected
    assert report.generated_tokens > 0 and not report.busy
    assert report.levels[1].forward_passes > 0
    for level in expected[1:]:
        entry = report.levels[level]
        # Every inner level proposed, and the level above ran windows to check its proposals.
        assert entry.proposed_tokens > 0 and entry.verify_windows > 0, entry
        assert entry.proposed_tokens >= entry.accepted_tokens >= 0 and entry.mean_accepted_length >= 1.0, entry
    # The level right below level 1 had proposals accepted (the n-gram level under the small model may have
    # none accepted on these workloads).
    assert report.levels[2].accepted_tokens > 0, report.levels[2]
    # What each level adds: the shared-KV MXFP4 draft no KV, a small model its own KV layers.
    assert (report.levels[1].kv_cache, report.levels[1].kv_bytes_per_token) == ("shared", 0)
    assert report.levels[1].weight_bytes > 0
    assert (report.levels[expected[-1]].kv_cache, report.levels[expected[-1]].weight_bytes) == ("none", 0)
    if levels == "three":
        assert report.levels[2].forward_passes > 0  # the small model ran
        assert report.levels[2].kv_cache == "separate"
        assert report.levels[2].kv_bytes_per_token == 2 * 8 * 3 * 64 * 4  # K, V x 8 layers x 3 heads x 64, fp32


def test_three_level_engine_structure(runs):
    draft = runs["three"].draft
    assert draft["levels"] == ["level1", "level2"]
    inner = draft["inner_models"]["level2"]
    assert inner["mxfp4_layers"] == 8 * 4
    assert inner["kv_layers"] == 8


@pytest.mark.parametrize("levels", ["two", "three"])
@pytest.mark.parametrize("position", [1, 2])
def test_sampling_is_exact_in_distribution(runs, reference_run, levels, position):
    assert_same_token_distribution(reference_run, runs[levels], position, f"{levels} levels")
