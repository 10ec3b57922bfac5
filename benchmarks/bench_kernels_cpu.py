"""CPU mode of bench_kernels.py: one whole model's linears per pass, weights streamed from DRAM.

    python benchmarks/bench_kernels.py --cpu                     # all models, M in {1,2,4,8,16}, 1 and 2 threads
    python benchmarks/bench_kernels.py --cpu --models qwen2.5-1.5b --m 1,2,4,8,16 --threads 1

Every layer of a pass is a distinct tensor (more bytes than L3 in total), so each pass reads its
weights from DRAM, as a real forward does. Side by side, in one run:

* the multi-row MXFP4 kernel (``kernels/cpu/multirow.h``) on each ISA path: AVX-512 VNNI, AVX-512 BW, AVX2;
* the per-row MXFP4 kernels on each ISA path, with int16 (W4A16) and int8 (W4A8) activations;
* the AMX MXFP4 kernel;
* vLLM's CPU GEMM (``dispatch_cpu_unquantized_gemm``: oneDNN, or torch where oneDNN declines) in bf16 and fp32;
* specqd's few-row bf16 GEMM (``kernels/cpu/bf16_gemm.h``) on the same bf16 weights;
* vLLM's ``cpu_gemm_wna16`` (int4, group 32), where this vLLM build has it.

A kernel runs only where the CPU has its ISA; elsewhere its row says why (no SIGILL on any CPU).
Rows are written to the JSON and the markdown as they come, so a crash keeps what ran. GB/s counts
the weight bytes a pass must read; the ceiling is ``stream_read`` (vector loads over 1 GiB) measured
in the same run with the same thread count.

The large-M table (``--large-m``, e.g. 256,2048 rows: prefill and vLLM's profile runs) times a few
decoder layers of the model: the multi-row kernel with its large-M path off, the path itself
(exact dequantization + one GEMM) and vLLM's bf16 GEMM.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vllm_specqd.bench.cpu_info import cpu_description
from vllm_specqd.kernels import cpu_ops

# hidden, q width, kv width, intermediate, layers; lm_head rows (vocab) or 0.
MODELS = {
    "smollm2-135m": dict(hidden=576, q=576, kv=192, inter=1536, layers=30, vocab=0),
    "qwen2.5-0.5b": dict(hidden=896, q=896, kv=128, inter=4864, layers=24, vocab=0),
    "qwen2.5-1.5b": dict(hidden=1536, q=1536, kv=256, inter=8960, layers=28, vocab=0),
    # Two layers already exceed L3 many times over; more would only cost memory (fp32 copies).
    "llama3.1-8b-2l": dict(hidden=4096, q=4096, kv=1024, inter=14336, layers=2, vocab=0),
}
QUICK = dict(models="smollm2-135m", m="1,8", threads="1", reps=2, large_m="")
ISAS = ("avx512vnni", "avx512bw", "avx2")
NEVER = -1  # large_m of the multi-row op: no row count takes its dequantize + GEMM path


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
    note: str = ""


@dataclass
class Report:
    date: str
    cpu: str
    flags: list[str]
    isas: list[str]
    command: str
    ceilings_gbps: dict[int, float]
    rows: list[Row] = field(default_factory=list)
    large_m_rows: list[Row] = field(default_factory=list)
    out: Path | None = None

    def add(self, row: Row, large_m: bool = False) -> None:
        """Record a row and rewrite the JSON and markdown, so a crash keeps what ran."""
        if row.ms:
            row.gbps = row.weight_bytes / (row.ms / 1e3) / 1e9
            ceiling = self.ceilings_gbps.get(row.threads)
            row.pct_ceiling = 100 * row.gbps / ceiling if ceiling else None
        (self.large_m_rows if large_m else self.rows).append(row)
        print(
            f"  {row.model} {row.method} t={row.threads} M={row.m}: " + (f"{row.ms:.1f} ms" if row.ms else row.note),
            flush=True,
        )
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "out"}
        self.out.write_text(json.dumps(data, indent=1))
        self.out.with_suffix(".md").write_text(markdown(self))


def layer_shapes(spec: dict) -> list[tuple[int, int]]:
    """(N, K) of every linear in one pass, in forward order."""
    h = spec["hidden"]
    per_layer = [(spec["q"] + 2 * spec["kv"], h), (h, spec["q"]), (2 * spec["inter"], h), (h, spec["inter"])]
    shapes = per_layer * spec["layers"]
    if spec["vocab"]:
        shapes.append((spec["vocab"], h))
    return shapes


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


def _inputs(shapes, m: int, dtype=torch.bfloat16):
    return [torch.randn(m, k, dtype=dtype) for _, k in shapes]


def _missing_isa(isa: str, isas: list[str]) -> str | None:
    return None if isa in isas else f"{isa}: this CPU lacks the ISA (it runs {', '.join(isas) or 'none'})"


def bench_model(report: Report, name: str, spec: dict, ms: list[int], threads: int, reps: int) -> None:
    shapes = layer_shapes(spec)
    params = sum(n * k for n, k in shapes)
    mx_bytes = params * 17 // 32
    isas = report.isas

    def rows(method: str, nbytes: int, make_calls, why_not: str | None = None) -> None:
        for m in ms:
            if why_not:
                report.add(Row(name, method, threads, m, None, nbytes, note=why_not))
            else:
                report.add(Row(name, method, threads, m, time_pass(make_calls(m), reps), nbytes))

    weights = mxfp4_weights(shapes)
    repacked = [cpu_ops.multirow_repack(p, s) for p, s in weights]
    for isa in ISAS:
        rows(
            f"mxfp4 multirow {isa}",
            mx_bytes,
            lambda m, isa=isa, ws=repacked: [
                (lambda x=x, c=c, t=t, n=n: cpu_ops.mxfp4_linear_multirow_repacked(x, c, t, n, None, isa))
                for x, (c, t), (n, _) in zip(_inputs(shapes, m), ws, shapes)
            ],
            _missing_isa(isa, isas),
        )
    del repacked
    for isa in ISAS:
        for act_bits in (8, 16):
            rows(
                f"mxfp4 {isa} w4a{act_bits}",
                mx_bytes,
                lambda m, a=act_bits, isa=isa, ws=weights: [
                    (lambda x=x, p=p, s=s: cpu_ops.mxfp4_linear_cpu(x, p, s, None, a, isa))
                    for x, (p, s) in zip(_inputs(shapes, m), ws)
                ],
                _missing_isa(isa, isas),
            )
    amx = cpu_ops.amx_available()
    repacked = [cpu_ops.amx_repack(p, s) for p, s in weights] if amx else []
    rows(
        "mxfp4 amx w4abf16",
        mx_bytes,
        lambda m, ws=repacked: [
            (lambda x=x, r=r, n=n: cpu_ops.mxfp4_linear_amx_repacked(x, r, n))
            for x, r, (n, _) in zip(_inputs(shapes, m), ws, shapes)
        ],
        None if amx else "amx: this CPU (or its kernel) has no AMX-BF16",
    )
    del weights, repacked
    for dtype, label in ((torch.bfloat16, "vllm bf16"), (torch.float32, "vllm fp32")):
        layers = vllm_gemm_layers(shapes, dtype)
        rows(
            label,
            params * dtype.itemsize,
            lambda m, d=dtype, ls=layers: [
                (lambda x=x, layer=layer: layer.cpu_linear(x, layer.weight, None))
                for x, layer in zip(_inputs(shapes, m, d), ls)
            ],
        )
        if dtype == torch.bfloat16:  # specqd's bf16 GEMM on the same weights (what target_gemm.py installs)
            rows(
                "specqd bf16",
                params * 2,
                lambda m, ls=layers: [
                    (lambda x=x, w=layer.weight: cpu_ops.bf16_linear_cpu(x, w))
                    for x, layer in zip(_inputs(shapes, m), ls)
                ],
                _missing_isa("avx2", isas),
            )
        del layers
    bench_wna16(report, name, shapes, ms, threads, reps, params, amx)


def bench_wna16(report: Report, name, shapes, ms, threads, reps, params, amx: bool) -> None:
    from vllm import _custom_ops as ops

    nbytes = params // 2 + params // 32 * 2
    # vLLM picks "amx" only where the CPU has AMX tiles (vllm/.../mixed_precision/cpu.py _get_isa_hint).
    hint = "amx" if amx else "vec"
    method = f"vllm wna16 int4 g32 ({hint})"
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        note = "vllm wna16: not in this vLLM build (torch.ops._C has no cpu_gemm_wna16)"
        for m in ms:
            report.add(Row(name, method, threads, m, None, nbytes, note=note))
        return
    weights = wna16_weights(shapes)
    for m in ms:
        calls = [
            (
                lambda x=x, w=w, s=s: ops.cpu_gemm_wna16(
                    input=x, q_weight=w, scales=s, zeros=None, bias=None, pack_factor=8, isa_hint=hint
                )
            )
            for x, (w, s) in zip(_inputs(shapes, m), weights)
        ]
        report.add(Row(name, method, threads, m, time_pass(calls, reps), nbytes))


def bench_large_m(report: Report, name: str, spec: dict, ms: list[int], threads: int, reps: int, layers: int) -> None:
    """Many rows through a few decoder layers: the multi-row kernel alone, its large-M path, vLLM's bf16."""
    shapes = layer_shapes({**spec, "layers": layers, "vocab": 0})
    params = sum(n * k for n, k in shapes)
    label = f"{name} ({layers} layer{'s' if layers > 1 else ''})"
    best = report.isas[0] if report.isas else None
    weights = mxfp4_weights(shapes)
    repacked = [cpu_ops.multirow_repack(p, s) for p, s in weights]
    del weights
    for method, large_m in ((f"mxfp4 multirow {best} kernel", NEVER), ("mxfp4 multirow large-M path", 0)):
        for m in ms:
            if best is None:
                report.add(Row(label, method, threads, m, None, 0, note="no AVX2: no native kernel"), large_m=True)
                continue
            calls = [
                (
                    lambda x=x, c=c, t=t, n=n, lm=large_m: cpu_ops.mxfp4_linear_multirow_repacked(
                        x, c, t, n, None, best, lm
                    )
                )
                for x, (c, t), (n, _) in zip(_inputs(shapes, m), repacked, shapes)
            ]
            report.add(Row(label, method, threads, m, time_pass(calls, reps), params * 17 // 32), large_m=True)
    del repacked
    vllm_layers = vllm_gemm_layers(shapes, torch.bfloat16)
    for m in ms:
        calls = [
            (lambda x=x, layer=layer: layer.cpu_linear(x, layer.weight, None))
            for x, layer in zip(_inputs(shapes, m), vllm_layers)
        ]
        report.add(Row(label, "vllm bf16", threads, m, time_pass(calls, reps), params * 2), large_m=True)


def _table(rows: list[Row], relative: bool) -> list[str]:
    ms = sorted({r.m for r in rows})
    lines = [
        "| model | threads | method | " + " | ".join(f"M={m}" for m in ms) + " |",
        "|---|---|---|" + "---|" * len(ms),
    ]
    find = {(r.model, r.threads, r.method, r.m): r for r in rows}
    for model, threads, method in dict.fromkeys((r.model, r.threads, r.method) for r in rows):
        first = find.get((model, threads, method, ms[0]))
        cells = []
        for m in ms:
            r = find.get((model, threads, method, m))
            bf16 = find.get((model, threads, "vllm bf16", m))
            if r is None or r.ms is None:
                cells.append("n/a")
                continue
            cell = f"{r.ms:.1f}"
            if relative and m == ms[0] and r.pct_ceiling:
                cell += f" ({r.pct_ceiling:.0f}%)"
            elif relative and first and first.ms:
                cell += f" ({r.ms / first.ms:.2f}x)"
            if bf16 and bf16.ms and method != "vllm bf16":
                cell += f" [{bf16.ms / r.ms:.2f}]"
            cells.append(cell)
        lines.append(f"| {model} | {threads} | {method} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: Report) -> str:
    lines = [
        f"CPU: {report.cpu}; flags: {' '.join(report.flags)}; native kernel ISAs: {', '.join(report.isas)}; "
        f"date {report.date}.",
        f"Command: `{report.command}`.",
        "Read ceiling (stream_read, 1 GiB): "
        + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in sorted(report.ceilings_gbps.items())),
        "",
        "ms per whole-model pass of the linears (median). First M: (% of the read ceiling); other M: "
        "(x its own first M); [speedup over vLLM bf16 at the same M].",
        "",
        *_table(report.rows, relative=True),
    ]
    if report.large_m_rows:
        lines += [
            "",
            "Large M: ms per pass of the layers named (median); [speedup over vLLM bf16 at the same M]. "
            f"`kernel`: the multi-row kernel alone; `large-M path`: its exact dequantization + one GEMM "
            f"(used above cpu_ops.LARGE_M_ROWS = {cpu_ops.LARGE_M_ROWS} rows; negative: never).",
            "",
            *_table(report.large_m_rows, relative=False),
        ]
    notes = {r.note for r in (*report.rows, *report.large_m_rows) if r.note}
    lines += [""] + [f"* {n}" for n in sorted(notes)]
    return "\n".join(lines) + "\n"


def run_cpu(
    models: list[str],
    ms: list[int],
    threads_list: list[int],
    reps: int,
    out: Path,
    large_ms: list[int] = (),
    large_m_layers: int = 1,
    command: str = "",
) -> Report:
    cpu, flags = cpu_description()
    isas = cpu_ops.cpu_isas()
    report = Report(dt.datetime.now().isoformat(timespec="seconds"), cpu, flags, isas, command, {}, out=out)
    print(f"[bench_kernels --cpu] {cpu}; flags {' '.join(flags)}; native ISAs {isas}", flush=True)
    for threads in threads_list:
        torch.set_num_threads(threads)
        report.ceilings_gbps[threads] = read_ceiling_gbps(reps)
        report.save()
        for name in models:
            print(f"[bench_kernels --cpu] {name}, {threads} thread(s)", flush=True)
            bench_model(report, name, MODELS[name], ms, threads, reps)
            if large_ms:
                bench_large_m(report, name, MODELS[name], list(large_ms), threads, max(1, reps // 2), large_m_layers)
    print(markdown(report))
    return report
