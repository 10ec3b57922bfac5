"""End-to-end benchmark: a thin wrapper around `python -m vllm_specqd bench` (same flags).

    python benchmarks/bench_e2e.py --quick --methods none,specqd-1
    python benchmarks/bench_e2e.py --served --concurrency 1,4,16,64

See benchmarks/README.md ("End-to-end benchmark") for the methods and columns.
"""

import sys

from vllm_specqd.bench.cli import main

# vLLM's engine processes re-import the main module: run only as a script.
if __name__ == "__main__":
    sys.exit(main())
