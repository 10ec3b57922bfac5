"""CPU mode of bench_kernels.py: one whole model's linears per pass, weights streamed from DRAM.

    python benchmarks/bench_kernels.py --cpu                     # all models, M in {1,2,4,8,16}, 1 and 2 threads
    python benchmarks/bench_kernels.py --cpu --models smollm2-135m --m 1,8 --threads 1

Every layer of a pass is a distinct tensor (more bytes than L3 in total), so each pass reads its
weights from DRAM, as a real forward does. Side by side, in one run:

* the native MXFP4 kernel on each ISA path this CPU has, with int16 (W4A16) and int8 (W4A8) activations;
* vLLM's CPU GEMM (``dispatch_cpu_unquantized_gemm``: oneDNN, or torch where oneDNN declines) in bf16 and fp32;
* specqd's few-row bf16 GEMM (``kernels/cpu/bf16_gemm.h``) on the same bf16 weights;
* vLLM's ``cpu_gemm_wna16`` (int4, group 32), where this vLLM build has it.

GB/s counts the weight bytes a pass must read; the ceiling is ``stream_read`` (vector loads over
1 GiB) measured in the same run with the same thread count.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vllm_specqd.kernels import cpu_ops

# hidden, q width, kv width, intermediate, layers; lm_head rows (vocab) or 0.
MODELS = {
    "smollm2-135m": dict(hidden=576, q=576, kv=192, inter=1536, layers=30, vocab=0),
    "qwen2.5-0.5b": dict(hidden=896, q=896, kv=128, inter=4864, layers=24, vocab=0),
    # Two layers already exceed L3 many times over; more would only cost memory (fp32 copies).
    "llama3.1-8b-2l": dict(hidden=4096, q=4096, kv=1024, inter=14336, layers=2, vocab=0),
}
QUICK = dict(models="smollm2-135m", m="1,8", threads="1", reps=2)


@dataclass
class Row:
    model: str
    method: str
    threads: int
    m: int
    ms: float | None
    weight_bytes: int
    gbps: float | None = None
    pct_ceiling: float | None = None
    speedup_vs_bf16: float | None = None
    note: str = ""


@dataclass
class Report:
    date: str
    cpu: str
    flags: list[str]
    isas: list[str]
    ceilings_gbps: dict[int, float]
    rows: list[Row] = field(default_factory=list)


def layer_shapes(spec: dict) -> list[tuple[int, int]]:
    """(N, K) of every linear in one pass, in forward order."""
    h = spec["hidden"]
    per_layer = [(spec["q"] + 2 * spec["kv"], h), (h, spec["q"]), (2 * spec["inter"], h), (h, spec["inter"])]
    shapes = per_layer * spec["layers"]
    if spec["vocab"]:
        shapes.append((spec["vocab"], h))
    return shapes


def cpu_description() -> tuple[str, list[str]]:
    name, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                wanted = (
                    "avx2",
                    "fma",
                    "f16c",
                    "avx512f",
                    "avx512bw",
                    "avx512_vnni",
                    "avx512_bf16",
                    "avx512vbmi",
                    "amx_tile",
                )
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in wanted if f in have]
                break
    except OSError:
        pass
    return name, flags


def time_pass(calls, reps: int) -> float:
    """Median ms of one pass over ``calls`` (each a zero-arg function), after one warm pass."""
    for call in calls:
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def read_ceiling_gbps(reps: int) -> float:
    buf = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8)
    cpu_ops.stream_read(buf)
    times = []
    for _ in range(max(3, reps)):
        start = time.perf_counter()
        cpu_ops.stream_read(buf)
        times.append(time.perf_counter() - start)
    return buf.numel() / statistics.median(times) / 1e9


def mxfp4_weights(shapes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = []
    for n, k in shapes:
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 126, (n, k // 32), dtype=torch.uint8, generator=g)
        weights.append((packed, scales))
    return weights


def vllm_gemm_layers(shapes, dtype: torch.dtype):
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layers = []
    for n, k in shapes:
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.randn(n, k, dtype=dtype) * 0.02, requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        layers.append(layer)
    return layers


def wna16_weights(shapes):
    from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    weights = []
    for n, k in shapes:
        q = torch.randint(0, 16, (k, n), dtype=torch.int32)
        w = pack_quantized_values_into_int32(q, scalar_types.uint4b8, 1)
        w = w.view(k, -1, 2).permute(1, 0, 2).reshape(-1, k * 2).contiguous()
        s = (torch.rand(k // 32, n) * 0.01).to(torch.bfloat16)
        weights.append((w, s))
    return weights


def bench_model(name: str, spec: dict, ms: list[int], threads: int, reps: int, isas: list[str], ceiling: float):
    shapes = layer_shapes(spec)
    params = sum(n * k for n, k in shapes)
    mx_bytes = params * 17 // 32
    rows: list[Row] = []
    weights = mxfp4_weights(shapes)
    for isa in isas:
        for act_bits in (16, 8):
            for m in ms:
                xs = [torch.randn(m, k, dtype=torch.bfloat16) for _, k in shapes]
                calls = [
                    (lambda x=x, p=p, s=s, a=act_bits, i=isa: cpu_ops.mxfp4_linear_cpu(x, p, s, None, a, i))
                    for x, (p, s) in zip(xs, weights)
                ]
                rows.append(Row(name, f"mxfp4 {isa} w4a{act_bits}", threads, m, time_pass(calls, reps), mx_bytes))
    if cpu_ops.amx_available():
        repacked = [cpu_ops.amx_repack(p, s) for p, s in weights]
        for m in ms:
            xs = [torch.randn(m, k, dtype=torch.bfloat16) for _, k in shapes]
            calls = [
                (lambda x=x, r=r, n=n: cpu_ops.mxfp4_linear_amx_repacked(x, r, n))
                for x, r, (n, _) in zip(xs, repacked, shapes)
            ]
            rows.append(Row(name, "mxfp4 amx w4abf16", threads, m, time_pass(calls, reps), mx_bytes))
    del weights
    for dtype, label in ((torch.bfloat16, "vllm bf16"), (torch.float32, "vllm fp32")):
        layers = vllm_gemm_layers(shapes, dtype)
        for m in ms:
            xs = [torch.randn(m, k, dtype=dtype) for _, k in shapes]
            calls = [(lambda x=x, layer=layer: layer.cpu_linear(x, layer.weight, None)) for x, layer in zip(xs, layers)]
            rows.append(Row(name, label, threads, m, time_pass(calls, reps), params * dtype.itemsize))
            if dtype == torch.bfloat16:  # specqd's bf16 GEMM on the same weights (what target_gemm.py installs)
                calls = [(lambda x=x, w=layer.weight: cpu_ops.bf16_linear_cpu(x, w)) for x, layer in zip(xs, layers)]
                rows.append(Row(name, "specqd bf16", threads, m, time_pass(calls, reps), params * 2))
        del layers
    rows += bench_wna16(name, shapes, ms, threads, reps, params)
    bf16 = {r.m: r.ms for r in rows if r.method == "vllm bf16"}
    for r in rows:
        if r.ms:
            r.gbps = r.weight_bytes / (r.ms / 1e3) / 1e9
            r.pct_ceiling = 100 * r.gbps / ceiling
            r.speedup_vs_bf16 = bf16[r.m] / r.ms if bf16.get(r.m) else None
    return rows


def bench_wna16(name, shapes, ms, threads, reps, params) -> list[Row]:
    from vllm import _custom_ops as ops

    nbytes = params // 2 + params // 32 * 2
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        note = "not in this vLLM build (torch.ops._C has no cpu_gemm_wna16)"
        return [Row(name, "vllm wna16 int4 g32", threads, m, None, nbytes, note=note) for m in ms]
    weights = wna16_weights(shapes)
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, dtype=torch.bfloat16) for _, k in shapes]
        calls = [
            (
                lambda x=x, w=w, s=s: ops.cpu_gemm_wna16(
                    input=x, q_weight=w, scales=s, zeros=None, bias=None, pack_factor=8, isa_hint="amx"
                )
            )
            for x, (w, s) in zip(xs, weights)
        ]
        rows.append(Row(name, "vllm wna16 int4 g32", threads, m, time_pass(calls, reps), nbytes))
    return rows


def markdown(report: Report) -> str:
    lines = [
        f"CPU: {report.cpu}; flags: {' '.join(report.flags)}; native kernel ISAs: {', '.join(report.isas)}; "
        f"date {report.date}.",
        "Read ceiling (stream_read, 1 GiB): "
        + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in sorted(report.ceilings_gbps.items())),
        "",
        "| model | threads | method | " + " | ".join(f"M={m}" for m in sorted({r.m for r in report.rows})) + " |",
    ]
    ms = sorted({r.m for r in report.rows})
    lines.append("|---|---|---|" + "---|" * len(ms))
    keys = dict.fromkeys((r.model, r.threads, r.method) for r in report.rows)
    for model, threads, method in keys:
        cells = []
        for m in ms:
            r = next(
                (r for r in report.rows if (r.model, r.threads, r.method, r.m) == (model, threads, method, m)), None
            )
            if r is None or r.ms is None:
                cells.append("n/a")
            else:
                speed = f", {r.speedup_vs_bf16:.2f}x" if r.speedup_vs_bf16 and method != "vllm bf16" else ""
                cells.append(f"{r.ms:.1f} ms ({r.gbps:.1f} GB/s, {r.pct_ceiling:.0f}%{speed})")
        lines.append(f"| {model} | {threads} | {method} | " + " | ".join(cells) + " |")
    notes = {r.note for r in report.rows if r.note}
    lines += [""] + [f"* {n}" for n in sorted(notes)]
    return "\n".join(lines) + "\n"


def run_cpu(models: list[str], ms: list[int], threads_list: list[int], reps: int, out: Path) -> Report:
    cpu, flags = cpu_description()
    isas = cpu_ops.cpu_isas()
    report = Report(dt.datetime.now().isoformat(timespec="seconds"), cpu, flags, isas, {})
    for threads in threads_list:
        torch.set_num_threads(threads)
        report.ceilings_gbps[threads] = read_ceiling_gbps(reps)
        for name in models:
            print(f"[bench_kernels --cpu] {name}, {threads} thread(s)", flush=True)
            report.rows += bench_model(name, MODELS[name], ms, threads, reps, isas, report.ceilings_gbps[threads])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(report), indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report
