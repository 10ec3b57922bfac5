"""A hybrid-attention target: sliding-window and full-attention layers in two KV cache groups.

The target is a tiny random-weight Gemma-3 (tests/hybrid_model.py: 4 layers alternating a
32-token window and full attention). With draft.kv_cache "shared" each MXFP4 draft layer reads and
writes its target layer's KV through that layer's group (block table, slot mapping, sliding
window), which vLLM's own draft_model drafter refuses ("All drafting layers should belong to the
same kv cache group"). Greedy outputs must be token-identical to no speculation, for one level and
with an n-gram inner level. The one-level engine's draft writes random KV
(VLLM_SPECQD_POISON_DRAFT_KV=1), so a draft write into a committed slot would change its outputs;
the n-gram engine drafts cleanly (a poisoned draft's garbage tokens leave the n-gram lookup
nothing to match), so its guesses run through multi-token window passes.
Prompts and generations run well past the window, in chunks, with prefix caching on.

A draft that used one group's block table for every group stays token-identical (vLLM backs one
layer of each group with the same KV tensor, so its writes land on the same position's slot of
another layer, which verification rewrites), but it drafts from the wrong KV: measured
2026-12-02 on the dev machine, mean acceptance length 1.11 instead of 2.55 (3 prompts, K=4). The
acceptance floor below catches that. "separate" on such a target is a config error.
"""

import pytest
from conftest import sampled_workload
from engine_harness import (
    Workload,
    assert_same_token_distribution,
    environment,
    mean_acceptance_length,
    ngram_level,
    run_engine,
    specqd_spec,
)
from hybrid_model import LAYER_TYPES, NUM_LAYERS, SLIDING_WINDOW, build_hybrid_model

from vllm_specqd.config import SpecQDConfigError

pytestmark = pytest.mark.engine

K = 4
POISON = {"VLLM_SPECQD_POISON_DRAFT_KV": "1"}
ENGINE = dict(
    block_size=32,  # CPU attention wants multiples of 32; the window spans one block
    max_model_len=256,
    max_num_seqs=4,
    max_num_batched_tokens=64,  # the long prompts prefill in chunks
    enable_prefix_caching=True,
)
PREFIX = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest. " * 3
PROMPTS = [
    PREFIX + "What did the fox do next?",
    PREFIX + "def fibonacci(n: int) -> int:",
    "Hello",
]
MAX_TOKENS = [96, 61, 70]  # 61: a request that ends mid-round


def workloads(seed_offset: int) -> dict[str, Workload]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    return {"greedy": Workload(PROMPTS, params), "sampled": sampled_workload(seed_offset)}


def _run(model_dir, spec, env=None, seed_offset=0):
    with environment(env):
        return run_engine(model_dir, spec, workloads(seed_offset), **ENGINE)


@pytest.fixture(scope="module")
def hybrid_model_dir(model_dir, tmp_path_factory):
    return build_hybrid_model(tmp_path_factory.mktemp("hybrid") / "gemma3-hybrid-tiny", model_dir)


@pytest.fixture(scope="module")
def reference(hybrid_model_dir):
    return _run(hybrid_model_dir, None, seed_offset=1_000_000)  # samples independent of the spec engines


@pytest.fixture(scope="module")
def poisoned_one_level(hybrid_model_dir):
    return _run(hybrid_model_dir, specqd_spec(K), POISON)


@pytest.fixture(scope="module")
def ngram(hybrid_model_dir):
    return _run(hybrid_model_dir, specqd_spec(K, ngram_level(2)))


def test_poisoned_one_level_is_token_identical(reference, poisoned_one_level):
    assert poisoned_one_level.outputs["greedy"] == reference.outputs["greedy"]


def test_ngram_levels_are_token_identical(reference, ngram):
    assert ngram.outputs["greedy"] == reference.outputs["greedy"]


@pytest.mark.parametrize("engine", ["poisoned_one_level", "ngram"])
@pytest.mark.parametrize("position", [1, 2])
def test_sampling_is_exact_in_distribution(request, reference, engine, position):
    """Shared KV keeps sampling exact: the poisoned draft's proposals are far from the target's
    distribution, so only a correct rejection step gives the target's token distribution."""
    assert_same_token_distribution(reference, request.getfixturevalue(engine), position, engine)


def test_the_target_really_is_hybrid(poisoned_one_level, ngram):
    """Two KV cache groups, one with the sliding window; draft layers in both; the window matters."""
    for run in (poisoned_one_level, ngram):
        groups = run.draft["kv_cache_groups"]
        assert len(groups) == 2, groups
        windows = sorted(str(group["sliding_window"]) for group in groups)
        assert windows == sorted([str(SLIDING_WINDOW), "None"]), groups
        for group in groups:
            layers = {int(name.split(".layers.")[1].split(".")[0]) for name in group["layer_names"]}
            kind = "sliding_attention" if group["sliding_window"] else "full_attention"
            assert layers == {i for i in range(NUM_LAYERS) if LAYER_TYPES[i] == kind}
            draft_layers = [name for name in group["layer_names"] if name.startswith("draft_model.")]
            assert len(draft_layers) == len(layers), group  # each draft layer in its target layer's group
        assert (run.level_stats.levels[1].kv_cache, run.level_stats.levels[1].kv_bytes_per_token) == ("shared", 0)
    assert max(run.prompt_lens["greedy"]) > ENGINE["max_num_batched_tokens"] > SLIDING_WINDOW
    assert min(MAX_TOKENS) > SLIDING_WINDOW


def test_drafts_are_accepted(ngram):
    """The spec path really runs: the MXFP4 draft of the random model agrees often enough, and the
    n-gram level's guesses reach the draft's multi-token window passes."""
    assert mean_acceptance_length(ngram.spec_metrics["greedy"]) > 1.5
    assert ngram.level_stats.levels[2].proposer == "n-gram lookup"
    assert ngram.level_stats.levels[2].proposed_tokens > 0
    assert ngram.level_stats.levels[2].accepted_tokens > 0


def test_the_poison_reaches_the_draft(poisoned_one_level):
    """Random KV makes poor drafts (the draft attends to its own garbage); proof the hook is live."""
    assert mean_acceptance_length(poisoned_one_level.spec_metrics["greedy"]) < 1.5


def _engine_config(model_dir, spec):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model_dir), dtype="float32", enforce_eager=True, speculative_config=spec, **ENGINE)
    return args.create_engine_config()


def test_separate_kv_on_a_hybrid_target_is_a_config_error(hybrid_model_dir):
    spec = specqd_spec(K, draft={"kv_cache": "separate"})
    with pytest.raises(SpecQDConfigError, match=r"'draft.kv_cache' = 'separate'.*Use 'draft.kv_cache': 'shared'"):
        _engine_config(hybrid_model_dir, spec)
    shared = _engine_config(hybrid_model_dir, {**spec, "draft": {"kv_cache": "shared"}})
    assert shared.speculative_config.method == "draft_model"


def test_separate_kv_on_a_plain_target_is_fine(model_dir):
    spec = specqd_spec(K, draft={"kv_cache": "separate"})
    assert _engine_config(model_dir, spec).additional_config["specqd"]["draft"]["kv_cache"] == "separate"


def test_model_inner_levels_on_a_hybrid_target_are_accepted(hybrid_model_dir, small_model_dir):
    """They run in KV cache groups of their own (tests/test_engine_small_model.py runs one)."""
    inner = {"method": "draft_model", "model": str(small_model_dir), "num_speculative_tokens": 2}
    config = _engine_config(hybrid_model_dir, specqd_spec(K, inner))
    assert config.additional_config["specqd"]["inner"]["method"] == "draft_model"
