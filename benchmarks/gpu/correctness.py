"""Phase 2 (tests): the CUDA tests of tests/test_kernels.py, sharded over parallel pytest processes.

    python3 -m benchmarks.gpu.correctness --shards 6 --logs DIR   # collect, shard, run, print the logs
    python3 -m benchmarks.gpu.correctness --interp                # the interpreter tests (one process)

Compiling is CPU-bound and the GPU has room for every shard. The shards run with
``autotune_plugin`` (one seeded random config per tuning key) and ``TRITON_CACHE_AUTOTUNING=0``;
``--noconftest`` because tests/conftest.py imports vLLM. Collection and the shards share the step's
limit (``SPECQD_STEP_TIMEOUT``); a shard still running near its end is stopped (rc 124).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from .layout import REPO
from .parallel import child_seconds, last_failure, run_all, step_timeout

TEST_FILE = "tests/test_kernels.py"
SELECTION = "cuda or launcher or split_k_heuristic"
INTERP_SELECTION = "interpreter_matches_twin or (triton_dequant_bit_exact and not cuda)"
PYTEST_ARGS = "--noconftest -p no:cacheprovider -p benchmarks.gpu.autotune_plugin -q --tb=short -rfE".split()
INTERP_ARGS = "--noconftest -p no:cacheprovider -q --tb=short".split()
COLLECT_MAX_S = 60.0
COLLECTION_FAILED = 2  # the step's exit code when nothing was collected (before any shard fails)


def collected_ids(collect_output: str) -> list[str]:
    """The test ids that ``pytest -q --collect-only`` printed (its lines holding ``::``)."""
    return [line for line in collect_output.splitlines() if "::" in line]


def shard(ids: list[str], n: int) -> list[list[str]]:
    """Round-robin ``ids`` over ``n`` shards (test i goes to shard i mod n); empty shards dropped."""
    return [part for part in (ids[i::n] for i in range(n)) if part]


def pytest_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", *PYTEST_ARGS, *args]


def run_tests(shards: int, logs: Path, seconds: float) -> int:
    """Collect, shard and run; print every shard's log. Returns the step's exit code."""
    t0 = time.monotonic()
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRITON_CACHE_AUTOTUNING": "0"}
    try:
        collect = subprocess.run(
            pytest_cmd("--collect-only", TEST_FILE, "-k", SELECTION),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
            timeout=min(COLLECT_MAX_S, child_seconds(seconds)),
        ).stdout
    except subprocess.TimeoutExpired as e:
        collect = (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or "") + "\nTIMED OUT"
    (logs / "collect.log").write_text(collect)
    ids = collected_ids(collect)
    (logs / "test_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    print(f"collected {len(ids)} tests (-k '{SELECTION}')")
    rc = 0
    if not ids:
        print("COLLECTION FAILED:")
        print("\n".join(collect.splitlines()[-40:]))
        rc = COLLECTION_FAILED
    parts = shard(ids, shards)
    shard_logs = [logs / f"tests_shard_{i:02d}.log" for i in range(len(parts))]
    for i, part in enumerate(parts):
        (logs / f"ids_{i:02d}.txt").write_text("".join(f"{t}\n" for t in part))
    left = child_seconds(seconds, time.monotonic() - t0)
    rcs = run_all([pytest_cmd(*part) for part in parts], shard_logs, left, env, REPO)
    for log in shard_logs:
        print(f"----- {log.name}")
        print(log.read_text(errors="replace"), end="")
    return last_failure(rcs, rc)


def run_interp_tests() -> int:
    """The interpreter tests of tests/test_kernels.py in this process (they start their own worker)."""
    import pytest

    os.chdir(REPO)
    return int(pytest.main([*INTERP_ARGS, TEST_FILE, "-k", INTERP_SELECTION]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=1, help="parallel pytest processes")
    p.add_argument("--logs", type=Path, default=Path("/tmp/specqd_gpu_session/logs"), help="collect/shard logs")
    p.add_argument("--timeout", type=float, default=None, help="seconds for the whole step (SPECQD_STEP_TIMEOUT)")
    p.add_argument("--interp", action="store_true", help="run the interpreter tests instead")
    args = p.parse_args(argv)
    if args.interp:
        return run_interp_tests()
    return run_tests(max(1, args.shards), args.logs, args.timeout or step_timeout())


if __name__ == "__main__":
    sys.exit(main())
