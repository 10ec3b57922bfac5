"""The paper's configuration (ML-SpecQD) as a benchmark preset, swept: target in the run's dtype; level 1
its MXFP4 self-draft; level 2 a small same-tokenizer model (MXFP4 or unquantized); optionally level 3
an n-gram lookup.

One `python -m vllm_specqd bench` run per (K, small level's k), each with the small-model methods
asked for; the first run of each K also has `none` and `specqd-1` (what the speedups are over).
Then one table over every run (sweep.md, sweep.json): tok/s, speedup over `none` and over
`specqd-1` of the same K, per-level acceptance, passes per token and c.

    flock /tmp/specqd-engine.lock .venv/bin/python benchmarks/sweep_three_level.py \
        --model qwen2.5-coder-1.5b --small-model qwen2.5-coder-0.5b --k 6,8 --inner-k 2,3,4 \
        --small mxfp4,bf16 --out results/sweep-qwen15

Methods (vllm_specqd/bench/methods.py): `specqd-small` (MXFP4 small model <- n-gram), `specqd-small-2`
(MXFP4 small model, no n-gram), `specqd-small-bf16` (the small model in the run's dtype <- n-gram).
`--dry-run` prints the bench commands only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SMALL_METHODS = {
    ("mxfp4", True): "specqd-small",
    ("mxfp4", False): "specqd-small-2",
    ("bf16", True): "specqd-small-bf16",
}


def runs(ks: list[int], inner_ks: list[int], smalls: list[str], ngram: list[bool]) -> list[tuple[int, int, list[str]]]:
    """(K, inner k, methods) per bench run; the first run of each K carries the baselines."""
    out = []
    for k in ks:
        for i, inner in enumerate(k_ for k_ in inner_ks if k_ <= k):
            methods = [SMALL_METHODS[(s, n)] for s in smalls for n in ngram if (s, n) in SMALL_METHODS]
            out.append((k, inner, (["none", "specqd-1"] if i == 0 else []) + methods))
    return out


def bench_command(args, k: int, inner: int, methods: list[str], out: Path) -> list[str]:
    command = [sys.executable, "-m", "vllm_specqd", "bench", "--model", args.model, "--small-model", args.small_model]
    command += ["--dtype", args.dtype, "--dataset", args.dataset, "--num-prompts", str(args.num_prompts)]
    command += ["--max-tokens", str(args.max_tokens), "--batch-size", "1", "--k", str(k), "--inner-k", str(inner)]
    command += ["--methods", ",".join(methods), "--out", str(out)] + (["--eager"] if args.eager else [])
    return command


def _level(record: dict, level: str) -> dict:
    return record.get("levels", {}).get(level, {})


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def aggregate(out_dir: Path) -> tuple[list[dict], str]:
    """One row per (K, inner k, method) over every run's results.json under ``out_dir``."""
    records = []
    for path in sorted(out_dir.glob("K*-k*/results.json")):
        data = json.loads(path.read_text())
        for record in data["methods"]:
            if "error" in record:
                continue
            records.append(
                {"k": data["meta"]["k"], "inner_k": data["meta"]["inner_k"], "run": path.parent.name, **record}
            )
    base = {r["k"]: r["tokens_per_s"] for r in records if r["method"] == "none"}
    one = {r["k"]: r["tokens_per_s"] for r in records if r["method"] == "specqd-1"}
    rows = []
    for r in records:
        l1, l2, l3 = _level(r, "1"), _level(r, "2"), _level(r, "3")
        small = r["method"] not in ("none", "specqd-1")
        rows.append(
            {
                "K": r["k"],
                "small k": r["inner_k"] if small else None,
                "method": r["method"],
                "tok/s": r["tokens_per_s"],
                "vs none": r["tokens_per_s"] / base[r["k"]] if r["k"] in base else None,
                "vs specqd-1": r["tokens_per_s"] / one[r["k"]] if r["k"] in one and r["method"] != "none" else None,
                "identical": r.get("identical_to_none"),
                "L1 acc. len": l1.get("mean_accepted_length"),
                "L1 passes/tok": l1.get("passes_per_generated_token"),
                "c L1": l1.get("cost_ratio_c"),
                "L2 acc. rate": l2.get("acceptance_rate") if small else None,
                "L2 acc. len": l2.get("mean_accepted_length") if small else None,
                "L2 passes/tok": l2.get("passes_per_generated_token") if small else None,
                "c L2": l2.get("cost_ratio_c") if small else None,
                "L3 acc. rate": l3.get("acceptance_rate") if l3 else None,
                "run": r["run"],
            }
        )
    rows.sort(key=lambda row: (row["K"], row["method"] != "none", row["method"] != "specqd-1", row["small k"] or 0))
    specs = {"tok/s": ".2f", "vs none": ".2f", "vs specqd-1": ".2f"}
    headers = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = []
        for name in headers:
            value = row[name]
            if isinstance(value, bool):
                cells.append("yes" if value else "no")
            elif isinstance(value, float):
                cells.append(_fmt(value, specs.get(name, ".2f")) + ("x" if name.startswith("vs") else ""))
            else:
                cells.append("-" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="target: a checkpoint dir or a prepare-model name")
    p.add_argument("--small-model", required=True, help="the small same-tokenizer model (dir or name)")
    p.add_argument("--k", default="6,8", help="level-1 draft tokens K, a comma list")
    p.add_argument("--inner-k", default="2,3,4", help="tokens the small level proposes per window, a comma list")
    p.add_argument("--small", default="mxfp4,bf16", help="the small model: mxfp4, bf16 (the run's dtype), or both")
    p.add_argument("--ngram", choices=("on", "off", "both"), default="on", help="level 3 n-gram below the small model")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="print the bench commands, run nothing")
    p.add_argument("--aggregate-only", action="store_true", help="rebuild sweep.md from the runs under --out")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    ngram = {"on": [True], "off": [False], "both": [True, False]}[args.ngram]
    plan = runs(
        [int(k) for k in args.k.split(",")], [int(k) for k in args.inner_k.split(",")], args.small.split(","), ngram
    )
    failed = 0
    if not args.aggregate_only:
        for k, inner, methods in plan:
            command = bench_command(args, k, inner, methods, out_dir / f"K{k}-k{inner}")
            print("[sweep]", " ".join(command), flush=True)
            if not args.dry_run:
                failed += subprocess.run(command).returncode != 0
    if args.dry_run:
        return 0
    rows, table = aggregate(out_dir)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out_dir / "sweep.md").write_text(
        "# Three-level sweep\n\nspeedups over `none` and `specqd-1` of the same K (the run of that K which has "
        "them); c = a level's forward pass (lm_head included) over the target's, measured in the worker.\n\n" + table
    )
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
