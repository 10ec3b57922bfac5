"""Phase 3 (precompile): compile every decode config of every timed shape into the shared Triton cache.

    python3 -m benchmarks.gpu.precompile --workers 12 --logs DIR   # runs the workers, prints their logs
    python3 -m benchmarks.gpu.precompile --worker 3 --workers 12   # one worker

Worker I of W compiles (config, call) pairs I, I+W, ... of the decode autotuner (only the configs its
pruner keeps for that M), worker 0 also the dequant kernel, so that tune_check only loads and times
them. Zero weights: nothing here is timed or checked. Set TRITON_CACHE_AUTOTUNING=0 around it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .layout import REPO
from .parallel import child_seconds, last_failure, run_all, step_timeout
from .shapes import PREFILL_MODEL, SMOKE, session_shapes

Call = tuple[int, int, int, "str | None"]  # (M, N, K, forced path)


def gemv_pairs(mt, calls: list[Call]) -> list[tuple[int | None, Call]]:
    """(config index, call) for every decode config the autotuner would time for that call.

    The index is None where the launcher is no autotuner (the interpreter's single config)."""
    configs = list(getattr(mt._gemv_launch, "configs", [None]))
    prune = getattr(mt, "_prune_gemv", None)

    def wanted(ci: int, call: Call) -> bool:
        if prune is None or configs[ci] is None:
            return True
        return configs[ci] in prune(configs, {}, BLOCK_N=mt.gemv_block_n(call[0]))

    pairs = [(ci, call) for call in calls for ci in range(len(configs)) if wanted(ci, call)]
    return [(ci if configs[ci] is not None else None, call) for ci, call in pairs]


def worker_share(pairs: list, idx: int, nworkers: int, extra: list | None = None) -> list:
    """Pairs idx, idx + nworkers, ...; worker 0 also takes ``extra``."""
    return pairs[idx::nworkers] + (list(extra or []) if idx == 0 else [])


def run_worker(idx: int, nworkers: int) -> int:
    import torch

    from vllm_specqd.kernels import mxfp4_matmul_triton
    from vllm_specqd.kernels import triton_mxfp4 as mt

    device = "cpu" if SMOKE else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"[precompile {idx}] no CUDA: nothing to do")
        return 0
    shapes = session_shapes()
    tuner = mt._gemv_launch
    configs = list(getattr(tuner, "configs", [None]))
    _, n0, k0 = shapes.models[PREFILL_MODEL][0]
    dequant = [(None, (32 if SMOKE else 64, n0, k0, "dequant"))]
    calls = [(m, n, k, None) for _, _, n, k, m in shapes.decode_jobs()]
    mine = worker_share(gemv_pairs(mt, calls), idx, nworkers, dequant)
    t0, ok, errors = time.time(), 0, {}
    for ci, (m, n, k, path) in mine:
        if ci is not None:
            tuner.configs = [configs[ci]]  # an autotuner holding one config runs it without timing
        packed = torch.zeros(n, k // 2, dtype=torch.uint8, device=device)
        scales = torch.full((n, k // 32), 127, dtype=torch.uint8, device=device)
        x = torch.zeros(m, k, dtype=torch.bfloat16, device=device)
        try:
            mxfp4_matmul_triton(x, packed, scales, force_path=path)
            ok += 1
        except Exception as e:  # report every distinct failure, keep going
            where = f"{path or 'auto'} M{m} N{n} K{k} {configs[ci].kwargs if ci is not None else ''}"
            errors.setdefault(f"{type(e).__name__}: {str(e)[:600]}", []).append(where)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"[precompile {idx}/{nworkers}] {ok} of {len(mine)} (config, call) pairs ok in {time.time() - t0:.1f}s")
    for msg, where in errors.items():
        print(f"[precompile {idx}/{nworkers}] FAILED ({len(where)}x, e.g. {where[:3]}): {msg}")
    return 1 if errors else 0


def run_workers(nworkers: int, logs: Path, seconds: float) -> int:
    """All workers at once, each logging to precompile_<i>.log; print the logs in worker order."""
    logs.mkdir(parents=True, exist_ok=True)
    cmds = [
        [sys.executable, "-m", "benchmarks.gpu.precompile", "--worker", str(i), "--workers", str(nworkers)]
        for i in range(nworkers)
    ]
    worker_logs = [logs / f"precompile_{i}.log" for i in range(nworkers)]
    rcs = run_all(cmds, worker_logs, child_seconds(seconds), dict(os.environ), REPO)
    for log in worker_logs:
        print(log.read_text(errors="replace"), end="")
    return last_failure(rcs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--worker", type=int, default=None, help="run worker I only, in this process")
    p.add_argument("--logs", type=Path, default=Path("/tmp/specqd_gpu_session/logs"))
    p.add_argument("--timeout", type=float, default=None, help="seconds for the whole step (SPECQD_STEP_TIMEOUT)")
    args = p.parse_args(argv)
    if args.worker is not None:
        return run_worker(args.worker, args.workers)
    return run_workers(max(1, args.workers), args.logs, args.timeout or step_timeout())


if __name__ == "__main__":
    sys.exit(main())
