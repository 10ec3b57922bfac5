import os

# Before anything imports vLLM or transformers: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
# Lets tests send vllm_specqd.adapter.inspection.describe_draft to the workers.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from engine_harness import K, Workload, run_engine, specqd_spec  # noqa: E402

from vllm_specqd.bench.datasets import chat_questions, humaneval_prompts, render_chat  # noqa: E402

SAMPLED_REQUESTS = 300
SAMPLED_PROMPT = "Pick a random animal and describe it:"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from vllm_specqd.model_prep import prepare_model

    return prepare_model(quiet=True)


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    from vllm_specqd.model_prep import prepare_small_model

    return prepare_small_model(8, quiet=True)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A random-weight 2-layer Llama with 4 heads and 2 KV heads (TP=2 splits them), bundled tokenizer."""
    from vllm_specqd.model_prep import prepare_tiny_model

    return prepare_tiny_model(quiet=True)


def chat_prompts(model_dir: Path, n: int) -> list[str]:
    """The first ``n`` bundled chat questions in the model's chat template (as the benchmark sends them)."""
    return render_chat(chat_questions(n), model_dir)


def greedy_workload(model_dir: Path) -> Workload:
    from vllm import SamplingParams

    prompts = humaneval_prompts(12) + chat_prompts(model_dir, 10)
    return Workload(prompts, [SamplingParams(temperature=0, max_tokens=48) for _ in prompts])


def mixed_workload(model_dir: Path) -> Workload:
    """One batch mixing prompt lengths, max_tokens, stop strings and n > 1."""
    from vllm import SamplingParams

    chats = chat_prompts(model_dir, 4)
    code = humaneval_prompts(3)
    prompts = ["Hi", chats[0], code[0], chats[1], code[1], chats[2], "The quick brown fox", code[2], chats[3]]
    params = [
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=5),
        SamplingParams(temperature=0, max_tokens=64, stop=["\n\n"]),
        SamplingParams(temperature=0, max_tokens=40, stop=[".", "!"], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=80, stop=["return"]),
        # n > 1 needs temperature > 0 in vLLM; top_k=1 keeps it deterministic,
        # and routes it through the rejection sampler's random-request path.
        SamplingParams(temperature=1.0, top_k=1, max_tokens=24, n=2),
        SamplingParams(temperature=0, max_tokens=17),
        SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[198]),  # "\n"
        SamplingParams(temperature=0, max_tokens=33, min_tokens=20),
    ]
    return Workload(prompts, params)


def long_workload() -> Workload:
    """Long generations: KV windows must never corrupt a slot over hundreds of steps."""
    from vllm import SamplingParams

    prompts = humaneval_prompts(14)[12:]
    return Workload(prompts, [SamplingParams(temperature=0, max_tokens=256, ignore_eos=True) for _ in prompts])


def sampled_workload(seed_offset: int) -> Workload:
    """Many independent samples of a short continuation of one fixed context."""
    from vllm import SamplingParams

    params = [
        SamplingParams(temperature=0.9, top_k=40, max_tokens=3, seed=seed_offset + i) for i in range(SAMPLED_REQUESTS)
    ]
    return Workload([SAMPLED_PROMPT] * SAMPLED_REQUESTS, params)


@pytest.fixture(scope="session")
def reference_run(model_dir):
    """The same engine without speculation, over every workload the engine tests use."""
    return run_engine(
        model_dir,
        None,
        {
            "greedy": greedy_workload(model_dir),
            "mixed": mixed_workload(model_dir),
            "long": long_workload(),
            "sampled": sampled_workload(seed_offset=1_000_000),
        },
    )


LEVEL1_SPEC = specqd_spec(K)  # fixed K, defaults otherwise
LEVEL1_INSPECTED_LAYER = "model.layers.0.self_attn.qkv_proj"


@pytest.fixture(scope="session")
def level1_run(model_dir):
    """One level with the defaults (probabilistic draft sampling), over every workload. It is also the
    one-level engine test_engine_multilevel compares inner levels with: on all-greedy batches vLLM
    samples drafts greedily whatever draft_sample_method says (llm_base_proposer.py:483)."""
    return run_engine(
        model_dir,
        LEVEL1_SPEC,
        {
            "greedy": greedy_workload(model_dir),
            "mixed": mixed_workload(model_dir),
            "sampled": sampled_workload(seed_offset=0),
            "long": long_workload(),
        },
        inspect_layer=LEVEL1_INSPECTED_LAYER,
    )
