"""Offline replay of the adaptive policy (vllm_specqd/adaptive.py) against a simulated engine.

The policy's unit of quality (issue 28): on a trace of acceptance and costs, the tokens per second
it reaches against the oracle best fixed K (the best of k = 0..K for every request and round, chosen
per trace with hindsight) and against "off" (k = 0, plain decoding). Everything is counted in
simulated seconds, so the numbers do not depend on the machine that runs the replay.

A simulated engine runs the loop ``adapter/adaptive_drafter.py`` runs: a target step verifies last
round's drafts and commits what was accepted, the policy observes the step's time and the outcomes,
decides each row's k, the draft passes run and are timed. Requests wait in a queue and join the batch
(at most ``batch`` rows) as others finish; a step with a joining request's prefill is not fitted, as
in the engine.

* **Costs** (:class:`CostModel`): a target step ``a + b * tokens + row * rows + quad * tokens^2``
  (plus ``spec`` when it verifies any draft), a round's draft passes ``round + m * c + d * drafted``
  (passes over the drafting rows only) or ``round + m * (c + d * rows)`` (passes over the batch), with
  lognormal noise. The start-up calibration gives the policy ``calibration * d`` as the row cost.
* **Acceptance** (:class:`AcceptanceProfile`): each output token has a difficulty u ~ U(0, 1) drawn
  once per trace; a draft from position t accepts its depth-j token (position t + j) iff
  ``u[t + j] < rate_j`` of that request at t, so chains that cover the same token share its fate, as
  greedy drafts do. Per-request variation is a logit offset, phases multiply the rates over a span of
  a request's output (acceptance collapses and recovers). N-gram proposals (optional) have their own
  rates and uniforms.
* **Recorded traces** (``VLLM_SPECQD_TRACE_POLICY`` JSONL, adapter/adaptive_drafter.py): the requests'
  output lengths and the batch are the recording's; the costs are non-negative least-squares fits of
  its measured steps and drafting rounds (with the residuals' spread as noise); acceptance replays the
  recorded outcomes per output token: a token recorded accepted at draft depth j is accepted at any
  depth <= j, one recorded rejected at depth j is rejected at any depth >= j (a shallower draft sees
  more of the target's own context). What no recorded draft decided is drawn from the trace's
  conditional per-position rates.

The identical uniforms, noise and queue make every policy of a trace see the same tokens: the
comparison is paired.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vllm_specqd.adaptive import AdaptivePolicy, AdaptiveSettings, Decision, Outcome, PolicyTrace, RequestSlot

# ---------------------------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class CostModel:
    """Seconds the simulated engine charges (see the module docstring)."""

    target_a: float
    target_b: float
    draft_c: float
    draft_d: float
    target_row: float = 0.0  # per row: sampling, per-request attention and bookkeeping
    target_spec: float = 0.0  # once per step that verifies any draft: the rejection sampler, spec metadata
    target_quad: float = 0.0  # per token^2: a compute-bound target whose cost grows faster than its tokens
    draft_round: float = 0.0  # once per round that runs a pass
    drafting_rows_only: bool = True  # pass j runs only the rows with k > j
    min_passes: int = 0  # passes every round runs (a separate KV catching up); needs whole-batch passes
    noise: float = 0.0  # sigma of each measured time's lognormal factor
    calibration: float = 1.0  # the start-up calibration's row cost, as a share of draft_d
    prefill: float = 0.0  # seconds a joining request's prefill adds to its step

    def target_seconds(self, rows: int, tokens: int, drafts: int) -> float:
        return (
            self.target_a
            + self.target_b * tokens
            + self.target_row * rows
            + self.target_quad * tokens * tokens
            + (self.target_spec if drafts else 0.0)
        )

    def draft_seconds(self, k: np.ndarray, rows: int) -> tuple[float, int]:
        """(seconds, passes) of a round whose MXFP4 rows draft ``k`` (n-gram rows excluded)."""
        passes = max(int(k.max()) if len(k) else 0, self.min_passes)
        if passes == 0:
            return 0.0, 0
        if self.drafting_rows_only:
            seconds = passes * self.draft_c + self.draft_d * float(k.sum())
        else:
            seconds = passes * (self.draft_c + self.draft_d * rows)
        return seconds + self.draft_round, passes


# ----------------------------------------------------------------------------------------- acceptance


@dataclass(frozen=True)
class Phase:
    """Over [start, end) of an affected request's output (shares of it) its rates are multiplied by factor."""

    start: float
    end: float
    factor: float
    share: float = 1.0  # of the requests affected


@dataclass(frozen=True)
class AcceptanceProfile:
    rates: tuple[float, ...]  # per draft position: P(accepted | the positions before it were)
    spread: float = 0.0  # sigma of a per-request logit offset
    phases: tuple[Phase, ...] = ()
    ngram_share: float = 0.0  # P(a request has an n-gram proposal at a position)
    ngram_len: int = 0
    ngram_rates: tuple[float, ...] = ()

    @staticmethod
    def from_cumulative(cumulative: Sequence[float], **kw) -> AcceptanceProfile:
        """From P(positions 1..j all accepted), what the benchmark's per-position column reports."""
        rates, before = [], 1.0
        for c in cumulative:
            rates.append(min(0.995, c / before) if before > 0 else 0.0)
            before = max(c, 1e-9)
        return AcceptanceProfile(tuple(rates), **kw)


class RequestAcceptance:
    """One simulated request's acceptance: ``accepted(t, k)`` for a draft of k from output position t."""

    def __init__(self, rates: np.ndarray, difficulty: np.ndarray):
        self.rates = rates  # [L + K + 1, K] rates of a draft from each position
        self.u = difficulty  # [L + K + 1]

    def accepted(self, t: int, k: int) -> int:
        for j in range(1, k + 1):
            if self.u[t + j] >= self.rates[t, j - 1]:
                return j - 1
        return k

    def ngram(self, t: int, cap: int) -> tuple[int, int]:  # (proposal length, accepted if sent)
        return 0, 0


class SyntheticAcceptance(RequestAcceptance):
    def __init__(self, rates, difficulty, ngram_rates=None, ngram_u=None, ngram_has=None, ngram_len=0):
        super().__init__(rates, difficulty)
        self.ngram_rates, self.ngram_u, self.ngram_has, self.ngram_len = ngram_rates, ngram_u, ngram_has, ngram_len

    def ngram(self, t: int, cap: int) -> tuple[int, int]:
        if self.ngram_has is None or not self.ngram_has[t] or cap <= 0:
            return 0, 0
        g = min(self.ngram_len, cap)
        for j in range(1, g + 1):
            if self.ngram_u[t + j] >= self.ngram_rates[t, j - 1]:
                return g, j - 1
        return g, g


def synthetic_requests(
    profile: AcceptanceProfile, lengths: Sequence[int], max_k: int, seed: int
) -> list[RequestAcceptance]:
    rng = np.random.default_rng(seed)
    base = np.array(profile.rates[:max_k] + (profile.rates[-1],) * (max_k - len(profile.rates)), dtype=np.float64)
    logit = np.log(np.clip(base, 1e-6, 1 - 1e-6) / np.clip(1 - base, 1e-6, 1))
    ng_base = np.array(profile.ngram_rates or (0.0,), dtype=np.float64)
    ng_base = np.concatenate([ng_base, np.full(max(0, max_k - len(ng_base)), ng_base[-1])])[:max_k]
    out = []
    for length in lengths:
        n = length + max_k + 1
        offset = rng.normal(0.0, profile.spread) if profile.spread else 0.0
        rates = 1.0 / (1.0 + np.exp(-(logit + offset)))
        factor = np.ones(n)
        for phase in profile.phases:
            if rng.random() < phase.share:
                factor[int(phase.start * length) : int(phase.end * length)] *= phase.factor
        per_position = np.clip(factor[:, None] * rates[None, :], 0.0, 1.0)
        u = rng.random(n)
        if profile.ngram_share > 0:
            has = rng.random(n) < profile.ngram_share
            ng = np.clip(factor[:, None] * ng_base[None, :], 0.0, 1.0)
            out.append(SyntheticAcceptance(per_position, u, ng, rng.random(n), has, profile.ngram_len))
        else:
            out.append(SyntheticAcceptance(per_position, u))
    return out


class RecordedAcceptance(RequestAcceptance):
    """Recorded outcomes per output token, the trace's rates where none was recorded.

    ``hit[x]``: the deepest draft position at which token x was seen accepted (0: never); ``miss[x]``:
    the shallowest at which it was seen rejected (a large number: never). A draft reaching x at depth
    j accepts it if j <= hit[x] and rejects it if j >= miss[x]: a shallower draft sees more of the
    target's own context, so it does at least as well. Between the two, x is drawn."""

    def __init__(self, rates, difficulty, hit: np.ndarray, miss: np.ndarray):
        super().__init__(rates, difficulty)
        self.hit, self.miss = hit, miss

    def accepted(self, t: int, k: int) -> int:
        for j in range(1, k + 1):
            x = t + j
            if j <= self.hit[x]:
                continue
            if j >= self.miss[x] or self.u[x] >= self.rates[t, j - 1]:
                return j - 1
        return k


# ------------------------------------------------------------------------------------------ scenarios


@dataclass
class Scenario:
    name: str
    cost: CostModel
    lengths: list[int]  # tokens each request generates (its first comes from its prefill)
    batch: int
    max_k: int
    make_requests: Callable[[int], list[RequestAcceptance]]  # of the seed
    seed: int = 0
    note: str = ""


def synthetic(
    name: str,
    cost: CostModel,
    profile: AcceptanceProfile,
    *,
    requests: int,
    tokens: int,
    batch: int,
    max_k: int = 6,
    seed: int = 0,
    length_spread: float = 0.0,
    note: str = "",
) -> Scenario:
    rng = np.random.default_rng(seed + 7919)
    lengths = [max(2, int(round(tokens * (1 + length_spread * (rng.random() * 2 - 1))))) for _ in range(requests)]
    return Scenario(
        name, cost, lengths, batch, max_k, lambda sd: synthetic_requests(profile, lengths, max_k, sd), seed, note
    )


# ---------------------------------------------------------------------------------------- simulation


@dataclass
class SimResult:
    chooser: str
    tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    drafted: int = 0  # MXFP4 draft tokens sent to the target
    accepted: int = 0
    ngram_sent: int = 0
    passes: int = 0
    k_histogram: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    verified_per_position: list[int] = field(default_factory=list)
    policy: AdaptivePolicy | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


Chooser = Callable[[Sequence[RequestSlot]], Decision]


def fixed_k(k_max: int) -> Callable[[AdaptiveSettings], Chooser]:
    """Every request drafts min(K, cap): speculation without the adaptive policy (K = 0: off)."""

    def make(settings: AdaptiveSettings) -> Chooser:
        def choose(slots):
            k = [min(k_max, s.cap) for s in slots]
            passes = max(max(k, default=0), settings.min_passes) if slots else 0
            return Decision(k, passes, 0, 0.0, 0.0, 0.0, 0.0, [False] * len(k))

        return choose

    return make


def simulate(
    scenario: Scenario,
    chooser: str | int = "adaptive",
    settings: dict | None = None,
    policy_factory: Callable[[AdaptiveSettings], AdaptivePolicy] = AdaptivePolicy,
    trace_path: str | Path | None = None,
) -> SimResult:
    """Run the scenario with the adaptive policy (``chooser="adaptive"``) or a fixed K (an int).
    ``trace_path``: append the policy's rounds there, as an engine's ``VLLM_SPECQD_TRACE_POLICY`` does."""
    cost, max_k = scenario.cost, scenario.max_k
    adaptive_settings = AdaptiveSettings(
        max_k=max_k,
        min_passes=cost.min_passes,
        passes_run_drafting_rows_only=cost.drafting_rows_only and not cost.min_passes,
        **(settings or {}),
    )
    policy = None
    if chooser == "adaptive":
        policy = policy_factory(adaptive_settings)
        policy.cost.set_draft_row_cost(cost.draft_d * cost.calibration)
        choose = policy.decide
        name = "adaptive"
    else:
        choose = fixed_k(int(chooser))(adaptive_settings)
        name = f"K={int(chooser)}"
    trace = PolicyTrace(str(trace_path), policy) if trace_path is not None and policy is not None else None
    accept = scenario.make_requests(scenario.seed)
    noise = np.random.default_rng(scenario.seed + 104729)
    result = SimResult(
        name,
        k_histogram=[0] * (max_k + 1),
        accepted_per_position=[0] * max_k,
        verified_per_position=[0] * max_k,
        policy=policy,
    )
    queue = deque(range(len(scenario.lengths)))
    generated = [0] * len(scenario.lengths)
    active: list[int] = []
    drafts: dict[int, tuple[int, bool]] = {}  # last round's k and whether it was an n-gram proposal
    ngram_accepted: dict[int, int] = {}

    def jitter() -> float:
        return float(math.exp(noise.normal(0.0, cost.noise))) if cost.noise else 1.0

    while queue or active:
        joining = []
        while queue and len(active) + len(joining) < scenario.batch:
            joining.append(queue.popleft())
        rows = len(active) + len(joining)
        drafted = sum(drafts.get(i, (0, False))[0] for i in active)
        tokens = rows + drafted
        seconds = cost.target_seconds(rows, tokens, drafted) * jitter() + cost.prefill * len(joining)
        result.seconds += seconds
        outcomes, still = [], []
        for i in active:
            k, sent = drafts.get(i, (0, False))
            t = generated[i]
            if k:
                a = ngram_accepted[i] if sent else accept[i].accepted(t, k)
                outcomes.append(Outcome(i, k, a, sent))
                if not sent:
                    result.accepted += a
                    for j in range(min(k, a + 1)):
                        result.verified_per_position[j] += 1
                        result.accepted_per_position[j] += j < a
            else:
                a = 0
            commit = min(a + 1, scenario.lengths[i] - t)
            generated[i] += commit
            result.tokens += commit
            if generated[i] < scenario.lengths[i]:
                still.append(i)
            elif policy is not None:
                policy.forget(i)
        for i in joining:
            generated[i] = 1
            result.tokens += 1
            if generated[i] < scenario.lengths[i]:
                still.append(i)
        active = still
        fitted = bool(result.rounds) and not joining  # a step with a prefill chunk is not fitted
        if policy is not None:
            if fitted:
                policy.observe_target(tokens, seconds)
            policy.observe(outcomes)
        if not active:
            drafts = {}
            continue
        slots, ngram_of = [], {}
        for i in active:
            cap = max(0, min(max_k, scenario.lengths[i] - generated[i] - 1))
            g, a = accept[i].ngram(generated[i], cap)
            ngram_of[i] = a
            slots.append(RequestSlot(i, cap, g))
        decision = choose(slots)
        result.rounds += 1
        drafts, ngram_accepted = {}, {}
        mx = []
        for slot, k, sent in zip(slots, decision.k, decision.ngram or [False] * len(slots)):
            drafts[slot.req_id] = (k, sent)
            if sent:
                ngram_accepted[slot.req_id] = ngram_of[slot.req_id]
                result.ngram_sent += 1
            else:
                mx.append(k)
                result.drafted += k
            if slot.cap > 0:
                result.k_histogram[k] += 1
        draft_seconds, passes = cost.draft_seconds(np.array(mx, dtype=np.int64), rows=len(slots))
        passes = max(passes, decision.passes if policy is not None else 0)
        draft_seconds *= jitter()
        result.passes += passes
        result.seconds += draft_seconds
        if policy is not None:
            policy.observe_draft(decision, draft_seconds)
        if trace is not None:
            step = (tokens, seconds, fitted) if result.rounds > 1 else None
            entry = trace.entry(slots, [generated[s.req_id] for s in slots], outcomes, decision, step)
            trace.write({**entry, "draft_s": draft_seconds})
    return result


@dataclass
class Evaluation:
    scenario: str
    policy: SimResult
    fixed: list[SimResult]  # K = 0..max_k

    @property
    def oracle(self) -> SimResult:
        return max(self.fixed, key=lambda r: r.tokens_per_s)

    @property
    def off(self) -> SimResult:
        return self.fixed[0]

    @property
    def vs_oracle(self) -> float:
        return self.policy.tokens_per_s / self.oracle.tokens_per_s

    @property
    def vs_off(self) -> float:
        return self.policy.tokens_per_s / self.off.tokens_per_s

    def row(self) -> dict:
        p = self.policy
        return {
            "trace": self.scenario,
            "policy_tok_s": round(p.tokens_per_s, 3),
            "oracle": self.oracle.chooser,
            "oracle_tok_s": round(self.oracle.tokens_per_s, 3),
            "off_tok_s": round(self.off.tokens_per_s, 3),
            "vs_oracle": round(self.vs_oracle, 4),
            "vs_off": round(self.vs_off, 4),
            "rounds": p.rounds,
            "drafted": p.drafted,
            "k_histogram": p.k_histogram,
            "fixed_tok_s": [round(r.tokens_per_s, 3) for r in self.fixed],
        }


def combined(results: Sequence[SimResult]) -> SimResult:
    """Runs of one chooser over several seeds of a trace, as one longer run."""
    out = replace(results[0], k_histogram=list(results[0].k_histogram))
    for r in results[1:]:
        out.tokens += r.tokens
        out.seconds += r.seconds
        out.rounds += r.rounds
        out.drafted += r.drafted
        out.accepted += r.accepted
        out.ngram_sent += r.ngram_sent
        out.passes += r.passes
        out.k_histogram = [a + b for a, b in zip(out.k_histogram, r.k_histogram)]
    return out


def evaluate(
    scenario: Scenario, settings: dict | None = None, policy_factory=AdaptivePolicy, seeds: int = 1
) -> Evaluation:
    """The policy and every fixed K on the scenario; with ``seeds`` > 1, on that many draws of it
    (seed, seed + 1000, ...) taken together as one longer trace, whose best fixed K is the oracle."""
    draws = [replace(scenario, seed=scenario.seed + 1000 * i) for i in range(seeds)]
    fixed = [combined([simulate(d, k) for d in draws]) for k in range(scenario.max_k + 1)]
    policy = combined([simulate(d, "adaptive", settings, policy_factory) for d in draws])
    return Evaluation(scenario.name, policy, fixed)


# ---------------------------------------------------------------------------- traces from the issues

MS = 1e-3
QWEN15_ZEN5_B1 = AcceptanceProfile.from_cumulative([0.97, 0.92, 0.92, 0.91, 0.83, 0.82])
SMOLLM2_RATES = (0.83, 0.88, 0.93, 0.95, 0.88, 0.84)  # conditional, SmolLM2 bf16 HumanEval batch 1 (Zen 4, random k)


def issue_scenarios(scale: float = 1.0, seed_offset: int = 0) -> list[Scenario]:
    """Scenarios built from the measured numbers of issues 28 and 30 (AMD EPYC Zen 5), and variations
    of them the policy must survive. ``scale`` < 1 shortens them (fewer requests) for the test;
    ``seed_offset`` draws other tokens and noise (names get ``@offset``)."""

    def n(x: int) -> int:
        return max(2, int(round(x * scale)))

    qwen_b1 = CostModel(93.6 * MS, 10.33 * MS, 26.4 * MS, 17.4 * MS, noise=0.05)
    bursty = replace(
        QWEN15_ZEN5_B1,
        spread=0.6,
        phases=(Phase(0.3, 0.45, 0.3, share=0.5), Phase(0.7, 0.8, 0.0, share=0.25)),
    )
    # fp32 batch 8: a drafted row costs about what a verified token does, and the target is compute-bound.
    fp32_b8 = CostModel(60 * MS, 12 * MS, 20 * MS, 12 * MS, target_row=2 * MS, noise=0.05)
    b8_profile = AcceptanceProfile((0.6, 0.55, 0.35, 0.3, 0.5, 0.6), spread=0.5)
    # SmolLM2 served at 64: a convex target (its line fit goes negative) and drafting that never pays.
    smol_c64 = CostModel(8 * MS, 1.2 * MS, 5 * MS, 1.5 * MS, target_row=0.4 * MS, target_quad=0.004 * MS, noise=0.08)
    scenarios = [
        synthetic(
            "qwen15-zen5-b1",
            qwen_b1,
            QWEN15_ZEN5_B1,
            requests=n(32),
            tokens=64,
            batch=1,
            note="issue 28: batch 1, target=93.6ms+10.33ms/tok, draft=26.4ms+17.40ms/row, fixed-K acceptance",
        ),
        synthetic(
            "qwen15-zen5-b1-bursty",
            qwen_b1,
            bursty,
            requests=n(32),
            tokens=64,
            batch=1,
            seed=1,
            note="the same costs; requests vary, half collapse to 0.3x for 15% of their output, a quarter to 0",
        ),
        synthetic(
            "qwen15-zen5-b1-round-overhead",
            replace(qwen_b1, draft_c=20 * MS, draft_d=6 * MS, draft_round=60 * MS, target_spec=15 * MS),
            QWEN15_ZEN5_B1,
            requests=n(32),
            tokens=64,
            batch=1,
            seed=2,
            note="a round that drafts pays 60 ms once and its step 15 ms: deep k amortises them",
        ),
        synthetic(
            "qwen15-fp32-b8",
            fp32_b8,
            b8_profile,
            requests=n(8),
            tokens=96,
            batch=8,
            seed=3,
            length_spread=0.3,
            note="issue 28: fp32 batch 8, drafting never pays (policy lost 11%)",
        ),
        synthetic(
            "smollm2-c64",
            smol_c64,
            AcceptanceProfile(SMOLLM2_RATES, spread=0.5),
            requests=n(128),
            tokens=64,
            batch=64,
            seed=4,
            note="issue 30: 64 rows, convex target cost, drafting never pays (warm-up drafted K for all 64)",
        ),
        synthetic(
            "smollm2-b8-cheap-draft",
            CostModel(30 * MS, 0.3 * MS, 6 * MS, 0.5 * MS, target_row=0.5 * MS, noise=0.05),
            AcceptanceProfile(SMOLLM2_RATES, spread=0.5, phases=(Phase(0.5, 0.7, 0.2, share=0.5),)),
            requests=n(64),
            tokens=64,
            batch=8,
            seed=5,
            length_spread=0.3,
            note="memory-bound batch 8 where drafting pays: the policy must still draft",
        ),
        synthetic(
            "whole-batch-passes-b16",
            CostModel(40 * MS, 0.5 * MS, 8 * MS, 0.6 * MS, drafting_rows_only=False, min_passes=1, noise=0.05),
            AcceptanceProfile(SMOLLM2_RATES, spread=0.8),
            requests=n(96),
            tokens=64,
            batch=16,
            seed=6,
            length_spread=0.3,
            note="separate KV: every pass covers the batch and the first always runs",
        ),
        synthetic(
            "qwen15-fp32-b8-ngram",
            fp32_b8,
            replace(b8_profile, ngram_share=0.3, ngram_len=3, ngram_rates=(0.5, 0.5, 0.5)),
            requests=n(8),
            tokens=96,
            batch=8,
            seed=7,
            note="issue 28's batch of 8 had an n-gram level: n-gram proposals do not pay either",
        ),
        synthetic(
            "smollm2-b8-ngram",
            CostModel(30 * MS, 0.3 * MS, 6 * MS, 0.5 * MS, target_row=0.5 * MS, noise=0.05),
            AcceptanceProfile(SMOLLM2_RATES, spread=0.5, ngram_share=0.4, ngram_len=3, ngram_rates=(0.8, 0.7, 0.7)),
            requests=n(64),
            tokens=64,
            batch=8,
            seed=8,
            length_spread=0.3,
            note="n-gram proposals that pay beside MXFP4 drafts that pay",
        ),
    ]
    if not seed_offset:
        return scenarios
    return [replace(s, name=f"{s.name}@{seed_offset}", seed=s.seed + 1000 * seed_offset) for s in scenarios]


# ---------------------------------------------------------------------------------- recorded traces


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares (small problems)."""
    from scipy.optimize import nnls as _nnls

    return _nnls(x, y)[0]


def read_trace(path: str | Path) -> tuple[dict, list[dict]]:
    header, rounds = {}, []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if "settings" in entry:
            header = entry
        elif "req" in entry:
            rounds.append(entry)
    return header, rounds


def recorded(path: str | Path, name: str | None = None, seed: int = 0) -> Scenario:
    """A scenario replaying a ``VLLM_SPECQD_TRACE_POLICY`` trace: its requests, batch, fitted costs and outcomes."""
    header, rounds = read_trace(path)
    settings = header.get("settings", {})
    max_k = int(settings.get("max_k") or max(max(e["cap"], default=0) for e in rounds))
    rows_only = bool(settings.get("passes_run_drafting_rows_only", True))
    min_passes = int(settings.get("min_passes", 0))
    first, last, cap_left = {}, {}, {}
    observed: dict[int, list[tuple[int, int, int]]] = {}
    for r, entry in enumerate(rounds):
        for req, pos, cap in zip(entry["req"], entry["pos"], entry["cap"]):
            first.setdefault(req, pos)
            last[req] = pos
            cap_left[req] = cap
        if r + 1 < len(rounds):
            outcomes = {o[0]: o for o in rounds[r + 1]["outcomes"]}
            sent = entry.get("sent") or [0] * len(entry["k"])
            for req, pos, k, s in zip(entry["req"], entry["pos"], entry["k"], sent):
                o = outcomes.get(req)
                if k and not s and o is not None and not o[3]:
                    observed.setdefault(req, []).append((pos, o[1], o[2]))
    order = sorted(first, key=lambda q: first[q])
    # The last round's cap bounds what the request had left (max_tokens); one that ended by EOS
    # earlier is replayed up to that bound.
    lengths = [last[q] - first[q] + 2 + cap_left[q] for q in order]
    # The trace's conditional rates per position: accepted / verified.
    acc, ver = np.zeros(max_k), np.zeros(max_k)
    for obs in observed.values():
        for _, v, a in obs:
            seen = min(v, a + 1)
            ver[:seen] += 1
            acc[: min(a, seen)] += 1
    rates = np.where(ver > 0, (acc + 0.5) / (ver + 1.0), 0.5)
    cost = fit_costs(rounds, rows_only, min_passes)

    def make(seed: int) -> list[RequestAcceptance]:
        rng = np.random.default_rng(seed)
        out = []
        for q, length in zip(order, lengths):
            size = length + max_k + 1
            hit, miss = np.zeros(size, dtype=np.int64), np.full(size, max_k + 1, dtype=np.int64)
            for pos, v, a in observed.get(q, []):
                s = pos - first[q] + 1
                for j in range(1, min(a, size - 1 - s) + 1):
                    hit[s + j] = max(hit[s + j], j)
                if a < v and s + a + 1 < size:
                    miss[s + a + 1] = min(miss[s + a + 1], a + 1)
            out.append(RecordedAcceptance(np.broadcast_to(rates, (size, max_k)), rng.random(size), hit, miss))
        return out

    name = name or Path(path).stem
    batch = max(len(e["req"]) for e in rounds)
    return Scenario(name, cost, lengths, batch, max_k, make, seed, note=f"recorded: {Path(path).name}")


def fit_costs(rounds: list[dict], rows_only: bool, min_passes: int) -> CostModel:
    """Non-negative fits of a recorded trace's target steps and drafting rounds, noise from their residuals."""
    tx, ty, dx, dy = [], [], [], []
    previous = None
    for entry in rounds:
        target = entry.get("target")
        if target and target[2] and previous is not None:
            tokens, seconds = target[0], target[1]
            rows = len(entry["req"])
            tx.append([1.0, tokens, rows, float(tokens > rows)])
            ty.append(seconds)
        passes = entry.get("passes", 0)
        if passes:
            sent = entry.get("sent") or [0] * len(entry["k"])
            drafted = sum(k for k, s in zip(entry["k"], sent) if not s)
            rows = len(entry["k"])
            dx.append([1.0, passes, drafted if rows_only else passes * rows])
            dy.append(entry["draft_s"])
        previous = entry
    tx, ty, dx, dy = (np.asarray(v, dtype=np.float64) for v in (tx, ty, dx, dy))
    t_coef = _robust_nnls(tx, ty) if len(ty) >= 4 else np.array([float(np.median(ty)) if len(ty) else 0.01, 0, 0, 0])
    d_coef = _robust_nnls(dx, dy) if len(dy) >= 3 else np.array([0.0, 0.01, 0.0])
    spread = []
    for x, y, c in ((tx, ty, t_coef), (dx, dy, d_coef)):
        if len(y):
            ratio = np.log(np.maximum(y, 1e-6) / np.maximum(x @ c, 1e-6))
            spread.append(1.4826 * float(np.median(np.abs(ratio - np.median(ratio)))))
    return CostModel(
        target_a=float(t_coef[0]),
        target_b=float(t_coef[1]),
        target_row=float(t_coef[2]),
        target_spec=float(t_coef[3]),
        draft_round=float(d_coef[0]),
        draft_c=float(d_coef[1]),
        draft_d=float(d_coef[2]),
        drafting_rows_only=rows_only,
        min_passes=min_passes,
        noise=min(0.3, max(spread, default=0.0)),
    )


def _robust_nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """NNLS, refitted without the points whose residual is beyond 3 robust sigmas (a busy machine's stalls)."""
    coef = nnls(x, y)
    residual = y - x @ coef
    mad = 1.4826 * float(np.median(np.abs(residual - np.median(residual)))) or 1e-9
    keep = np.abs(residual) <= 3 * mad
    return nnls(x[keep], y[keep]) if keep.sum() >= x.shape[1] + 1 else coef


TRACES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "traces"
REPLAYED_KEYS = ("round", "req", "pos", "cap", "k", "ngram", "sent", "outcomes", "target", "passes", "draft_s")


def compact_trace(source: str | Path, destination: str | Path, note: str = "") -> None:
    """Keep what the replay reads (the settings line, and per round :data:`REPLAYED_KEYS`), times in
    microseconds: a recorded trace small enough to commit."""
    header, rounds = read_trace(source)
    if not header:  # a trace from before the settings line: the default engine's
        max_k = max(max(e["cap"], default=0) for e in rounds)
        header = {"settings": {"max_k": max_k, "min_passes": 0, "passes_run_drafting_rows_only": True}}
    lines = [json.dumps({**header, "note": note} if note else header)]
    for entry in rounds:
        kept = {key: entry[key] for key in REPLAYED_KEYS if key in entry}
        if kept.get("target"):
            kept["target"][1] = round(kept["target"][1], 6)
        kept["draft_s"] = round(kept.get("draft_s", 0.0), 6)
        lines.append(json.dumps(kept, separators=(",", ":")))
    Path(destination).write_text("\n".join(lines) + "\n")


def recorded_scenarios(directory: Path = TRACES_DIR) -> list[Scenario]:
    return [recorded(p) for p in sorted(directory.glob("*.jsonl"))] if directory.is_dir() else []


def format_table(evaluations: Sequence[Evaluation]) -> str:
    lines = [
        "| trace | policy tok/s | best fixed K | its tok/s | off tok/s | policy/oracle | policy/off | rounds | "
        "k histogram | fixed K=0..K tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in evaluations:
        r = e.row()
        lines.append(
            f"| {r['trace']} | {r['policy_tok_s']:.2f} | {r['oracle']} | {r['oracle_tok_s']:.2f} | "
            f"{r['off_tok_s']:.2f} | {r['vs_oracle']:.3f} | {r['vs_off']:.3f} | {r['rounds']} | "
            f"{' '.join(map(str, r['k_histogram']))} | {' '.join(f'{x:.1f}' for x in r['fixed_tok_s'])} |"
        )
    return "\n".join(lines)
