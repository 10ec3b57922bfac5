"""Phase 8 (summary): steps, tests, kernel check and timings in one page, printed and written to summary.txt.

    python3 -m benchmarks.gpu.summary OUT WORK

Reads WORK/logs/steps.txt and tests_shard_*.log, and the JSON files the other phases wrote to OUT.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RULE = "=" * 100
RESULT_LINE = re.compile(r"\b(passed|failed|error|skipped|no tests ran)\b")
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected)")
MAX_FAILED_TESTS, MAX_BAD_CHECKS = 40, 20


class Report:
    """The summary's lines, and the JSON files it reads from ``out_dir`` (a missing one adds a note)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.lines: list[str] = []

    def p(self, s: str = "") -> None:
        self.lines.append(s)

    def load(self, name: str, if_exists: bool = False) -> dict | None:
        path = self.out_dir / name
        if if_exists and not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            self.p(f"  ({name}: {type(e).__name__})")
            return None

    def text(self) -> str:
        return "\n".join(self.lines)


def steps(r: Report, steps_txt: str | None) -> None:
    r.p("steps (rc 124/137 = timed out):")
    if steps_txt is None:
        r.p("  (no steps.txt)")
        return
    for s in steps_txt.splitlines():
        r.p("  " + s.rstrip())


def tests(r: Report, shard_logs: dict[str, str]) -> None:
    """One result line per shard log (name -> text), the exercised-config lines, totals, failures."""
    r.p("tests (tests/test_kernels.py on CUDA, sharded):")
    totals, failed = {}, []
    for name, text in sorted(shard_logs.items()):
        tail = [s for s in text.splitlines() if RESULT_LINE.search(s)]
        r.p(f"  {name}: {tail[-1].strip('= ') if tail else 'NO RESULT LINE (timeout or crash?)'}")
        if tail:
            for num, kind in COUNT.findall(tail[-1]):
                totals[kind] = totals.get(kind, 0) + int(num)
        failed += re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
        for s in text.splitlines():
            if "[specqd]" in s and "tuning keys" in s:
                r.p("    " + s.strip())
    r.p(f"  total: {totals}")
    for t in failed[:MAX_FAILED_TESTS]:
        r.p(f"  FAILED {t}")


def kernel_check(r: Report) -> None:
    chk = r.load("kernel_check.json")
    if not chk:
        return
    rows = chk["rows"]
    bad = [row for row in rows if not row.get("ok")]
    ok = f"{len(rows) - len(bad)} of {len(rows)} ok"
    r.p(f"kernel check (tuned config of every benchmarked shape vs torch twin): {ok}")
    for row in bad[:MAX_BAD_CHECKS]:
        detail = row.get("error") or {k: row.get(k) for k in ("max_abs_diff", "max_excess", "nan_ok", "deterministic")}
        r.p(f"  NOT OK {row['model']} {row['layer']} M={row['M']} {row.get('path', row.get('forced_path'))}: {detail}")
    ks = chk.get("gemv_kernels") or []
    if ks:

        def seen(key: str) -> list:
            return sorted({k.get(key) for k in ks if k.get(key) is not None})

        r.p(
            f"  decode kernels compiled: {len(ks)}; registers {seen('n_regs')}; spills {seen('n_spills')}; "
            f"shared bytes {seen('shared')}"
        )


def bench_kernels(r: Report) -> None:
    bk = r.load("bench_kernels.json")
    if not bk:
        return
    results = bk["results"]
    r.p(
        f"bench_kernels (decode GEMMs) on {bk.get('machine')}, ceiling {bk.get('bandwidth_ceiling_GBps')} GB/s; "
        "per M: mxfp4 us / %ceiling / speedup vs bf16 [path]"
    )
    by: dict[tuple, list[dict]] = {}
    for row in results:
        by.setdefault((row["model"], row["layer"], row["N"], row["K"]), []).append(row)
    for (model, layer, n, k), rows in by.items():
        cells = "  ".join(
            f"M{x['M']}: {x['time_us']:.1f}us {x['pct_of_ceiling']:.0f}% {x['speedup_vs_bf16']:.2f}x[{x['path']}]"
            for x in rows
        )
        r.p(f"  {model:>3} {layer:>7} {n:>5}x{k:<5} {cells}")
    m1 = [x for x in results if x["M"] == 1 and x["model"] == "8b" and x["layer"] in ("gate_up", "down")]
    r.p(
        "  target M=1 >= 80% of ceiling (8B gate_up, down): "
        + ", ".join(f"{x['layer']} {x['pct_of_ceiling']:.0f}%" for x in m1)
    )
    s14 = [x["speedup_vs_bf16"] for x in results if x["M"] <= 4]
    if s14:
        r.p(f"  target >= 3.0x vs bf16 for M=1..4: min {min(s14):.2f}x, max {max(s14):.2f}x over {len(s14)} rows")
    flat = []
    for (model, layer, _, _), rows in by.items():
        t = {x["M"]: x["time_us"] for x in rows}
        if 1 in t and max(t) > 1:
            flat.append(f"{model} {layer} {t[max(t)] / t[1]:.2f}")
    if flat:
        r.p("  flatness time(M=max)/time(M=1): " + ", ".join(flat))


def decode_step(r: Report) -> None:
    ds = r.load("bench_decode_step.json")
    if not ds:
        return
    c = ds.get("check", {})
    r.p(
        f"bench_decode_step ({ds.get('gpu') or ds.get('device')}, {ds['dims']['layers']} layers, kv_len {ds['kv_len']}"
        f"{', CPU SMOKE' if ds.get('cpu_smoke') else ''}): check max_rel_err {c.get('max_rel_err', float('nan')):.2e} "
        f"argmax_equal {c.get('argmax_equal')} -> {'ok' if c.get('ok') else 'FAILED'}"
    )
    r.p(f"  {'batch':>5} {'target_ms':>10} {'draft_ms':>10} {'c':>6} {'c_bytes':>8} graphs")
    for x in ds["rows"]:
        r.p(
            f"  {x['batch']:>5} {x['target_ms']:>10.3f} {x['draft_ms']:>10.3f} {x['c']:>6.3f} {x['c_bytes']:>8.3f} "
            f"{x['cuda_graphs']}"
        )


def prefill(r: Report) -> None:
    pd = r.load("bench_kernels_prefill_dequant.json", if_exists=True)
    if not pd:
        return
    r.p("prefill (8B, M > 16 runs dequant): dequant us / bf16 us -> speedup vs bf16")
    for x in sorted(pd.get("results", []), key=lambda x: (x["layer"], x["M"])):
        r.p(
            f"  {x['layer']:>7} M={x['M']:>5}: dequant {x['time_us']:>9.1f}  bf16 {x['bf16_time_us']:>9.1f}  "
            f"-> {x['speedup_vs_bf16']:.2f}x"
        )


def summarize(out_dir: Path, steps_txt: str | None, shard_logs: dict[str, str]) -> str:
    r = Report(out_dir)
    r.p(RULE)
    r.p("SUMMARY")
    r.p(RULE)
    steps(r, steps_txt)
    r.p("")
    tests(r, shard_logs)
    for section in (kernel_check, bench_kernels, decode_step, prefill):
        r.p("")
        section(r)
    return r.text()


def read_logs(work: Path) -> tuple[str | None, dict[str, str]]:
    """(steps.txt or None, {shard log name: text}) of a session's work folder."""
    logs = Path(work) / "logs"
    try:
        steps_txt = (logs / "steps.txt").read_text()
    except OSError:
        steps_txt = None
    return steps_txt, {f.name: f.read_text(errors="replace") for f in sorted(logs.glob("tests_shard_*.log"))}


def main(argv: list[str] | None = None) -> int:
    out_dir, work = (Path(a) for a in (argv if argv is not None else sys.argv[1:])[:2])
    text = summarize(out_dir, *read_logs(work))
    print(text)
    (out_dir / "summary.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
