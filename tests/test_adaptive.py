"""The adaptive-speculation policy (vllm_specqd/adaptive.py) with synthetic costs: no engine."""

import itertools
import statistics
import zlib

import numpy as np
import pytest

from vllm_specqd.adaptive import (
    AdaptivePolicy,
    AdaptiveSettings,
    Decision,
    LinearFit,
    LineFit,
    Outcome,
    RequestSlot,
)

K = 6
PASSES = (1, 3)  # policy_with's synthetic drafting rounds: every row drafting 1, then 3


def policy_with(
    *,
    target_a: float,
    target_b: float,
    draft_c: float,
    draft_d: float = 0.0,
    acceptance: dict | None = None,
    rows=(1, 4, 16),
    acceptance_override: float | None = None,
    **settings,
) -> AdaptivePolicy:
    """A policy whose cost model has seen exact synthetic timings over a spread of batch sizes,
    and whose requests' acceptance is pinned."""
    policy = AdaptivePolicy(AdaptiveSettings(max_k=settings.pop("max_k", K), warmup_steps=0, **settings))
    for _ in range(50):
        for tokens in (1, 7, 20, 64, 100):
            policy.observe_target(tokens, target_a + target_b * tokens)
        for r in rows:
            for m in PASSES:
                observe_round(policy, [m] * r, m * (draft_c + draft_d * r))
    for req_id, rate in (acceptance or {}).items():
        pin_acceptance(policy, req_id, rate)
    if acceptance_override is not None:
        for req_id in acceptance or {}:
            policy.acceptance.pin(req_id, acceptance_override)
    return policy


def observe_round(policy: AdaptivePolicy, k: list[int], seconds: float) -> None:
    """A drafting round that gave each request its k and took ``seconds``."""
    decision = Decision(k, max(k), 0, 0.0, 0.0, 0.0, 0.0)
    policy.observe_draft(decision, seconds)


def pin_acceptance(policy: AdaptivePolicy, req_id, rate: float) -> None:
    policy.acceptance.pin(req_id, rate)


def observe_acceptance(policy: AdaptivePolicy, req_id, rate: float, rounds: int = 200, ngram=False) -> None:
    """Outcomes whose accepted prefix follows a per-position acceptance of ``rate``."""
    rng = np.random.default_rng(zlib.crc32(f"{ngram}-{req_id}".encode()))
    for _ in range(rounds):
        accepted = 0
        while accepted < K and rng.random() < rate:
            accepted += 1
        policy.observe([Outcome(req_id, K, accepted, ngram)])


def slots(*req_ids, cap=K):
    return [RequestSlot(r, cap) for r in req_ids]


def test_line_fit_recovers_a_line_and_leans_on_its_prior_without_spread():
    fit = LineFit(decay=0.05)
    rng = np.random.default_rng(0)
    for _ in range(500):
        x = float(rng.integers(1, 200))
        fit.observe(x, 0.010 + 0.0002 * x + rng.normal(0, 1e-4))
    a, b = fit.coefficients()
    assert a == pytest.approx(0.010, rel=0.05) and b == pytest.approx(0.0002, rel=0.05)

    flat = LineFit(decay=0.05)
    for _ in range(100):
        flat.observe(7.0, 0.014)
    a, b = flat.coefficients()
    # One x only: the slope is the prior (half the mean cost per unit), and the fit still hits the point.
    assert b == pytest.approx(0.5 * 0.014 / 7.0)
    assert float(flat.predict(7.0)) == pytest.approx(0.014)


@pytest.mark.parametrize("intercept_weight", [0.0, 1.0])
def test_line_fits_stay_physical_where_least_squares_goes_negative(intercept_weight):
    """A convex cost seen at two clusters of x (plain steps of 64 tokens, drafting steps of 448)
    extrapolates to a negative intercept (issue 30: target=-22.3ms+2.26ms/tok); falling data to a
    negative slope. Both are pinned at 0 and the rest refitted."""
    convex = LinearFit(decay=0.02, intercept_weight=intercept_weight)
    for _ in range(100):
        for x in (64.0, 448.0):
            convex.observe(x, 1e-6 * x * x + 0.0005 * x)
    free = np.polyfit([64.0, 448.0], [1e-6 * x * x + 0.0005 * x for x in (64.0, 448.0)], 1)
    assert free[1] < 0  # what plain least squares says
    a, b = convex.all_coefficients().tolist()
    assert a == 0.0 and b > 0
    # Through the origin: the best line with a = 0 (least squares over the two points).
    xs = np.array([64.0, 448.0])
    ys = 1e-6 * xs * xs + 0.0005 * xs
    assert b == pytest.approx(float((xs * ys).sum() / (xs * xs).sum()), rel=0.02)

    falling = LinearFit(decay=0.02, intercept_weight=intercept_weight)
    for _ in range(100):
        for x in (1.0, 7.0):
            falling.observe(x, 0.03 - 0.001 * x)
    a, b = falling.all_coefficients().tolist()
    assert b == 0.0 and a == pytest.approx(0.026, rel=0.03)  # (intercept_weight: pulled 2% toward 0)

    line = LineFit(decay=0.02)  # the target's line, as the policy and the log line read it
    for _ in range(100):
        for x in (64.0, 448.0):
            line.observe(x, 1e-6 * x * x + 0.0005 * x)
    assert min(line.coefficients()) >= 0.0


def test_draft_round_line_separates_a_per_round_cost_from_its_passes():
    """A drafting round of m passes over n drafted tokens costs round + c * m + d * n. With one round
    length seen, the round term stays near its prior 0 (the passes explain the cost); rounds of
    different lengths measure it."""
    one_length = LinearFit(decay=0.02, features=2, prior_slopes=[None, 0.001], intercept_weight=1.0)
    for _ in range(50):
        one_length.observe((6, 6), 0.060 + 6 * 0.020 + 6 * 0.001)
    r, c, d = one_length.all_coefficients().tolist()
    assert r < 0.15 * 0.186 and 6 * c + 6 * d + r == pytest.approx(0.186, rel=0.01)
    varied = LinearFit(decay=0.02, features=2, prior_slopes=[None, 0.001], intercept_weight=1.0)
    for _ in range(50):
        for m in range(1, 7):
            varied.observe((m, m), 0.060 + m * 0.020 + m * 0.001)
    r, c, d = varied.all_coefficients().tolist()
    assert r == pytest.approx(0.060, rel=0.1) and c + d == pytest.approx(0.021, rel=0.1)


def test_acceptance_observations_are_conditional_per_position():
    policy = AdaptivePolicy(AdaptiveSettings(max_k=4, prior_acceptance=0.5, acceptance_optimism=0.0))
    policy.observe([Outcome("a", verified=4, accepted=2)])
    # Batch-wide: positions 1, 2 accepted (0.5 -> 0.75), 3 rejected (0.5 -> 0.25), 4 never checked.
    assert policy.acceptance.batch_wide.tolist() == [0.75, 0.75, 0.25, 0.5]
    assert policy.acceptance.batch_wide_seen.tolist() == [1, 1, 1, 0]


def test_a_request_is_the_batch_wide_shape_shifted_by_one_offset():
    """One rejection at a deep position moves a request's rates at every position by one logit
    offset, so that position does not fall out of its drafts alone (issue 28: under-drafting)."""
    policy = AdaptivePolicy(AdaptiveSettings(max_k=K, acceptance_optimism=0.0))
    for i in range(50):  # the batch: strong at every position
        policy.observe([Outcome(f"b{i}", K, K)])
    for _ in range(20):
        policy.observe([Outcome("a", K, K)])
    before = policy.acceptance.of("a")
    policy.observe([Outcome("a", K, 4)])  # position 5 rejected
    after = policy.acceptance.of("a")

    def logit(p):
        return np.log(p / (1 - p))

    offset = logit(after) - logit(np.clip(policy.acceptance.batch_wide, 1e-3, 1 - 1e-3))
    assert np.allclose(offset, offset[0])  # one offset from the batch-wide shape
    assert (after < before).all() and after[4] > 0.8  # every position a little lower, none out
    # A collapse (every first draft rejected) is followed within a few rounds.
    for _ in range(6):
        policy.observe([Outcome("a", K, 0)])
    assert policy.acceptance.of("a")[0] < 0.5


def test_batch_wide_acceptance_counts_the_first_rounds_at_once():
    """Deep positions are verified only while they are drafted: an EMA at 0.02 would leave them near
    the prior (0.6 -> 0.62 after three accepts) and undrafted for good."""
    policy = AdaptivePolicy(
        AdaptiveSettings(max_k=4, prior_acceptance=0.6, global_acceptance_decay=0.02, acceptance_optimism=0.0)
    )
    for req_id in "abc":
        policy.observe([Outcome(req_id, verified=4, accepted=4)])
    assert policy.acceptance.batch_wide.tolist() == pytest.approx([0.9] * 4)  # (0.6 + 3) / 4
    assert policy.acceptance.of("new").tolist() == pytest.approx([0.9] * 4)
    for i in range(200):  # later, an EMA: old observations fade at the configured rate
        policy.observe([Outcome(f"r{i}", verified=1, accepted=0)])
    assert policy.acceptance.batch_wide[0] < 0.02 and policy.acceptance.batch_wide[1] == pytest.approx(0.9)


def test_cheap_drafts_and_high_acceptance_draft_everything():
    # Memory-bound target (extra tokens almost free), draft pass 5% of a step, acceptance 0.95.
    policy = policy_with(target_a=0.020, target_b=0.00002, draft_c=0.001, acceptance={r: 0.95 for r in "abcd"})
    decision = policy.decide(slots(*"abcd"))
    assert decision.k == [K] * 4 and decision.passes == K
    assert decision.expected_tokens / decision.expected_seconds > 2 * 4 / decision.plain_seconds


def test_verification_costlier_than_acceptance_gains_degenerates_to_plain_decoding():
    # Compute-bound target: every verified token costs as much as a step's fixed part; acceptance 0.5.
    policy = policy_with(target_a=0.001, target_b=0.001, draft_c=0.0005, acceptance={r: 0.5 for r in "abcd"})
    decision = policy.decide(slots(*"abcd"))
    assert decision.k == [0, 0, 0, 0] and decision.passes == 0
    assert policy.stats.steps_off == 1 and policy.stats.requests_off == 4


def test_draft_passes_dearer_than_the_target_step_degenerate_to_plain_decoding():
    policy = policy_with(target_a=0.010, target_b=0.0, draft_c=0.012, acceptance={"a": 0.9})
    assert policy.decide(slots("a")).k == [0]


def test_requests_with_low_acceptance_stop_drafting_while_the_others_draft():
    # Verified tokens cost 10% of a step each: a request accepting 5% of drafts is not worth one.
    acceptance = {"code": 0.9, "chat": 0.85, "hot": 0.05}
    policy = policy_with(target_a=0.010, target_b=0.001, draft_c=0.0005, acceptance=acceptance)
    decision = policy.decide(slots("code", "chat", "hot"))
    assert decision.k[2] == 0, decision
    assert decision.k[0] > 0 and decision.k[1] > 0, decision
    assert decision.k[0] >= decision.k[1]


def test_caps_bound_each_request_and_a_zero_cap_never_drafts():
    policy = policy_with(target_a=0.020, target_b=0.0, draft_c=0.0001, acceptance={r: 0.99 for r in "abc"})
    decision = policy.decide([RequestSlot("a", 2), RequestSlot("b", 0), RequestSlot("c", K)])
    assert decision.k == [2, 0, K]
    assert policy.stats.requests == 2  # a zero cap (e.g. a prefill chunk) is no decision


def test_min_gain_keeps_speculation_off_unless_it_wins_by_that_much():
    # Acceptance 0.3, a verified token 10% of a step, a draft pass 5%: one token is best,
    # (1 + 0.3) / (0.010 + 0.001 * 2 + 0.0005) vs 1 / (0.010 + 0.001): 24% more tokens per second.
    def decide(**settings):
        policy = policy_with(target_a=0.010, target_b=0.001, draft_c=0.0005, **settings)
        policy.acceptance.pin("a", 0.3)
        return policy.decide(slots("a"))

    eager = decide()
    assert eager.k == [1]
    gain = eager.expected_tokens / eager.expected_seconds * eager.plain_seconds - 1
    assert gain == pytest.approx(1.3 / 0.0125 * 0.011 - 1, rel=0.05)  # the fits lean 1% on their prior
    assert decide(min_gain=gain + 0.02).k == [0]
    assert decide(min_gain=gain - 0.02).k == [1]


def brute_force_rate(policy: AdaptivePolicy, req_ids, caps) -> float:
    rows = len(req_ids)
    p = [np.cumprod(policy.acceptance.of(r)) for r in req_ids]
    best = 0.0
    for ks in itertools.product(*[range(c + 1) for c in caps]):
        tokens = rows + sum(float(p[i][:k].sum()) for i, k in enumerate(ks))
        seconds = float(policy.cost.seconds(rows, sum(ks), max(ks)))
        best = max(best, tokens / seconds)
    return best


@pytest.mark.parametrize("drafting_rows_only", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_decision_matches_the_brute_force_optimum(seed, drafting_rows_only):
    rng = np.random.default_rng(seed)
    req_ids = [f"r{i}" for i in range(3)]
    policy = policy_with(
        max_k=4,
        passes_run_drafting_rows_only=drafting_rows_only,
        target_a=float(rng.uniform(0.005, 0.02)),
        target_b=float(rng.uniform(0, 0.004)),
        draft_c=float(rng.uniform(0.0005, 0.006)),
        draft_d=float(rng.uniform(0, 0.0005)),
    )
    for r in req_ids:
        policy.acceptance.pin(r, rng.uniform(0.05, 1.0, size=4))
    caps = [int(c) for c in rng.integers(0, 5, size=3)]
    decision = policy.decide([RequestSlot(r, c) for r, c in zip(req_ids, caps)])
    got = decision.expected_tokens / decision.expected_seconds
    assert got == pytest.approx(brute_force_rate(policy, req_ids, caps), rel=1e-9)
    if decision.passes:
        assert decision.passes == max(decision.k)


def test_collapsed_request_stops_drafting_is_reprobed_and_recovers():
    settings = dict(target_a=0.010, target_b=0.001, draft_c=0.0005, reprobe_after=4, max_reprobe_after=16)
    policy = policy_with(**settings)
    observe_acceptance(policy, "hot", 0.9)
    assert policy.decide(slots("hot")).k[0] > 0
    for _ in range(20):  # acceptance collapses: the target rejects the first draft every step
        policy.observe([Outcome("hot", K, 0)])
    ks = [policy.decide(slots("hot")).k[0] for _ in range(40)]
    # Off, then a one-token probe after 4, 8, 16, 16 off-steps (the wait doubles up to its cap).
    probes = [i for i, k in enumerate(ks) if k]
    assert all(ks[i] == 1 for i in probes)
    assert probes == [3, 3 + 8, 3 + 8 + 16, 3 + 8 + 16 + 16][: len(probes)] and len(probes) == 3
    assert policy.stats.probes == 3
    for _ in range(10):  # the request recovers: probes come back accepted
        policy.observe([Outcome("hot", 1, 1)])
        policy.observe([Outcome("hot", K, K)])
    assert policy.decide(slots("hot")).k[0] > 1


def _probe_rounds(batch_share: float, monkeypatch) -> list:
    from vllm_specqd import adaptive

    monkeypatch.setattr(adaptive, "PROBE_BATCH_SHARE", batch_share)
    settings = dict(target_a=0.010, target_b=0.001, draft_c=0.0005, reprobe_after=8, max_reprobe_after=64)
    req_ids = [f"r{i}" for i in range(16)]
    policy = policy_with(**settings, acceptance={r: 0.0 for r in req_ids})
    for i, r in enumerate(req_ids):  # staggered: the requests joined on different steps
        policy.probes._off_steps[r] = i % 8
    rounds = [policy.decide(slots(*req_ids)) for _ in range(64)]
    assert all(max(d.k) <= 1 for d in rounds)
    assert sum(d.probes for d in rounds) >= 16  # every request got probed
    return [d for d in rounds if d.probes]


def test_probes_of_a_big_batch_share_rounds_instead_of_one_pass_each(monkeypatch):
    """16 collapsed requests whose probes fall due on different steps: a probe alone costs a draft
    pass over the whole batch, so due probes wait for a quarter of the batch."""
    batched = _probe_rounds(0.25, monkeypatch)
    one_by_one = _probe_rounds(0.0, monkeypatch)  # the unbatched rule: probe as soon as due
    assert all(d.probes >= 4 for d in batched)
    assert len(batched) * 2 <= len(one_by_one), (len(batched), len(one_by_one))
    print(f"probe rounds in 64 steps: batched {len(batched)}, one by one {len(one_by_one)}")


def test_no_full_batch_drafts_before_the_cost_model_says_it_pays():
    """Issue 30: the first rounds drafted K for all 64 requests before any measurement. Now one row
    drafts its cap until both cost lines have a measurement, and a round drafts at most twice what a
    measured round drafted (the trust region), however good drafting looks."""
    policy = AdaptivePolicy(AdaptiveSettings(max_k=K, passes_run_drafting_rows_only=True))
    batch = slots(*range(64))
    first = policy.decide(batch)
    assert sorted(first.k) == [0] * 63 + [K] and first.passes == K
    assert policy.decide(batch).k == first.k  # no timing yet: still the probe
    policy.observe_draft(first, 0.002)
    policy.observe_target(64 + K, 0.100)
    for r in range(64):
        policy.acceptance.pin(r, 0.99)
    drafted = []
    for _ in range(6):
        decision = policy.decide(batch)
        drafted.append(sum(decision.k))
        policy.observe_draft(decision, 0.001 * decision.passes + 0.0001 * sum(decision.k))  # cheap: it pays
        policy.observe_target(64 + sum(decision.k), 0.100)
    assert drafted[0] <= 2 * K and all(b <= 2 * max(a, K) for a, b in zip(drafted, drafted[1:])), drafted
    assert drafted[-1] > drafted[0] and policy.stats.k_histogram[K] > 1  # and it grows where it pays


def test_legacy_warm_up_drafts_the_maximum_until_costs_are_measured():
    policy = AdaptivePolicy(AdaptiveSettings(max_k=K, warmup_steps=2))
    assert policy.decide(slots("a", "b")).k == [K, K]  # no timing yet
    policy.observe_target(14, 0.02)
    observe_round(policy, [K, K], 0.01)
    assert policy.decide(slots("a", "b")).k == [K, K]  # still warming up
    assert policy.stats.k_histogram[K] == 4


def test_a_batch_that_went_off_is_probed_again_at_doubling_intervals():
    """The first outcomes (or costs) can turn the model against drafting; a batch that never drafts
    would never measure otherwise. After 8 idle rounds one healthy row drafts 2, then after 16, 32."""
    # k = 1 for both at 0.55 would take 20 ms for 3.1 tokens, a plain step 11 ms for 2: off. At full
    # acceptance K drafts would pay (14 tokens in 65 ms): worth a probe.
    policy = policy_with(target_a=0.010, target_b=0.0005, draft_c=0.008, reprobe_after=8, max_reprobe_after=32)
    policy.acceptance.batch_wide[:] = 0.55  # what a few unlucky first outcomes said
    policy.acceptance.batch_wide_seen[:] = 1000  # (and trusted: no optimism)
    ks = [policy.decide(slots("a", "b")).k for _ in range(90)]
    probed = [i for i, k in enumerate(ks) if any(k)]
    assert probed == [7, 7 + 16, 7 + 16 + 32, 7 + 16 + 32 + 32], probed
    assert all(sorted(ks[i]) == [0, 2] for i in probed) and policy.stats.probes == 4
    # Where even full acceptance could not pay (a compute-bound batch), nobody is probed.
    bound = policy_with(target_a=0.001, target_b=0.010, draft_c=0.005, draft_d=0.010, reprobe_after=2)
    bound.acceptance.batch_wide[:] = 0.9
    assert not any(any(bound.decide(slots(*range(16))).k) for _ in range(40)) and bound.stats.probes == 0


def test_random_policy_flips_k_within_caps():
    policy = AdaptivePolicy(AdaptiveSettings(max_k=K, policy="random", seed=1, reprobe_after=10**6))
    seen = set()
    for _ in range(50):
        decision = policy.decide([RequestSlot("a", K), RequestSlot("b", 2), RequestSlot("c", 0)])
        assert 0 <= decision.k[0] <= K and 0 <= decision.k[1] <= 2 and decision.k[2] == 0
        assert decision.passes == max(decision.k)
        seen.update((i, k) for i, k in enumerate(decision.k))
    assert {(0, 0), (0, K), (1, 0), (1, 2)} <= seen


def test_min_passes_are_run_and_priced_even_with_speculation_off():
    common = dict(target_a=0.010, target_b=0.001, draft_c=0.002, acceptance={"a": 0.9})
    decision = policy_with(**common, min_passes=1).decide(slots("a"))
    assert decision.passes == max(decision.k) >= 1
    # A catch-up pass that runs anyway makes the first draft token cheaper to add: it is the same pass.
    off = policy_with(**common, acceptance_override=0.12)
    on = policy_with(**common, acceptance_override=0.12, min_passes=1)
    assert off.decide(slots("a")).k == [0] and on.decide(slots("a")).k == [1]
    plain = on.decide(slots("b"))  # a new request: no acceptance yet, the prior 0.6
    assert plain.plain_seconds == pytest.approx(0.011 + 0.002, rel=0.05)


def test_decision_time_is_counted_beside_the_step_time():
    """Each decision times itself into the counters the decision's share of step time is built from
    (the share the level report and the benchmark print). How long a decision takes is measured by
    benchmarks/bench_adaptive_decision.py: a wall-clock budget is no test on a shared machine."""
    costs = dict(target_a=0.05, target_b=0.0002, draft_c=0.01, draft_d=0.0001)
    policy = policy_with(**costs, max_k=8)
    # policy_with's synthetic steps: 50 x (targets at 1, 7, 20, 64, 100 tokens + rounds of 1, 4, 16 rows).
    target = sum(costs["target_a"] + costs["target_b"] * t for t in (1, 7, 20, 64, 100))
    draft = sum(m * (costs["draft_c"] + costs["draft_d"] * r) for r in (1, 4, 16) for m in PASSES)
    assert policy.stats.step_seconds == pytest.approx(50 * (target + draft))
    batch = [RequestSlot(f"r{i}", 8) for i in range(64)]
    for r in batch:
        pin_acceptance(policy, r.req_id, 0.7)
    decisions = [policy.decide(batch) for _ in range(31)]
    assert policy.stats.steps == 31 and policy.stats.requests == sum(policy.stats.k_histogram) == 31 * 64
    assert all(d.decision_seconds > 0 for d in decisions)
    assert policy.stats.decision_seconds == pytest.approx(sum(d.decision_seconds for d in decisions))
    assert policy.stats.step_seconds == pytest.approx(50 * (target + draft))  # deciding is no step


def test_passes_over_drafting_rows_only_let_a_few_requests_draft_in_a_big_batch():
    """A plain step costs 2.4 ms per request; 15 requests accept nothing, one accepts 0.9. A pass
    over the whole batch costs 3.4 ms, more than the one request gains; over its own row 0.4 ms."""
    acceptance = {f"r{i}": 0.0 for i in range(15)} | {"hot": 0.9}
    common = dict(target_a=0.030, target_b=0.0005, draft_c=0.0002, draft_d=0.0002, acceptance=acceptance)
    batch = slots(*acceptance)
    assert policy_with(**common, reprobe_after=10**6).decide(batch).k == [0] * 16
    decision = policy_with(**common, reprobe_after=10**6, passes_run_drafting_rows_only=True).decide(batch)
    assert decision.k[:15] == [0] * 15 and decision.k[15] >= 3, decision.k


def test_drafting_rows_cost_is_learned_per_drafted_token():
    """Rounds over the drafting rows only: m passes drafting n tokens cost m * c + d * n."""
    policy = AdaptivePolicy(AdaptiveSettings(max_k=K, warmup_steps=0, passes_run_drafting_rows_only=True))
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = [int(x) for x in rng.integers(0, rng.integers(1, K + 1) + 1, size=8)]  # rounds of 1..K passes
        if max(k):
            observe_round(policy, k, max(k) * 0.002 + 0.0004 * sum(k))
    r, c, d = policy.cost.draft_coefficients()
    assert r < 0.1 * 0.002 and c == pytest.approx(0.002, rel=0.05) and d == pytest.approx(0.0004, rel=0.05)
    assert float(policy.cost.draft_seconds(8, 10, 3)) == pytest.approx(3 * 0.002 + 10 * 0.0004, rel=0.02)
    with pytest.raises(ValueError, match="min_passes"):
        AdaptivePolicy(AdaptiveSettings(max_k=K, min_passes=1, passes_run_drafting_rows_only=True))


def test_no_probes_while_even_full_acceptance_would_not_pay():
    """A compute-bound batch (every verified token costs a full token, a draft pass as much as the
    step): acceptance cannot change the decision, so collapsed requests are not probed."""
    req_ids = [f"r{i}" for i in range(16)]
    bound = policy_with(
        target_a=0.001,
        target_b=0.010,
        draft_c=0.005,
        draft_d=0.010,
        reprobe_after=2,
        acceptance={r: 0.0 for r in req_ids},
    )
    rounds = [bound.decide(slots(*req_ids)) for _ in range(40)]
    assert all(d.k == [0] * 16 for d in rounds) and bound.stats.probes == 0
    cheap = policy_with(
        target_a=0.030, target_b=0.0001, draft_c=0.001, reprobe_after=2, acceptance={r: 0.0 for r in req_ids}
    )
    assert sum(cheap.decide(slots(*req_ids)).probes for _ in range(40)) >= 16


@pytest.mark.parametrize("explore_every, optimism", [(8, 0.0), (0, 1.0), (0, 0.0)])
def test_an_estimate_that_starts_too_low_is_explored_back_up(explore_every, optimism):
    """Truth: every position is accepted with 0.9 and drafts are cheap, so the optimum drafts deep.
    The first rounds left positions 2..K looking poor, and a position is measured only when drafted:
    exploration (one more draft every 8 rounds) or optimism (a position seen 3 times is read a
    standard error higher) measures them again; with neither they stay out."""
    policy = policy_with(
        target_a=0.05,
        target_b=0.0005,
        draft_c=0.004,
        rows=(1,),
        explore_every=explore_every,
        acceptance_optimism=optimism,
    )
    policy.acceptance.batch_wide[:] = [0.9] + [0.05] * (K - 1)
    policy.acceptance.batch_wide_seen[:] = 3
    rng = np.random.default_rng(0)
    chosen = []
    for _ in range(120):
        k = policy.decide(slots("r"))
        chosen.append(k.k[0])
        accepted = 0
        while accepted < k.k[0] and rng.random() < 0.9:
            accepted += 1
        if k.k[0]:
            policy.observe([Outcome("r", k.k[0], accepted)])
    if explore_every or optimism:
        assert statistics.mean(chosen[-40:]) >= 4, chosen
        assert policy.stats.explorations > 0 or not explore_every
    else:
        # Without exploration the drafts stop one past the deepest position the guess lets through.
        assert max(chosen[-40:]) <= 2, chosen


def pin_ngram_acceptance(policy: AdaptivePolicy, req_id, rate: float) -> None:
    rng = np.random.default_rng(zlib.crc32(f"ngram-{req_id}".encode()))
    for _ in range(200):
        accepted = 0
        while accepted < K and rng.random() < rate:
            accepted += 1
        policy.observe([Outcome(req_id, K, accepted, ngram=True)])


def ngram_slots(lengths: dict, cap=K):
    return [RequestSlot(r, cap, ngram=g) for r, g in lengths.items()]


def test_a_good_ngram_proposal_goes_to_the_target_without_a_draft_pass():
    """Verification is cheap and the MXFP4 draft costs something: a request whose n-gram proposal is
    accepted better than its drafts would be sends it, and runs no draft pass."""
    policy = policy_with(target_a=0.05, target_b=0.0005, draft_c=0.01, acceptance={"a": 0.6, "b": 0.85})
    pin_ngram_acceptance(policy, "a", 0.95)
    d = policy.decide(ngram_slots({"a": 6, "b": 0}))
    assert d.ngram == [True, False]
    assert d.k[0] == 6
    assert d.passes == d.k[1]  # only the MXFP4 row (if it drafts) needs passes


def test_a_poor_ngram_proposal_loses_to_the_mxfp4_draft():
    policy = policy_with(target_a=0.05, target_b=0.0005, draft_c=0.002, acceptance={"a": 0.9})
    pin_ngram_acceptance(policy, "a", 0.2)
    d = policy.decide(ngram_slots({"a": 6}))
    assert d.ngram == [False] and d.k[0] >= 3 and d.passes == d.k[0]


def test_ngram_tokens_that_cost_more_to_verify_than_they_gain_are_not_sent():
    """A compute-bound target (each verified token costs as much as a plain step's share)."""
    policy = policy_with(target_a=0.001, target_b=0.01, draft_c=1.0, acceptance={"a": 0.5, "b": 0.5})
    pin_ngram_acceptance(policy, "a", 0.3)
    d = policy.decide(ngram_slots({"a": 6, "b": 0}))
    assert d.ngram == [False, False] and d.k == [0, 0] and d.passes == 0


def test_random_policy_sends_ngram_proposals_only_where_there_are_some():
    policy = AdaptivePolicy(AdaptiveSettings(max_k=K, policy="random", seed=1))
    sent = [policy.decide(ngram_slots({"a": 3, "b": 0})) for _ in range(40)]
    assert any(d.ngram[0] for d in sent) and not all(d.ngram[0] for d in sent)
    assert not any(d.ngram[1] for d in sent)
    assert all(d.k[0] == 3 for d in sent if d.ngram[0])


def test_a_free_ngram_proposal_beats_costlier_mxfp4_drafts_that_commit_more():
    """The MXFP4 drafts would commit more tokens, but their passes cost more than that is worth:
    the decision compares tokens per second, not tokens."""
    policy = policy_with(target_a=0.05, target_b=0.0005, draft_c=0.02, acceptance={"a": 0.9})
    pin_ngram_acceptance(policy, "a", 0.75)
    mxfp4_only = policy.decide(ngram_slots({"a": 0}))
    with_ngram = policy.decide(ngram_slots({"a": 6}))
    assert mxfp4_only.k[0] > 0 and with_ngram.ngram == [True] and with_ngram.passes == 0
    ng = policy.ngram_acceptance.of("a").cumprod().sum()
    mx = policy.acceptance.of("a")[: mxfp4_only.k[0]].cumprod().sum()
    assert mx > ng  # more tokens from the drafts...
    rate = with_ngram.expected_tokens / with_ngram.expected_seconds
    assert rate > mxfp4_only.expected_tokens / mxfp4_only.expected_seconds  # ...but fewer per second


def test_a_measured_row_cost_lets_a_batch_draft_that_was_only_seen_at_one_row():
    """Drafts were timed at one row only (a quiet server). Without a measured row cost the fit
    prices each row like half a pass, and 16 rows look too dear to draft; with the measured
    (small, AMX-like) cost per row they draft."""

    def decide(row_cost):
        policy = policy_with(
            target_a=0.05,
            target_b=0.0003,
            draft_c=0.01,
            rows=(1,),
            acceptance={i: 0.9 for i in range(16)},
            trust_growth=0,  # (what the trust region does with a first full batch: its own test)
        )
        if row_cost is not None:
            policy.cost.set_draft_row_cost(row_cost)
        return policy.decide(slots(*range(16)))

    assert sum(decide(None).k) == 0
    assert sum(decide(0.0002).k) > 16


@pytest.mark.parametrize("margin, sent", [(0.0, True), (0.5, False)])
def test_ngram_proposals_that_barely_pay_under_load_wait_for_a_margin(margin, sent):
    """16 busy rows: each proposal's expected tokens per verified token sit just above the plain rate."""
    ids = list(range(16))
    policy = policy_with(
        target_a=0.04, target_b=0.001, draft_c=1.0, acceptance={i: 0.3 for i in ids}, ngram_margin=margin
    )
    for i in ids:
        pin_ngram_acceptance(policy, i, 0.55)
    d = policy.decide(ngram_slots({i: 6 for i in ids}))
    assert any(d.ngram) is sent


def test_requests_off_for_cost_alone_are_not_probed():
    """Probes re-measure an acceptance; a request whose acceptance is healthy is off for cost, and a
    probe (a draft pass) would measure nothing new. Only the collapsed request is probed."""
    policy = policy_with(target_a=0.05, target_b=0.001, draft_c=0.02, acceptance={"healthy": 0.95, "collapsed": 0.05})
    k = np.zeros(2, dtype=np.int64)
    caps = np.full(2, K)
    probed = set()
    for _ in range(3 * policy.settings.reprobe_after):
        k_round, probes = policy.probes.reprobe(slots("healthy", "collapsed"), caps, k.copy(), may_pay=True)
        probed |= {r for r, kr in zip(("healthy", "collapsed"), k_round) if kr}
    assert probed == {"collapsed"}
