"""specqd in vLLM's default mode (torch.compile, no enforce_eager), fp32: lossless, and a start-up
that puts no warm-up rows through the draft.

vLLM's profile and compile warm-up runs called the drafter's dummy_run with max_num_batched_tokens
rows, K forwards each: through the MXFP4 kernels that was most of a compiled engine's start-up.
The draft now runs eagerly in a compiled engine (docs/design.md), so it has nothing to compile and
those runs make no draft forward at all. Counted, not timed. The baseline is no speculation in the
same compiled mode: compiled and eager kernels may round differently.
"""

import pytest
from conftest import greedy_workload
from engine_harness import K, Workload, ngram_level, run_engine, specqd_spec

pytestmark = pytest.mark.engine

PROMPTS, MAX_TOKENS = 6, 32


def _run(model_dir, spec):
    from vllm import SamplingParams

    prompts = greedy_workload(model_dir).prompts[:PROMPTS]
    workload = Workload(prompts, [SamplingParams(temperature=0, max_tokens=MAX_TOKENS) for _ in prompts])
    return run_engine(model_dir, spec, {"greedy": workload}, enforce_eager=False)


@pytest.fixture(scope="module")
def compiled_reference(model_dir):
    return _run(model_dir, None)


@pytest.fixture(scope="module")
def compiled_one_level(model_dir, compiled_reference):  # one engine at a time
    return _run(model_dir, specqd_spec(K))


@pytest.fixture(scope="module")
def compiled_ngram_level(model_dir, compiled_one_level):
    return _run(model_dir, specqd_spec(K, inner=ngram_level(K // 2)))


@pytest.mark.parametrize("run_name", ["compiled_one_level", "compiled_ngram_level"])
def test_greedy_outputs_token_identical_to_compiled_no_speculation(run_name, compiled_reference, request):
    run = request.getfixturevalue(run_name)
    assert run.outputs["greedy"] == compiled_reference.outputs["greedy"]


@pytest.mark.parametrize("run_name", ["compiled_one_level", "compiled_ngram_level"])
def test_the_draft_drafts_and_warm_up_runs_none_of_its_rows(run_name, request):
    run = request.getfixturevalue(run_name)
    assert run.draft["work"]["warmup_forwards"] == 0
    assert run.level_stats.levels[1].forward_passes > 0
    assert run.spec_metrics["greedy"]["vllm:spec_decode_num_accepted_tokens"] > 0
