"""The typed level report: its file format, when the worker writes it, and how readers wait for it (no engine)."""

import threading
import time

import pytest

from vllm_specqd.level_report import (
    AdaptiveReport,
    LevelEntry,
    LevelReport,
    ReportWriter,
    read_report,
    read_settled_report,
)


def _report(proposed: int = 4, busy: bool = False) -> LevelReport:
    return LevelReport(
        levels={
            1: LevelEntry(1, "MXFP4 self-draft", weight_bytes=100, kv_cache="shared", forward_passes=7),
            2: LevelEntry(2, "n-gram lookup", proposed_tokens=proposed, accepted_tokens=3, verify_windows=2),
        },
        generated_tokens=10,
        rounds=3,
        busy=busy,
    )


def test_round_trip_keeps_types_and_int_level_ids():
    report = _report()
    back = LevelReport.from_json(report.to_json())
    assert back == report and sorted(back.levels) == [1, 2]
    assert back.levels[2].acceptance_rate == 0.75
    assert back.levels[2].mean_accepted_length == (3 + 2) / 2  # one bonus token per window
    assert back.levels[1].proposed_tokens is None  # level 1's proposals are vLLM's own metrics
    assert back.passes_per_generated_token(1) == 0.7


def test_summary_names_each_levels_kv_mode_and_bytes():
    line = _report().summary()
    assert line.startswith("generated=10 ")
    assert "level1[kv=shared +0 B/tok, passes/token=0.70]" in line
    assert "level2[proposed=4 accepted=3 mean_accepted_len=2.50]" in line


def _adaptive(steps: int, off: int, histogram: list[int]) -> AdaptiveReport:
    return AdaptiveReport(
        policy="cost",
        min_gain=0.05,
        steps=steps,
        steps_off=off,
        requests=sum(histogram),
        requests_off=histogram[0],
        k_histogram=histogram,
        decision_seconds=0.001 * steps,
        step_seconds=0.05 * steps,
        estimates={"target_step_s": 0.012, "target_per_token_s": 0.0003, "draft_pass_s": 0.004, "draft_per_row_s": 0},
    )


def test_adaptive_report_round_trips_subtracts_and_summarises():
    report = _report()
    report.adaptive = _adaptive(10, 4, [6, 1, 0, 3])
    back = LevelReport.from_json(report.to_json())
    assert back == report
    assert back.adaptive.steps_off_share == 0.4 and back.adaptive.requests_off_share == 0.6
    assert back.adaptive.mean_k == (1 + 3 * 3) / 10
    assert back.adaptive.decision_share == pytest.approx(0.02)
    earlier = _report()
    earlier.adaptive = _adaptive(4, 1, [2, 1, 0, 1])
    delta = back.minus(earlier).adaptive
    assert (delta.steps, delta.steps_off, delta.k_histogram) == (6, 3, [4, 0, 0, 2])
    line = back.summary()
    assert "adaptive[k 0:6 1:1 3:3, off steps=40% requests=60%, target=12.0ms+0.30ms/tok" in line, line
    assert LevelReport.from_json(_report().to_json()).adaptive is None


def test_writer_writes_on_an_interval_and_when_busy_flips(tmp_path):
    now = [0.0]
    writer = ReportWriter(tmp_path / "e.json", interval_s=0.5, clock=lambda: now[0])
    built = []

    def build():
        built.append(1)
        return _report(proposed=len(built))

    assert writer.write(build, busy=True) is not None  # the batch starts: written at once
    now[0] = 0.2
    assert writer.write(build, busy=True) is None and len(built) == 1  # not due: nothing built
    now[0] = 0.6
    assert writer.write(build, busy=True).levels[2].proposed_tokens == 2  # the interval passed
    now[0] = 0.7
    assert writer.write(build, busy=False) is not None  # the batch emptied: the final counts at once
    assert read_report(tmp_path / "e.json") == _report(proposed=3, busy=False)
    assert writer.write(build, busy=False, force=True) is not None
    assert ReportWriter(None).write(build, busy=True) is None  # a TP rank that does not report


def test_settled_read_waits_for_the_idle_write(tmp_path):
    path = tmp_path / "e.json"
    assert read_settled_report(path) is None  # no specqd engine
    path.write_text(_report(proposed=1, busy=True).to_json())

    def finish():
        time.sleep(0.3)
        path.write_text(_report(proposed=9, busy=False).to_json())

    thread = threading.Thread(target=finish)
    thread.start()
    assert read_settled_report(path, timeout_s=10).levels[2].proposed_tokens == 9
    thread.join()
    path.write_text(_report(busy=True).to_json())
    with pytest.raises(TimeoutError, match="busy batch"):
        read_settled_report(path, timeout_s=0.1)


def test_minus_gives_counter_deltas_and_keeps_facts():
    delta = _report(proposed=9).minus(_report(proposed=4))
    assert delta.levels[2].proposed_tokens == 5 and delta.levels[2].accepted_tokens == 0
    assert delta.levels[1].weight_bytes == 100 and delta.levels[1].forward_passes == 0
    assert delta.generated_tokens == 0 and delta.rounds == 0
    assert _report().minus(None) == _report()


def test_adaptive_metrics_on_the_prometheus_collector(tmp_path, monkeypatch):
    from vllm_specqd.adapter.metrics import LevelStatsCollector
    from vllm_specqd.level_report import STATS_DIR_ENV

    monkeypatch.setenv(STATS_DIR_ENV, str(tmp_path))
    report = _report()
    report.adaptive = _adaptive(10, 4, [6, 1, 0, 3])
    (tmp_path / "engine0.json").write_text(report.to_json())
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in LevelStatsCollector().collect()
        for s in family.samples
    }
    row = (("engine", "engine0"), ("level", "1"))

    def value(metric, **labels):
        return samples[(metric, tuple(sorted(row + tuple(labels.items()))))]

    assert [value("specqd:adaptive_chosen_k_total", k=str(k)) for k in range(4)] == [6, 1, 0, 3]
    assert value("specqd:adaptive_steps_off_total") == 4 and value("specqd:adaptive_steps_total") == 10
    assert value("specqd:adaptive_speculation_off_share", of="steps") == 0.4
    assert value("specqd:adaptive_speculation_off_share", of="requests") == 0.6
    assert value("specqd:adaptive_estimate", name="target_per_token_s") == 0.0003
    assert value("specqd:adaptive_decision_share") == pytest.approx(0.02)
