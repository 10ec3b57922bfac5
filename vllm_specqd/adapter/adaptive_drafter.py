"""The vLLM side of adaptive speculation: measurements in, per-request draft lengths out.

Per drafting round (``SpecQDProposer.propose``): :meth:`AdaptiveDrafter.decide` reads what the
target did with last round's drafts and how long its step took, and asks the policy
(vllm_specqd/adaptive.py) for each row's k; the proposer runs ``passes`` level-1 passes (over the
rows still drafting with a shared KV and one level, else over the batch), and
:meth:`AdaptiveDrafter.finish` cuts each row to its k and times the drafting.

vLLM takes variable-length drafts as a ``list[list[int]]`` (what its n-gram drafter returns):
the runner hands them to the scheduler unchanged (GPUModelRunner._get_draft_token_ids_cpu,
v1/worker/gpu_model_runner.py:4670-4672), which schedules each request's list, empty included
(Scheduler.update_draft_token_ids, v1/core/sched/scheduler.py:2550; schedule, :861-876); the
rejection sampler takes per-request counts, and the draft probabilities of a probabilistic draft
are cut to each request's count (_get_spec_decode_draft_probs, gpu_model_runner.py:4719-4742).
Needs synchronous scheduling: async scheduling schedules K placeholder drafts per request
(engine_config.py refuses it).

With ``VLLM_SPECQD_TRACE_POLICY=path`` every round appends one JSON line to ``path``
(vllm_specqd/adaptive.py, :class:`PolicyTrace`): what the policy saw, what it chose and what it cost. ``benchmarks/bench_policy_replay.py``
replays such traces offline (vllm_specqd/bench/policy_replay.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable

import torch
from vllm.logger import init_logger

from vllm_specqd.adapter import vllm_internals as internals
from vllm_specqd.adapter.pass_timer import PassTimer
from vllm_specqd.adapter.target_step import request_draft_cap
from vllm_specqd.adaptive import AdaptivePolicy, AdaptiveSettings, Decision, Outcome, PolicyTrace, RequestSlot
from vllm_specqd.config import AdaptiveSpec
from vllm_specqd.level_report import AdaptiveReport

logger = init_logger("vllm." + __name__)

# A gap between two rounds longer than this many expected steps (+ slack) is idle time, not a step.
IDLE_GAP_FACTOR, IDLE_GAP_SLACK_S = 4.0, 0.02
CALIBRATION_ROWS = 16  # the draft's per-row cost is measured between 1 row and this many
TRACE_POLICY_ENV = "VLLM_SPECQD_TRACE_POLICY"


def time_linears(layers: list[torch.nn.Module], rows: int, reps: int = 2) -> float:
    """Seconds of one pass over ``layers`` (each an MXFP4 linear or head) with ``rows`` random rows."""
    inputs = [torch.randn(rows, layer.specqd_in_features, dtype=layer.params_dtype) for layer in layers]
    device = next((p.device for layer in layers for p in layer.parameters()), torch.device("cpu"))
    inputs = [x.to(device) for x in inputs]

    def one_pass():
        for layer, x in zip(layers, inputs):
            layer.quant_method.apply(layer, x, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    one_pass()  # warm-up: kernel builds, caches
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - started)
    return best


class AdaptiveDrafter:
    def __init__(
        self,
        spec: AdaptiveSpec,
        max_k: int,
        min_passes: int,
        max_model_len: int,
        passes_run_drafting_rows_only: bool = False,
    ):
        self.spec = spec
        self.max_model_len = max_model_len
        self.policy = AdaptivePolicy(
            AdaptiveSettings(
                max_k=max_k,
                min_gain=spec.min_gain,
                policy=spec.policy,
                seed=spec.seed,
                min_passes=min_passes,
                passes_run_drafting_rows_only=passes_run_drafting_rows_only,
                reprobe_after=spec.reprobe_after,
            )
        )
        self.target_timer: PassTimer | None = None  # the target's forward passes (CPU engines)
        self._proposed: dict[Hashable, int] = {}  # drafts each request got last round
        self._sent_ngram: dict[Hashable, bool] = {}  # whether they were its n-gram proposal
        # N-gram proposals the target verified: (request, round) pairs, tokens verified, accepted.
        self.ngram_rounds = self.ngram_verified = self.ngram_accepted = 0
        self._last_end: float | None = None
        self._draft_started = 0.0
        path = os.environ.get(TRACE_POLICY_ENV)
        self.trace: PolicyTrace | None = PolicyTrace(path, self.policy) if path else None
        self._pending: dict | None = None  # this round's trace entry until its drafting is timed

    def calibrate(self, layers: list[torch.nn.Module]) -> None:
        """Measure what one more row costs the draft's linears and give it to the policy."""
        if not layers:
            return
        with torch.inference_mode():
            one, many = time_linears(layers, 1), time_linears(layers, CALIBRATION_ROWS)
        per_row = max(0.0, (many - one) / (CALIBRATION_ROWS - 1))
        self.policy.cost.set_draft_row_cost(per_row)
        logger.info(
            "specqd: adaptive: the draft's %d MXFP4 linears take %.1f ms at 1 row and %.1f ms at %d rows "
            "(%.2f ms per row, the cost model's prior)",
            len(layers),
            1e3 * one,
            1e3 * many,
            CALIBRATION_ROWS,
            1e3 * per_row,
        )

    def forget(self, req_id: Hashable) -> None:
        self._proposed.pop(req_id, None)
        self._sent_ngram.pop(req_id, None)
        self.policy.forget(req_id)

    def decide(
        self,
        runner,
        sampled_positions: torch.Tensor,  # [batch] position of the token the target just sampled
        cad,
        num_rejected_tokens_gpu: torch.Tensor | None,  # [batch]
        ngram_proposals: list[list[int]] | None = None,  # [batch] n-gram proposals the target could verify
    ) -> Decision:
        started = time.perf_counter()
        qsl = cad.query_start_loc_cpu.tolist()
        rows = len(qsl) - 1
        query_lens = [qsl[i + 1] - qsl[i] for i in range(rows)]
        # The line prices verification steps: one with a prefill chunk (a longer query) is not one.
        verification = bool(query_lens) and max(query_lens) <= self.policy.settings.max_k + 1
        step = self._observe_step(started, qsl[-1]) if verification else None
        req_ids = internals.batch_req_ids(runner, rows)
        discarded = internals.discarded_rows(runner, rows).tolist()
        rejected = num_rejected_tokens_gpu.tolist() if num_rejected_tokens_gpu is not None else [0] * rows
        outcomes = []
        for i, req_id in enumerate(req_ids):
            proposed = self._proposed.get(req_id, 0)
            verified = query_lens[i] - 1  # a decode row feeds the sampled token + its drafts
            if proposed and not discarded[i] and 0 < verified <= proposed:
                outcome = Outcome(req_id, verified, verified - rejected[i], self._sent_ngram.get(req_id, False))
                outcomes.append(outcome)
                if outcome.ngram:
                    self.ngram_rounds += 1
                    self.ngram_verified += outcome.verified
                    self.ngram_accepted += outcome.accepted
        self.policy.observe(outcomes)
        positions = sampled_positions.tolist()
        ngram = [len(p) for p in ngram_proposals] if ngram_proposals is not None else [0] * rows
        slots = [
            RequestSlot(req_id, 0 if discarded[i] else self._draft_cap(runner, req_id, positions[i] + 1), ngram[i])
            for i, req_id in enumerate(req_ids)
        ]
        decision = self.policy.decide(slots)
        self._proposed = {req_id: k for req_id, k in zip(req_ids, decision.k)}
        self._sent_ngram = {req_id: sent for req_id, sent in zip(req_ids, decision.ngram)}
        if self.trace is not None:
            gap = None if self._last_end is None else (qsl[-1], started - self._last_end, bool(step))
            self._pending = self.trace.entry(slots, positions, outcomes, decision, gap)
            if self.target_timer is not None and self.target_timer.last_seconds is not None:
                self._pending["target_forward_s"] = self.target_timer.last_seconds
        self._draft_started = time.perf_counter()
        return decision

    def _draft_cap(self, runner, req_id: Hashable, context_len: int) -> int:
        return request_draft_cap(runner, req_id, self.policy.settings.max_k, context_len, self.max_model_len)

    def _observe_step(self, now: float, tokens: int) -> bool:
        """The time since the last round ended: one target step over ``tokens`` scheduled tokens.
        Returns whether it was fitted."""
        if self._last_end is None:
            return False
        gap = now - self._last_end
        # What a step over this many tokens should take: the fitted line once it has data (it
        # includes the per-step overhead), before that the target's forward pass (CPU timers).
        reference = None
        if self.policy.cost.target.ready:
            reference = float(self.policy.cost.target.predict(tokens))
        elif self.target_timer is not None and self.target_timer.last_seconds is not None:
            reference = self.target_timer.last_seconds
        if reference is not None and gap > IDLE_GAP_FACTOR * reference + IDLE_GAP_SLACK_S:
            return False  # the engine idled (no requests) between the two rounds
        self.policy.observe_target(tokens, gap)
        return True

    def finish(
        self,
        drafts: torch.Tensor | list[list[int]],  # [batch, passes], or per-row lists
        decision: Decision,
        ngram_proposals: list[list[int]] | None = None,  # [batch]
    ) -> list[list[int]]:
        """Each row's first k drafts, its n-gram proposal's where the decision says so; times the round."""
        rows = drafts.tolist() if isinstance(drafts, torch.Tensor) else drafts
        if ngram_proposals is not None:
            rows = [ngram_proposals[i] if sent else row for i, (row, sent) in enumerate(zip(rows, decision.ngram))]
        cut = [row[:k] for row, k in zip(rows, decision.k)]
        self._last_end = time.perf_counter()
        self.policy.observe_draft(decision, self._last_end - self._draft_started)
        if self._pending is not None:
            self._pending["draft_s"] = self._last_end - self._draft_started
            self.trace.write(self._pending)
            self._pending = None
        return cut

    def report(self) -> AdaptiveReport:
        s = self.policy.stats
        return AdaptiveReport(
            policy=self.spec.policy,
            min_gain=self.spec.min_gain,
            steps=s.steps,
            steps_off=s.steps_off,
            requests=s.requests,
            requests_off=s.requests_off,
            probes=s.probes,
            ngram_requests=s.ngram_requests,
            k_histogram=list(s.k_histogram),
            decision_seconds=s.decision_seconds,
            step_seconds=s.step_seconds,
            estimates=self.policy.estimates(),
        )
