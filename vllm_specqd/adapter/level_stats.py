"""Per-level counters of a specqd drafter, published as a :class:`~vllm_specqd.level_report.LevelReport`.

The proposer records what each level is and adds when it loads (:meth:`LevelStatsPublisher.set_level`)
and counts rounds while drafting; the speculative levels count their own windows
(:class:`vllm_specqd.multilevel.LevelStats`). :meth:`publish` writes the report on an interval, at once
when the batch starts or empties, and at exit; every 10 s it is also logged.
"""

from __future__ import annotations

import atexit
import time
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import replace

import torch.nn as nn
from vllm.logger import init_logger

from vllm_specqd.adapter import target_gemm
from vllm_specqd.adapter.pass_timer import PassTimer
from vllm_specqd.level_report import LevelEntry, LevelReport, ReportWriter, report_path

# Under "vllm." so vLLM's logging config (handlers, level, process prefix) applies.
logger = init_logger("vllm." + __name__)

LOG_INTERVAL_S = 10.0


class LevelStatsPublisher:
    def __init__(self, vllm_config):
        from vllm.distributed import get_tensor_model_parallel_rank

        path = report_path(vllm_config.instance_id)
        # Every TP rank drafts the same tokens; one of them reports.
        self.writer = ReportWriter(path if get_tensor_model_parallel_rank() == 0 else None)
        self.first_passes = 0  # level-1 passes outside the chain (one level's, or a separate-KV first pass)
        self.generated_tokens = 0
        self.rounds = 0
        self.levels: dict[int, LevelEntry] = {}  # what each level is and adds; counters come from snapshot()
        self.chain = None  # the SpeculativeLevel chain, once built
        self._last_len: dict[Hashable, int] = {}
        self._last_log = float("-inf")  # the first report is logged at once
        self.target_timer: PassTimer | None = None  # forward-pass timers (CPU engines), see time_passes()
        self.level_timers: dict[int, PassTimer] = {}
        self.head_timers: dict[int, HeadTimer] = {}  # level -> its lm_head's timer; 0: the target's
        self.adaptive = None  # the AdaptiveDrafter, when adaptive speculation is on
        atexit.register(_publish_at_exit, weakref.ref(self))

    def time_passes(self, target: nn.Module, levels: dict[int, nn.Module]) -> None:
        """Time the target's and each model level's forward passes and lm_heads (for c); CPU only."""
        if next(target.parameters()).device.type != "cpu":
            return
        self.target_timer = PassTimer(target)
        self.level_timers = {level: PassTimer(model) for level, model in levels.items()}
        self.head_timers = {0: HeadTimer(target), **{level: HeadTimer(model) for level, model in levels.items()}}

    def start_timing(self) -> None:
        """From the first drafting step on: warm-up and profiling passes are not counted."""
        for timer in [self.target_timer, *self.level_timers.values(), *self.head_timers.values()]:
            if timer is not None:
                timer.enabled = True

    def set_level(self, level: int, **facts) -> None:
        """Record what ``level`` is and adds (LevelEntry fields: proposer, weight_bytes, kv_cache, ...)."""
        entry = self.levels.get(level) or LevelEntry(level, facts.pop("proposer"))
        self.levels[level] = replace(entry, **facts)

    def count_round(self, req_id: Hashable, context_len: int, discarded: bool) -> None:
        if discarded:
            return
        self.rounds += 1
        previous = self._last_len.get(req_id)
        self.generated_tokens += context_len - previous if previous is not None else 1
        self._last_len[req_id] = context_len

    def forget_missing(self, req_ids: Sequence[Hashable]) -> None:
        live = set(req_ids)
        for req_id in [r for r in self._last_len if r not in live]:
            del self._last_len[req_id]
            self.chain.forget(req_id)

    def forget(self, req_id: Hashable, batch_empty: bool) -> None:
        """vLLM dropped a finished or aborted request: drop its state everywhere."""
        self._last_len.pop(req_id, None)
        if self.chain is not None:
            self.chain.forget(req_id)
        self.publish(busy=not batch_empty)

    def tracked_requests(self) -> int:
        held = set(self._last_len)
        for level in self.chain.chain() if self.chain is not None else []:
            held.update(level._kv_tokens)  # SpeculativeLevel's per-request KV bookkeeping
        return len(held)

    def snapshot(self) -> LevelReport:
        levels = {number: replace(entry) for number, entry in self.levels.items()}
        levels[1].forward_passes = self.first_passes
        for depth, level in enumerate(self.chain.chain() if self.chain is not None else [], start=1):
            # Inner models run no pass outside the chain: they catch up in their own first window.
            levels[depth].forward_passes = (self.first_passes if depth == 1 else 0) + level.stats.forward_passes
            levels[depth].windows = level.stats.windows
            if depth + 1 not in levels:  # the innermost level is a model: nobody proposes to it
                break
            s = level.stats
            levels[depth + 1] = replace(
                levels[depth + 1],
                proposed_tokens=s.proposed_tokens,
                accepted_tokens=s.accepted_tokens,
                verify_windows=s.windows,
                verify_windows_without_proposal=s.windows_without_proposal,
            )
        if self.adaptive is not None and self.chain is None and 2 in levels:
            # An n-gram level proposing straight to the target: the target verified its proposals.
            a = self.adaptive
            levels[2] = replace(
                levels[2],
                proposed_tokens=a.ngram_verified,
                accepted_tokens=a.ngram_accepted,
                verify_windows=a.ngram_rounds,
            )
        for number, timer in self.level_timers.items():
            levels[number].timed_passes, levels[number].pass_seconds = timer.passes, timer.seconds
            if number in self.head_timers:
                levels[number].head_seconds = self.head_timers[number].seconds
        report = LevelReport(
            levels=levels, tracked_requests=self.tracked_requests(), bf16_gemm_layers=target_gemm.installed_count()
        )
        if self.target_timer is not None:
            report.target_passes, report.target_pass_seconds = self.target_timer.passes, self.target_timer.seconds
            report.target_head_seconds = self.head_timers[0].seconds
        if self.chain is not None:
            report.generated_tokens, report.rounds = self.generated_tokens, self.rounds
        if self.adaptive is not None:
            report.adaptive = self.adaptive.report()
        return report

    def publish(self, busy: bool = True, force: bool = False) -> None:
        """Write the report if due (see ReportWriter); ``busy``: the runner still holds requests."""
        report = self.writer.write(self.snapshot, busy, force)
        now = time.monotonic()
        if report is not None and now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            logger.info("specqd levels: %s", report.summary())


class HeadTimer:
    """Wall time of a model's ``compute_logits`` (its lm_head) once :attr:`enabled`: part of a pass's
    cost that the forward hooks of :class:`PassTimer` do not see (vLLM calls it after ``forward``)."""

    def __init__(self, model: nn.Module):
        self.enabled = False
        self.seconds = 0.0
        compute_logits = model.compute_logits

        def timed(*args, **kwargs):
            if not self.enabled:
                return compute_logits(*args, **kwargs)
            start = time.perf_counter()
            try:
                return compute_logits(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        model.compute_logits = timed


def _publish_at_exit(ref: weakref.ref) -> None:
    publisher = ref()
    if publisher is None:
        return
    try:
        publisher.publish(busy=False, force=True)
    except OSError:  # the stats directory went away first
        pass
