"""The tcmalloc + libiomp5 LD_PRELOAD for engines (vllm_specqd/bench/preload.py), without an engine:
the LD_PRELOAD value it builds, and that a spawned child process (how vLLM's CPU platform starts
its engine core and workers) really maps both libraries."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest

from vllm_specqd.bench import preload

TC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
IOMP = "/venv/lib/libiomp5.so"


def test_adds_both_tcmalloc_first():
    result = preload.preload_for("", TC, IOMP)
    assert result.ld_preload == f"{TC}:{IOMP}" and result.added == (TC, IOMP) and result.complete


def test_keeps_what_is_already_preloaded():
    result = preload.preload_for("/opt/libtcmalloc.so:/x/libfoo.so", TC, IOMP)
    assert result.ld_preload == f"/opt/libtcmalloc.so:/x/libfoo.so:{IOMP}" and result.added == (IOMP,)
    assert preload.preload_for(f"{TC} {IOMP}", TC, IOMP).added == ()  # ld.so also splits on spaces


def test_never_adds_a_second_openmp_runtime():
    # vLLM asserts libiomp and libgomp are not both in LD_PRELOAD (vllm/utils/ompmultiprocessing.py).
    result = preload.preload_for("/torch/lib/libgomp.so.1", TC, IOMP)
    assert "libiomp" not in result.ld_preload and not result.complete
    assert "another OpenMP runtime" in result.missing[0]


def test_missing_libraries_say_how_to_get_them():
    result = preload.preload_for("", None, None)
    assert result.ld_preload == "" and len(result.missing) == 2
    assert "apt-get install libtcmalloc-minimal4" in result.missing[0] and "intel-openmp" in result.missing[1]


def test_opt_out(monkeypatch):
    monkeypatch.setenv("VLLM_SPECQD_PRELOAD", "0")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert preload.apply_preload() is None and "LD_PRELOAD" not in preload.engine_env()


def _found() -> tuple[str, str]:
    if not preload.wanted(os.environ):
        pytest.skip("no CPU build of vLLM here: the preload does not apply")
    tcmalloc, iomp5 = preload.find_tcmalloc(), preload.find_iomp5()
    if not (tcmalloc and iomp5):
        pytest.skip(f"tcmalloc={tcmalloc} iomp5={iomp5}: `make install` installs both")
    return tcmalloc, iomp5


def _maps_both(maps: str) -> bool:
    return "libtcmalloc_minimal" in maps and "libiomp5" in maps


def test_subprocess_with_engine_env_maps_both():
    _found()
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"],
        env=preload.engine_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert _maps_both(maps)


def _child_maps(queue) -> None:
    queue.put(open("/proc/self/maps").read())


def test_spawned_child_inherits_the_preload(monkeypatch):
    """apply_preload() in this process, then a `spawn` child (vLLM's CPU start method) maps both."""
    _found()
    monkeypatch.setenv("LD_PRELOAD", "")  # and restored after the test: apply_preload writes os.environ
    applied = preload.apply_preload(verbose=False)
    assert applied is not None and applied.complete and os.environ["LD_PRELOAD"] == applied.ld_preload
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_maps, args=(queue,))
    child.start()
    maps = queue.get(timeout=60)
    child.join(timeout=60)
    assert _maps_both(maps)
