"""`python -m vllm_specqd demo` (`make demo`): the bundled model with and without specqd, side by side.

Offline `LLM.generate` over 6 HumanEval + 4 chat prompts (64 tokens), greedy, one
request at a time in bf16: the setting speculative decoding is for (the paper's: batch 1,
a memory-bound decode step). Four engines in turn: no speculation, vLLM's n-gram, specqd
with one level and K drafts every step (the MXFP4 self-draft), and specqd's defaults with
an n-gram level (adaptive: per request and step, plain decoding, MXFP4 drafts or the
n-gram's proposal). Engines run eagerly (`enforce_eager`): four compiled start-ups would
take minutes; `bench` measures vLLM's default compiled mode.
Prints tokens/s, acceptance (mean accepted length, per position, per level)
and whether the outputs match no speculation token for token (in bf16 a near-tie may
flip; `--dtype float32` is token-identical). Engines run with tcmalloc + libiomp5
preloaded, as vLLM's CPU docs ask (vllm_specqd/bench/preload.py).
"""

from __future__ import annotations

import argparse
import os

DEMO_METHODS = "none,ngram,specqd-1,specqd-adaptive-ngram"
CODE_SHARE = 0.6  # 6 of the default 10 prompts are HumanEval


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vllm_specqd demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=10, help="60%% HumanEval, 40%% chat")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=6, help="level-1 draft tokens per round")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate call")
    return p


SUMMARY = {  # demo header: bench column (None: the demo's own)
    "method": "method",
    "tok/s": "tok/s",
    "speedup": "speedup",
    "identical to none": "identical",
    "mean acc. len (L1)": "L1 acc. len",
    "per-position acceptance (L1)": None,
    "engine start s": None,
}


def _summary_rows(records: list[dict]) -> list[list[str]]:
    from vllm_specqd.bench.report import fmt, offline_cells

    rows = []
    for record in records:
        cells = offline_cells(record)
        per_pos = " ".join(f"{p:.2f}" for p in record.get("levels", {}).get("1", {}).get("per_position", []))
        own = {
            "per-position acceptance (L1)": per_pos or "-",
            "engine start s": fmt(record.get("engine_start_s"), ".0f"),
        }
        rows.append([own[h] if column is None else cells.get(column, "") for h, column in SUMMARY.items()])
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vllm_specqd.bench.offline import RunSettings, default_models, run_methods, set_engine_env_defaults

    set_engine_env_defaults(verbose=False)
    from vllm_specqd.bench.datasets import mixed_prompts
    from vllm_specqd.bench.methods import parse_methods
    from vllm_specqd.bench.report import level_table, markdown_table, notes, run_metadata

    target, _ = default_models(None, need_small=False)
    n_code = round(CODE_SHARE * args.num_prompts)
    prompts = mixed_prompts(n_code, args.num_prompts - n_code, target)
    settings = RunSettings(
        target, None, args.dtype, args.k, args.max_tokens, args.batch_size, max_model_len=2048, eager=True
    )
    methods = parse_methods(DEMO_METHODS)
    print(
        f"[demo] {target}: {n_code} HumanEval + {args.num_prompts - n_code} chat prompts, "
        f"{args.max_tokens} tokens, K={args.k}, {args.dtype}, batch {args.batch_size}, eager; "
        f"starting {len(methods)} engines in turn, "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD') or '(none)'}"
    )
    records = run_methods(methods, prompts, settings)

    print("\n" + markdown_table(list(SUMMARY), _summary_rows(records)))
    print("\nPer level (level 1 proposes to the target, level 2 to level 1):\n")
    print(level_table(records))
    for note in notes(run_metadata({"dtype": args.dtype}), records):
        print(f"\n* {note}")
    sample = next((r for r in records if r["method"] == "specqd-1" and "error" not in r), None)
    if sample:
        chat = next((o for o in sample["outputs"] if o["source"] == "chat"), sample["outputs"][0])
        print(f"\nSample specqd-1 output ({chat['source']} prompt):\n{chat['text'].strip()}\n")
    return 0 if all("error" not in r for r in records) else 1
