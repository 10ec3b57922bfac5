"""Run commands side by side, each under one shared deadline, as ``timeout -k GRACE`` would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

TIMED_OUT, KILLED = 124, 137  # timeout(1)'s exit codes: stopped by SIGTERM, by SIGKILL after the grace
# A phase that runs children gets the step's limit in SPECQD_STEP_TIMEOUT (benchmarks/gpu_session.sh),
# and leaves its children this much less: the grace to stop them plus a moment to print their logs.
CHILD_MARGIN_S = 12.0


def step_timeout(default: float = 600.0) -> float:
    """The limit the driver put this step under (``SPECQD_STEP_TIMEOUT``), else ``default``."""
    return float(os.environ.get("SPECQD_STEP_TIMEOUT") or default)


def child_seconds(step_seconds: float, elapsed: float = 0.0) -> float:
    """Seconds left for children of a step limited to ``step_seconds``, ``elapsed`` into it (>= 1)."""
    return max(1.0, step_seconds - CHILD_MARGIN_S - elapsed)


def _stop(p: subprocess.Popen, grace: float) -> int:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=grace)
        return TIMED_OUT
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return KILLED


def run_all(
    cmds: list[list[str]],
    logs: list[Path],
    seconds: float,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    grace: float = 10.0,
) -> list[int]:
    """Start every command at once, stdout and stderr to its log; return their exit codes.

    A command still running ``seconds`` after the start gets SIGTERM (exit code 124), and SIGKILL
    (137) if it is still there ``grace`` seconds later.
    """
    deadline = time.monotonic() + seconds
    procs = []
    for cmd, log in zip(cmds, logs, strict=True):
        with open(log, "wb") as f:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd))
    rcs = []
    for p in procs:
        try:
            rc = p.wait(timeout=max(0.0, deadline - time.monotonic()))
            rcs.append(rc if rc >= 0 else 128 - rc)  # killed by signal N: 128 + N, as the shell says
        except subprocess.TimeoutExpired:
            rcs.append(_stop(p, grace))
    return rcs


def last_failure(rcs: list[int], rc: int = 0) -> int:
    """The last non-zero exit code in ``rcs``, else ``rc`` (a shell loop of ``wait $pid || rc=$?``)."""
    for r in rcs:
        rc = r or rc
    return rc
