"""Every Python process of a GPU session imports ``vllm_specqd`` and its kernels from this checkout.

benchmarks/gpu_session.sh puts this folder on PYTHONPATH. Python's ``site`` then imports this module at
start-up in every process of the session, the ones that tests start included (pytest's workers, the
interpreter test's subprocess), and it puts the checkout's package-dir finder
(``benchmarks/gpu/layout.py``) ahead of every other finder: what the session measures is this checkout,
whatever else is installed or on the path. It then runs the ``sitecustomize`` it shadows, if any.
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))
if _REPO not in sys.path:
    sys.path.append(_REPO)

from benchmarks.gpu import layout  # noqa: E402

layout.install(first=True)  # this checkout's vllm_specqd, whatever else is installed or on the path


def _run_shadowed() -> None:
    for entry in sys.path:
        path = os.path.join(os.path.abspath(entry or os.curdir), "sitecustomize.py")
        if os.path.dirname(path) != _HERE and os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_run_shadowed()
