"""The adaptive policy replayed offline: tokens/s against the oracle best fixed K and against off.

    python benchmarks/bench_policy_replay.py                     # every built-in and recorded trace
    python benchmarks/bench_policy_replay.py --draws 1           # one draw of each trace (noisier)
    python benchmarks/bench_policy_replay.py --trace benchmarks/traces/x.jsonl --settings '{"min_gain": 0.05}'
    python benchmarks/bench_policy_replay.py --compact /tmp/trace.jsonl benchmarks/traces/name.jsonl --note "..."
    git show 78a8a55:vllm_specqd/adaptive.py > /tmp/before.py    # the policy before issue 28/30's fixes
    python benchmarks/bench_policy_replay.py --policy-file /tmp/before.py

Built-in traces come from the measured numbers of issues 28 and 30 (vllm_specqd/bench/policy_replay.py,
``issue_scenarios``), recorded ones from ``VLLM_SPECQD_TRACE_POLICY`` runs (benchmarks/traces/*.jsonl).
All times are simulated: the numbers do not depend on the machine running this. The target
(issue 28): policy/oracle >= 0.95 and policy/off >= 0.97 on every trace.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from vllm_specqd.adaptive import AdaptivePolicy
from vllm_specqd.bench.policy_replay import (
    compact_trace,
    evaluate,
    format_table,
    issue_scenarios,
    recorded,
    recorded_scenarios,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="share of each built-in trace's requests")
    parser.add_argument("--trace", action="append", default=[], help="a recorded JSONL trace (repeatable)")
    parser.add_argument("--only", default="", help="comma list of trace names to run")
    parser.add_argument("--no-builtin", action="store_true")
    parser.add_argument("--settings", default="{}", help="JSON of AdaptiveSettings overrides")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument(
        "--policy-file",
        help="replay the AdaptivePolicy of another adaptive.py (e.g. an older commit's); only its max_k, "
        "min_passes and passes_run_drafting_rows_only settings are set",
    )
    parser.add_argument(
        "--draws", type=int, default=3, help="draws of each trace taken together as one (the test's: 3)"
    )
    parser.add_argument(
        "--compact",
        nargs=2,
        metavar=("SOURCE", "DEST"),
        help="write SOURCE (a VLLM_SPECQD_TRACE_POLICY file) to DEST with only what the replay reads",
    )
    parser.add_argument("--note", default="", help="with --compact: a note for DEST's settings line")
    args = parser.parse_args(argv)
    if args.compact:
        compact_trace(*args.compact, note=args.note)
        return 0
    scenarios = [] if args.no_builtin else issue_scenarios(args.scale)
    scenarios += [recorded(p) for p in args.trace] if args.trace else ([] if args.no_builtin else recorded_scenarios())
    if args.only:
        names = set(args.only.split(","))
        scenarios = [s for s in scenarios if s.name in names or s.name.split("@")[0] in names]
    factory = _policy_from(args.policy_file) if args.policy_file else AdaptivePolicy
    evaluations = [evaluate(s, json.loads(args.settings), factory, seeds=args.draws) for s in scenarios]
    print(format_table(evaluations))
    worst_oracle = min(e.vs_oracle for e in evaluations)
    worst_off = min(e.vs_off for e in evaluations)
    print(f"\nworst policy/oracle {worst_oracle:.3f}, worst policy/off {worst_off:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([e.row() for e in evaluations], f, indent=1)
    return 0


def _policy_from(path: str):
    spec = importlib.util.spec_from_file_location("replayed_adaptive", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["replayed_adaptive"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)

    def factory(settings):
        return module.AdaptivePolicy(
            module.AdaptiveSettings(
                max_k=settings.max_k,
                min_passes=settings.min_passes,
                passes_run_drafting_rows_only=settings.passes_run_drafting_rows_only,
            )
        )

    return factory


if __name__ == "__main__":
    sys.exit(main())
