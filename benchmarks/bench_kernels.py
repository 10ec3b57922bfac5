"""Benchmark the MXFP4 weight-only GEMM against BF16 ``torch.matmul`` on Llama-3.1 linear shapes.

    python benchmarks/bench_kernels.py                       # CUDA: 8B + 70B, M in {1,2,4,8,16}
    python benchmarks/bench_kernels.py --models 8b --m 1,4 --out results/bench_kernels.json
    python benchmarks/bench_kernels.py --cpu                 # CPU: the native kernels vs vLLM's CPU GEMMs,
                                                             # whole-model passes (bench_kernels_cpu.py)

Without CUDA the script runs the CPU mode.

Per (layer, M) it reports the MXFP4 time, the achieved bandwidth counting the bytes the GEMM must
move (packed + scales + x + y), that bandwidth as a % of a ceiling measured in the same run (a
device-to-device copy), and the speedup over ``x @ W.T`` with the BF16 weight. Every timed
iteration starts with a cold L2: ``triton.testing.do_bench`` zeroes a 256 MB buffer before each
rep and times with CUDA events, so the host-side launch cost hides behind that flush and the
numbers are GPU time (as under vLLM's CUDA graphs). Without CUDA the script says so, times the
torch path that ``mxfp4_matmul`` falls back to (the twin) with wall-clock, and still prints the
table and writes the JSON. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from vllm_specqd.kernels import HAS_TRITON, mxfp4_matmul

# (layer, N = out features, K = in features) for one decoder layer, tensor-parallel 1.
MODELS = {
    "8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
    "70b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 57344, 8192), ("down", 8192, 28672)],
}
QUICK = {"models": "8b", "layers": None, "m": "1,4", "iters": 3}


def _time_cuda(fn, iters: int) -> float:
    """Median microseconds of ``fn()`` with a cold L2 (triton's do_bench: 256 MB flush + events)."""
    import triton.testing

    # do_bench takes time budgets in ms; 2 ms per requested iteration keeps --iters meaningful.
    return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=max(2 * iters, 10), return_mode="median")


def _time_cuda_events(fn, iters: int, flush: torch.Tensor) -> float:
    # Same method as do_bench, for a CUDA machine without Triton.
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(1000.0 * start.elapsed_time(end))
    return statistics.median(times)


def _time_cpu(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(times)


def _make_timer(device: str, iters: int):
    if device == "cuda":
        if HAS_TRITON:
            return lambda fn: _time_cuda(fn, iters)
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        return lambda fn: _time_cuda_events(fn, iters, flush)
    return lambda fn: _time_cpu(fn, iters)


def measure_ceiling_gbps(device: str, timer, nbytes: int) -> float:
    """Read+write bandwidth of ``dst.copy_(src)`` for ``nbytes`` buffers (2 * nbytes moved)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / us / 1e3


def _gemv_info(m: int, n: int, k: int, device: str) -> str:
    """Which kernel path mxfp4_matmul takes, for the table ("twin" off CUDA)."""
    if device != "cuda" or not HAS_TRITON:
        return "twin"
    from vllm_specqd.kernels import triton_mxfp4 as mt

    if m > mt.GEMV_MAX_M:
        return "dequant"
    block_n = mt.gemv_block_n(m)
    return f"gemv/sk{mt.gemv_split_k(n, k // 32, block_n, mt._num_sms(torch.cuda.current_device()))}"


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cuda":
        gpu = torch.cuda.get_device_name()
        print(f"# device: {gpu} (CUDA {torch.version.cuda}), torch {torch.__version__}")
    else:
        gpu = None
        print("# device: NO CUDA GPU -- timing the torch fallback (twin) that mxfp4_matmul runs on CPU;")
        print("#         these numbers say nothing about the Triton kernels' GPU performance.")
    date = dt.date.today().isoformat()
    machine = gpu or f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, no GPU"
    print(f"# date: {date}   machine: {machine}")
    timer = _make_timer(device, args.iters)
    ceiling = measure_ceiling_gbps(device, timer, (1 << 30) if device == "cuda" else (256 << 20))
    print(f"# bandwidth ceiling (copy_): {ceiling:.0f} GB/s")

    matmul, forced = mxfp4_matmul, None
    if device == "cuda" and (args.force_path or args.split_k):
        from vllm_specqd.kernels import mxfp4_matmul_triton

        forced = f"{args.force_path or 'auto'}" + (f"/sk{args.split_k}" if args.split_k else "")

        def matmul(x, packed, scales):
            return mxfp4_matmul_triton(x, packed, scales, force_path=args.force_path, split_k=args.split_k)

    layers = set(args.layers.split(",")) if args.layers else None
    ms = [int(v) for v in args.m.split(",")]
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    header = (
        f"{'model':>5} {'layer':>8} {'N':>6} {'K':>6} {'M':>3} {'path':>10} {'mxfp4_us':>10} "
        f"{'GB/s':>8} {'%ceil':>6} {'bf16_us':>10} {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    for model in args.models.split(","):
        for layer, n, k in MODELS[model]:
            if layers and layer not in layers:
                continue
            # Timing does not depend on the values: random bytes are valid MXFP4 (scales kept finite).
            packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=g)
            scales = torch.randint(118, 131, (n, k // 32), dtype=torch.uint8, device=device, generator=g)
            w_bf16 = torch.randn(n, k, dtype=torch.bfloat16, device=device, generator=g)
            for m in ms:
                x = torch.randn(m, k, dtype=torch.bfloat16, device=device, generator=g)
                t_q = timer(lambda: matmul(x, packed, scales))
                t_b = timer(lambda: torch.matmul(x, w_bf16.t()))
                nbytes = packed.numel() + scales.numel() + 2 * m * k + 2 * m * n
                gbps = nbytes / t_q / 1e3
                row = dict(
                    model=model,
                    layer=layer,
                    N=n,
                    K=k,
                    M=m,
                    path=forced or _gemv_info(m, n, k, device),
                    time_us=round(t_q, 2),
                    GBps=round(gbps, 2),
                    pct_of_ceiling=round(100 * gbps / ceiling, 1),
                    bf16_time_us=round(t_b, 2),
                    speedup_vs_bf16=round(t_b / t_q, 3),
                    bytes=nbytes,
                )
                rows.append(row)
                print(
                    f"{model:>5} {layer:>8} {n:>6} {k:>6} {m:>3} {row['path']:>10} {t_q:>10.1f} {gbps:>8.2f} "
                    f"{row['pct_of_ceiling']:>6.1f} {t_b:>10.1f} {row['speedup_vs_bf16']:>7.2f}"
                )
            del packed, scales, w_bf16
            if device == "cuda":
                torch.cuda.empty_cache()
    return {
        "date": date,
        "device": device,
        "machine": machine,
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if HAS_TRITON else None,
        "timing": "do_bench median, 256 MB L2 flush per rep" if device == "cuda" else "wall-clock median",
        "bandwidth_ceiling_GBps": round(ceiling, 1),
        "bytes_counted": "packed + scales + x (bf16) + y (bf16)",
        "results": rows,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="8b,70b", help="comma list of: " + ",".join(MODELS))
    p.add_argument("--layers", default=None, help="comma list of layers (qkv,o,gate_up,down); default all")
    p.add_argument("--m", default="1,2,4,8,16", help="comma list of activation rows M")
    p.add_argument(
        "--iters", type=int, default=50, help="timed iterations (CPU); on CUDA a do_bench budget of 2 ms each"
    )
    p.add_argument("--quick", action="store_true", help=f"small run (fits a CPU in < 2 min): {QUICK}")
    p.add_argument("--cpu", action="store_true", help="time on the CPU even if CUDA is present")
    p.add_argument(
        "--force-path",
        choices=("gemv", "dequant"),
        default=None,
        help="CUDA only: force a kernel path (e.g. to find the gemv/dequant crossover)",
    )
    p.add_argument("--split-k", type=int, default=None, help="CUDA only: force the decode kernel's split-K")
    p.add_argument("--out", default="results/bench_kernels.json", help="JSON output path")
    p.add_argument("--threads", default="1,2", help="CPU mode: comma list of torch thread counts")
    p.add_argument("--reps", type=int, default=5, help="CPU mode: timed passes per point (median)")
    p.add_argument(
        "--large-m", default="256,2048", help="CPU mode: rows for the large-M table ('' to skip); a few layers each"
    )
    p.add_argument("--large-m-layers", type=int, default=1, help="CPU mode: decoder layers per large-M pass")
    args = p.parse_args(argv)
    if args.cpu or not torch.cuda.is_available():
        import bench_kernels_cpu as cpu_mode

        if args.quick:
            args.models, args.m, args.threads, args.reps, args.large_m = (
                cpu_mode.QUICK[k] for k in ("models", "m", "threads", "reps", "large_m")
            )
        models = list(cpu_mode.MODELS) if args.models == p.get_default("models") else args.models.split(",")
        unknown = [m for m in models if m not in cpu_mode.MODELS]
        if unknown:
            p.error(f"unknown CPU model(s) {unknown}; choose from {','.join(cpu_mode.MODELS)}")
        out = args.out if args.out != p.get_default("out") else "results/bench_kernels_cpu.json"
        cli = argv if argv is not None else sys.argv[1:]
        cpu_mode.run_cpu(
            models,
            [int(m) for m in args.m.split(",")],
            [int(t) for t in args.threads.split(",")],
            args.reps,
            Path(out),
            large_ms=[int(m) for m in args.large_m.split(",") if m],
            large_m_layers=args.large_m_layers,
            command=" ".join(["python benchmarks/bench_kernels.py", *cli]),
        )
        return
    if args.quick:
        args.models, args.layers, args.m, args.iters = QUICK["models"], QUICK["layers"], QUICK["m"], QUICK["iters"]
    for model in args.models.split(","):
        if model not in MODELS:
            p.error(f"unknown model {model!r}; choose from {','.join(MODELS)}")
    result = run(args)
    cli = argv if argv is not None else sys.argv[1:]
    result["command"] = " ".join(["python benchmarks/bench_kernels.py", *cli])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
