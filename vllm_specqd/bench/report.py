"""results.md / results.json for a benchmark run: run metadata, tables, and a definition of every column."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from vllm_specqd.bench.methods import SAME_GEMM_BASELINE

MiB = 2**20
DECISION_BUDGET_SHARE = 0.01  # the adaptive policy's decision may cost this share of step time

OFFLINE_COLUMNS = {
    "method": "speculative method (see the method list below)",
    "levels": "speculation levels: 1 = a proposer for the target; 2, 3 = proposers for the level above",
    "tok/s": "generated tokens / wall time of the timed `LLM.generate` calls (engine start and warm-up excluded)",
    "speedup": "tok/s / tok/s of the baseline (`none`; without it in the run, `none-specqd-gemm`) in the same run",
    "start s": "engine start-up: LLM() construction (load, MXFP4 cast, compile, profile, KV cache, warm-up)",
    "identical": "greedy output token ids equal to those of the baseline (`none`; without it in the run, `none-specqd-gemm`) for every prompt (same dtype), else the count that differ",
    "L1 acc. len": "level-1 mean accepted length: 1 + accepted / drafts (vLLM metrics; bonus token included)",
    "L1 acc. rate": "level-1 accepted / proposed draft tokens (vLLM metrics)",
    "target passes/tok": "target forward passes per generated token, per request: (prefills + verify steps + "
    "plain decode steps) / generated tokens; 1.00 without speculation",
    "L1 passes/tok": "forward passes of the level-1 draft model per generated token, per request",
    "L1 passes/draft tok": "forward passes of the level-1 draft model per level-1 draft token, per request: "
    "1.00 for one level (K passes for K tokens); below 1 when inner levels let one pass check several tokens",
    "c": "measured in the engine (specqd level report, CPU): the level-1 draft's mean forward pass over the "
    "target's mean forward pass during the timed run (at batch 1: one drafted token vs one K+1-token verification); "
    "with inner model levels, each one's after it (L1 / L2 / ...: a small model's pass, lm_head included)",
    "+weights MiB": "weight bytes speculation adds over the target: for specqd what each level's model really "
    "added in the engine (level report: MXFP4 codes + scales, a small model's own embeddings and norms), a full "
    "copy of the checkpoint for draft_model",
    "+CPU copy MiB": "the once-dequantized copy of every MXFP4 linear that vLLM's CPU GEMM runs on "
    "(draft.cpu_kernel 'dequantized' only; 0 for the native kernel and on CUDA)",
    "KV": "each model level's KV cache, level 1 first: shared (reads and writes the target's own KV, "
    "no KV bytes of its own) or separate (its own KV layers)",
    "+KV B/tok": "KV-cache bytes per token the drafts add: from the specqd level report (0 for a shared-KV "
    "level 1), 2 * layers * kv_heads * head_dim * element size for draft_model, 0 for n-gram and suffix",
    "KV cap. tok": "KV-cache capacity of the engine in tokens: the drafts share the target's KV budget, so it "
    "shrinks by target / (target + added) bytes per token; results.json checks it against the layer count",
}

LEVEL_COLUMNS = {
    "level": "1 proposes to the target; L >= 2 proposes to level L-1",
    "proposer": "what proposes at this level",
    "proposed / accepted": "draft tokens this level proposed / of those, accepted by the level above",
    "acc. rate": "accepted / proposed",
    "mean acc. len": "tokens the level above gains per verification (accepted + 1 bonus)",
    "passes/tok": "this level's model forward passes per generated token, per request (n-gram: none)",
    "passes/L1 draft tok": "the same per level-1 draft token",
    "ms/pass": "model levels: the mean wall time of one forward pass (lm_head included), timed in the worker",
    "c": "model levels: ms/pass over the target's mean forward pass in the same run",
    "per-position (L1)": "level 1 only: fraction of drafts whose i-th token was accepted, i = 1..K",
}


def machine_description() -> str:
    import torch

    from vllm_specqd.bench.cpu_info import cpu_description

    cpu, flags = cpu_description()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu} ({' '.join(flags) or 'no AVX2'}), {os.cpu_count()} cores, {gpu}"


def run_metadata(extra: dict) -> dict:
    import torch

    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # the report must not die on a version lookup
        vllm_version = "unknown"
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm_version,
        "command": "python -m vllm_specqd " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if Path(sys.argv[0]).name == "__main__.py"
        else " ".join(shlex.quote(a) for a in sys.argv),
        **extra,
    }


def fmt(value, spec: str = ".2f", none: str = "n/a") -> str:
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def definitions(columns: dict[str, str]) -> str:
    return "\n".join(f"* **{name}**: {text}" for name, text in columns.items())


def _identical_cell(record: dict) -> str:
    if record.get("identical_to_none") is None:
        return "n/a"
    return "yes" if record["identical_to_none"] else f"no ({record['num_different']}/{record['num_requests']} differ)"


def table_row(columns, cells: dict[str, str]) -> list[str]:
    """One row in column order; a column without a cell (e.g. in a failed run's row) stays empty."""
    unknown = set(cells) - set(columns)
    assert not unknown, f"cells for no column: {unknown}"
    return [cells.get(name, "") for name in columns]


def offline_cells(record: dict) -> dict[str, str]:
    if "error" in record:
        return {
            "method": record["method"],
            "levels": str(record["num_levels"]),
            "tok/s": f"FAILED: {record['error'][:80]}",
        }
    level1 = record["levels"].get("1", {})
    memory = record["memory"]
    return {
        "method": record["method"],
        "levels": str(record["num_levels"]),
        "tok/s": fmt(record["tokens_per_s"], ".1f"),
        "speedup": fmt(record.get("speedup_vs_none"), ".2f") + ("x" if record.get("speedup_vs_none") else ""),
        "start s": fmt(record.get("engine_start_s"), ".1f"),
        "identical": _identical_cell(record),
        "L1 acc. len": fmt(level1.get("mean_accepted_length")),
        "L1 acc. rate": fmt(level1.get("acceptance_rate")),
        "target passes/tok": fmt(record["target_passes_per_generated_token"]),
        "L1 passes/tok": fmt(level1.get("passes_per_generated_token"), none="-"),
        "L1 passes/draft tok": fmt(level1.get("passes_per_level1_draft_token"), none="-"),
        "c": _cost_cell(record),
        "+weights MiB": fmt(memory["added_weight_bytes"] / MiB, ".1f"),
        "+CPU copy MiB": fmt(memory["cpu_dequantized_copy_bytes"] / MiB, ".1f"),
        "KV": ", ".join(mode for mode in memory.get("kv_cache", {}).values() if mode != "none") or "-",
        "+KV B/tok": fmt(memory["added_kv_bytes_per_token"], "d"),
        "KV cap. tok": fmt(memory["kv_capacity_tokens"], "d"),
    }


def _cost_cell(record: dict) -> str:
    """Level 1's c, then each inner model level's: "0.18" or "0.21 / 0.07"."""
    inner = [
        entry.get("cost_ratio_c")
        for level, entry in sorted(record.get("levels", {}).items())
        if level != "1" and entry.get("cost_ratio_c") is not None
    ]
    return " / ".join(fmt(c, none="-") for c in [record.get("cost_ratio_c"), *inner])


def offline_row(record: dict) -> list[str]:
    return table_row(OFFLINE_COLUMNS, offline_cells(record))


def level_rows(record: dict) -> list[list[str]]:
    rows = []
    for level, entry in record.get("levels", {}).items():
        per_pos = " ".join(f"{p:.2f}" for p in entry.get("per_position", []))
        rows.append(
            [
                record["method"],
                level,
                entry["proposer"],
                f"{entry['proposed_tokens']} / {entry['accepted_tokens']}",
                fmt(entry["acceptance_rate"]),
                fmt(entry["mean_accepted_length"]),
                fmt(entry.get("passes_per_generated_token"), none="-"),
                fmt(entry.get("passes_per_level1_draft_token"), none="-"),
                fmt(entry.get("ms_per_pass"), ".1f", none="-"),
                fmt(entry.get("cost_ratio_c"), none="-"),
                per_pos or "-",
            ]
        )
    return rows


def level_table(records: list[dict]) -> str:
    return markdown_table(["method", *LEVEL_COLUMNS], [row for r in records for row in level_rows(r)])


def implied_verify_cost(record: dict) -> float | None:
    """One target pass of a speculative run, in decode steps of `none`, implied by the measurements.

    Time per generated token is ``target_passes_per_token * T_verify * (1 + c * draft_passes_per_target_pass)``
    (host work folded in), and ``none`` spends one decode step per token, so
    ``T_verify / T_decode = (1 / speedup) / (target_passes_per_token + draft_passes_per_token * c)``.

    Example: speedup 0.8, 0.23 target and 1.38 draft passes per token, c = 0.07 gives 3.8.
    """
    speedup, c = record.get("speedup_vs_none"), record.get("cost_ratio_c")
    target = record.get("target_passes_per_generated_token")
    draft = (record.get("levels") or {}).get("1", {}).get("passes_per_generated_token")
    if not speedup or c is None or target is None or draft is None:
        return None
    return (1.0 / speedup) / (target + draft * c)


def notes(meta: dict, records: list[dict]) -> list[str]:
    out = []
    gemm_only = [
        r["method"] for r in records if r["method"] == SAME_GEMM_BASELINE and r.get("identical_to_none") is False
    ]
    if gemm_only:
        out.append(
            f"{SAME_GEMM_BASELINE} differs from `none`: no speculation, but specqd's bf16 GEMM instead of torch's; "
            "another summation order rounds a near-tie the other way (gaps below)."
        )
    differing = list(
        dict.fromkeys(
            r["method"] for r in records if r.get("identical_to_none") is False and r["method"] not in gemm_only
        )
    )
    if differing and meta.get("dtype") != "float32":
        out.append(
            f"{', '.join(differing)} differ from `none` in {meta.get('dtype')}: on CPU, vLLM's {meta.get('dtype')} "
            "attention is not query-length invariant, so a token verified in a multi-token window can round "
            "differently from one decoded alone and a near-tie can flip. vLLM's own ngram and draft_model show "
            "the same; in float32 every method must be token-identical."
        )
    elif differing:
        out.append(f"**{', '.join(differing)} differ from `none` in {meta.get('dtype')}: that is a bug.**")
    same_gemm = [r for r in records if r.get("identical_to_same_gemm") is not None]
    if same_gemm:
        identical = [r["method"] for r in same_gemm if r["identical_to_same_gemm"]]
        different = [
            f"{r['method']} ({r['num_different_from_same_gemm']})" for r in same_gemm if not r["identical_to_same_gemm"]
        ]
        if identical:
            out.append(
                f"{', '.join(identical)}: token-identical to `{SAME_GEMM_BASELINE}` (no speculation with the same "
                "bf16 GEMM, which is batch invariant), so any difference from `none` is that GEMM's rounding, "
                "not speculation's."
            )
        if different:
            out.append(f"differ from `{SAME_GEMM_BASELINE}` (outputs): {', '.join(different)}.")
    for r in records:
        if r.get("divergences"):
            where = "; ".join(
                f"prompt {d['prompt']} at token {d['position']}"
                + (f" (top-2 logit gap {d['top2_logit_gap']:.3f})" if d.get("top2_logit_gap") is not None else "")
                for d in r["divergences"]
            )
            out.append(f"{r['method']} diverges from `none`: {where}.")
        if r.get("adaptive"):
            out.append(f"{r['method']}, the adaptive policy's decisions over the timed run: {r['adaptive']['summary']}")
            share = r["adaptive"].get("decision_share")
            if share is not None and share >= DECISION_BUDGET_SHARE:
                out.append(
                    f"**{r['method']}: deciding took {share:.2%} of step time, over its "
                    f"{DECISION_BUDGET_SHARE:.0%} budget** (benchmarks/bench_adaptive_decision.py times the policy alone)."
                )
    for r in records:
        check = r.get("memory", {}).get("kv_capacity_check", "")
        if check.startswith("MISMATCH"):
            out.append(f"{r['method']}: KV capacity {check}; the +KV column may be wrong for this model.")
    for r in records:
        implied = implied_verify_cost(r)
        if implied is not None and (r.get("speedup_vs_none") or 1.0) < 1.0:
            out.append(
                f"{r['method']} is slower than `none` although its draft pass costs c = {r['cost_ratio_c']:.2f} "
                f"of a target pass: from tok/s, passes per token and c, one target verification pass "
                f"(K+1 tokens per request) costs about {implied:.1f} plain decode steps here. On CPUs where vLLM's "
                f"{meta.get('dtype')} linear has no oneDNN primitive it falls back to torch, whose multi-token "
                "GEMM costs several times a one-token one; where verification costs about one step, the same "
                "acceptance gives a speedup."
            )
    return out


def document(
    title: str, meta: dict, body: list[str], note_lines: list[str], methods_doc: dict[str, str], columns: list[str]
) -> str:
    """A results.md: title, run metadata, the tables (``body``), notes, methods, column definitions."""
    parts = [
        title,
        meta_block(meta),
        *body,
        "## Notes",
        "\n".join(f"* {n}" for n in note_lines) or "* none",
        "## Methods",
        "\n".join(f"* **{name}**: {text}" for name, text in methods_doc.items()),
        "## Columns",
        *columns,
    ]
    return "\n\n".join(parts) + "\n"


def offline_markdown(meta: dict, records: list[dict], methods_doc: dict[str, str]) -> str:
    body = [
        markdown_table(list(OFFLINE_COLUMNS), [offline_row(r) for r in records]),
        "## Acceptance per level",
        level_table(records),
    ]
    columns = [definitions(OFFLINE_COLUMNS), "### Acceptance per level", definitions(LEVEL_COLUMNS)]
    return document("# vllm-specqd offline benchmark", meta, body, notes(meta, records), methods_doc, columns)


def meta_block(meta: dict) -> str:
    keys = [k for k in meta if k != "command"]
    lines = [f"* {k}: {meta[k]}" for k in keys]
    return "\n".join(lines) + f"\n\nCommand:\n\n```\n{meta['command']}\n```"


def write_results(out_dir: Path, meta: dict, records: list[dict], markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "methods": records}, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown)
