"""Phase 4 (tune+check): autotune every timed decode key, check every tuned kernel against the torch twin.

    TRITON_CACHE_AUTOTUNING=1 python3 -m benchmarks.gpu.tune_check OUT/kernel_check.json

The autotuner's do_bench is shortened (warmup 5 ms, rep 25 ms); TRITON_CACHE_AUTOTUNING=1 stores
the picks for the timing steps. Each output is compared with ``mxfp4_matmul_torch`` under
tests/test_kernels.py's error bound and computed twice (determinism). The JSON is rewritten after
every row, so a timeout keeps what was done; the decode kernels' registers and SASS close it.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .autotune_plugin import TUNERS, config_label, replace_do_bench
from .kernel_stats import compiled_kernel_stats
from .layout import repo_module
from .shapes import SMOKE, session_shapes

WARMUP_MS, REP_MS = 5, 25
HEADER = (
    f"{'model':>5} {'layer':>8} {'N':>6} {'K':>6} {'M':>5} {'path':>9} {'tune_s':>7} {'ok':>3} {'max_abs_diff':>12} "
    f"{'max_excess':>11}  config"
)
NAN = float("nan")


def what(autotune_cache: str | None) -> str:
    """The JSON's description of the check."""
    return (
        "each benchmarked (shape, M, path): first call autotunes (do_bench warmup "
        f"{WARMUP_MS} ms, rep {REP_MS} ms; TRITON_CACHE_AUTOTUNING={autotune_cache}), then the "
        "output is checked against mxfp4_matmul_torch with tests/test_kernels.py's bound (u=2^-22, +1 ulp for "
        "dequant and M>=1024) and re-run for determinism. Random packed bytes (every code), scales 118..130, bf16 x."
    )


def table_line(row: dict) -> str:
    """One row of the table the step prints (HEADER's columns)."""
    return (
        f"{row['model']:>5} {row['layer']:>8} {row['N']:>6} {row['K']:>6} {row['M']:>5} "
        f"{row.get('path', row.get('forced_path') or '?'):>9} {row.get('first_call_s', NAN):>7.2f} "
        f"{'yes' if row.get('ok') else 'NO':>3} {row.get('max_abs_diff', NAN):>12.4g} {row.get('max_excess', NAN):>11.3g}  "
        f"{row.get('config', '')}{'  ' + row['error'] if 'error' in row else ''}"
    )


def check_one(row: dict, g, device: str) -> None:
    """Tune, run and check one (shape, M, path) into ``row``: path, config, the compare() verdict."""
    import torch

    from vllm_specqd.kernels import mxfp4_matmul_torch, mxfp4_matmul_triton
    from vllm_specqd.kernels import triton_mxfp4 as mt
    from vllm_specqd.mxfp4 import dequantize_mxfp4

    tk = repo_module("tests", "test_kernels")
    n, k, m, path = row["N"], row["K"], row["M"], row["forced_path"]
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=g)
    scales = torch.randint(118, 131, (n, k // 32), dtype=torch.uint8, device=device, generator=g)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device, generator=g)
    t0 = time.time()
    y = mxfp4_matmul_triton(x, packed, scales, force_path=path)
    if device == "cuda":
        torch.cuda.synchronize()
    row["first_call_s"] = round(time.time() - t0, 2)
    real = tk.launcher_path(path, m)
    if real == "gemv" and device == "cuda":
        real += f"/sk{mt.gemv_split_k(n, k // 32, mt.gemv_block_n(m), mt._num_sms(x.device.index))}"
    row["path"] = real
    cfg = getattr(mt._gemv_launch, "best_config", None) if real.startswith("gemv") else None
    row["config"] = config_label(cfg) if cfg is not None else "-"
    y_ref = mxfp4_matmul_torch(x, packed, scales)
    w = dequantize_mxfp4(packed, scales, k=k)
    extra = 1 if real == "dequant" or m >= 1024 else 0
    verdict = tk.compare(y, y_ref, tk.gemm_tolerance(x, w, None, y, y_ref, y.dtype, u=2.0**-22, extra_ulps=extra))
    verdict["deterministic"] = bool(torch.equal(mxfp4_matmul_triton(x, packed, scales, force_path=path), y))
    verdict["ok"] = verdict["ok"] and verdict["deterministic"]
    row.update(verdict)


def write(result: dict, out_path: str) -> None:
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    out_path = (argv if argv is not None else sys.argv[1:])[0]
    import torch

    device = "cpu" if SMOKE else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("[tune] no CUDA: nothing to do")
        return 0
    import triton
    import triton.testing

    from vllm_specqd.kernels import triton_mxfp4 as mt

    def short_bench(kernel_call, quantiles=None, **kwargs):
        return triton.testing.do_bench(kernel_call, warmup=WARMUP_MS, rep=REP_MS, quantiles=quantiles)

    for name in TUNERS:
        if hasattr(getattr(mt, name), "configs"):
            replace_do_bench(getattr(mt, name), short_bench)
    result = {
        "what": what(os.environ.get("TRITON_CACHE_AUTOTUNING")),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke: Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": [],
    }
    print(HEADER)
    g = torch.Generator(device=device).manual_seed(0)
    shapes = session_shapes()
    for model, layer, n, k, m in shapes.decode_jobs() + shapes.prefill_jobs():  # the launcher's own path
        row = dict(model=model, layer=layer, N=n, K=k, M=m, forced_path=None)
        try:
            check_one(row, g, device)
        except Exception as e:  # recorded in the row; the next shape still runs
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:800]}")
        result["rows"].append(row)
        result["all_ok"] = all(r.get("ok") for r in result["rows"])
        write(result, out_path)
        print(table_line(row))
        if device == "cuda":
            torch.cuda.empty_cache()
    result["gemv_kernels"], result["gemv_sass_opcodes"] = compiled_kernel_stats(mt._mxfp4_gemv_kernel, device == "cuda")
    write(result, out_path)
    for row in result["gemv_kernels"]:
        print(f"[tune] gemv kernel: {row}")
    n_ok = sum(bool(r.get("ok")) for r in result["rows"])
    print(f"[tune] {n_ok} of {len(result['rows'])} tuned kernels match the twin -> {out_path}")
    return 0 if n_ok == len(result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
