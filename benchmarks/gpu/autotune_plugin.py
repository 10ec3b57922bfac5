"""pytest plugin of the session's test step: the MXFP4 decode autotuner picks a seeded random config.

The tests check whichever config the autotuner picks. Timing all configs of every tuning key means
compiling every gemv config for ~40 specializations; here the autotuner's do_bench returns a
seeded random number without running anything, so each key compiles and checks one pseudo-random
config, and different keys exercise different configs. The terminal summary lists them.

    python3 -m pytest -p benchmarks.gpu.autotune_plugin ...
"""

from __future__ import annotations

import random

_RNG = random.Random(20261204)
_STATE = {"patched": False, "why": "not configured"}
TUNERS = ("_gemv_launch",)  # autotuned launchers in vllm_specqd.kernels.triton_mxfp4


def _random_bench(kernel_call, quantiles=None, **kwargs):
    t = _RNG.random()
    return [t, t, t] if quantiles is not None else t


def replace_do_bench(tuner, bench) -> None:
    """Make the Triton autotuner ``tuner`` time its configs with ``bench`` (do_bench's signature)."""
    tuner._do_bench = bench
    tuner.__dict__["do_bench"] = bench  # shadows the cached_property / method


def config_label(cfg) -> str:
    """``{'BLOCK_KB': 4} w4 s2``: a triton.Config's kwargs, warps and stages."""
    return f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"


def exercised_lines(name: str, tuner) -> list[str]:
    """The summary lines of one tuner: tuning keys seen, distinct configs picked."""
    distinct = sorted({config_label(c) for c in tuner.cache.values()})
    head = f"[specqd] {name}: {len(tuner.cache)} tuning keys, {len(distinct)} of {len(tuner.configs)} configs exercised"
    return [head] + [f"[specqd]     {cfg}" for cfg in distinct]


def pytest_configure(config):
    try:
        from vllm_specqd.kernels import triton_mxfp4 as mt
    except Exception as e:  # no Triton, or one that fails on import: the header says which
        _STATE["why"] = f"kernels not importable: {e!r}"
        return
    if mt.INTERPRET:
        _STATE["why"] = "TRITON_INTERPRET: no autotuner"
        return
    for name in TUNERS:
        replace_do_bench(getattr(mt, name), _random_bench)
    _STATE.update(patched=True, why="")


def pytest_report_header(config):
    try:
        import vllm_specqd.kernels as K

        where = f"vllm_specqd.kernels from {K.__file__}"
    except Exception as e:  # reported, not raised: the header is diagnostics
        where = f"vllm_specqd.kernels NOT importable: {e!r}"
    if _STATE["patched"]:
        return f"specqd: autotune timing replaced by a seeded random pick (one config compiled per key); {where}"
    return f"specqd: autotuner NOT patched ({_STATE['why']}); {where}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    tr.write_line("[specqd] " + pytest_report_header(config))  # -q hides the header
    if not _STATE["patched"]:
        return
    from vllm_specqd.kernels import triton_mxfp4 as mt

    for name in TUNERS:
        for line in exercised_lines(name, getattr(mt, name)):
            tr.write_line(line)
