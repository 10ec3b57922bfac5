"""One budgeted session on a lent GPU for the MXFP4 Triton kernels (``kernels/triton_mxfp4.py``).

``benchmarks/gpu_session.sh`` runs these phases, each a module run as ``python3 -m benchmarks.gpu.<module>``
under ``timeout`` and inside one overall budget (``SPECQD_BUDGET_S``, default 420 s; 280 s short), so a
hung step cannot eat the device time; later steps shrink or are skipped when time runs short:

1. ``env_check`` (info): nvidia-smi, the C compiler and Python.h Triton builds its launcher with,
   versions, where ``vllm_specqd`` and its kernels are imported from, a trivial Triton kernel.
2. ``correctness`` (tests): the CUDA tests of ``tests/test_kernels.py`` (plus the launcher / split-K
   tests), ``pytest --noconftest`` (``tests/conftest.py`` imports vLLM), sharded over parallel
   processes because compiling is CPU-bound. ``autotune_plugin`` replaces the autotuner's timing
   runs with a seeded random pick, so each tuning key checks one pseudo-random config instead of
   compiling and timing all of them. The interpreter tests run only with ``SPECQD_RUN_INTERP=1``.
3. ``precompile``: every autotune config of every benchmarked decode shape (and the dequant kernel)
   is compiled into the shared Triton cache by parallel workers (worker i compiles pairs i, i+W, ...).
4. ``tune_check`` (tune+check): one process autotunes every benchmarked key with a shorter do_bench
   (warmup 5 ms, rep 25 ms) and ``TRITON_CACHE_AUTOTUNING=1`` (the timings reuse the picks), and
   checks each tuned kernel against the torch twin with the tests' error bound -> kernel_check.json,
   with the decode kernels' registers / spills / shared memory and two SASS opcode histograms
   (``kernel_stats``).
5. - 7. ``timings``: ``bench_kernels.py`` (8B + 70B decode GEMMs), ``bench_decode_step.py`` (one
   Llama-3.1-8B decode step), and the prefill GEMMs on the dequant path (full sessions only).
8. ``summary``: the closing summary, printed and written to summary.txt.

Results land in ``$OUT`` (no subfolders): session.log (everything, the summary last), kernel_check.json,
bench_kernels.json, bench_decode_step.json, bench_kernels_prefill_dequant.json (full sessions),
summary.txt. Work files (Triton cache, test ids, shard and worker logs, steps.txt) go to
``SPECQD_WORK_DIR`` (default /tmp/specqd_gpu_session).

Knobs (environment): ``OUT``, ``SPECQD_BUDGET_S``, ``SPECQD_WORK_DIR``, ``SPECQD_TEST_SHARDS``,
``SPECQD_PRECOMPILE_WORKERS``, ``SPECQD_RUN_INTERP=1``, ``SPECQD_SKIP_PREFILL=1``,
``SPECQD_SESSION_SHORT=1`` (budget 280 s, M / batch in {1, 4, 16}, fewer timing iterations, no prefill
step: fits a 5-minute device slot), ``SPECQD_SESSION_SMOKE=1`` (no GPU: tiny shapes, kernels in the
Triton interpreter, CPU twins; checks only that the session's plumbing works).

Importing this package makes ``vllm_specqd.kernels`` importable from ``kernels/`` without installing
anything (``layout``): the lent machine has torch, Triton, pytest and numpy, but no vLLM and no network.
The driver also puts ``benchmarks/gpu/site`` on PYTHONPATH, whose ``sitecustomize`` imports this package
in every Python process of the session, the subprocesses that tests start included.
"""

from .layout import install

install()
