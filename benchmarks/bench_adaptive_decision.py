"""How long the adaptive policy's decision takes, against the 1% of a step it may cost.

    python benchmarks/bench_adaptive_decision.py                  # batches of 1, 16 and 64 requests, max_k 8
    python benchmarks/bench_adaptive_decision.py --batch 64 --step-ms 100 --repeats 200

The cost policy (vllm_specqd/adaptive.py) decides once per drafting round, in the worker, between the
target step and the draft passes. Here it decides on synthetic costs (a target step of 50 ms + 0.2 ms
per token, a draft pass of 10 ms + 0.1 ms per row) for requests whose acceptance is 0.7, warmed up
as in a served run. Printed per batch size: the median and p90 time of one decision, and the median's
share of a step of --step-ms (default 100 ms: a 64-request step of the bundled model on the CI machine
kind takes well over that) against the 1% budget.

In an engine the level report counts the decision's time beside the measured steps, and
`python -m vllm_specqd bench --methods none,specqd-adaptive` prints that share for the run
("decision=...% of step").
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from vllm_specqd.adaptive import AdaptivePolicy, AdaptiveSettings, Decision, Outcome, RequestSlot
from vllm_specqd.bench.report import DECISION_BUDGET_SHARE


def warmed_policy(max_k: int, batch: int, acceptance: float, seed: int = 0) -> tuple[AdaptivePolicy, list]:
    """A cost policy that has seen 50 rounds of synthetic timings and 200 outcomes per request."""
    policy = AdaptivePolicy(AdaptiveSettings(max_k=max_k, warmup_steps=0))
    for _ in range(50):
        for tokens in (1, 7, 20, 64, 100):
            policy.observe_target(tokens, 0.050 + 0.0002 * tokens)
        for rows in (1, 4, 16):
            policy.observe_draft(Decision([3] * rows, 3, 0, 0.0, 0.0, 0.0, 0.0), 3 * (0.010 + 0.0001 * rows))
    rng = np.random.default_rng(seed)
    slots = [RequestSlot(f"r{i}", max_k) for i in range(batch)]
    for slot in slots:
        for _ in range(200):
            accepted = 0
            while accepted < max_k and rng.random() < acceptance:
                accepted += 1
            policy.observe([Outcome(slot.req_id, max_k, accepted)])
    return policy, slots


def decision_times(batch: int, max_k: int, acceptance: float, repeats: int) -> list[float]:
    policy, slots = warmed_policy(max_k, batch, acceptance)
    policy.decide(slots)  # first call: numpy's and the policy's caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        policy.decide(slots)
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,16,64", help="requests per decision, comma-separated")
    parser.add_argument("--max-k", type=int, default=8)
    parser.add_argument("--acceptance", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--step-ms", type=float, default=100.0, help="the step time the budget is a share of")
    args = parser.parse_args(argv)
    print(f"adaptive decision, max_k={args.max_k}, acceptance {args.acceptance}, {args.repeats} decisions each")
    print(
        f"{'batch':>6} {'median_ms':>10} {'p90_ms':>8} {'share of ' + f'{args.step_ms:g} ms':>18}  budget {DECISION_BUDGET_SHARE:.0%}"
    )
    for batch in (int(b) for b in args.batch.split(",")):
        times = sorted(decision_times(batch, args.max_k, args.acceptance, args.repeats))
        median, p90 = statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]
        share = median / (args.step_ms / 1e3)
        verdict = "within" if share < DECISION_BUDGET_SHARE else "OVER"
        print(f"{batch:>6} {1e3 * median:>10.3f} {1e3 * p90:>8.3f} {share:>18.2%}  {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
