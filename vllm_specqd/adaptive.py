"""Adaptive speculation: how many level-1 draft tokens each request gets, decided per step.

Engine-free: ``adapter/adaptive_drafter.py`` feeds measurements in and applies the :class:`Decision`
it gets back. The cost model, the acceptance estimates, the decision rule, exploration, n-gram
proposals sent straight to the target and re-probing are explained in docs/design.md, "Adaptive
speculation".
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

PROBE_BATCH_SHARE = 0.25  # share of the batch that must be due before a round runs a pass for probes alone
# A request re-probes only if its own first-draft acceptance is this far below the batch-wide one (or
# the prior, if the whole batch collapsed): then its acceptance is what keeps it off. Off for cost alone
# (a busy batch), a probe measures nothing new.
PROBE_ACCEPTANCE_GAP = 0.1
# "random": adversarial test policy, k uniform in 0..cap per request and step. "off": k = 0 always (a
# speculative engine that never drafts: what it costs to have speculation on and idle).
POLICIES = ("cost", "random", "off")


@dataclass(frozen=True)
class AdaptiveSettings:
    max_k: int  # num_speculative_tokens: the most level-1 tokens any request drafts
    min_gain: float = 0.0  # draft only if expected tokens/s beat plain decoding by this fraction
    policy: str = "cost"
    seed: int = 0  # the random policy's
    # Draft passes every round runs anyway (1 when the draft's own KV or inner models must catch up).
    min_passes: int = 0
    # A pass runs only the rows still drafting (k_i > j), not the whole batch.
    passes_run_drafting_rows_only: bool = False
    cost_decay: float = 0.02  # weight of the newest timing in the line fits
    acceptance_decay: float = 0.2  # per request
    global_acceptance_decay: float = 0.02  # batch-wide prior of new requests
    prior_acceptance: float = 0.6
    reprobe_after: int = 8
    max_reprobe_after: int = 256
    warmup_steps: int = 4  # rounds drafting max_k for everyone before the cost model decides
    explore_every: int = 8  # every this many rounds, drafting requests draft one token more (0: never)
    # An n-gram proposal is sent only if its expected tokens pay (1 + this) times for its verification at
    # the plain rate: the target's per-token cost is fitted over few token counts and runs low under load.
    ngram_margin: float = 0.5


@dataclass(frozen=True)
class RequestSlot:
    """One row of the batch this step."""

    req_id: Hashable
    cap: int  # the most drafts the next step can use (0: prefill chunk, or at max_tokens/max_model_len)
    ngram: int = 0  # tokens of an n-gram proposal the target could verify instead (<= cap)


@dataclass(frozen=True)
class Outcome:
    """What the target did with a request's drafts of the previous round."""

    req_id: Hashable
    verified: int  # drafts the step verified (scheduled)
    accepted: int  # of which the target kept, a prefix
    ngram: bool = False  # the drafts were an n-gram proposal, not the MXFP4 draft's


@dataclass(frozen=True)
class Decision:
    k: list[int]  # per request, in the order of the slots: drafts it sends to the target
    passes: int  # level-1 draft passes the round runs: max(k) over MXFP4 rows, at least min_passes
    probes: int  # requests drafting only to re-measure their acceptance
    expected_tokens: float  # committed next step under the cost model
    expected_seconds: float
    plain_seconds: float  # with k = 0 for everyone
    decision_seconds: float
    ngram: list[bool] = field(default_factory=list)  # per request: its k drafts are its n-gram proposal


@dataclass
class LineFit:
    """Exponentially weighted least squares of ``y = a + b * x``."""

    decay: float
    prior_slope_fraction: float = 0.5  # prior b = this * mean(y) / mean(x)
    prior_slope: float | None = None  # a measured prior b, used instead of the fraction
    ridge: float = 0.01  # prior weight, in units of mean(x)^2 of x variance
    weight: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    observations: int = 0

    def observe(self, x: float, y: float) -> None:
        keep = 1.0 - self.decay
        self.weight = keep * self.weight + 1.0
        self.sx = keep * self.sx + x
        self.sy = keep * self.sy + y
        self.sxx = keep * self.sxx + x * x
        self.sxy = keep * self.sxy + x * y
        self.observations += 1

    @property
    def ready(self) -> bool:
        return self.observations > 0

    def coefficients(self) -> tuple[float, float]:
        """(a, b); b >= 0: more tokens never cost less."""
        if not self.ready:
            return 0.0, 0.0
        mean_x, mean_y = self.sx / self.weight, self.sy / self.weight
        var_x = max(0.0, self.sxx / self.weight - mean_x * mean_x)
        cov = self.sxy / self.weight - mean_x * mean_y
        if self.prior_slope is not None:
            prior_b = self.prior_slope
        else:
            prior_b = self.prior_slope_fraction * mean_y / mean_x if mean_x > 0 else 0.0
        lam = self.ridge * mean_x * mean_x
        b = (cov + lam * prior_b) / (var_x + lam) if var_x + lam > 0 else prior_b
        b = max(0.0, b)
        return mean_y - b * mean_x, b

    def predict(self, x):  # x: a number or an array of them
        a, b = self.coefficients()
        return np.maximum(a + b * np.asarray(x, dtype=np.float64), 1e-9)


class AcceptanceModel:
    """Per request and draft position: P(accepted | the positions before it were).

    The batch-wide estimate is a running mean (the prior counting as one observation) until the EMA's
    weight is larger: a position seen a few times in the warm-up rounds is trusted at once instead
    of staying near the prior for 1 / decay observations (and so out of the drafts for good). A
    request's own estimates start from the batch-wide ones, an informed prior, and move by the EMA."""

    def __init__(self, max_k: int, prior: float, decay: float, global_decay: float):
        self.decay, self.global_decay = decay, global_decay
        self.batch_wide = np.full(max_k, prior)  # [K] the prior of a new request
        self.batch_wide_seen = np.zeros(max_k)  # [K] observations of each position
        self.per_request: dict[Hashable, np.ndarray] = {}

    def of(self, req_id: Hashable) -> np.ndarray:  # [K]
        rates = self.per_request.get(req_id)
        if rates is None:
            rates = self.per_request[req_id] = self.batch_wide.copy()
        return rates

    def observe(self, outcome: Outcome) -> None:
        """Positions 1..accepted were accepted; position accepted + 1 (if verified) was not."""
        if outcome.verified <= 0:
            return
        rates = self.of(outcome.req_id)
        seen = min(outcome.verified, outcome.accepted + 1, len(rates))
        hits = (np.arange(seen) < outcome.accepted).astype(np.float64)
        rates[:seen] += self.decay * (hits - rates[:seen])
        self.batch_wide_seen[:seen] += 1
        weight = np.maximum(self.global_decay, 1.0 / (self.batch_wide_seen[:seen] + 1))
        self.batch_wide[:seen] += weight * (hits - self.batch_wide[:seen])

    def forget(self, req_id: Hashable) -> None:
        self.per_request.pop(req_id, None)


@dataclass
class AdaptiveStats:
    """Counters since start, for the level report."""

    steps: int = 0
    steps_off: int = 0  # no request drafted
    requests: int = 0  # (request, step) pairs that could draft (cap > 0)
    requests_off: int = 0  # of which got k = 0
    probes: int = 0
    explorations: int = 0  # (request, round) pairs that drafted one more token to measure it
    ngram_requests: int = 0  # (request, round) pairs that sent their n-gram proposal to the target
    k_histogram: list[int] = field(default_factory=list)  # [K + 1] (request, step) pairs by chosen k
    decision_seconds: float = 0.0
    step_seconds: float = 0.0  # measured target steps + drafting, for the decision's share


class AdaptivePolicy:
    def __init__(self, settings: AdaptiveSettings):
        if settings.policy not in POLICIES:
            raise ValueError(f"unknown adaptive policy {settings.policy!r}; one of {POLICIES}")
        if settings.passes_run_drafting_rows_only and settings.min_passes:
            raise ValueError("a pass that must run anyway (min_passes) covers the whole batch")
        self.settings = settings
        self.target = LineFit(settings.cost_decay)  # seconds per step vs scheduled tokens
        self.draft = LineFit(settings.cost_decay)  # seconds per draft position vs batch rows
        self.acceptance = AcceptanceModel(
            settings.max_k, settings.prior_acceptance, settings.acceptance_decay, settings.global_acceptance_decay
        )
        self.ngram_acceptance = AcceptanceModel(
            settings.max_k, settings.prior_acceptance, settings.acceptance_decay, settings.global_acceptance_decay
        )
        self.stats = AdaptiveStats(k_histogram=[0] * (settings.max_k + 1))
        self.last: Decision | None = None
        self._off_steps: dict[Hashable, int] = {}  # consecutive k = 0 steps
        self._probe_wait: dict[Hashable, int] = {}
        self._rng = np.random.default_rng(settings.seed)

    # ------------------------------------------------------------------ measurements

    def set_draft_row_cost(self, seconds_per_row: float) -> None:
        """A measured cost of one more row in a draft pass: the slope's prior until rows vary."""
        self.draft.prior_slope = max(0.0, seconds_per_row)

    def observe_target(self, tokens: int, seconds: float) -> None:
        self.target.observe(tokens, seconds)
        self.stats.step_seconds += seconds

    def observe_draft(self, decision: Decision, seconds: float) -> None:
        """The round that ran ``decision`` drafted for ``seconds``."""
        rows = len(decision.k)
        if decision.passes > 0 and rows > 0:
            if self.settings.passes_run_drafting_rows_only:  # mean rows per pass; n-gram rows run none
                drafted = sum(k for k, ngram in zip(decision.k, decision.ngram or [False] * rows) if not ngram)
                rows = drafted / decision.passes
            self.draft.observe(rows, seconds / decision.passes)
        self.stats.step_seconds += seconds

    def observe(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            (self.ngram_acceptance if outcome.ngram else self.acceptance).observe(outcome)

    def forget(self, req_id: Hashable) -> None:
        self.acceptance.forget(req_id)
        self.ngram_acceptance.forget(req_id)
        self._off_steps.pop(req_id, None)
        self._probe_wait.pop(req_id, None)

    # ------------------------------------------------------------------ the decision

    def decide(self, slots: Sequence[RequestSlot]) -> Decision:
        started = time.perf_counter()
        caps = np.fromiter((min(max(s.cap, 0), self.settings.max_k) for s in slots), dtype=np.int64, count=len(slots))
        rows = len(slots)
        ngram_len = np.fromiter((min(s.ngram, c) for s, c in zip(slots, caps.tolist())), dtype=np.int64, count=rows)
        use_ngram = np.zeros(rows, dtype=bool)
        explore = self.settings.explore_every > 0 and (self.stats.steps + 1) % self.settings.explore_every == 0
        if self.settings.policy == "off":
            k, expected = np.zeros(rows, dtype=np.int64), (rows + 0.0, 0.0)
        elif self.settings.policy == "random":
            k = self._rng.integers(0, caps + 1) if rows else caps
            use_ngram = (ngram_len > 0) & (self._rng.random(rows) < 0.5)
            expected = (rows + 0.0, 0.0)
        elif self.stats.steps < self.settings.warmup_steps or not (self.target.ready and self.draft.ready):
            k, expected = caps.copy(), (rows + 0.0, 0.0)  # measure drafting before judging it
            use_ngram = (ngram_len > 0) & bool(self.stats.steps % 2)  # and the n-gram proposals
        else:
            k, expected = self._best_k(slots, caps)
            if ngram_len.any():
                use_ngram, k, expected = self._with_ngram(slots, caps, k, expected, ngram_len)
                if explore and not use_ngram.any():  # keep the n-gram estimates measured
                    use_ngram = (ngram_len > 0) & (k == 0)
            k = self._explore(caps * ~use_ngram, k, explore)
        k = np.where(use_ngram, ngram_len, k)
        probes_may_pay = self.settings.policy != "off" and (
            self.settings.policy == "random" or not self.target.ready or self._drafting_could_pay(rows, caps)
        )
        k, probes = self._reprobe(slots, caps, k, probes_may_pay)
        draft_k = np.where(use_ngram, 0, k)
        passes = max(int(draft_k.max()), self.settings.min_passes) if rows and self.settings.policy != "off" else 0
        decision = Decision(
            k=k.tolist(),
            ngram=use_ngram.tolist(),
            passes=passes,
            probes=probes,
            expected_tokens=expected[0],
            expected_seconds=expected[1],
            plain_seconds=float(self._seconds(rows, 0, self.settings.min_passes)) if self.target.ready else 0.0,
            decision_seconds=time.perf_counter() - started,
        )
        self._count(decision, caps)
        self.last = decision
        return decision

    def _seconds(self, rows: int, drafts: float | np.ndarray, passes: int | np.ndarray, verified_anyway: int = 0):
        """A round of ``passes`` draft passes drafting ``drafts`` tokens in all, then its target step
        (which also verifies ``verified_anyway`` n-gram tokens)."""
        return self.target.predict(rows + verified_anyway + drafts) + self._draft_seconds(rows, drafts, passes)

    def _draft_seconds(self, rows: int, drafts, passes):
        if not self.draft.ready:
            return 0.0 * np.asarray(passes)
        c, d = self.draft.coefficients()
        if self.settings.passes_run_drafting_rows_only:
            return np.maximum(c * np.asarray(passes) + d * np.asarray(drafts), 0.0)
        return np.maximum(passes, self.settings.min_passes) * max(c + d * rows, 1e-9)

    def _best_k(
        self, slots: Sequence[RequestSlot], caps: np.ndarray, ngram: tuple[int, float] = (0, 0.0)
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """Per request k maximising expected committed tokens per second (docs/design.md, "Adaptive speculation").

        ``ngram``: (tokens, expected gain) of the n-gram proposals this step sends anyway."""
        rows, max_k = len(slots), self.settings.max_k
        k = np.zeros(rows, dtype=np.int64)
        ngram_tokens, ngram_gain = ngram
        base = rows + ngram_gain  # expected tokens before any MXFP4 draft
        plain = (float(base), float(self._seconds(rows, 0, self.settings.min_passes, ngram_tokens)))
        if not rows or not caps.any():
            return k, plain
        rates = np.stack([self.acceptance.of(s.req_id) for s in slots])  # [rows, K]
        p = np.cumprod(rates, axis=1)  # [rows, K] P(drafts 1..j all accepted)
        depth = np.broadcast_to(np.arange(1, max_k + 1), p.shape)
        valid = depth <= caps[:, None]
        p_items, depth_items = p[valid], depth[valid]
        row_items = np.broadcast_to(np.arange(rows)[:, None], p.shape)[valid]
        order = np.lexsort((depth_items, -p_items))  # best first; a request's positions stay in order
        p_items, depth_items, row_items = p_items[order], depth_items[order], row_items[order]
        # Every m (passes) at once: rows of [m, item] prefixes, items deeper than m skipped.
        m = np.arange(1, int(caps.max()) + 1)[:, None]  # [M, 1]
        allowed = depth_items[None, :] <= m  # [M, n]
        gained = np.cumsum(np.where(allowed, p_items, 0.0), axis=1)
        count = np.cumsum(allowed, axis=1)
        seconds = self._seconds(rows, count, m, ngram_tokens)
        rate = np.where(allowed, (base + gained) / seconds, -1.0)
        best_m, at = np.unravel_index(int(rate.argmax()), rate.shape)
        if rate[best_m, at] < (1.0 + self.settings.min_gain) * plain[0] / plain[1]:
            return k, plain
        chosen = depth_items[: at + 1] <= best_m + 1
        np.add.at(k, row_items[: at + 1][chosen], 1)
        return k, (float(base + gained[best_m, at]), float(seconds[best_m, at]))

    def _with_ngram(
        self,
        slots: Sequence[RequestSlot],
        caps: np.ndarray,
        k: np.ndarray,
        expected: tuple[float, float],
        ngram_len: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """The best of: MXFP4 drafts only (``k``, ``expected``), or n-gram proposals for a set of
        requests and the best MXFP4 choice over the rest. Two sets are tried: every request whose
        proposal pays for its verification at the plain rate, and of those the ones expected to
        commit at least what their MXFP4 drafts would. Returns (use_ngram [rows] bool, k, expected)."""
        rows = len(slots)
        plain_rate = rows / float(self._seconds(rows, 0, self.settings.min_passes))
        per_token_s = self.target.coefficients()[1]
        gain_ngram = np.zeros(rows)
        gain_draft = np.zeros(rows)
        for i in np.flatnonzero(ngram_len):
            gain_ngram[i] = float(np.cumprod(self.ngram_acceptance.of(slots[i].req_id)[: int(ngram_len[i])]).sum())
            gain_draft[i] = float(np.cumprod(self.acceptance.of(slots[i].req_id)[: int(k[i])]).sum())
        pays = (ngram_len > 0) & (
            gain_ngram > (1.0 + self.settings.ngram_margin) * plain_rate * per_token_s * ngram_len
        )
        best = (np.zeros(rows, dtype=bool), k, expected)
        best_rate = expected[0] / expected[1] if expected[1] > 0 else 0.0
        for candidates in (pays, pays & (gain_ngram >= gain_draft)):
            if not candidates.any():
                continue
            sent = (int(ngram_len[candidates].sum()), float(gain_ngram[candidates].sum()))
            k_rest, expected_rest = self._best_k(slots, caps * ~candidates, sent)
            rate = expected_rest[0] / expected_rest[1]
            if rate > best_rate and rate >= (1.0 + self.settings.min_gain) * plain_rate:
                best, best_rate = (candidates, k_rest, expected_rest), rate
        return best

    def _explore(self, caps: np.ndarray, k: np.ndarray, explore: bool) -> np.ndarray:
        """One more draft for every drafting request on an exploring round."""
        if not explore:
            return k
        deeper = (k > 0) & (k < caps)
        self.stats.explorations += int(deeper.sum())
        return k + deeper

    def _drafting_could_pay(self, rows: int, caps: np.ndarray) -> bool:
        """Whether one request drafting j tokens that are all accepted would beat plain decoding:
        if not, the batch is too costly to draft whatever the acceptance, and probing it is waste."""
        if not rows or not caps.any():
            return False
        j = np.arange(1, int(caps.max()) + 1)
        best = float(((rows + j) / self._seconds(rows, j, j)).max())
        return best > (1.0 + self.settings.min_gain) * rows / float(self._seconds(rows, 0, self.settings.min_passes))

    def _reprobe(
        self, slots: Sequence[RequestSlot], caps: np.ndarray, k: np.ndarray, may_pay: bool = True
    ) -> tuple[np.ndarray, int]:
        """k = 1 for requests whose probe is due. A probe costs a draft pass over the whole batch, so
        due probes ride along when the round drafts anyway, and otherwise wait until a quarter of the
        batch is due (or one has waited a second full wait): in a big batch, probes staggered over
        the requests would otherwise put a draft pass into most rounds. While no acceptance could make
        drafting pay (``may_pay`` false: a compute-bound batch), due probes wait for one that could."""
        due, overdue = [], False
        healthy = max(self.acceptance.batch_wide[0], self.settings.prior_acceptance)
        for i, slot in enumerate(slots):
            if caps[i] == 0:
                continue
            if k[i] > 0:
                self._off_steps[slot.req_id] = 0
                self._probe_wait.pop(slot.req_id, None)
                continue
            off = self._off_steps.get(slot.req_id, 0) + 1
            self._off_steps[slot.req_id] = off
            if self.acceptance.of(slot.req_id)[0] >= healthy - PROBE_ACCEPTANCE_GAP:
                continue
            wait = self._probe_wait.get(slot.req_id, self.settings.reprobe_after)
            if off >= wait:
                due.append((i, slot.req_id, wait))
                overdue |= off >= 2 * wait
        if not due or not may_pay or not (k.any() or overdue or len(due) >= math.ceil(PROBE_BATCH_SHARE * len(slots))):
            return k, 0
        for i, req_id, wait in due:
            k[i] = 1
            self._off_steps[req_id] = 0
            self._probe_wait[req_id] = min(2 * wait, self.settings.max_reprobe_after)
        return k, len(due)

    def _count(self, decision: Decision, caps: np.ndarray) -> None:
        s = self.stats
        s.steps += 1
        s.steps_off += not any(decision.k)
        s.probes += decision.probes
        s.ngram_requests += sum(decision.ngram)
        s.decision_seconds += decision.decision_seconds
        for cap, k in zip(caps.tolist(), decision.k):
            if cap > 0:
                s.requests += 1
                s.requests_off += k == 0
                s.k_histogram[k] += 1

    # ------------------------------------------------------------------ for the report

    def estimates(self) -> dict[str, float]:
        """The cost model's current numbers (seconds), for metrics and the log line."""
        out = {}
        if self.target.ready:
            out["target_step_s"], out["target_per_token_s"] = self.target.coefficients()
        if self.draft.ready:
            out["draft_pass_s"], out["draft_per_row_s"] = self.draft.coefficients()
        last = self.last
        if last is not None and last.expected_seconds > 0:
            out["expected_tokens_per_s"] = last.expected_tokens / last.expected_seconds
        if last is not None and last.plain_seconds > 0:
            out["plain_tokens_per_s"] = len(last.k) / last.plain_seconds
        for j, rate in enumerate(self.acceptance.batch_wide.tolist(), start=1):
            out[f"acceptance_pos{j}"] = rate  # batch-wide P(draft j accepted | 1..j-1 were)
        return {key: value for key, value in out.items() if math.isfinite(value)}
