"""Served robustness: a storm of streaming requests, client aborts, bad input, KV pressure, engine faults.

One real `vllm serve --speculative-config <file>` per configuration (an n-gram
inner level under a KV cache small enough to force preemption; with
SPECQD_STRESS_CONFIGS=all also one level), plus
one server without speculation for the reference answers. Each spec server:
greedy answers, a storm (concurrent streaming requests with mixed sampling, a
seeded quarter of them hung up by the client mid-stream, malformed bodies, a
prompt longer than max_model_len) while /health is polled, drain, greedy
answers again. The tests then assert on what was recorded. Engine-side faults
(a NaN target weight, an inner model that cannot load, an inner model with
another tokenizer) must end the server with one clear error, never a hang.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from engine_harness import ngram_level, specqd_spec
from server_harness import (
    DRAIN_TIMEOUT_S,
    ServedRun,
    StormRequest,
    assert_one_clear_error,
    greedy_answers,
    metric,
    run_requests,
    serve_flags,
    serve_until_exit,
    start,
    storm,
    wait_idle,
)

from vllm_specqd.bench.server_process import stop_server

pytestmark = pytest.mark.server

MAX_MODEL_LEN = 256
SERVE_FLAGS = serve_flags(MAX_MODEL_LEN)
# 10 blocks of 32 tokens (the target's and the draft's KV layers share each
# block) hold one max_model_len request but not the pressure set below.
PRESSURE_FLAGS = ["--block-size", "32", "--num-gpu-blocks-override", "10"]

# The draft writes into the target's own KV cache (spelled out: the storm must keep covering it).
SHARED_KV = {"kv_cache": "shared"}
SPECQD_ONE = specqd_spec(4, draft=SHARED_KV)
SPECQD_NGRAM = specqd_spec(4, ngram_level(2, prompt_lookup_min=2, prompt_lookup_max=4), draft=SHARED_KV)
ALL_CONFIGS = {"specqd-1": (SPECQD_ONE, []), "specqd-ngram": (SPECQD_NGRAM, PRESSURE_FLAGS)}
# `make test` storms the two-level server (its level 1 is the one-level path; it alone gets KV pressure):
# a second server costs CI about 3 minutes. SPECQD_STRESS_CONFIGS=all (`make test-stress`) storms both.
CONFIGS = (
    ALL_CONFIGS if os.environ.get("SPECQD_STRESS_CONFIGS") == "all" else {"specqd-ngram": ALL_CONFIGS["specqd-ngram"]}
)

STORM_REQUESTS = 24
ABORT_FRACTION = 0.25
SEED = 16

CHAT_QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for writing clean Python code.",
    "Explain what a hash map is to a beginner.",
    "Write a haiku about autumn leaves.",
    "How many legs does a spider have?",
    "Name five fruits that are red.",
    "Why is the sky blue?",
]
COMPLETION_PROMPTS = ["def is_prime(n):\n", "The three primary colors are", "import numpy as np\n", "Once upon a time"]
# The fixed greedy set, asked before and after the storm: (endpoint, prompt).
GREEDY_SET = [("chat", q) for q in CHAT_QUESTIONS[:4]] + [("completion", p) for p in COMPLETION_PROMPTS]
GREEDY_MAX_TOKENS = 16
# Completions with ignore_eos: together they outgrow PRESSURE_FLAGS' KV cache mid-generation
# (6 x (~12 prompt + 48 + 4 lookahead) tokens = 18 blocks > 10).
PRESSURE_SET = [("completion", f"{q}\n") for q in CHAT_QUESTIONS[:6]]
PRESSURE_MAX_TOKENS = 48
ABORTED_MAX_TOKENS = 64  # hung-up requests would run long: the abort, not the length, ends them


# ---------------------------------------------------------------- the storm's requests


def sampling_mix(i: int, endpoint: str) -> dict:
    """Greedy; temperature + top_p + seed; top_k; stop strings; logprobs; n > 1."""
    kind = i % 6
    if kind == 0:
        return {"temperature": 0, "max_tokens": 12}
    if kind == 1:
        return {"temperature": 0.8, "top_p": 0.9, "seed": i, "max_tokens": 12}
    if kind == 2:
        return {"temperature": 1.0, "max_tokens": 12, "extra_body": {"top_k": 20}}
    if kind == 3:
        return {"temperature": 0, "max_tokens": 16, "stop": ["\n", "."]}
    if kind == 4:
        logprobs = {"logprobs": True, "top_logprobs": 3} if endpoint == "chat" else {"logprobs": 3}
        return {"temperature": 0.5, "seed": i, "max_tokens": 8, **logprobs}
    return {"temperature": 0.7, "seed": i, "n": 2, "max_tokens": 8}


def storm_requests() -> list[StormRequest]:
    rng = random.Random(SEED)
    aborted = set(rng.sample(range(STORM_REQUESTS), round(STORM_REQUESTS * ABORT_FRACTION)))
    requests = []
    for i in range(STORM_REQUESTS):
        endpoint = "completion" if i % 4 == 3 else "chat"
        prompt = COMPLETION_PROMPTS[i % len(COMPLETION_PROMPTS)] if endpoint == "completion" else CHAT_QUESTIONS[i % 7]
        params = sampling_mix(i, endpoint)
        abort_after = None
        if i in aborted:
            abort_after = rng.randint(1, 4)
            params = {**params, "max_tokens": ABORTED_MAX_TOKENS}
        requests.append(StormRequest(i, endpoint, prompt, params, abort_after))
    return requests


def greedy_storm_requests() -> list[StormRequest]:
    """The storm's greedy requests that run to the end: their answers must match no speculation."""
    return [r for r in storm_requests() if r.params["temperature"] == 0 and r.abort_after is None]


def malformed_requests(model: str) -> list[tuple[str, str, str]]:
    """(what, path, raw body): each must get a 4xx with a message."""
    chat = "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    bodies = [
        ("truncated JSON", chat, '{"model": "' + model + '", "messages": ['),
        ("no messages", chat, json.dumps({"model": model})),
        ("messages not a list", chat, json.dumps({"model": model, "messages": "hi"})),
        ("negative temperature", chat, json.dumps({"model": model, "messages": hi, "temperature": -1})),
        ("unknown model", chat, json.dumps({"model": "no-such-model", "messages": hi})),
        (
            "too many logprobs",
            chat,
            json.dumps({"model": model, "messages": hi, "logprobs": True, "top_logprobs": 999}),
        ),
        ("token id out of vocabulary", "/v1/completions", json.dumps({"model": model, "prompt": [10**9]})),
        (
            "prompt longer than max_model_len",
            "/v1/completions",
            json.dumps({"model": model, "prompt": "hello " * (MAX_MODEL_LEN + 50), "max_tokens": 4}),
        ),
    ]
    return bodies


def greedy_texts(server, requests: list[tuple[str, str]], max_tokens: int, ignore_eos: bool = False) -> list[str]:
    return [a.text for a in greedy_answers(server, requests, max_tokens, ignore_eos=ignore_eos)]


# ---------------------------------------------------------------- the servers


@pytest.fixture(scope="module", autouse=True)
def native_kernel_built():
    """Build the native CPU kernel once, here, before any server does: a server killed while it
    compiles (a fault test's timeout) leaves torch's build lock behind, and every later build of
    the same sources waits on that lock forever."""
    try:
        from vllm_specqd.kernels.cpu_ops import native_available
    except ImportError:  # no native kernel in this tree: nothing to build
        return
    native_available()


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """Greedy answers of a server without speculation (normal KV cache, so never preempted)."""
    server = start(model_dir, tmp_path_factory.mktemp("reference"), "none", None, SERVE_FLAGS)
    started = time.monotonic()
    try:
        greedy = greedy_texts(server, GREEDY_SET, GREEDY_MAX_TOKENS)
        pressure = greedy_texts(server, PRESSURE_SET, PRESSURE_MAX_TOKENS, ignore_eos=True)
        storm_greedy = run_requests(server, greedy_storm_requests())
        preemptions = metric(wait_idle(server), "vllm:num_preemptions_total")
    finally:
        stop_server(server)
    print(
        f"\n[stress] reference: startup {server.startup_s:.1f} s, answers and stop {time.monotonic() - started:.1f} s"
    )
    assert all(greedy) and all(pressure) and all(o.error is None for o in storm_greedy)
    storm_greedy_texts = {o.request.index: o.texts for o in storm_greedy}
    return {"greedy": greedy, "pressure": pressure, "storm_greedy": storm_greedy_texts, "preemptions": preemptions}


@pytest.fixture(scope="module", params=list(CONFIGS))
def served(request, model_dir, tmp_path_factory) -> ServedRun:
    """Greedy set; (n-gram server) the pressure set between two preemption counts; KV usage idle;
    the storm and the drain; the greedy set again; stop. A failed phase is recorded, the next still run."""
    name = request.param
    spec, flags = CONFIGS[name]
    run = ServedRun(name)
    server = start(model_dir, tmp_path_factory.mktemp(name), name, spec, SERVE_FLAGS + flags)
    run.startup_s = server.startup_s

    def preemptions() -> float:
        return metric(wait_idle(server), "vllm:num_preemptions_total") or 0.0

    def greedy() -> list[str]:
        return greedy_texts(server, GREEDY_SET, GREEDY_MAX_TOKENS)

    try:
        run.greedy_before = run.phase("greedy_before", greedy)
        if flags == PRESSURE_FLAGS:
            before = run.phase("preemptions_before", preemptions)
            run.pressure = run.phase(
                "pressure", lambda: greedy_texts(server, PRESSURE_SET, PRESSURE_MAX_TOKENS, ignore_eos=True)
            )
            after = run.phase("preemptions_after", preemptions)
            run.preemptions = after - before if None not in (before, after) else None
        run.kv_idle = run.phase("kv_idle", lambda: metric(wait_idle(server), "vllm:kv_cache_usage_perc"))
        run.phase("storm_and_drain", lambda: storm(server, run, storm_requests(), malformed_requests(server.model)))
        run.greedy_after = run.phase("greedy_after", greedy)
    finally:
        run.exit_code = run.phase("stop", lambda: stop_server(server))
        run.log_tail = server.log_tail(60)
    print(f"\n[stress] {json.dumps(run.summary())}")
    return run


# ---------------------------------------------------------------- storm assertions


def test_every_phase_ran_without_error(served):
    assert served.errors == {}, served.log_tail


def test_storm_really_aborts_a_quarter_mid_stream(served):
    planned = [o for o in served.outcomes if o.request.abort_after is not None]
    assert len(planned) == round(STORM_REQUESTS * ABORT_FRACTION)
    for o in planned:
        # Hung up after the planned chunk, before the request could finish.
        assert o.error is None and o.hung_up and o.chunks == o.request.abort_after, (o.request, o.error)


def test_every_request_not_aborted_completes(served):
    done = [o for o in served.outcomes if o.request.abort_after is None]
    assert len(done) == STORM_REQUESTS - round(STORM_REQUESTS * ABORT_FRACTION)
    for o in done:
        params = o.request.params
        assert o.error is None, (o.request, o.error)
        assert sorted(o.finish_reasons) == list(range(o.request.n)), (o.request, o.finish_reasons)
        assert all(reason in ("stop", "length") for reason in o.finish_reasons.values()), (o.request, o)
        assert (
            o.completion_tokens is not None and o.request.n <= o.completion_tokens <= o.request.n * params["max_tokens"]
        )
        if "logprobs" in params:
            assert o.saw_logprobs, o.request
        for stop in params.get("stop", []):
            assert all(stop not in text for text in o.texts.values()), (o.request, o.texts)


def test_malformed_input_gets_a_4xx_with_a_message(served):
    assert len(served.malformed) == len(malformed_requests("m"))
    for what, status, message in served.malformed:
        assert 400 <= status < 500, (what, status, message)
        assert message.strip(), (what, status)


def test_health_stays_200(served):
    assert len(served.health) >= 10
    assert all(code == 200 for code in served.health), [c for c in served.health if c != 200][:5]


def test_kv_cache_usage_returns_to_idle(served):
    assert served.kv_idle is not None
    assert served.kv_peak > served.kv_idle, "the storm never used the KV cache: the check below means nothing"
    assert served.drain_s is not None, f"not drained in {DRAIN_TIMEOUT_S} s: {served.summary()}"
    assert served.kv_after == served.kv_idle


def test_no_per_request_state_left(served):
    assert served.tracked_after == 0, served.summary()
    if "inner" in CONFIGS[served.name][0]:
        # Levels keep KV bookkeeping per request while it runs; the gauge must have seen it.
        assert served.tracked_peak and served.tracked_peak > 0, served.summary()


def test_greedy_identical_before_after_storm_and_to_no_speculation(served, reference):
    assert served.greedy_before == reference["greedy"]
    assert served.greedy_after == reference["greedy"]


def test_greedy_requests_inside_the_storm_identical_to_no_speculation(served, reference):
    """Greedy rows batched with sampled, logprobs, n > 1 and aborted rows still give the no-spec answer."""
    in_storm = {o.request.index: o.texts for o in served.outcomes if o.request.index in reference["storm_greedy"]}
    assert len(in_storm) == len(greedy_storm_requests()) >= 4
    assert in_storm == reference["storm_greedy"]


@pytest.mark.parametrize("served", ["specqd-ngram"], indirect=True)  # the server with the small KV cache
def test_kv_pressure_preempts_and_stays_lossless(served, reference):
    assert served.pressure is not None
    assert reference["preemptions"] == 0, "the reference must not be preempted"
    assert served.preemptions is not None and served.preemptions > 0, "the small KV cache forced no preemption"
    assert served.pressure == reference["pressure"]


def test_server_stops_cleanly(served):
    assert served.exit_code in (0, -signal.SIGINT), served.log_tail


# ---------------------------------------------------------------- engine-side faults


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer cut of the bundled checkpoint: same tokenizer, quick to load (target and inner in fault tests)."""
    from vllm_specqd.model_prep import prepare_small_model

    return prepare_small_model(2, output_dir=tmp_path_factory.mktemp("tiny") / "model", quiet=True)


def tiny_copy(tiny_model: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / name))


def test_nan_in_a_target_weight_fails_naming_the_tensor(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = tiny_copy(tiny_model, tmp_path, "nan-target")
    tensor = "model.layers.1.mlp.down_proj.weight"
    weights = load_file(model_dir / "model.safetensors")
    weights[tensor][3, 5] = float("nan")
    weights[tensor][7, 0] = float("inf")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    run = serve_until_exit(model_dir, SPECQD_ONE, tmp_path, SERVE_FLAGS)
    assert_one_clear_error(run, f"{tensor}: cannot quantize to MXFP4, 2 of")


def test_inner_model_that_fails_to_load(tiny_model, tmp_path):
    inner = tiny_copy(tiny_model, tmp_path, "broken-inner")
    checkpoint = inner / "model.safetensors"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])  # an interrupted copy
    spec = {
        "method": "specqd",
        "num_speculative_tokens": 4,
        "inner": {"method": "draft_model", "model": str(inner), "num_speculative_tokens": 2},
    }
    run = serve_until_exit(tiny_model, spec, tmp_path, SERVE_FLAGS)
    assert_one_clear_error(run, f"specqd: level 2 model '{inner}' failed to load: SafetensorError")


def test_inner_model_with_a_different_tokenizer(tiny_model, tmp_path):
    inner = tiny_copy(tiny_model, tmp_path, "other-tokenizer")
    tokenizer = json.loads((inner / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (inner / "tokenizer.json").write_text(json.dumps(tokenizer))
    spec = {
        "method": "specqd",
        "num_speculative_tokens": 4,
        "inner": {"method": "draft_model", "model": str(inner), "num_speculative_tokens": 2},
    }
    run = serve_until_exit(tiny_model, spec, tmp_path, SERVE_FLAGS)
    assert_one_clear_error(run, "has a different tokenizer vocabulary than the target")
