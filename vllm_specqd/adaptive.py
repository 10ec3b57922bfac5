"""Adaptive speculation: how many level-1 draft tokens each request gets, decided per step.

Engine-free: ``adapter/adaptive_drafter.py`` feeds measurements in and applies the :class:`Decision`
it gets back. The cost model, the acceptance estimates, the decision rule, exploration, n-gram
proposals sent straight to the target and re-probing are explained in docs/design.md, "Adaptive
speculation".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

PROBE_BATCH_SHARE = 0.25  # share of the batch that must be due before a round runs a pass for probes alone
# A request re-probes only if its own first-draft acceptance is this far below the batch-wide one (or
# the prior, if the whole batch collapsed): then its acceptance is what keeps it off. Off for cost alone
# (a busy batch), a probe measures nothing new.
PROBE_ACCEPTANCE_GAP = 0.1
NGRAM_EXPLORE_SHARE = 0.125  # of the batch that sends its n-gram proposals on an exploring round
IDLE_PROBE_DEPTH = 2  # drafts of an idle probe
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
    global_acceptance_decay: float = 0.02  # batch-wide rates (the shape, and new requests' prior)
    prior_acceptance: float = 0.6
    prior_acceptance_weight: float = 1.0  # observations the prior counts as in the batch-wide running mean
    # A request's logit offset from the batch-wide rates (AcceptanceModel): its prior variance, and how
    # much the variance grows per round (how fast an acceptance that collapses is followed).
    acceptance_offset_variance: float = 1.0
    acceptance_offset_drift: float = 0.05
    acceptance_optimism: float = 1.0  # bonus for positions seen a few times (AcceptanceModel.optimistic)
    reprobe_after: int = 8
    max_reprobe_after: int = 256
    # Rounds drafting max_k for everyone before the cost model decides. 0: a full batch never drafts
    # before the cost model says it pays (issue 30); the start-up probe measures instead.
    warmup_steps: int = 0
    # Until both cost lines have a measurement, this many rows draft (their cap) and the rest none.
    startup_probe_rows: int = 1
    # Pseudo-observations of a drafting round costing nothing beyond its passes and rows.
    draft_round_prior_weight: float = 1.0
    # A round drafts at most this many times the most tokens a measured round drafted (at least max_k):
    # the cost lines are trusted a doubling beyond what they have seen (0: no limit).
    trust_growth: float = 2.0
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


def _solve_small(q: list[list[float]], r: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting, for the few unknowns of a cost line."""
    n = len(r)
    m = [row[:] + [r[i]] for i, row in enumerate(q)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda i: abs(m[i][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if m[col][col] == 0.0:
            m[col][col] = 1e-300
        for i in range(col + 1, n):
            f = m[i][col] / m[col][col]
            for j in range(col, n + 1):
                m[i][j] -= f * m[col][j]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (m[i][n] - sum(m[i][j] * x[j] for j in range(i + 1, n))) / m[i][i]
    return x


def _nonnegative_solve(q, r) -> list[float]:
    """argmin of 0.5 b'Qb - r'b over b >= 0 for a small positive-definite Q: solve, pin the most
    negative coefficient at 0, solve the rest again. (Pure Python: a few unknowns, solved once per
    observation, where numpy's per-call overhead would dominate.)"""
    q = [[float(v) for v in row] for row in q]
    r = [float(v) for v in r]
    free = list(range(len(r)))
    b = [0.0] * len(r)
    while free:
        sub = _solve_small([[q[i][j] for j in free] for i in free], [r[i] for i in free])
        if min(sub) >= 0:
            for i, v in zip(free, sub):
                b[i] = v
            break
        free.pop(sub.index(min(sub)))
    return b


class LinearFit:
    """Exponentially weighted least squares of ``y = a + b . x``, every coefficient >= 0.

    The lines stay physical: a step or a pass never costs less than nothing, and more tokens, rows or
    passes never cost less. Where the unconstrained fit goes negative (a convex cost seen at two
    clusters of x extrapolates to a negative intercept), that coefficient is pinned at 0 and the others
    refitted. While an x barely varies its slope leans on a prior: the given one, or else
    ``prior_slope_fraction`` of the mean y left over per unit of mean x, shared among the features
    without a given prior (a given one, measured, is held ``given_ridge`` / ``ridge`` times as
    firmly: where two features always move together it keeps its value). The intercept is free, or (``intercept_weight`` > 0) held toward 0 by that
    many pseudo-observations: a draft round costs its passes unless rounds of different lengths say
    there is more. Coefficients are solved once per observation, when first asked for."""

    def __init__(
        self,
        decay: float,
        features: int = 1,
        prior_slopes: Sequence[float | None] | None = None,
        prior_slope_fraction: float = 0.5,
        ridge: float = 0.01,  # prior weight, in units of mean(x)^2 of x variance
        intercept_weight: float = 0.0,
        given_ridge: float = 0.1,  # the same for a given (measured) prior slope
    ):
        self.decay, self.features, self.intercept_weight = decay, features, intercept_weight
        self.given_ridge = given_ridge
        self.prior_slopes = list(prior_slopes) if prior_slopes is not None else [None] * features
        self.prior_slope_fraction, self.ridge = prior_slope_fraction, ridge
        self.weight = self.sy = 0.0
        self.sx, self.sxy = [0.0] * features, [0.0] * features
        self.sxx = [[0.0] * features for _ in range(features)]
        self.observations = 0
        self._tuple: tuple[float, ...] | None = None

    def set_prior_slope(self, feature: int, value: float | None) -> None:
        self.prior_slopes[feature] = value
        self._tuple = None

    def observe(self, x: float | Sequence[float], y: float) -> None:
        x = [float(x)] if isinstance(x, (int, float)) else [float(v) for v in x]
        keep = 1.0 - self.decay
        self.weight = keep * self.weight + 1.0
        self.sy = keep * self.sy + y
        for i, xi in enumerate(x):
            self.sx[i] = keep * self.sx[i] + xi
            self.sxy[i] = keep * self.sxy[i] + xi * y
            row = self.sxx[i]
            for j, xj in enumerate(x):
                row[j] = keep * row[j] + xi * xj
        self.observations += 1
        self._tuple = None

    @property
    def ready(self) -> bool:
        return self.observations > 0

    def all_coefficients(self) -> np.ndarray:  # [1 + features]: a, then the slopes
        return np.array(self.coefficient_tuple())

    def coefficient_tuple(self) -> tuple[float, ...]:
        """(a, slopes...) as Python floats, solved once per observation (decisions read them often)."""
        if self._tuple is None:
            self._tuple = tuple(self._solve())
        return self._tuple

    def _prior(self, mean_x: list[float], mean_y: float) -> list[float]:
        prior = [max(0.0, b) if b is not None else 0.0 for b in self.prior_slopes]
        rest = max(0.0, mean_y - sum(p * m for p, m in zip(prior, mean_x)))
        open_ = [j for j, b in enumerate(self.prior_slopes) if b is None and mean_x[j] > 0]
        for j in open_:
            prior[j] = self.prior_slope_fraction * rest / (len(open_) * mean_x[j])
        return prior

    def _solve(self) -> list[float]:
        n = self.features
        if not self.ready:
            return [0.0] * (n + 1)
        w = self.weight
        mean_x, mean_y = [v / w for v in self.sx], self.sy / w
        prior = self._prior(mean_x, mean_y)
        lam = [
            (self.ridge if b is None else self.given_ridge) * m * m + 1e-18 for b, m in zip(self.prior_slopes, mean_x)
        ]
        second = [[v / w for v in row] for row in self.sxx]  # E[x x']
        cross = [v / w for v in self.sxy]  # E[x y]
        pulled = [c + weight * p for c, weight, p in zip(cross, lam, prior)]
        if self.intercept_weight > 0:  # [a, b] together, a's prior 0
            q = [[1.0 + self.intercept_weight / w] + mean_x]
            q += [[mean_x[i]] + [second[i][j] + (lam[i] if i == j else 0.0) for j in range(n)] for i in range(n)]
            return _nonnegative_solve(q, [mean_y] + pulled)
        cov = [[second[i][j] - mean_x[i] * mean_x[j] + (lam[i] if i == j else 0.0) for j in range(n)] for i in range(n)]
        b = _nonnegative_solve(cov, [p - m * mean_y for p, m in zip(pulled, mean_x)])
        a = mean_y - sum(bi * m for bi, m in zip(b, mean_x))
        if a < 0:  # through the origin instead
            q = [[second[i][j] + (lam[i] if i == j else 0.0) for j in range(n)] for i in range(n)]
            a, b = 0.0, _nonnegative_solve(q, pulled)
        return [a] + b


class LineFit(LinearFit):
    """``y = a + b * x`` (one feature): the target step's seconds over its scheduled tokens."""

    def __init__(self, decay: float, prior_slope_fraction: float = 0.5, prior_slope: float | None = None, ridge=0.01):
        super().__init__(decay, 1, [prior_slope], prior_slope_fraction, ridge)

    @property
    def prior_slope(self) -> float | None:
        return self.prior_slopes[0]

    @prior_slope.setter
    def prior_slope(self, value: float | None) -> None:
        self.set_prior_slope(0, value)

    def coefficients(self) -> tuple[float, float]:
        """(a, b), both >= 0."""
        a, b = self.coefficient_tuple()
        return a, b

    def predict(self, x):  # x: a number or an array of them
        a, b = self.coefficient_tuple()
        if isinstance(x, (int, float)):
            return max(a + b * x, 1e-9)
        return np.maximum(a + b * np.asarray(x, dtype=np.float64), 1e-9)


class AcceptanceModel:
    """Per request and draft position: P(draft j accepted | drafts 1..j-1 were).

    Batch-wide rates give the shape over positions: a running mean per position (the prior counting as
    ``prior_weight`` observations) until the EMA's weight (``global_decay``) is larger, so a position
    seen a few times is trusted at once. A request's own rates are the batch-wide ones shifted by one
    logit offset of its own, ``sigmoid(logit(batch_wide[j]) + offset)``: its outcomes at every
    position inform that one number, so a rejection at a deep position it rarely drafts moves that
    position no more than the others (a per-position estimate would keep the position low, and so
    undrafted, until it happens to be drafted again). The offset is a random walk tracked by a
    logistic Kalman filter: each round its variance grows by ``drift`` (acceptance can collapse and
    recover; rounds the request did not draft count too, up to the prior variance), each verified
    position moves it by variance * (outcome - predicted) and shrinks the variance by the outcome's
    information p (1 - p): a surprise moves it more than an expected outcome.

    Decisions read the batch-wide rates with a bonus for positions seen a few times
    (:meth:`optimistic`): deep positions are measured only when drafted, and an estimate that a few
    first outcomes left low would otherwise keep them out for good."""

    def __init__(
        self,
        max_k: int,
        prior: float,
        global_decay: float,
        prior_weight: float = 1.0,
        variance: float = 1.0,
        drift: float = 0.05,
        optimism: float = 0.0,
    ):
        self.global_decay, self.prior_weight = global_decay, prior_weight
        self.variance, self.drift, self.optimism = variance, drift, optimism
        self.batch_wide = np.full(max_k, prior)  # [K] the prior of a new request
        self.batch_wide_seen = np.zeros(max_k)  # [K] observations of each position
        # [offset, its variance, the round it was last updated], or [K] rates a test pinned
        self.per_request: dict[Hashable, list[float] | np.ndarray] = {}
        self.rounds = 0  # decisions so far: the clock the offsets drift by

    def optimistic(self) -> np.ndarray:  # [K]
        """The batch-wide rates, each position after the first read ``optimism`` * sd / n higher
        (sd: of one outcome, at least 0.22; n: the position's observations, the prior's included).
        A position seen a few times gets the benefit of the doubt until it is measured; the bonus
        fades faster than a standard error, so a well-measured position is read as it is."""
        bw = self.batch_wide
        if self.optimism <= 0:
            return bw.copy()
        seen = self.batch_wide_seen + self.prior_weight
        bonus = self.optimism * np.sqrt(np.maximum(bw * (1 - bw), 0.05)) / seen
        bonus[0] = 0.0  # the first position is measured whenever anyone drafts
        return np.minimum(bw + bonus, np.maximum(bw, 0.99))

    def of(self, req_id: Hashable) -> np.ndarray:  # [K]
        own = self.per_request.get(req_id)
        if own is None:
            return self.optimistic()
        if isinstance(own, np.ndarray):
            return own.copy()
        return 1.0 / (1.0 + np.exp(-(_logit(self.optimistic()) + own[0])))

    def of_many(self, req_ids: Sequence[Hashable]) -> np.ndarray:  # [rows, K]
        """``of`` for a batch, the batch-wide part computed once."""
        base = _logit(self.optimistic())
        own = [self.per_request.get(r) for r in req_ids]
        offsets = np.array([o[0] if isinstance(o, list) else 0.0 for o in own])
        rates = 1.0 / (1.0 + np.exp(-(base[None, :] + offsets[:, None])))
        for i, o in enumerate(own):
            if isinstance(o, np.ndarray):
                rates[i] = o
        return rates

    def pin(self, req_id: Hashable, rates) -> None:
        """A request's rates, set outright (for tests)."""
        self.per_request[req_id] = np.asarray(rates, dtype=np.float64) * np.ones(len(self.batch_wide))

    def observe(self, outcome: Outcome) -> None:
        """Positions 1..accepted were accepted; position accepted + 1 (if verified) was not."""
        if outcome.verified <= 0:
            return
        seen = min(outcome.verified, outcome.accepted + 1, len(self.batch_wide))
        hits = (np.arange(seen) < outcome.accepted).astype(np.float64)
        own = self.per_request.get(outcome.req_id)
        if own is None:
            own = self.per_request[outcome.req_id] = [0.0, self.variance, self.rounds]
        if not isinstance(own, np.ndarray):
            # The offset drifted every round since its last update, drafted or not: a request kept
            # off by a few rejections is quick to move back up when a probe is accepted.
            offset, variance = own[0], min(own[1] + self.drift * max(1, self.rounds - own[2]), self.variance)
            for logit, hit in zip(_logit(self.batch_wide[:seen]).tolist(), hits.tolist()):
                p = 1.0 / (1.0 + math.exp(-(logit + offset)))
                variance = 1.0 / (1.0 / variance + p * (1.0 - p))
                offset += variance * (hit - p)
            own[0], own[1], own[2] = offset, variance, self.rounds
        self.batch_wide_seen[:seen] += 1
        weight = np.maximum(self.global_decay, 1.0 / (self.batch_wide_seen[:seen] + self.prior_weight))
        self.batch_wide[:seen] += weight * (hits - self.batch_wide[:seen])

    def forget(self, req_id: Hashable) -> None:
        self.per_request.pop(req_id, None)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


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


class CostModel:
    """A round's seconds: the target step's line (seconds vs scheduled tokens) and the draft round's
    line (round + pass * passes + row * drafted tokens, or passes * rows); docs/design.md."""

    def __init__(self, settings: AdaptiveSettings):
        self.settings = settings
        self.target = LineFit(settings.cost_decay)
        self.draft = LinearFit(settings.cost_decay, features=2, intercept_weight=settings.draft_round_prior_weight)
        self.measured_drafts = 0  # the most tokens a round drafted and had timed: the trust region's base

    @property
    def ready(self) -> bool:
        return self.target.ready and self.draft.ready

    def set_draft_row_cost(self, seconds_per_row: float) -> None:
        """A measured cost of one more row in a draft pass: the slope's prior until rows vary."""
        self.draft.set_prior_slope(1, max(0.0, seconds_per_row))

    def draft_coefficients(self) -> tuple[float, float, float]:
        """(round, pass, row) seconds: a round of m passes drafting n tokens costs round + m * pass +
        n * row (passes over the drafting rows) or round + m * (pass + rows * row) (over the batch)."""
        r, c, d = self.draft.coefficient_tuple()
        return r, c, d

    def observe_draft(self, decision: Decision, seconds: float) -> None:
        rows = len(decision.k)
        if decision.passes > 0 and rows > 0:
            drafted = sum(k for k, ngram in zip(decision.k, decision.ngram or [False] * rows) if not ngram)
            if self.settings.passes_run_drafting_rows_only:  # n-gram rows run no pass
                self.draft.observe((decision.passes, drafted), seconds)
            else:
                self.draft.observe((decision.passes, decision.passes * rows), seconds)
            self.measured_drafts = max(self.measured_drafts, sum(decision.k))

    def seconds(self, rows: int, drafts: float | np.ndarray, passes: int | np.ndarray, verified_anyway: int = 0):
        """A round of ``passes`` draft passes drafting ``drafts`` tokens in all, then its target step
        (which also verifies ``verified_anyway`` n-gram tokens)."""
        return self.target.predict(rows + verified_anyway + drafts) + self.draft_seconds(rows, drafts, passes)

    def plain_seconds(self, rows: int, verified_anyway: int = 0) -> float:
        return float(self.seconds(rows, 0, self.settings.min_passes, verified_anyway))

    def draft_seconds(self, rows: int, drafts, passes):
        if not self.draft.ready:
            return 0.0 * np.asarray(passes)
        r, c, d = self.draft_coefficients()
        if isinstance(passes, (int, np.integer)) and isinstance(drafts, (int, float, np.integer)):  # one round
            if self.settings.passes_run_drafting_rows_only:
                return r + c * passes + d * drafts if passes > 0 else 0.0
            passes = max(int(passes), self.settings.min_passes)
            return r + passes * (c + d * rows) if passes > 0 else 0.0
        passes = np.asarray(passes)
        if self.settings.passes_run_drafting_rows_only:
            return np.where(passes > 0, r + c * passes + d * np.asarray(drafts), 0.0)
        passes = np.maximum(passes, self.settings.min_passes)
        return np.where(passes > 0, r + passes * (c + d * rows), 0.0)

    def draft_limit(self) -> float:
        """The most tokens a round may draft: ``trust_growth`` times the most a timed round drafted."""
        if self.settings.trust_growth <= 0:
            return math.inf
        return max(self.settings.max_k, self.settings.trust_growth * self.measured_drafts)

    def drafting_could_pay(self, rows: int, caps: np.ndarray) -> bool:
        """Whether one request, or every request, drafting j tokens that are all accepted would beat
        plain decoding: if not, the batch is too costly to draft whatever the acceptance, and probing
        it is waste."""
        if not rows or not caps.any():
            return False
        j = np.arange(1, int(caps.max()) + 1)
        everyone = np.minimum(caps[:, None], j[None, :]).sum(axis=0)  # every row drafting up to j: passes shared
        drafts, passes = np.concatenate([j, everyone]), np.concatenate([j, j])
        best = float(((rows + drafts) / self.seconds(rows, drafts, passes)).max())
        return best > (1.0 + self.settings.min_gain) * rows / self.plain_seconds(rows)

    def estimates(self) -> dict[str, float]:
        out = {}
        if self.target.ready:
            out["target_step_s"], out["target_per_token_s"] = self.target.coefficients()
        if self.draft.ready:
            out["draft_round_s"], out["draft_pass_s"], out["draft_per_row_s"] = self.draft_coefficients()
        return out


class ProbeSchedule:
    """Which requests the cost model's choice leaves at k = 0 draft anyway, to keep measuring: before
    the cost lines exist (:meth:`startup`), requests whose acceptance collapsed (:meth:`reprobe`) and a
    batch where nobody drafted for a while (:meth:`idle`)."""

    def __init__(self, settings: AdaptiveSettings, acceptance: AcceptanceModel):
        self.settings = settings
        self.acceptance = acceptance
        self._off_steps: dict[Hashable, int] = {}  # consecutive k = 0 steps
        self._probe_wait: dict[Hashable, int] = {}
        self._idle_rounds, self._idle_wait = 0, settings.reprobe_after  # rounds nobody drafted

    def forget(self, req_id: Hashable) -> None:
        self._off_steps.pop(req_id, None)
        self._probe_wait.pop(req_id, None)

    def startup(self, caps: np.ndarray) -> np.ndarray:
        """Before both cost lines have a measurement: ``startup_probe_rows`` rows draft (their cap; two
        with passes over the whole batch, which every row pays for), the others none."""
        k = np.zeros_like(caps)
        depth = caps if self.settings.passes_run_drafting_rows_only else np.minimum(caps, 2)
        probes = np.flatnonzero(caps > 0)[: self.settings.startup_probe_rows]
        k[probes] = depth[probes]
        return k

    def idle(
        self,
        slots: Sequence[RequestSlot],
        caps: np.ndarray,
        k: np.ndarray,
        chose_drafts: bool,
        may_pay,  # () -> bool
        first: np.ndarray | None = None,  # [rows] first-position rates, if known
    ) -> tuple[np.ndarray, int]:
        """After ``reprobe_after`` rounds in a row where nobody drafted, while drafting could pay: one
        row whose acceptance is healthy (the best first-position estimate) drafts its cap (two with
        passes over the whole batch). A few unlucky first measurements can turn the cost model or the
        acceptance against drafting, and a batch that never drafts measures neither again. Each such
        probe that does not turn drafting back on doubles the wait (up to ``max_reprobe_after``);
        drafting resets it. Collapsed requests are :meth:`reprobe`'s."""
        if chose_drafts:
            self._idle_rounds, self._idle_wait = 0, self.settings.reprobe_after
            return k, 0
        if k.any() or not caps.any():
            return k, 0
        self._idle_rounds += 1
        if self._idle_rounds < self._idle_wait or not may_pay():
            return k, 0
        if first is None:
            first = self.acceptance.of_many([s.req_id for s in slots])[:, 0]
        healthy = max(self.acceptance.batch_wide[0], self.settings.prior_acceptance) - PROBE_ACCEPTANCE_GAP
        candidates = np.where((caps > 0) & (first >= healthy), first, -1.0)
        if candidates.max() < 0:
            return k, 0
        i = int(np.argmax(candidates))
        k[i] = min(int(caps[i]), IDLE_PROBE_DEPTH)
        self._idle_rounds, self._idle_wait = 0, min(2 * self._idle_wait, self.settings.max_reprobe_after)
        return k, 1

    def reprobe(
        self,
        slots: Sequence[RequestSlot],
        caps: np.ndarray,
        k: np.ndarray,
        may_pay=True,  # a bool, or () -> bool
        first: np.ndarray | None = None,  # [rows] first-position rates, if known
    ) -> tuple[np.ndarray, int]:
        """k = 1 for requests whose probe is due. A probe costs a draft pass over the whole batch, so
        due probes ride along when the round drafts anyway, and otherwise wait until a quarter of the
        batch is due (or one has waited a second full wait): in a big batch, probes staggered over
        the requests would otherwise put a draft pass into most rounds. While no acceptance could make
        drafting pay (``may_pay`` false: a compute-bound batch), due probes wait for one that could."""
        due, overdue = [], False
        healthy = max(self.acceptance.batch_wide[0], self.settings.prior_acceptance)
        if first is None:
            first = self.acceptance.of_many([s.req_id for s in slots])[:, 0] if len(slots) else np.zeros(0)
        first = first.tolist()
        for i, slot in enumerate(slots):
            if caps[i] == 0:
                continue
            if k[i] > 0:
                self._off_steps[slot.req_id] = 0
                self._probe_wait.pop(slot.req_id, None)
                continue
            off = self._off_steps.get(slot.req_id, 0) + 1
            self._off_steps[slot.req_id] = off
            if first[i] >= healthy - PROBE_ACCEPTANCE_GAP:
                continue
            wait = self._probe_wait.get(slot.req_id, self.settings.reprobe_after)
            if off >= wait:
                due.append((i, slot.req_id, wait))
                overdue |= off >= 2 * wait
        if not due or not (k.any() or overdue or len(due) >= math.ceil(PROBE_BATCH_SHARE * len(slots))):
            return k, 0
        if not (may_pay() if callable(may_pay) else may_pay):
            return k, 0
        for i, req_id, wait in due:
            k[i] = 1
            self._off_steps[req_id] = 0
            self._probe_wait[req_id] = min(2 * wait, self.settings.max_reprobe_after)
        return k, len(due)


class AdaptivePolicy:
    def __init__(self, settings: AdaptiveSettings):
        if settings.policy not in POLICIES:
            raise ValueError(f"unknown adaptive policy {settings.policy!r}; one of {POLICIES}")
        if settings.passes_run_drafting_rows_only and settings.min_passes:
            raise ValueError("a pass that must run anyway (min_passes) covers the whole batch")
        self.settings = settings
        self.cost = CostModel(settings)
        acceptance = (
            settings.max_k,
            settings.prior_acceptance,
            settings.global_acceptance_decay,
            settings.prior_acceptance_weight,
            settings.acceptance_offset_variance,
            settings.acceptance_offset_drift,
            settings.acceptance_optimism,
        )
        self.acceptance, self.ngram_acceptance = AcceptanceModel(*acceptance), AcceptanceModel(*acceptance)
        self.probes = ProbeSchedule(settings, self.acceptance)
        self.stats = AdaptiveStats(k_histogram=[0] * (settings.max_k + 1))
        self.last: Decision | None = None
        self._first_rates: np.ndarray | None = None  # [rows] this decision's first-position rates
        self._rng = np.random.default_rng(settings.seed)

    # ------------------------------------------------------------------ measurements

    def observe_target(self, tokens: int, seconds: float) -> None:
        self.cost.target.observe(tokens, seconds)
        self.stats.step_seconds += seconds

    def observe_draft(self, decision: Decision, seconds: float) -> None:
        """The round that ran ``decision`` drafted for ``seconds``."""
        self.cost.observe_draft(decision, seconds)
        self.stats.step_seconds += seconds

    def observe(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            (self.ngram_acceptance if outcome.ngram else self.acceptance).observe(outcome)

    def forget(self, req_id: Hashable) -> None:
        self.acceptance.forget(req_id)
        self.ngram_acceptance.forget(req_id)
        self.probes.forget(req_id)

    # ------------------------------------------------------------------ the decision

    def decide(self, slots: Sequence[RequestSlot]) -> Decision:
        started = time.perf_counter()
        self.acceptance.rounds += 1
        self.ngram_acceptance.rounds += 1
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
        elif self.stats.steps < self.settings.warmup_steps:  # legacy: everyone drafts K to measure
            k, expected = caps.copy(), (rows + 0.0, 0.0)
            use_ngram = (ngram_len > 0) & bool(self.stats.steps % 2)  # and the n-gram proposals
        elif not self.cost.ready:
            k, expected = self.probes.startup(caps), (rows + 0.0, 0.0)
            use_ngram[np.flatnonzero((ngram_len > 0) & (k == 0))[:1]] = True  # and one n-gram proposal
        else:
            k, expected = self._best_k(slots, caps)
            if ngram_len.any():
                use_ngram, k, expected = self._with_ngram(slots, caps, k, expected, ngram_len)
                if explore and not use_ngram.any():  # keep the n-gram estimates measured, a few rows at a time
                    use_ngram = self._ngram_explore(ngram_len, k, rows, caps)
            k = self._explore(caps * ~use_ngram, k, explore)
        k = np.where(use_ngram, ngram_len, k)
        may_pay = None  # probes_may_pay(), computed once and only if a probe is due

        def probes_may_pay() -> bool:
            nonlocal may_pay
            if may_pay is None:
                may_pay = self.settings.policy != "off" and (
                    self.settings.policy == "random"
                    or not self.cost.target.ready
                    or self.cost.drafting_could_pay(rows, caps)
                )
            return may_pay

        chose_drafts = bool(k.any())
        first = self._first_rates if self._first_rates is not None and len(self._first_rates) == rows else None
        k, probes = self.probes.reprobe(slots, caps, k, probes_may_pay, first)
        if self.settings.policy == "cost" and self.cost.ready:
            k, cost_probes = self.probes.idle(slots, caps, k, chose_drafts, probes_may_pay, first)
            probes += cost_probes
        self._first_rates = None
        draft_k = np.where(use_ngram, 0, k)
        passes = max(int(draft_k.max()), self.settings.min_passes) if rows and self.settings.policy != "off" else 0
        decision = Decision(
            k=k.tolist(),
            ngram=use_ngram.tolist(),
            passes=passes,
            probes=probes,
            expected_tokens=expected[0],
            expected_seconds=expected[1],
            plain_seconds=self.cost.plain_seconds(rows) if self.cost.target.ready else 0.0,
            decision_seconds=time.perf_counter() - started,
        )
        self._count(decision, caps)
        self.last = decision
        return decision

    def _ngram_explore(self, ngram_len: np.ndarray, k: np.ndarray, rows: int, caps: np.ndarray) -> np.ndarray:
        """On an exploring round where no proposal was sent: those of up to an eighth of the batch (at
        least one) of the rows that draft nothing, if drafting could pay at all."""
        candidates = np.flatnonzero((ngram_len > 0) & (k == 0))
        use = np.zeros(rows, dtype=bool)
        if len(candidates) and self.cost.drafting_could_pay(rows, caps):
            use[candidates[: max(1, math.ceil(rows * NGRAM_EXPLORE_SHARE))]] = True
        return use

    def _best_k(
        self, slots: Sequence[RequestSlot], caps: np.ndarray, ngram: tuple[int, float] = (0, 0.0)
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """Per request k maximising expected committed tokens per second (docs/design.md, "Adaptive speculation").

        ``ngram``: (tokens, expected gain) of the n-gram proposals this step sends anyway."""
        rows, max_k = len(slots), self.settings.max_k
        k = np.zeros(rows, dtype=np.int64)
        ngram_tokens, ngram_gain = ngram
        base = rows + ngram_gain  # expected tokens before any MXFP4 draft
        plain = (float(base), self.cost.plain_seconds(rows, ngram_tokens))
        if not rows or not caps.any():
            return k, plain
        rates = self.acceptance.of_many([s.req_id for s in slots])  # [rows, K]
        self._first_rates = rates[:, 0]
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
        allowed &= count <= self.cost.draft_limit()
        seconds = self.cost.seconds(rows, count, m, ngram_tokens)
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
        plain_rate = rows / self.cost.plain_seconds(rows)
        per_token_s = self.cost.target.coefficients()[1]
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
        out = self.cost.estimates()
        last = self.last
        if last is not None and last.expected_seconds > 0:
            out["expected_tokens_per_s"] = last.expected_tokens / last.expected_seconds
        if last is not None and last.plain_seconds > 0:
            out["plain_tokens_per_s"] = len(last.k) / last.plain_seconds
        for j, rate in enumerate(self.acceptance.batch_wide.tolist(), start=1):
            out[f"acceptance_pos{j}"] = rate  # batch-wide P(draft j accepted | 1..j-1 were)
        return {key: value for key, value in out.items() if math.isfinite(value)}


class PolicyTrace:
    """One JSON line per drafting round, appended to a file (``VLLM_SPECQD_TRACE_POLICY``, set for an
    engine; ``vllm_specqd/bench/policy_replay.py`` writes the same from a simulated one and replays both).

    The first line is ``{"settings": AdaptiveSettings}``. Then per round: ``round``; ``req`` (small
    ints, one per request id in order of first sight), ``pos`` (the position of the token each row just
    sampled), ``cap``, ``k``, ``ngram`` (proposal lengths) and ``sent`` (k is the n-gram proposal), per
    row; ``outcomes``: ``[req, verified, accepted, ngram]`` of last round's drafts; ``target``:
    ``[scheduled tokens, seconds, fitted]`` of the step that just ran (the seconds since the last round
    ended; ``fitted`` false for a step with a prefill chunk or an idle gap; null before the first
    round); ``target_forward_s``: the target's own forward pass in it (CPU engines); ``draft_s`` and
    ``passes`` of this round; ``probes``; ``est``: the cost model (``target`` a, b; ``draft`` round,
    pass, row; ``tok_s`` expected and ``plain_tok_s``; ``tokens`` and ``seconds`` expected this round);
    ``decision_s``."""

    def __init__(self, path: str, policy: AdaptivePolicy):
        self.path, self.policy = path, policy
        self.ids: dict[Hashable, int] = {}
        self.rounds = 0

    def short(self, req_id: Hashable) -> int:
        return self.ids.setdefault(req_id, len(self.ids))

    def entry(
        self,
        slots: Sequence[RequestSlot],
        positions: Sequence[int],
        outcomes: Sequence[Outcome],
        decision: Decision,
        target: tuple[int, float, bool] | None,
    ) -> dict:
        """This round's line but ``draft_s`` (the caller adds it once the drafting is timed)."""
        short, policy = self.short, self.policy
        entry = {
            "req": [short(s.req_id) for s in slots],
            "pos": list(positions),
            "cap": [s.cap for s in slots],
            "k": decision.k,
            "outcomes": [[short(o.req_id), o.verified, o.accepted, int(o.ngram)] for o in outcomes],
            "target": None if target is None else list(target),
            "passes": decision.passes,
            "probes": decision.probes,
            "decision_s": decision.decision_seconds,
        }
        if any(s.ngram for s in slots):
            entry["ngram"] = [s.ngram for s in slots]
            entry["sent"] = [int(x) for x in decision.ngram]
        est = {}
        if policy.cost.target.ready:
            est["target"] = list(policy.cost.target.coefficients())
        if policy.cost.draft.ready:
            est["draft"] = list(policy.cost.draft_coefficients())
        if decision.expected_seconds > 0:
            est["tokens"], est["seconds"] = decision.expected_tokens, decision.expected_seconds
            est["tok_s"] = decision.expected_tokens / decision.expected_seconds
        if decision.plain_seconds > 0:
            est["plain_tok_s"] = len(decision.k) / decision.plain_seconds
        entry["est"] = est
        return entry

    def write(self, entry: dict) -> None:
        self.rounds += 1
        with open(self.path, "a") as f:
            if self.rounds == 1:
                settings = dataclasses.asdict(self.policy.settings)
                f.write(json.dumps({"settings": settings, "pid": os.getpid()}) + "\n")
            f.write(json.dumps({"round": self.rounds, **entry}, separators=(",", ":")) + "\n")
