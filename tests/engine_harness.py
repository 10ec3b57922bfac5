"""Run a real vLLM engine once over named workloads and keep everything tests assert on.

Starting an engine costs ~30-50 s on the CI machine, so each engine is started
once, runs every workload its tests need, and is shut down before the next
one starts (memory). Tests then assert on the recorded :class:`EngineRun`.

Engines run in float32: on CPU, vLLM's bf16 attention kernel gives a query
row different rounding when it is verified in a multi-token batch than when it
is decoded alone, so *every* vLLM speculative method (ngram, draft_model)
changes bf16 greedy outputs at near-ties. In float32 the kernels are
query-length invariant and speculation must be token-identical.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_specqd.bench.methods import NGRAM_LOOKUP
from vllm_specqd.bench.offline import environment  # noqa: F401  (the test modules import it from here)
from vllm_specqd.level_report import LevelReport

K = 6  # level-1 draft tokens used across the engine tests


def specqd_spec(k: int = K, inner: dict | None = None, **fields) -> dict:
    """A specqd ``speculative_config`` with a fixed k (adaptive off), the defaults otherwise;
    ``inner``: the level below level 1; ``fields``: more top-level fields (``draft``, ...)."""
    spec = {"method": "specqd", "num_speculative_tokens": k, "adaptive": False, **fields}
    if inner is not None:
        spec["inner"] = inner
    return spec


def ngram_level(k: int, **lookup) -> dict:
    """An n-gram inner level proposing ``k`` tokens (vLLM's prompt-lookup defaults unless ``lookup``)."""
    return {"method": "ngram", "num_speculative_tokens": k, **lookup}


def three_levels(small_model_dir: Path, **level1) -> dict:
    """MXFP4 self-draft (K) <- the small model, MXFP4 (k=3) <- n-gram lookup (k=2, the benchmark's lookup)."""
    small = {
        "method": "draft_model",
        "model": str(small_model_dir),
        "quantization": "mxfp4",
        "num_speculative_tokens": 3,
        "inner": ngram_level(2, **NGRAM_LOOKUP),
    }
    return specqd_spec(K, small, **level1)


@dataclass
class Workload:
    prompts: list[str]
    params: list  # one vllm.SamplingParams per prompt


@dataclass
class EngineRun:
    outputs: dict[str, list[list[list[int]]]] = field(default_factory=dict)  # workload -> prompt -> completion
    request_ids: dict[str, list[str]] = field(default_factory=dict)
    prompt_lens: dict[str, list[int]] = field(default_factory=dict)
    max_tokens: dict[str, list[int]] = field(default_factory=dict)
    texts: dict[str, list[list[str]]] = field(default_factory=dict)
    finish_reasons: dict[str, list[list[str]]] = field(default_factory=dict)
    spec_metrics: dict[str, dict] = field(default_factory=dict)  # workload -> counter deltas
    level_stats: LevelReport | None = None  # cumulative report after the last workload
    level_stats_after: dict[str, LevelReport | None] = field(default_factory=dict)  # report after each workload
    draft: dict | None = None  # describe_draft of rank 0
    drafts: list[dict] = field(default_factory=list)  # describe_draft of every worker (tensor-parallel ranks)
    trace: list[dict] = field(default_factory=list)


def _spec_counters(llm) -> dict:
    counters = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode") or metric.name == "vllm:num_preemptions":
            counters[metric.name] = list(metric.values) if hasattr(metric, "values") else metric.value
    return counters


def _delta(after: dict, before: dict) -> dict:
    out = {}
    for name, value in after.items():
        old = before.get(name)
        if isinstance(value, list):
            old = old or [0] * len(value)
            out[name] = [a - b for a, b in zip(value, old)]
        else:
            out[name] = value - (old or 0)
    return out


def run_engine(
    model_dir: Path,
    speculative_config: dict | None,
    workloads: dict[str, Workload],
    inspect_layer: str | None = None,
    inspect_layers: tuple[str, ...] = (),
    **llm_kwargs,
) -> EngineRun:
    from vllm import LLM

    run = EngineRun()
    trace_file = tempfile.NamedTemporaryFile(prefix="specqd-trace-", suffix=".jsonl", delete=False)
    trace_file.close()
    # Read by the worker process, which inherits the environment at start-up.
    os.environ["VLLM_SPECQD_TRACE_DRAFTS"] = trace_file.name
    started = time.monotonic()
    try:
        settings = dict(enforce_eager=True, dtype="float32", max_model_len=2048, seed=0, disable_log_stats=False)
        llm = LLM(model=str(model_dir), speculative_config=speculative_config, **{**settings, **llm_kwargs})
    finally:
        del os.environ["VLLM_SPECQD_TRACE_DRAFTS"]
    try:
        print(f"[engine] start {time.monotonic() - started:.0f}s spec={speculative_config}", file=sys.stderr)
        for name, workload in workloads.items():
            before = _spec_counters(llm)
            started = time.monotonic()
            results = llm.generate(workload.prompts, workload.params, use_tqdm=False)
            print(f"[engine] {name}: {time.monotonic() - started:.0f}s", file=sys.stderr)
            run.outputs[name] = [[list(c.token_ids) for c in r.outputs] for r in results]
            run.request_ids[name] = [r.request_id for r in results]
            run.prompt_lens[name] = [len(r.prompt_token_ids) for r in results]
            run.max_tokens[name] = [p.max_tokens for p in workload.params]
            run.texts[name] = [[c.text for c in r.outputs] for r in results]
            run.finish_reasons[name] = [[c.finish_reason for c in r.outputs] for r in results]
            run.spec_metrics[name] = _delta(_spec_counters(llm), before)
            if speculative_config is not None:
                from vllm_specqd.adapter.metrics import read_level_stats

                run.level_stats_after[name] = read_level_stats(llm)
        if speculative_config is not None:
            from vllm_specqd.adapter.inspection import describe_draft

            run.level_stats = run.level_stats_after[name]
            run.drafts = llm.collective_rpc(describe_draft, kwargs={"layer": inspect_layer, "layers": inspect_layers})
            run.draft = run.drafts[0]
        with open(trace_file.name) as f:
            run.trace = [json.loads(line) for line in f]
    finally:
        del llm
        gc.collect()
        os.unlink(trace_file.name)
    return run


def mean_acceptance_length(metrics: dict) -> float:
    return 1 + metrics["vllm:spec_decode_num_accepted_tokens"] / metrics["vllm:spec_decode_num_drafts"]


def same_distribution_pvalue(a: list[int], b: list[int], min_count: int = 10) -> float:
    """Chi-square test of homogeneity: were samples `a` and `b` drawn from one distribution?

    Categories seen fewer than `min_count` times in total are lumped together so
    every expected cell count stays large enough for the chi-square approximation.
    """
    from collections import Counter

    from scipy.stats import chi2_contingency

    counts_a, counts_b = Counter(a), Counter(b)
    total = counts_a + counts_b
    common = sorted(token for token, n in total.items() if n >= min_count)
    rows = [
        [counts[t] for t in common] + [sum(counts[t] for t in counts if t not in common)]
        for counts in (counts_a, counts_b)
    ]
    if rows[0][-1] + rows[1][-1] == 0:
        rows = [row[:-1] for row in rows]
    return float(chi2_contingency(rows).pvalue)


def token_at(tokens: list[int], position: int) -> int:
    """The token at ``position`` of a completion; -1 where it stopped (EOS) before."""
    return tokens[position] if position < len(tokens) else -1


def assert_same_token_distribution(
    reference: EngineRun, run: EngineRun, position: int, label: str = "", workload: str = "sampled"
) -> None:
    """Chi-square test: the token at ``position`` of each request's first completion follows one
    distribution in ``run`` and in ``reference`` (p > 1e-3)."""
    ref = [token_at(out[0], position) for out in reference.outputs[workload]]
    got = [token_at(out[0], position) for out in run.outputs[workload]]
    pvalue = same_distribution_pvalue(ref, got)
    where = f"{label}, token" if label else "token"
    assert pvalue > 1e-3, f"{where} {position + 1}: chi-square p={pvalue:.2e}"


def drafts_by_prompt(run: EngineRun, workload: str) -> dict[tuple[int, int], list[int]]:
    """Level-1 draft tokens keyed by (prompt index, position of the token drafted after).

    Only rounds where all K drafts can be verified: near max_tokens a multi-level
    drafter stops computing drafts the target could never check (and pads),
    while vLLM's one-level loop computes them anyway.
    """
    index_of = {req_id: i for i, req_id in enumerate(run.request_ids[workload])}
    drafts = {}
    for entry in run.trace:
        # The engine suffixes the request id it shows its workers ("0" -> "0-93324fb7").
        prompt = index_of.get(entry["req"].split("-")[0])
        if prompt is None:
            continue
        last_full_round = run.prompt_lens[workload][prompt] + run.max_tokens[workload][prompt] - K - 2
        if entry["pos"] <= last_full_round:
            drafts[(prompt, entry["pos"])] = entry["drafts"]
    return drafts


def level_stats_delta(run: EngineRun, workloads: list[str]) -> LevelReport:
    """Per-level counters accumulated over the given (consecutive) workloads."""
    names = list(run.level_stats_after)
    first = names.index(workloads[0])
    assert names[first : first + len(workloads)] == workloads
    before = run.level_stats_after[names[first - 1]] if first else None
    return run.level_stats_after[workloads[-1]].minus(before)
