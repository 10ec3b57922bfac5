"""The adaptive policy replayed offline (vllm_specqd/bench/policy_replay.py): its unit of quality.

Every trace, built from the measured numbers of issues 28 and 30 or recorded from a real engine
(benchmarks/traces/*.jsonl), is run with the policy and with every fixed K = 0..K in simulated time,
each over 3 draws of the trace taken together. The policy must reach 95% of the best fixed K's
tokens/s (the oracle, chosen with hindsight) and 0.97x of no speculation. The full sweep, with more
draws, is ``python benchmarks/bench_policy_replay.py``. Counts and simulated seconds only: no wall
clock.
"""

from dataclasses import replace

import pytest

from vllm_specqd.bench import policy_replay as replay

SEEDS = 3
ORACLE_SHARE, OFF_RATIO = 0.95, 0.97
SCENARIOS = {s.name: s for s in replay.issue_scenarios() + replay.recorded_scenarios()}


def test_there_are_recorded_traces_beside_the_built_in_ones():
    assert replay.recorded_scenarios(), f"no recorded traces in {replay.TRACES_DIR}"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_policy_reaches_the_oracle_and_never_loses_to_off(name):
    evaluation = replay.evaluate(SCENARIOS[name], seeds=SEEDS)
    print(replay.format_table([evaluation]))
    assert evaluation.vs_oracle >= ORACLE_SHARE, evaluation.row()
    assert evaluation.vs_off >= OFF_RATIO, evaluation.row()


@pytest.mark.parametrize(
    "name, settings",
    [
        # The warm-up this policy had (issue 30): 4 rounds of K for all 64 requests before measuring.
        ("smollm2-c64", {"warmup_steps": 4}),
        # Always K for everyone: where drafting does not pay.
        ("qwen15-fp32-b8", {"warmup_steps": 10**9}),
    ],
)
def test_the_replay_catches_a_policy_that_loses(name, settings):
    """The thresholds above can fail: a policy that drafts before measuring does."""
    evaluation = replay.evaluate(SCENARIOS[name], settings, seeds=SEEDS)
    assert evaluation.vs_off < OFF_RATIO, evaluation.row()


def test_a_trace_written_by_the_policy_replays_its_costs_and_requests(tmp_path):
    """A simulated engine writes the trace an engine writes (VLLM_SPECQD_TRACE_POLICY, PolicyTrace);
    replayed, it has the requests and batch of the run and costs fitted to what the run measured."""
    scenario = replace(SCENARIOS["qwen15-zen5-b1"], lengths=SCENARIOS["qwen15-zen5-b1"].lengths[:6])
    scenario = replace(scenario, cost=replace(scenario.cost, noise=0.0))
    path = tmp_path / "trace.jsonl"
    run = replay.simulate(scenario, "adaptive", trace_path=path)
    header, rounds = replay.read_trace(path)
    assert header["settings"]["max_k"] == scenario.max_k and len(rounds) == run.rounds
    assert sum(sum(e["k"]) for e in rounds) == run.drafted
    recorded = replay.recorded(path)
    assert recorded.lengths == scenario.lengths and recorded.batch == 1
    cost = recorded.cost
    assert cost.target_a == pytest.approx(scenario.cost.target_a, rel=0.01)
    assert cost.target_b == pytest.approx(scenario.cost.target_b, rel=0.01)
    # One row per pass: the pass and row costs are one number.
    assert cost.draft_c + cost.draft_d == pytest.approx(scenario.cost.draft_c + scenario.cost.draft_d, rel=0.01)
    # Replaying the same policy on what the run recorded: its outcomes are known where it drafted.
    again = replay.simulate(recorded, "adaptive")
    assert again.tokens == run.tokens and again.seconds == pytest.approx(run.seconds, rel=0.05)


def test_recorded_outcomes_bound_drafts_from_other_positions():
    """A token recorded accepted at depth 2 is accepted at depth 1 or 2 and one recorded rejected at
    depth 3 is rejected at any depth >= 3; what no draft decided is drawn (here: never accepted)."""
    import numpy as np

    hit, miss = np.zeros(12, dtype=np.int64), np.full(12, 7, dtype=np.int64)
    hit[3], hit[4], miss[5] = 1, 2, 3  # a draft from t=2 accepted tokens 3, 4 and was rejected at 5
    acceptance = replay.RecordedAcceptance(np.zeros((12, 6)), np.ones(12), hit, miss)
    assert acceptance.accepted(2, 6) == 2  # the recorded draft
    assert acceptance.accepted(3, 6) == 1  # token 4 at depth 1 (seen at 2), token 5 at depth 2: drawn
    assert acceptance.accepted(1, 6) == 0  # token 2: never decided, drawn


def test_the_engine_side_writes_the_trace_only_when_asked(tmp_path, monkeypatch):
    """AdaptiveDrafter (the vLLM side) with a stand-in runner: VLLM_SPECQD_TRACE_POLICY makes it
    append one line per round that the replay reads; unset, it keeps no trace at all."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from vllm_specqd.adapter.adaptive_drafter import TRACE_POLICY_ENV, AdaptiveDrafter
    from vllm_specqd.config import AdaptiveSpec

    runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=["a", "b"]),
        discard_request_mask=SimpleNamespace(np=np.zeros(2, dtype=bool)),
        requests={
            r: SimpleNamespace(num_prompt_tokens=10, sampling_params=SimpleNamespace(max_tokens=64)) for r in "ab"
        },
    )

    def drafter():
        return AdaptiveDrafter(AdaptiveSpec(), 6, min_passes=0, max_model_len=4096, passes_run_drafting_rows_only=True)

    monkeypatch.delenv(TRACE_POLICY_ENV, raising=False)
    assert drafter().trace is None
    path = tmp_path / "policy.jsonl"
    monkeypatch.setenv(TRACE_POLICY_ENV, str(path))
    adaptive = drafter()

    def round_(query_lens, positions, rejected):
        qsl = torch.tensor(np.concatenate([[0], np.cumsum(query_lens)]))
        decision = adaptive.decide(
            runner, torch.tensor(positions), SimpleNamespace(query_start_loc_cpu=qsl), torch.tensor(rejected)
        )
        adaptive.finish([[7] * 6, [8] * 6], decision)
        return decision

    first = round_([1, 1], [20, 30], [0, 0])  # the start-up probe: one row drafts its cap
    assert sorted(first.k) == [0, 6]
    drafted = first.k.index(6)
    lens = [1, 1]
    lens[drafted] = 7
    round_(lens, [25, 31], [2 if i == drafted else 0 for i in range(2)])
    header, rounds = replay.read_trace(path)
    assert header["settings"]["max_k"] == 6 and [e["round"] for e in rounds] == [1, 2]
    assert rounds[0]["k"] == first.k and rounds[0]["target"] is None and rounds[0]["draft_s"] >= 0
    assert rounds[1]["outcomes"] == [[drafted, 6, 4, 0]]  # verified 6, 2 rejected
    tokens, seconds, fitted = rounds[1]["target"]
    assert tokens == 8 and seconds >= 0 and fitted
    assert set(rounds[1]["est"]) >= {"target", "draft"}
    assert replay.recorded(path).batch == 2
