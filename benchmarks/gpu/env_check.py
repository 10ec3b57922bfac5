"""Phase 1 (info): what the session runs on.

    python3 -m benchmarks.gpu.env_check --host       # nvidia-smi, the C compiler and Python.h (Triton builds
                                                     # its launcher with them); imports no torch
    python3 -m benchmarks.gpu.env_check              # versions, where vllm_specqd and its kernels come from,
                                                     # one trivial Triton kernel on the GPU
    python3 -m benchmarks.gpu.env_check --has-cuda   # prints 1 or 0

The driver prints the host part before the info step, and asks --has-cuda which steps to run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

GPU_QUERY = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit"
NVIDIA_SMI = (["nvidia-smi", "-L"], ["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv"])


def _run(cmd: list[str]) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, f"{cmd[0]}: {e}\n"
    return p.returncode, p.stdout


def c_compiler() -> str:
    """The C compiler Triton would find (gcc, cc, clang), or NONE."""
    return next((path for path in map(shutil.which, ("gcc", "cc", "clang")) if path), "NONE")


def python_header() -> str:
    h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    return h if os.path.exists(h) else "MISSING " + h


def host_report(run=_run) -> str:
    """The GPU (nvidia-smi), the C compiler and Python.h, as the session log shows them."""
    rc, text = run(NVIDIA_SMI[0])
    lines = [text.rstrip("\n")] + (["(nvidia-smi failed)"] if rc else [])
    lines.append(run(NVIDIA_SMI[1])[1].rstrip("\n"))
    lines.append(f"C compiler (Triton builds its launcher with it): {c_compiler()}")
    lines.append(f"Python.h: {python_header()}")
    return "\n".join(s for s in lines if s)


def info() -> None:
    """Versions, import paths and one trivial Triton kernel on the GPU."""
    import numpy
    import pytest
    import torch

    print(
        f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
        f"numpy {numpy.__version__}  pytest {pytest.__version__}"
    )
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as e:  # an incomplete Triton install raises more than ImportError
        print(f"triton: IMPORT FAILED {e!r}")
    import vllm_specqd
    import vllm_specqd.kernels as K

    print(
        f"vllm_specqd from {os.path.dirname(vllm_specqd.__file__)}; kernels from {os.path.dirname(K.__file__)}; "
        f"HAS_TRITON={K.HAS_TRITON}"
    )
    if not torch.cuda.is_available():
        print("CUDA: not available")
        return
    p = torch.cuda.get_device_properties(0)
    print(
        f"CUDA device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
        f"{p.total_memory / 2**30:.0f} GiB; {torch.cuda.device_count()} device(s)"
    )
    from .triton_smoke import add_matches_torch

    print(f"triton smoke kernel: {'ok' if add_matches_torch('cuda') else 'WRONG RESULT'}")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--host", action="store_true", help="nvidia-smi, C compiler, Python.h")
    what.add_argument("--has-cuda", action="store_true", help="print 1 if torch sees a CUDA device, else 0")
    args = p.parse_args(argv)
    if args.host:
        print(host_report())
    elif args.has_cuda:
        print(int(has_cuda()))
    else:
        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
