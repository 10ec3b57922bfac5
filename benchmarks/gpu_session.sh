#!/usr/bin/env bash
# One short GPU session for the MXFP4 Triton kernels (kernels/triton_mxfp4.py): correctness on CUDA,
# then the kernel and decode-step benchmarks. Written for a lent machine with torch + triton + pytest
# + numpy and nothing else (no vLLM, the repo not pip-installed, no network).
#
#     OUT=/some/dir bash benchmarks/gpu_session.sh        # from the repo root (it cd's there anyway)
#     OUT=/some/dir SPECQD_SESSION_SHORT=1 bash benchmarks/gpu_session.sh   # ~3-4 min, see below
#
# Everything is logged to $OUT/session.log; results land in $OUT (at most 7 files, no subfolders):
#   session.log                        the whole log (the summary is its last part)
#   kernel_check.json                  tuned configs of every benchmarked shape, checked against the torch twin
#   bench_kernels.json                 bench_kernels.py, Llama-3.1 8B + 70B linears, M in 1,2,4,8,16
#   bench_decode_step.json             bench_decode_step.py, Llama-3.1-8B, batch 1,2,4,8,16
#   bench_kernels_prefill_tiled.json   bench_kernels.py --force-path tiled, 8B, M in 64,256,1024,4096
#   bench_kernels_prefill_dequant.json bench_kernels.py --force-path dequant, same shapes
#   summary.txt                        the closing summary
#
# Steps, each under `timeout` and inside one overall budget (SPECQD_BUDGET_S, default 420 s), so a
# hung step cannot eat the device time; later steps shrink or are skipped when time runs short:
#  1. info: nvidia-smi, versions, where vllm_specqd is imported from, a trivial Triton kernel.
#  2. tests: the CUDA tests of tests/test_kernels.py (plus the launcher / split-K tests), pytest
#     --noconftest (tests/conftest.py imports vLLM), sharded over parallel processes because compiling
#     is CPU-bound. A small pytest plugin replaces the autotuner's timing runs with a seeded random
#     pick, so each tuning key checks one pseudo-random config instead of compiling and timing all of
#     them (the plugin prints which configs were exercised). The interpreter tests are skipped
#     (SPECQD_RUN_INTERP=1 adds them at the end, budget permitting).
#  3. precompile: every autotune config of every benchmarked shape is compiled in parallel workers
#     (worker i compiles (config, shape) pairs i, i+W, ...) into the shared Triton cache.
#  4. tune + check: one process autotunes every benchmarked key with a shorter do_bench (warmup 5 ms,
#     rep 25 ms instead of 25/100) and TRITON_CACHE_AUTOTUNING=1, and checks each tuned kernel's
#     output against the torch twin with the tests' error bound -> kernel_check.json (with the
#     decode kernels' registers / spills / shared memory and two SASS opcode histograms). The decode
#     benchmarks below run with TRITON_CACHE_AUTOTUNING=1 and reuse the gemv picks. The tiled kernel's
#     picks stay in memory: its tuning key holds a tl.dtype, which Triton's autotune disk cache cannot
#     json-dump (TypeError), so the prefill runs tune it themselves with TRITON_CACHE_AUTOTUNING=0.
#  5. bench_kernels.py (8B + 70B, M 1..16)   6. bench_decode_step.py (8B, batch 1..16)
#  7. prefill crossover (tiled vs dequant)   8. summary (also $OUT/summary.txt)
#
# Knobs (env): OUT, SPECQD_BUDGET_S (420), SPECQD_WORK_DIR (/tmp/specqd_gpu_session: package copy,
# Triton cache, shard logs), SPECQD_TEST_SHARDS, SPECQD_PRECOMPILE_WORKERS, SPECQD_RUN_INTERP=1,
# SPECQD_SKIP_PREFILL=1, SPECQD_SESSION_SMOKE=1 (no GPU: tiny shapes, kernels in the Triton
# interpreter, CPU twins; only checks that this script's plumbing works).
# SPECQD_SESSION_SHORT=1: budget 280 s, M / batch in {1, 4, 16}, fewer timing iterations, no tiled
# kernel (precompile, check) and no prefill crossover; writes session.log, kernel_check.json,
# bench_kernels.json, bench_decode_step.json, summary.txt. Meant to fit a 5-minute device slot.

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD
OUT=${OUT:-$REPO/gpu_session_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SHORT=${SPECQD_SESSION_SHORT:-0}
export SPECQD_SESSION_SHORT=$SHORT
BUDGET=${SPECQD_BUDGET_S:-$([[ $SHORT == 1 ]] && echo 280 || echo 420)}
RESERVE=25 # seconds kept for the summary
SMOKE=${SPECQD_SESSION_SMOKE:-0}
WORK=${SPECQD_WORK_DIR:-/tmp/specqd_gpu_session}
NCPU=$(nproc 2>/dev/null || echo 4)
SHARDS=${SPECQD_TEST_SHARDS:-$((NCPU >= 8 ? 6 : (NCPU >= 4 ? 2 : 1)))}
WORKERS=${SPECQD_PRECOMPILE_WORKERS:-$((NCPU >= 14 ? 12 : (NCPU > 2 ? NCPU - 2 : 1)))}

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TRITON_CACHE_DIR=$WORK/triton_cache
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# ----------------------------------------------------------------------------- package + helpers
# kernels/ ships as vllm_specqd.kernels (pyproject package-dir): rebuild that layout in a fresh copy.
rm -rf "$WORK/pkg" "$WORK/helpers" "$WORK"/logs
mkdir -p "$WORK/pkg" "$WORK/helpers" "$WORK/logs" "$TRITON_CACHE_DIR"
cp -r vllm_specqd "$WORK/pkg/"
rm -rf "$WORK/pkg/vllm_specqd/kernels"
cp -r kernels "$WORK/pkg/vllm_specqd/kernels"
export PYTHONPATH="$WORK/pkg:$WORK/helpers${PYTHONPATH:+:$PYTHONPATH}"

cat >"$WORK/helpers/specqd_gpu_info.py" <<'PY'
"""Versions, import paths and one trivial Triton kernel (fails fast if Triton cannot compile/launch)."""
import os
import platform
import sys

import numpy
import pytest
import torch

print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"numpy {numpy.__version__}  pytest {pytest.__version__}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"triton: IMPORT FAILED {e!r}")
import vllm_specqd
import vllm_specqd.kernels as K

print(f"vllm_specqd from {os.path.dirname(vllm_specqd.__file__)}; kernels from {os.path.dirname(K.__file__)}; "
      f"HAS_TRITON={K.HAS_TRITON}")
if not torch.cuda.is_available():
    print("CUDA: not available")
    sys.exit(0)
p = torch.cuda.get_device_properties(0)
print(f"CUDA device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB; {torch.cuda.device_count()} device(s)")
import triton
import triton.language as tl


@triton.jit
def _add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


x = torch.randn(1000, device="cuda")
y = torch.randn(1000, device="cuda")
out = torch.empty_like(x)
_add[(triton.cdiv(1000, 256),)](x, y, out, 1000, BLOCK=256)
print(f"triton smoke kernel: {'ok' if torch.equal(out, x + y) else 'WRONG RESULT'}")
PY

cat >"$WORK/helpers/specqd_gpu_autotune_plugin.py" <<'PY'
"""pytest plugin (benchmarks/gpu_session.sh): the MXFP4 autotuners pick a seeded random config.

The tests check whichever config the autotuner picks. Timing all configs of every tuning key means
compiling all of them (12 gemv configs x ~40 specializations); here the autotuner's do_bench returns
a seeded random number without running anything, so each key compiles and checks one pseudo-random
config, and different keys exercise different configs. The terminal summary lists them.
"""
import random

_RNG = random.Random(20261204)
_STATE = {"patched": False, "why": "not configured"}
_NAMES = ("_gemv_launch", "_tiled_launch")


def _random_bench(kernel_call, quantiles=None, **kwargs):
    t = _RNG.random()
    return [t, t, t] if quantiles is not None else t


def pytest_configure(config):
    try:
        from vllm_specqd.kernels import triton_mxfp4 as mt
    except Exception as e:  # noqa: BLE001
        _STATE["why"] = f"kernels not importable: {e!r}"
        return
    if mt.INTERPRET:
        _STATE["why"] = "TRITON_INTERPRET: no autotuner"
        return
    for name in _NAMES:
        tuner = getattr(mt, name)
        tuner._do_bench = _random_bench
        tuner.__dict__["do_bench"] = _random_bench  # shadows the cached_property / method
    _STATE.update(patched=True, why="")


def pytest_report_header(config):
    try:
        import vllm_specqd.kernels as K

        where = f"vllm_specqd.kernels from {K.__file__}"
    except Exception as e:  # noqa: BLE001
        where = f"vllm_specqd.kernels NOT importable: {e!r}"
    if _STATE["patched"]:
        return f"specqd: autotune timing replaced by a seeded random pick (one config compiled per key); {where}"
    return f"specqd: autotuner NOT patched ({_STATE['why']}); {where}"


def _short(cfg):
    return f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    tr.write_line("[specqd] " + pytest_report_header(config))  # -q hides the header
    if not _STATE["patched"]:
        return
    from vllm_specqd.kernels import triton_mxfp4 as mt

    for name in _NAMES:
        tuner = getattr(mt, name)
        picks = list(tuner.cache.items())
        distinct = sorted({_short(c) for _, c in picks})
        tr.write_line(f"[specqd] {name}: {len(picks)} tuning keys, {len(distinct)} of {len(tuner.configs)} configs exercised")
        for cfg in distinct:
            tr.write_line(f"[specqd]     {cfg}")
PY

cat >"$WORK/helpers/specqd_gpu_shapes.py" <<'PY'
"""The shapes the session benchmarks (shared by precompile, tune and the summary)."""
import os
import sys

sys.path.insert(0, "benchmarks")
from bench_kernels import MODELS  # noqa: E402

SMOKE = os.environ.get("SPECQD_SESSION_SMOKE") == "1"
SHORT = os.environ.get("SPECQD_SESSION_SHORT") == "1"
if SMOKE:  # tiny, for the interpreter on CPU
    MODELS = {"8b": [("o", 64, 64), ("gate_up", 96, 64), ("down", 40, 96)], "70b": [("o", 32, 64)]}
DECODE_MODELS = ["8b", "70b"]
DECODE_M = [1, 2] if SMOKE else [1, 4, 16] if SHORT else [1, 2, 4, 8, 16]
PREFILL_MODEL = "8b"
PREFILL_M = [17, 33] if SMOKE else [64, 256] if SHORT else [64, 256, 1024, 4096]


def decode_jobs():
    return [(model, layer, n, k, m) for model in DECODE_MODELS for layer, n, k in MODELS[model] for m in DECODE_M]


def prefill_jobs():
    return [(PREFILL_MODEL, layer, n, k, m) for layer, n, k in MODELS[PREFILL_MODEL] for m in PREFILL_M]
PY

cat >"$WORK/helpers/specqd_gpu_precompile.py" <<'PY'
"""Worker I of W: compile (config, call) pairs I, I+W, ... of the gemv/tiled autotuners for every
benchmarked specialization (plus the split-K reduce and dequant kernels) into the shared Triton
cache, so the tune step only loads and times them. Zero weights: nothing here is timed or checked."""
import sys
import time

import torch

from specqd_gpu_shapes import PREFILL_MODEL, SHORT, SMOKE, MODELS, decode_jobs
from vllm_specqd.kernels import mxfp4_matmul_triton
from vllm_specqd.kernels import triton_mxfp4 as mt

nworkers, idx = int(sys.argv[1]), int(sys.argv[2])
device = "cpu" if SMOKE else "cuda"
if device == "cuda" and not torch.cuda.is_available():
    print(f"[precompile {idx}] no CUDA: nothing to do")
    sys.exit(0)

# (tuner, config index or None, (m, n, k, path)); a tuner holding one config runs it without timing.
calls = {"gemv": [(m, n, k, None) for _, _, n, k, m in decode_jobs()]}
if not SHORT:  # the tiled path is opt-in since the 2026-12-04 run; short sessions skip it
    calls["tiled"] = [(32 if SMOKE else 64, n, k, "tiled") for _, n, k in MODELS[PREFILL_MODEL]]
tuners = {"gemv": mt._gemv_launch, "tiled": mt._tiled_launch}
all_configs = {name: list(getattr(t, "configs", [None])) for name, t in tuners.items()}


def wanted(name, ci, call):  # the decode tuner only ever times the configs its pruner keeps for that M
    prune = getattr(mt, "_prune_gemv", None)
    cfg = all_configs[name][ci]
    if name != "gemv" or prune is None or cfg is None:
        return True
    return cfg in prune(all_configs[name], {}, BLOCK_N=mt.gemv_block_n(call[0]))


pairs = [(name, ci, call) for name, cs in calls.items() for call in cs for ci in range(len(all_configs[name]))
         if wanted(name, ci, call)]
mine = pairs[idx::nworkers]
if idx == 0:
    mine.append((None, None, (32 if SMOKE else 64, MODELS[PREFILL_MODEL][0][1], MODELS[PREFILL_MODEL][0][2], "dequant")))
t0, ok, errors = time.time(), 0, {}
for name, ci, (m, n, k, path) in mine:
    if name is not None and ci is not None and all_configs[name][ci] is not None:
        tuners[name].configs = [all_configs[name][ci]]
    packed = torch.zeros(n, k // 2, dtype=torch.uint8, device=device)
    scales = torch.full((n, k // 32), 127, dtype=torch.uint8, device=device)
    x = torch.zeros(m, k, dtype=torch.bfloat16, device=device)
    try:
        mxfp4_matmul_triton(x, packed, scales, force_path=path)
        ok += 1
    except Exception as e:  # noqa: BLE001 -- report every distinct failure, keep going
        cfg = all_configs[name][ci] if name is not None and ci is not None else None
        where = f"{path or 'auto'} M{m} N{n} K{k} {cfg.kwargs if cfg is not None else ''}"
        errors.setdefault(f"{type(e).__name__}: {str(e)[:600]}", []).append(where)
if device == "cuda":
    torch.cuda.synchronize()
print(f"[precompile {idx}/{nworkers}] {ok} of {len(mine)} (config, call) pairs ok in {time.time() - t0:.1f}s")
for msg, where in errors.items():
    print(f"[precompile {idx}/{nworkers}] FAILED ({len(where)}x, e.g. {where[:3]}): {msg}")
sys.exit(1 if errors else 0)
PY

cat >"$WORK/helpers/specqd_gpu_tune.py" <<'PY'
"""Autotune every benchmarked key (short do_bench; TRITON_CACHE_AUTOTUNING=1 stores the picks for the
benchmarks) and check each tuned kernel against the torch twin with the tests' error bound."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, "tests")
from specqd_gpu_shapes import SHORT, SMOKE, decode_jobs, prefill_jobs  # noqa: E402
from test_kernels import compare, gemm_tolerance  # noqa: E402

from vllm_specqd.kernels import mxfp4_matmul_torch, mxfp4_matmul_triton  # noqa: E402
from vllm_specqd.kernels import triton_mxfp4 as mt  # noqa: E402
from vllm_specqd.mxfp4 import dequantize_mxfp4  # noqa: E402

out_path = sys.argv[1]
WARMUP, REP = 5, 25
device = "cpu" if SMOKE else "cuda"
if device == "cuda" and not torch.cuda.is_available():
    print("[tune] no CUDA: nothing to do")
    sys.exit(0)
import triton  # noqa: E402
import triton.testing  # noqa: E402


def short_bench(kernel_call, quantiles=None, **kwargs):
    return triton.testing.do_bench(kernel_call, warmup=WARMUP, rep=REP, quantiles=quantiles)


tuners = {"gemv": getattr(mt, "_gemv_launch", None), "tiled": getattr(mt, "_tiled_launch", None)}
for tuner in tuners.values():
    if hasattr(tuner, "configs"):
        tuner._do_bench = short_bench
        tuner.__dict__["do_bench"] = short_bench
if hasattr(tuners["tiled"], "cache_results"):
    # The tiled key holds DOT_DTYPE (a tl.dtype): Triton's check_disk_cache json-dumps the raw key and
    # raises TypeError (fixed upstream only by triton-lang/triton#9429). Tune it in memory only.
    tuners["tiled"].cache_results = False
result = {
    "what": "each benchmarked (shape, M, path): first call autotunes (do_bench warmup "
    f"{WARMUP} ms, rep {REP} ms; TRITON_CACHE_AUTOTUNING={os.environ.get('TRITON_CACHE_AUTOTUNING')}), then the "
    "output is checked against mxfp4_matmul_torch with tests/test_kernels.py's bound (u=2^-22, +1 ulp for "
    "dequant and M>=1024) and re-run for determinism. Random packed bytes (every code), scales 118..130, bf16 x.",
    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke: Triton interpreter)",
    "torch": torch.__version__,
    "triton": triton.__version__,
    "rows": [],
}
print(f"{'model':>5} {'layer':>8} {'N':>6} {'K':>6} {'M':>5} {'path':>9} {'tune_s':>7} {'ok':>3} {'max_abs_diff':>12} "
      f"{'max_excess':>11}  config")
g = torch.Generator(device=device).manual_seed(0)
# Decode sizes and prefill sizes on the launcher's own path (gemv up to 16 rows, dequant above); full
# sessions also check the opt-in tiled kernel at the prefill sizes.
jobs = [(j, None) for j in decode_jobs()] + [(j, None) for j in prefill_jobs()]
if not SHORT:
    jobs += [(j, "tiled") for j in prefill_jobs()]
for (model, layer, n, k, m), path in jobs:
    row = dict(model=model, layer=layer, N=n, K=k, M=m, forced_path=path)
    try:
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=g)
        scales = torch.randint(118, 131, (n, k // 32), dtype=torch.uint8, device=device, generator=g)
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device, generator=g)
        t0 = time.time()
        y = mxfp4_matmul_triton(x, packed, scales, force_path=path)
        if device == "cuda":
            torch.cuda.synchronize()
        row["first_call_s"] = round(time.time() - t0, 2)
        real = path or ("gemv" if m <= mt.GEMV_MAX_M else "tiled" if m < mt.DEQUANT_MIN_M else "dequant")
        if real == "gemv" and device == "cuda":
            real += f"/sk{mt.gemv_split_k(n, k // 32, mt.gemv_block_n(m), mt._num_sms(x.device.index))}"
        row["path"] = real
        tuner = tuners.get(real.split("/")[0])
        cfg = getattr(tuner, "best_config", None)
        row["config"] = f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}" if cfg is not None else "-"
        y_ref = mxfp4_matmul_torch(x, packed, scales)
        w = dequantize_mxfp4(packed, scales, k=k)
        tol = gemm_tolerance(x, w, None, y, y_ref, y.dtype, u=2.0**-22,
                             extra_ulps=1 if real == "dequant" or m >= 1024 else 0)
        verdict = compare(y, y_ref, tol)
        again = mxfp4_matmul_triton(x, packed, scales, force_path=path)
        verdict["deterministic"] = bool(torch.equal(again, y))
        verdict["ok"] = verdict["ok"] and verdict["deterministic"]
        row.update(verdict)
        del packed, scales, x, y, y_ref, w, tol, again
    except Exception as e:  # noqa: BLE001 -- record, keep going
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:800]}")
    result["rows"].append(row)
    result["all_ok"] = all(r.get("ok") for r in result["rows"])
    with open(out_path, "w") as f:  # after every row: a timeout keeps what was done
        json.dump(result, f, indent=1)
    print(f"{model:>5} {layer:>8} {n:>6} {k:>6} {m:>5} {row.get('path', path or '?'):>9} "
          f"{row.get('first_call_s', float('nan')):>7.2f} {'yes' if row.get('ok') else 'NO':>3} "
          f"{row.get('max_abs_diff', float('nan')):>12.4g} {row.get('max_excess', float('nan')):>11.3g}  "
          f"{row.get('config', '')}{'  ' + row['error'] if 'error' in row else ''}")
    if device == "cuda":
        torch.cuda.empty_cache()


def gemv_kernel_stats():
    """Registers, spills, shared memory of every compiled decode kernel; SASS opcode counts of two."""
    import collections
    import re

    stats, hists = [], {}
    try:
        for cache in mt._mxfp4_gemv_kernel.device_caches.values():
            for kern in list(cache[0].values()):
                md = kern.metadata
                names, consts = mt._mxfp4_gemv_kernel.arg_names, {}
                for key_, v in (getattr(getattr(kern, "src", None), "constants", None) or {}).items():
                    idx = key_[0] if isinstance(key_, tuple) and key_ else key_
                    name = names[idx] if isinstance(idx, int) and idx < len(names) else str(key_)
                    if name.startswith("BLOCK"):
                        consts[name] = v
                row = dict(n_regs=getattr(kern, "n_regs", None), n_spills=getattr(kern, "n_spills", None),
                           shared=getattr(md, "shared", None), warps=getattr(md, "num_warps", None),
                           stages=getattr(md, "num_stages", None), consts=str(consts)[:200])
                stats.append(row)
                if len(hists) < 2 and device == "cuda":
                    try:
                        # Triton's get_sass: one "control-codes<TAB>INSTR operands;" line per instruction
                        ops = collections.Counter()
                        for line in kern.asm["sass"].splitlines():
                            toks = line.split("\t", 1)[-1].split() if "\t" in line else []
                            toks = toks[1:] if toks and toks[0].startswith("@") else toks
                            if toks and re.match(r"[A-Z]", toks[0]):
                                ops[toks[0].rstrip(";")] += 1
                        hists[f"kernel{len(hists)} regs{row['n_regs']} {row['consts']}"] = dict(ops.most_common(40))
                    except Exception as e:  # noqa: BLE001
                        hists[f"kernel{len(hists)}"] = f"no SASS: {type(e).__name__}: {str(e)[:200]}"
    except Exception as e:  # noqa: BLE001
        stats.append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
    return stats, hists


result["gemv_kernels"], result["gemv_sass_opcodes"] = gemv_kernel_stats()
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
for row in result["gemv_kernels"]:
    print(f"[tune] gemv kernel: {row}")
n_ok = sum(bool(r.get("ok")) for r in result["rows"])
print(f"[tune] {n_ok} of {len(result['rows'])} tuned kernels match the twin -> {out_path}")
sys.exit(0 if n_ok == len(result["rows"]) else 1)
PY

cat >"$WORK/helpers/specqd_gpu_summary.py" <<'PY'
"""The closing summary: steps, tests, kernel check, benchmarks (printed and written to summary.txt)."""
import glob
import json
import os
import re
import sys

out_dir, work = sys.argv[1], sys.argv[2]
lines = []


def p(s=""):
    lines.append(s)


def load(name):
    try:
        with open(os.path.join(out_dir, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        p(f"  ({name}: {type(e).__name__})")
        return None


p("=" * 100)
p("SUMMARY")
p("=" * 100)
p("steps (rc 124/137 = timed out):")
try:
    for s in open(os.path.join(work, "logs", "steps.txt")):
        p("  " + s.rstrip())
except OSError:
    p("  (no steps.txt)")

p("")
p("tests (tests/test_kernels.py on CUDA, sharded):")
totals, failed = {}, []
for log in sorted(glob.glob(os.path.join(work, "logs", "tests_shard_*.log"))):
    text = open(log, errors="replace").read()
    tail = [s for s in text.splitlines() if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", s)]
    p(f"  {os.path.basename(log)}: {tail[-1].strip('= ') if tail else 'NO RESULT LINE (timeout or crash?)'}")
    if tail:
        for num, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", tail[-1]):
            totals[what] = totals.get(what, 0) + int(num)
    failed += re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
    for s in text.splitlines():
        if "[specqd]" in s and "tuning keys" in s:
            p("    " + s.strip())
p(f"  total: {totals}")
for t in failed[:40]:
    p(f"  FAILED {t}")

p("")
chk = load("kernel_check.json")
if chk:
    rows = chk["rows"]
    bad = [r for r in rows if not r.get("ok")]
    p(f"kernel check (tuned config of every benchmarked shape vs torch twin): {len(rows) - len(bad)} of {len(rows)} ok")
    for r in bad[:20]:
        p(f"  NOT OK {r['model']} {r['layer']} M={r['M']} {r.get('path', r.get('forced_path'))}: "
          f"{r.get('error') or {k: r.get(k) for k in ('max_abs_diff', 'max_excess', 'nan_ok', 'deterministic')}}")
    ks = chk.get("gemv_kernels") or []
    if ks:
        regs = sorted({k.get("n_regs") for k in ks if k.get("n_regs") is not None})
        spills = sorted({k.get("n_spills") for k in ks if k.get("n_spills") is not None})
        shared = sorted({k.get("shared") for k in ks if k.get("shared") is not None})
        p(f"  decode kernels compiled: {len(ks)}; registers {regs}; spills {spills}; shared bytes {shared}")

p("")
bk = load("bench_kernels.json")
if bk:
    p(f"bench_kernels (decode GEMMs) on {bk.get('machine')}, ceiling {bk.get('bandwidth_ceiling_GBps')} GB/s; "
      "per M: mxfp4 us / %ceiling / speedup vs bf16 [path]")
    by = {}
    for r in bk["results"]:
        by.setdefault((r["model"], r["layer"], r["N"], r["K"]), []).append(r)
    for (model, layer, n, k), rs in by.items():
        cells = "  ".join(f"M{r['M']}: {r['time_us']:.1f}us {r['pct_of_ceiling']:.0f}% {r['speedup_vs_bf16']:.2f}x"
                          f"[{r['path']}]" for r in rs)
        p(f"  {model:>3} {layer:>7} {n:>5}x{k:<5} {cells}")
    m1 = [r for r in bk["results"] if r["M"] == 1 and r["model"] == "8b" and r["layer"] in ("gate_up", "down")]
    p("  target M=1 >= 80% of ceiling (8B gate_up, down): "
      + ", ".join(f"{r['layer']} {r['pct_of_ceiling']:.0f}%" for r in m1))
    s14 = [r for r in bk["results"] if r["M"] <= 4]
    if s14:
        p(f"  target >= 3.0x vs bf16 for M=1..4: min {min(r['speedup_vs_bf16'] for r in s14):.2f}x, "
          f"max {max(r['speedup_vs_bf16'] for r in s14):.2f}x over {len(s14)} rows")
    flat = []
    for (model, layer, n, k), rs in by.items():
        t = {r["M"]: r["time_us"] for r in rs}
        if 1 in t and max(t) > 1:
            flat.append(f"{model} {layer} {t[max(t)] / t[1]:.2f}")
    if flat:
        p(f"  flatness time(M=max)/time(M=1): " + ", ".join(flat))

p("")
ds = load("bench_decode_step.json")
if ds:
    c = ds.get("check", {})
    p(f"bench_decode_step ({ds.get('gpu') or ds.get('device')}, {ds['dims']['layers']} layers, kv_len {ds['kv_len']}"
      f"{', CPU SMOKE' if ds.get('cpu_smoke') else ''}): check max_rel_err {c.get('max_rel_err', float('nan')):.2e} "
      f"argmax_equal {c.get('argmax_equal')} -> {'ok' if c.get('ok') else 'FAILED'}")
    p(f"  {'batch':>5} {'target_ms':>10} {'draft_ms':>10} {'c':>6} {'c_bytes':>8} graphs")
    for r in ds["rows"]:
        p(f"  {r['batch']:>5} {r['target_ms']:>10.3f} {r['draft_ms']:>10.3f} {r['c']:>6.3f} {r['c_bytes']:>8.3f} "
          f"{r['cuda_graphs']}")

p("")
pt = load("bench_kernels_prefill_tiled.json") if os.path.exists(os.path.join(out_dir, "bench_kernels_prefill_tiled.json")) else None
pd = load("bench_kernels_prefill_dequant.json") if os.path.exists(os.path.join(out_dir, "bench_kernels_prefill_dequant.json")) else None
if pt or pd:
    p("prefill (8B): tiled us / dequant us / bf16 us -> faster MXFP4 path (M > 16 runs dequant by default)")
    t = {(r["layer"], r["M"]): r for r in (pt or {}).get("results", [])}
    d = {(r["layer"], r["M"]): r for r in (pd or {}).get("results", [])}
    for key in sorted(set(t) | set(d), key=lambda kv: (kv[0], kv[1])):
        rt, rd = t.get(key), d.get(key)
        tu = rt["time_us"] if rt else float("nan")
        du = rd["time_us"] if rd else float("nan")
        bf = (rt or rd)["bf16_time_us"]
        best = "tiled" if tu < du else "dequant" if du <= tu else "?"
        p(f"  {key[0]:>7} M={key[1]:>5}: tiled {tu:>9.1f}  dequant {du:>9.1f}  bf16 {bf:>9.1f}  -> {best}")

text = "\n".join(lines)
print(text)
with open(os.path.join(out_dir, "summary.txt"), "w") as f:
    f.write(text + "\n")
PY

# ----------------------------------------------------------------------------- session
T0=$SECONDS
left() { echo $((BUDGET - (SECONDS - T0))); }

# step_timeout CAP: the timeout a step may use now (0 = skip it), keeping RESERVE for the summary.
step_timeout() {
    local l=$(($(left) - RESERVE))
    local t=$(($1 < l ? $1 : l))
    if ((t < 15)); then echo 0; else echo "$t"; fi
}

record() { # NAME RC SECONDS
    local flag=""
    if [[ $2 == 124 || $2 == 137 ]]; then flag="  TIMED OUT"; fi
    echo "=== [$1] rc=$2 in ${3}s (session at $((SECONDS - T0))s of ${BUDGET}s)$flag"
    printf '%-22s rc=%-4s %4ss%s\n' "$1" "$2" "$3" "$flag" >>"$WORK/logs/steps.txt"
}

run_step() { # NAME CAP CMD...: one command under timeout, or skipped when the budget is spent
    local name=$1 cap=$2
    shift 2
    local t
    t=$(step_timeout "$cap")
    if ((t == 0)); then
        echo "=== [$name] SKIPPED: $(left)s of budget left"
        printf '%-22s skipped (budget)\n' "$name" >>"$WORK/logs/steps.txt"
        return 0
    fi
    echo
    echo "=== [$name] start: timeout ${t}s, session at $((SECONDS - T0))s: $*"
    local s=$SECONDS
    timeout -k 10 "$t" "$@"
    record "$name" $? $((SECONDS - s))
}

session() {
    echo "=== gpu_session.sh: $(date -u +%FT%TZ), repo $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "=== OUT=$OUT WORK=$WORK budget ${BUDGET}s, ${NCPU} CPUs, test shards $SHARDS, precompile workers $WORKERS, smoke $SMOKE, short $SHORT"

    # 1. info
    echo
    echo "=== [info]"
    nvidia-smi -L 2>&1 || echo "(nvidia-smi failed)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1 || true
    echo "C compiler (Triton builds its launcher with it): $(command -v gcc || command -v cc || command -v clang || echo NONE)"
    python3 -c "import os, sysconfig; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); print('Python.h:', h if os.path.exists(h) else 'MISSING ' + h)"
    run_step info 60 python3 "$WORK/helpers/specqd_gpu_info.py"
    local cuda
    cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
    if [[ $cuda != 1 && $SMOKE != 1 ]]; then
        echo "=== NO CUDA DEVICE: only the test step runs (CUDA tests skip); set SPECQD_SESSION_SMOKE=1 to smoke-test the rest"
    fi

    # 2. tests, sharded (compiling is CPU-bound; the GPU has room for all shards)
    local pytest_args=(--noconftest -p no:cacheprovider -p specqd_gpu_autotune_plugin -q --tb=short -rfE)
    local sel="cuda or launcher or split_k_heuristic"
    local t
    t=$(step_timeout 120)
    echo
    echo "=== [tests] start: $SHARDS shard(s), timeout ${t}s, session at $((SECONDS - T0))s"
    if ((t > 0)); then
        local s=$SECONDS
        # PYTHONSAFEPATH: `python -m` would put the repo root first on sys.path, and its vllm_specqd/
        # (no kernels/ inside) would shadow the assembled copy.
        PYTHONSAFEPATH=1 TRITON_CACHE_AUTOTUNING=0 timeout -k 10 $((t < 60 ? t : 60)) python3 -m pytest "${pytest_args[@]}" --collect-only \
            tests/test_kernels.py -k "$sel" >"$WORK/logs/collect.log" 2>&1
        grep '::' "$WORK/logs/collect.log" >"$WORK/logs/test_ids.txt"
        echo "collected $(wc -l <"$WORK/logs/test_ids.txt") tests (-k '$sel')"
        local rc=0
        if [[ ! -s $WORK/logs/test_ids.txt ]]; then
            echo "COLLECTION FAILED:"
            tail -40 "$WORK/logs/collect.log"
            rc=2
        fi
        awk -v n="$SHARDS" -v d="$WORK/logs" '{print > (d "/ids_" sprintf("%02d", (NR - 1) % n) ".txt")}' "$WORK/logs/test_ids.txt"
        local pids=() f
        for f in "$WORK"/logs/ids_*.txt; do
            [[ -e $f ]] || continue
            local ids=()
            mapfile -t ids <"$f"
            local log=${f/ids_/tests_shard_}
            PYTHONSAFEPATH=1 TRITON_CACHE_AUTOTUNING=0 timeout -k 10 "$t" python3 -m pytest "${pytest_args[@]}" "${ids[@]}" \
                >"${log%.txt}.log" 2>&1 &
            pids+=($!)
        done
        local pid
        for pid in ${pids[@]+"${pids[@]}"}; do
            wait "$pid" || rc=$?
        done
        for f in "$WORK"/logs/tests_shard_*.log; do
            [[ -e $f ]] || continue
            echo "----- $(basename "$f")"
            cat "$f"
        done
        record tests "$rc" $((SECONDS - s))
    else
        echo "=== [tests] SKIPPED"
        printf '%-22s skipped (budget)\n' tests >>"$WORK/logs/steps.txt"
    fi

    if [[ $cuda != 1 && $SMOKE != 1 ]]; then
        run_step summary 60 python3 "$WORK/helpers/specqd_gpu_summary.py" "$OUT" "$WORK"
        return 0
    fi
    local smoke_env=()
    if [[ $SMOKE == 1 ]]; then smoke_env=(TRITON_INTERPRET=1); fi

    # 3. precompile every config of every benchmarked specialization, in parallel
    t=$(step_timeout 100)
    echo
    echo "=== [precompile] start: $WORKERS worker(s), timeout ${t}s, session at $((SECONDS - T0))s"
    if ((t > 0)); then
        local s=$SECONDS pids=() i rc=0 pid
        for ((i = 0; i < WORKERS; i++)); do
            env ${smoke_env[@]+"${smoke_env[@]}"} TRITON_CACHE_AUTOTUNING=0 timeout -k 10 "$t" \
                python3 "$WORK/helpers/specqd_gpu_precompile.py" "$WORKERS" "$i" >"$WORK/logs/precompile_$i.log" 2>&1 &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do
            wait "$pid" || rc=$?
        done
        cat "$WORK"/logs/precompile_*.log
        record precompile "$rc" $((SECONDS - s))
    fi

    # 4. tune + check (picks stored for the benchmarks)
    export TRITON_CACHE_AUTOTUNING=1
    run_step tune+check 100 env ${smoke_env[@]+"${smoke_env[@]}"} python3 "$WORK/helpers/specqd_gpu_tune.py" "$OUT/kernel_check.json"

    if [[ $SMOKE == 1 ]]; then
        # No GPU: bench_kernels' GPU-path run() on the twin (one small layer), the decode step's CPU smoke.
        local bk='import sys, json, argparse; sys.path.insert(0, "benchmarks"); import bench_kernels as b
r = b.run(argparse.Namespace(models="8b", layers="o", m=sys.argv[2], iters=2, cpu=False, force_path=None, split_k=None))
r["command"] = "smoke"; json.dump(r, open(sys.argv[1], "w"), indent=1)'
        run_step bench_kernels 100 env PYTHONSAFEPATH=1 python3 -c "$bk" "$OUT/bench_kernels.json" 1,2
        run_step bench_decode_step 100 python3 benchmarks/bench_decode_step.py --cpu-smoke --out "$OUT/bench_decode_step.json"
        run_step prefill_tiled 60 env PYTHONSAFEPATH=1 python3 -c "$bk" "$OUT/bench_kernels_prefill_tiled.json" 17
    else
        local ms="1,2,4,8,16" iters=20 batches="1,2,4,8,16" step_iters=30
        if [[ $SHORT == 1 ]]; then ms="1,4,16" iters=10 batches="1,4,16" step_iters=20; fi
        # 5. decode GEMMs, 8B + 70B
        run_step bench_kernels 150 python3 benchmarks/bench_kernels.py --models 8b,70b --m "$ms" --iters "$iters" \
            --out "$OUT/bench_kernels.json"
        # 6. one decode step, Llama-3.1-8B shapes, CUDA graphs
        run_step bench_decode_step 150 python3 benchmarks/bench_decode_step.py --batch "$batches" --iters "$step_iters" \
            --out "$OUT/bench_decode_step.json"
        # 7. prefill crossover: tiled vs dequant (+ cuBLAS)
        if [[ ${SPECQD_SKIP_PREFILL:-0} != 1 && $SHORT != 1 ]]; then
            # TRITON_CACHE_AUTOTUNING=0: see step 4 (the tiled key cannot go to the autotune disk cache).
            run_step prefill_tiled 90 env TRITON_CACHE_AUTOTUNING=0 python3 benchmarks/bench_kernels.py --models 8b \
                --m 64,256,1024,4096 --force-path tiled --iters 10 --out "$OUT/bench_kernels_prefill_tiled.json"
            run_step prefill_dequant 45 env TRITON_CACHE_AUTOTUNING=0 python3 benchmarks/bench_kernels.py --models 8b \
                --m 64,256,1024,4096 --force-path dequant --iters 10 --out "$OUT/bench_kernels_prefill_dequant.json"
        fi
    fi
    unset TRITON_CACHE_AUTOTUNING

    # optional: the interpreter tests (one CPU subprocess)
    if [[ ${SPECQD_RUN_INTERP:-0} == 1 ]]; then
        run_step interp_tests 150 env PYTHONSAFEPATH=1 python3 -m pytest --noconftest -p no:cacheprovider -q --tb=short tests/test_kernels.py \
            -k "interpreter_matches_twin or (triton_dequant_bit_exact and not cuda)"
    fi

    # 8. summary (RESERVE keeps room for it)
    echo
    RESERVE=0
    run_step summary 30 python3 "$WORK/helpers/specqd_gpu_summary.py" "$OUT" "$WORK"
}

session 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"
