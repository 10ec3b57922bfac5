"""Per-level specqd metrics for Prometheus (``/metrics``) and offline callers.

Workers publish one :class:`~vllm_specqd.level_report.LevelReport` per engine; this module turns
them into Prometheus metrics in the API server process, next to vLLM's own ``vllm:spec_decode_*``
level-1 metrics (labels: engine, level)::

    specqd:level_forward_passes_total             specqd:level_weight_bytes
    specqd:level_proposed_tokens_total            specqd:level_kv_bytes_per_token
    specqd:level_accepted_tokens_total            specqd:level_kv_cache_info{kv_cache=shared|separate|none}
    specqd:level_verify_windows_total             specqd:generated_tokens_total{engine}
    specqd:level_mean_accepted_length             specqd:rounds_total{engine}
    specqd:level_forward_passes_per_generated_token   specqd:tracked_requests{engine}

With ``adaptive`` on, for level 1 (labels: engine, level)::

    specqd:adaptive_chosen_k_total{k}        (request, round) pairs by the number of drafts chosen
    specqd:adaptive_steps_total              specqd:adaptive_steps_off_total (no request drafted)
    specqd:adaptive_requests_total           specqd:adaptive_requests_off_total (k = 0)
    specqd:adaptive_speculation_off_share{of=steps|requests}
    specqd:adaptive_probes_total             specqd:adaptive_decision_share (decision time / step time)
    specqd:adaptive_ngram_requests_total     (request, round) pairs that sent an n-gram proposal to the target
    specqd:adaptive_estimate{name}           the cost model's numbers: target_step_s, target_per_token_s,
                                             draft_pass_s, draft_per_row_s, expected/plain_tokens_per_s, ...
"""

from __future__ import annotations

import os
import tempfile

from vllm_specqd.level_report import (
    STATS_DIR_ENV,
    LevelReport,
    read_reports,
    read_settled_report,
    report_path,
    stats_dir,
)

_collector_registered = False


def ensure_stats_dir() -> str:
    """Pick the directory workers write to; child processes inherit it."""
    if not os.environ.get(STATS_DIR_ENV):
        os.environ[STATS_DIR_ENV] = tempfile.mkdtemp(prefix="vllm-specqd-stats-")
    return os.environ[STATS_DIR_ENV]


def read_level_stats(llm) -> LevelReport | None:
    """The level report of an offline ``vllm.LLM``, once its worker has written its last counts
    (None for an engine without specqd)."""
    path = report_path(llm.llm_engine.vllm_config.instance_id)
    return read_settled_report(path) if path is not None else None


def _families():
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["engine", "level"]
    return {
        "forward_passes": CounterMetricFamily(
            "specqd:level_forward_passes", "Forward passes run by a specqd level", labels=labels
        ),
        "proposed_tokens": CounterMetricFamily(
            "specqd:level_proposed_tokens", "Tokens a level proposed to the level above", labels=labels
        ),
        "accepted_tokens": CounterMetricFamily(
            "specqd:level_accepted_tokens", "Proposed tokens the level above accepted", labels=labels
        ),
        "mean_accepted_length": GaugeMetricFamily(
            "specqd:level_mean_accepted_length",
            "Tokens the level above gained per verification window (bonus included)",
            labels=labels,
        ),
        "forward_passes_per_generated_token": GaugeMetricFamily(
            "specqd:level_forward_passes_per_generated_token",
            "Forward passes of a level per token the target generated",
            labels=labels,
        ),
        "verify_windows": CounterMetricFamily(
            "specqd:level_verify_windows",
            "Per-request windows the level above ran to check this level's proposals",
            labels=labels,
        ),
        "weight_bytes": GaugeMetricFamily(
            "specqd:level_weight_bytes", "Weight bytes a level adds to the target's", labels=labels
        ),
        "kv_bytes_per_token": GaugeMetricFamily(
            "specqd:level_kv_bytes_per_token",
            "KV-cache bytes per token a level adds (0 when it shares the target's KV)",
            labels=labels,
        ),
        "kv_cache": GaugeMetricFamily(
            "specqd:level_kv_cache_info",
            "A level's KV cache: shared (the target's), separate (its own layers) or none (n-gram)",
            labels=[*labels, "kv_cache"],
        ),
    }


def _adaptive_families(engine_reports: dict[str, LevelReport]):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["engine", "level"]
    chosen = CounterMetricFamily(
        "specqd:adaptive_chosen_k", "(request, round) pairs by level-1 drafts chosen", labels=[*labels, "k"]
    )
    counters = {
        name: CounterMetricFamily(f"specqd:adaptive_{name}", help_text, labels=labels)
        for name, help_text in (
            ("steps", "Drafting rounds the adaptive policy decided"),
            ("steps_off", "Rounds in which no request drafted"),
            ("requests", "(request, round) pairs that could draft"),
            ("requests_off", "(request, round) pairs that drafted nothing"),
            ("probes", "One-token drafts that re-measure a request's acceptance"),
            ("ngram_requests", "(request, round) pairs that sent their n-gram proposal to the target"),
        )
    }
    off_share = GaugeMetricFamily(
        "specqd:adaptive_speculation_off_share",
        "Share of rounds / requests with speculation off",
        labels=[*labels, "of"],
    )
    decision = GaugeMetricFamily(
        "specqd:adaptive_decision_share", "Time spent deciding over measured step time", labels=labels
    )
    estimate = GaugeMetricFamily(
        "specqd:adaptive_estimate",
        "The adaptive cost model's latest estimates (seconds, tokens/s)",
        labels=[*labels, "name"],
    )
    for engine, report in engine_reports.items():
        a = report.adaptive
        if a is None:
            continue
        row = [engine, "1"]
        for k, n in enumerate(a.k_histogram):
            chosen.add_metric([*row, str(k)], n)
        for name, family in counters.items():
            family.add_metric(row, getattr(a, name))
        for of, share in (("steps", a.steps_off_share), ("requests", a.requests_off_share)):
            if share is not None:
                off_share.add_metric([*row, of], share)
        if a.decision_share is not None:
            decision.add_metric(row, a.decision_share)
        for name, value in sorted(a.estimates.items()):
            estimate.add_metric([*row, name], value)
    return [chosen, *counters.values(), off_share, decision, estimate]


class LevelStatsCollector:
    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = _families()
        generated = CounterMetricFamily(
            "specqd:generated_tokens", "Tokens committed by the target while specqd drafted", labels=["engine"]
        )
        rounds = CounterMetricFamily("specqd:rounds", "(request, drafting round) pairs", labels=["engine"])
        tracked = GaugeMetricFamily(
            "specqd:tracked_requests",
            "Requests whose per-level state (KV bookkeeping, stats) the drafter still holds",
            labels=["engine"],
        )
        directory = stats_dir()
        reports = read_reports(directory) if directory is not None and directory.is_dir() else {}
        for engine, report in reports.items():
            if report.generated_tokens is not None:
                generated.add_metric([engine], report.generated_tokens)
                rounds.add_metric([engine], report.rounds)
            tracked.add_metric([engine], report.tracked_requests)
            for number, entry in sorted(report.levels.items()):
                labels = [engine, str(number)]
                values = {
                    "forward_passes": entry.forward_passes,
                    "proposed_tokens": entry.proposed_tokens,
                    "accepted_tokens": entry.accepted_tokens,
                    "mean_accepted_length": entry.mean_accepted_length,
                    "forward_passes_per_generated_token": report.passes_per_generated_token(number),
                    "verify_windows": entry.verify_windows,
                    "weight_bytes": entry.weight_bytes,
                    "kv_bytes_per_token": entry.kv_bytes_per_token,
                }
                for key, value in values.items():
                    if value is not None:
                        families[key].add_metric(labels, value)
                families["kv_cache"].add_metric([*labels, entry.kv_cache], 1)
        yield from families.values()
        yield from _adaptive_families(reports)
        yield generated
        yield rounds
        yield tracked


def register_collector() -> None:
    global _collector_registered
    if _collector_registered:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    REGISTRY.register(LevelStatsCollector())
    _collector_registered = True
