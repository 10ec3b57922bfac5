"""Per-level specqd metrics for Prometheus (`/metrics`) and offline callers.

Workers publish one JSON report per engine (see ``level_stats.py``); this
module turns them into Prometheus metrics in the API server process, next to
vLLM's own ``vllm:spec_decode_*`` level-1 metrics:

    specqd:level_forward_passes_total{engine, level}
    specqd:level_proposed_tokens_total{engine, level}
    specqd:level_accepted_tokens_total{engine, level}
    specqd:level_mean_accepted_length{engine, level}
    specqd:level_forward_passes_per_generated_token{engine, level}
    specqd:level_verify_windows_total{engine, level}
    specqd:level_weight_bytes{engine, level}
    specqd:level_kv_bytes_per_token{engine, level}
    specqd:generated_tokens_total{engine}
    specqd:rounds_total{engine}
    specqd:tracked_requests{engine}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from vllm_specqd.adapter.level_stats import STATS_DIR_ENV, stats_path

_collector_registered = False


def ensure_stats_dir() -> str:
    """Pick the directory workers write to; child processes inherit it."""
    if not os.environ.get(STATS_DIR_ENV):
        os.environ[STATS_DIR_ENV] = tempfile.mkdtemp(prefix="vllm-specqd-stats-")
    return os.environ[STATS_DIR_ENV]


def _reports() -> dict[str, dict]:
    directory = os.environ.get(STATS_DIR_ENV)
    if not directory or not Path(directory).is_dir():
        return {}
    reports = {}
    for path in Path(directory).glob("*.json"):
        try:
            reports[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a writer is mid-replace; the next scrape sees it
    return reports


def read_level_stats(llm) -> dict | None:
    """The per-level report of an offline `vllm.LLM` (None before its first drafting round)."""
    path = stats_path(llm.llm_engine.vllm_config.instance_id)
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text())


class LevelStatsCollector:
    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = {
            "forward_passes": CounterMetricFamily(
                "specqd:level_forward_passes", "Forward passes run by a specqd level", labels=["engine", "level"]
            ),
            "proposed_tokens": CounterMetricFamily(
                "specqd:level_proposed_tokens", "Tokens a level proposed to the level above", labels=["engine", "level"]
            ),
            "accepted_tokens": CounterMetricFamily(
                "specqd:level_accepted_tokens", "Proposed tokens the level above accepted", labels=["engine", "level"]
            ),
            "mean_accepted_length": GaugeMetricFamily(
                "specqd:level_mean_accepted_length",
                "Tokens the level above gained per verification window (bonus included)",
                labels=["engine", "level"],
            ),
            "forward_passes_per_generated_token": GaugeMetricFamily(
                "specqd:level_forward_passes_per_generated_token",
                "Forward passes of a level per token the target generated",
                labels=["engine", "level"],
            ),
            "verify_windows": CounterMetricFamily(
                "specqd:level_verify_windows",
                "Per-request windows the level above ran to check this level's proposals",
                labels=["engine", "level"],
            ),
            "weight_bytes": GaugeMetricFamily(
                "specqd:level_weight_bytes", "Weight bytes a level adds to the target's", labels=["engine", "level"]
            ),
            "kv_bytes_per_token": GaugeMetricFamily(
                "specqd:level_kv_bytes_per_token",
                "KV-cache bytes per token of a level's own KV layers",
                labels=["engine", "level"],
            ),
        }
        generated = CounterMetricFamily(
            "specqd:generated_tokens", "Tokens committed by the target while specqd drafted", labels=["engine"]
        )
        rounds = CounterMetricFamily("specqd:rounds", "(request, drafting round) pairs", labels=["engine"])
        tracked = GaugeMetricFamily(
            "specqd:tracked_requests",
            "Requests whose per-level state (KV bookkeeping, stats) the drafter still holds",
            labels=["engine"],
        )
        for engine, report in _reports().items():
            if "generated_tokens" in report:
                generated.add_metric([engine], report["generated_tokens"])
                rounds.add_metric([engine], report["rounds"])
            if "tracked_requests" in report:
                tracked.add_metric([engine], report["tracked_requests"])
            for level, entry in report.get("levels", {}).items():
                for key, family in families.items():
                    if key in entry:
                        family.add_metric([engine, level], entry[key])
        yield from families.values()
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
