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

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

MAX_MODEL_LEN = 256
SERVE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
# 10 blocks of 32 tokens (the target's and the draft's KV layers share each
# block) hold one max_model_len request but not the pressure set below.
PRESSURE_FLAGS = ["--block-size", "32", "--num-gpu-blocks-override", "10"]

# The draft writes into the target's own KV cache (spelled out: the storm must keep covering it).
SHARED_KV = {"kv_cache": "shared"}
SPECQD_ONE = {"method": "specqd", "num_speculative_tokens": 4, "draft": SHARED_KV, "adaptive": False}
SPECQD_NGRAM = {
    "method": "specqd",
    "num_speculative_tokens": 4,
    "draft": SHARED_KV,
    "adaptive": False,
    "inner": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
}
ALL_CONFIGS = {"specqd-1": (SPECQD_ONE, []), "specqd-ngram": (SPECQD_NGRAM, PRESSURE_FLAGS)}
# `make test` storms the two-level server (its level 1 is the one-level path; it alone gets KV pressure):
# a second server costs CI about 3 minutes. SPECQD_STRESS_CONFIGS=all (`make test-stress`) storms both.
CONFIGS = (
    ALL_CONFIGS if os.environ.get("SPECQD_STRESS_CONFIGS") == "all" else {"specqd-ngram": ALL_CONFIGS["specqd-ngram"]}
)

STORM_REQUESTS = 24
ABORT_FRACTION = 0.25
SEED = 16
REQUEST_TIMEOUT_S = 180.0
STORM_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 60.0
TRACKED_SETTLE_S = 10.0
FAULT_TIMEOUT_S = 300.0

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


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class StormRequest:
    index: int
    endpoint: str  # "chat" | "completion"
    prompt: str
    params: dict  # openai client kwargs (sampling)
    abort_after: int | None  # chunks read before the client hangs up; None reads to the end

    @property
    def n(self) -> int:
        return self.params.get("n", 1)


@dataclass
class Outcome:
    request: StormRequest
    chunks: int = 0
    texts: dict[int, str] = field(default_factory=dict)
    finish_reasons: dict[int, str | None] = field(default_factory=dict)
    saw_logprobs: bool = False
    completion_tokens: int | None = None
    error: str | None = None
    hung_up: bool = False  # the client closed the stream as planned


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


async def run_requests(server, requests: list[StormRequest]) -> list[Outcome]:
    client = _client(server)
    try:
        return list(await asyncio.gather(*(run_storm_request(client, server.model, r) for r in requests)))
    finally:
        await client.close()


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


# ---------------------------------------------------------------- client side


def _client(server):
    from openai import AsyncOpenAI

    # No retries: a failed request must show up as a failure, not be retried away.
    return AsyncOpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=REQUEST_TIMEOUT_S)


async def run_storm_request(client, model: str, request: StormRequest) -> Outcome:
    outcome = Outcome(request)
    stream_options = {"stream_options": {"include_usage": True}}
    try:
        if request.endpoint == "chat":
            messages = [{"role": "user", "content": request.prompt}]
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True, **stream_options, **request.params
            )
        else:
            stream = await client.completions.create(
                model=model, prompt=request.prompt, stream=True, **stream_options, **request.params
            )
        async for chunk in stream:
            outcome.chunks += 1
            if chunk.usage is not None:
                outcome.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text = choice.delta.content if request.endpoint == "chat" else choice.text
                outcome.texts[choice.index] = outcome.texts.get(choice.index, "") + (text or "")
                outcome.finish_reasons.setdefault(choice.index, None)
                if choice.finish_reason is not None:
                    outcome.finish_reasons[choice.index] = choice.finish_reason
                outcome.saw_logprobs |= choice.logprobs is not None
            if request.abort_after is not None and outcome.chunks >= request.abort_after:
                await stream.close()  # the server sees the disconnect and aborts the request
                outcome.hung_up = True
                break
    except Exception as e:  # noqa: BLE001 - every failure is recorded and asserted on
        outcome.error = f"{type(e).__name__}: {e}"
    return outcome


async def send_malformed(http, base_url: str, what: str, path: str, body: str) -> tuple[str, int, str]:
    try:
        response = await http.post(base_url + path, content=body, headers={"Content-Type": "application/json"})
    except Exception as e:  # noqa: BLE001
        return what, -1, f"{type(e).__name__}: {e}"
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = ""
    return what, response.status_code, message


async def greedy_answers(
    server, requests: list[tuple[str, str]], max_tokens: int, ignore_eos: bool = False
) -> list[str]:
    """Non-streaming greedy answers, all in flight at once (fp32: batching does not change them)."""
    client = _client(server)
    extra = {"extra_body": {"ignore_eos": True}} if ignore_eos else {}

    async def answer(endpoint: str, prompt: str) -> str:
        if endpoint == "chat":
            messages = [{"role": "user", "content": prompt}]
            response = await client.chat.completions.create(
                model=server.model, messages=messages, temperature=0, max_tokens=max_tokens, **extra
            )
            return response.choices[0].message.content
        response = await client.completions.create(
            model=server.model, prompt=prompt, temperature=0, max_tokens=max_tokens, **extra
        )
        return response.choices[0].text

    try:
        return list(await asyncio.gather(*(answer(*r) for r in requests)))
    finally:
        await client.close()


# ---------------------------------------------------------------- metrics


def metric(text: str, name: str) -> float | None:
    """Sum of a metric's samples over its label sets; None if absent."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]
    return sum(values) if values else None


def scrape(server) -> str:
    from vllm_specqd.bench.server_process import scrape_metrics

    return scrape_metrics(server)


# ---------------------------------------------------------------- one server's run


@dataclass
class ServedRun:
    name: str
    greedy_before: list[str] = field(default_factory=list)
    greedy_after: list[str] = field(default_factory=list)
    pressure: list[str] | None = None
    preemptions: float | None = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    malformed: list[tuple[str, int, str]] = field(default_factory=list)
    health: list[int | str] = field(default_factory=list)
    kv_idle: float | None = None
    kv_peak: float = 0.0
    kv_after: float | None = None
    tracked_peak: float | None = None
    tracked_after: float | None = None
    storm_s: float = 0.0
    drain_s: float | None = None
    startup_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase
    errors: dict[str, str] = field(default_factory=dict)  # phase -> the exception that ended it
    exit_code: int | None = None
    log_tail: str = ""

    def summary(self) -> dict:
        return {
            "config": self.name,
            "startup_s": round(self.startup_s, 1),
            "requests": len(self.outcomes),
            "client_aborts": sum(o.hung_up for o in self.outcomes),
            "completed": sum(o.error is None and not o.hung_up for o in self.outcomes),
            "malformed": len(self.malformed),
            "malformed_4xx": sum(400 <= status < 500 for _, status, _ in self.malformed),
            "malformed_5xx": sum(status >= 500 for _, status, _ in self.malformed),
            "health_probes": len(self.health),
            "health_non_200": sum(code != 200 for code in self.health),
            "phases_s": {k: round(v, 1) for k, v in self.phases.items()},
            "storm_s": round(self.storm_s, 1),
            "drain_s": None if self.drain_s is None else round(self.drain_s, 2),
            "kv_usage_idle": self.kv_idle,
            "kv_usage_peak": self.kv_peak,
            "kv_usage_after": self.kv_after,
            "tracked_requests_peak": self.tracked_peak,
            "tracked_requests_after": self.tracked_after,
            "preemptions": self.preemptions,
            "errors": self.errors,
        }


async def _watch(server, run: ServedRun, stop: asyncio.Event) -> None:
    """/health every 0.5 s; /metrics every second (KV usage and tracked requests peaks)."""
    import httpx

    async with httpx.AsyncClient(timeout=10) as http:
        last_scrape = 0.0
        while not stop.is_set():
            try:
                run.health.append((await http.get(server.base_url + "/health")).status_code)
            except Exception as e:  # noqa: BLE001
                run.health.append(f"{type(e).__name__}: {e}")
            if time.monotonic() - last_scrape >= 1.0:
                last_scrape = time.monotonic()
                try:
                    text = (await http.get(server.base_url + "/metrics")).text
                    run.kv_peak = max(run.kv_peak, metric(text, "vllm:kv_cache_usage_perc") or 0.0)
                    tracked = metric(text, "specqd:tracked_requests")
                    if tracked is not None:
                        run.tracked_peak = max(run.tracked_peak or 0.0, tracked)
                except Exception:  # noqa: BLE001 - a failed scrape only loses a sample; /health is asserted
                    pass
            await asyncio.sleep(0.5)


async def _storm(server, run: ServedRun) -> None:
    import httpx

    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(server, run, stop))
    client = _client(server)
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            started = time.monotonic()
            tasks = [run_storm_request(client, server.model, r) for r in storm_requests()]
            bad = [send_malformed(http, server.base_url, *m) for m in malformed_requests(server.model)]
            results = await asyncio.wait_for(asyncio.gather(*tasks, *bad), STORM_TIMEOUT_S)
            run.storm_s = time.monotonic() - started
            run.outcomes, run.malformed = list(results[: len(tasks)]), list(results[len(tasks) :])
            await _drain(server, run)
    finally:
        stop.set()
        await watcher
        await client.close()


async def _drain(server, run: ServedRun) -> None:
    """Time until nothing runs or waits and KV usage is back at idle; then let the drafter's count settle."""
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_TIMEOUT_S:
        text = await asyncio.to_thread(scrape, server)
        busy = (metric(text, "vllm:num_requests_running") or 0) + (metric(text, "vllm:num_requests_waiting") or 0)
        run.kv_after = metric(text, "vllm:kv_cache_usage_perc")
        if busy == 0 and run.kv_after == run.kv_idle:
            run.drain_s = time.monotonic() - started
            break
        await asyncio.sleep(0.25)
    # The worker republishes its count when vLLM drops the finished requests (one engine step later).
    settle = time.monotonic()
    while True:
        run.tracked_after = metric(await asyncio.to_thread(scrape, server), "specqd:tracked_requests")
        if run.tracked_after == 0 or time.monotonic() - settle > TRACKED_SETTLE_S:
            return
        await asyncio.sleep(0.25)


def wait_idle(server, timeout_s: float = DRAIN_TIMEOUT_S) -> str:
    started = time.monotonic()
    while True:
        text = scrape(server)
        busy = (metric(text, "vllm:num_requests_running") or 0) + (metric(text, "vllm:num_requests_waiting") or 0)
        if busy == 0 or time.monotonic() - started > timeout_s:
            return text
        time.sleep(0.25)


def serve(model_dir: Path, root: Path, name: str, spec: dict | None, extra_flags: list[str]):
    from vllm_specqd.bench.server_process import start_server, wait_healthy

    server = start_server(str(model_dir), spec, SERVE_FLAGS + extra_flags, root / f"{name}.log", root / f"{name}.json")
    try:
        startup_s = wait_healthy(server, timeout_s=600)
    except BaseException:
        from vllm_specqd.bench.server_process import stop_server

        stop_server(server)
        raise
    return server, startup_s


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """Greedy answers of a server without speculation (normal KV cache, so never preempted)."""
    from vllm_specqd.bench.server_process import stop_server

    server, startup_s = serve(model_dir, tmp_path_factory.mktemp("reference"), "none", None, [])
    started = time.monotonic()
    try:
        greedy = asyncio.run(greedy_answers(server, GREEDY_SET, GREEDY_MAX_TOKENS))
        pressure = asyncio.run(greedy_answers(server, PRESSURE_SET, PRESSURE_MAX_TOKENS, ignore_eos=True))
        storm_greedy = asyncio.run(run_requests(server, greedy_storm_requests()))
        preemptions = metric(wait_idle(server), "vllm:num_preemptions_total")
    finally:
        stop_server(server)
    print(f"\n[stress] reference: startup {startup_s:.1f} s, answers and stop {time.monotonic() - started:.1f} s")
    assert all(greedy) and all(pressure) and all(o.error is None for o in storm_greedy)
    storm_greedy_texts = {o.request.index: o.texts for o in storm_greedy}
    return {"greedy": greedy, "pressure": pressure, "storm_greedy": storm_greedy_texts, "preemptions": preemptions}


@pytest.fixture(scope="module", params=list(CONFIGS))
def served(request, model_dir, tmp_path_factory) -> ServedRun:
    from vllm_specqd.bench.server_process import stop_server

    name = request.param
    spec, flags = CONFIGS[name]
    run = ServedRun(name)
    server, run.startup_s = serve(model_dir, tmp_path_factory.mktemp(name), name, spec, flags)

    def phase(name: str, work):
        """Run one phase; a failure is recorded (and asserted on by the tests), the next phases still run."""
        started = time.monotonic()
        try:
            return work()
        except Exception as e:  # noqa: BLE001
            run.errors[name] = f"{type(e).__name__}: {e}"
            return None
        finally:
            run.phases[name] = time.monotonic() - started

    def preemptions() -> float:
        return metric(wait_idle(server), "vllm:num_preemptions_total") or 0.0

    def greedy() -> list[str]:
        return asyncio.run(greedy_answers(server, GREEDY_SET, GREEDY_MAX_TOKENS))

    try:
        run.greedy_before = phase("greedy_before", greedy)
        if flags == PRESSURE_FLAGS:
            before = phase("preemptions_before", preemptions)
            run.pressure = phase(
                "pressure",
                lambda: asyncio.run(greedy_answers(server, PRESSURE_SET, PRESSURE_MAX_TOKENS, ignore_eos=True)),
            )
            after = phase("preemptions_after", preemptions)
            run.preemptions = after - before if None not in (before, after) else None
        run.kv_idle = phase("kv_idle", lambda: metric(wait_idle(server), "vllm:kv_cache_usage_perc"))
        phase("storm_and_drain", lambda: asyncio.run(_storm(server, run)))
        run.greedy_after = phase("greedy_after", greedy)
    finally:
        run.exit_code = phase("stop", lambda: stop_server(server))
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


def _session_alive(session_id: int) -> list[int]:
    """Live (non-zombie) processes still in the server's session."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


@dataclass
class FaultRun:
    exit_code: int
    seconds: float
    log: str
    leftover: list[int]


def serve_until_exit(model_dir: Path, spec: dict, root: Path) -> FaultRun:
    """Start a server that must fail; wait (bounded) for it and every process it started to exit."""
    from vllm_specqd.bench.server_process import start_server, stop_server

    server = start_server(str(model_dir), spec, SERVE_FLAGS, root / "server.log", root / "spec.json")
    started = time.monotonic()
    try:
        code = server.process.wait(timeout=FAULT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_server(server)  # SIGINT, SIGTERM, then SIGKILL to its session
        pytest.fail(f"the server hung for {FAULT_TIMEOUT_S:.0f} s instead of failing:\n{server.log_tail()}")
    seconds = time.monotonic() - started
    print(f"\n[stress] fault {root.name}: exit code {code} after {seconds:.1f} s")
    deadline = time.monotonic() + 30
    while (leftover := _session_alive(server.process.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if leftover:
        os.killpg(server.process.pid, signal.SIGKILL)
    return FaultRun(code, seconds, server.log_path.read_text(errors="replace"), leftover)


def assert_one_clear_error(run: FaultRun, message: str) -> None:
    assert run.exit_code != 0, run.log[-3000:]
    assert message in run.log, run.log[-3000:]
    assert not run.leftover, f"processes {run.leftover} outlived the failed server"
    assert "Application startup complete" not in run.log, "the server came up despite the fault"


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
    run = serve_until_exit(model_dir, SPECQD_ONE, tmp_path)
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
    run = serve_until_exit(tiny_model, spec, tmp_path)
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
    run = serve_until_exit(tiny_model, spec, tmp_path)
    assert_one_clear_error(run, "has a different tokenizer vocabulary than the target")
