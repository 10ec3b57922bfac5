"""Served runner: per method, a `vllm serve` subprocess swept over concurrency levels.

Two loads. ``prompts`` (the default): per concurrency level c, max(num_prompts, c) completions
requests with the OpenAI client (prompts reused in order), at most c in flight; output tokens/s =
completion tokens / wall time of the level; latency per request end to end. ``random``: vLLM's own
load generator, ``vllm bench serve --dataset-name random`` with max(128, 2c) prompts of random
tokens and ``--ignore-eos`` (its output tokens/s and latencies; no texts, so no identity check).
vLLM's level-1 counters come from /metrics and the levels below from the server's specqd level
report, both read before and after each level: deltas of that level alone.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from vllm_specqd.bench.datasets import Prompt
from vllm_specqd.bench.methods import Method, baseline_name, speculative_config_for
from vllm_specqd.bench.preload import engine_env
from vllm_specqd.bench.server_process import scrape_metrics, start_server, stop_server, vllm_command, wait_healthy
from vllm_specqd.bench.spec_stats import (
    ACCEPTED_PER_POS,
    NUM_ACCEPTED,
    NUM_DRAFT_TOKENS,
    NUM_DRAFTS,
    SpecCounters,
    inner_acceptance,
    level1_acceptance,
    target_passes,
)
from vllm_specqd.level_report import STATS_DIR_ENV, LevelReport, read_settled_report

REQUEST_TIMEOUT_S = 3600.0
# At concurrency 16, eight waves: start-up probes and one slow wave weigh little.
RANDOM_MIN_PROMPTS = 128


@dataclass(frozen=True)
class ServeSettings:
    model_dir: str
    small_dir: str | None
    dtype: str
    k: int
    max_tokens: int
    max_model_len: int
    concurrency: tuple[int, ...]
    out_dir: Path
    inner_k: int | None = None
    specqd_draft: dict | None = None
    chat_temperature: float = 0.0  # chat prompts are sampled at this temperature (seeded); code stays greedy
    specqd_adaptive: dict | None = None
    eager: bool = False  # --enforce-eager; vLLM's default (and users') is torch.compile
    load: str = "prompts"  # or "random": `vllm bench serve --dataset-name random`
    random_input_len: int = 64

    def serve_flags(self) -> list[str]:
        flags = ["--dtype", self.dtype, "--max-model-len", str(self.max_model_len)]
        flags += ["--max-num-seqs", str(max(self.concurrency)), "--seed", "0"]
        return flags + (["--enforce-eager"] if self.eager else [])


def parse_prometheus(text: str) -> SpecCounters:
    """vLLM's level-1 spec-decode counters from a /metrics page, summed over engines."""
    from prometheus_client.parser import text_string_to_metric_families

    counters = SpecCounters()
    per_pos: dict[int, float] = {}
    totals = {NUM_DRAFTS: 0.0, NUM_DRAFT_TOKENS: 0.0, NUM_ACCEPTED: 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in totals:
                totals[name] += sample.value
            elif name == ACCEPTED_PER_POS:
                position = int(sample.labels["position"])
                per_pos[position] = per_pos.get(position, 0.0) + sample.value
    counters.num_drafts, counters.num_draft_tokens, counters.accepted_tokens = (
        int(totals[NUM_DRAFTS]),
        int(totals[NUM_DRAFT_TOKENS]),
        int(totals[NUM_ACCEPTED]),
    )
    counters.accepted_per_pos = [int(per_pos[i]) for i in sorted(per_pos)]
    return counters


def server_report(stats_dir: Path) -> LevelReport | None:
    """The level report of the one engine a `vllm serve` started with this stats dir (None: not specqd)."""
    paths = sorted(stats_dir.glob("*.json"))
    if len(paths) > 1:
        raise RuntimeError(f"{stats_dir} holds {len(paths)} engine reports; the served benchmark runs one engine")
    return read_settled_report(paths[0]) if paths else None


def inner_levels(after: LevelReport | None, before: LevelReport | None) -> dict[str, dict]:
    """Acceptance of levels >= 2 over one concurrency level."""
    if after is None:
        return {}
    delta = after.minus(before)
    return {str(n): inner_acceptance(entry) for n, entry in sorted(delta.levels.items()) if n >= 2}


async def _send_all(
    base_url: str,
    model: str,
    prompts: list[str],
    max_tokens: int,
    concurrency: int,
    temperatures: list[float] | None = None,
) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, prompt: str) -> dict:
        temperature = temperatures[index] if temperatures else 0.0
        sampling = {"temperature": temperature, **({"seed": index} if temperature > 0 else {})}
        async with gate:
            start = time.perf_counter()
            response = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **sampling)
            return {
                "latency_s": time.perf_counter() - start,
                "completion_tokens": response.usage.completion_tokens,
                "text": response.choices[0].text,
            }

    try:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await client.close()


def _latency_summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {
        "mean": statistics.fmean(ordered),
        "p50": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


def run_level(server, stats_dir: Path, prompts: list[Prompt], settings: ServeSettings, concurrency: int) -> dict:
    chosen = [prompts[i % len(prompts)] for i in range(max(len(prompts), concurrency))]
    texts = [p.text for p in chosen]
    temperatures = [settings.chat_temperature if p.source == "chat" else 0.0 for p in chosen]
    before, levels_before = parse_prometheus(scrape_metrics(server)), server_report(stats_dir)
    start = time.perf_counter()
    results = asyncio.run(
        _send_all(server.base_url, server.model, texts, settings.max_tokens, concurrency, temperatures)
    )
    wall = time.perf_counter() - start
    levels_after = server_report(stats_dir)  # settled: the engine has dropped every finished request
    after = parse_prometheus(scrape_metrics(server))
    counters = after - before
    generated = sum(r["completion_tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "num_requests": len(texts),
        "wall_s": wall,
        "output_tokens": generated,
        "output_tokens_per_s": generated / wall,
        "latency_s": _latency_summary([r["latency_s"] for r in results]),
        "level1": level1_acceptance(counters),
        "inner_levels": inner_levels(levels_after, levels_before),
        "target_passes_per_generated_token": target_passes(counters, generated, len(texts)) / generated,
        "counters": counters.to_dict(),
        "texts": [r["text"] for r in results],
        "greedy": [t == 0.0 for t in temperatures],  # only these are compared with `none`
    }


def run_level_random(server, stats_dir: Path, settings: ServeSettings, concurrency: int, result_path: Path) -> dict:
    """One concurrency level of vLLM's own random load (`vllm bench serve`), its JSON kept at ``result_path``."""
    num_prompts = max(RANDOM_MIN_PROMPTS, 2 * concurrency)
    command = vllm_command(
        "bench", "serve", "--base-url", server.base_url, "--model", server.model, "--tokenizer", server.model,
        "--dataset-name", "random", "--random-input-len", str(settings.random_input_len),
        "--random-output-len", str(settings.max_tokens), "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(result_path.parent), "--result-filename", result_path.name,
    )  # fmt: skip
    before, levels_before = parse_prometheus(scrape_metrics(server)), server_report(stats_dir)
    done = subprocess.run(command, capture_output=True, text=True, env=engine_env(), timeout=REQUEST_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve exited with {done.returncode}: {done.stderr[-2000:]}")
    levels_after = server_report(stats_dir)
    counters = parse_prometheus(scrape_metrics(server)) - before
    result = json.loads(result_path.read_text())
    generated = result["total_output_tokens"]
    return {
        "concurrency": concurrency,
        "num_requests": num_prompts,
        "wall_s": result["duration"],
        "output_tokens": generated,
        "output_tokens_per_s": result["output_throughput"],
        "latency_s": {q: result[f"{q}_e2el_ms"] / 1e3 for q in ("mean", "p50", "p90", "p99")},
        "ttft_ms": {"mean": result["mean_ttft_ms"], "p50": result["median_ttft_ms"]},
        "tpot_ms": {"mean": result["mean_tpot_ms"], "p50": result["median_tpot_ms"]},
        "level1": level1_acceptance(counters),
        "inner_levels": inner_levels(levels_after, levels_before),
        "target_passes_per_generated_token": target_passes(counters, generated, num_prompts) / generated,
        "counters": counters.to_dict(),
        "texts": None,  # random prompts, ignore_eos: nothing to compare
    }


def serve_method(method: Method, prompts: list[Prompt], settings: ServeSettings) -> dict:
    spec = speculative_config_for(method, settings)
    record = {
        "method": method.name,
        "description": method.description,
        "speculative_config": spec,
        "num_levels": method.num_levels,
        "concurrency_levels": [],
        "ld_preload": engine_env().get("LD_PRELOAD", ""),  # what start_server runs `vllm serve` with
    }
    log_path = settings.out_dir / f"server-{method.name}.log"
    record["server_log"] = log_path.name
    stats_dir = settings.out_dir / f"level-report-{method.name}"
    stats_dir.mkdir(parents=True, exist_ok=True)
    for stale in stats_dir.glob("*.json"):  # an earlier run's engine
        stale.unlink()
    server = None
    try:
        server = start_server(
            settings.model_dir,
            spec,
            settings.serve_flags(),
            log_path,
            settings.out_dir / f"speculative-config-{method.name}.json",
            extra_env={STATS_DIR_ENV: str(stats_dir), **dict(method.env)},
        )
        record["server_start_s"] = wait_healthy(server)
        asyncio.run(_send_all(server.base_url, server.model, [prompts[0].text], 8, 1))  # warm-up
        for concurrency in tqdm(settings.concurrency, desc=f"{method.name} concurrency", leave=False, position=1):
            try:
                if settings.load == "random":
                    result = settings.out_dir / f"vllm-bench-serve-{method.name}-c{concurrency}.json"
                    level = run_level_random(server, stats_dir, settings, concurrency, result)
                else:
                    level = run_level(server, stats_dir, prompts, settings, concurrency)
            except Exception as error:  # a failed level must not cost the others
                level = {"concurrency": concurrency, "error": f"{type(error).__name__}: {error}"}
            record["concurrency_levels"].append(level)
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()
    finally:
        if server is not None:
            record["server_exit_code"] = stop_server(server)
    return record


def serve_methods(methods: list[Method], prompts: list[Prompt], settings: ServeSettings) -> list[dict]:
    records = [serve_method(m, prompts, settings) for m in tqdm(methods, desc="methods", unit="server", position=0)]
    compare_with_baseline(records)
    return records


def compare_with_baseline(records: list[dict]) -> None:
    """Speedup and greedy identity of every level against the baseline's level at the same concurrency."""
    baseline = baseline_name([r["method"] for r in records])
    base_record = next((r for r in records if r["method"] == baseline), None)
    reference = {lv["concurrency"]: lv for lv in base_record["concurrency_levels"]} if base_record else {}
    for record in records:
        for level in record["concurrency_levels"]:
            base = reference.get(level["concurrency"])
            if base is None or "error" in level or "error" in base:
                continue
            level["speedup_vs_none"] = level["output_tokens_per_s"] / base["output_tokens_per_s"]
            if level.get("texts") is None or base.get("texts") is None:
                continue
            greedy = level.get("greedy") or [True] * len(level["texts"])
            pairs = [(a, b) for a, b, g in zip(level["texts"], base["texts"], greedy) if g]
            level["num_compared"] = len(pairs)
            level["num_different"] = sum(a != b for a, b in pairs)
            level["identical_to_none"] = level["num_different"] == 0
