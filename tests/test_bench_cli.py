"""The benchmarks themselves, at tiny sizes: `python -m vllm_specqd bench --quick` (three engines, one
after the other, in a subprocess) and the projection from its results; benchmarks/bench_decode_step.py's
CPU smoke mode and its draft check; benchmarks/bench_adaptive_decision.py.

What they compute and print is tested without running them in test_bench_report.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK_METHODS = "none,specqd-1,specqd-ngram"
QUICK_K = 6  # the CLI's default --k


# ---------------------------------------------------------------- decode-step harness (CPU smoke)


def test_decode_step_cpu_smoke(tmp_path):
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_decode_step.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU SMOKE RUN" in proc.stdout and "target_ms" in proc.stdout and "-> ok" in proc.stdout
    data = json.loads(out.read_text())
    assert data["cpu_smoke"] is True and [r["batch"] for r in data["rows"]] == [1, 2]
    assert all(r["target_ms"] > 0 and r["draft_ms"] > 0 and 0 < r["c_bytes"] < 1 for r in data["rows"])


def test_decode_step_check_is_sensitive():
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_decode_step as harness
    finally:
        sys.path.pop(0)
    _, draft = harness.build_models(harness.SMOKE, kv_len=8, max_batch=1, device=torch.device("cpu"))
    assert harness.check_draft(draft, torch.device("cpu"))["ok"]
    broken = draft.layers[0].gate_up
    broken.dequantized = lambda: harness.BF16Linear(torch.zeros(broken.packed.shape[0], broken.k, dtype=torch.bfloat16))
    assert not harness.check_draft(draft, torch.device("cpu"))["ok"]


# ---------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench") / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    proc = subprocess.run(
        # Eager: compiled engines are covered by test_engine_compiled.py, and compiling three costs minutes.
        [
            sys.executable,
            "-m",
            "vllm_specqd",
            "bench",
            "--quick",
            "--eager",
            "--methods",
            QUICK_METHODS,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    return out, proc


@pytest.mark.engine
def test_quick_bench_results_are_complete_and_consistent(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.md", "results.json", "speedup_acceptance.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["dtype"] == "float32" and "command" in data["meta"]
    by_name = {r["method"]: r for r in data["methods"]}
    assert list(by_name) == QUICK_METHODS.split(",")
    for name, record in by_name.items():
        assert "error" not in record, record.get("traceback")
        assert record["tokens_per_s"] > 0 and record["generated_tokens"] > 0, name
        assert f"| {name} |" in (out / "results.md").read_text()
    for name in ("specqd-1", "specqd-ngram"):
        record = by_name[name]
        assert record["identical_to_none"] is True, f"{name}: greedy fp32 output differs from no speculation"
        level1 = record["levels"]["1"]
        assert len(level1["per_position"]) == QUICK_K and 1.0 <= level1["mean_accepted_length"] <= QUICK_K + 1
        assert 0.0 <= level1["acceptance_rate"] <= 1.0
        # The default level 1 reads and writes the target's KV: it adds weights, but no KV bytes.
        assert record["memory"]["added_weight_bytes"] > 0 and record["memory"]["added_kv_bytes_per_token"] == 0
        assert record["memory"]["kv_cache"] == {"1": "shared", **({"2": "none"} if name == "specqd-ngram" else {})}
        assert record["memory"]["kv_capacity_check"] == "matches the engine"
    assert by_name["specqd-1"]["levels"]["1"]["passes_per_level1_draft_token"] == 1.0
    # An inner level can only save MXFP4 passes: at most one pass per level-1 draft token.
    assert by_name["specqd-ngram"]["levels"]["1"]["passes_per_level1_draft_token"] <= 1.0
    level2 = by_name["specqd-ngram"]["levels"]["2"]
    assert level2["proposer"] == "n-gram lookup" and level2["verify_windows"] > 0
    assert by_name["none"]["target_passes_per_generated_token"] == 1.0


@pytest.mark.engine
def test_projection_from_a_real_run(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0
    from vllm_specqd.bench.cli import main

    assert main(["--project-from", str(out / "results.json"), "--c", "0.3"]) == 0
    text = (out / "projection.md").read_text()
    assert "PROJECTION" in text and "| specqd-1 |" in text and "| specqd-ngram |" in text


# ---------------------------------------------------------------- the adaptive decision's cost


def test_adaptive_decision_benchmark_prints_a_row_per_batch_size():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_adaptive_decision.py"), "--batch", "1,8", "--repeats", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["1", "8"], proc.stdout
    for row in rows:
        median_ms, p90_ms, share = float(row[1]), float(row[2]), float(row[3].rstrip("%"))
        assert 0 < median_ms <= p90_ms and share > 0 and row[4] in ("within", "OVER"), row
