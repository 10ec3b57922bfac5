"""Every Python process of a GPU session imports ``vllm_specqd.kernels`` from the checkout.

benchmarks/gpu_session.sh puts this folder on PYTHONPATH, so Python's ``site`` imports this module at
start-up in the session's own processes and in the ones they start (pytest's workers, the
interpreter test's subprocess): ``import benchmarks.gpu`` adds the checkout's package-dir finder
(``benchmarks/gpu/layout.py``). It then runs the ``sitecustomize`` it shadows, if there is one.
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))
if _REPO not in sys.path:
    sys.path.append(_REPO)

import benchmarks.gpu  # noqa: E402, F401  (installs the finder)


def _run_shadowed() -> None:
    for entry in sys.path:
        path = os.path.join(os.path.abspath(entry or os.curdir), "sitecustomize.py")
        if os.path.dirname(path) != _HERE and os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_run_shadowed()
