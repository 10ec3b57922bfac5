"""The `vllm serve` harness of the server tests, on top of the benchmark's (vllm_specqd/bench/server_process.py).

The benchmark's functions start a server on a free loopback port (its speculative config in a file,
tcmalloc + libiomp5 preloaded), wait until it is healthy and stop it (SIGINT, SIGTERM, then SIGKILL to
its session). This module adds what the tests need around them: float32 serve flags, a context
manager that always stops the server, answers through the openai client (streaming or not),
/metrics samples, waiting until idle, the storm of test_server_stress.py (streaming requests,
client hang-ups, malformed bodies while /health and /metrics are watched, then the drain) and
servers that must fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vllm_specqd.bench.server_process import Server, scrape_metrics, start_server, stop_server, wait_healthy

HEALTH_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 180.0
STORM_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 60.0
TRACKED_SETTLE_S = 10.0  # the drafter republishes its request count one engine step after vLLM drops them
FAULT_TIMEOUT_S = 300.0


def serve_flags(max_model_len: int = 2048, *extra: str) -> list[str]:
    """float32 and eager: there speculation must be token-identical to no speculation (engine_harness.py)."""
    return ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len), "--seed", "0", *extra]


def start(
    model_dir: Path,
    work_dir: Path,
    name: str,
    spec: dict | Path | None,
    flags: list[str],
    env: dict[str, str] | None = None,
) -> Server:
    """`vllm serve` (log ``<work_dir>/<name>.log``), healthy (``server.startup_s``); stopped if it never is."""
    server = start_server(str(model_dir), spec, flags, work_dir / f"{name}.log", work_dir / f"{name}.json", env)
    try:
        wait_healthy(server, timeout_s=HEALTH_TIMEOUT_S)
    except BaseException:
        stop_server(server)
        raise
    return server


@contextmanager
def running(*args, **kwargs) -> Iterator[Server]:
    """``start(...)``'s healthy server for the block, stopped after it: then ``server.exit_code`` and
    ``server.log_text()``."""
    server = start(*args, **kwargs)
    try:
        yield server
    finally:
        stop_server(server)


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None


def client(server: Server):
    from openai import AsyncOpenAI

    # No retries: a failed request must show up as a failure, not be retried away.
    return AsyncOpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=REQUEST_TIMEOUT_S)


async def create(openai_client, model: str, endpoint: str, prompt: str, **params):
    """One chat ("chat": ``prompt`` is the user message) or completions request; a stream if ``stream=True``."""
    if endpoint == "chat":
        messages = [{"role": "user", "content": prompt}]
        return await openai_client.chat.completions.create(model=model, messages=messages, **params)
    return await openai_client.completions.create(model=model, prompt=prompt, **params)


def choice_text(endpoint: str, choice) -> str | None:
    """The text of a response's choice, or of a stream chunk's."""
    if endpoint == "chat":
        return choice.delta.content if hasattr(choice, "delta") else choice.message.content
    return choice.text


async def answer(openai_client, model: str, endpoint: str, prompt: str, stream: bool = False, **params) -> Answer:
    """The first choice's whole text and finish reason, from a response or a stream."""
    response = await create(openai_client, model, endpoint, prompt, stream=stream, **params)
    if not stream:
        return Answer(choice_text(endpoint, response.choices[0]), response.choices[0].finish_reason)
    text, finish_reason = "", None
    async for chunk in response:
        for choice in chunk.choices:
            text += choice_text(endpoint, choice) or ""
            finish_reason = choice.finish_reason or finish_reason
    return Answer(text, finish_reason)


def greedy_answers(
    server: Server,
    requests: list[tuple[str, str]],
    max_tokens: int,
    *,
    stream: bool = False,
    one_at_a_time: bool = False,
    ignore_eos: bool = False,
) -> list[Answer]:
    """Greedy answers to (endpoint, prompt) requests: all in flight at once (fp32: batching does not
    change them), or ``one_at_a_time``."""
    params = {
        "temperature": 0,
        "max_tokens": max_tokens,
        **({"extra_body": {"ignore_eos": True}} if ignore_eos else {}),
    }

    async def run() -> list[Answer]:
        openai_client = client(server)

        def ask(endpoint: str, prompt: str):
            return answer(openai_client, server.model, endpoint, prompt, stream, **params)

        try:
            if one_at_a_time:
                return [await ask(*request) for request in requests]
            return list(await asyncio.gather(*(ask(*request) for request in requests)))
        finally:
            await openai_client.close()

    return asyncio.run(run())


# ---------------------------------------------------------------- metrics


def metric_samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of ``name`` on a /metrics page; labels as written (``{a="b",...}``)."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
    return [(m.group(1) or "", float(m.group(2))) for m in pattern.finditer(text)]


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of a metric's samples whose labels include ``labels``; None if there is none."""
    values = [
        value
        for sample_labels, value in metric_samples(text, name)
        if all(f'{k}="{v}"' in sample_labels for k, v in labels.items())
    ]
    return sum(values) if values else None


def scrape(server: Server) -> str:
    return scrape_metrics(server)


def busy_requests(text: str) -> float:
    return (metric(text, "vllm:num_requests_running") or 0) + (metric(text, "vllm:num_requests_waiting") or 0)


def wait_idle(server: Server, timeout_s: float = DRAIN_TIMEOUT_S) -> str:
    """The /metrics page once nothing runs or waits (or after ``timeout_s``)."""
    started = time.monotonic()
    while True:
        text = scrape(server)
        if busy_requests(text) == 0 or time.monotonic() - started > timeout_s:
            return text
        time.sleep(0.25)


# ---------------------------------------------------------------- the storm


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


async def run_storm_request(openai_client, model: str, request: StormRequest) -> Outcome:
    """Stream one request (usage included), every choice; hang up after ``abort_after`` chunks."""
    outcome = Outcome(request)
    try:
        stream = await create(
            openai_client,
            model,
            request.endpoint,
            request.prompt,
            stream=True,
            stream_options={"include_usage": True},
            **request.params,
        )
        async for chunk in stream:
            outcome.chunks += 1
            if chunk.usage is not None:
                outcome.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text = choice_text(request.endpoint, choice)
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


def run_requests(server: Server, requests: list[StormRequest]) -> list[Outcome]:
    """The requests, all in flight at once, as the storm sends them."""

    async def run() -> list[Outcome]:
        openai_client = client(server)
        try:
            return list(await asyncio.gather(*(run_storm_request(openai_client, server.model, r) for r in requests)))
        finally:
            await openai_client.close()

    return asyncio.run(run())


async def send_malformed(http, base_url: str, what: str, path: str, body: str) -> tuple[str, int, str]:
    """POST a raw body: (what, HTTP status or -1, the error message the server gave)."""
    try:
        response = await http.post(base_url + path, content=body, headers={"Content-Type": "application/json"})
    except Exception as e:  # noqa: BLE001
        return what, -1, f"{type(e).__name__}: {e}"
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = ""
    return what, response.status_code, message


@dataclass
class ServedRun:
    """What one spec server's phases recorded; the stress tests assert on it."""

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

    def phase(self, name: str, work: Callable):
        """Run one phase; a failure is recorded (and asserted on by the tests), the next phases still run."""
        started = time.monotonic()
        try:
            return work()
        except Exception as e:  # noqa: BLE001
            self.errors[name] = f"{type(e).__name__}: {e}"
            return None
        finally:
            self.phases[name] = time.monotonic() - started

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


async def _watch(server: Server, run: ServedRun, stop: asyncio.Event) -> None:
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


async def _drain(server: Server, run: ServedRun) -> None:
    """Time until nothing runs or waits and KV usage is back at idle; then let the drafter's count settle."""
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_TIMEOUT_S:
        text = await asyncio.to_thread(scrape, server)
        run.kv_after = metric(text, "vllm:kv_cache_usage_perc")
        if busy_requests(text) == 0 and run.kv_after == run.kv_idle:
            run.drain_s = time.monotonic() - started
            break
        await asyncio.sleep(0.25)
    settle = time.monotonic()
    while True:
        run.tracked_after = metric(await asyncio.to_thread(scrape, server), "specqd:tracked_requests")
        if run.tracked_after == 0 or time.monotonic() - settle > TRACKED_SETTLE_S:
            return
        await asyncio.sleep(0.25)


def storm(server: Server, run: ServedRun, requests: list[StormRequest], malformed: list[tuple[str, str, str]]) -> None:
    """The requests and the malformed (what, path, raw body) posts all at once while /health and /metrics
    are watched; then the drain. Needs ``run.kv_idle``."""
    import httpx

    async def go() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(server, run, stop))
        openai_client = client(server)
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                started = time.monotonic()
                tasks = [run_storm_request(openai_client, server.model, r) for r in requests]
                bad = [send_malformed(http, server.base_url, *m) for m in malformed]
                results = await asyncio.wait_for(asyncio.gather(*tasks, *bad), STORM_TIMEOUT_S)
                run.storm_s = time.monotonic() - started
                run.outcomes, run.malformed = list(results[: len(tasks)]), list(results[len(tasks) :])
                await _drain(server, run)
        finally:
            stop.set()
            await watcher
            await openai_client.close()

    asyncio.run(go())


# ---------------------------------------------------------------- servers that must fail


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
    leftover: list[int]  # processes of the server's session still alive 30 s after it exited


def serve_until_exit(model_dir: Path, spec: dict, root: Path, flags: list[str]) -> FaultRun:
    """Start a server that must fail; wait (bounded) for it and every process it started to exit."""
    server = start_server(str(model_dir), spec, flags, root / "server.log", root / "spec.json")
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
    return FaultRun(code, seconds, server.log_text(), leftover)


def assert_one_clear_error(run: FaultRun, message: str) -> None:
    assert run.exit_code != 0, run.log[-3000:]
    assert message in run.log, run.log[-3000:]
    assert not run.leftover, f"processes {run.leftover} outlived the failed server"
    assert "Application startup complete" not in run.log, "the server came up despite the fault"
