"""Phases 5-7: the kernel and decode-step timings, through the benchmark scripts' own entry points.

    python3 -m benchmarks.gpu.timings kernels OUT/bench_kernels.json                  # decode GEMMs, 8B + 70B
    python3 -m benchmarks.gpu.timings decode_step OUT/bench_decode_step.json          # one Llama-3.1-8B step
    python3 -m benchmarks.gpu.timings prefill OUT/bench_kernels_prefill_dequant.json  # 8B, dequant path

M / batch come from ``shapes`` (1, 4, 16 in a short session); the JSON is the scripts' own, with
their ``command``. With SPECQD_SESSION_SMOKE=1 (no GPU) ``kernels`` / ``prefill`` time one small
layer's twin through ``bench_kernels.run`` and ``decode_step`` runs ``--cpu-smoke``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .layout import repo_module
from .shapes import SHORT, SMOKE, Shapes, session_shapes

STEPS = ("kernels", "decode_step", "prefill")
SCRIPT = {"kernels": "bench_kernels", "decode_step": "bench_decode_step", "prefill": "bench_kernels"}


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def bench_argv(step: str, out: str, shapes: Shapes, short: bool = SHORT) -> list[str]:
    """The benchmark script's command line for ``step`` of a full or short session."""
    if step == "kernels":
        args = f"--models 8b,70b --m {_csv(shapes.decode_m)} --iters {10 if short else 20}"
    elif step == "decode_step":
        args = f"--batch {_csv(shapes.decode_m)} --iters {20 if short else 30}"
    elif step == "prefill":
        args = f"--models 8b --m {_csv(shapes.prefill_m)} --force-path dequant --iters 10"
    else:
        raise ValueError(f"unknown step {step!r}; one of {STEPS}")
    return [*args.split(), "--out", out]


def smoke_kernels_args(step: str, shapes: Shapes) -> argparse.Namespace:
    """``bench_kernels.run``'s arguments for the smoke run: one small layer, two iterations."""
    m = _csv(shapes.decode_m) if step == "kernels" else str(shapes.prefill_m[0])
    force_path = "dequant" if step == "prefill" else None
    return argparse.Namespace(models="8b", layers="o", m=m, iters=2, cpu=False, force_path=force_path, split_k=None)


def run(step: str, out: str, smoke: bool = SMOKE) -> int:
    shapes = session_shapes(smoke=smoke)
    script = repo_module("benchmarks", SCRIPT[step])
    if not smoke:
        return script.main(bench_argv(step, out, shapes)) or 0
    if step == "decode_step":
        return script.main(["--cpu-smoke", "--out", out])
    result = script.run(smoke_kernels_args(step, shapes))  # the GPU code path, on the twin
    result["command"] = "smoke"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=STEPS)
    p.add_argument("out", help="JSON path")
    args = p.parse_args(argv)
    return run(args.step, args.out)


if __name__ == "__main__":
    sys.exit(main())
