"""`python -m vllm_specqd bench`: compare speculative methods on the real vLLM engine.

    python -m vllm_specqd bench                                  # offline, all methods, bundled model
    python -m vllm_specqd bench --quick --methods none,specqd-1  # smoke: 2 prompts, 16 tokens
    python -m vllm_specqd bench --served --concurrency 1,4,16,64 # `vllm serve` + OpenAI client sweep
    python -m vllm_specqd bench --project-from results/bench-X/results.json [--c 0.3 | --c-json decode.json]

Writes results.md, results.json and a PNG into --out (default results/bench-<timestamp>).
benchmarks/README.md defines every column.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from vllm_specqd.bench.methods import DEFAULT_METHODS, METHODS, parse_methods

QUICK = {"num_prompts": 2, "max_tokens": 16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_specqd bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--model",
        default=None,
        help="target checkpoint dir, or a prepare-model name such as qwen2.5-coder-1.5b (default: the bundled "
        "SmolLM2-135M)",
    )
    p.add_argument(
        "--small-model",
        default=None,
        help="same-tokenizer small model for specqd-small, a dir or a prepare-model name such as "
        "qwen2.5-coder-0.5b (default: a layer cut of the bundled model)",
    )
    p.add_argument(
        "--small-layers",
        type=int,
        default=24,
        help="decoder layers kept in the default small model (of 30). Layer-skipped cuts are poor "
        "drafts without training: greedy agreement with the full model was 0.3%% (8), 16%% (20), "
        "60%% (24) on HumanEval continuations",
    )
    p.add_argument("--dataset", choices=("humaneval", "chat", "both"), default="both")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma list of: {','.join(METHODS)} (default: all but specqd-small-2 and specqd-small-bf16)",
    )
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="prompts per generate call, and the engine's max_num_seqs (offline mode)",
    )
    p.add_argument("--k", type=int, default=6, help="level-1 draft tokens per round (num_speculative_tokens)")
    p.add_argument(
        "--inner-k", type=int, default=None, help="tokens the level below the MXFP4 draft proposes (default K // 2)"
    )
    p.add_argument(
        "--specqd-draft",
        type=json.loads,
        default=None,
        help='JSON of extra `draft` keys for every specqd method, e.g. \'{"lm_head": "shared"}\'',
    )
    p.add_argument(
        "--specqd-adaptive",
        type=json.loads,
        default=None,
        help="JSON of `adaptive` keys for specqd-adaptive, e.g. '{\"min_gain\": 0.05}'",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="float32 by default: on CPU only float32 makes speculation token-identical in vLLM",
    )
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--out", default=None, help="results directory (default: results/bench-<timestamp>)")
    p.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    p.add_argument("--verbose", action="store_true", help="keep vLLM's INFO logs")
    p.add_argument(
        "--eager",
        action="store_true",
        help="run every engine with enforce_eager (default: vLLM's default mode, torch.compile, for all methods)",
    )
    served = p.add_argument_group("served mode")
    served.add_argument("--served", action="store_true", help="benchmark `vllm serve` subprocesses instead")
    served.add_argument("--concurrency", default="1,4,16,64", help="comma list of concurrent request counts")
    served.add_argument(
        "--chat-temperature",
        type=float,
        default=0.0,
        help="sample chat prompts at this temperature (seeded per request; code prompts stay greedy and are "
        "the ones compared with none): with --dataset both, the mixed greedy/sampled workload",
    )
    served.add_argument(
        "--load",
        choices=("prompts", "random"),
        default="prompts",
        help="prompts: the --dataset prompts through the OpenAI client; random: vLLM's own load generator "
        "(`vllm bench serve --dataset-name random`, --random-input-len tokens in, --max-tokens out, ignore_eos)",
    )
    served.add_argument("--random-input-len", type=int, default=64)
    proj = p.add_argument_group("projection (no engine is started)")
    proj.add_argument(
        "--project-from",
        default=None,
        metavar="RESULTS_JSON",
        help="project an 8B batch-1 speedup from an offline results.json",
    )
    proj.add_argument("--c", type=float, default=None, help="MXFP4 draft pass / target step cost ratio")
    proj.add_argument("--c-json", default=None, help="bench_decode_step.py JSON to read c (batch 1) from")
    proj.add_argument(
        "--c2",
        type=float,
        default=None,
        help="small-model level pass / target step (default: c x small layers / target layers)",
    )
    return p


def _model_dir(model: str | None, parser) -> str | None:
    """A checkpoint directory, or a model prepare-model knows by name (e.g. qwen2.5-coder-1.5b): its cached dir."""
    from vllm_specqd import model_prep

    if model is None or Path(model).expanduser().exists() or model not in model_prep.MODELS:
        return model
    try:
        return str(model_prep.prepare_model(model=model, quiet=True))
    except (FileNotFoundError, model_prep.ChecksumError) as error:
        parser.error(f"{model}: {error}")


def _num_layers(model_dir: str | None) -> int | None:
    if model_dir is None:
        return None
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("text_config", config).get("num_hidden_layers")


def _select_methods(args, parser):
    try:
        methods = parse_methods(args.methods)
    except ValueError as error:
        parser.error(str(error))
    if args.model and not args.small_model and any(m.needs_small_model for m in methods):
        if args.methods != ",".join(DEFAULT_METHODS):
            parser.error("specqd-small with --model needs --small-model (a same-tokenizer small checkpoint)")
        print("[bench] skipping specqd-small: --model given without --small-model")
        methods = [m for m in methods if not m.needs_small_model]
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.project_from:
        from vllm_specqd.bench.projection import run_projection

        print(run_projection(args.project_from, args.c, args.c2, args.c_json))
        return 0
    if args.quick:
        args.num_prompts, args.max_tokens = QUICK["num_prompts"], QUICK["max_tokens"]
    if not 0.0 <= args.chat_temperature <= 2.0:
        parser.error(f"--chat-temperature must be in 0..2, got {args.chat_temperature}")
    if args.chat_temperature and not args.served:
        parser.error("--chat-temperature applies to --served runs only")
    methods = _select_methods(args, parser)
    from vllm_specqd.bench import datasets
    from vllm_specqd.bench.offline import default_models, set_engine_env_defaults

    set_engine_env_defaults(args.verbose)
    args.model, args.small_model = _model_dir(args.model, parser), _model_dir(args.small_model, parser)
    target, small = default_models(args.model, any(m.needs_small_model for m in methods), args.small_layers)
    small = args.small_model or small
    prompts = datasets.load_prompts(args.dataset, args.num_prompts, target)
    out_dir = Path(args.out or f"results/bench-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "mode": "served" if args.served else "offline",
        "engine_mode": "eager (enforce_eager)" if args.eager else "compiled (torch.compile, vLLM's default)",
        "model": target,
        "small_model": small,
        "target_layers": _num_layers(target),
        "small_layers": _num_layers(small),
        "dataset": args.dataset,
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "k": args.k,
        "inner_k": args.inner_k,
        "specqd_draft": args.specqd_draft,
        "specqd_adaptive": args.specqd_adaptive,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "ignore_eos": args.ignore_eos,
    }
    methods_doc = {m.name: m.description for m in methods}
    records, markdown = (_served if args.served else _offline)(
        args, methods, prompts, target, small, out_dir, meta, methods_doc
    )
    print(markdown)
    print(f"[bench] wrote {out_dir}/results.md, results.json and the plot")
    return 0 if all("error" not in r for r in records) else 1


def _finish(out_dir: Path, meta: dict, records: list[dict], markdown_fn, methods_doc: dict, plot_fn, png: str):
    from vllm_specqd.bench import report

    meta = report.run_metadata(meta)
    markdown = markdown_fn(meta, records, methods_doc)
    report.write_results(out_dir, meta, records, markdown)
    plot_fn(records, out_dir / png)
    return records, markdown


def _offline(args, methods, prompts, target, small, out_dir, meta, methods_doc):
    from vllm_specqd.bench import plot, report
    from vllm_specqd.bench.offline import RunSettings, run_methods

    meta["batch_size"] = args.batch_size
    settings = RunSettings(
        target,
        small,
        args.dtype,
        args.k,
        args.max_tokens,
        args.batch_size,
        args.max_model_len,
        args.ignore_eos,
        args.inner_k,
        args.specqd_draft,
        args.specqd_adaptive,
        eager=args.eager,
    )
    records = run_methods(methods, prompts, settings)
    return _finish(
        out_dir,
        meta,
        records,
        report.offline_markdown,
        methods_doc,
        plot.plot_speedup_acceptance,
        "speedup_acceptance.png",
    )


def _served(args, methods, prompts, target, small, out_dir, meta, methods_doc):
    from vllm_specqd.bench import plot, served_report
    from vllm_specqd.bench.served import ServeSettings, serve_methods

    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    meta["concurrency"] = list(concurrency)
    settings = ServeSettings(
        target,
        small,
        args.dtype,
        args.k,
        args.max_tokens,
        args.max_model_len,
        concurrency,
        out_dir.resolve(),
        args.inner_k,
        args.specqd_draft,
        args.chat_temperature,
        args.specqd_adaptive,
        eager=args.eager,
        load=args.load,
        random_input_len=args.random_input_len,
    )
    meta["chat_temperature"] = args.chat_temperature
    records = serve_methods(methods, prompts, settings)
    return _finish(
        out_dir,
        meta,
        records,
        served_report.served_markdown,
        methods_doc,
        plot.plot_served,
        "throughput_concurrency.png",
    )
