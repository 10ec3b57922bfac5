"""Per-level speculation metrics: counted in the worker, shown in logs and /metrics.

vLLM's own spec-decode metrics (acceptance rate, mean acceptance length,
per-position acceptance) cover level 1 and work unchanged for specqd. The
levels below live only inside the drafter, in the worker process, so the
worker publishes their counters to a small JSON file per engine
(``$VLLM_SPECQD_STATS_DIR/<instance_id>.json``, replaced atomically). The API
server's Prometheus collector (``metrics.py``) and offline callers
(:func:`vllm_specqd.adapter.metrics.read_level_stats`) read it.

Report layout, for levels "1" (the MXFP4 draft), "2", ...:

    {"generated_tokens": int,   # tokens the target committed in drafted requests (multi-level only)
     "rounds": int,             # (request, drafting round) pairs (multi-level only)
     "tracked_requests": int,   # requests any per-request map here or in a level still holds
     "levels": {"1": {"forward_passes", "weight_bytes", "kv_bytes_per_token", ...},
                "2": {"proposed_tokens", "accepted_tokens", "acceptance_rate",
                      "mean_accepted_length", "verify_windows",
                      "verify_windows_without_proposal",
                      and for a model level: "forward_passes", "weight_bytes", ...}}}

Level L >= 2's proposal counters describe its proposals to level L-1 and the
windows level L-1 ran to check them; "forward_passes" of a model level counts
batched passes (one per first pass, one per window pass), whatever the batch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

from vllm.logger import init_logger

# Under "vllm." so vLLM's logging config (handlers, level, process prefix) applies.
logger = init_logger("vllm." + __name__)

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
        self.first_passes = 0  # level-1 passes outside the inner chain (vLLM's loop or our first pass)
        self.generated_tokens = 0
        self.rounds = 0
        self.level_info: dict[str, dict] = {}  # static per-level facts: weight / KV bytes
        self._last_len: dict[Hashable, int] = {}
        self._last_log = float("-inf")  # the first report is logged at once

    def count_round(self, req_id: Hashable, context_len: int, discarded: bool) -> None:
        if discarded:
            return
        self.rounds += 1
        previous = self._last_len.get(req_id)
        self.generated_tokens += context_len - previous if previous is not None else 1
        self._last_len[req_id] = context_len

    def forget_missing(self, req_ids: Sequence[Hashable], chain) -> None:
        live = set(req_ids)
        for req_id in [r for r in self._last_len if r not in live]:
            del self._last_len[req_id]
            chain.forget(req_id)

    def forget(self, req_id: Hashable, chain) -> None:
        """vLLM dropped a finished or aborted request: drop its state everywhere, report the count."""
        self._last_len.pop(req_id, None)
        if chain is not None:
            chain.forget(req_id)
        self.publish(chain)

    def tracked_requests(self, chain) -> int:
        held = set(self._last_len)
        for level in chain.chain() if chain is not None else []:
            held.update(level._kv_tokens)  # SpeculativeLevel's per-request KV bookkeeping
        return len(held)

    def snapshot(self, chain) -> dict:
        speculative_levels = chain.chain() if chain is not None else []
        levels: dict[str, dict] = {name: dict(info) for name, info in self.level_info.items()}
        levels.setdefault("1", {})["forward_passes"] = self.first_passes
        for depth, level in enumerate(speculative_levels, start=1):
            model_entry = levels.setdefault(str(depth), {})
            # Inner models run every first pass too (their KV must follow the target's).
            model_entry["forward_passes"] = self.first_passes + level.stats.forward_passes
            s = level.stats
            levels.setdefault(str(depth + 1), {}).update(
                proposed_tokens=s.proposed_tokens,
                accepted_tokens=s.accepted_tokens,
                acceptance_rate=s.acceptance_rate,
                mean_accepted_length=s.mean_accepted_length,
                verify_windows=s.windows,
                verify_windows_without_proposal=s.windows_without_proposal,
            )
        report = {"levels": levels, "tracked_requests": self.tracked_requests(chain)}
        if chain is not None:
            report.update(generated_tokens=self.generated_tokens, rounds=self.rounds)
            for entry in levels.values():
                if "forward_passes" in entry and self.generated_tokens:
                    entry["forward_passes_per_generated_token"] = entry["forward_passes"] / self.generated_tokens
        return report

    def publish(self, chain) -> None:
        if not self.enabled:
            return
        report = self.snapshot(chain)
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
        elif "forward_passes" in entry:
            bits.append(f"passes={entry['forward_passes']}")
        if "proposed_tokens" in entry:
            bits.append(
                f"proposed={entry['proposed_tokens']} accepted={entry['accepted_tokens']} "
                f"mean_accepted_len={entry['mean_accepted_length']:.2f}"
            )
        parts.append(f"level{level}[{', '.join(bits)}]")
    prefix = f"generated={report['generated_tokens']} " if "generated_tokens" in report else ""
    return prefix + " ".join(parts)
