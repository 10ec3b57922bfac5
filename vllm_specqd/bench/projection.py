"""PROJECTION (not a measurement): expected batch-1 speedup for an 8B target from measured acceptance.

Standard expected-speedup model of speculative decoding (Leviathan et al.,
2023): with a_i the measured fraction of rounds whose i-th level-1 draft
token was accepted, a round yields E = 1 + sum_i a_i tokens for one target
step. A round costs one target step plus the drafts' forward passes, each
priced relative to a target step:

    speedup = E / (1 + sum_L p_L * c_L)

p_L: measured per-request forward passes of level L's model per round (K
for one level; fewer with inner levels). c_L: one pass of level L's model /
one target decode step at batch 1 (``benchmarks/bench_decode_step.py``
measures c for the MXFP4 self-draft). An n-gram level costs 0. Assumptions:
at batch 1 a pass over a few tokens (verify window, multi-level window)
costs what a one-token step costs (memory-bound); the 8B target's MXFP4
draft accepts as the benchmarked model's did.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_specqd.bench.report import markdown_table

HYPOTHETICAL_C = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
# The paper's headline end-to-end speedups over BF16 (arXiv 2503.13565, CPU / AI-PC setting).
PAPER = {
    "specqd-1": "up to 2.0x (paper: MXFP4 draft, one level)",
    "specqd-ngram": "up to 2.72x (paper: ML-SpecQD, multi-level)",
    "specqd-small": "up to 2.72x (paper: ML-SpecQD, multi-level)",
}


def expected_tokens_per_round(per_position: list[float]) -> float:
    """E[tokens per target step] = 1 (bonus) + sum of per-position acceptance rates."""
    return 1.0 + sum(per_position)


def projected_speedup(per_position: list[float], passes_and_costs: list[tuple[float, float]]) -> float:
    """E / (1 + sum of passes-per-round * cost-per-pass), see the module docstring."""
    return expected_tokens_per_round(per_position) / (1.0 + sum(p * c for p, c in passes_and_costs))


def level_costs(record: dict, c1: float, c2: float | None) -> list[tuple[float, float]]:
    """(passes per round, cost per pass) for each model level of a method's benchmark record."""
    out = []
    for level, entry in sorted(record["levels"].items(), key=lambda item: int(item[0])):
        if entry.get("passes_per_round") is None:
            continue  # an n-gram level: no model, cost 0
        if level == "1":
            cost = c1
        elif c2 is None:
            raise ValueError(f"{record['method']}: level {level} is a model; give its cost with --c2")
        else:
            cost = c2
        out.append((entry["passes_per_round"], cost))
    return out


def measured_c(path: str | Path, batch: int = 1) -> float:
    """c at ``batch`` from a ``bench_decode_step.py`` JSON; refuses CPU smoke output."""
    data = json.loads(Path(path).read_text())
    if data.get("cpu_smoke") or data.get("device") != "cuda":
        raise ValueError(f"{path} is a CPU smoke run: it measures nothing about a GPU; pass --c or no c")
    for row in data["rows"]:
        if row["batch"] == batch:
            return row["c"]
    raise ValueError(f"{path} has no row for batch {batch}")


def _projectable(results: dict) -> list[dict]:
    # specqd only (not adaptive): its level 1 drafts K tokens every round, so E = 1 + sum(a_i) holds per step.
    # (vLLM's n-gram skips rounds it has no match for; draft_model's full copy is priced at c = 1 anyway.)
    return [
        r
        for r in results["methods"]
        if r["method"].startswith("specqd")
        and not r.get("adaptive")  # its rounds draft 0..K tokens
        and "error" not in r
        and r.get("levels", {}).get("1", {}).get("per_position")
    ]


def _c2_for(results: dict, c1: float, c2: float | None) -> float | None:
    """Default small-model cost: c1 scaled by its layer count (ignores its lm_head)."""
    if c2 is not None:
        return c2
    meta = results["meta"]
    if meta.get("small_layers") and meta.get("target_layers"):
        return c1 * meta["small_layers"] / meta["target_layers"]
    return None


def _speedup_cell(record: dict, c1: float, c2: float | None) -> tuple[str, str]:
    """(cost text, speedup text) of one method at draft cost c1 (and small-model cost c2)."""
    try:
        costs = level_costs(record, c1, c2)
    except ValueError as error:
        return "n/a", str(error)
    cost_text = " + ".join(f"{p:.2f} x {c:.3g}" for p, c in costs) or "0 (n-gram)"
    return cost_text, f"{projected_speedup(record['levels']['1']['per_position'], costs):.2f}x"


def project(results: dict, c1: float | None, c2: float | None = None, c_source: str = "") -> str:
    """The projection as Markdown: one row per speculative method."""
    records = _projectable(results)
    lines = ["# PROJECTION, not a measurement: batch-1 speedup for an 8B target", __doc__.split("\n\n", 1)[1]]
    if c1 is not None:
        lines.append(f"c (MXFP4 self-draft pass / target step) = {c1:.3g}, from {c_source}.")
        c2_used = _c2_for(results, c1, c2)
        if c2 is None and c2_used is not None:
            lines.append(f"Small-model level: c2 = c x small layers / target layers = {c2_used:.3g} (assumed).")
        cost_headers = ["draft cost per round (passes x c)", "projected speedup"]

        def cost_cells(record: dict) -> list[str]:
            return list(_speedup_cell(record, c1, c2_used))

    else:
        lines.append(
            "**NO c WAS MEASURED** (no GPU run of benchmarks/bench_decode_step.py was given): the columns are "
            "HYPOTHETICAL values of c. Small-model levels use c x small layers / target layers."
        )
        cost_headers = [f"c={c:g} (hypothetical)" for c in HYPOTHETICAL_C]

        def cost_cells(record: dict) -> list[str]:
            return [_speedup_cell(record, c, _c2_for(results, c, c2))[1] for c in HYPOTHETICAL_C]

    headers = ["method", "E[tokens/target step]", *cost_headers, "paper (measured there)"]
    rows = [
        [
            r["method"],
            f"{expected_tokens_per_round(r['levels']['1']['per_position']):.2f}",
            *cost_cells(r),
            PAPER.get(r["method"], "-"),
        ]
        for r in records
    ]
    lines.append(markdown_table(headers, rows))
    lines.append(
        "n-gram levels are priced at 0 (host cost ignored). The paper's figures are end-to-end measurements "
        "on its own models and CPUs, shown for orientation only."
    )
    return "\n\n".join(lines) + "\n"


def run_projection(results_path: str | Path, c1: float | None, c2: float | None, c_json: str | None) -> str:
    results = json.loads(Path(results_path).read_text())
    source = f"--c {c1}" if c1 is not None else ""
    if c1 is None and c_json:
        c1, source = measured_c(c_json), f"{c_json} (batch 1)"
    text = project(results, c1, c2, source)
    out = Path(results_path).with_name("projection.md")
    out.write_text(text)
    return text + f"\n(written to {out})\n"
