"""One decode step of a Llama-3.1-8B-shaped model: BF16 target vs MXFP4 self-draft, cost ratio c.

    python benchmarks/bench_decode_step.py                      # CUDA: 32 layers, batch 1..16, CUDA graphs
    python benchmarks/bench_decode_step.py --layers 8 --batch 1,4 --kv-len 2048
    python benchmarks/bench_decode_step.py --cpu-smoke          # no GPU: tiny dims, same code path, measures nothing

Random weights (timing does not depend on values). Per layer: RMSNorm, fused QKV
projection, RoPE, attention of one new token over a KV cache of --kv-len tokens
(SDPA, grouped-query), output projection, RMSNorm, SwiGLU MLP; then the final
norm and the lm_head. The target's linears are BF16 ``F.linear``; the draft's
are ``vllm_specqd.kernels.mxfp4_matmul`` on ``quantize_mxfp4`` of the same
weights. As in the adapter, the draft shares the target's embedding, lm_head
(BF16) and norms, and has its own KV cache.

c = draft step time / target step time at the same batch size; the projection
(``python -m vllm_specqd bench --project-from results.json --c-json OUT``)
uses c at batch 1. ``c_bytes`` is the memory-bound reference: bytes the draft
step must read / bytes the target step must read.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from vllm_specqd.kernels import HAS_TRITON, mxfp4_matmul
from vllm_specqd.mxfp4 import quantize_mxfp4


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


LLAMA_31_8B = Dims(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
SMOKE = Dims(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=1024)
SMOKE_KV_LEN, SMOKE_BATCHES, SMOKE_ITERS = 64, "1,2", 3
RMS_EPS = 1e-5
ROPE_THETA = 500000.0
# Both sides round every op to BF16; only the GEMM accumulation order differs.
CHECK_TOLERANCE = 5e-2


class BF16Linear:
    def __init__(self, weight: torch.Tensor):  # [N, K] bf16
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [B, K] -> [B, N]
        return F.linear(x, self.weight)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class MXFP4Linear:
    def __init__(self, weight: torch.Tensor):  # [N, K] bf16, quantized here
        q = quantize_mxfp4(weight, scale_rule="floor")
        self.packed, self.scales, self.k = q.packed, q.scales, q.k  # [N, K/2] u8, [N, K/32] u8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [B, K] -> [B, N]
        return mxfp4_matmul(x, self.packed, self.scales)

    def dequantized(self) -> BF16Linear:
        """The same weights as a BF16 linear (MXFP4 values are exact in BF16): the check's reference."""
        from vllm_specqd.mxfp4 import dequantize_mxfp4

        return BF16Linear(dequantize_mxfp4(self.packed, self.scales, self.k, torch.bfloat16))

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel()


@dataclass
class Layer:
    qkv: object
    o: object
    gate_up: object
    down: object
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # [B, H], [H]
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B, heads, D], [D], [D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecodeModel:
    """Target or draft: the layer stack, its own KV cache, and the shared embedding / lm_head / final norm."""

    def __init__(self, dims: Dims, layers: list[Layer], shared: dict, kv_len: int, max_batch: int, device):
        self.dims, self.layers, self.shared, self.kv_len = dims, layers, shared, kv_len
        shape = (max_batch, dims.kv_heads, kv_len + 1, dims.head_dim)
        # Random context; the step writes the new token's K/V at index kv_len (a fixed slot: graph-safe).
        self.k_cache = [torch.randn(shape, dtype=torch.bfloat16, device=device) for _ in layers]
        self.v_cache = [torch.randn(shape, dtype=torch.bfloat16, device=device) for _ in layers]
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, dims.head_dim, 2, device=device).float() / dims.head_dim)
        angles = torch.cat((kv_len * inv_freq, kv_len * inv_freq))  # [head_dim]
        self.cos, self.sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)

    def attention(self, i: int, qkv: torch.Tensor) -> torch.Tensor:  # [B, (heads + 2 kv) * D] -> [B, heads * D]
        d, b = self.dims, qkv.shape[0]
        q, k, v = qkv.split([d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim], dim=-1)
        q = rope(q.view(b, d.heads, d.head_dim), self.cos, self.sin)
        k = rope(k.view(b, d.kv_heads, d.head_dim), self.cos, self.sin)
        self.k_cache[i][:b, :, self.kv_len] = k
        self.v_cache[i][:b, :, self.kv_len] = v.view(b, d.kv_heads, d.head_dim)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), self.k_cache[i][:b], self.v_cache[i][:b], enable_gqa=True
        )  # [B, heads, 1, D]
        return out.reshape(b, d.heads * d.head_dim)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:  # [B] int64 -> [B, vocab] logits
        x = self.shared["embed"][token_ids]  # [B, hidden]
        for i, layer in enumerate(self.layers):
            x = x + layer.o(self.attention(i, layer.qkv(rms_norm(x, layer.input_norm))))
            gate, up = layer.gate_up(rms_norm(x, layer.post_norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return F.linear(rms_norm(x, self.shared["final_norm"]), self.shared["lm_head"])

    def bytes_read(self, batch: int) -> int:
        """Bytes one step must read: linear weights + lm_head + the batch's KV cache."""
        d = self.dims
        weights = sum(lin.nbytes() for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        kv = len(self.layers) * 2 * batch * d.kv_heads * (self.kv_len + 1) * d.head_dim * 2
        return weights + self.shared["lm_head"].numel() * 2 + kv


def build_models(dims: Dims, kv_len: int, max_batch: int, device) -> tuple[DecodeModel, DecodeModel]:
    """(target, draft) over the same random weights; the draft's linears are their MXFP4 direct cast."""
    torch.manual_seed(0)

    def weight(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, device=device) * k**-0.5).to(torch.bfloat16)

    shared = {
        "embed": weight(dims.vocab, dims.hidden),
        "lm_head": weight(dims.vocab, dims.hidden),
        "final_norm": torch.ones(dims.hidden, dtype=torch.bfloat16, device=device),
    }
    target_layers, draft_layers = [], []
    qkv_out = (dims.heads + 2 * dims.kv_heads) * dims.head_dim
    for _ in range(dims.layers):
        ws = {
            "qkv": weight(qkv_out, dims.hidden),
            "o": weight(dims.hidden, dims.heads * dims.head_dim),
            "gate_up": weight(2 * dims.intermediate, dims.hidden),
            "down": weight(dims.hidden, dims.intermediate),
        }
        norms = {
            name: torch.ones(dims.hidden, dtype=torch.bfloat16, device=device) for name in ("input_norm", "post_norm")
        }
        target_layers.append(Layer(**{k: BF16Linear(w) for k, w in ws.items()}, **norms))
        draft_layers.append(Layer(**{k: MXFP4Linear(w) for k, w in ws.items()}, **norms))
    return (
        DecodeModel(dims, target_layers, shared, kv_len, max_batch, device),
        DecodeModel(dims, draft_layers, shared, kv_len, max_batch, device),
    )


@torch.inference_mode()
def check_draft(draft: DecodeModel, device) -> dict:
    """The draft step through the MXFP4 kernels must match the same step on the dequantized BF16 weights."""
    token_ids = torch.arange(1, device=device)
    reference = copy.copy(draft)  # same KV cache, RoPE and shared weights; only the linears differ
    reference.layers = [
        Layer(
            layer.qkv.dequantized(),
            layer.o.dequantized(),
            layer.gate_up.dequantized(),
            layer.down.dequantized(),
            layer.input_norm,
            layer.post_norm,
        )
        for layer in draft.layers
    ]
    got, want = draft.step(token_ids).float(), reference.step(token_ids).float()
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rel_err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    return {
        "max_rel_err": rel_err,
        "argmax_equal": bool((got.argmax(-1) == want.argmax(-1)).all()),
        "ok": rel_err < CHECK_TOLERANCE,
    }


def time_cuda(step, token_ids: torch.Tensor, iters: int, graphs: bool) -> tuple[float, bool]:
    """Median ms of one step (CUDA events); with ``graphs`` the step is captured once and replayed."""
    for _ in range(3):  # Triton autotunes on first calls: never inside a capture
        step(token_ids)
    torch.cuda.synchronize()

    def run():
        step(token_ids)

    if graphs:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(token_ids)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(token_ids)
            run = graph.replay
        except RuntimeError as error:  # report it and time eagerly rather than lose the row
            print(f"# CUDA graph capture failed ({error}); timing this row eagerly", file=sys.stderr)
            torch.cuda.synchronize()
            graphs = False
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), graphs


def time_cpu(step, token_ids: torch.Tensor, iters: int) -> float:
    step(token_ids)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step(token_ids)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_step(step, token_ids: torch.Tensor, iters: int, graphs: bool) -> tuple[float, bool]:
    """(median ms per step, whether CUDA graphs were used)."""
    if token_ids.is_cuda:
        return time_cuda(step, token_ids, iters, graphs)
    return time_cpu(step, token_ids, iters), False


@torch.inference_mode()
def measure(target: DecodeModel, draft: DecodeModel, batches: list[int], iters: int, device, graphs: bool):
    rows = []
    for batch in batches:
        token_ids = torch.randint(0, target.dims.vocab, (batch,), device=device)
        t_ms, t_graph = time_step(target.step, token_ids, iters, graphs)
        d_ms, d_graph = time_step(draft.step, token_ids, iters, graphs)
        row = {
            "batch": batch,
            "target_ms": t_ms,
            "draft_ms": d_ms,
            "c": d_ms / t_ms,
            "c_bytes": draft.bytes_read(batch) / target.bytes_read(batch),
            "cuda_graphs": t_graph and d_graph,
        }
        rows.append(row)
        print(
            f"{batch:>5} {t_ms:>11.3f} {d_ms:>11.3f} {row['c']:>7.3f} {row['c_bytes']:>8.3f} "
            f"{'yes' if row['cuda_graphs'] else 'no':>7}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=LLAMA_31_8B.layers, help="decoder layers (fewer: less memory, time)")
    p.add_argument("--batch", default="1,2,4,8,16", help="comma list of batch sizes (one decode token each)")
    p.add_argument("--kv-len", type=int, default=1024, help="context tokens already in the KV cache")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--no-cuda-graphs", action="store_true", help="time eager launches (includes launch overhead)")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help=f"CPU, tiny dims {asdict(SMOKE)}, no CUDA graphs: exercises the code path, measures nothing",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default results/bench_decode_step.json, or ..._cpu_smoke.json with --cpu-smoke)",
    )
    args = p.parse_args(argv)

    if args.cpu_smoke:
        device, dims, graphs = torch.device("cpu"), SMOKE, False
        args.kv_len, args.batch, args.iters = SMOKE_KV_LEN, SMOKE_BATCHES, SMOKE_ITERS
        print("# CPU SMOKE RUN: tiny dims, torch twin of the MXFP4 kernels; these times say nothing about a GPU.")
    elif not torch.cuda.is_available():
        print(
            "# No CUDA GPU: nothing measured, no JSON written. This harness times GPU decode steps;\n"
            "# run it on a CUDA machine, or pass --cpu-smoke to exercise the code path on CPU."
        )
        return 0
    else:
        device, dims, graphs = torch.device("cuda"), LLAMA_31_8B, not args.no_cuda_graphs
        dims = Dims(**{**asdict(dims), "layers": args.layers})
        print(
            f"# device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}, "
            f"Triton kernels: {'yes' if HAS_TRITON else 'NO (torch twin)'}"
        )
    batches = [int(b) for b in args.batch.split(",")]
    print(f"# model: {asdict(dims)}, kv_len {args.kv_len}, CUDA graphs: {graphs}")
    target, draft = build_models(dims, args.kv_len, max(batches), device)
    check = check_draft(draft, device)
    print(
        f"# check: MXFP4 draft step vs the same step on dequantized weights: max rel err "
        f"{check['max_rel_err']:.2e}, argmax equal: {check['argmax_equal']} -> {'ok' if check['ok'] else 'FAILED'}"
    )
    print(f"{'batch':>5} {'target_ms':>11} {'draft_ms':>11} {'c':>7} {'c_bytes':>8} {'graphs':>7}")
    rows = measure(target, draft, batches, args.iters, device, graphs)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton_kernels": HAS_TRITON and device.type == "cuda",
        "cpu_smoke": args.cpu_smoke,
        "dims": asdict(dims),
        "kv_len": args.kv_len,
        "iters": args.iters,
        "timing": "CUDA events, median per step" if device.type == "cuda" else "wall-clock median per step",
        "check": check,
        "rows": rows,
        "command": " ".join(["python benchmarks/bench_decode_step.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    # A smoke run never overwrites a GPU measurement.
    out = args.out or f"results/bench_decode_step{'_cpu_smoke' if args.cpu_smoke else ''}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"# wrote {out}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
