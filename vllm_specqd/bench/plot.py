"""PNG charts of a benchmark run (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup_acceptance(records: list[dict], path: Path) -> Path:
    """Left: speedup vs none per method; right: mean accepted length of every level per method."""
    plt = _pyplot()
    ok = [r for r in records if "error" not in r]
    names = [r["method"] for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))

    speedups = [r.get("speedup_vs_none") or 0.0 for r in ok]
    left.bar(names, speedups, color="tab:blue")
    left.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    left.set_ylabel("speedup vs none (tok/s ratio)")
    left.set_title("Throughput relative to no speculation")

    depth = max((len(r["levels"]) for r in ok), default=0)
    width = 0.8 / max(depth, 1)
    for level in range(1, depth + 1):
        values = [(r["levels"].get(str(level)) or {}).get("mean_accepted_length") or 0.0 for r in ok]
        offsets = [i + (level - 1 - (depth - 1) / 2) * width for i in range(len(ok))]
        right.bar(offsets, values, width=width, label=f"level {level}")
    right.set_xticks(range(len(ok)), names)
    right.set_ylabel("mean accepted length (tokens per verification)")
    right.set_title("Acceptance per level")
    if depth:
        right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_served(records: list[dict], path: Path) -> Path:
    """Output tokens/s and median request latency against concurrency, one line per method."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    concurrency = sorted({lv["concurrency"] for r in records for lv in r.get("concurrency_levels", [])})
    for record in records:
        levels = [lv for lv in record.get("concurrency_levels", []) if "error" not in lv]
        if not levels:
            continue
        x = [lv["concurrency"] for lv in levels]
        left.plot(x, [lv["output_tokens_per_s"] for lv in levels], marker="o", label=record["method"])
        right.plot(x, [lv["latency_s"]["p50"] for lv in levels], marker="o", label=record["method"])
    for axis, label in ((left, "output tokens/s"), (right, "median request latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrency, [str(c) for c in concurrency])
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(label)
        axis.legend()
    left.set_title("Served throughput")
    right.set_title("Served latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
