"""Per-level speculation metrics: counted in the worker, shown in logs and /metrics.

vLLM's own spec-decode metrics (acceptance rate, mean acceptance length,
per-position acceptance) cover level 1 and work unchanged for specqd. The
levels below live only inside the drafter, in the worker process, so the
worker publishes their counters to a small JSON file per engine
(``$VLLM_SPECQD_STATS_DIR/<instance_id>.json``, replaced atomically). The API
server's Prometheus collector (``metrics.py``) and offline callers
(:func:`vllm_specqd.adapter.metrics.read_level_stats`) read it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

from vllm.logger import init_logger

logger = init_logger(__name__)

STATS_DIR_ENV = "VLLM_SPECQD_STATS_DIR"
LOG_INTERVAL_S = 10.0


def stats_path(instance_id: str, stats_dir: str | None = None) -> Path | None:
    directory = stats_dir or os.environ.get(STATS_DIR_ENV)
    return Path(directory) / f"{instance_id}.json" if directory else None


class LevelStatsPublisher:
    def __init__(self, vllm_config):
        from vllm.distributed import get_tensor_model_parallel_rank

        self.path = stats_path(vllm_config.instance_id)
        # Every TP rank drafts the same tokens; one of them reports.
        self.enabled = get_tensor_model_parallel_rank() == 0 and self.path is not None
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.level1_passes = 0  # MXFP4 forward passes vLLM's loop or our first pass ran
        self.generated_tokens = 0  # tokens the target committed for drafted requests
        self._last_len: dict[Hashable, int] = {}
        self._last_log = float("-inf")  # the first report is logged at once

    def count_generated(self, req_id: Hashable, context_len: int, discarded: bool) -> None:
        if discarded:
            return
        previous = self._last_len.get(req_id)
        self.generated_tokens += context_len - previous if previous is not None else 1
        self._last_len[req_id] = context_len

    def forget_missing(self, req_ids: Sequence[Hashable], chain) -> None:
        live = set(req_ids)
        for req_id in [r for r in self._last_len if r not in live]:
            del self._last_len[req_id]
            chain.forget(req_id)

    def snapshot(self, chain, inner_window_models) -> dict:
        levels = chain.chain() if chain is not None else []
        report = {
            "generated_tokens": self.generated_tokens,
            "levels": {
                "1": {
                    "forward_passes": self.level1_passes + (levels[0].stats.forward_passes if levels else 0),
                }
            },
        }
        # Level L (>= 2) is the proposer of the SpeculativeLevel at depth L-1.
        model_passes = {wm.name: None for wm in inner_window_models}
        for depth, level in enumerate(levels, start=2):
            s = level.stats
            entry = {
                "proposed_tokens": s.proposed_tokens,
                "accepted_tokens": s.accepted_tokens,
                "acceptance_rate": s.acceptance_rate,
                "mean_accepted_length": s.mean_accepted_length,
                "verify_windows": s.windows,
                "verify_windows_without_proposal": s.windows_without_proposal,
            }
            inner_name = f"level{depth}"
            if inner_name in model_passes and depth - 1 < len(levels):
                # First passes (one per round) + the inner level's own window passes.
                entry["forward_passes"] = self.level1_passes + levels[depth - 1].stats.forward_passes
            report["levels"][str(depth)] = entry
        for entry in report["levels"].values():
            if "forward_passes" in entry and self.generated_tokens:
                entry["forward_passes_per_generated_token"] = entry["forward_passes"] / self.generated_tokens
        return report

    def publish(self, chain, inner_window_models) -> None:
        if not self.enabled:
            return
        report = self.snapshot(chain, inner_window_models)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, self.path)
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            logger.info("specqd levels: %s", format_report(report))


def format_report(report: dict) -> str:
    parts = []
    for level, entry in sorted(report["levels"].items()):
        bits = []
        if "forward_passes_per_generated_token" in entry:
            bits.append(f"passes/token={entry['forward_passes_per_generated_token']:.2f}")
        if "proposed_tokens" in entry:
            bits.append(
                f"proposed={entry['proposed_tokens']} accepted={entry['accepted_tokens']} "
                f"mean_accepted_len={entry['mean_accepted_length']:.2f}"
            )
        parts.append(f"level{level}[{', '.join(bits)}]")
    return f"generated={report['generated_tokens']} " + " ".join(parts)
