"""results.md for served runs: one row per (method, concurrency level)."""

from __future__ import annotations

from vllm_specqd.bench.report import definitions, document, fmt, markdown_table, notes, table_row

SERVED_COLUMNS = {
    "method": "speculative method",
    "conc.": "requests in flight at once (each level sends max(num_prompts, conc.) requests)",
    "out tok/s": "completion tokens of the level / its wall time",
    "speedup": "out tok/s / out tok/s of the baseline (`none`; without it in the run, `none-specqd-gemm`) at the same concurrency",
    "start s": "`vllm serve` start-up until /health answers (load, MXFP4 cast, compile, profile, KV cache)",
    "identical": "completion texts equal to those of the baseline (`none`; without it in the run, `none-specqd-gemm`) at the same concurrency",
    "p50 / p90 latency s": "end-to-end request latency percentiles",
    "L1 acc. len": "level-1 mean accepted length over the level (from /metrics deltas)",
    "L1 acc. rate": "level-1 accepted / proposed (from /metrics deltas)",
    "inner acc. rate": "levels >= 2: accepted / proposed over the level (specqd level report deltas)",
    "target passes/tok": "target forward passes per generated token, per request",
}


def served_rows(record: dict) -> list[list[str]]:
    if "error" in record:
        failed = {"method": record["method"], "conc.": "-", "out tok/s": f"FAILED: {record['error'][:80]}"}
        return [table_row(SERVED_COLUMNS, failed)]
    rows = []
    for lv in record["concurrency_levels"]:
        cells = {"method": record["method"], "conc.": str(lv["concurrency"])}
        if "error" in lv:
            rows.append(table_row(SERVED_COLUMNS, {**cells, "out tok/s": f"FAILED: {lv['error'][:80]}"}))
            continue
        inner = "; ".join(f"L{k}: {fmt(v['acceptance_rate'])}" for k, v in lv["inner_levels"].items()) or "-"
        identical = lv.get("identical_to_none")
        cells.update(
            {
                "out tok/s": fmt(lv["output_tokens_per_s"], ".1f"),
                "speedup": fmt(lv.get("speedup_vs_none")),
                "start s": fmt(record.get("server_start_s"), ".1f"),
                "identical": "n/a"
                if identical is None
                else (
                    "yes"
                    if identical
                    else f"no ({lv['num_different']}/{lv.get('num_compared', lv['num_requests'])} differ)"
                ),
                "p50 / p90 latency s": f"{lv['latency_s']['p50']:.2f} / {lv['latency_s']['p90']:.2f}",
                "L1 acc. len": fmt(lv["level1"]["mean_accepted_length"], none="-"),
                "L1 acc. rate": fmt(lv["level1"]["acceptance_rate"], none="-"),
                "inner acc. rate": inner,
                "target passes/tok": fmt(lv["target_passes_per_generated_token"]),
            }
        )
        rows.append(table_row(SERVED_COLUMNS, cells))
    return rows


def served_markdown(meta: dict, records: list[dict], methods_doc: dict[str, str]) -> str:
    table = markdown_table(list(SERVED_COLUMNS), [row for r in records for row in served_rows(r)])
    return document(
        "# vllm-specqd served benchmark (`vllm serve` + OpenAI completions API)",
        meta,
        [table],
        served_notes(meta, records),
        methods_doc,
        [definitions(SERVED_COLUMNS)],
    )


def levels_of(record: dict) -> list[dict]:
    """The concurrency levels of a served record that produced numbers."""
    return [lv for lv in record.get("concurrency_levels", []) if "error" not in lv]


def served_notes(meta: dict, records: list[dict]) -> list[str]:
    flat = [
        {
            "method": r["method"],
            "identical_to_none": lv.get("identical_to_none"),
            "speedup_vs_none": lv.get("speedup_vs_none"),
        }
        for r in records
        for lv in levels_of(r)
    ]
    out = notes(meta, flat)
    out.append("Server logs: " + ", ".join(f"`{r['server_log']}`" for r in records if "server_log" in r) + ".")
    return out
